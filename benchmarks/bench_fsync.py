"""The fsync policy sweep: put throughput against the loss window (what a power cut can take).

pqueue's policies (never, 1/10/100 ms windows, every 100 or 1000 records, always) beside the
raw loop with never, every 10/100/1000 records and always. The loss window of a time policy is
the records put during one window at the measured rate; of a record policy, N records.

    python -m benchmarks.bench_fsync --messages 20000
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks import contenders
from benchmarks.bench_put import run_put
from benchmarks.common import add_common_args

PQUEUE_SWEEP = ("never", "100ms", "10ms", "1ms", "1000 records", "100 records", "always")
RAW_SWEEP: tuple[str | int, ...] = ("never", 1000, 100, 10, "always")


def loss_window(policy: str, rate: float) -> tuple[float, float]:
    """(records, milliseconds) a power cut may take under `policy` at `rate` puts/s; inf for never."""
    p = policy[len("pqueue["):-1] if policy.startswith("pqueue[") else policy[len("raw["):-1]
    if p == "never":
        return float("inf"), float("inf")
    if p == "always":
        return 0.0, 0.0
    if p.endswith("ms"):
        ms = float(p[:-2])
        return rate * ms / 1000, ms
    n = float(p.split()[1] if p.startswith("every") else p.split()[0])
    return n, n / rate * 1000 if rate else float("inf")


def run_fsync_sweep(*, messages: int, size: int, rounds: int = 3, warmup: int = 200,
                    budget: float = 1.0) -> dict[str, Any]:
    names = contenders.names(pqueue_policies=PQUEUE_SWEEP, raw=RAW_SWEEP, peers=False)
    out = run_put(names, messages=messages, size=size, rounds=rounds, warmup=warmup, budget=budget)
    for name, row in out["rows"].items():
        row["loss_records"], row["loss_ms"] = loss_window(name, row["msgs_s"])
    out["title"] = f"fsync policy sweep: put, 1 thread, {size} B body"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, messages=20000)
    args = parser.parse_args()
    res = run_fsync_sweep(messages=args.messages, size=args.size, rounds=args.rounds, warmup=args.warmup,
                          budget=args.budget)
    from benchmarks.report import emit

    emit(res, args.json)


if __name__ == "__main__":
    main()
