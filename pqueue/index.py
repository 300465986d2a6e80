"""The LMDB state of a queue: per-group offsets, acks, leases, attempts, schedule; meta.

This is the only module that imports ``lmdb``. Everything in it can be rebuilt from the log:
losing the index costs redelivery, never loss.

Named databases (keys are big-endian so LMDB's byte order is numeric order):

    meta     name -> value           format version, recovery point, counters
    groups   group name -> msgpack   [gid, W, W_seg, W_pos, D, D_seg, D_pos, dead, damaged]
                                      W: every offset below is done (the committed offset);
                                      D: every offset from here on was never handed out
    acks     gid|offset -> b"" | u64 done offsets above W (value: end of a done range)
    batches  gid|first -> msgpack    [count, owner, attempt, deadline, seg, pos]: `count` fresh
                                      offsets from `first` leased together
    state    gid|offset -> msgpack   one offset in [W, D) with a life of its own:
                                      ["L", owner, attempt, deadline, seg, pos]  one lease;
                                      ["W", attempt, due, seg, pos]  waiting: nacked, handed
                                        back, reclaimed or delayed (attempt = deliveries so far)
    due      gid|time_ms|offset -> b"B" | b"S"  when a batch (B) or a single record (S) next
                                      needs attention: a lease's deadline or a due time
    dead     gid|offset -> msgpack   offsets that were dead-lettered (for status())

A single-offset state record overrides the batch the offset falls in (a nack or a reclaim of
one member of a batch). Durable LMDB commits cost about 390 µs, so a consumer leases many
fresh offsets as one batch record and folds its pending acks into the same transaction
(notes/hotpath.md goal 3); a message that is already on a retry is leased alone, so a task
that crashes its process does not charge its neighbours.

All times here are wall-clock milliseconds since the Unix epoch (leases and schedules must
mean the same in every process).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import lmdb
import msgpack

from .errors import DiskFullError, FormatVersionError, QueueError, ReadOnlyError
from .record import FORMAT_VERSION

log = logging.getLogger(__name__)

DATABASES = ("meta", "groups", "acks", "state", "batches", "due", "dead")
MAP_SIZE_BYTES = 256 << 20  # 256 MiB of address space to start; sparse, grows on demand
MAX_READERS = 512
_GID = struct.Struct(">I")
_OFF = struct.Struct(">IQ")
_DUE = struct.Struct(">IQQ")
_U64 = struct.Struct(">Q")
_RP = struct.Struct(">QQQ")
_packer = msgpack.Packer(use_bin_type=True)


def _pack(obj: Any) -> bytes:
    data: bytes = _packer.pack(obj)
    return data


def _unpack(data: Any) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# --------------------------------------------------------------------------- shared environments

_envs: dict[str, tuple[lmdb.Environment, int]] = {}  # realpath -> (env, users)
_envs_lock = threading.Lock()  # guards _envs
_forked_envs: list[lmdb.Environment] = []  # parent's envs in a child: never used, never closed


def _forget_envs_after_fork() -> None:
    # LMDB forbids using a parent's environment in a forked child (py-lmdb #346). Closing it
    # there would touch the parent's lock state, so keep the objects alive and unused.
    global _envs_lock
    _forked_envs.extend(env for env, _users in _envs.values())
    _envs.clear()
    _envs_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_envs_after_fork)


def _acquire_env(path: str, readonly: bool) -> lmdb.Environment:
    key = os.path.realpath(path)
    with _envs_lock:
        entry = _envs.get(key)
        if entry is not None:
            _envs[key] = (entry[0], entry[1] + 1)
            return entry[0]
        # A read-only handle still takes LMDB's reader lock when it can write lock.mdb, so it
        # sees consistent snapshots of a live queue; on a read-only filesystem it cannot, and
        # reads without it (fine for a queue nobody is writing).
        lock = not readonly or os.access(os.path.join(path, "lock.mdb"), os.W_OK)
        env = lmdb.open(path, map_size=MAP_SIZE_BYTES, max_dbs=8, max_readers=MAX_READERS, subdir=True,
                        readonly=readonly, lock=lock, create=not readonly, mode=0o600)
        _envs[key] = (env, 1)
        return env


def _release_env(path: str) -> None:
    key = os.path.realpath(path)
    with _envs_lock:
        entry = _envs.get(key)
        if entry is None:
            return
        env, users = entry
        if users > 1:
            _envs[key] = (env, users - 1)
            return
        del _envs[key]
    env.close()


# --------------------------------------------------------------------------- records


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

    def pack(self) -> bytes:
        return _pack([self.gid, self.committed, self.committed_seg, self.committed_pos, self.dispatch,
                      self.dispatch_seg, self.dispatch_pos, self.dead, self.damaged])

    @classmethod
    def unpack(cls, data: Any) -> GroupState:
        return cls(*_unpack(data)[:9])


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


@dataclass(frozen=True)
class GroupCounts:
    committed: int
    dispatch: int
    acked_above: int  # done offsets in [W, D)
    in_flight: int
    waiting: int  # nacked / reclaimed, waiting for their retry time
    delayed: int  # never delivered, waiting for their not-before time
    dead: int
    damaged: int


def owner_token() -> tuple[int, int]:
    """(pid, process start time) names a live process without confusion by pid reuse."""
    pid = os.getpid()
    return pid, _start_time(pid)


def _start_time(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def owner_alive(owner: list[Any]) -> bool:
    pid, start = owner[0], owner[1]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not start or _start_time(pid) in (start, 0)


# --------------------------------------------------------------------------- the index


class Index:
    """The LMDB environment of one queue directory, shared by every handle in this process."""

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        self.path = path
        self.env_path = os.path.join(path, "index")
        self.readonly = readonly
        created = not os.path.exists(os.path.join(self.env_path, "data.mdb"))
        try:
            self.env = _acquire_env(self.env_path, readonly)
        except lmdb.ReadonlyError as exc:
            raise ReadOnlyError(f"{self.env_path} is read-only; open the queue where it can write") from exc
        except lmdb.Error as exc:
            raise _translate(exc, self.env_path) from exc
        self._open_dbs()
        if created and not readonly:
            # LMDB never fsyncs its directory: without this a power cut can erase a new
            # queue's index (notes/powerloss.md, test_lmdb_new_env_without_dir_fsync_vanishes).
            _fsync_dir(self.env_path)
            _fsync_dir(self.path)
        self._check_format()
        self._closed = False

    def _open_dbs(self) -> None:
        env = self.env
        if self.readonly:
            with env.begin() as txn:
                names = {k for k, _ in txn.cursor()}
            self.db: dict[str, Any] = {}
            for name in DATABASES:
                if name.encode() in names:
                    self.db[name] = env.open_db(name.encode(), create=False)
            return
        self.db = {name: env.open_db(name.encode()) for name in DATABASES}

    def _check_format(self) -> None:
        meta = self.db.get("meta")
        if meta is None:
            return
        with self.env.begin(db=meta) as txn:
            raw = txn.get(b"format")
        if raw is None:
            if not self.readonly:
                self.write(lambda txn: txn.put(b"format", _U64.pack(FORMAT_VERSION), db=self.db["meta"]))
            return
        found = _U64.unpack(raw)[0]
        if found > FORMAT_VERSION:
            raise FormatVersionError(found, FORMAT_VERSION, self.env_path)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _release_env(self.env_path)

    # ------------------------------------------------------------------ transactions

    def write(self, fn: Callable[[lmdb.Transaction], Any]) -> Any:
        """Run `fn` in a durable write transaction, growing the map when it is full."""
        for _ in range(8):
            try:
                with self.env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                size = self.env.info()["map_size"]
                log.info("%s: growing the LMDB map to %d bytes", self.env_path, size * 2)
                self.env.set_mapsize(size * 2)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)  # another process grew it: adopt the new size
            except lmdb.Error as exc:
                raise _translate(exc, self.env_path) from exc
        raise QueueError(f"{self.env_path}: the index could not grow; check free disk space")

    def read(self, fn: Callable[[lmdb.Transaction], Any]) -> Any:
        for _ in range(3):
            try:
                with self.env.begin() as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
            except lmdb.Error as exc:
                raise _translate(exc, self.env_path) from exc
        raise QueueError(f"{self.env_path}: the index keeps being resized; retry")

    # ------------------------------------------------------------------ meta

    def recovery_point(self) -> tuple[int, int, int] | None:
        raw = self.read(lambda txn: txn.get(b"rp", db=self.db["meta"]))
        return None if raw is None else _RP.unpack(raw)

    def save_recovery_point(self, rp: tuple[int, int, int]) -> None:
        self.write(lambda txn: txn.put(b"rp", _RP.pack(*rp), db=self.db["meta"]))

    def groups(self) -> dict[str, GroupState]:
        db = self.db.get("groups")
        if db is None:
            return {}
        result: dict[str, GroupState] = self.read(
            lambda txn: {bytes(k).decode(): GroupState.unpack(v) for k, v in txn.cursor(db=db)})
        return result

    def max_dispatched(self) -> int:
        """The lowest offset the next record may take: above everything ever handed out."""
        return max((g.dispatch for g in self.groups().values()), default=0)

    def min_committed(self) -> int | None:
        groups = self.groups()
        return min((g.committed for g in groups.values()), default=None)

    def group(self, name: str, first: tuple[int, int]) -> GroupState:
        """The state of group `name`, created at the oldest record (`first` = seg, offset)."""
        key = name.encode()
        raw = self.read(lambda txn: txn.get(key, db=self.db["groups"]))
        if raw is not None:
            return GroupState.unpack(raw)

        def create(txn: lmdb.Transaction) -> GroupState:
            raw = txn.get(key, db=self.db["groups"])
            if raw is not None:
                return GroupState.unpack(raw)
            used = {GroupState.unpack(v).gid for _k, v in txn.cursor(db=self.db["groups"])}
            gid = max(used, default=0) + 1
            seg, offset = first
            state = GroupState(gid, offset, seg, 0, offset, seg, 0)
            txn.put(key, state.pack(), db=self.db["groups"])
            return state

        state: GroupState = self.write(create)
        return state

    # ------------------------------------------------------------------ the consumer exchange

    def exchange(
        self,
        group: str,
        owner: list[Any],
        *,
        acks: Iterable[int] = (),
        skips: Iterable[tuple[int, int]] = (),
        nacks: Iterable[tuple[int, int, int, int, bool]] = (),
        want: int = 0,
        lease_ms: int = 30_000,
        read: ReadFn | None = None,
        now_ms: int | None = None,
    ) -> tuple[list[Grant], GroupState]:
        """One durable transaction: apply acks/skips/nacks, then lease up to `want` messages.

        Args:
            acks: offsets this consumer finished.
            skips: [first, next) ranges that will never be delivered (damage, gaps).
            nacks: (offset, seg, pos, due_ms, charged): hand a message back; `charged` False
                means the delivery is not counted (close(), prefetched but never handed out).
            want: how many messages to lease; retries are leased one at a time.
            read: reads records from the log, `read(seg, pos, offset, n) -> ReadResult`.
        Returns:
            The grants and the group state after the transaction.
        """
        key = group.encode()
        acks = sorted(acks)
        skips = list(skips)
        nacks = list(nacks)

        def txn_fn(txn: lmdb.Transaction) -> tuple[list[Grant], GroupState]:
            now = now_ms if now_ms is not None else int(time.time() * 1000)
            raw = txn.get(key, db=self.db["groups"])
            if raw is None:
                raise QueueError(f"consumer group {group!r} vanished from the index")
            g = GroupState.unpack(raw)
            tx = _Txn(self, txn, g)
            for first, nxt in skips:
                tx.mark_done(first, nxt)
            for offset in acks:
                tx.mark_done(offset, offset + 1)
            for offset, seg, pos, due, charged in nacks:
                tx.hand_back(offset, seg, pos, due, charged)
            tx.advance()
            grants: list[Grant] = []
            if want > 0 and read is not None:
                grants = tx.lease(owner, want, now, lease_ms, read)
            tx.advance()
            packed = g.pack()
            if packed != raw:  # an unchanged group costs no commit (LMDB skips clean txns)
                txn.put(key, packed, db=self.db["groups"])
            return grants, g

        result: tuple[list[Grant], GroupState] = self.write(txn_fn)
        return result

    def next_due_ms(self, group: GroupState) -> int | None:
        """The earliest time a waiting or leased message of `group` needs attention."""
        def fn(txn: lmdb.Transaction) -> int | None:
            cur = txn.cursor(db=self.db["due"])
            prefix = _GID.pack(group.gid)
            if cur.set_range(prefix) and cur.key()[:4] == prefix:
                return int(_DUE.unpack(cur.key())[1])
            return None
        result: int | None = self.read(fn)
        return result

    def peek(self, group: str) -> GroupState | None:
        raw = self.read(lambda txn: txn.get(group.encode(), db=self.db["groups"]))
        return None if raw is None else GroupState.unpack(raw)

    def reap_dead_owners(self, group: str) -> int:
        """Make the leases of processes that no longer exist due now; return how many."""
        g = self.peek(group)
        if g is None:
            return 0
        prefix = _GID.pack(g.gid)

        def find(txn: lmdb.Transaction) -> list[tuple[str, int, int]]:
            found: list[tuple[str, int, int]] = []
            for kind in ("batches", "state"):
                cur = txn.cursor(db=self.db[kind])
                if not cur.set_range(prefix):
                    continue
                for k, v in cur:
                    if k[:4] != prefix:
                        break
                    st = _unpack(v)
                    if kind == "state" and st[0] != "L":
                        continue
                    if not owner_alive(st[1]):
                        found.append((kind, _OFF.unpack(k)[1], st[3]))
            return found

        dead = self.read(find)
        if not dead:
            return 0

        def expire(txn: lmdb.Transaction) -> None:
            for kind, offset, deadline in dead:
                k = _OFF.pack(g.gid, offset)
                v = txn.get(k, db=self.db[kind])
                if v is None:
                    continue
                st = _unpack(v)
                if st[3] != deadline:
                    continue  # changed since we looked
                txn.delete(_DUE.pack(g.gid, deadline, offset), db=self.db["due"])
                st[3] = 0
                txn.put(k, _pack(st), db=self.db[kind])
                txn.put(_DUE.pack(g.gid, 0, offset), b"B" if kind == "batches" else b"S", db=self.db["due"])

        self.write(expire)
        log.info("%s: reclaimed %d leases of dead processes in group %r", self.path, len(dead), group)
        return len(dead)

    # ------------------------------------------------------------------ queries

    def counts(self, group: str, now_ms: int | None = None) -> GroupCounts | None:
        now = now_ms if now_ms is not None else int(time.time() * 1000)

        def fn(txn: lmdb.Transaction) -> GroupCounts | None:
            raw = txn.get(group.encode(), db=self.db["groups"])
            if raw is None:
                return None
            g = GroupState.unpack(raw)
            prefix = _GID.pack(g.gid)
            acked = 0
            for k, v in _prefixed(txn, self.db["acks"], prefix):
                off = _OFF.unpack(k)[1]
                acked += (_U64.unpack(v)[0] - off) if v else 1
            in_flight = waiting = delayed = 0
            singles: set[int] = set()
            for k, v in _prefixed(txn, self.db["state"], prefix):
                st = _unpack(v)
                singles.add(_OFF.unpack(k)[1])
                if st[0] == "L":
                    in_flight += 1
                elif st[1] > 0 or st[2] <= now:
                    waiting += 1
                else:
                    delayed += 1
            done = _DoneSet(txn, self.db["acks"], g)
            for k, v in _prefixed(txn, self.db["batches"], prefix):
                first, count = _OFF.unpack(k)[1], _unpack(v)[0]
                for off in range(first, first + count):
                    if off not in singles and not done.contains(off):
                        in_flight += 1
            return GroupCounts(g.committed, g.dispatch, acked, in_flight, waiting, delayed, g.dead, g.damaged)

        result: GroupCounts | None = self.read(fn)
        return result

    def status(self, group: str, offset: int, now_ms: int | None = None) -> str | None:
        """"done", "dead", "in_flight", "waiting", "delayed" or "pending"; None for an unknown group."""
        now = now_ms if now_ms is not None else int(time.time() * 1000)

        def fn(txn: lmdb.Transaction) -> str | None:
            raw = txn.get(group.encode(), db=self.db["groups"])
            if raw is None:
                return None
            g = GroupState.unpack(raw)
            if txn.get(_OFF.pack(g.gid, offset), db=self.db["dead"]) is not None:
                return "dead"
            if offset < g.committed or _DoneSet(txn, self.db["acks"], g).contains(offset):
                return "done"
            if offset >= g.dispatch:
                return "pending"
            v = txn.get(_OFF.pack(g.gid, offset), db=self.db["state"])
            if v is not None:
                st = _unpack(v)
                if st[0] == "L":
                    return "in_flight"
                return "waiting" if st[1] > 0 or st[2] <= now else "delayed"
            return "in_flight"  # a member of a leased batch

        result: str | None = self.read(fn)
        return result

    def record_dead(self, group: str, offset: int, info: dict[str, Any]) -> None:
        """Remember that `offset` was dead-lettered (the ack itself goes through exchange)."""
        def fn(txn: lmdb.Transaction) -> None:
            raw = txn.get(group.encode(), db=self.db["groups"])
            if raw is None:
                return
            g = GroupState.unpack(raw)
            k = _OFF.pack(g.gid, offset)
            if txn.get(k, db=self.db["dead"]) is None:
                txn.put(k, _pack(info), db=self.db["dead"])
                g.dead += 1
                txn.put(group.encode(), g.pack(), db=self.db["groups"])
        self.write(fn)

    def prune_dead_below(self, offset: int) -> None:
        """Forget dead-letter markers of records whose segments are gone."""
        def fn(txn: lmdb.Transaction) -> None:
            cur = txn.cursor(db=self.db["dead"])
            doomed = [k for k, _v in cur if _OFF.unpack(k)[1] < offset]
            for k in doomed:
                txn.delete(k, db=self.db["dead"])
        self.write(fn)


class _DoneSet:
    """Membership in the done ranges of the acks database, for one group."""

    def __init__(self, txn: lmdb.Transaction, db: Any, g: GroupState) -> None:
        self.cur = txn.cursor(db=db)
        self.g = g

    def contains(self, offset: int) -> bool:
        if offset < self.g.committed:
            return True
        cur = self.cur
        key = _OFF.pack(self.g.gid, offset)
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
        return bool(_OFF.unpack(k)[1] < offset < _U64.unpack(v)[0])


class _Txn:
    """The steps of one exchange transaction on one group's state."""

    def __init__(self, index: Index, txn: lmdb.Transaction, g: GroupState) -> None:
        self.txn = txn
        self.g = g
        self.acks = index.db["acks"]
        self.state = index.db["state"]
        self.batches = index.db["batches"]
        self.due = index.db["due"]
        self.prefix = _GID.pack(g.gid)

    def _key(self, offset: int) -> bytes:
        return _OFF.pack(self.g.gid, offset)

    def _drop_state(self, offset: int) -> list[Any] | None:
        """Delete the single-offset state record of `offset` (and its due entry), if any."""
        k = self._key(offset)
        v = self.txn.get(k, db=self.state)
        if v is None:
            return None
        st: list[Any] = _unpack(v)
        due = st[3] if st[0] == "L" else st[2]
        self.txn.delete(k, db=self.state)
        self.txn.delete(_DUE.pack(self.g.gid, due, offset), db=self.due)
        return st

    def _drop_batch(self, first: int, deadline: int) -> None:
        self.txn.delete(self._key(first), db=self.batches)
        self.txn.delete(_DUE.pack(self.g.gid, deadline, first), db=self.due)

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
            self.txn.put(self._key(first), _U64.pack(nxt), db=self.acks)

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
            g.committed = _U64.unpack(v)[0] if v else g.committed + 1
        # Batches and single records wholly below W are finished: drop them.
        for first, st in list(_prefixed_items(txn, self.batches, self.prefix, below=g.committed)):
            if first + st[0] <= g.committed:
                self._drop_batch(first, st[3])
        for offset, _st in list(_prefixed_items(txn, self.state, self.prefix, below=g.committed)):
            self._drop_state(offset)
        if g.committed >= g.dispatch:
            g.committed_seg, g.committed_pos = g.dispatch_seg, g.dispatch_pos
            g.dispatch = max(g.dispatch, g.committed)

    def hand_back(self, offset: int, seg: int, pos: int, due: int, charged: bool) -> None:
        """Make `offset` deliverable again at `due`; uncharged hand-backs keep its attempt count."""
        if offset < self.g.committed or offset >= self.g.dispatch:
            return
        if _DoneSet(self.txn, self.acks, self.g).contains(offset):
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
        self.txn.put(self._key(offset), _pack(["W", attempt, due, seg, pos]), db=self.state)
        self.txn.put(_DUE.pack(self.g.gid, due, offset), b"S", db=self.due)

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
        first = _OFF.unpack(k)[1]
        st: list[Any] = _unpack(cur.value())
        return st if first <= offset < first + st[0] else None

    def lease(self, owner: list[Any], want: int, now: int, lease_ms: int, read: ReadFn) -> list[Grant]:
        """Lease due messages, or else up to `want` fresh offsets as one batch record.

        Due messages come first, oldest due first. One that was delivered before (a retry) is
        leased alone, so a task that crashes its process does not charge its neighbours;
        never-delivered ones (handed back, delayed) are leased together.
        """
        g = self.g
        deadline = now + lease_ms
        for first, st in self._due(now, b"B"):
            self._reclaim_batch(first, st, now, read)
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
            self._drop_state(offset)
            if not got.records or got.records[0][1].offset != offset:
                # The record is gone (a deleted segment) or unreadable: it can never be delivered.
                self.mark_done(offset, offset + 1)
                g.damaged += 1
                continue
            self.txn.put(self._key(offset), _pack(["L", owner, attempt + 1, deadline, seg, pos]), db=self.state)
            self.txn.put(_DUE.pack(g.gid, deadline, offset), b"S", db=self.due)
            grants.append(Grant(offset, seg, pos, attempt + 1, deadline, got.records[0][1]))
            if attempt > 0:
                break
        if grants:
            return grants
        result = read(g.dispatch_seg, g.dispatch_pos, g.dispatch, want)
        for d in result.damage:
            self.mark_done(d.first_offset, d.next_offset)
            g.damaged += d.next_offset - d.first_offset
        for seg, rec in result.records:
            grants.append(Grant(rec.offset, seg, rec.pos, 1, deadline, rec))
        if grants:
            first, count = grants[0].offset, grants[-1].offset - grants[0].offset + 1
            self.txn.put(self._key(first), _pack([count, owner, 1, deadline, grants[0].seg, grants[0].pos]),
                         db=self.batches)
            self.txn.put(_DUE.pack(g.gid, deadline, first), b"B", db=self.due)
        g.dispatch = max(g.dispatch, result.next_offset)
        g.dispatch_seg, g.dispatch_pos = result.position
        return grants

    def _due(self, now: int, kind: bytes, limit: int = 1 << 30) -> list[tuple[int, list[Any]]]:
        """Batch leases (kind b"B") or single records (b"S") due by `now`, oldest first."""
        out: list[tuple[int, list[Any]]] = []
        db = self.batches if kind == b"B" else self.state
        cur = self.txn.cursor(db=self.due)
        if not cur.set_range(self.prefix):
            return out
        for k, v in cur:
            gid, due, offset = _DUE.unpack(k)
            if gid != self.g.gid or due > now or len(out) >= limit:
                break
            if v != kind:
                continue
            st = self.txn.get(self._key(offset), db=db)
            if st is not None:
                out.append((offset, _unpack(st)))
        return out

    def _reclaim_batch(self, first: int, st: list[Any], now: int, read: ReadFn) -> None:
        """A batch lease ran out: every member not done nor overridden waits for a retry."""
        count, attempt, deadline, seg, pos = st[0], st[2], st[3], st[4], st[5]
        self._drop_batch(first, deadline)
        done = _DoneSet(self.txn, self.acks, self.g)
        result = read(seg, pos, first, count)
        for rseg, rec in result.records:
            if rec.offset >= first + count:
                break
            if done.contains(rec.offset) or self.txn.get(self._key(rec.offset), db=self.state) is not None:
                continue
            self._put_waiting(rec.offset, attempt, now, rseg, rec.pos)
        for d in result.damage:
            self.mark_done(d.first_offset, min(d.next_offset, first + count))


def _prefixed(txn: lmdb.Transaction, db: Any, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of `db` whose key starts with `prefix` (one group's records)."""
    cur = txn.cursor(db=db)
    if not cur.set_range(prefix):
        return
    for k, v in cur:
        if k[:4] != prefix:
            return
        yield bytes(k), bytes(v)


def _prefixed_items(txn: lmdb.Transaction, db: Any, prefix: bytes, *, below: int) -> Iterator[tuple[int, Any]]:
    """(offset, decoded value) of one group's records with offsets below `below`."""
    for k, v in _prefixed(txn, db, prefix):
        offset = _OFF.unpack(k)[1]
        if offset >= below:
            return
        yield offset, _unpack(v)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _translate(exc: lmdb.Error, where: str) -> QueueError:
    text = str(exc)
    if isinstance(exc, lmdb.DiskError) or "No space left" in text or getattr(exc, "errno", None) == errno.ENOSPC:
        return DiskFullError(f"{where}: no space left for the index ({text}); free disk space and retry")
    if isinstance(exc, lmdb.ReadonlyError) or "Read-only" in text or "Permission denied" in text:
        return ReadOnlyError(f"{where}: the index cannot be written ({text})")
    return QueueError(f"{where}: index error: {text}")


def is_unreadable(exc: BaseException) -> bool:
    """Whether opening the index failed because its files are damaged (so rebuild it)."""
    return isinstance(exc, (lmdb.InvalidError, lmdb.CorruptedError, lmdb.VersionMismatchError,
                            lmdb.PageNotFoundError, lmdb.BadValsizeError))
