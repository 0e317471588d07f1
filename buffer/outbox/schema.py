"""The outbox schema and its migrations, applied in order at start.

`PRAGMA user_version` holds the schema version. Each migration is a list of statements run in
one transaction; a database newer than this code refuses to open rather than guess.
"""

from __future__ import annotations

import sqlite3

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # 1: events, per-destination deliveries, rule state, delivery journal.
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            type TEXT NOT NULL,
            partition_key TEXT NOT NULL,
            priority INTEGER NOT NULL,
            payload BLOB NOT NULL,
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE deliveries (
            event_seq INTEGER NOT NULL REFERENCES events(seq),
            destination TEXT NOT NULL,
            partition_key TEXT NOT NULL,
            priority INTEGER NOT NULL,
            state INTEGER NOT NULL,
            attempts INTEGER NOT NULL,
            next_attempt_at REAL NOT NULL,
            last_status INTEGER,
            last_error TEXT,
            dead_at REAL,
            PRIMARY KEY (destination, event_seq)
        ) WITHOUT ROWID""",
        "CREATE INDEX deliveries_heads ON deliveries(destination, state, partition_key, event_seq)",
        "CREATE INDEX deliveries_by_event ON deliveries(event_seq)",
        """CREATE TABLE rule_state (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE journal (
            event_id TEXT NOT NULL,
            event_type TEXT NOT NULL,
            destination TEXT NOT NULL,
            delivered_at REAL NOT NULL,
            attempts INTEGER NOT NULL,
            status INTEGER,
            reference TEXT
        )""",
        "CREATE INDEX journal_by_time ON journal(delivered_at)",
    ),
    (
        # 2: every id ever committed (within the journal's retention), so that an event
        # committed again after it was delivered, or routed nowhere, is still a duplicate.
        """CREATE TABLE event_ids (
            id TEXT PRIMARY KEY,
            committed_at REAL NOT NULL
        ) WITHOUT ROWID""",
        "INSERT OR IGNORE INTO event_ids SELECT id, created_at FROM events",
        "INSERT OR IGNORE INTO event_ids SELECT event_id, delivered_at FROM journal",
        "CREATE INDEX event_ids_by_time ON event_ids(committed_at)",
    ),
    (
        # 3: input dead letters: messages a driver received but could not use (malformed,
        # invalid), kept with their reason and committed with the acknowledgement.
        """CREATE TABLE rejected_inputs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            source TEXT NOT NULL,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            reason TEXT NOT NULL,
            received_at REAL NOT NULL
        )""",
    ),
    (
        # 4: each lot's quality status as the gateway knows it, for GET /lots/{lot_id}.
        """CREATE TABLE lot_status (
            lot_id TEXT PRIMARY KEY,
            status TEXT NOT NULL,
            since REAL NOT NULL,
            source TEXT NOT NULL,
            order_id TEXT,
            material TEXT
        ) WITHOUT ROWID""",
    ),
    (
        # 5: the hand-action journal: every change a person made by hand (retry, purge,
        # reingest, trust), with who and why, for the audit.
        """CREATE TABLE hand_actions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            who TEXT NOT NULL,
            reason TEXT NOT NULL,
            affected INTEGER NOT NULL
        )""",
        "CREATE INDEX hand_actions_by_time ON hand_actions(at)",
    ),
    (
        # 6: facts about this database itself. `epoch` is random and made with the database
        # (or with this migration, for a database made before it): the event ids the gateway
        # derives from its own state carry it, so a database moved aside as damaged, or
        # deleted, never lets a new one reissue an id that was delivered before.
        """CREATE TABLE outbox_meta (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        ) WITHOUT ROWID""",
        "INSERT INTO outbox_meta(key, value) VALUES ('epoch', lower(hex(randomblob(8))))",
    ),
    (
        # 7: an input dead letter keeps the MES message id, so a rejected message can be
        # traced, and re-run (`outbox reingest`) once the config is fixed.
        "ALTER TABLE rejected_inputs ADD COLUMN message_id TEXT",
        "CREATE INDEX rejected_inputs_by_message ON rejected_inputs(message_id)",
    ),
    (
        # 8: events delivered everywhere whose payload is still to go. A settle queues them
        # here instead of deleting each payload row in its own transaction: a request's
        # events (one key's run) lie scattered over the events table, a page each, which cost
        # three quarters of a settle's writes. `purge_delivered` then deletes them in seq
        # order, thousands at a time, a page for several events.
        "CREATE TABLE purge_queue (seq INTEGER PRIMARY KEY)",
    ),
    (
        # 9: deliveries kept in key order, with no index by event. Keyed by (destination,
        # event_seq), a key's run of deliveries (a batched request, a settle) lay one row per
        # page across the whole table, since keys interleave at commit: a transaction of two
        # 100-event settles wrote ~39 pages of it, 0.20 WAL frames per event (bench/forward.py's
        # batched phase, frames counted in the -wal file). Keyed by (destination,
        # partition_key, event_seq): 0.03. `deliveries_by_event` (event_seq) was as scattered
        # (0.06, and 0.16 once its entries carried the new key): a lookup by event now names
        # each destination and the event's key (buffer/outbox/heads.py). In all 0.66 -> 0.42
        # frames per event (secure_delete on, as before).
        """CREATE TABLE deliveries_by_key (
            event_seq INTEGER NOT NULL REFERENCES events(seq),
            destination TEXT NOT NULL,
            partition_key TEXT NOT NULL,
            priority INTEGER NOT NULL,
            state INTEGER NOT NULL,
            attempts INTEGER NOT NULL,
            next_attempt_at REAL NOT NULL,
            last_status INTEGER,
            last_error TEXT,
            dead_at REAL,
            PRIMARY KEY (destination, partition_key, event_seq)
        ) WITHOUT ROWID""",
        "INSERT INTO deliveries_by_key SELECT event_seq, destination, partition_key, priority,"
        " state, attempts, next_attempt_at, last_status, last_error, dead_at FROM deliveries",
        "DROP TABLE deliveries",
        "ALTER TABLE deliveries_by_key RENAME TO deliveries",
        "CREATE INDEX deliveries_heads ON deliveries(destination, state, partition_key, event_seq)",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)


def migrate(db: sqlite3.Connection) -> int:
    """Bring the database to SCHEMA_VERSION; return the version it had before."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"the outbox database has schema version {version}, newer than this gateway's "
            f"{SCHEMA_VERSION}: run the newer gateway, or move the database aside"
        )
    for number in range(version, SCHEMA_VERSION):
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[number]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {number + 1}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    return int(version)
