"""How the index encodes its keys and values: the struct layouts, msgpack, a group's state.

A module of its own because index.py and leases.py both need these and leases.py cannot
import index.py (index.py imports it). It opens nothing: which named database each key and
value goes in, and what each field means, is in index.py's docstring. Keys are big-endian so
LMDB's byte order is numeric order, and a group's keys in acks, state, batches, due, dead,
ready and results start with its 4-byte gid: one contiguous range each (what prefixed walks).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from .record import msgpack_packer

if TYPE_CHECKING:  # annotations only: index.py is the only module that opens LMDB
    import lmdb

GID = struct.Struct(">I")
OFF = struct.Struct(">IQ")
DUE = struct.Struct(">IQcQ")  # gid, time ms, kind (B batch / S single), offset
U64 = struct.Struct(">Q")
RP = struct.Struct(">QQQ")
READY = struct.Struct(">IBQ")  # gid, 255 - priority level, offset
pack_value = msgpack_packer()


def unpack_value(data: Any) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


@dataclass
class GroupState:
    gid: int
    committed: int  # W
    committed_seg: int
    committed_pos: int
    dispatch: int  # D
    dispatch_seg: int
    dispatch_pos: int
    dead: int = 0
    damaged: int = 0
    dropped: int = 0  # records deleted unread by a drop_oldest byte cap
    scan: int = 0  # S: records below it were looked at for priorities (>= D when in use)
    scan_seg: int = 0
    scan_pos: int = 0

    def pack(self) -> bytes:
        return pack_value([self.gid, self.committed, self.committed_seg, self.committed_pos, self.dispatch,
                           self.dispatch_seg, self.dispatch_pos, self.dead, self.damaged, self.dropped,
                           self.scan, self.scan_seg, self.scan_pos])

    @classmethod
    def unpack(cls, data: Any) -> GroupState:
        return cls(*unpack_value(data)[:13])


def prefixed(txn: lmdb.Transaction, db: Any, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of `db` whose key starts with `prefix` (one group's records)."""
    cur = txn.cursor(db=db)
    if not cur.set_range(prefix):
        return
    for k, v in cur:
        if k[:4] != prefix:
            return
        yield bytes(k), bytes(v)
