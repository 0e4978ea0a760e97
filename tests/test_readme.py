"""Every ``python`` code block of README.md and of the documentation site's pages (docs/) runs,
so a snippet cannot drift from the API.

A block runs as written, in a fresh namespace, from a scratch directory; top-level ``await`` is
allowed (the block runs in a loop of its own). What a snippet leaves out because the README
defined it earlier or because it is beside the point (an event class, a handler) goes in a
hidden setup comment right before the block, which the rendered page does not show::

    <!-- readme-test setup
    class PaymentTaken(DomainEvent): ...
    -->

(``<!-- test setup`` in docs/ pages.)

The setup runs first in the block's namespace (``from oxbus import *`` is already done). Buses
the block leaves running are stopped after it. The pytest example runs as a test file in a
pytest of its own. Blocks that need Redis skip outside CI without it and fail under
``OXBUS_CI=1``; they use Redis database 15 instead of the 0 they show. Blocks that need
RabbitMQ do the same, on an exchange of their own (deleted afterwards, with its queues).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import logging
import re
import socket
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

from _env import unavailable

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: The documentation site's pages (mkdocs.yml); API reference pages hold no blocks of their own.
PAGES = sorted((ROOT / "docs").rglob("*.md"))

BLOCK = re.compile(
    r"(?:<!-- (?:readme-)?test setup\n(?P<setup>.*?)-->\s*\n)?"
    r"(?P<indent>[ \t]*)```python\n(?P<code>.*?)^(?P=indent)```",
    re.S | re.M,
)


def blocks(path: Path = README) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    prefix = "" if path == README else f"{path.relative_to(ROOT)} "
    found = []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("code"))
        heading = re.findall(r"^#+ (.+)$", text[: m.start()], re.M)
        found.append(
            pytest.param(
                textwrap.dedent(m.group("setup") or ""),
                textwrap.dedent(m.group("code")),
                path,
                id=f"{prefix}line {line} ({heading[-1] if heading else 'top'})",
            )
        )
    return found


def every_block() -> list[Any]:
    return [block for path in [README, *PAGES] for block in blocks(path)]


def redis_up() -> bool:
    return listening(6379)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _amqp_clean(exchange: str, groups: list[str]) -> None:
    """Deletes a README block's exchange and its groups' queues (aio-pika, a test dependency)."""
    import aio_pika

    async def clean() -> None:
        conn = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/%2f")
        ch = await conn.channel()
        for g in groups:
            await ch.queue_delete(f"{exchange}.{g}")
            await ch.queue_delete(f"{exchange}.{g}.dead")
        await ch.exchange_delete(exchange)
        await conn.close()

    asyncio.run(clean())


async def _run(compiled: types.CodeType, ns: dict[str, Any]) -> None:
    try:
        result = eval(compiled, ns)  # noqa: S307 - the README's own code
        if inspect.isawaitable(result):
            await result
    finally:
        import oxbus

        for value in list(ns.values()):
            if isinstance(value, oxbus.EventBus) and value.is_running:
                await value.stop(timeout=5)


@pytest.mark.parametrize(("setup", "code", "path"), every_block())
def test_the_readme_block_runs(
    setup: str, code: str, path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    pytester: pytest.Pytester,
) -> None:
    if code.startswith("# test_"):  # the pytest example: a test file of its own
        pytester.makefile(
            ".ini",
            pytest="[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
            "filterwarnings = error\n",
        )
        pytester.makepyfile(**{code.split()[1].removesuffix(".py"): code})
        result = pytester.runpytest("-p", "no:cacheprovider")
        assert result.ret == 0, result.stdout.str()
        return
    if "redis://" in code:
        if not redis_up():
            unavailable("Redis is not running on 127.0.0.1:6379")
        # Database 15, not 0: what the snippet writes stays away from other tests' keys.
        code = code.replace("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/15")
    amqp_exchange = None
    if "amqp://" in code:
        if not listening(5672):
            unavailable("RabbitMQ is not running on 127.0.0.1:5672")
        amqp_exchange = f"oxbus-readme.{tmp_path.name}"
        code = code.replace('group="', f'exchange="{amqp_exchange}", group="')
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    # A module of its own: dataclasses and the type registry look classes' modules up.
    module = types.ModuleType("readme_block")
    sys.modules[module.__name__] = module
    ns = module.__dict__
    exec("from oxbus import *\nfrom dataclasses import dataclass", ns)  # noqa: S102
    source = setup + "\n" + code
    compiled = compile(source, str(path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    try:
        if compiled.co_flags & inspect.CO_COROUTINE:  # top-level await: in a loop of its own
            asyncio.run(_run(compiled, ns))
        else:  # as a script (it may call asyncio.run itself)
            exec(compiled, ns)  # noqa: S102 - the README's own code
    finally:
        del sys.modules[module.__name__]
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        if amqp_exchange is not None:
            _amqp_clean(amqp_exchange, re.findall(r'group="([^"]+)"', code))


def test_every_python_block_is_found() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(blocks()) == text.count("```python") > 10
    assert PAGES, "no documentation pages found in docs/"
    for page in PAGES:
        assert len(blocks(page)) == page.read_text(encoding="utf-8").count("```python"), page


@pytest.mark.parametrize("module", ["oxbus.config", "oxbus.registry"])
def test_the_docstring_examples_run(module: str) -> None:
    """The ``>>>`` examples the API reference shows (docs/reference/) are doctests."""
    import doctest
    import importlib

    import oxbus

    mod = importlib.import_module(module)
    result = doctest.testmod(mod, extraglobs={"oxbus": oxbus}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result


def test_every_docstring_example_is_run() -> None:
    """A module with ``>>>`` examples is in the list above (or every example says SKIP)."""
    package = ROOT / "python" / "oxbus"
    with_examples = sorted(
        f"oxbus.{p.stem}"
        for p in package.glob("*.py")
        if any(">>>" in ln and "doctest: +SKIP" not in ln for ln in p.read_text().splitlines())
    )
    assert with_examples == ["oxbus.config", "oxbus.registry"]
