"""Retry policy of the consumer pool: the backoff schedule and the two signals a handler may raise.

A handler that raises anything is retried after `Backoff.delay(attempt)` seconds. Two
exceptions say more than "it failed": `Retry(delay=...)` picks the delay itself (an upstream
said "try again in 10 s"), and `Reject(reason)` says retrying is pointless (the task is bad),
so the message goes to the dead-letter queue at once.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import final


class Retry(Exception):
    """Raised by a handler: this attempt failed, deliver the message again after `delay` seconds.

    The attempt still counts towards `max_attempts` (a task that always asks for a retry ends
    in the dead-letter queue like one that always fails).

    Args:
        delay: seconds before the next delivery; None uses the pool's backoff schedule.
    Raises:
        ValueError: `delay` is negative or not a number.
    """

    def __init__(self, delay: float | None = None) -> None:
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0):
            raise ValueError("Retry 'delay' must be a non-negative number of seconds or None")
        self.delay = None if delay is None else float(delay)
        super().__init__("retry requested" if delay is None else f"retry requested in {delay} s")

    def __reduce__(self) -> tuple[type[Retry], tuple[float | None]]:
        # args holds the message, not the delay: pickle must rebuild from the delay.
        return (Retry, (self.delay,))


class Reject(Exception):
    """Raised by a handler: this task can never succeed; dead-letter it now, without retries.

    Args:
        reason: why, recorded in the dead-letter message's metadata.
    """

    def __init__(self, reason: str = "") -> None:
        self.reason = str(reason)
        super().__init__(self.reason)


def _check_number(name: str, value: object, *, minimum: float, inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name!r} must be a number, not {type(value).__name__}")
    if value < minimum or (not inclusive and value == minimum) or value != value:
        bound = "at least" if inclusive else "greater than"
        raise ValueError(f"{name!r} must be {bound} {minimum}, got {value!r}")
    return float(value)


@final
class Backoff:
    """Exponential backoff: attempt n waits ``initial * multiplier**(n-1)`` seconds.

    The delay is capped at `maximum`, then spread by up to ±`jitter` (a fraction) so that tasks
    that failed together do not all come back in the same instant.

    Args:
        initial: the delay after the first failed attempt, in seconds.
        multiplier: the growth factor per attempt (1.0 gives a constant delay).
        maximum: the cap on the delay before jitter, in seconds.
        jitter: a fraction from 0 to 1; the delay is multiplied by a random factor in
            [1 - jitter, 1 + jitter].
    Raises:
        TypeError, ValueError: a value is of the wrong type or out of range.
    """

    __slots__ = ("initial", "multiplier", "maximum", "jitter")

    def __init__(self, *, initial: float = 0.5, multiplier: float = 2.0, maximum: float = 60.0,
                 jitter: float = 0.1) -> None:
        self.initial = _check_number("initial", initial, minimum=0.0)
        self.multiplier = _check_number("multiplier", multiplier, minimum=1.0)
        self.maximum = _check_number("maximum", maximum, minimum=0.0)
        self.jitter = _check_number("jitter", jitter, minimum=0.0)
        if self.jitter > 1.0:
            raise ValueError(f"'jitter' must be at most 1.0, got {jitter!r}")
        if self.maximum < self.initial:
            raise ValueError(f"'maximum' ({maximum}) must not be below 'initial' ({initial})")

    def delay(self, attempt: int, *, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before delivering a message again after failed attempt `attempt`.

        Args:
            attempt: the number of the attempt that failed, from 1.
            rand: a source of uniform numbers in [0, 1) (injectable for tests).
        Returns:
            The jittered delay, never negative.
        Raises:
            ValueError: `attempt` is below 1.
        """
        if attempt < 1:
            raise ValueError(f"'attempt' counts from 1, got {attempt!r}")
        try:
            base = min(self.maximum, self.initial * self.multiplier ** (attempt - 1))
        except OverflowError:
            base = self.maximum  # a huge attempt number: the cap has long been reached
        if self.jitter:
            base *= 1.0 + self.jitter * (2.0 * rand() - 1.0)
        return max(0.0, base)

    def __repr__(self) -> str:
        return (f"Backoff(initial={self.initial}, multiplier={self.multiplier}, maximum={self.maximum}, "
                f"jitter={self.jitter})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Backoff):
            return NotImplemented
        return (self.initial, self.multiplier, self.maximum, self.jitter) == (
            other.initial, other.multiplier, other.maximum, other.jitter)

    def __hash__(self) -> int:
        return hash((self.initial, self.multiplier, self.maximum, self.jitter))


__all__ = ["Backoff", "Reject", "Retry"]
