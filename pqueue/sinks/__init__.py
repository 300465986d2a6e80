"""Sinks a forwarder ships records to: one module per broker, each client library an optional extra.

``RedisStreamSink`` (``pqueue-log[redis]``), ``NatsJetStreamSink`` (``pqueue-log[nats]``) and
``MqttSink`` (``pqueue-log[mqtt]``) import their client library only when opened, so importing
this package never needs them. ``FakeSink`` injects faults for tests.
"""

from .base import (
    FakeSink,
    OutRecord,
    SendResult,
    Sink,
    SinkError,
    SourceInfo,
    TransientSinkError,
)
from .mqtt import MqttSink
from .nats_jetstream import NatsJetStreamSink
from .redis_streams import RedisStreamSink

__all__ = [
    "FakeSink",
    "MqttSink",
    "NatsJetStreamSink",
    "OutRecord",
    "RedisStreamSink",
    "SendResult",
    "Sink",
    "SinkError",
    "SourceInfo",
    "TransientSinkError",
]
