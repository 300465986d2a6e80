"""The queue directory: create it, recognise it, refuse anything else; its stable identity.

``queue.id`` (JSON: source id, creation time, format version) is written last when a queue is
created, with tmp + fsync + rename + directory fsync, so a directory with a ``queue.id`` is a
complete queue. It lives beside the log, not in the index, so it survives an index rebuild.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass

from .errors import FormatVersionError, NotAQueueError, QueueError, ReadOnlyError
from .record import FORMAT_VERSION
from .segment import DIR_MODE, FILE_MODE, fsync_dir, write_all

log = logging.getLogger(__name__)

ID_FILE = "queue.id"
# What a queue directory may hold; a directory with anything else is not ours.
REPAIR_LOCK = "repair.lock"  # held by `pqueue repair` (a coarse filelock, one repair at a time)
OWN_ENTRIES = {"log", "index", "write.lock", ID_FILE, "quarantine", "dlq", REPAIR_LOCK}


@dataclass(frozen=True)
class Identity:
    """The queue's stable name: `source_id` (UUID) and creation time in ms since the epoch."""

    source_id: str
    created_ms: int
    format: int


def open_dir(path: str, *, create: bool) -> Identity:
    """Make sure `path` is a queue directory (creating it if allowed) and return its identity.

    Raises:
        NotAQueueError: `path` is a file, or a directory holding things that are not a queue's
            (it is left untouched), or missing while `create` is False.
        FormatVersionError: written by a newer pqueue.
        ReadOnlyError: the queue must be created on a read-only location.
    """
    id_path = os.path.join(path, ID_FILE)
    if os.path.isfile(id_path):
        return read_identity(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotAQueueError(f"{path} is a file, not a queue directory")
    if os.path.isdir(path):
        entries = set(os.listdir(path))
        strangers = {e for e in entries - OWN_ENTRIES if not (e.startswith(ID_FILE + ".") and e.endswith(".tmp"))}
        if strangers:
            shown = ", ".join(sorted(strangers)[:5])
            raise NotAQueueError(f"{path} is not a pqueue directory (it holds {shown}); pqueue leaves "
                                 f"it untouched: give a new or empty directory")
        if not create and "log" not in entries:
            raise NotAQueueError(f"{path} is not a pqueue directory (no {ID_FILE} and no log/)")
        if "log" in entries and os.listdir(os.path.join(path, "log")):
            # A queue whose queue.id was lost: its log is the truth, so adopt it with a new id.
            log.warning("%s: %s is missing; writing a new one (the source id changes)", path, ID_FILE)
    elif not create:
        raise NotAQueueError(f"{path} does not exist; `pqueue put` or pqueue.Queue() creates a queue")
    return _create(path)


def _create(path: str) -> Identity:
    try:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        try:
            os.mkdir(path, DIR_MODE)
            fsync_dir(parent)  # the queue directory itself survives power loss
        except FileExistsError:
            pass
        os.makedirs(os.path.join(path, "log"), mode=DIR_MODE, exist_ok=True)
        identity = Identity(str(uuid.uuid4()), int(time.time() * 1000), FORMAT_VERSION)
        data = json.dumps({"source_id": identity.source_id, "created_ms": identity.created_ms,
                           "format": identity.format}).encode() + b"\n"
        # Several threads or processes may create the same queue at once: each writes its own
        # tmp file and links it into place; link() fails if a queue.id is there already, and
        # the loser adopts the winner's identity.
        tmp = os.path.join(path, f"{ID_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            write_all(fd, data)
            os.fsync(fd)  # the content is durable before the name points at it
        finally:
            os.close(fd)
        try:
            os.link(tmp, os.path.join(path, ID_FILE))
        except FileExistsError:
            return read_identity(path)
        finally:
            os.unlink(tmp)
        fsync_dir(path)  # ... and the new name (with log/) survives power loss
        return identity
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise ReadOnlyError(f"cannot create a queue at {path}: {exc.strerror}; choose a writable "
                                f"location") from exc
        raise QueueError(f"cannot create a queue at {path}: {exc}") from exc


def read_identity(path: str) -> Identity:
    id_path = os.path.join(path, ID_FILE)
    try:
        with open(id_path, "rb") as f:
            raw = json.loads(f.read())
        identity = Identity(str(raw["source_id"]), int(raw["created_ms"]), int(raw.get("format", 1)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise QueueError(f"{id_path} is damaged ({exc}); restore it from a backup or delete it to "
                         f"give the queue a new source id") from exc
    if identity.format > FORMAT_VERSION:
        raise FormatVersionError(identity.format, FORMAT_VERSION, path)
    return identity


def is_queue(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ID_FILE)) or os.path.isdir(os.path.join(path, "log"))
