"""Damage to the files on disk: torn tails, bit flips, foreign formats, lost indexes, full disks.

Every test damages real bytes at positions computed from the on-disk layout (record.py):

    segment header  32 bytes
    record          28-byte header + attributes (none here) + payload
                    +0 CRC32C u32 | +4 length u32 | +8 offset u64 | +16 timestamp u64
                    +24 flags u8 | +25 codec u8 | +26 attributes length u16 | +28 payload

The tests use the "raw" serializer, so a payload of n bytes takes exactly 28 + n bytes.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from crc32c import crc32c
from helpers import drain, flip

import pqueue
from pqueue.record import encode_record

HEADER = 32  # segment header bytes
REC = 28  # record header bytes
SEG_BYTES = 4096  # the smallest segment size Queue accepts: several segments from few records


def _open(path: Path, **kw: object) -> pqueue.Queue:
    kw.setdefault("serializer", "raw")
    kw.setdefault("fsync", "never")
    kw.setdefault("segment_bytes", SEG_BYTES)
    return pqueue.Queue(path, **kw)  # type: ignore[arg-type]


def _drain(c: pqueue.Queue | pqueue.Consumer, *, timeout: float = 0.0) -> list[tuple[int, bytes]]:
    """Get and ack everything a consumer can deliver now; (offset, data) in delivery order."""
    return [(m.offset, m.data) for m in drain(c, timeout=timeout)]


def _segments(path: Path) -> list[Path]:
    return sorted((path / "log").glob("*.seg"))


def _payload(i: int) -> bytes:
    # Odd, varying sizes (1..89 bytes) so record boundaries fall everywhere.
    return bytes([i % 251]) * (i * 37 % 89 + 1)


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every entry under `path` (itself included) with its mtime and size."""
    snap = {".": (path.stat().st_mtime_ns, 0)}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(root) / name
            st = p.stat()
            snap[str(p.relative_to(path))] = (st.st_mtime_ns, st.st_size if p.is_file() else 0)
    return snap


def _damaged_count(q: pqueue.Queue, group: str = "default") -> int:
    # No public stats API yet: the index keeps the per-group count of unreadable offsets.
    counts = q._index.counts(group)
    assert counts is not None
    return counts.damaged


# --------------------------------------------------------------------------- torn tails (B2)

N_TRUNC = 150  # records in the truncation reference queue


@pytest.fixture(scope="module")
def trunc_ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed queue of N_TRUNC odd-sized records over several 4 KiB segments."""
    ref = tmp_path_factory.mktemp("trunc") / "ref"
    with _open(ref) as q:
        assert [q.put(_payload(i)) for i in range(N_TRUNC)] == list(range(N_TRUNC))
    return ref


def _tail_layout(ref: Path) -> tuple[int, list[int]]:
    """The tail segment's base offset and the byte position where each of its records ends."""
    tail = _segments(ref)[-1]
    base = int(tail.name[:20])
    ends, pos = [], HEADER
    for off in range(base, N_TRUNC):
        pos += REC + len(_payload(off))
        ends.append(pos)
    assert tail.stat().st_size == pos  # the layout the arithmetic assumes
    return base, ends


def _truncation_points(ref: Path) -> list[int]:
    base, ends = _tail_layout(ref)
    assert len(ends) >= 6
    size = ends[-1]
    every = set(range(ends[-4], size + 1))  # every byte of the last three records
    every |= set(range(0, HEADER + 2))  # every byte of the segment header
    every |= set(range(0, size, 47))  # and a sample across the whole segment
    return sorted(every)


def test_truncated_tail_at_every_byte_recovers_the_prefix(trunc_ref: Path, tmp_path: Path) -> None:
    """A tail cut at any byte yields exactly the whole records before the cut, then appends cleanly."""
    base, ends = _tail_layout(trunc_ref)
    expected = [(i, _payload(i)) for i in range(N_TRUNC)]
    new = b"after-the-cut"
    for k in _truncation_points(trunc_ref):
        work = tmp_path / f"k{k}"
        shutil.copytree(trunc_ref, work)
        seg = _segments(work)[-1]
        os.truncate(seg, k)
        # Records of the tail that still fit in k bytes; below the 32-byte header none does.
        fit = sum(1 for e in ends if e <= k)
        boundary = ends[fit - 1] if fit else HEADER
        with _open(work) as q:
            q.consumer("after")  # a second group pins every segment (no retention) for the reopen
            got = _drain(q)
            assert got == expected[: base + fit], f"cut at byte {k}"
            off = q.put(new)
            assert off == base + fit, f"cut at byte {k}"
            # The writer cut the torn bytes before appending: header/prefix + the new record.
            assert seg.stat().st_size == boundary + REC + len(new), f"cut at byte {k}"
        with _open(work) as q:
            assert _drain(q.consumer("after")) == [*expected[: base + fit], (off, new)], f"cut at byte {k}"
            assert _drain(q) == [(off, new)]
        shutil.rmtree(work)


@pytest.mark.parametrize("cut_records", [1, 3, 10])
def test_truncation_below_delivered_offsets_never_reuses_them(trunc_ref: Path, tmp_path: Path,
                                                              cut_records: int) -> None:
    """When the log loses records a group already received, new records start above them."""
    work = tmp_path / "q"
    shutil.copytree(trunc_ref, work)
    with _open(work) as q:
        assert len(_drain(q)) == N_TRUNC  # the group was handed (and acked) offsets 0..149
    base, ends = _tail_layout(work)
    seg = _segments(work)[-1]
    keep = len(ends) - cut_records
    os.truncate(seg, ends[keep - 1])  # as a power loss would: the last cut_records records are gone
    with _open(work) as q:
        q.consumer("after")
        off = q.put(b"new")
        assert off >= N_TRUNC, f"offset {off} was already delivered"
        assert _drain(q) == [(off, b"new")]
    with _open(work) as q:
        got = _drain(q.consumer("after"))
    assert [o for o, _ in got] == [*range(got[0][0], base + keep), off]


def test_missing_tail_segment_after_seal_is_recreated(trunc_ref: Path, tmp_path: Path) -> None:
    """A crash between sealing a segment and creating the next: the next put creates it at the sealed offset."""
    work = tmp_path / "q"
    shutil.copytree(trunc_ref, work)
    base, _ends = _tail_layout(work)
    _segments(work)[-1].unlink()
    with _open(work) as q:
        q.consumer("after")
        assert _drain(q) == [(i, _payload(i)) for i in range(base)]
        assert q.put(b"new") == base
    assert _segments(work)[-1].name == f"{base:020d}.seg"
    assert _segments(work)[-1].stat().st_size == HEADER + REC + 3
    with _open(work) as q:
        assert _drain(q.consumer("after")) == [*[(i, _payload(i)) for i in range(base)], (base, b"new")]


def _wrong_offset_record(next_offset: int) -> bytes:
    # A CRC-valid record whose offset is not the one expected at the tail.
    return encode_record(next_offset + 5, 1, 0, b"", b"imposter")


def _replayed_record(next_offset: int) -> bytes:
    # A CRC-valid copy of the last record (a duplicated write): offset next_offset - 1.
    return encode_record(next_offset - 1, 1, 0, b"", _payload(next_offset - 1))


@pytest.mark.parametrize(
    "junk",
    [
        pytest.param(lambda n: b"\0", id="one-zero"),
        pytest.param(lambda n: b"\0" * (REC - 1), id="zeros-short-of-a-header"),
        pytest.param(lambda n: b"\0" * REC, id="zeros-one-header"),
        pytest.param(lambda n: b"\0" * 4096, id="zeros-4k"),
        pytest.param(lambda n: random.Random(1).randbytes(7), id="garbage-7"),
        pytest.param(lambda n: random.Random(2).randbytes(300), id="garbage-300"),
        pytest.param(lambda n: random.Random(3).randbytes(5000), id="garbage-5000"),
        pytest.param(_wrong_offset_record, id="record-with-wrong-offset"),
        pytest.param(_replayed_record, id="replayed-last-record"),
    ],
)
def test_junk_after_valid_prefix_is_cut(trunc_ref: Path, tmp_path: Path, junk) -> None:  # type: ignore[no-untyped-def]
    """Zeros, garbage or a misnumbered record after the last record are never delivered and are cut."""
    work = tmp_path / "q"
    shutil.copytree(trunc_ref, work)
    seg = _segments(work)[-1]
    size = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(junk(N_TRUNC))
    expected = [(i, _payload(i)) for i in range(N_TRUNC)]
    with _open(work) as q:
        q.consumer("after")
        assert _drain(q) == expected
        off = q.put(b"new")
        assert off == N_TRUNC
        assert seg.stat().st_size == size + REC + 3  # junk gone, the new record right behind the prefix
    with _open(work) as q:
        assert _drain(q.consumer("after")) == [*expected, (N_TRUNC, b"new")]
        assert _drain(q) == [(N_TRUNC, b"new")]


# --------------------------------------------------------------------------- bit flips (B3)

PAYLOAD = 100  # bytes per record in the bit-flip queue: every record takes 28 + 100 = 128 bytes
RECORD = REC + PAYLOAD
PER_SEG = 32  # 32 + 32 * 128 = 4128 >= 4096: the segment rolls after 32 records
N_FLIP = 74  # segments 0 (0..31, sealed), 32 (32..63, sealed), 64 (64..73, active)
SEALED_TARGET = 5  # in segment 0: record 5 starts at byte 32 + 5 * 128 = 672
ACTIVE_TARGET = 68  # in segment 64: record 68 starts at byte 32 + 4 * 128 = 544; 69..73 follow


def _flip_payload(i: int) -> bytes:
    return i.to_bytes(4, "little") * (PAYLOAD // 4)


@pytest.fixture(scope="module")
def flip_ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ref = tmp_path_factory.mktemp("flip") / "ref"
    with _open(ref) as q:
        for i in range(N_FLIP):
            q.put(_flip_payload(i))
    assert [s.name[:20] for s in _segments(ref)] == [f"{b:020d}" for b in (0, 32, 64)]
    assert _segments(ref)[0].stat().st_size == HEADER + PER_SEG * RECORD + REC  # records + SEAL
    assert _segments(ref)[2].stat().st_size == HEADER + 10 * RECORD
    return ref


def _target(where: str) -> tuple[int, int, int]:
    """(segment index, offset, byte position) of the record a flip test damages."""
    if where == "sealed":
        return 0, SEALED_TARGET, HEADER + SEALED_TARGET * RECORD
    return 2, ACTIVE_TARGET, HEADER + (ACTIVE_TARGET - 64) * RECORD


def _damaged_copy(flip_ref: Path, tmp_path: Path, where: str, byte: int, bit: int) -> tuple[Path, Path, int, int]:
    """A copy of the reference queue with one bit of the target record flipped:
    (queue, damaged segment, offset of the damaged record, its byte position)."""
    work = tmp_path / "q"
    shutil.copytree(flip_ref, work)
    seg_i, victim, pos = _target(where)
    seg = _segments(work)[seg_i]
    flip(seg, pos + byte, 1 << bit)
    return work, seg, victim, pos


# (field, byte within the record, bit): each flip makes the record invalid.
FLIPS = [
    ("crc", 0, 3),
    ("length+1", 4, 0),  # 100 -> 101: the CRC covers one byte too many
    ("length-4", 4, 2),  # 100 -> 96
    ("length+64KiB", 6, 0),  # 100 -> 65636: the record now seems to run past the end of the file
    ("length+512MiB", 7, 5),  # over max_record_bytes
    ("length+2GiB", 7, 7),  # over the 1 GiB hard bound
    ("offset", 8, 0),
    ("offset-high", 15, 6),
    ("timestamp", 16, 0),
    ("timestamp-high", 23, 1),
    ("flags-seal", 24, 0),  # looks like a SEAL trailer
    ("flags-unknown", 24, 3),
    ("codec", 25, 1),
    ("attrs-len+1", 26, 0),
    ("attrs-len+32KiB", 27, 7),  # attributes now seem to run past the end of the file
    ("payload-first", 28, 0),
    ("payload-last", 28 + PAYLOAD - 1, 7),
]


@pytest.mark.parametrize("where", ["sealed", "active"])
@pytest.mark.parametrize(("field", "byte", "bit"), FLIPS, ids=[f[0] for f in FLIPS])
def test_bit_flip_is_skipped_quarantined_and_counted(
    flip_ref: Path, tmp_path: Path, where: str, field: str, byte: int, bit: int
) -> None:
    """A flipped bit loses exactly its record: the rest is delivered, the bytes quarantined, the loss counted."""
    work, seg, victim, pos = _damaged_copy(flip_ref, tmp_path, where, byte, bit)
    damaged_bytes = seg.read_bytes()[pos : pos + RECORD]
    with _open(work) as q:
        q.consumer("pin")  # a group that reads nothing keeps every segment on disk (no retention)
        got = _drain(q)
        assert [o for o, _ in got] == [i for i in range(N_FLIP) if i != victim]
        assert all(data == _flip_payload(o) for o, data in got)  # nothing corrupt is handed out
        assert _damaged_count(q) == 1
        assert q.qsize() == 0
    quarantined = [p.read_bytes() for p in (work / "quarantine").iterdir() if p.is_file()]
    assert damaged_bytes in quarantined
    assert seg.read_bytes()[pos : pos + RECORD] == damaged_bytes  # copied, never destroyed


@pytest.mark.parametrize("where", ["sealed", "active"])
@pytest.mark.parametrize(("field", "byte", "bit"), [FLIPS[0], FLIPS[3], FLIPS[9], FLIPS[15]],
                         ids=["crc", "length+64KiB", "timestamp-high", "payload-first"])
def test_bit_flip_raises_with_path_and_position(
    flip_ref: Path, tmp_path: Path, where: str, field: str, byte: int, bit: int
) -> None:
    """With on_corruption="raise", get() stops at the damage with its segment path and byte position."""
    work, seg, victim, pos = _damaged_copy(flip_ref, tmp_path, where, byte, bit)
    with _open(work, on_corruption="raise") as q:
        got = []
        with pytest.raises(pqueue.CorruptRecordError) as info:
            for _ in range(N_FLIP + 1):
                m = q.get(timeout=0)
                got.append(m.offset)
                m.ack()
        assert os.path.samefile(info.value.path, seg)
        assert info.value.pos == pos
        assert f"damaged record at byte {pos}" in str(info.value)
        assert got == list(range(victim))  # everything before the damage, nothing after it
        assert victim not in got


@pytest.mark.parametrize("bit", [24, 30])  # 16 MiB + 100 (within the limit) and 1 GiB + 100 (over it)
def test_length_flip_never_allocates_the_claimed_length(flip_ref: Path, tmp_path: Path, bit: int) -> None:
    """A length field flipped to a huge value neither allocates it nor hangs the reader."""
    # The length is the u32 at +4, little-endian.
    work, seg, _victim, pos = _damaged_copy(flip_ref, tmp_path, "sealed", 4 + bit // 8, bit % 8)
    length = struct.unpack_from("<I", seg.read_bytes(), pos + 4)[0]
    assert length == PAYLOAD + (1 << bit)
    tracemalloc.start()
    try:
        with _open(work, max_record_bytes=1 << 30) as q:
            got = _drain(q)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"reading allocated {peak} bytes"
    assert SEALED_TARGET not in [o for o, _ in got]
    assert all(data == _flip_payload(o) for o, data in got)
    assert [o for o, _ in got if o >= 32] == list(range(32, N_FLIP))  # later segments are untouched


STALE_RP_CHILD = r"""
import os, sys
import pqueue
# fsync="never": the recovery point stays where the active segment began, and os._exit skips
# close(), so the next writer must scan the whole active segment (as after a crash).
q = pqueue.Queue(sys.argv[1], serializer="raw", fsync="never", segment_bytes=4096)
for i in range(int(sys.argv[2])):
    q.put(i.to_bytes(4, "little") * 25)
os._exit(0)
"""


@pytest.mark.parametrize(("field", "byte", "bit"), [FLIPS[0], FLIPS[3], FLIPS[14], FLIPS[15]],
                         ids=["crc", "length+64KiB", "attrs-len+32KiB", "payload-first"])
def test_flip_in_unsynced_tail_keeps_valid_records_behind_it(
    tmp_path: Path, field: str, byte: int, bit: int
) -> None:
    """Rot in the middle of the unsynced tail is skipped by the writer's recovery, not truncated with what follows."""
    work = tmp_path / "q"
    subprocess.run([sys.executable, "-c", STALE_RP_CHILD, str(work), str(N_FLIP)], check=True, timeout=60)
    seg_i, victim, pos = _target("active")
    seg = _segments(work)[seg_i]
    assert seg.stat().st_size == HEADER + 10 * RECORD
    flip(seg, pos + byte, 1 << bit)
    with _open(work) as q:
        q.consumer("after")
        assert q.put(b"new") == N_FLIP  # recovery (as a writer) happens here
        got = _drain(q)
    with _open(work) as q:
        again = _drain(q.consumer("after"))
    survivors = [i for i in range(N_FLIP) if i != victim] + [N_FLIP]
    assert [o for o, _ in got] == survivors
    assert [o for o, _ in again] == survivors


# --------------------------------------------------------------------------- foreign formats


def _bump_version(seg: Path, version: int) -> None:
    data = bytearray(seg.read_bytes())
    struct.pack_into("<H", data, 4, version)  # u16 format version at byte 4
    struct.pack_into("<I", data, 28, crc32c(bytes(data[:28])))  # header CRC32C over bytes 0..27
    seg.write_bytes(bytes(data))


@pytest.mark.parametrize("which", ["only-segment", "oldest-of-three"])
def test_newer_format_version_is_refused(tmp_path: Path, which: str) -> None:
    """A segment written by a newer format raises FormatVersionError(found, supported) and is not touched."""
    path = tmp_path / "q"
    n = 3 if which == "only-segment" else 80
    with _open(path) as q:
        q.put_many([b"x" * 100] * n)
    seg = _segments(path)[0]
    newer = pqueue.FORMAT_VERSION + 1
    _bump_version(seg, newer)
    before = seg.read_bytes()
    with pytest.raises(pqueue.FormatVersionError) as info:
        with _open(path) as q:
            q.get(timeout=0)
    assert (info.value.found, info.value.supported) == (newer, pqueue.FORMAT_VERSION)
    assert f"on-disk format version {newer} is newer than the {pqueue.FORMAT_VERSION}" in str(info.value)
    if which == "only-segment":
        with pytest.raises(pqueue.FormatVersionError):
            with _open(path) as q:
                q.put(b"y")
    assert seg.read_bytes() == before


def test_non_queue_directory_is_refused_and_untouched(tmp_path: Path) -> None:
    """Opening a directory that holds other files raises NotAQueueError and changes nothing in it."""
    path = tmp_path / "photos"
    (path / "2024").mkdir(parents=True)
    (path / "notes.txt").write_text("not a queue\n")
    (path / "2024" / "a.jpg").write_bytes(b"\xff\xd8")
    before = _snapshot(path)
    with pytest.raises(pqueue.NotAQueueError, match="not a pqueue directory"):
        pqueue.Queue(path)
    assert _snapshot(path) == before
    file_path = path / "notes.txt"
    with pytest.raises(pqueue.NotAQueueError):
        pqueue.Queue(file_path)
    with pytest.raises(pqueue.NotAQueueError):
        pqueue.Queue(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()
    assert _snapshot(path) == before


# --------------------------------------------------------------------------- the index is lost


def _consume_some(path: Path, n: int, acked: int) -> str:
    with pqueue.Queue(path, fsync="always") as q:
        q.put_many([{"n": i} for i in range(n)])
        for _ in range(acked):
            q.get(timeout=0).ack()
        sid = q.source_id
    return sid


def _wreck_index(path: Path, how: str) -> None:
    if how == "deleted":
        shutil.rmtree(path / "index")
    else:
        data = path / "index" / "data.mdb"
        data.write_bytes(random.Random(7).randbytes(data.stat().st_size))


@pytest.mark.parametrize("how", ["deleted", "data-file-garbage"])
def test_lost_index_is_rebuilt_and_redelivers_everything(tmp_path: Path, how: str) -> None:
    """Without its index the queue rebuilds from the log: every message comes again, none is lost."""
    path = tmp_path / "q"
    n = 40
    sid = _consume_some(path, n, acked=25)
    _wreck_index(path, how)
    with pqueue.Queue(path, fsync="always") as q:
        assert q.source_id == sid
        assert q.qsize() == n
        got = _drain(q)
        assert got == [(i, {"n": i}) for i in range(n)]
        assert q.put({"n": n}) == n  # offsets continue from the log, never reused
    with pqueue.Queue(path) as q:
        assert q.source_id == sid
        assert _drain(q) == [(n, {"n": n})]


# --------------------------------------------------------------------------- bad input, full disk

DISK_FULL_CHILD = r"""
import resource, signal, sys
import pqueue
path, limit = sys.argv[1], int(sys.argv[2])
q = pqueue.Queue(path, serializer="raw", fsync="always")
q.put(b"warm-up")  # index, lock file and segment exist before the limit applies
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
for i in range(1, 10_000):
    try:
        q.put(bytes([i % 256]) * 1000)
    except Exception as exc:
        print("error", type(exc).__name__, flush=True)
        break
    print("ok", i, flush=True)
try:
    q.put(bytes([0]) * 1000)
except Exception as exc:
    print("again", type(exc).__name__, flush=True)
try:
    q.put_many([b"a" * 10, bytes([0]) * 1000])
except Exception as exc:
    print("many", type(exc).__name__, flush=True)
print("small", q.put(b"tiny"), flush=True)  # fits below the limit: the queue is still usable
q.close()
"""


def test_disk_full_during_append_rolls_back(tmp_path: Path) -> None:
    """A put that hits a full disk raises DiskFullError, leaves no partial record and the queue stays usable."""
    path = tmp_path / "q"
    limit = 50_000  # bytes per file; 32 + 35 (warm-up) + 48 * 1028 = 49411 < 50000 < 49411 + 1028
    out = subprocess.run([sys.executable, "-c", DISK_FULL_CHILD, str(path), str(limit)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    oks = [int(line.split()[1]) for line in lines if line.startswith("ok ")]
    assert oks == list(range(1, 49))
    assert "error DiskFullError" in lines
    assert "again DiskFullError" in lines
    assert "many DiskFullError" in lines  # all or nothing: the 10-byte record is gone too
    assert lines[-1] == "small 49"
    seg = _segments(path)[0]
    assert seg.stat().st_size == HEADER + (REC + 7) + 48 * (REC + 1000) + (REC + 4)  # nothing partial
    with _open(path, fsync="always") as q:
        got = _drain(q)
        assert got == [(0, b"warm-up"), *[(i, bytes([i % 256]) * 1000) for i in range(1, 49)], (49, b"tiny")]
        assert q.put(b"after") == 50
    with _open(path) as q:
        assert _drain(q.consumer("check"))[-1] == (50, b"after")


def test_unserializable_payload_writes_nothing(tmp_path: Path) -> None:
    """An item the serializer cannot encode raises SerializationError and leaves the files as they were."""
    path = tmp_path / "q"
    with pqueue.Queue(path, fsync="always") as q:
        q.put({"ok": 1})
        seg = _segments(path)[0]
        size = seg.stat().st_size
        with pytest.raises(pqueue.SerializationError, match="nothing was written"):
            q.put(object())
        with pytest.raises(pqueue.SerializationError, match="nothing was written"):
            q.put_many([{"ok": 2}, {1, 2, 3}])
        assert seg.stat().st_size == size
        assert q.qsize() == 1
        assert q.put({"ok": 3}) == 1
    with pqueue.Queue(path) as q:
        assert _drain(q) == [(0, {"ok": 1}), (1, {"ok": 3})]


def test_oversized_payload_writes_nothing(tmp_path: Path) -> None:
    """A payload over max_record_bytes raises RecordTooLargeError and writes nothing."""
    path = tmp_path / "q"
    with _open(path, max_record_bytes=100, fsync="always") as q:
        assert q.put(b"a" * 100) == 0  # exactly the limit is fine
        seg = _segments(path)[0]
        size = seg.stat().st_size
        with pytest.raises(pqueue.RecordTooLargeError, match="max_record_bytes=100"):
            q.put(b"b" * 101)
        with pytest.raises(pqueue.RecordTooLargeError):
            q.put_many([b"c", b"d" * 101])
        assert seg.stat().st_size == size == HEADER + REC + 100
        assert q.qsize() == 1
        assert q.put(b"e") == 1
    with _open(path) as q:
        assert _drain(q) == [(0, b"a" * 100), (1, b"e")]
