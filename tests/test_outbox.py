"""The outbox against a real SQLite file: commit, dedupe, per-key order, retry, dead letters."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from buffer.outbox import Outbox, OutboxEvent
from buffer.schema import SCHEMA_VERSION


def event(n: int, key: str = "order-1", destinations: tuple[str, ...] = ("erp",),
          priority: int = 1) -> OutboxEvent:
    return OutboxEvent(id=f"ev-{n}", type="production.confirmation", partition_key=key,
                       payload=f'{{"n": {n}}}'.encode(), destinations=destinations,
                       priority=priority)


@pytest.fixture
async def outbox(tmp_path: Path):  # type: ignore[no-untyped-def]
    box = await Outbox.open(tmp_path / "outbox.db", commit_interval=0.001)
    yield box
    await box.close()


async def test_commit_is_durable_with_state_and_survives_reopen(tmp_path: Path) -> None:
    box = await Outbox.open(tmp_path / "outbox.db")
    result = await box.commit([event(1), event(2)], {"machine:m1": '{"total": 7}'})
    assert (result.inserted, result.duplicates) == (2, 0)
    await box.close()

    # Another connection sees it: the commit was on disk when `commit` returned.
    db = sqlite3.connect(tmp_path / "outbox.db")
    assert db.execute("SELECT COUNT(*) FROM events").fetchone() == (2,)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    db.close()

    box = await Outbox.open(tmp_path / "outbox.db")
    assert await box.load_state() == {"machine:m1": '{"total": 7}'}
    assert [d.event_id for d in await box.lease("erp", 10)] == ["ev-1"]
    await box.close()


async def test_second_insert_of_an_id_is_ignored_and_counted(outbox: Outbox) -> None:
    await outbox.commit([event(1)])
    result = await outbox.commit([event(1), event(2)])
    assert (result.inserted, result.duplicates) == (1, 1)
    assert outbox.stats.duplicates_ignored == 1
    counts = await outbox.counts()
    assert counts["erp"].pending == 2


async def test_lease_offers_only_the_head_of_each_key_in_commit_order(outbox: Outbox) -> None:
    await outbox.commit([event(1, "A"), event(2, "B"), event(3, "A"), event(4, "C")])
    leased = await outbox.lease("erp", 10)
    assert [d.event_id for d in leased] == ["ev-1", "ev-2", "ev-4"]
    # A key in flight is skipped entirely.
    leased = await outbox.lease("erp", 10, busy_keys={"A"})
    assert [d.event_id for d in leased] == ["ev-2", "ev-4"]
    await outbox.ack(leased[0], status=201, reference="ERP-1")
    head = await outbox.lease("erp", 10)
    assert [d.event_id for d in head] == ["ev-1", "ev-4"]


async def test_a_failing_head_blocks_only_its_own_key(outbox: Outbox) -> None:
    await outbox.commit([event(1, "A"), event(2, "A"), event(3, "B")])
    first = {d.event_id: d for d in await outbox.lease("erp", 10)}
    await outbox.retry(first["ev-1"], at=time.time() + 60, status=503, error="HTTP 503")
    leased = await outbox.lease("erp", 10)
    assert [d.event_id for d in leased] == ["ev-3"]  # ev-2 waits behind ev-1
    assert (await outbox.next_due("erp") or 0) <= time.time()  # B is due now
    await outbox.ack(leased[0], status=201)
    assert await outbox.lease("erp", 10) == []
    assert (await outbox.next_due("erp") or 0) > time.time() + 50
    # Once due, the retried head comes back with its attempt count.
    again = await outbox.lease("erp", 10, now=time.time() + 61)
    assert [(d.event_id, d.attempts) for d in again] == [("ev-1", 1)]


async def test_dead_letter_unblocks_the_key_and_stays_visible(outbox: Outbox) -> None:
    await outbox.commit([event(1, "A"), event(2, "A")])
    (head,) = await outbox.lease("erp", 10)
    await outbox.dead_letter(head, status=400, reason='HTTP 400: {"error": "bad unit"}')
    assert [d.event_id for d in await outbox.lease("erp", 10)] == ["ev-2"]
    (dead,) = await outbox.dead_letters()
    assert dead["id"] == "ev-1" and dead["last_status"] == 400
    assert "bad unit" in dead["last_error"]
    counts = (await outbox.counts())["erp"]
    assert (counts.pending, counts.dead) == (1, 1)


async def test_each_destination_is_tracked_on_its_own(outbox: Outbox) -> None:
    await outbox.commit([event(1, destinations=("erp", "qms"))])
    (to_erp,) = await outbox.lease("erp", 10)
    await outbox.ack(to_erp, status=201, reference="ERP-9")
    (to_qms,) = await outbox.lease("qms", 10)
    assert to_qms.event_id == "ev-1"  # delivered to ERP, still owed to QMS
    await outbox.ack(to_qms, status=200)
    journal = await outbox.journal()
    assert [(j["destination"], j["reference"]) for j in journal] == [("erp", "ERP-9"),
                                                                       ("qms", None)]
    assert await outbox.counts() == {}


async def test_priority_class_goes_first_in_a_backlog(outbox: Outbox) -> None:
    await outbox.commit([event(1, "A", priority=2), event(2, "B", priority=1),
                         event(3, "C", priority=0)])
    assert [d.event_id for d in await outbox.lease("erp", 2)] == ["ev-3", "ev-2"]


async def test_concurrent_commits_share_transactions(outbox: Outbox) -> None:
    import asyncio

    await asyncio.gather(*(outbox.commit([event(n, f"K{n % 7}")]) for n in range(200)))
    assert outbox.stats.committed == 200
    assert outbox.stats.transactions < 200  # group commit actually grouped
    assert (await outbox.counts())["erp"].pending == 200


async def test_a_newer_schema_refuses_to_open(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "outbox.db")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer than this gateway"):
        await Outbox.open(tmp_path / "outbox.db")
