"""put-to-handler latency (p50/p99/p99.9) and consumer-pool throughput with a no-op handler.

A producer puts paced messages stamped with ``perf_counter_ns`` (CLOCK_MONOTONIC, the same
clock in every process); the consumer records how long each took to reach it. In "process"
mode the producer is another process (the common embedded layout); in "thread" mode it is a
thread of the consumer's process. Peers without a blocking get are polled every 0.5 ms.

    python -m benchmarks.bench_latency --messages 2000 --producers 1
"""

from __future__ import annotations

import argparse
import multiprocessing
import threading
import time
from typing import Any

import pqueue
from benchmarks import contenders
from benchmarks.bench_getack import fill
from benchmarks.common import add_common_args, item_bytes, perf_ns, scratch, summarize
from benchmarks.harness import run_rounds

PACE_SECONDS = 0.0005  # between two puts of the producer: a steady load, not a flood


def _produce(c: contenders.Contender, n: int, size: int) -> None:
    body = "x" * size
    for i in range(n):
        c.put({"id": i, "t": perf_ns(), "body": body})
        time.sleep(PACE_SECONDS)


def _child(name: str, path: str, n: int, size: int) -> None:
    c = contenders.make(name)
    c.open(path)
    _produce(c, n, size)
    c.close()


def _measure(c: contenders.Contender, path: str, *, messages: int, size: int, mode: str,
             warmup: int) -> dict[str, float] | None:
    if mode == "process" and not c.multiprocess:
        return None
    c.open(path)
    try:
        if mode == "process":
            proc: Any = multiprocessing.get_context("spawn").Process(target=_child,
                                                                    args=(c.name, path, messages + warmup, size))
        else:
            proc = threading.Thread(target=_produce, args=(c, messages + warmup, size))
        proc.start()
        lat: list[int] = []
        start = perf_ns()
        while len(lat) < messages + warmup:
            got = c.get_wait(5.0)
            if got is None:
                print(f"WARNING: {c.name}: nothing arrived for 5 s; latency run cut short")
                break
            lat.append(perf_ns() - got[1]["t"])
            c.ack(got[0])
        elapsed = (perf_ns() - start) / 1e9
        proc.join()
    finally:
        c.close()
    return summarize(lat[warmup:], elapsed, item_bytes(size))


def run_latency(names: list[str], *, messages: int, size: int, mode: str, rounds: int = 3,
                warmup: int = 20) -> dict[str, Any]:
    names = [n for n in names if n == "raw[never]" or not n.startswith("raw[")]
    if mode == "process":
        for n in names:
            if not contenders.make(n).multiprocess:
                print(f"note: {n} is not multi-process safe; left out of the cross-process latency run")

    def measure(c: contenders.Contender, d: str) -> dict[str, float] | None:
        return _measure(c, d, messages=messages, size=size, mode=mode, warmup=warmup)

    out = run_rounds(names, measure, rounds=rounds, prefix="latency", threads=2, raw_for="raw[never]",
                     key="p50_us")
    out.update(title=f"put-to-consumer latency, producer in another {mode}, {size} B body, "
                     f"one put every {PACE_SECONDS * 1e3:g} ms",
               params={"messages": messages, "size": size, "mode": mode, "rounds": rounds, "warmup": warmup,
                       "pace_s": PACE_SECONDS, "poll_s": contenders.POLL_SECONDS})
    return out


def run_pool(*, messages: int, size: int, workers: int = 4, rounds: int = 3) -> dict[str, Any] | None:
    """ConsumerPool with a no-op handler: drain throughput, and put-to-handler latency (pqueue only)."""
    if not hasattr(pqueue, "ConsumerPool"):
        print("WARNING: pqueue.ConsumerPool is not there yet (pqueue/pool.py); pool scenarios skipped")
        return None
    kept: list[dict[str, dict[str, float]]] = []
    for _ in range(rounds):
        row = {}
        with scratch("pool") as d:
            row["drain"] = _pool_drain(d, messages, size, workers)
        with scratch("pool") as d:
            row["latency"] = _pool_latency(d, min(messages, 2000), size, workers)
        kept.append(row)
    from benchmarks.common import aggregate

    return {"title": f"ConsumerPool, {workers} workers, no-op handler, {size} B body", "rows": aggregate(kept),
            "rounds": kept, "params": {"messages": messages, "size": size, "workers": workers, "rounds": rounds}}


def _pool_drain(path: str, messages: int, size: int, workers: int) -> dict[str, float]:
    with pqueue.Queue(path, fsync="never") as q:
        n = fill(_Wrap(q), messages, size, 30.0)
        done = threading.Event()
        seen = [0]
        lock = threading.Lock()  # guards seen[0] across worker threads

        def handler(_msg: Any) -> None:
            with lock:
                seen[0] += 1
                if seen[0] >= n:
                    done.set()

        pool = pqueue.ConsumerPool(q, handler, workers=workers)
        t0 = perf_ns()
        pool.start()
        done.wait(120)
        elapsed = (perf_ns() - t0) / 1e9
        pool.stop()
    res = summarize([], elapsed, item_bytes(size))
    res["msgs"], res["msgs_s"] = seen[0], seen[0] / elapsed
    res["mb_s"] = res["msgs_s"] * item_bytes(size) / 1e6
    return res


def _pool_latency(path: str, messages: int, size: int, workers: int) -> dict[str, float]:
    lat: list[int] = []
    lock = threading.Lock()  # guards lat across worker threads
    done = threading.Event()
    with pqueue.Queue(path) as q:
        def handler(msg: Any) -> None:
            t = perf_ns() - msg.data["t"]
            with lock:
                lat.append(t)
                if len(lat) >= messages:
                    done.set()

        pool = pqueue.ConsumerPool(q, handler, workers=workers)
        pool.start()
        t0 = perf_ns()
        _produce(_Wrap(q), messages, size)
        done.wait(30)
        elapsed = (perf_ns() - t0) / 1e9
        pool.stop()
    return summarize(lat, elapsed, item_bytes(size))


class _Wrap(contenders.Contender):
    """An open pqueue.Queue as a contender (for fill and _produce)."""

    def __init__(self, q: pqueue.Queue) -> None:
        self.put = q.put  # type: ignore[method-assign]
        self.put_many = q.put_many  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, messages=2000, fsync="interval", warmup=20)
    parser.add_argument("--mode", choices=("process", "thread"), default="process")
    args = parser.parse_args()
    policies = contenders.PQUEUE_POLICIES if args.fsync == "all" else (args.fsync,)
    res = run_latency(contenders.names(pqueue_policies=policies), messages=args.messages, size=args.size,
                      mode=args.mode, rounds=args.rounds, warmup=args.warmup)
    from benchmarks.report import emit

    emit(res, args.json)


if __name__ == "__main__":
    main()
