"""What goes into the outbox and what comes out of it, as plain frozen records: the events and
their deliveries, input dead letters, lot statuses, hand actions, and the counts metrics read.

The enums here name values that are stored in the database (a delivery's state, an event's
priority class): their numbers are on disk and never change. They are two enums, not four
constants, because a dead delivery and an informational event once shared the number 2 in one
name space, and a query could compare one with the other without anyone noticing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Literal, get_args


class DeliveryState(IntEnum):
    """Where an owed delivery stands (`deliveries.state`). Stored: never renumber (1 was
    never used)."""

    PENDING = 0
    """Owed: `lease` offers it when it heads its partition key and is due."""
    DEAD = 2
    """Dead-lettered by a permanent rejection: kept with its reason until retried or purged."""


class Priority(IntEnum):
    """An event's priority class (`events.priority`): lower goes first when a destination has
    a backlog, and `INFORMATIONAL` is refused first when the outbox reaches its disk budget."""

    QUALITY = 0
    """Quality and disposition: a hold must reach ERP before more stock moves."""
    BUSINESS = 1
    """Confirmations, consumption, genealogy, completion: what ERP books."""
    INFORMATIONAL = 2
    """Start, interruption, resumption, downtime: useful, never blocking."""


LotStatusName = Literal["hold", "release", "reject"]
"""A lot's quality status: `hold` until a disposition says `release` or `reject`."""

LOT_STATUS_NAMES: tuple[LotStatusName, ...] = get_args(LotStatusName)


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """A business event as the outbox holds it: opaque payload plus what delivery needs."""

    id: str
    type: str
    partition_key: str
    payload: bytes
    destinations: tuple[str, ...]
    priority: int = Priority.BUSINESS
    """A `Priority` (an int, so that a caller's own priority enum with the same numbers fits)."""


REJECTED_PAYLOAD_LIMIT = 16 * 1024
"""Bytes of a rejected input's payload that are kept: enough to see what was wrong, little
enough that a flood of large bad messages (which may hold personal data) does not fill the disk."""


@dataclass(frozen=True, slots=True)
class RejectedInput:
    """An input a driver received but could not use, kept with the reason (input dead letter):
    the payload as it arrived (at most `REJECTED_PAYLOAD_LIMIT` bytes) and the source's message
    id, so that it can be traced and run again once the config is fixed."""

    source: str
    topic: str
    payload: bytes
    reason: str
    received_at: float
    message_id: str | None = None
    replaces: int | None = None
    """The id of the input dead letter this one is a new attempt at (a reingest rejected
    again): that row gets the new reason instead of a second row being added."""

    def kept_reason(self) -> str:
        """The reason as stored: it says so when the payload was cut to the limit."""
        if len(self.payload) <= REJECTED_PAYLOAD_LIMIT:
            return self.reason
        return (
            f"{self.reason} (payload of {len(self.payload)} bytes; its first "
            f"{REJECTED_PAYLOAD_LIMIT} kept)"
        )


@dataclass(frozen=True, slots=True)
class HandAction:
    """A change a person made by hand, for the hand-action journal (`hand_actions`).

    `action` names the command (`retry`, `purge-dead`, `reingest`, `trust opcua`), `target`
    what it touched in words (`event <id>`, `all dead letters for erp`), `who` the person
    (`os user alice`, or `api token` for a call over the local API), `reason` why, as given
    with `--reason`. The row also holds the time and how many things the action affected.
    """

    action: str
    target: str
    who: str
    reason: str


@dataclass(frozen=True, slots=True)
class LotStatus:
    """A lot's quality status: `hold` until a disposition says `release` or `reject`."""

    lot_id: str
    status: LotStatusName
    since: float
    source: str
    order_id: str | None = None
    material: str | None = None
    decided: bool = True
    """False for the status a produced lot starts with: it never overrides a decision."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event leased for delivery to one destination."""

    seq: int
    destination: str
    event_id: str
    event_type: str
    partition_key: str
    payload: bytes
    attempts: int


@dataclass(frozen=True, slots=True)
class Settlement:
    """What became of one leased delivery: `delivered` (journal it, forget it), `retry` (keep
    it, due again at `retry_at`), or `dead` (park it as a dead letter with `reason`)."""

    delivery: Delivery
    outcome: Literal["delivered", "retry", "dead"]
    status: int | None
    reference: str | None = None
    retry_at: float = 0.0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class CommitResult:
    inserted: int
    duplicates: int
    refused: int = 0
    new_ids: frozenset[str] = frozenset()
    """Ids of the events this commit added (not duplicates, not refused)."""


@dataclass
class DestinationCounts:
    pending: int = 0
    retrying: int = 0
    dead: int = 0
    oldest_pending_age: float | None = None


@dataclass
class OutboxStats:
    """Running counters since the outbox was opened (metrics read these)."""

    committed: int = 0
    duplicates_ignored: int = 0
    rejected_inputs: int = 0
    refused_informational: int = 0
    delivered: int = 0
    retries: int = 0
    dead_lettered: int = 0
    dead_retried: int = 0
    transactions: int = 0
    disk_full_waits: int = 0
    payloads_purged: int = 0
    """Payloads of delivered events deleted by the bulk purge (`Outbox._purge`)."""
    leased_from_memory: int = 0
    """Deliveries leased without a read: committed by this process and still held in
    memory (`Outbox.lease`)."""


class OutboxFull(Exception):
    """Raised by `commit(..., wait=False)` when business events would have to wait."""
