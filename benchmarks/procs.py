"""Starting, reading and SIGKILLing the child processes of child.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

from benchmarks.common import REPO

CHILD_TIMEOUT_SECONDS = 600  # a fill of 1 GB takes well under this


def spawn(*args: str, prefix: list[str] | None = None) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen([*(prefix or []), sys.executable, "-m", "benchmarks.child", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)


def first_line(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    return p.stdout.readline().strip()


def kill9(p: subprocess.Popen[str]) -> None:
    """SIGKILL, as a crash or the OOM killer would: no cleanup of any kind runs."""
    os.kill(p.pid, signal.SIGKILL)
    p.wait()


def run_json(*args: str) -> dict[str, Any]:
    """Run a child to completion and return the JSON object it printed."""
    p = spawn(*args)
    line = first_line(p)
    p.wait(CHILD_TIMEOUT_SECONDS)
    return json.loads(line) if line.startswith("{") else {"error": line or f"exit {p.returncode}"}
