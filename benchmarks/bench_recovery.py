"""Open/recovery time after SIGKILL against log size, beside a whole-log scan.

A child fills a queue (fsync never), optionally syncs and leaves a fixed unsynced tail, and is
killed with SIGKILL. A fresh process then times ``Queue(path)`` plus the first put (which
finds the true end of the log) and the first get. The "whole-log scan" column is what an
open would cost if it CRC-walked every record (the raw read loop over every segment).
Peers are killed the same way after a put loop and timed opening and reading one message.

    python -m benchmarks.bench_recovery --sizes 1,10,100
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Any

from benchmarks import contenders
from benchmarks.common import add_common_args, dir_bytes, median, perf_ns, scratch
from benchmarks.procs import first_line, kill9, run_json, spawn
from benchmarks.rawlog import scan_file
from benchmarks.report import write_json

MB = 1_000_000
TAIL_BYTES = 1 * MB  # the unsynced tail left behind in the "1 MB tail" series
SEGMENT_HEADER_BYTES = 32


def whole_scan_s(path: str) -> float:
    """Seconds to CRC-walk every record of every segment (what a scan-everything open costs)."""
    t0 = perf_ns()
    for seg in sorted(glob.glob(os.path.join(path, "log", "*.seg"))):
        scan_file(seg, SEGMENT_HEADER_BYTES)
    return (perf_ns() - t0) / 1e9


def pqueue_point(size_mb: int, tail: int, body: int, rounds: int) -> dict[str, float]:
    """Median over `rounds` fills of: the open after SIGKILL, a clean reopen, the whole-log scan."""
    runs = []
    for _ in range(rounds):
        with scratch("recovery") as d:
            p = spawn("fill", d, "--bytes", str(size_mb * MB), "--tail", str(tail), "--size", str(body))
            records = json.loads(first_line(p))["records"]
            kill9(p)
            log_bytes = dir_bytes(os.path.join(d, "log"))
            after_kill = run_json("open", d)
            clean = run_json("open", d)  # the previous open closed cleanly: nothing to recover
            runs.append({"log_mb": log_bytes / MB, "records": records, "tail_bytes": tail,
                         "open_put_s": after_kill["open_put_s"], "first_get_s": after_kill["first_get_s"],
                         "clean_open_put_s": clean["open_put_s"], "whole_scan_s": whole_scan_s(d)})
    return {k: median([r[k] for r in runs]) for k in runs[0]} | {"rounds": rounds}


def peer_point(name: str, n: int) -> dict[str, Any]:
    """Kill a peer's writer after `n` puts, then time a fresh open + first get."""
    with scratch("recovery-peer") as d:
        p = spawn("probe-put", d, "--name", name, "-n", str(n))
        first_line(p)
        kill9(p)
        size = dir_bytes(d)
        res = run_json("peer-open", d, "--name", name)
    return {"log_mb": size / MB, "records": n, **res}


def run_recovery(*, sizes_mb: list[int], peer_records: int, body: int = 100, rounds: int = 3,
                 peers: bool = True) -> dict[str, Any]:
    series: dict[str, list[dict[str, float]]] = {"tail 1 MB": [], "no sync since the last segment roll": []}
    for size in sizes_mb:
        reps = rounds if size <= 10 else 1  # big fills take seconds each: one repetition
        series["tail 1 MB"].append(pqueue_point(size, TAIL_BYTES, body, reps))
        series["no sync since the last segment roll"].append(pqueue_point(size, 0, body, reps))
    found = {name: peer_point(name, peer_records) for name in contenders.names(pqueue_policies=(), raw=())} \
        if peers else {}
    return {"title": f"open after SIGKILL against log size, {body} B body", "series": series, "peers": found,
            "params": {"sizes_mb": sizes_mb, "peer_records": peer_records, "rounds": rounds, "body": body,
                       "tail_bytes": TAIL_BYTES}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, messages=2000)
    parser.add_argument("--sizes", default="1,10,100", help="log sizes in MB, comma-separated")
    args = parser.parse_args()
    res = run_recovery(sizes_mb=[int(s) for s in args.sizes.split(",")], peer_records=args.messages,
                       body=args.size, rounds=args.rounds)
    from benchmarks.report import recovery_table

    print(recovery_table(res))
    write_json(res, args.json)


if __name__ == "__main__":
    main()
