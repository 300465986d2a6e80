"""Task semantics against a plain put: a keyed put, a priority put, a delayed put (issue: task semantics).

Each variant runs in its own fresh queue, interleaved within each round; the ratio of each to
the plain put is taken per round and its median reported.

    python -m benchmarks.bench_semantics --messages 3000 --rounds 5 --fsync interval
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import pqueue
from benchmarks.common import add_common_args, make_item, median, rounds_order, scratch, summarize, timed_loop
from benchmarks.report import write_json

Variant = Callable[[pqueue.Queue, int, dict[str, Any]], object]
VARIANTS: dict[str, Variant] = {
    "plain": lambda q, i, item: q.put(item),
    "key": lambda q, i, item: q.put(item, key=f"order-{i}"),
    "priority": lambda q, i, item: q.put(item, priority=i % 10),
    "delay": lambda q, i, item: q.put(item, delay=60),
}


def measure(name: str, args: argparse.Namespace) -> dict[str, float]:
    with scratch("semantics") as d:
        with pqueue.Queue(os.path.join(d, "q"), fsync=args.fsync) as q:
            op = VARIANTS[name]
            item = make_item(0, args.size)
            op(q, -1, item)  # warm: the first put opens the log, takes the lock
            lat, elapsed = timed_loop(lambda i: op(q, i, item), args.messages, args.budget)
            return summarize(lat, elapsed, args.size)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, messages=3000, fsync="interval", rounds=5)
    args = parser.parse_args(argv)
    names = list(VARIANTS)
    rounds: list[dict[str, dict[str, float]]] = []
    for r in range(args.warmup + args.rounds):
        row = {name: measure(name, args) for name in rounds_order(names, r)}
        if r >= args.warmup:
            rounds.append(row)
    out: dict[str, Any] = {"fsync": args.fsync, "size": args.size, "rows": {}}
    print(f"put variants, fsync={args.fsync}, {args.size} B body, medians of {args.rounds} rounds")
    print(f"{'variant':10} {'puts/s':>10} {'x plain':>8} {'p50 us':>8} {'p99 us':>8}")
    for name in names:
        rate = median([rnd[name]["msgs_s"] for rnd in rounds])
        ratio = median([rnd[name]["msgs_s"] / rnd["plain"]["msgs_s"] for rnd in rounds])
        p50 = median([rnd[name]["p50_us"] for rnd in rounds])
        p99 = median([rnd[name]["p99_us"] for rnd in rounds])
        out["rows"][name] = {"msgs_s": rate, "x_plain": ratio, "p50_us": p50, "p99_us": p99}
        print(f"{name:10} {rate:>10,.0f} {ratio:>8.3f} {p50:>8.1f} {p99:>8.1f}")
    write_json(out, args.json)
    return out


if __name__ == "__main__":
    main()
