"""What the task worker needs besides the App: loading it, a per-call deadline, rate slots, log lines.

Kept apart from tasks.py so that module stays the user-facing API (App, Task, TaskHandle).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .tasks import App


class TaskTimeout(TimeoutError):
    """A task call ran longer than its `timeout` (counts as a failed attempt)."""


class RateLimit:
    """Start slots at most `rate` per second (burst 1), reserved in order; thread-safe.

    Args:
        rate: slots per second (positive).
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = 0.0  # monotonic time of the next free slot
        self._lock = threading.Lock()  # guards _next; held for the arithmetic only

    def reserve(self, now: float) -> float:
        """Reserve the next free slot; return seconds from `now` (monotonic) until it (0: now)."""
        with self._lock:
            slot = max(now, self._next)
            self._next = slot + 1.0 / self.rate
        return slot - now


def call_with_deadline(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], timeout: float | None,
                       name: str) -> Any:
    """Call ``fn(*args, **kwargs)``; with a timeout, in a helper thread that the caller stops waiting for.

    Python cannot kill a thread: at the deadline the caller gets `TaskTimeout` and the call runs
    on in its daemon thread until it returns; what it returns or raises then is ignored.

    Raises:
        TaskTimeout: the call did not finish within `timeout` seconds.
        Whatever `fn` raises.
    """
    if timeout is None:
        return fn(*args, **kwargs)
    outcome: list[tuple[bool, Any]] = []
    done = threading.Event()
    ctx = contextvars.copy_context()  # App.current() answers in the helper thread too

    def target() -> None:
        try:
            outcome.append((True, ctx.run(fn, *args, **kwargs)))
        except BaseException as exc:  # handed to the waiting thread, which raises it there
            outcome.append((False, exc))
        finally:
            done.set()

    threading.Thread(target=target, name=f"pqueue-task:{name}", daemon=True).start()
    if not done.wait(timeout):
        raise TaskTimeout(f"{name} ran longer than its timeout of {timeout:g} s (it keeps running in the "
                          f"background; its result will be ignored)")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def load_app(spec: str) -> App:
    """Import ``module:attribute`` (attribute defaults to ``app``) and return the App it names.

    Raises:
        LookupError: the module cannot be imported (any error while importing it) or has no
            such attribute.
        TypeError: the attribute is not a pqueue.App.
    """
    from .tasks import App

    module_name, _, attr = spec.partition(":")
    attr = attr or "app"
    if not module_name:
        raise LookupError(f"{spec!r} is not MODULE:APP (e.g. myapp:app)")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise LookupError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    try:
        app = functools.reduce(getattr, attr.split("."), module)
    except AttributeError:
        raise LookupError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(app, App):
        raise TypeError(f"{spec} is a {type(app).__name__}, not a pqueue.App")
    return app


class _PoolTaskLines(logging.Filter):
    """Drops the pool's own per-task warnings: the app's dispatcher logs each state change itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        # The pool words every per-task line "<pool>: task at offset N ..."; its lifecycle lines
        # and fatal errors pass.
        return record.levelno >= logging.ERROR or not str(record.msg).startswith("%r: task at offset")


_POOL_TASK_LINES = _PoolTaskLines()


@contextlib.contextmanager
def one_line_per_state_change() -> Iterator[None]:
    """While a task worker runs, keep the pool from repeating the dispatcher's per-task log lines."""
    pool_log = logging.getLogger("pqueue.pool")
    pool_log.addFilter(_POOL_TASK_LINES)
    try:
        yield
    finally:
        pool_log.removeFilter(_POOL_TASK_LINES)


__all__ = ["RateLimit", "TaskTimeout", "call_with_deadline", "load_app", "one_line_per_state_change"]
