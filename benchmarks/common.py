"""Shared method: payloads, timing, percentiles, paired ratios, scratch directories, CLI flags.

Method (STYLE.md, notes/hotpath.md): contenders run interleaved within a round, the order
rotating from round to round; warmup rounds are discarded; every ratio is taken between two
contenders of the same round and the median of those per-round ratios is reported, because
load on this shared 2-core machine moves absolute rates by ±30 %.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRATCH = os.path.join(REPO, "benchmarks", "scratch")  # gitignored, same ext4 as the repo

perf_ns = time.perf_counter_ns


def make_item(i: int, size: int) -> dict[str, Any]:
    """The message every contender carries: a small dict, msgpack-encoded by each of them."""
    return {"id": i, "body": "x" * size}


def item_bytes(size: int) -> int:
    """Encoded size of `make_item(_, size)` with msgpack (id up to 2**32)."""
    import msgpack

    return len(msgpack.packb(make_item(2**31, size)))


def pct(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of an ascending list, nearest rank; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, int(round(q * len(sorted_values) + 0.5)) - 1))
    return float(sorted_values[k])


def summarize(latencies_ns: list[int], elapsed_s: float, msg_bytes: int) -> dict[str, float]:
    """msgs/s, MB/s and p50/p90/p99/p99.9/max latency (µs) of one measured run."""
    lat = sorted(latencies_ns)
    n = len(lat)
    rate = n / elapsed_s if elapsed_s > 0 else 0.0
    return {
        "msgs": n,
        "seconds": elapsed_s,
        "msgs_s": rate,
        "mb_s": rate * msg_bytes / 1e6,
        "p50_us": pct(lat, 0.50) / 1e3,
        "p90_us": pct(lat, 0.90) / 1e3,
        "p99_us": pct(lat, 0.99) / 1e3,
        "p999_us": pct(lat, 0.999) / 1e3,
        "max_us": (lat[-1] / 1e3) if lat else 0.0,
    }


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed_loop(op: Callable[[int], object], n: int, budget_s: float) -> tuple[list[int], float]:
    """Call op(i) up to n times or until budget_s passed; per-call latencies and elapsed seconds."""
    lat: list[int] = []
    append = lat.append
    start = perf_ns()
    stop = start + int(budget_s * 1e9)
    t0 = start
    for i in range(n):
        op(i)
        t1 = perf_ns()
        append(t1 - t0)
        t0 = t1
        if t1 > stop:
            break
    return lat, (t0 - start) / 1e9


def rounds_order(names: Sequence[str], r: int) -> list[str]:
    """Interleave: rotate the contender order by one each round so nobody always goes first."""
    k = r % len(names) if names else 0
    return list(names[k:]) + list(names[:k])


def aggregate(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per contender: the median of each metric over the kept rounds."""
    out: dict[str, dict[str, float]] = {}
    names = {name for r in rounds for name in r}
    for name in names:
        runs = [r[name] for r in rounds if name in r]
        out[name] = {k: median([run[k] for run in runs]) for k in runs[0]}
        out[name]["rounds"] = len(runs)
    return out


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[str]:
    """A fresh directory under benchmarks/scratch/, removed afterwards whatever happens."""
    os.makedirs(SCRATCH, exist_ok=True)
    path = tempfile.mkdtemp(prefix=prefix + "-", dir=SCRATCH)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def dir_bytes(path: str) -> int:
    """Bytes allocated on disk under `path` (st_blocks, so sparse or preallocated space counts right)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


def add_common_args(parser: argparse.ArgumentParser, *, messages: int, size: int = 100, producers: int = 1,
                    consumers: int = 1, fsync: str = "all", rounds: int = 3, warmup: int = 1) -> None:
    """The flags every bench_*.py module takes (STYLE.md Benchmarks)."""
    parser.add_argument("--messages", type=int, default=messages, help="messages per contender per round")
    parser.add_argument("--size", type=int, default=size, help="payload body bytes")
    parser.add_argument("--producers", type=int, default=producers)
    parser.add_argument("--consumers", type=int, default=consumers, help="consumer threads, where a scenario has any")
    parser.add_argument("--fsync", default=fsync, help="pqueue fsync policy, or 'all'")
    parser.add_argument("--seed", type=int, default=1, help="recorded only: every payload is deterministic")
    parser.add_argument("--warmup", type=int, default=warmup, help="rounds run first and discarded")
    parser.add_argument("--rounds", type=int, default=rounds, help="measured rounds (medians of these)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds at most per contender per round")
    parser.add_argument("--json", help="write the result here")
