"""Every contender behind one small interface: open, put, put_many, get, ack, close.

Each one carries the same message (a dict, msgpack-encoded) so the comparison is about the
storage, not the serializer. Peers that are not installed are skipped with a printed warning
(install them with ``pip install -e '.[bench]'``). Peers that are not thread-safe get a lock
around every call; peers that are not multi-process safe are left out of process scenarios.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack

import pqueue
from benchmarks.rawlog import RawLog

PQUEUE_POLICIES = ("always", "interval", "never")  # "interval" = the default: 100 ms or 1000 records
RAW_POLICIES: tuple[str | int, ...] = ("always", 1000, "never")
RAW_FOR_POLICY = {"always": "raw[always]", "interval": "raw[every 1000]", "never": "raw[never]"}
POLL_SECONDS = 0.0005  # how often a blocking get polls a peer that has no blocking get


class Contender:
    """Base: a queue opened on a directory. Subclasses set the class attributes honestly."""

    name = "?"
    kind = "peer"  # "pqueue" | "raw" | "peer"
    raw_match = "raw[never]"  # the raw loop with the same fsync behaviour (for ratios)
    thread_safe = True
    multiprocess = True
    ack_kind = "none"  # "ack" (per message), "task_done" (advance the tail), "none"

    def open(self, path: str) -> None:
        raise NotImplementedError

    def put(self, item: Any) -> None:
        raise NotImplementedError

    def put_many(self, items: list[Any]) -> None:
        for item in items:
            self.put(item)

    def get(self) -> tuple[Any, Any] | None:
        """(ack token, data) of the next message, or None if there is none now."""
        raise NotImplementedError

    def get_wait(self, timeout: float) -> tuple[Any, Any] | None:
        """Like get, waiting up to `timeout` seconds (polling every POLL_SECONDS by default)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.get()
            if got is not None or time.monotonic() > deadline:
                return got
            time.sleep(POLL_SECONDS)

    def ack(self, token: Any) -> None:
        pass

    def close(self) -> None:
        pass


class PQueue(Contender):
    kind = "pqueue"
    ack_kind = "ack"

    def __init__(self, fsync: str) -> None:
        self.fsync = fsync
        self.name = f"pqueue[{fsync}]"
        every = fsync.split()[0] if fsync.endswith(("records", "record")) else None
        # A time window has no raw twin: it is compared with the raw loop that never syncs.
        self.raw_match = f"raw[every {every}]" if every else RAW_FOR_POLICY.get(fsync, "raw[never]")

    def open(self, path: str) -> None:
        self.q = pqueue.Queue(path, fsync=self.fsync)
        self.put = self.q.put  # type: ignore[method-assign]
        self.put_many = self.q.put_many  # type: ignore[method-assign]

    def get(self) -> tuple[Any, Any] | None:
        try:
            m = self.q.get(block=False)
        except pqueue.Empty:
            return None
        return m, m.data

    def get_wait(self, timeout: float) -> tuple[Any, Any] | None:
        try:
            m = self.q.get(timeout=timeout)
        except pqueue.Empty:
            return None
        return m, m.data

    def ack(self, token: Any) -> None:
        self.q.ack(token)

    def close(self) -> None:
        self.q.close()


class Raw(Contender):
    """The raw limit (rawlog.RawLog) in the contender interface."""

    kind = "raw"

    def __init__(self, fsync: str | int) -> None:
        self.log = RawLog(fsync)
        self.name = self.raw_match = self.log.name

    def open(self, path: str) -> None:
        self.log.open(path)
        self.put = self.log.put  # type: ignore[method-assign]
        self.put_many = self.log.put_many  # type: ignore[method-assign]
        self.get = self.log.get  # type: ignore[method-assign]

    def close(self) -> None:
        self.log.close()


class PersistFile(Contender):
    """persist-queue's file `Queue` (task_done advances a saved tail; not multi-process safe)."""

    name = "persist-queue Queue"
    multiprocess = False  # persist-queue #132: one process per queue directory
    ack_kind = "task_done"

    def open(self, path: str) -> None:
        import persistqueue
        from persistqueue.serializers import msgpack as pq_msgpack

        self.q = persistqueue.Queue(path, serializer=pq_msgpack, tempdir=path)
        self._empty = persistqueue.Empty
        self.put = self.q.put  # type: ignore[method-assign]

    def get(self) -> tuple[Any, Any] | None:
        try:
            return None, self.q.get(block=False)
        except self._empty:
            return None

    def get_wait(self, timeout: float) -> tuple[Any, Any] | None:
        try:
            return None, self.q.get(timeout=timeout)
        except self._empty:
            return None

    def ack(self, token: Any) -> None:
        self.q.task_done()

    def close(self) -> None:
        # The file Queue has no close(): its files are closed when the object goes away.
        self.q.headf.close()
        self.q.tailf.close()


class PersistSQLiteAck(Contender):
    """persist-queue's `SQLiteAckQueue` (WAL, SQLite's default synchronous=FULL).

    Polled like the peers without a blocking get: its get(timeout) waits on an in-process
    event, so a put from another process is seen only after TICK_FOR_WAIT (10 s).
    """

    name = "persist-queue SQLiteAckQueue"
    raw_match = "raw[always]"
    ack_kind = "ack"

    def open(self, path: str) -> None:
        import persistqueue
        from persistqueue.serializers import msgpack as pq_msgpack

        self.q = persistqueue.SQLiteAckQueue(path, multithreading=True, serializer=pq_msgpack)
        self._empty = persistqueue.Empty
        self.put = self.q.put  # type: ignore[method-assign]

    def get(self) -> tuple[Any, Any] | None:
        try:
            row = self.q.get(block=False, raw=True)
        except self._empty:
            return None
        return row["pqid"], row["data"]

    def ack(self, token: Any) -> None:
        self.q.ack(id=token)

    def close(self) -> None:
        self.q.close()


class Queuelib(Contender):
    """queuelib's `FifoDiskQueue` (Scrapy's disk queue): bytes in, no ack, state saved on close."""

    name = "queuelib FifoDiskQueue"
    thread_safe = False
    multiprocess = False

    def open(self, path: str) -> None:
        from queuelib import FifoDiskQueue

        self.q = FifoDiskQueue(path)
        self._pack = msgpack.packb

    def put(self, item: Any) -> None:
        self.q.push(self._pack(item))

    def get(self) -> tuple[Any, Any] | None:
        data = self.q.pop()
        return None if data is None else (None, msgpack.unpackb(data))

    def close(self) -> None:
        self.q.close()


class DiskcacheDeque(Contender):
    """diskcache's `Deque` (SQLite WAL, synchronous=NORMAL): popleft removes, no ack."""

    name = "diskcache Deque"

    def open(self, path: str) -> None:
        from diskcache import Deque

        self.q = Deque(directory=path)

    def put(self, item: Any) -> None:
        self.q.append(msgpack.packb(item))

    def get(self) -> tuple[Any, Any] | None:
        try:
            return None, msgpack.unpackb(self.q.popleft())
        except IndexError:
            return None

    def close(self) -> None:
        self.q._cache.close()


class Litequeue(Contender):
    """litequeue's `LiteQueue` (SQLite WAL, synchronous=NORMAL): pop locks, done() acks."""

    name = "litequeue"
    thread_safe = False  # one shared sqlite3 connection; pop runs a multi-statement transaction
    ack_kind = "ack"

    def open(self, path: str) -> None:
        from litequeue import LiteQueue

        os.makedirs(path, exist_ok=True)
        self.q = LiteQueue(os.path.join(path, "queue.db"), timeout=30)

    def put(self, item: Any) -> None:
        self.q.put(msgpack.packb(item))

    def get(self) -> tuple[Any, Any] | None:
        m = self.q.pop()
        return None if m is None else (m.message_id, msgpack.unpackb(m.data))

    def ack(self, token: Any) -> None:
        self.q.done(token)

    def close(self) -> None:
        self.q.close()


class Locked(Contender):
    """Wraps a contender that is not thread-safe: every call under one lock (as a user must)."""

    def __init__(self, inner: Contender) -> None:
        self.inner = inner
        self.name, self.kind, self.raw_match = inner.name, inner.kind, inner.raw_match
        self.multiprocess, self.ack_kind = inner.multiprocess, inner.ack_kind
        self._lock = threading.Lock()  # serializes every call into `inner`

    def _locked(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            with self._lock:
                return fn(*args)
        return call

    def open(self, path: str) -> None:
        self.inner.open(path)
        for name in ("put", "put_many", "get", "ack", "close"):
            setattr(self, name, self._locked(getattr(self.inner, name)))


PEERS: dict[str, tuple[str, type[Contender]]] = {
    "persist-queue Queue": ("persistqueue", PersistFile),
    "persist-queue SQLiteAckQueue": ("persistqueue", PersistSQLiteAck),
    "queuelib FifoDiskQueue": ("queuelib", Queuelib),
    "diskcache Deque": ("diskcache", DiskcacheDeque),
    "litequeue": ("litequeue", Litequeue),
}
_warned: set[str] = set()


def peer_available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        if module not in _warned:
            _warned.add(module)
            print(f"WARNING: {module} is not installed; its scenarios are skipped "
                  f"(pip install -e '.[bench]')", file=sys.stderr)
        return False
    return True


def make(name: str, *, threads: int = 1) -> Contender:
    """A fresh contender by name: "pqueue[<policy>]", "raw[<policy>]" / "raw[every N]", or a peer.

    With threads > 1, a peer that is not thread-safe comes wrapped in a lock.
    """
    if name.startswith("pqueue["):
        return PQueue(name[7:-1])
    if name.startswith("raw["):
        spec = name[4:-1]
        return Raw(int(spec.split()[1]) if spec.startswith("every") else spec)
    module, cls = PEERS[name]
    inner = cls()
    return inner if inner.thread_safe or threads <= 1 else Locked(inner)


def names(*, pqueue_policies: tuple[str, ...] = PQUEUE_POLICIES, raw: tuple[str | int, ...] = RAW_POLICIES,
          peers: bool = True, multiprocess: bool = False) -> list[str]:
    """Contender names for one scenario: pqueue policies, raw loops, installed peers."""
    out = [f"pqueue[{p}]" for p in pqueue_policies]
    out += [RawLog(p).name for p in raw]
    if peers:
        for name, (module, cls) in PEERS.items():
            if peer_available(module) and (cls.multiprocess or not multiprocess):
                out.append(name)
    return out


def versions() -> dict[str, str]:
    """Installed versions of pqueue's dependencies and of every peer."""
    from importlib import metadata

    out = {}
    for dist in ("pqueue-log", "lmdb", "msgpack", "crc32c", "persist-queue", "queuelib", "diskcache",
                 "litequeue", "matplotlib"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out
