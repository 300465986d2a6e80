"""An example task app that `mypy --strict` must accept (tests/test_tasks.py::test_mypy_strict_on_an_example_app).

The `# type: ignore[...]` lines are calls a type checker must refuse: with
``warn_unused_ignores`` (part of --strict) an ignore that is not needed is itself an error,
so this file also proves the signature flows through `delay`.
"""

from __future__ import annotations

import datetime

import pqueue
from pqueue.tasks import Task

app = pqueue.App("var/typing-tasks", fsync="always", results=True)


@app.task(max_attempts=5, priority=1, timeout=30)
def send_email(to: str, subject: str, *, cc: list[str] | None = None) -> str:
    return f"sent {subject} to {to}"


@app.task
def add(a: int, b: int) -> int:
    return a + b


@app.periodic(every=datetime.timedelta(minutes=5), catch_up="skip")
def sweep() -> None:
    pass


def produce() -> None:
    h: pqueue.TaskHandle[str] = send_email.delay("a@b.example", subject="hi")
    offset: int = h.offset
    text: str = h.result(timeout=10)
    total: int = add.delay(1, 2).result()
    local: int = add.call_local(1, 2)
    direct: int = add(3, 4)
    later = send_email.schedule(args=("a@b.example", "hi"), delay=60)
    at = send_email.schedule(args=("a@b.example", "hi"), eta=datetime.datetime.now(datetime.timezone.utc))
    sweeper: Task[[], None] = sweep
    sweeper.delay()
    print(offset, text, total, local, direct, later.offset, at.status())
    add.delay("1", 2)  # type: ignore[arg-type]
    add.delay(1)  # type: ignore[call-arg]
    send_email.delay("a@b.example", subject="hi", bcc=[])  # type: ignore[call-arg]
    bad: str = add.delay(1, 2).result()  # type: ignore[assignment]
    print(bad)
