"""OPC UA values as samples: `select: Field.Sub[2]` into a structured value, quality from the
status code's severity, plain values (numbers, text, timestamps in ISO 8601), source
timestamps, and the buffer between asyncua's receive path and the sink that keeps the latest
value per tag when the sink falls far behind.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from asyncua import ua

from drivers.base import (
    DeviceRestarted,
    Quality,
    Sample,
    TagValue,
)

_PLAIN_TYPES = frozenset({float, int, str, bool})
"""Values a sample carries as they come (exact types: an IntEnum is not one of them)."""

MAX_PENDING_SAMPLES = 10_000
"""Samples waiting for the sink before the buffer keeps only the latest value per tag."""


# --- structured values ----------------------------------------------------------------------------

_SELECT_STEP = re.compile(
    r"\[(?P<index>\d+)\]|\[(?P<field>[A-Za-z_]\w*)=(?P<match>[^\]]*)\]|\.?(?P<name>[A-Za-z_]\w*)"
)


@dataclass(frozen=True, slots=True)
class Selector:
    """A path into a structured value: array elements (`[0]`, `[ID=1]`) and fields (`.Count`)."""

    text: str
    steps: tuple[tuple[str, str, str], ...]
    """Each step: ("index", "0", ""), ("match", field, value) or ("field", name, "")."""

    @classmethod
    def parse(cls, text: str) -> Selector:
        steps: list[tuple[str, str, str]] = []
        position = 0
        while position < len(text):
            step = _SELECT_STEP.match(text, position)
            if step is None:
                raise ValueError(
                    f"select {text!r}: cannot read {text[position:]!r}; write "
                    "e.g. [0].AccCount, [ID=1].Count or Message"
                )
            if step["index"] is not None:
                steps.append(("index", step["index"], ""))
            elif step["field"] is not None:
                steps.append(("match", step["field"], step["match"]))
            else:
                steps.append(("field", step["name"], ""))
            position = step.end()
        if not steps:
            raise ValueError("select must not be empty")
        return cls(text, tuple(steps))

    def apply(self, value: object) -> object:
        """The selected part; LookupError in words when the value has no such part."""
        for kind, key, wanted in self.steps:
            if isinstance(value, ua.ExtensionObject):
                raise LookupError(
                    f"select {self.text}: the server sent a structure of type "
                    f"{value.TypeId.to_string()} that cannot be decoded (it publishes no "
                    "definition of that data type)"
                )
            if kind == "field":
                if not hasattr(value, "__dataclass_fields__") or not hasattr(value, key):
                    fields = ", ".join(getattr(value, "__dataclass_fields__", {})) or "none"
                    raise LookupError(
                        f"select {self.text}: the value has no field {key!r} (fields: {fields})"
                    )
                value = getattr(value, key)
                continue
            if not isinstance(value, list | tuple):
                raise LookupError(f"select {self.text}: the value is not an array")
            if kind == "index":
                if int(key) >= len(value):
                    raise LookupError(
                        f"select {self.text}: the array has {len(value)} element(s), no [{key}]"
                    )
                value = value[int(key)]
                continue
            found = [
                element
                for element in value
                if str(plain_value(getattr(element, key, None))) == wanted
            ]
            if not found:
                raise LookupError(f"select {self.text}: no element with {key} = {wanted}")
            value = found[0]
        return value


def quality_of(status: ua.StatusCode | None) -> Quality:
    """OPC UA severity bits to sample quality: Good, Uncertain, anything else Bad."""
    # The two top bits (Part 4, 7.39): 00 Good, 01 Uncertain, 10 and 11 Bad. Read here rather
    # than through StatusCode.is_good() and is_uncertain(): this runs for every notification.
    severity = 0 if status is None else status.value >> 30
    if severity == 0:
        return Quality.GOOD
    if severity == 1:
        return Quality.UNCERTAIN
    return Quality.BAD


def plain_value(value: object) -> TagValue:
    """An OPC UA value as a sample value: numbers, booleans and strings as they are, text
    types as their text, timestamps in ISO 8601, anything else (arrays, structures) as text."""
    if value is None or type(value) in _PLAIN_TYPES:  # the common case, without isinstance
        return cast(TagValue, value)
    if isinstance(value, bool | float | str):
        return value
    if isinstance(value, int):
        return int(value)  # drops an IntEnum's class
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, ua.LocalizedText):
        return value.Text
    if isinstance(value, ua.QualifiedName | ua.NodeId):
        return value.to_string()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def epoch_seconds(stamp: datetime | None) -> float | None:
    if stamp is None or stamp.year <= 1601:  # 1601 is OPC UA's "no timestamp"
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def sample_from(
    driver: str,
    tag: str,
    datavalue: ua.DataValue | None,
    now: float,
    select: Selector | None = None,
) -> Sample:
    """The Sample for one DataValue (the part `select` picks of it): its source timestamp, else
    the server's, else `now`. LookupError when `select` finds no such part."""
    if datavalue is None:
        return Sample(driver, tag, None, now, Quality.BAD)
    status = datavalue.StatusCode
    # Runs for every notification: the common case (Good, a plain value, a source timestamp
    # from asyncua, which decodes them timezone-aware) without the general functions' calls.
    quality = Quality.GOOD if status is None or not status.value >> 30 else quality_of(status)
    value = None
    variant = datavalue.Value
    if quality is not Quality.BAD and variant is not None:
        raw = variant.Value
        if select is not None:
            value = plain_value(select.apply(raw))
        elif raw is None or type(raw) in _PLAIN_TYPES:
            value = raw
        else:
            value = plain_value(raw)
    stamp = datavalue.SourceTimestamp
    if stamp is not None and stamp.tzinfo is not None and stamp.year > 1601:
        source_time = stamp.timestamp() or epoch_seconds(datavalue.ServerTimestamp) or now
    else:
        source_time = epoch_seconds(stamp) or epoch_seconds(datavalue.ServerTimestamp) or now
    return Sample(driver, tag, value, source_time, quality)


class PendingSamples:
    """Samples on their way from asyncua's receive path to the sink.

    `put` never blocks, so a slow sink cannot stall the OPC UA connection. Past `limit` samples
    it keeps only the latest per tag: intermediate telemetry is dropped (and counted), the
    latest value of every tag, and so a counter's total, is kept.
    """

    def __init__(self, limit: int = MAX_PENDING_SAMPLES) -> None:
        self.limit = limit
        self.dropped = 0
        self.compactions = 0
        self._samples: list[Sample | DeviceRestarted] = []
        self._compact_above = limit
        """Where the next compaction starts: `limit`; but twice what the last one kept when it
        kept more than it dropped (about as many tags as `limit`, or more, each with one
        value). Each compaction is then paid for by at least as many puts as it scanned, and
        a put costs O(1) on average however many tags a server has."""
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._samples)

    def put(self, sample: Sample | DeviceRestarted) -> int:
        """Queue a sample (or a restart notice, never dropped); return how many older samples
        were dropped to make room."""
        self._samples.append(sample)
        self._ready.set()
        if len(self._samples) <= self._compact_above:
            return 0
        self.compactions += 1
        latest: dict[tuple[int, str], Sample | DeviceRestarted] = {}
        restarts = 0
        for queued in self._samples:
            # Samples are never merged across a restart notice: the last value read before
            # the restart and the first after it both count.
            if isinstance(queued, DeviceRestarted):
                restarts += 1
                latest[(restarts, "")] = queued
                continue
            key = (restarts, queued.tag)
            latest.pop(key, None)  # re-insert, so the order is by latest arrival
            latest[key] = queued
        dropped = len(self._samples) - len(latest)
        self._samples = list(latest.values())
        kept = len(self._samples)
        self._compact_above = self.limit if dropped >= kept else max(self.limit, 2 * kept)
        self.dropped += dropped
        return dropped

    async def take(self) -> list[Sample | DeviceRestarted]:
        """Wait for samples and take them all, oldest first."""
        await self._ready.wait()
        batch, self._samples = self._samples, []
        self._compact_above = self.limit
        self._ready.clear()
        return batch
