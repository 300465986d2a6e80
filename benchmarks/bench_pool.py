"""ConsumerPool throughput and put-to-handler latency (issue 4).

1. Throughput: a backlog of `--messages` tasks, a no-op handler, `--workers` threads; msgs/s from
   pool start to the last handler call (goal ≥ 30,000 with 4 threads). The raw limit beside it:
   one thread's bare ``consumer.get`` + ``ack`` loop over the same backlog.
2. Latency: a producer puts tasks paced at `--rate` per second, each carrying
   ``time.perf_counter_ns()`` at put; the handler subtracts it (CLOCK_MONOTONIC is one clock for
   every process on Linux, so the cross-process figure is comparable). The producer is a thread
   of this process ("in-process") or a separate process ("cross-process"). The raw limit beside
   it: one thread's bare ``consumer.get`` loop fed by the same paced producer.

Each figure is the median of `--rounds` rounds; latency percentiles are over the last round's
tasks after the warm-up. Prints one JSON object per figure.

    python -m benchmarks.bench_pool --messages 100000 --workers 4 --fsync never --seed 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import pqueue

PRODUCER = r"""
import sys, time, pqueue
path, n, rate, fsync = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
with pqueue.Queue(path, fsync=fsync) as q:
    start = time.perf_counter()
    for i in range(n):
        pause = start + i / rate - time.perf_counter()
        if pause > 0:
            time.sleep(pause)  # pacing; a spin would starve the consumer on a 2-core machine
        q.put({"i": i, "t": time.perf_counter_ns()})
"""


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    """p50/p90/p99/max in microseconds."""
    s = sorted(samples_ns)

    def pick(q: float) -> float:
        return s[min(len(s) - 1, int(q * len(s)))] / 1000.0

    return {"p50_us": pick(0.50), "p90_us": pick(0.90), "p99_us": pick(0.99), "max_us": s[-1] / 1000.0}


def raw_getack(path: str, n: int, fsync: str) -> float:
    """msgs/s of one thread's consumer.get + ack over a backlog of n: the pool's raw limit."""
    with pqueue.Queue(path, fsync=fsync) as q:
        q.put_many([{"i": i} for i in range(n)])
        c = q.consumer("raw")
        t0 = time.perf_counter()
        for _ in range(n):
            c.ack(c.get(timeout=5))
        c.flush()
        return n / (time.perf_counter() - t0)


def pool_throughput(path: str, n: int, workers: int, fsync: str) -> float:
    """msgs/s of a pool with a no-op handler over a backlog of n."""
    with pqueue.Queue(path, fsync=fsync) as q:
        q.put_many([{"i": i} for i in range(n)])
        counter = itertools.count(1)
        done = threading.Event()

        def handler(msg: pqueue.Message) -> None:
            if next(counter) == n:  # itertools.count is atomic under the GIL
                done.set()

        pool = pqueue.ConsumerPool(q, handler, group="bench", workers=workers)
        t0 = time.perf_counter()
        pool.start()
        if not done.wait(120):
            raise RuntimeError(f"pool did not finish {n} tasks in 120 s: {pool.stats()}")
        elapsed = time.perf_counter() - t0
        pool.stop()
        return n / elapsed


def pool_latency(path: str, n: int, workers: int, fsync: str, rate: float, producer: str,
                 warmup: int) -> list[int]:
    """put-to-handler latencies (ns) of n paced tasks, the first `warmup` dropped."""
    with pqueue.Queue(path, fsync=fsync) as q:
        samples: list[int] = []
        done = threading.Event()

        def handler(msg: pqueue.Message) -> None:
            samples.append(time.perf_counter_ns() - msg.data["t"])  # list.append is atomic
            if len(samples) >= n:
                done.set()

        with pqueue.ConsumerPool(q, handler, group="lat", workers=workers):
            if producer == "process":
                proc = subprocess.run([sys.executable, "-c", PRODUCER, path, str(n), str(rate), fsync],
                                      check=True, timeout=300)
                assert proc.returncode == 0
            else:
                start = time.perf_counter()
                for i in range(n):
                    pause = start + i / rate - time.perf_counter()
                    if pause > 0:
                        time.sleep(pause)  # a spin would hold the GIL the pool needs
                    q.put({"i": i, "t": time.perf_counter_ns()})
            if not done.wait(60):
                raise RuntimeError(f"only {len(samples)} of {n} tasks handled in 60 s")
        return samples[warmup:]


def raw_latency(path: str, n: int, fsync: str, rate: float, warmup: int) -> list[int]:
    """put-to-get latencies (ns) of one thread's bare consumer.get loop: the pool's raw limit."""
    with pqueue.Queue(path, fsync=fsync) as q:
        samples: list[int] = []
        c = q.consumer("rawlat")

        def consume() -> None:
            for _ in range(n):
                m = c.get(timeout=30)
                samples.append(time.perf_counter_ns() - m.data["t"])
                c.ack(m)

        t = threading.Thread(target=consume)
        t.start()
        start = time.perf_counter()
        for i in range(n):
            pause = start + i / rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            q.put({"i": i, "t": time.perf_counter_ns()})
        t.join()
        return samples[warmup:]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000, help="backlog for the throughput figure")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--fsync", default="never", help="the queue's fsync policy")
    ap.add_argument("--seed", type=int, default=1, help="unused by the figures; recorded for the runner")
    ap.add_argument("--rounds", type=int, default=3, help="each figure is the median of this many rounds")
    ap.add_argument("--latency-messages", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=2000.0, help="paced puts per second for the latency figure")
    ap.add_argument("--warmup", type=int, default=200, help="latency samples dropped at the start")
    ap.add_argument("--dir", default=None, help="where queues are made (default: a temporary directory)")
    args = ap.parse_args(argv)
    results: dict[str, Any] = {"workers": args.workers, "fsync": args.fsync, "seed": args.seed,
                               "messages": args.messages}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        raws, pools = [], []
        for r in range(args.rounds):
            raws.append(raw_getack(os.path.join(tmp, f"raw{r}"), args.messages, args.fsync))
            pools.append(pool_throughput(os.path.join(tmp, f"tp{r}"), args.messages, args.workers, args.fsync))
        results["raw_getack_msgs_per_s"] = statistics.median(raws)
        results["pool_msgs_per_s"] = statistics.median(pools)
        results["pool_rounds"] = [round(x) for x in pools]
        results["ratio_to_raw"] = results["pool_msgs_per_s"] / results["raw_getack_msgs_per_s"]
        print(json.dumps({"figure": "throughput", **{k: results[k] for k in (
            "pool_msgs_per_s", "pool_rounds", "raw_getack_msgs_per_s", "ratio_to_raw")}}), flush=True)
        raw = raw_latency(os.path.join(tmp, "lat-raw"), args.latency_messages, args.fsync, args.rate, args.warmup)
        results["latency_raw_get"] = percentiles(raw)
        print(json.dumps({"figure": "put_to_get_latency_raw_consumer", "rate": args.rate,
                          **results["latency_raw_get"]}), flush=True)
        for producer in ("inproc", "process"):
            lat = pool_latency(os.path.join(tmp, f"lat-{producer}"), args.latency_messages, args.workers,
                               args.fsync, args.rate, producer, args.warmup)
            results[f"latency_{producer}"] = percentiles(lat)
            print(json.dumps({"figure": f"put_to_handler_latency_{producer}", "rate": args.rate,
                              **results[f"latency_{producer}"]}), flush=True)
    return results


if __name__ == "__main__":
    main()
