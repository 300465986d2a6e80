"""log.py: appends, rolls, fsync policies, recovery, retention, the writer hand-off."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from crc32c import crc32c
from helpers import drain

import pqueue
from pqueue import segment
from pqueue.log import _LEFT_END, LEFT_END_AT, LOCK_FILE_BYTES
from pqueue.policy import FsyncPolicy
from pqueue.record import SEGMENT_HEADER_BYTES, encode_record


def segments(path: Path) -> list[str]:
    return sorted(os.listdir(path / "log"))


def read_all(path: Path) -> list[Any]:
    with pqueue.Queue(path) as q:
        return [m.data for m in drain(q)]


def test_new_segment_has_header_and_name(qpath: Path) -> None:
    """The first segment is log/<20 digits>.seg starting with the PQLG header."""
    with pqueue.Queue(qpath) as q:
        q.put(1)
    assert segments(qpath) == ["00000000000000000000.seg"]
    data = (qpath / "log" / "00000000000000000000.seg").read_bytes()
    assert data[:4] == b"PQLG"


def test_roll_seals_and_names_the_next_segment_by_offset(qpath: Path) -> None:
    """Passing segment_bytes seals the segment with a trailer naming the next one."""
    with pqueue.Queue(qpath, segment_bytes=4096, serializer="raw") as q:
        for _ in range(30):
            q.put(b"x" * 300)
    names = segments(qpath)
    assert len(names) > 1
    # Each record is 28 + 300 bytes; the first segment takes records until it passes 4096:
    # 32 + 12 * 328 = 3968 < 4096 <= 32 + 13 * 328, so the second segment starts at offset 13.
    assert names[1] == f"{13:020d}.seg"
    first = (qpath / "log" / names[0]).read_bytes()
    assert len(first) == 32 + 13 * 328 + 28  # records, then the 28-byte SEAL
    assert read_all(qpath) == [b"x" * 300] * 30


def _run_threads(target: Any, n: int) -> None:
    threads = [threading.Thread(target=target, args=(t,)) for t in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "a thread hung in the group commit"


def test_group_commit_many_threads_always(qpath: Path) -> None:
    """With fsync=always, concurrent puts from 8 threads all land, with unique offsets."""
    with pqueue.Queue(qpath, fsync="always") as q:
        offsets: list[int] = []
        lock = threading.Lock()

        def work(t: int) -> None:
            for i in range(50):
                off = q.put((t, i))
                with lock:
                    offsets.append(off)

        _run_threads(work, 8)
        assert sorted(offsets) == list(range(400))
        assert q._log._group.synced_seq == q._log._seq  # every returned put was covered by an fsync
    got = read_all(qpath)
    assert sorted(map(tuple, got)) == sorted((t, i) for t in range(8) for i in range(50))


def test_group_commit_shares_one_write_and_one_fsync(qpath: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent fsync=always puts are written and synced together: fewer fdatasyncs than
    puts, and every put was written by some write() before its put returned."""
    calls = {"fdatasync": 0}
    real_fdatasync = os.fdatasync

    def counting_fdatasync(fd: int) -> None:
        calls["fdatasync"] += 1
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", counting_fdatasync)
    with pqueue.Queue(qpath, fsync="always") as q:
        def work(t: int) -> None:
            for i in range(50):
                off = q.put((t, i))
                assert q._log._group.synced_seq >= 1 and off < q._log._next

        _run_threads(work, 8)
        assert 0 < calls["fdatasync"] < 400
    assert len(read_all(qpath)) == 400


def test_group_commit_mixes_puts_batches_and_keyed_puts(qpath: Path) -> None:
    """Plain puts (grouped writes), put_many and keyed puts (their own write, then a grouped
    sync) from several threads: all land once, in distinct offsets, all synced."""
    with pqueue.Queue(qpath, fsync="always") as q:
        offsets: list[int] = []
        lock = threading.Lock()

        def work(t: int) -> None:
            for i in range(20):
                if t % 3 == 0:
                    got = [q.put((t, i))]
                elif t % 3 == 1:
                    got = q.put_many([(t, i, 0), (t, i, 1)])
                else:
                    got = [q.put((t, i), key=f"{t}/{i}")]
                with lock:
                    offsets.extend(got)

        _run_threads(work, 6)
        assert sorted(offsets) == list(range(len(offsets)))
        assert len(offsets) == 2 * 20 * 2 + 2 * 20 * 1 + 2 * 20
        assert q._log._group.synced_seq == q._log._seq
    assert len(read_all(qpath)) == len(offsets)


def test_group_commit_survives_a_leader_that_raises(qpath: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Something unforeseen escapes the group leader: its group's puts fail (none returns as
    if durable), nobody hangs, and the next puts commit normally."""
    from pqueue.log import Log

    real = Log._fdatasync
    armed = {"left": 1}

    def failing_once(self: Any, fd: int, target: int) -> Any:
        if armed["left"]:
            armed["left"] -= 1
            raise RuntimeError("injected")
        return real(self, fd, target)

    monkeypatch.setattr(Log, "_fdatasync", failing_once)
    with pqueue.Queue(qpath, fsync="always") as q:
        outcomes: list[str] = []
        lock = threading.Lock()

        def work(t: int) -> None:
            for i in range(10):
                try:
                    q.put((t, i))
                    result = "ok"
                except RuntimeError:
                    result = "leader"
                except pqueue.QueueError as exc:
                    assert "interrupted" in str(exc)
                    result = "failed"
                with lock:
                    outcomes.append(result)

        _run_threads(work, 4)
        assert outcomes.count("leader") == 1
        assert outcomes.count("ok") >= 40 - 8
        q.put("after")
        assert q._log._group.synced_seq == q._log._seq


def test_interval_policy_bounds_unsynced_records(qpath: Path) -> None:
    """An interval policy with a record bound never leaves more than that many unsynced."""
    with pqueue.Queue(qpath, fsync="3600s/10") as q:
        for _ in range(95):
            q.put(0)
            assert q._log._seq - q._log._group.synced_seq < 10


def test_never_policy_does_not_sync_per_put(qpath: Path) -> None:
    """fsync=never leaves appends to the OS (until close or a roll)."""
    with pqueue.Queue(qpath, fsync="never") as q:
        for _ in range(20):
            q.put(0)
        assert q._log._group.synced_seq == 0
        q.flush()
        assert q._log._group.synced_seq == 20


def test_bad_fsync_specs_are_refused() -> None:
    """Unknown fsync policies name the accepted spellings."""
    with pytest.raises(ValueError, match="'always', 'never', 'interval'"):
        FsyncPolicy.parse("sometimes")
    with pytest.raises(TypeError):
        FsyncPolicy.parse(True)


def _record_scans(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Wrap segment.<name> (scan or walk) to note the position each call starts at."""
    started: list[int] = []
    real = getattr(segment, name)

    def spy(fd: int, pos: int, *args: Any) -> segment.Scan:
        started.append(pos)
        return real(fd, pos, *args)  # type: ignore[no-any-return]

    monkeypatch.setattr(segment, name, spy)
    return started


def test_open_scans_only_from_the_recovery_point(qpath: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer reopening a queue scans from the saved recovery point, not the whole log."""
    with pqueue.Queue(qpath, segment_bytes=1 << 20, serializer="raw") as q:
        q.put_many([b"y" * 100] * 2000)
        end = q._log._pos
    scanned = _record_scans(monkeypatch, "scan")
    with pqueue.Queue(qpath, serializer="raw") as q:
        assert q.put(b"z") == 2000
    assert scanned[0] == end  # started at the end recorded at close: nothing rescanned


def test_torn_tail_is_truncated_and_quarantined(qpath: Path) -> None:
    """Garbage after the last record is cut off at the next append and copied to quarantine/."""
    with pqueue.Queue(qpath) as q:
        q.put_many(range(3))
    seg = qpath / "log" / segments(qpath)[0]
    good = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(encode_record(3, 0, 1, b"", b"\x01" * 40)[:30])  # a record cut 30 bytes in
    with pqueue.Queue(qpath) as q:
        assert q.put(99) == 3
    assert os.listdir(qpath / "quarantine")
    assert read_all(qpath) == [0, 1, 2, 99]
    assert seg.stat().st_size > good


def test_offsets_never_reused_after_the_tail_was_lost(qpath: Path) -> None:
    """If the log lost records that were already handed out, new puts start above them."""
    with pqueue.Queue(qpath) as q:
        q.put_many(range(5))
        for _ in range(5):
            q.get(timeout=1).ack()
        q.flush()
    seg = qpath / "log" / segments(qpath)[0]
    # Cut the last two records off (as a power loss of unsynced data would): each msgpack'd
    # small int is 1 byte, so a record is 29 bytes and records 3 and 4 end the file.
    os.truncate(seg, SEGMENT_HEADER_BYTES + 3 * 29)
    with pqueue.Queue(qpath) as q:
        assert q.put("after") == 5
        assert q.get(timeout=1).data == "after"


@pytest.mark.parametrize(("fsync", "n"), [("never", 3000), ("always", 500)])
def test_two_processes_append_without_interleaving(qpath: Path, fsync: str, n: int) -> None:
    """Two writer processes hand the lock over; all records are intact and consecutive."""
    pqueue.Queue(qpath).close()
    code = (
        "import sys, pqueue\n"
        f"q = pqueue.Queue(sys.argv[1], fsync={fsync!r})\n"
        f"for i in range({n}): q.put([sys.argv[2], i])\n"
        "q.close()\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(qpath), name]) for name in ("a", "b")]
    for p in procs:
        assert p.wait(60) == 0
    with pqueue.Queue(qpath) as q:
        got = drain(q)
    assert [m.offset for m in got] == list(range(2 * n))
    for name in ("a", "b"):
        assert [i for w, i in (m.data for m in got) if w == name] == list(range(n))


def test_always_lets_go_of_the_lock_before_its_sync_while_shared(qpath: Path) -> None:
    """Under "always", once another writer has waited for the lock, a group lets go of it
    before its fdatasync, so the other can write meanwhile."""
    a = pqueue.Queue(qpath, fsync="always")
    b = pqueue.Queue(qpath, fsync="always")  # its own flock: a second writer
    try:
        assert a.put("a0") == 0
        offsets: list[int] = []
        with a._log._wlock:  # a holds the lock, and its maintenance thread cannot let go yet
            if not a._log._have_flock:
                a._log._take_flock()
            waiting = threading.Thread(target=lambda: offsets.append(b.put("b0")))
            waiting.start()
            while not a._log._waiter_map[0]:  # type: ignore[index]
                waiting.join(0.001)  # until b has found the lock taken and asked for it
        waiting.join(10)
        assert offsets == [1]
        assert b.put("b1") == 2
        assert not b._log._have_flock  # shared: let go before the sync
        assert a.put("a1") == 3
    finally:
        a.close()
        b.close()
    assert read_all(qpath) == ["a0", "b0", "b1", "a1"]


def _hold_then_leave(q: pqueue.Queue) -> None:
    """Make `q`'s log give up the append lock now, as an idle writer does after 2 ms."""
    with q._log._wlock:
        q._log._drop_flock()


def test_a_writer_adopts_the_end_the_last_holder_left(qpath: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Taking the lock after another writer appended costs no scan of its records."""
    a = pqueue.Queue(qpath, fsync="never")
    b = pqueue.Queue(qpath, fsync="never")  # its own flock: a second writer, as in another process
    try:
        assert b.put("b0") == 0
        _hold_then_leave(b)
        assert a.put_many([f"a{i}" for i in range(50)]) == list(range(1, 51))
        _hold_then_leave(a)
        walked = _record_scans(monkeypatch, "walk")
        assert b.put("b1") == 51
        assert walked == []
    finally:
        a.close()
        b.close()
    with pqueue.Queue(qpath) as q:
        got = drain(q)
    assert [m.offset for m in got] == list(range(52))
    assert [m.data for m in got] == ["b0", *[f"a{i}" for i in range(50)], "b1"]


@pytest.mark.parametrize("forge", ["bad crc", "not the end", "another segment"])
def test_a_left_end_that_does_not_fit_is_ignored(qpath: Path, forge: str) -> None:
    """A left end with a bad CRC (a writer killed while writing it), or one that is not where
    the segment ends now, is not believed: the new records are scanned and no offset is reused."""
    a = pqueue.Queue(qpath, fsync="never")
    b = pqueue.Queue(qpath, fsync="never")
    try:
        b.put("b0")
        _hold_then_leave(b)
        a.put_many(["a0", "a1", "a2"])
        _hold_then_leave(a)
        seg, pos, _next = a._log._seg, a._log._pos, a._log._next
        lie = {"bad crc": (seg, pos, 1000), "not the end": (seg, pos - 1, 1000),
               "another segment": (seg + 1, pos, 1000)}[forge]
        end = _LEFT_END.pack(*lie)
        crc = crc32c(end) ^ (1 if forge == "bad crc" else 0)
        with open(qpath / "write.lock", "r+b") as f:
            f.seek(LEFT_END_AT)
            f.write(end + crc.to_bytes(4, "little"))
        assert os.path.getsize(qpath / "write.lock") == LOCK_FILE_BYTES
        assert b.put("b1") == 4
    finally:
        a.close()
        b.close()
    with pqueue.Queue(qpath) as q:
        assert [m.offset for m in drain(q)] == list(range(5))


def test_segment_with_newer_format_is_refused(qpath: Path) -> None:
    """A segment written by a newer pqueue raises FormatVersionError on open for writing."""
    with pqueue.Queue(qpath) as q:
        q.put(1)
    seg = qpath / "log" / segments(qpath)[0]
    data = bytearray(seg.read_bytes())
    data[4] = pqueue.FORMAT_VERSION + 1
    seg.write_bytes(bytes(data))
    with pqueue.Queue(qpath) as q:
        with pytest.raises(pqueue.FormatVersionError) as info:
            q.put(2)
    assert (info.value.found, info.value.supported) == (pqueue.FORMAT_VERSION + 1, pqueue.FORMAT_VERSION)
    assert "upgrade pqueue" in str(info.value)


def test_segment_recreated_after_a_crash_mid_create(qpath: Path) -> None:
    """A reader that saw a segment file without its header still reads the records put there later.

    A writer killed between creating a segment file and writing its header leaves an empty
    file; the next writer completes it. A reader that opened the empty file meanwhile must not
    keep reading a stale descriptor (it lost 32 returned puts in a torture run).
    """
    from pqueue.record import encode_seal

    with pqueue.Queue(qpath) as q:
        q.put_many(["a", "b", "c"])
    first = qpath / "log" / segments(qpath)[0]
    with open(first, "ab") as f:
        f.write(encode_seal(3, 0))  # the writer sealed segment 0 ...
    (qpath / "log" / f"{3:020d}.seg").write_bytes(b"")  # ... and died right after creating the next
    with pqueue.Queue(qpath) as reader, pqueue.Queue(qpath) as writer:
        assert [reader.get(timeout=1).data for _ in range(3)] == ["a", "b", "c"]
        with pytest.raises(pqueue.Empty):
            reader.get(timeout=0.05)  # the reader has looked at the empty segment 3
        assert writer.put("d") == 3  # the writer's recovery completes segment 3
        assert reader.get(timeout=2).data == "d"
