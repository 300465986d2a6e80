"""Task semantics: byte cap, idempotency keys, priorities, delayed and expiring tasks."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import drain

import pqueue

# ---------------------------------------------------------------- byte cap

def test_cap_raise_refuses_and_writes_nothing(qpath: Path) -> None:
    """on_full="raise": a put that does not fit raises Full at once and writes nothing."""
    with pqueue.Queue(qpath, max_bytes=64 << 10, on_full="raise", serializer="raw") as q:
        n = 0
        with pytest.raises(pqueue.Full, match="max_bytes=65536; nothing was written"):
            while True:
                q.put(b"x" * 1000)
                n += 1
        size = q._log.disk_bytes()
        with pytest.raises(pqueue.Full):
            q.put(b"y" * 1000)
        assert q._log.disk_bytes() == size and q.qsize() == n
        assert size <= 64 << 10


def test_cap_block_waits_for_consumers_then_times_out(qpath: Path) -> None:
    """on_full="block": put waits for acks to free segments; with nobody acking it raises Full."""
    with pqueue.Queue(qpath, max_bytes=64 << 10, serializer="raw") as q:
        while True:
            try:
                q.put(b"x" * 1000, timeout=0)
            except pqueue.Full:
                break
        start = time.monotonic()
        with pytest.raises(pqueue.Full, match="waited 0.2 s"):
            q.put(b"y" * 1000, timeout=0.2)
        assert time.monotonic() - start >= 0.2
        with pytest.raises(pqueue.Full):
            q.put_nowait(b"y" * 1000)
        consumer = threading.Thread(target=drain, args=(q,), kwargs={"timeout": 0.5})
        consumer.start()
        off = q.put(b"fits once acked", timeout=10)
        consumer.join()
        assert q.status(off) in ("done", "pending", "in_flight")


def test_cap_drop_oldest_deletes_unread_and_counts(qpath: Path) -> None:
    """on_full="drop_oldest": old segments go even unread; the group counts what it lost."""
    with pqueue.Queue(qpath, max_bytes=64 << 10, on_full="drop_oldest", serializer="raw") as q:
        q.consumer()  # the group exists before the drops, so they count against it
        for i in range(300):
            q.put(i.to_bytes(4, "big") + b"x" * 996)
        assert q._log.disk_bytes() <= 64 << 10
        got = [int.from_bytes(m.data[:4], "big") for m in drain(q)]
        assert got == list(range(got[0], 300))  # the newest survive, in order
        assert got[0] > 0
        assert q._index.dropped() >= got[0]
        assert q._index.peek("default").dropped == got[0]  # type: ignore[union-attr]


# ---------------------------------------------------------------- idempotency keys

def test_same_key_returns_first_offset_and_writes_nothing(q: pqueue.Queue, qpath: Path) -> None:
    """A second put with the same key returns the first offset; only one record exists."""
    first = q.put({"order": 42}, key="order-42")
    assert q.put({"order": 42, "retry": True}, key="order-42") == first
    other = q.put({"order": 43}, key="order-43")
    assert other == first + 1
    q.close()
    with pqueue.Queue(qpath) as again:
        assert again.put("again", key="order-42") == first
        msgs = drain(again)
        assert [m.data for m in msgs] == [{"order": 42}, {"order": 43}]
        assert msgs[0].key == "order-42"


def test_key_window_expires(qpath: Path) -> None:
    """After dedup_window a key may be used again."""
    with pqueue.Queue(qpath, dedup_window=0.2) as q:
        a = q.put(1, key="k")
        time.sleep(0.3)
        assert q.put(2, key="k") == a + 1


def test_keys_dedup_across_processes(qpath: Path) -> None:
    """Four processes putting the same 50 keys leave exactly 50 records."""
    pqueue.Queue(qpath).close()
    code = ("import sys, pqueue\n"
            "with pqueue.Queue(sys.argv[1]) as q:\n"
            "    for i in range(50): q.put(i, key=f'k{i}')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(qpath)]) for _ in range(4)]
    assert all(p.wait(60) == 0 for p in procs)
    with pqueue.Queue(qpath) as q:
        assert sorted(m.data for m in drain(q)) == list(range(50))


def test_key_survives_index_rebuild(qpath: Path) -> None:
    """Keys travel in the records: after the index is deleted they still deduplicate."""
    with pqueue.Queue(qpath) as q:
        first = q.put("x", key="invoice-7")
    import shutil

    shutil.rmtree(qpath / "index")
    with pqueue.Queue(qpath) as q:
        assert q.put("x", key="invoice-7") == first


def test_key_claimed_but_never_written_is_free(qpath: Path) -> None:
    """A key whose record never made it (crash between claim and append) does not dedup."""
    with pqueue.Queue(qpath) as q:
        q._index.key_claim("ghost", 0, 0, 32, int(time.time() * 1000), 10_000)
        assert q.put("real", key="ghost") == 0
        assert q.put("dup", key="ghost") == 0


# ---------------------------------------------------------------- priorities

def test_higher_priority_first_fifo_within_level(q: pqueue.Queue) -> None:
    """Higher levels come first; within a level, put order."""
    q.put("low-a")
    q.put("high-a", priority=9)
    q.put("mid-a", priority=5)
    q.put("low-b", priority=0)
    q.put("high-b", priority=9)
    assert [m.data for m in drain(q)] == ["high-a", "high-b", "mid-a", "low-a", "low-b"]


def test_priority_message_exposes_level_and_keeps_semantics(q: pqueue.Queue, qpath: Path) -> None:
    """Priority messages are leased, nacked and redelivered like any other."""
    q.put("p", priority=3)
    m = q.get(timeout=1)
    assert (m.priority, m.attempt) == (3, 1)
    m.nack()
    m2 = q.get(timeout=1)
    assert (m2.offset, m2.attempt) == (m.offset, 2)
    assert q.consumer("other").get(timeout=1).data == "p"  # other groups see it too


def test_weighted_fairness_serves_low_levels(qpath: Path) -> None:
    """With priority_weights, level 0 is served while higher levels still have work."""
    with pqueue.Queue(qpath, priorities=2, priority_weights=[1, 3]) as q:
        for i in range(40):
            q.put(("hi", i), priority=1)
            q.put(("lo", i))
        first = [m.data[0] for m in (q.get(timeout=1) for _ in range(20))]
        assert 2 <= first.count("lo") <= 10


def test_bad_priority_is_refused(q: pqueue.Queue) -> None:
    """A level outside 0..9 raises ValueError and writes nothing."""
    with pytest.raises(ValueError, match="priority must be an int from 0 to 9"):
        q.put("x", priority=10)
    assert q.qsize() == 0


# ---------------------------------------------------------------- delayed and expiring

def test_delayed_task_not_before_its_time_and_status(q: pqueue.Queue) -> None:
    """A delayed task is not delivered early; status says delayed; a blocked get wakes for it."""
    off = q.put("later", delay=0.4)
    q.put("now")
    start = time.monotonic()
    assert q.get(timeout=1).data == "now"
    with pytest.raises(pqueue.Empty):
        q.get(timeout=0.1)
    assert q.status(off) == "delayed"
    m = q.get(timeout=5)
    assert m.data == "later" and time.monotonic() - start >= 0.35
    assert m.not_before is not None


def test_delay_survives_reopen(qpath: Path) -> None:
    """A delayed task stays delayed across close and reopen, then comes."""
    with pqueue.Queue(qpath) as q:
        q.put("later", delay=0.5)
        with pytest.raises(pqueue.Empty):
            q.get(timeout=0.05)
    with pqueue.Queue(qpath) as q:
        with pytest.raises(pqueue.Empty):
            q.get(timeout=0.05)
        assert q.get(timeout=5).data == "later"


def test_not_before_and_delay_exclusive(q: pqueue.Queue) -> None:
    """delay and not_before together are refused."""
    with pytest.raises(ValueError, match="not both"):
        q.put(1, delay=1, not_before=time.time() + 1)


def test_expired_task_goes_to_dlq(q: pqueue.Queue) -> None:
    """An expired task is never handed out: it is dead-lettered with reason "expired"."""
    off = q.put("stale", ttl=0.05)
    q.put("fresh", ttl=60)
    time.sleep(0.1)
    assert [m.data for m in drain(q)] == ["fresh"]
    assert q.status(off) == "dead"
    d = q.dead_letters.get(timeout=1)
    assert d.data == "stale" and d.meta["reason"] == "expired"


def test_expired_task_dropped_when_asked(qpath: Path) -> None:
    """on_expire="drop": expired tasks are counted as done, no DLQ copy."""
    with pqueue.Queue(qpath, on_expire="drop") as q:
        q.put("stale", ttl=0.05)
        time.sleep(0.1)
        assert drain(q) == []
        assert q.qsize() == 0
        assert not os.path.exists(qpath / "dlq")
