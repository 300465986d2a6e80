"""The forwarder: commit after ack, DLQ before commit, order, backoff, reconciliation; real brokers.

Unit tests drive `pqueue.forward` against `FakeSink` (faults on demand). The broker tests
start real servers (tests/brokers.py) and kill forwarder subprocesses and brokers for real.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pqueue
from pqueue.backoff import Backoff
from pqueue.forward import Forwarder
from pqueue.sinks import FakeSink, SinkError, SourceInfo

sys.path.insert(0, os.path.dirname(__file__))
import brokers  # noqa: E402

FAST = Backoff(initial=0.01, multiplier=2.0, maximum=0.05, jitter=0.0)
ROOT = Path(__file__).resolve().parent.parent


def wait_until(cond: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def drained(fwd: Forwarder) -> Callable[[], bool]:
    return lambda: fwd.stats().lag_records == 0


@pytest.fixture
def q(tmp_path: Path) -> Iterator[pqueue.Queue]:
    """A queue with fsync='never' (these tests are about the forwarder, not the disk)."""
    queue = pqueue.Queue(tmp_path / "q", fsync="never")
    yield queue
    queue.close()


# --------------------------------------------------------------------------- FakeSink unit tests


def test_ships_every_record_once_in_order_and_commits(q: pqueue.Queue, tmp_path: Path) -> None:
    """Every record reaches the sink once, in offset order, and the group's commit survives a reopen."""
    q.put_many([{"i": i} for i in range(300)])
    sink = FakeSink()
    with pqueue.forward(q, sink=sink, batch=64, linger=0) as fwd:
        wait_until(drained(fwd), what="drain")
    stats = fwd.stats()
    assert sink.offsets() == list(range(300))
    assert (stats.shipped, stats.duplicates, stats.dead_lettered, stats.lag_records) == (300, 0, 0, 0)
    assert stats.state == "stopped" and sink.closed
    rec = sink.stored[7]
    assert rec.payload == q.dead_letters._dumps({"i": 7})  # the stored bytes, not re-encoded
    assert rec.headers == {"pq-source": q.source_id, "pq-offset": "7", "pq-ts": rec.headers["pq-ts"],
                           "pq-codec": "msgpack"}
    q.close()
    with pqueue.Queue(tmp_path / "q") as again:
        assert again.consumer("forwarder").qsize() == 0


def test_batch_limits_hold(q: pqueue.Queue) -> None:
    """A send carries at most `batch` records and `max_batch_bytes` of payload (one big record alone)."""
    q.put_many([b"x" * 100] * 50 + [b"y" * 5000] + [b"z" * 100] * 10)
    sizes: list[tuple[int, int]] = []
    sink = FakeSink()
    real_send = sink.send

    def spy(batch: Any, timeout: float) -> Any:
        sizes.append((len(batch), sum(len(r.payload) for r in batch)))
        return real_send(batch, timeout)

    sink.send = spy  # type: ignore[method-assign]
    with pqueue.forward(q, sink=sink, batch=20, max_batch_bytes=1000, linger=0) as fwd:
        wait_until(drained(fwd))
    assert sink.offsets() == list(range(61))
    assert all(n <= 20 and (size <= 1000 or n == 1) for n, size in sizes), sizes


def test_partial_ack_resends_only_the_tail_in_order(q: pqueue.Queue) -> None:
    """A partial ack commits the acknowledged prefix; the tail is re-sent before anything newer."""
    q.put_many(list(range(100)))
    sink = FakeSink()
    sink.partial_next(7)
    with pqueue.forward(q, sink=sink, batch=50, linger=0) as fwd:
        wait_until(drained(fwd))
        assert fwd.stats().duplicates == 0
    assert sink.offsets() == list(range(100))


def test_outage_backs_off_and_loses_nothing(q: pqueue.Queue) -> None:
    """Transient failures are retried with backoff, counted, and shown as state 'backoff'."""
    q.put_many(list(range(50)))
    sink = FakeSink()
    sink.fail_next(1000)
    with pqueue.forward(q, sink=sink, backoff=FAST, linger=0) as fwd:
        wait_until(lambda: fwd.stats().retries >= 5, what="retries")
        stats = fwd.stats()
        assert stats.state == "backoff" and stats.lag_records == 50 and stats.shipped == 0
        assert stats.oldest_unshipped_age is not None and stats.lag_bytes > 0
        assert "injected failure" in (stats.last_error or "")
        with sink._lock:
            sink._fail = 0
        wait_until(drained(fwd))
        assert fwd.stats().state == "connected"
    assert sink.offsets() == list(range(50))


def test_timed_out_send_is_resent_and_deduplicated(q: pqueue.Queue) -> None:
    """A send that times out after the broker applied it is re-sent; the dedup key absorbs it."""
    q.put_many(list(range(40)))
    sink = FakeSink()
    sink.lose_acks_next(2)
    with pqueue.forward(q, sink=sink, backoff=FAST, linger=0, batch=40) as fwd:
        wait_until(drained(fwd))
        stats = fwd.stats()
    assert sink.offsets() == list(range(40))
    assert (stats.duplicates, stats.retries, stats.shipped) == (40, 2, 40)


def test_send_timeout_is_applied(q: pqueue.Queue) -> None:
    """The forwarder passes its send_timeout to the sink; a hung sink is a retry, not a hang."""
    q.put_many(list(range(5)))
    sink = FakeSink()
    sink.delay = 0.5
    with pqueue.forward(q, sink=sink, backoff=FAST, send_timeout=0.05, linger=0) as fwd:
        wait_until(lambda: fwd.stats().retries >= 2)
        sink.delay = 0.0
        wait_until(drained(fwd))
    assert set(sink.timeouts_applied) == {0.05}
    assert sink.offsets() == list(range(5))


def test_rejected_record_goes_to_dlq_then_commit(q: pqueue.Queue, tmp_path: Path) -> None:
    """A permanently rejected record is in the DLQ with the reason, and never blocks the stream."""
    q.put_many([{"i": i} for i in range(20)])
    sink = FakeSink()
    sink.reject(5, "schema violation")
    with pqueue.forward(q, sink=sink, linger=0) as fwd:
        wait_until(drained(fwd))
        assert fwd.stats().dead_lettered == 1
    assert sink.offsets() == [i for i in range(20) if i != 5]
    dead = q.dead_letters.get(timeout=1)
    assert dead.data == {"i": 5}
    assert (dead.meta["offset"], dead.meta["reason"], dead.meta["sink_reason"], dead.meta["group"]) == (
        5, "rejected", "schema violation", "forwarder")
    assert q.status(5, group="forwarder") == "dead"


def test_too_large_and_too_old_records_are_dead_lettered(q: pqueue.Queue) -> None:
    """Records over the sink's size limit or older than max_age go to the DLQ with the reason."""
    q.put(b"old")
    time.sleep(0.3)
    q.put_many([b"ok", b"L" * 2000, b"fine"])
    sink = FakeSink(max_record_bytes=1000)
    with pqueue.forward(q, sink=sink, max_age=0.25, linger=0) as fwd:
        wait_until(drained(fwd))
    assert sink.offsets() == [1, 3]
    reasons = {}
    for _ in range(2):
        m = q.dead_letters.get(timeout=1)
        reasons[m.meta["offset"]] = m.meta["reason"]
    assert reasons == {0: "expired", 2: "too_large"}


def test_reconciliation_skips_what_the_sink_holds(q: pqueue.Queue) -> None:
    """At start the forwarder asks the sink for its last offset and skips up to it."""
    q.put_many(list(range(30)))
    sink = FakeSink()
    with pqueue.forward(q, sink=sink, group="first", linger=0) as fwd:
        wait_until(drained(fwd))
    sends = sink.sends
    with pqueue.forward(q, sink=sink, group="second", linger=0) as fwd:
        wait_until(drained(fwd))
        stats = fwd.stats()
    assert (stats.reconciled, stats.duplicates, sink.sends) == (30, 0, sends)
    with pqueue.forward(q, sink=sink, group="third", linger=0, reconcile=False) as fwd:
        wait_until(drained(fwd))
        assert fwd.stats().duplicates == 30


def test_restart_on_the_same_handle_keeps_order(q: pqueue.Queue) -> None:
    """Stopping mid-outage hands back the batch and the prefetched records; a new forwarder resumes in order."""
    q.put_many(list(range(400)))
    sink = FakeSink()
    sink.fail_next(10**6)
    fwd = pqueue.forward(q, sink=sink, batch=30, backoff=FAST, linger=0).start()
    wait_until(lambda: fwd.stats().retries >= 1)
    assert fwd.stop(timeout=5)
    with sink._lock:
        sink._fail = 0
    with pqueue.forward(q, sink=sink, batch=30, linger=0) as fwd2:
        wait_until(drained(fwd2))
    assert sink.offsets() == list(range(400))


def test_rate_limit_paces_catch_up(q: pqueue.Queue) -> None:
    """rate_limit caps records per second and the batch size (bounded memory in catch-up)."""
    q.put_many(list(range(120)))
    sink = FakeSink()
    started = time.monotonic()
    with pqueue.forward(q, sink=sink, rate_limit=100, batch=500, linger=0) as fwd:
        wait_until(drained(fwd))
    elapsed = time.monotonic() - started
    assert sink.offsets() == list(range(120))
    assert elapsed >= 0.9  # 120 records at 100/s: one second's worth (100) at once, 20 a second later
    assert max(len(r) for r in [sink.stored[:100], sink.stored[100:]]) <= 100 and sink.sends == 2


def test_misconfigured_sink_stops_with_the_reason(q: pqueue.Queue) -> None:
    """A SinkError (not transient) stops the forwarder; the error is kept and nothing is committed."""
    q.put(1)

    class Broken(FakeSink):
        def open(self, source: SourceInfo) -> None:
            raise SinkError("stream belongs to someone else")

    fwd = pqueue.forward(q, sink=Broken()).start()
    wait_until(lambda: fwd.error is not None)
    assert fwd.stats().state == "stopped" and "someone else" in (fwd.stats().last_error or "")
    assert q.consumer("forwarder").qsize() == 1


def test_bad_options_are_refused(q: pqueue.Queue) -> None:
    """Out-of-range options raise ValueError with the option's name."""
    for kwargs, name in (({"batch": 0}, "batch"), ({"rate_limit": 0}, "rate_limit"), ({"max_age": -1}, "max_age"),
                         ({"linger": -1}, "linger"), ({"max_batch_bytes": 0}, "max_batch_bytes")):
        with pytest.raises(ValueError, match=name):
            pqueue.forward(q, sink=FakeSink(), **kwargs)


def test_byte_cap_drop_oldest_while_broker_down(tmp_path: Path) -> None:
    """A drop_oldest cap overtaking the forwarder: drops counted in stats and announced with gap headers."""
    try:
        queue = pqueue.Queue(tmp_path / "cap", max_bytes=64 << 10, on_full="drop_oldest",  # type: ignore[call-arg]
                             segment_bytes=4096)
    except TypeError:
        pytest.skip("Queue(max_bytes=..., on_full='drop_oldest') is not built yet (byte cap issue)")
    with queue:
        sink = FakeSink()
        sink.fail_next(10**6)
        with pqueue.forward(queue, sink=sink, backoff=FAST, batch=10, linger=0) as fwd:
            for i in range(2000):
                queue.put(b"p" * 200 + str(i).encode())
            with sink._lock:
                sink._fail = 0
            wait_until(drained(fwd))
            stats = fwd.stats()
        assert stats.gaps > 0
        shipped = sink.offsets()
        assert shipped == sorted(shipped) and len(shipped) + stats.gaps == 2000
        assert any("pq-gap-from" in r.headers for r in sink.stored)


# --------------------------------------------------------------------------- real brokers


def _running(make: Callable[[Path], brokers.Broker], module: str, extra: str,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[brokers.Broker]:
    """A session's broker: its client library checked, the server started, stopped at the end."""
    brokers.need_module(module, extra)
    broker = make(tmp_path_factory.mktemp("brokers"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[brokers.Broker]:
    yield from _running(brokers.redis_broker, "redis", "redis", tmp_path_factory)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[brokers.Broker]:
    yield from _running(brokers.nats_broker, "nats", "nats", tmp_path_factory)


@pytest.fixture(scope="session")
def mqtt_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[brokers.Broker]:
    yield from _running(brokers.mosquitto_broker, "paho.mqtt", "mqtt", tmp_path_factory)


def redis_offsets(broker: brokers.Broker, stream: str) -> list[int]:
    import redis

    client = redis.Redis(port=broker.port)
    try:
        return [int(fields[b"pq-offset"]) for _id, fields in client.xrange(stream)]
    finally:
        client.close()


def nats_offsets(broker: brokers.Broker, stream: str, subject: str) -> list[int]:
    import asyncio

    import nats

    async def read() -> list[int]:
        nc = await nats.connect(broker.url)
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            out.append(int((msg.headers or {})["pq-offset"]))
        await nc.close()
        return out

    return asyncio.run(read())


# The forwarder child: a real `pqueue forward` process, its sink wrapped so it can SIGKILL
# itself at an exact point of the protocol. MODE: before_send | mid_batch | after_ack | none.
CHILD = textwrap.dedent("""
    import os, signal, sys
    from pqueue import forward_cli
    from pqueue.forward import Forwarder
    mode, at = os.environ["PQ_CRASH_MODE"], int(os.environ["PQ_CRASH_AT"])
    real_init = Forwarder.__init__
    def init(self, queue, sink, **kw):
        inner_send, calls = sink.send, [0]
        def send(batch, timeout):
            calls[0] += 1
            if mode != "none" and calls[0] == at:
                if mode == "mid_batch":
                    inner_send(batch[: max(1, len(batch) // 2)], timeout)
                elif mode == "after_ack":
                    inner_send(batch, timeout)
                os.kill(os.getpid(), signal.SIGKILL)
            return inner_send(batch, timeout)
        sink.send = send
        real_init(self, queue, sink, **kw)
    Forwarder.__init__ = init
    sys.exit(forward_cli.main(sys.argv[1:]))
""")


def run_child(args: list[str], mode: str, log: Path, at: int = 1) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PQ_CRASH_MODE=mode, PQ_CRASH_AT=str(at), PYTHONPATH=str(ROOT))
    with open(log, "ab") as err:
        return subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, cwd=str(ROOT),
                                stdout=subprocess.DEVNULL, stderr=err)


def torture(path: Path, args: list[str], n: int, offsets: Callable[[], list[int]], seed: int) -> list[int]:
    """Kill forwarder children at each crash point and at random times, then drain with a clean one."""
    import random

    rng = random.Random(seed)
    q = pqueue.Queue(path, fsync="never")
    q.put_many([{"i": i, "pad": "x" * rng.randrange(10, 200)} for i in range(n // 2)])
    plan = [("before_send", 2), ("mid_batch", 3), ("after_ack", 2), ("none", 0), ("after_ack", 1)]
    log = path.parent / "forwarder.log"
    for round_no, (mode, at) in enumerate(plan):
        child = run_child([str(path), *args], mode, log, at)
        if mode == "none":
            time.sleep(rng.uniform(0.2, 0.6))  # a SIGKILL at a random point of the protocol
            child.kill()
        assert child.wait(30) == -signal.SIGKILL, log.read_text()
        # New records before the next crash point, so each round has something to send (the
        # random kill may come after everything so far was shipped).
        if round_no == 1:
            q.put_many([{"i": i} for i in range(n // 2, 3 * n // 4)])
        elif round_no == 3:
            q.put_many([{"i": i} for i in range(3 * n // 4, n)])
    q.close()
    child = run_child([str(path), *args], "none", log)
    with pqueue.Queue(path) as q2:
        wait_until(lambda: q2.consumer("forwarder").qsize() == 0, 30, "drain after crashes")
    child.send_signal(signal.SIGTERM)
    assert child.wait(30) == 0, log.read_text()
    return offsets()


def test_redis_sigkill_torture_no_loss_no_duplicates(redis_server: brokers.Broker, tmp_path: Path) -> None:
    """Forwarder SIGKILLed before send, mid-batch, after the ack and at random: every offset once, in order."""
    stream = f"t:{tmp_path.name}"
    args = ["--sink", redis_server.url, "--stream", stream, "--batch", "40", "--linger", "0"]
    got = torture(tmp_path / "q", args, 600, lambda: redis_offsets(redis_server, stream), seed=1)
    assert got == list(range(600))


def test_nats_sigkill_torture_no_loss_no_duplicates(nats_server: brokers.Broker, tmp_path: Path) -> None:
    """The same crash points against JetStream: msg ids plus reconciliation leave every offset once."""
    stream, subject = f"T_{tmp_path.name}".replace("-", "_"), f"t.{tmp_path.name}"
    args = ["--sink", nats_server.url, "--stream", stream, "--subject", subject, "--batch", "40", "--linger", "0"]
    got = torture(tmp_path / "q", args, 400, lambda: nats_offsets(nats_server, stream, subject), seed=2)
    assert got == list(range(400))


def test_mqtt_sigkill_torture_at_least_once(mqtt_server: brokers.Broker, tmp_path: Path) -> None:
    """MQTT: every offset arrives at a live subscriber, with source and offset user properties;
    duplicates stay within one batch per crash."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    topic = f"t/{tmp_path.name}"
    seen: list[int] = []
    sources: set[str] = set()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        props = dict(msg.properties.UserProperty)
        sources.add(props["pq-source"])
        seen.append(int(props["pq-offset"]))

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{tmp_path.name}", protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.connect("127.0.0.1", mqtt_server.port)
    sub.subscribe(topic, qos=1)
    sub.loop_start()
    try:
        time.sleep(0.2)
        args = ["--sink", mqtt_server.url, "--topic", topic, "--batch", "40", "--linger", "0"]
        torture(tmp_path / "q", args, 400, lambda: [], seed=3)
        wait_until(lambda: set(seen) >= set(range(400)), 10, "MQTT delivery")
    finally:
        sub.disconnect()
        sub.loop_stop()
    assert sorted(set(seen)) == list(range(400))
    assert len(seen) - 400 <= 40 * 5  # at most one batch per crash
    assert sources == {pqueue.Queue(tmp_path / "q").source_id}


def _killed_and_restarted(server: brokers.Broker, sink: Any, q: pqueue.Queue, total: int, timeout: float) -> None:
    """Ship 200 records, SIGKILL the broker, put up to `total`, restart it on its data: drained."""
    with pqueue.forward(q, sink=sink, backoff=FAST, send_timeout=1.0, batch=20, linger=0) as fwd:
        q.put_many(list(range(200)))
        wait_until(lambda: fwd.stats().shipped >= 50)
        server.kill()
        q.put_many(list(range(200, total)))
        wait_until(lambda: fwd.stats().state == "backoff", what="backoff")
        server.start()
        wait_until(drained(fwd), timeout)


def _frozen_then_thawed(server: brokers.Broker, sink: Any, q: pqueue.Queue, *, says_timeout: bool) -> None:
    """Ship 100 records, SIGSTOP the broker, put 100 more: timeouts and backoff (the last error
    names the timeout if `says_timeout`); SIGCONT: drained."""
    with pqueue.forward(q, sink=sink, backoff=FAST, send_timeout=0.3, batch=25, linger=0) as fwd:
        q.put_many(list(range(100)))
        wait_until(lambda: fwd.stats().shipped >= 25)
        server.freeze()
        try:
            q.put_many(list(range(100, 200)))
            wait_until(lambda: fwd.stats().retries >= 2, what="timeouts")
            if says_timeout:
                assert fwd.stats().state == "backoff" and "Timeout" in (fwd.stats().last_error or "")
        finally:
            server.thaw()
        wait_until(drained(fwd), 20)


def test_redis_killed_and_restarted_nothing_lost(redis_server: brokers.Broker, q: pqueue.Queue) -> None:
    """Redis SIGKILLed mid-run and restarted on its data directory: the forwarder resumes, nothing lost or doubled."""
    from pqueue.sinks import RedisStreamSink

    sink = RedisStreamSink(redis_server.url, stream="restart:{source_id}")
    _killed_and_restarted(redis_server, sink, q, 400, 20)
    assert redis_offsets(redis_server, sink.stream) == list(range(400))


def test_nats_killed_and_restarted_nothing_lost(nats_server: brokers.Broker, q: pqueue.Queue) -> None:
    """nats-server SIGKILLed mid-run and restarted on its store: nothing lost or doubled."""
    from pqueue.sinks import NatsJetStreamSink

    sink = NatsJetStreamSink(nats_server.url, stream="R_{source_id}", subject="r.{source_id}")
    _killed_and_restarted(nats_server, sink, q, 300, 30)
    assert nats_offsets(nats_server, sink.stream, sink.subject) == list(range(300))


def test_redis_frozen_then_thawed(redis_server: brokers.Broker, q: pqueue.Queue) -> None:
    """SIGSTOP (a partition): the send timeout fires, the forwarder backs off; after SIGCONT the
    late-applied writes are absorbed by the explicit IDs: nothing lost, nothing doubled."""
    from pqueue.sinks import RedisStreamSink

    sink = RedisStreamSink(redis_server.url, stream="frozen:{source_id}")
    _frozen_then_thawed(redis_server, sink, q, says_timeout=True)
    assert redis_offsets(redis_server, sink.stream) == list(range(200))


def test_nats_frozen_then_thawed(nats_server: brokers.Broker, q: pqueue.Queue) -> None:
    """SIGSTOP on nats-server: timeouts, backoff, then every offset once after SIGCONT."""
    from pqueue.sinks import NatsJetStreamSink

    sink = NatsJetStreamSink(nats_server.url, stream="F_{source_id}", subject="f.{source_id}")
    _frozen_then_thawed(nats_server, sink, q, says_timeout=False)
    assert nats_offsets(nats_server, sink.stream, sink.subject) == list(range(200))


def test_redis_stream_of_another_writer_is_refused(redis_server: brokers.Broker, q: pqueue.Queue) -> None:
    """A stream whose top ID is above this queue's epoch is refused with a SinkError saying why."""
    import redis

    from pqueue.sinks import RedisStreamSink

    client = redis.Redis(port=redis_server.port)
    client.xadd("shared", {"x": "1"}, id=f"{q.identity.created_ms + 10_000}-1")
    client.close()
    fwd = pqueue.forward(q, sink=RedisStreamSink(redis_server.url, stream="shared")).start()
    wait_until(lambda: fwd.error is not None)
    assert "another writer uses it" in str(fwd.error)


def test_nats_refused_record_stops_the_pipelined_batch(nats_server: brokers.Broker) -> None:
    """A batch goes out pipelined; a record the stream refuses (over its max_msg_size) is
    reported rejected at once, and no later record of that batch lands ahead of the refusal."""
    import asyncio

    import nats
    from nats.js import api

    from pqueue.sinks import NatsJetStreamSink
    from pqueue.sinks.base import OutRecord

    source = SourceInfo("refuse-src", "refuse", 1)

    async def create() -> None:
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().add_stream(api.StreamConfig(
            name="REFUSE", subjects=["refuse.s"], storage=api.StorageType.FILE, max_msg_size=1000))
        await nc.close()

    asyncio.run(create())

    def rec(offset: int, size: int = 10) -> OutRecord:
        return OutRecord(offset, 0.0, b"p" * size, {"pq-source": source.id, "pq-offset": str(offset)})

    sink = NatsJetStreamSink(nats_server.url, stream="REFUSE", subject="refuse.s")
    sink.open(source)
    try:
        t0 = time.monotonic()
        first = sink.send([rec(0), rec(1), rec(2), rec(3, 2000), rec(4), rec(5)], timeout=5.0)
        assert time.monotonic() - t0 < 2.0  # the refusal is an answer, not a timeout
        assert first.acked_through == 3
        assert [offset for offset, _reason in first.rejected] == [3]
        assert "maximum" in first.rejected[0][1]
        assert nats_offsets(nats_server, "REFUSE", "refuse.s") == [0, 1, 2]
        second = sink.send([rec(4), rec(5), rec(6)], timeout=5.0)
        assert second.acked_through == 6 and second.duplicates == 0
        assert nats_offsets(nats_server, "REFUSE", "refuse.s") == [0, 1, 2, 4, 5, 6]
    finally:
        sink.close()
