"""The outbox against a real SQLite file: commit, dedupe, per-key order, retry, dead letters."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import struct
import time
import weakref
from pathlib import Path
from typing import Any

import pytest

from buffer.outbox import Delivery, Outbox, OutboxEvent, Settlement
from buffer.outbox.records import DeliveryState
from buffer.outbox.schema import MIGRATIONS, SCHEMA_VERSION
from edge.ops.reconcile import delivery_states


def event(
    n: int, key: str = "order-1", destinations: tuple[str, ...] = ("erp",), priority: int = 1
) -> OutboxEvent:
    return OutboxEvent(
        id=f"ev-{n}",
        type="production.confirmation",
        partition_key=key,
        payload=f'{{"n": {n}}}'.encode(),
        destinations=destinations,
        priority=priority,
    )


@pytest.fixture
async def outbox(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with Outbox.open(tmp_path / "outbox.db", commit_interval=0.001) as box:
        yield box


async def test_commit_is_durable_with_state_and_survives_reopen(tmp_path: Path) -> None:
    async with Outbox.open(tmp_path / "outbox.db") as box:
        result = await box.commit([event(1), event(2)], {"machine:m1": '{"total": 7}'})
        assert (result.inserted, result.duplicates) == (2, 0)

        # Another connection sees it while the outbox is still open (no close() to flush anything):
        # the transaction was committed when `commit` returned, not later.
        db = sqlite3.connect(tmp_path / "outbox.db")
        assert db.execute("SELECT id, payload FROM events ORDER BY seq").fetchall() == [
            ("ev-1", b'{"n": 1}'),
            ("ev-2", b'{"n": 2}'),
        ]
        assert db.execute("SELECT value FROM rule_state WHERE key = 'machine:m1'").fetchone() == (
            '{"total": 7}',
        )
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        db.close()

    async with Outbox.open(tmp_path / "outbox.db") as box:
        assert await box.load_state() == {"machine:m1": '{"total": 7}'}
        assert [d.event_id for d in await box.lease("erp", 10)] == ["ev-1"]


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
    assert [(j["destination"], j["reference"]) for j in journal] == [
        ("erp", "ERP-9"),
        ("qms", None),
    ]
    assert await outbox.counts() == {}


async def test_priority_class_goes_first_in_a_backlog(outbox: Outbox) -> None:
    await outbox.commit(
        [event(1, "A", priority=2), event(2, "B", priority=1), event(3, "C", priority=0)]
    )
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
        async with Outbox.open(tmp_path / "outbox.db"):
            pass


def big(n: int, priority: int = 1, key: str = "order-1") -> OutboxEvent:
    return OutboxEvent(
        id=f"big-{n}",
        type="production.confirmation",
        partition_key=key,
        payload=b"x" * 4000,
        destinations=("erp",),
        priority=priority,
    )


async def test_disk_budget_refuses_informational_and_holds_business_until_room(
    tmp_path: Path,
) -> None:
    import asyncio

    async with Outbox.open(tmp_path / "outbox.db") as box:
        await box.commit([big(n, key=f"k{n % 50}") for n in range(1000)])
        full_size = box.used_bytes

    async with Outbox.open(tmp_path / "outbox.db", max_bytes=full_size - 1_000_000) as box:
        assert box.back_pressure is not None and "disk budget" in box.back_pressure
        informational = await box.commit([big(5000, priority=2)])
        assert (informational.inserted, informational.refused) == (0, 1)
        assert box.stats.refused_informational == 1
        business = asyncio.create_task(box.commit([big(6000)], {"machine:m": "{}"}))
        await asyncio.sleep(0.3)
        assert not business.done()  # back-pressure: the caller waits, nothing is dropped
        delivered = 0
        while not business.done() and delivered < 1000:
            for delivery in await box.lease("erp", 50):
                await box.ack(delivery, status=201)
                delivered += 1
            await asyncio.sleep(0)
        result = await asyncio.wait_for(business, 5)
        assert result.inserted == 1 and box.back_pressure is None
        assert await box.load_state() == {"machine:m": "{}"}


async def test_a_full_disk_pauses_commits_until_space_returns(tmp_path: Path) -> None:
    import asyncio

    async with Outbox.open(tmp_path / "outbox.db") as box:
        (pages,) = await box._read(lambda db: db.execute("PRAGMA page_count").fetchone())
        # SQLite's own page limit (of the writer connection) makes it answer SQLITE_FULL, as a
        # full disk does.
        await box._submit(lambda db: db.execute(f"PRAGMA max_page_count = {pages + 20}"), 1)
        filler = asyncio.create_task(box.commit([big(n) for n in range(200)]))
        await asyncio.sleep(1.5)
        assert not filler.done() and box.disk_full
        assert box.back_pressure is not None and "disk is full" in box.back_pressure
        box._db.execute("PRAGMA max_page_count = 1000000")  # the writer is stuck retrying
        result = await asyncio.wait_for(filler, 5)
        assert result.inserted == 200 and not box.disk_full and box.stats.disk_full_waits == 1


async def test_a_damaged_database_is_moved_aside_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"this is not a database" * 100)
    async with Outbox.open(path) as box:
        assert box.recovered_from is not None
        moved = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
        assert len(moved) == 1 and moved[0].read_bytes().startswith(b"this is not")
        assert (await box.commit([event(1)])).inserted == 1  # and it works


async def test_dead_letters_can_be_retried_and_purged(outbox: Outbox) -> None:
    await outbox.commit([event(1, "A"), event(2, "A"), event(3, "B")])
    for delivery in await outbox.lease("erp", 10):
        await outbox.dead_letter(delivery, status=422, reason="HTTP 422: unknown order")
    assert [d["id"] for d in await outbox.deliveries(state="dead")] == ["ev-1", "ev-3"]
    shown = await outbox.show("ev-1")
    assert shown is not None and shown["deliveries"][0]["state"] == "dead"
    assert await outbox.retry_dead("ev-1") == 1
    # Back in line ahead of ev-2: commit order per key holds.
    assert [d.event_id for d in await outbox.lease("erp", 10)] == ["ev-1"]
    assert await outbox.purge_dead() == 1
    assert await outbox.show("ev-3") is None
    counts = (await outbox.counts())["erp"]
    assert (counts.pending, counts.dead) == (2, 0)


async def test_journal_keeps_its_retention_and_ids_stay_known(outbox: Outbox) -> None:
    await outbox.commit([event(1)])
    (delivery,) = await outbox.lease("erp", 1)
    await outbox.ack(delivery, status=201, reference="ERP-1")
    assert (await outbox.commit([event(1)])).duplicates == 1  # delivered, still known
    assert await outbox.prune(retention=3600) == 0
    assert await outbox.prune(retention=3600, now=time.time() + 7200) == 1
    assert await outbox.journal() == []


async def test_damage_found_while_running_raises_the_alarm_and_moves_the_file_next_start(
    tmp_path: Path,
) -> None:
    import asyncio

    path = tmp_path / "outbox.db"
    async with Outbox.open(path) as box:
        await box.commit([big(n, key=f"k{n}") for n in range(300)])
    # Break a page in the middle of the file, leaving the header and schema readable.
    data = bytearray(path.read_bytes())
    middle = len(data) // 2 // 4096 * 4096
    data[middle : middle + 4096] = b"\xff" * 4096
    path.write_bytes(bytes(data))

    async with Outbox.open(path) as box:
        for _ in range(100):
            if box.integrity_problem:
                break
            await asyncio.sleep(0.05)
        assert box.integrity_problem  # the alarm, while the gateway keeps running
        assert box.recovered_from is None

    async with Outbox.open(path) as box:  # the next start moves it aside
        assert box.recovered_from is not None and "marked damaged" in box.recovered_from
        assert not Path(f"{path}.damaged").exists()


async def test_each_database_has_its_own_epoch_kept_for_its_life(tmp_path: Path) -> None:
    """Issue 12 item 1: the epoch is made with the database and kept in it; a database moved
    aside as damaged, or deleted, is replaced by one with a new epoch."""
    path = tmp_path / "outbox.db"
    async with Outbox.open(path) as box:
        first = box.epoch
        await box.commit([event(1)])
    assert re.fullmatch(r"[0-9a-f]{16}", first), first
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM outbox_meta WHERE key = 'epoch'").fetchone() == (first,)
    db.close()

    async with Outbox.open(path) as box:
        assert box.epoch == first  # a restart keeps it: ids derived again are the same ids

    path.write_bytes(b"garbage" * 1000)  # damaged: moved aside at open, a new database
    async with Outbox.open(path) as box:
        second = box.epoch
        assert box.recovered_from is not None and second != first

    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    async with Outbox.open(path) as box:
        assert box.epoch not in (first, second)


async def test_a_database_from_before_the_epoch_gets_one_and_keeps_its_events(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    db = sqlite3.connect(path, isolation_level=None)
    for statement in (s for migration in MIGRATIONS[:4] for s in migration):
        db.execute(statement)
    db.execute("PRAGMA user_version = 4")
    db.execute(
        "INSERT INTO events(id, type, partition_key, priority, payload, created_at)"
        " VALUES ('old-1', 'production.confirmation', 'k', 1, x'7b7d', 0)"
    )
    db.execute("INSERT INTO deliveries VALUES (1, 'erp', 'k', 1, 0, 0, 0, NULL, NULL, NULL)")
    db.close()
    async with Outbox.open(path) as box:
        assert re.fullmatch(r"[0-9a-f]{16}", box.epoch)
        assert [d.event_id for d in await box.lease("erp", 10)] == ["old-1"]


# -- what the technician reads: every field, exactly (these are the outbox's reports) -----------


async def test_show_lists_payload_deliveries_and_journal_exactly(outbox: Outbox) -> None:
    await outbox.commit([event(1, "K", destinations=("erp", "qms"), priority=0)])
    before = time.time()
    (to_erp,) = await outbox.lease("erp", 1)
    await outbox.ack(to_erp, status=201, reference="ERP-1")
    (to_qms,) = await outbox.lease("qms", 1)
    await outbox.dead_letter(to_qms, status=422, reason="x" * 3000)
    shown = await outbox.show("ev-1")
    assert shown is not None
    assert {k: shown[k] for k in ("id", "type", "partition_key", "priority", "payload")} == {
        "id": "ev-1",
        "type": "production.confirmation",
        "partition_key": "K",
        "priority": 0,
        "payload": '{"n": 1}',
    }
    assert shown["seq"] == 1 and shown["created_at"] <= before
    (delivery,) = shown["deliveries"]
    assert delivery["destination"] == "qms" and delivery["state"] == "dead"
    assert (delivery["attempts"], delivery["last_status"]) == (1, 422)
    assert delivery["last_error"] == "x" * 2000  # the reason is cut, not the row dropped
    assert delivery["dead_at"] >= before
    (journal,) = shown["journal"]
    assert {k: journal[k] for k in ("destination", "attempts", "status", "reference")} == {
        "destination": "erp",
        "attempts": 1,
        "status": 201,
        "reference": "ERP-1",
    }
    assert journal["delivered_at"] >= before
    assert await outbox.show("ev-404") is None
    # Delivered everywhere and forgotten: the journal still answers.
    await outbox.purge_dead("ev-1")
    gone = await outbox.show("ev-1")
    assert gone == {"id": "ev-1", "journal": shown["journal"], "deliveries": []}


async def test_deliveries_by_state_destination_and_limit(outbox: Outbox) -> None:
    await outbox.commit([event(1, "A"), event(2, "B"), event(3, "C", destinations=("qms",))])
    first, second = await outbox.lease("erp", 2)
    await outbox.retry(first, at=time.time() + 60, status=503, error="e" * 3000)
    await outbox.dead_letter(second, status=400, reason="bad")
    assert [d["id"] for d in await outbox.deliveries()] == ["ev-1", "ev-3"]
    assert [d["id"] for d in await outbox.deliveries(destination="erp")] == ["ev-1"]
    assert [d["id"] for d in await outbox.deliveries(limit=1)] == ["ev-1"]
    (retrying,) = await outbox.deliveries(state="retrying")
    assert (retrying["id"], retrying["attempts"], retrying["last_status"]) == ("ev-1", 1, 503)
    assert retrying["last_error"] == "e" * 2000 and retrying["next_attempt_at"] > time.time()
    (dead,) = await outbox.deliveries(state="dead")
    assert (dead["id"], dead["destination"], dead["last_error"]) == ("ev-2", "erp", "bad")
    (listed,) = await outbox.dead_letters()
    assert (
        listed["id"],
        listed["type"],
        listed["partition_key"],
        listed["attempts"],
        listed["last_status"],
        listed["last_error"],
    ) == ("ev-2", "production.confirmation", "B", 1, 400, "bad")
    assert outbox.stats.dead_lettered == 1 and outbox.stats.retries == 1


async def test_dead_letters_are_retried_and_purged_by_event_and_by_destination(
    outbox: Outbox,
) -> None:
    await outbox.commit([event(1, "A", destinations=("erp", "qms")), event(2, "B")])
    for destination in ("erp", "qms"):
        for delivery in await outbox.lease(destination, 10):
            await outbox.dead_letter(delivery, status=400, reason="no")
    assert await outbox.retry_dead("ev-1", "qms") == 1  # only that one
    assert sorted((d["id"], d["destination"]) for d in await outbox.dead_letters()) == [
        ("ev-1", "erp"),
        ("ev-2", "erp"),
    ]
    assert await outbox.retry_dead(None, "erp") == 2
    assert await outbox.dead_letters() == [] and outbox.stats.dead_retried == 3
    assert (await outbox.counts())["erp"].pending == 2
    for destination in ("erp", "qms"):
        for delivery in await outbox.lease(destination, 10):
            await outbox.dead_letter(delivery, status=400, reason="no")
    assert await outbox.purge_dead("ev-404") == 0
    assert await outbox.purge_dead("ev-1", "erp") == 1
    assert sorted((d["id"], d["destination"]) for d in await outbox.dead_letters()) == [
        ("ev-1", "qms"),
        ("ev-2", "erp"),
    ]
    assert await outbox.purge_dead(None, "qms") == 1
    assert (await outbox.show("ev-1")) is None  # no delivery left: the event is gone
    counts = await outbox.counts()
    assert (counts["erp"].pending, counts["erp"].dead) == (0, 1) and "qms" not in counts


async def test_lot_status_kept_and_a_produced_lot_never_overrides_a_decision(
    outbox: Outbox,
) -> None:
    from buffer.outbox import LotStatus

    assert await outbox.lot_status("L-1") is None
    await outbox.commit(
        [], lots=[LotStatus("L-1", "hold", 10.0, "produced", "O-1", "FG", decided=False)]
    )
    assert await outbox.lot_status("L-1") == LotStatus("L-1", "hold", 10.0, "produced", "O-1", "FG")
    await outbox.commit([], lots=[LotStatus("L-1", "release", 20.0, "qms")])
    # A decision without order or material keeps what was known of them.
    assert await outbox.lot_status("L-1") == LotStatus("L-1", "release", 20.0, "qms", "O-1", "FG")
    await outbox.commit([], lots=[LotStatus("L-1", "hold", 30.0, "produced", decided=False)])
    assert (await outbox.lot_status("L-1")) == LotStatus("L-1", "release", 20.0, "qms", "O-1", "FG")


async def test_input_dead_letters_kept_replaced_and_resolved(outbox: Outbox) -> None:
    from buffer.outbox import REJECTED_PAYLOAD_LIMIT, RejectedInput

    huge = b"{" + b"x" * (REJECTED_PAYLOAD_LIMIT + 10)
    await outbox.commit(
        [],
        rejected=[
            RejectedInput(
                "mes", "mes/1010/p/consumption", b'{"uom": "ZCS"}', "unit ZCS", 100.0, "m-1"
            ),
            RejectedInput("mes", "mes/t\udcff", huge, "too big", 200.0),
        ],
    )
    newest, oldest = await outbox.rejected_inputs()
    assert (
        oldest["id"],
        oldest["source"],
        oldest["topic"],
        oldest["message_id"],
        oldest["payload"],
        oldest["reason"],
        oldest["received_at"],
    ) == (1, "mes", "mes/1010/p/consumption", "m-1", '{"uom": "ZCS"}', "unit ZCS", 100.0)
    assert newest["topic"] == "mes/t\\udcff"  # a lone surrogate is kept escaped
    assert len(newest["payload"]) == REJECTED_PAYLOAD_LIMIT and newest["message_id"] is None
    assert [r["id"] for r in await outbox.rejected_inputs(since=150.0)] == [2]
    assert [r["id"] for r in await outbox.rejected_inputs(limit=1)] == [2]
    assert outbox.stats.rejected_inputs == 2

    kept = await outbox.rejected_input(1)
    assert kept == RejectedInput(
        "mes", "mes/1010/p/consumption", b'{"uom": "ZCS"}', "unit ZCS", 100.0, "m-1", replaces=1
    )
    assert await outbox.rejected_input(99) is None
    # Rejected again: the same row, the new reason; no second row.
    await outbox.commit(
        [],
        rejected=[
            RejectedInput(
                kept.source,
                kept.topic,
                kept.payload,
                "still ZCS",
                kept.received_at,
                "m-1",
                replaces=1,
            )
        ],
    )
    assert [(r["id"], r["reason"]) for r in await outbox.rejected_inputs()] == [
        (2, "too big (payload of 16395 bytes; its first 16384 kept)"),
        (1, "still ZCS"),
    ]
    # Accepted: its events and its removal in one commit.
    result = await outbox.commit([event(7)], resolved_inputs=[1])
    assert result.inserted == 1
    assert [r["id"] for r in await outbox.rejected_inputs()] == [2]
    assert await outbox.prune(retention=60, now=259.0) == 0
    assert [r["id"] for r in await outbox.rejected_inputs()] == [2]  # 200 >= 259 - 60
    assert await outbox.prune(retention=60, now=261.0) == 0
    assert await outbox.rejected_inputs() == []


async def test_prune_forgets_old_ids_but_never_one_still_held(outbox: Outbox) -> None:
    await outbox.commit([event(1), event(2, "B")])
    (first, _) = await outbox.lease("erp", 2)
    await outbox.ack(first, status=201)
    later = time.time() + 7200
    assert await outbox.prune(retention=3600, now=later) == 1  # one journal row
    # ev-1 was delivered and is forgotten; ev-2 is still owed, so still a duplicate.
    assert (await outbox.commit([event(1)])).inserted == 1
    assert (await outbox.commit([event(2, "B")])).duplicates == 1
    assert await outbox.load_state() == {}


def wal_commits(path: Path) -> int:
    """Transactions committed to the WAL file since it was last reset, read from the file
    itself (the SQLite WAL format: a 32-byte header, then frames of a 24-byte header and a
    page; a commit frame has a non-zero database size, and frames of the current generation
    carry the header's salts)."""
    data = (path.parent / (path.name + "-wal")).read_bytes()
    page_size = int.from_bytes(data[8:12], "big")
    salts = data[16:24]
    commits = 0
    for offset in range(32, len(data) - 24 - page_size + 1, 24 + page_size):
        header = data[offset : offset + 24]
        if header[8:16] != salts:
            break
        commits += int.from_bytes(header[4:8], "big") != 0
    return commits


async def test_a_settle_with_others_to_follow_waits_for_them_and_a_commit_ends_the_wait(
    tmp_path: Path,
) -> None:
    """`others_follow` (a forwarder with requests in flight and more ready) lets a settle's
    transaction wait up to `settle_wait` for the next ones; work that expects nothing more
    (a commit, a settle without it) ends the wait at once. The oracle is the WAL file."""
    path = tmp_path / "outbox.db"
    async with Outbox.open(path, settle_wait=0.6) as box:
        await box.commit([event(n, key=f"k{n}") for n in range(1, 6)])
        leased = await box.lease("erp", 5)
        assert len(leased) == 5
        done = [Settlement(d, "delivered", 201) for d in leased]

        before, started = wal_commits(path), time.monotonic()
        first = asyncio.create_task(box.settle([done[0]], others_follow=True))
        await asyncio.sleep(0.2)
        await box.settle([done[1]], others_follow=True)  # joins the waiting transaction
        await first
        assert wal_commits(path) == before + 1
        assert time.monotonic() - started >= 0.55  # the second one waited on too

        before, started = wal_commits(path), time.monotonic()
        waiting = asyncio.create_task(box.settle([done[2]], others_follow=True))
        await asyncio.sleep(0.1)
        await box.commit([event(9, key="k9")])  # a commit waits for nobody: it ends the wait
        await waiting
        assert wal_commits(path) == before + 1
        assert time.monotonic() - started < 0.45

        before, started = wal_commits(path), time.monotonic()
        await box.settle([done[3]])  # nothing to follow: at once
        assert (wal_commits(path), time.monotonic() - started < 0.45) == (before + 1, True)
        assert {d.event_id for d in await box.lease("erp", 5)} == {"ev-5", "ev-9"}

        started = time.monotonic()  # a commit taken first does not wait for a settle after it
        await asyncio.gather(
            box.commit([event(10, key="k10")]), box.settle([done[4]], others_follow=True)
        )
        assert time.monotonic() - started < 0.45


def owed_as_read(path: Path, destination: str) -> dict[int, tuple[object, ...]]:
    """What the file says each pending delivery of `destination` is (seq -> id, type, key,
    payload, attempts), read with SQL of the test's own."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute(
            "SELECT d.event_seq, e.id, e.type, d.partition_key, e.payload, d.attempts"
            " FROM deliveries d JOIN events e ON e.seq = d.event_seq"
            " WHERE d.destination = ? AND d.state = 0",
            (destination,),
        ).fetchall()
    finally:
        db.close()
    return {row[0]: row[1:] for row in rows}


async def test_a_lease_from_memory_is_what_the_file_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 17 item 1: heads this process committed are leased from memory, without a read;
    each must be exactly the row on disk, also after a retry changed its attempts, and past
    the memory budget (read instead)."""
    import buffer.outbox.store as store

    path = tmp_path / "outbox.db"

    def as_leased(delivery: Delivery) -> tuple[object, ...]:
        return (
            delivery.event_id,
            delivery.event_type,
            delivery.partition_key,
            delivery.payload,
            delivery.attempts,
        )

    async with Outbox.open(path) as box:
        await box.commit([event(n, key=f"k{n % 3}", destinations=("erp", "qms")) for n in range(6)])
        first = await box.lease("erp", 10)
        assert [d.event_id for d in first] == ["ev-0", "ev-1", "ev-2"]
        assert box.stats.leased_from_memory == 3
        assert {d.seq: as_leased(d) for d in first}.items() <= owed_as_read(path, "erp").items()

        retried, delivered = first[0], first[1]
        await box.settle(
            [
                Settlement(retried, "retry", 503, retry_at=0.0, reason="busy"),
                Settlement(delivered, "delivered", 201),
                Settlement(first[2], "dead", 422, reason="rejected"),
            ]
        )
        again = await box.lease("erp", 10)
        on_disk = owed_as_read(path, "erp")
        assert [d.event_id for d in again] == ["ev-0", "ev-4", "ev-5"]
        assert {d.seq: as_leased(d) for d in again}.items() <= on_disk.items()
        assert again[0].attempts == 1  # read (its row changed), and so the others with it
        assert box.stats.leased_from_memory == 3
        qms = await box.lease("qms", 10)  # the other destination's own, untouched
        assert [(d.event_id, d.destination) for d in qms] == [
            ("ev-0", "qms"),
            ("ev-1", "qms"),
            ("ev-2", "qms"),
        ]

    monkeypatch.setattr(store, "RECENT_BYTES", 1)  # room for one payload, then reads
    async with Outbox.open(tmp_path / "small.db") as box:
        await box.commit([event(n, key=f"k{n}") for n in range(4)])
        leased = await box.lease("erp", 10)
        assert box.stats.leased_from_memory == 0  # k0 was kept, k1 to k3 not: read
        assert [d.event_id for d in leased] == ["ev-0", "ev-1", "ev-2", "ev-3"]
        assert {d.seq: as_leased(d) for d in leased} == owed_as_read(tmp_path / "small.db", "erp")


async def test_a_run_of_one_key_from_memory_is_what_the_file_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs (`per_key` above 1, a canonical batch) are leased from memory only when memory
    holds the key's owed deliveries from its head on, without a gap: after a retry of a run,
    after a restart, and when the budget left one out in the middle, they are read. The
    oracle: the rows read from the file with the test's own SQL, in commit order."""
    import buffer.outbox.store as store

    path = tmp_path / "outbox.db"

    def owed_run(key: str, room: int) -> list[str]:
        db = sqlite3.connect(path)
        try:
            return [
                row[0]
                for row in db.execute(
                    "SELECT e.id FROM deliveries d JOIN events e ON e.seq = d.event_seq"
                    " WHERE d.destination = 'erp' AND d.state = 0 AND d.partition_key = ?"
                    " ORDER BY d.event_seq LIMIT ?",
                    (key, room),
                )
            ]
        finally:
            db.close()

    async with Outbox.open(path) as box:
        await box.commit([event(n, key="run" if n % 3 else "other") for n in range(12)])
        run = await box.lease("erp", 5, per_key=5)  # "other" is head (ev-0) first, then "run"
        assert [d.event_id for d in run] == owed_run("other", 4) + owed_run("run", 1)
        assert box.stats.leased_from_memory == 5
        await box.settle([Settlement(d, "retry", 503, retry_at=0.0, reason="busy") for d in run])
        again = await box.lease("erp", 5, per_key=5)
        assert box.stats.leased_from_memory == 5  # their heads' rows changed: read
        assert [d.event_id for d in again] == owed_run("other", 4) + owed_run("run", 1)
        assert again[0].attempts == 1
        await box.settle([Settlement(d, "delivered", 201) for d in again])
        rest = await box.lease("erp", 20, per_key=20)  # what was behind them: memory again
        assert box.stats.leased_from_memory == 5 + len(rest)
        assert [d.event_id for d in rest] == owed_run("run", 20)
        assert len(rest) == 7

    async with Outbox.open(path) as box:  # a restart: what was owed is read
        assert [d.event_id for d in await box.lease("erp", 20, per_key=20)] == owed_run("run", 20)
        assert box.stats.leased_from_memory == 0

    monkeypatch.setattr(store, "RECENT_BYTES", 700)  # room for three entries (300 + 9 bytes)
    path = tmp_path / "budget.db"
    async with Outbox.open(path) as box:
        await box.commit([event(n, key="k") for n in range(10, 16)])
        first = await box.lease("erp", 20, per_key=20)
        assert box.stats.leased_from_memory == 0  # three were kept: the rest would be a gap
        assert [d.event_id for d in first] == owed_run("k", 20)
        await box.settle([Settlement(d, "delivered", 201) for d in first[:3]])
        await box.commit([event(n, key="k") for n in range(16, 18)])  # room again, but
        later = await box.lease("erp", 20, per_key=20)  # ev-13..15 were never kept
        assert [d.event_id for d in later] == owed_run("k", 20)
        assert [d.event_id for d in later] == ["ev-13", "ev-14", "ev-15", "ev-16", "ev-17"]
        assert box.stats.leased_from_memory == 0


async def test_a_cancelled_commit_or_settle_still_moves_what_leases_see(tmp_path: Path) -> None:
    """A caller cancelled after its work was queued (a reload cancels late deliveries and the
    exception channels; the outbox stays open) does not stop the transaction: what leases
    see must follow the file anyway. Before, a cancelled settle left memory pointing at a
    deleted row (sent and journalled twice), a cancelled retry kept attempts 0, and a
    cancelled commit left a hole in a key's run (its next event sent first). Oracle: the
    rows read from the file with the test's own SQL. Found by the review of this stop."""

    async def cancelled(work: Any) -> None:
        task = asyncio.ensure_future(work)
        await asyncio.sleep(0)  # queued for the writer
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    def as_read(path: Path) -> list[tuple[object, ...]]:
        owed = owed_as_read(path, "erp")
        return [(owed[seq][0], owed[seq][4]) for seq in sorted(owed)]

    path = tmp_path / "delivered.db"
    async with Outbox.open(path) as box:
        await box.commit([event(1, key="K")])
        [leased] = await box.lease("erp", 10)
        await cancelled(box.settle([Settlement(leased, "delivered", 201)]))
        await box.commit([event(99, key="other")])  # the writer has run the settle
        assert await box.lease("erp", 10, busy_keys={"other"}) == []
        assert as_read(path) == [("ev-99", 0)]
        assert (await box.counts())["erp"].pending == 1

    path = tmp_path / "retried.db"
    async with Outbox.open(path) as box:
        await box.commit([event(1, key="K")])
        [leased] = await box.lease("erp", 10)
        retry = Settlement(leased, "retry", 503, retry_at=time.time() + 3600, reason="busy")
        await cancelled(box.settle([retry]))
        await box.commit([event(99, key="other")])
        assert await box.lease("erp", 10, busy_keys={"other"}) == []  # not due for an hour
        later = await box.lease("erp", 10, busy_keys={"other"}, now=time.time() + 7200)
        assert [(d.event_id, d.attempts) for d in later] == [("ev-1", 1)]
        assert as_read(path) == [("ev-1", 1), ("ev-99", 0)]

    path = tmp_path / "committed.db"
    async with Outbox.open(path) as box:
        await box.commit([event(1, key="K")])
        await cancelled(box.commit([event(2, key="K")]))
        await box.commit([event(3, key="K")])
        run = await box.lease("erp", 10, per_key=3)
        assert [(d.event_id, d.attempts) for d in run] == as_read(path)
        assert [d.event_id for d in run] == ["ev-1", "ev-2", "ev-3"]


async def test_a_destination_a_reload_removed_frees_its_lease_memory(tmp_path: Path) -> None:
    """After a reload the daemon says which destinations it delivers to
    (`keep_lease_memory_for`); the memory of the others goes (none of it would be settled
    again). Should one come back, its leases are read, and equal the file's rows."""
    path = tmp_path / "outbox.db"
    async with Outbox.open(path) as box:
        await box.commit([event(n, key=f"k{n}", destinations=("erp", "qms")) for n in range(4)])
        both = box._recent.bytes
        box.keep_lease_memory_for(["erp"])
        assert 0 < box._recent.bytes < both
        assert len(await box.lease("erp", 10)) == 4
        assert box.stats.leased_from_memory == 4
        qms = await box.lease("qms", 10)  # came back: read
        assert box.stats.leased_from_memory == 4
        owed = owed_as_read(path, "qms")
        assert [(d.event_id, d.attempts) for d in qms] == [
            (owed[seq][0], owed[seq][4]) for seq in sorted(owed)
        ]
        box.keep_lease_memory_for([])
        assert box._recent.bytes == 0


async def test_the_wake_up_of_a_forwarder_a_reload_replaced_goes_with_it(tmp_path: Path) -> None:
    """Each forwarder waits on an event the outbox sets after every commit that adds
    deliveries. The outbox held them all for its life: every reload added one per destination,
    and every commit set them all. The oracle: a weak reference to a dropped forwarder's event."""
    async with Outbox.open(tmp_path / "outbox.db") as box:
        kept, dropped = box.listener(), box.listener()
        gone = weakref.ref(dropped)
        del dropped
        assert gone() is None
        await box.commit([event(1)])
        assert kept.is_set()


# -- the payloads of delivered events go in bulk, after their settle (schema 8) -----------------


def file_rows(path: Path, sql: str) -> list[Any]:
    """What the file itself holds, read on a connection of the test's own."""
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


async def test_a_delivered_payload_is_gone_from_the_file_once_the_outbox_closes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    async with Outbox.open(path) as box:
        await box.commit([event(n, key=f"k{n % 3}") for n in range(10)])
        for delivery in await box.lease("erp", 10):
            await box.ack(delivery, status=201)
        for delivery in await box.lease("erp", 10):
            await box.ack(delivery, status=201)
        # ev-6 to ev-9 are left owed (k0 holds four of the ten).
    ids = {row[0] for row in file_rows(path, "SELECT id FROM events")}
    journal = {row[0] for row in file_rows(path, "SELECT event_id FROM journal")}
    assert len(journal) == 6 and ids.isdisjoint(journal)
    assert ids == {"ev-6", "ev-7", "ev-8", "ev-9"}
    assert file_rows(path, "SELECT count(*) FROM purge_queue") == [(0,)]


async def test_an_idle_outbox_purges_a_trickle_within_seconds(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with Outbox.open(path) as box:
        await box.commit([event(1), event(2)])
        (first,) = await box.lease("erp", 10)
        await box.ack(first, status=201)
        deadline = time.monotonic() + 5
        while file_rows(path, "SELECT id FROM events") != [("ev-2",)]:
            assert time.monotonic() < deadline, "the delivered payload was never purged"
            await asyncio.sleep(0.05)
        assert box.stats.payloads_purged == 1


async def test_purge_deletes_every_queued_payload_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from buffer.outbox import store

    monkeypatch.setattr(store, "PURGE_AGE", 60.0)  # the writer would not purge three by itself
    monkeypatch.setattr(store, "PURGE_CHUNK", 2)  # three take two transactions
    path = tmp_path / "outbox.db"
    async with Outbox.open(path) as box:
        await box.commit([event(n, key=f"k{n}") for n in range(5)])
        for delivery in (await box.lease("erp", 10))[:3]:
            await box.ack(delivery, status=201)
        assert len(file_rows(path, "SELECT id FROM events")) == 5  # queued, not yet deleted
        assert await box.purge() == 3
        assert sorted(file_rows(path, "SELECT id FROM events")) == [("ev-3",), ("ev-4",)]
        assert await box.purge() == 0


async def test_a_payload_another_destination_owes_survives_the_purge(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    both = ("erp", "qms")
    async with Outbox.open(path) as box:
        await box.commit([event(1, "A", destinations=both), event(2, "B", destinations=both)])
        for delivery in await box.lease("erp", 10):
            await box.ack(delivery, status=201)
        assert await box.purge() == 0  # both leave the queue; neither payload may go
        assert box.stats.payloads_purged == 0
        await box.prune(retention=3600)  # purges everything queued, in its transaction
    assert file_rows(path, "SELECT count(*) FROM purge_queue") == [(0,)]
    async with Outbox.open(path) as box:  # leases read the file: nothing in memory
        owed = await box.lease("qms", 10)
        assert [(d.event_id, d.payload) for d in owed] == [
            ("ev-1", b'{"n": 1}'),
            ("ev-2", b'{"n": 2}'),
        ]
        for delivery in owed:
            await box.ack(delivery, status=201)
    assert file_rows(path, "SELECT count(*) FROM events") == [(0,)]


async def test_a_crash_before_the_purge_leaves_it_queued_for_the_next_run(
    tmp_path: Path,
) -> None:
    path, image = tmp_path / "outbox.db", tmp_path / "image"
    image.mkdir()
    async with Outbox.open(path) as box:
        await box.commit([event(n) for n in range(1, 4)])
        (head,) = await box.lease("erp", 10)
        await box.ack(head, status=201)
        # What a power cut leaves: the files as they are the moment the ack returned.
        for suffix in ("", "-wal"):
            Path(f"{image / 'outbox.db'}{suffix}").write_bytes(Path(f"{path}{suffix}").read_bytes())
    crashed = image / "outbox.db"
    assert file_rows(crashed, "SELECT seq FROM purge_queue") == [(1,)]
    assert file_rows(crashed, "SELECT count(*) FROM events") == [(3,)]
    async with Outbox.open(crashed) as box:
        assert [d.event_id for d in await box.lease("erp", 10)] == ["ev-2"]
        assert (await box.commit([event(1)])).inserted == 0  # delivered: still a duplicate
    assert sorted(file_rows(crashed, "SELECT id FROM events")) == [("ev-2",), ("ev-3",)]
    assert file_rows(crashed, "SELECT count(*) FROM purge_queue") == [(0,)]


async def test_at_its_disk_budget_the_outbox_purges_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from buffer.outbox import store

    monkeypatch.setattr(store, "PURGE_AGE", 60.0)  # a trickle alone would wait a minute
    path = tmp_path / "outbox.db"
    async with Outbox.open(path) as box:
        await box.commit([big(n, key=f"k{n}") for n in range(20)])
    async with Outbox.open(path, max_bytes=1) as box:
        assert box.back_pressure is not None
        (first, *_) = await box.lease("erp", 1)
        await box.ack(first, status=201)
        deadline = time.monotonic() + 10
        while (first.event_id,) in file_rows(path, "SELECT id FROM events"):
            assert time.monotonic() < deadline, "the payload waited at the disk budget"
            await asyncio.sleep(0.05)


async def test_a_busy_writer_purges_inside_the_transactions_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past PURGE_BUSY queued, each transaction carries PURGE_RIDE deletes; the writer is
    never idle here (no idle purge: PURGE_IDLE and PURGE_AGE out of reach)."""
    from buffer.outbox import store

    for name, value in (("PURGE_BUSY", 4), ("PURGE_RIDE", 2), ("PURGE_IDLE", 10**9)):
        monkeypatch.setattr(store, name, value)
    monkeypatch.setattr(store, "PURGE_AGE", 60.0)
    path = tmp_path / "outbox.db"
    async with Outbox.open(path) as box:
        await box.commit([event(n, key=f"k{n}") for n in range(1, 7)])
        transactions = box.stats.transactions
        for delivery in await box.lease("erp", 10):
            await box.ack(delivery, status=201)
        # By hand: acks 1-4 queue four; ack 5's transaction deletes ev-1 and ev-2 (two left,
        # three once ack 5 is counted); ack 6 makes four; the commit's transaction deletes
        # ev-3 and ev-4.
        await box.commit([event(7, key="k7")])
        assert box.stats.transactions == transactions + 7  # no transaction of a purge's own
        assert box.stats.payloads_purged == 4
        left = sorted(row[0] for row in file_rows(path, "SELECT id FROM events"))
        assert left == ["ev-5", "ev-6", "ev-7"]


async def test_a_purge_that_fails_never_fails_the_work_it_rides_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trigger the payload DELETE cannot run (a stand-in for a damaged index of `events`)
    makes every purge fail: the acks and commits in the same transactions still commit, and
    once it is gone the payloads go."""
    from buffer.outbox import store

    for name, value in (("PURGE_BUSY", 2), ("PURGE_RIDE", 2), ("PURGE_AGE", 0.05)):
        monkeypatch.setattr(store, name, value)
    path = tmp_path / "outbox.db"
    async with Outbox.open(path) as box:
        await box.commit([event(0)])
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TRIGGER broken BEFORE DELETE ON events BEGIN INSERT INTO nope VALUES (1); END"
    )
    db.commit()
    async with Outbox.open(path) as box:
        await box.commit([event(n, key=f"k{n}") for n in range(1, 6)])
        for delivery in await box.lease("erp", 10):
            await box.ack(delivery, status=201)  # purges ride from the third on, and fail
        for n in range(10, 20):
            await box.commit([event(n, key="z")])
        assert (await box.counts())["erp"].pending == 10  # ev-10 to ev-19: all committed
        assert box.stats.payloads_purged == 0
        db.execute("DROP TRIGGER broken")
        db.commit()
        deadline = time.monotonic() + 10
        more = 100
        while box.stats.payloads_purged < 6:  # the six delivered: ev-0 to ev-5
            assert time.monotonic() < deadline, "the purge never resumed"
            await box.commit([event(more, key="y")])
            more += 1
            await asyncio.sleep(0.1)
    db.close()
    assert file_rows(path, "SELECT count(*) FROM journal") == [(6,)]
    delivered = {f"ev-{n}" for n in range(6)}
    assert delivered.isdisjoint(row[0] for row in file_rows(path, "SELECT id FROM events"))


async def test_a_purged_payload_is_gone_from_the_file_itself(tmp_path: Path) -> None:
    """The README's promise for personal data: once delivered everywhere and purged, a
    payload is nowhere in the database file, freed pages included (`secure_delete = ON` on
    the writer, whatever the build's default; FAST left 1,071 of 2,000 readable). The oracle
    is the file's bytes after the close's checkpoint."""
    path = tmp_path / "outbox.db"
    both = ("erp", "qms")
    async with Outbox.open(path) as box:
        await box.commit(
            [
                OutboxEvent(
                    id=f"p-{n}",
                    type="production.confirmation",
                    partition_key=f"k{n % 7}",
                    payload=json.dumps(
                        {"operator": f"Badge-{n:04d}-Jane Doe", "pad": "x" * 300}
                    ).encode(),
                    destinations=both,
                )
                for n in range(400)
            ]
        )
        for destination in both:
            while leased := await box.lease(destination, 100, per_key=100):
                await box.settle([Settlement(d, "delivered", 201) for d in leased])
        assert await box.purge() == 400
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    assert b"Jane Doe" not in path.read_bytes()


def wal_pages(path: Path) -> list[int]:
    """The page number of every frame in the -wal file, read from the file (SQLite's WAL
    format: a 32-byte header, then frames of a 24-byte header, the page number first, and
    a page)."""
    wal = Path(f"{path}-wal").read_bytes()
    if len(wal) < 32:
        return []
    (page_size,) = struct.unpack(">I", wal[8:12])
    return [
        struct.unpack(">I", wal[offset : offset + 4])[0]
        for offset in range(32, len(wal) - 24 - page_size + 1, 24 + page_size)
    ]


async def test_a_settle_of_one_keys_run_writes_a_page_or_two_of_deliveries(
    tmp_path: Path,
) -> None:
    """Fifty keys' events interleave at commit; a settle of one key's run (a batched
    request) must not write a page of the deliveries table per event (schema 9)."""
    path = tmp_path / "outbox.db"
    async with Outbox.open(path) as box:
        await box.commit([event(n, key=f"k{n % 50:02d}") for n in range(2000)])
        run = await box.lease("erp", 40, per_key=40)
        assert {d.partition_key for d in run} == {"k00"} and len(run) == 40
        loop = asyncio.get_running_loop()
        busy, _, _ = await loop.run_in_executor(
            box._executor,
            lambda: box._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone(),
        )
        assert busy == 0 and wal_pages(path) == []
        await box.settle([Settlement(d, "delivered", 201) for d in run])
        written = wal_pages(path)
        table = {
            row[0] for row in file_rows(path, "SELECT pageno FROM dbstat WHERE name = 'deliveries'")
        }
    assert len(table) >= 10  # 1,960 rows left: the run's 40 could have touched every page
    assert len(table.intersection(written)) <= 3


async def test_a_schema_8_database_keeps_every_delivery_as_it_was(tmp_path: Path) -> None:
    """Migration 9 re-keys the deliveries by (destination, partition_key, event_seq): every
    row, owed, retrying or dead, keeps each field, and the keys' order holds."""
    path = tmp_path / "outbox.db"
    db = sqlite3.connect(path, isolation_level=None)
    for statement in (s for migration in MIGRATIONS[:8] for s in migration):
        db.execute(statement)
    db.execute("PRAGMA user_version = 8")
    for n, key in enumerate(["B", "A", "B", "A", "C"], start=1):
        db.execute(
            "INSERT INTO events(id, type, partition_key, priority, payload, created_at)"
            f" VALUES ('old-{n}', 'production.confirmation', '{key}', 1, x'7b7d', 0)"
        )
    rows = [
        (1, "erp", "B", 1, 0, 0, 0.0, None, None, None),
        (2, "erp", "A", 1, 0, 2, 1.0, 503, "HTTP 503", None),  # retrying, due long ago
        (3, "erp", "B", 1, 0, 0, 0.0, None, None, None),
        (4, "erp", "A", 1, 0, 0, 0.0, None, None, None),
        (5, "erp", "C", 1, 2, 1, 0.0, 422, "HTTP 422: no", 5.0),  # dead
        (2, "qms", "A", 1, 0, 0, 0.0, None, None, None),
    ]
    db.executemany("INSERT INTO deliveries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.close()
    async with Outbox.open(path) as box:
        counts = await box.counts()
        assert (counts["erp"].pending, counts["erp"].dead, counts["qms"].pending) == (4, 1, 1)
        leased = await box.lease("erp", 10, per_key=10)
        assert [(d.event_id, d.attempts) for d in leased] == [
            ("old-1", 0),
            ("old-3", 0),
            ("old-2", 2),
            ("old-4", 0),
        ]
    assert sorted(file_rows(path, "SELECT * FROM deliveries")) == sorted(rows)
    (pk,) = [row[1] for row in file_rows(path, "PRAGMA index_list(deliveries)") if row[3] == "pk"]
    key_columns = file_rows(path, f"PRAGMA index_info({pk})")
    assert [row[2] for row in key_columns] == ["destination", "partition_key", "event_seq"]


SCAN = r"SCAN (deliveries|d|held)\b|.*AUTOMATIC"
"""A step that reads all of the deliveries, or builds an index of its own on the fly."""
ONE_DESTINATION = r"SEARCH (deliveries|d|held) USING .*\((destination[=>]\?)( AND state=\?)?\)$"
"""A step that reads all of one destination's rows (of one state): only its dead letters are
few enough for that."""
SCANS_ALLOWED = (
    "SELECT destination, state, COUNT(*) FROM deliveries",  # the counts, once at open
)


async def test_no_statement_about_one_event_scans_the_deliveries(tmp_path: Path) -> None:
    """The deliveries have no index by event (schema 9): every statement the outbox runs for
    one event, key or request (lease, settle, purge, show, retry and purge of a dead letter)
    must find its rows by the table's key or an index, and so must the listings a technician
    runs during a backlog (they share the reader with the leases). The oracle is SQLite's own
    planner, asked about each statement as it ran (parameters bound), on the file.
    Statements that do not run here are not checked."""
    path = tmp_path / "outbox.db"
    ran: list[str] = []
    both = ("erp", "qms")
    async with Outbox.open(path) as box:
        loop = asyncio.get_running_loop()
        for executor, db in ((box._executor, box._db), (box._reader, box._reader_db)):
            await loop.run_in_executor(executor, db.set_trace_callback, ran.append)
        await box.commit([event(n, key=f"k{n % 3}", destinations=both) for n in range(9)])
        box.keep_lease_memory_for([])  # every lease below reads the file
        first, second, third = await box.lease("erp", 3)
        await box.ack(first, status=201, reference="R-1")
        await box.retry(second, at=0.0, status=503, error="busy")
        await box.dead_letter(third, status=422, reason="no")
        assert await box.retry_dead(third.event_id) == 1
        (again,) = [d for d in await box.lease("erp", 9, per_key=3) if d.seq == third.seq]
        await box.dead_letter(again, status=422, reason="no")
        assert await box.purge_dead(third.event_id) == 1
        for delivery in await box.lease("qms", 9, per_key=3):
            await box.ack(delivery, status=201)
        await box.purge()
        listed = await box.deliveries(limit=2)
        # ev-0 delivered, ev-2's dead letter purged: ev-1 (retrying) and ev-3 come first.
        assert [(d["id"], d["destination"]) for d in listed] == [
            (second.event_id, "erp"),
            ("ev-3", "erp"),
        ]
        assert await box.deliveries(state="retrying") == listed[:1]
        assert await box.dead_letters() == []
        await loop.run_in_executor(
            box._reader,
            lambda: delivery_states(box._reader_db, "erp", [second.event_id, "ev-4", "ev-9"]),
        )
        shown = await box.show(second.event_id)
        assert shown is not None
        assert [(d["destination"], d["state"]) for d in shown["deliveries"]] == [("erp", "pending")]
        assert await box.event_state(second.event_id) == {"erp": "pending", "qms": "delivered"}
        for executor, db in ((box._executor, box._db), (box._reader, box._reader_db)):
            await loop.run_in_executor(executor, db.set_trace_callback, None)
    planner = sqlite3.connect(path)
    scans = {}
    for sql in ran:
        if "deliveries" not in sql or not sql.lstrip().upper().startswith(
            ("SELECT", "UPDATE", "DELETE", "INSERT")
        ):
            continue
        plan = [row[3] for row in planner.execute(f"EXPLAIN QUERY PLAN {sql}")]
        dead = f"state = {DeliveryState.DEAD:d}" in sql
        if sql.endswith("LIMIT 1") and not any("TEMP B-TREE" in step for step in plan):
            continue  # the first row in an index's order: a probe, whatever the step says
        if any(
            re.match(SCAN, step) or (re.match(ONE_DESTINATION, step) and not dead) for step in plan
        ):
            scans[sql] = plan
    planner.close()
    assert [sql for sql in scans if not sql.startswith(SCANS_ALLOWED)] == []
    assert len([sql for sql in ran if "DELETE FROM events" in sql]) >= 2  # purge, purge_dead


async def test_one_commit_of_many_keeps_the_first_of_each_id_in_order(tmp_path: Path) -> None:
    """A commit is written a statement per kind of row: its events take consecutive seqs in
    the commit's order; an id seen before (in the file, past the 64 ids one lookup takes, or
    earlier in the same commit) is a duplicate; one routed nowhere is remembered. The oracle
    is the file, read on a connection of the test's own."""
    path = tmp_path / "outbox.db"
    async with Outbox.open(path) as box:
        await box.commit([event(70), event(3)])  # seqs 1, 2
        batch = [event(n, key=f"k{n % 4}") for n in range(80)]
        batch[5] = event(2, key="k2")  # ev-2 again, earlier in the same commit
        batch[10] = event(10, destinations=())  # routed nowhere
        batch[11] = event(11, destinations=("erp", "qms"))
        result = await box.commit(batch)
        again = await box.commit([event(10, destinations=("erp",)), event(81)])
    kept = [n for n in range(80) if n not in (3, 5, 10, 70)]  # 3, 70 before; 5 is ev-2 again
    assert (result.inserted, result.duplicates) == (len(kept) + 1, 3)  # + ev-10, stored nowhere
    assert (again.inserted, again.duplicates) == (1, 1)
    rows = file_rows(path, "SELECT seq, id FROM events ORDER BY seq")
    assert rows == [(1, "ev-70"), (2, "ev-3")] + [
        (3 + i, f"ev-{n}") for i, n in enumerate(kept)
    ] + [(3 + len(kept), "ev-81")]
    deliveries = file_rows(path, "SELECT event_seq, destination FROM deliveries")
    seq_of = {event_id: seq for seq, event_id in rows}
    assert sorted(deliveries) == sorted(
        [(seq, "erp") for seq in seq_of.values()] + [(seq_of["ev-11"], "qms")]
    )
    assert file_rows(path, "SELECT count(*) FROM event_ids WHERE id = 'ev-10'") == [(1,)]


async def test_an_empty_destination_name_or_key_is_owed_like_any_other(tmp_path: Path) -> None:
    """A destination named "" and a partition key "" (an MES message with an empty order id)
    sort before every other: the lookups that walk names and keys start from the first one,
    not from after "". The purge kept nothing owed to "" and a restart leases its key."""
    path = tmp_path / "outbox.db"
    async with Outbox.open(path) as box:
        await box.commit(
            [event(n, key="" if n % 2 else "k", destinations=("", "erp")) for n in range(4)]
        )
        while leased := await box.lease("erp", 10, per_key=10):
            await box.settle([Settlement(d, "delivered", 201) for d in leased])
        assert await box.purge() == 0  # all four still owed to ""
    assert len(file_rows(path, "SELECT id FROM events")) == 4
    async with Outbox.open(path) as box:
        leased = await box.lease("", 10, per_key=10)
        assert sorted(d.event_id for d in leased) == [f"ev-{n}" for n in range(4)]
        assert {d.partition_key for d in leased} == {"", "k"}
        await box.settle([Settlement(d, "delivered", 201) for d in leased])
        assert await box.purge() == 4
