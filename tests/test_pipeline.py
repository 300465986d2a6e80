"""Task results and durable pipelines (pool results=True and output=)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

import pqueue
from pqueue import inspect

ROOT = Path(__file__).resolve().parent.parent


def read_all(path: Path) -> list[Any]:
    """Every record of a queue, decoded from the log (no consumer group involved)."""
    return [msgpack.unpackb(r.payload) for r in inspect.records(str(path)) if isinstance(r, inspect.Entry)]


def wait_for(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_results_are_returned_and_failures_raise(tmp_path: Path) -> None:
    """result() returns the handler's value; a dead task raises TaskFailed; unfinished ones time out."""
    def handler(msg: pqueue.Message) -> object:
        if msg.data == "boom":
            raise ValueError("no good")
        return {"echo": msg.data}

    with pqueue.Queue(tmp_path / "q") as q:
        ok = q.put("hi")
        bad = q.put("boom")
        with pqueue.ConsumerPool(q, handler, results=True, max_attempts=2,
                                 backoff=pqueue.Backoff(initial=0.01, jitter=0)):
            assert q.result(ok, timeout=10) == {"echo": "hi"}
            with pytest.raises(pqueue.TaskFailed) as info:
                q.result(bad, timeout=10)
        assert (info.value.error_type, info.value.attempts, info.value.reason) == ("ValueError", 2, "max_attempts")
        assert "no good" in str(info.value)
        late = q.put("never handled")
        with pytest.raises(pqueue.Empty, match="did not finish within 0.1 s"):
            q.result(late, timeout=0.1)
        with pytest.raises(ValueError, match="no record at offset 99"):
            q.result(99)


def test_done_without_results_says_so(tmp_path: Path) -> None:
    """A task acked by a pool without results=True is reported, not waited on forever."""
    with pqueue.Queue(tmp_path / "q") as q:
        off = q.put(1)
        with pqueue.ConsumerPool(q, lambda m: m.data):
            wait_for(lambda: q.status(off) == "done")
        with pytest.raises(pqueue.QueueError, match="results=True"):
            q.result(off, timeout=1)


def test_result_waited_for_from_another_process(tmp_path: Path) -> None:
    """A producer process waits for a worker in this process and gets its answer promptly."""
    path = tmp_path / "q"
    pqueue.Queue(path).close()
    code = ("import sys, time, pqueue\n"
            "with pqueue.Queue(sys.argv[1]) as q:\n"
            "    off = q.put({'x': 21})\n"
            "    t = time.monotonic()\n"
            "    print(q.result(off, timeout=20), round(time.monotonic() - t, 3))\n")
    producer = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    with pqueue.Queue(path) as q:
        with pqueue.ConsumerPool(q, lambda m: m.data["x"] * 2, results=True):
            out, _ = producer.communicate(timeout=30)
    value, waited = out.split()
    assert value == "42" and float(waited) < 5


def test_output_puts_before_ack_with_keys(tmp_path: Path) -> None:
    """output= puts each return value (and each item of Many) once; None puts nothing."""
    def handler(msg: pqueue.Message) -> object:
        kind = msg.data
        return None if kind == "none" else pqueue.Many([1, 2]) if kind == "many" else kind.upper()

    with pqueue.Queue(tmp_path / "in") as src, pqueue.Queue(tmp_path / "out") as dst:
        src.put_many(["a", "none", "many"])
        with pqueue.ConsumerPool(src, handler, output=dst):
            wait_for(lambda: src.qsize() == 0)
        got = [dst.get(timeout=1) for _ in range(3)]
        assert [m.data for m in got] == ["A", 1, 2]
        assert [m.key for m in got] == [f"{src.source_id}:default:0", f"{src.source_id}:default:2:0",
                                        f"{src.source_id}:default:2:1"]
        # A re-run (as after a crash between put and ack) is absorbed by the keys.
        assert dst.put("A again", key=got[0].key) == got[0].offset


def test_router_fans_out(tmp_path: Path) -> None:
    """output= may route each result to queues of its choice."""
    with pqueue.Queue(tmp_path / "in") as src, pqueue.Queue(tmp_path / "even") as even, \
            pqueue.Queue(tmp_path / "odd") as odd:
        src.put_many(range(6))

        def route(value: int) -> list[tuple[pqueue.Queue, int]]:
            return [(even if value % 2 == 0 else odd, value)]

        with pqueue.ConsumerPool(src, lambda m: m.data, output=route):
            wait_for(lambda: src.qsize() == 0)
        assert sorted(read_all(tmp_path / "even")) == [0, 2, 4] and sorted(read_all(tmp_path / "odd")) == [1, 3, 5]


def test_three_stage_pipeline_survives_sigkill(tmp_path: Path) -> None:
    """ingest -> double -> split with both stages SIGKILLed again and again: one output per input."""
    n = 800
    q1, q2, q3 = (tmp_path / name for name in ("ingest", "doubled", "split"))
    with pqueue.Queue(q1) as q:
        q.put_many([{"n": i, "v": i} for i in range(n)])
    for path in (q2, q3):
        pqueue.Queue(path).close()
    stages = [(q1, q2, "double"), (q2, q3, "split")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rng = random.Random(7)

    def start(i: int) -> subprocess.Popen[str]:
        src, dst, kind = stages[i]
        return subprocess.Popen([sys.executable, "-m", "tests.pipeline_stage", str(src), str(dst), kind],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, text=True)

    procs = [start(0), start(1)]
    kills = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0.05, 0.3))
        i = rng.randrange(2)
        procs[i].send_signal(signal.SIGKILL)
        procs[i].wait()
        kills += 1
        procs[i] = start(i)
        if kills >= 12:
            break
    try:
        with pqueue.Queue(q1) as a, pqueue.Queue(q2) as b:
            wait_for(lambda: a.qsize() == 0 and b.qsize() == 0, timeout=60)
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
    final = read_all(q3)
    expected = sorted((i, part, 2 * i + part) for i in range(n) for part in range(2))
    assert sorted((d["n"], d["part"], d["v"]) for d in final) == expected  # type: ignore[index]
    assert kills >= 12
    for path in (q1, q2, q3):
        assert inspect.verify(str(path)).ok
