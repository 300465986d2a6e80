"""Message: one delivery of one record to one consumer group."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, final

if TYPE_CHECKING:
    from .consumer import Consumer


@final
class Message:
    """A leased record. Ack it when done, or nack it to have it delivered again.

    Attributes:
        offset: the record's offset in the log (unique and stable for the queue's lifetime).
        data: the decoded payload.
        timestamp: when it was put, seconds since the Unix epoch.
        attempt: this delivery's number, from 1. A nack, an expired lease and a crash of the
            holder each lead to a delivery with a higher attempt.
        group: the consumer group it was delivered to.
        key, priority, not_before, expires: the optional attributes given at put, or None.
        meta: dead-letter metadata (source offset, group, attempts, error, reason, times) for
            messages in a dead-letter queue; an empty dict otherwise.
    """

    __slots__ = ("offset", "data", "timestamp", "attempt", "group", "key", "priority", "not_before",
                 "expires", "meta", "_consumer", "_seg", "_pos", "_deadline_ms", "_codec", "_payload",
                 "_attrs")

    def __init__(self, consumer: Consumer, offset: int, data: Any, timestamp: float, attempt: int,
                 seg: int, pos: int, deadline_ms: int, codec: int, payload: bytes, attrs: dict[int, Any]) -> None:
        self._consumer = consumer
        self.offset = offset
        self.data = data
        self.timestamp = timestamp
        self.attempt = attempt
        self.group = consumer.group
        self._seg = seg
        self._pos = pos
        self._deadline_ms = deadline_ms
        self._codec = codec
        self._payload = payload
        self._attrs = attrs
        self.key: str | None = attrs.get(1)
        self.priority: int | None = attrs.get(2)
        self.not_before: float | None = attrs.get(3)
        self.expires: float | None = attrs.get(4)
        self.meta: dict[str, Any] = attrs.get(5) or {}

    def ack(self) -> None:
        """Mark this message done for its group (same as `queue.ack(msg)`)."""
        self._consumer.ack(self)

    def nack(self, *, delay: float = 0.0) -> None:
        """Hand it back to be delivered again, not before `delay` seconds (same as `queue.nack`)."""
        self._consumer.nack(self, delay=delay)

    @property
    def lease_deadline(self) -> float:
        """Unix time at which the lease runs out and another consumer may get this message."""
        return self._deadline_ms / 1000.0

    def __repr__(self) -> str:
        return (f"<Message offset={self.offset} group={self.group!r} attempt={self.attempt} "
                f"data={self.data!r:.60}>")
