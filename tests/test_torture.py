"""The crash torture (tools/torture.py) for 60 seconds: producers and consumers SIGKILLed at
random every 50-500 ms across fsync modes, then the checker (no returned put lost, everything
handled at least once, nothing redelivered after a durable ack, nothing corrupt delivered).

Release checks run the same tool longer: ``python tools/torture.py --duration 600``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "torture.py"


@pytest.mark.slow
def test_torture_60_seconds(tmp_path: Path) -> None:
    """60 s of random SIGKILLs leave no lost, corrupt or wrongly redelivered message."""
    r = subprocess.run([sys.executable, str(TOOL), "--duration", "60", "--seed", "20261123", "--dir",
                        str(tmp_path / "torture")], capture_output=True, text=True, timeout=280)
    lines = [line for line in r.stdout.splitlines() if line.startswith("TORTURE ")]
    assert lines, f"no summary; exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    summary = json.loads(lines[-1][len("TORTURE "):])
    # The figures, for -s and the CI log (the full problem list is in the JSON line).
    print("\n".join(line for line in r.stdout.splitlines() if line.startswith(("torture:", "kills "))))
    problems = summary["problems"][:8]
    assert summary["kills"] > 50, summary
    assert summary["messages"] > 1000, summary
    assert summary["offsets_reused"] == 0, problems
    assert summary["lost"] == 0, problems
    assert summary["corrupt"] == 0, problems
    assert summary["redelivered_after_durable_ack"] == 0, problems
    assert summary["unhandled"] == 0, problems
    assert summary["worker_errors"] == 0, problems
    assert summary["verify_ok"], problems
    assert summary["ok"] and r.returncode == 0, problems
