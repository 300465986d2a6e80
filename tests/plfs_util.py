"""Helpers for tests that run the real pqueue on plfs (tools/plfs.py), the power-loss FUSE layer.

The code under test always runs in a child process (``python tests/plfs_util.py STEPS``) that
can be SIGKILLed, never in the test process: the FUSE daemon is a third process, so a page
fault on an LMDB map can never wait on itself. The child appends one JSON line per finished
step to a ledger *outside* the mount (plain write(), which survives SIGKILL), so the ledger
holds exactly the puts that returned, the acks that were flushed, and so on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PLFS_PATH = ROOT / "tools" / "plfs.py"


def load_plfs() -> Any:
    """Import tools/plfs.py without putting tools/ (or pqueue/) on sys.path."""
    mod = sys.modules.get("pqueue_tools_plfs")
    if mod is None:
        spec = importlib.util.spec_from_file_location("pqueue_tools_plfs", PLFS_PATH)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["pqueue_tools_plfs"] = mod
        spec.loader.exec_module(mod)
    return mod


def require_plfs() -> None:
    """Skip where plfs cannot run; under CI=true that is a failure (DESIGN §6)."""
    import pytest

    reason = load_plfs().available()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"power-loss tests must run under CI=true: {reason}")
        pytest.skip(reason)


def pad_for(i: int) -> str:
    """Deterministic payload padding: a record whose pad does not match its i is corrupt."""
    return f"{i:06d}" * (1 + i % 7)


def payload(i: int) -> dict[str, Any]:
    return {"i": i, "pad": pad_for(i)}


def check_payload(data: Any) -> int:
    """Return the i of a delivered payload, asserting it is one the workers wrote intact."""
    assert isinstance(data, dict) and set(data) == {"i", "pad"}, f"corrupt delivery: {data!r}"
    assert data["pad"] == pad_for(data["i"]), f"corrupt delivery: {data!r}"
    return int(data["i"])


class Run:
    """A plfs mount (`mnt`) over `backing`, the queue path on it, and its children."""

    def __init__(self, base: Path, **mount_kwargs: Any) -> None:
        self.base = base
        self.backing = base / "disk"
        self.mnt = base / "mnt"
        self.mount_kwargs = mount_kwargs
        self.mount: Any = None
        self.children: list[subprocess.Popen[bytes]] = []
        self.ledgers = 0

    @property
    def qpath(self) -> Path:
        """The queue as the child sees it (through plfs)."""
        return self.mnt / "q"

    @property
    def disk_qpath(self) -> Path:
        """The queue on the backing directory: after a crash, the disk as power-up finds it."""
        return self.backing / "q"

    def up(self) -> Any:
        plfs = load_plfs()
        self.mount = plfs.PlfsMount(self.backing, self.mnt, **self.mount_kwargs).start()
        return self.mount

    def down(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
            child.wait()
        self.children.clear()
        if self.mount is not None:
            self.mount.stop()
            self.mount = None

    def crash(self, mode: str = "drop", seed: int = 0, tear: int = 1) -> dict[str, Any]:
        """Power loss while the children still run, then SIGKILL them and unmount."""
        status = self.mount.crash(mode, seed, tear)
        self.down()
        return dict(status["result"])

    def spawn(self, steps: list[Any]) -> tuple[subprocess.Popen[bytes], Path]:
        self.ledgers += 1
        ledger = self.base / f"ledger{self.ledgers}.jsonl"
        ledger.write_bytes(b"")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.base / f"child{self.ledgers}.err", "wb") as err:
            child = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), str(self.qpath), str(ledger), str(self.mnt),
                 json.dumps(steps)],
                cwd=str(self.base), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        self.children.append(child)
        return child, ledger


def read_ledger(ledger: Path) -> list[dict[str, Any]]:
    lines = ledger.read_bytes().decode(errors="replace").splitlines()
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            break  # a line cut by SIGKILL: the step did not finish
    return out


def wait_ledger(ledger: Path, until: Callable[[list[dict[str, Any]]], bool], child: subprocess.Popen[bytes],
                timeout: float = 30.0) -> list[dict[str, Any]]:
    """Wait until the ledger satisfies `until` (polling a file written by another process)."""
    deadline = time.monotonic() + timeout
    while True:
        entries = read_ledger(ledger)
        if until(entries):
            return entries
        if child.poll() is not None:
            err = Path(str(ledger).replace("ledger", "child").replace(".jsonl", ".err"))
            raise AssertionError(f"worker exited with {child.returncode}; ledger tail {entries[-3:]}; "
                                 f"stderr: {err.read_text()[-3000:] if err.exists() else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting on the ledger; tail {entries[-3:]}")
        time.sleep(0.01)


def returned_puts(entries: list[dict[str, Any]]) -> dict[int, int]:
    """offset -> i of every put that returned."""
    return {e["off"]: e["put"] for e in entries if "put" in e}


def drain(path: Path, group: str = "verify", **kwargs: Any) -> dict[int, int]:
    """Open the queue at `path` (in this process: no FUSE involved) and read every record in a
    fresh group; return offset -> i, asserting each payload is intact and no offset repeats."""
    import pqueue

    seen: dict[int, int] = {}
    with pqueue.Queue(path, fsync="never", **kwargs) as q:
        c = q.consumer(group)
        while True:
            try:
                m = c.get(timeout=0.3)
            except pqueue.Empty:
                break
            assert m.offset not in seen, f"offset {m.offset} delivered twice in one pass"
            seen[m.offset] = check_payload(m.data)
            c.ack(m)
    return seen


@contextmanager
def plfs_run(base: Path, **mount_kwargs: Any) -> Iterator[Run]:
    run = Run(base, **mount_kwargs)
    try:
        yield run
    finally:
        run.down()


# ============================================================================ the child


def _put_range(q: Any, note: Callable[..., None], ids: range, delay: float = 0.0,
               stop_after_failures: int | None = None) -> int:
    """Put payload(i) for each i in `ids`, noting each returned or failed put in the ledger.

    Returns the id after the last one tried.
    """
    import pqueue

    failures = 0
    tried = ids.start
    for i in ids:
        tried = i + 1
        try:
            off = q.put(payload(i))
        except pqueue.QueueError as exc:
            note(put_failed=i, error=type(exc).__name__, err=str(exc)[:300])
            failures += 1
            if stop_after_failures is not None and failures > stop_after_failures:
                break
            continue
        note(put=i, off=off, t=time.monotonic())
        if delay:
            time.sleep(delay)
    return tried


def _child(qpath: str, ledger: str, mnt: str, steps: list[Any]) -> None:
    import pqueue

    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND)

    def note(**entry: Any) -> None:
        os.write(fd, (json.dumps(entry) + "\n").encode())

    q: pqueue.Queue | None = None
    seq = 0
    held: list[pqueue.Message] = []
    for step in steps:
        kind, *args = step
        if kind == "seq":
            seq = int(args[0])
        elif kind == "open":
            try:
                q = pqueue.Queue(qpath, **(args[0] if args else {}))
                note(opened=True)
            except pqueue.QueueError as exc:
                note(open_failed=type(exc).__name__, err=str(exc))
        elif kind in ("put", "put_loop"):
            assert q is not None
            n = int(args[0]) if kind == "put" else 1 << 40
            delay = float(args[1]) if len(args) > 1 else 0.0
            seq = _put_range(q, note, range(seq, seq + n), delay,
                             stop_after_failures=3 if kind == "put_loop" else None)
        elif kind == "put_threads":  # threads, puts each: concurrent puts (group commit)
            assert q is not None
            threads, each = int(args[0]), int(args[1])
            workers = [threading.Thread(target=_put_range, args=(q, note, range(seq + t * each, seq + (t + 1) * each)))
                       for t in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            seq += threads * each
            note(threads_done=True)
        elif kind == "consume":
            assert q is not None
            for _ in range(int(args[0])):
                try:
                    m = q.get(timeout=5)
                except pqueue.Empty:
                    note(empty=True)
                    break
                note(got=m.offset, i=check_payload(m.data), attempt=m.attempt)
                if args[1] if len(args) > 1 else True:
                    q.ack(m)
                else:
                    held.append(m)
        elif kind == "flush":
            assert q is not None
            q.flush()
            note(flushed=True)
        elif kind == "ctl":
            cfd = os.open(os.path.join(mnt, ".plfs-ctl"), os.O_WRONLY)
            try:
                os.write(cfd, str(args[0]).encode())
            finally:
                os.close(cfd)
            note(ctl=args[0])
        elif kind == "close":
            assert q is not None
            try:
                q.close()
                note(closed=True)
            except pqueue.QueueError as exc:
                note(close_failed=type(exc).__name__, err=str(exc)[:300])
            q = None
        elif kind == "hang":
            note(hang=True)
            while True:
                time.sleep(3600)
        else:
            raise ValueError(f"unknown step {kind!r}")
    note(done=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _child(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
