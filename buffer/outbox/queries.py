"""The row SQL behind `Outbox`'s own methods: the rule state a commit writes, putting dead
letters back in line or purging them, pruning what outlived the retention, and the reads that
are not reports (a lease's rows, the oldest pending event's time, a lot's status, one input
dead letter and the count per source).

Plain functions over a connection: the writes run on the writer thread inside one
group-committed transaction, the reads on the reader thread; the store keeps its memory (heads,
counts) in step with what they return.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from buffer.outbox.database import write_hand_action, write_inputs_and_lots
from buffer.outbox.heads import (
    Head,
    NewDelivery,
    dead_filter,
    drop_if_done,
    insert_events,
    load_counts,
    load_heads,
)
from buffer.outbox.records import (
    Delivery,
    DeliveryState,
    HandAction,
    LotStatus,
    OutboxEvent,
    RejectedInput,
)
from buffer.outbox.settle import purge_delivered


def write_commit(
    db: sqlite3.Connection,
    events: Sequence[OutboxEvent],
    now: float,
    state_rows: Sequence[tuple[str, str]],
    rejected: Sequence[RejectedInput],
    resolved_inputs: Sequence[int],
    lots: Sequence[LotStatus],
) -> tuple[set[str], list[NewDelivery]]:
    """`Outbox.commit`'s transaction: the events, the rule state, the input dead letters and
    the lot statuses."""
    inserted, new_rows = insert_events(db, events, now)
    if state_rows:
        db.executemany(
            "INSERT INTO rule_state(key, value) VALUES (?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            state_rows,
        )
    write_inputs_and_lots(db, rejected, resolved_inputs, lots)
    return inserted, new_rows


def retry_dead(
    db: sqlite3.Connection,
    event_id: str | None,
    destination: str | None,
    hand: HandAction | None,
) -> tuple[int, dict[str, dict[str, Head]], tuple[Counter[str], Counter[str]]]:
    """`Outbox.retry_dead`'s transaction: how many went back in line, and the heads and
    counts reloaded."""
    where, args = dead_filter(db, event_id, destination)
    cursor = db.execute(
        f"UPDATE deliveries SET state = {DeliveryState.PENDING:d}, attempts = 0,"
        " next_attempt_at = 0, dead_at = NULL"
        f" WHERE state = {DeliveryState.DEAD:d}{where}",
        args,
    )
    if hand is not None:
        write_hand_action(db, hand, cursor.rowcount)
    return cursor.rowcount, load_heads(db), load_counts(db)


def purge_dead(
    db: sqlite3.Connection,
    event_id: str | None,
    destination: str | None,
    hand: HandAction | None,
) -> list[tuple[int, str]]:
    """`Outbox.purge_dead`'s transaction: the (event seq, destination) of each purged."""
    where, args = dead_filter(db, event_id, destination)
    found: list[tuple[int, str, str]] = db.execute(
        "SELECT event_seq, destination, partition_key FROM deliveries"
        f" WHERE state = {DeliveryState.DEAD:d}{where}",
        args,
    ).fetchall()
    db.executemany(
        "DELETE FROM deliveries WHERE event_seq = ? AND destination = ? AND partition_key = ?",
        found,
    )
    drop_if_done(db, [seq for seq, _, _ in found])
    if hand is not None:
        write_hand_action(db, hand, len(found))
    return [(seq, destination) for seq, destination, _ in found]


def prune(db: sqlite3.Connection, cutoff: float) -> tuple[int, int]:
    """`Outbox.prune`'s transaction: how many journal rows went, and how many delivered
    payloads (all that were queued: an id is remembered while its payload is held)."""
    purged = purge_delivered(db, -1).deleted
    pruned = db.execute("DELETE FROM journal WHERE delivered_at < ?", (cutoff,)).rowcount
    db.execute(
        "DELETE FROM event_ids WHERE committed_at < ? AND id NOT IN (SELECT id FROM events)",
        (cutoff,),
    )
    db.execute("DELETE FROM rejected_inputs WHERE received_at < ?", (cutoff,))
    db.execute("DELETE FROM hand_actions WHERE at < ?", (cutoff,))
    return int(pruned), purged


def load_state(db: sqlite3.Connection) -> list[Any]:
    return db.execute("SELECT key, value FROM rule_state").fetchall()


def lease(
    db: sqlite3.Connection,
    destination: str,
    due: Sequence[tuple[int, int, str]],
    limit: int,
    per_key: int,
) -> list[Delivery]:
    """The rows of `Outbox.lease`: each due (priority, seq, key) head, with its key's next
    deliveries when `per_key` is above 1."""
    select = (
        "SELECT d.event_seq, e.id, e.type, d.partition_key, e.payload, d.attempts"
        " FROM deliveries d JOIN events e ON e.seq = d.event_seq"
        f" WHERE d.destination = ? AND d.state = {DeliveryState.PENDING:d}"
        " AND d.partition_key = ?"
    )
    if per_key <= 1:  # each head by the deliveries' key
        heads = (
            db.execute(f"{select} AND d.event_seq = ?", (destination, key, seq)).fetchone()
            for _, seq, key in due
        )
        return [Delivery(row[0], destination, *row[1:]) for row in heads if row is not None]
    leased: list[Delivery] = []
    for _, seq, key in due:
        room = min(per_key, limit - len(leased))
        if room <= 0:
            break
        leased += [
            Delivery(row[0], destination, *row[1:])
            for row in db.execute(
                f"{select} AND d.event_seq >= ? ORDER BY d.event_seq LIMIT ?",
                (destination, key, seq, room),
            )
        ]
    return leased


def created_at(db: sqlite3.Connection, oldest: Mapping[str, int]) -> dict[str, float]:
    """Per destination, when the event at its given seq was committed."""
    # A head may have been delivered since it was looked at: then it has no row.
    found = {
        name: db.execute("SELECT created_at FROM events WHERE seq = ?", (seq,)).fetchone()
        for name, seq in oldest.items()
    }
    return {name: row[0] for name, row in found.items() if row is not None}


def lot_status(db: sqlite3.Connection, lot_id: str) -> Any:
    return db.execute(
        "SELECT lot_id, status, since, source, order_id, material FROM lot_status WHERE lot_id = ?",
        (lot_id,),
    ).fetchone()


def rejected_input(db: sqlite3.Connection, number: int) -> Any:
    return db.execute(
        "SELECT source, topic, payload, reason, received_at, message_id"
        " FROM rejected_inputs WHERE id = ?",
        (number,),
    ).fetchone()


def rejected_count(db: sqlite3.Connection) -> list[Any]:
    return db.execute("SELECT source, COUNT(*) FROM rejected_inputs GROUP BY source").fetchall()
