"""Fuzzing: arbitrary bytes as segment files and as index values.

Whatever the bytes, opening the queue, reading it (get), dumping it (inspect.records) and
verifying it (inspect.verify) raise nothing but a `QueueError` (Empty included), finish within
a deadline, never deliver a payload that was not written, and never allocate more than a
small multiple of the file size (plus the fixed read buffers).
"""

from __future__ import annotations

import itertools
import shutil
import signal
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import pqueue
import pqueue.inspect

HANG_SECONDS = 5.0
# Fixed buffers: 256 KiB read chunks, a 4 MiB resync window; anything past this scales with a
# length field instead of the file.
BUFFER_BYTES = 6 << 20
FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PAYLOADS = [{"i": i, "pad": "p" * (i * 7 % 50)} for i in range(40)]


class _Hang(BaseException):
    """Raised by SIGALRM: a BaseException, so no `except Exception` in pqueue can swallow it."""


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    def on_alarm(signum: int, frame: Any) -> None:
        raise _Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A queue with records in two segments, some consumed, leased, acked and dead-lettered."""
    path = tmp_path_factory.mktemp("fuzz") / "q"
    with pqueue.Queue(path, fsync="never", segment_bytes=4096) as q:
        for p in PAYLOADS:
            q.put(p)
        for _ in range(5):
            q.ack(q.get(timeout=1))
        q.get(timeout=1)  # leased, handed back at close
        c = q.consumer("other")
        c.ack(c.get(timeout=1))
        q.flush()
    return path


_cases = itertools.count()


def _copy(template: Path, tmp_path: Path) -> Path:
    # A new path per example: pqueue shares one LMDB environment per path per process, so a
    # reused path could meet an environment left open by an earlier example's failed open.
    target = tmp_path / f"case{next(_cases)}"
    shutil.copytree(template, target)
    return target


def _exercise(path: Path, size_hint: int) -> None:
    """Open, drain, dump and verify `path`; only QueueErrors, no hang, bounded allocation."""
    tracemalloc.start()
    try:
        with _deadline(HANG_SECONDS):
            try:
                with pqueue.Queue(path, fsync="never", segment_bytes=4096) as q:
                    for _ in range(len(PAYLOADS) + 5):
                        try:
                            m = q.get(timeout=0.01)
                        except pqueue.Empty:
                            break
                        # A delivered payload is always one that was written: CRC32C checked.
                        assert m.data in PAYLOADS, f"garbage delivered as data: {m.data!r}"
                        q.ack(m)
                    q.qsize()
            except pqueue.QueueError:
                pass
            try:
                for item in pqueue.inspect.records(path):
                    if isinstance(item, pqueue.inspect.Entry):
                        try:
                            assert item.decode() in PAYLOADS, f"garbage dumped as data: {item!r}"
                        except pqueue.QueueError:
                            pass
            except pqueue.QueueError:
                pass
            try:
                pqueue.inspect.verify(path)
                pqueue.inspect.stat(path)
            except pqueue.QueueError:
                pass
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * size_hint + BUFFER_BYTES, f"peak allocation {peak} for {size_hint} bytes of input"


def _segments(path: Path) -> list[Path]:
    return sorted((path / "log").glob("*.seg"))


@FUZZ
@given(data=st.binary(max_size=3000), which=st.integers(0, 1))
def test_garbage_segment(template: Path, tmp_path: Path, data: bytes, which: int) -> None:
    """A segment file (right name) holding arbitrary bytes."""
    path = _copy(template, tmp_path)
    seg = _segments(path)[which % len(_segments(path))]
    seg.write_bytes(data)
    _exercise(path, len(data))


@FUZZ
@given(cut=st.floats(0, 1), garbage=st.binary(max_size=2000), which=st.integers(0, 1))
def test_valid_prefix_then_garbage(template: Path, tmp_path: Path, cut: float, garbage: bytes, which: int) -> None:
    """A real segment cut anywhere and followed by arbitrary bytes."""
    path = _copy(template, tmp_path)
    seg = _segments(path)[which % len(_segments(path))]
    real = seg.read_bytes()
    seg.write_bytes(real[: int(len(real) * cut)] + garbage)
    _exercise(path, len(real) + len(garbage))


@FUZZ
@given(edits=st.lists(st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=40)), min_size=1, max_size=6),
       which=st.integers(0, 1))
def test_overwritten_spans(template: Path, tmp_path: Path, edits: list[tuple[float, bytes]], which: int) -> None:
    """A real segment with arbitrary bytes written over a few spans (lengths, offsets, CRCs, payloads)."""
    path = _copy(template, tmp_path)
    seg = _segments(path)[which % len(_segments(path))]
    buf = bytearray(seg.read_bytes())
    for where, data in edits:
        at = int(where * len(buf))
        buf[at : at + len(data)] = data
    seg.write_bytes(bytes(buf))
    _exercise(path, len(buf))


def _index_items(path: Path) -> list[tuple[bytes, bytes]]:
    """(database name, key) of every entry in every named database of the index."""
    env = lmdb.open(str(path / "index"), max_dbs=16, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            names = [bytes(k) for k, _ in txn.cursor()]
        items = []
        for name in names:
            db = env.open_db(name, create=False)
            with env.begin(db=db) as txn:
                items += [(name, bytes(k)) for k, _ in txn.cursor()]
        return items
    finally:
        env.close()


@settings(FUZZ, phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: bounded time
@given(choice=st.data())
def test_garbage_index_values(template: Path, tmp_path: Path, choice: st.DataObject) -> None:
    """Arbitrary bytes as the values of existing index keys (offsets, leases, acks, meta)."""
    path = _copy(template, tmp_path)
    items = _index_items(path)
    picks = choice.draw(st.lists(st.sampled_from(items), min_size=1, max_size=3, unique=True))
    env = lmdb.open(str(path / "index"), max_dbs=16)
    try:
        for name, key in picks:
            value = choice.draw(st.binary(max_size=64))
            db = env.open_db(name)
            with env.begin(write=True, db=db) as txn:
                txn.put(key, value)
    finally:
        env.close()
    _exercise(path, 64 * 3)
