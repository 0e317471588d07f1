"""What SAP S/4HANA accepts, from SAP's published metadata (`tests/fixtures/sap/*.json`): the
services, entity sets and properties, their Edm types, lengths, precision and scale, the unit
table, and the parsing of confirmation, material document and usage decision bodies and of
`$filter`. A body SAP would refuse raises `ODataError` before anything is stored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from simulators.erp.inventory import USABILITY_CODES, decimal_text

JsonObject = dict[str, Any]
Endpoint = Callable[[Request], Awaitable[Response]]


SAP_ODATA = "/sap/opu/odata/sap"
CONFIRMATION_SERVICE = f"{SAP_ODATA}/API_PROD_ORDER_CONFIRMATION_2_SRV"
INSPECTION_SERVICE = f"{SAP_ODATA}/API_INSPECTIONLOT_SRV"
MATERIAL_DOCUMENT_SERVICE = f"{SAP_ODATA}/API_MATERIAL_DOCUMENT_SRV"
MATERIAL_DOCUMENT_SET = "A_MaterialDocumentHeader"
MATERIAL_DOCUMENT_ITEM_SET = "A_MaterialDocumentItem"
INSPECTION_LOT_SET = "A_InspectionLot"
CONFIRMATION_SET = "ProdnOrdConf2"
MATERIAL_DOCUMENT_ITEMS = "to_ProdnOrdConfMatlDocItm"
USAGE_DECISION_SET = "A_InspLotUsageDecision"
FILTER_TERM = re.compile(r"\s*([A-Za-z_]\w*)\s+eq\s+'((?:[^']|'')*)'\s*")
FILTER_AND = re.compile(r"and\s+")
CONFIRMATION_KEY = re.compile(r"^ConfirmationGroup='(\d+)',ConfirmationCount='(\d+)'$")


class ODataError(Exception):
    """A request the OData services refuse; answered as an OData v2 error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


SAP_METADATA_DIR = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "sap"
"""SAP's published metadata, extracted from its generated clients on npm (see extract.py)."""
SYNTAX_ERROR = "/IWBEP/CM_MGW_RT/020"
"""The SAP Gateway message a request body that does not fit the metadata is answered with."""
ODATA_DATE = re.compile(r"^/Date\((-?\d+)\)/$")
ODATA_DATE_OFFSET = re.compile(r"^/Date\((-?\d+)([+-]\d{4})?\)/$")
ISO_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?$")
ODATA_TIME = re.compile(r"^PT(\d{1,2}H)?(\d{1,2}M)?(\d{1,2}(\.\d+)?S)?$")
GUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
DECIMAL_TEXT = re.compile(r"^[+-]?(\d*)(?:\.(\d*))?$")
INTEGER_RANGES = {
    "Edm.Byte": (0, 255),
    "Edm.SByte": (-128, 127),
    "Edm.Int16": (-(2**15), 2**15 - 1),
    "Edm.Int32": (-(2**31), 2**31 - 1),
}

UNITS = {
    # internal unit (T006-MSEHI, or its English commercial spelling) -> ISO code (T006-ISOCODE)
    "ST": "PCE",
    "PC": "PCE",
    "EA": "EA",
    "KG": "KGM",
    "G": "GRM",
    "TO": "TNE",
    "L": "LTR",
    "ML": "MLT",
    "M3": "MTQ",
    "M": "MTR",
    "MM": "MMT",
    "CM": "CMT",
    "M2": "MTK",
    "H": "HUR",
    "MIN": "MIN",
    "S": "SEC",
    "KAR": "CT",
}
"""A standard system's unit table, in part: an ISO code that no unit carries (C62, H87) or an
internal unit that does not exist is refused, as SAP refuses it."""
ISO_UNITS = frozenset(UNITS.values())

USAGE_DECISION_CATALOG = {
    # (selected set, code group, code) -> where the stock goes (the code's valuation)
    ("01", "01", "A"): "unrestricted",
    ("01", "01", "R"): "blocked",
}
"""The selected set the simulator's plants use for usage decisions (catalog type 3)."""
GOODS_MOVEMENT_CODES = frozenset({"01", "02", "03", "04", "05", "06", "07"})


class SapMetadata:
    """The entity sets of SAP's services as facts, and the checks SAP Gateway applies with
    them: an unknown property, a value of the wrong type or one longer than its MaxLength is
    a 400 before any business logic runs."""

    def __init__(self, directory: Path = SAP_METADATA_DIR) -> None:
        self.services: dict[str, JsonObject] = {}
        for file in sorted(directory.glob("*.json")):
            facts = json.loads(file.read_text(encoding="utf-8"))
            self.services[facts["service_path"]] = facts
        if not self.services:
            raise FileNotFoundError(f"no SAP metadata (*.json) in {directory}")

    def entity_type(self, service: str, entity_set: str) -> JsonObject:
        facts: JsonObject = self.services[service]["entity_sets"][entity_set]
        return facts

    def check_entity(self, service: str, entity_set: str, body: object, where: str) -> None:
        if not isinstance(body, dict):
            raise bad_request("INVALID_BODY", f"{where} must be a JSON object")
        facts = self.entity_type(service, entity_set)
        for name, value in body.items():
            if name == "__metadata":
                continue
            navigation = facts["navigation"].get(name)
            if navigation is not None:
                items = (
                    value.get("results")
                    if isinstance(value, dict) and navigation["many"]
                    else value
                )
                if not navigation["many"]:
                    items = [items]
                if not isinstance(items, list):
                    raise bad_request(
                        "INVALID_BODY", f"{where}: navigation property {name} must be a list"
                    )
                for number, item in enumerate(items):
                    self.check_entity(
                        service, navigation["target"], item, f"{where}.{name}[{number}]"
                    )
                continue
            fact = facts["properties"].get(name)
            if fact is None:
                raise ODataError(
                    400,
                    SYNTAX_ERROR,
                    f"Property '{name}' is invalid for entity set {entity_set} ({where})",
                )
            problem = _edm_problem(fact, value)
            if problem is not None:
                raise ODataError(400, SYNTAX_ERROR, f"{where}: property {name}: {problem}")

    def check_filter(self, service: str, entity_set: str, terms: Sequence[tuple[str, str]]) -> None:
        properties = self.entity_type(service, entity_set)["properties"]
        for name, value in terms:
            fact = properties.get(name)
            if fact is None:
                raise bad_request(
                    "INVALID_FILTER", f"Property '{name}' is not a property of {entity_set}"
                )
            if fact["type"] != "Edm.String":
                raise bad_request(
                    "INVALID_FILTER", f"$filter: {name} is {fact['type']}, not a string literal"
                )
            if len(value) > fact.get("max_length", len(value)):
                raise bad_request(
                    "INVALID_FILTER",
                    f"$filter: '{value}' is longer than {name} ({fact['max_length']} characters)",
                )


def _edm_problem(fact: Mapping[str, Any], value: object) -> str | None:
    """Why `value` is not a valid OData V2 JSON value of the property, or None."""
    edm = fact["type"]
    if value is None:
        return None if fact["nullable"] else "must not be null"
    shown = json.dumps(value)
    if edm == "Edm.String":
        if not isinstance(value, str):
            return f"Edm.String expects a string, got {shown}"
        limit = fact.get("max_length")
        if limit is not None and len(value) > limit:
            return f"value '{value}' is longer than its MaxLength {limit}"
        return None
    if edm == "Edm.Decimal":
        shape = DECIMAL_TEXT.match(value) if isinstance(value, str) else None
        if shape is None or not (shape.group(1) or shape.group(2)):
            return f"Edm.Decimal expects a decimal string, got {shown}"
        integer, fraction = shape.group(1).lstrip("0"), (shape.group(2) or "").rstrip("0")
        precision, scale = fact.get("precision", 38), fact.get("scale", 0)
        if len(fraction) > scale or len(integer) > precision - scale:
            return f"{value} does not fit Edm.Decimal(Precision={precision}, Scale={scale})"
        return None
    if edm in INTEGER_RANGES:
        low, high = INTEGER_RANGES[edm]
        whole = isinstance(value, int) and not isinstance(value, bool)
        if whole and low <= value <= high:  # type: ignore[operator]
            return None
        return f"{edm} expects an integer in [{low}, {high}], got {shown}"
    checks: dict[str, tuple[Callable[[object], bool], str]] = {
        "Edm.Boolean": (lambda v: isinstance(v, bool), "true or false"),
        "Edm.DateTime": (
            lambda v: isinstance(v, str) and bool(ODATA_DATE.match(v) or ISO_DATE_TIME.match(v)),
            '"/Date(<ms>)/"',
        ),
        "Edm.DateTimeOffset": (
            lambda v: isinstance(v, str) and bool(ODATA_DATE_OFFSET.match(v)),
            '"/Date(<ms>+0000)/"',
        ),
        "Edm.Time": (lambda v: isinstance(v, str) and bool(ODATA_TIME.match(v)), "PT<h>H<m>M<s>S"),
        "Edm.Guid": (lambda v: isinstance(v, str) and bool(GUID.match(v)), "a GUID string"),
        "Edm.Int64": (
            lambda v: isinstance(v, str) and v.lstrip("-").isdigit(),
            "a string of digits",
        ),
    }
    check = checks.get(edm)
    if check is None or check[0](value):
        return None
    return f"{edm} expects {check[1]}, got {shown}"


def bad_request(code: str, message: str) -> ODataError:
    return ODataError(400, f"SIM/{code}", message)


def _unit(body: JsonObject, internal: str, iso: str, where: str, *, required: bool) -> str | None:
    """The unit of a quantity as SAP resolves it (its ISO code), from the internal unit, the
    ISO code, or both when they agree."""
    given_internal, given_iso = body.get(internal), body.get(iso)
    if given_internal is not None and given_internal not in UNITS:
        raise bad_request(
            "UNIT",
            f"{where}: unit {given_internal} is not defined ({internal}"
            " takes a unit of the unit table, e.g. PC or KG)",
        )
    if given_iso is not None and given_iso not in ISO_UNITS:
        raise bad_request(
            "UNIT", f"{where}: ISO code {given_iso} is not assigned to any unit ({iso})"
        )
    if given_internal is not None and given_iso is not None and UNITS[given_internal] != given_iso:
        raise bad_request(
            "UNIT",
            f"{where}: {internal} {given_internal} and {iso} {given_iso} are different units",
        )
    if given_internal is None and given_iso is None:
        if required:
            raise bad_request("UNIT", f"{where}: give the unit in {internal} or {iso}")
        return None
    return str(given_iso if given_iso is not None else UNITS[str(given_internal)])


def _required(body: JsonObject, names: Sequence[str], where: str) -> None:
    for name in names:
        if body.get(name) in (None, ""):
            raise bad_request("MISSING_PROPERTY", f"{where}: property {name} is required")


def _items(body: JsonObject, name: str) -> list[JsonObject]:
    items = body.get(name, [])
    if isinstance(items, dict):
        items = items.get("results", [])
    return list(items)


def parse_confirmation(metadata: SapMetadata, body: object) -> JsonObject:
    """Validate a ProdnOrdConf2 create body; return its normalised properties."""
    where = CONFIRMATION_SET
    metadata.check_entity(CONFIRMATION_SERVICE, CONFIRMATION_SET, body, where)
    assert isinstance(body, dict)
    _required(body, ("OrderID", "OrderOperation"), where)
    fields = {
        name: value
        for name, value in body.items()
        if name not in ("__metadata", MATERIAL_DOCUMENT_ITEMS)
    }
    unit = _unit(body, "ConfirmationUnit", "ConfirmationUnitISOCode", where, required=False)
    if unit is not None:
        fields["ConfirmationUnitISOCode"] = unit
    fields.setdefault("Sequence", "0")
    fields.setdefault("ConfirmationText", "")
    for name in ("ConfirmationYieldQuantity", "ConfirmationScrapQuantity"):
        fields[name] = decimal_text(Decimal(body.get(name) or "0"))
    fields.setdefault("IsFinalConfirmation", False)
    items = []
    for number, item in enumerate(_items(body, MATERIAL_DOCUMENT_ITEMS)):
        at = f"{MATERIAL_DOCUMENT_ITEMS}[{number}]"
        _required(item, ("Material", "Plant", "GoodsMovementType", "QuantityInEntryUnit"), at)
        movement = item["GoodsMovementType"]
        if movement not in ("101", "261"):
            raise bad_request(
                "MOVEMENT_TYPE",
                f"{at}: GoodsMovementType {movement!r} is not"
                " 101 (goods receipt) or 261 (goods issue)",
            )
        if movement == "101" and item.get("GoodsMovementRefDocType") != "F":
            raise bad_request(
                "REF_DOC_TYPE", f"{at}: a 101 receipt for the order needs GoodsMovementRefDocType F"
            )
        if movement == "101":
            _required(item, ("Batch",), at)
        usability = item.get("InventoryUsabilityCode", "")
        if usability not in USABILITY_CODES:
            raise bad_request(
                "INVALID_VALUE",
                f"{at}: InventoryUsabilityCode {usability!r} is"
                " not '' (unrestricted), '2' or 'X' (quality inspection) or '3'",
            )
        quantity = Decimal(item["QuantityInEntryUnit"])
        if quantity <= 0:
            raise bad_request("INVALID_DECIMAL", f"{at}: QuantityInEntryUnit must be positive")
        unit = _unit(item, "EntryUnit", "EntryUnitISOCode", at, required=True)
        items.append(
            {
                **{k: v for k, v in item.items() if k != "__metadata"},
                "Batch": item.get("Batch", ""),
                "EntryUnitISOCode": unit,
                "EntryUnit": item.get("EntryUnit") or unit,
                "QuantityInEntryUnit": decimal_text(quantity),
            }
        )
    fields[MATERIAL_DOCUMENT_ITEMS] = items
    return fields


def parse_material_document(metadata: SapMetadata, body: object) -> JsonObject:
    """Validate an A_MaterialDocumentHeader create body (a goods issue to an order)."""
    where = MATERIAL_DOCUMENT_SET
    metadata.check_entity(MATERIAL_DOCUMENT_SERVICE, MATERIAL_DOCUMENT_SET, body, where)
    assert isinstance(body, dict)
    _required(body, ("GoodsMovementCode",), where)
    code = body["GoodsMovementCode"]
    if code not in GOODS_MOVEMENT_CODES:
        raise bad_request("GM_CODE", f"{where}: GoodsMovementCode {code!r} is not 01..07")
    if code != "03":
        raise bad_request(
            "GM_CODE", f"{where}: only goods issues (GoodsMovementCode 03) are simulated"
        )
    items = _items(body, "to_MaterialDocumentItem")
    if not items:
        raise bad_request("NO_ITEMS", f"{where}: a material document needs at least one item")
    checked = []
    for number, item in enumerate(items):
        at = f"to_MaterialDocumentItem[{number}]"
        _required(
            item, ("Material", "Plant", "GoodsMovementType", "QuantityInEntryUnit", "EntryUnit"), at
        )
        if item["GoodsMovementType"] != "261":
            raise bad_request(
                "MOVEMENT_TYPE",
                f"{at}: GoodsMovementType"
                f" {item['GoodsMovementType']!r} is not 261 (issue to an order)",
            )
        _required(item, ("ManufacturingOrder",), at)
        _unit(item, "EntryUnit", "", at, required=True)
        quantity = Decimal(item["QuantityInEntryUnit"])
        if quantity <= 0:
            raise bad_request("INVALID_DECIMAL", f"{at}: QuantityInEntryUnit must be positive")
        checked.append(
            {
                **{k: v for k, v in item.items() if k != "__metadata"},
                "QuantityInEntryUnit": decimal_text(quantity),
            }
        )
    fields = {
        name: value
        for name, value in body.items()
        if name not in ("__metadata", "to_MaterialDocumentItem")
    }
    fields["to_MaterialDocumentItem"] = checked
    return fields


def parse_usage_decision(metadata: SapMetadata, body: object) -> tuple[JsonObject, str]:
    """Validate an A_InspLotUsageDecision create body; return its properties and where the
    stock goes (the code's valuation in the selected set)."""
    where = USAGE_DECISION_SET
    metadata.check_entity(INSPECTION_SERVICE, USAGE_DECISION_SET, body, where)
    assert isinstance(body, dict)
    _required(
        body,
        (
            "InspectionLot",
            "InspLotUsgeDcsnSelectedSet",
            "InspLotUsageDecisionCodeGroup",
            "InspectionLotUsageDecisionCode",
        ),
        where,
    )
    if body.get("InspLotUsageDecisionCatalog", "3") != "3":
        raise bad_request(
            "CATALOG",
            f"{where}: usage decisions are in catalog 3, not"
            f" {body['InspLotUsageDecisionCatalog']!r}",
        )
    key = (
        body["InspLotUsgeDcsnSelectedSet"],
        body["InspLotUsageDecisionCodeGroup"],
        body["InspectionLotUsageDecisionCode"],
    )
    target = USAGE_DECISION_CATALOG.get(key)
    if target is None:
        raise bad_request(
            "UD_CODE",
            f"{where}: code {key[2]} of code group {key[1]} is not in selected set {key[0]}",
        )
    return {name: value for name, value in body.items() if name != "__metadata"}, target


def parse_filter(expression: str) -> list[tuple[str, str]]:
    """Parse ``Prop eq 'value' [and Prop eq 'value' ...]``, the only $filter form served."""
    terms = []
    position = 0
    while True:
        term = FILTER_TERM.match(expression, position)
        if term is None:
            raise bad_request(
                "INVALID_FILTER",
                f"$filter {expression!r} is not understood here: use Property eq 'value',"
                " joined by and",
            )
        terms.append((term.group(1), term.group(2).replace("''", "'")))
        position = term.end()
        if position == len(expression):
            return terms
        joined = FILTER_AND.match(expression, position)
        if joined is None:
            raise bad_request("INVALID_FILTER", f"$filter {expression!r}: expected 'and'")
        position = joined.end()
