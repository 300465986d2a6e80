"""One segment file: create, read its header, scan its records, append, truncate, sync.

Segment files are named by the offset of their first record, 20 digits:
``log/00000000000000052311.seg``. Everything here works on file descriptors the caller owns;
the caller (log.py) decides when to lock, roll and sync.
"""

from __future__ import annotations

import errno
import os
import time
from typing import NamedTuple

from .errors import FormatVersionError
from .record import (
    FORMAT_VERSION,
    INCOMPLETE,
    RECORD_HEADER_BYTES,
    SEGMENT_HEADER_BYTES,
    Bad,
    Record,
    RecordError,
    Seal,
    SegmentHeader,
    decode_segment_header,
    encode_segment_header,
    parse_one,
)

SUFFIX = ".seg"
READ_CHUNK_BYTES = 256 << 10  # 256 KiB per pread while scanning
FILE_MODE = 0o600  # queue files are private to their owner
DIR_MODE = 0o700


def segment_name(base_offset: int) -> str:
    return f"{base_offset:020d}{SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """Return the base offset a segment file name encodes, or None for any other file."""
    if len(name) != 20 + len(SUFFIX) or not name.endswith(SUFFIX) or not name[:20].isdigit():
        return None
    return int(name[:20])


def list_segments(log_dir: str) -> list[int]:
    """Base offsets of the segment files in `log_dir`, ascending."""
    bases = [b for name in os.listdir(log_dir) if (b := parse_segment_name(name)) is not None]
    bases.sort()
    return bases


def fsync_dir(path: str) -> None:
    """Make the entries of directory `path` durable (a new or deleted file survives power loss)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create(log_dir: str, base_offset: int) -> int:
    """Create the segment that starts at `base_offset` and return an append fd to it.

    The header is written and fsynced, then the directory: a power cut after this returns
    cannot lose the file or leave it without its header (durability.md rule 16).
    A leftover file of the same name that holds no record (a crash during a previous
    create) is replaced; one that holds records is never overwritten.
    """
    path = os.path.join(log_dir, segment_name(base_offset))
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, FILE_MODE)
    except FileExistsError:
        if os.path.getsize(path) > SEGMENT_HEADER_BYTES:
            raise
        # A crash between create and the first append left an empty segment: safe to redo.
        fd = os.open(path, (flags & ~os.O_EXCL) | os.O_TRUNC, FILE_MODE)
    try:
        write_all(fd, encode_segment_header(base_offset, time.time_ns()))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    fsync_dir(log_dir)
    return fd


def read_header(fd: int, path: str) -> SegmentHeader:
    """Read and check the header of an open segment.

    Raises:
        FormatVersionError: written by a newer pqueue.
        RecordError: not a pqueue segment or a damaged header.
    """
    data = os.pread(fd, SEGMENT_HEADER_BYTES, 0)
    header = decode_segment_header(data)
    if header.version > FORMAT_VERSION:
        raise FormatVersionError(header.version, FORMAT_VERSION, path)
    return header


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data`; a short write is continued, an error propagates.

    On an error part of `data` may be in the file: the caller truncates back (rule 17).
    """
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - POSIX write to a regular file returns >0 or raises
            raise OSError(errno.EIO, "write returned 0")
        view = view[n:]


class Scan(NamedTuple):
    """The result of `scan`.

    records: the valid records read, in order.
    pos / next_offset: where reading stopped and the offset expected there.
    stop: "end" (clean end of file), "incomplete" (file ends inside a record: a torn tail or a
        write in progress), "seal" (the segment is sealed; `seal_next` is the next segment's
        base offset), "bad" (invalid bytes at `pos`: `reason`), or "limit" (max_records reached).
    """

    records: list[Record]
    pos: int
    next_offset: int
    stop: str
    seal_next: int = -1
    reason: str = ""


def scan(fd: int, pos: int, next_offset: int, max_records: int, max_payload: int) -> Scan:
    """Read records from byte `pos` on, expecting offsets from `next_offset`, up to `max_records`."""
    records: list[Record] = []
    chunk = READ_CHUNK_BYTES
    while True:
        buf = os.pread(fd, chunk, pos)
        if not buf:
            return Scan(records, pos, next_offset, "end")
        at = 0
        while True:
            if len(records) >= max_records:
                return Scan(records, pos + at, next_offset, "limit")
            got = parse_one(buf, at, pos + at, next_offset, max_payload)
            if type(got) is Record:
                records.append(got)
                next_offset += 1
                at = got.end - pos
                continue
            if got is INCOMPLETE:
                break
            if type(got) is Seal:
                return Scan(records, pos + at, next_offset, "seal", got.next_offset)
            assert type(got) is Bad
            return Scan(records, pos + at, next_offset, "bad", reason=got.reason)
        if at == 0:
            if len(buf) < chunk:  # the file ends inside this record
                return Scan(records, pos, next_offset, "incomplete")
            chunk *= 4  # one record larger than the chunk: read more at once
            continue
        pos += at
        chunk = READ_CHUNK_BYTES


def walk(fd: int, pos: int, next_offset: int, max_payload: int) -> Scan:
    """Like `scan` to the end of the file, but keeps no records (counting and finding the end)."""
    chunk = READ_CHUNK_BYTES
    while True:
        result = scan(fd, pos, next_offset, chunk // RECORD_HEADER_BYTES, max_payload)
        if result.stop != "limit":
            return Scan([], result.pos, result.next_offset, result.stop, result.seal_next, result.reason)
        pos, next_offset = result.pos, result.next_offset


__all__ = ["RecordError", "Scan", "create", "fsync_dir", "list_segments", "read_header", "scan",
           "segment_name", "parse_segment_name", "write_all"]
