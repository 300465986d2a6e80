"""The raw limit: a plain framed ``os.write`` loop and its read loop, no queue logic at all.

Each record is the same 28-byte header pqueue writes (CRC32C, length, offset, time, flags,
codec, attributes length) plus the msgpack payload, appended with one ``os.write`` to an
O_APPEND file: what any Python log must do at the least. Fsync policies: never, every N
records, or every record (fdatasync, as pqueue uses). No lock between processes, no index,
no acknowledgements: the read loop only reads, checks the CRC and decodes.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from typing import Any

import msgpack
from crc32c import crc32c

_HEAD = struct.Struct("<IIQQBBH")  # pqueue's record header: 28 bytes
_BODY = struct.Struct("<IQQBBH")  # the header after its CRC field
_CRC = struct.Struct("<I")
READ_CHUNK = 1 << 20  # 1 MiB preads in the read loop


class RawLog:
    """A contender with the queue interface of contenders.py, fsync = "never" | "always" | N."""

    ack_kind = "none"
    multiprocess = True

    def __init__(self, fsync: str | int) -> None:
        self.fsync = fsync
        self.name = f"raw[{fsync if isinstance(fsync, str) else f'every {fsync}'}]"
        self._every = 1 if fsync == "always" else (0 if fsync == "never" else int(fsync))
        self._lock = threading.Lock()  # guards _next and _since_sync across producer threads

    def open(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.path = os.path.join(path, "raw.log")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._rfd = os.open(self.path, os.O_RDONLY)
        self._next = 0
        self._since_sync = 0
        self._rpos = 0
        self._rbuf = b""
        self._rat = 0

    def put(self, item: Any) -> None:
        payload = msgpack.packb(item)
        with self._lock:
            off = self._next
            self._next = off + 1
            body = _BODY.pack(len(payload), off, time.time_ns(), 0, 1, 0) + payload
            os.write(self._fd, _CRC.pack(crc32c(body)) + body)
            self._since_sync += 1
            sync = self._every and self._since_sync >= self._every
            if sync:
                self._since_sync = 0
        if sync:
            os.fdatasync(self._fd)

    def put_many(self, items: list[Any]) -> None:
        parts = []
        now = time.time_ns()
        with self._lock:
            for item in items:
                payload = msgpack.packb(item)
                body = _BODY.pack(len(payload), self._next, now, 0, 1, 0) + payload
                parts.append(_CRC.pack(crc32c(body)) + body)
                self._next += 1
            os.write(self._fd, b"".join(parts))
            self._since_sync += len(items)
            sync = self._every and self._since_sync >= self._every
            if sync:
                self._since_sync = 0
        if sync:  # like pqueue's put_many: at most one fsync per batch
            os.fdatasync(self._fd)

    def _ensure(self, n: int) -> bool:
        """Make n bytes available at _rat (reading ahead); False at the end of the file."""
        have = len(self._rbuf) - self._rat
        if have >= n:
            return True
        more = os.pread(self._rfd, max(READ_CHUNK, n - have), self._rpos)
        self._rpos += len(more)
        self._rbuf, self._rat = self._rbuf[self._rat:] + more, 0
        return len(self._rbuf) >= n

    def get(self) -> tuple[None, Any] | None:
        """Read the next record: header, CRC check, decode. None at the end of the file."""
        if not self._ensure(_HEAD.size):
            return None
        crc, n = struct.unpack_from("<II", self._rbuf, self._rat)
        if not self._ensure(_HEAD.size + n):
            return None
        buf, at = self._rbuf, self._rat
        end = at + _HEAD.size + n
        if crc32c(buf[at + 4:end]) != crc:
            raise ValueError(f"CRC mismatch in {self.path}")
        self._rat = end
        return None, msgpack.unpackb(buf[at + _HEAD.size:end])

    def ack(self, token: None) -> None:
        pass

    def close(self) -> None:
        os.close(self._fd)
        os.close(self._rfd)


class RawGroupLog:
    """The raw limit of group commit: the least a Python log must do for threads that each
    need their record durable before they go on.

    A put frames its record and queues it; the first thread in leads: it waits (at most
    ``GATHER_SECONDS``, asleep on a lock the awaited arrival releases) until as many records
    are queued as its last group had, writes them all with one ``os.write``, makes one
    ``fdatasync``, hands the lead to the first thread that queued meanwhile and wakes its
    group. A put returns only after an fdatasync that started after its record was written.
    No lock between processes, no recovery point, no error paths: pqueue's group commit
    (``pqueue/commit.py``) is this design plus those, so this loop's own 8-thread / 1-thread
    ratio is the design's ceiling on the machine it runs on.
    """

    GATHER_SECONDS = 0.0002  # as pqueue's GATHER_SECONDS

    def __init__(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self._fd = os.open(os.path.join(path, "raw-group.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._mu = threading.Lock()  # guards every field below
        self._queued: list[_RawWaiter] = []
        self._leading = False
        self._last_group = 1
        self._want = 0  # a gathering leader sleeps on _gathered until this many are queued
        self._gathered = threading.Lock()
        self._gathered.acquire()
        self._next = 0
        self.syncs = 0

    def put(self, item: Any) -> None:
        me = _RawWaiter(msgpack.packb(item))
        with self._mu:
            self._queued.append(me)
            lead = not self._leading
            self._leading = True
            if not lead and self._want and len(self._queued) >= self._want:
                self._want = 0
                self._gathered.release()
        if not lead:
            me.wake.acquire()  # released once its group is synced, or to hand it the lead
            if not me.lead:
                return
        self._lead(me)

    def _lead(self, me: _RawWaiter) -> None:
        mu = self._mu
        with mu:
            gather = len(self._queued) < self._last_group
            if gather:
                self._want = self._last_group
        if gather:
            self._gathered.acquire(timeout=self.GATHER_SECONDS)
            with mu:
                if self._want:
                    self._want = 0  # timed out
                else:
                    self._gathered.acquire(blocking=False)  # released under _mu: take it back
        with mu:
            group, self._queued = self._queued, []
        parts = []
        off, now = self._next, time.time_ns()
        for w in group:
            body = _BODY.pack(len(w.payload), off, now, 0, 1, 0) + w.payload
            parts.append(_CRC.pack(crc32c(body)) + body)
            off += 1
        self._next = off
        os.write(self._fd, b"".join(parts))
        os.fdatasync(self._fd)
        self.syncs += 1
        with mu:
            self._last_group = len(group)
            successor = self._queued[0] if self._queued else None
            self._leading = successor is not None
        for w in group:
            if w is not me:
                w.wake.release()
        if successor is not None:
            successor.lead = True
            successor.wake.release()

    def close(self) -> None:
        os.close(self._fd)


class _RawWaiter:
    __slots__ = ("payload", "wake", "lead")

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.wake = threading.Lock()
        self.wake.acquire()
        self.lead = False


def scan_file(path: str, start: int = 0) -> int:
    """Walk every record of a raw or pqueue-framed file, checking CRCs; return the count.

    The cost an open would pay if it scanned the whole log instead of the unsynced tail.
    """
    count = 0
    with open(path, "rb") as f:
        f.seek(start)
        buf = b""
        at = 0
        while True:
            chunk = f.read(4 << 20)
            if not chunk:
                return count
            buf = buf[at:] + chunk
            at = 0
            while len(buf) - at >= _HEAD.size:
                crc, n = struct.unpack_from("<II", buf, at)
                end = at + _HEAD.size + n
                if end > len(buf):
                    break
                if crc32c(buf[at + 4:end]) != crc:
                    return count
                count += 1
                at = end
