"""Async handlers of the consumer pool: one event-loop thread running `workers` worker coroutines.

The pool's dispatcher stays a thread and hands tasks over with `call_soon_threadsafe`; each
worker coroutine awaits the handler, so `workers` tasks run at a time. Unlike a thread, a
coroutine can be cancelled: `task_timeout` and the stop deadline cancel the handler for real.
Settling a task (ack, nack, dead letter) is a short blocking call on the loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pool import ConsumerPool, _Task

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_SECONDS = 30.0  # a worker coroutine gets this long to end once told to


class EventLoopWorkers:
    """The event loop, its thread and the worker coroutines of one pool.

    Only the pool's dispatcher and its stop path call these methods.
    """

    def __init__(self, pool: ConsumerPool) -> None:
        self.pool = pool
        self.loop = asyncio.new_event_loop()
        # Created here, bound to the loop on first use (Python >= 3.10); touched only on the loop.
        self.queue: asyncio.Queue[_Task | None] = asyncio.Queue()
        self.thread = threading.Thread(target=self._serve, name=f"pqueue-loop:{pool.group}", daemon=True)
        self.coroutines: list[Future[None]] = []  # owned by the dispatcher thread

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def start(self) -> None:
        self.thread.start()

    def spawn(self) -> None:
        """Add one worker coroutine."""
        self.coroutines.append(asyncio.run_coroutine_threadsafe(self._worker(), self.loop))

    def retire(self) -> None:
        """Have one idle worker coroutine end."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    def submit(self, task: _Task) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, task)

    def cancel(self, task: _Task) -> None:
        """Cancel the handler of an abandoned task (its worker coroutine ends with it)."""
        if task.atask is not None:
            self.loop.call_soon_threadsafe(task.atask.cancel)

    def close(self) -> None:
        """End every worker coroutine, then the loop and its thread."""
        for _ in self.coroutines:
            self.retire()
        for fut in self.coroutines:
            try:
                fut.result(timeout=CLOSE_TIMEOUT_SECONDS)
            except BaseException as exc:  # a worker coroutine cancelled at the stop deadline
                log.debug("worker coroutine ended with %r", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()

    async def _worker(self) -> None:
        while True:
            task = await self.queue.get()
            if task is None:
                return
            task.atask = asyncio.current_task()
            try:
                await run_task(self.pool, task)
            except asyncio.CancelledError:
                if not task.abandoned:
                    raise
                return  # handed back at the stop deadline; the pool is going away


async def run_task(pool: ConsumerPool, task: _Task) -> None:
    """Await the handler on one task and apply the outcome (the async twin of `_run_task`)."""
    msg = task.msg
    if msg.attempt > pool.max_attempts:
        pool._dead_letter_unrun(task)
        return
    t0 = time.perf_counter()
    try:
        if pool.task_timeout is None:
            value = await pool.handler(msg)
        else:
            try:
                value = await asyncio.wait_for(pool.handler(msg), pool.task_timeout)
            except asyncio.TimeoutError:
                pool._count("timed_out")
                raise TimeoutError(f"task ran longer than task_timeout={pool.task_timeout} s") from None
    except Exception as exc:
        pool._settle(task, exc, time.perf_counter() - t0, None)
    else:
        pool._settle(task, None, time.perf_counter() - t0, None, value=value)


__all__ = ["EventLoopWorkers", "run_task"]
