"""Idempotency keys and the priority switch: the checks a put makes under the append lock.

A keyed put runs, with the OS append lock held (so other producers wait):

1. look the key up; if it names a record written within `dedup_window` that really carries
   the key (read back from the log), return that record's offset and write nothing;
2. otherwise record key -> (next offset, position) durably in the index, then append.

Step 2 writes the index first: a crash between the two leaves a key pointing at a record that
does not carry it (the offset went to another record, or was never written), which step 1
rejects. The key also travels in the record, so an index rebuild restores it from the log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .reader import Position
from .record import ATTR_KEY, ATTR_PRIORITY

if TYPE_CHECKING:
    from .queue import Queue

REBUILD_BATCH = 4096  # records per read while restoring keys from the log


class Keys:
    """The keyed-put protocol of one Queue handle."""

    def __init__(self, queue: Queue) -> None:
        self._queue = queue
        self._priority_on = False  # this handle already saw the priority switch set

    def before_put(self, key: str | None, priority: bool) -> Callable[[int, int, int], int | None]:
        """The `before` hook of `Log.append_checked` for a put with `key` and/or a priority."""
        def before(offset: int, seg: int, pos: int) -> int | None:
            if key is not None:
                seen = self._lookup(key)
                if seen is not None:
                    return seen
                now_ms = int(time.time() * 1000)
                self._queue._index.key_claim(key, offset, seg, pos, now_ms, int(self._queue.dedup_window * 1000))
            if priority and not self._priority_on:
                self._queue._index.note_priority(offset)
                self._priority_on = True
            return None
        return before

    def _lookup(self, key: str) -> int | None:
        found = self._queue._index.key_lookup(key)
        if found is None:
            return None
        offset, seg, pos, at_ms = found[:4]
        if time.time() * 1000 - at_ms > self._queue.dedup_window * 1000:
            return None
        got = self._queue._log.reader.read(Position(seg, pos), offset, 1)
        if got.records and got.records[0][1].offset == offset and got.records[0][1].attrs.get(ATTR_KEY) == key:
            return int(offset)
        # The key was claimed but its record never made it (a crash in between), or it was
        # deleted by retention: the key is free again.
        return None

    def rebuild(self) -> None:
        """Restore keys (within the window) and the priority switch from the log."""
        log = self._queue._log.reader
        pos, offset = log.first_position()
        horizon_ns = (time.time() - self._queue.dedup_window) * 1e9
        index = self._queue._index
        window_ms = int(self._queue.dedup_window * 1000)
        while True:
            result = log.read(pos, offset, REBUILD_BATCH)
            for seg, rec in result.records:
                if not rec.attrs:
                    continue
                key = rec.attrs.get(ATTR_KEY)
                if key is not None and rec.timestamp_ns >= horizon_ns:
                    index.key_claim(str(key), rec.offset, seg, rec.pos, rec.timestamp_ns // 1_000_000, window_ms)
                if rec.attrs.get(ATTR_PRIORITY) and not self._priority_on:
                    index.note_priority(rec.offset)
                    self._priority_on = True
            if not result.records and not result.damage:
                return
            pos, offset = result.position, result.next_offset
