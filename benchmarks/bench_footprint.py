"""Memory and disk per contender against the backlog: RSS after opening a queue that holds
N messages (in a fresh process, minus that process's RSS before the open), and disk bytes per
message (allocated blocks of the whole directory ÷ N).

    python -m benchmarks.bench_footprint --messages 10000
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks import contenders
from benchmarks.bench_getack import fill
from benchmarks.common import add_common_args, dir_bytes, scratch
from benchmarks.procs import run_json
from benchmarks.report import write_json


def point(name: str, backlog: int, size: int, budget: float) -> dict[str, Any]:
    c = contenders.make(name)
    with scratch("footprint") as d:
        c.open(d)
        n = fill(c, backlog, size, budget)
        c.close()
        disk = dir_bytes(d)
        mem = run_json("rss", d, "--name", name)
    return {"backlog": n, "complete": n == backlog, "disk_bytes": disk, "disk_bytes_per_msg": disk / n if n else 0,
            "rss_kib": mem.get("rss_kib", 0), "rss_delta_kib": mem.get("rss_kib", 0) - mem.get("before_open_kib", 0)}


def run_footprint(*, backlogs: list[int], size: int, budget: float) -> dict[str, Any]:
    names = [n for n in contenders.names(raw=("never",)) if n != "pqueue[always]"]
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for backlog in backlogs:
        for name in names:
            rows[name].append(point(name, backlog, size, budget))
    return {"title": f"footprint against backlog, {size} B body", "rows": rows,
            "params": {"backlogs": backlogs, "size": size, "fill_budget_s": budget}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, messages=10000)
    parser.add_argument("--backlogs", default="1000,10000")
    args = parser.parse_args()
    res = run_footprint(backlogs=[int(b) for b in args.backlogs.split(",")], size=args.size, budget=args.budget * 5)
    from benchmarks.report import footprint_table

    print(footprint_table(res))
    write_json(res, args.json)


if __name__ == "__main__":
    main()
