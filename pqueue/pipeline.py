"""Pipeline outputs: what a pool stage puts into the next queue, and under which keys.

A stage's output is put **before** its source message is acked, with the idempotency key
``"<source_id>:<group>:<offset>"`` (``":<i>"`` appended per item of a `Many` or per routed pair).
A crash between the put and the ack re-runs the handler; the repeated put finds its key and
writes nothing, so the next stage sees each output once. This holds while the re-run happens
within the output queue's `dedup_window` (24 h by default) and the handler returns the same
outputs for the same input; its other side effects are still at-least-once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, final

if TYPE_CHECKING:
    from .message import Message
    from .queue import Queue

Router = Callable[[Any], Iterable[tuple["Queue", Any]]]


@final
class Many:
    """Several outputs from one handler call; each becomes its own message downstream."""

    __slots__ = ("items",)

    def __init__(self, items: Iterable[Any]) -> None:
        self.items = list(items)

    def __repr__(self) -> str:
        return f"Many({self.items!r})"


def emit(source: Queue, group: str, msg: Message, value: Any, output: Queue | Router) -> None:
    """Put a handler's return `value` into the output queue(s), keyed by where it came from.

    Args:
        output: a Queue (a `Many` puts each item, None puts nothing) or a router called with
            the value that returns (queue, item) pairs (fan-out).
    """
    from .queue import Queue  # a runtime import: queue.py does not depend on this module

    if value is None:
        return
    base = f"{source.source_id}:{group}:{msg.offset}"
    if isinstance(output, Queue):
        if isinstance(value, Many):
            for i, item in enumerate(value.items):
                output.put(item, key=f"{base}:{i}")
        else:
            output.put(value, key=base)
        return
    for i, (target, item) in enumerate(output(value)):
        if not isinstance(target, Queue):
            raise TypeError(f"the output router must return (pqueue.Queue, item) pairs, got {type(target).__name__}")
        target.put(item, key=f"{base}:{i}")
