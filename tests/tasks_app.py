"""The example task app that tests/test_tasks.py runs in worker subprocesses (``pqueue worker tasks_app:app``).

The queue directory and the ledger come from the environment (PQ_TASKS_QUEUE, PQ_TASKS_LEDGER),
so the test process and its workers build the same app. Every task names itself, so the names
match whether this module is imported as ``tasks_app`` or ``tests.tasks_app``.
"""

from __future__ import annotations

import datetime
import os
import time

import pqueue

app = pqueue.App(os.environ.get("PQ_TASKS_QUEUE", "var/tasks"), fsync="always",
                 backoff=pqueue.Backoff(initial=0.05, maximum=0.2, jitter=0.0))


def note(*fields: object) -> None:
    """Append one line to the ledger, fsynced: a SIGKILL right after loses no line of a finished call."""
    line = " ".join(map(str, fields)) + "\n"
    fd = os.open(os.environ["PQ_TASKS_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


@app.task(name="record", max_attempts=3)
def record(n: int, *, pause: float = 0.0) -> int:
    """Note that call `n` ran."""
    time.sleep(pause)
    note("record", n)
    return n


@app.task(name="flaky", max_attempts=4)
def flaky(n: int) -> int:
    """Fail the first two attempts (a transient error), then succeed."""
    ctx = app.current()
    assert ctx is not None
    note("flaky", n, ctx.attempt)
    if ctx.attempt < 3:
        raise ConnectionError(f"flaky {n}: attempt {ctx.attempt} fails")
    return n


@app.task(name="poison", max_attempts=2)
def poison(reason: str) -> None:
    """Always fail: ends in the dead-letter queue."""
    note("poison", reason)
    raise ValueError(reason)


@app.periodic(every=datetime.timedelta(seconds=1), catch_up="all", name="tick")
def tick() -> None:
    """Note which record (offset) of its period ran."""
    ctx = app.current()
    assert ctx is not None
    note("tick", ctx.offset)
