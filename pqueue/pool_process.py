"""Process mode of the consumer pool: each worker is a separate process with its own queue handle.

The supervisor (a thread of the pool's process) starts `workers` processes with the "spawn"
context, so the handler must be importable by name (a module-level function of an importable
module); each process opens its own `Queue(path)` and runs a one-thread pool with the same
policy (retries, dead letters, task timeout, a breaker with the same settings, its share of the
rate limit). When a process dies, the supervisor reaps it, makes its leases deliverable at once
(`Consumer.reclaim_dead`, instead of waiting for the lease to run out) and starts another. The
task it was running counts an attempt, so a task that kills its process every time ends in the
dead-letter queue after `max_attempts` restarts.

Processes report their counters every REPORT_SECONDS; counts since the last report of a process
that crashed are lost (stats are approximate in process mode, the queue state is not).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import multiprocessing
import os
import pickle
import signal
import time
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from .breaker import CLOSED, HALF_OPEN, OPEN

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from .pool import ConsumerPool, Handler, PoolStats

log = logging.getLogger(__name__)

REPORT_SECONDS = 0.25  # a worker process sends its counters this often
STOP_GRACE_SECONDS = 5.0  # past the stop deadline, a worker process gets this long to exit before SIGKILL
START_FAILURES_FATAL = 3  # worker processes that die before they are ready, in a row, break the pool
RESTART_DELAY_MAX_SECONDS = 5.0  # restarts of processes that keep dying young back off to this
YOUNG_SECONDS = 1.0  # a process that dies younger than this counts towards the restart backoff
EXIT_BROKEN = 3  # a worker process's exit code when its own pool broke


def check_picklable(handler: Handler) -> None:
    """Process mode sends the handler to spawned processes by name: fail early if it cannot be."""
    try:
        pickle.dumps(handler)
    except Exception as exc:
        raise TypeError(
            f"in process mode the handler must be importable by name (a module-level function of an "
            f"importable module), and {handler!r} is not: {exc}") from exc


def _queue_options(pool: ConsumerPool) -> dict[str, Any]:
    q = pool.queue
    return {"fsync": q.fsync, "segment_bytes": q.segment_bytes, "serializer": q._serializer,
            "max_record_bytes": q.max_record_bytes, "lease": pool.lease, "ack_interval": q.ack_interval,
            "on_corruption": q.on_corruption, "create": False}


def _pool_options(pool: ConsumerPool) -> dict[str, Any]:
    return {"group": pool.group, "workers": 1, "max_attempts": pool.max_attempts, "backoff": pool.backoff,
            "lease": pool.lease, "task_timeout": pool.task_timeout, "breaker": pool.breaker,
            "rate_limit": None if pool.rate_limit is None else pool.rate_limit / pool.workers,
            "results": pool.results}


def child_main(path: str, queue_options: dict[str, Any], handler: Handler, pool_options: dict[str, Any],
               conn: Connection) -> None:
    """The body of one worker process: a one-thread pool, reporting to the supervisor over `conn`."""
    from .pool import BROKEN, STOPPED, ConsumerPool
    from .queue import Queue

    # Ctrl-C reaches the whole process group: the supervisor decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    terminated = []
    signal.signal(signal.SIGTERM, lambda _s, _f: terminated.append(True))
    stop_timeout: float | None = None
    with Queue(path, **queue_options) as q:
        pool = ConsumerPool(q, handler, **pool_options)
        pool.start()
        conn.send(("ready", os.getpid()))
        while not terminated:
            if conn.poll(REPORT_SECONDS):
                try:
                    request = conn.recv()
                except EOFError:
                    break  # the supervisor is gone: stop gracefully rather than run unsupervised
                stop_timeout = request[1]
                break
            if pool.stats().state in (STOPPED, BROKEN):
                break
            conn.send(("stats", dataclasses.asdict(pool.stats())))
        pool.stop(stop_timeout)
        final = pool.stats()
        try:
            conn.send(("stats", dataclasses.asdict(final)))
        except OSError:
            pass  # the supervisor is gone; nobody is counting
    if final.state == BROKEN:
        os._exit(EXIT_BROKEN)


@dataclasses.dataclass
class _Slot:
    """One worker process position: restarted in place when its process dies."""

    index: int
    proc: BaseProcess | None = None
    conn: Connection | None = None
    ready: bool = False
    started: float = 0.0
    young_deaths: int = 0
    restart_at: float = 0.0
    last: dict[str, Any] = dataclasses.field(default_factory=dict)


class Supervisor:
    """Starts, watches, restarts and stops the worker processes of one pool."""

    def __init__(self, pool: ConsumerPool) -> None:
        self.pool = pool
        self.ctx = multiprocessing.get_context("spawn")
        self.slots = [_Slot(i) for i in range(pool.workers)]
        self.totals: collections.Counter[str] = collections.Counter()  # counts of processes that exited
        self.restarts = 0
        self.start_failures = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def wake(self) -> None:
        """Make the supervisor look at the pool's state now (a stop was asked for)."""
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass  # already woken and not yet drained, or closed after the supervisor ended

    def _spawn(self, slot: _Slot) -> None:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(
            target=child_main, name=f"pqueue-worker:{self.pool.group}:{slot.index}",
            args=(self.pool.queue.path, _queue_options(self.pool), self.pool.handler, _pool_options(self.pool),
                  child))
        proc.start()
        child.close()  # the child holds its own copy; EOF on `parent` then means the child is gone
        slot.proc, slot.conn, slot.ready, slot.started, slot.last = proc, parent, False, time.monotonic(), {}

    def run(self) -> None:
        """The supervisor thread: spawn, watch, restart; on stop, stop the processes and tear down."""
        from .pool import RUNNING
        try:
            for slot in self.slots:
                self._spawn(slot)
            while self.pool._state == RUNNING:
                now = time.monotonic()
                waits = [s.restart_at - now for s in self.slots if s.proc is None]
                timeout = max(0.0, min(waits)) if waits else None
                ready = wait(self._watched() + [self._wake_r], timeout)
                if self._wake_r in ready:
                    os.read(self._wake_r, 64)
                self._service(ready)
                if self.pool._state != RUNNING:
                    break
                for slot in self.slots:
                    if slot.proc is None and slot.restart_at <= time.monotonic():
                        self._spawn(slot)
        except BaseException as exc:
            self.pool._break(exc)
        finally:
            self._shutdown()

    def _watched(self) -> list[Any]:
        out: list[Any] = []
        for s in self.slots:
            if s.conn is not None:
                out.append(s.conn)
            if s.proc is not None:
                out.append(s.proc.sentinel)
        return out

    def _service(self, ready: list[Any]) -> None:
        """Read reports of the processes in `ready`; reap the ones that died."""
        for slot in self.slots:
            if slot.conn is not None and slot.conn in ready:
                self._read(slot)
            if slot.proc is not None and slot.proc.sentinel in ready:
                self._reap(slot, expected=False)

    def _read(self, slot: _Slot) -> None:
        assert slot.conn is not None
        try:
            while slot.conn.poll():
                kind, payload = slot.conn.recv()
                if kind == "ready":
                    slot.ready = True
                    self.start_failures = 0
                else:
                    slot.last = payload
            with self.pool._lock:
                self.pool._cond.notify_all()  # stats changed: wake whoever waits on the pool
        except (EOFError, OSError):
            slot.conn.close()
            slot.conn = None

    def _reap(self, slot: _Slot, *, expected: bool) -> None:
        """The process of `slot` ended: account for it, reclaim its leases, schedule a restart."""
        assert slot.proc is not None
        slot.proc.join()  # reaped first: a zombie still answers kill(pid, 0) and would look alive
        code = slot.proc.exitcode
        if slot.conn is not None:
            self._read(slot)
            if slot.conn is not None:
                slot.conn.close()
                slot.conn = None
        for key in ("processed", "failed", "retried", "dead", "rejected", "timed_out"):
            self.totals[key] += int(slot.last.get(key, 0))
        slot.last = {}
        was_ready, slot.proc = slot.ready, None
        consumer = self.pool._consumer
        assert consumer is not None
        reclaimed = consumer.reclaim_dead()
        if expected:
            return
        self.restarts += 1
        now = time.monotonic()
        young = now - slot.started < YOUNG_SECONDS
        slot.young_deaths = slot.young_deaths + 1 if young else 0
        delay = 0.0 if not young else min(RESTART_DELAY_MAX_SECONDS, 0.05 * 2 ** slot.young_deaths)
        slot.restart_at = now + delay
        log.warning("%r: worker process %d exited with code %s; %d leases reclaimed, restarting in %.2f s",
                    self.pool, slot.index, code, reclaimed, delay)
        if not was_ready:
            self.start_failures += 1
            if self.start_failures >= START_FAILURES_FATAL:
                raise RuntimeError(
                    f"worker processes died before they were ready {self.start_failures} times in a row "
                    f"(last exit code {code}): is the handler importable, and the queue openable, in a "
                    f"fresh interpreter?")

    def _shutdown(self) -> None:
        """Ask every process to stop by the pool's deadline; SIGKILL the ones that overstay."""
        pool = self.pool
        remaining = pool._stop_deadline - pool._clock()
        for slot in self.slots:
            if slot.conn is not None:
                try:
                    slot.conn.send(("stop", None if math.isinf(remaining) else max(0.0, remaining)))
                except OSError:
                    pass  # it died meanwhile; reaped below
        while any(s.proc is not None for s in self.slots):
            limit = pool._stop_deadline + STOP_GRACE_SECONDS - pool._clock()
            if limit <= 0:
                for s in self.slots:
                    if s.proc is not None:
                        log.warning("%r: worker process %d did not stop in time; killing it", pool, s.index)
                        s.proc.kill()
                        self._reap(s, expected=True)
                break
            ready = wait(self._watched(), min(limit, 1.0))
            for slot in self.slots:
                if slot.conn is not None and slot.conn in ready:
                    self._read(slot)
                if slot.proc is not None and slot.proc.sentinel in ready:
                    self._reap(slot, expected=True)
        os.close(self._wake_r)
        os.close(self._wake_w)
        pool._finish()

    def stats(self) -> PoolStats:
        """The sum of the processes' last reports (latencies: the worst process's)."""
        from .pool import PoolStats
        pool = self.pool
        snaps = [s.last for s in self.slots if s.last]
        total = collections.Counter(self.totals)
        for snap in snaps:
            for key in ("processed", "failed", "retried", "dead", "rejected", "timed_out"):
                total[key] += int(snap.get(key, 0))
        breakers = {snap.get("breaker", CLOSED) for snap in snaps}
        breaker = OPEN if OPEN in breakers else HALF_OPEN if HALF_OPEN in breakers else CLOSED

        def worst(key: str) -> float | None:
            values = [snap[key] for snap in snaps if snap.get(key) is not None]
            return max(values) if values else None

        with pool._lock:
            state = pool._state
            error = None if pool._broken is None else repr(pool._broken)
        return PoolStats(
            processed=total["processed"], failed=total["failed"], retried=total["retried"], dead=total["dead"],
            rejected=total["rejected"], timed_out=total["timed_out"],
            in_flight=sum(int(snap.get("in_flight", 0)) for snap in snaps),
            workers=sum(1 for s in self.slots if s.proc is not None and s.ready), breaker=breaker,
            lag=pool._lag(), latency_p50=worst("latency_p50"), latency_p90=worst("latency_p90"),
            latency_p99=worst("latency_p99"), latency_max=worst("latency_max"), state=state,
            restarts=self.restarts, error=error)


__all__ = ["Supervisor", "check_picklable", "child_main"]
