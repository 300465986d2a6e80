"""Shared fixtures: a fresh queue per test, under every fsync mode where it matters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import pqueue

FSYNC_MODES = ["always", "interval", "never"]


@pytest.fixture
def qpath(tmp_path: Path) -> Path:
    """Where a test's queue lives (not created yet)."""
    return tmp_path / "q"


@pytest.fixture(params=FSYNC_MODES)
def fsync(request: pytest.FixtureRequest) -> str:
    """Each fsync policy in turn."""
    mode: str = request.param
    return mode


@pytest.fixture
def q(qpath: Path, fsync: str) -> Iterator[pqueue.Queue]:
    """A new queue in every fsync mode, closed after the test."""
    queue = pqueue.Queue(qpath, fsync=fsync)
    yield queue
    queue.close()
