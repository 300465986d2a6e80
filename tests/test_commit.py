"""commit.py: the group commit's rules, driven by a log kept in memory.

The real log's group commit is exercised in test_log.py (threads), test_ioerrors.py (a failed
write or fsync under 8 threads, on the FUSE layer) and test_crash.py (SIGKILL); here each rule
is checked where it is decided, with I/O that records what was written and synced when.
"""

from __future__ import annotations

import random
import signal
import threading
import time

import pytest

from pqueue.commit import GroupCommit, Waiter
from pqueue.errors import DiskFullError, QueueError


class MemoryLog:
    """write_group / capture / fdatasync over a list, recording what each sync covered."""

    def __init__(self, sync_seconds: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.records: list[tuple[int, bytes, bytes]] = []
        self.written = 0  # sequence of the last record written
        self.durable = 0  # sequence the last finished sync covered
        self.syncs = 0
        self.sync_seconds = sync_seconds
        self.fail_next_write: Exception | None = None
        self.fail_next_sync: OSError | None = None
        self.due: list[int] = []
        self.group = GroupCommit("mem", write_group=self.write_group, capture=self.capture,
                                 fdatasync=self.fdatasync, on_synced=self.due.append)

    def write_group(self, group: list[Waiter]) -> tuple[int, int]:
        with self.lock:
            if self.fail_next_write is not None:
                exc, self.fail_next_write = self.fail_next_write, None
                raise exc
            for w in group:
                assert w.record is not None
                self.records.append(w.record)
                self.written += 1
                w.offset, w.seq = len(self.records) - 1, self.written
            return 3, self.written

    def capture(self) -> tuple[int, int]:
        with self.lock:
            return 3, self.written

    def fdatasync(self, fd: int, target: int) -> tuple[int, BaseException | None]:
        assert fd == 3
        time.sleep(self.sync_seconds)
        with self.lock:
            self.syncs += 1
            if self.fail_next_sync is not None:
                exc, self.fail_next_sync = self.fail_next_sync, None
                return target, exc
            self.durable = max(self.durable, target)
        return target, None


def test_one_thread_writes_then_syncs_each_record() -> None:
    m = MemoryLog()
    offsets = [m.group.append((1, b"", b"r%d" % i)) for i in range(5)]
    assert offsets == [0, 1, 2, 3, 4]
    assert m.syncs == 5 and m.durable == 5 and m.group.synced_seq == 5
    assert m.due == [0, 1, 2, 3, 4, 5]  # the log is told each new durable sequence


def test_threads_share_syncs_and_none_returns_before_its_record_is_durable() -> None:
    m = MemoryLog(sync_seconds=0.002)
    returned: list[int] = []
    out_lock = threading.Lock()

    def work(t: int) -> None:
        for i in range(30):
            off = m.group.append((1, b"", b"%d/%d" % (t, i)))
            assert m.durable >= off + 1, "a put returned before a sync covered it"
            with out_lock:
                returned.append(off)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(returned) == list(range(240))
    assert m.syncs < 240  # 2 ms syncs: arrivals during one share the next


def test_a_sync_only_waiter_rides_along_or_returns_at_once() -> None:
    m = MemoryLog()
    m.group.append((1, b"", b"a"))
    m.group.wait(1)  # already durable: no sync
    assert m.syncs == 1
    with m.lock:
        m.records.append((1, b"", b"own write"))
        m.written += 1
    m.group.wait(2)
    assert m.syncs == 2 and m.group.synced_seq == 2


def test_a_failed_sync_fails_its_group_and_later_waiters_for_it() -> None:
    """fsyncgate: after a failed fsync, a later successful one proves nothing about the
    records the failed one should have covered."""
    m = MemoryLog()
    m.fail_next_sync = OSError(5, "Input/output error")
    with pytest.raises(QueueError, match="fsync failed") as info:
        m.group.append((1, b"", b"lost?"))
    assert isinstance(info.value.__cause__, OSError)
    assert m.group.append((1, b"", b"next")) == 1  # later appends commit
    assert m.group.synced_seq == 2
    with pytest.raises(QueueError, match="fsync failed"):
        m.group.wait(1)  # asks about the failed record late: still failed
    m.group.wait(2)


def test_a_failed_roll_sync_fails_the_records_it_covered() -> None:
    m = MemoryLog()
    m.group.append((1, b"", b"a"))
    with m.lock:
        m.records.append((1, b"", b"b"))
        m.written += 1
    m.group.mark_failed(2, OSError(5, "seal failed"))
    with pytest.raises(QueueError, match="seal failed"):
        m.group.wait(2)
    m.group.mark_synced(2)
    with pytest.raises(QueueError):
        m.group.wait(2)


def test_a_failed_write_fails_each_writer_with_its_own_error_object() -> None:
    m = MemoryLog(sync_seconds=0.05)
    errors: list[BaseException] = []
    lock = threading.Lock()
    holder = threading.Thread(target=m.group.append, args=((1, b"", b"first"),))
    holder.start()  # leads the first group (slow sync) while the others queue behind it
    time.sleep(0.01)

    def work() -> None:
        try:
            m.group.append((1, b"", b"x"))
        except DiskFullError as exc:
            with lock:
                errors.append(exc)

    m.fail_next_write = DiskFullError("mem: no space left")  # the group queued behind it fails
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads + [holder]:
        t.join(timeout=30)
    assert len(errors) == 4, "the group queued during the slow sync is written (and fails) together"
    assert len({id(e) for e in errors}) == len(errors)
    assert m.group.append((1, b"", b"after")) >= 0


class Interrupted(Exception):
    """What the test's SIGALRM handler raises, as Ctrl-C raises KeyboardInterrupt."""


def test_a_signal_in_a_waiting_or_leading_thread_strands_nobody() -> None:
    """A signal handler raises in the main thread (Ctrl-C) wherever it lands in the group
    commit: asleep as a follower, just handed the lead, gathering, syncing, waking its group.
    The main thread leaves; the other threads never hang and never see a false success (a
    group whose leader was interrupted fails with "interrupted")."""
    m = MemoryLog(sync_seconds=0.001)
    stop = threading.Event()
    returned: list[int] = []
    failed: list[str] = []
    lock = threading.Lock()

    def background() -> None:
        while not stop.is_set():
            try:
                off = m.group.append((1, b"", b"bg"))
            except QueueError as exc:  # its group's leader was the interrupted main thread
                failed.append(str(exc))
                continue
            with lock:
                returned.append(off)

    def raise_interrupted(signum: int, frame: object) -> None:
        raise Interrupted

    threads = [threading.Thread(target=background) for _ in range(4)]
    for t in threads:
        t.start()
    old = signal.signal(signal.SIGALRM, raise_interrupted)
    rng = random.Random(7)
    interrupted = 0
    try:
        for _ in range(40):
            signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0001, 0.003))
            try:
                while True:
                    off = m.group.append((1, b"", b"main"))
                    with lock:
                        returned.append(off)
            except Interrupted:
                interrupted += 1
            with lock:
                before = len(returned)
            deadline = time.monotonic() + 10
            while True:  # the others still commit
                with lock:
                    if len(returned) > before + 4:
                        break
                assert time.monotonic() < deadline, "the group commit stalled after an interrupt"
                time.sleep(0.001)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert interrupted == 40
    assert not any(t.is_alive() for t in threads), "a thread hung in the group commit"
    assert len(set(returned)) == len(returned)
    assert all("interrupted" in e for e in failed), failed[:3]
    m.group.append((1, b"", b"after"))
