"""RedisStreamSink: ship records to a Redis stream (``pip install 'pqueue-log[redis]'``).

Guarantee: no duplicates in the stream with the default ``dedup="explicit-id"``. Each entry
gets the explicit ID ``<queue epoch_ms>-<offset + 1>`` on a stream of its own source (the
default key ``edge:{source_id}``), so a re-send is refused by Redis as "equal or smaller than
the target stream top item" and counted as a duplicate. A queue deleted and re-created keeps
its source id only if its ``queue.id`` survives; a new queue has a new id and a later epoch.
With ``dedup=None`` (a shared stream, auto IDs) delivery is at least once.

A batch goes in one Lua script that XADDs in order and stops at the first failure. A pipeline
would go on after a failed XADD, and with explicit IDs a later record landing above a missing
one would leave a hole below the stream top that could never be filled.

Redis keeps what it acknowledged only with ``appendonly yes`` (``appendfsync always`` for
power loss; ``everysec`` may lose about a second). `open` warns when AOF is off.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, final

from .base import OutRecord, SendResult, SinkError, SourceInfo, TransientSinkError

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 512 << 20  # 512 MiB: Redis's default proto-max-bulk-len
CONNECT_TIMEOUT_SECONDS = 5.0  # to open a connection (open() and reconnects)
DUP_ERROR = "equal or smaller than the target stream top item"

# KEYS[1]: the stream. ARGV[1]: MAXLEN ("" for none). Then per entry: its ID, its number of
# field names and values n, then those n strings. Returns {stored, duplicates, error}.
_XADD_ALL = """
local stored, dups = 0, 0
local i = 2
while i <= #ARGV do
  local nf = tonumber(ARGV[i + 1])
  local args = {'XADD', KEYS[1]}
  if ARGV[1] ~= '' then
    args[#args + 1] = 'MAXLEN'; args[#args + 1] = '~'; args[#args + 1] = ARGV[1]
  end
  args[#args + 1] = ARGV[i]
  for j = 1, nf do args[#args + 1] = ARGV[i + 1 + j] end
  local r = redis.pcall(unpack(args))
  if type(r) == 'table' and r.err then
    if string.find(r.err, 'equal or smaller than the target stream top item', 1, true) then
      dups = dups + 1
    else
      return {stored, dups, r.err}
    end
  else
    stored = stored + 1
  end
  i = i + 2 + nf
end
return {stored, dups, ''}
"""


@final
class RedisStreamSink:
    """Appends each record to a Redis stream as fields ``data`` (the stored bytes) plus headers.

    Args:
        url: ``redis://host:port/db`` or ``rediss://`` (anything ``redis.Redis.from_url`` takes).
        stream: the stream key; ``{source_id}``, ``{queue}`` and ``{epoch_ms}`` are filled in.
            Explicit IDs need one writer per key, hence the per-source default.
        dedup: "explicit-id" (no duplicates in the stream) or None (auto IDs, at least once).
        maxlen: approximate cap on the stream length (``MAXLEN ~``); None: unbounded.
        socket_timeout: seconds per socket operation; None: each send's own timeout.
        max_record_bytes: larger payloads are dead-lettered instead of sent.
    Raises:
        ValueError: an unknown dedup mode.
    """

    def __init__(self, url: str, *, stream: str = "edge:{source_id}", dedup: str | None = "explicit-id",
                 maxlen: int | None = None, socket_timeout: float | None = None,
                 max_record_bytes: int = MAX_RECORD_BYTES) -> None:
        if dedup not in ("explicit-id", None):
            raise ValueError(f"dedup must be 'explicit-id' or None, not {dedup!r}")
        self.url = url
        self.stream_template = stream
        self.dedup = dedup
        self.maxlen = maxlen
        self.socket_timeout = socket_timeout
        self.max_record_bytes = max_record_bytes
        self.stream = ""
        self._source: SourceInfo | None = None
        self._client: redis.Redis | None = None
        self._client_timeout: float | None = None
        self._script: Any = None

    def open(self, source: SourceInfo) -> None:
        """Connect, check the stream belongs to this source, warn when Redis is not durable.

        Raises:
            TransientSinkError: Redis is not reachable.
            SinkError: the stream holds IDs above this queue's (another writer or a newer queue).
        """
        try:
            import redis
        except ImportError as exc:
            raise SinkError("RedisStreamSink needs redis-py: pip install 'pqueue-log[redis]'") from exc
        self._source = source
        self.stream = source.format(self.stream_template)
        self._connect(self.socket_timeout or CONNECT_TIMEOUT_SECONDS)
        try:
            top = self._top_id()
            self._warn_if_not_durable()
        except redis.RedisError as exc:
            raise TransientSinkError(f"redis {self.url}: {exc}") from exc
        if self.dedup and top is not None and top[0] > source.epoch_ms:
            raise SinkError(
                f"stream {self.stream!r} already holds ID {top[0]}-{top[1]}, above this queue's IDs "
                f"({source.epoch_ms}-*): another writer uses it; give each queue its own stream "
                f"(the default 'edge:{{source_id}}') or use dedup=None")

    def _connect(self, timeout: float) -> None:
        """(Re)build the client when the socket timeout it needs changes."""
        if self._client is not None and self._client_timeout == timeout:
            return
        from redis import Redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        if self._client is not None:
            self._client.close()
        # No client-side retries: redis-py's default Retry(10) turned a 1 s timeout into 14 s
        # (notes/scale-out.md §1.3); the forwarder owns retries and backoff.
        self._client = Redis.from_url(
            self.url, socket_timeout=timeout, socket_connect_timeout=min(timeout, CONNECT_TIMEOUT_SECONDS),
            retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0)
        self._client_timeout = timeout
        self._script = self._client.register_script(_XADD_ALL)

    def _top_id(self) -> tuple[int, int] | None:
        assert self._client is not None
        try:
            info: dict[Any, Any] = self._client.xinfo_stream(self.stream)
        except Exception as exc:
            if "no such key" in str(exc).lower():
                return None
            raise
        raw = info.get("last-generated-id", info.get(b"last-generated-id"))
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        ms, _, seq = text.partition("-")
        return int(ms), int(seq or 0)

    def _warn_if_not_durable(self) -> None:
        assert self._client is not None
        import redis

        try:
            conf: dict[Any, Any] = self._client.config_get("appendonly")
        except redis.ResponseError:
            return  # CONFIG is renamed or forbidden (managed Redis): nothing to check
        value = conf.get("appendonly", conf.get(b"appendonly"))
        if value in ("no", b"no"):
            log.warning("redis %s has appendonly no: entries it acknowledged can be lost when it restarts; "
                        "set appendonly yes (appendfsync always or everysec)", self.url)

    def last_shipped(self) -> int | None:
        """The highest offset of this source in the stream, from its last-generated-id."""
        if self.dedup is None or self._source is None:
            return None
        import redis

        try:
            top = self._top_id()
        except redis.RedisError as exc:
            raise TransientSinkError(f"redis {self.url}: {exc}") from exc
        if top is None or top[0] != self._source.epoch_ms or top[1] < 1:
            return None
        return top[1] - 1

    def send(self, batch: Sequence[OutRecord], timeout: float) -> SendResult:
        """XADD the batch in order in one script call; report the stored prefix.

        Raises:
            TransientSinkError: Redis is unreachable, timed out, or refused the first record.
        """
        if self._source is None:
            raise TransientSinkError("RedisStreamSink is not open")
        import redis

        self._connect(self.socket_timeout or timeout)

        epoch = self._source.epoch_ms
        args: list[Any] = ["" if self.maxlen is None else str(self.maxlen)]
        for rec in batch:
            args += [f"{epoch}-{rec.offset + 1}" if self.dedup else "*", str(2 + 2 * len(rec.headers)),
                     "data", rec.payload]
            for item in rec.headers.items():
                args += item
        try:
            stored, dups, err = self._script(keys=[self.stream], args=args)
        except redis.RedisError as exc:
            # A timeout is "unknown": the script may have run. The explicit IDs make the
            # re-send harmless.
            raise TransientSinkError(f"redis {self.url}: {type(exc).__name__}: {exc}") from exc
        settled = int(stored) + int(dups)
        if settled == 0:
            message = err.decode() if isinstance(err, bytes) else str(err)
            raise TransientSinkError(f"redis {self.url}: XADD refused: {message}")
        return SendResult(batch[settled - 1].offset, [], int(dups))

    def close(self) -> None:
        client, self._client, self._script = self._client, None, None
        if client is not None:
            client.close()


__all__ = ["RedisStreamSink"]
