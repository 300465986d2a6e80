"""Fsync policies: when appended records are made durable."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class FsyncPolicy:
    """When appended records are fsynced. `mode` is "always", "interval" or "never"."""

    mode: str
    interval: float = 0.0  # seconds: the longest a record stays unsynced (interval mode)
    every: int = 0  # records: the most records left unsynced (interval mode; 0 = no bound)

    @classmethod
    def parse(cls, spec: str | float | int | FsyncPolicy) -> FsyncPolicy:
        """Accept "always", "never", "interval" (a 100 ms window), a number of seconds,
        or a string such as "50ms", "2s", "1000 records" or "50ms/1000"."""
        if isinstance(spec, FsyncPolicy):
            return spec
        if isinstance(spec, bool):
            raise TypeError("fsync must be 'always', 'never', 'interval' or a window such as '50ms'")
        if isinstance(spec, (int, float)):
            if spec <= 0:
                raise ValueError("an fsync interval must be a positive number of seconds")
            return cls("interval", float(spec), 0)
        if not isinstance(spec, str):
            raise TypeError(f"fsync must be a string or a number of seconds, not {type(spec).__name__}")
        text = spec.strip().lower()
        if text in ("always", "never"):
            return cls(text)
        if text == "interval":
            return cls("interval", 0.1, 0)
        interval, every = 0.0, 0
        for part in text.split("/"):
            m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|records?)?\s*", part)
            if not m:
                raise ValueError(f"bad fsync policy {spec!r}: use 'always', 'never', 'interval', "
                                 f"'50ms', '2s', '1000 records' or '50ms/1000'")
            value, unit = float(m.group(1)), m.group(2) or ("records" if "." not in m.group(1) and
                                                          "/" in text and interval else "s")
            if unit.startswith("record"):
                every = int(value)
            else:
                interval = value / 1000 if unit == "ms" else value
        if interval <= 0 and every <= 0:
            raise ValueError(f"bad fsync policy {spec!r}: the window must be positive")
        return cls("interval", interval or 3600.0, every)

    def describe(self) -> str:
        if self.mode != "interval":
            return self.mode
        parts = [f"{self.interval * 1000:g}ms"]
        if self.every:
            parts.append(f"{self.every} records")
        return "interval " + "/".join(parts)
