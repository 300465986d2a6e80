"""The one runner: every scenario, interleaved contenders, JSON + Markdown + PNGs under results/.

    python -m benchmarks --quick        # about 2 minutes on 2 cores
    python -m benchmarks                # full mode (about 15 minutes; 1 GB recovery point)
    python -m benchmarks --only core,durability
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):  # python benchmarks/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import contenders  # noqa: E402
from benchmarks.common import REPO  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")

# Per mode: sizes of every scenario. Quick must stay within 2 minutes on 2 cores.
MODES: dict[str, dict[str, Any]] = {
    "quick": {"messages": 20_000, "budget": 0.12, "rounds": 3, "core_messages": 100_000, "always_n": 200,
              "group_seconds": 0.5, "backlog": 30_000, "recovery_mb": (1, 10, 100), "recovery_rounds": 1,
              "peer_records": 1000, "skip": ("latency_thread",),
              "latency_messages": 150, "footprint": (1_000, 10_000), "fill_budget": 0.6, "pool_messages": 20_000},
    "full": {"messages": 100_000, "budget": 1.0, "rounds": 5, "core_messages": 200_000, "always_n": 500,
             "group_seconds": 1.5, "backlog": 100_000, "recovery_mb": (1, 10, 100, 1000), "recovery_rounds": 3,
             "peer_records": 10_000, "skip": (),
             "latency_messages": 2000, "footprint": (1_000, 10_000, 100_000), "fill_budget": 10.0,
             "pool_messages": 100_000},
}


def scenarios(m: dict[str, Any]) -> dict[str, Callable[[], dict[str, Any] | None]]:
    from benchmarks.bench_core import run_core
    from benchmarks.bench_durability import run_durability
    from benchmarks.bench_footprint import run_footprint
    from benchmarks.bench_fsync import run_fsync_sweep
    from benchmarks.bench_getack import run_getack
    from benchmarks.bench_latency import run_latency, run_pool
    from benchmarks.bench_put import run_put, run_put_many
    from benchmarks.bench_recovery import run_recovery

    names = contenders.names()
    r, b, n = m["rounds"], m["budget"], m["messages"]
    return {
        "core": lambda: run_core(messages=m["core_messages"], rounds=r, always_n=m["always_n"],
                                 group_seconds=m["group_seconds"], backlog=m["backlog"],
                                 recovery_sizes=m["recovery_mb"], recovery_rounds=m["recovery_rounds"]),
        "durability": lambda: run_durability(contenders.names(raw=("never", "always"))),
        "put_1thread": lambda: run_put(names, messages=n, size=100, rounds=r, budget=b),
        "put_4threads": lambda: run_put(names, messages=n, size=100, threads=4, rounds=r, budget=b),
        "put_2processes": lambda: run_put(names, messages=n, size=100, procs=2, rounds=r, budget=b),
        "put_1KiB": lambda: run_put(names, messages=n, size=1024, rounds=r, budget=b),
        "put_16KiB": lambda: run_put(names, messages=n // 4, size=16384, rounds=r, budget=b),
        "put_many_100": lambda: run_put_many(names, messages=n, size=100, batch=100, rounds=r, budget=b),
        "get_ack": lambda: run_getack(names, messages=n, size=100, rounds=r, budget=b),
        "latency_process": lambda: run_latency(names, messages=m["latency_messages"], size=100, mode="process",
                                               rounds=r),
        "latency_thread": lambda: run_latency(names, messages=m["latency_messages"], size=100, mode="thread",
                                              rounds=r),
        "pool": lambda: run_pool(messages=m["pool_messages"], size=100, rounds=r),
        "fsync_sweep": lambda: run_fsync_sweep(messages=n, size=100, rounds=r, budget=b),
        "recovery_peers": lambda: run_recovery(sizes_mb=[], peer_records=m["peer_records"], rounds=r),
        "footprint": lambda: run_footprint(backlogs=list(m["footprint"]), size=100, budget=m["fill_budget"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: about 2 minutes on 2 cores")
    parser.add_argument("--only", help="comma-separated scenario names (default: all)")
    parser.add_argument("--out", default=RESULTS, help="directory for the JSON, Markdown and PNGs")
    parser.add_argument("--report", metavar="JSON", help="only rewrite the Markdown and PNGs of an earlier run")
    args = parser.parse_args()
    from benchmarks import machine, report

    if args.report:
        with open(args.report) as f:
            results = json.load(f)
        stem = args.report.removesuffix(".json")
        with open(stem + ".md", "w") as f:
            f.write(report.markdown(results, report.plots(results, stem)))
        return

    mode = "quick" if args.quick else "full"
    plan = scenarios(MODES[mode])
    chosen = args.only.split(",") if args.only else [s for s in plan if s not in MODES[mode]["skip"]]
    unknown = set(chosen) - set(plan)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(plan)}")
    info = machine.describe()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    # A partial run is named by its scenarios, so it never overwrites the day's whole run.
    label = "-".join(chosen) if args.only else mode
    stem = os.path.join(args.out, f"{stamp}-{info['host']}-{label}")
    results: dict[str, Any] = {"mode": mode, "machine": info, "params": MODES[mode], "scenarios": {},
                               "seconds": {}}
    t_all = time.monotonic()
    for name in chosen:
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        res = plan[name]()
        results["seconds"][name] = round(time.monotonic() - t0, 1)
        if res is not None:
            results["scenarios"][name] = res
            print(report.section(name, res), flush=True)
    results["seconds"]["total"] = round(time.monotonic() - t_all, 1)
    results["machine"]["loadavg_end"] = os.getloadavg()
    os.makedirs(args.out, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    plots = report.plots(results, stem)
    with open(stem + ".md", "w") as f:
        f.write(report.markdown(results, plots))
    print(f"wrote {stem}.json, {stem}.md and {len(plots)} plots in {results['seconds']['total']} s")


if __name__ == "__main__":
    main()
