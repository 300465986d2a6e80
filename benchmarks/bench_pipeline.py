"""A pipeline stage (pool with output=) against a plain pool, and result() round trips across processes.

    python -m benchmarks.bench_pipeline --messages 5000 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

import pqueue
from benchmarks.common import REPO, add_common_args, make_item, median, pct, scratch
from benchmarks.report import write_json

# The worker for the round-trip test: a pool with results=True that answers until killed.
RESULT_WORKER = """
import sys, time, pqueue
with pqueue.Queue(sys.argv[1]) as q:
    with pqueue.ConsumerPool(q, lambda m: m.data["id"] * 2, workers=2, results=True):
        print("ready", flush=True)
        while True:
            time.sleep(1)
"""


def drain_rate(args: argparse.Namespace, with_output: bool) -> float:
    """Tasks per second through a 4-worker pool with a no-op handler, with or without output=."""
    with scratch("pipeline") as d:
        src = pqueue.Queue(os.path.join(d, "in"), fsync=args.fsync)
        dst = pqueue.Queue(os.path.join(d, "out"), fsync=args.fsync) if with_output else None
        try:
            src.put_many([make_item(i, args.size) for i in range(args.messages)])
            handler = (lambda m: m.data["id"]) if with_output else (lambda m: None)
            start = time.perf_counter()
            with pqueue.ConsumerPool(src, handler, workers=4, output=dst):
                while src.qsize() > 0:
                    time.sleep(0.005)
            return args.messages / (time.perf_counter() - start)
        finally:
            src.close()
            if dst is not None:
                dst.close()


def round_trips(args: argparse.Namespace, n: int) -> dict[str, float]:
    """put() here, a worker in another process answers, result() here: latencies in µs."""
    with scratch("results") as d:
        path = os.path.join(d, "q")
        pqueue.Queue(path).close()
        worker = subprocess.Popen([sys.executable, "-c", RESULT_WORKER, path], stdout=subprocess.PIPE, text=True,
                                  cwd=REPO)
        try:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
            lat = []
            with pqueue.Queue(path, fsync=args.fsync) as q:
                for i in range(n):
                    t0 = time.perf_counter_ns()
                    off = q.put({"id": i})
                    assert q.result(off, timeout=30) == 2 * i
                    lat.append(time.perf_counter_ns() - t0)
        finally:
            worker.kill()
            worker.wait()
            if worker.stdout is not None:
                worker.stdout.close()
    lat.sort()
    return {"p50_us": pct(lat, 0.5) / 1e3, "p90_us": pct(lat, 0.9) / 1e3, "p99_us": pct(lat, 0.99) / 1e3,
            "max_us": lat[-1] / 1e3}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, messages=5000, fsync="interval", rounds=3)
    args = parser.parse_args(argv)
    plain, stage, ratios = [], [], []
    for r in range(args.rounds):
        order = [False, True] if r % 2 == 0 else [True, False]
        got = {flag: drain_rate(args, flag) for flag in order}
        plain.append(got[False])
        stage.append(got[True])
        ratios.append(got[True] / got[False])
    trips = round_trips(args, 300)
    out = {"plain_pool_msgs_s": median(plain), "stage_msgs_s": median(stage), "stage_x_plain": median(ratios),
           "result_round_trip": trips, "fsync": args.fsync}
    print(f"plain pool {out['plain_pool_msgs_s']:,.0f} tasks/s; stage with output= {out['stage_msgs_s']:,.0f} "
          f"tasks/s; ratio {out['stage_x_plain']:.3f} (median of {args.rounds} paired rounds)")
    print("result() round trip across processes: " + ", ".join(f"{k} {v:,.0f}" for k, v in trips.items()))
    write_json(out, args.json)
    return out


if __name__ == "__main__":
    main()
