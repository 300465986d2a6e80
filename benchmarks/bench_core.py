"""Issue 3's storage-core figures, each against its raw limit in the same run.

1. put, fsync="never", 1 thread, 100 B body, as a fraction of the raw framed write loop
   (goal ≥ 0.70); the raw loop with ``msgpack.packb`` and, stricter, with a reused Packer.
2. put, fsync="always", 1 thread, as a fraction of raw write + fdatasync per record (≥ 0.80).
3. put, fsync="always", 8 threads as a multiple of 1 thread (group commit; goal ≥ 4).
4. get + ack loop over a backlog, msgs/s (goal ≥ 50,000).
5. open after SIGKILL: time follows the unsynced tail, not the log size (bench_recovery).

Variants of one goal run interleaved in slices inside each round; each figure is the median
of the per-round ratios. No per-put timer runs here (it would add the same constant to both).
Also profiles the put hot path with cProfile.

    python -m benchmarks.bench_core --messages 100000 --rounds 3
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
from crc32c import crc32c

import pqueue
from benchmarks.common import add_common_args, make_item, median, perf_ns, scratch
from benchmarks.rawlog import RawGroupLog
from benchmarks.report import write_json

_BODY = struct.Struct("<IQQBBH")
_CRC = struct.Struct("<I")


def raw_put_loop(path: str, *, sync_every: int, reuse_packer: bool) -> Callable[[list[Any]], None]:
    """The raw limit as a closure: packb (or a reused Packer) + header + crc32c + os.write."""
    fd = os.open(os.path.join(path, "raw.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    pack = msgpack.Packer().pack if reuse_packer else msgpack.packb
    state = [0]

    def run(items: list[Any]) -> None:
        off = state[0]
        write, fdatasync, body_pack, crc_pack, now = os.write, os.fdatasync, _BODY.pack, _CRC.pack, time.time_ns
        for item in items:
            payload = pack(item)
            body = body_pack(len(payload), off, now(), 0, 1, 0) + payload
            write(fd, crc_pack(crc32c(body)) + body)
            off += 1
            if sync_every and not off % sync_every:
                fdatasync(fd)
        state[0] = off

    return run


def pqueue_put_loop(q: pqueue.Queue) -> Callable[[list[Any]], None]:
    def run(items: list[Any]) -> None:
        put = q.put
        for item in items:
            put(item)

    return run


def interleaved(loops: dict[str, Callable[[list[Any]], None]], items: list[Any], slices: int) -> dict[str, float]:
    """Run each loop over `items` `slices` times, alternating loops slice by slice; puts/s per loop."""
    spent = dict.fromkeys(loops, 0)
    names = list(loops)
    for s in range(slices):
        for name in names[s % len(names):] + names[:s % len(names)]:
            t0 = perf_ns()
            loops[name](items)
            spent[name] += perf_ns() - t0
    return {name: len(items) * slices / (ns / 1e9) for name, ns in spent.items()}


def goal_put_never(rounds: int, slice_n: int, slices: int) -> dict[str, Any]:
    raws = {"raw_packb": {"sync_every": 0, "reuse_packer": False},
            "raw_packer": {"sync_every": 0, "reuse_packer": True}}
    return _put_against_raw("never", raws, rounds, slice_n, slices, warmup=1000)


def goal_put_always(rounds: int, slice_n: int, slices: int) -> dict[str, Any]:
    raws = {"raw_fdatasync": {"sync_every": 1, "reuse_packer": False}}
    return _put_against_raw("always", raws, rounds, slice_n, slices, warmup=20)


def _put_against_raw(fsync: str, raws: dict[str, dict[str, Any]], rounds: int, slice_n: int, slices: int, *,
                     warmup: int) -> dict[str, Any]:
    """One thread's put under `fsync`, interleaved in slices with the raw loops `raws` (name: options)."""
    items = [make_item(i, 100) for i in range(slice_n)]
    per_round = []
    for _ in range(rounds):
        with scratch(f"core-{fsync}") as d:
            os.makedirs(os.path.join(d, "raw"))
            q = pqueue.Queue(os.path.join(d, "q"), fsync=fsync)
            loops = {"pqueue": pqueue_put_loop(q)}
            loops.update({name: raw_put_loop(os.path.join(d, "raw"), **opts) for name, opts in raws.items()})
            loops["pqueue"](items[:warmup])  # warmup: the first append recovers and opens the segment
            per_round.append(interleaved(loops, items, slices))
            q.close()
    return _ratios(per_round, "pqueue", tuple(raws))


def _threads_rate(put: Callable[[Any], Any], threads: int, seconds: float) -> tuple[float, float]:
    """puts/s of `threads` threads calling `put` in a loop, and how many puts shared each fdatasync."""
    counts = [0] * threads
    syncs = [0]
    stop = threading.Event()
    go = threading.Barrier(threads + 1)
    real_fdatasync = os.fdatasync

    def counting_fdatasync(fd: Any) -> None:
        syncs[0] += 1
        real_fdatasync(fd)

    def worker(k: int) -> None:
        item, n = make_item(k, 100), 0
        go.wait()
        while not stop.is_set():
            put(item)
            n += 1
        counts[k] = n

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    os.fdatasync = counting_fdatasync  # counts only: both logs call os.fdatasync through the module
    try:
        go.wait()
        t0 = perf_ns()
        time.sleep(seconds)
        stop.set()
        for t in ts:
            t.join()
    finally:
        os.fdatasync = real_fdatasync
    return sum(counts) / ((perf_ns() - t0) / 1e9), sum(counts) / max(1, syncs[0])


def goal_group_commit(rounds: int, seconds: float, threads: int = 8) -> dict[str, Any]:
    """pqueue's fsync="always" put from 1 and from `threads` threads, beside the raw group commit.

    The raw group commit (rawlog.RawGroupLog) is the same design with nothing else: its own
    `threads`/1 ratio, measured in the same rounds, is the design's ceiling on this machine.
    """
    per_round = []
    many = f"{threads}_threads"
    per_sync: dict[str, list[float]] = {"1_threads": [], many: [], "raw_1_threads": [], f"raw_{many}": []}
    for r in range(rounds):
        with scratch("core-group") as d:
            q = pqueue.Queue(os.path.join(d, "q"), fsync="always")
            q.put(make_item(0, 100))
            raw = RawGroupLog(os.path.join(d, "raw"))
            runs = [("", q.put, 1), ("", q.put, threads), ("raw_", raw.put, 1), ("raw_", raw.put, threads)]
            rates = {}
            for prefix, put, n in runs[r % len(runs):] + runs[:r % len(runs)]:
                name = f"{prefix}{n}_threads"
                rates[name], puts_per_sync = _threads_rate(put, n, seconds)
                per_sync[name].append(puts_per_sync)
            q.close()
            raw.close()
        per_round.append(rates)
    out = _ratios(per_round, many, ("1_threads", f"raw_{many}"))
    out["raw_ceiling_per_round"] = [r[f"raw_{many}"] / r["raw_1_threads"] for r in per_round]
    out["raw_ceiling"] = median(out["raw_ceiling_per_round"])
    out["puts_per_fdatasync"] = {k: median(v) for k, v in per_sync.items()}
    return out


def goal_get_ack(rounds: int, backlog: int) -> dict[str, Any]:
    per_round = []
    for _ in range(rounds):
        with scratch("core-get") as d:
            with pqueue.Queue(d, fsync="never") as q:
                for b in range(0, backlog, 1000):
                    q.put_many([make_item(b + i, 100) for i in range(1000)])
            q = pqueue.Queue(d)
            get, ack, n = q.get, q.ack, 0
            t0 = perf_ns()
            try:
                while True:
                    ack(get(block=False))
                    n += 1
            except pqueue.Empty:
                pass
            t1 = perf_ns()
            q.close()  # commits the last acks
            t2 = perf_ns()
        per_round.append({"get_ack": n / ((t1 - t0) / 1e9), "get_ack_incl_close": n / ((t2 - t0) / 1e9)})
    return {"rates": {k: median([r[k] for r in per_round]) for k in per_round[0]}, "rounds": per_round,
            "backlog": backlog}


def profile_put(n: int) -> dict[str, Any]:
    """cProfile of n puts (fsync never): the top functions by own time."""
    items = [make_item(i, 100) for i in range(n)]
    with scratch("core-prof") as d:
        q = pqueue.Queue(d, fsync="never")
        q.put(items[0])
        prof = cProfile.Profile()
        loop = pqueue_put_loop(q)
        prof.enable()
        loop(items)
        prof.disable()
        q.close()
    stats = pstats.Stats(prof)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for (file, line, fn), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{os.path.basename(file)}:{line}({fn})", "calls": calls, "tottime_s": tottime,
                     "cumtime_s": cumtime, "share": tottime / total if total else 0.0})
    rows.sort(key=lambda r: -r["tottime_s"])
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
    return {"puts": n, "total_s": total, "us_per_put": total / n * 1e6, "top": rows[:12], "text": buf.getvalue()}


def _ratios(per_round: list[dict[str, float]], num: str, dens: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"rates": {k: median([r[k] for r in per_round]) for k in per_round[0]},
                           "rounds": per_round}
    for den in dens:
        out[f"x_{den}"] = median([r[num] / r[den] for r in per_round])
        out[f"x_{den}_per_round"] = [r[num] / r[den] for r in per_round]
    return out


def run_core(*, messages: int, rounds: int = 3, slices: int = 5, always_n: int = 300, group_seconds: float = 1.0,
             backlog: int = 100_000, recovery_sizes: tuple[int, ...] = (1, 10, 100),
             recovery_rounds: int = 3) -> dict[str, Any]:
    from benchmarks.bench_recovery import run_recovery

    put_never = goal_put_never(rounds, messages // slices, slices)
    put_always = goal_put_always(rounds, always_n, slices)
    group = goal_group_commit(rounds, group_seconds)
    get_ack = goal_get_ack(rounds, backlog)
    recovery = run_recovery(sizes_mb=list(recovery_sizes), peer_records=0, rounds=recovery_rounds, peers=False)
    prof = profile_put(min(messages, 200_000))
    goals = [
        {"goal": "put, fsync=never, 1 thread, 100 B: ≥ 0.70× raw", "value": put_never["x_raw_packer"],
         "unit": "× raw (reused Packer)", "also": f"{put_never['x_raw_packb']:.2f}× raw (packb)",
         "pass": put_never["x_raw_packer"] >= 0.70},
        {"goal": "put, fsync=always, 1 thread: ≥ 0.80× raw write+fdatasync", "value": put_always["x_raw_fdatasync"],
         "unit": "× raw", "pass": put_always["x_raw_fdatasync"] >= 0.80},
        {"goal": "put, fsync=always, 8 threads ≥ 4× 1 thread", "value": group["x_1_threads"], "unit": "× 1 thread",
         "also": f"the raw group commit: {group['raw_ceiling']:.2f}× its own 1 thread; pqueue 8 threads "
                 f"{group['x_raw_8_threads']:.2f}× its 8 threads",
         "pass": group["x_1_threads"] >= 4.0},
        {"goal": "get + ack loop ≥ 50,000 msgs/s", "value": get_ack["rates"]["get_ack"], "unit": "msgs/s",
         "also": f"{get_ack['rates']['get_ack_incl_close']:,.0f} msgs/s counting the final ack commit",
         "pass": get_ack["rates"]["get_ack"] >= 50_000},
    ]
    return {"title": "storage core (issue 3)", "goals": goals, "put_never": put_never, "put_always": put_always,
            "group_commit": group, "get_ack": get_ack, "recovery": recovery, "profile": prof,
            "params": {"messages": messages, "rounds": rounds, "slices": slices, "always_n": always_n,
                       "group_seconds": group_seconds, "backlog": backlog}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, messages=100_000, fsync="always", producers=8)
    parser.add_argument("--recovery-sizes", default="1,10,100", help="log sizes in MB")
    args = parser.parse_args()
    res = run_core(messages=args.messages, rounds=args.rounds, backlog=args.messages,
                   recovery_sizes=tuple(int(s) for s in args.recovery_sizes.split(",")))
    from benchmarks.report import core_text

    print(core_text(res))
    write_json(res, args.json)


if __name__ == "__main__":
    main()
