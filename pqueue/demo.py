"""`python -m pqueue demo [DIR]`: the real job on the embedded default, in a few seconds.

Producers put a few thousand orders; a worker process runs a ConsumerPool over them with
some transient failures (retried with backoff) and one poison order (dead-lettered); the demo
kills the worker with SIGKILL midway, starts it again, and ends with a summary read back from
disk: processed, retried, dead-lettered, lost (0).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ORDERS = 3000
PRODUCERS = 3
POISON = 1313  # this order id always fails: it ends in the dead-letter queue
FLAKY_EVERY = 97  # every 97th order fails on its first attempt (a "transient" upstream error)
KILL_AFTER = 1000  # the demo SIGKILLs the worker once this many orders were handled


def _handle(order: dict[str, Any], attempt: int, ledger: Any) -> None:
    if order["id"] == POISON:
        raise ValueError(f"order {POISON} has a malformed address")
    if order["id"] % FLAKY_EVERY == 0 and attempt == 1:
        raise ConnectionError("payment gateway timed out")
    time.sleep(0.0002)  # the "work"
    # One line per handled order, written before the ack: after a crash a line may repeat
    # (at-least-once), but an acked order always has its line.
    ledger.write(f"{order['id']}\n")
    ledger.flush()


def worker(path: str) -> int:
    """Run a pool over the queue until it is empty (or until the demo kills us)."""
    import logging

    import pqueue

    # The summary counts the retries; the dead letter's error line is worth seeing as it happens.
    logging.basicConfig(level=logging.ERROR, format="worker: %(message)s")
    q = pqueue.Queue(path)
    ledger = open(os.path.join(os.path.dirname(path), "handled.log"), "a")

    def handler(msg: pqueue.Message) -> None:
        _handle(msg.data, msg.attempt, ledger)

    pool = pqueue.ConsumerPool(q, handler, workers=4, max_attempts=3,
                               backoff=pqueue.Backoff(initial=0.05, multiplier=2.0, maximum=0.5, jitter=0.1))
    try:
        with pool:
            while q.qsize() > 0:
                time.sleep(0.05)
    finally:
        ledger.close()
        q.close()
    return 0


def _produce(path: str, first: int, count: int) -> None:
    import pqueue

    with pqueue.Queue(path) as q:
        for i in range(first, first + count):
            q.put({"id": i, "sku": f"SKU-{i % 50:03d}", "qty": 1 + i % 4})


def _start_worker(path: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "pqueue.demo", "--worker", path])


def _handled(path: str) -> list[int]:
    try:
        with open(os.path.join(os.path.dirname(path), "handled.log")) as f:
            return [int(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def run(base: str) -> int:
    import pqueue

    path = os.path.join(base, "orders")
    print(f"pqueue demo: {ORDERS} orders, {PRODUCERS} producer threads, a 4-thread worker pool in a "
          f"separate process\nqueue: {path}\n")
    started = time.monotonic()
    per = ORDERS // PRODUCERS
    threads = [threading.Thread(target=_produce, args=(path, 1 + p * per, per)) for p in range(PRODUCERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"put {ORDERS} orders in {time.monotonic() - started:.2f} s (fsync: interval)")

    proc = _start_worker(path)
    while len(_handled(path)) < KILL_AFTER and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    print(f"SIGKILLed the worker after {len(_handled(path))} orders were handled")
    proc = _start_worker(path)
    print("restarted the worker; it resumes from the committed offset")
    if proc.wait(timeout=120) != 0:
        print("the worker failed", file=sys.stderr)
        return 1

    with pqueue.Queue(path) as q:
        # A group of its own reads the dead letters without taking them from anyone else.
        summary = q.dead_letters.consumer("demo-summary")
        dead = []
        while True:
            try:
                m = summary.get(timeout=0.1)
            except pqueue.Empty:
                break
            dead.append(m)
            m.ack()
        remaining = q.qsize()
    handled = _handled(path)
    unique = set(handled)
    dead_ids = {m.data["id"] for m in dead}
    lost = set(range(1, ORDERS + 1)) - unique - dead_ids
    retried = ORDERS // FLAKY_EVERY
    print(f"\nsummary (read back from disk, {time.monotonic() - started:.1f} s in all)")
    print(f"  processed      {len(unique):6d}   ({len(handled) - len(unique)} handled twice: in flight at the kill)")
    print(f"  retried        {retried:6d}   (transient gateway errors, retried with backoff)")
    print(f"  dead-lettered  {len(dead_ids):6d}   {json.dumps(dead[0].meta.get('error')) if dead else ''}")
    print(f"  lost           {len(lost):6d}")
    print(f"  left in queue  {remaining:6d}")
    print(f"\nlook further:\n  pqueue stat {path}\n  pqueue dump {path} --limit 5\n"
          f"  pqueue dlq {path} list")
    return 0 if not lost and remaining == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pqueue demo", description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", help="where to create the demo queue (default: a new temp dir)")
    parser.add_argument("--worker", metavar="QUEUE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    base = args.dir or tempfile.mkdtemp(prefix="pqueue-demo-")
    if os.path.exists(os.path.join(base, "orders")):
        print(f"{base}/orders exists already; give a new directory", file=sys.stderr)
        return 2
    return run(base)


if __name__ == "__main__":
    raise SystemExit(main())
