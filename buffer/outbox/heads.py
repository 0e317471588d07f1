"""The heads of partition keys, and the delivery-row SQL the store's transactions share.

A head is the oldest owed delivery of one (destination, partition key): the only one of its
key that `lease` may offer. The store keeps every head in memory (`Head`) and moves it in the
same transaction that moves the rows, with `next_head`; `load_heads` rebuilds them all at open
by a skip scan of the `deliveries_heads` index, so a key costs a few probes however many events
it holds.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from dataclasses import dataclass

from buffer.outbox.records import DeliveryState


@dataclass(slots=True)
class Head:
    """What `lease` needs of a key's head without reading the database."""

    seq: int
    priority: int
    due: float
    attempts: int = 0


def next_head(db: sqlite3.Connection, destination: str, key: str) -> Head | None:
    row = db.execute(
        "SELECT event_seq, priority, next_attempt_at, attempts FROM deliveries"
        f" WHERE destination = ? AND state = {DeliveryState.PENDING:d} AND partition_key = ?"
        " ORDER BY event_seq LIMIT 1", (destination, key)).fetchone()
    return None if row is None else Head(*row)


def load_heads(db: sqlite3.Connection) -> dict[str, dict[str, Head]]:
    """The head of every (destination, key), by a skip scan of the indexes: a few probes per
    key, however many events each key holds."""
    heads: dict[str, dict[str, Head]] = {}
    destination = ""
    while row := db.execute("SELECT destination FROM deliveries WHERE destination > ?"
                            " ORDER BY destination LIMIT 1", (destination,)).fetchone():
        destination = row[0]
        key = ""
        while row := db.execute(
            "SELECT partition_key FROM deliveries WHERE destination = ?"
            f" AND state = {DeliveryState.PENDING:d} AND partition_key > ?"
            " ORDER BY partition_key LIMIT 1", (destination, key)
        ).fetchone():
            key = row[0]
            head = next_head(db, destination, key)
            assert head is not None
            heads.setdefault(destination, {})[key] = head
    return heads


def load_counts(db: sqlite3.Connection) -> tuple[Counter[str], Counter[str]]:
    """Owed and dead deliveries per destination, as the store then keeps them in memory."""
    pending: Counter[str] = Counter()
    dead: Counter[str] = Counter()
    for destination, state, total in db.execute(
            "SELECT destination, state, COUNT(*) FROM deliveries GROUP BY destination, state"):
        (dead if state == DeliveryState.DEAD else pending)[destination] = total
    return pending, dead


def dead_filter(event_id: str | None, destination: str | None) -> tuple[str, tuple[str, ...]]:
    """The SQL condition (and its arguments) that picks one event's or one destination's dead
    letters, or all of them."""
    where, args = "", tuple[str, ...]()
    if event_id is not None:
        where += " AND event_seq = (SELECT seq FROM events WHERE id = ?)"
        args += (event_id,)
    if destination is not None:
        where += " AND destination = ?"
        args += (destination,)
    return where, args


def drop_if_done(db: sqlite3.Connection, seq: int) -> None:
    """Forget an event's payload once no destination owes it (its journal rows stay)."""
    db.execute("DELETE FROM events WHERE seq = ? AND NOT EXISTS"
               " (SELECT 1 FROM deliveries WHERE event_seq = ?)", (seq, seq))
