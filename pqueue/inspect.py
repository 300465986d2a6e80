"""Read-only views of a queue directory for `pqueue dump`, `stat` and `verify`.

Nothing here takes a lock, opens a file for writing or creates a file: every function is safe
on a live queue that other processes are writing, and on a damaged one. Bytes that fail their
CRC32C (or any structural check) are reported as `Damage` with their segment, byte position and
length, and are never decoded as data.

Import it as ``pqueue.inspect``: the module name shadows the stdlib ``inspect`` if ``pqueue/``
itself is ever put on ``sys.path`` (STYLE.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import layout, segment
from .errors import FormatVersionError, NotAQueueError, QueueError
from .index import Index, is_unreadable
from .reader import RESYNC_CANDIDATES, RESYNC_WINDOW_BYTES
from .record import (
    ATTR_EXPIRES,
    ATTR_KEY,
    ATTR_META,
    ATTR_NOT_BEFORE,
    ATTR_PRIORITY,
    FORMAT_VERSION,
    MAX_PAYLOAD_BYTES,
    RECORD_HEADER_BYTES,
    SEGMENT_HEADER_BYTES,
    RecordError,
    Seal,
    decode_segment_header,
    find_resync,
)
from .serializers import CODEC_NAMES, decoder, resolve

SCAN_BATCH_RECORDS = 4096  # records parsed per scan call (bounds memory on huge segments)
TAIL_RECHECKS = 3  # an unfinished record at the very end is looked at again this often ...
TAIL_RECHECK_SECONDS = 0.05  # ... this far apart, since a live writer may be mid-write
DEFAULT_GROUP = "default"

# Damage kinds. The first four are damage (verify fails); the last two are notes.
ROT = "rot"  # invalid bytes with valid records behind them
TORN_TAIL = "torn_tail"  # invalid or unfinished bytes at the end of a segment
HEADER = "header"  # a damaged segment header (its records are still read, by file name)
MISSING_SEGMENT = "missing_segment"  # a seal names a segment file that is not there
GAP = "gap"  # offsets skipped on purpose (power loss cut records below a handed-out offset)
UNSEALED = "unsealed"  # an older segment without its seal trailer (a failed write or fsync)
DAMAGE_KINDS = frozenset({ROT, TORN_TAIL, HEADER, MISSING_SEGMENT})
SEAL_BYTES = RECORD_HEADER_BYTES  # a seal is a bare record header

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes in total)
Cursor = tuple[int, int, int]  # (segment base, byte position, next offset): where a walk ended

_decode = decoder(resolve("raw"))  # builtin codecs only: pickle is never loaded from disk


@dataclass(frozen=True)
class Entry:
    """One valid record (its CRC32C matched). `pos` is its byte position in its segment."""

    segment: int
    pos: int
    offset: int
    timestamp_ns: int
    codec: int
    attrs: dict[int, Any]
    payload: bytes
    record_bytes: int

    crc_ok = True

    @property
    def size(self) -> int:
        """Payload bytes."""
        return len(self.payload)

    @property
    def codec_name(self) -> str:
        return CODEC_NAMES.get(self.codec, f"#{self.codec}")

    @property
    def meta(self) -> dict[str, Any]:
        """Dead-letter metadata (source offset, group, error, reason, times); {} for others."""
        meta = self.attrs.get(ATTR_META)
        return meta if isinstance(meta, dict) else {}

    def named_attrs(self) -> dict[str, Any]:
        """The optional per-record attributes under readable names (absent ones left out)."""
        names = {ATTR_KEY: "key", ATTR_PRIORITY: "priority", ATTR_NOT_BEFORE: "not_before",
                 ATTR_EXPIRES: "expires", ATTR_META: "meta"}
        return {names.get(k, str(k)): v for k, v in self.attrs.items()}

    def decode(self) -> Any:
        """The payload decoded with the codec it was written with.

        Raises:
            SerializationError: pickle or a custom codec (never loaded here), or bytes that do
                not decode.
        """
        return _decode(self.codec, self.payload)


@dataclass(frozen=True)
class Damage:
    """A span of a segment that holds no valid record, or offsets the log does not have.

    `first_offset`..`next_offset - 1` are the offsets it swallowed (none when equal);
    `length` is 0 for a finding without bytes (a gap, an unsealed segment).
    """

    segment: int
    pos: int
    length: int
    first_offset: int
    next_offset: int
    reason: str
    kind: str

    crc_ok = False

    @property
    def is_damage(self) -> bool:
        """True for damage, False for a note (a deliberate gap, an unsealed older segment)."""
        return self.kind in DAMAGE_KINDS

    @property
    def lost_offsets(self) -> int:
        return max(0, self.next_offset - self.first_offset)


@dataclass(frozen=True)
class GroupStat:
    """One consumer group: `lag` counts records not yet acked (in flight and waiting included)."""

    name: str
    committed: int
    lag: int
    in_flight: int
    waiting: int
    delayed: int
    dead: int
    damaged: int


@dataclass(frozen=True)
class Stat:
    """What `stat` reports. `first_offset` is None when the log holds no record."""

    path: str
    source_id: str
    segments: int
    log_bytes: int
    index_bytes: int
    quarantine_bytes: int
    total_bytes: int
    first_offset: int | None
    next_offset: int
    groups: tuple[GroupStat, ...]
    dead_letters: int
    index_error: str | None

    @property
    def records(self) -> int:
        return 0 if self.first_offset is None else self.next_offset - self.first_offset


@dataclass(frozen=True)
class VerifyResult:
    """What `verify` found. `ok` is True when no damage and no index problem was found."""

    path: str
    segments: int
    records: int
    bytes_checked: int
    damage: tuple[Damage, ...]
    notes: tuple[Damage, ...]
    index_problems: tuple[str, ...]
    index_warnings: tuple[str, ...]
    index_state: str  # "ok", "missing", "unreadable" (repair rebuilds those two) or "error"
    seconds: float = field(default=0.0, compare=False)

    @property
    def ok(self) -> bool:
        return not self.damage and not self.index_problems

    @property
    def damaged_bytes(self) -> int:
        return sum(d.length for d in self.damage)


# --------------------------------------------------------------------------- the queue directory


def check_queue(path: str | os.PathLike[str]) -> str:
    """Return `path` as a string if it is a queue directory.

    Raises:
        NotAQueueError: missing, a file, or a directory without ``queue.id`` and ``log/``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise NotAQueueError(f"{path} does not exist")
    if not os.path.isdir(path):
        raise NotAQueueError(f"{path} is a file, not a queue directory")
    if not layout.is_queue(path):
        raise NotAQueueError(f"{path} is not a pqueue directory (no {layout.ID_FILE} and no log/)")
    return path


def _log_dir(path: str) -> str:
    return os.path.join(path, "log")


def _segments(path: str) -> list[int]:
    try:
        return segment.list_segments(_log_dir(path))
    except FileNotFoundError:
        return []


def segment_path(path: str | os.PathLike[str], base: int) -> str:
    """The file of the segment whose first offset is `base`."""
    return os.path.join(os.fspath(path), "log", segment.segment_name(base))


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass  # deleted by retention while we counted
    return total


# --------------------------------------------------------------------------- walking the log


class _Walker:
    """Walks the segments of one queue from a start segment, following seals like a reader.

    Counts what it saw (segments, records, bytes) so verify can report it, and calls
    `progress` with the bytes done so far.
    """

    def __init__(self, path: str, *, from_offset: int, to_offset: int | None,
                 progress: ProgressFn | None = None, tail_rechecks: int = TAIL_RECHECKS,
                 start: Cursor | None = None) -> None:
        self.path = path
        self.start = start
        self.cursor = start  # where the walk ended: (segment, byte position, next offset)
        self.from_offset = from_offset
        self.to_offset = to_offset
        self.progress = progress
        self.tail_rechecks = tail_rechecks
        self.segments = 0
        self.records = 0
        self.bytes_done = 0
        self.total_bytes = 0
        self._stop = False

    def _newer(self, seg: int) -> list[int]:
        return [b for b in _segments(self.path) if b > seg]

    def _wanted(self, d: Damage) -> bool:
        if self.to_offset is not None and d.first_offset > self.to_offset:
            return False
        return d.next_offset > self.from_offset or d.first_offset >= self.from_offset

    def walk(self) -> Iterator[Entry | Damage]:
        bases = _segments(self.path)
        if not bases:
            return
        if self.progress is not None:
            self.total_bytes = sum(_size(segment_path(self.path, b)) for b in bases)
        seg: int | None = bases[0]
        for base in bases:
            if base <= self.from_offset:
                seg = base
        resume = self.start
        if resume is not None:
            seg = resume[0]
        while seg is not None and not self._stop:
            try:
                fd = os.open(segment_path(self.path, seg), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                # Deleted under us by retention (fully consumed): go on with the next one.
                newer = self._newer(seg)
                seg = newer[0] if newer else None
                continue
            try:
                self.segments += 1
                at = resume[1:] if resume is not None and resume[0] == seg else None
                resume = None
                seg = yield from self._segment(fd, seg, at)
            finally:
                os.close(fd)

    def _segment(self, fd: int, seg: int, at: tuple[int, int] | None) -> Generator[Entry | Damage, None, int | None]:
        """Yield the records and damage of one segment from `at` (or its header); return the next segment."""
        done_before = self.bytes_done
        size = os.fstat(fd).st_size
        self.cursor = (seg, max(SEGMENT_HEADER_BYTES, at[0] if at else 0), at[1] if at else seg)
        if at is not None and at[0] >= SEGMENT_HEADER_BYTES:
            return (yield from self._records(fd, seg, at[0], at[1], done_before))
        if size < SEGMENT_HEADER_BYTES:
            newer = self._newer(seg)
            if not newer:
                return None  # being created right now, or a crash during create: no record in it
            d = Damage(seg, 0, size, seg, newer[0], "segment is shorter than its header", HEADER)
            if self._wanted(d):
                yield d
            self.bytes_done += size
            return newer[0]
        try:
            header = decode_segment_header(os.pread(fd, SEGMENT_HEADER_BYTES, 0))
            if header.version > FORMAT_VERSION:
                raise FormatVersionError(header.version, FORMAT_VERSION, segment_path(self.path, seg))
            if header.base_offset != seg:
                raise RecordError(f"header names base offset {header.base_offset}, the file name {seg}")
        except RecordError as exc:
            # The file name also gives the base offset and every record carries its own CRC,
            # so the records are still read (as log.py does).
            d = Damage(seg, 0, SEGMENT_HEADER_BYTES, seg, seg, f"damaged segment header: {exc}", HEADER)
            if self._wanted(d):
                yield d
        return (yield from self._records(fd, seg, SEGMENT_HEADER_BYTES, seg, done_before))

    def _records(self, fd: int, seg: int, pos: int, nxt: int,
                 done_before: int) -> Generator[Entry | Damage, None, int | None]:
        rechecks = 0
        rechecked_newer = False
        while True:
            result = segment.scan(fd, pos, nxt, SCAN_BATCH_RECORDS, MAX_PAYLOAD_BYTES)
            for rec in result.records:
                if self.to_offset is not None and rec.offset > self.to_offset:
                    self._stop = True
                    return None
                self.records += 1
                if rec.offset >= self.from_offset:
                    yield Entry(seg, rec.pos, rec.offset, rec.timestamp_ns, rec.codec, rec.attrs, rec.payload,
                                rec.end - rec.pos)
            pos, nxt = result.pos, result.next_offset
            self.cursor = (seg, pos, nxt)
            self.bytes_done = done_before + pos
            if self.progress is not None:
                self.progress(self.bytes_done, self.total_bytes)
            if result.stop == "limit":
                continue
            if result.stop == "seal":
                size = os.fstat(fd).st_size
                after = pos + SEAL_BYTES
                if size > after:
                    # Nothing is ever written after a seal: these bytes are not records.
                    d = Damage(seg, after, size - after, result.seal_next, result.seal_next,
                               "bytes after the seal", TORN_TAIL)
                    if self._wanted(d):
                        yield d
                self.bytes_done = done_before + size
                return (yield from self._follow_seal(seg, pos, nxt, result.seal_next))
            end = os.fstat(fd).st_size
            if result.stop == "bad":
                found = _resync(fd, pos, nxt, end)
                if found is not None:
                    d = Damage(seg, pos, found[0] - pos, nxt, found[1], result.reason, ROT)
                    if self._wanted(d):
                        yield d
                    pos, nxt = found
                    self.cursor = (seg, pos, nxt)
                    continue
            newer = self._newer(seg)
            if not newer:
                if result.stop == "end":
                    return None
                # The newest segment ends inside a record: a write in progress (a live writer
                # writes each record with one write()) or a torn tail. Look again before
                # calling it damage.
                if rechecks < self.tail_rechecks:
                    rechecks += 1
                    time.sleep(TAIL_RECHECK_SECONDS)
                    continue
                d = Damage(seg, pos, end - pos, nxt, nxt, result.reason or "unfinished record at the end of the log",
                           TORN_TAIL)
                if self._wanted(d):
                    yield d
                self.bytes_done = done_before + end
                return None
            if not rechecked_newer:
                # This segment was the newest a moment ago: its seal may just have landed.
                rechecked_newer = True
                continue
            if end > pos:
                d = Damage(seg, pos, end - pos, nxt, newer[0],
                           result.reason or "unsealed segment ends inside a record", TORN_TAIL)
            else:
                d = Damage(seg, pos, 0, nxt, newer[0], "segment is not sealed (a write or fsync failed)", UNSEALED)
            if self._wanted(d):
                yield d
            self.bytes_done = done_before + end
            return newer[0]

    def _follow_seal(self, seg: int, pos: int, nxt: int, following: int) -> Generator[Damage, None, int | None]:
        if following > nxt:
            d = Damage(seg, pos, 0, nxt, following, "offsets skipped (cut by a power loss, or damage that "
                       "repair moved to quarantine/)", GAP)
            if self._wanted(d):
                yield d
        if os.path.exists(segment_path(self.path, following)):
            return following
        newer = self._newer(seg)
        if not newer:
            return None  # a crash after sealing, before creating the next: the next writer creates it
        d = Damage(seg, pos, 0, following, newer[0], f"segment {segment.segment_name(following)} is missing",
                   MISSING_SEGMENT)
        if self._wanted(d):
            yield d
        return newer[0]


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _resync(fd: int, pos: int, next_offset: int, end: int) -> tuple[int, int] | None:
    """The position and offset of the first valid record after damage at `pos`, or None.

    Windows overlap by half so a record cut by a window edge is whole in the next one
    (the same search as log.py, so readers and inspection agree on where damage ends).
    """
    start = pos + 1
    while start < end:
        buf = os.pread(fd, RESYNC_WINDOW_BYTES, start)
        got = find_resync(buf, 0, start, next_offset, RESYNC_CANDIDATES, MAX_PAYLOAD_BYTES)
        if got is not None:
            at, rec = got
            return start + at, (next_offset if isinstance(rec, Seal) else rec.offset)
        if len(buf) < RESYNC_WINDOW_BYTES:
            return None
        start += RESYNC_WINDOW_BYTES // 2
    return None


def records(
    path: str | os.PathLike[str],
    *,
    from_offset: int = 0,
    to_offset: int | None = None,
    progress: ProgressFn | None = None,
) -> Iterator[Entry | Damage]:
    """Yield every record with an offset in [from_offset, to_offset] and every damage between.

    Sealed and active segments alike; on a live queue the walk ends where the log ends when
    it gets there (an unfinished record at the very end is looked at again briefly: it may be
    a write in progress).

    Raises:
        NotAQueueError: `path` is not a queue directory.
        FormatVersionError: a segment written by a newer pqueue.
    """
    qpath = check_queue(path)
    yield from _Walker(qpath, from_offset=from_offset, to_offset=to_offset, progress=progress).walk()


def follow(path: str | os.PathLike[str], *, from_offset: int = 0, interval: float = 0.2) -> Iterator[Entry | Damage]:
    """Like `records`, then wait for new records forever (`pqueue tail -f`).

    Each poll goes on from where the last one ended, so following costs only the new bytes.
    An unfinished record at the end is simply waited for.
    """
    qpath = check_queue(path)
    cursor: Cursor | None = None
    while True:
        walker = _Walker(qpath, from_offset=from_offset, to_offset=None, tail_rechecks=0, start=cursor)
        seen = False
        for item in walker.walk():
            seen = True
            yield item
        cursor = walker.cursor
        if not seen:
            time.sleep(interval)


def tail_start(path: str | os.PathLike[str], count: int) -> int:
    """The offset from which the last `count` records of the log begin (cheap: newest segments only)."""
    qpath = check_queue(path)
    bases = _segments(qpath)
    end = log_end(qpath)
    for base in reversed(bases):
        if end - base >= count:
            return max(base, end - count)
    return bases[0] if bases else 0


def log_end(path: str | os.PathLike[str]) -> int:
    """The offset the next record will get, as far as the bytes on disk tell."""
    return _log_end(os.fspath(path))[2]


def _log_end(path: str) -> tuple[int, int, int]:
    """(segment, byte position, offset) of the end of the log.

    Walks only the newest segment, from the index's recovery point when it has one there.
    """
    bases = _segments(path)
    if not bases:
        return 0, SEGMENT_HEADER_BYTES, 0
    seg = bases[-1]
    pos, nxt = SEGMENT_HEADER_BYTES, seg
    rp = _recovery_point(path)
    if rp is not None and rp[0] == seg and SEGMENT_HEADER_BYTES <= rp[1] <= _size(segment_path(path, seg)):
        pos, nxt = rp[1], rp[2]
    while True:
        try:
            fd = os.open(segment_path(path, seg), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return seg, SEGMENT_HEADER_BYTES, nxt  # sealed, and the next segment is not created yet
        try:
            result = segment.walk(fd, pos, nxt, MAX_PAYLOAD_BYTES)
            pos, nxt = result.pos, result.next_offset
            if result.stop == "bad":
                found = _resync(fd, pos, nxt, os.fstat(fd).st_size)
                if found is not None:
                    pos, nxt = found
                    continue
        finally:
            os.close(fd)
        if result.stop != "seal":
            return seg, pos, nxt
        seg, pos, nxt = result.seal_next, SEGMENT_HEADER_BYTES, max(nxt, result.seal_next)


def locate(path: str | os.PathLike[str], offset: int) -> tuple[int, int]:
    """The (segment, byte position) of the record at `offset`; the log end for `offset` == end.

    Raises:
        ValueError: no record at `offset` (below the oldest record, past the end, or damaged).
    """
    qpath = check_queue(path)
    end_seg, end_pos, end = _log_end(qpath)
    bases = _segments(qpath)
    low = bases[0] if bases else 0
    if offset < low or offset > end:
        raise ValueError(f"offset {offset} is outside the log, which holds offsets {low} to {end - 1}")
    if offset == end:
        return end_seg, end_pos
    for item in _Walker(qpath, from_offset=offset, to_offset=offset, tail_rechecks=0).walk():
        if isinstance(item, Entry):
            return item.segment, item.pos
        if item.first_offset <= offset < item.next_offset:
            raise ValueError(f"offset {offset} is inside damaged bytes ({item.reason})")
    raise ValueError(f"no record at offset {offset}")


# --------------------------------------------------------------------------- the index


def _open_index(path: str) -> Index | None:
    """The index opened read-only, or None when the queue has none."""
    if not os.path.exists(os.path.join(path, "index", "data.mdb")):
        return None
    return Index(path, readonly=True)


def _recovery_point(path: str) -> tuple[int, int, int] | None:
    try:
        index = _open_index(path)
    except QueueError:
        return None  # a damaged index only costs a longer walk here
    if index is None:
        return None
    try:
        if "meta" not in index.db:
            return None
        return index.recovery_point()
    finally:
        index.close()


def _group_stats(index: Index, end: int) -> tuple[GroupStat, ...]:
    out = []
    for name in sorted(index.groups()):
        counts = index.counts(name)
        if counts is None:
            continue  # removed between the two reads
        lag = max(0, end - counts.committed - counts.acked_above)
        out.append(GroupStat(name, counts.committed, lag, counts.in_flight, counts.waiting, counts.delayed,
                             counts.dead, counts.damaged))
    return tuple(out)


def groups(path: str | os.PathLike[str]) -> tuple[GroupStat, ...]:
    """The consumer groups of the queue and their state (empty when it has no index yet)."""
    qpath = check_queue(path)
    index = _open_index(qpath)
    if index is None:
        return ()
    try:
        return _group_stats(index, log_end(qpath))
    finally:
        index.close()


def stat(path: str | os.PathLike[str]) -> Stat:
    """Segments, bytes on disk, first and next offset, and every consumer group's state.

    A damaged index is reported in `index_error` rather than raised, so `stat` always answers.

    Raises:
        NotAQueueError: `path` is not a queue directory.
    """
    qpath = check_queue(path)
    try:
        source_id = layout.read_identity(qpath).source_id
    except QueueError:
        source_id = ""
    bases = _segments(qpath)
    end = log_end(qpath)
    first = bases[0] if bases and end > bases[0] else None
    group_stats: tuple[GroupStat, ...] = ()
    index_error: str | None = None
    try:
        index = _open_index(qpath)
        if index is None:
            index_error = "no index (it is created when the queue is next opened)"
        else:
            try:
                group_stats = _group_stats(index, end)
            finally:
                index.close()
    except QueueError as exc:
        index_error = str(exc)
    dlq = os.path.join(qpath, "dlq")
    dead_letters = 0
    if layout.is_queue(dlq):
        dead_letters = sum(1 for _ in unacked(dlq))
    log_bytes = _dir_bytes(_log_dir(qpath))
    index_bytes = _dir_bytes(os.path.join(qpath, "index"))
    quarantine_bytes = _dir_bytes(os.path.join(qpath, "quarantine"))
    return Stat(qpath, source_id, len(bases), log_bytes, index_bytes, quarantine_bytes, _dir_bytes(qpath),
                first, end, group_stats, dead_letters, index_error)


def unacked(path: str | os.PathLike[str], group: str = DEFAULT_GROUP) -> Iterator[Entry]:
    """The valid records that `group` has not acked yet (all of them for a group never used).

    Used to list a dead-letter queue without consuming it.
    """
    qpath = check_queue(path)
    index = _open_index(qpath)
    try:
        state = index.peek(group) if index is not None and "groups" in index.db else None
        start = state.committed if state is not None else 0
        for item in _Walker(qpath, from_offset=start, to_offset=None, tail_rechecks=0).walk():
            if not isinstance(item, Entry):
                continue
            if state is not None and item.offset < state.dispatch and index is not None:
                if index.status(group, item.offset) in ("done",):
                    continue
            yield item
    finally:
        if index is not None:
            index.close()


# --------------------------------------------------------------------------- verify


def _index_checks(path: str, end: int, bases: list[int]) -> tuple[list[str], list[str], str]:
    """(problems, warnings, state) of the index checked against the log."""
    problems: list[str] = []
    warnings: list[str] = []
    where = os.path.join(path, "index")
    try:
        index = _open_index(path)
    except QueueError as exc:
        cause = exc.__cause__
        if cause is not None and is_unreadable(cause):
            problems.append(f"{where} is unreadable ({cause}); `pqueue repair` moves it to quarantine/ and "
                            f"rebuilds it")
            return problems, warnings, "unreadable"
        problems.append(str(exc))
        return problems, warnings, "error"
    if index is None:
        problems.append(f"{where} is missing; `pqueue repair` creates a new one (consumed messages are "
                        f"delivered again)")
        return problems, warnings, "missing"
    try:
        rp = index.recovery_point() if "meta" in index.db else None
        if rp is not None and bases and rp[0] in bases:
            size = _size(segment_path(path, rp[0]))
            if rp[1] > size:
                warnings.append(f"recovery point is at byte {rp[1]} of segment {rp[0]}, past its end ({size}); "
                                f"the next writer scans that segment from its start")
        for name, g in sorted(index.groups().items()):
            # W may pass D only over priority records taken out of order (below the scan S).
            if g.committed > max(g.dispatch, g.scan):
                problems.append(f"group {name!r}: committed offset {g.committed} is above its dispatch offset "
                                f"{max(g.dispatch, g.scan)}")
            if g.dispatch > end:
                warnings.append(f"group {name!r}: offsets up to {g.dispatch - 1} were handed out but the log "
                                f"ends at {end - 1} (a power loss cut it); new records start above them")
            if bases and g.dispatch_seg not in bases and bases[0] <= g.dispatch_seg <= bases[-1]:
                problems.append(f"group {name!r}: reads from segment {g.dispatch_seg}, which is missing")
    except QueueError as exc:
        # The environment opens but holds values that do not decode: rebuild it like an
        # unreadable one.
        problems.append(f"{exc}")
        return problems, warnings, "unreadable"
    finally:
        index.close()
    return problems, warnings, "ok"


def verify(path: str | os.PathLike[str], *, progress: ProgressFn | None = None) -> VerifyResult:
    """CRC-check every record, segment header and seal, then the index against the log.

    Args:
        progress: called now and then with (bytes checked, bytes in total).
    Returns:
        A VerifyResult; `.ok` is False when damage or an index problem was found.
    Raises:
        NotAQueueError: `path` is not a queue directory.
        FormatVersionError: a segment written by a newer pqueue.
    """
    qpath = check_queue(path)
    started = time.monotonic()
    walker = _Walker(qpath, from_offset=0, to_offset=None, progress=progress)
    damage: list[Damage] = []
    notes: list[Damage] = []
    end = 0
    for item in walker.walk():
        if isinstance(item, Entry):
            end = item.offset + 1
        elif item.is_damage:
            damage.append(item)
            end = max(end, item.next_offset)
        else:
            notes.append(item)
            end = max(end, item.next_offset)
    bases = _segments(qpath)
    end = max(end, bases[-1] if bases else 0)
    problems, warnings, state = _index_checks(qpath, end, bases)
    return VerifyResult(qpath, walker.segments, walker.records, walker.bytes_done, tuple(damage), tuple(notes),
                        tuple(problems), tuple(warnings), state, time.monotonic() - started)


__all__ = ["DAMAGE_KINDS", "Damage", "Entry", "GroupStat", "Stat", "VerifyResult", "check_queue", "follow", "groups",
           "locate", "log_end", "records", "segment_path", "stat", "tail_start", "unacked", "verify"]
