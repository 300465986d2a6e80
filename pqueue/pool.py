"""ConsumerPool: the workers that take tasks from a queue group and run a handler on each.

Delivery semantics (what a handler can rely on):

* At least once. A handler that returns acks its message; acks are batched (durable within the
  queue's `ack_interval`), so a crash can redeliver a task that had finished, never lose one.
  Handlers should be idempotent, keyed by `msg.offset` if need be.
* A handler that raises is retried after `backoff.delay(attempt)` seconds; `Retry(delay=...)`
  picks the delay; `Reject(reason)` skips retries. After `max_attempts` attempts, or on
  `Reject`, the message is copied to the dead-letter queue ``<queue>/dlq`` (durably) and only
  then acked, so a crash in between duplicates it in the DLQ instead of losing it.
* Attempts are counted in the index and survive crashes. A delivery numbered above
  `max_attempts` means earlier deliveries never finished (the process died or the lease ran
  out): it is dead-lettered with reason "max_attempts" without running the handler, so a task
  that kills the process is parked after `max_attempts` restarts instead of crash-looping.
* A retry whose earlier failure this pool did not see itself (it came back from a crash) runs
  alone, with nothing else in flight in this process, so a task that crashes the process does
  not charge an attempt to innocent neighbours over and over.

Known limits:

* `task_timeout`: Python cannot kill a thread. A task that runs too long counts as a failed
  attempt and its message is handed back for a retry (or dead-lettered), a new worker thread
  replaces the stuck one, and whatever the stuck handler returns later is ignored. The stuck
  thread itself runs on until its handler returns, so the handler may still finish its side
  effects, possibly while the retry runs. Async handlers are cancelled for real. Keep
  `task_timeout` below `lease`, or the lease runs out first and another consumer takes the task.
* A handler that runs longer than `lease` seconds (without `task_timeout`) may run twice.
* Worker threads are daemon threads, so a handler stuck forever cannot keep the interpreter
  alive after `stop()` gave up on it.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import math
import os
import queue as _stdlib_queue
import random
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, final

from .backoff import Backoff, Reject, Retry, _check_number
from .breaker import CLOSED, Breaker, TokenBucket
from .consumer import Consumer, check_timeout
from .errors import Empty, Full, QueueError, RecordTooLargeError, SerializationError
from .message import Message
from .pipeline import Router, emit
from .pool_async import EventLoopWorkers, run_task
from .pool_signals import until_signalled
from .pool_stats import PoolStats, percentile
from .queue import Queue

log = logging.getLogger(__name__)

STOP_TIMEOUT_SECONDS = 30.0  # stop() and the context manager wait this long for in-flight tasks
DISPATCH_POLL_SECONDS = 0.02  # an idle dispatcher looks for other processes' puts this often
HOUSEKEEPING_SECONDS = 0.1  # task timeouts and breaker timers are checked this often at least
SCALE_INTERVAL_SECONDS = 0.5  # the backlog is measured this often when scaling is on
BACKLOG_PER_WORKER = 8  # scale up while each worker has more than this many tasks waiting
IDLE_SECONDS = 10.0  # scale down after this long without a backlog
QUEUED_PER_WORKER = 8  # tasks handed to the thread workers ahead, so a worker never waits for the next
FAST_TASK_SECONDS = 0.005  # ... but only while tasks take less than this: a queued task's lease is ticking
LATENCY_SAMPLES = 2048  # recent handler latencies kept for the percentiles in stats()
RETRY_MEMORY = 65536  # offsets this pool nacked, remembered to tell its own retries from crashes

# Named pool states (what stats().state reports).
NEW = "new"  # built, not started; _step() may drive it in the caller's thread
RUNNING = "running"  # the dispatcher takes tasks
STOPPING = "stopping"  # no new tasks; in-flight ones finish until the stop deadline
STOPPED = "stopped"  # every worker is gone and every lease handed back
BROKEN = "broken"  # stopped on a fatal error; every later call raises BrokenPool

Handler = Callable[[Message], Any]


class BrokenPool(QueueError):
    """The pool stopped on a fatal error (the queue failed or was closed under it).

    Sticky: every later `start`, `join`, `run` raises it again; `__cause__` is the error.
    """


class _Task:
    """One delivery on its way through the pool."""

    __slots__ = ("msg", "started", "probe", "settled", "abandoned", "worker", "atask")

    def __init__(self, msg: Message, probe: bool) -> None:
        self.msg = msg
        self.probe = probe  # the breaker's half-open probe
        self.started = 0.0
        self.settled = False  # the outcome is being applied: a timeout can no longer take it
        self.abandoned = False  # timed out or handed back at stop: the late outcome is ignored
        self.worker: threading.Thread | None = None  # the thread running it (thread mode)
        self.atask: asyncio.Task[None] | None = None  # the coroutine running it (async handlers)


@final
class ConsumerPool:
    """Runs `handler(msg)` on every message of one consumer group, with retries and a DLQ.

    See the module docstring for the delivery semantics and the task-timeout caveat.

    Args:
        queue: the queue to consume. The pool uses its own consumer of `group` on it.
        handler: called with each `Message`; may be an ``async def`` (then `workers` coroutines
            run on one event loop thread). In process mode it must be importable by name (a
            module-level function), since worker processes are started with "spawn".
        group: the consumer group.
        workers: worker threads (coroutines, processes) to start with.
        max_workers: scale up to this many while the backlog per worker is high (None:
            `workers`); back down to `workers` after IDLE_SECONDS without a backlog.
        max_attempts: deliveries before a failing task goes to the dead-letter queue.
        backoff: the retry schedule (default ``Backoff(initial=0.5, multiplier=2.0,
            maximum=60.0, jitter=0.1)``).
        lease: seconds a task stays leased to this pool before another consumer may take it;
            running tasks renew it (a heartbeat), so only a dead process's tasks are taken over.
        task_timeout: seconds a task may run before it counts as failed (see the caveat).
        breaker: a `Breaker`: stop taking work while the recent failure rate is high.
        rate_limit: at most this many tasks started per second.
        mode: "thread" (default) or "process" (each worker a separate process with its own
            handle on the queue; a crashed one is restarted and its leases reclaimed at once).
        results: keep each handler's return value (in the ack's own transaction) for
            `Queue.result(offset)`, for the queue's `result_ttl`.
        output: a Queue that receives each non-None return value (each item of a `Many`),
            put before the ack with the key "<source_id>:<group>:<offset>[:<i>]" so a re-run
            after a crash is absorbed (see pipeline.py); or a function of the return value
            that yields (queue, item) pairs (fan-out). Not in process mode.
    Raises:
        TypeError, ValueError: an argument is of the wrong type or out of range.
    """

    def __init__(
        self,
        queue: Queue,
        handler: Handler,
        *,
        group: str = "default",
        workers: int = 4,
        max_workers: int | None = None,
        max_attempts: int = 5,
        backoff: Backoff | None = None,
        lease: float = 30.0,
        task_timeout: float | None = None,
        breaker: Breaker | None = None,
        rate_limit: float | None = None,
        mode: str = "thread",
        results: bool = False,
        output: Queue | Router | None = None,
    ) -> None:
        if not isinstance(queue, Queue):
            raise TypeError(f"'queue' must be a pqueue.Queue, not {type(queue).__name__}")
        if not callable(handler):
            raise TypeError(f"'handler' must be callable, not {type(handler).__name__}")
        if not isinstance(group, str) or not group:
            raise ValueError("'group' must be a non-empty string")
        workers = _check_count("workers", workers)
        max_workers = workers if max_workers is None else _check_count("max_workers", max_workers)
        if max_workers < workers:
            raise ValueError(f"'max_workers' ({max_workers}) must not be below 'workers' ({workers})")
        max_attempts = _check_count("max_attempts", max_attempts)
        if backoff is None:
            backoff = Backoff()
        elif not isinstance(backoff, Backoff):
            raise TypeError(f"'backoff' must be a pqueue.Backoff, not {type(backoff).__name__}")
        lease = _check_number("lease", lease, minimum=0.0, inclusive=False)
        if task_timeout is not None:
            task_timeout = _check_number("task_timeout", task_timeout, minimum=0.0, inclusive=False)
            if task_timeout >= lease:
                raise ValueError(f"'task_timeout' ({task_timeout} s) must be shorter than 'lease' ({lease} s), "
                                 f"or the lease runs out and another consumer takes the task first")
        if breaker is not None and not isinstance(breaker, Breaker):
            raise TypeError(f"'breaker' must be a pqueue.Breaker, not {type(breaker).__name__}")
        if rate_limit is not None:
            rate_limit = _check_number("rate_limit", rate_limit, minimum=0.0, inclusive=False)
        if mode not in ("thread", "process"):
            raise ValueError(f"'mode' must be 'thread' or 'process', not {mode!r}")
        if output is not None and not isinstance(output, Queue) and not callable(output):
            raise TypeError(f"'output' must be a pqueue.Queue or a function returning (queue, item) pairs, "
                            f"not {type(output).__name__}")
        if output is not None and mode == "process":
            raise ValueError("'output' is not supported in process mode: run a thread-mode pool per stage")
        is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            type(handler).__call__)  # an instance with an async __call__
        if mode == "process":
            if max_workers != workers:
                raise ValueError("process mode runs a fixed number of processes: leave 'max_workers' unset")
            from .pool_process import check_picklable
            check_picklable(handler)

        self.queue = queue
        self.handler = handler
        self.group = group
        self.workers = workers
        self.max_workers = max_workers
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.lease = lease
        self.task_timeout = task_timeout
        self.breaker = breaker
        self.rate_limit = rate_limit
        self.mode = mode
        self.results = bool(results)
        self.output = output
        self._async = is_async
        self._bucket = TokenBucket(rate_limit) if rate_limit is not None else None
        self._clock: Callable[[], float] = time.monotonic
        self._rand = random.Random()
        self._idle_seconds = IDLE_SECONDS
        self._consumer: Consumer | None = None

        # _lock guards every field below: the state, the slot accounting, the running tasks,
        # the counters and the retry memory. Held briefly by the dispatcher, the workers,
        # stop() and stats(); never held while a handler runs or the index commits. _cond
        # (on the same lock) wakes the dispatcher and stop() when a slot frees or the state
        # changes; _sleepers counts its waiters so a settling task skips notify() when none wait.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sleepers = 0
        self._state = NEW
        self._broken: BaseException | None = None
        self._stop_deadline = math.inf
        self._capacity = 0  # workers taking tasks
        self._busy = 0  # tasks submitted and not yet settled
        self._running: set[_Task] = set()
        self._isolated: _Task | None = None  # a suspect running alone: dispatch nothing else
        self._suspect: _Task | None = None  # a suspect waiting for the others to finish
        self._leftovers: list[_Task] = []  # taken after the stop began: handed back at once
        self._retrying: collections.OrderedDict[int, bool] = collections.OrderedDict()
        self._counts = dict.fromkeys(("processed", "failed", "retried", "dead", "rejected", "timed_out"), 0)
        self._last_demand = 0.0
        self._next_scale = 0.0
        self._threads: set[threading.Thread] = set()  # worker threads alive
        self._stuck: set[threading.Thread] = set()  # of those, the ones running an abandoned task
        self._wakeups: list[int] = []  # pipes of run() calls, written when the pool has stopped
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)

        self._dispatcher: threading.Thread | None = None
        self._workq: _stdlib_queue.SimpleQueue[_Task | None] | None = None  # to the worker threads
        self._aio: EventLoopWorkers | None = None  # async handlers: the loop and its coroutines
        self._metrics_server: Any = None
        self._processes: Any = None  # pool_process.Supervisor in process mode

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> ConsumerPool:
        """Start the workers and the dispatcher; return the pool.

        Raises:
            RuntimeError: the pool was started before (a pool runs once).
            BrokenPool: the pool is broken.
        """
        with self._lock:
            self._raise_if_broken()
            if self._state != NEW:
                raise RuntimeError(f"{self!r} was started already; build a new pool to run again")
            self._state = RUNNING
        try:
            if self._consumer is None:  # a pool stepped before it started has one already
                self._consumer = Consumer(self.queue, self.group, lease=self.lease,
                                          ack_interval=self.queue.ack_interval)
            if self.mode == "process":
                from .pool_process import Supervisor
                self._processes = Supervisor(self)
                target: Callable[[], None] = self._processes.run
            else:
                if self._async:
                    self._aio = EventLoopWorkers(self)
                    self._aio.start()
                else:
                    self._workq = _stdlib_queue.SimpleQueue()
                for _ in range(self.workers):
                    self._spawn_worker()
                target = self._dispatch_loop
            self._last_demand = self._clock()
            self._dispatcher = threading.Thread(target=target, name=f"pqueue-pool:{self.group}", daemon=True)
            self._dispatcher.start()
        except BaseException:
            with self._lock:
                self._state = STOPPED
            self._teardown()
            raise
        log.info("%r started", self)
        return self

    def stop(self, timeout: float | None = STOP_TIMEOUT_SECONDS) -> None:
        """Take no new work, let in-flight tasks finish within `timeout`, hand back the rest.

        Handed-back tasks keep their attempt count (no attempt is charged) and can be taken at
        once by another consumer; afterwards `queue.qsize()` is exact. Calling it again with a
        shorter timeout hurries a stop in progress. Called from a handler it only asks the pool
        to stop (waiting for itself would never end).

        Args:
            timeout: seconds to wait for in-flight tasks (None: as long as they take).
        Raises:
            ValueError: `timeout` is negative.
        """
        self._request_stop(timeout)
        if self._in_pool_thread():
            return
        self._wait_stopped(None)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the pool has stopped (by `stop()`, a signal to `run()` or a fatal error).

        Returns:
            True if it has stopped, False if `timeout` passed first.
        Raises:
            BrokenPool: it stopped on a fatal error.
            RuntimeError: it was never started.
        """
        check_timeout(timeout)
        if self._state == NEW:
            raise RuntimeError(f"cannot join {self!r}: it was never started")
        done = self._wait_stopped(timeout)
        with self._lock:
            self._raise_if_broken()
        return done

    def run(self, *, stop_timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Start the pool (if it is not running) and block until it stops.

        In the main thread, SIGINT and SIGTERM stop it gracefully (`stop(stop_timeout)`); a
        second signal hands back the in-flight tasks at once. The previous handlers come back
        afterwards.

        Raises:
            BrokenPool: the pool stopped on a fatal error.
        """
        check_timeout(stop_timeout)
        if threading.current_thread() is not threading.main_thread():
            if self._state == NEW:
                self.start()
            self.join()
            return
        until_signalled(self, stop_timeout)
        self._wait_stopped(None)
        with self._lock:
            self._raise_if_broken()

    def __enter__(self) -> ConsumerPool:
        if self._state == NEW:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if exc_type is None:
            with self._lock:
                self._raise_if_broken()

    def _request_stop(self, timeout: float | None) -> None:
        check_timeout(timeout)
        with self._lock:
            never_started = self._state == NEW
            if never_started:
                self._state = STOPPED
                self._cond.notify_all()
        if never_started:
            self._teardown()  # a stepped pool holds a consumer with leases to hand back
            return
        with self._lock:
            deadline = math.inf if timeout is None else self._clock() + timeout
            self._stop_deadline = min(self._stop_deadline, deadline)
            if self._state == RUNNING:
                self._state = STOPPING
                log.info("%r stopping: in-flight tasks have %s s", self, timeout)
            self._cond.notify_all()
        if self._processes is not None:
            self._processes.wake()

    def _wait_stopped(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else self._clock() + timeout
        with self._lock:
            while self._state not in (STOPPED, BROKEN):
                remaining = None if deadline is None else deadline - self._clock()
                if remaining is not None and remaining <= 0:
                    return False
                self._sleep_locked(remaining)  # the dispatcher notifies when it has stopped
        dispatcher = self._dispatcher
        if dispatcher is not None and dispatcher is not threading.current_thread():
            dispatcher.join(None if deadline is None else max(0.0, deadline - self._clock()))
            return not dispatcher.is_alive()
        return True

    def _sleep_locked(self, timeout: float | None) -> None:
        self._sleepers += 1
        try:
            self._cond.wait(timeout)
        finally:
            self._sleepers -= 1

    def _in_pool_thread(self) -> bool:
        me = threading.current_thread()
        return me is self._dispatcher or me in self._threads or (self._aio is not None and me is self._aio.thread)

    def _raise_if_broken(self) -> None:
        if self._broken is not None:
            raise BrokenPool(f"the pool of group {self.group!r} on {self.queue.path} stopped on a fatal error: "
                             f"{self._broken!r}") from self._broken

    def _break(self, exc: BaseException) -> None:
        """A fatal error: remember it (sticky) and stop, handing back everything at once."""
        with self._lock:
            if self._broken is None:
                self._broken = exc
                log.error("%r: fatal error, stopping: %r", self, exc, exc_info=exc)
        self._request_stop(0.0)

    # ------------------------------------------------------------------ the dispatcher

    def _dispatch_loop(self) -> None:
        """Take tasks while there is room and admission allows; stop when asked, then tear down."""
        next_housekeeping = 0.0
        try:
            while True:
                now = self._clock()
                if now >= next_housekeeping:
                    next_housekeeping = now + self._housekeeping(now)
                horizon = max(next_housekeeping - now, 0.001)
                with self._lock:
                    if self._state != RUNNING:
                        break
                    isolate = self._suspect is not None and self._busy == 0
                    free = self._free_slots_locked()
                    if free <= 0 and not isolate:
                        self._sleep_locked(min(horizon, HOUSEKEEPING_SECONDS))
                        continue
                if isolate:
                    self._run_suspect()
                    continue
                batch, wait = self._take_batch(now, free, min(horizon, DISPATCH_POLL_SECONDS))
                with self._lock:
                    if not batch:
                        if wait > 0 and self._state == RUNNING:
                            self._sleep_locked(min(wait, horizon))
                        continue
                    if self._state != RUNNING:
                        self._leftovers.extend(batch)  # handed back below with the rest
                        break
                    for task in batch:
                        if task.msg.attempt > 1 and not self._retrying.pop(task.msg.offset, False):
                            # A retry this pool did not nack: it came back from a crash. Run it
                            # alone (it ends a batch, so nothing follows it here).
                            self._suspect = task
                        else:
                            self._submit_locked(task, now)
        except BaseException as exc:
            self._break(exc)
        finally:
            self._shutdown()

    def _take_batch(self, now: float, free: int, timeout: float) -> tuple[list[_Task], float]:
        """Up to `free` tasks: the first waits up to `timeout`, the rest only if ready now.

        A retry ends the batch: it may be a suspect that must run alone.
        """
        batch: list[_Task] = []
        task, wait = self._next_task(now, timeout)
        while task is not None:
            batch.append(task)
            if len(batch) >= free or task.msg.attempt > 1:
                break
            task, wait = self._next_task(now, 0.0)
        return batch, wait

    def _run_suspect(self) -> None:
        """Submit the held suspect now that nothing else runs."""
        # A suspect may kill the process: make every earlier ack durable first, or a lost ack
        # would charge an innocent task one more attempt.
        self._consumer.flush()  # type: ignore[union-attr]
        with self._lock:
            if self._state == RUNNING and self._suspect is not None:
                self._isolated, self._suspect = self._suspect, None
                self._submit_locked(self._isolated, self._clock())

    def _free_slots_locked(self) -> int:
        if self._isolated is not None or self._suspect is not None:
            return 0
        latencies = self._latencies
        if self._async or not latencies or latencies[-1] >= FAST_TASK_SECONDS:
            return self._capacity - self._busy
        # Fast tasks: thread workers get a few ahead, so a worker that finds the next one
        # waiting never blocks (a thread's block and wake-up costs more than a no-op task).
        # Slow tasks get none: a task waiting in line would spend its lease there.
        return self._capacity * (1 + QUEUED_PER_WORKER) - self._busy

    def _next_task(self, now: float, timeout: float) -> tuple[_Task | None, float]:
        """Admit and lease one task, waiting up to `timeout` for one to arrive.

        Returns:
            (task, 0), or (None, seconds until admission may allow one; 0 if the queue is empty).
        """
        probe = False
        if self.breaker is not None:
            allowed, probe = self.breaker._admit(now)
            if not allowed:
                self._return_prefetched()
                return None, max(self.breaker.reopen_in(now), 0.001)
        if self._bucket is not None:
            wait = self._bucket.take(now)
            if wait > 0:
                if probe:
                    self.breaker.cancel_probe()  # type: ignore[union-attr]
                return None, wait
        assert self._consumer is not None
        try:
            msg = self._consumer.get(timeout > 0, timeout if timeout > 0 else None)
        except Empty:
            if self._bucket is not None:
                self._bucket.refund()
            if probe:
                self.breaker.cancel_probe()  # type: ignore[union-attr]
            return None, 0.0
        return _Task(msg, probe), 0.0

    def _return_prefetched(self) -> None:
        """Hand back, uncharged, the messages the consumer leased ahead but has not delivered.

        While the breaker is open they would sit leased until the lease ran out, and an expired
        lease counts as an attempt: the breaker must burn none.
        """
        assert self._consumer is not None
        self._consumer.release_prefetched()

    def _submit_locked(self, task: _Task, now: float) -> None:
        self._busy += 1
        self._running.add(task)
        if self._aio is not None:
            task.started = now
            self._aio.submit(task)
        else:
            assert self._workq is not None
            self._workq.put(task)

    def _housekeeping(self, now: float) -> float:
        """Expire timed-out tasks and scale; return seconds until this should run again."""
        interval = HOUSEKEEPING_SECONDS
        if self.task_timeout is not None and not self._async:
            self._expire(now)
            interval = min(interval, self.task_timeout / 4)
        self._renew_leases()
        interval = min(interval, self.lease / 4)
        if self.max_workers > self.workers and now >= self._next_scale:
            self._scale(now)
            self._next_scale = now + SCALE_INTERVAL_SECONDS
        if self.max_workers > self.workers:
            interval = min(interval, max(self._next_scale - now, 0.001))
        return interval

    def _renew_leases(self) -> None:
        """Extend the leases of tasks still running past half their lease (a heartbeat).

        Without it a task that runs longer than `lease` is delivered to another consumer while
        it still runs; with it, only a dead process's tasks are redelivered.
        """
        wall = time.time()
        with self._lock:
            running = [t for t in self._running if t.started and not t.settled and not t.abandoned
                       and t.msg.lease_deadline - wall < self.lease / 2]
        consumer = self._consumer
        for t in running:
            if consumer is not None and not consumer.extend(t.msg, seconds=self.lease):
                log.warning("%r: the lease of the task at offset %d ran out while it ran; it may run twice",
                            self, t.msg.offset)

    def _expire(self, now: float) -> None:
        assert self.task_timeout is not None
        with self._lock:
            expired = [t for t in self._running if t.started and not t.settled and not t.abandoned
                       and now - t.started >= self.task_timeout]
            for t in expired:
                self._abandon_locked(t)
                self._counts["failed"] += 1
                self._counts["timed_out"] += 1
        for t in expired:
            log.warning("%r: task at offset %d ran longer than task_timeout=%s s; replacing its worker "
                        "thread and ignoring its late result", self, t.msg.offset, self.task_timeout)
            self._spawn_worker(replacement=True)
            if self.breaker is not None:
                self.breaker.record(False, now, probe=t.probe)
            self._apply_failure(t, TimeoutError(f"task ran longer than task_timeout={self.task_timeout} s"))

    def _abandon_locked(self, task: _Task) -> None:
        task.abandoned = True
        if task.worker is not None:
            self._stuck.add(task.worker)
        self._running.discard(task)
        self._busy -= 1
        if self._isolated is task:
            self._isolated = None
        self._cond.notify_all()

    def _scale(self, now: float) -> None:
        assert self._consumer is not None
        lag = self._consumer.qsize()
        with self._lock:
            backlog = max(0, lag - self._busy)
            want = min(self.max_workers, max(self.workers, math.ceil(backlog / BACKLOG_PER_WORKER)))
            if backlog > 0 or self._busy >= self._capacity:
                self._last_demand = now
            grow = want - self._capacity
            shrink = (self._capacity > self.workers and self._busy < self._capacity
                      and now - self._last_demand >= self._idle_seconds)
        if grow > 0:
            log.info("%r: backlog %d, scaling up by %d", self, backlog, grow)
            for _ in range(grow):
                self._spawn_worker()
        elif shrink:
            log.info("%r: idle, scaling down by 1", self)
            self._retire_worker()
            with self._lock:
                self._last_demand = now  # one step per idle period, not all at once

    # ------------------------------------------------------------------ workers

    def _spawn_worker(self, *, replacement: bool = False) -> None:
        if self._aio is not None:
            if not replacement:  # a coroutine is never stuck for good: nothing to replace
                self._aio.spawn()
                with self._lock:
                    self._capacity += 1
            return
        t = threading.Thread(target=self._thread_worker, name=f"pqueue-worker:{self.group}", daemon=True)
        with self._lock:
            self._threads.add(t)
            if not replacement:
                self._capacity += 1
            self._cond.notify_all()
        t.start()

    def _retire_worker(self) -> None:
        with self._lock:
            self._capacity -= 1
        if self._aio is not None:
            self._aio.retire()
        else:
            assert self._workq is not None
            self._workq.put(None)

    def _thread_worker(self) -> None:
        assert self._workq is not None
        get = self._workq.get
        me = threading.current_thread()
        try:
            while True:
                task = get()
                if task is None:
                    return
                if self._state != RUNNING:
                    # Handed ahead before the stop began, not started: it goes back, not run.
                    with self._lock:
                        self._leftovers.append(task)
                        self._free_locked(task)
                    continue
                task.worker = me
                task.started = self._clock()
                self._run_task(task, None)
                if task.abandoned:
                    return  # a replacement took this worker's place
        finally:
            with self._lock:
                self._threads.discard(me)
                self._stuck.discard(me)
                self._cond.notify_all()

    def _run_task(self, task: _Task, now: float | None) -> None:
        """Run the handler on one task and apply the outcome (in a worker or, unstarted, inline)."""
        msg = task.msg
        if msg.attempt > self.max_attempts:
            self._dead_letter_unrun(task)
            return
        t0 = time.perf_counter()
        try:
            value = self.handler(msg)
        except Exception as exc:
            self._settle(task, exc, time.perf_counter() - t0, now)
        except BaseException as exc:
            # SystemExit/KeyboardInterrupt inside a handler: not the task's fault. Hand it back.
            self._settle(task, None, 0.0, now, release=True)
            self._break(exc)
        else:
            self._settle(task, None, time.perf_counter() - t0, now, value=value)

    def _settle(self, task: _Task, exc: Exception | None, elapsed: float, now: float | None, *,
                release: bool = False, value: Any = None) -> None:
        """Apply a finished task's outcome unless it was abandoned meanwhile.

        A success first puts the handler's output into the next queue (`output=`), then acks
        with the result (`results=True`): a crash in between re-runs the handler, and the
        idempotency keys of the outputs absorb the repeat.
        """
        with self._lock:
            if task.abandoned:
                return  # timed out or handed back at stop: the late result is ignored
            task.settled = True
            if not release:
                self._counts["processed" if exc is None else "failed"] += 1
            # The slot frees before the ack: stop() joins the worker threads before it closes
            # the consumer, so the ack still lands. An isolated suspect frees it only after its
            # outcome is applied, because the next suspect flushes the acks before it runs.
            early = task is not self._isolated
            if early:
                self._free_locked(task)
        try:
            if release:
                self._consumer.release(task.msg)  # type: ignore[union-attr]
                return
            self._latencies.append(elapsed)
            if self.breaker is not None:
                # Reject judges the task, not the upstream: it does not count against the breaker.
                self.breaker.record(exc is None or isinstance(exc, Reject),
                                    self._clock() if now is None else now, probe=task.probe)
            if exc is None:
                try:
                    if self.output is not None:
                        emit(self.queue, self.group, task.msg, value, self.output)
                    if self.results:
                        self._consumer.ack(task.msg, result=value)  # type: ignore[union-attr]
                    else:
                        self._consumer.ack(task.msg)  # type: ignore[union-attr]
                except (SerializationError, RecordTooLargeError, Full) as out_exc:
                    # The output or result cannot be kept: the task failed like any handler error.
                    self._apply_failure(task, out_exc)
            else:
                self._apply_failure(task, exc)
        except Exception as fatal:
            self._break(fatal)
        finally:
            if not early:
                with self._lock:
                    self._free_locked(task)

    def _free_locked(self, task: _Task) -> None:
        if task in self._running:
            self._running.discard(task)
            self._busy -= 1
            if self._isolated is task:
                self._isolated = None
            if self._sleepers:
                self._cond.notify_all()

    def _release_slot(self, task: _Task) -> None:
        with self._lock:
            self._free_locked(task)

    def _apply_failure(self, task: _Task, exc: BaseException) -> None:
        """Retry a failed task later, or dead-letter it (Reject, or its last attempt)."""
        consumer = self._consumer
        assert consumer is not None
        msg = task.msg
        if isinstance(exc, Reject):
            log.warning("%r: task at offset %d rejected: %s; moving it to the dead-letter queue",
                        self, msg.offset, exc.reason)
            consumer.dead_letter(msg, reason="rejected", error=exc, extra={"max_attempts": self.max_attempts})
            self._count("dead", "rejected")
        elif msg.attempt >= self.max_attempts:
            log.error("%r: task at offset %d failed its last attempt (%d of %d): %r; moving it to the "
                      "dead-letter queue", self, msg.offset, msg.attempt, self.max_attempts, exc)
            consumer.dead_letter(msg, reason="max_attempts", error=exc, extra={"max_attempts": self.max_attempts})
            self._count("dead")
        else:
            if isinstance(exc, Retry) and exc.delay is not None:
                delay = exc.delay
            else:
                delay = self.backoff.delay(msg.attempt, rand=self._rand.random)
            log.warning("%r: task at offset %d failed (attempt %d of %d): %r; retrying in %.3g s",
                        self, msg.offset, msg.attempt, self.max_attempts, exc, delay)
            with self._lock:
                self._retrying[msg.offset] = True
                if len(self._retrying) > RETRY_MEMORY:
                    self._retrying.popitem(last=False)
            consumer.nack(msg, delay=delay)
            self._count("retried")

    def _dead_letter_unrun(self, task: _Task) -> None:
        with self._lock:
            if task.abandoned:
                return
            task.settled = True
        msg = task.msg
        log.error("%r: task at offset %d is on delivery %d of at most %d: earlier deliveries never finished "
                  "(the process died or the lease ran out); moving it to the dead-letter queue without "
                  "running it", self, msg.offset, msg.attempt, self.max_attempts)
        try:
            self._consumer.dead_letter(  # type: ignore[union-attr]
                msg, reason="max_attempts", error=None,
                extra={"max_attempts": self.max_attempts,
                       "detail": "earlier deliveries never finished: the process died or the lease ran out"})
            self._count("dead")
        except Exception as fatal:
            self._break(fatal)
        finally:
            self._release_slot(task)

    def _count(self, *names: str) -> None:
        with self._lock:
            for name in names:
                self._counts[name] += 1

    # ------------------------------------------------------------------ shutdown

    def _shutdown(self) -> None:
        """Run by the dispatcher on its way out: finish or hand back in-flight work, tear down."""
        queued = self._unqueue()
        with self._lock:
            while self._busy > 0:
                remaining = self._stop_deadline - self._clock()
                if remaining <= 0:
                    break
                self._sleep_locked(min(remaining, HOUSEKEEPING_SECONDS))
            stuck = [t for t in self._running if not t.settled]
            for t in stuck:
                self._abandon_locked(t)
            # Settled tasks are applying their outcome (a quick commit): let them finish.
            while self._busy > 0:
                self._sleep_locked(HOUSEKEEPING_SECONDS)
            held = queued + self._leftovers + ([self._suspect] if self._suspect is not None else [])
            self._suspect, self._leftovers = None, []
        errors: list[BaseException] = []
        handed_back = [t.msg for t in stuck + held]
        if stuck:
            log.warning("%r: %d tasks still running at the stop deadline; handing them back uncharged "
                        "(their late results are ignored)", self, len(stuck))
        for msg in handed_back:
            try:
                self._consumer.release(msg)  # type: ignore[union-attr]
            except QueueError as exc:
                errors.append(exc)
        if self._aio is not None:
            for t in stuck:
                self._aio.cancel(t)
        if errors and self._broken is None:
            self._broken = errors[0]
        self._finish()

    def _unqueue(self) -> list[_Task]:
        """Take back the tasks handed to thread workers ahead that none has started."""
        if self._workq is None:
            return []
        tasks: list[_Task] = []
        retired = 0
        while True:
            try:
                task = self._workq.get_nowait()
            except _stdlib_queue.Empty:
                break
            if task is None:
                retired += 1
            else:
                tasks.append(task)
        for _ in range(retired):
            self._workq.put(None)  # retirement notices go back for the workers they were meant for
        with self._lock:
            for task in tasks:
                self._free_locked(task)
        return tasks

    def _finish(self) -> None:
        """The last step of every stop: tear down, then tell the waiters (join, run) it is over."""
        self._teardown()
        with self._lock:
            self._state = BROKEN if self._broken is not None else STOPPED
            self._cond.notify_all()
            for w in self._wakeups:
                try:
                    os.write(w, b"\0")
                except OSError:
                    pass  # run() is gone already
        log.info("%r stopped", self)

    def _teardown(self) -> None:
        """Stop idle workers, the event loop, the exporter; close the consumer (hands back leases)."""
        with self._lock:
            threads = [t for t in self._threads if t not in self._stuck]
            self._capacity = 0
        if self._aio is not None:
            self._aio.close()
        elif self._workq is not None:
            for _ in threads:
                self._workq.put(None)
            for t in threads:
                if t is not threading.current_thread():
                    t.join()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        if self._consumer is not None:
            try:
                self._consumer.close()
            except Exception as exc:  # the queue may be what broke: still finish the stop
                if self._broken is None:
                    self._broken = exc

    # ------------------------------------------------------------------ stepping (tests)

    def _step(self, now: float) -> bool:
        """Run one step of an unstarted pool in the caller's thread: at most one task.

        The breaker and the rate limit see `now` (monotonic seconds), so tests drive them
        without sleeping, as huey's `loop(now)`. Returns True if a task was handled.
        """
        with self._lock:
            if self._state != NEW:
                raise RuntimeError("_step() drives an unstarted pool only")
            if self._consumer is None:
                self._consumer = Consumer(self.queue, self.group, lease=self.lease,
                                          ack_interval=self.queue.ack_interval)
        task, _wait = self._next_task(now, 0.0)
        if task is None:
            return False
        with self._lock:
            self._busy += 1
            self._running.add(task)
        if self._async:
            asyncio.run(run_task(self, task))
        else:
            self._run_task(task, now)
        with self._lock:
            self._raise_if_broken()
        return True

    # ------------------------------------------------------------------ observability

    def stats(self) -> PoolStats:
        """A snapshot of the counters, the state and the handler latency percentiles (never raises)."""
        if self._processes is not None:
            snapshot: PoolStats = self._processes.stats()
            return snapshot
        lat = sorted(self._latencies)
        with self._lock:
            counts = dict(self._counts)
            queued = self._workq.qsize() if self._workq is not None else 0
            in_flight = max(0, self._busy - queued)  # handed ahead but not started: not in flight
            workers = self._capacity
            state = self._state
            error = None if self._broken is None else repr(self._broken)
        return PoolStats(
            processed=counts.get("processed", 0), failed=counts.get("failed", 0),
            retried=counts.get("retried", 0), dead=counts.get("dead", 0), rejected=counts.get("rejected", 0),
            timed_out=counts.get("timed_out", 0), in_flight=in_flight, workers=workers,
            breaker=CLOSED if self.breaker is None else self.breaker.state, lag=self._lag(),
            latency_p50=percentile(lat, 0.5) if lat else None, latency_p90=percentile(lat, 0.9) if lat else None,
            latency_p99=percentile(lat, 0.99) if lat else None, latency_max=lat[-1] if lat else None,
            state=state, error=error)

    def _lag(self) -> int | None:
        consumer = self._consumer or self.queue.consumer(self.group)
        try:
            return consumer.qsize()
        except QueueError:
            return None  # the queue was closed

    def serve_metrics(self, port: int = 0, *, host: str = "127.0.0.1") -> int:
        """Serve Prometheus metrics of this pool over HTTP until it stops (needs prometheus-client).

        Bound to 127.0.0.1 unless told otherwise: the numbers are not secret, but an edge device
        should not open a port to the world by surprise.

        Args:
            port: the TCP port (0 picks a free one).
            host: the address to bind.
        Returns:
            The bound port.
        Raises:
            ImportError: prometheus-client is not installed (``pip install pqueue-log[metrics]``).
        """
        from .pool_metrics import serve
        server = serve(self, port, host)
        self._metrics_server = server
        bound: int = server.server_address[1]
        return bound

    def __repr__(self) -> str:
        return f"<ConsumerPool {self.queue.path!r} group={self.group!r} mode={self.mode} {self._state}>"


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name!r} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name!r} must be at least 1, got {value!r}")
    return value


__all__ = ["BrokenPool", "ConsumerPool", "PoolStats"]
