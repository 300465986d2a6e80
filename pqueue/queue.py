"""Queue: the public face that binds the log, the index and the consumers of one directory."""

from __future__ import annotations

import os
import threading
import time
import traceback
import weakref
from collections.abc import Iterable
from types import TracebackType
from typing import Any, final

from . import layout
from .consumer import Consumer, check_timeout
from .errors import ClosedError, QueueError, SerializationError
from .index import Grant, GroupState, Index, is_unreadable
from .log import FsyncPolicy, Log, Position
from .message import Message
from .record import ATTR_META, RecordError, encode_attrs
from .serializers import Serializer, decoder, resolve

SEGMENT_BYTES = 64 << 20  # 64 MiB per segment file
MAX_RECORD_BYTES = 16 << 20  # 16 MiB per payload
LEASE_SECONDS = 30.0  # visibility timeout of a delivered message
ACK_INTERVAL_SECONDS = 0.02  # pending acks become durable within 20 ms
DEFAULT_GROUP = "default"

_live: weakref.WeakSet[Queue] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for q in list(_live):
        q._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


@final
class Queue:
    """A crash-safe, disk-backed, multi-process queue in one directory.

    Contract:
        * `put()` writes its record to the kernel before returning, so it survives a process
          crash in every fsync mode; with fsync="always" it also survives power loss; with an
          interval policy at most the window (time or records) can be lost on power loss.
        * Delivery is at-least-once per consumer group. A message delivered but not acked when
          its holder dies (or its lease runs out) is delivered again with `attempt` + 1.
          Acks are batched (durable within `ack_interval`); a lost ack means a redelivery.
        * No record that fails its CRC32C is ever delivered: it is skipped, copied to
          quarantine/, counted and logged (on_corruption="skip"), or raised
          (on_corruption="raise").
        * Any number of handles, threads and processes may use one directory at once.

    Known limits: ordering is FIFO per group only while nothing is retried; `qsize()` counts
    offsets, so records lost to damage count until a consumer reaches them.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: str | float | FsyncPolicy = "interval",
        segment_bytes: int = SEGMENT_BYTES,
        serializer: str | Serializer = "msgpack",
        max_record_bytes: int = MAX_RECORD_BYTES,
        lease: float = LEASE_SECONDS,
        ack_interval: float = ACK_INTERVAL_SECONDS,
        on_corruption: str = "skip",
        create: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self._closed = True
        policy = FsyncPolicy.parse(fsync)
        if not isinstance(segment_bytes, int) or segment_bytes < 4096:
            raise ValueError("segment_bytes must be an int of at least 4096")
        if not isinstance(max_record_bytes, int) or not 0 < max_record_bytes <= 1 << 30:
            raise ValueError("max_record_bytes must be an int between 1 and 1 GiB")
        if not isinstance(lease, (int, float)) or lease <= 0:
            raise ValueError("'lease' must be a positive number of seconds")
        if not isinstance(ack_interval, (int, float)) or ack_interval < 0:
            raise ValueError("'ack_interval' must be a non-negative number of seconds")
        if on_corruption not in ("skip", "raise"):
            raise ValueError("on_corruption must be 'skip' or 'raise'")
        self._codec = resolve(serializer)
        self._serializer = serializer
        self._decode = decoder(self._codec)
        self.fsync = policy
        self.on_corruption = on_corruption
        self.lease = float(lease)
        self.ack_interval = float(ack_interval)
        self.max_record_bytes = max_record_bytes
        self.segment_bytes = segment_bytes
        self.identity = layout.open_dir(self.path, create=create)
        self._index = self._open_index()
        self._log = Log(
            self.path,
            segment_bytes=segment_bytes,
            fsync=policy,
            max_record_bytes=max_record_bytes,
            load_recovery_point=self._index.recovery_point,
            save_recovery_point=self._index.save_recovery_point,
            min_next_offset=self._index.max_dispatched,
            on_append=self._notify_arrival,
        )
        # _arrival wakes getters of this process when any handle of it appends.
        self._arrival = threading.Condition(threading.Lock())
        self._consumers: dict[str, Consumer] = {}
        self._consumers_lock = threading.Lock()  # guards _consumers
        self._dlq: Queue | None = None
        self._dlq_lock = threading.Lock()  # guards _dlq
        self._dumps = self._codec.dumps
        self._codec_id = self._codec.codec
        self._append = self._log.append
        self._closed = False
        _live.add(self)

    def _open_index(self) -> Index:
        try:
            return Index(self.path)
        except QueueError as exc:
            cause = exc.__cause__
            if cause is None or not is_unreadable(cause):
                raise
        # The index is damaged: move it aside (never delete) and rebuild from the log. The
        # cost is redelivery of what was already consumed, never loss.
        aside = os.path.join(self.path, "quarantine", f"index-{int(time.time())}")
        os.makedirs(os.path.dirname(aside), mode=0o700, exist_ok=True)
        os.replace(os.path.join(self.path, "index"), aside)
        return Index(self.path)

    # ------------------------------------------------------------------ identity

    @property
    def source_id(self) -> str:
        """A UUID naming this queue, stable across index rebuilds (used by forwarders)."""
        return self.identity.source_id

    @property
    def created(self) -> float:
        """When the queue was created, seconds since the Unix epoch."""
        return self.identity.created_ms / 1000.0

    # ------------------------------------------------------------------ put

    def put(self, item: Any) -> int:
        """Append `item` and return its offset. Durable per the fsync policy on return.

        Raises:
            SerializationError: the serializer cannot encode `item` (nothing written).
            RecordTooLargeError: the encoded item is over max_record_bytes (nothing written).
            DiskFullError, ReadOnlyError: the write failed; the partial record was removed.
            ClosedError: the queue was closed.
        """
        if self._closed:
            raise ClosedError(f"queue {self.path} is closed")
        try:
            payload = self._dumps(item)
        except Exception as exc:
            raise SerializationError(
                f"cannot serialize {type(item).__name__} with {self._codec.name}: {exc}; nothing was "
                f"written") from exc
        return self._append(self._codec_id, b"", payload)

    def put_many(self, items: Iterable[Any]) -> list[int]:
        """Append several items with one write and at most one fsync; all or nothing on error."""
        if self._closed:
            raise ClosedError(f"queue {self.path} is closed")
        encoded = []
        for i, item in enumerate(items):
            try:
                encoded.append((self._codec_id, b"", self._dumps(item)))
            except Exception as exc:
                raise SerializationError(
                    f"cannot serialize item {i} ({type(item).__name__}) with {self._codec.name}: {exc}; "
                    f"nothing was written") from exc
        return self._log.append_many(encoded)

    # ------------------------------------------------------------------ get / ack

    def consumer(self, group: str = DEFAULT_GROUP) -> Consumer:
        """The consumer of group `group` on this handle (created on first use).

        Every group sees every message; each keeps its own committed offset.
        """
        consumer = self._consumers.get(group)
        if consumer is not None:
            return consumer
        with self._consumers_lock:
            self._check_open()
            consumer = self._consumers.get(group)
            if consumer is None:
                consumer = Consumer(self, group, lease=self.lease, ack_interval=self.ack_interval)
                self._consumers[group] = consumer
            return consumer

    def get(self, block: bool = True, timeout: float | None = None) -> Message:
        """Lease the next message of the default group; see `Consumer.get`."""
        return self.consumer().get(block, timeout)

    def get_nowait(self) -> Message:
        return self.consumer().get(False)

    def ack(self, msg: Message) -> None:
        """Mark `msg` done for its group."""
        if not isinstance(msg, Message):
            raise TypeError(f"ack() takes a Message, not {type(msg).__name__}")
        msg._consumer.ack(msg)

    def nack(self, msg: Message, *, delay: float = 0.0) -> None:
        """Deliver `msg` again (attempt + 1), not before `delay` seconds."""
        if not isinstance(msg, Message):
            raise TypeError(f"nack() takes a Message, not {type(msg).__name__}")
        msg._consumer.nack(msg, delay=delay)

    def dead_letter(self, msg: Message, *, reason: str, error: BaseException | None = None) -> None:
        """Move `msg` to `dead_letters` with `reason` (and the error, if any), then ack it."""
        if not isinstance(msg, Message):
            raise TypeError(f"dead_letter() takes a Message, not {type(msg).__name__}")
        msg._consumer.dead_letter(msg, reason=reason, error=error)

    def qsize(self) -> int:
        """Messages not yet acked by the default group."""
        return self.consumer().qsize()

    def empty(self) -> bool:
        return self.qsize() == 0

    def status(self, offset: int, *, group: str = DEFAULT_GROUP) -> str:
        """The state of record `offset` in `group`.

        Returns one of "pending", "in_flight", "waiting" (to be retried), "delayed", "done",
        "dead".
        Raises:
            ValueError: no record was ever written at `offset`.
        """
        if not isinstance(offset, int) or offset < 0 or offset >= self._log.tail_offset():
            raise ValueError(f"no record at offset {offset!r} in {self.path}")
        return self.consumer(group).status(offset)

    def flush(self) -> None:
        """Make every pending ack durable and fsync what this handle appended."""
        for consumer in list(self._consumers.values()):
            consumer.flush()
        if self._log.end_offset() >= 0:
            self._log.sync()

    # ------------------------------------------------------------------ dead letters

    @property
    def dead_letters(self) -> Queue:
        """The dead-letter queue (``<path>/dlq``), itself a Queue."""
        with self._dlq_lock:
            if self._dlq is None:
                self._check_open()
                self._dlq = Queue(os.path.join(self.path, "dlq"), fsync=self.fsync, serializer=self._serializer,
                                  max_record_bytes=self.max_record_bytes)
            return self._dlq

    def _dead_letter(self, consumer: Consumer, grant: Grant | Message, *, reason: str,
                     error: BaseException | None, extra: dict[str, Any] | None = None) -> int:
        """Copy a message to the DLQ with why it died, then ack it in its group.

        DLQ first, then ack: a crash in between duplicates it in the DLQ rather than losing it.
        """
        if isinstance(grant, Message):
            offset, codec, payload, attrs = grant.offset, grant._codec, grant._payload, grant._attrs
            attempt, put_at = grant.attempt, grant.timestamp
        else:
            rec = grant.record
            offset, codec, payload, attrs, attempt = grant.offset, rec.codec, rec.payload, rec.attrs, grant.attempt
            put_at = rec.timestamp_ns / 1e9
        meta: dict[str, Any] = {
            "source": self.path, "source_id": self.source_id, "offset": offset, "group": consumer.group,
            "attempts": attempt, "reason": reason, "put_at": put_at, "died_at": time.time(),
        }
        if error is not None:
            meta["error_type"] = type(error).__name__
            meta["error"] = str(error)
            meta["traceback"] = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        if extra:
            meta.update(extra)
        new_attrs = {k: v for k, v in attrs.items() if k != ATTR_META}
        new_attrs[ATTR_META] = meta
        try:
            encoded = encode_attrs(new_attrs)
        except RecordError:
            meta.pop("traceback", None)
            encoded = encode_attrs(new_attrs)
        dlq = self.dead_letters
        dlq._log.append(codec, encoded, payload)
        if dlq.fsync.mode != "always":
            dlq._log.sync()  # the copy is durable before the source forgets the message
        self._index.record_dead(consumer.group, offset, {"reason": reason, "at": meta["died_at"]})
        if isinstance(grant, Message):
            consumer.settle(grant)
        consumer.ack_offset(offset)
        return offset

    # ------------------------------------------------------------------ internals for consumers

    def _notify_arrival(self) -> None:
        with self._arrival:
            self._arrival.notify_all()

    def _wait_for_arrival(self, timeout: float) -> None:
        # The log's `waiters` count lets a put with nobody waiting skip the notify entirely.
        with self._arrival:
            self._log.waiters += 1
            try:
                self._arrival.wait(timeout)
            finally:
                self._log.waiters -= 1

    def _after_commit(self, state: GroupState) -> None:
        """Retention: once a group's committed offset passes a segment, maybe delete segments."""
        bases = self._log.segments(refresh=False)
        if len(bases) > 1 and state.committed >= bases[1]:
            low = self._index.min_committed()
            if low is not None and self._log.delete_below(low):
                remaining = self._log.segments(refresh=False)
                if remaining:
                    self._index.prune_dead_below(remaining[0])

    # ------------------------------------------------------------------ lifecycle

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"queue {self.path} is closed")

    def close(self) -> None:
        """Hand back every lease this handle holds (uncharged), commit acks, sync, release.

        Idempotent. After close another handle can take the handed-back messages at once.
        """
        if self._closed:
            return
        self._closed = True
        _live.discard(self)
        errors: list[BaseException] = []
        for consumer in list(self._consumers.values()):
            try:
                consumer.close()
            except QueueError as exc:
                errors.append(exc)
        try:
            self._log.close()
        except QueueError as exc:
            errors.append(exc)
        if self._dlq is not None:
            self._dlq.close()
        self._index.close()
        if errors:
            raise errors[0]

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        # Never raise from __del__ (persist-queue #180); an unclosed handle leaves its leases to
        # expire and its acks (at most ack_interval old) to be redelivered.
        pass

    def _after_fork_in_child(self) -> None:
        self._log.after_fork_in_child()
        self._index = Index(self.path)
        self._log._load_rp = self._index.recovery_point
        self._log._save_rp = self._index.save_recovery_point
        self._log._min_next_offset = self._index.max_dispatched
        self._append = self._log.append
        self._arrival = threading.Condition(threading.Lock())
        self._consumers_lock = threading.Lock()
        self._dlq_lock = threading.Lock()
        for consumer in self._consumers.values():
            consumer.after_fork_in_child()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fsync={self.fsync.describe()}"
        return f"<pqueue.Queue {self.path!r} {state}>"


__all__ = ["Queue", "Position", "check_timeout"]
