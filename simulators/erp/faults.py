"""The ERP simulator's misbehaviour on purpose: the standing fault knobs (latency, error rate,
outage), the count-down ones (scripted statuses, dropped connections), and the counters of what
it refused.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from simulators.http_common import (
    FaultKnobs,
)

JsonObject = dict[str, Any]
Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Faults(FaultKnobs):
    """Misbehaviour the simulator applies to /api and /sap requests, validated on creation."""

    outage_until: float = 0.0
    """Unix time until which every /api and /sap request answers 503 (0: no outage)."""


@dataclass(frozen=True)
class FaultActions:
    """The run-time knobs that act once or count down rather than stay set."""

    outage_seconds: float | None = None
    status_sequence: tuple[int, ...] | None = None
    drop_connection: int | None = None
    drop_response: int | None = None
    expire_tokens_now: bool = False
    invalidate_csrf: bool = False

    NAMES = frozenset(
        {
            "outage_seconds",
            "status_sequence",
            "drop_connection",
            "drop_response",
            "expire_tokens_now",
            "invalidate_csrf",
        }
    )

    @classmethod
    def parse(cls, changes: Mapping[str, object]) -> FaultActions:
        """Validate the action knobs among ``changes`` (decoded JSON), or raise ValueError."""
        actions: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in cls.NAMES:
                continue
            if name == "outage_seconds":
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise ValueError(f"outage_seconds must be a number >= 0, got {value!r}")
                actions[name] = float(value)
            elif name == "status_sequence":
                actions[name] = status_sequence(value)
            elif name in ("drop_connection", "drop_response"):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
                actions[name] = value
            else:
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be true or false, got {value!r}")
                actions[name] = value
        return cls(**actions)


def status_sequence(value: object) -> tuple[int, ...]:
    """Validate a scripted status list: 2xx lets a delivery through, 4xx/5xx answers it."""
    if not isinstance(value, list | tuple):
        raise ValueError(f"status_sequence must be a list of HTTP statuses, got {value!r}")
    statuses = []
    for status in value:
        if (
            isinstance(status, bool)
            or not isinstance(status, int)
            or not (200 <= status <= 299 or 400 <= status <= 599)
        ):
            raise ValueError(f"status_sequence entries must be 2xx, 4xx or 5xx, got {status!r}")
        statuses.append(status)
    return tuple(statuses)


@dataclass
class Counters:
    """What the simulator counts in memory (stored data is counted from the database)."""

    errors_injected: int = 0
    outage_rejections: int = 0
    connections_dropped: int = 0
    responses_dropped: int = 0
    tokens_issued: int = 0
    token_requests_refused: int = 0
    auth_rejections: int = 0
    csrf_tokens_fetched: int = 0
    csrf_rejections: int = 0


@dataclass
class ScriptedFaults:
    """Count-down knobs: scripted statuses and dropped connections for the next deliveries."""

    statuses: deque[int] = field(default_factory=deque)
    drop_connection: int = 0
    drop_response: int = 0

    def as_json(self) -> JsonObject:
        return {
            "status_sequence": list(self.statuses),
            "drop_connection": self.drop_connection,
            "drop_response": self.drop_response,
        }
