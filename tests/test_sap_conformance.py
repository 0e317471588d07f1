"""Every SAP request the sap_s4hana profile can build, checked against SAP's own metadata.

The oracle is `tests/fixtures/sap/*.json`: entity sets, properties, Edm types, MaxLength,
Precision/Scale and keys extracted from SAP's generated clients on npm (each file names the
package, version and files). The checker below is written from the OData V2 JSON format, not
taken from the profile or the ERP simulator, so neither can pass by agreeing with itself.
"""

from __future__ import annotations

import calendar
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.config.destinations import SapConfig
from edge.forward.profiles import sap_s4hana as sap
from edge.model.codes import BUILTIN_UOM_CODES

FIXTURES = Path(__file__).parent / "fixtures" / "sap"
SERVICES = {
    facts["service_path"]: facts
    for facts in (json.loads(file.read_text()) for file in sorted(FIXTURES.glob("*.json")))
}

DATE = re.compile(r"^/Date\((-?\d+)\)/$")


def test_the_fixtures_name_their_source_and_hold_the_entity_sets_we_use() -> None:
    assert set(SERVICES) == {
        "/sap/opu/odata/sap/API_PROD_ORDER_CONFIRMATION_2_SRV",
        "/sap/opu/odata/sap/API_INSPECTIONLOT_SRV",
        "/sap/opu/odata/sap/API_MATERIAL_DOCUMENT_SRV",
        "/sap/opu/odata/sap/API_PRODUCTION_ORDER_2_SRV",
    }
    for facts in SERVICES.values():
        source = facts["source"]
        assert source["package"].startswith("@sap/cloud-sdk-vdm-") and source["version"]
        assert source["integrity"].startswith("sha512-") and source["files"]
    inspection = SERVICES[sap.INSPECTION_SERVICE]["entity_sets"]
    assert inspection["A_InspLotUsageDecision"]["keys"] == ["InspectionLot"]
    order = SERVICES["/sap/opu/odata/sap/API_PRODUCTION_ORDER_2_SRV"]["entity_sets"]
    assert order["A_ProductionOrder_2"]["keys"] == ["ManufacturingOrder"]
    assert order["A_ProductionOrder_2"]["properties"]["ManufacturingOrder"]["max_length"] == 12


# -- an independent OData V2 JSON checker ----------------------------------------------------


def _value_problem(name: str, fact: Mapping[str, Any], value: Any) -> str | None:
    edm = fact["type"]
    if value is None:
        return None if fact["nullable"] else f"{name} is not nullable"
    if edm == "Edm.String":
        if not isinstance(value, str):
            return f"{name} must be a JSON string"
        if "max_length" in fact and len(value) > fact["max_length"]:
            return f"{name} {value!r} is longer than MaxLength {fact['max_length']}"
    elif edm == "Edm.Decimal":
        if not isinstance(value, str):  # OData V2 JSON writes Edm.Decimal as a string
            return f"{name} must be a decimal string"
        number = Decimal(value)
        digits = number.as_tuple()
        scale = max(0, -int(digits.exponent))
        if scale > fact["scale"] or len(digits.digits) - scale > fact["precision"] - fact["scale"]:
            return f"{name} {value} does not fit Decimal({fact['precision']},{fact['scale']})"
    elif edm == "Edm.Boolean":
        if not isinstance(value, bool):
            return f"{name} must be true or false"
    elif edm == "Edm.DateTime":
        if not isinstance(value, str) or not DATE.match(value):
            return f"{name} must be /Date(ms)/"
    else:
        return f"{name}: the profile sends no {edm} today; teach this checker first"
    return None


def entity_problems(service: str, entity_set: str, body: Mapping[str, Any]) -> list[str]:
    facts = SERVICES[service]["entity_sets"][entity_set]
    problems = []
    for name, value in body.items():
        if name in facts["navigation"]:
            navigation = facts["navigation"][name]
            items = value if navigation["many"] else [value]
            assert isinstance(items, list), name
            for item in items:
                problems += entity_problems(service, navigation["target"], item)
        elif name not in facts["properties"]:
            problems.append(f"{entity_set} has no property {name}")
        elif (problem := _value_problem(name, facts["properties"][name], value)) is not None:
            problems.append(f"{entity_set}: {problem}")
    return problems


TERM = re.compile(r"(\w+) eq '((?:[^']|'')*)'")


def request_problems(request: sap.SapRequest) -> list[str]:
    service, _, rest = request.target.partition("/sap/opu/odata/sap/")[2].partition("/")
    service_path = f"/sap/opu/odata/sap/{service}"
    if service_path not in SERVICES:
        return [f"no service {service}"]
    entity_set, _, query = rest.partition("?")
    facts = SERVICES[service_path]["entity_sets"].get(entity_set)
    if facts is None:
        return [f"{service} has no entity set {entity_set}"]
    if request.method == "POST":
        assert request.body is not None and not query
        return entity_problems(service_path, entity_set, request.body)
    problems = []
    assert " " not in query and "+" not in query, "spaces are %20 in a query"
    options = dict(part.split("=", 1) for part in query.split("&"))
    assert options.get("$format") == "json"
    expression = unquote(options["$filter"])
    terms = TERM.findall(expression)
    assert " and ".join(f"{n} eq '{v}'" for n, v in terms) == expression, expression
    for name, literal in terms:
        fact = facts["properties"].get(name)
        if fact is None:
            problems.append(f"{entity_set} has no property {name} to filter on")
        elif (problem := _value_problem(name, fact, literal.replace("''", "'"))) is not None:
            problems.append(f"$filter: {problem}")
    return problems


# -- every request the profile renders ---------------------------------------------------------

SAP_CONFIG = SapConfig.model_validate(
    {
        "time_zone": "Europe/Berlin",
        "goods_receipt_storage_location": "0001",
        "units": {"XBX": {"internal": "KAR"}, "KWH": {"internal": "KWH"}},
        "usage_decisions": {
            "release": {"code": "A", "code_group": "01", "selected_set": "01"},
            "reject": {
                "code": "R",
                "code_group": "QM-UD-01",
                "selected_set": "UD-SET01",
                "selected_set_plant": "1010",
                "catalog": "3",
            },
        },
    }
)


def configured(**changes: Any) -> SapConfig:
    return SapConfig.model_validate({**SAP_CONFIG.model_dump(), **changes})


def text(max_size: int) -> st.SearchStrategy[str]:
    return st.text(
        st.characters(codec="ascii", exclude_characters="\x00"), min_size=1, max_size=max_size
    )


def quantity() -> st.SearchStrategy[str]:
    return st.decimals(
        min_value=0,
        max_value=Decimal("9999999999.999"),
        places=3,
        allow_nan=False,
        allow_infinity=False,
    ).map(lambda d: format(d, "f"))


def data_common() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"site": text(4), "order_id": text(12), "material": text(40), "lot_id": text(10)}
    )


UNITS = sorted(BUILTIN_UOM_CODES)
MAPPED = sorted({*sap.DEFAULT_UNITS, "XBX", "KWH"})
EVENT_ID = st.uuids().map(str)
TIME = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31), timezones=st.just(UTC)
).map(lambda t: t.isoformat().replace("+00:00", "Z"))


@st.composite
def confirmations(draw: st.DrawFn) -> tuple[dict[str, Any], SapConfig]:
    data = draw(data_common())
    uom = draw(st.sampled_from(MAPPED))
    data.update(
        operation=draw(st.from_regex(r"\A\d{4}\Z")),
        is_final=draw(st.booleans()),
        yield_quantity={"value": draw(quantity()), "uom": uom},
        scrap_quantity={"value": draw(quantity()), "uom": uom},
    )
    for optional in ("material", "lot_id"):
        if draw(st.booleans()):
            del data[optional]
    fields = draw(st.sampled_from(["iso", "internal", "both"]))
    event = {
        "id": draw(EVENT_ID),
        "time": draw(TIME),
        "type": "production.confirmation",
        "data": data,
    }
    return event, configured(unit_fields=fields)


@st.composite
def consumptions(draw: st.DrawFn) -> dict[str, Any]:
    data = draw(data_common())
    data["quantity"] = {"value": draw(quantity()), "uom": draw(st.sampled_from(MAPPED))}
    if draw(st.booleans()):
        del data["lot_id"]
    if draw(st.booleans()):
        data["storage_location"] = draw(text(4))
    return {"id": draw(EVENT_ID), "time": draw(TIME), "type": "material.consumed", "data": data}


@settings(max_examples=150, deadline=None)
@given(confirmations())
def test_every_confirmation_and_its_lookup_fit_sap_metadata(
    case: tuple[dict[str, Any], SapConfig],
) -> None:
    event, config = case
    request = sap.confirmation_request(event, config)
    assert request_problems(request) == []
    assert request_problems(sap.confirmation_lookup(event)) == []
    body = request.body
    assert body is not None
    assert body["ConfirmationText"] == event["id"]
    items = body["to_ProdnOrdConfMatlDocItm"]
    received = (
        "lot_id" in event["data"]
        and "material" in event["data"]
        and Decimal(event["data"]["yield_quantity"]["value"]) > 0
    )
    assert len(items) == (1 if received else 0)
    for item in items:  # the goods receipt as SAP's own clients send it
        assert (
            item["GoodsMovementType"],
            item["GoodsMovementRefDocType"],
            item["OrderItem"],
            item["StorageLocation"],
        ) == ("101", "F", "0001", "0001")


@settings(max_examples=100, deadline=None)
@given(consumptions())
def test_every_goods_issue_and_its_lookup_fit_sap_metadata(event: dict[str, Any]) -> None:
    request = sap.consumption_request(event, SAP_CONFIG)
    assert request_problems(request) == []
    assert request_problems(sap.consumption_lookup(event)) == []
    assert request.body is not None and request.body["GoodsMovementCode"] == "03"
    (item,) = request.body["to_MaterialDocumentItem"]
    assert item["GoodsMovementType"] == "261" and item["MaterialDocumentItemText"] == event["id"]


@settings(max_examples=100, deadline=None)
@given(data_common(), st.sampled_from(["release", "reject"]), text(12), st.booleans())
def test_every_usage_decision_and_its_lookups_fit_sap_metadata(
    data: dict[str, Any], disposition: str, inspection_lot: str, with_order: bool
) -> None:
    data["disposition"] = disposition
    if not with_order:
        del data["order_id"]
    request = sap.usage_decision_request(inspection_lot, data, SAP_CONFIG)
    assert request_problems(request) == []
    assert request_problems(sap.inspection_lot_lookup(data)) == []
    assert request_problems(sap.usage_decision_lookup(inspection_lot)) == []
    # Keyed by the inspection lot, with the code, its group and its selected set from config.
    assert request.body is not None and request.body["InspectionLot"] == inspection_lot
    wanted = SAP_CONFIG.usage_decisions[disposition]  # type: ignore[index]
    assert request.body["InspectionLotUsageDecisionCode"] == wanted.code
    assert request.body["InspLotUsageDecisionCodeGroup"] == wanted.code_group
    assert request.body["InspLotUsgeDcsnSelectedSet"] == wanted.selected_set


def test_the_profile_declares_the_lengths_sap_publishes() -> None:
    """FIELD_LIMITS and CONFIG_LIMITS are what the gateway enforces before sending; each must
    be SAP's MaxLength of that property wherever the profile sends it."""
    sent_in = {
        "Plant": [
            ("API_PROD_ORDER_CONFIRMATION_2_SRV", "ProdnOrdConfMatlDocItm"),
            ("API_MATERIAL_DOCUMENT_SRV", "A_MaterialDocumentItem"),
            ("API_INSPECTIONLOT_SRV", "A_InspectionLot"),
        ],
        "OrderID": [("API_PROD_ORDER_CONFIRMATION_2_SRV", "ProdnOrdConf2")],
        "OrderOperation": [("API_PROD_ORDER_CONFIRMATION_2_SRV", "ProdnOrdConf2")],
        "Material": [
            ("API_PROD_ORDER_CONFIRMATION_2_SRV", "ProdnOrdConfMatlDocItm"),
            ("API_MATERIAL_DOCUMENT_SRV", "A_MaterialDocumentItem"),
        ],
        "Batch": [
            ("API_PROD_ORDER_CONFIRMATION_2_SRV", "ProdnOrdConfMatlDocItm"),
            ("API_MATERIAL_DOCUMENT_SRV", "A_MaterialDocumentItem"),
            ("API_INSPECTIONLOT_SRV", "A_InspectionLot"),
        ],
        "StorageLocation": [
            ("API_MATERIAL_DOCUMENT_SRV", "A_MaterialDocumentItem"),
            ("API_PROD_ORDER_CONFIRMATION_2_SRV", "ProdnOrdConfMatlDocItm"),
        ],
        "InspectionLotUsageDecisionCode": [("API_INSPECTIONLOT_SRV", "A_InspLotUsageDecision")],
        "InspLotUsageDecisionCodeGroup": [("API_INSPECTIONLOT_SRV", "A_InspLotUsageDecision")],
        "InspLotUsgeDcsnSelectedSet": [("API_INSPECTIONLOT_SRV", "A_InspLotUsageDecision")],
        "SelectedCodeSetPlant": [("API_INSPECTIONLOT_SRV", "A_InspLotUsageDecision")],
        "InspLotUsageDecisionCatalog": [("API_INSPECTIONLOT_SRV", "A_InspLotUsageDecision")],
        "OrderItem": [("API_PROD_ORDER_CONFIRMATION_2_SRV", "ProdnOrdConfMatlDocItm")],
        "ConfirmationUnitISOCode": [("API_PROD_ORDER_CONFIRMATION_2_SRV", "ProdnOrdConf2")],
        "ConfirmationUnit": [("API_PROD_ORDER_CONFIRMATION_2_SRV", "ProdnOrdConf2")],
        "ConfirmationText": [("API_PROD_ORDER_CONFIRMATION_2_SRV", "ProdnOrdConf2")],
        "MaterialDocumentItemText": [("API_MATERIAL_DOCUMENT_SRV", "A_MaterialDocumentItem")],
        "MaterialDocumentHeaderText": [("API_MATERIAL_DOCUMENT_SRV", "A_MaterialDocumentHeader")],
    }
    declared = {
        limit.name: limit.max_length
        for limit in (*sap.FIELD_LIMITS.values(), *sap.CONFIG_LIMITS.values())
    }
    declared.update(sap.TEXT_LIMITS)
    assert set(declared) == set(sent_in)
    for name, places in sent_in.items():
        for service, entity_set in places:
            fact = SERVICES[f"/sap/opu/odata/sap/{service}"]["entity_sets"][entity_set]
            assert fact["properties"][name]["max_length"] == declared[name], (name, entity_set)


def test_units_go_to_the_fields_sap_defines_for_them() -> None:
    """ConfirmationUnit takes SAP's internal unit, ConfirmationUnitISOCode the ISO code; piece
    is PCE in SAP, never C62 or H87 in either field."""
    event = {
        "id": "6f1c3b8e-8d1c-5a57-9f7e-2b7f6f0a1c11",
        "time": "2026-03-01T10:00:00Z",
        "type": "production.confirmation",
        "data": {
            "site": "1010",
            "order_id": "1000123",
            "operation": "0010",
            "material": "FG-1",
            "lot_id": "L-1",
            "is_final": False,
            "yield_quantity": {"value": "5", "uom": "C62"},
            "scrap_quantity": {"value": "0", "uom": "C62"},
        },
    }
    both = configured(unit_fields="both")
    body = sap.confirmation_request(event, both).body
    assert body is not None
    assert (body["ConfirmationUnit"], body["ConfirmationUnitISOCode"]) == ("ST", "PCE")
    (item,) = body["to_ProdnOrdConfMatlDocItm"]
    assert (item["EntryUnit"], item["EntryUnitISOCode"]) == ("ST", "PCE")
    iso = sap.confirmation_request(event, SAP_CONFIG).body
    assert iso is not None and "ConfirmationUnit" not in iso
    assert iso["ConfirmationUnitISOCode"] == "PCE"
    plant = configured(units={"C62": {"internal": "PC"}}, unit_fields="internal")
    body = sap.confirmation_request(event, plant).body
    assert body is not None and body["ConfirmationUnit"] == "PC"


@pytest.mark.parametrize(
    ("time", "zone", "day"),
    [
        # 23:30 UTC on 1 March is already 2 March in Berlin (UTC+1 in winter).
        ("2026-03-01T23:30:00Z", "Europe/Berlin", "2026-03-02"),
        ("2026-03-01T23:30:00Z", "UTC", "2026-03-01"),
        # 03:00 UTC on 2 March is still 1 March in Chicago (UTC-6).
        ("2026-03-02T03:00:00Z", "America/Chicago", "2026-03-01"),
    ],
)
def test_posting_date_is_the_production_day_in_the_plant(time: str, zone: str, day: str) -> None:
    event = {
        "id": "6f1c3b8e-8d1c-5a57-9f7e-2b7f6f0a1c11",
        "time": time,
        "type": "production.confirmation",
        "data": {
            "site": "1010",
            "order_id": "1000123",
            "operation": "0010",
            "is_final": False,
            "yield_quantity": {"value": "5", "uom": "KGM"},
            "scrap_quantity": {"value": "0", "uom": "KGM"},
        },
    }
    body = sap.confirmation_request(event, configured(time_zone=zone)).body
    assert body is not None
    match = DATE.match(body["PostingDate"])
    assert match is not None
    # By hand: midnight UTC of the local day, in milliseconds.
    year, month, date = (int(part) for part in day.split("-"))
    assert int(match.group(1)) == calendar.timegm((year, month, date, 0, 0, 0)) * 1000


def test_the_old_usage_decision_shape_is_what_sap_refuses() -> None:
    """The body the profile used to send, judged by the same checker: every name is wrong."""
    old = {
        "Material": "FG-1",
        "Batch": "L-1",
        "Plant": "1010",
        "InspLotUsageDecisionCode": "A",
        "ChangedByText": "evt",
    }
    problems = entity_problems(sap.INSPECTION_SERVICE, "A_InspLotUsageDecision", old)
    assert len(problems) == 5, problems


def test_duplicate_lookups_are_spelled_as_sap_reads_them() -> None:
    """By hand: the filter of the lookup before a retry, OData literals quoted (a quote
    doubled) and every space %20 (SAP's gateway does not read + as a space)."""
    event = {
        "id": "6f1c3b8e-8d1c-5a57-9f7e-2b7f6f0a1c11",
        "time": "2026-03-01T10:00:00Z",
        "data": {"site": "1010", "order_id": "O'1 2", "material": "FG 1", "lot_id": "L-1"},
    }
    assert sap.confirmation_lookup(event).target == (
        "/sap/opu/odata/sap/API_PROD_ORDER_CONFIRMATION_2_SRV/ProdnOrdConf2?$filter=OrderID%20eq"
        "%20'O''1%202'%20and%20ConfirmationText%20eq%20'6f1c3b8e-8d1c-5a57-9f7e-2b7f6f0a1c11'"
        "&$format=json"
    )
    assert sap.inspection_lot_lookup(event["data"]).target == (
        "/sap/opu/odata/sap/API_INSPECTIONLOT_SRV/A_InspectionLot?$filter=Material%20eq%20"
        "'FG%201'%20and%20Batch%20eq%20'L-1'%20and%20Plant%20eq%20'1010'%20and%20"
        "InspectionLotOrigin%20eq%20'04'%20and%20ManufacturingOrder%20eq%20'O''1%202'"
        "&$format=json"
    )
