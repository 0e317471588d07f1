"""Event types, their outbox priority, and event ids derived from natural keys.

An event's id is a UUIDv5 over its natural key, never random and never time based: deriving it
again after a crash gives the same id, which is what lets the outbox and the receivers drop
duplicates. Natural keys come in two kinds (`source_key`, `state_key`): what a source system
names (an MES message id, a lot id, a QMS decision) and what the gateway derives from its own
state, which carries the outbox's epoch so that a new outbox never reissues an id.
"""

from __future__ import annotations

import uuid
from enum import IntEnum
from typing import Final, Literal, get_args

__all__ = [
    "EVENT_ID_NAMESPACE",
    "EVENT_TYPES",
    "OFFLINE_EPOCH",
    "SEQUENCE_DIGITS",
    "EventType",
    "Priority",
    "event_id",
    "format_sequence",
    "source_key",
    "state_key",
]


EventType = Literal[
    "operation.started",
    "operation.interrupted",
    "operation.resumed",
    "operation.completed",
    "production.confirmation",
    "material.consumed",
    "lot.produced",
    "downtime.recorded",
    "inspection.requested",
    "inspection.result",
    "nonconformance.raised",
    "lot.disposition",
    "order.released",
    "order.changed",
    "order.cancelled",
]
"""Every CloudEvent `type` the gateway emits."""

EVENT_TYPES: Final[frozenset[str]] = frozenset(get_args(EventType))
"""The same, as a set: the keys of `edge.model.events.EVENT_MODELS` (checked by a test)."""

EVENT_ID_NAMESPACE: Final = uuid.UUID("2c271f3e-a0d6-5b13-92ec-d92edb3e29dd")
"""Namespace of event ids: `uuid5(NAMESPACE_URL, "urn:plantsync:event-id")`. Never change it:
every id already sent to ERP and QMS was derived under it."""

SEQUENCE_DIGITS: Final = 20
"""Width of the zero-padded `sequence` extension (enough for any unsigned 64-bit counter), so
that lexical order equals numeric order."""


class Priority(IntEnum):
    """Outbox priority class: lower goes first when a destination has a backlog."""

    QUALITY = 0
    """Quality and disposition: a hold must reach ERP before more stock moves."""
    BUSINESS = 1
    """Confirmations, consumption, genealogy, completion: what ERP books."""
    INFORMATIONAL = 2
    """Start, interruption, resumption, downtime: useful, never blocking."""


def _escape_key_part(part: str | int) -> str:
    if isinstance(part, bool) or not isinstance(part, str | int):
        raise TypeError(f"natural key parts must be str or int, not {type(part).__name__}")
    # Escaping keeps the join injective: ("a|b", "c") and ("a", "b|c") must not meet.
    return str(part).replace("\\", "\\\\").replace("|", "\\|")


def event_id(event_type: str, *natural_key: str | int) -> str:
    """Return the id of the event of `event_type` identified by `natural_key`.

    The id is a UUIDv5 under `EVENT_ID_NAMESPACE` over `"event_type|part|part|..."` (a `|` or
    `\\` inside a part is escaped with a backslash). It depends on nothing else: no clock, no
    random number, no arrival order, so deriving it again after a crash gives the same id and the
    outbox and receivers see a duplicate, not a new event. Parts are rendered as text, so `10`
    and `"10"` are the same part. Put in the key whatever makes the milestone unique: site,
    machine, order, operation, counter range, MES message id.
    """
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    if not natural_key:
        raise ValueError("an event id needs a natural key of at least one part")
    name = "|".join([event_type, *(_escape_key_part(part) for part in natural_key)])
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, name))


NaturalKey = tuple[str | int, ...]

OFFLINE_EPOCH: Final = "offline"
"""The epoch of events derived offline (`plantsync replay`, the golden cases, unit tests): fixed,
so that the same input gives the same ids on every run. A running gateway never uses it: its
epoch is its outbox's (`Outbox.epoch`), random and made with the database."""


def source_key(site: str, *names: str | int) -> NaturalKey:
    """The natural key of an event that a source system identifies: an MES message id, a lot id
    the MES named, a QMS decision on a lot. The same message or decision always gives the same
    id, in any outbox, so a redelivery after the outbox was lost is still a duplicate."""
    return (site, *names)


def state_key(epoch: str, site: str, machine_id: str, *parts: str | int) -> NaturalKey:
    """The natural key of an event the gateway derives from its own state: counter ranges and
    totals, the time an order was bound (0 for an order fixed in the config), transition
    times. That state starts from nothing when the outbox database is replaced (moved aside as
    damaged, or deleted), so the key carries the outbox's `epoch`: without it the new
    database would derive ids that receivers already hold for other units, and an idempotent
    receiver would drop the new ones as duplicates. Within one outbox the epoch never
    changes, so deriving an event again after a crash still gives the same id."""
    if not epoch:
        raise ValueError("a state key needs the outbox epoch")
    return ("epoch", epoch, site, machine_id, *parts)


def format_sequence(sequence: int) -> str:
    """Render `sequence` as the CloudEvents `sequence` extension: 20 zero-padded digits."""
    if isinstance(sequence, bool) or not isinstance(sequence, int):
        raise TypeError("sequence must be an int")
    if not 0 <= sequence < 10**SEQUENCE_DIGITS:
        raise ValueError(f"sequence must be in [0, 10**{SEQUENCE_DIGITS}), got {sequence}")
    return f"{sequence:0{SEQUENCE_DIGITS}d}"
