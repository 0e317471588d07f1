"""The sap_s4hana profile against the ERP simulator (which validates against SAP's metadata),
and SAP's field lengths enforced before anything is sent: by `check` for what the config
says, by the pipeline (input dead letters) for what the MES says."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from buffer.outbox import Outbox, OutboxEvent
from drivers.base import MesMessage
from edge.config.errors import ConfigError
from edge.config.loader import parse_config
from edge.model.envelope import build_event
from edge.model.events import LotDisposition, MaterialConsumed, ProductionConfirmation
from edge.model.quantities import Quantity
from edge.runtime.pipeline import Pipeline
from tests.conftest import Peer, start_erp
from tests.test_northbound import deliver

SAP = {
    "profile": "sap_s4hana",
    "retry": {"base": "50ms", "cap": "500ms"},
    "sap": {
        "time_zone": "Europe/Berlin",
        "goods_receipt_storage_location": "0001",
        "usage_decisions": {
            "release": {"code": "A", "code_group": "01", "selected_set": "01"},
            "reject": {"code": "R", "code_group": "01", "selected_set": "01"},
        },
    },
}


def outbox_event(data: Any, n: int, key: str = "1000123") -> OutboxEvent:
    event = build_event(
        data, natural_key=("sap-test", n), subject=key, partitionkey=key, sequence=n
    )
    return OutboxEvent(event.id, event.type, event.partitionkey, event.to_json(), ("erp",))


def produced(n: int, lot: str = "L-1", value: int = 10, uom: str = "C62") -> OutboxEvent:
    return outbox_event(
        ProductionConfirmation(
            site="1010",
            machine_id="press-01",
            order_id="1000123",
            operation="0010",
            material="FG-1",
            lot_id=lot,
            yield_quantity=Quantity.of(value, uom),
            scrap_quantity=Quantity.of(1, uom),
            counter_from=10 * n,
            counter_to=10 * n + 10,
            is_final=False,
            trigger="units",
            occurred_at="2026-03-01T23:30:00Z",
        ),
        n,
    )  # type: ignore[arg-type]


def consumed(n: int, uom: str = "KGM") -> OutboxEvent:
    return outbox_event(
        MaterialConsumed(
            site="1010",
            order_id="1000123",
            material="RM-9",
            lot_id="C-7",
            quantity=Quantity.of("2.5", uom),
            storage_location="0002",
            occurred_at="2026-03-01T08:00:00Z",
        ),
        n,
    )  # type: ignore[arg-type]


def disposition(n: int, verdict: str, lot: str = "L-1") -> OutboxEvent:
    return outbox_event(
        LotDisposition(
            site="1010",
            order_id="1000123",
            material="FG-1",
            lot_id=lot,
            disposition=verdict,
            disposition_source="qms",  # type: ignore[arg-type]
            occurred_at="2026-03-02T09:00:00Z",
        ),
        n,
    )  # type: ignore[arg-type]


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    async with Outbox.open(tmp_path / "outbox.db") as opened:
        yield opened


def sim(url: str, what: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = httpx.get(f"{url}/_sim/sap/{what}", timeout=10).json()
    return found


@pytest.mark.integration
async def test_goods_receipt_consumption_and_usage_decisions_reach_sap(
    peers: list[Peer], tmp_path: Path, outbox: Outbox
) -> None:
    erp = start_erp(peers, tmp_path)
    await outbox.commit(
        [
            produced(1, "L-1"),
            produced(2, "L-2"),
            consumed(3),
            disposition(4, "release", "L-1"),
            disposition(5, "reject", "L-2"),
            disposition(6, "hold", "L-1"),
        ]
    )
    await deliver(outbox, {"base_url": erp.url, **SAP})
    assert await outbox.dead_letters() == []
    (first, _) = sim(erp.url, "confirmations")
    # 23:30 UTC on 1 March is 2 March in Berlin: by hand, 2026-03-02T00:00Z in ms.
    assert first["PostingDate"] == "/Date(1772409600000)/"
    assert first["ConfirmationUnitISOCode"] == "PCE" and "ConfirmationUnit" not in {
        k for k, v in first.items() if v == "C62"
    }
    (receipt,) = first["to_ProdnOrdConfMatlDocItm"]
    assert (
        receipt["GoodsMovementRefDocType"],
        receipt["OrderID"],
        receipt["StorageLocation"],
        receipt["EntryUnitISOCode"],
    ) == ("F", "1000123", "0001", "PCE")
    (document,) = sim(erp.url, "material-documents")
    assert (document["GoodsMovementCode"], document["PostingDate"]) == (
        "03",
        "/Date(1772323200000)/",
    )
    (issue,) = document["to_MaterialDocumentItem"]
    assert (
        issue["GoodsMovementType"],
        issue["EntryUnit"],
        issue["ManufacturingOrder"],
        issue["StorageLocation"],
    ) == ("261", "KG", "1000123", "0002")
    decisions = sim(erp.url, "usage-decisions")
    assert sorted((d["_lot"]["Batch"], d["InspectionLotUsageDecisionCode"]) for d in decisions) == [
        ("L-1", "A"),
        ("L-2", "R"),
    ]  # nothing for the hold
    batches = {b["batch"]: b for b in httpx.get(f"{erp.url}/_sim/batches").json()}
    assert (batches["L-1"]["status"], batches["L-2"]["status"]) == ("unrestricted", "blocked")
    journal = {row["event_id"]: row for row in await outbox.journal()}
    hold = journal[disposition(6, "hold", "L-1").id]
    assert "no usage decision" in hold["reference"]


@pytest.mark.integration
async def test_retries_ask_sap_first_for_every_kind_of_request(
    peers: list[Peer], tmp_path: Path, outbox: Outbox
) -> None:
    """Each first POST is processed and its answer lost (the ambiguous failure): the retry
    finds it (confirmation by OrderID and ConfirmationText, goods issue by its item text, the
    usage decision by its inspection lot) and posts nothing twice."""
    erp = start_erp(peers, tmp_path)
    for batch in ([produced(1)], [consumed(2)], [disposition(3, "release")]):
        await outbox.commit(batch)
        erp.set_faults(drop_response=1)
        await deliver(outbox, {"base_url": erp.url, **SAP})
    stats = erp.stats()
    assert (
        stats["sap_confirmations"],
        stats["sap_material_documents"],
        stats["usage_decisions"],
        stats["responses_dropped"],
    ) == (1, 1, 1, 3)
    journal = await outbox.journal()
    assert sum("found by lookup" in (row["reference"] or "") for row in journal) == 3
    assert await outbox.dead_letters() == []


@pytest.mark.integration
async def test_a_disposition_before_its_goods_receipt_waits_for_the_inspection_lot(
    peers: list[Peer], tmp_path: Path, outbox: Outbox
) -> None:
    """Not a failure of SAP: the circuit stays closed while the disposition waits."""
    erp = start_erp(peers, tmp_path)
    await outbox.commit([disposition(1, "release", "L-9")])  # no goods receipt of L-9 yet
    forwarders: list[Any] = []
    await deliver(outbox, {"base_url": erp.url, **SAP}, until=1.0, forwarder_out=forwarders)
    assert forwarders[0].health.circuit.value == "closed"
    (owed,) = await outbox.deliveries(destination="erp", state="retrying")  # owed, not dead
    assert "no inspection lot" in str(owed.get("last_error"))
    assert (await outbox.counts())["erp"].retrying == 1
    # The receipt arrives by another way (another key: a disposition holds back its own).
    receipt = produced(2, "L-9")
    await outbox.commit([OutboxEvent(receipt.id, receipt.type, "other", receipt.payload, ("erp",))])
    await deliver(outbox, {"base_url": erp.url, **SAP})
    assert [d["_lot"]["Batch"] for d in sim(erp.url, "usage-decisions")] == ["L-9"]


@pytest.mark.integration
async def test_sap_refusals_become_dead_letters_with_sap_s_reason(
    peers: list[Peer], tmp_path: Path, outbox: Outbox
) -> None:
    erp = start_erp(peers, tmp_path)
    # Percent has an ISO code in Rec 20 but none in this SAP's unit table.
    await outbox.commit([produced(1, uom="P1"), consumed(2, uom="HLT")])
    await deliver(outbox, {"base_url": erp.url, **SAP})
    dead = {row["id"]: row for row in await outbox.dead_letters()}
    assert dead[produced(1, uom="P1").id]["last_status"] == 400
    assert "ISO code P1" in dead[produced(1, uom="P1").id]["last_error"]
    # A material document has only EntryUnit: with no internal unit known, nothing is sent.
    assert "sap.units.HLT.internal" in dead[consumed(2, uom="HLT").id]["last_error"]
    assert erp.stats()["sap_material_documents"] == 0


CHECKED = """
site: "10100"
drivers:
  - {name: plc, type: modbus, host: 127.0.0.1, tags: [{name: good, address: 0, type: uint32}]}
machines:
  - {id: press-01, signals: {good: plc.good},
     order: {order_id: "4711000000001", material: FG-1, lot_id: LOT-2026-0001}}
destinations:
  erp:
    base_url: http://127.0.0.1:1
    profile: sap_s4hana
    sap:
      goods_receipt_storage_location: "00001"
      units: {C62: {iso: PIECE}}
      usage_decisions: {release: {code: ACCEPT, code_group: "01", selected_set: "01"}}
  qms: {base_url: http://127.0.0.1:2, profile: qms_rest, sap: {time_zone: UTC}}
routes:
  production.confirmation: [erp]
  lot.disposition: [erp]
"""


def test_check_reports_config_values_longer_than_sap_s_fields() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(CHECKED, "plant.yaml", {})
    text = "\n".join(caught.value.problems)
    expected = [
        "plant.yaml:2: site: '10100' has 5 characters; SAP's Plant takes at most 4",
        "machines[0].order.order_id: '4711000000001' has 13 characters; SAP's OrderID takes "
        "at most 12",
        "machines[0].order.lot_id: 'LOT-2026-0001' has 13 characters; SAP's Batch takes at most 10",
        "destinations.erp.sap.goods_receipt_storage_location: '00001' has 5 characters; "
        "SAP's StorageLocation takes at most 4",
        "destinations.erp.sap.units.C62.iso: 'PIECE' has 5 characters",
        "destinations.erp.sap.usage_decisions.release.code: 'ACCEPT' has 6 characters; "
        "SAP's InspectionLotUsageDecisionCode takes at most 4",
        "destinations.erp.sap.usage_decisions: lot.disposition goes to 'erp': set the usage "
        "decision code, code_group and selected_set SAP posts for reject",
        "destinations.qms.sap: sap settings apply to profile sap_s4hana, not qms_rest",
    ]
    for line in expected:
        assert line in text, f"missing {line!r} in\n{text}"
    assert len(caught.value.problems) == len(expected), text


def test_time_zone_must_be_a_real_one() -> None:
    broken = CHECKED.replace(
        "sap:\n      goods", "sap:\n      time_zone: Europe/Berlln\n      goods"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(broken, "plant.yaml", {})
    assert any("'Europe/Berlln' is not an IANA time zone" in p for p in caught.value.problems)


PIPELINE = """
site: "1010"
data_dir: /tmp/unused
drivers:
  - {name: plc, type: modbus, host: 127.0.0.1, tags: [{name: good, address: 0, type: uint32}]}
machines:
  - {id: press-01, signals: {good: plc.good}, confirm: {every_units: 10}}
destinations:
  erp: {base_url: "http://127.0.0.1:1", profile: sap_s4hana}
routes:
  production.confirmation: [erp]
  material.consumed: [erp]
"""


def mes(kind: str, message_id: str, **fields: Any) -> MesMessage:
    return MesMessage("mes", f"mes/1010/press-01/{kind}", kind, fields, message_id, 1_800_000_000.0)


async def test_mes_input_sap_would_refuse_becomes_an_input_dead_letter(outbox: Outbox) -> None:
    pipeline = Pipeline(parse_config(PIPELINE, "p", {}), outbox, {})
    quantity = {"value": Decimal("2"), "uom": "KGM"}
    await pipeline.on_readings(
        [
            mes(
                "order.started",
                "m-1",
                machine_id="press-01",
                order_id="1000123",
                material="FG-1",
                lot_id="LOT-2026-0001",
            ),
            mes(
                "order.started",
                "m-2",
                machine_id="press-01",
                order_id="1000124",
                material="FG-1",
                lot_id="L-2026-01",
            ),
            mes(
                "material.consumed",
                "m-3",
                order_id="1000124",
                material="RM-1",
                lot_id="C-1",
                quantity=quantity,
                storage_location="00001",
            ),
            mes(
                "material.consumed",
                "m-4",
                order_id="1000124",
                material="RM-1",
                lot_id="C-1",
                quantity={"value": Decimal("2"), "uom": "HLT"},
            ),
            mes(
                "material.consumed",
                "m-5",
                order_id="1000124",
                material="RM-1",
                lot_id="C-1",
                quantity=quantity,
                storage_location="0001",
            ),
        ]
    )
    reasons = sorted(r["reason"] for r in await outbox.rejected_inputs())
    assert reasons == [
        "lot_id 'LOT-2026-0001' has 13 characters; SAP's Batch takes at most 10 (destination erp)",
        "storage_location '00001' has 5 characters; SAP's StorageLocation takes at most 4 "
        "(destination erp)",
        "unit HLT has no SAP internal unit for EntryUnit: set sap.units.HLT.internal to the "
        "unit the plant's ERP uses (destination erp)",
    ]
    (sent,) = await outbox.lease("erp", 10)  # only the good consumption is owed to ERP
    assert json.loads(sent.payload)["data"]["storage_location"] == "0001"
    assert pipeline.rules[0].order_id == "1000124"  # the refused binding never took effect
