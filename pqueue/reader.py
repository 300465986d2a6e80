"""Reading the segmented log: records from a position, the end of the log, damage, quarantine.

Readers never take a lock and never block a writer. They keep their own read-only descriptors
per segment. An incomplete or invalid record at the very end of the newest segment is a write
in progress (or a torn tail a writer will truncate): a read stops before it. Damage with valid
records behind it is reported, stepped over and copied to ``quarantine/`` (never destroyed).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from . import segment
from .record import (
    RECORD_HEADER,
    RECORD_HEADER_BYTES,
    SEGMENT_HEADER_BYTES,
    Record,
    Seal,
    find_resync,
    parse_one,
)

log = logging.getLogger(__name__)

RESYNC_WINDOW_BYTES = 4 << 20  # look this far past damage for the next valid record
RESYNC_CANDIDATES = 4096  # offsets tried when stepping over damage

RecoveryPoint = tuple[int, int, int]  # (segment base, byte position, next offset)


class Position(NamedTuple):
    """A place in the log: segment base offset and byte position in that segment."""

    segment: int
    pos: int


class Damage(NamedTuple):
    """A span of bytes that is not valid records, with the offsets it swallowed."""

    segment: int
    pos: int
    length: int
    first_offset: int  # the first offset that is missing
    next_offset: int  # the offset of the next readable record
    reason: str


class ReadResult(NamedTuple):
    records: list[tuple[int, Record]]  # (segment base, record)
    position: Position  # where the next read starts
    next_offset: int
    damage: list[Damage]


class LogReader:
    """The read side of one queue's log, for one process; thread-safe."""

    def __init__(
        self,
        path: str,
        *,
        max_record_bytes: int,
        load_recovery_point: Callable[[], RecoveryPoint | None],
        min_next_offset: Callable[[], int],
        writer_end: Callable[[], RecoveryPoint | None],
    ) -> None:
        self.log_dir = os.path.join(path, "log")
        self.quarantine_dir = os.path.join(path, "quarantine")
        self.max_record_bytes = max_record_bytes
        self._load_rp = load_recovery_point
        self._min_next_offset = min_next_offset
        self._writer_end = writer_end  # this process's writer's end, when it has one
        self._readers: dict[int, int] = {}  # segment base -> O_RDONLY fd
        self._readers_lock = threading.Lock()  # guards _readers
        self._segments_cache: tuple[float, list[int]] = (0.0, [])
        self._tail: RecoveryPoint | None = None  # furthest end seen by tail_offset()
        self._tail_lock = threading.Lock()  # guards _tail

    def fd(self, seg: int) -> int:
        fd = self._readers.get(seg)
        if fd is not None:
            return fd
        with self._readers_lock:
            fd = self._readers.get(seg)
            if fd is None:
                path = os.path.join(self.log_dir, segment.segment_name(seg))
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                self._readers[seg] = fd
        return fd

    def drop(self, seg: int) -> None:
        with self._readers_lock:
            fd = self._readers.pop(seg, None)
        if fd is not None:
            os.close(fd)

    def segments(self, *, refresh: bool = True) -> list[int]:
        """Base offsets of the segments on disk, ascending."""
        if refresh or not self._segments_cache[1]:
            self._segments_cache = (time.monotonic(), segment.list_segments(self.log_dir))
        return self._segments_cache[1]

    def first_position(self) -> tuple[Position, int]:
        """The position and offset of the oldest record still on disk."""
        bases = self.segments()
        if not bases:
            return Position(0, 0), 0
        return Position(bases[0], 0), bases[0]

    def read(self, position: Position, next_offset: int, max_records: int) -> ReadResult:
        """Read up to `max_records` records from `position` (expecting `next_offset` there).

        Never blocks and never takes a lock. An incomplete or invalid record at the very end of
        the newest segment is a write in progress (or a torn tail a writer will truncate): the
        read stops before it. Damage with valid records behind it is reported in `damage` and
        stepped over; its bytes are copied to quarantine/.

        Raises:
            FormatVersionError: a segment written by a newer pqueue.
        """
        out: list[tuple[int, Record]] = []
        damage: list[Damage] = []
        seg, pos = position
        rechecked = False
        while len(out) < max_records:
            try:
                fd = self.fd(seg)
            except FileNotFoundError:
                newer = [b for b in self.segments() if b > seg]
                if not newer:
                    break
                # Deleted under us (retention or a drop_oldest cap): go on at the next one.
                if newer[0] > next_offset:
                    damage.append(Damage(seg, pos, 0, next_offset, newer[0], "segment deleted"))
                seg, pos, next_offset = newer[0], 0, max(next_offset, newer[0])
                continue
            if pos < SEGMENT_HEADER_BYTES:
                path = os.path.join(self.log_dir, segment.segment_name(seg))
                if os.lseek(fd, 0, os.SEEK_END) < SEGMENT_HEADER_BYTES:
                    self.drop(seg)  # being created right now: open it afresh next time
                    break
                try:
                    segment.read_header(fd, path)
                except segment.RecordError:
                    pass  # damaged header: the file name gives the base, records carry CRCs
                pos = SEGMENT_HEADER_BYTES
            result = segment.scan(fd, pos, next_offset, max_records - len(out), self.max_record_bytes)
            out.extend((seg, r) for r in result.records)
            pos, next_offset = result.pos, result.next_offset
            if result.stop == "limit":
                break
            if result.stop == "seal":
                if result.seal_next > next_offset:
                    damage.append(Damage(seg, pos, 0, next_offset, result.seal_next, "offsets skipped"))
                seg, pos, next_offset = result.seal_next, 0, max(next_offset, result.seal_next)
                rechecked = False
                continue
            end = os.lseek(fd, 0, os.SEEK_END)
            if result.stop != "end":
                # "bad", or "incomplete" with a length field that may be damaged: valid records
                # behind it make it rot (a write in progress has nothing valid behind it).
                found = self.resync(fd, pos, next_offset, end)
                if found is not None and found[0] == pos:
                    continue  # a write in progress has completed: read on
                if found is not None:
                    length = found[0] - pos
                    reason = result.reason or "length field points past the end of the record"
                    damage.append(Damage(seg, pos, length, next_offset, found[1], reason))
                    self.quarantine(seg, pos, length, reason)
                    pos, next_offset = found
                    continue
            # The end of this segment for now. Only the newest segment is ever written, so if a
            # newer one exists and this one is still unsealed after a second look (the seal may
            # have landed meanwhile), it was abandoned after a failed write or fsync.
            # A position past the end of the file means the file was cut (a power loss took
            # the tail and a writer has moved on): look for the newer segment at once.
            newer = [b for b in self._listing(force=end < pos) if b > seg]
            if not newer:
                break
            if not rechecked:
                rechecked = True
                if not self._same_file(seg, fd):
                    self.drop(seg)  # the name points at another file now: read that one
                continue
            if end > pos:
                reason = result.reason or "unsealed segment ends inside a record"
                damage.append(Damage(seg, pos, end - pos, next_offset, newer[0], reason))
                self.quarantine(seg, pos, end - pos, reason)
            elif newer[0] > next_offset:
                damage.append(Damage(seg, pos, 0, next_offset, newer[0], "offsets skipped"))
            seg, pos, next_offset = newer[0], 0, max(next_offset, newer[0])
            rechecked = False
        return ReadResult(out, Position(seg, pos), next_offset, damage)

    def _listing(self, *, force: bool = False) -> list[int]:
        """The segment list, refreshed at most once a second (only abandoned segments need it)."""
        taken, bases = self._segments_cache
        if force or time.monotonic() - taken > 1.0:
            return self.segments()
        return bases

    def quarantine(self, seg: int, pos: int, length: int, reason: str) -> None:
        """Copy a damaged span to quarantine/ (once); the original bytes stay where they are."""
        if length <= 0:
            return
        name = f"{seg:020d}-{pos:012d}.bad"
        target = os.path.join(self.quarantine_dir, name)
        if os.path.exists(target):
            return
        try:
            os.makedirs(self.quarantine_dir, mode=segment.DIR_MODE, exist_ok=True)
            fd = self.fd(seg)
            data = os.pread(fd, min(length, 64 << 20), pos)
            tmp = target + ".tmp"
            wfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, segment.FILE_MODE)
            try:
                segment.write_all(wfd, data)
                os.fsync(wfd)
            finally:
                os.close(wfd)
            os.replace(tmp, target)
            segment.fsync_dir(self.quarantine_dir)
            log.warning("%s: %d damaged bytes at %d in segment %d (%s) copied to %s",
                        self.log_dir, length, pos, seg, reason, target)
        except OSError as exc:
            log.error("%s: could not copy damaged bytes to quarantine/: %s", self.log_dir, exc)

    def segment_path(self, seg: int) -> str:
        return os.path.join(self.log_dir, segment.segment_name(seg))

    def has_data_after(self, position: Position) -> bool:
        """Whether bytes follow `position` (a cheap hint for pollers: one lseek)."""
        try:
            fd = self.fd(position.segment)
        except FileNotFoundError:
            return True  # deleted under the reader: let it move on
        # A file shorter than the position was cut under the reader: let read() sort it out.
        if os.lseek(fd, 0, os.SEEK_END) != max(position.pos, SEGMENT_HEADER_BYTES):
            return True
        # At the end of an unsealed segment with a newer one beside it (abandoned after a
        # failed write or fsync): read() moves on. The listing is at most a second old.
        listing = self._listing()
        return bool(listing) and listing[-1] > position.segment

    def tail_offset(self) -> int:
        """The offset the next record will get, as far as the bytes on disk tell.

        Walks forward from the furthest point known (this process's writer, the last walk, or
        the recovery point), so repeated calls cost only the records appended since.
        """
        with self._tail_lock:
            start = self._tail
            mine = self._writer_end()
            if mine is not None and (start is None or mine[:2] > start[:2]):
                start = mine
            if start is None:
                rp = self._load_rp()
                bases = self.segments()
                if not bases:
                    return self._min_next_offset()
                if rp is not None and rp[0] == bases[-1]:
                    start = rp
                else:
                    start = (bases[-1], SEGMENT_HEADER_BYTES, bases[-1])
            seg, pos, nxt = start
            while True:
                try:
                    fd = self.fd(seg)
                except FileNotFoundError:
                    bases = [b for b in self.segments() if b > seg]
                    if not bases:
                        break
                    seg, pos, nxt = bases[0], SEGMENT_HEADER_BYTES, max(nxt, bases[0])
                    continue
                result = segment.walk(fd, max(pos, SEGMENT_HEADER_BYTES), nxt, self.max_record_bytes)
                pos, nxt = result.pos, result.next_offset
                if result.stop != "seal":
                    break
                seg, pos, nxt = result.seal_next, SEGMENT_HEADER_BYTES, max(nxt, result.seal_next)
            self._tail = (seg, pos, nxt)
            return nxt

    def resync(self, rfd: int, pos: int, next_offset: int, end: int) -> tuple[int, int] | None:
        """Find the next valid record at or after damage at `pos`: (its position, its offset).

        The search starts at `pos` itself: a record another process was still writing when the
        scan read it may be complete now (then it is found there, and nothing is damaged);
        records written after it are only ever behind it. Reads windows of
        RESYNC_WINDOW_BYTES; windows overlap by half so that a record cut by a window edge is
        whole in the next one.
        """
        # The record at `pos` itself counts only under the offset expected there: a valid
        # record with another offset in its place is misplaced, not the next record.
        head = os.pread(rfd, RECORD_HEADER_BYTES, pos)
        if len(head) == RECORD_HEADER_BYTES:
            _crc, length, _off, _ts, _flags, _codec, attrs_len = RECORD_HEADER.unpack(head)
            size = RECORD_HEADER_BYTES + attrs_len + length
            if length <= self.max_record_bytes and pos + size <= end:  # never read a garbage length
                got_here = parse_one(os.pread(rfd, size, pos), 0, pos, next_offset, self.max_record_bytes)
                if isinstance(got_here, (Record, Seal)):
                    return pos, next_offset
        start = pos + 1
        while start < end:
            # Never past `end`, the size the caller saw when the scan stopped: a record another
            # process finishes meanwhile (and any after it) must not make the unfinished one
            # look like damage with valid records behind it.
            buf = os.pread(rfd, min(RESYNC_WINDOW_BYTES, end - start), start)
            got = find_resync(buf, 0, start, next_offset, RESYNC_CANDIDATES, self.max_record_bytes)
            if got is not None:
                at, rec = got
                # After a seal the scan moves on by itself and reports the skipped offsets.
                return start + at, (next_offset if isinstance(rec, Seal) else rec.offset)
            if start + len(buf) >= end:
                return None
            start += RESYNC_WINDOW_BYTES // 2
        return None

    def _same_file(self, seg: int, fd: int) -> bool:
        """Whether the descriptor kept for `seg` is still the file its name points at."""
        try:
            return os.stat(self.segment_path(seg)).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return True  # deleted: the caller moves on to the next segment anyway

    def close(self) -> None:
        with self._readers_lock:
            for fd in self._readers.values():
                os.close(fd)
            self._readers.clear()

    def after_fork_in_child(self) -> None:
        """Close the inherited descriptors and replace the locks (another thread may hold one)."""
        for fd in self._readers.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._readers = {}
        self._readers_lock = threading.Lock()
        self._tail_lock = threading.Lock()
