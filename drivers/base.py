"""What every southbound driver shares: the Sample it emits, its health, and its call contract.

Drivers know protocols, not business. A driver turns device reads into `Sample`s (driver name,
tag name, value, source timestamp, quality) and hands them to the sink it was given. It never
exits because a device is unreachable: it logs once that the device went away, retries with the
shared backoff, and logs once when it is back.

Call order: `__init__(config)` does no I/O; `run(sink)` connects, reads and reconnects until it
is cancelled; `health` is updated in place and may be read at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

TagValue = bool | int | float | str | None


class Quality(enum.StrEnum):
    """OPC UA style sample quality, carried to the rules."""

    GOOD = "good"
    UNCERTAIN = "uncertain"
    BAD = "bad"


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of one tag. `source_time` is Unix seconds from the device, or read time."""

    driver: str
    tag: str
    value: TagValue
    source_time: float
    quality: Quality = Quality.GOOD

    @property
    def signal(self) -> str:
        """The `driver.tag` name that machine configs refer to."""
        return f"{self.driver}.{self.tag}"


@dataclass(frozen=True, slots=True)
class MesMessage:
    """One MES event as a driver received it, its fields already mapped by the topic's field
    mapping to the names of a canonical MES input `kind` (e.g. `material.consumed`). The
    pipeline validates it against the canonical model; the driver only knows the protocol."""

    driver: str
    topic: str
    kind: str
    fields: Mapping[str, Any]
    message_id: str
    """Stable across redeliveries (the MES id, or a hash of the payload): the natural key."""
    received_at: float
    payload: bytes = b""
    """The message as it arrived, kept in an input dead letter if the pipeline rejects it, so
    that it can be run again (`plantsync outbox reingest`) once the config is fixed."""


@dataclass(frozen=True, slots=True)
class RejectedMessage:
    """A message that cannot be used (not JSON, too large, a mapped field missing): kept as an
    input dead letter with its reason, and acknowledged, so it never blocks the queue."""

    driver: str
    topic: str
    payload: bytes
    reason: str
    received_at: float
    message_id: str | None = None
    """The MES message id, when the payload could be read far enough to find it."""


@dataclass(frozen=True, slots=True)
class DeviceRestarted:
    """The device itself says it restarted since the driver last read it (OPC UA: a new
    `ServerStatus.StartTime`; Modbus: the configured `restart_marker` register went back).

    A device that restarts usually restarts its counters from 0, and after a long outage it may
    already have counted past the last value the gateway saw, so no drop is visible. The rules
    take this reading to mean: every counter of this driver read after `source_time` counts
    from 0, not from the last value seen. Drivers emit it before the first sample they read
    after the restart was detected."""

    driver: str
    source_time: float
    reason: str
    """What showed the restart, in words, for the log (e.g. "StartTime 06:00:01 -> 06:41:12")."""


Reading = Sample | MesMessage | RejectedMessage | DeviceRestarted

NONFINITE_NAMES: dict[str, float] = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
"""How a non-finite float is named where JSON cannot hold it (the spellings of JavaScript and
of Python's own `json` module, which writes them although no JSON parser has to accept them)."""


def json_value(value: TagValue) -> tuple[TagValue, str | None]:
    """A reading's value as JSON can hold it, and the name of what it was when it could not:
    a PLC's NaN or infinity (a failed sensor, an overflow) becomes None with "NaN",
    "Infinity" or "-Infinity"; every other value is itself with None."""
    if isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value):
            return None, "NaN"
        return None, "Infinity" if value > 0 else "-Infinity"
    return value, None


def finite_json(document: Any) -> Any:
    """The document with every non-finite float replaced by None: what any JSON answer of
    the gateway passes through last, so that a NaN that reached some figure can never make
    an answer invalid JSON (or a 500)."""
    if isinstance(document, float):
        return document if math.isfinite(document) else None
    if isinstance(document, dict):
        return {key: finite_json(value) for key, value in document.items()}
    if isinstance(document, list | tuple):
        return [finite_json(value) for value in document]
    return document


async def accepts_tcp(host: str, port: int, within: float) -> bool:
    """Whether a TCP connection to host:port opens within `within` seconds (then closed at
    once): how a driver waiting to reconnect sees that a device which was gone is back,
    without opening a session on it."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), within)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


DEFAULT_RECONNECT_MAX_DELAY = 10.0
"""Seconds: the most a driver waits between reconnect attempts. Short enough that a device
which is back is read again within seconds (a long cap let a restarted device count past the
last value seen before the gateway looked again), long enough not to hammer a device that is
down: with full jitter the mean wait at the cap is half of it."""

RECONNECT_MAX_DELAY_DOC = (
    "Longest wait between reconnect attempts (exponential backoff with full jitter up to this "
    "cap). Lower it to notice a returning device sooner; raise it to spare a flaky network."
)


def honour_cancellation() -> None:
    """Raise CancelledError if this task was asked to stop while a library swallowed it.

    On Python 3.11 `asyncio.wait_for` returns its inner result when that completes at the
    moment the task is cancelled, and the cancellation is lost (fixed in 3.12). pymodbus and
    asyncua await every request that way. In a TaskGroup child that is fatal: the group
    cancels its children once and never again, so a poll loop that lost it polls on forever
    and the daemon's stop hangs (measured: 31 of 300 random stops of a busy Modbus driver).
    The task's `cancelling()` count still says a stop was asked for; call this after such an
    await, and the stop happens at the next one."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


NAME_PATTERN = r"^[A-Za-z0-9_-]+$"
"""Driver and tag names: they join as `driver.tag`, so no dots."""


class Named(Protocol):
    name: str


def unique_names(items: Sequence[Named], what: str = "tag") -> None:
    """Raise ValueError naming the repeated names, for a config validator."""
    counts = Counter(item.name for item in items)  # not list.count: 50,000 tags happen
    repeated = sorted(name for name, count in counts.items() if count > 1)
    if repeated:
        raise ValueError(f"{what} names must be unique; repeated: {', '.join(repeated)}")


SampleSink = Callable[[Sequence[Reading]], Awaitable[None]]
"""Where a driver delivers a batch of readings. The await returns once whatever they produced
is committed to the outbox: it is the back-pressure, and the moment a driver may acknowledge
its source (an MQTT PUBACK), never earlier."""


@dataclass
class DriverHealth:
    """Counters a driver keeps up to date; read by health, metrics and status."""

    connected: bool = False
    last_sample_at: float | None = None
    reads: int = 0
    errors: int = 0
    last_error: str | None = None
    started_at: float = field(default_factory=time.monotonic)
    degraded: dict[str, str] = field(default_factory=dict)
    """What is wrong but does not stop the driver (a tag the device refuses, messages the
    broker dropped): one sentence per problem, by a key of the driver's choosing; `/readyz`
    and `/status` list them. A driver removes an entry when the problem is over."""

    def record_error(self, message: str) -> None:
        """Count an error and keep its message as the last one."""
        self.errors += 1
        self.last_error = message

    def last_sample_age(self, now: float | None = None) -> float | None:
        if self.last_sample_at is None:
            return None
        return (now if now is not None else time.time()) - self.last_sample_at


class Driver(ABC):
    """A southbound connection to one device or broker."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.health = DriverHealth()

    @abstractmethod
    async def run(self, sink: SampleSink) -> None:
        """Connect, read and reconnect until cancelled. Never returns on a device error."""
