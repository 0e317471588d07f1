"""The outbox checked against a simple in-memory model with random action sequences
(commit, lease, ack, retry, dead-letter, restart, time passing), on a real SQLite file.

The model is the specification: an event is held once per id; each destination owes each
routed event until it is acknowledged or dead-lettered; `lease` offers, per partition key, only
the oldest owed delivery, when it is due and its key is not in flight, most urgent priority
first, then commit order; everything that an `await` returned from survives a restart.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from buffer.outbox import Delivery, Outbox, OutboxEvent

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
    owed: dict[str, list[Owed]] = field(default_factory=lambda: {d: [] for d in DESTINATIONS})
    journal: list[tuple[str, str]] = field(default_factory=list)
    next_seq: int = 0

    def heads(self, destination: str, now: float, busy: set[str]) -> list[Owed]:
        first: dict[str, Owed] = {}
        for owed in sorted(self.owed[destination], key=lambda o: o.seq):
            if not owed.dead and owed.key not in first:
                first[owed.key] = owed
        return sorted((o for k, o in first.items() if o.due <= now and k not in busy),
                      key=lambda o: (o.priority, o.seq))

    def find(self, destination: str, event_id: str) -> Owed:
        return next(o for o in self.owed[destination] if o.event_id == event_id)


events = st.builds(
    lambda n, key, dests, priority: OutboxEvent(
        id=f"ev-{n}", type="production.confirmation", partition_key=key,
        payload=f'{{"n":{n}}}'.encode(), destinations=dests, priority=priority),
    st.integers(0, 40), st.sampled_from(KEYS),
    st.sampled_from([("erp",), ("qms",), ("erp", "qms"), ()]), st.integers(0, 2))


class OutboxMachine(RuleBasedStateMachine):
    leased = Bundle("leased")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.directory = Path(tempfile.mkdtemp(prefix="outbox-model-"))
        self.outbox = self.run(Outbox.open(self.directory / "outbox.db",
                                           commit_interval=0.0005))
        self.model = Model()
        self.now = 1_000_000.0
        self.in_flight: dict[tuple[str, str], Delivery] = {}

    def run(self, coroutine):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coroutine)

    @rule(batch=st.lists(events, max_size=6), state=st.dictionaries(
        st.sampled_from(["machine:a", "machine:b"]), st.text(max_size=5), max_size=2))
    def commit(self, batch: list[OutboxEvent], state: dict[str, str]) -> None:
        result = self.run(self.outbox.commit(batch, state))
        inserted = 0
        for event in batch:
            if event.id in self.model.ids:
                continue
            self.model.ids.add(event.id)
            inserted += 1
            self.model.next_seq += 1
            for destination in event.destinations:
                self.model.owed[destination].append(
                    Owed(self.model.next_seq, event.id, event.partition_key, event.priority))
        assert (result.inserted, result.duplicates) == (inserted, len(batch) - inserted)
        self.state = getattr(self, "state", {}) | state

    @rule(target=leased, destination=st.sampled_from(DESTINATIONS), limit=st.integers(1, 5))
    def lease(self, destination: str, limit: int):  # type: ignore[no-untyped-def]
        busy = {key for (d, key) in self.in_flight if d == destination}
        got = self.run(self.outbox.lease(destination, limit, busy_keys=busy, now=self.now))
        expected = self.model.heads(destination, self.now, busy)[:limit]
        assert [d.event_id for d in got] == [o.event_id for o in expected]
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

    @rule(seconds=st.floats(0, 60))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @precondition(lambda self: True)
    @rule()
    def restart(self) -> None:
        """A crash forgets what was in flight; everything awaited is still there."""
        self.run(self.outbox.close())
        self.outbox = self.run(Outbox.open(self.directory / "outbox.db",
                                           commit_interval=0.0005))
        self.in_flight.clear()
        assert self.run(self.outbox.load_state()) == getattr(self, "state", {})

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
            (dest, o.event_id) for dest in DESTINATIONS for o in self.model.owed[dest] if o.dead)
        journal = self.run(self.outbox.journal())
        assert [(j["destination"], j["event_id"]) for j in journal] == self.model.journal

    def teardown(self) -> None:
        self.run(self.outbox.close())
        self.loop.close()
        shutil.rmtree(self.directory, ignore_errors=True)


OutboxMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                           deadline=None)
TestOutboxAgainstModel = OutboxMachine.TestCase
