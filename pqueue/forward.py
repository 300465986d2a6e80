"""The forwarder: a consumer group that ships a queue's records to a broker, commit after ack.

pqueue stays the crash-safe local buffer; a forwarder drains it into a Sink (Redis Streams,
NATS JetStream, MQTT, see ``pqueue.sinks``) at least once and in offset order, surviving
broker outages, its own crashes and full disks. It is an ordinary consumer group, so its
committed offset is the shipped watermark, retention keeps every segment it has not shipped,
and ``pqueue stat`` shows its lag.

The loop, in one thread, with at most one batch in flight (``max_in_flight=1``):

1. Take up to ``batch`` records / ``max_batch_bytes`` from the group (lingering up to
   ``linger`` seconds for a fuller batch). Records older than ``max_age`` or larger than the
   sink allows go to the dead-letter queue at once; they never block the stream.
2. ``sink.send(batch, timeout)``. A transient error or a timeout keeps the batch in memory and
   re-sends it after a jittered exponential backoff, forever: a timed-out write may have been
   applied, and the sink's dedup key (source id + offset) makes the re-send harmless.
3. For the acknowledged prefix: dead-letter the rejected records (DLQ first, then ack), ack the
   rest, and flush the consumer so the commit is durable. The unacknowledged tail stays in
   memory and is re-sent first, so offset N+1 is never shipped before N is settled.

Commit rule: the group's offset moves past a record only after the sink acknowledged it or it
was written to the dead-letter queue. A crash anywhere means a re-send, never a loss.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, final

from .backoff import Backoff
from .consumer import Consumer
from .errors import Empty, QueueError
from .message import Message
from .queue import Queue
from .serializers import CODEC_NAMES
from .sinks.base import (
    HEADER_CODEC,
    HEADER_OFFSET,
    HEADER_SOURCE,
    HEADER_TIMESTAMP,
    OutRecord,
    SendResult,
    Sink,
    SinkError,
    SourceInfo,
    TransientSinkError,
)

log = logging.getLogger(__name__)

DEFAULT_GROUP = "forwarder"
BATCH_RECORDS = 500  # records per send at most
BATCH_BYTES = 1 << 20  # 1 MiB of payload per send at most (a single larger record goes alone)
LINGER_SECONDS = 0.05  # wait this long for a fuller batch once one record is in hand
SEND_TIMEOUT_SECONDS = 10.0  # a send without an answer by then is "unknown": back off, re-send
IDLE_POLL_SECONDS = 0.2  # an idle forwarder looks at its stop flag this often
LEASE_SECONDS = 300.0  # the group's lease: a batch held through a short outage keeps its lease
# Jitter spreads the reconnects of many edge boxes after a central outage.
DEFAULT_BACKOFF = Backoff(initial=0.5, multiplier=2.0, maximum=30.0, jitter=0.2)
HEADER_GAP_FROM = "pq-gap-from"  # first offset that will never be shipped (dropped, expired)
HEADER_GAP_TO = "pq-gap-to"  # last offset of that gap

# States reported by stats().
STATE_STARTING = "starting"  # the thread runs, the sink is not connected yet
STATE_CONNECTED = "connected"  # the last send (or open) succeeded
STATE_BACKOFF = "backoff"  # the last send or open failed; waiting to retry
STATE_STOPPED = "stopped"  # not running (never started, stopped, or failed)


@final
@dataclass(frozen=True)
class ForwarderStats:
    """A snapshot of a forwarder.

    Attributes:
        state: "starting", "connected", "backoff" or "stopped".
        shipped: records the sink acknowledged in this run (and the group committed).
        duplicates: of those, re-sends the sink already held (absorbed by its dedup key).
        reconciled: records skipped at start because the sink already held them.
        dead_lettered: records moved to the DLQ (rejected, too large or older than max_age).
        retries: failed sends and connection attempts in this run.
        gaps: offsets that will never be shipped because they vanished before the forwarder
            reached them (dropped by a cap, expired, damaged), announced with gap headers.
        lag_records: records of the queue not yet shipped (committed offset to tail).
        lag_bytes: log bytes from the oldest unshipped record to the tail (an estimate).
        oldest_unshipped_age: seconds since the oldest record in hand was put; None if none.
        last_ack_at: Unix time of the last acknowledged send; None before the first.
        last_error: the last send or connection error, as text; None if none yet.
    """

    state: str
    shipped: int
    duplicates: int
    reconciled: int
    dead_lettered: int
    retries: int
    gaps: int
    lag_records: int
    lag_bytes: int
    oldest_unshipped_age: float | None
    last_ack_at: float | None
    last_error: str | None


@final
class Forwarder:
    """Ships the records of `queue` to `sink`, at least once, in offset order.

    Contract:
        * The group's committed offset passes a record only after the sink acknowledged it or
          it was durably written to the dead-letter queue (DLQ first, then ack). A crash or an
          outage causes re-sends, never loss; sinks with an idempotent write (Redis Streams
          with a per-source key, NATS JetStream with msg ids) absorb the re-sends.
        * Offset order per queue: one batch in flight; the unacknowledged tail of a batch is
          re-sent before anything newer is taken.
        * Memory is bounded by one batch (`batch` records, `max_batch_bytes`), however long
          the backlog after an outage; `rate_limit` caps the catch-up rate.
        * Retries forever with capped, jittered backoff; only `max_age` and the sink's size
          limit give a record up (to the DLQ, with the reason).

    Known limits: one forwarder per (queue, group) at a time; a second one on the same group
    would share the work and break the ordering (not the at-least-once promise).
    """

    def __init__(
        self,
        queue: Queue,
        sink: Sink,
        *,
        group: str = DEFAULT_GROUP,
        batch: int = BATCH_RECORDS,
        max_batch_bytes: int = BATCH_BYTES,
        linger: float = LINGER_SECONDS,
        backoff: Backoff | None = None,
        rate_limit: float | None = None,
        max_age: float | None = None,
        reconcile: bool = True,
        send_timeout: float = SEND_TIMEOUT_SECONDS,
    ) -> None:
        if not isinstance(batch, int) or batch < 1:
            raise ValueError("'batch' must be a positive int")
        if not isinstance(max_batch_bytes, int) or max_batch_bytes < 1:
            raise ValueError("'max_batch_bytes' must be a positive int")
        for name, value in (("linger", linger), ("send_timeout", send_timeout)):
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"'{name}' must be a non-negative number of seconds")
        if rate_limit is not None and (not isinstance(rate_limit, (int, float)) or rate_limit <= 0):
            raise ValueError("'rate_limit' must be a positive number of records per second, or None")
        if max_age is not None and (not isinstance(max_age, (int, float)) or max_age <= 0):
            raise ValueError("'max_age' must be a positive number of seconds, or None")
        self.queue = queue
        self.sink = sink
        self.group = group
        self.batch = batch
        self.max_batch_bytes = max_batch_bytes
        self.linger = float(linger)
        self.backoff = backoff if backoff is not None else DEFAULT_BACKOFF
        self.rate_limit = rate_limit
        self.max_age = max_age
        self.reconcile = reconcile
        self.send_timeout = float(send_timeout)
        self._consumer: Consumer = queue.consumer(group)
        # A batch held through an outage keeps its lease, so the prefetched records behind it
        # are not reclaimed and re-leased one by one (one LMDB commit each) on recovery.
        self._consumer.lease = max(self._consumer.lease, LEASE_SECONDS)
        self._source = SourceInfo(queue.source_id, os.path.basename(os.path.normpath(queue.path)),
                                  queue.identity.created_ms)
        # Owned by the forwarder thread alone: the batch in hand (ascending offsets), its
        # OutRecords, and the record taken beyond max_batch_bytes that starts the next batch.
        self._pending: list[Message] = []
        self._out: list[OutRecord] = []
        self._carry: Message | None = None
        self._skip_through = -1  # offsets at or below it the sink already holds (reconciliation)
        self._expected: int | None = None  # the offset that should come next (gap detection)
        self._gap: tuple[int, int] | None = None
        self._opened = False
        self._failures = 0  # consecutive failures, for the backoff
        self._next_send_at = 0.0  # monotonic time before which rate_limit forbids a send
        # _stats_lock guards the counters below; stats() reads them from other threads.
        self._stats_lock = threading.Lock()
        self._state = STATE_STOPPED
        self._shipped = self._duplicates = self._reconciled = self._dead = self._retries = self._gaps = 0
        self._oldest_ts: float | None = None
        self._oldest_pos: tuple[int, int] | None = None
        self._last_ack_at: float | None = None
        self._last_error: str | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Forwarder:
        """Start the forwarding thread (idempotent while it runs).

        Returns:
            self, so ``pqueue.forward(...).start()`` chains.
        """
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._error = None
        self._set_state(STATE_STARTING)
        self._thread = threading.Thread(target=self._run_safely, name=f"pqueue-forward:{self.group}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> bool:
        """Stop after the batch in flight: commit what the sink acknowledged, hand back the rest.

        Args:
            timeout: seconds to wait for the thread (None: as long as it takes).
        Returns:
            True if the thread ended in time (a send still in flight ends within send_timeout).
        """
        self._stop.set()
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def run(self) -> None:
        """Forward in the calling thread until `stop()` is called (from a signal handler, say).

        For a forwarder that is its own process (``pqueue forward``).

        Raises:
            SinkError: the sink cannot work as configured.
            QueueError: the queue failed (disk, index) in a way a retry cannot fix.
        """
        self._stop.clear()
        self._set_state(STATE_STARTING)
        self._run()

    def __enter__(self) -> Forwarder:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def error(self) -> BaseException | None:
        """The error that ended the thread, if one did (it is also logged)."""
        return self._error

    # ------------------------------------------------------------------ stats

    def stats(self) -> ForwarderStats:
        """A consistent snapshot of the counters, plus the group's lag read from the index."""
        try:
            lag = self._consumer.qsize()
        except QueueError:  # a closed queue: report what the counters know
            lag = 0
        with self._stats_lock:
            oldest_ts, oldest_pos = self._oldest_ts, self._oldest_pos
            snapshot = (self._state, self._shipped, self._duplicates, self._reconciled, self._dead, self._retries,
                        self._gaps)
            last_ack, last_error = self._last_ack_at, self._last_error
        age = None if oldest_ts is None else max(0.0, time.time() - oldest_ts)
        return ForwarderStats(*snapshot, lag_records=lag, lag_bytes=self._lag_bytes(oldest_pos) if lag else 0,
                              oldest_unshipped_age=age, last_ack_at=last_ack, last_error=last_error)

    def _lag_bytes(self, start: tuple[int, int] | None) -> int:
        """Log bytes from `start` (segment, pos), or from the group's committed position, to the end."""
        if start is None:
            state = self.queue._index.peek(self.group)
            if state is None:
                return 0
            start = (state.committed_seg, state.committed_pos)
        seg0, pos0 = start
        total = 0
        log_ = self.queue._log.reader
        for base in log_.segments(refresh=False):
            if base < seg0:
                continue
            try:
                size = os.path.getsize(log_.segment_path(base))
            except OSError:
                continue  # deleted by retention meanwhile
            total += size - pos0 if base == seg0 else size
        return max(0, total)

    def _set_state(self, state: str, error: BaseException | None = None) -> None:
        with self._stats_lock:
            self._state = state
            if error is not None:
                self._last_error = f"{type(error).__name__}: {error}"

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(self, "_" + name, getattr(self, "_" + name) + delta)

    # ------------------------------------------------------------------ the loop

    def _run_safely(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            # A sink misconfiguration or a queue failure a retry cannot fix: stop, keep the
            # reason for `error` and stats(), and leave everything unshipped in the queue.
            self._error = exc
            self._set_state(STATE_STOPPED, exc)
            log.exception("forwarder of %s (group %r) stopped", self.queue.path, self.group)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._opened and not self._open_sink():
                    continue
                if not self._pending:
                    self._wait_for_rate()
                    self._fill()
                    if not self._pending:
                        continue
                self._ship()
        finally:
            self._shutdown()

    def _open_sink(self) -> bool:
        """Connect and reconcile; on a transient failure back off and return False."""
        try:
            self.sink.open(self._source)
            shipped = self.sink.last_shipped() if self.reconcile else None
        except TransientSinkError as exc:
            self._failed(exc)
            return False
        except SinkError:
            raise
        except Exception as exc:
            # A client library's own error class we did not map: treat as an outage, retry.
            self._failed(exc)
            return False
        state = self.queue._index.peek(self.group)
        if self._expected is None and state is not None:
            self._expected = state.committed  # everything below was shipped or dead-lettered
        if shipped is not None:
            self._skip_through = max(self._skip_through, shipped)
            self._expected = max(self._expected or 0, shipped + 1)
            log.info("forwarder of %s: the sink holds offsets through %d; skipping them", self.queue.path, shipped)
        self._opened = True
        self._failures = 0
        self._set_state(STATE_CONNECTED)
        return True

    def _failed(self, exc: BaseException) -> None:
        """Count a failed send or connect and sleep the backoff (cut short by stop)."""
        self._failures += 1
        self._count(retries=1)
        self._set_state(STATE_BACKOFF, exc)
        delay = self.backoff.delay(self._failures)
        log.warning("forwarder of %s: %s: %s; retry %d in %.2f s", self.queue.path, type(exc).__name__, exc,
                    self._failures, delay)
        self._stop.wait(delay)

    def _wait_for_rate(self) -> None:
        if self.rate_limit is not None:
            wait = self._next_send_at - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)

    def _batch_limit(self) -> int:
        # Under a rate limit a batch holds at most one second's worth, so the pace is smooth.
        if self.rate_limit is None:
            return self.batch
        return max(1, min(self.batch, int(self.rate_limit)))

    def _fill(self) -> None:
        """Take the next batch from the group: non-blocking gets, lingering for a fuller batch."""
        limit = self._batch_limit()
        size = 0
        linger_until: float | None = None
        held = {m.offset for m in self._pending}
        while len(self._pending) < limit and not self._stop.is_set():
            msg = self._carry
            self._carry = None
            if msg is None:
                msg = self._next(linger_until)
                if msg is None:
                    break
            if msg.offset in held:
                continue  # a re-lease of a record already in hand (its lease ran out): same record
            if self._pending and size + len(msg._payload) > self.max_batch_bytes:
                self._carry = msg  # starts the next batch; handing it back could reorder it
                break
            if msg.offset <= self._skip_through:
                self._consumer.ack(msg)  # reconciliation: the sink already holds it
                self._count(reconciled=1)
                continue
            self._check_gap(msg.offset)
            if self._screen(msg):
                continue
            self._pending.append(msg)
            held.add(msg.offset)
            size += len(msg._payload)
            if linger_until is None:
                linger_until = time.monotonic() + self.linger
        if not self._pending:
            self._consumer.flush()  # reconciled or dead-lettered acks: make them durable now
            return
        # The core hands out fresh records in offset order; sorting guards the order promise
        # against re-leased ones mixed in after a crash.
        self._pending.sort(key=lambda m: m.offset)
        self._out = [self._to_out(m) for m in self._pending]
        first = self._pending[0]
        with self._stats_lock:
            self._oldest_ts = first.timestamp
            self._oldest_pos = (first._seg, first._pos)

    def _next(self, linger_until: float | None) -> Message | None:
        """The next message: at once if ready, else wait up to the linger (or idle poll) time."""
        try:
            return self._consumer.get(block=False)
        except Empty:
            pass
        wait = IDLE_POLL_SECONDS if linger_until is None else linger_until - time.monotonic()
        if wait <= 0:
            return None
        try:
            return self._consumer.get(timeout=wait)
        except Empty:
            return None

    def _screen(self, msg: Message) -> bool:
        """Dead-letter a record that must not be sent (too old, too large); True if it was."""
        reason = None
        extra: dict[str, Any] = {"sink": type(self.sink).__name__}
        if self.max_age is not None and time.time() - msg.timestamp > self.max_age:
            reason = "expired"
            extra["max_age"] = self.max_age
        elif len(msg._payload) > self.sink.max_record_bytes:
            reason = "too_large"
            extra["max_record_bytes"] = self.sink.max_record_bytes
        if reason is None:
            return False
        # DLQ first, then ack (Consumer.dead_letter does both, in that order, durably).
        self._consumer.dead_letter(msg, reason=reason, extra=extra)
        self._count(dead=1)
        log.warning("forwarder of %s: offset %d dead-lettered (%s)", self.queue.path, msg.offset, reason)
        return True

    def _check_gap(self, offset: int) -> None:
        """Note offsets that vanished before the forwarder reached them, to announce them."""
        if self._expected is not None and offset > self._expected:
            # Dropped by a cap, expired, or damaged: tell the central side on the next shipped
            # record rather than pretending continuity.
            first = self._expected if self._gap is None else self._gap[0]
            self._gap = (first, offset - 1)
            self._count(gaps=offset - self._expected)
            log.warning("forwarder of %s: offsets %d..%d will never be shipped (gone before forwarding)",
                        self.queue.path, self._expected, offset - 1)
        self._expected = max(self._expected or 0, offset + 1)

    def _to_out(self, msg: Message) -> OutRecord:
        headers = {
            HEADER_SOURCE: self._source.id,
            HEADER_OFFSET: str(msg.offset),
            HEADER_TIMESTAMP: str(int(msg.timestamp * 1000)),
            HEADER_CODEC: CODEC_NAMES.get(msg._codec, str(msg._codec)),
        }
        if self._gap is not None and msg is self._pending[0]:
            headers[HEADER_GAP_FROM], headers[HEADER_GAP_TO] = str(self._gap[0]), str(self._gap[1])
        return OutRecord(msg.offset, msg.timestamp, msg._payload, headers)

    def _ship(self) -> None:
        """Send the batch in hand once; settle its acknowledged prefix; keep the tail."""
        started = time.monotonic()
        try:
            result = self.sink.send(self._out, self.send_timeout)
        except SinkError as exc:
            if not isinstance(exc, TransientSinkError):
                raise
            self._failed(exc)
            return
        except Exception as exc:
            self._failed(exc)  # an unmapped client error: an outage until proven otherwise
            return
        if self.rate_limit is not None:
            self._next_send_at = max(self._next_send_at, started) + len(self._out) / self.rate_limit
        settled = self._settle(result)
        if settled == 0:
            self._failed(TransientSinkError(f"{type(self.sink).__name__} acknowledged nothing"))
            return
        self._failures = 0
        self._set_state(STATE_CONNECTED)

    def _settle(self, result: SendResult) -> int:
        """Dead-letter rejected records and ack the rest of the acknowledged prefix; durably."""
        through = result.acked_through
        if through is None:
            return 0
        n = 0
        while n < len(self._pending) and self._pending[n].offset <= through:
            n += 1
        if n == 0:
            return 0
        rejected = {off: reason for off, reason in result.rejected if off <= through}
        shipped = 0
        for msg in self._pending[:n]:
            reason = rejected.get(msg.offset)
            if reason is None:
                self._consumer.ack(msg)
                shipped += 1
            else:
                # DLQ first, then ack: a crash in between duplicates it in the DLQ, never loses it.
                self._consumer.dead_letter(msg, reason="rejected", extra={"sink": type(self.sink).__name__,
                                                                         "sink_reason": reason})
                log.warning("forwarder of %s: offset %d rejected by the sink: %s", self.queue.path, msg.offset,
                            reason)
        # The commit must be durable before anything newer is taken: a crash after this point
        # re-sends nothing that was acknowledged.
        self._consumer.flush()
        self._gap = None  # it rode on the first record, which is settled now
        del self._pending[:n]
        del self._out[:n]
        rest = self._pending[0] if self._pending else None
        with self._stats_lock:
            self._shipped += shipped
            self._duplicates += result.duplicates
            self._dead += n - shipped
            self._last_ack_at = time.time()
            self._oldest_ts = rest.timestamp if rest is not None else None
            self._oldest_pos = (rest._seg, rest._pos) if rest is not None else None
        return n

    def _shutdown(self) -> None:
        """Hand back what was never acknowledged (uncharged), commit acks, close the sink."""
        errors: list[BaseException] = []
        for step in (self._hand_back, self._consumer.flush, self.sink.close):
            try:
                step()
            except Exception as exc:
                errors.append(exc)
        self._opened = False
        with self._stats_lock:
            self._state = STATE_STOPPED
            self._oldest_ts = self._oldest_pos = None
        if errors:
            log.error("forwarder of %s: shutting down: %s", self.queue.path, errors[0])

    def _hand_back(self) -> None:
        """Release the records in hand, then the consumer's prefetched ones, in offset order.

        Both become due now, uncharged; the index hands due records out by (due time, offset),
        so releasing the lower offsets first keeps them first (`release` also hands back the
        prefetch buffer, and `release_prefetched` covers the case with nothing in hand).
        """
        held = self._pending + ([self._carry] if self._carry is not None else [])
        self._pending, self._out, self._carry = [], [], None
        for msg in sorted(held, key=lambda m: m.offset):
            self._consumer.release(msg)
        self._consumer.release_prefetched()


def forward(
    queue: Queue,
    *,
    sink: Sink,
    group: str = DEFAULT_GROUP,
    batch: int = BATCH_RECORDS,
    max_batch_bytes: int = BATCH_BYTES,
    linger: float = LINGER_SECONDS,
    backoff: Backoff | None = None,
    rate_limit: float | None = None,
    max_age: float | None = None,
    reconcile: bool = True,
    send_timeout: float = SEND_TIMEOUT_SECONDS,
) -> Forwarder:
    """Build a forwarder that ships `queue` to `sink` (call ``start()``, or use it in ``with``).

    Args:
        queue: the queue to drain; the forwarder reads through consumer group `group`.
        sink: where to ship (``pqueue.sinks.RedisStreamSink``, ``NatsJetStreamSink``, ``MqttSink``).
        group: the consumer group whose committed offset is the shipped watermark.
        batch: records per send at most.
        max_batch_bytes: payload bytes per send at most (a larger single record goes alone).
        linger: seconds to wait for a fuller batch once a record is in hand.
        backoff: delays between failed sends; default 0.5 s doubling to 30 s, 20 % jitter.
        rate_limit: records per second at most (for catch-up after an outage); None: no cap.
        max_age: seconds; older records go to the dead-letter queue (reason "expired").
        reconcile: at start, ask the sink what it already holds and skip it.
        send_timeout: seconds to wait for the broker's acks of one batch.
    Returns:
        A stopped Forwarder.
    Raises:
        ValueError: an option out of range.
    """
    return Forwarder(queue, sink, group=group, batch=batch, max_batch_bytes=max_batch_bytes, linger=linger,
                     backoff=backoff, rate_limit=rate_limit, max_age=max_age, reconcile=reconcile,
                     send_timeout=send_timeout)


__all__ = ["Forwarder", "ForwarderStats", "forward"]
