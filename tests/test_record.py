"""record.py: the byte format of segment headers and records."""

from __future__ import annotations

import struct

import pytest

from pqueue import record
from pqueue.record import (
    FORMAT_VERSION,
    INCOMPLETE,
    RECORD_HEADER_BYTES,
    SEGMENT_HEADER_BYTES,
    Bad,
    Record,
    Seal,
    decode_segment_header,
    encode_attrs,
    encode_record,
    encode_seal,
    encode_segment_header,
    find_resync,
    parse_one,
)


def test_header_sizes_match_the_documented_table() -> None:
    """The segment header is 32 bytes and the record header 28, as record.py documents."""
    assert SEGMENT_HEADER_BYTES == 32
    assert RECORD_HEADER_BYTES == 28
    assert len(encode_record(0, 0, 1, b"", b"")) == 28


def test_segment_header_roundtrip() -> None:
    """A segment header decodes to the version, base offset and time it was made with."""
    data = encode_segment_header(52311, 123)
    assert data[:4] == b"PQLG"
    assert struct.unpack_from("<H", data, 4)[0] == FORMAT_VERSION
    header = decode_segment_header(data)
    assert (header.version, header.base_offset, header.created_ns) == (FORMAT_VERSION, 52311, 123)


def test_segment_header_damage_is_detected() -> None:
    """A flipped bit in the base offset fails the header CRC; a wrong magic is named."""
    data = bytearray(encode_segment_header(7, 1))
    data[8] ^= 1
    with pytest.raises(record.RecordError, match="CRC32C"):
        decode_segment_header(bytes(data))
    with pytest.raises(record.RecordError, match="not a pqueue segment"):
        decode_segment_header(b"XXXX" + bytes(data[4:]))


def test_newer_version_is_reported_before_the_crc() -> None:
    """A header of a newer format is returned with its version so the caller can refuse it."""
    data = bytearray(encode_segment_header(0, 0))
    data[4:6] = struct.pack("<H", FORMAT_VERSION + 1)
    assert decode_segment_header(bytes(data)).version == FORMAT_VERSION + 1


def test_record_roundtrip_with_and_without_attributes() -> None:
    """parse_one returns exactly what encode_record framed, attributes included."""
    plain = encode_record(5, 99, 1, b"", b"payload")
    got = parse_one(plain, 0, 100, 5)
    assert isinstance(got, Record)
    assert (got.offset, got.pos, got.end, got.timestamp_ns, got.codec) == (5, 100, 100 + len(plain), 99, 1)
    assert (got.attrs, got.payload) == ({}, b"payload")
    attrs = encode_attrs({record.ATTR_KEY: "order-42", record.ATTR_PRIORITY: 3})
    rich = encode_record(6, 1, 2, attrs, b"x")
    got = parse_one(rich, 0, 0, 6)
    assert isinstance(got, Record)
    assert got.attrs == {1: "order-42", 2: 3}
    assert got.payload == b"x"


def test_attributes_cost_nothing_when_absent() -> None:
    """A record without attributes is exactly header + payload."""
    assert encode_attrs(None) == b"" == encode_attrs({})
    assert len(encode_record(0, 0, 1, b"", b"abc")) == RECORD_HEADER_BYTES + 3


def test_every_single_bit_flip_is_detected() -> None:
    """Flipping any bit of a record makes parse_one reject it (never return other data)."""
    data = encode_record(3, 42, 1, encode_attrs({1: "k"}), b"hello world")
    for i in range(len(data)):
        for bit in range(8):
            broken = bytearray(data)
            broken[i] ^= 1 << bit
            got = parse_one(bytes(broken), 0, 0, 3)
            assert not isinstance(got, Record), (i, bit)


def test_all_zero_bytes_are_not_a_record() -> None:
    """Zeros (preallocation, ext4 size-before-data) never validate (durability rule 2)."""
    assert isinstance(parse_one(bytes(64), 0, 0, 0), Bad)


def test_truncated_record_is_incomplete() -> None:
    """A buffer that ends inside a record is INCOMPLETE, not damage: more bytes may come."""
    data = encode_record(0, 0, 1, b"", b"x" * 50)
    for cut in range(len(data)):
        assert parse_one(data[:cut], 0, 0, 0) is INCOMPLETE


def test_huge_length_field_is_bounded_before_any_allocation() -> None:
    """A garbage length over the limit is Bad at once, not a multi-GiB read."""
    data = bytearray(encode_record(0, 0, 1, b"", b"x"))
    data[4:8] = struct.pack("<I", 0xFFFFFFF0)
    got = parse_one(bytes(data), 0, 0, 0, max_payload=1 << 20)
    assert isinstance(got, Bad) and "exceeds" in got.reason


def test_wrong_offset_is_bad() -> None:
    """A valid record at the wrong place in the sequence is reported, not delivered."""
    got = parse_one(encode_record(9, 0, 1, b"", b"x"), 0, 0, 8)
    assert isinstance(got, Bad) and "offset 9 where 8" in got.reason


def test_seal_names_the_next_segment() -> None:
    """A SEAL trailer parses as Seal carrying the next segment's base offset."""
    got = parse_one(encode_seal(1234, 0), 0, 500, 77)
    assert got == Seal(500, 528, 1234)


def test_find_resync_returns_the_first_valid_record_after_damage() -> None:
    """Stepping over a damaged span lands on the next CRC-valid record."""
    a = encode_record(0, 0, 1, b"", b"a" * 20)
    b = bytearray(encode_record(1, 0, 1, b"", b"b" * 20))
    b[30] ^= 0xFF
    c = encode_record(2, 0, 1, b"", b"c" * 20)
    buf = a + bytes(b) + c
    got = find_resync(buf, len(a) + 1, len(a) + 1, 1, 64, 1 << 20)
    assert got is not None
    at, rec = got
    assert at == len(a) + len(b)
    assert isinstance(rec, Record) and rec.offset == 2 and rec.payload == b"c" * 20
