"""What ``EventBus.get_statistics()``, ``get_stats()``, ``get_health_status()`` and its
``repr`` report: the engine's counters and health, with what the Python side adds (the dead
letters, the transport, the sagas, the sync handlers' thread pool, the heartbeats)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from oxbus._oxbus import BusCore
from oxbus._saga_manager import empty_statistics

if TYPE_CHECKING:
    from oxbus._pool import ElasticPool
    from oxbus._saga_manager import SagaManager
    from oxbus.backends import Backend
    from oxbus.dead_letters import DeadLetters
    from oxbus.heartbeat import HeartbeatMonitor

__all__ = ["health", "legacy_stats", "statistics", "summary"]


def statistics(
    core: BusCore, dead_letters: DeadLetters, backend: Backend, sagas: SagaManager | None
) -> dict[str, Any]:
    """The engine's counters, the dead letters' count, the transport's part and the sagas'
    (``EventBus.get_statistics`` says what each is)."""
    s: dict[str, Any] = core.statistics()
    s["failed_events_count"] = len(dead_letters)
    backend.statistics(s)
    s.update(empty_statistics() if sagas is None else sagas.statistics())
    return s


def legacy_stats(core: BusCore) -> dict[str, Any]:
    """The counters in the shape of the Redis Pub/Sub bus's ``get_stats()``."""
    s = core.statistics()
    return {
        "published": s["events_published"],
        "received": s["events_processed"] + s["in_flight"],
        "processed": s["events_processed"],
        "failed": s["events_failed"],
        "queue_size": s["queue_size"],
        "is_running": s["is_running"],
    }


def health(
    core: BusCore, backend: Backend, pool: ElasticPool | None,
    heartbeats: HeartbeatMonitor | None,
) -> dict[str, Any]:
    """The engine's health report, with the transport's part, the thread pool's abandoned
    calls (degraded when they hold every thread) and the heartbeats seen."""
    h: dict[str, Any] = core.health()
    backend.health(h)
    h["abandoned_threads"] = 0 if pool is None else pool.abandoned
    h["abandoned_threads_total"] = 0 if pool is None else pool.abandoned_total
    h["thread_pool_size"] = 0 if pool is None else pool.size
    h["heartbeats"] = {} if heartbeats is None else heartbeats.report()
    if pool is not None and pool.abandoned >= pool.size and h["status"] == "healthy":
        h["status"] = "degraded"
        h["reasons"].append(
            f"{pool.abandoned} thread-pool handler calls overran their timeout and still run"
        )
    return h


def summary(kind: str, core: BusCore) -> str:
    """The bus's ``repr``: ``kind`` (its class's name), whether it runs, and its counts."""
    s = core.statistics()
    return (
        f"<{kind} {'running' if s['is_running'] else 'stopped'} "
        f"workers={s['worker_count']} queued={s['queue_size']} "
        f"published={s['events_published']} processed={s['events_processed']}>"
    )
