"""The heads of partition keys, and the delivery-row SQL the store's transactions share.

A head is the oldest owed delivery of one (destination, partition key): the only one of its
key that `lease` may offer. The store keeps every head in memory (`Head`) and moves it in the
same transaction that moves the rows, with `next_head`; `load_heads` rebuilds them all at open
by a skip scan of the `deliveries_heads` index, so a key costs a few probes however many events
it holds.

The deliveries are keyed (destination, partition_key, event_seq), in key order, with no index
by event (schema 9): a statement that finds deliveries by event names each destination
(`destinations`, `held_by_none`) and the event's key.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from buffer.outbox.records import DeliveryState, OutboxEvent

NewDelivery = tuple[str, str, int, int, OutboxEvent]
"""(destination, partition key, event seq, priority, the event) of a delivery a commit
added."""


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
        " ORDER BY event_seq LIMIT 1",
        (destination, key),
    ).fetchone()
    return None if row is None else Head(*row)


def load_heads(db: sqlite3.Connection) -> dict[str, dict[str, Head]]:
    """The head of every (destination, key), by a skip scan of the indexes: a few probes per
    key, however many events each key holds."""
    heads: dict[str, dict[str, Head]] = {}
    for destination in destinations(db):
        owed = (
            "SELECT partition_key FROM deliveries WHERE destination = ?"
            f" AND state = {DeliveryState.PENDING:d}"
        )
        row = db.execute(f"{owed} ORDER BY partition_key LIMIT 1", (destination,)).fetchone()
        while row is not None:  # the first key, then the next after each (an empty key too)
            key = row[0]
            head = next_head(db, destination, key)
            assert head is not None
            heads.setdefault(destination, {})[key] = head
            row = db.execute(
                f"{owed} AND partition_key > ? ORDER BY partition_key LIMIT 1", (destination, key)
            ).fetchone()
    return heads


def destinations(db: sqlite3.Connection) -> list[str]:
    """Every destination that holds a delivery (owed or dead), a probe apiece."""
    names: list[str] = []
    row = db.execute("SELECT destination FROM deliveries ORDER BY destination LIMIT 1").fetchone()
    while row is not None:  # the first name, then the next after each (an empty name too)
        names.append(row[0])
        row = db.execute(
            "SELECT destination FROM deliveries WHERE destination > ? ORDER BY destination LIMIT 1",
            (row[0],),
        ).fetchone()
    return names


def marks(count: int) -> str:
    """`count` SQL placeholders, for an `IN (...)` list (as of each destination's name)."""
    return ",".join("?" * count)


def held_by_none(db: sqlite3.Connection, events: str = "events") -> tuple[str, tuple[str, ...]]:
    """The SQL condition (and its arguments) that the event row `events` has no delivery left,
    owed or dead. The deliveries are keyed (destination, partition_key, event_seq) and have
    no index by event (schema 9): the condition probes that key once per destination."""
    names = destinations(db)
    if not names:
        return "", ()
    return (
        " AND NOT EXISTS (SELECT 1 FROM deliveries AS held WHERE held.destination IN"
        f" ({marks(len(names))}) AND held.partition_key = {events}.partition_key"
        f" AND held.event_seq = {events}.seq)",
        tuple(names),
    )


def load_counts(db: sqlite3.Connection) -> tuple[Counter[str], Counter[str]]:
    """Owed and dead deliveries per destination, as the store then keeps them in memory."""
    pending: Counter[str] = Counter()
    dead: Counter[str] = Counter()
    for destination, state, total in db.execute(
        "SELECT destination, state, COUNT(*) FROM deliveries GROUP BY destination, state"
    ):
        (dead if state == DeliveryState.DEAD else pending)[destination] = total
    return pending, dead


def dead_filter(
    db: sqlite3.Connection, event_id: str | None, destination: str | None
) -> tuple[str, tuple[str, ...]]:
    """The SQL condition (and its arguments) that picks one event's or one destination's dead
    letters, or all of them. One event's go by the deliveries' key: (each) destination, the
    event's partition key and seq."""
    where, args = "", tuple[str, ...]()
    if destination is not None:
        where += " AND destination = ?"
        args += (destination,)
    elif event_id is not None:
        names = destinations(db)
        where += f" AND destination IN ({marks(len(names))})"
        args += tuple(names)
    if event_id is not None:
        where += (
            " AND partition_key = (SELECT partition_key FROM events WHERE id = ?)"
            " AND event_seq = (SELECT seq FROM events WHERE id = ?)"
        )
        args += (event_id, event_id)
    return where, args


def drop_if_done(db: sqlite3.Connection, seqs: Iterable[int]) -> int:
    """Forget the payloads of those events no destination owes any more (their journal rows
    stay); returns how many went."""
    held, names = held_by_none(db)
    cursor = db.executemany(
        "DELETE FROM events WHERE seq = ?" + held, [(seq, *names) for seq in seqs]
    )
    return max(0, cursor.rowcount)


SMALL_COMMIT = 8
"""Below this many events a commit inserts them one by one (`insert_each`): the whole-commit
statements cost a lookup of 64 ids and two reads of `sqlite_sequence` whatever the size, and
50 producers committing one event each ran at 16,300 commits/s that way against 22,700 one by
one (bench/outbox.py)."""
ID_PROBE = 64
"""Ids a commit looks up per statement to find those already committed: a fixed number of
placeholders (the last id repeated), so the statement is prepared once."""


def insert_events(
    db: sqlite3.Connection, events: Sequence[OutboxEvent], now: float
) -> tuple[set[str], list[NewDelivery]]:
    """Insert each event whose id is new (not committed before, nor earlier in `events`), and
    a delivery per destination; returns the new ids and the deliveries added (for the heads).

    From SMALL_COMMIT events on, one statement per kind of row for the whole commit
    (`executemany`), not three per event: the events of one transaction take consecutive seqs
    (AUTOINCREMENT, one writer), which is checked against `sqlite_sequence` before any
    delivery names one."""
    if len(events) < SMALL_COMMIT:
        return insert_each(db, events, now)
    known = committed_ids(db, [event.id for event in events])
    fresh: list[OutboxEvent] = []
    for event in events:
        if event.id not in known:  # held, delivered or routed nowhere before: the same event
            known.add(event.id)
            fresh.append(event)
    if not fresh:
        return set(), []
    db.executemany(
        "INSERT INTO event_ids(id, committed_at) VALUES (?, ?)",
        [(event.id, now) for event in fresh],
    )
    stored = [event for event in fresh if event.destinations]
    new_rows: list[NewDelivery] = []
    if stored:
        first = next_seq(db)
        db.executemany(
            "INSERT INTO events(id, type, partition_key, priority, payload, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(e.id, e.type, e.partition_key, e.priority, e.payload, now) for e in stored],
        )
        if next_seq(db) != first + len(stored):
            raise RuntimeError(
                f"the outbox gave {len(stored)} events seqs that do not follow from {first}"
            )
        new_rows = [
            (destination, event.partition_key, first + number, event.priority, event)
            for number, event in enumerate(stored)
            for destination in event.destinations
        ]
        insert_deliveries(db, new_rows)
    return {event.id for event in fresh}, new_rows


def insert_each(
    db: sqlite3.Connection, events: Sequence[OutboxEvent], now: float
) -> tuple[set[str], list[NewDelivery]]:
    """`insert_events` a statement per row: for a commit of a few events."""
    inserted: set[str] = set()
    new_rows: list[NewDelivery] = []
    for event in events:
        cursor = db.execute(
            "INSERT INTO event_ids(id, committed_at) VALUES (?, ?) ON CONFLICT(id) DO NOTHING",
            (event.id, now),
        )
        if cursor.rowcount == 0:
            continue  # held, delivered or routed nowhere before: the same event
        inserted.add(event.id)
        if not event.destinations:
            continue
        seq = db.execute(
            "INSERT INTO events(id, type, partition_key, priority, payload, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (event.id, event.type, event.partition_key, event.priority, event.payload, now),
        ).lastrowid
        assert seq is not None
        rows = [(d, event.partition_key, seq, event.priority, event) for d in event.destinations]
        insert_deliveries(db, rows)
        new_rows += rows
    return inserted, new_rows


def insert_deliveries(db: sqlite3.Connection, rows: Sequence[NewDelivery]) -> None:
    """The owed deliveries of events just inserted, in both of `insert_events`' ways."""
    db.executemany(
        "INSERT INTO deliveries(event_seq, destination, partition_key, priority,"
        " state, attempts, next_attempt_at)"
        f" VALUES (?, ?, ?, ?, {DeliveryState.PENDING:d}, 0, 0)",
        [(seq, destination, key, priority) for destination, key, seq, priority, _ in rows],
    )


def committed_ids(db: sqlite3.Connection, ids: Sequence[str]) -> set[str]:
    """Those of `ids` committed before (within the journal's retention: `event_ids`)."""
    found: set[str] = set()
    marks = ",".join("?" * ID_PROBE)
    for start in range(0, len(ids), ID_PROBE):
        chunk = list(ids[start : start + ID_PROBE])
        chunk += [chunk[-1]] * (ID_PROBE - len(chunk))
        found.update(
            row[0] for row in db.execute(f"SELECT id FROM event_ids WHERE id IN ({marks})", chunk)
        )
    return found


def next_seq(db: sqlite3.Connection) -> int:
    """The seq the next event inserted gets (`events` is AUTOINCREMENT: one past the largest
    ever given, kept in `sqlite_sequence`)."""
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    return int(row[0]) + 1 if row is not None else 1
