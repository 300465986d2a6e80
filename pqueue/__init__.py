"""pqueue: an embedded, crash-safe, disk-backed task queue (segmented CRC32C log + LMDB index)."""

from .backoff import Backoff, Reject, Retry
from .breaker import Breaker
from .consumer import Consumer
from .errors import (
    ClosedError,
    CorruptRecordError,
    DiskFullError,
    Empty,
    FormatVersionError,
    Full,
    LockTimeout,
    NotAQueueError,
    QueueError,
    ReadOnlyError,
    RecordTooLargeError,
    SerializationError,
    TaskFailed,
)
from .forward import forward
from .message import Message
from .pipeline import Many
from .pool import ConsumerPool
from .queue import Queue
from .record import FORMAT_VERSION
from .serializers import Serializer
from .tasks import App, TaskHandle

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "App",
    "Backoff",
    "Breaker",
    "ClosedError",
    "Consumer",
    "ConsumerPool",
    "CorruptRecordError",
    "DiskFullError",
    "Empty",
    "FormatVersionError",
    "Full",
    "LockTimeout",
    "Many",
    "Message",
    "NotAQueueError",
    "Queue",
    "QueueError",
    "ReadOnlyError",
    "RecordTooLargeError",
    "Reject",
    "Retry",
    "SerializationError",
    "Serializer",
    "TaskFailed",
    "TaskHandle",
    "__version__",
    "forward",
]
