"""A hypothesis state machine: the Queue against a simple in-memory model.

The model keeps, per consumer group, which offsets are done, which are held by the current
handle, and how many charged deliveries each offset has had. Reopening the queue hands every
held message back uncharged, as close() promises.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import pqueue

GROUPS = ("default", "billing")
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # msgpack's range
items = st.one_of(ints, st.text(max_size=20), st.lists(ints, max_size=3),
                  st.dictionaries(st.text(max_size=5), ints, max_size=3))


class QueueModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        self.path = self.dir / "q"
        self.fsync = "never"
        self.q = pqueue.Queue(self.path, fsync=self.fsync, segment_bytes=4096)
        self.log: list[object] = []
        self.done: dict[str, set[int]] = {g: set() for g in GROUPS}
        self.held: dict[str, dict[int, pqueue.Message]] = {g: {} for g in GROUPS}
        self.charged: dict[str, dict[int, int]] = {g: {} for g in GROUPS}

    def teardown(self) -> None:
        self.q.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(item=items)
    def put(self, item: object) -> None:
        assert self.q.put(item) == len(self.log)
        self.log.append(item)

    @rule(batch=st.lists(items, min_size=1, max_size=5))
    def put_many(self, batch: list[object]) -> None:
        assert self.q.put_many(batch) == list(range(len(self.log), len(self.log) + len(batch)))
        self.log.extend(batch)

    def deliverable(self, group: str) -> set[int]:
        return set(range(len(self.log))) - self.done[group] - set(self.held[group])

    @rule(group=st.sampled_from(GROUPS))
    def get(self, group: str) -> None:
        expected = self.deliverable(group)
        try:
            m = self.q.consumer(group).get(timeout=0.01 if expected else 0)
        except pqueue.Empty:
            assert not expected, f"{group}: Empty while {sorted(expected)} were deliverable"
            return
        assert m.offset in expected
        assert m.data == self.log[m.offset]
        assert m.attempt == self.charged[group].get(m.offset, 0) + 1
        assert m.group == group
        self.held[group][m.offset] = m

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        group = data.draw(st.sampled_from([g for g in GROUPS if self.held[g]]))
        offset = data.draw(st.sampled_from(sorted(self.held[group])))
        self.q.ack(self.held[group].pop(offset))
        self.done[group].add(offset)

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data())
    def nack(self, data: st.DataObject) -> None:
        group = data.draw(st.sampled_from([g for g in GROUPS if self.held[g]]))
        offset = data.draw(st.sampled_from(sorted(self.held[group])))
        self.q.nack(self.held[group].pop(offset))
        self.charged[group][offset] = self.charged[group].get(offset, 0) + 1

    @rule()
    def reopen(self) -> None:
        self.q.close()
        self.q = pqueue.Queue(self.path, fsync=self.fsync, segment_bytes=4096)
        for group in GROUPS:
            self.held[group].clear()  # handed back uncharged

    @rule(group=st.sampled_from(GROUPS))
    def status(self, group: str) -> None:
        for offset in range(len(self.log)):
            state = self.q.status(offset, group=group)
            if offset in self.done[group]:
                assert state == "done"
            elif offset in self.held[group]:
                assert state == "in_flight"
            else:
                assert state in ("pending", "waiting", "in_flight")

    @invariant()
    def qsize_counts_what_is_not_done(self) -> None:
        for group in GROUPS:
            if group == "default" or "billing" in self.q._consumers:
                assert self.q.consumer(group).qsize() == len(self.log) - len(self.done[group])


TestQueueModel = QueueModel.TestCase
TestQueueModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
