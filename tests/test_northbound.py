"""Northbound delivery against the real ERP and QMS simulators, one failure class at a time:
5xx, 429 with Retry-After, timeouts, 400 with a body, an OAuth2 token expiring mid-run, a CSRF
token invalidated, an ambiguous failure at a target without idempotency, the circuit breaker,
and batches."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from buffer.outbox import Outbox, OutboxEvent
from edge.config.destinations import DestinationConfig
from edge.forward import Circuit, HttpForwarder
from edge.model.envelope import build_event
from edge.model.events import ProductionConfirmation
from edge.model.quantities import Quantity
from tests.conftest import ErpSim, Peer, start_erp, start_qms

pytestmark = pytest.mark.integration


def confirmation(n: int, order: str = "1000123") -> OutboxEvent:
    data = ProductionConfirmation(
        site="1010",
        machine_id="press-01",
        order_id=order,
        operation="0010",
        material="FG-4711",
        lot_id="LOT-1",
        yield_quantity=Quantity.of(10, "C62"),
        scrap_quantity=Quantity.of(1, "C62"),
        counter_from=10 * n,
        counter_to=10 * n + 10,
        is_final=False,
        trigger="units",
        occurred_at="2026-11-30T10:00:00Z",
    )  # type: ignore[arg-type]
    event = build_event(
        data,
        natural_key=("test", order, n),
        subject=f"{order}/0010",
        partitionkey=order,
        sequence=n,
    )
    return OutboxEvent(event.id, event.type, event.partitionkey, event.to_json(), ("erp",))


async def deliver(
    outbox: Outbox,
    config: dict[str, Any],
    *,
    until: float = 20.0,
    forwarder_out: list[HttpForwarder] | None = None,
) -> HttpForwarder:
    """Run a forwarder until nothing is owed (or `until` seconds pass)."""
    forwarder = HttpForwarder("erp", DestinationConfig.model_validate(config), outbox)
    if forwarder_out is not None:
        forwarder_out.append(forwarder)
    async with asyncio.TaskGroup() as group:
        task = group.create_task(forwarder.run(), name="forward")
        deadline = time.monotonic() + until
        while time.monotonic() < deadline:
            counts = (await outbox.counts()).get("erp")
            if counts is None or counts.pending == 0:
                break
            await asyncio.sleep(0.05)
        forwarder.drain()
        await task
    return forwarder


def canonical(erp: ErpSim, **extra: Any) -> dict[str, Any]:
    return {
        "base_url": erp.url,
        "path": "/api/events",
        "retry": {"base": "50ms", "cap": "2s"},
        **extra,
    }


async def test_5xx_and_429_are_retried_and_retry_after_is_honoured(
    peers: list[Peer], erp_sim: ErpSim, tmp_path: Path
) -> None:
    erp_sim.set_faults(status_sequence=[500, 503, 429, 201], retry_after=1)
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        await outbox.commit([confirmation(1)])
        started = time.monotonic()
        forwarder = await deliver(outbox, canonical(erp_sim))
        assert time.monotonic() - started >= 2.0  # two Retry-After: 1 were waited out
        assert len(erp_sim.events()) == 1 and forwarder.health.failures == 3
        (journal,) = await outbox.journal()
        assert journal["attempts"] == 4


async def test_timeouts_are_retried(erp_sim: ErpSim, tmp_path: Path) -> None:
    erp_sim.set_faults(latency=1.5)
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        await outbox.commit([confirmation(1)])
        tasks: list[HttpForwarder] = []
        run = asyncio.create_task(
            deliver(outbox, canonical(erp_sim, timeout="500ms"), until=30, forwarder_out=tasks)
        )
        await asyncio.sleep(2.0)
        assert tasks[0].health.last_error is not None and "timed out" in tasks[0].health.last_error
        erp_sim.set_faults(latency=0)
        await run
        # The slow first attempt may have landed too: the Idempotency-Key makes it one event.
        assert len(erp_sim.events()) == 1


async def test_oauth2_token_expiring_mid_run_is_refreshed(
    peers: list[Peer], tmp_path: Path
) -> None:
    erp = start_erp(peers, tmp_path, "--client", "gw:s3cret", "--token-ttl", "2")
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        await outbox.commit([confirmation(n, order=f"O-{n}") for n in range(40)])
        auth = {
            "type": "oauth2_client_credentials",
            "token_url": f"{erp.url}/oauth/token",
            "client_id": "gw",
            "client_secret": "s3cret",
            "refresh_before": "0s",
        }
        erp.set_faults(latency=0.1)
        run = asyncio.create_task(
            deliver(outbox, canonical(erp, auth=auth, max_in_flight=2), until=60)
        )
        await asyncio.sleep(1.0)
        erp.set_faults(expire_tokens_now=True)  # revoked early: the next requests get a 401
        await run
        stats = erp.stats()
        assert stats["unique"] == 40 and stats["tokens_issued"] >= 2
        assert stats["auth_rejections"] >= 1
        assert (await outbox.counts()) == {}


async def test_sap_profile_lookup_before_retry_and_qi_stock(
    peers: list[Peer], tmp_path: Path
) -> None:
    erp = start_erp(peers, tmp_path)
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        await outbox.commit([confirmation(n) for n in range(3)])
        # The first confirmation is processed by SAP but the answer is lost (ambiguous).
        erp.set_faults(drop_response=1)
        await deliver(
            outbox,
            {"base_url": erp.url, "profile": "sap_s4hana", "retry": {"base": "50ms", "cap": "1s"}},
        )
        stats = erp.stats()
        assert stats["sap_confirmations"] == 3 and stats["sap_duplicate_texts"] == 0
        confirmations = httpx.get(f"{erp.url}/_sim/sap/confirmations").json()
        first = confirmations[0]
        assert first["OrderID"] == "1000123"
        assert first["ConfirmationYieldQuantity"] in ("10", "10.000")
        batch = httpx.get(f"{erp.url}/_sim/batches/LOT-1").json()
        assert batch["status"] == "quality_inspection"  # not usable before quality releases it
        journal = await outbox.journal()
        assert any("found by lookup" in (j["reference"] or "") for j in journal)


async def test_sap_profile_refetches_the_csrf_token_invalidated_while_deliveries_are_due(
    peers: list[Peer], tmp_path: Path
) -> None:
    """Issue 18 item 3: the token is invalidated after two of six confirmations reached SAP,
    while four are still due. The oracle is SAP's own count of tokens handed out and of posts
    it refused: exactly one refetch, exactly one refused post, and each confirmation posted in
    one attempt (the refetch and repeat are part of it, not a failure)."""
    erp = start_erp(peers, tmp_path)
    erp.set_faults(latency=0.15)  # slow enough to invalidate between two deliveries
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        await outbox.commit([confirmation(n) for n in range(6)])
        run = asyncio.create_task(
            deliver(
                outbox,
                {
                    "base_url": erp.url,
                    "profile": "sap_s4hana",
                    "retry": {"base": "50ms", "cap": "1s"},
                },
                until=30,
            )
        )

        def posted() -> int:
            return len(httpx.get(f"{erp.url}/_sim/sap/confirmations").json())

        deadline = time.monotonic() + 20
        while posted() < 2:
            assert time.monotonic() < deadline and not run.done(), "no deliveries"
            await asyncio.sleep(0.02)
        erp.set_faults(invalidate_csrf=True)
        assert (await outbox.counts())["erp"].pending >= 3  # deliveries are due
        await run
        stats = erp.stats()
        assert stats["sap_confirmations"] == 6 and stats["sap_duplicate_texts"] == 0
        assert stats["csrf_tokens_fetched"] == 2, stats  # the first, and one after the 403
        assert stats["csrf_rejections"] == 1, stats
        journal = await outbox.journal()
        assert len(journal) == 6 and all(j["attempts"] == 1 for j in journal), journal
        assert await outbox.dead_letters() == []


async def test_400_with_a_body_is_dead_lettered_with_that_body(
    peers: list[Peer], tmp_path: Path
) -> None:
    erp = start_erp(peers, tmp_path)
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        bad = confirmation(1)
        body = json.loads(bad.payload)
        for quantity in ("yield_quantity", "scrap_quantity"):  # a unit this SAP does not know
            body["data"][quantity]["uom"] = "P1"
        await outbox.commit(
            [OutboxEvent(bad.id, bad.type, bad.partition_key, json.dumps(body).encode(), ("erp",))]
        )
        await deliver(outbox, {"base_url": erp.url, "profile": "sap_s4hana"})
        (dead,) = await outbox.dead_letters()
        assert dead["last_status"] == 400 and "ISO code P1" in dead["last_error"]


async def test_circuit_breaker_opens_and_recovers(peers: list[Peer], tmp_path: Path) -> None:
    erp = start_erp(peers, tmp_path)
    erp.set_faults(outage_seconds=3, retry_after=0)
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        await outbox.commit([confirmation(n, order=f"O-{n}") for n in range(20)])
        holder: list[HttpForwarder] = []
        run = asyncio.create_task(
            deliver(
                outbox,
                canonical(erp, circuit_breaker={"failures": 2, "open_for": "1s"}, max_in_flight=1),
                until=30,
                forwarder_out=holder,
            )
        )
        seen: set[Circuit] = set()
        while not run.done():
            if holder:
                seen.add(holder[0].health.circuit)
            await asyncio.sleep(0.02)
        await run
        assert Circuit.OPEN in seen and holder[0].health.circuit is Circuit.CLOSED
        assert erp.stats()["unique"] == 20
        # While open, only probes went out: far fewer failed requests than a request per event.
        assert erp.stats()["outage_rejections"] < 15


async def test_batches_go_in_one_request_each(peers: list[Peer], tmp_path: Path) -> None:
    erp = start_erp(peers, tmp_path)
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        await outbox.commit([confirmation(0, order=f"O-{n}") for n in range(200)])
        forwarder = await deliver(
            outbox, canonical(erp, batch_path="/api/events:batch", batch_size=50)
        )
        assert erp.stats()["unique"] == 200
        assert forwarder.health.requests <= 8


def inspection(lot: str, sequence: int, **fields: Any) -> OutboxEvent:
    """An `inspection.requested` event of order 1000123 for `lot`, for the qms_rest profile."""
    from edge.model.events import InspectionRequested

    data = InspectionRequested(
        site="1010",
        order_id="1000123",
        lot_id=lot,
        occurred_at="2026-11-30T10:00:00Z",
        **fields,
    )
    event = build_event(
        data, natural_key=("t", lot, sequence), subject=lot, partitionkey=lot, sequence=sequence
    )
    return OutboxEvent(event.id, event.type, lot, event.to_json(), ("erp",))


async def test_qms_rest_profile_posts_inspection_requests(
    peers: list[Peer], tmp_path: Path
) -> None:
    from edge.model.quantities import SignedQuantity

    qms = start_qms(peers, tmp_path, "--decision-delay", "0")
    out_of_spec = inspection(
        "LOT-1",
        1,
        trigger="limit_violation",
        characteristic="PRESS-FORCE",
        measured_value=SignedQuantity.of("16", "NEW"),
        upper_limit=SignedQuantity.of("15", "NEW"),
    )
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        await outbox.commit([out_of_spec])
        await deliver(outbox, {"base_url": f"{qms.url}/api/v1", "profile": "qms_rest"})
        (journal,) = await outbox.journal()
        assert journal["reference"].startswith("INS-")
        lot = httpx.get(f"{qms.url}/api/v1/lots/LOT-1/disposition").json()
        assert lot["disposition"] == "reject"  # out of spec: the QMS rejects the lot


async def test_an_event_the_qms_profile_cannot_map_is_dead_lettered_and_its_key_goes_on(
    peers: list[Peer], tmp_path: Path
) -> None:
    """An event whose data lacks what the QMS request needs (here `trigger`) fails the same way
    on every attempt: a dead letter naming the field, not a retry for ever that would hold its
    lot's later events behind it. The oracle: the QMS simulator's reference for the event it
    took, in the journal, and the outbox's dead letter."""
    qms = start_qms(peers, tmp_path, "--decision-delay", "0")
    broken = inspection("LOT-7", 1, trigger="lot_completed")
    good = inspection("LOT-7", 2, trigger="lot_completed")
    body = json.loads(broken.payload)
    del body["data"]["trigger"]
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        await outbox.commit(
            [
                OutboxEvent(broken.id, broken.type, "LOT-7", json.dumps(body).encode(), ("erp",)),
                good,
            ]
        )
        await deliver(outbox, {"base_url": f"{qms.url}/api/v1", "profile": "qms_rest"}, until=10)
        (dead,) = await outbox.dead_letters()
        assert dead["id"] == broken.id and "'trigger'" in dead["last_error"]
        (journal,) = await outbox.journal()
        assert journal["event_id"] == good.id and journal["reference"].startswith("INS-")
