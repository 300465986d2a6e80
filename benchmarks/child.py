"""Child-process actions for the crash scenarios: run as ``python -m benchmarks.child ACTION ...``.

Each action prints one line (``ready``/``got`` or a JSON object) and flushes, so the parent
knows when to SIGKILL it or what it measured. Kept apart so the parent never shares an LMDB
environment or a SQLite connection with the process it kills.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from benchmarks import contenders
from benchmarks.common import dir_bytes, make_item, perf_ns

BATCH = 1000  # records per put_many while filling a log


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _hang() -> None:
    while True:
        time.sleep(60)  # until the parent's SIGKILL


def fill(path: str, total_bytes: int, tail_bytes: int, size: int) -> None:
    """Write a pqueue log of about total_bytes (fsync never); if tail_bytes, sync, wait for the
    recovery point to be saved, then leave tail_bytes unsynced. Prints "ready" and waits to be killed."""
    import pqueue

    q = pqueue.Queue(path, fsync="never")
    n = 0
    target = total_bytes - tail_bytes
    while dir_bytes(os.path.join(path, "log")) < target:
        q.put_many([make_item(n + i, size) for i in range(BATCH)])
        n += BATCH
    if tail_bytes:
        q.flush()
        time.sleep(1.3)  # the maintenance thread persists the recovery point at most once a second
        start = dir_bytes(os.path.join(path, "log"))
        while dir_bytes(os.path.join(path, "log")) < start + tail_bytes:
            q.put_many([make_item(n + i, size) for i in range(BATCH)])
            n += BATCH
    _say(json.dumps({"records": n}))
    _hang()


def open_time(path: str) -> None:
    """Time Queue(path) + the first put (which recovers the log end) + the first get."""
    import pqueue

    t0 = perf_ns()
    q = pqueue.Queue(path)
    t1 = perf_ns()
    q.put({"id": -1})
    t2 = perf_ns()
    q.get(timeout=5)
    t3 = perf_ns()
    _say(json.dumps({"open_s": (t1 - t0) / 1e9, "open_put_s": (t2 - t0) / 1e9, "first_get_s": (t3 - t2) / 1e9}))
    q.close()


def peer_open_time(name: str, path: str) -> None:
    """Time opening any contender and reading its first message."""
    c = contenders.make(name)
    t0 = perf_ns()
    c.open(path)
    t1 = perf_ns()
    c.get()
    t2 = perf_ns()
    _say(json.dumps({"open_s": (t1 - t0) / 1e9, "first_get_s": (t2 - t1) / 1e9}))
    c.close()


def probe_put(name: str, path: str, n: int, linger: float, selfkill: bool) -> None:
    """Put n messages, say "ready", wait `linger` s; then die by SIGKILL (self) or wait for it."""
    c = contenders.make(name)
    c.open(path)
    for i in range(n):
        c.put(make_item(i, 100))
    os.uname()  # a marker for strace (bench_durability): the puts have returned
    _say("ready")
    time.sleep(linger)
    if selfkill:
        os.kill(os.getpid(), signal.SIGKILL)
    _hang()


def probe_get(name: str, path: str) -> None:
    """Take one message without acking it, say "got", wait to be killed."""
    c = contenders.make(name)
    c.open(path)
    got = c.get_wait(5.0)
    _say("got" if got is not None else "empty")
    _hang()


def count(name: str, path: str) -> None:
    """How many messages a fresh handle can take now (without acking)."""
    c = contenders.make(name)
    c.open(path)
    n = 0
    while c.get_wait(0.3) is not None:
        n += 1
    _say(json.dumps({"count": n}))
    c.close()


def rss(name: str, path: str) -> None:
    """Resident memory after opening (and taking one message from) a queue with a backlog."""
    base = _vmrss()
    c = contenders.make(name) if name else None
    if c is not None:
        c.open(path)
        got = c.get()
        if got is not None:
            c.ack(got[0])
    _say(json.dumps({"rss_kib": _vmrss(), "before_open_kib": base}))


def _vmrss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("action", choices=("fill", "open", "peer-open", "probe-put", "probe-get", "count", "rss"))
    p.add_argument("path")
    p.add_argument("--name", default="")
    p.add_argument("--bytes", type=int, default=0)
    p.add_argument("--tail", type=int, default=0)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("-n", type=int, default=100)
    p.add_argument("--linger", type=float, default=0.0)
    p.add_argument("--selfkill", action="store_true")
    a = p.parse_args()
    if a.action == "fill":
        fill(a.path, a.bytes, a.tail, a.size)
    elif a.action == "open":
        open_time(a.path)
    elif a.action == "peer-open":
        peer_open_time(a.name, a.path)
    elif a.action == "probe-put":
        probe_put(a.name, a.path, a.n, a.linger, a.selfkill)
    elif a.action == "probe-get":
        probe_get(a.name, a.path)
    elif a.action == "count":
        count(a.name, a.path)
    else:
        rss(a.name, a.path)


if __name__ == "__main__":
    main()
