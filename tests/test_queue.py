"""queue.py and consumer.py: the public Queue API of DESIGN section 4."""

from __future__ import annotations

import os
import queue as stdlib_queue
import threading
import time
from pathlib import Path

import pytest
from helpers import drain

import pqueue


def test_put_returns_consecutive_offsets_and_survives_reopen(q: pqueue.Queue, qpath: Path) -> None:
    """Offsets count from 0; after close and reopen every item is delivered in order."""
    assert [q.put({"n": i}) for i in range(5)] == [0, 1, 2, 3, 4]
    assert q.put_many([{"n": 5}, {"n": 6}]) == [5, 6]
    q.close()
    with pqueue.Queue(qpath) as again:
        got = drain(again)
        assert [m.data["n"] for m in got] == list(range(7))
        assert [m.offset for m in got] == list(range(7))
        assert all(m.attempt == 1 for m in got)


def test_message_fields(q: pqueue.Queue) -> None:
    """A message carries offset, data, put time, attempt and group."""
    before = time.time()
    q.put("hello")
    m = q.get(timeout=1)
    assert (m.offset, m.data, m.attempt, m.group) == (0, "hello", 1, "default")
    assert before - 1 <= m.timestamp <= time.time() + 1
    assert m.meta == {} and m.key is None
    assert "offset=0" in repr(m)


def test_empty_is_a_stdlib_empty_and_honours_timeout(q: pqueue.Queue) -> None:
    """get() on an empty queue raises pqueue.Empty (a queue.Empty) after about the timeout."""
    start = time.monotonic()
    with pytest.raises(stdlib_queue.Empty):
        q.get(timeout=0.2)
    assert 0.15 <= time.monotonic() - start < 2
    with pytest.raises(pqueue.Empty):
        q.get(block=False)
    with pytest.raises(pqueue.Empty):
        q.get_nowait()
    assert issubclass(pqueue.Full, stdlib_queue.Full)


def test_negative_timeout_is_refused(q: pqueue.Queue) -> None:
    """A negative timeout is a ValueError with the stdlib's wording."""
    with pytest.raises(ValueError, match="'timeout' must be a non-negative number"):
        q.get(timeout=-1)


def test_blocked_get_wakes_on_a_put_from_another_thread(q: pqueue.Queue) -> None:
    """A get() blocked with a long timeout returns soon after another thread puts."""
    got: list[pqueue.Message] = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=10)))
    t.start()
    time.sleep(0.05)
    start = time.monotonic()
    q.put("wake")
    t.join(5)
    assert got and got[0].data == "wake"
    assert time.monotonic() - start < 1.0


def test_ack_is_durable_after_flush(q: pqueue.Queue, qpath: Path) -> None:
    """Acked messages are not delivered again after flush, close and reopen."""
    q.put_many(range(10))
    for m in [q.get(timeout=1) for _ in range(4)]:
        m.ack()
    q.flush()
    q.close()
    with pqueue.Queue(qpath) as again:
        assert [m.data for m in drain(again)] == list(range(4, 10))
        assert again.qsize() == 0


def test_qsize_counts_unacked_and_sees_own_acks_at_once(q: pqueue.Queue) -> None:
    """qsize() is puts minus acks of this group, counting this handle's pending acks."""
    q.put_many(range(6))
    assert q.qsize() == 6 and not q.empty()
    m = q.get(timeout=1)
    assert q.qsize() == 6  # leased is not done
    m.ack()
    assert q.qsize() == 5
    drain(q)
    assert q.qsize() == 0 and q.empty()


def test_out_of_order_acks(q: pqueue.Queue, qpath: Path) -> None:
    """Acks may come in any order; only the unacked message comes back after reopen."""
    q.put_many(range(5))
    ms = [q.get(timeout=1) for _ in range(5)]
    for i in (4, 2, 0, 3):
        ms[i].ack()
    assert q.qsize() == 1
    q.close()
    with pqueue.Queue(qpath) as again:
        assert [m.data for m in drain(again)] == [1]


def test_nack_redelivers_with_higher_attempt(q: pqueue.Queue) -> None:
    """A nacked message comes back with attempt 2; with a delay not before the delay."""
    q.put("a")
    m = q.get(timeout=1)
    m.nack()
    again = q.get(timeout=1)
    assert (again.offset, again.attempt) == (0, 2)
    start = time.monotonic()
    again.nack(delay=0.3)
    assert q.status(0) == "delayed" or q.status(0) == "waiting"
    third = q.get(timeout=5)
    assert third.attempt == 3
    assert time.monotonic() - start >= 0.25


def test_nack_delay_must_be_non_negative(q: pqueue.Queue) -> None:
    """A negative delay is refused and the message stays leased."""
    q.put(1)
    m = q.get(timeout=1)
    with pytest.raises(ValueError, match="'delay' must be a non-negative"):
        m.nack(delay=-1)
    assert q.status(0) == "in_flight"


def test_expired_lease_redelivers(qpath: Path) -> None:
    """A message not acked within the lease goes to another consumer with attempt + 1."""
    with pqueue.Queue(qpath, lease=0.2) as a, pqueue.Queue(qpath, lease=0.2) as b:
        a.put("x")
        first = a.get(timeout=1)
        assert first.attempt == 1
        with pytest.raises(pqueue.Empty):
            b.get(timeout=0.05)
        second = b.get(timeout=3)
        assert (second.offset, second.attempt) == (0, 2)


def test_close_hands_back_leases_uncharged(qpath: Path) -> None:
    """After close, another handle gets the held and prefetched messages at once, same attempt."""
    a = pqueue.Queue(qpath)
    a.put_many(range(50))
    held = [a.get(timeout=1) for _ in range(3)]
    assert [m.attempt for m in held] == [1, 1, 1]
    a.close()
    with pqueue.Queue(qpath) as b:
        got = drain(b)
        assert sorted(m.data for m in got) == list(range(50))
        assert all(m.attempt == 1 for m in got)


def test_consumer_groups_each_see_every_message(q: pqueue.Queue) -> None:
    """Two groups both receive every message and ack independently."""
    q.put_many(["a", "b", "c"])
    billing = q.consumer("billing")
    assert [m.data for m in drain(q)] == ["a", "b", "c"]
    assert billing.qsize() == 3
    assert [m.data for m in drain(billing)] == ["a", "b", "c"]
    assert billing.qsize() == 0 and q.qsize() == 0


def test_two_consumers_of_one_group_never_share_a_message(qpath: Path) -> None:
    """Messages are split between two handles of one group, none delivered twice."""
    with pqueue.Queue(qpath) as a, pqueue.Queue(qpath) as b:
        a.put_many(range(200))
        seen: list[int] = []
        for _ in range(120):
            for h in (a, b):
                try:
                    m = h.get(timeout=0.01)
                except pqueue.Empty:
                    continue
                seen.append(m.data)
                m.ack()
        seen += [m.data for m in drain(a)] + [m.data for m in drain(b)]
        assert sorted(seen) == list(range(200))


def test_status_reports_each_state(qpath: Path) -> None:
    """status() walks pending -> in_flight -> done, waiting after nack, dead after dead_letter."""
    with pqueue.Queue(qpath) as q:
        q.put_many(["a", "b", "c"])
        assert q.status(2) == "pending"
        m = q.get(timeout=1)
        assert q.status(0) == "in_flight"
        m.ack()
        assert q.status(0) == "done"
        m = q.get(timeout=1)
        m.nack(delay=60)
        assert q.status(1) == "waiting"
        m = q.get(timeout=1)
        q.dead_letter(m, reason="poison", error=ValueError("bad"))
        assert q.status(2) == "dead"
        with pytest.raises(ValueError, match="no record at offset 3"):
            q.status(3)


def test_dead_letter_keeps_payload_and_says_why(q: pqueue.Queue) -> None:
    """A dead-lettered message is in q.dead_letters with its payload and metadata."""
    q.put({"order": 7})
    m = q.get(timeout=1)
    try:
        raise KeyError("missing")
    except KeyError as exc:
        q.dead_letter(m, reason="failed", error=exc)
    d = q.dead_letters.get(timeout=1)
    assert d.data == {"order": 7}
    assert d.meta["offset"] == 0 and d.meta["group"] == "default" and d.meta["attempts"] == 1
    assert d.meta["error_type"] == "KeyError" and "missing" in d.meta["error"]
    assert "Traceback" in d.meta["traceback"] and d.meta["reason"] == "failed"
    assert q.qsize() == 0


def test_context_manager_and_use_after_close(qpath: Path) -> None:
    """close() is idempotent; any use after it raises ClosedError."""
    with pqueue.Queue(qpath) as q:
        q.put(1)
    q.close()
    with pytest.raises(pqueue.ClosedError, match="is closed"):
        q.put(2)
    with pytest.raises(pqueue.ClosedError):
        q.get(timeout=0)


def test_not_a_queue_directory_is_left_untouched(tmp_path: Path) -> None:
    """A directory with foreign files is refused and not modified."""
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"meow")
    before = sorted(os.listdir(d))
    with pytest.raises(pqueue.NotAQueueError, match="not a pqueue directory"):
        pqueue.Queue(d)
    assert sorted(os.listdir(d)) == before
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(pqueue.NotAQueueError, match="is a file"):
        pqueue.Queue(f)
    with pytest.raises(pqueue.NotAQueueError, match="does not exist"):
        pqueue.Queue(tmp_path / "missing", create=False)


def test_oversized_record_is_refused(qpath: Path) -> None:
    """A payload over max_record_bytes raises and writes nothing."""
    with pqueue.Queue(qpath, max_record_bytes=100, serializer="raw") as q:
        with pytest.raises(pqueue.RecordTooLargeError, match="over max_record_bytes=100"):
            q.put(b"x" * 101)
        q.put(b"x" * 100)
        assert q.qsize() == 1


def test_bad_options_are_refused(qpath: Path) -> None:
    """Bad constructor options are ValueError/TypeError and create nothing."""
    for kwargs in ({"fsync": "sometimes"}, {"segment_bytes": 10}, {"lease": 0}, {"on_corruption": "ignore"},
                   {"fsync": -1}):
        with pytest.raises(ValueError):
            pqueue.Queue(qpath, **kwargs)  # type: ignore[arg-type]
    assert not qpath.exists()


def test_segments_roll_and_are_deleted_once_every_group_is_done(qpath: Path) -> None:
    """Small segments roll; fully acked ones are deleted, the rest kept for a lagging group."""
    with pqueue.Queue(qpath, segment_bytes=4096, serializer="raw") as q:
        lagging = q.consumer("lagging")
        for _ in range(100):
            q.put(b"x" * 200)
        q.put(b"y")
        segs = os.listdir(qpath / "log")
        assert len(segs) > 4
        drain(q)
        q.flush()
        assert len(os.listdir(qpath / "log")) == len(segs)  # "lagging" still needs them
        drain(lagging)
        lagging.flush()
        assert len(os.listdir(qpath / "log")) == 1
        assert q.put(b"z") == 101


def test_source_id_is_stable(qpath: Path) -> None:
    """source_id is a UUID kept in queue.id across reopen."""
    with pqueue.Queue(qpath) as q:
        sid = q.source_id
        assert len(sid) == 36 and q.created <= time.time()
    with pqueue.Queue(qpath) as q:
        assert q.source_id == sid


def test_fsync_policy_parsing() -> None:
    """fsync accepts the documented spellings."""
    from pqueue.policy import FsyncPolicy

    assert FsyncPolicy.parse("always").mode == "always"
    assert FsyncPolicy.parse("interval") == FsyncPolicy("interval", 0.1, 0)
    assert FsyncPolicy.parse("50ms") == FsyncPolicy("interval", 0.05, 0)
    assert FsyncPolicy.parse("2s").interval == 2.0
    assert FsyncPolicy.parse("1000 records") == FsyncPolicy("interval", 3600.0, 1000)
    assert FsyncPolicy.parse("50ms/1000") == FsyncPolicy("interval", 0.05, 1000)
    assert FsyncPolicy.parse(0.25) == FsyncPolicy("interval", 0.25, 0)
