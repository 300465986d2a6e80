"""Payload serializers: msgpack (default), json, raw bytes, pickle by name only, or a custom object.

Each record stores the codec it was written with, so a reader decodes it correctly even when
it opened the queue with another serializer (except pickle and custom codecs, which decode
only through a queue opened with that serializer: a queue directory must never become a
code-execution vector for a reader that did not ask for pickle).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import msgpack

from .errors import SerializationError
from .record import CODEC_CUSTOM, CODEC_JSON, CODEC_MSGPACK, CODEC_PICKLE, CODEC_RAW, msgpack_packer


@runtime_checkable
class Serializer(Protocol):
    """Anything with `dumps(obj) -> bytes` and `loads(bytes) -> obj` can serialize payloads."""

    def dumps(self, obj: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class Codec:
    """A serializer bound to the codec id stored in each record."""

    __slots__ = ("name", "codec", "dumps", "loads")

    def __init__(self, name: str, codec: int, dumps: Callable[[Any], bytes], loads: Callable[[bytes], Any]):
        self.name = name
        self.codec = codec
        self.dumps = dumps
        self.loads = loads


def _raw_dumps(obj: Any) -> bytes:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj)
    raise TypeError(f"the raw serializer takes bytes, not {type(obj).__name__}")


def _json_dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _msgpack_codec() -> Codec:
    def loads(data: bytes) -> Any:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)

    return Codec("msgpack", CODEC_MSGPACK, msgpack_packer(datetime=False), loads)


def _builtin_loads(codec: int) -> Callable[[bytes], Any] | None:
    if codec == CODEC_MSGPACK:
        return lambda data: msgpack.unpackb(data, raw=False, strict_map_key=False)
    if codec == CODEC_JSON:
        return json.loads
    if codec == CODEC_RAW:
        return bytes
    return None


CODEC_NAMES = {CODEC_RAW: "raw", CODEC_MSGPACK: "msgpack", CODEC_JSON: "json", CODEC_PICKLE: "pickle",
               CODEC_CUSTOM: "custom"}


def resolve(serializer: str | Serializer) -> Codec:
    """Turn the `serializer=` argument of `Queue` into a Codec.

    Raises:
        ValueError: an unknown name.
        TypeError: an object without `dumps`/`loads`.
    """
    if isinstance(serializer, str):
        if serializer == "msgpack":
            return _msgpack_codec()
        if serializer == "json":
            return Codec("json", CODEC_JSON, _json_dumps, json.loads)
        if serializer == "raw":
            return Codec("raw", CODEC_RAW, _raw_dumps, bytes)
        if serializer == "pickle":
            return Codec("pickle", CODEC_PICKLE, pickle.dumps, pickle.loads)
        raise ValueError(f"unknown serializer {serializer!r}: use 'msgpack', 'json', 'raw', 'pickle' "
                         f"or an object with dumps() and loads()")
    if callable(getattr(serializer, "dumps", None)) and callable(getattr(serializer, "loads", None)):
        return Codec(type(serializer).__name__, CODEC_CUSTOM, serializer.dumps, serializer.loads)
    raise TypeError(f"serializer must be a name or an object with dumps() and loads(), "
                    f"not {type(serializer).__name__}")


def decoder(own: Codec) -> Callable[[int, bytes], Any]:
    """Return `decode(codec, payload)` that decodes any record readable through `own`.

    Raises (from the returned function):
        SerializationError: the payload does not decode, or its codec needs a serializer
            (pickle, custom) that this queue was not opened with.
    """
    builtin = {c: f for c in (CODEC_RAW, CODEC_MSGPACK, CODEC_JSON) if (f := _builtin_loads(c))}
    own_codec, own_loads = own.codec, own.loads

    def decode(codec: int, payload: bytes) -> Any:
        try:
            if codec == own_codec:
                return own_loads(payload)
            fn = builtin.get(codec)
            if fn is None:
                name = CODEC_NAMES.get(codec, f"#{codec}")
                raise SerializationError(
                    f"record was written with the {name} serializer; open the queue with "
                    f"serializer={name!r} (or the same custom object) to read it")
            return fn(payload)
        except SerializationError:
            raise
        except Exception as exc:
            raise SerializationError(f"payload does not decode as {CODEC_NAMES.get(codec, codec)}: {exc}") from exc

    return decode
