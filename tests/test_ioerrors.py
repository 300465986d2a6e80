"""I/O errors: ENOSPC and EIO on write and on fsync, a real full disk, a read-only filesystem.

Write and fsync errors are injected under the real code path by plfs (tools/plfs.py, a FUSE
layer; skipped without /dev/fuse and root, a failure under CI=true). A failed fsync is
modelled as on Linux after fsyncgate: the pages it should have written are marked clean and
lost at the next power cut, so a retried fsync that "succeeds" proves nothing; pqueue must
fail the put and move on to a new segment. The full disk is a real 1 MiB tmpfs and the
read-only filesystem a real remount (both need root to mount; skipped where not permitted).

In every case: the put raises a clear QueueError subclass, nothing corrupt becomes visible,
and the queue resumes once the fault is gone.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helpers
import pytest
from plfs_util import drain, plfs_run, read_ledger, require_plfs, returned_puts, wait_ledger

import pqueue
import pqueue.inspect


def _run(tmp_path: Path, steps: list[Any], crash: str | None = None) -> tuple[list[dict[str, Any]], Path]:
    """Run `steps` in a child on plfs; pull the plug at the end if `crash`; return the ledger."""
    require_plfs()
    with plfs_run(tmp_path) as run:
        run.up()
        child, ledger = run.spawn([*steps, ["hang"]])
        wait_ledger(ledger, lambda e: any("hang" in x for x in e), child)
        if crash:
            run.crash(crash)
    return read_ledger(ledger), run.disk_qpath


def _failures(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if "put_failed" in e]


def _check_disk(disk_q: Path, entries: list[dict[str, Any]]) -> dict[int, int]:
    """Every returned put is there, intact; nothing else but failed puts' payloads."""
    seen = drain(disk_q)
    returned = returned_puts(entries)
    assert {off: seen.get(off) for off in returned} == returned
    failed = {e["put_failed"] for e in _failures(entries)}
    extra = {i for off, i in seen.items() if off not in returned}
    assert extra <= failed, f"records nobody put: {extra - failed}"
    return seen


@pytest.mark.parametrize("partial", [False, True], ids=["whole", "short-write"])
def test_enospc_on_write(tmp_path: Path, partial: bool) -> None:
    """ENOSPC on a segment write (also after a short write): put raises DiskFullError, the
    partial record is cut off, and the next put succeeds."""
    entries, disk_q = _run(tmp_path, [
        ["open", {"fsync": "always"}], ["put", 5],
        ["ctl", f"fail write ENOSPC 1 0 .seg{' partial' if partial else ''}"],
        ["put", 1], ["put", 5], ["close"]])
    failures = _failures(entries)
    assert [f["error"] for f in failures] == ["DiskFullError"], entries
    assert "no space left" in failures[0]["err"] and "free space" in failures[0]["err"]
    assert len(returned_puts(entries)) == 10
    seen = _check_disk(disk_q, entries)
    assert failures[0]["put_failed"] not in seen.values()
    assert pqueue.inspect.verify(disk_q).ok


def test_enospc_until_space_is_freed(tmp_path: Path) -> None:
    """A disk that stays full fails every put with DiskFullError; once space is back, puts resume."""
    entries, disk_q = _run(tmp_path, [
        ["open", {"fsync": "always"}], ["put", 3], ["ctl", "fail write ENOSPC -1 0 .seg"], ["put", 4],
        ["ctl", "clear"], ["put", 3], ["close"]])
    assert [f["error"] for f in _failures(entries)] == ["DiskFullError"] * 4
    assert len(returned_puts(entries)) == 6
    _check_disk(disk_q, entries)
    assert pqueue.inspect.verify(disk_q).ok


def test_eio_on_write(tmp_path: Path) -> None:
    """EIO on a segment write: put raises a QueueError that says the append failed; the next
    put succeeds and nothing is corrupt."""
    entries, disk_q = _run(tmp_path, [
        ["open", {"fsync": "always"}], ["put", 3], ["ctl", "fail write EIO 1 0 .seg"], ["put", 1], ["put", 3],
        ["close"]])
    failures = _failures(entries)
    assert len(failures) == 1 and failures[0]["error"] == "QueueError", entries
    assert "failed" in failures[0]["err"]
    assert len(returned_puts(entries)) == 6
    _check_disk(disk_q, entries)
    assert pqueue.inspect.verify(disk_q).ok


@pytest.mark.parametrize("err", ["EIO", "ENOSPC"])
def test_fsync_error_fails_put_and_survives_power_loss(tmp_path: Path, err: str) -> None:
    """fsync="always" and the segment's fsync fails: that put raises, is never retried-and-
    pretended, later puts go to a new segment and succeed, and after a power cut (which drops
    what the failed fsync should have written) every returned put is there, nothing corrupt."""
    entries, disk_q = _run(tmp_path, [
        ["open", {"fsync": "always"}], ["put", 5], ["ctl", f"fail fsync {err} 1 0 .seg"], ["put", 1], ["put", 5]],
        crash="drop")
    failures = _failures(entries)
    assert len(failures) == 1, entries
    assert issubclass(getattr(pqueue, failures[0]["error"]), pqueue.QueueError)
    assert len(returned_puts(entries)) == 10, entries
    _check_disk(disk_q, entries)
    # The puts after the failure went to a segment of their own.
    failed_at = min(off for off, i in returned_puts(entries).items() if i > failures[0]["put_failed"])
    bases = sorted(int(p.name[:20]) for p in (disk_q / "log").glob("*.seg"))
    assert any(b > 0 for b in bases) and max(b for b in bases if b <= failed_at) > 0, (bases, failed_at)


@pytest.mark.parametrize("fault", ["fsync EIO", "write ENOSPC", "write EIO"])
def test_group_commit_fault_fails_only_its_group(tmp_path: Path, fault: str) -> None:
    """8 threads share group commits (fsync="always") and one group's write or fsync fails:
    exactly the puts of that group raise (each its own error, the right type), the other
    threads carry on, and after a power cut that drops what the failed fsync should have
    written every returned put is there and nothing corrupt is."""
    op, err = fault.split()
    entries, disk_q = _run(tmp_path, [
        ["open", {"fsync": "always"}], ["put", 5], ["ctl", f"fail {op} {err} 1 6 .seg"],
        ["put_threads", 8, 25]], crash="drop")
    assert any("threads_done" in e for e in entries), entries
    failures = _failures(entries)
    returned = returned_puts(entries)
    assert failures, "the injected fault failed no put"
    assert len(failures) <= 8, "more puts failed than one group holds"
    assert len(returned) + len(failures) == 5 + 8 * 25
    expected = "DiskFullError" if err == "ENOSPC" else "QueueError"
    assert {f["error"] for f in failures} == {expected}, failures
    seen = _check_disk(disk_q, entries)
    if op == "write":  # a failed group write is cut off: none of its records exists
        assert not {f["put_failed"] for f in failures} & set(seen.values())
    assert pqueue.inspect.verify(disk_q).ok


def test_fsync_error_interval_mode(tmp_path: Path) -> None:
    """An interval-mode background fsync fails: the records it covered may be lost at the next
    power cut, but nothing corrupt is ever delivered and the queue keeps working."""
    entries, disk_q = _run(tmp_path, [
        ["open", {"fsync": "5 records"}], ["put", 5], ["ctl", "fail fsync EIO 1 0 .seg"], ["put", 12]],
        crash="drop")
    seen = drain(disk_q)
    returned = returned_puts(entries)
    assert {off: i for off, i in seen.items() if off in returned} == {off: returned[off] for off in seen
                                                                        if off in returned}
    assert len(returned) + len(_failures(entries)) == 17


# ------------------------------------------------------------------ real filesystems


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        if os.environ.get("CI") == "true" and os.geteuid() == 0:
            pytest.fail(f"mount {' '.join(args)} failed under CI: {r.stderr}")
        pytest.skip(f"cannot mount here: {r.stderr.strip()}")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (ENOSPC for real; tmpfs fsync is a no-op, so this tests the error paths)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    _mount("-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt))
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_full_disk(small_fs: Path) -> None:
    """Fill a 1 MiB filesystem: put raises DiskFullError with a clear message, every put that
    returned is intact after reopening, and puts resume once a file is deleted."""
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (256 << 10))
    path = small_fs / "q"
    returned: dict[int, int] = {}
    with pqueue.Queue(path, fsync="always", segment_bytes=64 << 10) as q:
        error: pqueue.QueueError | None = None
        for i in range(5000):
            try:
                returned[q.put({"i": i, "pad": "x" * 500})] = i
            except pqueue.QueueError as exc:
                error = exc
                break
        assert isinstance(error, pqueue.DiskFullError), repr(error)
        assert "no space left" in str(error) and "free" in str(error)
        # Still full: it keeps failing cleanly.
        with pytest.raises(pqueue.DiskFullError):
            q.put({"i": -1, "pad": "x" * 500})
    assert len(returned) > 100
    seen: dict[int, int] = {}
    q = pqueue.Queue(path, fsync="always", segment_bytes=64 << 10)
    try:
        filler.unlink()  # free space
        after = q.put({"i": 99999, "pad": ""})
        assert after > max(returned)
        for m in helpers.drain(q.consumer("check"), timeout=0.2):
            seen[m.offset] = m.data["i"]
    finally:
        q.close()
    assert {off: seen.get(off) for off in returned} == returned
    assert set(seen) - set(returned) == {after}
    assert pqueue.inspect.verify(path).ok


def test_read_only_filesystem(small_fs: Path) -> None:
    """On a filesystem remounted read-only, creating a queue or putting raises ReadOnlyError
    with a message that says so; after remounting read-write the queue works again."""
    path = small_fs / "q"
    with pqueue.Queue(path, fsync="always") as q:
        first = q.put({"i": 0})
    _mount("-o", "remount,ro", str(small_fs))
    try:
        with pytest.raises(pqueue.ReadOnlyError, match="(?i)read-only"):
            pqueue.Queue(small_fs / "new")
        try:
            q = pqueue.Queue(path, fsync="always")
        except pqueue.ReadOnlyError as exc:
            assert "read-only" in str(exc).lower()
        else:
            try:
                with pytest.raises(pqueue.ReadOnlyError, match="(?i)read-only"):
                    q.put({"i": 1})
            finally:
                try:
                    q.close()
                except pqueue.QueueError:
                    pass
    finally:
        _mount("-o", "remount,rw", str(small_fs))
    with pqueue.Queue(path, fsync="always") as q:
        assert q.put({"i": 2}) > first
        assert q.get(timeout=1).data == {"i": 0}
