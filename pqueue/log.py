"""The segmented log: append under the OS write lock, roll, recover, fsync policies, retention.

Writers in any number of processes append to the newest segment. Appends are serialized by
``fcntl.flock`` on ``write.lock``. A process holds that lock across a burst of appends (taking
it for every put would cost two syscalls, notes/hotpath.md goal 1) and gives it up when it has
been idle for ``IDLE_RELEASE_SECONDS`` or when another process asks for it through the waiter
byte mapped from ``write.lock`` (checked every ``HANDOFF_CHECK_PUTS`` puts). Under
``fsync="always"``, while other processes append too (one waited for the lock within
``SHARING_SECONDS``), a group commit's leader lets go right after its write: its fdatasync
takes a hundred times longer than taking the lock again, and another process can write its own
group meanwhile, so the two fdatasyncs overlap. Alone, a process keeps the lock: two flock
calls and an lseek for every put would cost it a few per cent for nothing.

Whoever takes the lock learns other processes' appends with one ``lseek(SEEK_END)``. If the
file grew, the end the last holder left in ``write.lock`` (segment, position, next offset, with
a CRC32C) says where the log ends, provided it is this segment's true end; otherwise the new
bytes are scanned (following SEAL trailers into newer segments).

Fsync policies (``FsyncPolicy``):

* ``always``: `append` returns only after an fdatasync covering its record. Concurrent
  appenders share one write and one fsync (group commit, `commit.py`).
* interval (default, 100 ms): a background thread fsyncs within ``interval`` seconds of the
  first unsynced write; with a record bound (``"50ms/1000"``) an append that leaves ``every``
  records unsynced syncs at once itself, so the bound is strict.
* ``never``: the OS decides; segments are still fsynced when sealed and on close.

Recovery: opening as a writer scans only from the recovery point (the last position known to
be fsynced, kept in the index) to the end of the newest segment. A torn or garbage tail is
copied to ``quarantine/`` and truncated; damage followed by valid records is rot, not a tail,
and is left for readers to skip. If the index has handed out offsets beyond the end of the
recovered log (a power loss cut the tail), the next records start above them: offsets are
never reused.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable

from crc32c import crc32c

from . import segment
from .commit import GroupCommit, Waiter
from .errors import DiskFullError, Full, QueueError, ReadOnlyError, RecordTooLargeError
from .policy import FsyncPolicy
from .reader import LogReader, RecoveryPoint
from .record import RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES, encode_record, encode_seal

log = logging.getLogger(__name__)
_pack_body = struct.Struct("<IQQBBH").pack  # the record header after its CRC field
_pack_crc = struct.Struct("<I").pack
_time_ns = time.time_ns

IDLE_RELEASE_SECONDS = 0.002  # give up the write lock after 2 ms without an append
HANDOFF_CHECK_PUTS = 256  # look at the waiter byte every 256 appends (a waiting writer waits ~1 ms at most)
SHARING_SECONDS = 1.0  # "always": a group lets go of the lock before its sync this long after contention
HANDOFF_BACKOFF_SECONDS = 0.0002  # after handing the lock over, let the waiter take it first
WAITER_POLL_SECONDS = 0.0001  # a waiting writer polls the lock this often ...
WAITER_POLL_LIMIT_SECONDS = 0.05  # ... for at most 50 ms, then blocks in flock()
RECOVERY_POINT_SECONDS = 1.0  # persist the recovery point at most once a second
FULL_POLL_SECONDS = 0.01  # a put blocked by max_bytes looks for room this often
# write.lock: byte 0 is the "a writer is waiting" flag; at LEFT_END_AT the end of the log as
# the last holder left it (segment, position, next offset, CRC32C of the three).
LEFT_END_AT = 8
_LEFT_END = struct.Struct("<QQQ")
LOCK_FILE_BYTES = LEFT_END_AT + _LEFT_END.size + 4  # 36 bytes


def _is_space_error(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class Log:
    """The segmented log of one queue directory, for one process.

    Thread-safe. Appends from this process are serialized by ``_wlock``; across processes by
    the flock on ``write.lock``. Readers use their own descriptors and never take either lock.
    """

    def __init__(
        self,
        path: str,
        *,
        segment_bytes: int,
        fsync: FsyncPolicy,
        max_record_bytes: int,
        load_recovery_point: Callable[[], RecoveryPoint | None],
        save_recovery_point: Callable[[RecoveryPoint], None],
        min_next_offset: Callable[[], int],
        on_append: Callable[[], None],
        max_bytes: int | None = None,
        on_full: str = "block",
        on_drop: Callable[[int, int], None] = lambda first, nxt: None,
        retain: Callable[[], None] = lambda: None,
    ) -> None:
        self.path = path
        self.log_dir = os.path.join(path, "log")
        self.quarantine_dir = os.path.join(path, "quarantine")
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.max_record_bytes = max_record_bytes
        self._load_rp = load_recovery_point
        self._save_rp = save_recovery_point
        self._min_next_offset = min_next_offset
        self._on_append = on_append
        self.max_bytes = max_bytes
        self.on_full = on_full
        self._on_drop = on_drop
        self._retain = retain
        self.waiters = 0  # getters of this process blocked until the next append (Queue sets it)
        self.reader = LogReader(path, max_record_bytes=max_record_bytes, load_recovery_point=load_recovery_point,
                                min_next_offset=min_next_offset, writer_end=self._writer_end)
        self._init_writer_state()
        if fsync.mode == "always":
            # Every put joins the group commit; the plain `append` stays free of that branch.
            self.append = self._append_grouped  # type: ignore[method-assign]

    def _init_writer_state(self) -> None:
        # _wlock guards every field below up to _rp_due; it is held only for a write
        # (never across an fsync, so other threads can write while the leader syncs).
        self._wlock = threading.Lock()
        self._lock_fd = -1
        self._waiter_map: mmap.mmap | None = None
        self._have_flock = False
        self._recovered = False
        self._abandon_segment = False  # an fsync failed: recovery starts a new segment
        self._fd = -1  # append fd of the active segment
        self._seg = -1  # base offset of the active segment
        self._pos = 0  # end of the active segment, bytes
        self._next = 0  # next offset to hand out
        self._seq = 0  # records written by this process (a sequence, for fsync coverage)
        self._idle_mark = -1  # _seq at the last idle check
        self._shared_at = -SHARING_SECONDS  # monotonic time another process last wanted the lock
        self._seen_seq = 0  # _seq at the last maintenance tick (to date unsynced writes)
        self._last_tick = 0.0
        self._fd_users = 0  # fsyncs in flight on _fd
        self._retired: list[int] = []  # rolled-away fds to close once no fsync uses them
        self._unsynced_since = 0.0  # monotonic time of the first unsynced write, 0 if none
        self._rp_pending: RecoveryPoint | None = None  # last durable end, not yet persisted
        self._rp_saved: RecoveryPoint | None = None
        self._rp_due = 0.0
        # An append that reaches this sequence syncs before returning: moved by _group as
        # syncs complete, read without a lock by the hot path (a stale value only syncs early).
        self._sync_due_seq = 0
        self._group = GroupCommit(self.log_dir, write_group=self._write_group, capture=self._capture_active,
                                  fdatasync=self._fdatasync, on_synced=self._on_synced)
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False

    # ------------------------------------------------------------------ writing

    def append(self, codec: int, attrs: bytes, payload: bytes) -> int:
        """Append one record and return its offset; durable per the fsync policy on return.

        This is the hot path (notes/hotpath.md goal 1): one write() and no other system call
        while this process holds the OS lock, state in attributes, no helper calls.

        Raises:
            RecordTooLargeError: payload over max_record_bytes (nothing written).
            DiskFullError / ReadOnlyError / QueueError: the write failed and was rolled back.
        """
        n = len(payload)
        if n > self.max_record_bytes:
            raise self._too_large(n)
        wlock = self._wlock
        wlock.acquire()
        try:
            if not self._have_flock:
                self._take_flock()
            offset = self._next
            body = _pack_body(n, offset, _time_ns(), 0, codec, len(attrs)) + attrs + payload
            data = _pack_crc(crc32c(body)) + body
            try:
                if os.write(self._fd, data) != len(data):
                    self._short_write(data)
            except OSError as exc:
                raise self._failed_write(exc) from exc
            self._pos += len(data)
            self._next = offset + 1
            self._seq = seq = self._seq + 1
            if self._pos >= self.segment_bytes:
                self._roll(offset + 1)
            elif not seq & (HANDOFF_CHECK_PUTS - 1) and self._waiter_map is not None and self._waiter_map[0]:
                self._hand_over()
        finally:
            wlock.release()
        if seq >= self._sync_due_seq:
            self._commit(seq)
        if self.waiters:
            self._on_append()
        return offset

    def append_checked(
        self,
        codec: int,
        attrs: bytes,
        payload: bytes,
        *,
        before: Callable[[int, int, int], int | None] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Append one record after the checks a plain `append` skips; return its offset.

        Args:
            before: called as before(offset, segment, pos) with the append lock held, just
                before the write; returning an offset skips the write and returns that
                offset instead (an idempotency key seen before).
            timeout: how long a full byte cap (on_full="block") may wait for room; None is
                for ever, 0 is not at all.
        Raises:
            Full: over max_bytes with on_full="raise", or "block" ran out of time.
            and everything `append` raises.
        """
        if len(payload) > self.max_record_bytes:
            raise self._too_large(len(payload))
        self._acquire_room(RECORD_HEADER_BYTES + len(attrs) + len(payload), timeout)
        try:
            offset = self._next
            if before is not None:
                seen = before(offset, self._seg, self._pos)
                if seen is not None:
                    return seen
            seq = self._write_records(encode_record(offset, _time_ns(), codec, attrs, payload), 1)
        finally:
            self._wlock.release()
        self._after_append(seq)
        return offset

    def _acquire_room(self, need: int, timeout: float | None) -> None:
        """Return holding _wlock and the OS lock, with room for `need` more bytes.

        With on_full="block" the locks are let go while waiting for consumers to ack and
        retention to delete segments, for at most `timeout` seconds (None: for ever).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._wlock.acquire()
            try:
                if not self._have_flock:
                    self._take_flock()
                if self.max_bytes is None or self._make_room(need):
                    return
            except BaseException:
                self._wlock.release()
                raise
            self._wlock.release()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise Full(f"{self.path}: the queue holds {self.disk_bytes()} bytes, at its max_bytes="
                           f"{self.max_bytes}; nothing was written (waited {timeout} s for room)")
            time.sleep(FULL_POLL_SECONDS if remaining is None else min(FULL_POLL_SECONDS, remaining))

    def _make_room(self, need: int) -> bool:
        """Whether `need` more bytes fit under max_bytes (caller holds _wlock and the flock).

        on_full="raise" raises Full; "drop_oldest" deletes the oldest sealed segments, read or
        not, until the record fits; "block" returns False so the caller waits.
        """
        assert self.max_bytes is not None
        if self.disk_bytes() + need <= self.max_bytes:
            return True
        # Consumed data may still be on disk: retention runs when a group's committed offset
        # crosses a segment, and the active segment is never deleted. Seal a large active
        # segment so that its consumed records can go, then delete what every group is done with.
        if self._pos - SEGMENT_HEADER_BYTES >= self.max_bytes // 4:
            self._roll(self._next)
        self._retain()
        if self.disk_bytes() + need <= self.max_bytes:
            return True
        if self.on_full == "raise":
            raise Full(f"{self.path}: the queue holds {self.disk_bytes()} bytes and a record of {need} "
                       f"does not fit under max_bytes={self.max_bytes}; nothing was written")
        if self.on_full == "drop_oldest":
            bases = self.reader.segments()
            while len(bases) > 1 and self.disk_bytes() + need > self.max_bytes:
                first, nxt = bases[0], bases[1]
                self.reader.drop(first)
                try:
                    os.unlink(self.reader.segment_path(first))
                except FileNotFoundError:
                    pass
                segment.fsync_dir(self.log_dir)
                log.warning("%s: max_bytes=%d reached: dropped segment %d with offsets %d..%d, read or not",
                            self.path, self.max_bytes, first, first, nxt - 1)
                self._on_drop(first, nxt)
                bases = self.reader.segments()
            return self.disk_bytes() + need <= self.max_bytes or len(bases) <= 1
        return False

    def disk_bytes(self) -> int:
        """Bytes of all segment files now (one stat per segment)."""
        total = 0
        for base in self.reader.segments():
            try:
                total += os.stat(self.reader.segment_path(base)).st_size
            except FileNotFoundError:
                pass  # deleted meanwhile
        return total

    def append_many(self, items: list[tuple[int, bytes, bytes]], *, timeout: float | None = None) -> list[int]:
        """Append several records with one write and at most one fsync; return their offsets.

        All or nothing: a byte cap is checked for the whole batch first.
        """
        for _codec, _attrs, payload in items:
            if len(payload) > self.max_record_bytes:
                raise self._too_large(len(payload))
        if not items:
            return []
        need = sum(RECORD_HEADER_BYTES + len(a) + len(p) for _c, a, p in items)
        self._acquire_room(need, timeout)
        try:
            first = self._next
            now = time.time_ns()
            data = b"".join(encode_record(first + i, now, c, a, p) for i, (c, a, p) in enumerate(items))
            seq = self._write_records(data, len(items))
        finally:
            self._wlock.release()
        self._after_append(seq)
        return list(range(first, first + len(items)))

    # `append` inlines these three steps (its hot path cannot afford the calls).

    def _too_large(self, n: int) -> RecordTooLargeError:
        return RecordTooLargeError(f"a payload is {n} bytes, over max_record_bytes={self.max_record_bytes}; "
                                   f"nothing was written: split it or open the queue with a larger "
                                   f"max_record_bytes")

    def _write_records(self, data: bytes, count: int) -> int:
        """Write `count` framed records at the end (caller holds _wlock and the flock); their last seq."""
        try:
            if os.write(self._fd, data) != len(data):
                self._short_write(data)
        except OSError as exc:
            raise self._failed_write(exc) from exc
        self._pos += len(data)
        self._next += count
        self._seq += count
        if self._pos >= self.segment_bytes:
            self._roll(self._next)
        return self._seq

    def _after_append(self, seq: int) -> None:
        """Sync if the policy says so, then wake this process's blocked getters."""
        if seq >= self._sync_due_seq:
            self._commit(seq)
        if self.waiters:
            self._on_append()

    def _short_write(self, data: bytes) -> None:
        """A write() wrote part of `data` (the disk filled up, or a signal): finish or fail."""
        done = os.lseek(self._fd, 0, os.SEEK_END) - self._pos
        segment.write_all(self._fd, data[done:])

    def _failed_write(self, exc: OSError) -> QueueError:
        """Undo a failed append (caller holds _wlock) and say what happened.

        Part of the record may be in the file (rule 17): cut it off before anyone appends
        behind it; readers treat the partial bytes as a write in progress meanwhile. If even
        that fails, the writer gives up the OS lock and redoes recovery before the next append.
        """
        try:
            if self._fd >= 0 and self._have_flock:
                os.ftruncate(self._fd, self._pos)
        except OSError as trunc_exc:
            log.error("could not truncate a failed append in %s: %s", self.log_dir, trunc_exc)
            self._mark_broken()
        return self._write_error(exc)

    def _mark_broken(self) -> None:
        """Make the next append redo recovery (it re-reads the end of the log from disk)."""
        self._recovered = False
        self._close_active()
        self._drop_flock()

    def _write_error(self, exc: OSError) -> QueueError:
        if _is_space_error(exc):
            return DiskFullError(f"{self.log_dir}: no space left while appending ({exc.strerror}); "
                                 f"the partial record was rolled back, free space and retry")
        if exc.errno == errno.EROFS:
            return ReadOnlyError(f"{self.log_dir} is on a read-only filesystem; remount it read-write")
        return QueueError(f"{self.log_dir}: append failed: {exc}; the partial record was rolled back")

    def _on_synced(self, synced: int) -> None:
        """Everything up to `synced` is durable: move the point where an append must sync."""
        mode = self.fsync.mode
        if mode == "always":
            self._sync_due_seq = synced + 1
        elif mode == "interval" and self.fsync.every:
            self._sync_due_seq = synced + self.fsync.every
        else:
            self._sync_due_seq = 1 << 62

    # ------------------------------------------------------------------ group commit

    def _append_grouped(self, codec: int, attrs: bytes, payload: bytes) -> int:
        """`append` under fsync="always": the record is written and synced by a group commit."""
        n = len(payload)
        if n > self.max_record_bytes:
            raise self._too_large(n)
        offset = self._group.append((codec, attrs, payload))
        if self.waiters:
            self._on_append()
        return offset

    def _commit(self, seq: int) -> None:
        """Return once an fdatasync that started after append `seq` was written has succeeded."""
        self._group.wait(seq)

    def _write_group(self, group: list[Waiter]) -> tuple[int, int]:
        """Write the records of `group` with one write() in queue order and give them offsets.

        Returns the descriptor and sequence for `_fdatasync` (counted as a user of the fd).
        """
        with self._wlock:
            # Decided once: a lock taken without waking the maintenance thread must be let go.
            mono = time.monotonic()
            share = mono - self._shared_at < SHARING_SECONDS
            if not self._have_flock:
                self._take_flock(keep=not share)
            offset = self._next
            seq = self._seq
            now = _time_ns()
            parts = []
            for w in group:
                parts.append(encode_record(offset, now, *w.record))  # type: ignore[misc]
                w.offset = offset
                offset += 1
                w.seq = seq = seq + 1
            try:
                self._write_records(b"".join(parts), len(group))
            except BaseException:
                for w in group:
                    w.offset = -1
                raise
            synced = self._use_active_fd()
            if self._waiter_map is not None and self._waiter_map[0]:
                self._waiter_map[0] = 0
                self._shared_at = mono
                share = True
            if share:
                # Let go before the fdatasync (see the module docstring). Nobody then wakes the
                # maintenance thread to persist the recovery point: wake it when that is due.
                self._drop_flock()
                if mono >= self._rp_due:
                    self._ensure_thread()
            return synced

    def _capture_active(self) -> tuple[int, int]:
        """The active fd and the sequence a sync of it now covers, for `_fdatasync`."""
        with self._wlock:
            return self._use_active_fd()

    def _use_active_fd(self) -> tuple[int, int]:
        """The active fd and the sequence a sync of it now covers (caller holds _wlock)."""
        if self._fd >= 0:
            self._fd_users += 1
            self._unsynced_since = 0.0
        return self._fd, self._seq

    def _fdatasync(self, fd: int, target: int) -> tuple[int, BaseException | None]:
        """fdatasync `fd` (from `_use_active_fd`); return (`target`, the error or None)."""
        if fd < 0:
            return target, None
        try:
            os.fdatasync(fd)
        except OSError as exc:
            # fsyncgate: a failed fsync may have dropped the dirty pages; a later fsync would
            # "succeed" without them. Never retry: fail the waiting appends and move on to a
            # new segment (tests/test_log.py::test_fsync_error_fails_put_and_rolls).
            log.error("fsync of %s failed: %s; moving to a new segment", self.log_dir, exc)
            with self._wlock:
                self._release_fd_user(fd)
                if fd == self._fd:
                    self._mark_broken()
                    self._abandon_segment = True
            return target, exc
        with self._wlock:
            self._release_fd_user(fd)
            if target == self._seq and fd == self._fd:
                self._rp_pending = (self._seg, self._pos, self._next)
        return target, None

    def _release_fd_user(self, fd: int) -> None:
        self._fd_users -= 1
        if fd in self._retired and fd != self._fd:
            self._retired.remove(fd)
            os.close(fd)

    def sync(self) -> None:
        """fsync everything appended so far by this process (any policy)."""
        self._commit(self._seq)

    # ------------------------------------------------------------------ the OS write lock

    def _open_lock(self) -> None:
        lock_path = os.path.join(self.path, "write.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), segment.FILE_MODE)
        if os.fstat(fd).st_size < LOCK_FILE_BYTES:
            os.ftruncate(fd, LOCK_FILE_BYTES)
        self._lock_fd = fd
        self._waiter_map = mmap.mmap(fd, LOCK_FILE_BYTES)

    def _take_flock(self, *, keep: bool = True) -> None:
        """Take the OS append lock (caller holds _wlock), then catch up with other writers.

        `keep`: the lock is kept after this append, so the maintenance thread must time its
        idle release (False: the caller lets go itself, and waking that thread for every
        append would cost the caller a GIL hand-off).
        """
        if self._closed:
            raise QueueError("the queue is closed")
        if self._lock_fd < 0:
            self._open_lock()
        assert self._waiter_map is not None
        waited = 0.0
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                self._shared_at = time.monotonic()
                # Ask the holder to hand over, poll briefly (hand-over takes < HANDOFF_CHECK_PUTS appends),
                # then block: the holder also lets go after IDLE_RELEASE_SECONDS of idling.
                self._waiter_map[0] = 1
                if waited >= WAITER_POLL_LIMIT_SECONDS:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                    break
                time.sleep(WAITER_POLL_SECONDS)
                waited += WAITER_POLL_SECONDS
        self._have_flock = True
        self._idle_mark = -1
        try:
            if not self._recovered:
                self._recover()
            else:
                self._catch_up()
        except OSError as exc:
            self._recovered = False  # start over from the disk at the next append
            self._drop_flock()
            raise self._write_error(exc) from exc
        except BaseException:
            self._drop_flock()
            raise
        if keep:
            self._ensure_thread()

    def _drop_flock(self) -> None:
        if self._have_flock:
            if self._recovered and self._fd >= 0 and self._waiter_map is not None:
                end = _LEFT_END.pack(self._seg, self._pos, self._next)
                self._waiter_map[LEFT_END_AT:LOCK_FILE_BYTES] = end + _pack_crc(crc32c(end))
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            self._have_flock = False

    def _hand_over(self) -> None:
        """Another process waits for the append lock: give it up and let it go first."""
        assert self._waiter_map is not None
        self._waiter_map[0] = 0
        self._drop_flock()
        self._wlock.release()
        try:
            time.sleep(HANDOFF_BACKOFF_SECONDS)
        finally:
            self._wlock.acquire()

    def _catch_up(self) -> None:
        """Learn what other processes appended since this one last held the lock."""
        end = os.lseek(self._fd, 0, os.SEEK_END)
        if end == self._pos:
            return
        if not self._adopt_left_end(end):
            self._scan_to_end(self._seg, self._pos, self._next)

    def _adopt_left_end(self, end: int) -> bool:
        """Take the end the last holder left in write.lock if it is where our segment ends now.

        Saves scanning the records other processes appended since we last held the lock. The
        end is written just before the lock is given up, so it ends at a record boundary; it is
        trusted only if its CRC holds (a writer killed while writing it leaves a bad one) and it
        names our segment and its current size: anything appended after it, a torn record
        included, or a roll, makes the size differ, and then the bytes are scanned.
        """
        assert self._waiter_map is not None
        raw = self._waiter_map[LEFT_END_AT:LOCK_FILE_BYTES]
        if crc32c(raw[:_LEFT_END.size]) != int.from_bytes(raw[_LEFT_END.size:], "little"):
            return False
        seg, pos, next_offset = _LEFT_END.unpack_from(raw)
        if seg != self._seg or pos != end or pos <= self._pos or next_offset <= self._next:
            return False
        self._pos, self._next = pos, next_offset
        return True

    # ------------------------------------------------------------------ recovery

    def _recover(self) -> None:
        """Find the true end of the log and open the active segment (caller holds the flock)."""
        os.makedirs(self.log_dir, mode=segment.DIR_MODE, exist_ok=True)
        bases = segment.list_segments(self.log_dir)
        floor = self._min_next_offset()
        if not bases:
            self._open_new_segment(floor)
        else:
            newest = bases[-1]
            if self._open_existing(newest):
                rp = self._load_rp()
                pos, next_offset = SEGMENT_HEADER_BYTES, newest
                size = os.lseek(self._fd, 0, os.SEEK_END)
                # A recovery point beyond the end of the file means the file was cut by hand
                # or the index is stale: trust the file and scan it from its header.
                if rp is not None and rp[0] == newest and SEGMENT_HEADER_BYTES <= rp[1] <= size:
                    pos, next_offset = rp[1], rp[2]
                self._scan_to_end(newest, pos, next_offset)
        if floor > self._next:
            # The index handed out offsets that the log no longer has (power loss cut the
            # tail): never reuse them. Seal here and start a segment at the floor.
            log.warning("%s: log ends at offset %d but offsets up to %d were handed out; "
                        "continuing at %d", self.log_dir, self._next, floor - 1, floor)
            self._roll(floor)
        elif self._abandon_segment:
            # An fsync of this segment failed: its pages may be gone from the disk while the
            # kernel calls them clean (fsyncgate). Never append behind them again.
            self._roll(self._next)
        self._abandon_segment = False
        self._recovered = True
        self._rp_pending = (self._seg, self._pos, self._next)

    def _open_existing(self, base: int) -> bool:
        """Make segment `base` the active one; False if it had to be (re)created empty.

        A file shorter than its header is a crash during `segment.create`: no record can be
        in it, so its header is written again, in place. (Never unlink and recreate it: a
        reader that opened the empty file would keep reading the old inode and later skip the
        whole segment as abandoned. 2026-11-23: found by tools/torture.py, 32 returned puts
        lost; see tests/test_log.py::test_segment_recreated_after_a_crash_mid_create.)
        A damaged header is reported but not fatal: the base offset is also in the file name
        and every record carries its own CRC.
        """
        path = os.path.join(self.log_dir, segment.segment_name(base))
        self._close_active()
        if os.path.getsize(path) < SEGMENT_HEADER_BYTES:
            self._open_new_segment(base)  # segment.create rewrites a header-less file in place
            return False
        try:
            segment.read_header(self.reader.fd(base), path)
        except segment.RecordError as exc:
            log.warning("%s: damaged segment header (%s); reading its records by file name", path, exc)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
        self._seg = base
        return True

    def _scan_to_end(self, seg: int, pos: int, next_offset: int) -> None:
        """Walk from (seg, pos) to the end of the log, following seals; make it the active end.

        A torn tail (incomplete or invalid bytes with nothing valid behind them) in the newest
        segment was left by a writer that died mid-append: we hold the lock, so nobody is
        writing it now. It is copied to quarantine/ and truncated.
        """
        while True:
            try:
                rfd = self.reader.fd(seg)
            except FileNotFoundError:
                # Sealed by another writer and then deleted by retention (which never deletes
                # the newest segment): go on at the first segment after it.
                newer = [b for b in segment.list_segments(self.log_dir) if b > seg]
                if not newer:
                    raise QueueError(f"{self.log_dir}: segment {seg} vanished and no newer segment exists; "
                                     f"was the log edited by hand? run `pqueue verify`") from None
                try:
                    if not self._open_existing(newer[0]):
                        return
                except FileNotFoundError:
                    continue  # retention deleted that one too meanwhile: list again
                seg, pos, next_offset = newer[0], SEGMENT_HEADER_BYTES, max(next_offset, newer[0])
                continue
            result = segment.walk(rfd, max(pos, SEGMENT_HEADER_BYTES), next_offset, self.max_record_bytes)
            pos, next_offset = result.pos, result.next_offset
            if result.stop == "seal":
                nxt = result.seal_next
                later = [b for b in segment.list_segments(self.log_dir) if b >= nxt]
                if not later:
                    # A crash after sealing, before the next segment was created. (Retention
                    # never deletes the newest segment, so a missing next one with nothing
                    # after it cannot have been consumed and deleted.)
                    self._close_active()
                    self._open_new_segment(nxt)
                    return
                try:
                    if not self._open_existing(later[0]):
                        return
                except FileNotFoundError:
                    continue  # deleted between the listing and the open: look again from the seal
                seg, pos, next_offset = later[0], SEGMENT_HEADER_BYTES, max(next_offset, later[0])
                continue
            if result.stop == "end":
                break
            # "incomplete" or "bad": is it rot with valid records behind it, or a torn tail? A
            # damaged length field looks "incomplete" (it points past the end of the file), so
            # both are checked for valid records behind them before anything is cut.
            end = os.lseek(rfd, 0, os.SEEK_END)
            found = self.reader.resync(rfd, pos, next_offset, end)
            if found is not None:
                if found[0] != pos:
                    log.warning("%s: damaged bytes at %d in segment %d; readers will skip them",
                                self.log_dir, pos, seg)
                pos, next_offset = found
                continue
            self.reader.quarantine(seg, pos, end - pos, "torn tail")
            os.ftruncate(self._fd, pos)
            os.fsync(self._fd)  # rule 7: the truncation is durable before anything is appended
            log.warning("%s: truncated a torn tail of %d bytes at %d in segment %d",
                        self.log_dir, end - pos, pos, seg)
            break
        self._seg, self._pos, self._next = seg, pos, next_offset

    def _open_new_segment(self, base: int) -> None:
        self._fd = segment.create(self.log_dir, base)
        self._seg, self._pos, self._next = base, SEGMENT_HEADER_BYTES, base

    def _close_active(self) -> None:
        fd = self._fd
        self._fd = -1
        if fd < 0:
            return
        if self._fd_users:
            self._retired.append(fd)  # an fsync is in flight on it: its leader closes it
        else:
            os.close(fd)

    def _roll(self, next_base: int) -> None:
        """Seal the active segment and start the one whose first offset is `next_base`.

        Order matters for crashes: seal, fsync the old segment, then create the new one (with
        its own fsync and a directory fsync). A crash after the seal leaves a sealed newest
        segment, and recovery creates the next one from the seal.
        """
        old_fd = self._fd
        sealed = False
        try:
            segment.write_all(old_fd, encode_seal(next_base, time.time_ns()))
            os.fsync(old_fd)
            sealed = True
        except OSError as exc:
            # The old segment stays unsealed; readers move on when they see a newer segment.
            # Its unsynced appends may be lost (fsyncgate): their syncs must fail, not succeed.
            log.error("%s: could not seal segment %d: %s", self.log_dir, self._seg, exc)
            self._group.mark_failed(self._seq, exc)
        self._close_active()
        try:
            self._open_new_segment(next_base)
        except OSError as exc:
            # Nothing may be appended behind a seal: the next append redoes recovery, which
            # creates the segment the seal names. The record just written stays written.
            log.error("%s: could not create segment %d: %s; retrying at the next append", self.log_dir,
                      next_base, exc)
            self._mark_broken()
            return
        if sealed:
            self._group.mark_synced(self._seq)
        self._unsynced_since = 0.0
        self._rp_pending = (self._seg, self._pos, self._next)
        self._rp_due = 0.0
        self._wake.set()

    # ------------------------------------------------------------------ maintenance thread

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._maintain, name=f"pqueue-log:{self.path}", daemon=True)
            self._thread.start()
        self._wake.set()

    def _maintain(self) -> None:
        """Release the idle write lock, fsync interval windows, persist the recovery point."""
        while not self._closed:
            timeout = self._maintenance_step()
            self._wake.wait(timeout)
            self._wake.clear()

    def _maintenance_step(self) -> float | None:
        now = time.monotonic()
        timeout: float | None = None
        with self._wlock:
            if self._have_flock:
                if self._seq == self._idle_mark:
                    self._drop_flock()
                else:
                    self._idle_mark = self._seq
                    timeout = IDLE_RELEASE_SECONDS
            if self._seq != self._seen_seq:
                # Appends do not timestamp themselves (that would cost every put a clock
                # read): writes seen now happened after the previous tick at the earliest.
                self._seen_seq = self._seq
                if self.fsync.mode == "never" and self._fd >= 0:
                    # Nothing is ever "synced" here: the recovery point follows the end seen,
                    # trusting the OS as this mode does, so a reopen after a crash scans at
                    # most a second's appends rather than the whole segment.
                    self._rp_pending = (self._seg, self._pos, self._next)
                if not self._unsynced_since and self._seq > self._group.synced_seq:
                    self._unsynced_since = self._last_tick or now
            self._last_tick = now
            since = self._unsynced_since
        if since and self.fsync.mode == "interval" and self._seq > self._group.synced_seq:
            due = since + self.fsync.interval
            if now >= due:
                try:
                    self._commit(self._seq)
                except QueueError:
                    pass  # already logged by _fdatasync; the next append rolls to a new segment
            else:
                timeout = min(timeout or due - now, due - now)
        rp = self._rp_pending
        if rp is not None and rp != self._rp_saved:
            if now >= self._rp_due:
                self._persist_rp(rp)
                self._rp_due = now + RECOVERY_POINT_SECONDS
            else:
                timeout = min(timeout or RECOVERY_POINT_SECONDS, self._rp_due - now)
        return timeout

    def _persist_rp(self, rp: RecoveryPoint) -> None:
        try:
            self._save_rp(rp)
            self._rp_saved = rp
        except Exception as exc:  # the recovery point is a hint: a stale one costs a longer scan
            log.warning("%s: could not save the recovery point: %s", self.log_dir, exc)

    def _writer_end(self) -> RecoveryPoint | None:
        """This process's writer's end of the log, when it has found it (for the reader)."""
        return (self._seg, self._pos, self._next) if self._recovered else None

    def end_offset(self) -> int:
        """The next offset a put would get, as far as this process knows (cheap)."""
        return self._next if self._recovered else -1

    # ------------------------------------------------------------------ retention

    def delete_below(self, offset: int) -> int:
        """Delete the sealed segments whose every record is below `offset`; return how many.

        The newest segment is never deleted. Unlink, then fsync the directory (rule 25); a
        crash in between only leaves a segment that the next call deletes again.
        """
        bases = self.reader.segments()
        doomed = [b for b, nxt in zip(bases, bases[1:], strict=False) if nxt <= offset]
        for base in doomed:
            self.reader.drop(base)
            try:
                os.unlink(os.path.join(self.log_dir, segment.segment_name(base)))
            except FileNotFoundError:
                pass  # another process deleted it first
        if doomed:
            segment.fsync_dir(self.log_dir)
            self.reader.segments()
        return len(doomed)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Sync what this process appended, persist the recovery point, release everything."""
        if self._closed:
            return
        error: BaseException | None = None
        if self._recovered and self._fd >= 0:
            try:
                self.sync()
            except QueueError as exc:
                error = exc
        self._closed = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        rp = self._rp_pending
        if rp is not None and rp != self._rp_saved and error is None:
            self._persist_rp(rp)
        with self._wlock:
            self._drop_flock()
            self._close_active()
            for fd in self._retired:
                os.close(fd)
            self._retired.clear()
            if self._waiter_map is not None:
                self._waiter_map.close()
                self._waiter_map = None
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1
        self.reader.close()
        if error is not None:
            raise error

    def after_fork_in_child(self) -> None:
        """Forget the parent's writer state: its flock belongs to the parent's open file.

        Inherited descriptors are closed (that never releases the parent's lock) and every lock
        is replaced, since another thread of the parent may have held one at fork time.
        """
        for fd in [self._fd, self._lock_fd, *self._retired]:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self._waiter_map is not None:
            try:
                self._waiter_map.close()
            except (BufferError, ValueError):
                pass
        self.reader.after_fork_in_child()
        closed = self._closed
        self._init_writer_state()
        self._closed = closed

