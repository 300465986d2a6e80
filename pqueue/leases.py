"""One consumer group's write transaction: leases, hand-backs, acks, the due and priority scans.

Index.exchange begins a durable LMDB write transaction and drives a GroupTxn through it:
mark_done for skips and acks, hand_back for nacks, advance (move W over done offsets), lease,
advance again; Index.extend uses one to re-lease a single offset. A GroupTxn only edits one
group's records in acks, state, batches, due and ready, and the GroupState it was given,
which the caller writes back. Beginning, committing and retrying transactions stay in
index.py: a transaction retried after the map grew builds a new GroupTxn on freshly read state,
so nothing here may outlive its transaction.

The key and value encodings are in tables.py; what each database holds, and why fresh
offsets are leased as one batch record, is in index.py's docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from . import schedule
from .record import ATTR_BOOT, ATTR_NOT_BEFORE, ATTR_PRIORITY
from .tables import DUE, GID, OFF, READY, U64, GroupState, pack_value, prefixed, unpack_value

if TYPE_CHECKING:  # annotations only: index.py opens LMDB, and it imports this module
    import lmdb

    from .index import Index

SCAN_BATCH = 16384  # records looked at for priorities per transaction


class Grant(NamedTuple):
    """One message leased to a consumer: where to read it and how many deliveries it has had."""

    offset: int
    seg: int
    pos: int
    attempt: int  # this delivery's number, from 1
    deadline_ms: int
    record: Any  # the log Record (read inside the transaction)


class ReadFn(Protocol):
    def __call__(self, seg: int, pos: int, offset: int, max_records: int) -> Any: ...


class DoneSet:
    """Membership in the done ranges of the acks database, for one group."""

    def __init__(self, txn: lmdb.Transaction, db: Any, g: GroupState) -> None:
        self.cur = txn.cursor(db=db)
        self.g = g

    def contains(self, offset: int) -> bool:
        if offset < self.g.committed:
            return True
        cur = self.cur
        key = OFF.pack(self.g.gid, offset)
        if cur.set_key(key):
            return True
        # The greatest range start below `offset`: is `offset` inside its range?
        if cur.set_range(key):
            if not cur.prev():
                return False
        elif not cur.last():
            return False
        k, v = cur.item()
        if k[:4] != key[:4] or not v:
            return False
        return bool(OFF.unpack(k)[1] < offset < U64.unpack(v)[0])


class GroupTxn:
    """The steps of one exchange transaction on one group's state."""

    def __init__(self, index: Index, txn: lmdb.Transaction, g: GroupState) -> None:
        self.txn = txn
        self.g = g
        self.acks = index.db["acks"]
        self.ready = index.db["ready"]
        self.state = index.db["state"]
        self.batches = index.db["batches"]
        self.due = index.db["due"]
        self.prefix = GID.pack(g.gid)

    def _key(self, offset: int) -> bytes:
        return OFF.pack(self.g.gid, offset)

    def _drop_state(self, offset: int) -> list[Any] | None:
        """Delete the single-offset state record of `offset` (and its due entry), if any."""
        k = self._key(offset)
        v = self.txn.get(k, db=self.state)
        if v is None:
            return None
        st: list[Any] = unpack_value(v)
        due = st[3] if st[0] == "L" else st[2]
        self.txn.delete(k, db=self.state)
        self.txn.delete(DUE.pack(self.g.gid, due, b"S", offset), db=self.due)
        return st

    def _drop_batch(self, first: int, deadline: int) -> None:
        self.txn.delete(self._key(first), db=self.batches)
        self.txn.delete(DUE.pack(self.g.gid, deadline, b"B", first), db=self.due)

    def mark_done(self, first: int, nxt: int) -> None:
        """Offsets [first, nxt) are finished (acked, dead-lettered or unreadable)."""
        g = self.g
        if nxt <= g.committed:
            return
        first = max(first, g.committed)
        if nxt - first <= 64:
            for off in range(first, nxt):
                self._drop_state(off)
        if first == g.committed:
            g.committed = nxt
            return
        if nxt == first + 1:
            self.txn.put(self._key(first), b"", db=self.acks)
        else:
            self.txn.put(self._key(first), U64.pack(nxt), db=self.acks)

    def advance(self) -> None:
        """Move the committed offset W over every done offset right above it."""
        g = self.g
        txn, acks = self.txn, self.acks
        while True:
            k = self._key(g.committed)
            v = txn.get(k, db=acks)
            if v is None:
                break
            txn.delete(k, db=acks)
            g.committed = U64.unpack(v)[0] if v else g.committed + 1
        # Batches and single records wholly below W are finished: drop them.
        for first, st in list(_prefixed_items(txn, self.batches, self.prefix, below=g.committed)):
            if first + st[0] <= g.committed:
                self._drop_batch(first, st[3])
        for offset, _st in list(_prefixed_items(txn, self.state, self.prefix, below=g.committed)):
            self._drop_state(offset)
        # The committed position is exact when W meets D; otherwise it is the last exact one
        # (a position at or before W). W passes D only over acked priority records, which the
        # dispatch cursor skips when it gets there: D never moves without its position.
        if g.committed == g.dispatch:
            g.committed_seg, g.committed_pos = g.dispatch_seg, g.dispatch_pos

    def extend(self, owner: list[Any], offset: int, seg: int, pos: int, attempt: int, deadline_ms: int) -> bool:
        """Move `owner`'s lease of `offset` to `deadline_ms` (see `Index.extend`)."""
        if offset < self.g.committed or DoneSet(self.txn, self.acks, self.g).contains(offset):
            return False
        v = self.txn.get(self._key(offset), db=self.state)
        if v is not None:
            st = unpack_value(v)
            if st[0] != "L" or st[1] != owner:
                return False
        else:
            batch = self._batch_of(offset)
            if batch is None or batch[1] != owner:
                return False
        self._drop_state(offset)
        self._lease_one(owner, offset, seg, pos, attempt, deadline_ms)
        return True

    def hand_back(self, offset: int, seg: int, pos: int, due: int, charged: bool) -> None:
        """Make `offset` deliverable again at `due`; uncharged hand-backs keep its attempt count."""
        if offset < self.g.committed or offset >= max(self.g.dispatch, self.g.scan):
            return
        if DoneSet(self.txn, self.acks, self.g).contains(offset):
            return
        st = self._drop_state(offset)
        if st is not None:
            attempt = st[2] if st[0] == "L" else st[1]
        else:
            batch = self._batch_of(offset)
            if batch is None:
                return  # not leased: nothing to hand back
            attempt = batch[2]
        if not charged:
            attempt = max(0, attempt - 1)
        self._put_waiting(offset, attempt, due, seg, pos)

    def _put_waiting(self, offset: int, attempt: int, due: int, seg: int, pos: int) -> None:
        """A single record overrides the batch the offset falls in (if any)."""
        self.txn.put(self._key(offset), pack_value(["W", attempt, due, seg, pos]), db=self.state)
        self.txn.put(DUE.pack(self.g.gid, due, b"S", offset), b"", db=self.due)

    def _batch_of(self, offset: int) -> list[Any] | None:
        """The batch record whose range holds `offset`, if any."""
        cur = self.txn.cursor(db=self.batches)
        key = self._key(offset)
        if cur.set_range(key):
            if cur.key() != key and not cur.prev():
                return None
        elif not cur.last():
            return None
        k = cur.key()
        if k[:4] != self.prefix:
            return None
        first = OFF.unpack(k)[1]
        st: list[Any] = unpack_value(cur.value())
        return st if first <= offset < first + st[0] else None

    def lease(self, owner: list[Any], want: int, now: int, lease_ms: int, read: ReadFn,
              prio_from: int | None = None, choose_level: Callable[[list[int]], int] | None = None,
              ) -> list[Grant]:
        """Lease due messages, else the highest-priority ready ones, else fresh offsets as a batch.

        Due messages come first, oldest due first. One that was delivered before (a retry) is
        leased alone, so a task that crashes its process does not charge its neighbours;
        never-delivered ones (handed back, delayed) are leased together.
        """
        g = self.g
        deadline = now + lease_ms
        for first, st in self._due(now, b"B"):
            self._reclaim_batch(first, st, now, read, prio_from is not None)
        grants = self._lease_due(owner, want, now, deadline, read)
        if grants:
            return grants
        if prio_from is not None:
            self._scan_priorities(prio_from, now, read)
            levels = self._ready_levels()
            if levels:
                level = levels[0] if choose_level is None else choose_level(levels + [0])
                if level:
                    return self._lease_ready(owner, level, want, deadline, read)
        result = read(g.dispatch_seg, g.dispatch_pos, g.dispatch, want)
        for d in result.damage:
            self._skip(d)
        next_offset, position = result.next_offset, result.position
        for seg, rec in result.records:
            if prio_from is not None and rec.offset >= g.scan:
                # Never dispatch past the priority scan: records there were not looked at yet.
                next_offset, position = rec.offset, (seg, rec.pos)
                break
            attrs = rec.attrs
            if attrs:
                if prio_from is not None and attrs.get(ATTR_PRIORITY):
                    continue  # found by the scan: in `ready`, leased or waiting
                due = _due_ms(rec, now)
                if due > now:
                    self._put_waiting(rec.offset, 0, due, seg, rec.pos)
                    continue
            grants.append(Grant(rec.offset, seg, rec.pos, 1, deadline, rec))
        if grants:
            first, count = grants[0].offset, grants[-1].offset - grants[0].offset + 1
            self.txn.put(self._key(first), pack_value([count, owner, 1, deadline, grants[0].seg, grants[0].pos]),
                         db=self.batches)
            self.txn.put(DUE.pack(g.gid, deadline, b"B", first), b"", db=self.due)
        g.dispatch = max(g.dispatch, next_offset)
        g.dispatch_seg, g.dispatch_pos = position
        return grants

    def _skip(self, d: Any) -> None:
        """Offsets lost to damage, a gap or a dropped segment are done, and counted."""
        lost = d.next_offset - max(d.first_offset, self.g.committed)
        self.mark_done(d.first_offset, d.next_offset)
        if lost <= 0:
            return
        if d.reason == "segment deleted":
            self.g.dropped += lost
        elif d.length:
            self.g.damaged += lost

    def _lease_due(self, owner: list[Any], want: int, now: int, deadline: int, read: ReadFn) -> list[Grant]:
        g = self.g
        grants: list[Grant] = []
        for offset, st in self._due(now, b"S", limit=want):
            if st[0] == "L":
                # A lease that ran out: its holder died or is too slow. The delivery counts.
                attempt, seg, pos = st[2], st[4], st[5]
            else:
                attempt, seg, pos = st[1], st[3], st[4]
            if attempt > 0 and grants:
                break
            got = read(seg, pos, offset, 1)
            if not got.records or got.records[0][1].offset != offset:
                # The record is gone (a deleted segment) or unreadable: it can never be delivered.
                self._drop_state(offset)
                self.mark_done(offset, offset + 1)
                g.damaged += 1
                continue
            rec = got.records[0][1]
            if attempt == 0 and rec.attrs:
                # Due by the wall clock; the boot clock may say a clock step brought it forward.
                due = _due_ms(rec, now)
                if due > now:
                    self._drop_state(offset)
                    self._put_waiting(offset, 0, due, seg, pos)
                    continue
            self._drop_state(offset)
            self._lease_one(owner, offset, seg, pos, attempt + 1, deadline)
            grants.append(Grant(offset, seg, pos, attempt + 1, deadline, rec))
            if attempt > 0:
                break
        return grants

    def _lease_one(self, owner: list[Any], offset: int, seg: int, pos: int, attempt: int, deadline: int) -> None:
        self.txn.put(self._key(offset), pack_value(["L", owner, attempt, deadline, seg, pos]), db=self.state)
        self.txn.put(DUE.pack(self.g.gid, deadline, b"S", offset), b"", db=self.due)

    def _scan_priorities(self, prio_from: int, now: int, read: ReadFn) -> None:
        """Move the group's priority scan S to the end of the log (at most SCAN_BATCH records).

        Every record of priority > 0 at or after the dispatch cursor goes to `ready` (or waits,
        if delayed); dispatch then skips them and never passes S.
        """
        g = self.g
        if g.scan < g.dispatch:
            g.scan, g.scan_seg, g.scan_pos = g.dispatch, g.dispatch_seg, g.dispatch_pos
        result = read(g.scan_seg, g.scan_pos, g.scan, SCAN_BATCH)
        for seg, rec in result.records:
            level = rec.attrs.get(ATTR_PRIORITY) if rec.attrs else None
            if not level or rec.offset < prio_from:
                continue
            due = _due_ms(rec, now)
            if due > now:
                self._put_waiting(rec.offset, 0, due, seg, rec.pos)
            else:
                self.txn.put(READY.pack(g.gid, 255 - int(level), rec.offset), pack_value([seg, rec.pos]),
                             db=self.ready)
        g.scan = max(g.scan, result.next_offset)
        g.scan_seg, g.scan_pos = result.position

    def _ready_levels(self) -> list[int]:
        """Priority levels with ready records, highest first."""
        levels: list[int] = []
        cur = self.txn.cursor(db=self.ready)
        key = READY.pack(self.g.gid, 0, 0)
        while cur.set_range(key):
            gid, inv, _offset = READY.unpack(cur.key())
            if gid != self.g.gid:
                break
            levels.append(255 - inv)
            if inv == 255:
                break
            key = READY.pack(self.g.gid, inv + 1, 0)
        return levels

    def _lease_ready(self, owner: list[Any], level: int, want: int, deadline: int, read: ReadFn) -> list[Grant]:
        """Lease up to `want` ready records of `level`, oldest first, one state record each."""
        grants: list[Grant] = []
        cur = self.txn.cursor(db=self.ready)
        prefix = READY.pack(self.g.gid, 255 - level, 0)[:5]
        taken: list[tuple[bytes, int, int, int]] = []
        if cur.set_range(prefix):
            for k, v in cur:
                if k[:5] != prefix or len(taken) >= want:
                    break
                seg, pos = unpack_value(v)
                taken.append((bytes(k), READY.unpack(k)[2], seg, pos))
        for k, offset, seg, pos in taken:
            self.txn.delete(k, db=self.ready)
            got = read(seg, pos, offset, 1)
            if not got.records or got.records[0][1].offset != offset:
                self.mark_done(offset, offset + 1)
                self.g.damaged += 1
                continue
            self._lease_one(owner, offset, seg, pos, 1, deadline)
            grants.append(Grant(offset, seg, pos, 1, deadline, got.records[0][1]))
        return grants

    def _due(self, now: int, kind: bytes, limit: int = 1 << 30) -> list[tuple[int, list[Any]]]:
        """Batch leases (kind b"B") or single records (b"S") due by `now`, oldest first."""
        out: list[tuple[int, list[Any]]] = []
        db = self.batches if kind == b"B" else self.state
        cur = self.txn.cursor(db=self.due)
        if not cur.set_range(self.prefix):
            return out
        for k in cur.iternext(values=False):
            gid, due, k_kind, offset = DUE.unpack(k)
            if gid != self.g.gid or due > now or len(out) >= limit:
                break
            if k_kind != kind:
                continue
            st = self.txn.get(self._key(offset), db=db)
            if st is not None:
                out.append((offset, unpack_value(st)))
        return out

    def _reclaim_batch(self, first: int, st: list[Any], now: int, read: ReadFn, priorities: bool) -> None:
        """A batch lease ran out: every member not done nor overridden waits for a retry.

        Members that were not handed out with the batch (priority records, which live in
        `ready` or have their own state; delayed ones, which have their own state) are skipped.
        """
        count, attempt, deadline, seg, pos = st[0], st[2], st[3], st[4], st[5]
        self._drop_batch(first, deadline)
        done = DoneSet(self.txn, self.acks, self.g)
        result = read(seg, pos, first, count)
        for rseg, rec in result.records:
            if rec.offset >= first + count:
                break
            if done.contains(rec.offset) or self.txn.get(self._key(rec.offset), db=self.state) is not None:
                continue
            if priorities and rec.attrs and rec.attrs.get(ATTR_PRIORITY):
                continue
            self._put_waiting(rec.offset, attempt, now, rseg, rec.pos)
        for d in result.damage:
            self.mark_done(d.first_offset, min(d.next_offset, first + count))


def _prefixed_items(txn: lmdb.Transaction, db: Any, prefix: bytes, *, below: int) -> Iterator[tuple[int, Any]]:
    """(offset, decoded value) of one group's records with offsets below `below`."""
    for k, v in prefixed(txn, db, prefix):
        offset = OFF.unpack(k)[1]
        if offset >= below:
            return
        yield offset, unpack_value(v)


def _due_ms(rec: Any, now_ms: int) -> int:
    """When a record with a not-before attribute is due, in wall-clock ms (0 when it has none)."""
    not_before = rec.attrs.get(ATTR_NOT_BEFORE) if rec.attrs else None
    if not_before is None:
        return 0
    due = schedule.due_at(float(not_before), rec.timestamp_ns / 1e9, rec.attrs.get(ATTR_BOOT), now_ms / 1000)
    return int(due * 1000)
