"""Rounds of interleaved contenders, and the table of medians and paired ratios they make."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import contenders
from benchmarks.common import aggregate, median, rounds_order, scratch

Measure = Callable[[contenders.Contender, str], "dict[str, float] | None"]


def run_rounds(names: Sequence[str], measure: Measure, *, rounds: int, prefix: str,
               threads: int = 1, raw_for: str | None = None, key: str = "msgs_s") -> dict[str, Any]:
    """Run `measure(contender, fresh_dir)` for every contender, interleaved, `rounds` times.

    `measure` discards its own warmup; it returns None to skip a contender (with a reason
    printed). `raw_for` names one raw loop every contender is compared with (default: the
    raw loop with the contender's own fsync behaviour). Returns {"rows": per-contender
    medians and ratios, "rounds": the raw rounds}.
    """
    kept: list[dict[str, dict[str, float]]] = []
    for r in range(rounds):
        row: dict[str, dict[str, float]] = {}
        for name in rounds_order(names, r):
            c = contenders.make(name, threads=threads)
            with scratch(prefix) as d:
                res = measure(c, d)
            if res is not None:
                row[name] = res
        kept.append(row)
    return {"rows": table(kept, raw_for=raw_for, key=key), "rounds": kept, "key": key}


def table(kept: list[dict[str, dict[str, float]]], *, key: str = "msgs_s",
          raw_for: str | None = None) -> dict[str, dict[str, float]]:
    """Medians per contender plus `x_raw` (vs its matching raw loop) and `x_best_peer`, both paired per round.

    Ratios are of `key`; for a latency key ("*_us") the best peer is the lowest.
    """
    best = min if key.endswith("_us") else max
    rows = aggregate(kept)
    kinds = {name: contenders.make(name) for name in rows}
    for name, row in rows.items():
        c = kinds[name]
        match = raw_for or c.raw_match
        ratios_raw, ratios_peer = [], []
        for rnd in kept:
            mine = rnd.get(name, {}).get(key)
            raw = rnd.get(match, {}).get(key)
            peers = [v[key] for n, v in rnd.items() if kinds[n].kind == "peer" and v.get(key)]
            if mine and raw:
                ratios_raw.append(mine / raw)
            if mine and peers:
                ratios_peer.append(mine / best(peers))
        row["x_raw"] = median(ratios_raw)
        row["x_best_peer"] = median(ratios_peer)
        row["raw_match"] = match  # type: ignore[assignment]
        row["kind"] = c.kind  # type: ignore[assignment]
    return rows
