"""The relay delivers with the plant's own profiles, not only the canonical one: SAP S/4HANA's
production-order confirmation API behind the hub, on a real 3-node JetStream cluster.

The oracle is the ERP simulator's SAP store (the confirmations SAP holds, built from SAP's
published service metadata in tests/fixtures/sap/) and its count of confirmations posted
twice, not the relay's own counters."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import nats
import pytest

from buffer.outbox import Outbox, OutboxEvent
from edge.forward import HttpForwarder
from simulators.hub_plant import DESTINATION, hub_destination
from simulators.nats_cluster import Cluster
from tests.conftest import Peer, start_erp
from tests.hub_harness import hub_init, report, start_relay, wait_for, write_hub_yaml
from tests.test_northbound import confirmation

pytestmark = pytest.mark.integration


async def publish(
    servers: list[str], stream: str, subject: str, events: list[OutboxEvent], path: Path
) -> None:
    """The plant side: the events through an outbox and the jetstream destination, settled on
    the stream's PubAck."""
    async with Outbox.open(path) as outbox:
        await outbox.commit(events)
        forwarder = HttpForwarder(
            DESTINATION, hub_destination(servers, stream=stream, subject=subject), outbox
        )
        async with asyncio.TaskGroup() as group:
            task = group.create_task(forwarder.run(), name="forward-hub")
            deadline = time.monotonic() + 60
            while forwarder.health.delivered < len(events):
                assert time.monotonic() < deadline, "the plant did not publish its events"
                await asyncio.sleep(0.02)
            forwarder.drain()
            await task


async def journal_references(servers: list[str], stream: str) -> list[str]:
    """The `reference` of every record in the relay's journal stream."""
    client = await nats.connect(servers)
    try:
        js = client.jetstream(timeout=5)
        subscription = await js.pull_subscribe(">", stream=stream)
        references: list[str] = []
        while True:
            try:
                messages = await subscription.fetch(100, timeout=1)
            except TimeoutError:
                # nats-py's own (a subclass), or asyncio's bare one that nats-py 2.16 raises
                # for a batch fetch whose deadline ran out (it failed the full suite once).
                return references
            references += [str(json.loads(m.data).get("reference")) for m in messages]
    finally:
        await client.close()


def test_a_relay_confirms_in_sap_and_looks_up_an_ambiguous_post_before_posting_again(
    cluster: Cluster, tmp_path: Path, peers: list[Peer]
) -> None:
    """Eight confirmations of one order through the hub to SAP's confirmation API. SAP
    processes the first POST but its answer is lost (the relay cannot tell whether SAP has
    it); the relay naks it, and on the redelivery the SAP profile looks the confirmation up
    before posting again, so SAP holds each confirmation once, in the plant's order."""
    erp = start_erp(peers, tmp_path)
    hub = write_hub_yaml(tmp_path / "hub.yaml", cluster.urls, stream="SAPHUB", prefix="saphub")
    hub.write_text(
        hub.read_text()
        + "destinations:\n"
        + f"  erp: {{base_url: '{erp.url}', profile: sap_s4hana, timeout: 5s,\n"
        + "        retry: {base: 200ms, cap: 1s}}\n"
        + "routes:\n  production.confirmation: [erp]\n"
    )
    hub_init(hub)
    events = [confirmation(n) for n in range(8)]
    events = [OutboxEvent(e.id, e.type, e.partition_key, e.payload, (DESTINATION,)) for e in events]
    asyncio.run(
        publish(cluster.urls, "SAPHUB", "saphub.{site}.{type}.{key}", events, tmp_path / "o.db")
    )
    erp.set_faults(drop_response=1)
    start_relay(peers, hub, "sap", tmp_path)

    def confirmations() -> list[dict[str, object]]:
        listed = httpx.get(f"{erp.url}/_sim/sap/confirmations", timeout=10).json()
        return [c for c in listed if c["OrderID"] == "1000123"]

    async def all_confirmed() -> bool:
        return len(confirmations()) >= len(events)

    asyncio.run(wait_for(all_confirmed, 60, "eight confirmations in SAP via the relay"))
    time.sleep(1.0)  # a second post of one of them would land now
    stats = erp.stats()
    held = confirmations()
    references = asyncio.run(journal_references(cluster.urls, "SAPHUB_JOURNAL"))
    report(
        "relay_to_sap",
        published=len(events),
        sap_confirmations=len(held),
        sap_duplicate_texts=stats["sap_duplicate_texts"],
        journal=len(references),
    )
    assert len(held) == len(events) and stats["sap_duplicate_texts"] == 0
    assert stats["sap_confirmations"] == len(events)
    # In the plant's order (the SAP profile puts the event id in ConfirmationText; SAP
    # numbers confirmations as they arrive): nothing overtook the one whose answer was lost.
    assert [c["ConfirmationText"] for c in held] == [e.id for e in events]
    assert any("found by lookup" in r for r in references), references
