"""The Sink protocol a forwarder ships records through, its value types, and a fault-injecting fake.

A sink is small, synchronous and batch-oriented; each real sink owns its broker's client
library (an optional extra). The forwarder owns timeouts, backoff and the commit rule; a sink
only reports, per record, what the broker did:

* ``send()`` returns ``SendResult(acked_through, rejected)``: every record of the batch at or
  below ``acked_through`` is either stored by the broker or listed in ``rejected`` (a
  permanent, per-record refusal the forwarder moves to the dead-letter queue).
* ``send()`` raises ``TransientSinkError`` when the broker is unreachable, slow or refusing
  for a while. A timeout is "unknown", not "failed": the write may have been applied, so the
  forwarder re-sends and relies on the sink's dedup key (source id + offset).

Records travel as their stored bytes (``OutRecord.payload``) with headers naming the
serializer, the source id and the offset; nothing is ever re-encoded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

HEADER_SOURCE = "pq-source"  # the queue's source id (UUID)
HEADER_OFFSET = "pq-offset"  # the record's offset in its queue (decimal)
HEADER_TIMESTAMP = "pq-ts"  # when the record was put, ms since the Unix epoch (decimal)
HEADER_CODEC = "pq-codec"  # the serializer of the payload: msgpack, json, raw, pickle, custom


@dataclass(frozen=True)
class SourceInfo:
    """The queue a forwarder ships from.

    Attributes:
        id: the queue's stable source id (UUID): the first half of every dedup key.
        name: the queue directory's base name (for topic and stream templates).
        epoch_ms: when the queue was created; a queue deleted and re-created restarts at
            offset 0 with a later epoch, so keys built on it keep rising.
    """

    id: str
    name: str
    epoch_ms: int

    def format(self, template: str) -> str:
        """Fill ``{source_id}``, ``{queue}`` and ``{epoch_ms}`` in a stream/topic/subject template.

        Raises:
            ValueError: the template names a field that does not exist.
        """
        try:
            return template.format(source_id=self.id, queue=self.name, epoch_ms=self.epoch_ms)
        except (KeyError, IndexError) as exc:
            raise ValueError(f"unknown field {exc} in {template!r}: use {{source_id}}, {{queue}} or "
                             f"{{epoch_ms}}") from exc


@dataclass(frozen=True)
class OutRecord:
    """One record on its way to a sink.

    Attributes:
        offset: its offset in the source queue (the second half of the dedup key).
        timestamp: when it was put, seconds since the Unix epoch.
        payload: the bytes exactly as stored in the log (never re-encoded).
        headers: ``pq-source``, ``pq-offset``, ``pq-ts`` and ``pq-codec``.
    """

    offset: int
    timestamp: float
    payload: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class SendResult:
    """What the broker did with a batch.

    Attributes:
        acked_through: the highest offset O such that every record of the batch at or below O
            is stored or rejected; None when not even the first record is settled.
        rejected: (offset, reason) of records refused permanently (too large, invalid). Only
            entries at or below ``acked_through`` count.
        duplicates: records the broker already held (a re-send absorbed by its dedup key).
    """

    acked_through: int | None
    rejected: list[tuple[int, str]] = field(default_factory=list)
    duplicates: int = 0


class SinkError(Exception):
    """A sink cannot work as configured (wrong URL scheme, stream owned by a newer queue)."""


class TransientSinkError(SinkError):
    """The broker is unreachable, timing out or refusing for now: back off and re-send."""


@runtime_checkable
class Sink(Protocol):
    """Where a forwarder ships records. Called from one thread at a time.

    Attributes:
        max_record_bytes: the largest payload the broker takes; larger records are
            dead-lettered by the forwarder with reason ``too_large`` instead of being sent.
    """

    max_record_bytes: int

    def open(self, source: SourceInfo) -> None:
        """Bind to `source` and connect (a failed connection may also surface in `send`).

        Raises:
            TransientSinkError: the broker is not reachable now.
            SinkError: the configuration cannot work.
        """

    def last_shipped(self) -> int | None:
        """The highest offset of this source the broker already holds; None when unknown."""

    def send(self, batch: Sequence[OutRecord], timeout: float) -> SendResult:
        """Ship `batch` (ascending offsets) and wait at most `timeout` seconds for acks.

        Raises:
            TransientSinkError: nothing usable came back; the whole batch will be re-sent.
        """

    def close(self) -> None:
        """Release the connection. Idempotent."""


class FakeSink:
    """An in-memory sink that injects faults on demand, for unit tests of the forwarder.

    It stores each (offset, payload, headers) once, like a broker with a dedup key, and counts
    the re-sends it absorbed. Faults, each consumed by the next `send` calls:

    * ``fail_next(n)``: raise TransientSinkError n times, storing nothing.
    * ``lose_acks_next(n)``: store the batch, then raise TransientSinkError n times (a
      timeout after the broker applied the write).
    * ``partial_next(k)``: store only the first k records of the next batch.
    * ``reject(offset, reason)``: refuse that offset permanently, every time.
    * ``delay``: seconds each `send` sleeps (bounded by its timeout, then it times out).
    """

    def __init__(self, *, max_record_bytes: int = 1 << 30, dedup: bool = True) -> None:
        self.max_record_bytes = max_record_bytes
        self.dedup = dedup
        self.source: SourceInfo | None = None
        self.stored: list[OutRecord] = []
        self.duplicates = 0
        self.sends = 0
        self.timeouts_applied: list[float] = []
        self.delay = 0.0
        self.closed = False
        self._have: set[int] = set()
        self._fail = 0
        self._lose_acks = 0
        self._partial: int | None = None
        self._rejects: dict[int, str] = {}
        # _lock guards the fault counters and the store: tests arm faults from their own thread.
        self._lock = threading.Lock()

    def fail_next(self, n: int = 1) -> None:
        with self._lock:
            self._fail += n

    def lose_acks_next(self, n: int = 1) -> None:
        with self._lock:
            self._lose_acks += n

    def partial_next(self, k: int) -> None:
        with self._lock:
            self._partial = k

    def reject(self, offset: int, reason: str) -> None:
        with self._lock:
            self._rejects[offset] = reason

    def offsets(self) -> list[int]:
        """The stored offsets in arrival order."""
        with self._lock:
            return [r.offset for r in self.stored]

    def open(self, source: SourceInfo) -> None:
        self.source = source
        self.closed = False

    def last_shipped(self) -> int | None:
        with self._lock:
            return max(self._have, default=None)

    def send(self, batch: Sequence[OutRecord], timeout: float) -> SendResult:
        with self._lock:
            self.sends += 1
            self.timeouts_applied.append(timeout)
            delay = self.delay
            if self._fail:
                self._fail -= 1
                raise TransientSinkError("fake sink: injected failure")
        if delay:
            time.sleep(min(delay, timeout))
            if delay >= timeout:
                raise TransientSinkError(f"fake sink: timed out after {timeout} s")
        with self._lock:
            take = len(batch) if self._partial is None else min(self._partial, len(batch))
            self._partial = None
            rejected: list[tuple[int, str]] = []
            dups = 0
            acked: int | None = None
            for rec in batch[:take]:
                reason = self._rejects.get(rec.offset)
                if reason is not None:
                    rejected.append((rec.offset, reason))
                elif self.dedup and rec.offset in self._have:
                    dups += 1
                else:
                    self._have.add(rec.offset)
                    self.stored.append(rec)
                acked = rec.offset
            self.duplicates += dups
            if self._lose_acks:
                self._lose_acks -= 1
                raise TransientSinkError("fake sink: ack lost after the write was applied")
            return SendResult(acked, rejected, dups)

    def close(self) -> None:
        self.closed = True


__all__ = ["HEADER_CODEC", "HEADER_OFFSET", "HEADER_SOURCE", "HEADER_TIMESTAMP", "FakeSink", "OutRecord",
           "SendResult", "Sink", "SinkError", "SourceInfo", "TransientSinkError"]
