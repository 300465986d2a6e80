"""What the numbers were measured on: CPU, memory, disk, filesystem, kernel, Python, versions, load."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from typing import Any

from benchmarks.common import REPO, SCRATCH
from benchmarks.contenders import versions


def _first(path: str, key: str) -> str:
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return "?"


def _run(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def describe() -> dict[str, Any]:
    os.makedirs(SCRATCH, exist_ok=True)
    mount = _run("findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "--target", SCRATCH)
    dev = os.path.basename(mount.split()[0]) if mount not in ("", "?") else "?"
    block = f"/sys/block/{dev}/queue"
    read = lambda p: open(p).read().strip() if os.path.exists(p) else "?"  # noqa: E731
    return {
        "host": platform.node(),
        "cpu": _first("/proc/cpuinfo", "model name"),
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "disk": f"{dev} (rotational={read(block + '/rotational')}, write_cache={read(block + '/write_cache')})",
        "filesystem": mount,
        "scratch": SCRATCH,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions(),
        # An exported tree (benchmarks/README.md, "stable runs") is not a git checkout: it names its source.
        "pqueue_commit": os.environ.get("BENCH_PQUEUE_COMMIT") or _run("git", "-C", REPO, "rev-parse", "--short",
                                                                        "HEAD"),
        "pqueue_dirty": bool(os.environ.get("BENCH_PQUEUE_DIRTY")) or bool(
            _run("git", "-C", REPO, "status", "--porcelain", "--", "pqueue")),
        "loadavg": os.getloadavg(),
    }
