"""Consumer: one consumer group's view of a queue, for one Queue handle.

A consumer leases messages from the index in batches (prefetch), hands them out one by one,
and folds acks into the next lease transaction or a short timer, because every durable LMDB
commit costs about 390 µs (notes/hotpath.md goal 3). The prefetch size adapts so a batch lasts
about PREFETCH_TARGET_SECONDS of consumption: fast loops lease hundreds at once, slow handlers
lease few, so other consumers of the group are not starved and leases do not run out unused.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from . import schedule
from .errors import ClosedError, CorruptRecordError, Empty, SerializationError
from .index import owner_token
from .leases import Grant
from .message import Message
from .reader import Position, ReadResult
from .record import ATTR_BOOT, ATTR_EXPIRES, ATTR_NOT_BEFORE
from .tables import GroupState

if TYPE_CHECKING:
    from .queue import Queue

log = logging.getLogger(__name__)

PREFETCH_MAX = 256  # messages leased per transaction at most
PREFETCH_TARGET_SECONDS = 0.05  # a batch should last about this long
ACK_BATCH = 256  # commit pending acks once this many are waiting
POLL_MIN_SECONDS = 0.0005  # a blocked get() polls for other processes' puts from this often ...
POLL_MAX_SECONDS = 0.02  # ... backing off to this
REAP_SECONDS = 5.0  # look for leases of dead processes this often
STATUS_LOOKAHEAD = 10_000  # records status() reads ahead of the dispatch cursor to find a delay
HANDED_BACK_DUE = 0  # due time of uncharged hand-backs: before any retry, in offset order
NO_RESULT: Any = object()  # ack() without a result

_handle_ids = itertools.count(1)


def check_timeout(timeout: float | None) -> None:
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout < 0):
        raise ValueError("'timeout' must be a non-negative number")


class Consumer:
    """Delivers the messages of one consumer group; thread-safe.

    Every group sees every message. Within a group, a message is leased to one consumer at a
    time (across processes); a lease that runs out (the holder died or took longer than
    `lease` seconds) makes it deliverable again with a higher attempt.
    """

    def __init__(self, queue: Queue, group: str, *, lease: float, ack_interval: float) -> None:
        if not isinstance(group, str) or not group:
            raise ValueError("a consumer group name must be a non-empty string")
        self._queue = queue
        self.group = group
        self._lease_ms = int(lease * 1000)
        self._ack_interval = ack_interval
        # _lock guards everything below: the prefetch buffer, handed-out messages and pending acks.
        self._lock = threading.RLock()
        self._buffer: collections.deque[Grant] = collections.deque()
        self._held: dict[int, Message] = {}
        self._pending: list[int] = []
        self._results: dict[int, tuple[int, bytes, int]] = {}  # offset -> encoded result, with pending acks
        self._skips: list[tuple[int, int]] = []
        self._batch = 1
        self._batch_started = 0.0
        self._credits: dict[int, float] = {}  # weighted round-robin state per priority level
        self._next_reap = 0.0
        self._state: GroupState = self._create_group()
        self._flush_event = threading.Event()
        self._flusher: threading.Thread | None = None
        self._closed = False
        self._reset_owner()

    def _reset_owner(self) -> None:
        pid, start = owner_token()
        self._owner = [pid, start, next(_handle_ids)]

    def _create_group(self) -> GroupState:
        log_ = self._queue._log.reader
        pos, offset = log_.first_position()
        return self._queue._index.group(self.group, (pos.segment, offset))

    # ------------------------------------------------------------------ get

    def get(self, block: bool = True, timeout: float | None = None) -> Message:
        """Lease and return the next message of this group.

        Args:
            block: wait for a message; False raises Empty at once when none is ready.
            timeout: with block, wait at most this many seconds (None: forever).
        Raises:
            Empty: nothing to deliver in time (a `queue.Empty`).
            CorruptRecordError: damage was found and the queue has on_corruption="raise".
            SerializationError: a record written with a serializer this handle lacks.
        """
        check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = POLL_MIN_SECONDS
        while True:
            msg = self._take()
            if msg is not None:
                return msg
            if self._fill():
                poll = POLL_MIN_SECONDS
                continue
            if not block:
                raise Empty(f"no message ready in group {self.group!r}")
            wait = poll
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Empty(f"no message in group {self.group!r} within {timeout} s")
                wait = min(wait, remaining)
            self._queue._wait_for_arrival(wait)
            poll = min(poll * 2, POLL_MAX_SECONDS)

    def _take(self) -> Message | None:
        """Hand out the next prefetched message whose lease is still good."""
        with self._lock:
            self._check_open()
            while self._buffer:
                grant = self._buffer.popleft()
                now_ms = time.time() * 1000
                if grant.deadline_ms <= now_ms:
                    continue  # the lease ran out before hand-out: the index will reclaim it
                msg = self._to_message(grant)
                if msg is None:
                    continue
                self._held[grant.offset] = msg
                return msg
        return None

    def _to_message(self, grant: Grant) -> Message | None:
        rec = grant.record
        attrs = rec.attrs
        if attrs:
            expires = attrs.get(ATTR_EXPIRES)
            if expires is not None and expires <= time.time():
                if self._queue.on_expire == "drop":
                    log.info("%s: dropped expired message %d of group %r", self._queue.path, grant.offset, self.group)
                    self._pending.append(grant.offset)
                else:
                    self._queue._dead_letter(self, grant, reason="expired", error=None)
                return None
        try:
            data = self._queue._decode(rec.codec, rec.payload)
        except SerializationError as exc:
            if rec.codec == self._queue._codec.codec:
                # CRC-valid bytes that do not decode with their own codec: never hand them out.
                self._queue._dead_letter(self, grant, reason="undecodable", error=exc)
                return None
            self._hand_back([grant])
            raise
        return Message(self, grant.offset, data, rec.timestamp_ns / 1e9, grant.attempt, grant.seg,
                       grant.pos, grant.deadline_ms, rec.codec, rec.payload, attrs)

    def _fill(self) -> bool:
        """Lease more messages (one transaction); False when there is nothing to lease now."""
        with self._lock:
            self._check_open()
            if self._buffer:
                return True
            now = time.monotonic()
            if now >= self._next_reap:
                self._next_reap = now + REAP_SECONDS
                self._queue._index.reap_dead_owners(self.group)
            if not self._pending and not self._skips and not self._maybe_ready():
                return False
            want = self._next_batch_size(now)
            grants = self._exchange(want=want, lease_ms=self._lease_ms, read=self._read,
                                    choose_level=self._choose_level if self._queue.priority_weights else None)
            self._batch = want
            self._batch_started = now
            self._buffer.extend(grants)
        self._queue._after_commit(self._state)
        return bool(grants)

    def _choose_level(self, levels: list[int]) -> int:
        """Smooth weighted round-robin over the priority levels that have work (priority_weights).

        Each level with work earns its weight per pick and the picked level pays the sum, so
        over time each level is served in proportion to its weight and none starves.
        """
        weights = self._queue.priority_weights
        assert weights is not None
        total = 0.0
        for level in levels:
            self._credits[level] = self._credits.get(level, 0.0) + weights[level]
            total += weights[level]
        best = max(levels, key=lambda level: (self._credits[level], level))
        self._credits[best] -= total
        return best

    def _exchange(self, **kwargs: Any) -> list[Grant]:
        """One index transaction that also commits everything pending (caller holds _lock)."""
        grants, self._state = self._queue._index.exchange(
            self.group, self._owner, acks=self._pending, skips=self._skips, results=self._results, **kwargs)
        had_results = bool(self._results)
        self._pending, self._skips, self._results = [], [], {}
        if had_results:
            self._queue._notify_arrival()  # result() waiters of this process
        return grants

    def _next_batch_size(self, now: float) -> int:
        if not self._batch_started:
            return 1
        elapsed = max(now - self._batch_started, 1e-6)
        rate = self._batch / elapsed
        return max(1, min(PREFETCH_MAX, int(rate * PREFETCH_TARGET_SECONDS), self._batch * 4))

    def _maybe_ready(self) -> bool:
        """Cheap check before a write transaction: new records, or something due."""
        state = self._queue._index.peek(self.group)
        if state is None:
            return False
        self._state = state
        if self._queue._log.reader.has_data_after(Position(state.dispatch_seg, state.dispatch_pos)):
            return True
        due = self._queue._index.next_due_ms(state)
        return due is not None and due <= time.time() * 1000

    def _read(self, seg: int, pos: int, offset: int, max_records: int) -> ReadResult:
        result = self._queue._log.reader.read(Position(seg, pos), offset, max_records)
        if self._queue.on_corruption == "raise":
            for d in result.damage:
                if not d.length:
                    continue
                before = [(s, r) for s, r in result.records if r.offset < d.first_offset]
                if not before:
                    raise CorruptRecordError(self._queue._log.reader.segment_path(d.segment), d.pos, d.reason)
                # Deliver what comes before the damage first; the next read starts at it and raises.
                return ReadResult(before, Position(d.segment, d.pos), d.first_offset,
                                  [x for x in result.damage if x.next_offset <= d.first_offset])
        for d in result.damage:
            if d.length:
                log.warning("%s: group %r skipped offsets %d..%d: %s (bytes copied to quarantine/)",
                            self._queue.path, self.group, d.first_offset, d.next_offset - 1, d.reason)
        return result

    # ------------------------------------------------------------------ ack / nack

    def ack(self, msg: Message, *, result: Any = NO_RESULT) -> None:
        """Mark `msg` done for this group. Batched: durable within `ack_interval` seconds.

        Args:
            result: the task's return value, kept (with the ack, in one transaction) for
                `Queue.result` until `result_ttl` runs out.
        Raises:
            RecordTooLargeError: the encoded result is over max_result_bytes (not acked).
            SerializationError: the result cannot be encoded (not acked).
        """
        if msg._consumer is not self:
            msg._consumer.ack(msg, result=result)
            return
        encoded = None if result is NO_RESULT else self._queue._encode_result(msg.offset, result)
        with self._lock:
            self._check_open()
            if self._held.pop(msg.offset, None) is None:
                return  # acked already (acks are idempotent)
            self._pending.append(msg.offset)
            if encoded is not None:
                self._results[msg.offset] = encoded
            n = len(self._pending)
        if self._ack_interval <= 0 or n >= ACK_BATCH:
            self.flush()
        elif n == 1:
            self._start_flusher()

    def nack(self, msg: Message, *, delay: float = 0.0) -> None:
        """Hand `msg` back to be delivered again (attempt + 1), not before `delay` seconds."""
        if not isinstance(delay, (int, float)) or delay < 0:
            raise ValueError("'delay' must be a non-negative number of seconds")
        if msg._consumer is not self:
            msg._consumer.nack(msg, delay=delay)
            return
        with self._lock:
            self._check_open()
            if self._held.pop(msg.offset, None) is None:
                return
            due = int((time.time() + delay) * 1000)
            self._exchange(nacks=[(msg.offset, msg._seg, msg._pos, due, True)])
        self._queue._notify_arrival()

    def release(self, msg: Message) -> None:
        """Hand `msg` back for immediate redelivery without counting this delivery.

        For work that was never really attempted (a pool shutting down, a breaker open).
        """
        if msg._consumer is not self:
            msg._consumer.release(msg)
            return
        with self._lock:
            self._check_open()
            if self._held.pop(msg.offset, None) is None:
                return
            # Handed-back messages are due at time 0, so among themselves they come back in
            # offset order, before anything retried later; the prefetched ones go back too, or
            # this consumer would hand them out before the one it released.
            nacks = [(msg.offset, msg._seg, msg._pos, HANDED_BACK_DUE, False)]
            nacks += [(g.offset, g.seg, g.pos, HANDED_BACK_DUE, False) for g in self._buffer]
            self._buffer.clear()
            self._exchange(nacks=nacks)
        self._queue._notify_arrival()

    def release_prefetched(self) -> None:
        """Hand back every prefetched (leased but not handed out) message, uncharged."""
        with self._lock:
            if self._closed or not self._buffer:
                return
            nacks = [(g.offset, g.seg, g.pos, HANDED_BACK_DUE, False) for g in self._buffer]
            self._buffer.clear()
            self._exchange(nacks=nacks)
        self._queue._notify_arrival()

    def extend(self, msg: Message, *, seconds: float) -> bool:
        """Keep `msg` leased for `seconds` more from now (a heartbeat for a long task).

        Returns False when the lease was already lost (it ran out and the message went to
        another consumer, or it is done): the task should then expect to run twice.
        """
        if not isinstance(seconds, (int, float)) or seconds <= 0:
            raise ValueError("'seconds' must be a positive number")
        if msg._consumer is not self:
            return msg._consumer.extend(msg, seconds=seconds)
        with self._lock:
            self._check_open()
            if msg.offset not in self._held:
                return False
            deadline = int((time.time() + seconds) * 1000)
            kept = self._queue._index.extend(self.group, self._owner, msg.offset, msg._seg, msg._pos,
                                             msg.attempt, deadline)
            if kept:
                msg._deadline_ms = deadline
            return kept

    def dead_letter(self, msg: Message, *, reason: str, error: BaseException | None = None,
                    extra: dict[str, Any] | None = None) -> None:
        """Move `msg` to the dead-letter queue with why it died, then ack it here.

        The DLQ copy is durable before the ack, so a crash in between duplicates the message in
        the DLQ rather than losing it.
        """
        if msg._consumer is not self:
            msg._consumer.dead_letter(msg, reason=reason, error=error, extra=extra)
            return
        self._queue._dead_letter(self, msg, reason=reason, error=error, extra=extra)

    def reclaim_dead(self) -> int:
        """Make the leases held by processes that no longer exist deliverable now; return how many."""
        self._next_reap = time.monotonic() + REAP_SECONDS
        n = self._queue._index.reap_dead_owners(self.group)
        if n:
            self._queue._notify_arrival()
        return n

    @property
    def lease(self) -> float:
        """Seconds a delivered message stays leased to this consumer before it may go elsewhere."""
        return self._lease_ms / 1000.0

    @lease.setter
    def lease(self, seconds: float) -> None:
        if not isinstance(seconds, (int, float)) or seconds <= 0:
            raise ValueError("'lease' must be a positive number of seconds")
        self._lease_ms = int(seconds * 1000)

    def settle(self, msg: Message) -> None:
        """Forget `msg` locally without an ack (it was dead-lettered and acked by offset)."""
        with self._lock:
            self._held.pop(msg.offset, None)

    def ack_offset(self, offset: int) -> None:
        with self._lock:
            self._pending.append(offset)
        self.flush()

    def flush(self) -> None:
        """Make every pending ack of this consumer durable now."""
        with self._lock:
            if self._closed or (not self._pending and not self._skips):
                return
            self._exchange()
        self._queue._after_commit(self._state)

    def _start_flusher(self) -> None:
        if self._flusher is None or not self._flusher.is_alive():
            self._flusher = threading.Thread(target=self._flush_loop, name=f"pqueue-acks:{self.group}",
                                             daemon=True)
            self._flusher.start()
        self._flush_event.set()

    def _flush_loop(self) -> None:
        while not self._closed:
            self._flush_event.wait()
            self._flush_event.clear()
            if self._closed:
                return
            time.sleep(self._ack_interval)
            try:
                self.flush()
            except Exception:
                log.exception("%s: committing acks of group %r failed; they will be retried",
                              self._queue.path, self.group)

    # ------------------------------------------------------------------ queries

    def qsize(self) -> int:
        """Messages of this group not yet acked (this handle's own acks count at once)."""
        end = self._queue._log.reader.tail_offset()
        # Under the lock, so the ack flusher cannot move acks from `_pending` into the index
        # between the two reads (they would be counted nowhere).
        with self._lock:
            counts = self._queue._index.counts(self.group)
            local = len(self._pending)
        if counts is None:
            return 0
        return max(0, end - counts.committed - counts.acked_above - local)

    def _pending_result(self, offset: int) -> list[Any] | None:
        """A result acked by this handle but not committed yet, shaped like Index.result()."""
        with self._lock:
            encoded = self._results.get(offset)
        return None if encoded is None else ["done", encoded[0], encoded[1]]

    def empty(self) -> bool:
        return self.qsize() == 0

    def status(self, offset: int) -> str:
        with self._lock:
            if offset in self._pending:
                return "done"
            state = self._queue._index.status(self.group, offset)
        if state in (None, "pending"):
            return "delayed" if self._delayed_ahead(offset) else "pending"
        return state

    def _delayed_ahead(self, offset: int) -> bool:
        """Whether a record no consumer of the group has reached yet carries a future not-before.

        Looks ahead at most STATUS_LOOKAHEAD records from the dispatch cursor (beyond, it
        reports "pending": knowing would mean reading that much of the log).
        """
        g = self._queue._index.peek(self.group)
        if g is None or not 0 <= offset - g.dispatch < STATUS_LOOKAHEAD:
            return False
        result = self._queue._log.reader.read(Position(g.dispatch_seg, g.dispatch_pos), g.dispatch,
                                              offset - g.dispatch + 1)
        for _seg, rec in result.records:
            if rec.offset == offset:
                not_before = rec.attrs.get(ATTR_NOT_BEFORE) if rec.attrs else None
                if not_before is None:
                    return False
                due = schedule.due_at(float(not_before), rec.timestamp_ns / 1e9, rec.attrs.get(ATTR_BOOT), time.time())
                return due > time.time()
        return False

    # ------------------------------------------------------------------ lifecycle

    def _hand_back(self, grants: list[Grant]) -> None:
        self._queue._index.exchange(self.group, self._owner,
                                    nacks=[(g.offset, g.seg, g.pos, HANDED_BACK_DUE, False) for g in grants])

    def close(self) -> None:
        """Commit pending acks and hand back every lease (prefetched or held), uncharged."""
        with self._lock:
            if self._closed:
                return
            nacks = [(g.offset, g.seg, g.pos, HANDED_BACK_DUE, False) for g in self._buffer]
            nacks += [(m.offset, m._seg, m._pos, HANDED_BACK_DUE, False) for m in self._held.values()]
            if nacks or self._pending or self._skips:
                self._exchange(nacks=nacks)
            self._buffer.clear()
            self._held.clear()
            self._closed = True
        self._flush_event.set()

    def after_fork_in_child(self) -> None:
        """The parent owns the leases: forget them here and take a new owner identity."""
        self._lock = threading.RLock()
        self._buffer.clear()
        self._held.clear()
        self._pending = []
        self._skips = []
        self._results = {}
        self._flusher = None
        self._flush_event = threading.Event()
        self._batch_started = 0.0
        self._reset_owner()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"consumer {self.group!r} of {self._queue.path} is closed")

    def __repr__(self) -> str:
        return f"<Consumer {self.group!r} of {self._queue.path!r}>"

    def _info(self) -> dict[str, Any]:
        return {"group": self.group, "held": len(self._held), "prefetched": len(self._buffer)}


__all__ = ["Consumer", "check_timeout"]
