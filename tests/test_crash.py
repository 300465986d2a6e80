"""SIGKILL of real producer and consumer processes at random points (notes/durability.md B1, B7).

Each child reports over its stdout pipe, one flushed line per event, *after* the library call
returned: a line in the pipe is a promise the queue made. A SIGKILL never tears a pipe write of
a short line, so after the kill the parent reads every report, reopens the queue and checks the
promises (DESIGN §1): returned puts are present with their payloads and consecutive offsets, a
durable ack is never undone, a lease of a dead process comes back with a higher attempt.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import read_all

import pqueue

PRODUCER = r"""
import sys
import pqueue
path, fsync, start, segment_bytes, pad = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
q = pqueue.Queue(path, fsync=fsync, segment_bytes=segment_bytes)
out = sys.stdout
out.write("ready\n"); out.flush()
i = start
while True:
    off = q.put({"n": i, "pad": "x" * (i * 7 % pad)})
    out.write(f"{off} {i}\n"); out.flush()  # after put() returned: a promise
    i += 1
"""

CONSUMER = r"""
import sys
import pqueue
path, mode, lease = sys.argv[1], sys.argv[2], float(sys.argv[3])
q = pqueue.Queue(path, lease=lease)
out = sys.stdout
out.write("ready\n"); out.flush()
acked = []
while True:
    try:
        m = q.get(timeout=5)
    except pqueue.Empty:
        out.write("empty\n"); out.flush()
        break
    out.write(f"got {m.offset} {m.attempt}\n"); out.flush()
    if mode == "flush":
        if m.offset % 3 == 0:
            continue  # leased, never acked: must come back once the lease is gone
        m.ack()
        acked.append(m.offset)
        if len(acked) == 4:
            q.flush()  # the pending acks are durable now
            out.write("acked " + " ".join(map(str, acked)) + "\n"); out.flush()
            acked = []
    else:
        m.ack()
        out.write(f"ack {m.offset}\n"); out.flush()
q.close()
"""


def _spawn(code: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _kill_after(proc: subprocess.Popen[str], lines: int, *, prefix: str = "") -> list[str]:
    """Read the child's reports until `lines` of them start with `prefix`, SIGKILL it, return all reports."""
    assert proc.stdout is not None
    seen: list[str] = []
    counted = 0
    while counted < lines:
        line = proc.stdout.readline()
        if not line:  # the child ended on its own: that is a failure of its own
            break
        seen.append(line)
        if line.startswith(prefix):
            counted += 1
    os.kill(proc.pid, signal.SIGKILL)
    # Not communicate(): it reads the pipe's fd directly and would skip what readline buffered.
    rest = proc.stdout.read()
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"child exited by itself ({proc.returncode}): {err}"
    seen.extend(rest.splitlines(keepends=True))
    # Only whole lines are reports; a line cut short was never finished.
    return [line.rstrip("\n") for line in seen if line.endswith("\n")]


def _producer_rounds(path: Path, fsync: str, rounds: int, seed: int, segment_bytes: int, pad: int,
                     max_lines: int) -> None:
    rng = random.Random(seed)
    returned: dict[int, object] = {}  # offset -> payload of every put reported as returned
    n = 0
    for r in range(rounds):
        proc = _spawn(PRODUCER, path, fsync, n, segment_bytes, pad)
        # 0 reports: killed while starting or recovering (after it said "ready").
        reports = _kill_after(proc, rng.randrange(0, max_lines), prefix="")
        puts = [tuple(map(int, line.split())) for line in reports if line != "ready"]
        for off, i in puts:
            assert off not in returned, f"offset {off} handed out twice"
            returned[off] = {"n": i, "pad": "x" * (i * 7 % pad)}
        if puts:
            n = puts[-1][1] + 2  # the put after the last report may have happened too
        with pqueue.Queue(path, fsync=fsync, segment_bytes=segment_bytes) as q:
            q.consumer("pin")  # a group that never reads keeps every segment (no retention)
            log = read_all(q, f"check{r}")
        offsets = sorted(log)
        assert offsets == list(range(len(offsets))), "offsets are consecutive from 0"
        for off, data in returned.items():
            assert log.get(off) == data, f"returned put at {off} lost"
        # A record nobody reported is a put whose report the kill cut off: at most one a round.
        unreported = [off for off in offsets if off not in returned]
        assert len(unreported) <= r + 1, (unreported, reports[-3:])
        # The queue still takes puts after the crash, at the next offset.
        with pqueue.Queue(path, fsync=fsync, segment_bytes=segment_bytes) as q:
            off = q.put({"n": -1 - r, "pad": ""})
            assert off == len(offsets)
            returned[off] = {"n": -1 - r, "pad": ""}
        with pqueue.Queue(path, fsync=fsync, segment_bytes=segment_bytes) as q:
            assert read_all(q, f"again{r}")[off] == {"n": -1 - r, "pad": ""}


@pytest.mark.parametrize("fsync", ["always", "never", "interval"])
def test_returned_puts_survive_sigkill(tmp_path: Path, fsync: str) -> None:
    """Every put a killed producer saw return is on disk after reopen, offsets consecutive, puts go on."""
    seed = {"always": 1, "never": 2, "interval": 3}[fsync]
    _producer_rounds(tmp_path / "q", fsync, rounds=6, seed=seed, segment_bytes=1 << 20, pad=40, max_lines=400)


def test_sigkill_during_segment_roll(tmp_path: Path) -> None:
    """Killing a producer that rolls 4 KiB segments every few puts leaves a readable, appendable log."""
    # Records of ~28 + 10..700 bytes: a 4 KiB segment rolls every 6-40 puts, so kills land near rolls.
    _producer_rounds(tmp_path / "q", "never", rounds=12, seed=4096, segment_bytes=4096, pad=700, max_lines=120)
    assert len(list((tmp_path / "q" / "log").glob("*.seg"))) > 5


def _put_numbered(path: Path, n: int) -> None:
    with pqueue.Queue(path, fsync="always") as q:
        assert q.put_many([{"n": i} for i in range(n)]) == list(range(n))


def _drain_until_done(q: pqueue.Queue, deadline_s: float) -> list[pqueue.Message]:
    """Get and ack until nothing is left unacked in the default group (waiting out leases)."""
    got: list[pqueue.Message] = []
    deadline = time.monotonic() + deadline_s
    while q.qsize() > 0:
        assert time.monotonic() < deadline, f"{q.qsize()} messages never came back"
        try:
            m = q.get(timeout=0.2)
        except pqueue.Empty:
            continue
        got.append(m)
        m.ack()
    q.flush()
    return got


def test_flushed_acks_survive_sigkill_and_leases_come_back(tmp_path: Path) -> None:
    """After SIGKILL no flushed ack is redelivered; leased, unacked messages return with attempt >= 2."""
    path = tmp_path / "q"
    n = 400  # 3 rounds of at most 14 * 4 acks (plus the unacked third) stay well below n
    _put_numbered(path, n)
    rng = random.Random(7)
    flushed: set[int] = set()  # acked and then q.flush() returned: durable
    acked_maybe: set[int] = set()  # ack() called but the kill came before the flush
    leased: set[int] = set()  # delivered to a killed child and never acked there
    for _round in range(3):
        before = set(flushed)
        proc = _spawn(CONSUMER, path, "flush", 0.5)
        reports = _kill_after(proc, rng.randrange(3, 15), prefix="acked")
        got_now = set()
        for line in reports:
            word, *nums = line.split()
            if word == "got":
                got_now.add(int(nums[0]))
            elif word == "acked":
                flushed.update(map(int, nums))
        assert not got_now & before, "a flushed ack was undone by a crash"
        leased |= {o for o in got_now if o % 3 == 0}
        acked_maybe |= {o for o in got_now if o % 3} - flushed
    acked_maybe -= flushed
    assert len(flushed) >= 12 and leased
    with pqueue.Queue(path, lease=0.5) as q:
        got = _drain_until_done(q, 30)
        again = {m.offset for m in got}
        assert not again & flushed, "a durably acked message was delivered again"
        assert set(range(n)) - flushed - acked_maybe <= again, "a message was lost"
        for m in got:
            if m.offset in leased:
                assert m.attempt >= 2, f"offset {m.offset} came back as attempt {m.attempt}"
        assert leased <= again
        assert all(m.data == {"n": m.offset} for m in got)
    with pqueue.Queue(path) as q:
        assert q.qsize() == 0
        with pytest.raises(pqueue.Empty):
            q.get(timeout=0)


def test_consumer_killed_mid_batch_loses_nothing(tmp_path: Path) -> None:
    """Consumers killed while holding a prefetched batch: after restarts every message is delivered."""
    path = tmp_path / "q"
    n = 400
    _put_numbered(path, n)
    rng = random.Random(11)
    acked: set[int] = set()
    unacked_seen: set[int] = set()  # delivered, killed before ack() returned: must come again
    for _round in range(4):
        proc = _spawn(CONSUMER, path, "ack", 0.5)
        reports = _kill_after(proc, rng.randrange(1, 60), prefix="got")
        got_now: set[int] = set()
        for line in reports:
            word, *nums = line.split()
            if word == "got":
                got_now.add(int(nums[0]))
                unacked_seen.discard(int(nums[0]))
            elif word == "ack":
                acked.add(int(nums[0]))
        unacked_seen |= got_now - acked
    with pqueue.Queue(path, lease=0.5) as q:
        got = _drain_until_done(q, 30)
        again = {m.offset for m in got}
        assert unacked_seen <= again, "a delivered but unacked message was lost"
        assert set(range(n)) - acked <= again, "a message was never delivered"
        assert all(q.status(i) == "done" for i in range(n))
        assert all(m.data == {"n": m.offset} for m in got)


def test_two_producers_killed_while_sharing_the_append_lock(tmp_path: Path) -> None:
    """Producers killed while handing the append lock back and forth leave every returned put intact."""
    path = tmp_path / "q"
    rng = random.Random(22)
    pqueue.Queue(path).close()
    returned: dict[int, object] = {}
    for r in range(3):
        procs = [_spawn(PRODUCER, path, "interval", (2 * r + k) * 1_000_000, 4096, 300) for k in range(2)]
        for proc in procs:
            reports = _kill_after(proc, rng.randrange(50, 400))
            for line in reports[1:]:
                off, i = map(int, line.split())
                assert off not in returned, f"offset {off} handed to two puts"
                returned[off] = {"n": i, "pad": "x" * (i * 7 % 300)}
        with pqueue.Queue(path, segment_bytes=4096) as q:
            q.consumer("pin")  # keeps every segment
            log = read_all(q, f"check{r}")
        assert sorted(log) == list(range(len(log))), "offsets are consecutive from 0"
        for off, data in returned.items():
            assert log[off] == data, f"returned put at {off} lost"
        assert len(log) - len(returned) <= 2 * (r + 1)  # at most one unreported put per killed child
