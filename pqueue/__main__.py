"""`python -m pqueue`: the pqueue command line."""

from __future__ import annotations

from pqueue.cli import main

raise SystemExit(main())
