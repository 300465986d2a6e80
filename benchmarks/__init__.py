"""The pqueue benchmark suite: pqueue beside its peers and the raw framed-write limit.

Run ``python -m benchmarks --quick`` (or ``python benchmarks/run.py``); see benchmarks/README.md.
"""
