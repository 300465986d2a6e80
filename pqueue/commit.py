"""Group commit: the threads of one process that need an fsync share one.

A thread that needs its appends durable joins the group being formed. The first to join
leads it; the others sleep, each on a lock of its own. Under ``fsync="always"`` a put joins
with its record still unwritten and the leader writes every record of the group with one
``write()`` before the one fdatasync: a follower then costs one GIL hand-off (wake up, return,
queue again) instead of three (it would also take its turn at ``write()``), which is where
the time of many producer threads goes on two cores (notes/hotpath.md goal 2). Appends that
wrote their own records (`put_many`, keyed puts, an interval policy's record bound) join
with the sequence number their sync must cover.

Before writing, the leader waits (at most ``GATHER_SECONDS``) until as many have joined as
the previous group had: the threads its predecessor released are on their way back, and
without the wait each sync would cover about half of them (the rest would join during it and
wait for the next), capping 8 threads near 4x one. It sleeps on a lock the awaited arrival
releases; polling would take the GIL from the very threads it waits for.

When its fdatasync returns, the leader records what it covered, hands the lead to the first
thread that joined meanwhile, and wakes its group. A failed fdatasync (or a failed seal at a
segment roll) fails every append it should have covered, also those whose threads only ask
later: after fsyncgate a later sync that succeeds proves nothing about them.

A signal handler may raise in the main thread (Ctrl-C) wherever it is in here. Whatever it
interrupts, nobody is left asleep and nobody is told a false success: the lead is passed on,
a group taken but not yet told how it went wakes to an "interrupted" error, and whoever has
the lead is known by `_leader` alone (never inferred from being woken). Python runs handlers
after calls and at loop ends, so state that must change together changes without a call in
between (tests/test_commit.py interrupts at random points).

The log supplies the I/O (`write_group`, `capture`, `fdatasync`); this module owns only who
waits for whom and what is known to be durable.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable

from .errors import QueueError

GATHER_SECONDS = 0.0002  # a leader waits at most 200 µs for the previous group's threads

Record = tuple[int, bytes, bytes]  # codec, encoded attributes, payload


class Waiter:
    """A thread in the group commit: its record to write (or None) and how it ended."""

    __slots__ = ("record", "seq", "wake", "done", "offset", "error")

    def __init__(self, record: Record | None, seq: int) -> None:
        self.record = record  # written by the leader; None: the thread only needs a sync
        self.seq = seq  # the append a sync must cover (set by the leader for its records)
        self.wake: threading.Lock | None = None  # a follower sleeps on it until the leader releases it
        self.done = False  # its group's outcome is in `error` (False when woken: interrupted leader)
        self.offset = -1
        self.error: BaseException | None = None


class GroupCommit:
    """Who syncs for whom, and how far this process's appends are durable.

    Args:
        log_dir: named in error messages.
        write_group: writes the records of the given waiters with one write(), sets their
            `offset` and `seq`, and returns (fd, sequence) for `fdatasync`.
        capture: returns (fd, sequence) of the active segment for `fdatasync`, for a group
            with no records to write.
        fdatasync: syncs fd and returns (the sequence it covered, the OSError or None).
        on_synced: told each new durable sequence (with this object's lock held).
    """

    def __init__(
        self,
        log_dir: str,
        *,
        write_group: Callable[[list[Waiter]], tuple[int, int]],
        capture: Callable[[], tuple[int, int]],
        fdatasync: Callable[[int, int], tuple[int, BaseException | None]],
        on_synced: Callable[[int], None],
    ) -> None:
        self._log_dir = log_dir
        self._write_group = write_group
        self._capture = capture
        self._fdatasync = fdatasync
        self._on_synced = on_synced
        # _mu guards every field below; the log may take it with its own write lock held,
        # so nothing here takes the log's locks while holding _mu.
        self._mu = threading.Lock()
        self.synced_seq = 0  # every append up to this sequence is durable
        # The last failed sync: (durable sequence then, sequence it should have covered, error).
        self._failed: tuple[int, int, BaseException] | None = None
        self._leader: Waiter | None = None  # who leads (or was just handed the lead), if anyone
        self._led: list[Waiter] = []  # the group the leader took and has not woken yet
        self._queued: list[Waiter] = []  # the group being formed, in arrival order
        self._group_size = 1  # waiters in the last group: how many the next leader waits for
        self._gather_want = 0  # a leader sleeps on _gathered until this many have joined
        self._gathered = threading.Lock()  # held except when the awaited arrival releases it
        self._gathered.acquire()
        on_synced(0)

    def append(self, record: Record) -> int:
        """Write `record` with the next group and return its offset once it is durable."""
        me = Waiter(record, 0)
        self._join(me)
        return me.offset

    def wait(self, seq: int) -> None:
        """Return once an fdatasync that started after append `seq` was written has succeeded."""
        with self._mu:
            failed = self._failed
            if failed is not None and failed[0] < seq <= failed[1]:
                raise self._fsync_failed(failed[2])
            if self.synced_seq >= seq:
                return
        self._join(Waiter(None, seq))

    def mark_synced(self, seq: int) -> None:
        """Everything up to `seq` was made durable outside a group (a segment roll)."""
        with self._mu:
            self._set_synced(seq)

    def mark_failed(self, seq: int, exc: BaseException) -> None:
        """An fsync that should have covered appends up to `seq` failed outside a group."""
        with self._mu:
            self._failed = (self.synced_seq, seq, exc)

    def _set_synced(self, seq: int) -> None:
        if seq > self.synced_seq:
            self.synced_seq = seq
            self._on_synced(seq)

    def _join(self, me: Waiter) -> None:
        wake = threading.Lock()
        wake.acquire()
        try:
            with self._mu:
                self._queued.append(me)
                if self._leader is None:
                    self._leader = me
                else:
                    me.wake = wake
                    if self._gather_want and len(self._queued) >= self._gather_want:
                        self._gather_want = 0
                        try:
                            self._gathered.release()
                        except RuntimeError:
                            pass  # already released: a Ctrl-C cut the last gather short
            if me.wake is not None:
                wake.acquire()  # released when the leader is done with `me`, or hands it the lead
            if self._leader is me:
                self._lead(me)
        except BaseException:
            # A signal handler raised (KeyboardInterrupt) while this thread queued, slept or
            # led: leave without stranding the others.
            self._leave(me)
            raise
        if not me.done:  # woken by a leader that was interrupted before it could say how it went
            raise self._fsync_failed(None)
        if me.error is not None:
            raise me.error

    def _leave(self, me: Waiter) -> None:
        """`me` gives up: out of the queue if still in it, and the lead passed on if it has it."""
        with self._mu:
            if me in self._queued:
                self._queued.remove(me)  # never written
            to_wake: list[Waiter] = []
            if self._leader is me:
                to_wake += self._led  # taken, never told how it went, never woken
                self._led = []
            self._hand_on(me, to_wake)
        _wake([w for w in to_wake if w is not me])

    def _hand_on(self, me: Waiter, to_wake: list[Waiter]) -> None:
        """If `me` has the lead, pass it to the first queued waiter and add that one to `to_wake`.

        The successor goes into a list rather than a return value: Python runs a signal
        handler right after a call returns, before its value is stored, and a successor lost
        that way would sleep for ever.
        """
        if self._leader is me:
            self._leader = successor = self._queued[0] if self._queued else None
            if successor is not None:
                to_wake.append(successor)

    def _lead(self, me: Waiter) -> None:
        """Write and sync everything queued, then end the group."""
        group: list[Waiter] = []
        write_error: QueueError | OSError | None = None
        sync_error: BaseException | None = None
        target = -1  # stays -1 if something unforeseen escapes: the group then fails
        try:
            self._gather()
            with self._mu:
                # No call in between: a signal handler cannot run between the two.
                group = self._led = self._queued
                self._queued = []
            records = [w for w in group if w.record is not None]
            synced = None
            if records:
                try:
                    synced = self._write_group(records)
                except (QueueError, OSError) as exc:  # the group's writers get it; the others still sync
                    write_error = exc
            if synced is not None:
                target, sync_error = self._fdatasync(*synced)
            elif max(w.seq for w in group) > self.synced_seq:
                target, sync_error = self._fdatasync(*self._capture())
            else:
                target = self.synced_seq
        finally:
            self._end(me, group, target, write_error, sync_error)

    def _gather(self) -> None:
        """Wait (at most GATHER_SECONDS) until as many have joined as the last group had."""
        mu = self._mu
        with mu:
            if len(self._queued) >= self._group_size:
                return
            self._gather_want = self._group_size
        self._gathered.acquire(timeout=GATHER_SECONDS)
        with mu:
            if self._gather_want:
                self._gather_want = 0  # timed out: nobody will release it now
            else:
                self._gathered.acquire(blocking=False)  # released: hold it for the next leader

    def _end(self, me: Waiter, group: list[Waiter], target: int, write_error: QueueError | OSError | None,
             sync_error: BaseException | None) -> None:
        """Publish what the group's sync covered, hand the lead on, wake the group."""
        if not group:
            return  # interrupted before taking a group: `_leave` passes the lead on
        to_wake = [w for w in group if w is not me]
        try:
            with self._mu:
                self._led = []
                self._hand_on(me, to_wake)
                if sync_error is not None:
                    self._failed = (self.synced_seq, target, sync_error)
                elif target >= 0:
                    self._set_synced(target)
                failed = self._failed
                self._group_size = len(group)
                for w in group:
                    if w.record is not None and write_error is not None:
                        # One exception object raised in several threads would mix their tracebacks.
                        w.error = copy.copy(write_error)
                        w.error.__cause__ = write_error.__cause__
                    elif sync_error is not None or target < 0:
                        w.error = self._fsync_failed(sync_error)
                    elif failed is not None and failed[0] < w.seq <= failed[1]:
                        w.error = self._fsync_failed(failed[2])  # a roll's fsync of the old segment failed
                    else:
                        w.error = None
                    w.done = True  # an interrupt before this: the waiter reports a failure
        finally:
            _wake(to_wake)

    def _fsync_failed(self, cause: BaseException | None) -> QueueError:
        error = QueueError(f"{self._log_dir}: fsync failed, the record may not be durable: "
                           f"{cause or 'the syncing thread was interrupted'}")
        error.__cause__ = cause
        return error


def _wake(waiters: list[Waiter]) -> None:
    """Release each waiter's lock, even if a signal handler raises partway (Ctrl-C)."""
    try:
        for w in waiters:
            _release(w)
    except BaseException:
        for w in waiters:  # after an interrupt: the rest (a second release is harmless)
            _release(w)
        raise


def _release(w: Waiter) -> None:
    lock = w.wake
    if lock is not None:  # None: the leader itself, interrupted while queueing, or released
        try:
            lock.release()
        except RuntimeError:
            pass  # "release unlocked lock": released already, by an interrupted first try
        w.wake = None
