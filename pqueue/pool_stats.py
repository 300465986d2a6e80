"""PoolStats: the snapshot `ConsumerPool.stats()` returns, and the percentile it uses."""

from __future__ import annotations

import dataclasses
import math
from typing import final


@final
@dataclasses.dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool's counters (since it was built) and its current state.

    Attributes:
        processed: tasks whose handler returned (and were acked).
        failed: attempts that raised or timed out.
        retried: failed attempts handed back for a later retry.
        dead: messages moved to the dead-letter queue (rejected ones included).
        rejected: of `dead`, those whose handler raised `Reject`.
        timed_out: of `failed`, attempts that passed `task_timeout`.
        in_flight: tasks running now.
        workers: worker threads, coroutines or processes taking tasks now.
        breaker: "closed", "open" or "half_open" ("closed" without a breaker).
        lag: messages of the group not yet acked, in flight included; None if the queue is closed.
        latency_p50, latency_p90, latency_p99, latency_max: handler run time in seconds over the
            recent tasks; None before the first.
        state: "new", "running", "stopping", "stopped" or "broken".
        restarts: worker processes restarted after a crash (process mode).
        error: the fatal error of a broken pool, else None.
    """

    processed: int
    failed: int
    retried: int
    dead: int
    rejected: int
    timed_out: int
    in_flight: int
    workers: int
    breaker: str
    lag: int | None
    latency_p50: float | None
    latency_p90: float | None
    latency_p99: float | None
    latency_max: float | None
    state: str
    restarts: int = 0
    error: str | None = None


def percentile(sorted_values: list[float], q: float) -> float:
    """The `q` quantile (0..1) of an ascending, non-empty list, nearest rank."""
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


__all__ = ["PoolStats", "percentile"]
