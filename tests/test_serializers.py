"""serializers.py: msgpack, json, raw, pickle by name, custom objects."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import pqueue
from pqueue.serializers import resolve


class Upper:
    """A custom serializer: any object with dumps/loads."""

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(obj).upper().encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data.decode().lower())


@pytest.mark.parametrize(("name", "item"), [
    ("msgpack", {"a": [1, 2, {"b": b"\x00"}]}),
    ("json", {"a": [1, 2, "ü"]}),
    ("raw", b"\x00\xffbytes"),
    ("pickle", {1, 2, 3}),
])
def test_each_serializer_roundtrips_through_the_queue(tmp_path: Path, name: str, item: Any) -> None:
    """What goes in comes out equal, after a reopen, for each named serializer."""
    with pqueue.Queue(tmp_path / "q", serializer=name) as q:
        q.put(item)
    with pqueue.Queue(tmp_path / "q", serializer=name) as q:
        assert q.get(timeout=1).data == item


def test_custom_serializer_object(tmp_path: Path) -> None:
    """An object with dumps/loads is used as is."""
    with pqueue.Queue(tmp_path / "q", serializer=Upper()) as q:
        q.put({"x": "y"})
        assert q.get(timeout=1).data == {"x": "y"}


def test_unknown_name_and_bad_object_are_refused() -> None:
    """A bad serializer argument is a clear ValueError/TypeError."""
    with pytest.raises(ValueError, match="unknown serializer 'yaml'"):
        resolve("yaml")
    with pytest.raises(TypeError, match="dumps"):
        resolve(42)  # type: ignore[arg-type]


def test_unserializable_payload_writes_nothing(tmp_path: Path) -> None:
    """An item msgpack cannot encode raises SerializationError and leaves the log as it was."""
    with pqueue.Queue(tmp_path / "q") as q:
        q.put(1)
        with pytest.raises(pqueue.SerializationError, match="cannot serialize object with msgpack"):
            q.put(object())
        with pytest.raises(pqueue.SerializationError, match="item 1"):
            q.put_many([1, object()])
        assert q.qsize() == 1


def test_raw_takes_only_bytes(tmp_path: Path) -> None:
    """The raw serializer refuses str with a message naming the type."""
    with pqueue.Queue(tmp_path / "q", serializer="raw") as q:
        with pytest.raises(pqueue.SerializationError, match="takes bytes, not str"):
            q.put("text")


def test_records_decode_by_their_own_codec(tmp_path: Path) -> None:
    """A json queue reopened as msgpack still reads its json records."""
    with pqueue.Queue(tmp_path / "q", serializer="json") as q:
        q.put({"k": 1})
    with pqueue.Queue(tmp_path / "q") as q:
        assert q.get(timeout=1).data == {"k": 1}


def test_pickle_records_never_unpickle_without_asking(tmp_path: Path) -> None:
    """A pickle record read through a msgpack handle raises instead of unpickling."""
    with pqueue.Queue(tmp_path / "q", serializer="pickle") as q:
        q.put({"k"})
    with pqueue.Queue(tmp_path / "q") as q:
        with pytest.raises(pqueue.SerializationError, match="serializer='pickle'"):
            q.get(timeout=1)


class SlowItems(dict):  # type: ignore[type-arg]
    """A dict subclass whose items() is Python code: msgpack calls it mid-pack."""

    def items(self) -> Any:
        time.sleep(0.0005)  # gives the GIL to another thread in the middle of a pack
        return super().items()


def test_msgpack_never_interleaves_two_packs() -> None:
    """One thread packs a dict subclass (Python runs mid-pack) while another packs plain
    dicts: every output decodes to what was packed. A single shared Packer interleaved the two
    into garbage that a record's CRC would then have vouched for."""
    codec = resolve("msgpack")
    bad: list[bytes] = []

    def slow() -> None:
        for i in range(100):
            out = codec.dumps(SlowItems(i=i, pad="a" * 40))
            if codec.loads(out) != {"i": i, "pad": "a" * 40}:
                bad.append(out)

    def fast() -> None:
        for i in range(5000):
            out = codec.dumps({"j": i, "list": list(range(10))})
            if codec.loads(out) != {"j": i, "list": list(range(10))}:
                bad.append(out)

    threads = [threading.Thread(target=slow), threading.Thread(target=fast)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []


def test_msgpack_pack_reentered_from_python_code_mid_pack() -> None:
    """Python code that runs mid-pack (a subclass's items(), a finalizer, a signal handler)
    and packs too, in the same thread, gets its own Packer."""
    codec = resolve("msgpack")

    class Reenter(dict):  # type: ignore[type-arg]
        def items(self) -> Any:
            assert codec.loads(codec.dumps({"inner": [1, 2, 3]})) == {"inner": [1, 2, 3]}
            return super().items()

    assert codec.loads(codec.dumps({"outer": Reenter(a=1)})) == {"outer": {"a": 1}}
