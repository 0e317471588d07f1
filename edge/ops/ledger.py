"""The order ledger: per production order, what the gateway committed and what MES reported,
kept after the outbox has dropped the payloads, so that `plantsync reconcile` can put the
gateway's figures beside ERP's, and the KPIs can count per order.

It lives in its own SQLite file (`data_dir/ops.db`), not in the outbox: the outbox's payloads go
once delivered, and its schema belongs to the delivery engine. Rows are written right after
each outbox commit (the pipeline's observer), in WAL mode with `synchronous=NORMAL`: a
`kill -9` loses nothing the operating system holds, and what a crash between the outbox commit
and this write could miss is read back at the next start from the outbox's own events (their
payloads stay until delivered). Rows older than the outbox's journal retention are pruned with
it.

What a row holds, per event about an order: its id, type, order, operation, lot, yield and
scrap with their unit, the final flag, the MES message it was made from, when it happened and
when it was committed. Per MES order report (`order.started`, `order.ended`): the order,
operation, machine and the quantities the MES reported.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from edge.model.envelope import CloudEvent

log = logging.getLogger(__name__)

OPS_DATABASE = "ops.db"
BACKFILL_MARGIN = 60.0
"""Seconds before the ledger's newest row from which the outbox's events are read back at
start (the window a crash between the two commits could leave)."""

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS order_events (
        event_id TEXT PRIMARY KEY,
        event_type TEXT NOT NULL,
        order_id TEXT,
        operation TEXT,
        lot_id TEXT,
        material TEXT,
        yield_value TEXT,
        scrap_value TEXT,
        uom TEXT,
        is_final INTEGER NOT NULL DEFAULT 0,
        disposition TEXT,
        message_id TEXT,
        occurred_at REAL,
        committed_at REAL NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS order_events_by_order ON order_events(order_id)",
    "CREATE INDEX IF NOT EXISTS order_events_by_lot ON order_events(lot_id)",
    "CREATE INDEX IF NOT EXISTS order_events_by_time ON order_events(committed_at)",
    "CREATE INDEX IF NOT EXISTS order_events_by_message ON order_events(message_id)",
    """CREATE TABLE IF NOT EXISTS mes_reports (
        order_id TEXT NOT NULL,
        operation TEXT NOT NULL,
        kind TEXT NOT NULL,
        machine_id TEXT NOT NULL,
        yield_value TEXT,
        scrap_value TEXT,
        uom TEXT,
        occurred_at REAL NOT NULL,
        recorded_at REAL NOT NULL,
        PRIMARY KEY (order_id, operation, kind)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS mes_reports_by_time ON mes_reports(kind, occurred_at)",
)


@dataclass(frozen=True, slots=True)
class MesOrderReport:
    """What MES said about an order's operation: `started` or `ended`, with the quantities it
    counted (an `order.ended` that carries them)."""

    order_id: str
    operation: str
    kind: str
    machine_id: str
    occurred_at: float
    yield_value: str | None = None
    scrap_value: str | None = None
    uom: str | None = None


def connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    """The operations database at `path` (created with its tables unless `read_only`)."""
    if read_only:
        db = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
        db.execute("PRAGMA busy_timeout = 5000")
        return db
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 5000")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    for statement in _SCHEMA:
        db.execute(statement)
    return db


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _quantity(value: Any) -> tuple[str | None, str | None]:
    if isinstance(value, dict) and isinstance(value.get("value"), str):
        return value["value"], value.get("uom")
    return None, None


def event_row(event: CloudEvent, committed_at: float) -> tuple[Any, ...] | None:
    """The ledger row of an event, or None for an event about no order and no lot."""
    data = event.data
    order_id, lot_id = data.get("order_id"), data.get("lot_id")
    if order_id is None and lot_id is None:
        return None
    yield_value, uom = _quantity(data.get("yield_quantity") or data.get("quantity"))
    scrap_value, scrap_uom = _quantity(data.get("scrap_quantity"))
    return (
        event.id,
        event.type,
        order_id,
        data.get("operation"),
        lot_id,
        data.get("material"),
        yield_value,
        scrap_value,
        uom or scrap_uom,
        1 if data.get("is_final") else 0,
        data.get("disposition"),
        event.sourcemessageid,
        _timestamp(data.get("occurred_at")),
        committed_at,
    )


class OrderLedger:
    """Call order: `open`, then `record_events`/`record_reports` after each commit (the
    pipeline's observers), `backfill(outbox path)` once at start; reads at any time; `close`."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    @classmethod
    def open(cls, data_dir: Path) -> OrderLedger:
        return cls(connect(data_dir / OPS_DATABASE))

    @property
    def db(self) -> sqlite3.Connection:
        return self._db

    def close(self) -> None:
        self._db.close()

    # -- writes --------------------------------------------------------------------------------

    def record_events(self, events: Sequence[CloudEvent], now: float | None = None) -> None:
        committed_at = time.time() if now is None else now
        rows = [row for event in events if (row := event_row(event, committed_at)) is not None]
        if rows:
            self._write(
                "INSERT OR IGNORE INTO order_events VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def record_reports(self, reports: Sequence[MesOrderReport], now: float | None = None) -> None:
        """MES order reports (starts and ends)."""
        recorded_at = time.time() if now is None else now
        rows = [
            (
                r.order_id,
                r.operation,
                r.kind,
                r.machine_id,
                r.yield_value,
                r.scrap_value,
                r.uom,
                r.occurred_at,
                recorded_at,
            )
            for r in reports
        ]
        if not rows:
            return
        self._write(
            "INSERT INTO mes_reports VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(order_id, operation, kind) DO UPDATE SET"
            " machine_id = excluded.machine_id,"
            " yield_value = COALESCE(excluded.yield_value, yield_value),"
            " scrap_value = COALESCE(excluded.scrap_value, scrap_value),"
            " uom = COALESCE(excluded.uom, uom), occurred_at = excluded.occurred_at",
            rows,
        )

    def backfill_since(self) -> float:
        """Where `read_back` starts: shortly before the ledger's newest row."""
        (newest,) = self._db.execute("SELECT MAX(committed_at) FROM order_events").fetchone()
        return 0.0 if newest is None else float(newest) - BACKFILL_MARGIN

    def add_read_back(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """Write what `read_back` found; return how many rows were added."""
        before = self._db.total_changes
        if rows:
            self._write(
                "INSERT OR IGNORE INTO order_events VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        added = self._db.total_changes - before
        if added:
            log.info("The order ledger read back %d event(s) from the outbox", added)
        return added

    def backfill(self, outbox_path: Path) -> int:
        """Read back the outbox's events committed since shortly before the ledger's newest
        row (a crash between the two commits); return how many rows were added. All on the
        caller's thread; the daemon reads the outbox on a worker thread (`read_back`) and
        writes on the event loop's, the one thread that writes this connection (two threads
        in transactions on one connection fail with "cannot start a transaction within a
        transaction")."""
        return self.add_read_back(read_back(outbox_path, self.backfill_since()))

    def prune(self, retention: float, now: float | None = None) -> int:
        cutoff = (time.time() if now is None else now) - retention
        with self._transaction() as db:
            pruned = db.execute(
                "DELETE FROM order_events WHERE committed_at < ?", (cutoff,)
            ).rowcount
            pruned += db.execute(
                "DELETE FROM mes_reports WHERE recorded_at < ?", (cutoff,)
            ).rowcount
        return int(pruned)

    def _write(self, statement: str, rows: Iterable[tuple[Any, ...]]) -> None:
        with self._transaction() as db:
            db.executemany(statement, rows)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if kind is not None else "COMMIT")


def read_back(outbox_path: Path, since: float) -> list[tuple[Any, ...]]:
    """The ledger rows of the outbox's events committed at or after `since` (its own read-only
    connection: safe on any thread)."""
    try:
        outbox = sqlite3.connect(f"file:{outbox_path}?mode=ro", uri=True)
    except sqlite3.Error:
        return []
    try:
        found = outbox.execute(
            "SELECT payload, created_at FROM events WHERE created_at >= ?", (since,)
        ).fetchall()
    except sqlite3.Error:
        return []
    finally:
        outbox.close()
    rows = []
    for payload, created_at in found:
        try:
            event = CloudEvent.model_validate_json(payload)
        except ValueError:
            continue
        if (row := event_row(event, created_at)) is not None:
            rows.append(row)
    return rows


# -- reads (a connection of the daemon's ledger, or one the CLI opened read-only) -------------


def decimal_of(text: str | None) -> Decimal:
    try:
        return Decimal(text) if text is not None else Decimal(0)
    except InvalidOperation:
        return Decimal(0)


def orders_ended_since(
    db: sqlite3.Connection, since: float, until: float | None = None
) -> list[str]:
    """Orders whose operation MES ended, or the gateway completed, within the window."""
    until = time.time() if until is None else until
    rows = db.execute(
        "SELECT order_id FROM mes_reports WHERE kind = 'ended' AND occurred_at BETWEEN ? AND ?"
        " UNION SELECT order_id FROM order_events WHERE event_type = 'operation.completed'"
        " AND order_id IS NOT NULL AND COALESCE(occurred_at, committed_at) BETWEEN ? AND ?",
        (since, until, since, until),
    ).fetchall()
    return sorted(order_id for (order_id,) in rows)


def order_events(db: sqlite3.Connection, order_id: str) -> list[dict[str, Any]]:
    cursor = db.execute(
        "SELECT * FROM order_events WHERE order_id = ? ORDER BY committed_at, event_id", (order_id,)
    )
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def mes_reports(db: sqlite3.Connection, order_id: str) -> list[dict[str, Any]]:
    cursor = db.execute(
        "SELECT * FROM mes_reports WHERE order_id = ? ORDER BY operation, kind", (order_id,)
    )
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def orders_of_events(db: sqlite3.Connection, event_ids: Sequence[str]) -> dict[str, str]:
    """Event id -> order id, for the events the ledger knows."""
    found: dict[str, str] = {}
    for start in range(0, len(event_ids), 500):
        chunk = list(event_ids[start : start + 500])
        marks = ",".join("?" * len(chunk))
        found.update(
            db.execute(
                f"SELECT event_id, order_id FROM order_events WHERE event_id IN ({marks})"
                " AND order_id IS NOT NULL",
                chunk,
            ).fetchall()
        )
    return found


def orders_of_message(db: sqlite3.Connection, message_id: str) -> list[str]:
    return [
        order_id
        for (order_id,) in db.execute(
            "SELECT DISTINCT order_id FROM order_events WHERE message_id = ?"
            " AND order_id IS NOT NULL",
            (message_id,),
        )
    ]
