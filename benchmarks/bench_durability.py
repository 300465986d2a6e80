"""The durability column, found by test for every contender (not by reading its docs).

* survives kill -9: a child puts 100 messages, says so, and is SIGKILLed; a fresh process
  counts what it can take.
* fsync on the path: the same child under ``strace -f`` tracing fsync, fdatasync, msync,
  sync_file_range, syncfs and sync; (calls with 101 puts − calls with 1 put) / 100 is the
  syncs per put. ≥ 1 means a returned put survives power loss. Then the child lingers 0.3 s
  (after an ``uname`` call that marks the end of its puts): a sync there is a timer-driven
  window. Neither: the OS decides. The child kills itself at the end, so nothing a clean
  close would sync is counted. Only syncs of files that hold records count (strace -y names
  them): directory fsyncs and pqueue's LMDB index (consumer state) are left out.
* at-least-once: one message is put and closed cleanly; a child takes it without acking and
  is SIGKILLed; does a fresh handle get it again?

    python -m benchmarks.bench_durability
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks import contenders
from benchmarks.common import REPO, scratch
from benchmarks.procs import first_line, kill9, run_json, spawn
from benchmarks.report import write_json

SYNC_CALLS = "fsync,fdatasync,msync,sync_file_range,syncfs,sync"
PUTS = 100


def survives_kill(name: str) -> dict[str, Any]:
    with scratch("dur-kill") as d:
        p = spawn("probe-put", d, "--name", name, "-n", str(PUTS))
        first_line(p)
        kill9(p)
        n = run_json("count", d, "--name", name).get("count", 0)
    return {"put": PUTS, "found": n, "ok": n == PUTS}


def _sync_calls(name: str, n: int) -> tuple[int, int]:
    """(sync calls up to the end of n puts, sync calls in the 0.3 s after them)."""
    with scratch("dur-strace") as d:
        out = os.path.join(d, "strace.txt")
        p = spawn("probe-put", os.path.join(d, "q"), "--name", name, "-n", str(n), "--linger", "0.3", "--selfkill",
                  prefix=["strace", "-f", "-qq", "-y", "-e", f"trace={SYNC_CALLS},uname", "-o", out])
        first_line(p)
        p.wait()
        with open(out) as f:
            found = re.findall(r"\b(\w+)\((?:\d+<([^>]*)>)?", f.read())
        calls = [c for c, path in found if c == "uname" or (
            c in SYNC_CALLS.split(",") and not os.path.isdir(path) and f"{os.sep}index{os.sep}" not in path)]
    marker = len(calls) - 1 - calls[::-1].index("uname") if "uname" in calls else len(calls)
    before = sum(1 for c in calls[:marker] if c != "uname")
    return before, sum(1 for c in calls[marker:] if c != "uname")


def syncs_per_put(name: str) -> dict[str, Any]:
    if shutil.which("strace") is None:
        return {"error": "strace not installed (apt-get install strace)"}
    (base, _), (many, after) = _sync_calls(name, 1), _sync_calls(name, PUTS + 1)
    per = (many - base) / PUTS
    if per >= 1:
        verdict = "yes: fsync per put"
    elif per > 0:
        verdict = f"window: 1 sync per {1 / per:.0f} puts"
    elif after:
        verdict = "window: synced by a timer within 0.3 s"
    else:
        verdict = "no: no sync while putting or 0.3 s after"
    return {"syncs_1_put": base, f"syncs_{PUTS + 1}_puts": many, "syncs_after": after, "per_put": per,
            "verdict": verdict, "ok": per >= 1}


def redelivers(name: str) -> dict[str, Any]:
    c = contenders.make(name)
    if c.kind == "raw":
        return {"verdict": "n/a: no consumer state", "ok": None}
    with scratch("dur-ack") as d:
        c.open(d)
        c.put({"id": 1, "body": "x"})
        c.close()
        p = spawn("probe-get", d, "--name", name)
        said = first_line(p)
        kill9(p)
        n = run_json("count", d, "--name", name).get("count", 0)
    ok = said == "got" and n >= 1
    return {"took": said, "after_kill": n, "ok": ok,
            "verdict": "yes: redelivered" if ok else "no: lost with the consumer"}


def _probe(name: str) -> dict[str, Any]:
    return {"kill9": survives_kill(name), "fsync": syncs_per_put(name), "at_least_once": redelivers(name)}


def run_durability(names: list[str], workers: int = 3) -> dict[str, Any]:
    """Probe every contender; probes are mostly process start-up, so a few run at once."""
    with ThreadPoolExecutor(workers) as pool:
        rows = dict(zip(names, pool.map(_probe, names), strict=True))
    strace = subprocess.run(["strace", "-V"], capture_output=True, text=True).stdout.split("\n")[0] \
        if shutil.which("strace") else None
    return {"title": "durability, found by test", "rows": rows, "params": {"puts": PUTS, "strace": strace,
                                                                           "repo": REPO}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    args = parser.parse_args()
    res = run_durability(contenders.names(raw=("never", "always")))
    from benchmarks.report import durability_table

    print(durability_table(res))
    write_json(res, args.json)


if __name__ == "__main__":
    main()
