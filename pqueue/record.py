"""Encoding and decoding of segment headers and records: pure functions, no I/O.

Segment header (32 bytes, little-endian), at byte 0 of every ``log/<base offset>.seg``:

    ======  ====  =========================================================================
    offset  size  meaning
    ======  ====  =========================================================================
    0       4     magic ``b"PQLG"``
    4       2     u16 format version (``FORMAT_VERSION``); a higher one is refused
    6       2     u16 header size in bytes (32 in version 1)
    8       8     u64 base offset: the offset of the first record in this segment
    16      8     u64 creation time, nanoseconds since the Unix epoch
    24      4     reserved, zero
    28      4     u32 CRC32C of bytes 0..27
    ======  ====  =========================================================================

Record (28-byte header, then attributes, then payload; all little-endian):

    ======  ====  =========================================================================
    offset  size  meaning
    ======  ====  =========================================================================
    0       4     u32 CRC32C of every byte of the record after this field (header fields,
                  attributes and payload), so a torn or shifted record never validates
    4       4     u32 payload length in bytes
    8       8     u64 absolute offset (consecutive within a segment)
    16      8     u64 timestamp, nanoseconds since the Unix epoch, taken at put
    24      1     u8 flags: bit 0 = SEAL (segment trailer, see below); other bits must be 0
    25      1     u8 codec of the payload (``CODEC_*``)
    26      2     u16 attributes length; 0 when the record has none
    28      n     attributes: a msgpack map of small integer keys (``ATTR_*``) to values
    28+n    m     payload
    ======  ====  =========================================================================

A SEAL record closes a segment: its offset field holds the base offset of the next segment,
its codec, attributes and payload are empty. Readers that reach it move to the next segment
without listing the directory; a sealed segment is immutable.

Optional per-record attributes (idempotency key, priority, not-before and expiry times,
dead-letter metadata) live in the attribute map, so records that do not use them cost nothing
and new attributes need no format version bump: readers ignore keys they do not know.

Version history: 1 (2026-11) the layout above.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, NamedTuple

import msgpack
from crc32c import crc32c

FORMAT_VERSION = 1
MAGIC = b"PQLG"

SEGMENT_HEADER = struct.Struct("<4sHHQQII")
SEGMENT_HEADER_BYTES = SEGMENT_HEADER.size  # 32 bytes
RECORD_HEADER = struct.Struct("<IIQQBBH")
RECORD_HEADER_BYTES = RECORD_HEADER.size  # 28 bytes
MAX_ATTRS_BYTES = 0xFFFF  # 64 KiB - 1, the u16 attributes length
MAX_PAYLOAD_BYTES = 1 << 30  # 1 GiB: a hard sanity bound on the length field, whatever the config

FLAG_SEAL = 0x01
KNOWN_FLAGS = FLAG_SEAL

CODEC_RAW = 0
CODEC_MSGPACK = 1
CODEC_JSON = 2
CODEC_PICKLE = 3
CODEC_CUSTOM = 4

ATTR_KEY = 1  # str: idempotency key
ATTR_PRIORITY = 2  # int: priority level
ATTR_NOT_BEFORE = 3  # float: Unix time before which the record is not delivered
ATTR_EXPIRES = 4  # float: Unix time after which the record is dead ("expired")
ATTR_META = 5  # dict: dead-letter metadata (source offset, group, error, times, ...)
ATTR_BOOT = 6  # [boot id, CLOCK_BOOTTIME deadline]: makes ATTR_NOT_BEFORE immune to clock steps

_pack_header = RECORD_HEADER.pack
_unpack_header = RECORD_HEADER.unpack_from


def msgpack_packer(**options: Any) -> Callable[[Any], bytes]:
    """A msgpack pack function that reuses Packers but never lets two calls share one.

    A reused Packer halves the encode cost (notes/hotpath.md: 197 vs 399 ns), but packing a
    dict subclass runs its Python items(), during which another thread (or a finalizer or a
    signal handler) may pack too: one shared buffer would interleave the two into garbage
    that a record's CRC would then vouch for. Each call takes a Packer from a free list (pop
    and append are atomic) and makes a new one when none is free.
    """
    free = [msgpack.Packer(use_bin_type=True, **options).pack]
    pop, push = free.pop, free.append

    def pack(obj: Any) -> bytes:
        try:
            packer = pop()
        except IndexError:  # another pack is under way (or the last one raised and was dropped)
            packer = msgpack.Packer(use_bin_type=True, **options).pack
        data: bytes = packer(obj)
        push(packer)  # not after an error: a Packer that raised is dropped, a new one replaces it
        return data

    return pack


_pack_attrs = msgpack_packer()


class RecordError(ValueError):
    """A record or segment header failed validation; `reason` says why."""


class SegmentHeader(NamedTuple):
    version: int
    base_offset: int
    created_ns: int


class Record(NamedTuple):
    """One decoded record. `pos` is its byte position in its segment, `end` the byte after it."""

    offset: int
    pos: int
    end: int
    timestamp_ns: int
    codec: int
    attrs: dict[int, Any]
    payload: bytes


def encode_segment_header(base_offset: int, created_ns: int) -> bytes:
    """Return the 32-byte header of a segment whose first record has `base_offset`."""
    head = SEGMENT_HEADER.pack(MAGIC, FORMAT_VERSION, SEGMENT_HEADER_BYTES, base_offset, created_ns, 0, 0)
    return head[:28] + struct.pack("<I", crc32c(head[:28]))


def decode_segment_header(data: bytes) -> SegmentHeader:
    """Parse and check a segment header.

    Raises:
        RecordError: bad magic, bad CRC or too short.
        FormatVersionError: (via `check_version`) is left to the caller, which knows the path;
            a version above FORMAT_VERSION is reported as ``SegmentHeader.version``.
    """
    if len(data) < SEGMENT_HEADER_BYTES:
        raise RecordError(f"segment header is {len(data)} bytes, expected {SEGMENT_HEADER_BYTES}")
    magic, version, size, base, created, _reserved, crc = SEGMENT_HEADER.unpack_from(data)
    if magic != MAGIC:
        raise RecordError(f"bad magic {magic!r}, expected {MAGIC!r}: not a pqueue segment")
    if version > FORMAT_VERSION:
        # Checked before the CRC: a newer version may lay its header out differently.
        return SegmentHeader(version, base, created)
    if crc != crc32c(data[:28]):
        raise RecordError("segment header CRC32C mismatch")
    if size != SEGMENT_HEADER_BYTES:
        raise RecordError(f"segment header size {size}, expected {SEGMENT_HEADER_BYTES}")
    return SegmentHeader(version, base, created)


def encode_attrs(attrs: dict[int, Any] | None) -> bytes:
    """Pack optional attributes; an empty or missing map costs zero bytes."""
    if not attrs:
        return b""
    data: bytes = _pack_attrs(attrs)
    if len(data) > MAX_ATTRS_BYTES:
        raise RecordError(f"record attributes take {len(data)} bytes, the limit is {MAX_ATTRS_BYTES}")
    return data


def encode_record(offset: int, timestamp_ns: int, codec: int, attrs: bytes, payload: bytes) -> bytes:
    """Return one framed record. `attrs` comes from `encode_attrs`."""
    body = _pack_header(0, len(payload), offset, timestamp_ns, 0, codec, len(attrs))[4:] + attrs + payload
    return crc32c(body).to_bytes(4, "little") + body


def encode_seal(next_offset: int, timestamp_ns: int) -> bytes:
    """Return the SEAL trailer that closes a segment; `next_offset` names the next segment."""
    body = _pack_header(0, 0, next_offset, timestamp_ns, FLAG_SEAL, 0, 0)[4:]
    return crc32c(body).to_bytes(4, "little") + body


# Outcomes of `parse_one`, besides a Record.
INCOMPLETE = "incomplete"  # the buffer ends inside the record: more bytes may still come


class Seal(NamedTuple):
    pos: int
    end: int
    next_offset: int


class Bad(NamedTuple):
    pos: int
    reason: str


def parse_one(
    buf: bytes | memoryview, at: int, pos: int, expected_offset: int | None, max_payload: int = MAX_PAYLOAD_BYTES
) -> Record | Seal | Bad | str:
    """Parse the record that starts at `buf[at:]`, which is byte `pos` of its segment.

    Returns a Record, a Seal, INCOMPLETE when `buf` ends before the record does, or Bad with the
    reason the bytes are not a valid record. The length field is bounded before anything is
    sliced, so a garbage length never causes a large allocation.
    """
    n = len(buf)
    if n - at < RECORD_HEADER_BYTES:
        return INCOMPLETE
    crc, length, offset, ts, flags, codec, attrs_len = _unpack_header(buf, at)
    if length > max_payload:
        return Bad(pos, f"length field {length} exceeds the {max_payload}-byte limit")
    if flags & ~KNOWN_FLAGS:
        return Bad(pos, f"unknown flag bits 0x{flags:02x}")
    end = at + RECORD_HEADER_BYTES + attrs_len + length
    if end > n:
        return INCOMPLETE
    if crc32c(buf[at + 4 : end]) != crc:
        return Bad(pos, "CRC32C mismatch")
    if flags & FLAG_SEAL:
        if length or attrs_len:
            return Bad(pos, "seal record with a body")
        return Seal(pos, pos + (end - at), offset)
    if expected_offset is not None and offset != expected_offset:
        return Bad(pos, f"offset {offset} where {expected_offset} was expected")
    attrs: dict[int, Any] = {}
    if attrs_len:
        try:
            attrs = msgpack.unpackb(buf[at + RECORD_HEADER_BYTES : at + RECORD_HEADER_BYTES + attrs_len],
                                    strict_map_key=False)
        except Exception as exc:  # msgpack raises several types; a CRC-valid record should never get here
            return Bad(pos, f"undecodable attributes: {exc}")
        if not isinstance(attrs, dict):
            return Bad(pos, "attributes are not a map")
    payload = bytes(buf[at + RECORD_HEADER_BYTES + attrs_len : end])
    return Record(offset, pos, pos + (end - at), ts, codec, attrs, payload)


def find_resync(
    buf: bytes, start: int, pos: int, min_offset: int, max_candidates: int, max_payload: int
) -> tuple[int, Record | Seal] | None:
    """Find the first valid record in `buf[start:]` with an offset of `min_offset` or more.

    Used to step over a damaged span (`buf[start]` is byte `pos` of the segment). Records are in
    offset order, so trying the candidate offsets in ascending order and returning the first
    one that has a CRC-valid record anywhere in `buf` yields the earliest valid record after the
    damage. Each candidate costs one C-speed `find` pass over `buf`; `max_candidates` bounds the
    search (damage wider than that many records ends the segment's readable part).

    Returns (index in `buf`, the record) or None when nothing valid follows within `buf`.
    """
    for candidate in range(min_offset, min_offset + max_candidates):
        needle = candidate.to_bytes(8, "little")
        i = buf.find(needle, start + 8)
        while i != -1:
            at = i - 8
            got = parse_one(buf, at, pos + (at - start), None, max_payload)
            if isinstance(got, Record) and got.offset == candidate:
                return at, got
            if isinstance(got, Seal) and got.next_offset == candidate:
                return at, got
            i = buf.find(needle, i + 1)
    return None
