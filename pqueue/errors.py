"""The exception hierarchy: `QueueError` is the root of everything pqueue raises on purpose.

Misuse (a wrong type, a negative timeout) raises the builtin `TypeError`/`ValueError` instead and
changes nothing. Every message says what happened and what to do about it.
"""

from __future__ import annotations

import queue as _stdlib_queue


class QueueError(Exception):
    """Base class of every error pqueue raises about a queue's state or contents."""


class Empty(QueueError, _stdlib_queue.Empty):
    """`get()` found nothing to deliver within its timeout (also a `queue.Empty`)."""


class Full(QueueError, _stdlib_queue.Full):
    """`put()` found no room within its timeout (also a `queue.Full`)."""


class ClosedError(QueueError):
    """The handle was closed; open a new `Queue` to go on."""


class LockTimeout(QueueError):
    """An OS lock on the queue directory could not be taken in time."""


class NotAQueueError(QueueError):
    """The path exists but is not a pqueue directory; pqueue never touches it."""


class FormatVersionError(QueueError):
    """The queue was written by a newer pqueue whose on-disk format this one cannot read.

    Attributes:
        found: the format version on disk.
        supported: the newest version this code understands.
    """

    def __init__(self, found: int, supported: int, path: str = "") -> None:
        self.found = found
        self.supported = supported
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(
            f"{where}on-disk format version {found} is newer than the {supported} this pqueue "
            f"supports; upgrade pqueue to read this queue"
        )


class SerializationError(QueueError):
    """A payload could not be encoded or decoded by the queue's serializer; nothing was written."""


class RecordTooLargeError(QueueError):
    """A payload is larger than `max_record_bytes`; nothing was written."""


class DiskFullError(QueueError):
    """The filesystem ran out of space during an append; the partial record was rolled back."""


class ReadOnlyError(QueueError):
    """The queue lives on a read-only location and a write was asked for."""


class CorruptRecordError(QueueError):
    """A record failed its CRC32C or structural check and `on_corruption="raise"` was chosen.

    Attributes:
        path: the segment file.
        pos: the byte position of the damaged record in that file.
        reason: what was wrong with it.
    """

    def __init__(self, path: str, pos: int, reason: str) -> None:
        self.path = path
        self.pos = pos
        self.reason = reason
        super().__init__(
            f"{path}: damaged record at byte {pos}: {reason}; run `pqueue verify` to see the "
            f"damage and `pqueue repair` to move it to quarantine/"
        )


class TaskFailed(QueueError):
    """The task died (dead-lettered) instead of returning a result.

    Attributes:
        offset: the task's offset in its queue.
        error_type, error: the last error's type name and message ("" when it expired).
        attempts: how many deliveries it had.
        reason: why it died ("max_attempts", "rejected", "expired", ...).
        dead_letter: everything recorded about its death (the dead-letter metadata).
    """

    def __init__(self, offset: int, info: dict[str, object]) -> None:
        self.offset = offset
        self.dead_letter = dict(info)
        self.error_type = str(info.get("error_type", ""))
        self.error = str(info.get("error", ""))
        self.reason = str(info.get("reason", ""))
        attempts = info.get("attempts", 0)
        self.attempts = attempts if isinstance(attempts, int) else 0
        detail = f"{self.error_type}: {self.error}" if self.error_type else self.reason
        super().__init__(f"task {offset} failed after {self.attempts} attempt(s): {detail}; its payload is in "
                         f"the dead-letter queue")
