"""NatsJetStreamSink: ship records to a NATS JetStream stream (``pip install 'pqueue-log[nats]'``).

Guarantee: no duplicates in the stream with reconciliation (the forwarder's default) plus
``Nats-Msg-Id = <source_id>:<offset>``. At start the forwarder asks for the last message on
the source's subject and skips what the stream holds; a re-send after a crash or a timeout
falls inside the stream's ``duplicate_window`` (raise it above your longest outage; this sink
creates streams with ``DUPLICATE_WINDOW_SECONDS``) and is dropped by the server.

Order: a batch is pipelined (all of it sent before the first answer), and every record but
the first carries ``Nats-Expected-Last-Msg-Id`` naming the record before it. The server stores
a record only right after its predecessor, so when one fails (a timeout, a killed server, a
refusal) every later record of the batch is refused too and nothing lands out of offset
order; the next batch starts again at the first record not stored. (The server checks the
msg id for a duplicate before the expectation, so a re-sent batch is absorbed as before.)

The publish answers are read from the sink's own reply subject rather than through nats-py's
``publish_async``: its 2.16 reply handler raises a JetStream error inside the callback instead
of failing the publish, which would turn a refusal into a timeout and retry it for ever.

JetStream keeps what it acknowledged across an OS crash only with file storage and
``sync_interval: always`` (or replicas): the default syncs every 2 minutes.

nats-py is asyncio; the sink runs its own event loop in a daemon thread, so the client keeps
answering the server's pings while the forwarder is idle, and the forwarder stays synchronous.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, final

from .base import HEADER_OFFSET, HEADER_SOURCE, OutRecord, SendResult, SinkError, SourceInfo, TransientSinkError

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

T = TypeVar("T")

CONNECT_TIMEOUT_SECONDS = 5.0  # per connection attempt
DUPLICATE_WINDOW_SECONDS = 24 * 3600.0  # for streams this sink creates: a day of outage stays deduplicated
HEADER_ROOM_BYTES = 512  # of the server's max_payload, kept for the headers of each message
ERR_MESSAGE_TOO_LARGE = 10054  # JetStream API error: message size exceeds the stream's maximum
HEADER_MSG_ID = "Nats-Msg-Id"
HEADER_EXPECTED_LAST_MSG_ID = "Nats-Expected-Last-Msg-Id"


@final
class NatsJetStreamSink:
    """Publishes each record to a JetStream subject, with its stored bytes as the payload.

    Args:
        url: ``nats://host:port`` (a comma-separated list is fine).
        stream: the stream name; ``{source_id}``, ``{queue}``, ``{epoch_ms}`` are filled in.
        subject: the subject records go to (one per source by default, for reconciliation).
        create_stream: create the stream (file storage, DUPLICATE_WINDOW_SECONDS) if missing.
        max_record_bytes: larger payloads are dead-lettered; capped by the server's max_payload.
    """

    def __init__(self, url: str = "nats://127.0.0.1:4222", *, stream: str = "PQ_{source_id}",
                 subject: str = "pq.{source_id}", create_stream: bool = True,
                 max_record_bytes: int = 64 << 20) -> None:
        self.url = url
        self.stream_template = stream
        self.subject_template = subject
        self.create_stream = create_stream
        self.max_record_bytes = max_record_bytes
        self._configured_max = max_record_bytes
        self.stream = ""
        self.subject = ""
        self._source: SourceInfo | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._inbox = ""  # publish answers arrive on <inbox>.<token>
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}  # token -> its answer
        self._sent = 0  # publishes so far: the next token

    # ------------------------------------------------------------------ the private event loop

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run `coro` on the sink's loop and wait at most `timeout` seconds for it."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise TransientSinkError(f"nats {self.url}: no answer within {timeout} s") from exc

    def _start_loop(self) -> None:
        if self._loop is not None:
            return
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="pqueue-nats-sink", daemon=True)
        self._thread.start()
        self._loop = loop

    # ------------------------------------------------------------------ Sink

    def open(self, source: SourceInfo) -> None:
        """Connect, create the stream if asked, and learn the server's message size limit.

        Raises:
            TransientSinkError: the server is not reachable.
            SinkError: nats-py is missing.
        """
        try:
            import nats
        except ImportError as exc:
            raise SinkError("NatsJetStreamSink needs nats-py: pip install 'pqueue-log[nats]'") from exc
        self._source = source
        self.stream = source.format(self.stream_template)
        self.subject = source.format(self.subject_template)
        self._start_loop()
        self._disconnect()

        async def connect() -> Client:
            # nats-py reconnects by itself after a drop; a publish in the meantime is buffered
            # or times out, and the forwarder re-sends (the msg id absorbs double delivery).
            return await nats.connect(self.url, connect_timeout=CONNECT_TIMEOUT_SECONDS, max_reconnect_attempts=-1,
                                      reconnect_time_wait=0.5, allow_reconnect=True)

        try:
            nc = self._run(connect(), CONNECT_TIMEOUT_SECONDS * 2)
        except TransientSinkError:
            raise
        except Exception as exc:
            raise TransientSinkError(f"nats {self.url}: {type(exc).__name__}: {exc}") from exc
        self._nc = nc
        self._js = nc.jetstream()
        self._inbox = nc.new_inbox()
        self._run(nc.subscribe(self._inbox + ".*", cb=self._on_reply), CONNECT_TIMEOUT_SECONDS)
        self.max_record_bytes = min(self._configured_max, max(1, nc.max_payload - HEADER_ROOM_BYTES))
        if self.create_stream:
            self._run(self._ensure_stream(), CONNECT_TIMEOUT_SECONDS * 2)

    async def _ensure_stream(self) -> None:
        from nats.js import api
        from nats.js.errors import NotFoundError

        assert self._js is not None
        try:
            await self._js.stream_info(self.stream)
        except NotFoundError:
            await self._js.add_stream(api.StreamConfig(
                name=self.stream, subjects=[self.subject], storage=api.StorageType.FILE,
                duplicate_window=DUPLICATE_WINDOW_SECONDS))

    def last_shipped(self) -> int | None:
        """The offset in the last message of this source's subject; None if there is none."""
        if self._js is None or self._source is None:
            return None
        from nats.js.errors import NotFoundError

        js, source = self._js, self._source

        async def last() -> int | None:
            try:
                msg = await js.get_last_msg(self.stream, self.subject)
            except NotFoundError:
                return None
            headers = msg.headers or {}
            if headers.get(HEADER_SOURCE) != source.id or HEADER_OFFSET not in headers:
                return None
            return int(headers[HEADER_OFFSET])

        try:
            return self._run(last(), CONNECT_TIMEOUT_SECONDS * 2)
        except TransientSinkError:
            raise
        except Exception as exc:
            raise TransientSinkError(f"nats {self.url}: {type(exc).__name__}: {exc}") from exc

    def send(self, batch: Sequence[OutRecord], timeout: float) -> SendResult:
        """Publish the batch pipelined, each record expecting its predecessor (module docstring).

        Raises:
            TransientSinkError: disconnected, timed out, or the first record failed.
        """
        if self._js is None or self._source is None:
            raise TransientSinkError("NatsJetStreamSink is not open")
        try:
            return self._run(self._publish(batch, timeout), timeout + 1.0)
        except TransientSinkError:
            raise
        except Exception as exc:
            raise TransientSinkError(f"nats {self.url}: {type(exc).__name__}: {exc}") from exc

    async def _on_reply(self, msg: Msg) -> None:
        future = self._pending.pop(msg.subject[len(self._inbox) + 1:], None)
        if future is None or future.done():
            return  # an answer that came after its batch gave up on it
        try:
            answer = json.loads(msg.data) if msg.data else {"error": {"description": "no stream answers"}}
        except ValueError:
            answer = {"error": {"description": f"unreadable answer {msg.data[:80]!r}"}}
        future.set_result(answer if isinstance(answer, dict) else {"error": {"description": repr(answer)}})

    async def _publish(self, batch: Sequence[OutRecord], timeout: float) -> SendResult:
        assert self._nc is not None and self._source is not None
        nc, source = self._nc, self._source
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        futures: list[asyncio.Future[dict[str, Any]]] = []
        tokens: list[str] = []
        try:
            previous_id = None
            for rec in batch:
                headers = dict(rec.headers)
                headers[HEADER_MSG_ID] = msg_id = f"{source.id}:{rec.offset}"
                if previous_id is not None:
                    headers[HEADER_EXPECTED_LAST_MSG_ID] = previous_id
                previous_id = msg_id
                self._sent += 1
                token = str(self._sent)
                self._pending[token] = future = loop.create_future()
                futures.append(future)
                tokens.append(token)
                await nc.publish(self.subject, rec.payload, reply=f"{self._inbox}.{token}", headers=headers)
            await asyncio.wait(futures, timeout=max(0.0, deadline - loop.time()))
        finally:
            for token in tokens:
                self._pending.pop(token, None)  # late answers are dropped by _on_reply
        acked: int | None = None
        rejected: list[tuple[int, str]] = []
        dups = 0
        failure = f"no answer within {timeout} s"
        for rec, fut in zip(batch, futures, strict=False):
            if not fut.done():
                break
            answer = fut.result()
            error = answer.get("error")
            if error is None:
                dups += bool(answer.get("duplicate"))
                acked = rec.offset
                continue
            reason = f"{error.get('description', 'refused')} (err_code {error.get('err_code')})"
            if error.get("err_code") != ERR_MESSAGE_TOO_LARGE:
                failure = reason  # the later records were refused for following it: re-send from here
                break
            rejected.append((rec.offset, reason))
            acked = rec.offset
        if acked is None:
            raise TransientSinkError(f"nats {self.url}: offset {batch[0].offset}: {failure}")
        return SendResult(acked, rejected, dups)

    def _disconnect(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and self._loop is not None:
            try:
                self._run(nc.close(), CONNECT_TIMEOUT_SECONDS)
            except Exception:  # closing a dead connection: nothing more to release
                pass

    def close(self) -> None:
        """Close the connection and stop the sink's event loop."""
        self._disconnect()
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(CONNECT_TIMEOUT_SECONDS)
            if not loop.is_running():
                loop.close()


__all__ = ["NatsJetStreamSink"]
