"""Security defaults: private files, no pickle unless asked for, bounded hostile input, local exporters.

A queue directory is data that may come from elsewhere (a copied disk, a shared volume): it
must never become a code-execution vector, and a hostile segment must not make a reader
allocate without bound.
"""

from __future__ import annotations

import inspect as pyinspect
import os
import stat
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from crc32c import crc32c

import pqueue
import pqueue.inspect
from pqueue import record


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Run with umask 0, so any mode below comes from pqueue itself, not from the umask."""
    old = os.umask(0)
    yield
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            found[str(p.relative_to(root))] = os.lstat(p).st_mode
    return found


def test_new_queue_is_private(tmp_path: Path, open_umask: None) -> None:
    """Everything a queue creates (queue.id, log/, segments, write.lock, index/ and LMDB's files,
    dlq/, quarantine/) is 0700 (directories) or 0600 (files), whatever the umask."""
    path = tmp_path / "q"
    with pqueue.Queue(path, fsync="always", segment_bytes=4096) as q:
        for i in range(100):  # several segments
            q.put({"i": i, "pad": "x" * 100})
        m = q.get(timeout=1)
        q.ack(m)
        m = q.get(timeout=1)
        q.dead_letter(m, reason="test")  # creates dlq/, itself a queue
        q.flush()
    modes = _modes(path)
    assert {"queue.id", "log", "write.lock", "index", "index/data.mdb", "index/lock.mdb", "dlq",
            "dlq/queue.id"} <= set(modes), sorted(modes)
    assert os.lstat(path).st_mode & 0o777 == 0o700
    wrong = {name: oct(mode & 0o777) for name, mode in modes.items()
             if (mode & 0o777) != (0o700 if stat.S_ISDIR(mode) else 0o600)}
    assert not wrong, f"not private: {wrong}"


def test_quarantine_is_private(tmp_path: Path, open_umask: None) -> None:
    """Damaged bytes copied to quarantine/ are as private as the log they came from."""
    path = tmp_path / "q"
    with pqueue.Queue(path, fsync="always") as q:
        q.put({"i": 1})
    seg = next((path / "log").iterdir())
    with open(seg, "ab") as f:
        f.write(b"\xff" * 100)  # a garbage tail: quarantined and truncated at the next open
    with pqueue.Queue(path, fsync="always") as q:
        q.put({"i": 2})
    modes = _modes(path)
    assert any(name.startswith("quarantine/") for name in modes), sorted(modes)
    wrong = {name: oct(mode & 0o777) for name, mode in modes.items()
             if (mode & 0o777) != (0o700 if stat.S_ISDIR(mode) else 0o600)}
    assert not wrong, f"not private: {wrong}"


def test_default_serializer_is_msgpack(tmp_path: Path) -> None:
    """Without serializer=, payloads are msgpack on disk."""
    path = tmp_path / "q"
    with pqueue.Queue(path) as q:
        q.put({"a": 1})
    entries = [e for e in pqueue.inspect.records(path) if isinstance(e, pqueue.inspect.Entry)]
    assert [e.codec for e in entries] == [record.CODEC_MSGPACK]


class _Exploit:
    """Unpickling this creates a directory: proof that pickle.loads ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (self.marker,)


def test_pickle_record_is_never_loaded_by_default(tmp_path: Path) -> None:
    """A pickle record (planted by whoever could write the directory) in a queue opened with
    the default serializer raises SerializationError in get() and in dump; it never unpickles."""
    path = tmp_path / "q"
    marker = tmp_path / "pwned"
    with pqueue.Queue(path, serializer="pickle") as q:
        q.put(_Exploit(marker))
    with pqueue.Queue(path) as q:
        with pytest.raises(pqueue.SerializationError):
            q.get(timeout=1)
    entries = [e for e in pqueue.inspect.records(path) if isinstance(e, pqueue.inspect.Entry)]
    assert [e.codec for e in entries] == [record.CODEC_PICKLE]
    with pytest.raises(pqueue.SerializationError):
        entries[0].decode()
    assert not marker.exists(), "a pickle payload was executed"


def _hostile_segment(path: Path, length: int, attrs_len: int, tail: bytes) -> None:
    """Replace the queue's only segment with a valid header plus one record header whose
    length fields are hostile, followed by `tail` (the CRC cannot match)."""
    seg = next((path / "log").iterdir())
    header = record.encode_segment_header(0, 0)
    body = struct.pack("<IQQBBH", length, 0, 0, 0, record.CODEC_MSGPACK, attrs_len)
    # A correct CRC over the 24 header bytes alone: a reader that trusts the length before
    # checking it would try to read (and allocate) `length` bytes.
    seg.write_bytes(header + crc32c(body).to_bytes(4, "little") + body + tail)


@pytest.mark.parametrize("length,attrs_len", [(0xFFFFFFFF, 0), ((1 << 30) - 1, 0xFFFF), (16 << 20, 0),
                                              (100, 0xFFFF)])
def test_hostile_length_fields_are_bounded(tmp_path: Path, length: int, attrs_len: int) -> None:
    """A length field of up to 4 GiB in a 100-byte segment never makes open, get, dump or
    verify allocate more than a few MiB, and only QueueErrors come out."""
    path = tmp_path / "q"
    with pqueue.Queue(path) as q:
        q.put({"i": 0})
    _hostile_segment(path, length, attrs_len, b"\x01" * 64)
    tracemalloc.start()
    try:
        try:
            with pqueue.Queue(path) as q:
                with pytest.raises(pqueue.Empty):
                    q.get(timeout=0.1)
        except pqueue.QueueError:
            pass
        for item in pqueue.inspect.records(path):
            if isinstance(item, pqueue.inspect.Entry):
                raise AssertionError(f"a hostile record was read as data: {item}")
        pqueue.inspect.verify(path)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The resync window (4 MiB) and read chunks (256 KiB) are the largest buffers by design.
    assert peak < 12 << 20, f"peak allocation {peak} bytes for a {length}-byte length field"


def test_parse_one_bounds_the_length_before_slicing() -> None:
    """The record parser rejects a length beyond the limit before touching the payload."""
    body = struct.pack("<IQQBBH", 0xFFFFFFFF, 0, 0, 0, 1, 0)
    buf = crc32c(body).to_bytes(4, "little") + body
    got = record.parse_one(buf, 0, 0, 0, 16 << 20)
    assert isinstance(got, record.Bad)
    assert "exceeds" in got.reason


def test_metrics_exporter_binds_localhost_by_default() -> None:
    """Anything that listens on a socket defaults to 127.0.0.1, never all interfaces."""
    pool_mod = pytest.importorskip("pqueue.pool")
    pool_cls = getattr(pool_mod, "ConsumerPool", None)
    if pool_cls is None or not hasattr(pool_cls, "serve_metrics"):
        pytest.skip("no metrics exporter yet")
    default = pyinspect.signature(pool_cls.serve_metrics).parameters["host"].default
    assert default == "127.0.0.1"


def test_no_source_binds_all_interfaces() -> None:
    """No module of pqueue names 0.0.0.0 or "::" as an address (a static check)."""
    root = Path(pqueue.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "0.0.0.0" in p.read_text() or "'::'" in p.read_text() or '"::"' in p.read_text()]
    assert not offenders


def test_unprivileged_user_can_create_a_queue(tmp_path: Path) -> None:
    """A queue created by an ordinary user works for that user: the private modes must still
    let the owner into its own directories (a 0600 directory cannot be entered)."""
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to switch to an unprivileged user")
    import importlib
    import tempfile

    # Not under tmp_path: pytest's base directory is 0700 root, which nobody can enter. The
    # checkout and its venv may be just as closed (a clone in a mktemp directory), so pqueue
    # and its runtime dependencies are copied where the unprivileged user can read them.
    home = Path(tempfile.mkdtemp(prefix="pqueue-nobody-", dir="/tmp"))
    lib = home / "lib"
    for name in ("pqueue", "lmdb", "msgpack", "crc32c", "filelock"):
        package = Path(importlib.import_module(name).__file__ or "").resolve().parent
        shutil.copytree(package, lib / name, ignore=shutil.ignore_patterns("__pycache__"))
        for metadata in package.parent.glob(f"{name}-*.dist-info"):  # crc32c reads its version
            shutil.copytree(metadata, lib / metadata.name)
    os.chmod(home, 0o755)
    os.chown(home, 65534, 65534)
    code = ("import pqueue\n"
            f"with pqueue.Queue({str(home / 'q')!r}, fsync='always') as q:\n"
            "    q.put({'a': 1})\n"
            "    m = q.get(timeout=1); q.ack(m); q.flush()\n"
            "print('ok')\n")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", os.path.realpath(sys.executable),
                        "-c", code], env={"PYTHONPATH": str(lib)}, cwd=home, capture_output=True,
                       text=True, timeout=60)
    shutil.rmtree(home, ignore_errors=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-1500:]
