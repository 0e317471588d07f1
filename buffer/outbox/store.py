"""The outbox itself: `Outbox`, the one object the gateway commits to, leases from and settles
deliveries with (the promises it keeps are the package's docstring, `buffer.outbox`).

It keeps in memory what every lease and every metric needs (the heads of partition keys, owed
and dead counts per destination, bytes in use) and moves it only after the transaction that
moved the rows is on disk. Writes queue for the one writer thread and are group committed;
reads run on a read-only connection of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from buffer.outbox import queries, reports
from buffer.outbox.database import (
    Work,
    check_and_mark,
    connect_reader,
    keep_private,
    open_database,
    take_batch,
    transaction,
    write_hand_action,
)
from buffer.outbox.heads import Head, NewDelivery
from buffer.outbox.recent import Recent
from buffer.outbox.records import (
    CommitResult,
    Delivery,
    DestinationCounts,
    HandAction,
    LotStatus,
    OutboxEvent,
    OutboxFull,
    OutboxStats,
    Priority,
    RejectedInput,
    Settlement,
)
from buffer.outbox.settle import (
    Purged,
    Settled,
    purge_delivered,
    riding_purge,
    sort_settlements,
    write_settlements,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

RECENT_BYTES = 16_000_000
"""Memory for committed, unsettled deliveries kept for leases (`_recent`), counted as each
payload and 300 bytes (the entry and the event's id, measured with tracemalloc): about
20,000 confirmation-sized events, the steady state of a plant many times over; beyond it
(a long outage's backlog) leases read them, as after a restart."""

SETTLE_WAIT = 0.002
"""How long, by default, a settle whose forwarder has others in flight and more ready waits
for their outcomes to share its transaction (`Outbox.settle`). Measured with bench/forward.py
(4 in flight, 50 keys): 2 ms halved the transactions per event and raised unbatched delivery
by about a tenth; 20 ms starved the keys (each stays busy until its outcome is durable)."""


PURGE_CHUNK = 1024
"""Payloads of delivered events deleted per purge transaction (`_purge`): measured cheapest
per event at 1,024 (2.0 µs) against 256 (2.4) and 4,096 (4.8, its pages overflow SQLite's
page cache within the transaction)."""
PURGE_IDLE = 512
"""Queued payloads that make the writer purge once it has been idle for `PURGE_QUIET`;
fewer wait up to `PURGE_AGE`."""
PURGE_QUIET = 0.005
"""Seconds without work that make the writer idle: a steady flow of settles (one every
fraction of a millisecond) is not made to wait behind a purge at every pause."""
PURGE_AGE = 1.0
"""Seconds a queued payload waits at most for an idle writer to purge it: a plant's trickle
of events then costs one purge transaction a second, not one per settle."""
PURGE_BUSY = 2048
"""Queued payloads that make a busy writer purge anyway (a backlog draining flat out never
leaves it idle): PURGE_RIDE of them in each transaction (`_purge_riding`) until fewer are
queued. Measured with bench/forward.py: the bulk purge costs about 2 µs and a fifth of a
page per event, the delete in each settle cost 11 µs and two thirds of a page; a purge
transaction of its own between busy transactions stalled every settle behind it (a tenth
of a batched phase at a quarter of the rate)."""
PURGE_RIDE = 256
"""Payloads a busy writer purges in each transaction (a batched settle transaction carries
about 170 events at 40,000 events/s)."""


class Outbox:
    """Open with `async with Outbox.open(path) as outbox:`; it closes when the block ends."""

    def __init__(
        self,
        connection: sqlite3.Connection,
        executor: ThreadPoolExecutor,
        *,
        commit_interval: float,
        commit_max_rows: int,
        settle_wait: float,
        max_bytes: int | None,
        heads: dict[str, dict[str, Head]],
        counts: tuple[Counter[str], Counter[str]],
        recovered_from: str | None,
        epoch: str,
        purge_queued: int = 0,
    ) -> None:
        self._db = connection
        self._executor = executor
        self._commit_interval = commit_interval
        self._settle_wait = settle_wait
        self._commit_max_rows = commit_max_rows
        self._max_bytes = max_bytes
        self._heads = heads
        self._pending, self._dead = counts
        self._recent = Recent(RECENT_BYTES)
        """What this process committed and has not settled, for leases without a read
        (buffer/outbox/recent.py)."""
        self._queue: asyncio.Queue[Work] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        # Held weakly: a forwarder a reload replaced takes its event with it.
        self._listeners: weakref.WeakSet[asyncio.Event] = weakref.WeakSet()
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
        self._purge_queued = purge_queued
        """Delivered events whose payload is queued for `_purge` (buffer/outbox/settle.py)."""
        self._purge_since = time.monotonic()
        """When the oldest of them was queued (roughly: the last purge, or the open)."""

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        path: str | Path,
        *,
        commit_interval: float = 0.0,
        commit_max_rows: int = 500,
        max_bytes: int | None = None,
        settle_wait: float = SETTLE_WAIT,
    ) -> AsyncIterator[Outbox]:
        """The outbox at `path`, open for an `async with` block. Its writer and its background
        integrity check are tasks of the block's own TaskGroup; leaving the block finishes the
        queued work, then closes the database. A writer that fails ends the block with its
        error; an error of the block itself comes out as it was raised."""
        outbox = await cls._opened(
            Path(path),
            commit_interval=commit_interval,
            commit_max_rows=commit_max_rows,
            max_bytes=max_bytes,
            settle_wait=settle_wait,
        )
        failure: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as tasks:
                outbox._writer = tasks.create_task(outbox._write_loop(), name="outbox-writer")
                outbox._checker = tasks.create_task(
                    outbox._check_integrity(Path(path)), name="outbox-integrity-check"
                )
                try:
                    yield outbox
                except BaseException as exc:
                    # Kept and raised after the TaskGroup, which would wrap it in a group.
                    failure = exc
                finally:
                    await outbox._close()
        finally:
            await outbox._close()  # the TaskGroup failed before the block ended
        if failure is not None:
            raise failure

    @classmethod
    async def _opened(
        cls,
        path: Path,
        *,
        commit_interval: float,
        commit_max_rows: int,
        max_bytes: int | None,
        settle_wait: float,
    ) -> Outbox:
        keep_private(path)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-writer")
        loop = asyncio.get_running_loop()
        opened = await loop.run_in_executor(executor, open_database, path)
        outbox = cls(
            opened.connection,
            executor,
            commit_interval=commit_interval,
            commit_max_rows=commit_max_rows,
            settle_wait=settle_wait,
            max_bytes=max_bytes,
            heads=opened.heads,
            counts=opened.counts,
            recovered_from=opened.recovered_from,
            epoch=opened.epoch,
            purge_queued=opened.purge_queued,
        )
        outbox.used_bytes = opened.used_bytes
        outbox._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-reader")
        outbox._reader_db = await loop.run_in_executor(outbox._reader, connect_reader, path)
        outbox._update_room()
        return outbox

    async def _check_integrity(self, path: Path) -> None:
        """A full `quick_check` reads the whole file (seconds for a big backlog on a cold
        cache), so it runs beside the gateway on a read-only connection of its own instead of
        delaying the first delivery. A failure raises the alarm and marks the file, so the next
        start moves it aside; this run goes on with what it can still read."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-check") as pool:
            problem = await asyncio.get_running_loop().run_in_executor(pool, check_and_mark, path)
        if problem is not None:
            self.integrity_problem = problem
            log.critical(
                "The outbox database %s failed its integrity check: %s. The gateway "
                "keeps running; at the next start the file is moved aside and a fresh "
                "one created. Plan a restart and recover undelivered events from the "
                "moved file",
                path,
                problem,
            )

    async def _close(self) -> None:
        """Finish queued work (unless the writer is gone), then close the database."""
        if self._closed:
            return
        self._closed = True
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
        if self._writer is not None:
            if not self._writer.done():
                await self._queue.join()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        loop = asyncio.get_running_loop()
        await self._purge_all(loop)
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
            return (
                f"the outbox is at its disk budget ({self.used_bytes // 1_000_000} of "
                f"{self._max_bytes // 1_000_000} MB): informational events are refused "
                "and input is paused until deliveries free space"
            )
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
        self,
        events: Sequence[OutboxEvent],
        state: Mapping[str, str] | None = None,
        *,
        rejected: Sequence[RejectedInput] = (),
        lots: Sequence[LotStatus] = (),
        resolved_inputs: Sequence[int] = (),
        wait: bool = True,
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
            kept = [e for e in events if e.priority < Priority.INFORMATIONAL]
            refused = len(events) - len(kept)
            if refused:
                self.stats.refused_informational += refused
                log.warning("Refused %d informational event(s): %s", refused, self.back_pressure)
            events = kept
            if events or state or rejected or resolved_inputs:
                if not wait:
                    raise OutboxFull(self.back_pressure or "the outbox is full")
                await self._room.wait()
        now = time.time()
        state_rows = list((state or {}).items())

        def committed(written: tuple[set[str], list[NewDelivery]]) -> CommitResult:
            inserted, new_rows = written
            self.stats.rejected_inputs += len(rejected)
            recent = self._recent
            for destination, key, seq, priority, event in new_rows:
                recent.add(Delivery(seq, destination, event.id, event.type, key, event.payload, 0))
                self._pending[destination] += 1
                heads = self._heads.setdefault(destination, {})
                if key not in heads:
                    heads[key] = Head(seq, priority, 0.0)
            duplicates = len(events) - len(inserted)
            self.stats.committed += len(inserted)
            self.stats.duplicates_ignored += duplicates
            if new_rows:
                self._notify()
            return CommitResult(len(inserted), duplicates, refused, frozenset(inserted))

        result: CommitResult = await self._submit(
            lambda db: queries.write_commit(
                db, events, now, state_rows, rejected, resolved_inputs, lots
            ),
            max(1, len(events) + len(rejected)),
            then=committed,
        )
        return result

    async def ack(
        self, delivery: Delivery, *, status: int | None, reference: str | None = None
    ) -> None:
        """The destination took the event: journal it and forget the delivery."""
        await self.settle([Settlement(delivery, "delivered", status, reference=reference)])

    async def retry(self, delivery: Delivery, *, at: float, status: int | None, error: str) -> None:
        """Keep the delivery, to be tried again at `at` (Unix time, persisted)."""
        await self.settle([Settlement(delivery, "retry", status, retry_at=at, reason=error)])

    async def dead_letter(self, delivery: Delivery, *, status: int | None, reason: str) -> None:
        """A permanent rejection: park the delivery with its reason; its key moves on."""
        await self.settle([Settlement(delivery, "dead", status, reason=reason)])

    async def settle(
        self, settlements: Sequence[Settlement], *, others_follow: bool = False
    ) -> None:
        """Record what became of leased deliveries (one request's outcomes, or several), as
        one piece of work in one group-committed transaction (buffer/outbox/settle.py says
        how, and why a key's later retries in one call wait behind its first). Returns once
        it is durable; each key touched then has its oldest delivery still owed as head.

        `others_follow`: the caller has other requests in flight whose outcomes will follow,
        and nothing waits on these keys (it has more requests ready). The transaction then
        waits up to `settle_wait` for them (`database.take_batch`): fewer, larger
        transactions, each fsync shared by more events."""
        if not settlements:
            return
        sorted_out = sort_settlements(settlements)

        def recorded(settled: Settled) -> None:
            ours = {(s.delivery.destination, s.delivery.seq) for s in settlements}
            for settlement in settlements:
                self._recent.drop(settlement.delivery)
            for (destination, key), head in settled.heads.items():
                heads = self._heads.get(destination, {})
                current = heads.get(key)
                if current is not None and (destination, current.seq) not in ours:
                    continue  # a head that is not one of these: someone else already moved it
                if head is None:
                    heads.pop(key, None)
                    self._recent.owes_nothing(destination, key)
                else:
                    heads[key] = head
            for done in (*settled.delivered, *settled.dead):
                self._pending[done.delivery.destination] -= 1
            for dead in settled.dead:
                self._dead[dead.delivery.destination] += 1
            self.stats.delivered += len(settled.delivered)
            if settled.delivered:
                if not self._purge_queued:
                    self._purge_since = time.monotonic()
                self._purge_queued += len(settled.delivered)
            self.stats.retries += len(settled.retried)
            self.stats.dead_lettered += len(settled.dead)
            if settled.dead:
                self._notify()

        await self._submit(
            lambda db: write_settlements(db, sorted_out),
            len(settlements),
            linger=self._settle_wait if others_follow else 0.0,
            then=recorded,
        )

    async def retry_dead(
        self,
        event_id: str | None = None,
        destination: str | None = None,
        *,
        hand: HandAction | None = None,
    ) -> int:
        """Put dead letters back in line (one event, or all); returns how many. They go in
        commit order with their key's other deliveries, and their attempts start over. `hand`
        is journalled in the same transaction."""

        def reloaded(
            result: tuple[int, dict[str, dict[str, Head]], tuple[Counter[str], Counter[str]]],
        ) -> int:
            count, self._heads, (self._pending, self._dead) = result
            self.stats.dead_retried += count
            if count:
                self._notify()
            return int(count)

        count: int = await self._submit(
            lambda db: queries.retry_dead(db, event_id, destination, hand), 1, then=reloaded
        )
        return count

    async def purge_dead(
        self,
        event_id: str | None = None,
        destination: str | None = None,
        *,
        hand: HandAction | None = None,
    ) -> int:
        """Delete dead letters for good (one event, or all); returns how many. `hand` is
        journalled in the same transaction."""

        def forgotten(purged: list[tuple[int, str]]) -> int:
            for _, name in purged:
                self._dead[name] -= 1
            return len(purged)

        count: int = await self._submit(
            lambda db: queries.purge_dead(db, event_id, destination, hand), 1, then=forgotten
        )
        return count

    async def purge(self) -> int:
        """Delete every delivered payload still queued, now, PURGE_CHUNK per transaction as
        the writer does by itself (`_purge`); returns how many payloads went. A benchmark
        calls it so that its clock includes the deletes a steady flow pays for."""

        def counted(done: Purged) -> Purged:
            self._purged(done, PURGE_CHUNK)
            return done

        total = 0
        while True:
            purged: Purged = await self._submit(
                lambda db: purge_delivered(db, PURGE_CHUNK), 1, then=counted
            )
            total += purged.deleted
            if purged.dequeued < PURGE_CHUNK:
                return total

    async def record_hand_action(self, action: HandAction, affected: int = 1) -> None:
        """Journal a hand action that changed nothing in the outbox itself (a trusted
        certificate); one that does should journal in its own transaction (`hand=`)."""
        await self._submit(lambda db: write_hand_action(db, action, affected), 1)

    async def prune(self, retention: float, now: float | None = None) -> int:
        """Forget journal rows, remembered ids, input dead letters and hand actions older
        than `retention` seconds."""
        cutoff = (time.time() if now is None else now) - retention

        def pruned(result: tuple[int, int]) -> int:
            self._purge_queued = 0
            self.stats.payloads_purged += result[1]
            return result[0]

        return int(await self._submit(lambda db: queries.prune(db, cutoff), 1, then=pruned))

    # -- reads --------------------------------------------------------------------------------

    async def load_state(self) -> dict[str, str]:
        return dict(await self._read(queries.load_state))

    async def lease(
        self,
        destination: str,
        limit: int,
        *,
        busy_keys: Iterable[str] = (),
        now: float | None = None,
        per_key: int = 1,
    ) -> list[Delivery]:
        """Up to `limit` deliveries that are due: the head of each partition key not in
        `busy_keys`, most urgent priority class first, then commit order; with `per_key`
        above 1, each head followed by up to `per_key - 1` of its key's next deliveries in
        commit order (a run, kept together in the list), for a target that takes several
        events of one key in one request and processes them in order. One read for all."""
        busy = set(busy_keys)
        when = time.time() if now is None else now
        heads = self._heads.get(destination, {})
        due = sorted(
            (head.priority, head.seq, key)
            for key, head in heads.items()
            if head.due <= when and key not in busy
        )[:limit]
        if not due:
            return []
        leased: list[Delivery] = []
        room = limit
        for _, seq, key in due:
            if room <= 0:
                break
            run = self._recent.run(destination, key, seq, min(per_key, room))
            if run is None:  # not all in memory: one read for all, as it always was
                return await self._read(
                    lambda db: queries.lease(db, destination, due, limit, per_key)
                )
            leased += run
            room -= len(run)
        self.stats.leased_from_memory += len(leased)
        return leased

    def keep_lease_memory_for(self, destinations: Iterable[str]) -> None:
        """The destinations this gateway delivers to now (after a reload): the lease memory of
        any other is freed (buffer/outbox/recent.py)."""
        self._recent.keep_only(set(destinations))

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
                pending=pending, dead=dead, retrying=sum(1 for h in heads if h.attempts)
            )
            if heads:
                oldest[destination] = min(h.seq for h in heads)
        if oldest:
            created = await self._read(lambda db: queries.created_at(db, oldest))
            for name, created_at in created.items():
                result[name].oldest_pending_age = now - created_at
        return result

    async def journal(self, since: float = 0.0, limit: int | None = None) -> list[dict[str, Any]]:
        """Deliveries made, oldest first, from the journal (kept for the retention)."""
        return await self._read(lambda db: reports.journal(db, since, limit))

    async def dead_letters(self) -> list[dict[str, Any]]:
        """Dead letters of every destination, in the order they died."""
        return await self._read(reports.dead_letters)

    async def lot_status(self, lot_id: str) -> LotStatus | None:
        row = await self._read(lambda db: queries.lot_status(db, lot_id))
        return None if row is None else LotStatus(*row)

    async def rejected_inputs(self, since: float = 0.0, limit: int = 100) -> list[dict[str, Any]]:
        """Input dead letters, newest first."""
        return await self._read(lambda db: reports.rejected_inputs(db, since, limit))

    async def rejected_input(self, number: int) -> RejectedInput | None:
        """One input dead letter as it was kept (payload as bytes), by its id."""
        row = await self._read(lambda db: queries.rejected_input(db, number))
        if row is None:
            return None
        source, topic, payload, reason, received_at, message_id = row
        return RejectedInput(
            source, topic, payload, reason, received_at, message_id, replaces=number
        )

    async def rejected_count(self) -> dict[str, int]:
        """Input dead letters held, per source (driver)."""
        return dict(await self._read(queries.rejected_count))

    async def hand_actions(self, since: float = 0.0, limit: int = 100) -> list[dict[str, Any]]:
        """The hand-action journal, oldest first."""
        return await self._read(lambda db: reports.hand_actions(db, since, limit))

    async def event_state(self, event_id: str) -> dict[str, str]:
        """Per destination, where an event stands: `pending`, `dead` or `delivered`."""
        return await self._read(lambda db: reports.event_state(db, event_id))

    async def deliveries(
        self,
        *,
        destination: str | None = None,
        state: reports.DeliveryFilter = "pending",
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Owed deliveries in commit order: state `pending`, `retrying` or `dead`."""
        return await self._read(lambda db: reports.deliveries(db, destination, state, limit))

    async def show(self, event_id: str) -> dict[str, Any] | None:
        """One event: its payload, each destination's delivery, and its journal rows."""
        return await self._read(lambda db: reports.show(db, event_id))

    # -- machinery ----------------------------------------------------------------------------

    async def _read(self, run: Callable[[sqlite3.Connection], T]) -> T:
        # Reads go to a read-only connection on a thread of their own (WAL lets them run beside
        # the writer), so a lease never queues behind disk-synced commits. What they read was
        # committed before the in-memory heads pointed at it.
        loop = asyncio.get_running_loop()
        if self._reader is None or self._reader_db is None:
            return await loop.run_in_executor(self._executor, run, self._db)
        return await loop.run_in_executor(self._reader, run, self._reader_db)

    async def _submit(
        self,
        run: Callable[[sqlite3.Connection], Any],
        rows: int,
        *,
        linger: float = 0.0,
        then: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Queue `run` for the writer; return its outcome once durable. `then` turns the
        outcome into the caller's result on the event loop, right after the transaction and
        whether or not the caller is still waiting: the memory of heads, counts and leases
        follows what reached the file even when the caller was cancelled meanwhile (a
        reload cancels late deliveries; the work commits anyway)."""
        if self._closed:
            raise RuntimeError("the outbox is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(Work(run, rows, future, linger, then))
        return await future

    async def _write_loop(self) -> None:
        while True:
            batch = await take_batch(
                self._queue, self._commit_interval, self._commit_max_rows, self._purge_wait()
            )
            if not batch:  # idle for as long as queued payloads may wait
                await self._purge()
                continue
            riding = self._purge_riding()
            outcomes = await self._run_until_stored([*batch, riding] if riding else batch)
            if riding is not None:
                self._purged(outcomes.pop(), PURGE_RIDE)
            for work, outcome in zip(batch, outcomes, strict=True):
                if work.then is not None and not isinstance(outcome, BaseException):
                    try:
                        outcome = work.then(outcome)
                    except Exception as exc:  # a bug in the bookkeeping: its caller hears
                        log.exception("Outbox bookkeeping after a commit failed")
                        outcome = exc
                if not work.future.done():
                    if isinstance(outcome, BaseException):
                        work.future.set_exception(outcome)
                    else:
                        work.future.set_result(outcome)
                self._queue.task_done()

    def _purge_riding(self) -> Work | None:
        """A busy writer's purge: PURGE_RIDE payloads in the transaction of the work at hand,
        so it costs no fsync of its own and stalls no settle between transactions."""
        if not self._purge_queued or time.monotonic() < self._purge_since:
            return None
        if self._purge_queued < PURGE_BUSY and self.back_pressure is None:
            return None
        return _purge_work(lambda db: riding_purge(db, PURGE_RIDE))

    def _purged(self, outcome: Purged | BaseException, limit: int) -> None:
        self._purge_since = time.monotonic()
        if isinstance(outcome, BaseException):
            log.error("Purging delivered payloads failed (tried again in 10 s): %s", outcome)
            self._purge_since += PURGE_AGE * 10
            return
        self.stats.payloads_purged += outcome.deleted
        queued = self._purge_queued - outcome.dequeued
        self._purge_queued = 0 if outcome.dequeued < limit else max(0, queued)

    def _purge_wait(self) -> float | None:
        """How long the writer may wait idle before it purges (None: nothing is queued)."""
        if not self._purge_queued:
            return None
        now = time.monotonic()
        if now < self._purge_since:  # a purge failed: not before its pause is over
            return self._purge_since - now
        if self.back_pressure is not None:
            return 0.0
        if self._purge_queued >= PURGE_IDLE:
            return PURGE_QUIET
        return max(PURGE_QUIET, self._purge_since + PURGE_AGE - now)

    async def _purge(self) -> None:
        """Delete the payloads of up to PURGE_CHUNK delivered events, in a transaction of its
        own on the writer (buffer/outbox/settle.py, `purge_delivered`)."""
        work = _purge_work(lambda db: purge_delivered(db, PURGE_CHUNK))
        (outcome,) = await self._run_until_stored([work])
        self._purged(outcome, PURGE_CHUNK)

    async def _purge_all(self, loop: asyncio.AbstractEventLoop) -> None:
        """At close, with the writer stopped: leave no delivered payload in the file."""
        work = _purge_work(lambda db: purge_delivered(db, PURGE_CHUNK))
        try:
            while True:
                (purged,), _ = await loop.run_in_executor(
                    self._executor, transaction, self._db, [work]
                )
                if isinstance(purged, BaseException):
                    raise purged
                self.stats.payloads_purged += purged.deleted
                if purged.dequeued < PURGE_CHUNK:
                    break
        except Exception as exc:  # a full disk, a damaged file: the next open purges them
            log.warning("Delivered payloads were left to purge at the next start: %s", exc)

    async def _run_until_stored(self, batch: Sequence[Work]) -> list[Any]:
        """Run a batch as one transaction. A full disk is waited out, never dropped."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                outcomes, used = await loop.run_in_executor(
                    self._executor, transaction, self._db, batch
                )
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


def _purge_work(run: Callable[[sqlite3.Connection], Any]) -> Work:
    """A purge's part of a transaction: no caller awaits it; the writer reads its outcome."""
    return Work(run, 0, asyncio.get_running_loop().create_future())
