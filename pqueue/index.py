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
    due      gid|time_ms|B or S|offset -> b""  when a batch (B) or a single record (S) next
                                      needs attention: a lease's deadline or a due time
    dead     gid|offset -> msgpack   offsets that were dead-lettered (for status())
    ready    gid|255-level|offset -> [seg, pos]  undelivered records of priority > 0, found by
                                      the group's priority scan (S), highest level first
    keys     key -> [offset, seg, pos, time_ms]  idempotency keys within the dedup window
    keytimes time_ms|key -> b""      the same keys by age, for pruning
    results  gid|offset -> msgpack   a task's final state and return value, until it expires:
                                      ["done", codec, value, time_ms, expires_ms] or
                                      ["dead", info, time_ms, expires_ms]
    resulttimes expires_ms|gid|offset -> b""  the same by expiry, for pruning

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

from . import schedule
from .errors import DiskFullError, FormatVersionError, QueueError, ReadOnlyError
from .record import ATTR_BOOT, ATTR_NOT_BEFORE, ATTR_PRIORITY, FORMAT_VERSION

log = logging.getLogger(__name__)

DATABASES = ("meta", "groups", "acks", "state", "batches", "due", "dead", "ready", "keys", "keytimes", "results",
             "resulttimes")
MAP_SIZE_BYTES = 256 << 20  # 256 MiB of address space to start; sparse, grows on demand
MAX_READERS = 512
_GID = struct.Struct(">I")
_OFF = struct.Struct(">IQ")
_DUE = struct.Struct(">IQcQ")  # gid, time ms, kind (B batch / S single), offset
_U64 = struct.Struct(">Q")
_RP = struct.Struct(">QQQ")
_READY = struct.Struct(">IBQ")  # gid, 255 - priority level, offset
SCAN_BATCH = 16384  # records looked at for priorities per transaction
_packer = msgpack.Packer(use_bin_type=True)


def _pack(obj: Any) -> bytes:
    data: bytes = _packer.pack(obj)
    return data


def _unpack(data: Any) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# --------------------------------------------------------------------------- shared environments

_envs: dict[str, tuple[lmdb.Environment, dict[str, Any], int]] = {}  # realpath -> (env, databases, users)
_envs_lock = threading.Lock()  # guards _envs


def _forget_envs_after_fork() -> None:
    # LMDB forbids using a parent's environment in a forked child (py-lmdb #346), and py-lmdb
    # refuses to open the same files again while the inherited object is open. Closing the
    # inherited object in the child is safe: LMDB's fcntl locks belong to the parent process
    # (a child never inherits them), and close() only clears reader slots of the child's pid.
    global _envs_lock
    inherited = [env for env, _dbs, _users in _envs.values()]
    _envs.clear()
    _envs_lock = threading.Lock()
    for env in inherited:
        env.close()


os.register_at_fork(after_in_child=_forget_envs_after_fork)


def _acquire_env(path: str, readonly: bool) -> tuple[lmdb.Environment, dict[str, Any]]:
    """The process's environment for `path` and its named databases, opened once.

    The databases are opened here, once per environment and under `_envs_lock`: py-lmdb's
    open_db() begins a write transaction without releasing the GIL, so calling it while
    another thread of this process holds a write transaction on the environment deadlocks
    (seen with three threads creating one queue at once).
    """
    key = os.path.realpath(path)
    with _envs_lock:
        entry = _envs.get(key)
        if entry is not None:
            _envs[key] = (entry[0], entry[1], entry[2] + 1)
            return entry[0], entry[1]
        # A read-only handle still takes LMDB's reader lock when it can write lock.mdb, so it
        # sees consistent snapshots of a live queue; on a read-only filesystem it cannot, and
        # reads without it (fine for a queue nobody is writing).
        lock = not readonly or os.access(os.path.join(path, "lock.mdb"), os.W_OK)
        env = lmdb.open(path, map_size=MAP_SIZE_BYTES, max_dbs=16, max_readers=MAX_READERS, subdir=True,
                        readonly=readonly, lock=lock, create=not readonly, mode=0o600)
        try:
            dbs = _open_dbs(env, readonly)
        except BaseException:
            env.close()
            raise
        _envs[key] = (env, dbs, 1)
        return env, dbs


def _open_dbs(env: lmdb.Environment, readonly: bool) -> dict[str, Any]:
    if not readonly:
        return {name: env.open_db(name.encode()) for name in DATABASES}
    with env.begin() as txn:
        names = {bytes(k) for k, _ in txn.cursor()}
    return {name: env.open_db(name.encode(), create=False) for name in DATABASES if name.encode() in names}


def _release_env(path: str) -> None:
    key = os.path.realpath(path)
    with _envs_lock:
        entry = _envs.get(key)
        if entry is None:
            return
        env, dbs, users = entry
        if users > 1:
            _envs[key] = (env, dbs, users - 1)
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
    dropped: int = 0  # records deleted unread by a drop_oldest byte cap
    scan: int = 0  # S: records below it were looked at for priorities (>= D when in use)
    scan_seg: int = 0
    scan_pos: int = 0

    def pack(self) -> bytes:
        return _pack([self.gid, self.committed, self.committed_seg, self.committed_pos, self.dispatch,
                      self.dispatch_seg, self.dispatch_pos, self.dead, self.damaged, self.dropped,
                      self.scan, self.scan_seg, self.scan_pos])

    @classmethod
    def unpack(cls, data: Any) -> GroupState:
        return cls(*_unpack(data)[:13])


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
        self.fresh = created and not readonly  # a new (or rebuilt) index: keys need restoring
        if not readonly:
            # py-lmdb would create the directory with the file mode (0600, no search bit):
            # create it first, private, so the queue owner can use it.
            os.makedirs(self.env_path, mode=0o700, exist_ok=True)
        try:
            self.env, self.db = _acquire_env(self.env_path, readonly)
        except lmdb.ReadonlyError as exc:
            raise ReadOnlyError(f"{self.env_path} is read-only; open the queue where it can write") from exc
        except lmdb.Error as exc:
            raise _translate(exc, self.env_path) from exc
        except _DAMAGED_VALUE as exc:
            raise _damaged(exc, self.env_path) from exc
        try:
            self._check_format()
        except BaseException:
            _release_env(self.env_path)  # a later open must not find a half-opened environment
            raise
        if created and not readonly:
            # LMDB never fsyncs its directory: without this a power cut can erase a new
            # queue's index (notes/powerloss.md, test_lmdb_new_env_without_dir_fsync_vanishes).
            _fsync_dir(self.env_path)
            _fsync_dir(self.path)
        self._closed = False

    def _check_format(self) -> None:
        meta = self.db.get("meta")
        if meta is None:
            return
        raw = self.read(lambda txn: txn.get(b"format", db=meta))
        if raw is None:
            if not self.readonly:
                self.write(lambda txn: txn.put(b"format", _U64.pack(FORMAT_VERSION), db=self.db["meta"]))
            return
        try:
            found = _U64.unpack(raw)[0]
        except struct.error as exc:
            raise _damaged(exc, self.env_path) from exc
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
            except _DAMAGED_VALUE as exc:
                raise _damaged(exc, self.env_path) from exc
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
            except _DAMAGED_VALUE as exc:
                raise _damaged(exc, self.env_path) from exc
        raise QueueError(f"{self.env_path}: the index keeps being resized; retry")

    # ------------------------------------------------------------------ meta

    def recovery_point(self) -> tuple[int, int, int] | None:
        def fn(txn: lmdb.Transaction) -> tuple[int, int, int] | None:
            raw = txn.get(b"rp", db=self.db["meta"])
            return None if raw is None else _RP.unpack(raw)
        result: tuple[int, int, int] | None = self.read(fn)
        return result

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
        existing = self.peek(name)
        if existing is not None:
            return existing

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
        results: dict[int, tuple[int, bytes, int]] | None = None,
        want: int = 0,
        lease_ms: int = 30_000,
        read: ReadFn | None = None,
        now_ms: int | None = None,
        choose_level: Callable[[list[int]], int] | None = None,
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
            if results:
                for offset, (codec, value, ttl_ms) in results.items():
                    self._put_result(txn, g.gid, offset, ["done", codec, value, now], now + ttl_ms)
            for offset, seg, pos, due, charged in nacks:
                tx.hand_back(offset, seg, pos, due, charged)
            tx.advance()
            grants: list[Grant] = []
            if want > 0 and read is not None:
                prio_raw = txn.get(b"prio_from", db=self.db["meta"])
                prio_from = None if prio_raw is None else _U64.unpack(prio_raw)[0]
                grants = tx.lease(owner, want, now, lease_ms, read, prio_from, choose_level)
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
        def fn(txn: lmdb.Transaction) -> GroupState | None:
            raw = txn.get(group.encode(), db=self.db["groups"])
            return None if raw is None else GroupState.unpack(raw)
        result: GroupState | None = self.read(fn)
        return result

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
                kind_byte = b"B" if kind == "batches" else b"S"
                txn.delete(_DUE.pack(g.gid, deadline, kind_byte, offset), db=self.db["due"])
                st[3] = 0
                txn.put(k, _pack(st), db=self.db[kind])
                txn.put(_DUE.pack(g.gid, 0, kind_byte, offset), b"", db=self.db["due"])

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
            for k, _v in _prefixed(txn, self.db["ready"], prefix):
                singles.add(_READY.unpack(k)[2])
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
            if v is None and any(txn.get(_READY.pack(g.gid, inv, offset), db=self.db["ready"]) is not None
                                 for inv in range(0, 256)):
                return "pending"
            if v is not None:
                st = _unpack(v)
                if st[0] == "L":
                    return "in_flight"
                return "waiting" if st[1] > 0 or st[2] <= now else "delayed"
            return "in_flight"  # a member of a leased batch

        result: str | None = self.read(fn)
        return result

    def move_group(self, group: str, offset: int, seg: int, pos: int) -> bool:
        """Set `group`'s committed offset to `offset`, the record at (`seg`, `pos`) (`pqueue groups --set`).

        Everything below `offset` counts as done and everything from it on is delivered again:
        the group's acks, leases and retry schedule are dropped; its dead-letter count stays.
        Meant for a stopped group: a lease still held elsewhere may ack an offset afterwards.

        Returns:
            False when the group does not exist (nothing changed).
        """
        key = group.encode()

        def fn(txn: lmdb.Transaction) -> bool:
            raw = txn.get(key, db=self.db["groups"])
            if raw is None:
                return False
            g = GroupState.unpack(raw)
            prefix = _GID.pack(g.gid)
            for name in ("acks", "state", "batches", "due", "ready"):
                cur = txn.cursor(db=self.db[name])
                if cur.set_range(prefix):
                    while cur.key()[:4] == prefix and cur.delete():
                        pass
            g.committed = g.dispatch = g.scan = offset
            g.committed_seg = g.dispatch_seg = g.scan_seg = seg
            g.committed_pos = g.dispatch_pos = g.scan_pos = pos
            txn.put(key, g.pack(), db=self.db["groups"])
            return True

        return bool(self.write(fn))

    # ------------------------------------------------------------------ keys, priorities, drops

    def key_lookup(self, key: str) -> list[int] | None:
        """[offset, seg, pos, time_ms] of idempotency key `key`, or None."""
        def fn(txn: lmdb.Transaction) -> list[int] | None:
            raw = txn.get(key.encode(), db=self.db["keys"])
            return None if raw is None else [int(x) for x in _unpack(raw)[:4]]
        result: list[int] | None = self.read(fn)
        return result

    def key_claim(self, key: str, offset: int, seg: int, pos: int, now_ms: int, window_ms: int) -> None:
        """Record that `key` names the record about to be written at (seg, pos) as `offset`.

        Durable before the record is written: a crash in between leaves a key that points at
        a record without it, which the lookup rejects (see keys.py). Up to 32 keys older than
        the window are pruned in the same transaction, so the table stays bounded.
        """
        kb = key.encode()

        def fn(txn: lmdb.Transaction) -> None:
            old = txn.get(kb, db=self.db["keys"])
            if old is not None:
                txn.delete(_U64.pack(_unpack(old)[3]) + kb, db=self.db["keytimes"])
            txn.put(kb, _pack([offset, seg, pos, now_ms]), db=self.db["keys"])
            txn.put(_U64.pack(now_ms) + kb, b"", db=self.db["keytimes"])
            cur = txn.cursor(db=self.db["keytimes"])
            doomed: list[bytes] = []
            if cur.first():
                for k in cur.iternext(values=False):
                    if len(doomed) >= 32 or _U64.unpack(k[:8])[0] >= now_ms - window_ms:
                        break
                    doomed.append(bytes(k))
            for k in doomed:
                txn.delete(k, db=self.db["keytimes"])
                txn.delete(k[8:], db=self.db["keys"])

        self.write(fn)

    def note_priority(self, offset: int) -> None:
        """Remember that records from `offset` on may carry priorities (turns the scan on)."""
        def fn(txn: lmdb.Transaction) -> None:
            if txn.get(b"prio_from", db=self.db["meta"]) is None:
                txn.put(b"prio_from", _U64.pack(offset), db=self.db["meta"])
        self.write(fn)

    def priority_from(self) -> int | None:
        def fn(txn: lmdb.Transaction) -> int | None:
            raw = txn.get(b"prio_from", db=self.db["meta"])
            return None if raw is None else int(_U64.unpack(raw)[0])
        result: int | None = self.read(fn)
        return result

    def count_dropped(self, first: int, nxt: int) -> None:
        """A byte cap deleted offsets [first, nxt) unread: count them for `stat`."""
        def fn(txn: lmdb.Transaction) -> None:
            raw = txn.get(b"dropped", db=self.db["meta"])
            total = (0 if raw is None else _U64.unpack(raw)[0]) + (nxt - first)
            txn.put(b"dropped", _U64.pack(total), db=self.db["meta"])
        self.write(fn)

    def dropped(self) -> int:
        db = self.db.get("meta")
        if db is None:
            return 0
        result: int = self.read(lambda txn: 0 if (raw := txn.get(b"dropped", db=db)) is None
                                else int(_U64.unpack(raw)[0]))
        return result

    def extend(self, group: str, owner: list[Any], offset: int, seg: int, pos: int, attempt: int,
               deadline_ms: int) -> bool:
        """Move the lease deadline of `offset` (held by `owner`) to `deadline_ms`.

        A member of a batch lease gets a single-offset lease of its own. Returns False when the
        lease is no longer this owner's (it ran out and went elsewhere, or the message is done).
        """
        def fn(txn: lmdb.Transaction) -> bool:
            raw = txn.get(group.encode(), db=self.db["groups"])
            if raw is None:
                return False
            tx = _Txn(self, txn, GroupState.unpack(raw))
            if offset < tx.g.committed or _DoneSet(txn, self.db["acks"], tx.g).contains(offset):
                return False
            v = txn.get(tx._key(offset), db=self.db["state"])
            if v is not None:
                st = _unpack(v)
                if st[0] != "L" or st[1] != owner:
                    return False
            else:
                batch = tx._batch_of(offset)
                if batch is None or batch[1] != owner:
                    return False
            tx._drop_state(offset)
            tx._lease_one(owner, offset, seg, pos, attempt, deadline_ms)
            return True

        return bool(self.write(fn))

    def periodic_last(self, name: str) -> int | None:
        """The start (Unix ms) of the last period the task scheduler enqueued for periodic task `name`.

        Kept for pqueue.periodic; like the rest of the index it is lost with it, which costs at
        most one period (the scheduler starts over at the next boundary; keys dedupe the rest).
        """
        db = self.db.get("meta")
        if db is None:
            return None
        raw = self.read(lambda txn: txn.get(b"periodic:" + name.encode(), db=db))
        return None if raw is None else int(_U64.unpack(raw)[0])

    def periodic_advance(self, name: str, start_ms: int) -> int:
        """Record `start_ms` as `name`'s last enqueued period unless a later one is recorded.

        Never moves backwards, so schedulers of several processes (or a clock that jumped back)
        cannot undo each other. Returns the value now stored.
        """
        key = b"periodic:" + name.encode()

        def fn(txn: lmdb.Transaction) -> int:
            raw = txn.get(key, db=self.db["meta"])
            stored = -1 if raw is None else int(_U64.unpack(raw)[0])
            if start_ms > stored:
                txn.put(key, _U64.pack(start_ms), db=self.db["meta"])
                return start_ms
            return stored
        result: int = self.write(fn)
        return result

    # ------------------------------------------------------------------ results

    def _put_result(self, txn: lmdb.Transaction, gid: int, offset: int, value: list[Any], expires_ms: int) -> None:
        """Store a task's final state; prune up to 32 expired results on the way."""
        k = _OFF.pack(gid, offset)
        old = txn.get(k, db=self.db["results"])
        if old is not None:
            txn.delete(_U64.pack(_unpack(old)[-1]) + k, db=self.db["resulttimes"])
        txn.put(k, _pack([*value, expires_ms]), db=self.db["results"])
        txn.put(_U64.pack(expires_ms) + k, b"", db=self.db["resulttimes"])
        now_ms = int(time.time() * 1000)
        cur = txn.cursor(db=self.db["resulttimes"])
        doomed: list[bytes] = []
        if cur.first():
            for tk in cur.iternext(values=False):
                if len(doomed) >= 32 or _U64.unpack(tk[:8])[0] > now_ms:
                    break
                doomed.append(bytes(tk))
        for tk in doomed:
            txn.delete(tk, db=self.db["resulttimes"])
            txn.delete(tk[8:], db=self.db["results"])

    def result(self, group: str, offset: int) -> list[Any] | None:
        """["done", codec, value, time_ms, expires_ms] or ["dead", info, time_ms, expires_ms], or None."""
        def fn(txn: lmdb.Transaction) -> list[Any] | None:
            raw = txn.get(group.encode(), db=self.db["groups"])
            if raw is None:
                return None
            k = _OFF.pack(GroupState.unpack(raw).gid, offset)
            v = txn.get(k, db=self.db["results"])
            if v is None:
                return None
            found: list[Any] = _unpack(v)
            return found if found[-1] > time.time() * 1000 else None
        result: list[Any] | None = self.read(fn)
        return result

    def record_dead(self, group: str, offset: int, info: dict[str, Any], *, result_ttl_ms: int = 0) -> None:
        """Remember that `offset` was dead-lettered (the ack itself goes through exchange).

        With `result_ttl_ms`, the death is also kept as the task's result for `Queue.result`.
        """
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
            if result_ttl_ms:
                now_ms = int(time.time() * 1000)
                self._put_result(txn, g.gid, offset, ["dead", info, now_ms], now_ms + result_ttl_ms)
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
        self.ready = index.db["ready"]
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
        self.txn.delete(_DUE.pack(self.g.gid, due, b"S", offset), db=self.due)
        return st

    def _drop_batch(self, first: int, deadline: int) -> None:
        self.txn.delete(self._key(first), db=self.batches)
        self.txn.delete(_DUE.pack(self.g.gid, deadline, b"B", first), db=self.due)

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
        # The committed position is exact when W meets D; otherwise it is the last exact one
        # (a position at or before W). W passes D only over acked priority records, which the
        # dispatch cursor skips when it gets there: D never moves without its position.
        if g.committed == g.dispatch:
            g.committed_seg, g.committed_pos = g.dispatch_seg, g.dispatch_pos

    def hand_back(self, offset: int, seg: int, pos: int, due: int, charged: bool) -> None:
        """Make `offset` deliverable again at `due`; uncharged hand-backs keep its attempt count."""
        if offset < self.g.committed or offset >= max(self.g.dispatch, self.g.scan):
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
        self.txn.put(_DUE.pack(self.g.gid, due, b"S", offset), b"", db=self.due)

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
            self.txn.put(self._key(first), _pack([count, owner, 1, deadline, grants[0].seg, grants[0].pos]),
                         db=self.batches)
            self.txn.put(_DUE.pack(g.gid, deadline, b"B", first), b"", db=self.due)
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
        self.txn.put(self._key(offset), _pack(["L", owner, attempt, deadline, seg, pos]), db=self.state)
        self.txn.put(_DUE.pack(self.g.gid, deadline, b"S", offset), b"", db=self.due)

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
                self.txn.put(_READY.pack(g.gid, 255 - int(level), rec.offset), _pack([seg, rec.pos]),
                             db=self.ready)
        g.scan = max(g.scan, result.next_offset)
        g.scan_seg, g.scan_pos = result.position

    def _ready_levels(self) -> list[int]:
        """Priority levels with ready records, highest first."""
        levels: list[int] = []
        cur = self.txn.cursor(db=self.ready)
        key = _READY.pack(self.g.gid, 0, 0)
        while cur.set_range(key):
            gid, inv, _offset = _READY.unpack(cur.key())
            if gid != self.g.gid:
                break
            levels.append(255 - inv)
            if inv == 255:
                break
            key = _READY.pack(self.g.gid, inv + 1, 0)
        return levels

    def _lease_ready(self, owner: list[Any], level: int, want: int, deadline: int, read: ReadFn) -> list[Grant]:
        """Lease up to `want` ready records of `level`, oldest first, one state record each."""
        grants: list[Grant] = []
        cur = self.txn.cursor(db=self.ready)
        prefix = _READY.pack(self.g.gid, 255 - level, 0)[:5]
        taken: list[tuple[bytes, int, int, int]] = []
        if cur.set_range(prefix):
            for k, v in cur:
                if k[:5] != prefix or len(taken) >= want:
                    break
                seg, pos = _unpack(v)
                taken.append((bytes(k), _READY.unpack(k)[2], seg, pos))
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
            gid, due, k_kind, offset = _DUE.unpack(k)
            if gid != self.g.gid or due > now or len(out) >= limit:
                break
            if k_kind != kind:
                continue
            st = self.txn.get(self._key(offset), db=db)
            if st is not None:
                out.append((offset, _unpack(st)))
        return out

    def _reclaim_batch(self, first: int, st: list[Any], now: int, read: ReadFn, priorities: bool) -> None:
        """A batch lease ran out: every member not done nor overridden waits for a retry.

        Members that were not handed out with the batch (priority records, which live in
        `ready` or have their own state; delayed ones, which have their own state) are skipped.
        """
        count, attempt, deadline, seg, pos = st[0], st[2], st[3], st[4], st[5]
        self._drop_batch(first, deadline)
        done = _DoneSet(self.txn, self.acks, self.g)
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


def _due_ms(rec: Any, now_ms: int) -> int:
    """When a record with a not-before attribute is due, in wall-clock ms (0 when it has none)."""
    not_before = rec.attrs.get(ATTR_NOT_BEFORE) if rec.attrs else None
    if not_before is None:
        return 0
    due = schedule.due_at(float(not_before), rec.timestamp_ns / 1e9, rec.attrs.get(ATTR_BOOT), now_ms / 1000)
    return int(due * 1000)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What decoding a garbage value raises (msgpack's errors are ValueError subclasses).
_DAMAGED_VALUE = (TypeError, ValueError, IndexError, KeyError, struct.error)


class IndexDamaged(QueueError):
    """A value in the index does not decode: the index must be rebuilt from the log."""


def _damaged(exc: BaseException, where: str) -> QueueError:
    return IndexDamaged(f"{where}: the index holds a damaged value ({type(exc).__name__}: {exc}); run "
                        f"`pqueue repair` to rebuild it from the log")


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
                            lmdb.PageNotFoundError, lmdb.BadValsizeError, IndexDamaged))
