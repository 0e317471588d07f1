"""Settling leased deliveries in bulk: the SQL of `Outbox.settle`, run on the writer thread
inside one group-committed transaction.

A request's outcomes (or several requests') are written with one statement per kind of outcome
(`executemany`), not four statements per event: acknowledgements get the group commit that
inserts always had. Of one key's retries in one call (a run of its events in one request), only
the first counts as a failed attempt: the later ones cannot be due before it is delivered, so
they stay as they were (no attempt, no due time), waiting behind it. So only a key's head ever
holds attempts, which is what `Outbox.counts().retrying` counts.

A delivered event's payload is not deleted in the settle: its seq is queued (`purge_queue`,
in the same transaction, so a crash loses nothing) and `purge_delivered` deletes queued
payloads later in bulk, in seq order. One request's events are one key's run, scattered
over the events table a page apiece: deleting them in the settle was three quarters of its
pages written (bench/forward.py, batched: 346 WAL frames per 400 events, 75 without).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass

from buffer.outbox.heads import Head, held_by_none, next_head
from buffer.outbox.records import DeliveryState, Settlement


@dataclass(frozen=True)
class Settled:
    """What a settle changed, for the outbox's memory: the deliveries of each kind, and the
    new head of every (destination, key) touched (None: the key owes nothing more)."""

    delivered: Sequence[Settlement]
    retried: Sequence[Settlement]
    dead: Sequence[Settlement]
    heads: dict[tuple[str, str], Head | None]


def sort_settlements(settlements: Sequence[Settlement]) -> Settled:
    """Split by outcome; a key's later retries in the same call are dropped (see above)."""
    retrying: set[tuple[str, str]] = set()
    retried = []
    for settlement in sorted(settlements, key=lambda s: s.delivery.seq):
        slot = (settlement.delivery.destination, settlement.delivery.partition_key)
        if settlement.outcome == "retry" and slot not in retrying:
            retrying.add(slot)
            retried.append(settlement)
    return Settled(
        [s for s in settlements if s.outcome == "delivered"],
        retried,
        [s for s in settlements if s.outcome == "dead"],
        {(s.delivery.destination, s.delivery.partition_key): None for s in settlements},
    )


def write_settlements(db: sqlite3.Connection, settled: Settled) -> Settled:
    """Record `settled` and read each touched key's new head, in the caller's transaction."""
    now = time.time()
    if settled.delivered:
        done = [s.delivery for s in settled.delivered]
        db.executemany(
            "DELETE FROM deliveries WHERE destination = ? AND partition_key = ? AND event_seq = ?",
            [(d.destination, d.partition_key, d.seq) for d in done],
        )
        db.executemany(
            "INSERT INTO journal(event_id, event_type, destination, delivered_at, attempts,"
            " status, reference) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    s.delivery.event_id,
                    s.delivery.event_type,
                    s.delivery.destination,
                    now,
                    s.delivery.attempts + 1,
                    s.status,
                    s.reference,
                )
                for s in settled.delivered
            ],
        )
        # The payload goes once no destination owes the event (its journal rows stay), in
        # the bulk of a later `purge_delivered`: queued here, durably, in this transaction.
        db.executemany(
            "INSERT OR IGNORE INTO purge_queue(seq) VALUES (?)", [(d.seq,) for d in done]
        )
    if settled.retried:
        db.executemany(
            "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?,"
            " last_status = ?, last_error = ? WHERE destination = ? AND partition_key = ?"
            " AND event_seq = ?",
            [
                (
                    s.retry_at,
                    s.status,
                    s.reason[:2000],
                    s.delivery.destination,
                    s.delivery.partition_key,
                    s.delivery.seq,
                )
                for s in settled.retried
            ],
        )
    if settled.dead:
        db.executemany(
            f"UPDATE deliveries SET state = {DeliveryState.DEAD:d}, attempts = attempts + 1,"
            " last_status = ?, last_error = ?, dead_at = ? WHERE destination = ?"
            " AND partition_key = ? AND event_seq = ?",
            [
                (
                    s.status,
                    s.reason[:2000],
                    now,
                    s.delivery.destination,
                    s.delivery.partition_key,
                    s.delivery.seq,
                )
                for s in settled.dead
            ],
        )
    heads = {slot: next_head(db, *slot) for slot in settled.heads}
    return Settled(settled.delivered, settled.retried, settled.dead, heads)


@dataclass(frozen=True)
class Purged:
    """What a purge did: entries that left the queue, and payloads deleted (fewer when
    another destination still owes an event: its payload stays, queued again at its own
    delivery)."""

    dequeued: int
    deleted: int


def purge_delivered(db: sqlite3.Connection, limit: int) -> Purged:
    """Delete the payloads of up to `limit` queued events (oldest first) that no destination
    owes any more, in the caller's transaction. In seq order, the deletes of many events
    share each page of the events table."""
    dequeued, last = db.execute(
        "SELECT count(*), max(seq) FROM (SELECT seq FROM purge_queue ORDER BY seq LIMIT ?)",
        (limit,),
    ).fetchone()
    if not dequeued:
        return Purged(0, 0)
    # One statement, not one per seq: the writer holds the GIL less (a statement per row is a
    # release and a take of it each) and SQLite walks both tables in order.
    held, names = held_by_none(db)
    deleted = db.execute(
        "DELETE FROM events WHERE seq IN (SELECT seq FROM purge_queue WHERE seq <= ?)" + held,
        (last, *names),
    ).rowcount
    db.execute("DELETE FROM purge_queue WHERE seq <= ?", (last,))
    return Purged(dequeued, max(0, deleted))


def riding_purge(db: sqlite3.Connection, limit: int) -> Purged | sqlite3.Error:
    """`purge_delivered` inside another caller's transaction: a failure of its own (a
    trigger, a damaged index of `events`) is rolled back to its savepoint and returned, so
    the commits and settles it rides with still commit. An error that ended the whole
    transaction (SQLite rolls back on a full disk or an I/O error) is raised, as theirs."""
    db.execute("SAVEPOINT purge")
    try:
        purged = purge_delivered(db, limit)
    except sqlite3.Error as exc:
        if not db.in_transaction:
            raise
        db.execute("ROLLBACK TO purge")
        db.execute("RELEASE purge")
        return exc
    db.execute("RELEASE purge")
    return purged
