"""MqttSink: publish records to an MQTT 5 broker at QoS 1 (``pip install 'pqueue-log[mqtt]'``).

Guarantee: at least once, in offset order per topic. MQTT has no dedup key, so each message
carries ``pq-source``, ``pq-offset``, ``pq-ts`` and ``pq-codec`` as MQTT 5 user properties and
consumers dedup on (source, offset). Duplicates happen only after a crash or a timeout, and
are bounded by one batch (the forwarder re-sends from its committed offset).

Paho keeps in-flight messages in memory only: after a failed send this sink drops the client
(and with it Paho's queue), so a long outage never piles re-sends up inside Paho; pqueue is the
persistence. A PUBACK means the broker took the message, not that it is on disk: run Mosquitto
with ``persistence true`` and a small ``autosave_interval`` (or ``autosave_on_changes``).
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, final

from .base import OutRecord, SendResult, SinkError, SourceInfo, TransientSinkError

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

CONNECT_TIMEOUT_SECONDS = 5.0  # to connect and receive CONNACK
MAX_PACKET_BYTES = 268_435_455  # the protocol's limit on a packet (256 MiB - 1)
HEADER_ROOM_BYTES = 1024  # of a packet, kept for the topic and the user properties
# PUBACK reason codes that refuse this one message for good (MQTT 5, 3.4.2.1): the record goes
# to the dead-letter queue. Any other code >= 0x80 (not authorized, quota exceeded, ...) is a
# broker or configuration problem that applies to every record: back off and retry.
PERMANENT_REASONS = {0x95: "packet too large", 0x99: "payload format invalid"}


@final
class MqttSink:
    """Publishes each record's stored bytes to `topic` at QoS 1 with MQTT 5 user properties.

    Args:
        url: ``mqtt://host:port`` or ``mqtts://host:port`` (TLS with the system CA store);
            ``user:password@`` in the URL logs in.
        topic: ``{source_id}``, ``{queue}`` and ``{epoch_ms}`` are filled in.
        qos: 1 (at least once, the default) or 0 (at most once: the broker never acks).
        client_id: the MQTT client id; default ``pqueue-<first 8 chars of the source id>``.
        inflight: QoS 1 messages sent before waiting for PUBACKs.
        keepalive: seconds between pings.
        max_record_bytes: larger payloads are dead-lettered; capped by the broker's
            Maximum Packet Size when it announces one.
    Raises:
        ValueError: a scheme other than mqtt/mqtts, or qos not 0 or 1.
    """

    def __init__(self, url: str, *, topic: str = "pqueue/{source_id}", qos: int = 1, client_id: str | None = None,
                 inflight: int = 100, keepalive: int = 60, max_record_bytes: int = MAX_PACKET_BYTES - HEADER_ROOM_BYTES
                 ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"MqttSink needs an mqtt:// or mqtts:// URL, not {url!r}")
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        self.tls = parts.scheme == "mqtts"
        self.username, self.password = parts.username, parts.password
        self.topic_template = topic
        self.qos = qos
        self.client_id = client_id
        self.inflight = inflight
        self.keepalive = keepalive
        self.max_record_bytes = max_record_bytes
        self._configured_max = max_record_bytes
        self.topic = ""
        self._source: SourceInfo | None = None
        self._client: mqtt.Client | None = None
        # _cond guards _acks (mid -> PUBACK reason code) and _connected; Paho's network thread
        # fills them, the forwarder thread waits on them.
        self._cond = threading.Condition()
        self._acks: dict[int, int] = {}
        self._connected = False
        self._connect_error: str | None = None

    def open(self, source: SourceInfo) -> None:
        """Bind to `source` and connect.

        Raises:
            TransientSinkError: the broker is not reachable or refused the connection.
            SinkError: paho-mqtt (>= 2) is missing.
        """
        try:
            import paho.mqtt.client  # noqa: F401
        except ImportError as exc:
            raise SinkError("MqttSink needs paho-mqtt>=2: pip install 'pqueue-log[mqtt]'") from exc
        self._source = source
        self.topic = source.format(self.topic_template)
        self._reset()
        self._connect(CONNECT_TIMEOUT_SECONDS)

    def _connect(self, timeout: float) -> mqtt.Client:
        if self._client is not None:
            return self._client
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        assert self._source is not None
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id or f"pqueue-{self._source.id[:8]}",
                             protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        client.max_inflight_messages_set(self.inflight)
        client.connect_timeout = min(timeout, CONNECT_TIMEOUT_SECONDS)
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            client.tls_set()
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        with self._cond:
            self._connected, self._connect_error = False, None
            self._acks.clear()
        try:
            client.connect(self.host, self.port, keepalive=self.keepalive, clean_start=True)
        except (OSError, ValueError) as exc:
            raise TransientSinkError(f"mqtt {self.host}:{self.port}: {exc}") from exc
        client.loop_start()
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._connected and self._connect_error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            connected, error = self._connected, self._connect_error
        if not connected:
            client.loop_stop()
            client.disconnect()
            raise TransientSinkError(f"mqtt {self.host}:{self.port}: {error or f'no CONNACK within {timeout} s'}")
        self._client = client
        return client

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        with self._cond:
            if reason_code.is_failure:
                self._connect_error = f"connection refused: {reason_code}"
            else:
                self._connected = True
                limit = getattr(properties, "MaximumPacketSize", None)
                if limit:
                    self.max_record_bytes = min(self._configured_max, max(1, limit - HEADER_ROOM_BYTES))
            self._cond.notify_all()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        with self._cond:
            self._connected = False
            self._connect_error = f"disconnected: {reason_code}"
            self._cond.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._cond:
            self._acks[mid] = int(reason_code.value) if hasattr(reason_code, "value") else int(reason_code)
            self._cond.notify_all()

    def last_shipped(self) -> int | None:
        """MQTT cannot say what a broker holds: always None (no reconciliation)."""
        return None

    def send(self, batch: Sequence[OutRecord], timeout: float) -> SendResult:
        """Publish the batch in order and wait for the PUBACKs of its prefix.

        Raises:
            TransientSinkError: not connected, or no PUBACK for the first record in time.
        """
        if self._source is None:
            raise TransientSinkError("MqttSink is not open")
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        deadline = time.monotonic() + timeout
        client = self._connect(timeout)
        mids: list[int] = []
        for rec in batch:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.UserProperty = list(rec.headers.items())
            info = client.publish(self.topic, rec.payload, qos=self.qos, properties=props)
            if info.rc != 0:
                break  # not connected or the queue refused it: what went out so far may be acked
            mids.append(info.mid)
        with self._cond:
            while self._connected and not all(m in self._acks for m in mids):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            codes = [self._acks.pop(m, None) for m in mids]
            connected, error = self._connected, self._connect_error
        acked: int | None = None
        rejected: list[tuple[int, str]] = []
        for rec, code in zip(batch, codes, strict=False):
            if code is None:
                break
            if code >= 0x80:
                reason = PERMANENT_REASONS.get(code)
                if reason is None:
                    break
                rejected.append((rec.offset, f"PUBACK {code:#x}: {reason}"))
            acked = rec.offset
        if acked != (batch[-1].offset if batch else None):
            # Whatever Paho still holds would be re-sent by it and by the forwarder: drop it.
            self._reset()
        if acked is None:
            raise TransientSinkError(f"mqtt {self.host}:{self.port}: "
                                     f"{error if not connected else f'no PUBACK within {timeout} s'}")
        return SendResult(acked, rejected, 0)

    def _reset(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        with self._cond:
            self._connected = False
            self._acks.clear()

    def close(self) -> None:
        self._reset()


__all__ = ["MqttSink"]
