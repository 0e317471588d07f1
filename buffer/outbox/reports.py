"""What the outbox shows people: the delivery journal, dead letters, input dead letters, the
hand-action journal, and one event's whole story (`outbox show`).

Plain functions over a read connection, run by the store on its reader thread; each returns
rows as dicts, keyed by column, for the CLI and the local API to print.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Literal

from buffer.outbox.heads import destinations, marks
from buffer.outbox.records import DeliveryState

DeliveryFilter = Literal["pending", "retrying", "dead"]
"""Which owed deliveries `deliveries` lists."""

_CONDITIONS: dict[DeliveryFilter, str] = {
    "pending": f"d.state = {DeliveryState.PENDING:d}",
    "retrying": f"d.state = {DeliveryState.PENDING:d} AND d.attempts > 0",
    "dead": f"d.state = {DeliveryState.DEAD:d}",
}

_STATE_NAME = f"CASE state WHEN {DeliveryState.DEAD:d} THEN 'dead' ELSE 'pending' END"


def dicts(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


def journal(db: sqlite3.Connection, since: float, limit: int | None) -> list[dict[str, Any]]:
    return dicts(
        db.execute(
            "SELECT event_id, event_type, destination, delivered_at, attempts, status,"
            " reference FROM journal WHERE delivered_at >= ? ORDER BY rowid LIMIT ?",
            (since, -1 if limit is None else limit),
        )
    )


def dead_letters(db: sqlite3.Connection) -> list[dict[str, Any]]:
    names = destinations(db)  # each destination's dead letters by the deliveries_heads index
    return dicts(
        db.execute(
            "SELECT e.id, e.type, d.destination, d.partition_key, d.attempts, d.last_status,"
            " d.last_error, d.dead_at FROM deliveries d INDEXED BY deliveries_heads"
            " JOIN events e ON e.seq = d.event_seq"
            f" WHERE d.destination IN ({marks(len(names))})"
            f" AND d.state = {DeliveryState.DEAD:d} ORDER BY d.dead_at, d.event_seq",
            names,
        )
    )


def rejected_inputs(db: sqlite3.Connection, since: float, limit: int) -> list[dict[str, Any]]:
    rows = dicts(
        db.execute(
            "SELECT id, source, topic, message_id, payload, reason, received_at"
            " FROM rejected_inputs WHERE received_at >= ? ORDER BY id DESC LIMIT ?",
            (since, limit),
        )
    )
    for row in rows:
        row["payload"] = row["payload"].decode(errors="replace")
    return rows


def hand_actions(db: sqlite3.Connection, since: float, limit: int) -> list[dict[str, Any]]:
    return dicts(
        db.execute(
            "SELECT at, action, target, who, reason, affected FROM hand_actions"
            " WHERE at >= ? ORDER BY id LIMIT ?",
            (since, limit),
        )
    )


def event_state(db: sqlite3.Connection, event_id: str) -> dict[str, str]:
    names = destinations(db)
    found = {
        name: "delivered"
        for (name,) in db.execute("SELECT destination FROM journal WHERE event_id = ?", (event_id,))
    }
    found |= {
        name: ("dead" if state == DeliveryState.DEAD else "pending")
        for name, state in db.execute(
            "SELECT d.destination, d.state FROM events e JOIN deliveries d"
            " ON d.event_seq = e.seq AND d.partition_key = e.partition_key"
            f" WHERE e.id = ? AND d.destination IN ({marks(len(names))})",
            (event_id, *names),
        )
    }
    return found


def deliveries(
    db: sqlite3.Connection, destination: str | None, state: DeliveryFilter, limit: int
) -> list[dict[str, Any]]:
    # In commit order: the events table's own, each event's deliveries found by their key,
    # so the first `limit` come without reading (or sorting) every owed delivery.
    names = destinations(db) if destination is None else [destination]
    return dicts(
        db.execute(
            "SELECT e.id, e.type, d.destination, d.partition_key, d.attempts,"
            " d.next_attempt_at, d.last_status, d.last_error, e.created_at"
            " FROM events e CROSS JOIN deliveries d"
            f" WHERE d.destination IN ({marks(len(names))})"
            " AND d.partition_key = e.partition_key AND d.event_seq = e.seq"
            f" AND {_CONDITIONS[state]} ORDER BY e.seq, d.destination LIMIT ?",
            (*names, limit),
        )
    )


def show(db: sqlite3.Connection, event_id: str) -> dict[str, Any] | None:
    rows = dicts(
        db.execute(
            "SELECT seq, id, type, partition_key, priority, payload, created_at FROM events"
            " WHERE id = ?",
            (event_id,),
        )
    )
    journal_rows = dicts(
        db.execute(
            "SELECT destination, delivered_at, attempts, status, reference FROM journal"
            " WHERE event_id = ? ORDER BY rowid",
            (event_id,),
        )
    )
    if not rows and not journal_rows:
        return None
    found: dict[str, Any] = {"id": event_id, "journal": journal_rows, "deliveries": []}
    if rows:
        event = rows[0]
        event["payload"] = event["payload"].decode(errors="replace")
        found |= event
        names = destinations(db)
        found["deliveries"] = dicts(
            db.execute(
                f"SELECT destination, {_STATE_NAME} AS state, attempts, next_attempt_at,"
                " last_status, last_error, dead_at FROM deliveries"
                f" WHERE destination IN ({marks(len(names))}) AND partition_key = ?"
                " AND event_seq = ? ORDER BY destination",
                (*names, event["partition_key"], event["seq"]),
            )
        )
    return found
