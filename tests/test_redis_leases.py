"""Per-key order across processes with Redis Streams partitions (issue 17): each partition of a
group is read by one live member at a time (partition leases), the partitions spread evenly
over the members, and they move when a member joins, stops or dies, without breaking the
order of a key.

Members are separate processes (the script below). Each reports every handled event with the
handler's start and end on CLOCK_MONOTONIC, which all processes of a machine share, so the
order of a key is checked across processes: its first deliveries start in publish order, each
after the previous one ended. Members report their partitions whenever they change; the tests
wait on those reports, never with sleeps. They talk to the Redis on 127.0.0.1:6379 (skipped
outside CI when it is unreachable) with their own stream names, deleted afterwards.
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from _redis import URL, Resp
from oxbus import DomainEvent, EventBus, RedisStreams
from oxbus.errors import ConfigurationError

PARTITIONS = 4


@pytest.fixture
def stream(rds: Resp) -> Any:
    """A unique stream name; every key starting with it (partitions, leases) is deleted after."""
    name = f"oxbus-test:leases:{uuid.uuid4().hex}"
    yield name
    rds.delete_prefix(name)


class LeaseStep(DomainEvent):
    """The event the members handle (the same class name there); keyed by its account."""

    def __init__(self, account: str, seq: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.account = account
        self.seq = seq

    @property
    def aggregate_id(self) -> str:
        return self.account


def _fnv1a(text: str) -> int:
    h = 0xCBF29CE484222325
    for b in text.encode():
        h = ((h ^ b) * 0x100000001B3) % (1 << 64)
    return h


def spread_keys(per_partition: int = 2) -> list[str]:
    """Account names covering every partition ``per_partition`` times (the transport puts a key
    on partition FNV-1a(key) % partitions)."""
    keys: list[str] = []
    taken = [0] * PARTITIONS
    i = 0
    while len(keys) < PARTITIONS * per_partition:
        k = f"acct-{i}"
        p = _fnv1a(k) % PARTITIONS
        if taken[p] < per_partition:
            taken[p] += 1
            keys.append(k)
        i += 1
    return keys


def partition_of(key: str) -> int:
    return _fnv1a(key) % PARTITIONS


# A member process: reports "ready", "owns [...]" whenever its partitions change, and
# "h <key> <seq> <start> <end>" per handled event; on stdin EOF it drains, stops, and says
# "bye {...}" with its transport's counters.
MEMBER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from oxbus import DomainEvent, EventBus

    class LeaseStep(DomainEvent):
        def __init__(self, account, seq, **kw):
            super().__init__(**kw)
            self.account = account
            self.seq = seq

        @property
        def aggregate_id(self):
            return self.account

    async def main():
        cfg = json.loads(sys.argv[1])
        bus = EventBus(
            transport=cfg["url"], group="billing", consumer=cfg["consumer"],
            stream=cfg["stream"], partitions=cfg["partitions"], lease_ttl=cfg["lease_ttl"],
            prefetch=cfg.get("prefetch", 1000), claim_idle=30.0, workers=4,
        )
        delay = cfg.get("delay", 0.0)

        async def handle(e):
            t0 = time.monotonic()
            await asyncio.sleep(delay)  # sleep-ok: the handler's simulated work
            t1 = time.monotonic()
            print(f"h {e.account} {e.seq} {t0!r} {t1!r}", flush=True)

        async def watch():
            last = None
            while True:
                owned = bus.get_health_status()["transport"]["partitions"]["owned"]
                if owned != last:
                    print("owns " + json.dumps(owned), flush=True)
                    last = owned
                await asyncio.sleep(0.02)  # sleep-ok: polls its own health to report leases

        bus.subscribe(LeaseStep, handle)
        await bus.start()
        print("ready", flush=True)
        watcher = asyncio.get_running_loop().create_task(watch())
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await bus.drain(60)
        watcher.cancel()
        counters = {k: bus.get_health_status()["transport"][k] for k in ("received", "claimed")}
        await bus.stop(timeout=10)
        print("bye " + json.dumps(counters), flush=True)

    asyncio.run(main())
    """
)


@dataclass
class Handled:
    member: str
    key: str
    seq: int
    start: float
    end: float


class Group:
    """What the member processes report, with waits on conditions over it."""

    def __init__(self) -> None:
        self.handled: list[Handled] = []
        self.owned: dict[str, list[int]] = {}
        self._waiters: list[tuple[Callable[[], bool], asyncio.Event]] = []

    def changed(self) -> None:
        for pred, ev in self._waiters:
            if pred():
                ev.set()

    async def until(self, pred: Callable[[], bool], what: str, timeout: float = 60) -> None:
        if pred():
            return
        ev = asyncio.Event()
        self._waiters.append((pred, ev))
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}: owned {self.owned}, "
                f"{len(self.handled)} handled, {len({(h.key, h.seq) for h in self.handled})} "
                "distinct"
            ) from None
        finally:
            self._waiters.remove((pred, ev))

    def distinct(self) -> int:
        return len({(h.key, h.seq) for h in self.handled})

    def by(self, member: str) -> list[Handled]:
        return [h for h in self.handled if h.member == member]

    def shares(self, *members: str) -> list[int]:
        return sorted(len(self.owned.get(m, [])) for m in members)

    def split(self, *members: str) -> bool:
        """Whether ``members`` hold every partition between them, each once, evenly."""
        held = [p for m in members for p in self.owned.get(m, [])]
        counts = self.shares(*members)
        return sorted(held) == list(range(PARTITIONS)) and counts[-1] - counts[0] <= 1


_live: list[Member] = []


class Member:
    """A member process of the group ``billing``."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, group: Group) -> None:
        self.name = name
        self.proc = proc
        self.group = group
        self.bye: dict[str, int] | None = None
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, tmp: Path, group: Group, name: str, stream: str, **cfg: Any) -> Member:
        script = tmp / "member.py"
        if not script.exists():
            script.write_text(MEMBER)
        cfg = {
            "url": URL,
            "stream": stream,
            "consumer": name,
            "partitions": PARTITIONS,
            "lease_ttl": 1.0,
            **cfg,
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            json.dumps(cfg),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self = cls(name, proc, group)
        _live.append(self)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line == b"ready\n", f"member {name} did not start: {line!r}"
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            kind, _, rest = line.decode().strip().partition(" ")
            if kind == "h":
                key, seq, start, end = rest.split()
                self.group.handled.append(
                    Handled(self.name, key, int(seq), float(start), float(end))
                )
            elif kind == "owns":
                self.group.owned[self.name] = json.loads(rest)
            elif kind == "bye":
                self.bye = json.loads(rest)
            self.group.changed()
        self.group.owned.pop(self.name, None)
        self.group.changed()

    async def stop(self) -> None:
        """Closes its stdin: it drains, stops its bus (releasing its leases) and exits."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        rc = await asyncio.wait_for(self.proc.wait(), 60)
        if self._reader is not None:
            await self._reader
        assert rc == 0 and self.bye is not None, f"member {self.name} exited with {rc}"

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()  # SIGKILL: no stop, no release
        await self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        if self._reader is not None:
            await self._reader


@pytest.fixture(autouse=True)
async def _reap_members() -> Any:
    """No member process outlives its test."""
    yield
    while _live:
        await _live.pop().kill()


async def publish(stream: str, events: list[LeaseStep]) -> None:
    """From a publish-only bus (no subscriptions: it joins no group, holds no lease)."""
    bus = EventBus(transport=URL, group="publisher", stream=stream, partitions=PARTITIONS)
    await bus.start()
    try:
        for i in range(0, len(events), 100):
            await bus.publish_many(events[i : i + 100])
    finally:
        await bus.stop(timeout=10)


def steps(keys: list[str], per_key: int) -> list[LeaseStep]:
    return [LeaseStep(k, i) for i in range(per_key) for k in keys]


def assert_in_order(handled: list[Handled], keys: list[str], per_key: int) -> None:
    """Every event handled, and per key the first deliveries start in publish order, each
    after the previous one ended (whichever process handled them)."""
    by_key: dict[str, list[Handled]] = defaultdict(list)
    for h in handled:
        by_key[h.key].append(h)
    for k in keys:
        first: dict[int, Handled] = {}
        for h in sorted(by_key[k], key=lambda h: h.start):
            first.setdefault(h.seq, h)
        runs = list(first.values())
        seqs = [h.seq for h in runs]
        assert sorted(seqs) == list(range(per_key)), (
            f"{k}: {per_key - len(seqs)} event(s) never handled"
        )
        wrong = [
            (a.seq, a.member, b.seq, b.member)
            for a, b in zip(runs, runs[1:])
            if b.seq != a.seq + 1 or b.start < a.end
        ]
        assert not wrong, (
            f"{k} (partition {partition_of(k)}) handled out of order or overlapping across "
            f"members: (seq, member) then (seq, member) {wrong[:5]}"
        )


def assert_once(handled: list[Handled]) -> None:
    seen: dict[tuple[str, int], int] = defaultdict(int)
    for h in handled:
        seen[(h.key, h.seq)] += 1
    twice = [k for k, n in seen.items() if n > 1]
    assert not twice, f"{len(twice)} event(s) handled more than once, e.g. {twice[:3]}"


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("members", [2, 3])
async def test_members_split_the_partitions_evenly_and_each_keys_events_run_in_order_across_them(
    tmp_path: Path, rds: Resp, stream: str, members: int
) -> None:
    group = Group()
    names = [f"m{i}" for i in range(members)]
    for name in names:
        await Member.start(tmp_path, group, name, stream, delay=0.001)
    await group.until(lambda: group.split(*names), "the partitions to spread over the members")
    assert group.shares(*names) == ([2, 2] if members == 2 else [1, 1, 2])
    keys, per_key = spread_keys(), 100  # 800 events over 8 keys, as in the issue
    await publish(stream, steps(keys, per_key))
    await group.until(lambda: group.distinct() == len(keys) * per_key, "every event handled")
    for m in list(_live):
        await m.stop()
    assert_in_order(group.handled, keys, per_key)
    assert_once(group.handled)
    # No rebalance happened: each key was handled by the one member holding its partition.
    for k in keys:
        assert len({h.member for h in group.handled if h.key == k}) == 1, k
    assert all(group.by(n) for n in names), "a member handled nothing"
    for p in range(PARTITIONS):
        assert rds("XPENDING", f"{stream}:{p}", "billing")[0] == 0


async def test_a_member_killed_mid_stream_loses_its_partitions_after_the_ttl_and_nothing_is_lost(
    tmp_path: Path, rds: Resp, stream: str
) -> None:
    group = Group()
    victim = await Member.start(tmp_path, group, "victim", stream, delay=0.005, prefetch=64)
    await Member.start(tmp_path, group, "survivor", stream, delay=0.005, prefetch=64)
    await group.until(lambda: group.split("victim", "survivor"), "two partitions each")
    victims = list(group.owned["victim"])
    keys, per_key = spread_keys(), 100
    await publish(stream, steps(keys, per_key))
    await group.until(lambda: len(group.by("victim")) >= 60, "the victim to handle 60 events")
    await victim.kill()
    await group.until(
        lambda: group.owned.get("survivor") == list(range(PARTITIONS)),
        "the survivor to take the victim's partitions once their leases ran out",
    )
    await group.until(lambda: group.distinct() == len(keys) * per_key, "every event handled")
    survivor = _live[-1]
    await survivor.stop()
    assert_in_order(group.handled, keys, per_key)
    # What the victim had read and not acknowledged was claimed when its partitions moved.
    assert survivor.bye is not None and survivor.bye["claimed"] > 0, survivor.bye
    moved = [k for k in keys if partition_of(k) in victims]
    assert any(h.member == "survivor" for h in group.handled if h.key in moved), (
        "the survivor handled nothing of the victim's partitions"
    )
    for p in range(PARTITIONS):
        assert rds("XPENDING", f"{stream}:{p}", "billing")[0] == 0, f"partition {p} pending"


async def test_a_member_joining_mid_stream_takes_its_share_and_no_event_is_handled_twice(
    tmp_path: Path, rds: Resp, stream: str
) -> None:
    group = Group()
    # A small prefetch: the first member must not have read the whole stream when the second
    # joins, or there is nothing left to hand over.
    await Member.start(tmp_path, group, "first", stream, delay=0.01, prefetch=16)
    await group.until(lambda: group.owned.get("first") == list(range(PARTITIONS)), "all four")
    keys, per_key = spread_keys(), 100
    await publish(stream, steps(keys, per_key))
    await group.until(lambda: len(group.by("first")) >= 50, "the first member to handle 50")
    await Member.start(tmp_path, group, "joiner", stream, delay=0.01, prefetch=16)
    await group.until(lambda: group.split("first", "joiner"), "the joiner to take two partitions")
    await group.until(lambda: group.distinct() == len(keys) * per_key, "every event handled")
    for m in list(_live):
        await m.stop()
    assert_in_order(group.handled, keys, per_key)
    # Handed over, not claimed: the first member acknowledged what it had read before it let a
    # partition go, so nothing was delivered twice.
    assert_once(group.handled)
    assert group.by("joiner"), "the joiner handled nothing"


async def test_leases_are_released_on_stop_so_a_restarted_member_takes_over_at_once(
    tmp_path: Path, rds: Resp, stream: str
) -> None:
    group = Group()
    # A TTL far longer than the waits below: a partition that moves within them was released.
    ttl = 300.0
    await Member.start(tmp_path, group, "a", stream, lease_ttl=ttl)
    await group.until(lambda: group.owned.get("a") == list(range(PARTITIONS)), "a to hold all")
    b = await Member.start(tmp_path, group, "b", stream, lease_ttl=ttl)
    await group.until(lambda: group.split("a", "b"), "two partitions each", timeout=30)
    await b.stop()
    await group.until(
        lambda: group.owned.get("a") == list(range(PARTITIONS)), "a to take b's at once", 30
    )
    b = await Member.start(tmp_path, group, "b", stream, lease_ttl=ttl)
    await group.until(lambda: group.split("a", "b"), "the restarted b to take two", timeout=30)
    keys, per_key = spread_keys(), 25
    await publish(stream, steps(keys, per_key))
    await group.until(lambda: group.distinct() == len(keys) * per_key, "every event handled")
    for m in list(_live):
        await m.stop()
    assert_in_order(group.handled, keys, per_key)
    assert_once(group.handled)


async def _until_split(*buses: EventBus) -> list[dict[str, Any]]:
    """Polls the buses' health until they hold every partition between them, evenly."""
    for _ in range(500):
        parts = [b.get_health_status()["transport"]["partitions"] for b in buses]
        held = sorted(p for x in parts for p in x["owned"])
        if held == list(range(PARTITIONS)) and {len(x["owned"]) for x in parts} == {2}:
            return parts
        await asyncio.sleep(0.02)  # sleep-ok: nothing signals a lease change in-process
    raise AssertionError(f"the leases did not settle: {parts}")


async def _cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "oxbus", *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return await proc.wait(), out.decode()


async def test_health_statistics_and_the_cli_show_owned_partitions_and_the_assignment(
    stream: str,
) -> None:
    buses = []
    for name in ("a", "b"):
        bus = EventBus(
            transport=RedisStreams(
                URL,
                group="billing",
                consumer=name,
                stream=stream,
                partitions=PARTITIONS,
                lease_ttl=0.6,
            )
        )
        bus.subscribe(LeaseStep, lambda e: None)
        await bus.start()
        buses.append(bus)
    try:
        a, b = await _until_split(*buses)
        assert a["count"] == PARTITIONS and a["leased"] is True
        assert a["members"] == ["a", "b"]
        for name, part in (("a", a), ("b", b)):
            assert [p for p, o in enumerate(part["assignment"]) if o == name] == part["owned"]
        assert buses[0].get_statistics()["partitions"]["owned"] == a["owned"]
        rc, out = await _cli("health", URL, "--group", "billing", "--stream", stream, "--json")
        report = json.loads(out)
        assert rc == 0 and report["status"] == "healthy", out
        assert [m["name"] for m in report["members"]] == ["a", "b"]
        # Each bus's view of the others is as of its last heartbeat; what each holds is exact.
        held = ["a" if p in a["owned"] else "b" for p in range(PARTITIONS)]
        assert [p["owner"] for p in report["assignment"]] == held
        rc, text = await _cli("health", URL, "--group", "billing", "--stream", stream)
        assert rc == 0
        for p, owner in enumerate(held):
            assert any(f"{stream}:{p}" in line and owner in line for line in text.splitlines())
    finally:
        for bus in buses:
            await bus.stop(timeout=10)
    # Stopped: leases released and members gone, so nothing reads the partitions.
    rc, out = await _cli("health", URL, "--group", "billing", "--stream", stream, "--json")
    report = json.loads(out)
    assert rc == 1 and report["status"] != "healthy" and report["reasons"], out


async def test_a_bus_without_partitions_reads_its_stream_with_every_member_and_holds_no_lease(
    rds: Resp, stream: str
) -> None:
    bus = EventBus(transport=URL, group="billing", consumer="solo", stream=stream)
    bus.subscribe(LeaseStep, lambda e: None)
    async with bus:
        parts = bus.get_health_status()["transport"]["partitions"]
    assert parts == {"count": 1, "leased": False, "owned": [0], "members": [], "assignment": []}
    assert rds("EXISTS", f"{stream}:group:billing:members") == 0


@pytest.mark.parametrize("bad", [0, 0.05, -1, 1e9, float("nan"), "10", True, None])
def test_a_bad_lease_ttl_raises_configuration_error_naming_it(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="lease_ttl") as info:
        RedisStreams(URL, partitions=4, lease_ttl=bad)
    assert repr(bad) in str(info.value)
    with pytest.raises(ConfigurationError, match="lease_ttl"):
        EventBus(transport=URL, partitions=4, lease_ttl=bad if bad is not None else "x")
