"""Handlers and a pool process for tests/test_pool.py, importable by spawned worker processes.

Run as a script, it opens the queue at argv[1] and runs a ConsumerPool on it until SIGTERM/SIGINT
(or until it is SIGKILLed by the test):

    python tests/pool_worker.py PATH WORKERS MAX_ATTEMPTS

Every task carries its ledger path; a handled task appends one fsynced line to it *before* the
handler returns, so after a SIGKILL the ledger lists every task a handler finished.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import pqueue


def task(i: int, ledger: str, *, sleep: float = 0.0, poison: bool = False) -> dict[str, Any]:
    """The payload of test task `i`."""
    return {"i": i, "ledger": ledger, "sleep": sleep, "poison": poison}


def ledger_handler(msg: pqueue.Message) -> None:
    """Record `msg` in its ledger (fsynced); a poison task SIGKILLs its own process first."""
    data = msg.data
    if data["poison"]:
        os.kill(os.getpid(), signal.SIGKILL)
    if data["sleep"]:
        time.sleep(data["sleep"])
    fd = os.open(data["ledger"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        # One write() of a short line: concurrent appenders never interleave inside it.
        os.write(fd, f"{data['i']} {msg.offset} {msg.attempt} {os.getpid()}\n".encode())
        os.fsync(fd)  # the line must survive the SIGKILL that may come right after
    finally:
        os.close(fd)


def read_ledger(path: str) -> list[tuple[int, int, int, int]]:
    """(i, offset, attempt, pid) per handled task, in handling order."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [tuple(int(x) for x in line.split()) for line in f if line.strip()]  # type: ignore[misc]


def main() -> None:
    path, workers, max_attempts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with pqueue.Queue(path) as q:
        pool = pqueue.ConsumerPool(q, ledger_handler, workers=workers, max_attempts=max_attempts,
                                   backoff=pqueue.Backoff(initial=0.01, maximum=0.05, jitter=0.0), lease=5.0)
        pool.start()
        print("ready", flush=True)
        pool.run(stop_timeout=10.0)
        st = pool.stats()
        print(f"stopped {st.processed} {st.in_flight}", flush=True)


if __name__ == "__main__":
    main()
