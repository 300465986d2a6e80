"""Periodic tasks: when each run is due, and the scheduler that enqueues every period once.

A periodic task has a schedule of *period starts*: every multiple of `every` since the Unix
epoch (UTC), or every time a cron expression matches (croniter, the optional ``cron`` extra).
The scheduler runs inside each worker process and, for each periodic task, enqueues a run for
a period start once that start has passed.

Exactly once per period, across restarts and across worker processes on one queue:

* Each run is put with the idempotency key ``periodic:<task name>:<period start, ISO-8601 UTC>``,
  so two schedulers (two processes, or one restarted after a crash between its put and its
  bookkeeping) that enqueue the same period write one record (within the queue's
  `dedup_window`, 24 hours by default).
* The start of the last enqueued period is kept durably per task in the queue's index
  (`Index.periodic_advance`, which never moves backwards), so a restart knows where it was.
  The put comes first and the bookkeeping second: a crash in between re-puts the same key,
  which writes nothing.

Missed periods (nothing ran, or the wall clock jumped forward) follow the task's `catch_up`:

* ``"once"`` (default): one run for the latest missed period, however late.
* ``"all"``: a run for every missed period, oldest first, at most MAX_CATCH_UP of the newest.
* ``"skip"``: the latest period only if it started less than ``min(period, 60 s)`` ago; older
  ones are dropped.

The first time a scheduler sees a periodic task (no bookkeeping yet, or the index was
rebuilt), it enqueues nothing for the past: the first run is at the next period start. A
wall clock that jumps back enqueues nothing until it passes the last enqueued period again
(the bookkeeping never moves back, and the key would refuse a duplicate anyway).
"""

from __future__ import annotations

import datetime
import importlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, final

from .errors import ClosedError
from .queue import Queue

log = logging.getLogger(__name__)

CATCH_UP_POLICIES = ("once", "all", "skip")
MIN_EVERY_SECONDS = 1.0  # periods are named by their start to the second: shorter ones would collide
TICK_SECONDS = 1.0  # the scheduler reads the clock at least this often, so a clock jump is seen within it
WAKE_SLACK_SECONDS = 0.005  # wake this long after a period start, so the start is surely in the past
MAX_CATCH_UP = 1000  # catch_up="all" enqueues at most this many missed periods of one task at once
SKIP_GRACE_SECONDS = 60.0  # catch_up="skip" still runs a period that started less than this long ago
CLOCK_BACK_WARN_SECONDS = 2.0  # a clock this far behind the last enqueued period is logged as a jump


class Schedule(Protocol):
    """When the periods of a periodic task start (Unix seconds)."""

    def latest(self, now: float) -> float:
        """The latest period start at or before `now`."""
        ...

    def before(self, start: float) -> float:
        """The period start just before `start` (a period start)."""
        ...

    def after(self, start: float) -> float:
        """The period start just after `start` (a period start)."""
        ...


@final
class Every:
    """Periods of `seconds` each, starting at every multiple of `seconds` since the Unix epoch (UTC).

    Args:
        every: the period, at least MIN_EVERY_SECONDS and a whole number of seconds.
    Raises:
        TypeError, ValueError: `every` is not such a timedelta.
    """

    def __init__(self, every: datetime.timedelta) -> None:
        if not isinstance(every, datetime.timedelta):
            raise TypeError(f"'every' must be a datetime.timedelta, not {type(every).__name__}")
        seconds = every.total_seconds()
        if seconds < MIN_EVERY_SECONDS or seconds != int(seconds):
            raise ValueError(f"'every' must be a whole number of seconds, at least {MIN_EVERY_SECONDS:g}; "
                             f"got {every}")
        self.seconds = int(seconds)

    def latest(self, now: float) -> float:
        return float(math.floor(now / self.seconds) * self.seconds)

    def before(self, start: float) -> float:
        return start - self.seconds

    def after(self, start: float) -> float:
        return start + self.seconds

    def __repr__(self) -> str:
        return f"every {datetime.timedelta(seconds=self.seconds)}"


@final
class Cron:
    """Periods starting whenever cron expression `expr` matches, in time zone `tz` (UTC by default).

    Uses croniter (``pip install 'pqueue-log[cron]'``): five fields, or six with seconds.

    Args:
        expr: the cron expression, e.g. ``"*/5 * * * *"``.
        tz: the time zone the fields are read in; None means UTC (no DST surprises).
    Raises:
        ImportError: croniter is not installed.
        ValueError: `expr` is not a valid cron expression.
    """

    def __init__(self, expr: str, tz: datetime.tzinfo | None = None) -> None:
        try:
            # Imported by name: croniter is an optional extra and ships no type stubs.
            self._croniter: Any = importlib.import_module("croniter").croniter
        except ImportError as exc:
            raise ImportError(f"cron={expr!r} needs the croniter package: pip install 'pqueue-log[cron]' "
                              f"(or use every=timedelta(...), which needs nothing)") from exc
        if not isinstance(expr, str) or not self._croniter.is_valid(expr):
            raise ValueError(f"{expr!r} is not a valid cron expression (five fields, e.g. '*/5 * * * *')")
        self.expr = expr
        self.tz = tz if tz is not None else datetime.timezone.utc

    def _iter(self, at: float) -> Any:
        return self._croniter(self.expr, datetime.datetime.fromtimestamp(at, self.tz))

    def latest(self, now: float) -> float:
        # get_prev() is strictly before its base: step just past `now` so a start at `now` counts.
        start: datetime.datetime = self._iter(now + 1e-6).get_prev(datetime.datetime)
        return start.timestamp()

    def before(self, start: float) -> float:
        prev: datetime.datetime = self._iter(start).get_prev(datetime.datetime)
        return prev.timestamp()

    def after(self, start: float) -> float:
        nxt: datetime.datetime = self._iter(start).get_next(datetime.datetime)
        return nxt.timestamp()

    def __repr__(self) -> str:
        return f"cron {self.expr!r} ({self.tz})"


def make_schedule(*, cron: str | None, every: datetime.timedelta | None,
                  tz: datetime.tzinfo | None = None) -> Schedule:
    """The schedule for `cron` or `every` (exactly one of them).

    Raises:
        TypeError, ValueError: neither or both given, or a bad value.
        ImportError: `cron` without croniter installed.
    """
    if (cron is None) == (every is None):
        raise TypeError("give exactly one of cron='...' or every=timedelta(...)")
    if every is not None:
        if tz is not None:
            raise TypeError("'tz' applies to cron schedules only (every= periods count from the Unix epoch)")
        return Every(every)
    assert cron is not None
    return Cron(cron, tz)


def period_key(name: str, start: float) -> str:
    """The idempotency key of the run of periodic task `name` for the period starting at `start`."""
    stamp = datetime.datetime.fromtimestamp(start, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"periodic:{name}:{stamp}"


@dataclass(frozen=True)
class Periodic:
    """One periodic task as the scheduler sees it."""

    name: str
    schedule: Schedule
    catch_up: str


Enqueue = Callable[[Periodic, float, str], int]  # (task, period start, key) -> offset


@final
class Scheduler:
    """Enqueues the due periods of periodic tasks; see the module docstring for the guarantees.

    Drive it with `tick(now)` (tests, an injected clock) or run it in a thread with
    `start()`/`stop()`.

    Args:
        queue: the queue the runs go to (its index keeps the bookkeeping).
        periodics: the periodic tasks.
        enqueue: puts one run with the given idempotency key and returns its offset.
        clock: wall-clock seconds since the Unix epoch (period starts are wall-clock times).
    """

    def __init__(self, queue: Queue, periodics: Sequence[Periodic], enqueue: Enqueue, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.queue = queue
        self.periodics = tuple(periodics)
        self._enqueue = enqueue
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error = ""

    def tick(self, now: float | None = None) -> list[int]:
        """Enqueue every run that is due at `now` (default: the clock); return their offsets.

        Raises:
            QueueError: the queue failed (nothing is recorded for the task that failed).
        """
        if now is None:
            now = self._clock()
        # The bookkeeping lives in the queue's index: the one place every process of this
        # queue shares crash-safely (a side file would make the directory "not a queue").
        index = self.queue._index
        offsets: list[int] = []
        for p in self.periodics:
            latest = p.schedule.latest(now)
            latest_ms = round(latest * 1000)
            last_ms = index.periodic_last(p.name)
            if last_ms is None:
                index.periodic_advance(p.name, latest_ms)
                log.info("periodic task %s (%r): first run at %s", p.name, p.schedule,
                         _iso(p.schedule.after(latest)))
                continue
            if latest_ms <= last_ms:
                if last_ms / 1000 - now > CLOCK_BACK_WARN_SECONDS:
                    log.warning("periodic task %s: the wall clock (%s) is behind the last enqueued period (%s); "
                                "nothing is enqueued until it passes that period", p.name, _iso(now),
                                _iso(last_ms / 1000))
                continue
            for start in self._due(p, last_ms / 1000, latest, now):
                key = period_key(p.name, start)
                offset = self._enqueue(p, start, key)
                # Another process may have put the same key first: then this is its record.
                log.info("periodic task %s: the period of %s is at offset %d", p.name, _iso(start), offset)
                offsets.append(offset)
            index.periodic_advance(p.name, latest_ms)
        return offsets

    def _due(self, p: Periodic, last: float, latest: float, now: float) -> list[float]:
        """The period starts in (last, latest] to enqueue under the task's catch-up policy."""
        if p.catch_up == "all":
            starts = [latest]
            start = p.schedule.before(latest)
            while start > last + 1e-3 and len(starts) < MAX_CATCH_UP:
                starts.append(start)
                start = p.schedule.before(start)
            if start > last + 1e-3:
                log.warning("periodic task %s: more than %d periods were missed; enqueueing the newest %d",
                            p.name, MAX_CATCH_UP, MAX_CATCH_UP)
            starts.reverse()
            return starts
        missed = p.schedule.before(latest) > last + 1e-3
        if p.catch_up == "skip":
            grace = min(SKIP_GRACE_SECONDS, p.schedule.after(latest) - latest)
            if now - latest >= grace:
                log.info("periodic task %s: skipping missed periods up to %s (catch_up='skip')", p.name,
                         _iso(latest))
                return []
        if missed:
            log.info("periodic task %s: periods after %s were missed; enqueueing the latest once (catch_up=%r)",
                     p.name, _iso(last), p.catch_up)
        return [latest]

    def next_wake(self, now: float) -> float:
        """Seconds to sleep before the next tick (at most TICK_SECONDS)."""
        wait = TICK_SECONDS
        for p in self.periodics:
            wait = min(wait, p.schedule.after(p.schedule.latest(now)) - now + WAKE_SLACK_SECONDS)
        return max(wait, WAKE_SLACK_SECONDS)

    # ------------------------------------------------------------------ the thread

    def start(self) -> None:
        """Run `tick` in a daemon thread until `stop()`."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="pqueue-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread (a tick in progress finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while True:
            try:
                self.tick()
                self._last_error = ""
            except ClosedError:
                return  # the app closed its queue: nothing left to schedule into
            except Exception as exc:
                # Keep going (a full disk may clear), but say so once per distinct error, not
                # once a second.
                if repr(exc) != self._last_error:
                    log.error("periodic scheduler: %r; retrying every %g s", exc, TICK_SECONDS, exc_info=exc)
                    self._last_error = repr(exc)
            if self._stop.wait(self.next_wake(self._clock())):
                return


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


__all__ = ["CATCH_UP_POLICIES", "Cron", "Every", "Periodic", "Schedule", "Scheduler", "make_schedule",
           "period_key"]
