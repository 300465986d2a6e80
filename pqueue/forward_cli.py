"""``pqueue forward PATH --sink URL``: run a forwarder as its own process until SIGTERM or SIGINT.

`add_forward_parser` adds the subcommand to the ``pqueue`` command's subparsers; `main` runs it
standalone (``python -m pqueue.forward_cli PATH --sink ...``). The sink is chosen by the URL
scheme: ``redis://``/``rediss://`` (Redis Streams), ``nats://``/``tls://`` (JetStream),
``mqtt://``/``mqtts://`` (MQTT 5).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict
from types import FrameType
from typing import Any

from .forward import BATCH_BYTES, BATCH_RECORDS, DEFAULT_GROUP, LINGER_SECONDS, SEND_TIMEOUT_SECONDS, forward
from .queue import Queue
from .sinks.base import Sink, SinkError
from .sinks.mqtt import MqttSink
from .sinks.nats_jetstream import NatsJetStreamSink
from .sinks.redis_streams import RedisStreamSink

STOP_TIMEOUT_SECONDS = 30.0  # on SIGTERM: finish the batch in flight, then exit


def make_sink(url: str, *, stream: str | None = None, subject: str | None = None, topic: str | None = None) -> Sink:
    """The sink for `url`, by scheme.

    Raises:
        ValueError: an unknown scheme.
    """
    scheme = url.partition("://")[0].lower()
    if scheme in ("redis", "rediss", "unix"):
        return RedisStreamSink(url, stream=stream or "edge:{source_id}")
    if scheme in ("nats", "tls"):
        return NatsJetStreamSink(url, stream=stream or "PQ_{source_id}", subject=subject or "pq.{source_id}")
    if scheme in ("mqtt", "mqtts"):
        return MqttSink(url, topic=topic or "pqueue/{source_id}")
    raise ValueError(f"unknown sink {url!r}: use redis://, nats:// or mqtt:// (rediss://, tls://, mqtts://)")


def add_forward_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``forward`` to the ``pqueue`` command's subparsers (``parser.add_subparsers()``).

    Returns:
        The new subparser; its ``handler`` default is `run_forward`.
    """
    p: argparse.ArgumentParser = subparsers.add_parser(
        "forward", help="ship the queue's records to a broker (Redis Streams, NATS JetStream, MQTT)",
        description="Forward records to a broker at least once, in offset order, committing after each ack. "
                    "Runs until SIGTERM or SIGINT; `pqueue stat` shows the forwarder group's lag.")
    p.add_argument("path", help="the queue directory")
    p.add_argument("--sink", required=True, help="redis://HOST:PORT/DB, nats://HOST:PORT or mqtt://HOST:PORT")
    p.add_argument("--stream", help="Redis stream key or JetStream stream name ({source_id}, {queue} are filled in)")
    p.add_argument("--subject", help="JetStream subject (default pq.{source_id})")
    p.add_argument("--topic", help="MQTT topic (default pqueue/{source_id})")
    p.add_argument("--group", default=DEFAULT_GROUP, help=f"consumer group (default {DEFAULT_GROUP})")
    p.add_argument("--batch", type=int, default=BATCH_RECORDS, help="records per send at most")
    p.add_argument("--max-batch-bytes", type=int, default=BATCH_BYTES, help="payload bytes per send at most")
    p.add_argument("--linger", type=float, default=LINGER_SECONDS, help="seconds to wait for a fuller batch")
    p.add_argument("--send-timeout", type=float, default=SEND_TIMEOUT_SECONDS, help="seconds to wait for acks")
    p.add_argument("--rate-limit", type=float, help="records per second at most (catch-up after an outage)")
    p.add_argument("--max-age", type=float, help="seconds; older records go to the dead-letter queue")
    p.add_argument("--no-reconcile", action="store_true", help="do not ask the sink what it already holds")
    p.add_argument("--stats-interval", type=float, default=0.0,
                   help="print stats as JSON lines to stdout every N seconds (0: only at exit)")
    p.set_defaults(handler=run_forward)
    return p


def run_forward(args: argparse.Namespace) -> int:
    """Run the forwarder in this process until SIGTERM/SIGINT.

    Returns:
        0 after a clean stop; 1 if the forwarder failed (the reason is logged); 2 on bad options.
    """
    try:
        sink = make_sink(args.sink, stream=args.stream, subject=args.subject, topic=args.topic)
    except ValueError as exc:
        print(f"pqueue forward: {exc}", file=sys.stderr)
        return 2
    with Queue(args.path, create=False) as q:
        fwd = forward(q, sink=sink, group=args.group, batch=args.batch, max_batch_bytes=args.max_batch_bytes,
                      linger=args.linger, rate_limit=args.rate_limit, max_age=args.max_age,
                      reconcile=not args.no_reconcile, send_timeout=args.send_timeout)
        done = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            done.set()
            fwd.stop(timeout=0)  # the loop sees the flag; the main thread finishes the batch

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        reporter = None
        if args.stats_interval > 0:
            def report() -> None:
                while not done.wait(args.stats_interval):
                    print(json.dumps(asdict(fwd.stats())), flush=True)
            reporter = threading.Thread(target=report, daemon=True)
            reporter.start()
        try:
            fwd.run()
        except SinkError as exc:
            print(f"pqueue forward: {exc}", file=sys.stderr)
            return 1
        finally:
            done.set()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        print(json.dumps(asdict(fwd.stats())), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m pqueue.forward_cli PATH --sink URL``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="pqueue")
    add_forward_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["forward", *(sys.argv[1:] if argv is None else argv)])
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
