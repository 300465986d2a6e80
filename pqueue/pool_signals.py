"""The signal handling of `ConsumerPool.run()`: SIGINT/SIGTERM stop the pool gracefully.

A Python signal handler runs in the main thread between bytecodes, possibly while that thread
holds a lock the handler would need; so the handler only writes the signal number to a pipe,
and the main thread, blocked in select() on that pipe, does the work. The pool writes a zero
byte to the same pipe when it stops on its own (a fatal error, a stop() from elsewhere).
"""

from __future__ import annotations

import logging
import os
import select
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pool import ConsumerPool

log = logging.getLogger(__name__)


def until_signalled(pool: ConsumerPool, stop_timeout: float) -> None:
    """Start `pool` if it is new and block until it has stopped (call from the main thread).

    The first SIGINT/SIGTERM asks for `stop(stop_timeout)`; a second one hands back the
    in-flight tasks at once. The previous signal handlers come back afterwards.
    """
    from .pool import BROKEN, NEW, STOPPED

    r, w = os.pipe()
    os.set_blocking(w, False)

    def on_signal(signum: int, _frame: object) -> None:
        # Only a write here: the main thread may be inside a lock this handler would need.
        try:
            os.write(w, bytes([signum]))
        except OSError:
            pass  # the pipe is full: enough signals are queued already

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    with pool._lock:
        pool._wakeups.append(w)
        finished = pool._state in (STOPPED, BROKEN)
    try:
        if pool._state == NEW:
            pool.start()
        signals = 0
        while not finished:
            select.select([r], [], [])
            for signum in os.read(r, 64):
                if signum == 0:
                    continue  # the pool's own wake-up
                signals += 1
                log.info("%r: got %s, %s", pool, signal.Signals(signum).name,
                         "stopping" if signals == 1 else "handing back in-flight tasks now")
                pool._request_stop(stop_timeout if signals == 1 else 0.0)
            with pool._lock:
                finished = pool._state in (STOPPED, BROKEN)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        with pool._lock:
            pool._wakeups.remove(w)
        os.close(r)
        os.close(w)


__all__ = ["until_signalled"]
