"""put throughput and latency: 1 thread, N threads, N processes, put_many batches, payload sizes.

    python -m benchmarks.bench_put --messages 20000 --size 100 --producers 4
"""

from __future__ import annotations

import argparse
import multiprocessing
import threading
from typing import Any

from benchmarks import contenders
from benchmarks.common import add_common_args, item_bytes, make_item, perf_ns, summarize, timed_loop
from benchmarks.harness import run_rounds


def _measure_threads(c: contenders.Contender, path: str, *, messages: int, size: int, threads: int,
                     warmup: int, budget: float) -> dict[str, float]:
    c.open(path)
    try:
        items = [make_item(i, size) for i in range(messages + warmup)]
        for item in items[:warmup]:
            c.put(item)
        per = messages // threads
        results: list[list[int]] = [[] for _ in range(threads)]
        go = threading.Barrier(threads + 1)

        def producer(k: int) -> None:
            mine = items[warmup + k * per: warmup + (k + 1) * per]
            put = c.put
            go.wait()
            results[k] = timed_loop(lambda i: put(mine[i]), per, budget)[0]

        ts = [threading.Thread(target=producer, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        go.wait()
        t0 = perf_ns()
        for t in ts:
            t.join()
        elapsed = (perf_ns() - t0) / 1e9
    finally:
        c.close()
    return summarize([x for r in results for x in r], elapsed, item_bytes(size))


def _child(name: str, path: str, k: int, per: int, size: int, budget: float, go: Any, out: Any) -> None:
    c = contenders.make(name)
    c.open(path)
    items = [make_item(k * per + i, size) for i in range(per)]
    go.wait()
    t0 = perf_ns()
    lat, _ = timed_loop(lambda i: c.put(items[i]), per, budget)
    t1 = perf_ns()
    c.close()
    out.send((t0, t1, lat))
    out.close()


def _measure_processes(c: contenders.Contender, path: str, *, messages: int, size: int, procs: int,
                       budget: float) -> dict[str, float] | None:
    if not c.multiprocess:
        return None
    c.open(path)  # create it once, so the children race only on appends
    c.close()
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Barrier(procs)
    pipes = [ctx.Pipe(duplex=False) for _ in range(procs)]
    per = messages // procs
    ps = [ctx.Process(target=_child, args=(c.name, path, k, per, size, budget, go, pipes[k][1]))
          for k in range(procs)]
    for p in ps:
        p.start()
    got = [pipes[k][0].recv() for k in range(procs)]
    for p in ps:
        p.join()
    elapsed = (max(g[1] for g in got) - min(g[0] for g in got)) / 1e9
    return summarize([x for g in got for x in g[2]], elapsed, item_bytes(size))


def _measure_batches(c: contenders.Contender, path: str, *, messages: int, size: int, batch: int,
                     warmup: int, budget: float) -> dict[str, float]:
    c.open(path)
    try:
        c.put_many([make_item(i, size) for i in range(warmup)] or [make_item(0, size)])
        batches = [[make_item(b * batch + i, size) for i in range(batch)] for b in range(max(1, messages // batch))]
        lat, elapsed = timed_loop(lambda b: c.put_many(batches[b]), len(batches), budget)
    finally:
        c.close()
    res = summarize(lat, elapsed, item_bytes(size) * batch)  # latency is per batch here
    res["msgs_s"] *= batch
    res["batches_s"] = res["msgs_s"] / batch
    return res


def run_put(names: list[str], *, messages: int, size: int, threads: int = 1, procs: int = 0,
            rounds: int = 3, warmup: int = 200, budget: float = 1.0) -> dict[str, Any]:
    """One put scenario. procs > 0: that many producer processes, else `threads` threads."""
    if procs:
        names = [n for n in names if contenders.make(n).multiprocess]
        for n in set(contenders.names()) - set(names):
            print(f"note: {n} is not multi-process safe; left out of the {procs}-process put")

        def measure(c: contenders.Contender, d: str) -> dict[str, float] | None:
            return _measure_processes(c, d, messages=messages, size=size, procs=procs, budget=budget)
    else:
        def measure(c: contenders.Contender, d: str) -> dict[str, float] | None:
            return _measure_threads(c, d, messages=messages, size=size, threads=threads, warmup=warmup,
                                    budget=budget)
    who = f"{procs} processes" if procs else f"{threads} thread{'s' if threads > 1 else ''}"
    out = run_rounds(names, measure, rounds=rounds, prefix="put", threads=max(threads, 1))
    out.update(title=f"put, {who}, {size} B body", params={"messages": messages, "size": size, "threads": threads,
                                                            "processes": procs, "rounds": rounds, "warmup": warmup,
                                                            "budget_s": budget})
    return out


def run_put_many(names: list[str], *, messages: int, size: int, batch: int, rounds: int = 3, warmup: int = 200,
                 budget: float = 1.0) -> dict[str, Any]:
    """put_many in batches of `batch` (peers without a batch call loop over put)."""
    def measure(c: contenders.Contender, d: str) -> dict[str, float]:
        return _measure_batches(c, d, messages=messages, size=size, batch=batch, warmup=warmup, budget=budget)

    out = run_rounds(names, measure, rounds=rounds, prefix="putmany")
    out.update(title=f"put_many, batches of {batch}, {size} B body",
               params={"messages": messages, "size": size, "batch": batch, "rounds": rounds, "budget_s": budget,
                       "latency": "per batch"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, messages=20000)
    parser.add_argument("--batch", type=int, default=0, help="measure put_many with this batch size")
    parser.add_argument("--processes", action="store_true", help="--producers are processes, not threads")
    args = parser.parse_args()
    policies = contenders.PQUEUE_POLICIES if args.fsync == "all" else (args.fsync,)
    names = contenders.names(pqueue_policies=policies)
    if args.batch:
        res = run_put_many(names, messages=args.messages, size=args.size, batch=args.batch, rounds=args.rounds,
                           warmup=args.warmup, budget=args.budget)
    else:
        res = run_put(names, messages=args.messages, size=args.size, threads=args.producers,
                      procs=args.producers if args.processes else 0, rounds=args.rounds, warmup=args.warmup,
                      budget=args.budget)
    from benchmarks.report import emit

    emit(res, args.json)


if __name__ == "__main__":
    main()
