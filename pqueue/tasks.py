"""Task functions on top of a queue and a consumer pool: `App`, `@app.task`, `@app.periodic`.

A task call is a record ``{"task": name, "args": [...], "kwargs": {...}}`` in the app's queue,
encoded with the queue's serializer (msgpack by default; never pickle unless the queue was
asked for it), so the queue directory never holds code. The worker (``pqueue worker
module:app`` or `App.run`) runs a `ConsumerPool` whose handler looks the name up among the
registered tasks and calls the function.

Per-task options, and how they map onto the queue and the pool (the pool has one value per
pool, so the per-task policy lives in the app's dispatching handler):

* ``priority``, ``ttl``: given to `Queue.put` for every call.
* ``max_attempts``: the dispatcher counts the task's own attempts (deliveries, less the
  rate-limit deferrals it made itself) and dead-letters the task after its last failed
  attempt by raising `AttemptsExhausted` (a `Reject`), or, for a delivery past the limit
  whose earlier deliveries never finished (the process died), without running it. The
  pool's own `max_attempts` is the app's `max_deliveries`, a backstop for every cause.
* ``backoff``: the delay before the next attempt (``pqueue.Retry(delay=...)`` from the
  function still wins).
* ``timeout``: the call runs in a helper thread; at the deadline it counts as a failed
  attempt (`TaskTimeout`) and the worker moves on. Python cannot kill a thread: the late call
  keeps running in the background until it returns, and its result is ignored. The pool's
  lease is sized above the longest timeout, so no other consumer takes the task meanwhile.
* ``rate_limit``: at most that many calls of the task start per second, in this process. A
  call whose slot comes within RATE_WAIT_INLINE_SECONDS waits for it in its worker; a later
  slot is reserved and the message handed back until then (``Retry(delay=...)``). Such a
  deferral does not count against the task's ``max_attempts`` while the process lives; after
  a crash the deferrals of that life count as attempts (the count is kept in memory).

Unknown task names and malformed messages are dead-lettered at once (`UnknownTaskError`,
`MalformedTaskError`), never retried: the fix is deploying the code, then
``pqueue dlq PATH replay``.
"""

from __future__ import annotations

import collections
import contextvars
import datetime
import functools
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, TypeVar, final, overload

from .backoff import Backoff, Reject, Retry, _check_number
from .errors import SerializationError
from .message import Message
from .periodic import CATCH_UP_POLICIES, Periodic, Scheduler, make_schedule
from .pool import ConsumerPool
from .queue import DEFAULT_GROUP, Queue
from .serializers import Codec, resolve
from .task_runtime import RateLimit, TaskTimeout, call_with_deadline, one_line_per_state_change

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

MAX_ATTEMPTS = 5  # a task's attempts unless it says otherwise
MAX_DELIVERIES = 1000  # the pool's backstop: deliveries of one message for any reason
LEASE_SECONDS = 30.0  # the pool's lease when no task timeout needs a longer one
LEASE_MARGIN_SECONDS = 10.0  # lease = longest task timeout + inline rate wait + this
RATE_WAIT_INLINE_SECONDS = 1.0  # a rate-limited call waits in its worker this long at most
DEFERRAL_MEMORY = 65536  # rate-limit deferrals remembered (offsets), oldest forgotten first
STOP_TIMEOUT_SECONDS = 30.0  # run(): in-flight tasks get this long after SIGTERM/SIGINT

_current: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar("pqueue_task", default=None)


class UnknownTaskError(Reject):
    """A message names a task this app does not register (dead-lettered, never retried)."""


class MalformedTaskError(Reject):
    """A message is not a task call, or its arguments do not fit the function (dead-lettered)."""


class AttemptsExhausted(Reject):
    """A task used up its own `max_attempts` (dead-lettered; the last error is the cause)."""


@dataclass(frozen=True)
class TaskContext:
    """What a running task may know about its call (see `App.current`).

    Attributes:
        name: the registered task name.
        offset: the message's offset (unique and stable: key side effects on it); None in
            `call_local`.
        attempt: the task's own attempt number, from 1.
    """

    name: str
    offset: int | None
    attempt: int


@final
class TaskHandle(Generic[R]):
    """A task call that was enqueued: its offset, its state and (with results) its return value."""

    __slots__ = ("app", "name", "offset")

    def __init__(self, app: App, name: str, offset: int) -> None:
        self.app = app
        self.name = name
        self.offset = offset

    def status(self) -> str:
        """The call's state in the app's group: "pending", "in_flight", "waiting", "delayed", "done", "dead"."""
        return self.app.queue.status(self.offset, group=self.app.group)

    def result(self, timeout: float | None = None) -> R:
        """Wait for the call's return value (the worker's app needs ``results=True``).

        Args:
            timeout: seconds to wait; None waits as long as it takes.
        Returns:
            What the task function returned (as the serializer round-trips it).
        Raises:
            pqueue.TaskFailed: the call was dead-lettered (its reason and last error inside).
            pqueue.Empty: no result within `timeout`.
            pqueue.QueueError: done, but no result was stored (the worker ran without results).
        """
        value: R = self.app.queue.result(self.offset, group=self.app.group, timeout=timeout)
        return value

    def __repr__(self) -> str:
        return f"<TaskHandle {self.name} offset={self.offset}>"


@final
class Task(Generic[P, R]):
    """A function registered with an `App`: call it, enqueue it (`delay`, `schedule`), test it.

    Calling the task object calls the function in place, unchanged. Made by `App.task` and
    `App.periodic`, not directly.
    """

    def __init__(self, app: App, fn: Callable[P, R], *, name: str, max_attempts: int, priority: int | None,
                 timeout: float | None, rate_limit: float | None, backoff: Backoff | None,
                 ttl: float | None) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self.max_attempts = max_attempts
        self.priority = priority
        self.timeout = timeout
        self.rate_limit = rate_limit
        self.backoff = backoff
        self.ttl = ttl
        try:
            # Evaluated annotations read better in error messages (`a: int`, not `a: 'int'`).
            self.signature = inspect.signature(fn, eval_str=True)
        except Exception:  # a forward reference that does not resolve here: keep the strings
            self.signature = inspect.signature(fn)
        self._limiter = RateLimit(rate_limit) if rate_limit is not None else None
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """Enqueue a call with these arguments; nothing runs yet.

        Returns:
            The call's handle (its offset in the queue).
        Raises:
            TypeError: the arguments do not fit the function's signature (nothing written).
            SerializationError: an argument cannot be encoded; the message names it (nothing
                written).
        """
        return self._enqueue(args, kwargs)

    def schedule(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
                 delay: float | datetime.timedelta | None = None, eta: datetime.datetime | None = None,
                 priority: int | None = None, key: str | None = None) -> TaskHandle[R]:
        """Enqueue a call to run no earlier than `delay` from now or at `eta`.

        Args:
            args, kwargs: the call's arguments.
            delay: seconds (or a timedelta) from now.
            eta: a datetime; a naive one is local time (as `datetime.timestamp` reads it).
            priority: overrides the task's priority for this call.
            key: an idempotency key: a second call with it within the queue's dedup window
                writes nothing and returns the first call's handle.
        Raises:
            TypeError, ValueError: bad arguments or options (nothing written).
            SerializationError: an argument cannot be encoded (nothing written).
        """
        if delay is not None and eta is not None:
            raise TypeError("give delay or eta, not both")
        seconds = delay.total_seconds() if isinstance(delay, datetime.timedelta) else delay
        if eta is not None and not isinstance(eta, datetime.datetime):
            raise TypeError(f"'eta' must be a datetime, not {type(eta).__name__}")
        return self._enqueue(tuple(args), dict(kwargs or {}), delay=seconds,
                             not_before=None if eta is None else eta.timestamp(), priority=priority, key=key)

    def call_local(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the call here and now, as the worker would: arguments round-trip the serializer.

        For tests: the function sees what a worker would pass it (tuples come back as lists
        with msgpack). No queue is opened; retries, timeout and rate limit do not apply.

        Raises:
            TypeError: the arguments do not fit the signature.
            SerializationError: an argument cannot be encoded.
            Whatever the function raises.
        """
        self._bind(args, kwargs)
        codec = self.app.codec
        try:
            sent = codec.loads(codec.dumps({"args": list(args), "kwargs": kwargs}))
        except Exception as exc:
            raise self.app._culprit(self.name, "call_local", args, kwargs, exc) from exc
        token = _current.set(TaskContext(self.name, None, 1))
        try:
            result: R = self.fn(*sent["args"], **sent["kwargs"])
        finally:
            _current.reset(token)
        return result

    def _bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}{self.signature}: {exc}") from None

    def _enqueue(self, args: Sequence[Any], kwargs: Mapping[str, Any], *, delay: float | None = None,
                 not_before: float | None = None, priority: int | None = None,
                 key: str | None = None) -> TaskHandle[R]:
        self._bind(args, kwargs)
        offset = self.app._put(self.name, "delay", args, kwargs, priority=self.priority if priority is None
                               else priority, ttl=self.ttl, delay=delay, not_before=not_before, key=key)
        return TaskHandle(self.app, self.name, offset)

    def __repr__(self) -> str:
        return f"<Task {self.name}>"


@final
class App:
    """Task functions over one queue directory: register with `task`/`periodic`, run with `run`.

    Contract: a returned `delay()` is a durable record per the queue's fsync mode (DESIGN §1);
    the worker runs each call at least once (make tasks idempotent: `App.current().offset` is
    stable); a periodic period is enqueued exactly once within the queue's dedup window.

    The queue opens on first use (`queue`, `delay`, `run`), so importing a module that builds
    an App touches no disk.

    Args:
        path: the queue directory (created if missing).
        group: the consumer group the worker consumes.
        max_attempts: the default of `task(max_attempts=...)`.
        backoff: the default retry schedule of tasks (default: `Backoff()`).
        max_deliveries: the pool's backstop on deliveries of one message (see the module doc).
        results: store each call's return value for `TaskHandle.result` (the pool's
            ``results=True``).
        queue_options: keyword options of `pqueue.Queue` (fsync, serializer, ...).
    Raises:
        TypeError, ValueError: an unknown queue option, a bad value, or the "raw" serializer
            (a task call is a map).
    """

    def __init__(self, path: str | os.PathLike[str], *, group: str = DEFAULT_GROUP, max_attempts: int = MAX_ATTEMPTS,
                 backoff: Backoff | None = None, max_deliveries: int = MAX_DELIVERIES, results: bool = False,
                 **queue_options: Any) -> None:
        if not isinstance(group, str) or not group:
            raise ValueError("'group' must be a non-empty string")
        self.path = os.fspath(path)
        self.group = group
        self.max_attempts = _check_attempts("max_attempts", max_attempts)
        self.backoff = backoff if backoff is not None else Backoff()
        if not isinstance(self.backoff, Backoff):
            raise TypeError(f"'backoff' must be a pqueue.Backoff, not {type(backoff).__name__}")
        self.max_deliveries = _check_attempts("max_deliveries", max_deliveries)
        self.results = bool(results)
        self._queue_options: dict[str, Any] = {}
        self.codec: Codec = resolve("msgpack")
        self.configure(**queue_options)
        self._queue: Queue | None = None
        self._lock = threading.Lock()  # guards _queue (the lazy open) and the registries
        self._tasks: dict[str, Task[Any, Any]] = {}
        self._periodics: list[Periodic] = []
        # offset -> [deferrals, reserved slot (monotonic)] of rate-limited calls handed back.
        self._deferred: collections.OrderedDict[int, list[float]] = collections.OrderedDict()
        self._deferred_lock = threading.Lock()  # guards _deferred; held for dict operations only

    def configure(self, **queue_options: Any) -> None:
        """Set or override `pqueue.Queue` options before the queue opens (the worker's --queue-option).

        Raises:
            TypeError: an unknown option.
            ValueError: a bad serializer.
            RuntimeError: the queue is open already.
        """
        if getattr(self, "_queue", None) is not None:
            raise RuntimeError(f"the queue of {self!r} is open already; configure it before first use")
        known = set(inspect.signature(Queue).parameters) - {"path"}
        unknown = sorted(set(queue_options) - known)
        if unknown:
            raise TypeError(f"unknown queue option(s) {', '.join(unknown)}; pqueue.Queue takes "
                            f"{', '.join(sorted(known))}")
        options = {**self._queue_options, **queue_options}
        serializer = options.get("serializer", "msgpack")
        if serializer == "raw":
            raise ValueError("a task app cannot use serializer='raw': a task call is a map of name and arguments")
        self.codec = resolve(serializer)
        self._queue_options = options

    @property
    def queue(self) -> Queue:
        """The app's queue, opened on first use."""
        q = self._queue
        if q is None:
            with self._lock:
                if self._queue is None:
                    self._queue = Queue(self.path, **self._queue_options)
                q = self._queue
        return q

    @property
    def tasks(self) -> Mapping[str, Task[Any, Any]]:
        """The registered tasks by name."""
        return dict(self._tasks)

    @staticmethod
    def current() -> TaskContext | None:
        """The call being run in this thread (name, offset, attempt), or None outside a task."""
        return _current.get()

    # ------------------------------------------------------------------ registration

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(self, fn: None = None, /, *, name: str | None = None, max_attempts: int | None = None,
             priority: int | None = None, timeout: float | None = None, rate_limit: float | None = None,
             backoff: Backoff | None = None, ttl: float | None = None) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(self, fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
             max_attempts: int | None = None, priority: int | None = None, timeout: float | None = None,
             rate_limit: float | None = None, backoff: Backoff | None = None, ttl: float | None = None) -> Any:
        """Register a function as a task (``@app.task`` or ``@app.task(...)``).

        Args:
            name: the registered name (default ``module.qualname``, with a script's file name
                for ``__main__``, so `python myapp.py` and `pqueue worker myapp:app` agree).
            max_attempts: attempts before the call is dead-lettered (default: the app's).
            priority: the queue priority of its calls (0 lowest, the default).
            timeout: seconds a call may run before it counts as failed (see the module doc).
            rate_limit: calls started per second at most, per worker process.
            backoff: the retry schedule (default: the app's).
            ttl: seconds after which a call not yet started expires (dead-lettered).
        Returns:
            The `Task` (or a decorator that makes it).
        Raises:
            TypeError, ValueError: a bad option, a coroutine function, or a name taken.
        """
        def register(f: Callable[..., Any]) -> Task[..., Any]:
            return self._register(f, name=name, max_attempts=max_attempts, priority=priority, timeout=timeout,
                                  rate_limit=rate_limit, backoff=backoff, ttl=ttl)
        return register if fn is None else register(fn)

    def periodic(self, *, cron: str | None = None, every: datetime.timedelta | None = None,
                 tz: datetime.tzinfo | None = None, catch_up: str = "once", name: str | None = None,
                 max_attempts: int | None = None, priority: int | None = None, timeout: float | None = None,
                 backoff: Backoff | None = None,
                 ttl: float | None = None) -> Callable[[Callable[[], R]], Task[[], R]]:
        """Register a function without arguments as a task that the worker enqueues on a schedule.

        Args:
            cron: a cron expression (needs ``pip install 'pqueue-log[cron]'``), read in `tz`.
            every: a period (a whole number of seconds, at least 1), counted from the Unix epoch.
            tz: the time zone of `cron` (default UTC).
            catch_up: missed periods: "once" (one run for them), "all" (one run each, at most
                MAX_CATCH_UP) or "skip" (none); see pqueue.periodic.
            name, max_attempts, priority, timeout, backoff, ttl: as for `task`.
        Returns:
            A decorator that registers the function and returns its `Task`.
        Raises:
            TypeError, ValueError: a bad schedule or option.
            ImportError: `cron` without croniter.
        """
        schedule = make_schedule(cron=cron, every=every, tz=tz)
        if catch_up not in CATCH_UP_POLICIES:
            raise ValueError(f"'catch_up' must be one of {', '.join(map(repr, CATCH_UP_POLICIES))}, not {catch_up!r}")

        def register(f: Callable[[], R]) -> Task[[], R]:
            task = self._register(f, name=name, max_attempts=max_attempts, priority=priority, timeout=timeout,
                                  rate_limit=None, backoff=backoff, ttl=ttl)
            params = [p for p in task.signature.parameters.values()
                      if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            if params:
                del self._tasks[task.name]
                raise TypeError(f"periodic task {task.name} must take no arguments, it needs {params[0].name!r}")
            self._periodics.append(Periodic(task.name, schedule, catch_up))
            return task
        return register

    def _register(self, fn: Callable[P, R], *, name: str | None, max_attempts: int | None, priority: int | None,
                  timeout: float | None, rate_limit: float | None, backoff: Backoff | None,
                  ttl: float | None) -> Task[P, R]:
        if not callable(fn):
            raise TypeError(f"a task must be a function, not {type(fn).__name__}")
        if inspect.iscoroutinefunction(fn):
            raise TypeError(f"{fn!r} is a coroutine function: tasks are plain functions (run the coroutine "
                            f"with asyncio.run inside one)")
        if name is None:
            name = f"{_module_name(fn)}.{fn.__qualname__}"
        if not isinstance(name, str) or not name:
            raise ValueError("a task name must be a non-empty string")
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int) or priority < 0):
            raise ValueError(f"'priority' must be a non-negative int, got {priority!r}")
        if timeout is not None:
            timeout = _check_number("timeout", timeout, minimum=0.0, inclusive=False)
        if rate_limit is not None:
            rate_limit = _check_number("rate_limit", rate_limit, minimum=0.0, inclusive=False)
        if ttl is not None:
            ttl = _check_number("ttl", ttl, minimum=0.0, inclusive=False)
        if backoff is not None and not isinstance(backoff, Backoff):
            raise TypeError(f"'backoff' must be a pqueue.Backoff, not {type(backoff).__name__}")
        attempts = self.max_attempts if max_attempts is None else _check_attempts("max_attempts", max_attempts)
        if attempts > self.max_deliveries:
            raise ValueError(f"max_attempts={attempts} of {name} is above the app's max_deliveries="
                             f"{self.max_deliveries}")
        task = Task(self, fn, name=name, max_attempts=attempts, priority=priority, timeout=timeout,
                    rate_limit=rate_limit, backoff=backoff, ttl=ttl)
        with self._lock:
            if name in self._tasks:
                raise ValueError(f"a task named {name!r} is registered already; give one of them name=...")
            self._tasks[name] = task
        return task

    # ------------------------------------------------------------------ producing

    def send(self, name: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
             delay: float | None = None, priority: int | None = None, key: str | None = None) -> TaskHandle[Any]:
        """Enqueue a call of task `name` without importing its code (a producer-only process).

        The name is not checked here: a name no worker registers is dead-lettered there.

        Raises:
            SerializationError: an argument cannot be encoded (nothing written).
            ValueError: a bad option (nothing written).
        """
        if not isinstance(name, str) or not name:
            raise ValueError("a task name must be a non-empty string")
        offset = self._put(name, "send", tuple(args), dict(kwargs or {}), priority=priority, ttl=None, delay=delay,
                           not_before=None, key=key)
        return TaskHandle(self, name, offset)

    def _put(self, name: str, verb: str, args: Sequence[Any], kwargs: Mapping[str, Any], *, priority: int | None,
             ttl: float | None, delay: float | None, not_before: float | None, key: str | None) -> int:
        call = {"task": name, "args": list(args), "kwargs": dict(kwargs)}
        try:
            offset = self.queue.put(call, priority=priority, ttl=ttl, delay=delay, not_before=not_before, key=key)
        except SerializationError as exc:
            raise self._culprit(name, verb, args, kwargs, exc) from exc
        log.debug("task %s[%d] enqueued", name, offset)
        return offset

    def _culprit(self, name: str, verb: str, args: Sequence[Any], kwargs: Mapping[str, Any],
                 exc: Exception) -> SerializationError:
        """The error naming the first argument the serializer cannot encode."""
        task = self._tasks.get(name)
        labelled: list[tuple[str, Any]] = []
        if task is not None:
            for pname, value in task.signature.bind(*args, **kwargs).arguments.items():
                kind = task.signature.parameters[pname].kind
                if kind is inspect.Parameter.VAR_POSITIONAL:
                    labelled += [(f"{pname}[{i}]", v) for i, v in enumerate(value)]
                elif kind is inspect.Parameter.VAR_KEYWORD:
                    labelled += [(f"{pname}[{k!r}]", v) for k, v in value.items()]
                else:
                    labelled.append((pname, value))
        else:
            labelled = [(f"args[{i}]", v) for i, v in enumerate(args)] + list(kwargs.items())
        for label, value in labelled:
            try:
                self.codec.dumps(value)
            except Exception as inner:
                return SerializationError(f"{name}.{verb}(): argument {label!r} ({type(value).__name__}) cannot "
                                          f"be encoded with {self.codec.name}: {inner}; nothing was written")
        return SerializationError(f"{name}.{verb}(): the call cannot be encoded with {self.codec.name}: {exc}; "
                                  f"nothing was written")

    # ------------------------------------------------------------------ the worker

    def dispatch(self, msg: Message) -> Any:
        """The pool handler: run the task `msg` names, applying the task's own policies.

        Returns:
            The task's return value (stored as the result with ``results=True``).
        Raises:
            UnknownTaskError, MalformedTaskError, AttemptsExhausted: dead-letter it now.
            Retry: try again later (a failure with attempts left, or a rate-limit deferral).
            Reject: the task rejected itself.
        """
        data = msg.data
        if not (isinstance(data, dict) and isinstance(data.get("task"), str)
                and isinstance(data.get("args", []), list) and isinstance(data.get("kwargs", {}), dict)):
            log.error("message at offset %d is not a task call (%.80r); dead-lettered", msg.offset, data)
            raise MalformedTaskError(f"not a task call: expected a map with 'task' (str), 'args' (list) and "
                                     f"'kwargs' (map), got {type(data).__name__}")
        name: str = data["task"]
        args: list[Any] = data.get("args", [])
        kwargs: dict[str, Any] = data.get("kwargs", {})
        task = self._tasks.get(name)
        if task is None:
            known = ", ".join(sorted(self._tasks)[:10]) or "none"
            log.error("task %s[%d]: unknown task name; dead-lettered", name, msg.offset)
            raise UnknownTaskError(f"unknown task {name!r}: this worker registers no task of that name (it has: "
                                   f"{known}); deploy the code that defines it, then `pqueue dlq PATH replay`")
        try:
            task.signature.bind(*args, **kwargs)
        except TypeError as exc:
            log.error("task %s[%d]: arguments do not fit %s%s: %s; dead-lettered", name, msg.offset, name,
                      task.signature, exc)
            raise MalformedTaskError(f"the arguments of {name} do not fit {name}{task.signature}: {exc}") from None
        attempt = msg.attempt - self._deferrals(msg.offset)
        if attempt > task.max_attempts:
            log.error("task %s[%d]: delivery %d of at most %d attempts; earlier deliveries never finished (the "
                      "process died or the lease ran out); dead-lettered without running", name, msg.offset, attempt,
                      task.max_attempts)
            raise AttemptsExhausted(f"{name}: delivery {attempt} of at most {task.max_attempts} attempts: earlier "
                                    f"deliveries never finished (the process died or the lease ran out); not run")
        if task._limiter is not None:
            self._pace(task, msg)
        log.info("task %s[%d] started (attempt %d of %d)", name, msg.offset, attempt, task.max_attempts)
        t0 = time.monotonic()
        token = _current.set(TaskContext(name, msg.offset, attempt))
        try:
            result = call_with_deadline(task.fn, args, kwargs, task.timeout, task.name)
        except Reject as exc:
            log.error("task %s[%d] rejected itself: %s; dead-lettered", name, msg.offset, exc.reason)
            raise
        except Exception as exc:
            elapsed = time.monotonic() - t0
            if attempt >= task.max_attempts:
                log.error("task %s[%d] failed its last attempt (%d of %d) after %.3f s: %r; dead-lettered", name,
                          msg.offset, attempt, task.max_attempts, elapsed, exc)
                raise AttemptsExhausted(f"{name} failed its last attempt ({attempt} of {task.max_attempts}): "
                                        f"{exc!r}") from exc
            if isinstance(exc, Retry) and exc.delay is not None:
                delay = exc.delay
            else:
                delay = (task.backoff or self.backoff).delay(attempt)
            log.warning("task %s[%d] failed (attempt %d of %d) after %.3f s: %r; retrying in %.3g s", name,
                        msg.offset, attempt, task.max_attempts, elapsed, exc, delay)
            raise Retry(delay) from exc
        finally:
            _current.reset(token)
        log.info("task %s[%d] succeeded in %.3f s", name, msg.offset, time.monotonic() - t0)
        return result

    def _deferrals(self, offset: int) -> int:
        with self._deferred_lock:
            entry = self._deferred.get(offset)
        return 0 if entry is None else int(entry[0])

    def _pace(self, task: Task[Any, Any], msg: Message) -> None:
        """Wait for the task's rate-limit slot, or hand the message back until it (Retry)."""
        assert task._limiter is not None
        now = time.monotonic()
        with self._deferred_lock:
            entry = self._deferred.get(msg.offset)
        if entry is not None and entry[1] > 0:
            # This call was deferred to a slot reserved for it: take that slot, not a new one.
            wait = max(0.0, entry[1] - now)
            entry[1] = 0.0
        else:
            wait = task._limiter.reserve(now)
        if wait <= RATE_WAIT_INLINE_SECONDS:
            if wait > 0:
                time.sleep(wait)
            return
        with self._deferred_lock:
            entry = self._deferred.setdefault(msg.offset, [0.0, 0.0])
            entry[0] += 1
            entry[1] = now + wait
            self._deferred.move_to_end(msg.offset)
            if len(self._deferred) > DEFERRAL_MEMORY:
                self._deferred.popitem(last=False)
        log.info("task %s[%d] over its rate limit (%g/s); deferred %.3g s", task.name, msg.offset,
                 task.rate_limit, wait)
        raise Retry(wait)

    def pool(self, *, workers: int = 4, max_workers: int | None = None, **pool_options: Any) -> ConsumerPool:
        """The consumer pool that runs this app's tasks (not started).

        Args:
            workers, max_workers: worker threads, as for `ConsumerPool`.
            pool_options: other `ConsumerPool` options (breaker, rate_limit, ...); the handler,
                group, max_attempts, backoff and lease are the app's.
        """
        longest = max((t.timeout or 0.0 for t in self._tasks.values()), default=0.0)
        lease = max(LEASE_SECONDS, longest + RATE_WAIT_INLINE_SECONDS + LEASE_MARGIN_SECONDS)
        return ConsumerPool(self.queue, self.dispatch, group=self.group, workers=workers, max_workers=max_workers,
                            max_attempts=self.max_deliveries, backoff=self.backoff, lease=lease, results=self.results,
                            **pool_options)

    def scheduler(self) -> Scheduler:
        """The scheduler of this app's periodic tasks (not started)."""
        return Scheduler(self.queue, self._periodics, self._enqueue_period)

    def _enqueue_period(self, p: Periodic, start: float, key: str) -> int:
        task = self._tasks[p.name]
        return self._put(p.name, "periodic", (), {}, priority=task.priority, ttl=task.ttl, delay=None,
                         not_before=None, key=key)

    def run(self, *, workers: int = 4, max_workers: int | None = None, scheduler: bool = True,
            stop_timeout: float = STOP_TIMEOUT_SECONDS, **pool_options: Any) -> None:
        """Run the worker until SIGTERM/SIGINT (in the main thread) or a fatal error.

        Starts the pool and, if the app has periodic tasks and `scheduler` is true, the
        scheduler. The first signal lets in-flight tasks finish for `stop_timeout` seconds,
        a second hands them back at once.

        Raises:
            BrokenPool: the pool stopped on a fatal error.
        """
        pool = self.pool(workers=workers, max_workers=max_workers, **pool_options)
        sched = self.scheduler() if scheduler and self._periodics else None
        with one_line_per_state_change():
            log.info("worker for %s (group %r): %d tasks, %d periodic, %d workers", self.path, self.group,
                     len(self._tasks), len(self._periodics) if sched else 0, workers)
            if sched is not None:
                sched.start()
            try:
                pool.run(stop_timeout=stop_timeout)
            finally:
                if sched is not None:
                    sched.stop()
                self.queue.flush()
                log.info("worker for %s stopped", self.path)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the queue (if open); it opens again on next use."""
        with self._lock:
            q, self._queue = self._queue, None
        if q is not None:
            q.close()

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<pqueue.App {self.path!r} tasks={len(self._tasks)}>"


def _module_name(fn: Callable[..., Any]) -> str:
    """The module a worker imports `fn` from: a script's own name rather than ``__main__``.

    `python myapp.py` (a producer) and `pqueue worker myapp:app` must agree on the task names.
    """
    module = fn.__module__
    if module != "__main__":
        return module
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        return str(spec.name)  # python -m package.module
    path = getattr(main, "__file__", None)
    return os.path.splitext(os.path.basename(path))[0] if path else module


def _check_attempts(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name!r} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name!r} must be at least 1, got {value!r}")
    return value


__all__ = ["App", "AttemptsExhausted", "MalformedTaskError", "Task", "TaskContext", "TaskHandle", "TaskTimeout",
           "UnknownTaskError"]
