"""Operator actions that change a queue beyond the Queue API: repair, move a group, replay dead letters.

`repair` is the only code outside log.py that modifies segment files. It holds the queue's OS
write lock (``flock`` on ``write.lock``, the protocol of log.py) while it does, writes new
files as tmp + fsync + rename + directory fsync, and never deletes a byte: a damaged segment is
hard-linked into ``quarantine/`` before the rewritten one replaces it, and a torn tail is copied
there before it is truncated.

A segment is repaired by splitting it at each damaged span rather than by closing the gap:
every valid record keeps its byte position (relative to its own segment file), so positions
that the index and live readers hold stay meaningful. The part before the first span keeps the
segment's name and gets a seal pointing at the next part; each later part becomes a segment
named by its first offset. Readers then see the damaged offsets as skipped, which is what they
already did when they stepped over the damage.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from filelock import FileLock
from filelock import Timeout as FileLockTimeout

from . import inspect, segment
from .errors import Empty, LockTimeout, QueueError
from .index import Index
from .layout import REPAIR_LOCK
from .log import LEFT_END_AT, LOCK_FILE_BYTES
from .message import Message
from .queue import Queue
from .record import ATTR_META, SEGMENT_HEADER_BYTES, encode_attrs, encode_seal, encode_segment_header

LOCK_TIMEOUT_SECONDS = 30.0  # how long repair waits for live writers to hand over the write lock
LOCK_POLL_SECONDS = 0.001
REPLAY_BATCH = 1000  # dead letters appended per fsync during a replay


@dataclass(frozen=True)
class RepairResult:
    """What `repair` did (or, with dry_run, would do), one sentence per action."""

    actions: tuple[str, ...]
    dry_run: bool
    before: inspect.VerifyResult


# --------------------------------------------------------------------------- the write lock


class _WriteLock:
    """The queue's OS append lock, taken the way log.py takes it (see `Log._take_flock`).

    Raising the waiter byte asks a writer that holds the lock across a burst to hand it over;
    writers also let go after 2 ms idle. Held only by this process, for the whole repair.
    """

    def __init__(self, path: str, timeout: float) -> None:
        lock_path = os.path.join(path, "write.lock")
        self.fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), segment.FILE_MODE)
        try:
            if os.fstat(self.fd).st_size < 8:
                os.ftruncate(self.fd, 8)
            waiter = mmap.mmap(self.fd, 8)
            try:
                self._take(waiter, timeout)
            finally:
                waiter.close()
            # The end the last writer left there will not describe the repaired log: void it,
            # so the next writer scans for the end (zeros fail the CRC, see Log._adopt_left_end).
            os.pwrite(self.fd, bytes(LOCK_FILE_BYTES - LEFT_END_AT), LEFT_END_AT)
        except BaseException:
            os.close(self.fd)
            raise

    def _take(self, waiter: mmap.mmap, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                waiter[0] = 1
                if time.monotonic() > deadline:
                    raise LockTimeout(f"a writer kept the write lock of the queue for {timeout:g} s; "
                                      f"retry, or stop the producers first") from None
                time.sleep(LOCK_POLL_SECONDS)

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


# --------------------------------------------------------------------------- repair


def _write_new(path: str, data: bytes) -> str:
    """Write `data` to ``path.tmp`` and fsync it; the caller renames it into place."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), segment.FILE_MODE)
    try:
        segment.write_all(fd, data)
        os.fsync(fd)  # the content is durable before a name points at it
    finally:
        os.close(fd)
    return tmp


def _quarantine_dir(path: str) -> str:
    qdir = os.path.join(path, "quarantine")
    if not os.path.isdir(qdir):
        os.makedirs(qdir, mode=segment.DIR_MODE, exist_ok=True)
        segment.fsync_dir(path)  # the new directory survives power loss
    return qdir


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime())


def _truncate_tail(path: str, seg: int, pos: int) -> str:
    """Copy the bytes of `seg` from `pos` on to quarantine/, then cut them off (lock held)."""
    seg_path = inspect.segment_path(path, seg)
    fd = os.open(seg_path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        end = os.fstat(fd).st_size
        data = os.pread(fd, end - pos, pos)
        qdir = _quarantine_dir(path)
        target = os.path.join(qdir, f"{seg:020d}-{pos:012d}.tail")
        os.replace(_write_new(target, data), target)
        segment.fsync_dir(qdir)  # the copy survives power loss before the original bytes go
        os.ftruncate(fd, pos)
        os.fsync(fd)  # a crash after this returns cannot bring the torn bytes back
    finally:
        os.close(fd)
    return f"moved the torn tail of {segment.segment_name(seg)} ({end - pos} bytes at byte {pos}) to {target}"


def _seal_active(path: str, seg: int) -> str:
    """Seal the newest segment and start the next one, as a writer's roll does (lock held).

    Writers in other processes learn of it when they next take the lock: their catch-up scan
    follows the seal into the new segment.
    """
    end = inspect._log_end(path)[2]
    fd = os.open(inspect.segment_path(path, seg), os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
    try:
        segment.write_all(fd, encode_seal(end, time.time_ns()))
        os.fsync(fd)  # sealed before the next segment exists, the order log.py's recovery expects
    finally:
        os.close(fd)
    os.close(segment.create(os.path.join(path, "log"), end))
    return f"sealed {segment.segment_name(seg)} at offset {end} and started {segment.segment_name(end)}"


def _parts(path: str, seg: int) -> tuple[list[tuple[int, int, int]], int, list[inspect.Damage]]:
    """Split sealed segment `seg` into runs of valid records: ([(first offset, start, end)], next, damage)."""
    runs: list[tuple[int, int, int]] = []
    damage: list[inspect.Damage] = []
    following = seg
    walker = inspect._Walker(path, from_offset=0, to_offset=None, tail_rechecks=0, start=(seg, 0, seg))
    for item in walker.walk():
        if isinstance(item, inspect.Entry):
            if item.segment != seg:
                break
            if runs and runs[-1][2] == item.pos:
                first, start, _end = runs[-1]
                runs[-1] = (first, start, item.pos + item.record_bytes)
            else:
                runs.append((item.offset, item.pos, item.pos + item.record_bytes))
            following = item.offset + 1
        else:
            if item.segment != seg:
                break
            damage.append(item)
            following = item.next_offset
    if walker.cursor is not None and walker.cursor[0] != seg:
        following = walker.cursor[0]
    else:
        newer = [b for b in segment.list_segments(os.path.join(path, "log")) if b > seg]
        following = max(following, newer[0]) if newer else following
    return runs, following, damage


def _rewrite(path: str, seg: int) -> list[str]:
    """Split sealed segment `seg` around its damage; the original goes to quarantine/ (lock held)."""
    runs, following, damage = _parts(path, seg)
    seg_path = inspect.segment_path(path, seg)
    log_dir = os.path.join(path, "log")
    with open(seg_path, "rb") as f:
        original = f.read()
    qdir = _quarantine_dir(path)
    kept = os.path.join(qdir, f"{segment.segment_name(seg)}.{_stamp()}")
    # A hard link keeps the original bytes under quarantine/ at no cost; the later rename
    # only replaces the name in log/.
    os.link(seg_path, kept)
    segment.fsync_dir(qdir)
    if runs and runs[0][0] == seg and runs[0][1] == SEGMENT_HEADER_BYTES:
        heads = runs
    else:
        heads = [(seg, SEGMENT_HEADER_BYTES, SEGMENT_HEADER_BYTES), *runs]  # an empty first part keeps the name
    now = time.time_ns()
    files: list[tuple[int, str]] = []
    for i, (first, start, end) in enumerate(heads):
        nxt = heads[i + 1][0] if i + 1 < len(heads) else following
        data = encode_segment_header(first, now) + original[start:end] + encode_seal(nxt, now)
        files.append((first, _write_new(os.path.join(log_dir, segment.segment_name(first)), data)))
    # Later parts first, the first part (the original name) last: until that rename the old
    # file's seal still skips the new parts, so a crash in between leaves a readable log and
    # a rerun of repair does the same again.
    for first, tmp in reversed(files):
        os.replace(tmp, os.path.join(log_dir, segment.segment_name(first)))
    segment.fsync_dir(log_dir)
    lost = sum(d.lost_offsets for d in damage)
    spans = sum(d.length for d in damage)
    return [f"moved {segment.segment_name(seg)} to {kept} and rewrote it as {len(files)} segment(s) without "
            f"its {len(damage)} damaged span(s) ({spans} bytes, {lost} offsets)"]


def _rebuild_index(path: str) -> str:
    index_dir = os.path.join(path, "index")
    if os.path.exists(index_dir):
        aside = os.path.join(_quarantine_dir(path), f"index-{_stamp()}")
        os.replace(index_dir, aside)
        segment.fsync_dir(path)  # the move survives power loss before a new index is made
        what = f"moved the broken index to {aside} and built a new one"
    else:
        what = "built a new index (consumer groups start again from the oldest record)"
    Queue(path, create=False).close()  # opening a queue creates its index
    return what


def repair(path: str | os.PathLike[str], *, dry_run: bool = False,
           progress: inspect.ProgressFn | None = None) -> RepairResult:
    """Truncate a torn tail, move damaged spans to quarantine/, rebuild a missing or broken index.

    Args:
        dry_run: only say what would be done.
        progress: called with (bytes checked, bytes in total) during the first check.
    Returns:
        The actions taken, and the verify result they were based on.
    Raises:
        NotAQueueError: `path` is not a queue directory.
        LockTimeout: writers kept the write lock for LOCK_TIMEOUT_SECONDS.
    """
    qpath = inspect.check_queue(path)
    before = inspect.verify(qpath, progress=progress)
    bases = segment.list_segments(os.path.join(qpath, "log")) if os.path.isdir(os.path.join(qpath, "log")) else []
    newest = bases[-1] if bases else -1
    tails = sorted({d.segment: d.pos for d in before.damage if d.kind == inspect.TORN_TAIL and d.segment == newest
                    and d.length}.items())
    broken = sorted({d.segment for d in before.damage if not (d.kind == inspect.TORN_TAIL and d.segment == newest)}
                    | {d.segment for d in before.notes if d.kind == inspect.UNSEALED})
    index_broken = before.index_state in ("missing", "unreadable")
    if dry_run:
        plan = [f"would move the torn tail of {segment.segment_name(s)} (from byte {p}) to quarantine/ and "
                f"truncate it" for s, p in tails]
        plan += [f"would move {segment.segment_name(s)} to quarantine/ and rewrite it without its damage"
                 for s in broken]
        if index_broken:
            plan.append("would move the index to quarantine/ and build a new one")
        return RepairResult(tuple(plan), True, before)
    actions: list[str] = []
    # One repair at a time (two would both move the same index aside): a coarse lock of its
    # own, separate from the append lock that writers hold across bursts.
    repair_lock = FileLock(os.path.join(qpath, REPAIR_LOCK), timeout=LOCK_TIMEOUT_SECONDS, mode=0o600)
    try:
        repair_lock.acquire()
    except FileLockTimeout as exc:
        raise LockTimeout(f"{qpath}: another `pqueue repair` has been running for {LOCK_TIMEOUT_SECONDS} s; "
                          f"wait for it to finish") from exc
    try:
        if tails or broken:
            lock = _WriteLock(qpath, LOCK_TIMEOUT_SECONDS)
            try:
                for seg, pos in tails:
                    actions.append(_truncate_tail(qpath, seg, pos))
                if newest in broken:
                    actions.append(_seal_active(qpath, newest))
                for seg in broken:
                    actions.extend(_rewrite(qpath, seg))
            finally:
                lock.release()
        if index_broken:
            actions.append(_rebuild_index(qpath))
    finally:
        repair_lock.release()
    return RepairResult(tuple(actions), False, before)


# --------------------------------------------------------------------------- groups and dead letters


def move_group(path: str | os.PathLike[str], group: str, offset: int) -> tuple[int, int]:
    """Set `group`'s committed offset to `offset`; return (old committed offset, new one).

    Raises:
        ValueError: unknown group, or no record at `offset`.
        QueueError: the index cannot be opened.
    """
    qpath = inspect.check_queue(path)
    seg, pos = inspect.locate(qpath, offset)
    index = Index(qpath)
    try:
        old = index.peek(group)
        if old is None or not index.move_group(group, offset, seg, pos):
            raise ValueError(f"no consumer group {group!r} in {qpath}")
        return old.committed, offset
    finally:
        index.close()


def _dlq(path: str) -> Queue:
    dlq_path = os.path.join(path, "dlq")
    if not os.path.isdir(dlq_path):
        raise QueueError(f"{path} has no dead-letter queue (nothing was ever dead-lettered)")
    # serializer="raw": the payload is handed on as stored, never re-encoded.
    return Queue(dlq_path, serializer="raw", create=False)


def replay_dead_letters(path: str | os.PathLike[str], *, limit: int | None = None,
                        on_each: Callable[[int, int], None] | None = None) -> int:
    """Put dead letters back into their queue (original payload and attributes), then ack them.

    Each batch is appended and fsynced before its dead letters are acked: a crash in between
    replays a message twice rather than losing it.

    Args:
        limit: replay at most this many (oldest first).
        on_each: called with (dead-letter offset, new offset in the queue).
    Returns:
        How many were replayed.
    """
    qpath = inspect.check_queue(path)
    done = 0
    with Queue(qpath, create=False) as q, _dlq(qpath) as dlq:
        consumer = dlq.consumer()
        while limit is None or done < limit:
            batch: list[Message] = []
            while len(batch) < REPLAY_BATCH and (limit is None or done + len(batch) < limit):
                try:
                    batch.append(consumer.get(block=False))
                except Empty:
                    break
            if not batch:
                break
            for msg in batch:
                attrs = {k: v for k, v in msg._attrs.items() if k != ATTR_META}
                new = q._log.append(msg._codec, encode_attrs(attrs), msg._payload)
                if on_each is not None:
                    on_each(msg.offset, new)
            q.flush()  # durable in the queue before the dead letters are acked
            for msg in batch:
                msg.ack()
            consumer.flush()
            done += len(batch)
    return done


def purge_dead_letters(path: str | os.PathLike[str]) -> int:
    """Ack every dead letter (retention then deletes their segments); return how many."""
    qpath = inspect.check_queue(path)
    done = 0
    with _dlq(qpath) as dlq:
        consumer = dlq.consumer()
        while True:
            try:
                consumer.get(block=False).ack()
            except Empty:
                break
            done += 1
        consumer.flush()
    return done


__all__ = ["RepairResult", "move_group", "purge_dead_letters", "replay_dead_letters", "repair"]
