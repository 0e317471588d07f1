"""Order release, ERP to the outbox: the ERP simulator's order APIs against SAP's metadata, the
sources of both profiles against the simulator (a real process), and the validation that
keeps an order the plant cannot run from the MES.

Oracles: SAP's published metadata (the fixture the simulator checks with) for what SAP
refuses; the test's own release requests for what the gateway must derive; the README's
validation list for what is refused."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from buffer.outbox import Outbox
from edge.config.loader import parse_config
from edge.config.models import PlantConfig
from edge.forward.session import Session, make_client
from edge.orders.book import OrderBook
from edge.orders.release import OrderRelease
from tests.conftest import ErpSim, Peer, start_erp

SAP_FIXTURE = Path(__file__).parent / "fixtures/sap/API_PRODUCTION_ORDER_2_SRV.json"


def order(order_id: str = "1000123", **overrides: Any) -> dict[str, Any]:
    """A planner's release request, as the ERP simulator takes it (SAP's ISO units)."""
    body: dict[str, Any] = {
        "order_id": order_id,
        "material": "FG-100",
        "quantity": "100",
        "unit": "PCE",
        "production_version": "0001",
        "batch": "L26-0001",
        "plant": "1010",
        "operations": [
            {"operation": "0010", "work_center": "PRESS01", "text": "Press"},
            {"operation": "0020", "work_center": "PACK01", "text": "Pack"},
        ],
        "components": [
            {"material": "RM-100", "quantity": "12.5", "unit": "KGM", "operation": "0010"}
        ],
    }
    body.update(overrides)
    return body


def release(erp: ErpSim, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{erp.url}/_sim/orders", json=body, timeout=10)


def set_status(erp: ErpSim, order_id: str, status: str) -> None:
    httpx.post(
        f"{erp.url}/_sim/orders/{order_id}/status", json={"status": status}, timeout=10
    ).raise_for_status()


def config_for(erp: ErpSim, tmp_path: Path, profile: str, extra: str = "") -> PlantConfig:
    base = f"{erp.url}/api" if profile == "canonical" else erp.url
    return parse_config(f"""
site: "1010"
data_dir: {tmp_path}/data
destinations:
  erp: {{base_url: "{base}", profile: {profile}, timeout: 5s}}
orders:
  source: erp
  poll_interval: 1s
  page_size: 2
  blocked_materials: [FG-BLOCKED]
  mes: {{host: 127.0.0.1, port: 1883}}
{extra}""")


@pytest.fixture
def erp(peers: list[Peer], tmp_path: Path) -> ErpSim:
    return start_erp(peers, tmp_path)


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    async with Outbox.open(tmp_path / "outbox.db") as box:
        yield box


async def poll(
    config: PlantConfig, outbox: Outbox, book: OrderBook | None = None
) -> tuple[OrderRelease, int]:
    assert config.orders is not None
    book = book or OrderBook(await outbox.load_state())
    release_ = OrderRelease(config, outbox, book)
    destination = config.destinations["erp"]
    async with make_client("erp", destination) as client:
        made = await release_.poll_once(release_.source(Session(destination, client)))
    return release_, made


def held(database: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(database) as db:
        rows = db.execute(
            "SELECT e.type, e.payload FROM events e JOIN deliveries d ON "
            "d.event_seq = e.seq WHERE d.destination = 'mes-orders' "
            "ORDER BY e.seq"
        ).fetchall()
    return [{"type": kind, **json.loads(payload)} for kind, payload in rows]


def rejected(database: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(database) as db:
        return [
            (source, topic, reason)
            for source, topic, reason in db.execute(
                "SELECT source, topic, reason FROM rejected_inputs ORDER BY id"
            )
        ]


# -- the simulator is SAP as its metadata describes it ---------------------------------------


@pytest.mark.integration
def test_simulator_serves_orders_in_sap_shape_and_refuses_what_sap_refuses(erp: ErpSim) -> None:
    facts = json.loads(SAP_FIXTURE.read_text())["entity_sets"]
    assert release(erp, order()).status_code == 201
    url = f"{erp.url}/sap/opu/odata/sap/API_PRODUCTION_ORDER_2_SRV/A_ProductionOrder_2"
    answer = httpx.get(
        url,
        params={
            "$filter": "ProductionPlant eq '1010' and OrderIsReleased eq 'X' and "
            "LastChangeDateTime ge '20000101000000'",
            "$expand": "to_ProductionOrderOperation,to_ProductionOrderComponent",
            "$format": "json",
        },
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    [entity] = answer.json()["d"]["results"]
    header = facts["A_ProductionOrder_2"]["properties"]
    for name, value in entity.items():
        if name == "__metadata":
            continue
        if name in facts["A_ProductionOrder_2"]["navigation"]:
            continue
        assert name in header, name
        if header[name]["type"] == "Edm.String" and value is not None:
            assert len(value) <= header[name].get("max_length", 10**6), name
    assert entity["OrderIsReleased"] == "X" and len(entity["LastChangeDateTime"]) == 14
    operations = entity["to_ProductionOrderOperation"]["results"]
    assert [op["ManufacturingOrderOperation"] for op in operations] == ["0010", "0020"]
    assert set(operations[0]) <= set(facts["A_ProductionOrderOperation_2"]["properties"])
    assert "__deferred" in entity["to_ProductionOrderItem"]  # not expanded
    # What SAP refuses: a property the entity set lacks, an option not served, a literal longer
    # than its MaxLength, a navigation that is not one; an order SAP could not hold.
    for params in (
        {"$filter": "OrderStatus eq 'REL'"},
        {"$select": "ManufacturingOrder"},
        {"$filter": "ProductionPlant eq '10101'"},
        {"$expand": "to_Nothing"},
        {"$orderby": "Nothing"},
        {"$filter": "TotalQuantity eq '1'"},
    ):
        refused = httpx.get(url, params=params, timeout=10)
        assert refused.status_code == 400, params
        assert refused.json()["error"]["message"]["value"]
    assert release(erp, order("1234567890123")).status_code == 400  # ManufacturingOrder 12
    assert release(erp, order("1000124", unit="C62")).status_code == 400  # no such ISO unit
    assert release(erp, order("1000125", material="M" * 41)).status_code == 400


# -- sources ---------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("profile", ["sap_s4hana", "canonical"])
async def test_released_changed_and_ended_orders_become_versioned_events(
    erp: ErpSim, outbox: Outbox, tmp_path: Path, profile: str
) -> None:
    config = config_for(erp, tmp_path, profile)
    for number in range(5):  # more than one page of 2
        assert release(erp, order(f"10001{number:02d}")).status_code == 201
    release_, made = await poll(config, outbox)
    assert made == 5
    events = held(tmp_path / "outbox.db")
    assert [e["data"]["order_id"] for e in events] == [f"10001{n:02d}" for n in range(5)]
    first = events[0]["data"]
    # Derived by hand from the release request: SAP's PCE is Rec 20's H87, KGM stays.
    assert first["quantity"] == {"value": "100", "uom": "H87"}
    assert first["operations"][1] == {
        "operation": "0020",
        "work_center": "PACK01",
        "description": "Pack",
        "quantity": ({"value": "100", "uom": "H87"} if profile == "sap_s4hana" else None),
    }
    assert first["components"] == [
        {"material": "RM-100", "operation": "0010", "quantity": {"value": "12.5", "uom": "KGM"}}
    ]
    assert (first["bom_version"], first["planned_lot"], first["version"]) == ("0001", "L26-0001", 1)
    assert {e["type"] for e in events} == {"com.plantsync.edge.order.released.v1"}
    # Polling again finds nothing new: the same orders read again make no event.
    _, made = await poll(config, outbox, release_.book)
    assert made == 0
    httpx.post(
        f"{erp.url}/_sim/orders/1000100/change", json={"quantity": "150"}, timeout=10
    ).raise_for_status()
    set_status(erp, "1000101", "technically_completed")
    _, made = await poll(config, outbox, release_.book)
    assert made == 2
    later = held(tmp_path / "outbox.db")[5:]
    assert [
        (e["data"]["order_id"], e["type"].split(".")[-2], e["data"]["version"]) for e in later
    ] == [("1000100", "changed", 2), ("1000101", "cancelled", 2)]
    assert later[0]["data"]["quantity"]["value"] == "150"
    assert later[1]["data"]["status"] == "technically_completed"


@pytest.mark.integration
async def test_a_restart_derives_the_same_ids(erp: ErpSim, outbox: Outbox, tmp_path: Path) -> None:
    """The book and cursor move with the events: a poll whose commit is lost (a fresh book
    from the saved state, as after kill -9 before the commit) derives the same ids."""
    config = config_for(erp, tmp_path, "sap_s4hana")
    release(erp, order("1000200"))
    saved = await outbox.load_state()  # before the first commit
    first, _ = await poll(config, outbox)
    again, made = await poll(config, outbox, OrderBook(saved))
    assert made == 0  # the outbox already holds that id
    assert len(held(tmp_path / "outbox.db")) == 1
    assert first.book.orders["1000200"]["version"] == again.book.orders["1000200"]["version"]
    # A restart after a change: the book comes back from the saved state, so the next change
    # is version 3, not a version whose id the outbox (and the MES) already hold.
    change = f"{erp.url}/_sim/orders/1000200/change"
    httpx.post(change, json={"quantity": "110"}, timeout=10).raise_for_status()
    assert (await poll(config, outbox, again.book))[1] == 1
    restarted = OrderBook(await outbox.load_state())
    httpx.post(change, json={"quantity": "120"}, timeout=10).raise_for_status()
    assert (await poll(config, outbox, restarted))[1] == 1
    assert [
        (e["data"]["version"], e["data"]["quantity"]["value"]) for e in held(tmp_path / "outbox.db")
    ] == [(1, "100"), (2, "110"), (3, "120")]


# -- validation before anything reaches the MES ------------------------------------------------


BAD_ORDERS = [
    ("1000301", {"production_version": ""}, "bom_version"),
    ("1000302", {"material": "FG-BLOCKED"}, "blocked"),
    ("1000303", {"quantity": "0"}, "quantity must be positive"),
    ("1000304", {"operations": [{"operation": "0020"}, {"operation": "0010"}]}, "ascending"),
    ("1000305", {"operations": [{"operation": "10"}]}, "operation"),
    ("1000306", {"unit": "CT"}, "Rec 20"),  # SAP's carton (KAR); a Rec 21 package code
    (
        "1000307",
        {"components": [{"material": "RM-1", "quantity": "1", "unit": "KGM", "operation": "0090"}]},
        "routing does not have",
    ),
]


@pytest.mark.integration
async def test_an_order_the_plant_cannot_run_is_a_dead_letter_with_its_reason(
    erp: ErpSim, outbox: Outbox, tmp_path: Path
) -> None:
    config = config_for(erp, tmp_path, "sap_s4hana")
    release(erp, order("1000300"))
    for order_id, change, _ in BAD_ORDERS:
        assert release(erp, order(order_id, **change)).status_code == 201, order_id
    issues: list[Any] = []
    book = OrderBook(await outbox.load_state())
    book.listeners.append(issues.append)
    await poll(config, outbox, book)
    assert [e["data"]["order_id"] for e in held(tmp_path / "outbox.db")] == ["1000300"]
    refused = rejected(tmp_path / "outbox.db")
    assert [topic for _, topic, _ in refused] == [f"order/{o}" for o, _, _ in BAD_ORDERS]
    for (_, _, reason), (order_id, _, expected) in zip(refused, BAD_ORDERS, strict=True):
        assert expected in reason, (order_id, reason)
    assert {source for source, _, _ in refused} == {"erp-orders"}
    assert [(i.kind, i.role, i.order_id) for i in issues] == [
        ("order.invalid", "integration", o) for o, _, _ in BAD_ORDERS
    ]
    # Read again (SAP's newest second is read at every poll): no second dead letter.
    await poll(config, outbox, book)
    assert len(rejected(tmp_path / "outbox.db")) == len(BAD_ORDERS)
    # Fixed in ERP: released to the MES as version 1.
    httpx.post(
        f"{erp.url}/_sim/orders/1000302/change", json={"material": "FG-100"}, timeout=10
    ).raise_for_status()
    await poll(config, outbox, book)
    assert [
        (e["data"]["order_id"], e["data"]["version"]) for e in held(tmp_path / "outbox.db")
    ] == [("1000300", 1), ("1000302", 1)]
    assert [(i.kind, i.order_id, i.cleared) for i in issues[len(BAD_ORDERS) :]] == [
        ("order.invalid", "1000302", True)
    ]


@pytest.mark.integration
async def test_a_foreign_plant_in_the_canonical_feed_is_refused(
    erp: ErpSim, outbox: Outbox, tmp_path: Path
) -> None:
    config = config_for(erp, tmp_path, "canonical")
    release(erp, order("1000400", plant="2020"))
    await poll(config, outbox)
    [(_, _, reason)] = rejected(tmp_path / "outbox.db")
    assert "plant '2020' is not this plant (1010)" in reason


@pytest.mark.integration
async def test_erp_down_is_retried_and_nothing_moves(
    erp: ErpSim, outbox: Outbox, tmp_path: Path
) -> None:
    config = config_for(erp, tmp_path, "sap_s4hana")
    release(erp, order("1000500"))
    erp.set_faults(outage_seconds=30)
    from edge.orders.sources import SourceUnavailable

    with pytest.raises(SourceUnavailable, match="503"):
        await poll(config, outbox)
    assert held(tmp_path / "outbox.db") == []
    assert (await outbox.load_state()).get("orders:cursor", "") == ""
    erp.set_faults(outage_seconds=0)
    _, made = await poll(config, outbox)
    assert made == 1


@pytest.mark.integration
async def test_an_order_changed_mid_scan_does_not_make_sap_paging_skip_another(
    erp: ErpSim, outbox: Outbox, tmp_path: Path
) -> None:
    """SAP is read by offset pages ($top 2, $skip) ordered by LastChangeDateTime. An order
    read on the first page and changed before the second page is read moves to the end of
    that ordering: the rows after it shift left by one, and the first row of the second page
    is not read in this scan. The scan must then keep its cursor, so that the next poll reads
    the order it skipped. The oracle: the five orders released, each read by a scan."""
    config = config_for(erp, tmp_path, "sap_s4hana")
    orders = [f"10002{n:02d}" for n in range(5)]
    for order_id in orders:
        assert release(erp, order(order_id)).status_code == 201
    release_ = OrderRelease(config, outbox, OrderBook(await outbox.load_state()))
    destination = config.destinations["erp"]
    read: list[str] = []
    async with make_client("erp", destination) as client:
        source = release_.source(Session(destination, client))
        pages = source.pages("")
        first = await anext(pages)
        read += [c.order_id for c in first.candidates]
        assert read == orders[:2]
        await asyncio.sleep(1.1)  # SAP's time stamps have whole seconds: a later one
        httpx.post(
            f"{erp.url}/_sim/orders/{orders[0]}/change", json={"quantity": "150"}, timeout=10
        ).raise_for_status()
        last = first
        async for page in pages:
            read += [c.order_id for c in page.candidates]
            last = page
        # The shift: orders[2] was skipped and orders[0] read again at the end.
        assert orders[2] not in read and read.count(orders[0]) == 2
        assert last.cursor == ""  # not moved past what was skipped
        async for page in source.pages(last.cursor):
            read += [c.order_id for c in page.candidates]
    assert set(read) == set(orders)
