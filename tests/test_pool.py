"""ConsumerPool: retries and backoff, dead letters, breaker, rate limit, timeouts, scaling, stop,
signals, async handlers, process mode, metrics, and SIGKILL of real pool processes.

Step-driven tests call `pool._step(now)` on an unstarted pool (huey's `loop(now)`): the breaker
and the rate limit see the injected time, so they never sleep. Threaded tests wait on the
pool's condition or on events set by handlers.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pool_worker
import pytest
from helpers import drain

import pqueue
from pqueue.consumer import PREFETCH_MAX
from pqueue.pool import QUEUED_PER_WORKER, BrokenPool, PoolStats

HERE = Path(__file__).resolve().parent
FAST = pqueue.Backoff(initial=0.01, multiplier=2.0, maximum=0.05, jitter=0.0)


@pytest.fixture
def pq(tmp_path: Path) -> Iterator[pqueue.Queue]:
    """A queue without fsync (speed), closed after the test."""
    queue = pqueue.Queue(tmp_path / "q", fsync="never")
    yield queue
    queue.close()


def wait_pool(pool: pqueue.ConsumerPool, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait on the pool's condition (notified whenever a task settles) until `predicate` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out waiting; stats: {pool.stats()}"
        with pool._lock:
            # Retries come due without a notification: re-check at least every 20 ms.
            pool._sleep_locked(min(remaining, 0.02))


def drained(pool: pqueue.ConsumerPool) -> bool:
    return pool._lag() == 0 and pool._busy == 0


# --------------------------------------------------------------------------- API and policies


def test_public_names() -> None:
    """The pool's public names are exported, and Retry/Reject are plain exceptions."""
    for name in ("ConsumerPool", "Backoff", "Breaker", "Retry", "Reject"):
        assert name in pqueue.__all__
    assert issubclass(pqueue.Retry, Exception) and not issubclass(pqueue.Retry, pqueue.QueueError)
    assert issubclass(pqueue.Reject, Exception) and not issubclass(pqueue.Reject, pqueue.QueueError)
    assert pqueue.Retry(delay=2).delay == 2.0 and pqueue.Retry().delay is None
    assert pqueue.Reject("bad input").reason == "bad input"


@pytest.mark.parametrize(("kwargs", "exc", "text"), [
    ({"workers": 0}, ValueError, "'workers' must be at least 1, got 0"),
    ({"workers": 2.5}, TypeError, "'workers' must be an int, not float"),
    ({"workers": 4, "max_workers": 2}, ValueError, "'max_workers' (2) must not be below 'workers' (4)"),
    ({"max_attempts": 0}, ValueError, "'max_attempts' must be at least 1, got 0"),
    ({"lease": 0}, ValueError, "'lease' must be greater than 0.0, got 0"),
    ({"task_timeout": 5, "lease": 5}, ValueError, "'task_timeout' (5.0 s) must be shorter than 'lease' (5.0 s)"),
    ({"rate_limit": -1}, ValueError, "'rate_limit' must be greater than 0.0, got -1"),
    ({"backoff": 3}, TypeError, "'backoff' must be a pqueue.Backoff, not int"),
    ({"breaker": "yes"}, TypeError, "'breaker' must be a pqueue.Breaker, not str"),
    ({"group": ""}, ValueError, "'group' must be a non-empty string"),
    ({"mode": "fork"}, ValueError, "'mode' must be 'thread' or 'process', not 'fork'"),
])
def test_bad_arguments(pq: pqueue.Queue, kwargs: dict[str, Any], exc: type[Exception], text: str) -> None:
    """Bad values raise ValueError/TypeError with a message naming the argument."""
    with pytest.raises(exc) as info:
        pqueue.ConsumerPool(pq, lambda m: None, **kwargs)
    assert str(info.value).startswith(text)


def test_process_mode_needs_importable_handler(pq: pqueue.Queue) -> None:
    """A lambda cannot reach a spawned process: refused at construction, not at start."""
    with pytest.raises(TypeError, match="importable by name"):
        pqueue.ConsumerPool(pq, lambda m: None, mode="process")


def test_backoff_schedule() -> None:
    """initial * multiplier**(attempt-1), capped at maximum, jittered within ±jitter."""
    b = pqueue.Backoff(initial=0.5, multiplier=2.0, maximum=3.0, jitter=0.0)
    assert [b.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert b.delay(10_000) == 3.0  # no OverflowError
    j = pqueue.Backoff(initial=1.0, multiplier=1.0, maximum=1.0, jitter=0.1)
    assert j.delay(1, rand=lambda: 0.0) == pytest.approx(0.9)
    assert j.delay(1, rand=lambda: 0.999999) == pytest.approx(1.1, abs=1e-5)
    with pytest.raises(ValueError, match="'jitter' must be at most 1.0"):
        pqueue.Backoff(jitter=2)
    with pytest.raises(ValueError, match="'maximum' .* must not be below 'initial'"):
        pqueue.Backoff(initial=5, maximum=1)


def test_breaker_states() -> None:
    """Opens at the failure rate over a full window; half-opens after cooldown with one probe."""
    br = pqueue.Breaker(failure_rate=0.5, window=4, cooldown=10.0)
    for ok in (True, False, True):
        br.record(ok, now=0.0)
    assert br.state == "closed"  # 1 of 3: the window is not full yet
    br.record(False, now=1.0)  # 2 of 4 = 0.5
    assert br.state == "open" and not br.allow(5.0)
    assert br.allow(11.0) and br.state == "half_open"
    assert not br.allow(11.0)  # one probe at a time
    br.record(False, now=12.0, probe=True)
    assert br.state == "open" and not br.allow(21.0) and br.allow(22.0)
    br.record(True, now=22.5)  # a straggler from before: only the probe decides
    assert br.state == "half_open"
    br.record(True, now=23.0, probe=True)
    assert br.state == "closed" and br.allow(23.0)


# --------------------------------------------------------------------------- step-driven


def test_step_breaker_stops_taking_work_then_probes(pq: pqueue.Queue) -> None:
    """An open breaker takes nothing (tasks stay pending, no attempt burned); a good probe closes it."""
    upstream_ok = False
    calls: list[int] = []

    def handler(msg: pqueue.Message) -> None:
        calls.append(msg.offset)
        if not upstream_ok:
            raise ConnectionError("upstream offline")

    offsets = pq.put_many(list(range(10)))
    pool = pqueue.ConsumerPool(pq, handler, breaker=pqueue.Breaker(failure_rate=0.5, window=4, cooldown=10.0),
                               backoff=pqueue.Backoff(initial=60.0, maximum=60.0, jitter=0.0))
    for _ in range(4):
        assert pool._step(100.0)
    assert pool.stats().breaker == "open" and calls == offsets[:4]
    assert not pool._step(105.0)
    # Leased-ahead messages were handed back: nothing is held while the breaker is open.
    assert {pq.status(o) for o in offsets[4:]} <= {"pending", "waiting"}
    upstream_ok = True
    assert pool._step(110.0)  # the probe
    assert pool.stats().breaker == "closed"
    assert pool._step(110.0) and pool._step(110.0)
    st = pool.stats()
    assert (st.processed, st.failed, st.retried) == (3, 4, 4)
    pool.stop()
    rest = [pq.get(timeout=1) for _ in range(3)]
    assert [(m.offset, m.attempt) for m in rest] == [(o, 1) for o in offsets[7:]]  # no attempt burned


def test_step_rate_limit(pq: pqueue.Queue) -> None:
    """rate_limit=10: one task per 0.1 s of the injected clock."""
    pq.put_many(list(range(5)))
    pool = pqueue.ConsumerPool(pq, lambda m: None, rate_limit=10)
    assert pool._step(0.0)
    assert not pool._step(0.05)
    assert pool._step(0.1)
    assert not pool._step(0.1)
    assert pool._step(0.35)
    assert pool.stats().processed == 3 and pool.stats().lag == 2
    pool.stop()
    assert pq.qsize() == 2


def test_step_dead_letters_a_crash_looper_without_running_it(pq: pqueue.Queue) -> None:
    """A delivery numbered above max_attempts (earlier ones never finished) goes to the DLQ unrun."""
    off = pq.put({"job": "poison"})
    c = pq.consumer("default")
    for attempt in (1, 2):
        m = c.get(timeout=1)
        assert m.attempt == attempt
        c.nack(m)  # charged, as a crash of the holder would be
    called: list[Any] = []
    pool = pqueue.ConsumerPool(pq, called.append, max_attempts=2)
    assert pool._step(0.0)
    assert called == [] and pq.status(off) == "dead"
    [dead] = drain(pq.dead_letters, timeout=0)
    assert dead.data == {"job": "poison"}
    assert dead.meta["reason"] == "max_attempts" and dead.meta["attempts"] == 3 and dead.meta["offset"] == off
    pool.stop()


def test_step_reject_dead_letters_at_once(pq: pqueue.Queue) -> None:
    """Reject skips the retries: one call, then the DLQ with the reason and error recorded."""
    off = pq.put({"order": 7})
    calls = []

    def handler(msg: pqueue.Message) -> None:
        calls.append(msg.attempt)
        raise pqueue.Reject("no such customer")

    pool = pqueue.ConsumerPool(pq, handler, max_attempts=5)
    assert pool._step(0.0)
    assert calls == [1] and pq.status(off) == "dead" and pq.qsize() == 0
    [dead] = drain(pq.dead_letters, timeout=0)
    assert dead.data == {"order": 7}
    assert dead.meta["reason"] == "rejected" and dead.meta["error_type"] == "Reject"
    assert dead.meta["error"] == "no such customer" and dead.meta["group"] == "default"
    st = pool.stats()
    assert (st.dead, st.rejected, st.retried) == (1, 1, 0)
    pool.stop()


# --------------------------------------------------------------------------- threads


def test_every_task_handled_once(pq: pqueue.Queue) -> None:
    """A no-fault run handles each task exactly once and leaves the group empty."""
    seen: list[int] = []
    lock = threading.Lock()

    def handler(msg: pqueue.Message) -> None:
        with lock:
            seen.append(msg.data)

    pq.put_many(list(range(500)))
    with pqueue.ConsumerPool(pq, handler, workers=4) as pool:
        wait_pool(pool, lambda: drained(pool))
    assert sorted(seen) == list(range(500))
    st = pool.stats()
    assert isinstance(st, PoolStats)
    assert (st.processed, st.failed, st.in_flight, st.state, st.lag) == (500, 0, 0, "stopped", 0)
    assert st.latency_p50 is not None and st.latency_p99 is not None and st.latency_p50 <= st.latency_p99


def test_retries_follow_the_backoff_schedule(pq: pqueue.Queue) -> None:
    """Failing attempts come back after initial * multiplier**(attempt-1) s; then the task succeeds."""
    times: list[float] = []
    done = threading.Event()

    def handler(msg: pqueue.Message) -> None:
        times.append(time.monotonic())
        if msg.attempt < 3:
            raise RuntimeError(f"flaky {msg.attempt}")
        done.set()

    pq.put("job")
    with pqueue.ConsumerPool(pq, handler, workers=2,
                             backoff=pqueue.Backoff(initial=0.1, multiplier=2.0, maximum=1.0, jitter=0.0)) as pool:
        assert done.wait(5)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[0] >= 0.1 - 0.005 and gaps[1] >= 0.2 - 0.005  # wall clock ms rounding
    assert gaps[0] < 0.1 + 0.3 and gaps[1] < 0.2 + 0.3
    st = pool.stats()
    assert (st.processed, st.failed, st.retried, st.dead) == (1, 2, 2, 0)


def test_retry_exception_picks_the_delay(pq: pqueue.Queue) -> None:
    """raise Retry(delay=0.25) overrides the backoff schedule."""
    times: list[float] = []
    done = threading.Event()

    def handler(msg: pqueue.Message) -> None:
        times.append(time.monotonic())
        if msg.attempt == 1:
            raise pqueue.Retry(delay=0.25)
        done.set()

    pq.put("job")
    with pqueue.ConsumerPool(pq, handler, backoff=FAST):
        assert done.wait(5)
    assert 0.245 <= times[1] - times[0] < 0.6


def test_max_attempts_then_dead_letter_with_metadata(pq: pqueue.Queue) -> None:
    """After max_attempts failures the DLQ holds the payload with offset, group, attempts, error and times."""
    off = pq.put({"x": 1})
    calls = []

    def handler(msg: pqueue.Message) -> None:
        calls.append(msg.attempt)
        raise ValueError("boom")

    with pqueue.ConsumerPool(pq, handler, max_attempts=3, backoff=FAST) as pool:
        wait_pool(pool, lambda: drained(pool))
    assert calls == [1, 2, 3] and pq.status(off) == "dead" and pq.qsize() == 0
    [dead] = drain(pq.dead_letters, timeout=0)
    assert dead.data == {"x": 1}
    meta = dead.meta
    assert (meta["offset"], meta["group"], meta["attempts"], meta["reason"]) == (off, "default", 3, "max_attempts")
    assert meta["error_type"] == "ValueError" and meta["error"] == "boom" and "ValueError: boom" in meta["traceback"]
    assert meta["put_at"] <= meta["died_at"]
    assert pool.stats().dead == 1


def test_task_timeout_replaces_the_stuck_worker(pq: pqueue.Queue) -> None:
    """A task past task_timeout is a failed attempt, retried on a new thread; its late result is ignored."""
    release = threading.Event()
    second = threading.Event()
    acks: list[int] = []

    def handler(msg: pqueue.Message) -> None:
        if msg.attempt == 1:
            release.wait(10)  # stuck until the test lets it go
            return
        acks.append(msg.attempt)
        second.set()

    off = pq.put("slow")
    pool = pqueue.ConsumerPool(pq, handler, workers=1, task_timeout=0.2, lease=5.0, backoff=FAST)
    try:
        pool.start()
        assert second.wait(5)
        wait_pool(pool, lambda: drained(pool))
        st = pool.stats()
        assert (st.timed_out, st.failed, st.retried, st.processed, st.workers) == (1, 1, 1, 1, 1)
    finally:
        release.set()
        pool.stop()
    assert acks == [2] and pq.status(off) == "done"
    assert pool.stats().processed == 1  # the stuck attempt returned later and was ignored


def test_scales_up_with_backlog_and_down_when_idle(pq: pqueue.Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers grow to max_workers while tasks wait, and shrink back to `workers` when idle."""
    monkeypatch.setattr("pqueue.pool.SCALE_INTERVAL_SECONDS", 0.02)
    gate = threading.Event()
    active = 0
    peak = 0
    lock = threading.Lock()
    at_four = threading.Event()

    def handler(msg: pqueue.Message) -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
            if active == 4:
                at_four.set()
        gate.wait(10)
        with lock:
            active -= 1

    pq.put_many(list(range(60)))
    pool = pqueue.ConsumerPool(pq, handler, workers=1, max_workers=4)
    pool._idle_seconds = 0.1
    try:
        pool.start()
        assert at_four.wait(5)
        assert pool.stats().workers == 4
        gate.set()
        wait_pool(pool, lambda: drained(pool))
        wait_pool(pool, lambda: pool._capacity == 1 and len(pool._threads) == 1)
    finally:
        gate.set()
        pool.stop()
    assert peak == 4


def test_stop_hands_back_in_flight_uncharged(pq: pqueue.Queue) -> None:
    """stop(timeout) gives up on tasks still running: released, attempt not charged, qsize exact."""
    gate = threading.Event()
    running = threading.Semaphore(0)

    def handler(msg: pqueue.Message) -> None:
        running.release()
        gate.wait(10)

    offsets = pq.put_many(list(range(5)))
    pool = pqueue.ConsumerPool(pq, handler, workers=2)
    try:
        pool.start()
        assert running.acquire(timeout=5) and running.acquire(timeout=5)
        t0 = time.monotonic()
        pool.stop(timeout=0.1)
        assert time.monotonic() - t0 < 2
        assert pool.stats().state == "stopped" and pq.qsize() == 5
        got = [pq.get(timeout=1) for _ in offsets]
        assert sorted(m.offset for m in got) == offsets
        assert all(m.attempt == 1 for m in got)  # nothing charged
    finally:
        gate.set()


def test_stop_lets_in_flight_tasks_finish(pq: pqueue.Queue) -> None:
    """stop() with time to spare waits for running tasks, acks them and takes nothing new."""
    started = threading.Semaphore(0)
    finished: list[int] = []

    def handler(msg: pqueue.Message) -> None:
        started.release()
        time.sleep(0.2)  # a task that takes a while: the stop must wait for it
        finished.append(msg.offset)

    pq.put_many(list(range(10)))
    pool = pqueue.ConsumerPool(pq, handler, workers=2).start()
    assert started.acquire(timeout=5) and started.acquire(timeout=5)
    pool.stop(timeout=5)
    assert len(finished) >= 2
    assert pq.qsize() == 10 - len(finished) == 10 - pool.stats().processed


def test_stop_from_inside_a_handler(pq: pqueue.Queue) -> None:
    """A handler may stop its own pool: the call returns at once and the pool winds down."""
    holder: list[pqueue.ConsumerPool] = []

    def handler(msg: pqueue.Message) -> None:
        holder[0].stop()

    pq.put_many([1, 2, 3])
    pool = pqueue.ConsumerPool(pq, handler, workers=1)
    holder.append(pool)
    pool.start()
    assert pool.join(timeout=5)
    assert pool.stats().state == "stopped" and pool.stats().processed >= 1


def test_broken_pool_is_sticky(tmp_path: Path) -> None:
    """A fatal queue error stops the pool; join/start raise the same BrokenPool every time."""
    q = pqueue.Queue(tmp_path / "q", fsync="never")
    q.put(1)
    pool = pqueue.ConsumerPool(q, lambda m: None, workers=1).start()
    pool._consumer.close()  # type: ignore[union-attr]  # the queue goes away under the pool
    with pytest.raises(BrokenPool) as first:
        pool.join(timeout=5)
    with pytest.raises(BrokenPool) as again:
        pool.join(timeout=5)
    assert str(first.value) == str(again.value) and isinstance(first.value.__cause__, pqueue.ClosedError)
    with pytest.raises(BrokenPool):
        pool.start()
    assert pool.stats().state == "broken"
    q.close()


def test_async_handler_runs_with_workers_concurrency(pq: pqueue.Queue) -> None:
    """async def handlers run on an event loop, `workers` at a time; failures are retried."""
    active = 0
    peak = 0
    seen: set[int] = set()

    async def handler(msg: pqueue.Message) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.01)
        active -= 1
        if msg.data % 7 == 0 and msg.attempt == 1:
            raise RuntimeError("transient")
        seen.add(msg.data)

    pq.put_many(list(range(40)))
    with pqueue.ConsumerPool(pq, handler, workers=3, backoff=FAST) as pool:
        wait_pool(pool, lambda: drained(pool))
    assert seen == set(range(40)) and 1 < peak <= 3
    st = pool.stats()
    assert (st.processed, st.retried) == (40, 6)


def test_async_task_timeout_cancels(pq: pqueue.Queue) -> None:
    """An async task past task_timeout is cancelled for real and retried."""
    attempts: list[int] = []

    async def handler(msg: pqueue.Message) -> None:
        attempts.append(msg.attempt)
        if msg.attempt == 1:
            await asyncio.sleep(10)

    pq.put("x")
    with pqueue.ConsumerPool(pq, handler, task_timeout=0.1, lease=5.0, backoff=FAST) as pool:
        wait_pool(pool, lambda: drained(pool))
    assert attempts == [1, 2]
    assert (pool.stats().timed_out, pool.stats().processed) == (1, 1)


@pytest.mark.skipif(sys.platform != "linux", reason="uses Linux process semantics")
def test_metrics_exporter(pq: pqueue.Queue) -> None:
    """The Prometheus exporter binds 127.0.0.1 by default and serves the pool's counters."""
    pytest.importorskip("prometheus_client", reason="prometheus-client is not installed (pqueue-log[metrics])")
    pq.put_many([1, 2, 3])
    with pqueue.ConsumerPool(pq, lambda m: None, workers=1) as pool:
        port = pool.serve_metrics(0)
        assert pool._metrics_server.server_address[0] == "127.0.0.1"
        wait_pool(pool, lambda: drained(pool))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
    assert 'pqueue_pool_processed_total{group="default"' in body
    assert 'pqueue_pool_breaker_state{group="default"' in body and "state=\"closed\"} 1.0" in body


def test_context_manager_stops_on_error(pq: pqueue.Queue) -> None:
    """An exception in the with-block stops the pool and propagates unchanged."""
    pq.put_many([1, 2])
    with pytest.raises(KeyError, match="boom"):
        with pqueue.ConsumerPool(pq, lambda m: None, workers=1) as pool:
            raise KeyError("boom")
    assert pool.stats().state == "stopped"
    with pytest.raises(RuntimeError, match="started already"):
        pool.start()


# --------------------------------------------------------------------------- processes


def start_pool_process(path: Path, workers: int = 2, max_attempts: int = 3) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(HERE / "pool_worker.py"), str(path), str(workers),
                             str(max_attempts)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_sigterm_stops_gracefully(tmp_path: Path) -> None:
    """SIGTERM to a process in pool.run(): in-flight tasks finish, exit 0, nothing handled twice."""
    path, ledger = tmp_path / "q", str(tmp_path / "ledger")
    with pqueue.Queue(path) as q:
        q.put_many([pool_worker.task(i, ledger, sleep=0.02) for i in range(300)])
    proc = start_pool_process(path)
    while len(pool_worker.read_ledger(ledger)) < 20:
        assert proc.poll() is None
        time.sleep(0.01)  # polling a file another process writes: no event to wait on
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0 and out.startswith("stopped")
    assert out.split()[2] == "0"  # nothing in flight when it exited
    handled = [row[0] for row in pool_worker.read_ledger(ledger)]
    assert len(handled) == len(set(handled)) < 300
    with pqueue.Queue(path) as q:
        assert q.qsize() == 300 - len(handled)


def test_sigkill_at_random_points_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL the pool process at random moments, restart: all handled, duplicates bounded."""
    path, ledger = tmp_path / "q", str(tmp_path / "ledger")
    n, workers, kills = 400, 2, 4
    with pqueue.Queue(path) as q:
        q.put_many([pool_worker.task(i, ledger, sleep=0.002) for i in range(n)])
    rng = random.Random(1234)
    for _ in range(kills):
        proc = start_pool_process(path, workers=workers)
        time.sleep(rng.uniform(0.05, 0.4))  # the random kill point is the point of the test
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    with pqueue.Queue(path) as q:
        with pqueue.ConsumerPool(q, pool_worker.ledger_handler, workers=workers, lease=5.0) as pool:
            pool._consumer.reclaim_dead()  # type: ignore[union-attr]
            wait_pool(pool, lambda: drained(pool), timeout=30)
        assert q.qsize() == 0
        assert drain(q.dead_letters, timeout=0) == []
    handled = [row[0] for row in pool_worker.read_ledger(ledger)]
    assert set(handled) == set(range(n))
    # A kill can redeliver only what the dead process had leased: the consumer's prefetch batch
    # plus the tasks handed to its workers (running or queued ahead of them).
    in_flight_max = PREFETCH_MAX + workers * (1 + QUEUED_PER_WORKER)
    assert len(handled) - n <= kills * in_flight_max


def test_poison_task_that_kills_the_process_reaches_the_dlq(tmp_path: Path) -> None:
    """A task that SIGKILLs its process is dead-lettered after max_attempts restarts; no neighbour is."""
    path, ledger = tmp_path / "q", str(tmp_path / "ledger")
    max_attempts = 2
    with pqueue.Queue(path) as q:
        q.put_many([pool_worker.task(i, ledger, poison=(i == 5)) for i in range(30)])
    crashes = 0
    while True:
        proc = start_pool_process(path, workers=2, max_attempts=max_attempts)
        with pqueue.Queue(path) as q:
            deadline = time.monotonic() + 20
            while proc.poll() is None and q.qsize() > 0 and time.monotonic() < deadline:
                time.sleep(0.02)  # polling another process's progress
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=20)
            break
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        crashes += 1
        assert crashes <= max_attempts
    assert crashes == max_attempts
    with pqueue.Queue(path) as q:
        assert q.qsize() == 0
        dead = drain(q.dead_letters, timeout=0)
    assert [m.data["i"] for m in dead] == [5]
    assert dead[0].meta["reason"] == "max_attempts" and dead[0].meta["attempts"] == max_attempts + 1
    assert set(row[0] for row in pool_worker.read_ledger(ledger)) == set(range(30)) - {5}


def test_process_mode_restarts_a_killed_worker(tmp_path: Path) -> None:
    """mode="process": a SIGKILLed worker process is restarted, its leases reclaimed at once."""
    path, ledger = tmp_path / "q", str(tmp_path / "ledger")
    n = 100
    with pqueue.Queue(path, fsync="never") as q:
        q.put_many([pool_worker.task(i, ledger, sleep=0.01) for i in range(n)])
        pool = pqueue.ConsumerPool(q, pool_worker.ledger_handler, workers=2, mode="process", lease=20.0,
                                   backoff=FAST)
        with pool:
            wait_pool(pool, lambda: pool.stats().workers == 2 and pool.stats().processed > 10, timeout=20)
            victim = pool._processes.slots[0].proc
            os.kill(victim.pid, signal.SIGKILL)
            # With a 20 s lease, finishing well within it proves the leases were reclaimed at once.
            wait_pool(pool, lambda: drained(pool), timeout=15)
            assert pool.stats().restarts == 1
        assert q.qsize() == 0
    assert {row[0] for row in pool_worker.read_ledger(ledger)} == set(range(n))


# --------------------------------------------------------------------------- core needs


def test_consumer_extends_a_lease(pq: pqueue.Queue) -> None:
    """A long task keeps its lease (a heartbeat) instead of being redelivered; a lost one says so."""
    pq.put("long")
    c = pq.consumer("default")
    m = c.get(timeout=1)
    assert c.extend(m, seconds=60)
    assert m.lease_deadline > time.time() + 50
    assert pq.status(m.offset) == "in_flight"
    m.ack()
    assert not c.extend(m, seconds=60)


def test_pool_heartbeat_keeps_a_long_task_from_running_twice(tmp_path: Path) -> None:
    """A task running three times its lease is not delivered to a second consumer meanwhile."""
    runs: list[int] = []
    with pqueue.Queue(tmp_path / "q") as q, pqueue.Queue(tmp_path / "q") as other:
        q.put("slow")

        def handler(msg: pqueue.Message) -> None:
            runs.append(msg.offset)
            time.sleep(0.9)

        with pqueue.ConsumerPool(q, handler, workers=1, lease=0.3):
            time.sleep(0.2)
            with pytest.raises(pqueue.Empty):
                other.consumer().get(timeout=0.8)
        assert runs == [0]

