"""``python -m benchmarks``: run the suite (see run.py)."""

from __future__ import annotations

from benchmarks.run import main

if __name__ == "__main__":
    main()
