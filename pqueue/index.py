"""The LMDB state of a queue: per-group offsets, acks, leases, attempts, schedule; meta.

This is the only module that opens LMDB: it owns the environments, runs every transaction
(growing the map, translating errors) and answers the queries. One group's write-transaction
steps (leases, hand-backs, acks, the due and priority scans, batch reclaim) live in
leases.py, which exchange() and extend() drive inside a transaction begun here; how keys and
values are encoded (the struct layouts, msgpack, GroupState) lives in tables.py. Both import
``lmdb`` for type annotations only. Everything in the index can be rebuilt from the log:
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import lmdb

from .errors import DiskFullError, FormatVersionError, QueueError, ReadOnlyError
from .leases import DoneSet, Grant, GroupTxn, ReadFn
from .record import FORMAT_VERSION
from .tables import DUE, GID, OFF, READY, RP, U64, GroupState, pack_value, prefixed, unpack_value

log = logging.getLogger(__name__)

DATABASES = ("meta", "groups", "acks", "state", "batches", "due", "dead", "ready", "keys", "keytimes", "results",
             "resulttimes")
MAP_SIZE_BYTES = 256 << 20  # 256 MiB of address space to start; sparse, grows on demand
MAX_READERS = 512


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
                self.write(lambda txn: txn.put(b"format", U64.pack(FORMAT_VERSION), db=self.db["meta"]))
            return
        try:
            found = U64.unpack(raw)[0]
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
            return None if raw is None else RP.unpack(raw)
        result: tuple[int, int, int] | None = self.read(fn)
        return result

    def save_recovery_point(self, rp: tuple[int, int, int]) -> None:
        self.write(lambda txn: txn.put(b"rp", RP.pack(*rp), db=self.db["meta"]))

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
            tx = GroupTxn(self, txn, g)
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
                prio_from = None if prio_raw is None else U64.unpack(prio_raw)[0]
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
            prefix = GID.pack(group.gid)
            if cur.set_range(prefix) and cur.key()[:4] == prefix:
                return int(DUE.unpack(cur.key())[1])
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
        prefix = GID.pack(g.gid)

        def find(txn: lmdb.Transaction) -> list[tuple[str, int, int]]:
            found: list[tuple[str, int, int]] = []
            for kind in ("batches", "state"):
                cur = txn.cursor(db=self.db[kind])
                if not cur.set_range(prefix):
                    continue
                for k, v in cur:
                    if k[:4] != prefix:
                        break
                    st = unpack_value(v)
                    if kind == "state" and st[0] != "L":
                        continue
                    if not owner_alive(st[1]):
                        found.append((kind, OFF.unpack(k)[1], st[3]))
            return found

        dead = self.read(find)
        if not dead:
            return 0

        def expire(txn: lmdb.Transaction) -> None:
            for kind, offset, deadline in dead:
                k = OFF.pack(g.gid, offset)
                v = txn.get(k, db=self.db[kind])
                if v is None:
                    continue
                st = unpack_value(v)
                if st[3] != deadline:
                    continue  # changed since we looked
                kind_byte = b"B" if kind == "batches" else b"S"
                txn.delete(DUE.pack(g.gid, deadline, kind_byte, offset), db=self.db["due"])
                st[3] = 0
                txn.put(k, pack_value(st), db=self.db[kind])
                txn.put(DUE.pack(g.gid, 0, kind_byte, offset), b"", db=self.db["due"])

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
            prefix = GID.pack(g.gid)
            acked = 0
            for k, v in prefixed(txn, self.db["acks"], prefix):
                off = OFF.unpack(k)[1]
                acked += (U64.unpack(v)[0] - off) if v else 1
            in_flight = waiting = delayed = 0
            singles: set[int] = set()
            for k, v in prefixed(txn, self.db["state"], prefix):
                st = unpack_value(v)
                singles.add(OFF.unpack(k)[1])
                if st[0] == "L":
                    in_flight += 1
                elif st[1] > 0 or st[2] <= now:
                    waiting += 1
                else:
                    delayed += 1
            for k, _v in prefixed(txn, self.db["ready"], prefix):
                singles.add(READY.unpack(k)[2])
            done = DoneSet(txn, self.db["acks"], g)
            for k, v in prefixed(txn, self.db["batches"], prefix):
                first, count = OFF.unpack(k)[1], unpack_value(v)[0]
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
            if txn.get(OFF.pack(g.gid, offset), db=self.db["dead"]) is not None:
                return "dead"
            if offset < g.committed or DoneSet(txn, self.db["acks"], g).contains(offset):
                return "done"
            if offset >= g.dispatch:
                return "pending"
            v = txn.get(OFF.pack(g.gid, offset), db=self.db["state"])
            if v is None and any(txn.get(READY.pack(g.gid, inv, offset), db=self.db["ready"]) is not None
                                 for inv in range(0, 256)):
                return "pending"
            if v is not None:
                st = unpack_value(v)
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
            prefix = GID.pack(g.gid)
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
            return None if raw is None else [int(x) for x in unpack_value(raw)[:4]]
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
                txn.delete(U64.pack(unpack_value(old)[3]) + kb, db=self.db["keytimes"])
            txn.put(kb, pack_value([offset, seg, pos, now_ms]), db=self.db["keys"])
            txn.put(U64.pack(now_ms) + kb, b"", db=self.db["keytimes"])
            cur = txn.cursor(db=self.db["keytimes"])
            doomed: list[bytes] = []
            if cur.first():
                for k in cur.iternext(values=False):
                    if len(doomed) >= 32 or U64.unpack(k[:8])[0] >= now_ms - window_ms:
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
                txn.put(b"prio_from", U64.pack(offset), db=self.db["meta"])
        self.write(fn)

    def priority_from(self) -> int | None:
        def fn(txn: lmdb.Transaction) -> int | None:
            raw = txn.get(b"prio_from", db=self.db["meta"])
            return None if raw is None else int(U64.unpack(raw)[0])
        result: int | None = self.read(fn)
        return result

    def count_dropped(self, first: int, nxt: int) -> None:
        """A byte cap deleted offsets [first, nxt) unread: count them for `stat`."""
        def fn(txn: lmdb.Transaction) -> None:
            raw = txn.get(b"dropped", db=self.db["meta"])
            total = (0 if raw is None else U64.unpack(raw)[0]) + (nxt - first)
            txn.put(b"dropped", U64.pack(total), db=self.db["meta"])
        self.write(fn)

    def dropped(self) -> int:
        db = self.db.get("meta")
        if db is None:
            return 0
        result: int = self.read(lambda txn: 0 if (raw := txn.get(b"dropped", db=db)) is None
                                else int(U64.unpack(raw)[0]))
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
            return GroupTxn(self, txn, GroupState.unpack(raw)).extend(owner, offset, seg, pos, attempt, deadline_ms)

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
        return None if raw is None else int(U64.unpack(raw)[0])

    def periodic_advance(self, name: str, start_ms: int) -> int:
        """Record `start_ms` as `name`'s last enqueued period unless a later one is recorded.

        Never moves backwards, so schedulers of several processes (or a clock that jumped back)
        cannot undo each other. Returns the value now stored.
        """
        key = b"periodic:" + name.encode()

        def fn(txn: lmdb.Transaction) -> int:
            raw = txn.get(key, db=self.db["meta"])
            stored = -1 if raw is None else int(U64.unpack(raw)[0])
            if start_ms > stored:
                txn.put(key, U64.pack(start_ms), db=self.db["meta"])
                return start_ms
            return stored
        result: int = self.write(fn)
        return result

    # ------------------------------------------------------------------ results

    def _put_result(self, txn: lmdb.Transaction, gid: int, offset: int, value: list[Any], expires_ms: int) -> None:
        """Store a task's final state; prune up to 32 expired results on the way."""
        k = OFF.pack(gid, offset)
        old = txn.get(k, db=self.db["results"])
        if old is not None:
            txn.delete(U64.pack(unpack_value(old)[-1]) + k, db=self.db["resulttimes"])
        txn.put(k, pack_value([*value, expires_ms]), db=self.db["results"])
        txn.put(U64.pack(expires_ms) + k, b"", db=self.db["resulttimes"])
        now_ms = int(time.time() * 1000)
        cur = txn.cursor(db=self.db["resulttimes"])
        doomed: list[bytes] = []
        if cur.first():
            for tk in cur.iternext(values=False):
                if len(doomed) >= 32 or U64.unpack(tk[:8])[0] > now_ms:
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
            k = OFF.pack(GroupState.unpack(raw).gid, offset)
            v = txn.get(k, db=self.db["results"])
            if v is None:
                return None
            found: list[Any] = unpack_value(v)
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
            k = OFF.pack(g.gid, offset)
            if txn.get(k, db=self.db["dead"]) is None:
                txn.put(k, pack_value(info), db=self.db["dead"])
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
            doomed = [k for k, _v in cur if OFF.unpack(k)[1] < offset]
            for k in doomed:
                txn.delete(k, db=self.db["dead"])
        self.write(fn)


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
