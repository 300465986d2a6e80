"""Markdown tables and matplotlib plots from a results dict (the JSON that run.py writes)."""

from __future__ import annotations

import json
import math
from typing import Any

KIND_ORDER = {"pqueue": 0, "raw": 1, "peer": 2}


def _num(x: float, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def _us(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x >= 10_000:
        return f"{x / 1000:,.0f} ms"
    if x >= 1000:
        return f"{x / 1000:.1f} ms"
    return f"{x:.0f} µs" if x >= 10 else f"{x:.1f} µs"


def _ratio(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}×"


def throughput_table(res: dict[str, Any]) -> str:
    """The standard table: rates, latency percentiles, ratios to the matching raw loop and best peer."""
    rows = sorted(res["rows"].items(), key=lambda kv: (KIND_ORDER.get(kv[1]["kind"], 3), -kv[1]["msgs_s"]))
    lines = [f"**{res['title']}** — medians of {res['params'].get('rounds', '?')} interleaved rounds",
             "",
             "| contender | msgs/s | MB/s | p50 | p90 | p99 | max | × raw (same fsync) | × best peer |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        raw = "1.00× (limit)" if r["kind"] == "raw" else f"{_ratio(r['x_raw'])} {r['raw_match'][4:-1]}"
        lines.append(f"| {name} | {_num(r['msgs_s'])} | {_num(r['mb_s'], 1)} | {_us(r['p50_us'])} | "
                     f"{_us(r['p90_us'])} | {_us(r['p99_us'])} | {_us(r['max_us'])} | {raw} | "
                     f"{_ratio(r['x_best_peer'])} |")
    return "\n".join(lines)


def latency_table(res: dict[str, Any]) -> str:
    """Latency percentiles; ratios are of the p50 latency (lower is better)."""
    rows = sorted(res["rows"].items(), key=lambda kv: (KIND_ORDER.get(kv[1]["kind"], 3), kv[1]["p50_us"]))
    lines = [f"**{res['title']}** — medians of {res['params'].get('rounds', '?')} interleaved rounds",
             "",
             "| contender | p50 | p90 | p99 | p99.9 | max | p50 × raw | p50 × best peer |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        raw = "1.00× (limit)" if r["kind"] == "raw" else _ratio(r["x_raw"])
        lines.append(f"| {name} | {_us(r['p50_us'])} | {_us(r['p90_us'])} | {_us(r['p99_us'])} | "
                     f"{_us(r['p999_us'])} | {_us(r['max_us'])} | {raw} | {_ratio(r['x_best_peer'])} |")
    return "\n".join(lines)


def print_table(res: dict[str, Any]) -> None:
    print(latency_table(res) if res.get("key", "msgs_s").endswith("_us") else throughput_table(res))
    print()


def emit(res: dict[str, Any], json_path: str | None) -> None:
    """What a scenario module run on its own prints, and the JSON it writes with --json."""
    print_table(res)
    write_json(res, json_path)


def write_json(res: dict[str, Any], json_path: str | None) -> None:
    """Write a scenario module's result to its --json path, if it was given one."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)


def recovery_table(res: dict[str, Any]) -> str:
    if not any(res["series"].values()):
        return peer_recovery_table(res)
    lines = [f"**{res['title']}** — open = `Queue(path)` + the first put, which finds the true end of the log "
             f"(medians of {res['params']['rounds']} fills up to 10 MB, one fill above)",
             "",
             "| pqueue log | records | unsynced at the kill | open after SIGKILL | first get | clean reopen | "
             "whole-log CRC scan | open ÷ scan |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for label, points in res["series"].items():
        for p in points:
            lines.append(f"| {p['log_mb']:,.0f} MB | {p['records']:,.0f} | {label} | {p['open_put_s'] * 1e3:,.1f} ms | "
                         f"{p['first_get_s'] * 1e3:,.1f} ms | {p['clean_open_put_s'] * 1e3:,.1f} ms | "
                         f"{p['whole_scan_s'] * 1e3:,.0f} ms | {p['open_put_s'] / p['whole_scan_s']:.2f} |")
    if res.get("peers"):
        lines += ["", peer_recovery_table(res)]
    return "\n".join(lines)


def peer_recovery_table(res: dict[str, Any]) -> str:
    lines = ["**Peers: open after SIGKILL** (the writer was killed after its puts; one fresh process opens and "
             "takes a message)", "", "| peer | on disk | records | open | first get |", "|---|---:|---:|---:|---:|"]
    for name, p in res["peers"].items():
        if "error" in p:
            lines.append(f"| {name} | – | – | failed: {p['error']} | – |")
            continue
        lines.append(f"| {name} | {p['log_mb']:.1f} MB | {p['records']:,} | {p['open_s'] * 1e3:,.1f} ms | "
                     f"{p['first_get_s'] * 1e3:,.1f} ms |")
    return "\n".join(lines)


def _puts_per_sync(group: dict[str, Any]) -> str:
    per_sync = group.get("puts_per_fdatasync")  # absent from runs before it was measured
    if not per_sync:
        return ""
    return f" ({per_sync['8_threads']:.2f} puts per fdatasync with 8 threads, {per_sync['1_threads']:.2f} with one)"


def core_text(res: dict[str, Any]) -> str:
    """Issue 3's goals: one line each with the paired ratio, then the detail and the profile."""
    lines = ["**Storage core (issue 3)** — 100 B body, medians of per-round ratios "
             f"({res['params']['rounds']} rounds, variants interleaved in slices)", "",
             "| goal | measured | per-round | verdict |", "|---|---:|---|---|"]
    per_round = [res["put_never"]["x_raw_packer_per_round"], res["put_always"]["x_raw_fdatasync_per_round"],
                 res["group_commit"]["x_1_threads_per_round"], [r["get_ack"] for r in res["get_ack"]["rounds"]]]
    for g, rounds in zip(res["goals"], per_round, strict=True):
        value = f"{g['value']:,.0f} {g['unit']}" if g["unit"] == "msgs/s" else f"{g['value']:.2f}{g['unit']}"
        also = f" ({g['also']})" if g.get("also") else ""
        fmt = "{:,.0f}" if g["unit"] == "msgs/s" else "{:.2f}"
        lines.append(f"| {g['goal']} | {value}{also} | {', '.join(fmt.format(x) for x in rounds)} | "
                     f"{'met' if g['pass'] else '**not met**'} |")
    r = res["put_never"]["rates"]
    a = res["put_always"]["rates"]
    gc = res["group_commit"]["rates"]
    raw_group = (f" (raw group commit: 1 thread {gc['raw_1_threads']:,.0f}/s, 8 threads {gc['raw_8_threads']:,.0f}/s)"
                 if "raw_8_threads" in gc else "")  # absent from runs before it was measured
    lines += ["", f"Rates (medians): put never {r['pqueue']:,.0f}/s, raw packb {r['raw_packb']:,.0f}/s, raw Packer "
                  f"{r['raw_packer']:,.0f}/s; put always {a['pqueue']:,.0f}/s, raw write+fdatasync "
                  f"{a['raw_fdatasync']:,.0f}/s; always 1 thread {gc['1_threads']:,.0f}/s, 8 threads "
                  f"{gc['8_threads']:,.0f}/s{_puts_per_sync(res['group_commit'])}{raw_group}.", "",
              recovery_table(res["recovery"]), "",
              f"cProfile of {res['profile']['puts']:,} puts (fsync never): {res['profile']['us_per_put']:.2f} µs "
              "per put under the profiler", "", "| function | calls | own time | share |", "|---|---:|---:|---:|"]
    for row in res["profile"]["top"][:8]:
        lines.append(f"| `{row['function']}` | {row['calls']:,} | {row['tottime_s']:.3f} s | {row['share']:.0%} |")
    return "\n".join(lines)


def durability_table(res: dict[str, Any]) -> str:
    lines = [f"**{res['title']}** — {res['params']['puts']} puts per probe; syncs counted with "
             f"{res['params'].get('strace') or 'no strace'}", "",
             "| contender | survives kill -9 | survives power loss (syncs per put) "
             "| at-least-once (unacked get after kill -9) |",
             "|---|---|---|---|"]
    for name, r in res["rows"].items():
        k, f, a = r["kill9"], r["fsync"], r["at_least_once"]
        kill = f"{'yes' if k['ok'] else '**no**'} ({k['found']}/{k['put']})"
        sync = f.get("error") or f"{f['verdict']} ({f['per_put']:.2f})"
        lines.append(f"| {name} | {kill} | {sync} | {a['verdict']} |")
    return "\n".join(lines)


def footprint_table(res: dict[str, Any]) -> str:
    backlogs = res["params"]["backlogs"]
    head = " | ".join(f"RSS @ {b:,}" for b in backlogs) + " | " + " | ".join(f"disk B/msg @ {b:,}" for b in backlogs)
    lines = [f"**{res['title']}** — RSS growth of a fresh process from before the open to after opening and "
             "taking one message; disk = allocated blocks ÷ messages (* = the fill stopped at its time budget: "
             "the count reached is shown)", "",
             f"| contender | {head} |", "|---|" + "---:|" * (2 * len(backlogs))]
    for name, points in res["rows"].items():
        rss = [f"{p['rss_delta_kib'] / 1024:.1f} MiB" + ("" if p["complete"] else f" *{p['backlog']:,}")
               for p in points]
        disk = [f"{p['disk_bytes_per_msg']:,.0f}" + ("" if p["complete"] else " *") for p in points]
        lines.append(f"| {name} | {' | '.join(rss)} | {' | '.join(disk)} |")
    return "\n".join(lines)


def section(name: str, res: dict[str, Any]) -> str:
    """The Markdown of one scenario's result."""
    if name == "core":
        return core_text(res)
    if name == "durability":
        return durability_table(res)
    if name.startswith("recovery"):
        return recovery_table(res)
    if name == "footprint":
        return footprint_table(res)
    if name == "pool":
        return pool_table(res)
    if res.get("key", "msgs_s").endswith("_us"):
        return latency_table(res)
    return throughput_table(res)


def pool_table(res: dict[str, Any]) -> str:
    d, lat = res["rows"]["drain"], res["rows"]["latency"]
    return (f"**{res['title']}** — medians of {res['params']['rounds']} rounds\n\n"
            "| measure | msgs/s | p50 | p90 | p99 | p99.9 | max |\n|---|---:|---:|---:|---:|---:|---:|\n"
            f"| drain a backlog of {res['params']['messages']:,} | {_num(d['msgs_s'])} | – | – | – | – | – |\n"
            f"| put-to-handler latency (paced producer) | – | {_us(lat['p50_us'])} | {_us(lat['p90_us'])} | "
            f"{_us(lat['p99_us'])} | {_us(lat['p999_us'])} | {_us(lat['max_us'])} |")


def machine_text(m: dict[str, Any]) -> str:
    v = ", ".join(f"{k} {val}" for k, val in m["versions"].items())
    dirty = " plus uncommitted changes in pqueue/" if m.get("pqueue_dirty") else ""
    return (f"{m['cpus']} × {m['cpu']}, {m['memory_gib']} GiB RAM; disk {m['disk']}; filesystem `{m['filesystem']}`; "
            f"Linux {m['kernel']}; Python {m['python']}; {v}; pqueue at commit {m['pqueue_commit']}{dirty}; "
            f"load average {m['loadavg'][0]:.2f} at the start, {m.get('loadavg_end', [0])[0]:.2f} at the end.")


def markdown(results: dict[str, Any], plots: list[str]) -> str:
    import os

    lines = [f"# pqueue benchmarks ({results['mode']} run)", "", machine_text(results["machine"]), "",
             "Method: contenders run interleaved in each round (order rotating), each figure is the median of "
             f"{results['params']['rounds']} rounds, and every ratio is the median of per-round ratios between "
             "two contenders of the same round (this machine is shared; absolute rates move ±30 %). "
             "Latencies come from `time.perf_counter_ns()` around each call; warmup is discarded.", ""]
    for p in plots:
        lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})", ""]
    for name, res in results["scenarios"].items():
        lines += [f"## {name} ({results['seconds'].get(name, '?')} s)", "", section(name, res), ""]
    lines.append(f"Total: {results['seconds'].get('total', '?')} s.")
    return "\n".join(lines) + "\n"


def plots(results: dict[str, Any], stem: str) -> list[str]:
    """PNG plots next to the JSON; returns their paths (none if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("WARNING: matplotlib is not installed; no plots (pip install -e '.[bench]')")
        return []
    out = []
    sc = results["scenarios"]
    for suffix, fn in (("throughput", _plot_throughput), ("fsync", _plot_fsync), ("latency", _plot_latency),
                       ("recovery", _plot_recovery), ("payload", _plot_payload)):
        fig = fn(plt, sc)
        if fig is not None:
            path = f"{stem}-{suffix}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            out.append(path)
    return out


COLORS = {"pqueue": "tab:blue", "raw": "tab:gray", "peer": "tab:orange"}


def _plot_throughput(plt: Any, sc: dict[str, Any]) -> Any:
    keys = [k for k in ("put_1thread", "put_4threads", "put_2processes", "put_many_100", "get_ack") if k in sc]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4.8), sharey=False)
    axes = axes if len(keys) > 1 else [axes]
    for ax, key in zip(axes, keys, strict=True):
        rows = sorted(sc[key]["rows"].items(), key=lambda kv: kv[1]["msgs_s"])
        ax.barh([n for n, _ in rows], [r["msgs_s"] for _, r in rows], color=[COLORS[r["kind"]] for _, r in rows])
        ax.set_xscale("log")
        ax.set_title(key.replace("_", " "), fontsize=10)
        ax.set_xlabel("msgs/s (log)")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle("Throughput, 100 B body (blue: pqueue, grey: raw limit, orange: peers)")
    fig.tight_layout()
    return fig


def _plot_fsync(plt: Any, sc: dict[str, Any]) -> Any:
    if "fsync_sweep" not in sc:
        return None
    rows = sc["fsync_sweep"]["rows"]
    finite = [r["loss_ms"] for r in rows.values() if 0 < r["loss_ms"] < float("inf")]
    lo, hi = (min(finite) / 10, max(finite) * 10) if finite else (0.001, 1000)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for kind, marker in (("pqueue", "o"), ("raw", "s")):
        pts = sorted((lo if r["loss_ms"] == 0 else hi if r["loss_ms"] == float("inf") else r["loss_ms"],
                      r["msgs_s"], n) for n, r in rows.items() if r["kind"] == kind)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=COLORS[kind], label=kind)
        for x, y, n in pts:
            ax.annotate(n[n.index("[") + 1:-1], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("loss window on power cut, ms at the measured rate (left edge: always = 0; right edge: never)")
    ax.set_ylabel("put msgs/s, 1 thread (log)")
    ax.set_title("fsync policy: throughput against what a power cut can take")
    ax.legend()
    return fig


def _plot_latency(plt: Any, sc: dict[str, Any]) -> Any:
    key = "latency_process" if "latency_process" in sc else "latency_thread" if "latency_thread" in sc else None
    if key is None:
        return None
    rows = sorted(sc[key]["rows"].items(), key=lambda kv: kv[1]["p50_us"])
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ys = range(len(rows))
    for q, off, color in (("p50_us", -0.25, "tab:green"), ("p99_us", 0, "tab:orange"), ("p999_us", 0.25, "tab:red")):
        ax.barh([y + off for y in ys], [r[q] / 1000 for _, r in rows], height=0.25, color=color, label=q[:-3])
    ax.set_yticks(list(ys), [n for n, _ in rows], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("put-to-consumer latency, ms (log)")
    ax.set_title(sc[key]["title"], fontsize=9)
    ax.legend()
    return fig


def _plot_recovery(plt: Any, sc: dict[str, Any]) -> Any:
    if "core" not in sc:
        return None
    series = sc["core"]["recovery"]["series"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in series.items():
        ax.plot([p["log_mb"] for p in pts], [p["open_put_s"] * 1e3 for p in pts], marker="o",
                label=f"open after SIGKILL, {label}")
    pts = next(iter(series.values()), [])
    ax.plot([p["log_mb"] for p in pts], [p["whole_scan_s"] * 1e3 for p in pts], linestyle="--", color="gray",
            label="whole-log CRC scan (raw read loop)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("log size, MB (log)")
    ax.set_ylabel("ms (log)")
    ax.set_title("Open after SIGKILL against log size (100 B records)")
    ax.legend(fontsize=8)
    return fig


def _plot_payload(plt: Any, sc: dict[str, Any]) -> Any:
    keys = [("put_1thread", 100), ("put_1KiB", 1024), ("put_16KiB", 16384)]
    keys = [(k, s) for k, s in keys if k in sc]
    if len(keys) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in sc[keys[0][0]]["rows"]:
        pts = [(s, sc[k]["rows"][name]["mb_s"]) for k, s in keys if name in sc[k]["rows"]]
        kind = sc[keys[0][0]]["rows"][name]["kind"]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=COLORS[kind], alpha=0.8)
        ax.annotate(name, pts[-1], fontsize=6, xytext=(3, 0), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("payload body, bytes (log)")
    ax.set_ylabel("put MB/s, 1 thread (log)")
    ax.set_title("Put bandwidth against payload size")
    return fig
