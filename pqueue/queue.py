"""Queue: the public face that binds the log, the index and the consumers of one directory."""

from __future__ import annotations

import os
import threading
import time
import traceback
import weakref
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, final

from . import layout, schedule
from .consumer import Consumer, check_timeout
from .errors import ClosedError, Empty, QueueError, RecordTooLargeError, SerializationError, TaskFailed
from .index import Index, is_unreadable
from .keys import Keys
from .leases import Grant
from .log import Log
from .message import Message
from .policy import FsyncPolicy
from .reader import Position
from .record import (
    ATTR_BOOT,
    ATTR_EXPIRES,
    ATTR_KEY,
    ATTR_META,
    ATTR_NOT_BEFORE,
    ATTR_PRIORITY,
    RecordError,
    encode_attrs,
)
from .serializers import Serializer, decoder, resolve
from .tables import GroupState

SEGMENT_BYTES = 64 << 20  # 64 MiB per segment file
MAX_RECORD_BYTES = 16 << 20  # 16 MiB per payload
LEASE_SECONDS = 30.0  # visibility timeout of a delivered message
ACK_INTERVAL_SECONDS = 0.02  # pending acks become durable within 20 ms
DEFAULT_GROUP = "default"
DEDUP_WINDOW_SECONDS = 24 * 3600.0  # idempotency keys are remembered for 24 hours
RESULT_TTL_SECONDS = 7 * 24 * 3600.0  # task results are kept for 7 days
MAX_RESULT_BYTES = 1 << 20  # 1 MiB per stored result
RESULT_POLL_MIN_SECONDS = 0.0005  # result() polls for other processes' results from this often ...
RESULT_POLL_MAX_SECONDS = 0.02  # ... backing off to this
PRIORITY_LEVELS = 10  # priorities 0 (lowest) to 9
MAX_KEY_BYTES = 1024

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
        max_bytes: int | None = None,
        on_full: str = "block",
        dedup_window: float = DEDUP_WINDOW_SECONDS,
        priorities: int = PRIORITY_LEVELS,
        priority_weights: Sequence[float] | None = None,
        on_expire: str = "dlq",
        result_ttl: float = RESULT_TTL_SECONDS,
        max_result_bytes: int = MAX_RESULT_BYTES,
        create: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self._closed = True
        policy = FsyncPolicy.parse(fsync)
        if max_bytes is not None:
            if not isinstance(max_bytes, int) or max_bytes < 8 * 4096:
                raise ValueError("max_bytes must be None or an int of at least 32768")
            if segment_bytes == SEGMENT_BYTES:
                # Retention frees whole segments: keep them small against the cap.
                segment_bytes = max(4096, max_bytes // 8)
            elif segment_bytes > max_bytes // 2:
                raise ValueError(f"segment_bytes={segment_bytes} must be at most half of max_bytes={max_bytes}: "
                                 f"space is freed a whole segment at a time")
        if on_full not in ("block", "raise", "drop_oldest"):
            raise ValueError("on_full must be 'block', 'raise' or 'drop_oldest'")
        if not isinstance(dedup_window, (int, float)) or dedup_window <= 0:
            raise ValueError("'dedup_window' must be a positive number of seconds")
        if not isinstance(priorities, int) or not 1 <= priorities <= 256:
            raise ValueError("priorities must be an int from 1 to 256 (levels 0..priorities-1)")
        if priority_weights is not None:
            weights = [float(w) for w in priority_weights]
            if len(weights) != priorities or any(w <= 0 for w in weights):
                raise ValueError(f"priority_weights must give a positive weight to each of the {priorities} levels")
        if on_expire not in ("dlq", "drop"):
            raise ValueError("on_expire must be 'dlq' or 'drop'")
        if not isinstance(result_ttl, (int, float)) or result_ttl <= 0:
            raise ValueError("'result_ttl' must be a positive number of seconds")
        if not isinstance(max_result_bytes, int) or max_result_bytes <= 0:
            raise ValueError("max_result_bytes must be a positive int")
        self.result_ttl = float(result_ttl)
        self.max_result_bytes = max_result_bytes
        self.max_bytes = max_bytes
        self.on_full = on_full
        self.dedup_window = float(dedup_window)
        self.priorities = priorities
        self.priority_weights = None if priority_weights is None else [float(w) for w in priority_weights]
        self.on_expire = on_expire
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
            max_bytes=max_bytes,
            on_full=on_full,
            on_drop=self._index.count_dropped,
            retain=self._retain,
        )
        # _arrival wakes getters of this process when any handle of it appends.
        self._arrival = threading.Condition(threading.Lock())
        self._consumers: dict[str, Consumer] = {}
        self._consumers_lock = threading.Lock()  # guards _consumers
        self._dlq: Queue | None = None
        self._dlq_lock = threading.Lock()  # guards _dlq
        self._keys = Keys(self)
        if self._index.fresh and self._log.reader.segments():
            self._keys.rebuild()  # a new index beside an old log: keys travel in the records
        self._dumps = self._codec.dumps
        self._codec_id = self._codec.codec
        self._append = self._log.append
        self._closed = False
        _live.add(self)

    def _open_index(self) -> Index:
        try:
            return Index(self.path)
        except QueueError as exc:
            if not is_unreadable(exc) and (exc.__cause__ is None or not is_unreadable(exc.__cause__)):
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

    def put(
        self,
        item: Any,
        block: bool = True,
        timeout: float | None = None,
        *,
        key: str | None = None,
        priority: int | None = None,
        delay: float | None = None,
        not_before: float | None = None,
        ttl: float | None = None,
    ) -> int:
        """Append `item` and return its offset. Durable per the fsync policy on return.

        Args:
            block, timeout: with a byte cap and on_full="block", whether and how long to wait
                for room (like `queue.Queue.put`); otherwise unused.
            key: an idempotency key: a put with a key seen within `dedup_window` seconds
                writes nothing and returns the first put's offset (across processes and
                crashes), so a producer may retry a put safely.
            priority: 0 (lowest, the default) to priorities-1; higher levels are delivered
                first within each group, FIFO within a level.
            delay / not_before: do not deliver before `delay` seconds from now / this Unix time.
            ttl: seconds after which an undelivered message expires (dead-lettered with reason
                "expired", or dropped with on_expire="drop").
        Raises:
            SerializationError: the serializer cannot encode `item` (nothing written).
            RecordTooLargeError: the encoded item is over max_record_bytes (nothing written).
            Full: no room under max_bytes (nothing written).
            DiskFullError, ReadOnlyError: the write failed; the partial record was removed.
            ClosedError: the queue was closed.
            ValueError, TypeError: a bad option (nothing written).
        """
        if self._closed:
            raise ClosedError(f"queue {self.path} is closed")
        try:
            payload = self._dumps(item)
        except Exception as exc:
            raise SerializationError(
                f"cannot serialize {type(item).__name__} with {self._codec.name}: {exc}; nothing was "
                f"written") from exc
        if (key is None and priority is None and delay is None and not_before is None and ttl is None
                and self.max_bytes is None):
            return self._append(self._codec_id, b"", payload)  # the hot path: no options, no checks
        check_timeout(timeout)
        attrs = self._attrs(key, priority, delay, not_before, ttl)
        before = self._keys.before_put(key, bool(priority)) if key is not None or priority else None
        return self._log.append_checked(self._codec_id, encode_attrs(attrs), payload, before=before,
                                        timeout=timeout if block else 0)

    def put_nowait(self, item: Any, **options: Any) -> int:
        """put() that never waits for room under a byte cap."""
        return self.put(item, False, **options)

    def full(self) -> bool:
        """Whether the byte cap is reached (always False without max_bytes)."""
        return self.max_bytes is not None and self._log.disk_bytes() >= self.max_bytes

    def _attrs(self, key: str | None, priority: int | None, delay: float | None, not_before: float | None,
               ttl: float | None) -> dict[int, Any]:
        """Validate put() options into record attributes (a bad one raises, nothing written)."""
        attrs: dict[int, Any] = {}
        now = time.time()
        if key is not None:
            if not isinstance(key, str) or not key or len(key.encode()) > MAX_KEY_BYTES:
                raise ValueError(f"key must be a non-empty str of at most {MAX_KEY_BYTES} bytes")
            attrs[ATTR_KEY] = key
        if priority is not None:
            if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority < self.priorities:
                raise ValueError(f"priority must be an int from 0 to {self.priorities - 1}")
            if priority:
                attrs[ATTR_PRIORITY] = priority
        if delay is not None and not_before is not None:
            raise ValueError("give delay or not_before, not both")
        if delay is not None:
            if not isinstance(delay, (int, float)) or delay < 0:
                raise ValueError("'delay' must be a non-negative number of seconds")
            if delay > 0:
                attrs[ATTR_NOT_BEFORE] = now + delay
                attrs[ATTR_BOOT] = schedule.stamp(delay)
        if not_before is not None:
            if not isinstance(not_before, (int, float)):
                raise TypeError("not_before must be a Unix time in seconds")
            if not_before > now:
                attrs[ATTR_NOT_BEFORE] = float(not_before)
                attrs[ATTR_BOOT] = schedule.stamp(not_before - now)
        if ttl is not None:
            if not isinstance(ttl, (int, float)) or ttl <= 0:
                raise ValueError("'ttl' must be a positive number of seconds")
            attrs[ATTR_EXPIRES] = now + ttl
        return attrs

    def put_many(self, items: Iterable[Any], *, timeout: float | None = None) -> list[int]:
        """Append several items with one write and at most one fsync; all or nothing on error.

        With a byte cap, `timeout` bounds the wait for room as in `put`.
        """
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
        return self._log.append_many(encoded, timeout=timeout)

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
        if not isinstance(offset, int) or offset < 0 or offset >= self._log.reader.tail_offset():
            raise ValueError(f"no record at offset {offset!r} in {self.path}")
        return self.consumer(group).status(offset)

    def result(self, offset: int, *, group: str = DEFAULT_GROUP, timeout: float | None = None) -> Any:
        """Wait for task `offset` to finish in `group` and return the handler's return value.

        Works across processes (a producer waiting for a worker elsewhere); needs a pool
        created with results=True. Results are kept for `result_ttl` seconds.

        Raises:
            TaskFailed: the task was dead-lettered (error type, message, attempts inside).
            Empty: not finished within `timeout` seconds.
            QueueError: the task is done but no result was stored (a pool without
                results=True, or the result expired).
            ValueError: no record was ever written at `offset`.
        """
        self._check_open()
        check_timeout(timeout)
        if not isinstance(offset, int) or offset < 0 or offset >= self._log.reader.tail_offset():
            raise ValueError(f"no record at offset {offset!r} in {self.path}")
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = RESULT_POLL_MIN_SECONDS
        consumer = self.consumer(group)
        while True:
            found = consumer._pending_result(offset) or self._index.result(group, offset)
            if found is None and consumer.status(offset) in ("done", "dead"):
                # Acks and results commit together: look once more in case both landed between.
                found = consumer._pending_result(offset) or self._index.result(group, offset)
                if found is None:
                    raise QueueError(f"task {offset} of group {group!r} is done but has no stored result: run the "
                                     f"pool with results=True (results are kept for result_ttl seconds)")
            if found is not None:
                if found[0] == "done":
                    return self._decode(found[1], found[2])
                raise TaskFailed(offset, found[1])
            wait = poll
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Empty(f"task {offset} of group {group!r} did not finish within {timeout} s")
                wait = min(wait, remaining)
            self._wait_for_arrival(wait)
            poll = min(poll * 2, RESULT_POLL_MAX_SECONDS)

    def _encode_result(self, offset: int, value: Any) -> tuple[int, bytes, int]:
        """Encode a handler's return value for the index: (codec, bytes, ttl ms)."""
        try:
            data = self._dumps(value)
        except Exception as exc:
            raise SerializationError(f"the result of task {offset} ({type(value).__name__}) cannot be serialized "
                                     f"with {self._codec.name}: {exc}") from exc
        if len(data) > self.max_result_bytes:
            raise RecordTooLargeError(f"the result of task {offset} is {len(data)} bytes, over max_result_bytes="
                                      f"{self.max_result_bytes}; return less or raise the limit")
        return self._codec_id, data, int(self.result_ttl * 1000)

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
        # The dead letter keeps the key and priority but not the schedule: an expiry copied
        # along would expire the dead letter itself. The schedule is kept in the metadata.
        for name, attr in (("not_before", ATTR_NOT_BEFORE), ("expires", ATTR_EXPIRES)):
            if attr in attrs:
                meta[name] = attrs[attr]
        new_attrs = {k: v for k, v in attrs.items() if k not in (ATTR_META, ATTR_EXPIRES, ATTR_NOT_BEFORE, ATTR_BOOT)}
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
        info: dict[str, Any] = {k: meta[k] for k in ("reason", "attempts", "died_at", "error_type", "error")
                                if k in meta}
        self._index.record_dead(consumer.group, offset, info, result_ttl_ms=int(self.result_ttl * 1000))
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

    def _retain(self) -> None:
        """Delete the segments every group is done with (and their dead-letter markers)."""
        low = self._index.min_committed()
        if low is not None and self._log.delete_below(low):
            remaining = self._log.reader.segments(refresh=False)
            if remaining:
                self._index.prune_dead_below(remaining[0])

    def _after_commit(self, state: GroupState) -> None:
        """Retention: once a group's committed offset passes a segment, maybe delete segments."""
        bases = self._log.reader.segments(refresh=False)
        if len(bases) > 1 and state.committed >= bases[1]:
            self._retain()

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
