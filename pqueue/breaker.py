"""Admission control of the consumer pool: when it may take the next task off the queue.

Two gates, both driven by an explicit monotonic `now` so tests step them without sleeping:

* `Breaker`, a circuit breaker over the outcomes of the last `window` tasks. While it is open
  the pool takes no work at all: tasks stay on disk, leases are not taken and no attempt is
  charged, which is what an edge device wants while its upstream is offline.
* `TokenBucket`, the `rate_limit=` of the pool, in tasks per second.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import final

from .backoff import _check_number

log = logging.getLogger(__name__)

# Named breaker states (the values are what `pool.stats().breaker` reports).
CLOSED = "closed"  # tasks flow; outcomes are counted
OPEN = "open"  # too many failures: take no work until the cooldown has passed
HALF_OPEN = "half_open"  # cooldown over: one probe task decides between closed and open


@final
class Breaker:
    """A circuit breaker: stop taking work while most recent tasks fail.

    It opens when, over the last `window` finished tasks, the fraction that failed reaches
    `failure_rate` (it needs `window` outcomes first, so a single early failure cannot trip it).
    After `cooldown` seconds it half-opens and lets exactly one probe task through: success
    closes it (with a fresh window), failure opens it for another cooldown.

    Thread-safe; one breaker may be shared by several pools that call the same upstream.

    Args:
        failure_rate: the failing fraction, in (0, 1], that opens the breaker.
        window: how many recent outcomes are considered (at least 1).
        cooldown: seconds the breaker stays open before probing.
    Raises:
        TypeError, ValueError: a value is of the wrong type or out of range.
    """

    def __init__(self, *, failure_rate: float = 0.5, window: int = 20, cooldown: float = 30.0) -> None:
        self.failure_rate = _check_number("failure_rate", failure_rate, minimum=0.0, inclusive=False)
        if self.failure_rate > 1.0:
            raise ValueError(f"'failure_rate' must be at most 1.0, got {failure_rate!r}")
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"'window' must be an int, not {type(window).__name__}")
        if window < 1:
            raise ValueError(f"'window' must be at least 1, got {window!r}")
        self.window = window
        self.cooldown = _check_number("cooldown", cooldown, minimum=0.0)
        # _lock guards the outcome window, the state, the open time and the probe flag; held
        # briefly by the dispatcher (allow) and by workers (record).
        self._lock = threading.Lock()
        self._outcomes: collections.deque[bool] = collections.deque(maxlen=window)
        self._failures = 0
        self._state = CLOSED
        self._opened_at = 0.0
        self._probe_out = False
        self.trips = 0  # how many times it opened

    @property
    def state(self) -> str:
        """"closed", "open" or "half_open"."""
        return self._state

    def allow(self, now: float) -> bool:
        """May the pool take one more task now? In half-open, True once: that task is the probe.

        A caller that got True but found no task must call `cancel_probe()`.
        """
        return self._admit(now)[0]

    def _admit(self, now: float) -> tuple[bool, bool]:
        """`allow()`, also telling whether the admitted task is the half-open probe."""
        with self._lock:
            if self._state == CLOSED:
                return True, False
            if self._state == OPEN:
                if now < self._opened_at + self.cooldown:
                    return False, False
                self._state = HALF_OPEN
                self._probe_out = False
                log.info("circuit breaker half-open after %.1f s: sending one probe task", self.cooldown)
            if self._probe_out:
                return False, False
            self._probe_out = True
            return True, True

    def cancel_probe(self) -> None:
        """The probe allowed by `allow()` was never sent (the queue was empty)."""
        with self._lock:
            self._probe_out = False

    def reopen_in(self, now: float) -> float:
        """Seconds until an open breaker half-opens (0 when not open)."""
        with self._lock:
            if self._state != OPEN:
                return 0.0
            return max(0.0, self._opened_at + self.cooldown - now)

    def record(self, ok: bool, now: float, *, probe: bool = False) -> None:
        """Count one finished task.

        Args:
            ok: the task succeeded.
            now: monotonic seconds.
            probe: this was the task `allow()` let through in half-open state.
        """
        with self._lock:
            if self._state == HALF_OPEN:
                if not probe:
                    return  # a task from before the breaker opened: the probe decides
                self._probe_out = False
                if ok:
                    self._state = CLOSED
                    self._outcomes.clear()
                    self._failures = 0
                    log.info("circuit breaker closed: the probe task succeeded")
                else:
                    self._open(now)
                return
            if self._state == OPEN:
                return  # stragglers that were in flight when it opened
            if len(self._outcomes) == self.window and not self._outcomes[0]:
                self._failures -= 1
            self._outcomes.append(ok)
            if not ok:
                self._failures += 1
            if len(self._outcomes) == self.window and self._failures >= self.failure_rate * self.window:
                self._open(now)

    def _open(self, now: float) -> None:
        self._state = OPEN
        self._opened_at = now
        self._probe_out = False
        self.trips += 1
        log.warning("circuit breaker open for %.1f s: %d of the last %d tasks failed", self.cooldown,
                    self._failures, len(self._outcomes))

    def __repr__(self) -> str:
        return (f"Breaker(failure_rate={self.failure_rate}, window={self.window}, cooldown={self.cooldown}) "
                f"<{self._state}>")

    def __reduce__(self) -> tuple[object, ...]:
        # Process mode gives each worker process a fresh breaker with the same settings.
        return (_make_breaker, (self.failure_rate, self.window, self.cooldown))


def _make_breaker(failure_rate: float, window: int, cooldown: float) -> Breaker:
    return Breaker(failure_rate=failure_rate, window=window, cooldown=cooldown)


@final
class TokenBucket:
    """At most `rate` tasks per second, with a burst of one (tasks are paced, not bunched).

    Not thread-safe: only the pool's dispatcher takes tokens.

    Args:
        rate: tasks per second (positive).
    """

    def __init__(self, rate: float) -> None:
        self.rate = _check_number("rate_limit", rate, minimum=0.0, inclusive=False)
        self._capacity = 1.0
        self._tokens = 1.0
        self._last: float | None = None

    def take(self, now: float) -> float:
        """Take a token if there is one: return 0; otherwise the seconds until there is one."""
        if self._last is not None:
            self._tokens = min(self._capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate

    def refund(self) -> None:
        """Give back a token taken for a task that did not come."""
        self._tokens = min(self._capacity, self._tokens + 1.0)


__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "Breaker", "TokenBucket"]
