"""Task functions, periodic schedules and the worker command (pqueue.tasks, pqueue.periodic)."""

from __future__ import annotations

import collections
import datetime
import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pqueue
from pqueue import cli, inspect
from pqueue.periodic import Cron, Every, Periodic, Scheduler, make_schedule, period_key
from pqueue.tasks import AttemptsExhausted, TaskTimeout

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FAST = pqueue.Backoff(initial=0.01, maximum=0.02, jitter=0.0)


@pytest.fixture
def app(qpath: Path) -> Iterator[pqueue.App]:
    """An app on a fresh queue with fast retries, closed after the test."""
    a = pqueue.App(qpath, fsync="never", backoff=FAST, results=True)
    yield a
    a.close()


def wait_for(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --------------------------------------------------------------------------- producing


def test_delay_writes_the_documented_message_and_runs_nothing(app: pqueue.App) -> None:
    """delay() puts {"task", "args", "kwargs"} with the task's priority and returns a pending handle."""
    @app.task(name="send_email", priority=1)
    def send_email(to: str, subject: str) -> str:
        raise AssertionError("must not run")

    h = send_email.delay("a@b.example", subject="hi")
    assert isinstance(h, pqueue.TaskHandle) and h.name == "send_email"
    assert h.status() == "pending"
    msg = app.queue.get(timeout=1)
    assert msg.offset == h.offset
    assert msg.data == {"task": "send_email", "args": ["a@b.example"], "kwargs": {"subject": "hi"}}
    assert msg.priority == 1
    msg.nack()


def test_unencodable_argument_is_named_and_nothing_is_written(app: pqueue.App) -> None:
    """An argument msgpack cannot encode raises SerializationError naming it; the log stays empty."""
    @app.task(name="t")
    def t(a: int, *rest: object, **extra: object) -> None: ...

    with pytest.raises(pqueue.SerializationError) as exc:
        t.delay(1, 2, {3})
    assert str(exc.value) == ("t.delay(): argument 'rest[1]' (set) cannot be encoded with msgpack: can not "
                              "serialize 'set' object; nothing was written")
    with pytest.raises(pqueue.SerializationError, match=r"argument \"extra\['when'\]\" \(datetime\)"):
        t.delay(1, when=datetime.datetime.now())
    with pytest.raises(TypeError, match=r"^t\(a: int, \*rest: object, \*\*extra: object\) -> None: missing a "
                                        r"required argument: 'a'$"):
        t.delay()  # type: ignore[call-arg]
    assert app.queue.qsize() == 0 and inspect.log_end(app.path) == 0


def test_schedule_delay_eta_and_key(app: pqueue.App) -> None:
    """schedule() delays by seconds, timedelta or eta, and a key makes a repeated call write nothing."""
    @app.task(name="t")
    def t(x: int) -> int:
        return x

    a = t.schedule(args=(1,), delay=60)
    b = t.schedule(args=(2,), delay=datetime.timedelta(minutes=1))
    c = t.schedule(kwargs={"x": 3}, eta=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1))
    with pytest.raises(pqueue.Empty):
        app.queue.get(timeout=0.05)  # none is due; status() says "delayed" once a consumer has looked
    assert [h.status() for h in (a, b, c)] == ["delayed"] * 3
    k1 = t.schedule(args=(4,), key="once")
    k2 = t.schedule(args=(5,), key="once")
    assert k1.offset == k2.offset
    with pytest.raises(TypeError, match="give delay or eta, not both"):
        t.schedule(args=(1,), delay=1, eta=datetime.datetime.now())


def test_call_local_round_trips_the_arguments(app: pqueue.App) -> None:
    """call_local runs in place with the arguments a worker would see (a tuple arrives as a list)."""
    seen: list[Any] = []

    @app.task(name="t")
    def t(x: Any) -> str:
        seen.append((x, app.current()))
        return "ok"

    assert t.call_local((1, 2)) == "ok"
    assert seen == [([1, 2], pqueue.tasks.TaskContext("t", None, 1))]
    assert t((1, 2)) == "ok" and seen[-1][0] == (1, 2)  # calling the task is calling the function
    with pytest.raises(pqueue.SerializationError, match="argument 'x' \\(object\\)"):
        t.call_local(object())


def test_registration_errors(app: pqueue.App) -> None:
    """Bad options, duplicate names, coroutines and periodic tasks with arguments are refused."""
    @app.task(name="dup")
    def one() -> None: ...

    with pytest.raises(ValueError, match="a task named 'dup' is registered already"):
        app.task(name="dup")(lambda: None)

    async def coro() -> None: ...

    with pytest.raises(TypeError, match="is a coroutine function"):
        app.task(coro)
    with pytest.raises(TypeError, match="periodic task p must take no arguments, it needs 'x'"):
        app.periodic(every=datetime.timedelta(seconds=5), name="p")(lambda x: None)
    assert "p" not in app.tasks
    with pytest.raises(ValueError, match="'catch_up' must be one of"):
        app.periodic(every=datetime.timedelta(seconds=5), catch_up="never")
    with pytest.raises(ValueError, match="'every' must be a whole number of seconds, at least 1"):
        app.periodic(every=datetime.timedelta(milliseconds=500))
    with pytest.raises(TypeError, match="exactly one of cron"):
        app.periodic()
    with pytest.raises(TypeError, match="unknown queue option\\(s\\) fsynk"):
        pqueue.App(app.path, fsynk="always")
    with pytest.raises(ValueError, match="cannot use serializer='raw'"):
        pqueue.App(app.path, serializer="raw")
    app.queue  # noqa: B018  (opens it)
    with pytest.raises(RuntimeError, match="is open already"):
        app.configure(fsync="always")


# --------------------------------------------------------------------------- the dispatcher


def test_pool_runs_tasks_with_retries_results_and_dead_letters(app: pqueue.App) -> None:
    """Results come back; a transient failure is retried; poison, unknown and malformed calls die clearly."""
    calls: collections.Counter[str] = collections.Counter()

    @app.task(name="add")
    def add(a: int, b: int = 1) -> int:
        return a + b

    @app.task(name="flaky", max_attempts=3)
    def flaky() -> int:
        calls["flaky"] += 1
        ctx = app.current()
        assert ctx is not None
        if ctx.attempt < 2:
            raise ConnectionError("transient")
        return ctx.attempt

    @app.task(name="poison", max_attempts=2)
    def poison() -> None:
        calls["poison"] += 1
        raise ValueError("bad input")

    added, retried, poisoned = add.delay(2, b=3), flaky.delay(), poison.delay()
    unknown = app.send("no_such_task", (1,))
    misfit = app.send("add", (), {"c": 1})
    malformed = app.queue.put({"not": "a task"})
    with app.pool(workers=2):
        assert added.result(timeout=10) == 5
        assert retried.result(timeout=10) == 2
        with pytest.raises(pqueue.TaskFailed) as died:
            poisoned.result(timeout=10)
        assert (died.value.reason, died.value.error_type) == ("rejected", "AttemptsExhausted")
        assert died.value.error == "poison failed its last attempt (2 of 2): ValueError('bad input')"
        with pytest.raises(pqueue.TaskFailed) as lost:
            unknown.result(timeout=10)
        assert lost.value.error_type == "UnknownTaskError"
        assert lost.value.error == ("unknown task 'no_such_task': this worker registers no task of that name (it "
                                    "has: add, flaky, poison); deploy the code that defines it, then `pqueue dlq "
                                    "PATH replay`")
        with pytest.raises(pqueue.TaskFailed, match="MalformedTaskError: the arguments of add do not fit"):
            misfit.result(timeout=10)
        with pytest.raises(pqueue.TaskFailed, match="MalformedTaskError: not a task call"):
            app.queue.result(malformed, timeout=10)
    assert calls == {"flaky": 2, "poison": 2}
    dead = [m.meta["error_type"] for m in inspect.unacked(os.path.join(app.path, "dlq"))]
    assert sorted(dead) == ["AttemptsExhausted", "MalformedTaskError", "MalformedTaskError", "UnknownTaskError"]
    assert inspect.verify(app.path).ok


def test_delivery_past_max_attempts_is_dead_lettered_without_running(app: pqueue.App) -> None:
    """A delivery numbered above the task's max_attempts (earlier ones never finished) is not run."""
    ran: list[int] = []

    @app.task(name="crasher", max_attempts=2)
    def crasher() -> None:
        ran.append(1)

    crasher.delay()
    consumer = app.queue.consumer()
    for _ in range(2):  # two deliveries that "never finished"
        consumer.get(timeout=1).nack()
    msg = consumer.get(timeout=1)
    assert msg.attempt == 3
    with pytest.raises(AttemptsExhausted, match="delivery 3 of at most 2 attempts: earlier deliveries never "
                                                "finished"):
        app.dispatch(msg)
    assert ran == []
    msg.nack()


def test_task_timeout_counts_as_a_failed_attempt(app: pqueue.App) -> None:
    """A call over its timeout fails its attempt at the deadline (and dies after the last one)."""
    release = threading.Event()

    @app.task(name="slow", timeout=0.1, max_attempts=1)
    def slow() -> None:
        release.wait(5)

    h = slow.delay()
    msg = app.queue.get(timeout=1)
    t0 = time.monotonic()
    with pytest.raises(AttemptsExhausted) as exc:
        app.dispatch(msg)
    assert time.monotonic() - t0 < 1.0
    assert isinstance(exc.value.__cause__, TaskTimeout)
    assert str(exc.value.__cause__) == ("slow ran longer than its timeout of 0.1 s (it keeps running in the "
                                        "background; its result will be ignored)")
    release.set()
    msg.nack()
    assert h.status() == "waiting"


def test_rate_limit_waits_inline_or_defers_without_charging_an_attempt(app: pqueue.App) -> None:
    """Within a second the call waits for its slot; beyond, it is handed back and keeps its attempt count."""
    attempts: list[int] = []

    @app.task(name="limited", rate_limit=0.8)
    def limited() -> None:
        ctx = app.current()
        assert ctx is not None
        attempts.append(ctx.attempt)

    limited.delay()
    limited.delay()
    consumer = app.queue.consumer()
    first, second = consumer.get(timeout=1), consumer.get(timeout=1)
    app.dispatch(first)
    first.ack()
    with pytest.raises(pqueue.Retry) as deferred:
        app.dispatch(second)  # the next slot is 1.25 s away: more than the 1 s a worker waits inline
    assert deferred.value.delay == pytest.approx(1.25, abs=0.1)
    second.nack(delay=deferred.value.delay)
    again = consumer.get(timeout=5)
    assert again.attempt == 2
    app.dispatch(again)  # its reserved slot has come: runs at once, as its own attempt 1
    again.ack()
    assert attempts == [1, 1]


# --------------------------------------------------------------------------- periodic


class Clock:
    """An injectable wall clock."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def periodic_keys(path: str, name: str) -> collections.Counter[str]:
    """How many records carry each periodic key of task `name`."""
    keys: collections.Counter[str] = collections.Counter()
    for e in inspect.records(path):
        if isinstance(e, inspect.Entry):
            key = e.named_attrs().get("key", "")
            if key.startswith(f"periodic:{name}:"):
                keys[key] += 1
    return keys


def make_scheduler(path: Path, catch_up: str, clock: Clock, every: float = 10) -> tuple[pqueue.App, Scheduler]:
    a = pqueue.App(path, fsync="never")
    period = datetime.timedelta(seconds=every)

    @a.periodic(every=period, catch_up=catch_up, name="job")
    def job() -> None: ...

    return a, Scheduler(a.queue, [Periodic("job", Every(period), catch_up)], a._enqueue_period, clock=clock)


T0 = 1_700_000_000.0  # a multiple of 10 s


@pytest.mark.parametrize(("catch_up", "expected"), [
    ("once", [T0 + 60]),
    ("all", [T0 + 20, T0 + 30, T0 + 40, T0 + 50, T0 + 60]),
    ("skip", [T0 + 60]),
])
def test_catch_up_policies(qpath: Path, catch_up: str, expected: list[float]) -> None:
    """After missing periods 20..60: "once" enqueues 60, "all" each, "skip" only 60 (5 s old: on time)."""
    clock = Clock(T0 + 3)
    a, sched = make_scheduler(qpath, catch_up, clock)
    assert sched.tick() == []  # first sight: the baseline, nothing for the past
    clock.now = T0 + 10.001
    assert len(sched.tick()) == 1
    assert sched.tick() == []  # the same period again: nothing
    clock.now = T0 + 65  # the clock jumped (or nothing ran) past five starts
    sched.tick()
    keys = periodic_keys(a.path, "job")
    assert sorted(keys) == sorted(period_key("job", t) for t in [T0 + 10, *expected])
    assert set(keys.values()) == {1}
    a.close()


def test_skip_drops_a_late_period(qpath: Path) -> None:
    """catch_up="skip" enqueues an hourly period on time, but not one that started 2 minutes ago."""
    clock = Clock(T0 + 1)
    a, sched = make_scheduler(qpath, "skip", clock, every=3600)
    sched.tick()
    start = (T0 // 3600 + 1) * 3600
    clock.now = start + 0.2
    assert len(sched.tick()) == 1
    clock.now = start + 3 * 3600 + 120
    assert sched.tick() == []
    clock.now = start + 4 * 3600 + 1
    assert len(sched.tick()) == 1
    assert len(periodic_keys(a.path, "job")) == 2
    a.close()


def test_clock_jumping_back_never_enqueues_a_period_twice(qpath: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A backward jump enqueues nothing until the clock passes the last period again; no key twice."""
    clock = Clock(T0 + 1)
    a, sched = make_scheduler(qpath, "all", clock)
    sched.tick()
    for t in (T0 + 10.5, T0 + 20.5, T0 + 30.5):
        clock.now = t
        sched.tick()
    clock.now = T0 + 5  # back by 25 s
    assert sched.tick() == []
    assert "the wall clock" in caplog.text and "is behind the last enqueued period" in caplog.text
    clock.now = T0 + 25
    assert sched.tick() == []
    clock.now = T0 + 40.5
    assert len(sched.tick()) == 1
    keys = periodic_keys(a.path, "job")
    assert len(keys) == 4 and set(keys.values()) == {1}
    a.close()


def test_restarts_and_several_schedulers_enqueue_each_period_once(qpath: Path) -> None:
    """Two schedulers on one queue, a crash between put and bookkeeping, and a restart: one record per period."""
    clock = Clock(T0 + 1)
    a, first = make_scheduler(qpath, "all", clock)
    b, second = make_scheduler(qpath, "all", clock)
    first.tick()
    second.tick()
    clock.now = T0 + 10.5
    assert first.tick() == [0] and second.tick() == []
    clock.now = T0 + 20.5
    # A crash after the put, before the bookkeeping: the next tick puts the same key again.
    crashed = a._enqueue_period(first.periodics[0], T0 + 20, period_key("job", T0 + 20))
    assert second.tick() == [crashed]
    a.close()
    b.close()
    c, restarted = make_scheduler(qpath, "all", clock)
    assert restarted.tick() == []
    clock.now = T0 + 50.5  # down for 30 s
    assert len(restarted.tick()) == 3
    keys = periodic_keys(c.path, "job")
    assert sorted(keys) == [period_key("job", T0 + t) for t in (10, 20, 30, 40, 50)]
    assert set(keys.values()) == {1}
    c.close()


def test_cron_schedule() -> None:
    """Cron periods come from croniter, in UTC unless a tz is given."""
    pytest.importorskip("croniter")
    cron = Cron("*/5 * * * *")
    at = datetime.datetime(2024, 1, 1, 10, 5, tzinfo=datetime.timezone.utc).timestamp()
    assert cron.latest(at) == at
    assert cron.latest(at - 1) == at - 300
    assert cron.after(at) == at + 300 and cron.before(at) == at - 300
    with pytest.raises(ValueError, match="'61 \\* \\* \\* \\*' is not a valid cron expression"):
        Cron("61 * * * *")


def test_cron_without_croniter_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without croniter, cron= fails at decoration with the pip command of the extra."""
    real = importlib.import_module

    def no_croniter(name: str, package: str | None = None) -> Any:
        if name == "croniter":
            raise ImportError("No module named 'croniter'")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", no_croniter)
    with pytest.raises(ImportError, match=r"needs the croniter package: pip install 'pqueue-log\[cron\]'"):
        make_schedule(cron="*/5 * * * *", every=None)


# --------------------------------------------------------------------------- the worker command


def test_worker_startup_errors_exit_2_with_one_line(capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An import error, a missing attribute, a non-App and a bad option each give one line and exit 2."""
    monkeypatch.syspath_prepend(str(HERE))
    cases = {
        "no_such_module_xyz:app": "pqueue worker: error: cannot import 'no_such_module_xyz': "
                                  "ModuleNotFoundError: No module named 'no_such_module_xyz'\n",
        "tasks_app:nope": "pqueue worker: error: module 'tasks_app' has no attribute 'nope'\n",
        "tasks_app:record": "pqueue worker: error: tasks_app:record is a Task, not a pqueue.App\n",
    }
    for spec, line in cases.items():
        assert cli.main(["worker", spec]) == 2
        assert capsys.readouterr().err == line
    assert cli.main(["worker", "tasks_app:app", "--queue-option", "fsynk=always"]) == 2
    assert capsys.readouterr().err.startswith("pqueue worker: error: unknown queue option(s) fsynk;")


def test_mypy_strict_on_an_example_app() -> None:
    """The task signature flows through delay/result: mypy --strict accepts the app and refuses misuse."""
    pytest.importorskip("mypy")
    done = subprocess.run([sys.executable, "-m", "mypy", "--strict", "tests/typing_tasks.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as err:
        return subprocess.Popen([sys.executable, "-m", "pqueue", "worker", "tasks_app:app", "--workers", "4"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)


def read_ledger(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line]


def test_worker_processes_survive_sigkill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers, both SIGKILLed midway and restarted: every call runs, poison and unknown die, each period once."""
    qpath, ledger, log = tmp_path / "q", tmp_path / "ledger", tmp_path / "worker.log"
    monkeypatch.setenv("PQ_TASKS_QUEUE", str(qpath))
    monkeypatch.setenv("PQ_TASKS_LEDGER", str(ledger))
    monkeypatch.syspath_prepend(str(HERE))
    sys.modules.pop("tasks_app", None)
    tasks_app = importlib.import_module("tasks_app")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
    n = 300
    records = [tasks_app.record.delay(i, pause=0.005) for i in range(n)]
    flakies = [tasks_app.flaky.delay(i) for i in range(3)]
    poisoned = tasks_app.poison.delay("always")
    unknown = tasks_app.app.send("no_such_task")

    workers = [start_worker(env, log) for _ in range(2)]
    wait_for(lambda: sum(row[0] == "record" for row in read_ledger(ledger)) >= n // 4, what="a quarter of the calls")
    for w in workers:
        w.send_signal(signal.SIGKILL)
        w.wait()
    time.sleep(1.5)  # at least one period passes while nothing runs
    workers = [start_worker(env, log) for _ in range(2)]

    def finished() -> bool:
        done = {int(row[1]) for row in read_ledger(ledger) if row[0] == "record"}
        return (len(done) == n and all(h.status() == "done" for h in flakies)
                and poisoned.status() == "dead" and unknown.status() == "dead")
    wait_for(finished, timeout=40, what="every call")
    time.sleep(1.2)  # one more period with both schedulers up
    for w in workers:
        w.send_signal(signal.SIGTERM)
    assert [w.wait(timeout=30) for w in workers] == [0, 0]  # a graceful stop exits 0

    rows = read_ledger(ledger)
    assert {int(r[1]) for r in rows if r[0] == "record"} == set(range(n))
    assert all(h.status() == "done" for h in records)
    assert {int(r[1]) for r in rows if r[0] == "flaky" and r[2] == "3"} == {0, 1, 2}
    dead = {e.decode()["task"]: e.meta for e in inspect.unacked(qpath / "dlq")}
    assert set(dead) == {"poison", "no_such_task"}
    assert dead["poison"]["error_type"] == "AttemptsExhausted"
    assert dead["no_such_task"]["error_type"] == "UnknownTaskError"
    assert "unknown task 'no_such_task'" in dead["no_such_task"]["error"]

    # Each period is one record; with catch_up="all" the periods run on through the outage.
    keys = periodic_keys(str(qpath), "tick")
    assert len(keys) >= 3 and set(keys.values()) == {1}
    starts = sorted(datetime.datetime.strptime(k.split(":", 2)[2], "%Y-%m-%dT%H:%M:%SZ") for k in keys)
    assert all((b - a) == datetime.timedelta(seconds=1) for a, b in zip(starts, starts[1:], strict=False))
    ran = {int(r[1]) for r in rows if r[0] == "tick"}
    tick_offsets = {e.offset for e in inspect.records(qpath) if isinstance(e, inspect.Entry)
                    and e.named_attrs().get("key", "").startswith("periodic:tick:")}
    assert ran <= tick_offsets
    assert {off for off in tick_offsets if tasks_app.app.queue.status(off) == "done"} <= ran

    text = log.read_text()
    assert "task flaky[" in text and "failed (attempt 1 of 4)" in text and "succeeded in" in text
    assert "task at offset" not in text  # the pool's own per-task lines are folded into the app's
    tasks_app.app.close()
    assert inspect.verify(qpath).ok
