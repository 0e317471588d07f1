"""The outbox checked against a simple in-memory model with random action sequences
(commit, concurrent commits, lease, ack, retry, dead-letter, restart, crash, time passing), on a
real SQLite file.

The model is the specification: an event is held once per id, with the payload it was first
committed with, byte for byte; each destination owes each routed event until it is acknowledged
or dead-lettered; `lease` offers, per partition key, only the oldest owed delivery, when it is
due and its key is not in flight, most urgent priority first, then commit order; commits queued
together share one transaction (group commit); everything that an `await` returned from
survives a restart and a crash. A crash abandons the outbox in the middle of concurrent commits,
without leaving its `async with` block: the writer stops taking work, what was queued is never
run, the connections are left open as a dead process leaves them, and a new outbox opens the
file beside them. Each
commit that had not returned must then be there whole or not at all, and those that are there
are the first ones queued (the writer runs the queue in order).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from buffer.outbox import CommitResult, Delivery, Outbox, OutboxEvent, Settlement
from tests.held_outbox import HeldOutbox

DESTINATIONS = ("erp", "qms")
KEYS = ("order-1", "order-2", "order-3", "lot-9")


@dataclass
class Owed:
    seq: int
    event_id: str
    key: str
    priority: int
    attempts: int = 0
    due: float = 0.0
    dead: bool = False


@dataclass
class Model:
    ids: set[str] = field(default_factory=set)
    payloads: dict[str, bytes] = field(default_factory=dict)
    owed: dict[str, list[Owed]] = field(default_factory=lambda: {d: [] for d in DESTINATIONS})
    journal: list[tuple[str, str]] = field(default_factory=list)
    next_seq: int = 0

    def heads(self, destination: str, now: float, busy: set[str]) -> list[Owed]:
        first: dict[str, Owed] = {}
        for owed in sorted(self.owed[destination], key=lambda o: o.seq):
            if not owed.dead and owed.key not in first:
                first[owed.key] = owed
        return sorted(
            (o for k, o in first.items() if o.due <= now and k not in busy),
            key=lambda o: (o.priority, o.seq),
        )

    def find(self, destination: str, event_id: str) -> Owed:
        return next(o for o in self.owed[destination] if o.event_id == event_id)


events = st.builds(
    lambda n, key, dests, priority, payload: OutboxEvent(
        id=f"ev-{n}",
        type="production.confirmation",
        partition_key=key,
        payload=payload,
        destinations=dests,
        priority=priority,
    ),
    st.integers(0, 40),
    st.sampled_from(KEYS),
    st.sampled_from([("erp",), ("qms",), ("erp", "qms"), ()]),
    st.integers(0, 2),
    st.binary(min_size=2, max_size=40),
)
"""Payloads are arbitrary bytes (NUL, invalid UTF-8...): what comes back must be the same."""


class OutboxMachine(RuleBasedStateMachine):
    leased = Bundle("leased")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.directory = Path(tempfile.mkdtemp(prefix="outbox-model-"))
        self.held = self.open()
        self.outbox = self.held.outbox
        self.model = Model()
        self.now = 1_000_000.0
        self.in_flight: dict[tuple[str, str], Delivery] = {}
        self.state: dict[str, str] = {}
        self.abandoned: list[Outbox] = []
        self.crashes = 0

    def run(self, coroutine):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coroutine)

    def open(self) -> HeldOutbox:
        return HeldOutbox(self.loop, self.directory / "outbox.db", commit_interval=0.0005)

    def apply(self, batch: Sequence[OutboxEvent], state: dict[str, str]) -> int:
        """The model's commit: new ids get deliveries in order; returns how many were new."""
        inserted = 0
        for event in batch:
            if event.id in self.model.ids:
                continue
            self.model.ids.add(event.id)
            self.model.payloads[event.id] = event.payload
            inserted += 1
            self.model.next_seq += 1
            for destination in event.destinations:
                self.model.owed[destination].append(
                    Owed(self.model.next_seq, event.id, event.partition_key, event.priority)
                )
        self.state |= state
        return inserted

    @rule(
        batch=st.lists(events, max_size=6),
        state=st.dictionaries(
            st.sampled_from(["machine:a", "machine:b"]), st.text(max_size=5), max_size=2
        ),
    )
    def commit(self, batch: list[OutboxEvent], state: dict[str, str]) -> None:
        result = self.run(self.outbox.commit(batch, state))
        inserted = self.apply(batch, state)
        assert (result.inserted, result.duplicates) == (inserted, len(batch) - inserted)

    @rule(batches=st.lists(st.lists(events, min_size=1, max_size=4), min_size=2, max_size=6))
    def commit_concurrently(self, batches: list[list[OutboxEvent]]) -> None:
        """Several callers at once (drivers committing side by side): their work shares one
        transaction, and each gets its own result, as if they had come one after another in
        the order they queued."""
        before = self.outbox.stats.transactions

        async def together() -> list[CommitResult]:
            return await asyncio.gather(
                *(
                    self.outbox.commit(b, {f"caller:{i}": str(len(b))})
                    for i, b in enumerate(batches)
                )
            )

        results = self.run(together())
        for number, (batch, result) in enumerate(zip(batches, results, strict=True)):
            inserted = self.apply(batch, {f"caller:{number}": str(len(batch))})
            assert (result.inserted, result.duplicates) == (inserted, len(batch) - inserted)
        assert self.outbox.stats.transactions - before == 1, "the callers were not grouped"

    @rule(
        batches=st.lists(st.lists(events, min_size=1, max_size=4), min_size=1, max_size=6),
        pauses=st.lists(st.floats(0, 0.004), min_size=6, max_size=6),
    )
    def crash(self, batches: list[list[OutboxEvent]], pauses: list[float]) -> None:
        """Callers commit one after another, a pause after each (so some are written and
        returned, one may be in the writer's thread, some still queued); then the process
        dies: the outbox's block is never left, nothing queued is run any more."""
        self.crashes += 1
        outbox = self.outbox
        tasks = []

        async def callers() -> None:
            for number, (batch, pause) in enumerate(zip(batches, pauses, strict=False)):
                tasks.append(
                    self.loop.create_task(
                        outbox.commit(batch, {f"crash:{self.crashes}:{number}": "1"})
                    )
                )
                await asyncio.sleep(pause)

        self.run(callers())
        returned = [
            task.done() and not task.cancelled() and task.exception() is None for task in tasks
        ]
        _abandon(outbox, tasks, self.loop)
        self.held.forget()
        self.abandoned.append(outbox)
        self.held = self.open()
        self.outbox = self.held.outbox
        self.in_flight.clear()
        found = self.run(self.outbox.load_state())
        written = [f"crash:{self.crashes}:{i}" in found for i in range(len(batches))]
        # What returned is durable; what is there is a prefix of the queue, each batch whole.
        assert all(w for w, r in zip(written, returned, strict=True) if r), (written, returned)
        assert written == sorted(written, reverse=True), f"not a prefix of the queue: {written}"
        for number, batch in enumerate(batches):
            if written[number]:
                self.apply(batch, {f"crash:{self.crashes}:{number}": "1"})
        assert found == self.state
        for event_id, payload in self.model.payloads.items():
            self.check_payload(event_id, payload)

    def check_payload(self, event_id: str, payload: bytes) -> None:
        shown = self.run(self.outbox.show(event_id))
        if shown is not None and "payload" in shown:
            assert shown["payload"] == payload.decode(errors="replace"), event_id

    @rule(target=leased, destination=st.sampled_from(DESTINATIONS), limit=st.integers(1, 5))
    def lease(self, destination: str, limit: int):  # type: ignore[no-untyped-def]
        busy = {key for (d, key) in self.in_flight if d == destination}
        got = self.run(self.outbox.lease(destination, limit, busy_keys=busy, now=self.now))
        expected = self.model.heads(destination, self.now, busy)[:limit]
        assert [d.event_id for d in got] == [o.event_id for o in expected]
        assert [d.payload for d in got] == [self.model.payloads[o.event_id] for o in expected]
        assert [d.attempts for d in got] == [o.attempts for o in expected]
        for delivery in got:
            self.in_flight[(destination, delivery.partition_key)] = delivery
        return got[0] if got else None

    def _take(self, delivery: Delivery | None) -> Delivery | None:
        if delivery is None:
            return None
        slot = (delivery.destination, delivery.partition_key)
        if self.in_flight.get(slot) is not delivery:
            return None  # forgotten by a restart, or already settled
        del self.in_flight[slot]
        return delivery

    @rule(delivery=consumes(leased))
    def ack(self, delivery: Delivery | None) -> None:
        if (delivery := self._take(delivery)) is None:
            return
        self.run(self.outbox.ack(delivery, status=201, reference=f"R-{delivery.event_id}"))
        owed = self.model.find(delivery.destination, delivery.event_id)
        self.model.owed[delivery.destination].remove(owed)
        self.model.journal.append((delivery.destination, delivery.event_id))

    @rule(delivery=consumes(leased), delay=st.floats(0, 100))
    def retry(self, delivery: Delivery | None, delay: float) -> None:
        if (delivery := self._take(delivery)) is None:
            return
        self.run(self.outbox.retry(delivery, at=self.now + delay, status=503, error="down"))
        owed = self.model.find(delivery.destination, delivery.event_id)
        owed.attempts += 1
        owed.due = self.now + delay

    @rule(delivery=consumes(leased))
    def dead_letter(self, delivery: Delivery | None) -> None:
        if (delivery := self._take(delivery)) is None:
            return
        self.run(self.outbox.dead_letter(delivery, status=400, reason="HTTP 400: bad"))
        owed = self.model.find(delivery.destination, delivery.event_id)
        owed.attempts += 1
        owed.dead = True

    @rule(
        destination=st.sampled_from(DESTINATIONS),
        limit=st.integers(1, 6),
        per_key=st.integers(2, 4),
        delay=st.floats(0, 100),
        outcomes=st.lists(st.sampled_from(["delivered", "retry", "dead"]), min_size=6, max_size=6),
    )
    def lease_runs_and_settle(
        self, destination: str, limit: int, per_key: int, delay: float, outcomes: list[str]
    ) -> None:
        """Issue 17: a lease of runs (each due head and its key's next deliveries in commit
        order, for a target that takes them in order), settled at once in one transaction
        with mixed outcomes, as a batch request's answer is."""
        busy = {key for (d, key) in self.in_flight if d == destination}
        got = self.run(
            self.outbox.lease(destination, limit, busy_keys=busy, now=self.now, per_key=per_key)
        )
        expected: list[Owed] = []
        owed_in_order = sorted(self.model.owed[destination], key=lambda o: o.seq)
        for head in self.model.heads(destination, self.now, busy)[:limit]:
            room = min(per_key, limit - len(expected))
            if room <= 0:
                break
            expected += [
                o for o in owed_in_order if o.key == head.key and not o.dead and o.seq >= head.seq
            ][:room]
        assert [d.event_id for d in got] == [o.event_id for o in expected]
        assert [d.payload for d in got] == [self.model.payloads[o.event_id] for o in expected]
        assert [d.attempts for d in got] == [o.attempts for o in expected]
        settlements = [
            Settlement(
                d,
                outcome,
                201 if outcome == "delivered" else 503,  # type: ignore[arg-type]
                reference=f"R-{d.event_id}",
                retry_at=self.now + delay,
                reason="down",
            )
            for d, outcome in zip(got, outcomes, strict=False)
        ]
        self.run(self.outbox.settle(settlements))
        retrying: set[str] = set()
        for settled, owed in zip(settlements, expected, strict=False):
            if settled.outcome == "delivered":
                self.model.owed[destination].remove(owed)
                self.model.journal.append((destination, owed.event_id))
            elif settled.outcome == "dead":
                owed.attempts += 1
                owed.dead = True
            elif owed.key not in retrying:  # a key's later retries wait behind its first
                retrying.add(owed.key)
                owed.attempts += 1
                owed.due = self.now + delay

    @rule(seconds=st.floats(0, 60))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def restart(self) -> None:
        """An orderly stop and start forgets what was in flight; everything awaited is there."""
        self.held.close()
        self.held = self.open()
        self.outbox = self.held.outbox
        self.in_flight.clear()
        assert self.run(self.outbox.load_state()) == self.state

    @invariant()
    def counts_match(self) -> None:
        counts = self.run(self.outbox.counts())
        for destination in DESTINATIONS:
            owed = self.model.owed[destination]
            pending = [o for o in owed if not o.dead]
            dead = [o for o in owed if o.dead]
            got = counts.get(destination)
            if not owed:
                assert got is None
                continue
            assert got is not None
            assert (got.pending, got.dead) == (len(pending), len(dead))
            assert got.retrying == sum(1 for o in pending if o.attempts > 0)

    @invariant()
    def dead_letters_and_journal_match(self) -> None:
        dead = self.run(self.outbox.dead_letters())
        assert sorted((d["destination"], d["id"]) for d in dead) == sorted(
            (dest, o.event_id) for dest in DESTINATIONS for o in self.model.owed[dest] if o.dead
        )
        journal = self.run(self.outbox.journal())
        assert [(j["destination"], j["event_id"]) for j in journal] == self.model.journal

    def teardown(self) -> None:
        self.held.close()
        for outbox in self.abandoned:
            outbox._db.close()
            if outbox._reader_db is not None:
                outbox._reader_db.close()
        self.loop.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def _abandon(
    outbox: Outbox, callers: list[asyncio.Task[CommitResult]], loop: asyncio.AbstractEventLoop
) -> None:
    """What a killed process leaves: the writer stops where it is (a transaction already handed
    to its thread finishes or not at all, as SQLite guarantees), nothing queued runs, no caller
    hears back, and the connections are neither committed nor closed."""
    assert outbox._writer is not None and outbox._checker is not None
    for task in (outbox._writer, outbox._checker, *callers):
        task.cancel()
    loop.run_until_complete(
        asyncio.gather(outbox._writer, outbox._checker, *callers, return_exceptions=True)
    )
    outbox._executor.shutdown(wait=True)  # a transaction in the thread runs to its end
    if outbox._reader is not None:
        outbox._reader.shutdown(wait=True)
    outbox._closed = True


OutboxMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("PLANTSYNC_MODEL_EXAMPLES") or 60),
    stateful_step_count=40,
    deadline=None,
)
"""`make mutate` runs it with fewer examples (PLANTSYNC_MODEL_EXAMPLES): once per mutant."""
TestOutboxAgainstModel = OutboxMachine.TestCase
