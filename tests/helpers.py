"""Small helpers several test modules share: draining a queue or group, flipping a byte."""

from __future__ import annotations

import os

import pqueue


def drain(source: pqueue.Queue | pqueue.Consumer, *, ack: bool = True, timeout: float = 0.05) -> list[pqueue.Message]:
    """Every message `source` hands out until it has none for `timeout` seconds, acked unless told not to."""
    out: list[pqueue.Message] = []
    while True:
        try:
            m = source.get(timeout=timeout)
        except pqueue.Empty:
            return out
        out.append(m)
        if ack:
            m.ack()


def read_all(q: pqueue.Queue, group: str) -> dict[int, object]:
    """Every record from the oldest on, through a fresh consumer group: {offset: data}."""
    out: dict[int, object] = {}
    for m in drain(q.consumer(group), timeout=0):
        assert m.offset not in out
        out[m.offset] = m.data
    return out


def flip(path: str | os.PathLike[str], pos: int, mask: int = 0xFF) -> None:
    """Invert the bits of `mask` in the byte at `pos` of the file at `path` (bit rot)."""
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ mask]))
