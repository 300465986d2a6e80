"""get + ack loop over a backlog (the "matching read loop" for the raw limit: read, CRC, decode).

    python -m benchmarks.bench_getack --messages 20000 --size 100
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks import contenders
from benchmarks.common import add_common_args, item_bytes, make_item, perf_ns, summarize

BATCH = 500  # messages per put_many while filling the backlog


def fill(c: contenders.Contender, messages: int, size: int, budget: float) -> int:
    """Put up to `messages` (in put_many batches), stopping after `budget` seconds; return how many."""
    stop = perf_ns() + int(budget * 1e9)
    n = 0
    while n < messages and perf_ns() < stop:
        k = min(BATCH, messages - n)
        c.put_many([make_item(n + i, size) for i in range(k)])
        n += k
    return n


def _measure(c: contenders.Contender, path: str, *, messages: int, size: int, warmup: int,
             budget: float) -> dict[str, float]:
    c.open(path)
    n = fill(c, messages + warmup, size, max(budget * 2, 0.5))
    c.close()
    c.open(path)  # a consumer usually starts on a backlog another handle wrote
    try:
        for _ in range(min(warmup, n // 10)):
            got = c.get()
            if got is not None:
                c.ack(got[0])
        lat: list[int] = []
        append = lat.append
        get, ack = c.get, c.ack
        start = t0 = perf_ns()
        stop = start + int(budget * 1e9)
        while True:
            got = get()
            if got is None:
                break
            ack(got[0])
            t1 = perf_ns()
            append(t1 - t0)
            t0 = t1
            if t1 > stop:
                break
        elapsed = (t0 - start) / 1e9
    finally:
        c.close()
    res = summarize(lat, elapsed, item_bytes(size))
    res["backlog"] = n
    return res


def run_getack(names: list[str], *, messages: int, size: int, rounds: int = 3, warmup: int = 200,
               budget: float = 1.0) -> dict[str, Any]:
    from benchmarks.harness import run_rounds

    names = [n for n in names if not n.startswith("raw[") or n == "raw[never]"]  # one read loop is enough

    def measure(c: contenders.Contender, d: str) -> dict[str, float]:
        return _measure(c, d, messages=messages, size=size, warmup=warmup, budget=budget)

    out = run_rounds(names, measure, rounds=rounds, prefix="getack", raw_for="raw[never]")
    out.update(title=f"get + ack loop over a backlog, {size} B body",
               params={"messages": messages, "size": size, "rounds": rounds, "warmup": warmup, "budget_s": budget})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, messages=20000, fsync="never")
    args = parser.parse_args()
    policies = contenders.PQUEUE_POLICIES if args.fsync == "all" else (args.fsync,)
    res = run_getack(contenders.names(pqueue_policies=policies), messages=args.messages, size=args.size,
                     rounds=args.rounds, warmup=args.warmup, budget=args.budget)
    from benchmarks.report import emit

    emit(res, args.json)


if __name__ == "__main__":
    main()
