"""pqueue.inspect: read-only views of a queue directory (records, damage, stat, verify, locate)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import flip

import pqueue
import pqueue.inspect as pi

SEGMENT_HEADER = 32  # bytes before the first record of a segment
RECORD_HEADER = 28  # bytes before a record's payload (no attributes)


def make(path: Path, n: int, **kwargs: object) -> None:
    """A closed queue holding {"n": i} for i in range(n), put one at a time."""
    with pqueue.Queue(path, **kwargs) as q:  # type: ignore[arg-type]
        for i in range(n):
            q.put({"n": i})


def entries(path: Path) -> list[pi.Entry]:
    return [e for e in pi.records(path) if isinstance(e, pi.Entry)]


def snapshot(path: Path) -> dict[str, int]:
    """Every file under `path` with its size (lock.mdb excluded: LMDB's reader table lives there)."""
    out = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = -1 if name == "lock.mdb" else os.path.getsize(full)
    return out


def test_records_yields_offsets_positions_and_payloads(qpath: Path) -> None:
    """Every record comes back with its offset, byte position, size and decoded payload."""
    make(qpath, 3)
    got = entries(qpath)
    assert [e.offset for e in got] == [0, 1, 2]
    assert [e.decode() for e in got] == [{"n": 0}, {"n": 1}, {"n": 2}]
    # {"n": 0} packs to 4 msgpack bytes: each record is 28 + 4 bytes, the first after the header.
    assert [e.pos for e in got] == [SEGMENT_HEADER, SEGMENT_HEADER + 32, SEGMENT_HEADER + 64]
    assert all(e.size == 4 and e.record_bytes == 32 and e.crc_ok for e in got)
    assert [e.offset for e in pi.records(qpath, from_offset=1, to_offset=1)] == [1]


def test_flipped_byte_is_damage_with_position_and_length(qpath: Path) -> None:
    """A CRC-bad record is reported with segment, byte position and length, and never decoded."""
    make(qpath, 3)
    seg = pi.segment_path(qpath, 0)
    # Record 1 starts at 32 + 32 = 64; byte 64 + 28 is the first payload byte.
    flip(seg, 64 + RECORD_HEADER)
    items = list(pi.records(qpath))
    assert [type(i).__name__ for i in items] == ["Entry", "Damage", "Entry"]
    damage = items[1]
    assert damage == pi.Damage(0, 64, 32, 1, 2, "CRC32C mismatch", pi.ROT)
    result = pi.verify(qpath)
    assert not result.ok and result.damage == (damage,) and result.records == 2


def test_damaged_segment_header_still_reads_records(qpath: Path) -> None:
    """A damaged segment header is damage, but its records are still read by file name."""
    make(qpath, 2)
    flip(pi.segment_path(qpath, 0), 10)  # inside the base-offset field, covered by the header CRC
    items = list(pi.records(qpath))
    assert isinstance(items[0], pi.Damage) and items[0].kind == pi.HEADER and items[0].pos == 0
    assert [e.offset for e in items[1:] if isinstance(e, pi.Entry)] == [0, 1]


def test_torn_tail_is_reported_after_rechecks(qpath: Path) -> None:
    """An unfinished record at the end of the newest segment is a torn tail once it stays so."""
    make(qpath, 2)
    seg = pi.segment_path(qpath, 0)
    size = os.path.getsize(seg)
    os.truncate(seg, size - 5)  # cut the last record (offset 1, at byte 64) 5 bytes short
    items = list(pi.records(qpath))
    assert [e.offset for e in items if isinstance(e, pi.Entry)] == [0]
    assert items[-1] == pi.Damage(0, 64, 27, 1, 1, "unfinished record at the end of the log", pi.TORN_TAIL)


def test_inspection_never_writes_to_the_queue(qpath: Path) -> None:
    """records, stat, verify, groups and locate create and change no file (lock.mdb aside)."""
    make(qpath, 5)
    with pqueue.Queue(qpath) as q:
        q.get().ack()
    before = snapshot(qpath)
    list(pi.records(qpath))
    pi.stat(qpath)
    pi.verify(qpath)
    pi.groups(qpath)
    pi.locate(qpath, 3)
    assert snapshot(qpath) == before


def test_missing_index_is_reported_and_not_created(qpath: Path) -> None:
    """Without an index, verify says so and nothing creates one."""
    make(qpath, 1)
    os.rename(qpath / "index", qpath.parent / "saved-index")
    result = pi.verify(qpath)
    assert result.index_state == "missing" and not result.ok
    assert pi.stat(qpath).index_error is not None
    assert not (qpath / "index").exists()


def test_unreadable_index_is_reported(qpath: Path) -> None:
    """An index with garbage in data.mdb is reported as unreadable (repair rebuilds it)."""
    make(qpath, 1)
    with open(qpath / "index" / "data.mdb", "r+b") as f:
        f.write(b"\xff" * 4096)
    result = pi.verify(qpath)
    assert result.index_state == "unreadable" and not result.ok


def test_stat_reports_offsets_and_group_state(qpath: Path) -> None:
    """stat: segments, first and next offset, and a group's committed offset and lag."""
    make(qpath, 4)
    with pqueue.Queue(qpath) as q:
        q.get().ack()
        q.flush()
    st = pi.stat(qpath)
    assert (st.segments, st.first_offset, st.next_offset, st.records) == (1, 0, 4, 4)
    (group,) = st.groups
    assert (group.name, group.committed, group.lag, group.dead) == ("default", 1, 3, 0)
    assert st.index_error is None and st.dead_letters == 0
    assert pi.verify(qpath).ok


def test_records_follow_seals_across_segments(qpath: Path) -> None:
    """With small segments the walk follows every seal; locate finds any record and the end."""
    make(qpath, 300, segment_bytes=4096)
    assert len(pi._segments(str(qpath))) > 1
    assert [e.offset for e in entries(qpath)] == list(range(300))
    seg, pos = pi.locate(qpath, 250)
    assert (seg, pos) == next((e.segment, e.pos) for e in entries(qpath) if e.offset == 250)
    assert pi.log_end(qpath) == 300 and pi.tail_start(qpath, 5) == 295
    with pytest.raises(ValueError, match="outside the log"):
        pi.locate(qpath, 301)
    assert pi.verify(qpath).ok


def test_not_a_queue_is_refused(tmp_path: Path) -> None:
    """A directory that is not a queue is refused with NotAQueueError and left as it was."""
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(pqueue.NotAQueueError, match="not a pqueue directory"):
        pi.stat(tmp_path)
    with pytest.raises(pqueue.NotAQueueError, match="does not exist"):
        list(pi.records(tmp_path / "missing"))
    assert os.listdir(tmp_path) == ["x.txt"]
