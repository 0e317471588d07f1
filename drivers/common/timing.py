"""Durations as technicians write them in YAML, and the one backoff policy every retry loop uses.

A duration is written `500ms`, `15s`, `15m`, `2h` or `1h30m` (a number needs its unit; only 0
may go without); it is held as float seconds. The backoff is exponential with full jitter and
a cap (AWS architecture blog, "Exponential Backoff And Jitter"): drivers reconnecting and
forwarders retrying share it so that a plant-wide outage does not turn into a synchronized
storm when the peer returns.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_NUMBER = re.compile(r"[+-]?\d+(?:\.\d*)?|[+-]?\.\d+")


def parse_duration(value: Any) -> float:
    """Return seconds for `500ms`, `15m`, `1h30m`. A number without a unit is refused (is
    `poll_interval: 500` half a second or eight minutes?), except 0, which is 0 in any unit."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 500ms, 15s, 15m or 1h30m")
    if isinstance(value, int | float) or (
        isinstance(value, str) and _NUMBER.fullmatch(value.strip())
    ):
        number = float(value)
        if number != 0:
            shown = value.strip() if isinstance(value, str) else f"{value:g}"
            raise ValueError(f"add a unit: {shown}ms or {shown}s ({shown} alone could be either)")
        seconds = 0.0
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        if not _WHOLE.fullmatch(text):
            raise ValueError(f"{value!r} is not a duration such as 500ms, 15s, 15m or 1h30m")
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _PART.findall(text))
    else:
        raise ValueError("must be a duration such as 500ms, 15s, 15m or 1h30m")
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds % 3600 == 0 and seconds:
        return f"{int(seconds // 3600)}h"
    if seconds % 60 == 0 and seconds:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^(\d+(\.\d+)?(ms|s|m|h|d))+$",
            "examples": ["500ms", "15s", "15m", "1h30m"],
        }
    ),
]
"""Seconds, written in YAML as `500ms`, `15s`, `15m`, `2h` or `1h30m`."""


@dataclass
class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base * 2**n)).

    `reset()` after a success. `next_delay()` advances the attempt count.
    """

    base: float = 0.5
    cap: float = 30.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def ceiling(self, attempt: int) -> float:
        return float(min(self.cap, self.base * 2.0 ** min(attempt, 32)))

    def next_delay(self) -> float:
        delay = self.rng.uniform(0, self.ceiling(self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
