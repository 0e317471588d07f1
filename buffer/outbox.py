"""The store-and-forward outbox: business events, the rule state that produced them, and their
delivery to each destination, in one SQLite file.

Everything that changes the database goes through one writer connection on one thread, and
through group commit: callers queue their work, and the writer runs what has queued up within
`commit_interval` (or `commit_max_rows` events) as one transaction with `synchronous=FULL`. A
caller's `await` returns only once its work is durable, which is what lets a driver acknowledge
its source after the commit and never before.

An event routed to several destinations has one delivery row per destination. Deliveries leave
in commit order per partition key: `lease` offers only the oldest pending delivery of each key,
so a failing head holds back its own key and no other. A delivery row is deleted only on an
acknowledged delivery or moved to dead letters by an explicit decision; the event row goes when
no delivery needs it any more.

Why not aiosqlite: it hops to its thread once per statement. Here a whole group-committed
transaction runs as one call on the writer thread, which is where SQLite's speed is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from buffer.schema import migrate

log = logging.getLogger(__name__)

T = TypeVar("T")

PENDING = 0
DEAD = 2


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """A business event as the outbox holds it: opaque payload plus what delivery needs."""

    id: str
    type: str
    partition_key: str
    payload: bytes
    destinations: tuple[str, ...]
    priority: int = 1


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
class CommitResult:
    inserted: int
    duplicates: int


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
    delivered: int = 0
    retries: int = 0
    dead_lettered: int = 0
    transactions: int = 0


@dataclass
class _Work:
    run: Callable[[sqlite3.Connection], Any]
    rows: int
    future: asyncio.Future[Any] = field(repr=False)


class Outbox:
    """Open with `await Outbox.open(path)`; close with `await outbox.close()`."""

    def __init__(
        self, connection: sqlite3.Connection, executor: ThreadPoolExecutor, *,
        commit_interval: float, commit_max_rows: int,
    ) -> None:
        self._db = connection
        self._executor = executor
        self._commit_interval = commit_interval
        self._commit_max_rows = commit_max_rows
        self._queue: asyncio.Queue[_Work] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._listeners: set[asyncio.Event] = set()
        self.stats = OutboxStats()

    @classmethod
    async def open(
        cls, path: str | Path, *, commit_interval: float = 0.005, commit_max_rows: int = 500
    ) -> Outbox:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-writer")
        loop = asyncio.get_running_loop()
        connection = await loop.run_in_executor(executor, _connect, path)
        outbox = cls(connection, executor, commit_interval=commit_interval,
                     commit_max_rows=commit_max_rows)
        outbox._writer = asyncio.create_task(outbox._write_loop(), name="outbox-writer")
        return outbox

    async def close(self) -> None:
        """Finish queued work, then close the database."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            await self._queue.join()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._db.close)
        self._executor.shutdown(wait=True)

    # -- change notification ------------------------------------------------------------------

    def listener(self) -> asyncio.Event:
        """An event set after every commit that added deliveries; the forwarders wait on it."""
        event = asyncio.Event()
        self._listeners.add(event)
        return event

    def _notify(self) -> None:
        for event in self._listeners:
            event.set()

    # -- writes (group committed) -------------------------------------------------------------

    async def commit(
        self, events: Sequence[OutboxEvent], state: Mapping[str, str] | None = None
    ) -> CommitResult:
        """Durably store new events and the rule state that produced them, atomically.

        An event id already held is ignored (and counted): re-deriving events after a crash
        gives the same ids. Returns once the transaction is on disk.
        """
        rows = [(e.id, e.type, e.partition_key, e.priority, e.payload, time.time())
                for e in events]
        routes = [(e.id, e.destinations) for e in events]
        state_rows = list((state or {}).items())

        def run(db: sqlite3.Connection) -> CommitResult:
            inserted = 0
            for row, (_event_id, destinations) in zip(rows, routes, strict=True):
                cursor = db.execute(
                    "INSERT INTO events(id, type, partition_key, priority, payload, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING", row)
                if cursor.rowcount == 0:
                    continue
                inserted += 1
                seq = cursor.lastrowid
                db.executemany(
                    "INSERT INTO deliveries(event_seq, destination, partition_key, priority,"
                    " state, attempts, next_attempt_at) VALUES (?, ?, ?, ?, 0, 0, 0)",
                    [(seq, d, row[2], row[3]) for d in destinations])
                if not destinations:
                    db.execute("DELETE FROM events WHERE seq = ?", (seq,))
            if state_rows:
                db.executemany(
                    "INSERT INTO rule_state(key, value) VALUES (?, ?)"
                    " ON CONFLICT(key) DO UPDATE SET value = excluded.value", state_rows)
            return CommitResult(inserted, len(rows) - inserted)

        result: CommitResult = await self._submit(run, max(1, len(rows)))
        self.stats.committed += result.inserted
        self.stats.duplicates_ignored += result.duplicates
        if result.inserted:
            self._notify()
        return result

    async def ack(
        self, delivery: Delivery, *, status: int | None, reference: str | None = None
    ) -> None:
        """The destination took the event: journal it and forget the delivery."""
        def run(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM deliveries WHERE destination = ? AND event_seq = ?",
                       (delivery.destination, delivery.seq))
            db.execute(
                "INSERT INTO journal(event_id, event_type, destination, delivered_at, attempts,"
                " status, reference) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (delivery.event_id, delivery.event_type, delivery.destination, time.time(),
                 delivery.attempts + 1, status, reference))
            _drop_if_done(db, delivery.seq)

        await self._submit(run, 1)
        self.stats.delivered += 1

    async def retry(
        self, delivery: Delivery, *, at: float, status: int | None, error: str
    ) -> None:
        """Keep the delivery, to be tried again at `at` (Unix time, persisted)."""
        def run(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?,"
                " last_status = ?, last_error = ? WHERE destination = ? AND event_seq = ?",
                (at, status, error[:2000], delivery.destination, delivery.seq))

        await self._submit(run, 1)
        self.stats.retries += 1

    async def dead_letter(self, delivery: Delivery, *, status: int | None, reason: str) -> None:
        """A permanent rejection: park the delivery with its reason; its key moves on."""
        def run(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE deliveries SET state = 2, attempts = attempts + 1, last_status = ?,"
                " last_error = ?, dead_at = ? WHERE destination = ? AND event_seq = ?",
                (status, reason[:2000], time.time(), delivery.destination, delivery.seq))

        await self._submit(run, 1)
        self.stats.dead_lettered += 1
        self._notify()

    # -- reads --------------------------------------------------------------------------------

    async def load_state(self) -> dict[str, str]:
        return dict(await self._read(lambda db: db.execute(
            "SELECT key, value FROM rule_state").fetchall()))

    async def lease(
        self, destination: str, limit: int, *, busy_keys: Iterable[str] = (),
        now: float | None = None,
    ) -> list[Delivery]:
        """Up to `limit` deliveries that are due: the head of each partition key not in
        `busy_keys`, most urgent priority class first, then commit order."""
        busy = set(busy_keys)
        when = time.time() if now is None else now

        def run(db: sqlite3.Connection) -> list[Delivery]:
            found: list[Delivery] = []
            cursor = db.execute(
                "SELECT d.event_seq, e.id, e.type, d.partition_key, e.payload, d.attempts,"
                " d.next_attempt_at FROM (SELECT partition_key, MIN(event_seq) AS seq"
                "  FROM deliveries WHERE destination = ? AND state = 0 GROUP BY partition_key) h"
                " JOIN deliveries d ON d.destination = ? AND d.event_seq = h.seq"
                " JOIN events e ON e.seq = d.event_seq"
                " WHERE d.next_attempt_at <= ? ORDER BY d.priority, d.event_seq",
                (destination, destination, when))
            for seq, event_id, event_type, key, payload, attempts, _ in cursor:
                if key in busy:
                    continue
                found.append(Delivery(seq, destination, event_id, event_type, key, payload,
                                      attempts))
                if len(found) >= limit:
                    break
            return found

        return await self._read(run)

    async def next_due(self, destination: str) -> float | None:
        """Unix time at which the earliest head of a key of `destination` is due."""
        row = await self._read(lambda db: db.execute(
            "SELECT MIN(d.next_attempt_at) FROM (SELECT partition_key, MIN(event_seq) AS seq"
            "  FROM deliveries WHERE destination = ? AND state = 0 GROUP BY partition_key) h"
            " JOIN deliveries d ON d.destination = ? AND d.event_seq = h.seq",
            (destination, destination)).fetchone())
        return None if row is None or row[0] is None else float(row[0])

    async def counts(self) -> dict[str, DestinationCounts]:
        now = time.time()

        def run(db: sqlite3.Connection) -> dict[str, DestinationCounts]:
            result: dict[str, DestinationCounts] = {}
            for destination, state, retrying, total, oldest in db.execute(
                "SELECT d.destination, d.state, SUM(d.attempts > 0), COUNT(*),"
                " MIN(e.created_at) FROM deliveries d JOIN events e ON e.seq = d.event_seq"
                " GROUP BY d.destination, d.state"
            ):
                counts = result.setdefault(destination, DestinationCounts())
                if state == DEAD:
                    counts.dead = total
                else:
                    counts.pending = total
                    counts.retrying = retrying
                    counts.oldest_pending_age = now - oldest
            return result

        return await self._read(run)

    async def journal(self, since: float = 0.0) -> list[dict[str, Any]]:
        def run(db: sqlite3.Connection) -> list[dict[str, Any]]:
            cursor = db.execute(
                "SELECT event_id, event_type, destination, delivered_at, attempts, status,"
                " reference FROM journal WHERE delivered_at >= ? ORDER BY delivered_at", (since,))
            names = [c[0] for c in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor]

        return await self._read(run)

    async def dead_letters(self) -> list[dict[str, Any]]:
        def run(db: sqlite3.Connection) -> list[dict[str, Any]]:
            cursor = db.execute(
                "SELECT e.id, e.type, d.destination, d.partition_key, d.attempts, d.last_status,"
                " d.last_error, d.dead_at FROM deliveries d JOIN events e ON e.seq = d.event_seq"
                " WHERE d.state = 2 ORDER BY d.dead_at")
            names = [c[0] for c in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor]

        return await self._read(run)

    # -- machinery ----------------------------------------------------------------------------

    async def _read(self, run: Callable[[sqlite3.Connection], T]) -> T:
        # Reads share the writer's thread and connection: one connection, one thread, no locks.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, run, self._db)

    async def _submit(self, run: Callable[[sqlite3.Connection], T], rows: int) -> T:
        if self._closed:
            raise RuntimeError("the outbox is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Work(run, rows, future))
        return await future

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            batch = [first]
            rows = first.rows
            deadline = loop.time() + self._commit_interval
            while rows < self._commit_max_rows:
                try:
                    if self._queue.empty():
                        timeout = deadline - loop.time()
                        if timeout <= 0:
                            break
                        work = await asyncio.wait_for(self._queue.get(), timeout)
                    else:
                        work = self._queue.get_nowait()
                except TimeoutError:
                    break
                batch.append(work)
                rows += work.rows
            try:
                outcomes = await loop.run_in_executor(self._executor, _transaction, self._db,
                                                      batch)
                self.stats.transactions += 1
            except Exception as exc:  # the whole transaction rolled back: every caller hears it
                log.error("Outbox transaction failed and was rolled back: %s", exc)
                outcomes = [exc] * len(batch)
            for work, outcome in zip(batch, outcomes, strict=True):
                if not work.future.done():
                    if isinstance(outcome, BaseException):
                        work.future.set_exception(outcome)
                    else:
                        work.future.set_result(outcome)
                self._queue.task_done()


def _transaction(db: sqlite3.Connection, batch: Sequence[_Work]) -> list[Any]:
    """Run a group of callers' work in one transaction. Each caller's part sits in a savepoint,
    so one caller's error undoes only its own part and is raised to that caller alone."""
    outcomes: list[Any] = []
    db.execute("BEGIN IMMEDIATE")
    try:
        for work in batch:
            db.execute("SAVEPOINT work")
            try:
                outcomes.append(work.run(db))
            except sqlite3.DatabaseError as exc:
                if not db.in_transaction:
                    raise
                db.execute("ROLLBACK TO work")
                outcomes.append(exc)
            db.execute("RELEASE work")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return outcomes


def _drop_if_done(db: sqlite3.Connection, seq: int) -> None:
    db.execute("DELETE FROM events WHERE seq = ? AND NOT EXISTS"
               " (SELECT 1 FROM deliveries WHERE event_seq = ?)", (seq, seq))


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA busy_timeout = 5000")
    migrate(db)
    return db
