"""Delivery times that survive restarts and wall-clock jumps: pure functions, no I/O but clocks.

A delayed record carries its wall-clock not-before time and, beside it, the boot it was put in
(``/proc/sys/kernel/random/boot_id``) with a CLOCK_BOOTTIME deadline. Within the same boot the
boot clock decides, so a wall-clock step (an NTP sync on a box without an RTC) neither
releases delayed tasks early nor holds them. After a reboot only the wall clock is left; the
task then waits at most its original delay from now, so a clock that came up in the past
cannot hold it for ever (a clock that came up in the future releases it early: documented).
"""

from __future__ import annotations

import time
from typing import Any

_BOOT_ID: str | None = None


def boot_id() -> str:
    """An id of the current boot ("" where the platform has none)."""
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _BOOT_ID = f.read().strip()
        except OSError:
            _BOOT_ID = ""
    return _BOOT_ID


def boot_clock() -> float:
    """Seconds on a clock that never jumps and counts suspend (CLOCK_BOOTTIME on Linux)."""
    clock = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
    return time.clock_gettime(clock)


def stamp(delay: float) -> list[Any]:
    """The boot reference stored with a record delayed by `delay` seconds."""
    return [boot_id(), boot_clock() + delay]


def due_at(not_before: float, put_at: float, boot_ref: Any, now: float) -> float:
    """The wall-clock time at which a delayed record is due, judged at wall time `now`.

    Args:
        not_before: the wall-clock time asked for at put.
        put_at: the record's put timestamp (wall clock, seconds).
        boot_ref: `stamp()` as stored, or None.
        now: the current wall-clock time.
    """
    if isinstance(boot_ref, list) and len(boot_ref) == 2 and boot_ref[0] and boot_ref[0] == boot_id():
        return now + max(0.0, float(boot_ref[1]) - boot_clock())
    return min(not_before, now + max(0.0, not_before - put_at))
