"""demo.py: README command one runs end to end, kill -9 included, and loses nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_runs_and_reports_zero_lost(tmp_path: Path) -> None:
    """`python -m pqueue demo DIR` exits 0 and its summary says 0 lost, 1 dead-lettered."""
    out = subprocess.run([sys.executable, "-m", "pqueue", "demo", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = {line.split()[0]: line.split()[1] for line in out.stdout.splitlines()
             if line.startswith("  ") and len(line.split()) > 1 and line.split()[1].isdigit()}
    assert lines["lost"] == "0" and lines["dead-lettered"] == "1" and lines["processed"] == "2999"
    assert "SIGKILLed the worker" in out.stdout
