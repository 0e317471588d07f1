"""The store-and-forward outbox: business events, the rule state that produced them, and their
delivery to each destination, in one SQLite file.

Everything that changes the database goes through one writer connection on one thread, and
through group commit: callers queue their work, and the writer runs all that has queued up (at
most `commit_max_rows` events, after an optional linger of `commit_interval`) as one transaction
with `synchronous=FULL`; what arrives meanwhile makes the next transaction. A
caller's `await` returns only once its work is durable, which is what lets a driver acknowledge
its source after the commit and never before.

An event routed to several destinations has one delivery row per destination. Deliveries leave
in commit order per partition key: `lease` offers only the oldest owed delivery of each key (its
head), so a failing head holds back its own key and no other. The heads are kept in memory,
one entry per (destination, key), built at open with a skip scan of an index and moved by the
same transactions that move the rows: leasing from a backlog of a million events costs what
leasing from ten does. A delivery row is deleted only on an acknowledged delivery, or moved to
dead letters by an explicit decision; the payload goes when no destination needs it, and a
journal row stays for the audit.

When the database reaches its disk budget, informational events are refused (and counted) and
business events wait: `commit` does not return until there is room, which is the back-pressure
that stops drivers from taking more input. A full disk is handled the same way. A database that
fails its integrity check at open is moved aside and replaced, and the alarm stays raised.

Each database has an `epoch`: random, made with the database and kept in it. The event ids the
gateway derives from its own state (counter totals, a configured order bound at time 0) carry
it, because that state starts again from nothing with a new database: without the epoch, a
database moved aside or deleted would let the next one reissue ids that receivers already hold
and would drop as duplicates.

Why not aiosqlite: it hops to its thread once per statement. Here a whole group-committed
transaction runs as one call on the writer thread, which is where SQLite's speed is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from buffer.schema import migrate

log = logging.getLogger(__name__)

T = TypeVar("T")

PENDING = 0
DEAD = 2
INFORMATIONAL = 2
"""Priority class whose events are refused first when the disk budget is reached."""


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


REJECTED_PAYLOAD_LIMIT = 16 * 1024
"""Bytes of a rejected input's payload that are kept: enough to see what was wrong, little
enough that a flood of large bad messages (which may hold personal data) does not fill the disk."""


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


def _journal_hand_action(db: sqlite3.Connection, action: HandAction, affected: int) -> None:
    db.execute("INSERT INTO hand_actions(at, action, target, who, reason, affected)"
               " VALUES (?, ?, ?, ?, ?, ?)",
               (time.time(), _storable(action.action), _storable(action.target),
                _storable(action.who), _storable(action.reason), affected))


def journal_hand_action(path: str | Path, action: HandAction, affected: int = 1) -> None:
    """Journal a hand action in the outbox database at `path` from a process that does not
    hold the outbox open (a CLI command that works without the daemon). SQLite's locking
    makes it safe beside a running daemon."""
    db = _connect(Path(path))
    try:
        db.execute("BEGIN IMMEDIATE")
        _journal_hand_action(db, action, affected)
        db.execute("COMMIT")
    finally:
        db.close()


def _storable(text: str) -> str:
    """`text` as SQLite can store it: a lone surrogate (a topic no broker should pass, but one
    Hypothesis found) is escaped rather than failing the whole commit."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _cut_note(rejected: RejectedInput) -> str:
    if len(rejected.payload) <= REJECTED_PAYLOAD_LIMIT:
        return rejected.reason
    return (f"{rejected.reason} (payload of {len(rejected.payload)} bytes; its first "
            f"{REJECTED_PAYLOAD_LIMIT} kept)")


@dataclass(frozen=True, slots=True)
class LotStatus:
    """A lot's quality status: `hold` until a disposition says `release` or `reject`."""

    lot_id: str
    status: str
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


@dataclass(slots=True)
class _Head:
    seq: int
    priority: int
    due: float
    attempts: int = 0


@dataclass
class _Work:
    run: Callable[[sqlite3.Connection], Any]
    rows: int
    future: asyncio.Future[Any] = field(repr=False)


class OutboxFull(Exception):
    """Raised by `commit(..., wait=False)` when business events would have to wait."""


class Outbox:
    """Open with `await Outbox.open(path)`; close with `await outbox.close()`."""

    def __init__(
        self, connection: sqlite3.Connection, executor: ThreadPoolExecutor, *,
        commit_interval: float, commit_max_rows: int, max_bytes: int | None,
        heads: dict[str, dict[str, _Head]], counts: tuple[Counter[str], Counter[str]],
        recovered_from: str | None, epoch: str,
    ) -> None:
        self._db = connection
        self._executor = executor
        self._commit_interval = commit_interval
        self._commit_max_rows = commit_max_rows
        self._max_bytes = max_bytes
        self._heads = heads
        self._pending, self._dead = counts
        self._queue: asyncio.Queue[_Work] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._listeners: set[asyncio.Event] = set()
        self._room = asyncio.Event()
        self._room.set()
        self.used_bytes = 0
        self.disk_full = False
        self.recovered_from = recovered_from
        """Where a corrupt database was moved at open, if one was: an alarm, not an error."""
        self.epoch = epoch
        """This database's random epoch (16 hex digits), made with it and never changed."""
        self.integrity_problem: str | None = None
        """What the background integrity check found wrong, if anything: an alarm."""
        self._checker: asyncio.Task[None] | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._reader_db: sqlite3.Connection | None = None
        self.stats = OutboxStats()

    @classmethod
    async def open(
        cls, path: str | Path, *, commit_interval: float = 0.0, commit_max_rows: int = 500,
        max_bytes: int | None = None,
    ) -> Outbox:
        path = Path(path)
        keep_private(path)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-writer")
        loop = asyncio.get_running_loop()
        opened = await loop.run_in_executor(executor, _open_checked, path)
        outbox = cls(opened.connection, executor, commit_interval=commit_interval,
                     commit_max_rows=commit_max_rows, max_bytes=max_bytes, heads=opened.heads,
                     counts=opened.counts, recovered_from=opened.recovered_from,
                     epoch=opened.epoch)
        outbox.used_bytes = opened.used_bytes
        outbox._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-reader")
        outbox._reader_db = await loop.run_in_executor(outbox._reader, _connect_reader, path)
        outbox._update_room()
        outbox._writer = asyncio.create_task(outbox._write_loop(), name="outbox-writer")
        outbox._checker = asyncio.create_task(outbox._check_integrity(path),
                                              name="outbox-integrity-check")
        return outbox

    async def _check_integrity(self, path: Path) -> None:
        """A full `quick_check` reads the whole file (seconds for a big backlog on a cold
        cache), so it runs beside the gateway on a read-only connection of its own instead of
        delaying the first delivery. A failure raises the alarm and marks the file, so the next
        start moves it aside; this run goes on with what it can still read."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-check") as pool:
            problem = await asyncio.get_running_loop().run_in_executor(pool, _check_and_mark,
                                                                        path)
        if problem is not None:
            self.integrity_problem = problem
            log.critical("The outbox database %s failed its integrity check: %s. The gateway "
                         "keeps running; at the next start the file is moved aside and a fresh "
                         "one created. Plan a restart and recover undelivered events from the "
                         "moved file", path, problem)

    async def close(self) -> None:
        """Finish queued work, then close the database."""
        if self._closed:
            return
        self._closed = True
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
        if self._writer is not None:
            await self._queue.join()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        loop = asyncio.get_running_loop()
        if self._reader is not None and self._reader_db is not None:
            await loop.run_in_executor(self._reader, self._reader_db.close)
            self._reader.shutdown(wait=True)
        await loop.run_in_executor(self._executor, self._db.close)
        self._executor.shutdown(wait=True)

    # -- state for health and metrics ---------------------------------------------------------

    @property
    def back_pressure(self) -> str | None:
        """Why new business events are being held back, or None when there is room."""
        if self.disk_full:
            return "the disk is full: input is paused until deliveries free space"
        if self._max_bytes is not None and self.used_bytes >= self._max_bytes:
            return (f"the outbox is at its disk budget ({self.used_bytes // 1_000_000} of "
                    f"{self._max_bytes // 1_000_000} MB): informational events are refused "
                    "and input is paused until deliveries free space")
        return None

    def listener(self) -> asyncio.Event:
        """An event set after every commit that added deliveries; the forwarders wait on it."""
        event = asyncio.Event()
        self._listeners.add(event)
        return event

    def _notify(self) -> None:
        for event in self._listeners:
            event.set()

    def _update_room(self) -> None:
        had_room = self._room.is_set()
        if self.back_pressure is None:
            self._room.set()
            if not had_room:
                log.info("The outbox has room again; taking input")
        else:
            self._room.clear()
            if had_room:
                log.warning("Outbox back-pressure: %s", self.back_pressure)

    # -- writes (group committed) -------------------------------------------------------------

    async def commit(
        self, events: Sequence[OutboxEvent], state: Mapping[str, str] | None = None, *,
        rejected: Sequence[RejectedInput] = (), lots: Sequence[LotStatus] = (),
        resolved_inputs: Sequence[int] = (), wait: bool = True,
    ) -> CommitResult:
        """Durably store new events, the rule state that produced them, and the inputs that
        were rejected on the way, atomically; forget the input dead letters in
        `resolved_inputs` (reingested: what they produced is in this commit).

        An event id committed before (still held, or delivered within the journal's
        retention) is ignored and counted: re-deriving events after a crash gives the same
        ids. Over the disk budget, informational events are refused and counted, and the call
        waits for room before it commits business events (or raises OutboxFull when `wait`
        is False). Returns once the transaction is on disk.
        """
        refused = 0
        if not self._room.is_set():
            kept = [e for e in events if e.priority < INFORMATIONAL]
            refused = len(events) - len(kept)
            if refused:
                self.stats.refused_informational += refused
                log.warning("Refused %d informational event(s): %s", refused,
                            self.back_pressure)
            events = kept
            if events or state or rejected or resolved_inputs:
                if not wait:
                    raise OutboxFull(self.back_pressure or "the outbox is full")
                await self._room.wait()
        now = time.time()
        state_rows = list((state or {}).items())

        def run(db: sqlite3.Connection) -> tuple[set[str], list[tuple[str, str, int, int]]]:
            inserted: set[str] = set()
            new_rows: list[tuple[str, str, int, int]] = []
            for event in events:
                cursor = db.execute("INSERT INTO event_ids(id, committed_at) VALUES (?, ?)"
                                    " ON CONFLICT(id) DO NOTHING", (event.id, now))
                if cursor.rowcount == 0:
                    continue  # held, delivered or routed nowhere before: the same event
                inserted.add(event.id)
                if not event.destinations:
                    continue
                seq = db.execute(
                    "INSERT INTO events(id, type, partition_key, priority, payload, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)", (event.id, event.type, event.partition_key,
                                                   event.priority, event.payload, now)
                ).lastrowid
                assert seq is not None
                db.executemany(
                    "INSERT INTO deliveries(event_seq, destination, partition_key, priority,"
                    " state, attempts, next_attempt_at) VALUES (?, ?, ?, ?, 0, 0, 0)",
                    [(seq, d, event.partition_key, event.priority) for d in event.destinations])
                new_rows += [(d, event.partition_key, seq, event.priority)
                             for d in event.destinations]
            if state_rows:
                db.executemany(
                    "INSERT INTO rule_state(key, value) VALUES (?, ?)"
                    " ON CONFLICT(key) DO UPDATE SET value = excluded.value", state_rows)
            for r in rejected:
                row = (_storable(r.source), _storable(r.topic), r.payload[:REJECTED_PAYLOAD_LIMIT],
                       _storable(_cut_note(r)), r.received_at,
                       None if r.message_id is None else _storable(r.message_id))
                if r.replaces is None:
                    db.execute("INSERT INTO rejected_inputs(source, topic, payload, reason,"
                               " received_at, message_id) VALUES (?, ?, ?, ?, ?, ?)", row)
                else:
                    db.execute("UPDATE rejected_inputs SET source = ?, topic = ?, payload = ?,"
                               " reason = ?, received_at = ?, message_id = ? WHERE id = ?",
                               (*row, r.replaces))
            if resolved_inputs:
                db.executemany("DELETE FROM rejected_inputs WHERE id = ?",
                               [(number,) for number in resolved_inputs])
            for lot in lots:
                db.execute(
                    "INSERT INTO lot_status(lot_id, status, since, source, order_id, material)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(lot_id) DO UPDATE SET"
                    " status = excluded.status, since = excluded.since, source = excluded.source,"
                    " order_id = COALESCE(excluded.order_id, order_id),"
                    " material = COALESCE(excluded.material, material)"
                    + ("" if lot.decided else " WHERE false"),
                    (lot.lot_id, lot.status, lot.since, lot.source, lot.order_id, lot.material))
            return inserted, new_rows

        inserted, new_rows = await self._submit(run, max(1, len(events) + len(rejected)))
        self.stats.rejected_inputs += len(rejected)
        for destination, key, seq, priority in new_rows:
            self._pending[destination] += 1
            heads = self._heads.setdefault(destination, {})
            if key not in heads:
                heads[key] = _Head(seq, priority, 0.0)
        duplicates = len(events) - len(inserted)
        self.stats.committed += len(inserted)
        self.stats.duplicates_ignored += duplicates
        if new_rows:
            self._notify()
        return CommitResult(len(inserted), duplicates, refused, frozenset(inserted))

    async def ack(
        self, delivery: Delivery, *, status: int | None, reference: str | None = None
    ) -> None:
        """The destination took the event: journal it and forget the delivery."""
        await self.settle([Settlement(delivery, "delivered", status, reference=reference)])

    async def retry(
        self, delivery: Delivery, *, at: float, status: int | None, error: str
    ) -> None:
        """Keep the delivery, to be tried again at `at` (Unix time, persisted)."""
        await self.settle([Settlement(delivery, "retry", status, retry_at=at, reason=error)])

    async def dead_letter(self, delivery: Delivery, *, status: int | None, reason: str) -> None:
        """A permanent rejection: park the delivery with its reason; its key moves on."""
        await self.settle([Settlement(delivery, "dead", status, reason=reason)])

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        """Record what became of leased deliveries (a request's outcomes, or several
        requests'), as one piece of work in one group-committed transaction, with one
        statement per kind of outcome rather than four per event: this is the acknowledgement
        side of group commit. Returns once it is durable. The head of each key touched moves
        to its oldest delivery still owed, as read in the same transaction.

        Of one key's retries in one call (a run of its events in one request), only the first
        counts as a failed attempt: the later ones are not due before it is delivered, so
        they stay as they were (no attempt, no due time), waiting behind it. Only a key's head
        ever holds attempts, which is what `counts().retrying` counts."""
        if not settlements:
            return
        now = time.time()
        done = [s for s in settlements if s.outcome == "delivered"]
        retried = []
        retrying_keys: set[tuple[str, str]] = set()
        for s in sorted(settlements, key=lambda s: s.delivery.seq):
            slot = (s.delivery.destination, s.delivery.partition_key)
            if s.outcome == "retry" and slot not in retrying_keys:
                retrying_keys.add(slot)
                retried.append(s)
        dead = [s for s in settlements if s.outcome == "dead"]
        keys = {(s.delivery.destination, s.delivery.partition_key) for s in settlements}

        def run(db: sqlite3.Connection) -> dict[tuple[str, str], _Head | None]:
            if done:
                db.executemany("DELETE FROM deliveries WHERE destination = ? AND event_seq = ?",
                               [(s.delivery.destination, s.delivery.seq) for s in done])
                db.executemany(
                    "INSERT INTO journal(event_id, event_type, destination, delivered_at,"
                    " attempts, status, reference) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(s.delivery.event_id, s.delivery.event_type, s.delivery.destination, now,
                      s.delivery.attempts + 1, s.status, s.reference) for s in done])
                db.executemany("DELETE FROM events WHERE seq = ? AND NOT EXISTS"
                               " (SELECT 1 FROM deliveries WHERE event_seq = ?)",
                               [(s.delivery.seq, s.delivery.seq) for s in done])
            if retried:
                db.executemany(
                    "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?,"
                    " last_status = ?, last_error = ? WHERE destination = ? AND event_seq = ?",
                    [(s.retry_at, s.status, s.reason[:2000], s.delivery.destination,
                      s.delivery.seq) for s in retried])
            if dead:
                db.executemany(
                    "UPDATE deliveries SET state = 2, attempts = attempts + 1, last_status = ?,"
                    " last_error = ?, dead_at = ? WHERE destination = ? AND event_seq = ?",
                    [(s.status, s.reason[:2000], now, s.delivery.destination, s.delivery.seq)
                     for s in dead])
            return {(destination, key): _next_head(db, destination, key)
                    for destination, key in keys}

        heads = await self._submit(run, len(settlements))
        settled = {(s.delivery.destination, s.delivery.seq) for s in settlements}
        for (destination, key), head in heads.items():
            owned = self._heads.get(destination, {})
            current = owned.get(key)
            if current is not None and (destination, current.seq) not in settled:
                continue  # a head that is not one of these: someone else already moved it
            if head is None:
                owned.pop(key, None)
            else:
                owned[key] = head
        for s in done:
            self._pending[s.delivery.destination] -= 1
        for s in dead:
            self._pending[s.delivery.destination] -= 1
            self._dead[s.delivery.destination] += 1
        self.stats.delivered += len(done)
        self.stats.retries += len(retried)
        self.stats.dead_lettered += len(dead)
        if dead:
            self._notify()

    async def retry_dead(self, event_id: str | None = None, destination: str | None = None,
                         *, hand: HandAction | None = None) -> int:
        """Put dead letters back in line (one event, or all); returns how many. They go in
        commit order with their key's other deliveries, and their attempts start over. `hand`
        is journalled in the same transaction."""
        def run(db: sqlite3.Connection) -> tuple[int, dict[str, dict[str, _Head]],
                                                 tuple[Counter[str], Counter[str]]]:
            where, args = _dead_filter(event_id, destination)
            cursor = db.execute(
                "UPDATE deliveries SET state = 0, attempts = 0, next_attempt_at = 0,"
                f" dead_at = NULL WHERE state = 2{where}", args)
            if hand is not None:
                _journal_hand_action(db, hand, cursor.rowcount)
            return cursor.rowcount, _load_heads(db), _load_counts(db)

        count, self._heads, (self._pending, self._dead) = await self._submit(run, 1)
        self.stats.dead_retried += count
        if count:
            self._notify()
        return int(count)

    async def purge_dead(self, event_id: str | None = None, destination: str | None = None,
                         *, hand: HandAction | None = None) -> int:
        """Delete dead letters for good (one event, or all); returns how many. `hand` is
        journalled in the same transaction."""
        def run(db: sqlite3.Connection) -> list[tuple[int, str]]:
            where, args = _dead_filter(event_id, destination)
            found: list[tuple[int, str]] = db.execute(
                f"SELECT event_seq, destination FROM deliveries WHERE state = 2{where}",
                args).fetchall()
            db.executemany("DELETE FROM deliveries WHERE event_seq = ? AND destination = ?",
                           found)
            for seq, _ in found:
                _drop_if_done(db, seq)
            if hand is not None:
                _journal_hand_action(db, hand, len(found))
            return found

        purged = await self._submit(run, 1)
        for _, name in purged:
            self._dead[name] -= 1
        return len(purged)

    async def record_hand_action(self, action: HandAction, affected: int = 1) -> None:
        """Journal a hand action that changed nothing in the outbox itself (a trusted
        certificate); one that does should journal in its own transaction (`hand=`)."""
        await self._submit(lambda db: _journal_hand_action(db, action, affected), 1)

    async def prune(self, retention: float, now: float | None = None) -> int:
        """Forget journal rows, remembered ids, input dead letters and hand actions older
        than `retention` seconds."""
        cutoff = (time.time() if now is None else now) - retention

        def run(db: sqlite3.Connection) -> int:
            pruned = db.execute("DELETE FROM journal WHERE delivered_at < ?", (cutoff,)).rowcount
            db.execute("DELETE FROM event_ids WHERE committed_at < ? AND id NOT IN"
                       " (SELECT id FROM events)", (cutoff,))
            db.execute("DELETE FROM rejected_inputs WHERE received_at < ?", (cutoff,))
            db.execute("DELETE FROM hand_actions WHERE at < ?", (cutoff,))
            return int(pruned)

        return int(await self._submit(run, 1))

    # -- reads --------------------------------------------------------------------------------

    async def load_state(self) -> dict[str, str]:
        return dict(await self._read(lambda db: db.execute(
            "SELECT key, value FROM rule_state").fetchall()))

    async def lease(
        self, destination: str, limit: int, *, busy_keys: Iterable[str] = (),
        now: float | None = None, per_key: int = 1,
    ) -> list[Delivery]:
        """Up to `limit` deliveries that are due: the head of each partition key not in
        `busy_keys`, most urgent priority class first, then commit order; with `per_key`
        above 1, each head followed by up to `per_key - 1` of its key's next deliveries in
        commit order (a run, kept together in the list), for a target that takes several
        events of one key in one request and processes them in order. One read for all."""
        busy = set(busy_keys)
        when = time.time() if now is None else now
        heads = self._heads.get(destination, {})
        due = sorted((head.priority, head.seq, key) for key, head in heads.items()
                     if head.due <= when and key not in busy)[:limit]
        if not due:
            return []
        seqs = [seq for _, seq, _ in due]
        select = ("SELECT d.event_seq, e.id, e.type, d.partition_key, e.payload, d.attempts"
                  " FROM deliveries d JOIN events e ON e.seq = d.event_seq")

        def run(db: sqlite3.Connection) -> list[Delivery]:
            if per_key <= 1:
                marks = ",".join("?" * len(seqs))
                rows = {row[0]: row for row in db.execute(
                    f"{select} WHERE d.destination = ? AND d.state = 0"
                    f" AND d.event_seq IN ({marks})", (destination, *seqs))}
                return [Delivery(seq, destination, *rows[seq][1:]) for seq in seqs
                        if seq in rows]
            leased: list[Delivery] = []
            for _, seq, key in due:
                room = min(per_key, limit - len(leased))
                if room <= 0:
                    break
                leased += [Delivery(row[0], destination, *row[1:]) for row in db.execute(
                    f"{select} WHERE d.destination = ? AND d.state = 0 AND d.partition_key = ?"
                    " AND d.event_seq >= ? ORDER BY d.event_seq LIMIT ?",
                    (destination, key, seq, room))]
            return leased

        return await self._read(run)

    async def next_due(self, destination: str) -> float | None:
        """Unix time at which the earliest head of a key of `destination` is due."""
        heads = self._heads.get(destination)
        return min((h.due for h in heads.values()), default=None) if heads else None

    async def counts(self) -> dict[str, DestinationCounts]:
        """Per destination: owed deliveries, those retrying, dead letters, oldest age. Kept in
        memory; only the oldest pending event's time is read."""
        now = time.time()
        result: dict[str, DestinationCounts] = {}
        oldest: dict[str, int] = {}
        for destination in sorted(set(self._pending) | set(self._dead)):
            pending, dead = self._pending[destination], self._dead[destination]
            if not pending and not dead:
                continue
            heads = self._heads.get(destination, {}).values()
            result[destination] = DestinationCounts(
                pending=pending, dead=dead, retrying=sum(1 for h in heads if h.attempts))
            if heads:
                oldest[destination] = min(h.seq for h in heads)

        def run(db: sqlite3.Connection) -> dict[str, float]:
            # A head may have been delivered since it was looked at: then it has no row.
            found = {name: db.execute("SELECT created_at FROM events WHERE seq = ?",
                                      (seq,)).fetchone() for name, seq in oldest.items()}
            return {name: row[0] for name, row in found.items() if row is not None}

        if oldest:
            for name, created in (await self._read(run)).items():
                result[name].oldest_pending_age = now - created
        return result

    async def journal(self, since: float = 0.0, limit: int | None = None
                      ) -> list[dict[str, Any]]:
        def run(db: sqlite3.Connection) -> list[dict[str, Any]]:
            return _dicts(db.execute(
                "SELECT event_id, event_type, destination, delivered_at, attempts, status,"
                " reference FROM journal WHERE delivered_at >= ? ORDER BY rowid LIMIT ?",
                (since, -1 if limit is None else limit)))

        return await self._read(run)

    async def dead_letters(self) -> list[dict[str, Any]]:
        def run(db: sqlite3.Connection) -> list[dict[str, Any]]:
            return _dicts(db.execute(
                "SELECT e.id, e.type, d.destination, d.partition_key, d.attempts, d.last_status,"
                " d.last_error, d.dead_at FROM deliveries d JOIN events e ON e.seq = d.event_seq"
                " WHERE d.state = 2 ORDER BY d.dead_at, d.event_seq"))

        return await self._read(run)

    async def lot_status(self, lot_id: str) -> LotStatus | None:
        row = await self._read(lambda db: db.execute(
            "SELECT lot_id, status, since, source, order_id, material FROM lot_status"
            " WHERE lot_id = ?", (lot_id,)).fetchone())
        return None if row is None else LotStatus(*row)

    async def rejected_inputs(self, since: float = 0.0, limit: int = 100
                              ) -> list[dict[str, Any]]:
        """Input dead letters, newest first."""
        def run(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = _dicts(db.execute(
                "SELECT id, source, topic, message_id, payload, reason, received_at"
                " FROM rejected_inputs WHERE received_at >= ? ORDER BY id DESC LIMIT ?",
                (since, limit)))
            for row in rows:
                row["payload"] = row["payload"].decode(errors="replace")
            return rows

        return await self._read(run)

    async def rejected_input(self, number: int) -> RejectedInput | None:
        """One input dead letter as it was kept (payload as bytes), by its id."""
        row = await self._read(lambda db: db.execute(
            "SELECT source, topic, payload, reason, received_at, message_id"
            " FROM rejected_inputs WHERE id = ?", (number,)).fetchone())
        if row is None:
            return None
        source, topic, payload, reason, received_at, message_id = row
        return RejectedInput(source, topic, payload, reason, received_at, message_id,
                             replaces=number)

    async def rejected_count(self) -> dict[str, int]:
        """Input dead letters held, per source (driver)."""
        return dict(await self._read(lambda db: db.execute(
            "SELECT source, COUNT(*) FROM rejected_inputs GROUP BY source").fetchall()))

    async def hand_actions(self, since: float = 0.0, limit: int = 100
                           ) -> list[dict[str, Any]]:
        """The hand-action journal, oldest first."""
        return await self._read(lambda db: _dicts(db.execute(
            "SELECT at, action, target, who, reason, affected FROM hand_actions"
            " WHERE at >= ? ORDER BY id LIMIT ?", (since, limit))))

    async def event_state(self, event_id: str) -> dict[str, str]:
        """Per destination, where an event stands: `pending`, `dead` or `delivered`."""
        def run(db: sqlite3.Connection) -> dict[str, str]:
            found = {name: "delivered" for (name,) in db.execute(
                "SELECT destination FROM journal WHERE event_id = ?", (event_id,))}
            found |= {name: ("dead" if state == DEAD else "pending") for name, state in
                      db.execute("SELECT d.destination, d.state FROM deliveries d JOIN events e"
                                 " ON e.seq = d.event_seq WHERE e.id = ?", (event_id,))}
            return found

        return await self._read(run)

    async def deliveries(self, *, destination: str | None = None, state: str = "pending",
                         limit: int = 100) -> list[dict[str, Any]]:
        """Owed deliveries in commit order: state `pending`, `retrying` or `dead`."""
        condition = {"pending": "d.state = 0", "retrying": "d.state = 0 AND d.attempts > 0",
                     "dead": "d.state = 2"}[state]

        def run(db: sqlite3.Connection) -> list[dict[str, Any]]:
            return _dicts(db.execute(
                "SELECT e.id, e.type, d.destination, d.partition_key, d.attempts,"
                " d.next_attempt_at, d.last_status, d.last_error, e.created_at"
                " FROM deliveries d JOIN events e ON e.seq = d.event_seq"
                f" WHERE {condition} AND (? IS NULL OR d.destination = ?)"
                " ORDER BY d.event_seq LIMIT ?", (destination, destination, limit)))

        return await self._read(run)

    async def show(self, event_id: str) -> dict[str, Any] | None:
        """One event: its payload, each destination's delivery, and its journal rows."""
        def run(db: sqlite3.Connection) -> dict[str, Any] | None:
            rows = _dicts(db.execute(
                "SELECT seq, id, type, partition_key, priority, payload, created_at FROM events"
                " WHERE id = ?", (event_id,)))
            journal = _dicts(db.execute(
                "SELECT destination, delivered_at, attempts, status, reference FROM journal"
                " WHERE event_id = ? ORDER BY rowid", (event_id,)))
            if not rows and not journal:
                return None
            found: dict[str, Any] = {"id": event_id, "journal": journal, "deliveries": []}
            if rows:
                event = rows[0]
                event["payload"] = event["payload"].decode(errors="replace")
                found |= event
                found["deliveries"] = _dicts(db.execute(
                    "SELECT destination, CASE state WHEN 2 THEN 'dead' ELSE 'pending' END AS"
                    " state, attempts, next_attempt_at, last_status, last_error, dead_at"
                    " FROM deliveries WHERE event_seq = ?", (event["seq"],)))
            return found

        return await self._read(run)

    # -- machinery ----------------------------------------------------------------------------

    async def _read(self, run: Callable[[sqlite3.Connection], T]) -> T:
        # Reads go to a read-only connection on a thread of their own (WAL lets them run beside
        # the writer), so a lease never queues behind disk-synced commits. What they read was
        # committed before the in-memory heads pointed at it.
        loop = asyncio.get_running_loop()
        if self._reader is None or self._reader_db is None:
            return await loop.run_in_executor(self._executor, run, self._db)
        return await loop.run_in_executor(self._reader, run, self._reader_db)

    async def _submit(self, run: Callable[[sqlite3.Connection], T], rows: int) -> T:
        if self._closed:
            raise RuntimeError("the outbox is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Work(run, rows, future))
        return await future

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Take what has queued up, at once: whatever arrives while this transaction runs
            # makes the next one. A linger (`commit_interval`) only helps on slow storage.
            first = await self._queue.get()
            batch = [first]
            rows = first.rows
            deadline = loop.time() + self._commit_interval
            while rows < self._commit_max_rows:
                if self._queue.empty():
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a
                    # cancellation that arrives as the queue hands over work, and the writer
                    # then waits on, unstoppable (found by the crash model test).
                    try:
                        async with asyncio.timeout(timeout):
                            work = await self._queue.get()
                    except TimeoutError:
                        break
                else:
                    work = self._queue.get_nowait()
                batch.append(work)
                rows += work.rows
            outcomes = await self._run_until_stored(batch)
            for work, outcome in zip(batch, outcomes, strict=True):
                if not work.future.done():
                    if isinstance(outcome, BaseException):
                        work.future.set_exception(outcome)
                    else:
                        work.future.set_result(outcome)
                self._queue.task_done()

    async def _run_until_stored(self, batch: Sequence[_Work]) -> list[Any]:
        """Run a batch as one transaction. A full disk is waited out, never dropped."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                outcomes, used = await loop.run_in_executor(self._executor, _transaction,
                                                            self._db, batch)
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
                    log.error("Outbox transaction failed and was rolled back: %s", exc)
                    return [exc] * len(batch)
                if not self.disk_full:
                    self.disk_full = True
                    self.stats.disk_full_waits += 1
                    self._update_room()
                await asyncio.sleep(1.0)
                continue
            except Exception as exc:
                log.error("Outbox transaction failed and was rolled back: %s", exc)
                return [exc] * len(batch)
            self.stats.transactions += 1
            self.disk_full = False
            self.used_bytes = used
            self._update_room()
            return outcomes


def _transaction(db: sqlite3.Connection, batch: Sequence[_Work]) -> tuple[list[Any], int]:
    """Run a group of callers' work in one transaction. Each caller's part sits in a savepoint,
    so a caller whose work breaks a constraint gets its own error and the others commit; any
    other error (a full disk, a broken file) rolls back all of it."""
    outcomes: list[Any] = []
    db.execute("BEGIN IMMEDIATE")
    try:
        for work in batch:
            db.execute("SAVEPOINT work")
            try:
                outcomes.append(work.run(db))
            except sqlite3.IntegrityError as exc:
                db.execute("ROLLBACK TO work")
                outcomes.append(exc)
            db.execute("RELEASE work")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return outcomes, _used_bytes(db)


def _used_bytes(db: sqlite3.Connection) -> int:
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    (free,) = db.execute("PRAGMA freelist_count").fetchone()
    (size,) = db.execute("PRAGMA page_size").fetchone()
    return int((pages - free) * size)


def _next_head(db: sqlite3.Connection, destination: str, key: str) -> _Head | None:
    row = db.execute(
        "SELECT event_seq, priority, next_attempt_at, attempts FROM deliveries"
        " WHERE destination = ? AND state = 0 AND partition_key = ? ORDER BY event_seq LIMIT 1",
        (destination, key)).fetchone()
    return None if row is None else _Head(*row)


def _load_heads(db: sqlite3.Connection) -> dict[str, dict[str, _Head]]:
    """The head of every (destination, key), by a skip scan of the indexes: a few probes per
    key, however many events each key holds."""
    heads: dict[str, dict[str, _Head]] = {}
    destination = ""
    while row := db.execute("SELECT destination FROM deliveries WHERE destination > ?"
                            " ORDER BY destination LIMIT 1", (destination,)).fetchone():
        destination = row[0]
        key = ""
        while row := db.execute(
            "SELECT partition_key FROM deliveries WHERE destination = ? AND state = 0"
            " AND partition_key > ? ORDER BY partition_key LIMIT 1", (destination, key)
        ).fetchone():
            key = row[0]
            head = _next_head(db, destination, key)
            assert head is not None
            heads.setdefault(destination, {})[key] = head
    return heads


def _load_counts(db: sqlite3.Connection) -> tuple[Counter[str], Counter[str]]:
    pending: Counter[str] = Counter()
    dead: Counter[str] = Counter()
    for destination, state, total in db.execute(
            "SELECT destination, state, COUNT(*) FROM deliveries GROUP BY destination, state"):
        (dead if state == DEAD else pending)[destination] = total
    return pending, dead


def _dead_filter(event_id: str | None, destination: str | None) -> tuple[str, tuple[str, ...]]:
    where, args = "", tuple[str, ...]()
    if event_id is not None:
        where += " AND event_seq = (SELECT seq FROM events WHERE id = ?)"
        args += (event_id,)
    if destination is not None:
        where += " AND destination = ?"
        args += (destination,)
    return where, args


def _drop_if_done(db: sqlite3.Connection, seq: int) -> None:
    db.execute("DELETE FROM events WHERE seq = ? AND NOT EXISTS"
               " (SELECT 1 FROM deliveries WHERE event_seq = ?)", (seq, seq))


def _dicts(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


DAMAGED_MARK = ".damaged"
"""Suffix of the file that marks a database found damaged while in use."""


def keep_private(path: Path) -> None:
    """The database holds event payloads and raw MES messages: its directory is made 0700 when
    it is created here, and the files are 0600 whatever the umask (SQLite gives the -wal and
    -shm files the mode of the database file). An existing directory others can read is not
    changed (it may be shared, like /tmp), only reported."""
    directory = path.parent
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
    elif directory.stat().st_mode & 0o077:
        log.warning("The outbox's directory %s can be read by others (mode %04o): the "
                    "database holds event payloads and raw MES messages; make it 0700",
                    directory, directory.stat().st_mode & 0o7777)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            file = Path(f"{path}{suffix}")
            if file.stat().st_mode & 0o077:
                file.chmod(0o600)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA busy_timeout = 5000")
        migrate(db)
    except BaseException:
        db.close()
        raise
    return db


def _connect_reader(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                         check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 5000")
    return db


def _check_and_mark(path: Path) -> str | None:
    """Run `quick_check`; on damage, leave the mark the next start acts on, and say what."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = [row[0] for row in db.execute("PRAGMA quick_check(20)")]
        finally:
            db.close()
        problem = None if rows == ["ok"] else "; ".join(rows)
    except sqlite3.DatabaseError as exc:
        problem = str(exc)
    if problem is not None:
        Path(f"{path}{DAMAGED_MARK}").write_text(problem + "\n")
    return problem


@dataclass
class _Opened:
    connection: sqlite3.Connection
    heads: dict[str, dict[str, _Head]]
    counts: tuple[Counter[str], Counter[str]]
    used_bytes: int
    recovered_from: str | None
    epoch: str


def _load(path: Path) -> _Opened:
    db = _connect(path)
    try:
        ((epoch,),) = db.execute("SELECT value FROM outbox_meta WHERE key = 'epoch'")
        return _Opened(db, _load_heads(db), _load_counts(db), _used_bytes(db), None,
                       str(epoch))
    except BaseException:
        db.close()
        raise


def _open_checked(path: Path) -> _Opened:
    """Open the database and read what the gateway keeps in memory. A file that cannot be
    read, or that the previous run found damaged, is moved aside with a timestamp and
    replaced by a fresh one: a bad file raises an alarm, never a crash loop."""
    mark = Path(f"{path}{DAMAGED_MARK}")
    try:
        if mark.exists():
            raise sqlite3.DatabaseError(f"marked damaged by the last run: "
                                        f"{mark.read_text().strip()}")
        return _load(path)
    except sqlite3.DatabaseError as exc:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = path.with_name(f"{path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{path}{suffix}")
            if source.exists():
                source.rename(Path(f"{aside}{suffix}"))
        mark.unlink(missing_ok=True)
        log.critical("The outbox database %s is damaged (%s); it was moved to %s and a fresh "
                     "one was created. Events it held were not delivered: recover them from "
                     "the moved file", path, exc, aside)
        keep_private(path)
        opened = _load(path)
        opened.recovered_from = f"{aside} ({exc})"
        return opened
