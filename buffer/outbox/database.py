"""The outbox's SQLite file: how it is opened (private modes, WAL, `synchronous=FULL`, the
schema migrated), checked (a background `quick_check` that marks a damaged file) and recovered
(a damaged file moved aside and replaced at the next open), and how one group of callers' work
is gathered and runs as one transaction on the writer thread.

The hand-action journal can also be written here without an open `Outbox`, for a CLI command
that works while the daemon is stopped: SQLite's locking makes that safe beside a running one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from buffer.outbox.heads import Head, load_counts, load_heads
from buffer.outbox.records import REJECTED_PAYLOAD_LIMIT, HandAction, LotStatus, RejectedInput
from buffer.outbox.schema import migrate

log = logging.getLogger(__name__)


@dataclass
class Work:
    """One caller's part of a group-committed transaction, and where its outcome goes."""

    run: Callable[[sqlite3.Connection], Any]
    rows: int
    future: asyncio.Future[Any] = field(repr=False)
    linger: float = 0.0
    """How long the transaction may wait for more work after this (see `take_batch`)."""
    then: Callable[[Any], Any] | None = None
    """Run on the event loop with the outcome once it is durable, cancelled caller or not."""


def write_hand_action(db: sqlite3.Connection, action: HandAction, affected: int) -> None:
    db.execute(
        "INSERT INTO hand_actions(at, action, target, who, reason, affected)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (
            time.time(),
            storable(action.action),
            storable(action.target),
            storable(action.who),
            storable(action.reason),
            affected,
        ),
    )


def journal_hand_action(path: str | Path, action: HandAction, affected: int = 1) -> None:
    """Journal a hand action in the outbox database at `path` from a process that does not
    hold the outbox open (a CLI command that works without the daemon). SQLite's locking
    makes it safe beside a running daemon."""
    db = connect(Path(path))
    try:
        db.execute("BEGIN IMMEDIATE")
        write_hand_action(db, action, affected)
        db.execute("COMMIT")
    finally:
        db.close()


def storable(text: str) -> str:
    """`text` as SQLite can store it: a lone surrogate (a topic no broker should pass, but one
    Hypothesis found) is escaped rather than failing the whole commit."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def transaction(db: sqlite3.Connection, batch: Sequence[Work]) -> tuple[list[Any], int]:
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
    return outcomes, bytes_in_use(db)


async def take_batch(
    queue: asyncio.Queue[Work],
    commit_interval: float,
    commit_max_rows: int,
    idle: float | None = None,
) -> list[Work]:
    """The writer's next group of work: the first to come, then whatever has queued up; none
    if nothing came within `idle` seconds (None: wait for the first however long).

    Whatever arrives while a transaction runs makes the next one, so a group forms without
    added latency. Beyond that the group waits for more until `commit_interval` (a linger
    for slow storage, 0 by default) or, while every work taken has a `linger` (a settle
    whose forwarder has other requests in flight and more ready behind them, so no key waits
    on it), until the shortest of them after the group began. Any work without one (a
    commit, a settle that expects nothing more) ends the wait at once, whether it came first
    or last, as PostgreSQL's `commit_delay` only waits when other transactions are active."""
    loop = asyncio.get_running_loop()
    if idle is None:
        first = await queue.get()
    else:
        try:
            async with asyncio.timeout(idle):
                first = await queue.get()
        except TimeoutError:
            return []
    batch = [first]
    rows = first.rows
    started = loop.time()
    linger = first.linger
    try:
        while rows < commit_max_rows:
            if queue.empty():
                timeout = started + max(commit_interval, linger) - loop.time()
                if timeout <= 0:
                    break
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a
                # cancellation that arrives as the queue hands over work, and the writer
                # then waits on, unstoppable (found by the crash model test).
                try:
                    async with asyncio.timeout(timeout):
                        work = await queue.get()
                except TimeoutError:
                    break
            else:
                work = queue.get_nowait()
            batch.append(work)
            rows += work.rows
            linger = min(linger, work.linger)
    except BaseException:
        # The writer was cancelled while it waited with work in hand (the outbox is being
        # torn down): that work will not run, so its callers must not wait for it.
        for work in batch:
            if not work.future.done():
                work.future.cancel()
            queue.task_done()
        raise
    return batch


def bytes_in_use(db: sqlite3.Connection) -> int:
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    (free,) = db.execute("PRAGMA freelist_count").fetchone()
    (size,) = db.execute("PRAGMA page_size").fetchone()
    return int((pages - free) * size)


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
        log.warning(
            "The outbox's directory %s can be read by others (mode %04o): the "
            "database holds event payloads and raw MES messages; make it 0700",
            directory,
            directory.stat().st_mode & 0o7777,
        )
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            file = Path(f"{path}{suffix}")
            if file.stat().st_mode & 0o077:
                file.chmod(0o600)


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA busy_timeout = 5000")
        # A payload deleted (purged after delivery, a dead letter purged) is zeroed in the
        # file, on every page it was on, freed ones too: what the README promises of personal
        # data. Set here, not left to the build (Debian's SQLite has it on, SQLite's own
        # default is off; FAST would leave freed pages as they were, measured: 1,071 of 2,000
        # purged payloads still readable after a checkpoint).
        db.execute("PRAGMA secure_delete = ON")
        migrate(db)
    except BaseException:
        db.close()
        raise
    return db


def connect_reader(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(
        f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
    )
    db.execute("PRAGMA busy_timeout = 5000")
    return db


def check_and_mark(path: Path) -> str | None:
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
class Opened:
    connection: sqlite3.Connection
    heads: dict[str, dict[str, Head]]
    counts: tuple[Counter[str], Counter[str]]
    used_bytes: int
    recovered_from: str | None
    epoch: str
    purge_queued: int = 0


def _load(path: Path) -> Opened:
    db = connect(path)
    try:
        ((epoch,),) = db.execute("SELECT value FROM outbox_meta WHERE key = 'epoch'")
        ((queued,),) = db.execute("SELECT count(*) FROM purge_queue")
        return Opened(
            db, load_heads(db), load_counts(db), bytes_in_use(db), None, str(epoch), int(queued)
        )
    except BaseException:
        db.close()
        raise


def open_database(path: Path) -> Opened:
    """Open the database and read what the gateway keeps in memory. A file that cannot be
    read, or that the previous run found damaged, is moved aside with a timestamp and
    replaced by a fresh one: a bad file raises an alarm, never a crash loop."""
    mark = Path(f"{path}{DAMAGED_MARK}")
    try:
        if mark.exists():
            raise sqlite3.DatabaseError(
                f"marked damaged by the last run: {mark.read_text().strip()}"
            )
        return _load(path)
    except sqlite3.DatabaseError as exc:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = path.with_name(f"{path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{path}{suffix}")
            if source.exists():
                source.rename(Path(f"{aside}{suffix}"))
        mark.unlink(missing_ok=True)
        log.critical(
            "The outbox database %s is damaged (%s); it was moved to %s and a fresh "
            "one was created. Events it held were not delivered: recover them from "
            "the moved file",
            path,
            exc,
            aside,
        )
        keep_private(path)
        opened = _load(path)
        opened.recovered_from = f"{aside} ({exc})"
        return opened


def write_inputs_and_lots(
    db: sqlite3.Connection,
    rejected: Sequence[RejectedInput],
    resolved_inputs: Sequence[int],
    lots: Sequence[LotStatus],
) -> None:
    """A commit's input dead letters (new, or a reingest rejected again), the ones it
    resolved, and the lot statuses it set (a produced lot's first `hold` never overrides a
    decision)."""
    for r in rejected:
        row = (
            storable(r.source),
            storable(r.topic),
            r.payload[:REJECTED_PAYLOAD_LIMIT],
            storable(r.kept_reason()),
            r.received_at,
            None if r.message_id is None else storable(r.message_id),
        )
        if r.replaces is None:
            db.execute(
                "INSERT INTO rejected_inputs(source, topic, payload, reason,"
                " received_at, message_id) VALUES (?, ?, ?, ?, ?, ?)",
                row,
            )
        else:
            db.execute(
                "UPDATE rejected_inputs SET source = ?, topic = ?, payload = ?,"
                " reason = ?, received_at = ?, message_id = ? WHERE id = ?",
                (*row, r.replaces),
            )
    if resolved_inputs:
        db.executemany(
            "DELETE FROM rejected_inputs WHERE id = ?", [(number,) for number in resolved_inputs]
        )
    for lot in lots:
        db.execute(
            "INSERT INTO lot_status(lot_id, status, since, source, order_id, material)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(lot_id) DO UPDATE SET"
            " status = excluded.status, since = excluded.since, source = excluded.source,"
            " order_id = COALESCE(excluded.order_id, order_id),"
            " material = COALESCE(excluded.material, material)"
            + ("" if lot.decided else " WHERE false"),
            (lot.lot_id, lot.status, lot.since, lot.source, lot.order_id, lot.material),
        )
