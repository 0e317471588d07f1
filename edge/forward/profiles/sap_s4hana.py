"""sap_s4hana: SAP S/4HANA OData V2 services, shaped as SAP's published metadata says.

The facts (entity sets, property names, Edm types, max lengths, keys) are SAP's own, extracted
from its generated clients on npm into `tests/fixtures/sap/*.json`; a conformance test renders
every request this module can build and checks it against them, so a property SAP does not
have, a wrong type or a value too long fails the tests, not a plant.

- `production.confirmation` → `API_PROD_ORDER_CONFIRMATION_2_SRV/ProdnOrdConf2`: order,
  operation, yield, scrap, unit (ISO and/or internal, per `sap.unit_fields`), final flag,
  `PostingDate` (the event's date in the plant's time zone), and, when the lot is known, the
  goods receipt of the yield as SAP's own clients send it: movement 101 with
  `GoodsMovementRefDocType` "F" (order), `OrderID`/`OrderItem`, the storage location, the
  batch, into quality-inspection stock (`InventoryUsabilityCode` "2").
- `material.consumed` → `API_MATERIAL_DOCUMENT_SRV/A_MaterialDocumentHeader`: a goods issue
  (`GoodsMovementCode` "03") with one 261 item for the order. Not a zero-quantity operation
  confirmation: a goods issue is not a confirmation, and one would add a confirmation record
  to an operation the MES never named (README: "Consumption: why a material document").
- `lot.disposition` → `API_INSPECTIONLOT_SRV/A_InspLotUsageDecision`, keyed by the inspection
  lot that the goods receipt opened. The profile finds it (`A_InspectionLot` by material,
  batch, plant and order, origin 04) and remembers it. Codes come from the config per
  disposition. Hold is not a usage decision in SAP: it is the absence of one, and the stock
  stays in quality inspection; so nothing is posted for a hold (the outbox records it as
  delivered with that reason).

Every change needs a CSRF token, fetched with `X-CSRF-Token: Fetch` and refetched when the
server answers 403 `X-CSRF-Token: Required`. SAP knows no idempotency header, so the event id
travels in a text field (`ConfirmationText`, `MaterialDocumentItemText`) and before any retry
the profile asks SAP whether the first attempt arrived (by `OrderID` and `ConfirmationText`;
by the item text; for a usage decision, whether the inspection lot has one). Every URL and
`$filter` literal is built by `edge.forward.urls` (spaces as `%20`, quotes doubled).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final
from zoneinfo import ZoneInfo

import httpx

from buffer.outbox import Delivery
from edge.config.destinations import DestinationConfig, SapConfig, SapUnit
from edge.forward.outcome import Outcome, Result, classify, delivered
from edge.forward.profiles.base import Profile, event_of
from edge.forward.session import Session
from edge.forward.urls import odata_string, path, query

log = logging.getLogger(__name__)

ODATA_ROOT: Final = "/sap/opu/odata/sap"
CONFIRMATION_SERVICE: Final = f"{ODATA_ROOT}/API_PROD_ORDER_CONFIRMATION_2_SRV"
INSPECTION_SERVICE: Final = f"{ODATA_ROOT}/API_INSPECTIONLOT_SRV"
MATERIAL_DOCUMENT_SERVICE: Final = f"{ODATA_ROOT}/API_MATERIAL_DOCUMENT_SRV"

QUALITY_INSPECTION_STOCK: Final = "2"
ORDER_REFERENCE: Final = "F"
"""GoodsMovementRefDocType of a movement that refers to a production order."""
GOODS_ISSUE: Final = "03"
"""GoodsMovementCode of a goods issue (BAPI_GOODSMVT_CREATE's GM_CODE 03)."""
GOODS_RECEIPT_FROM_PRODUCTION: Final = "04"
"""InspectionLotOrigin of the lot a goods receipt from production opens."""
INSPECTION_LOT_CACHE: Final = 4096


@dataclass(frozen=True, slots=True)
class SapField:
    """Where a canonical field lands in SAP, and how long SAP lets it be."""

    name: str
    max_length: int


FIELD_LIMITS: Final[Mapping[str, SapField]] = {
    "site": SapField("Plant", 4),
    "order_id": SapField("OrderID", 12),
    "operation": SapField("OrderOperation", 4),
    "material": SapField("Material", 40),
    "lot_id": SapField("Batch", 10),
    "storage_location": SapField("StorageLocation", 4),
}
"""The lengths SAP's metadata gives the fields the canonical data fills (checked against the
metadata fixture by tests/test_sap_conformance.py). Longer input is refused at the gateway's
door, as an input dead letter, rather than by SAP after it was accepted."""

TEXT_LIMITS: Final[Mapping[str, int]] = {
    "ConfirmationText": 40,
    "MaterialDocumentItemText": 50,
    "MaterialDocumentHeaderText": 25,
}

CONFIG_LIMITS: Final[Mapping[str, SapField]] = {
    "code": SapField("InspectionLotUsageDecisionCode", 4),
    "code_group": SapField("InspLotUsageDecisionCodeGroup", 8),
    "selected_set": SapField("InspLotUsgeDcsnSelectedSet", 8),
    "selected_set_plant": SapField("SelectedCodeSetPlant", 4),
    "catalog": SapField("InspLotUsageDecisionCatalog", 1),
    "goods_receipt_storage_location": SapField("StorageLocation", 4),
    "order_item": SapField("OrderItem", 4),
    "iso": SapField("ConfirmationUnitISOCode", 3),
    "internal": SapField("ConfirmationUnit", 3),
}
"""Limits of the values a technician writes in `destinations.*.sap` (checked by `check`)."""

DEFAULT_UNITS: Final[Mapping[str, SapUnit]] = {
    # ISO codes as SAP's T006 carries them: piece is PCE there, not C62 or H87.
    "C62": SapUnit(iso="PCE", internal="ST"),
    "H87": SapUnit(iso="PCE", internal="ST"),
    "EA": SapUnit(iso="EA", internal="EA"),
    "KGM": SapUnit(iso="KGM", internal="KG"),
    "GRM": SapUnit(iso="GRM", internal="G"),
    "TNE": SapUnit(iso="TNE", internal="TO"),
    "LTR": SapUnit(iso="LTR", internal="L"),
    "MLT": SapUnit(iso="MLT", internal="ML"),
    "MTQ": SapUnit(iso="MTQ", internal="M3"),
    "MTR": SapUnit(iso="MTR", internal="M"),
    "MMT": SapUnit(iso="MMT", internal="MM"),
    "CMT": SapUnit(iso="CMT", internal="CM"),
    "MTK": SapUnit(iso="MTK", internal="M2"),
    "HUR": SapUnit(iso="HUR", internal="H"),
    "MIN": SapUnit(iso="MIN", internal="MIN"),
    "SEC": SapUnit(iso="SEC", internal="S"),
}
"""SAP spellings of common units in a standard T006 (internal codes are the ones the English
logon shows are often different, e.g. PC for ST: set `sap.units` to what the plant's ERP
takes). Any other Rec 20 code is sent as its own ISO code and has no internal default."""


class UnmappedUnit(ValueError):
    """A canonical unit with no SAP spelling for a field that needs one."""


def sap_unit(uom: str, sap: SapConfig) -> SapUnit:
    """The plant's SAP spelling of a Rec 20 unit: its `sap.units` entry over the default."""
    default = DEFAULT_UNITS.get(uom, SapUnit(iso=uom, internal=None))
    configured = sap.units.get(uom)
    if configured is None:
        return default
    return SapUnit(
        iso=configured.iso or default.iso, internal=configured.internal or default.internal
    )


def unit_fields(
    uom: str,
    sap: SapConfig,
    iso_field: str,
    internal_field: str | None,
) -> dict[str, str]:
    """The unit properties of one quantity, as `sap.unit_fields` says (an entity without an ISO
    field, `internal_field` only, always takes the internal unit)."""
    spelled = sap_unit(uom, sap)
    wanted = sap.unit_fields if iso_field else "internal"
    fields: dict[str, str] = {}
    if wanted in ("internal", "both") and internal_field is not None:
        if spelled.internal is None:
            raise UnmappedUnit(
                f"unit {uom} has no SAP internal unit for {internal_field}: set "
                f"sap.units.{uom}.internal to the unit the plant's ERP uses"
            )
        fields[internal_field] = spelled.internal
    if wanted in ("iso", "both") and iso_field:
        assert spelled.iso is not None
        fields[iso_field] = spelled.iso
    return fields


def odata_date(moment: datetime, time_zone: ZoneInfo) -> str:
    """An OData V2 JSON Edm.DateTime date (`/Date(ms)/`, midnight UTC of the date) of the
    plant-local day `moment` falls on."""
    day = moment.astimezone(time_zone).date()
    midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return f"/Date({int(midnight.timestamp()) * 1000})/"


def _time(event: Mapping[str, Any]) -> datetime:
    return datetime.fromisoformat(str(event["time"]).replace("Z", "+00:00"))


def _quantity(value: str) -> str:
    """Edm.Decimal(13, 3) as SAP takes it: a string, at most 10 digits before the point and 3
    after (trailing zeros beyond the third place are dropped, never digits)."""
    number = Decimal(value)
    trimmed = (
        number.quantize(Decimal("0.001")) if number == number.quantize(Decimal("0.001")) else number
    )
    digits = trimmed.as_tuple()
    places = -int(digits.exponent) if isinstance(digits.exponent, int) else 0
    if places > 3 or len(digits.digits) - places > 10:
        raise UnmappedUnit(
            f"quantity {value} does not fit SAP's quantity fields (at most 10 "
            "digits before the point and 3 after)"
        )
    return format(trimmed.normalize() if places else trimmed, "f")


@dataclass(frozen=True, slots=True)
class SapRequest:
    """One request as SAP receives it: `target` is the path under the base URL, with the query
    already encoded."""

    method: str
    target: str
    entity_set: str
    body: dict[str, Any] | None = None
    params: Mapping[str, str] = field(default_factory=dict)


def _get(service: str, entity_set: str, params: Mapping[str, str]) -> SapRequest:
    target = path(entity_set, prefix=service) + "?" + query(params)
    return SapRequest("GET", target, entity_set, params=params)


def _post(service: str, entity_set: str, body: dict[str, Any]) -> SapRequest:
    return SapRequest("POST", path(entity_set, prefix=service), entity_set, body)


def _eq(name: str, value: str) -> str:
    return f"{name} eq {odata_string(value)}"


def confirmation_request(event: Mapping[str, Any], sap: SapConfig) -> SapRequest:
    data = event["data"]
    uom = data["yield_quantity"]["uom"]
    body: dict[str, Any] = {
        "OrderID": data["order_id"],
        "OrderOperation": data["operation"],
        "ConfirmationYieldQuantity": _quantity(data["yield_quantity"]["value"]),
        "ConfirmationScrapQuantity": _quantity(data["scrap_quantity"]["value"]),
        **unit_fields(uom, sap, "ConfirmationUnitISOCode", "ConfirmationUnit"),
        "IsFinalConfirmation": data["is_final"],
        "PostingDate": odata_date(_time(event), ZoneInfo(sap.time_zone)),
        "ConfirmationText": event["id"],
    }
    items = []
    if data.get("material") and data.get("lot_id") and Decimal(data["yield_quantity"]["value"]):
        item = {
            "Material": data["material"],
            "Plant": data["site"],
            "Batch": data["lot_id"],
            "GoodsMovementType": "101",
            "GoodsMovementRefDocType": ORDER_REFERENCE,
            "OrderID": data["order_id"],
            "OrderItem": sap.order_item,
            "InventoryUsabilityCode": QUALITY_INSPECTION_STOCK,
            "QuantityInEntryUnit": _quantity(data["yield_quantity"]["value"]),
            **unit_fields(uom, sap, "EntryUnitISOCode", "EntryUnit"),
        }
        if sap.goods_receipt_storage_location:
            item["StorageLocation"] = sap.goods_receipt_storage_location
        items.append(item)
    body["to_ProdnOrdConfMatlDocItm"] = items
    return _post(CONFIRMATION_SERVICE, "ProdnOrdConf2", body)


def confirmation_lookup(event: Mapping[str, Any]) -> SapRequest:
    """Did a confirmation with this event's id arrive? (`OrderID` narrows it to the order, as
    ConfirmationText alone is not indexed in SAP.)"""
    text = (
        _eq("OrderID", event["data"]["order_id"]) + " and " + _eq("ConfirmationText", event["id"])
    )
    return _get(CONFIRMATION_SERVICE, "ProdnOrdConf2", {"$filter": text, "$format": "json"})


def consumption_request(event: Mapping[str, Any], sap: SapConfig) -> SapRequest:
    data = event["data"]
    moment = _time(event)
    quantity = data["quantity"]
    item: dict[str, Any] = {
        # No GoodsMovementRefDocType: "F" marks a receipt for an order; an issue to an order
        # is a movement without reference whose account assignment is the order.
        "Material": data["material"],
        "Plant": data["site"],
        "GoodsMovementType": "261",
        "ManufacturingOrder": data["order_id"],
        "QuantityInEntryUnit": _quantity(quantity["value"]),
        **unit_fields(quantity["uom"], sap, "", "EntryUnit"),
        "MaterialDocumentItemText": event["id"],
    }
    if data.get("lot_id"):
        item["Batch"] = data["lot_id"]
    if data.get("storage_location"):
        item["StorageLocation"] = data["storage_location"]
    date = odata_date(moment, ZoneInfo(sap.time_zone))
    body = {
        "GoodsMovementCode": GOODS_ISSUE,
        "PostingDate": date,
        "DocumentDate": date,
        "MaterialDocumentHeaderText": f"PlantSync {data['order_id']}"[:25],
        "to_MaterialDocumentItem": [item],
    }
    return _post(MATERIAL_DOCUMENT_SERVICE, "A_MaterialDocumentHeader", body)


def consumption_lookup(event: Mapping[str, Any]) -> SapRequest:
    text = (
        _eq("MaterialDocumentItemText", event["id"])
        + " and "
        + _eq("ManufacturingOrder", event["data"]["order_id"])
    )
    return _get(
        MATERIAL_DOCUMENT_SERVICE, "A_MaterialDocumentItem", {"$filter": text, "$format": "json"}
    )


def inspection_lot_lookup(data: Mapping[str, Any]) -> SapRequest:
    """The inspection lots that goods receipts of this batch opened (origin 04)."""
    terms = [
        _eq("Material", data["material"]),
        _eq("Batch", data["lot_id"]),
        _eq("Plant", data["site"]),
        _eq("InspectionLotOrigin", GOODS_RECEIPT_FROM_PRODUCTION),
    ]
    if data.get("order_id"):
        terms.append(_eq("ManufacturingOrder", data["order_id"]))
    return _get(
        INSPECTION_SERVICE, "A_InspectionLot", {"$filter": " and ".join(terms), "$format": "json"}
    )


def usage_decision_lookup(inspection_lot: str) -> SapRequest:
    return _get(
        INSPECTION_SERVICE,
        "A_InspLotUsageDecision",
        {"$filter": _eq("InspectionLot", inspection_lot), "$format": "json"},
    )


def usage_decision_request(
    inspection_lot: str, data: Mapping[str, Any], sap: SapConfig
) -> SapRequest:
    decision = sap.usage_decisions[data["disposition"]]
    body = {
        "InspectionLot": inspection_lot,
        "InspLotUsageDecisionCatalog": decision.catalog,
        "InspLotUsgeDcsnSelectedSet": decision.selected_set,
        "SelectedCodeSetPlant": decision.selected_set_plant or data["site"],
        "InspLotUsageDecisionCodeGroup": decision.code_group,
        "InspectionLotUsageDecisionCode": decision.code,
    }
    return _post(INSPECTION_SERVICE, "A_InspLotUsageDecision", body)


def field_problems(event_type: str, data: Mapping[str, Any], sap: SapConfig) -> list[str]:
    """Why SAP would refuse this event's data, found before anything is sent: a value longer
    than SAP's field, a unit SAP cannot be told."""
    problems = [
        f"{name} {value!r} has {len(value)} characters; SAP's {limit.name} takes at most "
        f"{limit.max_length}"
        for name, limit in FIELD_LIMITS.items()
        if isinstance(value := data.get(name), str) and len(value) > limit.max_length
    ]
    quantities = {
        "production.confirmation": (
            "yield_quantity",
            "ConfirmationUnitISOCode",
            "ConfirmationUnit",
        ),
        "material.consumed": ("quantity", "", "EntryUnit"),
    }
    if event_type in quantities:
        name, iso_field, internal_field = quantities[event_type]
        quantity = data.get(name)
        if isinstance(quantity, Mapping) and isinstance(quantity.get("uom"), str):
            try:
                unit_fields(quantity["uom"], sap, iso_field, internal_field)
                _quantity(str(quantity.get("value")))
            except UnmappedUnit as exc:
                problems.append(str(exc))
    if (
        event_type == "lot.disposition"
        and data.get("disposition") in ("release", "reject")
        and (data["disposition"] not in sap.usage_decisions)
    ):
        problems.append(
            f"no usage decision is configured for {data['disposition']} "
            f"(sap.usage_decisions.{data['disposition']})"
        )
    return problems


def _results(response: httpx.Response) -> list[dict[str, Any]] | None:
    try:
        results = response.json()["d"]["results"]
    except (ValueError, KeyError, TypeError):
        return None
    return results if isinstance(results, list) else None


class SapS4HanaProfile(Profile):
    def __init__(self, config: DestinationConfig, session: Session) -> None:
        super().__init__(config, session)
        self.sap = config.sap
        self._csrf: str | None = None
        self._inspection_lots: OrderedDict[tuple[str, ...], str] = OrderedDict()

    async def send(self, deliveries: Sequence[Delivery]) -> list[Result]:
        return [await self._send_one(delivery) for delivery in deliveries]

    async def _send_one(self, delivery: Delivery) -> Result:
        event = event_of(delivery)
        data = event["data"]
        problems = field_problems(event["type"], data, self.sap)
        if problems:
            return Result(Outcome.REJECTED, None, "; ".join(problems))
        retry = delivery.attempts > 0
        try:
            match event["type"]:
                case "production.confirmation":
                    request = confirmation_request(event, self.sap)
                    lookup = confirmation_lookup(event) if retry else None
                case "material.consumed":
                    request = consumption_request(event, self.sap)
                    lookup = consumption_lookup(event) if retry else None
                case "lot.disposition":
                    return await self._decide(data, retry)
                case other:
                    return Result(
                        Outcome.REJECTED, None, f"the sap_s4hana profile cannot map {other} events"
                    )
        except (UnmappedUnit, KeyError, ValueError) as exc:  # data SAP cannot be given
            return Result(Outcome.REJECTED, None, f"cannot map this event for SAP: {exc!r}")
        return await self._create(request, lookup)

    async def _create(self, request: SapRequest, lookup: SapRequest | None) -> Result:
        if lookup is not None:
            found = await self._find(lookup)
            if found is not None:
                return found  # it did arrive last time: do not post it twice
        response = await self._post(request)
        return classify(response, reference=_reference(response))

    async def _decide(self, data: Mapping[str, Any], retry: bool) -> Result:
        if data["disposition"] == "hold":
            return delivered(
                None, "hold: no usage decision in SAP; the lot stays in quality-inspection stock"
            )
        lot = await self._inspection_lot(data)
        if isinstance(lot, Result):
            return lot
        if retry:
            response = await self._get(usage_decision_lookup(lot))
            results = _results(response) if response.status_code == 200 else None
            if results:
                return self._existing_decision(lot, results[0], data)
        response = await self._post(usage_decision_request(lot, data, self.sap))
        return classify(
            response,
            reference=f"inspection lot {lot}" if 200 <= response.status_code < 300 else None,
        )

    def _existing_decision(
        self, lot: str, entity: Mapping[str, Any], data: Mapping[str, Any]
    ) -> Result:
        wanted = self.sap.usage_decisions[data["disposition"]]
        code = entity.get("InspectionLotUsageDecisionCode")
        if code == wanted.code and entity.get("InspLotUsageDecisionCodeGroup") in (
            wanted.code_group,
            None,
        ):
            return delivered(200, f"inspection lot {lot} (found by lookup)")
        return Result(
            Outcome.REJECTED,
            200,
            f"inspection lot {lot} already has usage decision {code} "
            f"(by {entity.get('InspectionLotUsageDecidedBy') or 'someone'}); "
            f"{data['disposition']} was not posted: change it in SAP (QA12)",
        )

    async def _inspection_lot(self, data: Mapping[str, Any]) -> str | Result:
        """The inspection lot of the disposition's batch, from the cache or from SAP. A batch
        with no inspection lot yet is retried: its goods receipt may not be posted yet."""
        key = (
            data["site"],
            str(data.get("material") or ""),
            data["lot_id"],
            str(data.get("order_id") or ""),
        )
        cached = self._inspection_lots.get(key)
        if cached is not None:
            self._inspection_lots.move_to_end(key)
            return cached
        if not data.get("material"):
            return Result(
                Outcome.REJECTED,
                None,
                f"lot {data['lot_id']}: SAP finds inspection lots by material and "
                "batch, and this disposition names no material",
            )
        response = await self._get(inspection_lot_lookup(data))
        if response.status_code != 200:
            return classify(response)
        results = _results(response)
        if not results:
            return Result(
                Outcome.RETRY,
                200,
                f"SAP has no inspection lot (origin 04) yet for batch "
                f"{data['lot_id']} of material {data['material']} in plant "
                f"{data['site']}",
                not_ready=True,
            )
        # The newest lot of the batch is the one its latest goods receipt opened.
        lot = max(str(entity.get("InspectionLot", "")) for entity in results)
        self._inspection_lots[key] = lot
        while len(self._inspection_lots) > INSPECTION_LOT_CACHE:
            self._inspection_lots.popitem(last=False)
        return lot

    async def _find(self, lookup: SapRequest) -> Result | None:
        response = await self._get(lookup)
        results = _results(response) if response.status_code == 200 else None
        if not results:
            return None
        return delivered(200, f"{_entity_reference(results[0])} (found by lookup)")

    async def _get(self, request: SapRequest) -> httpx.Response:
        return await self.session.request(
            "GET", request.target, headers={"Accept": "application/json"}
        )

    async def _post(self, request: SapRequest) -> httpx.Response:
        for attempt in (1, 2):
            if self._csrf is None:
                await self._fetch_csrf()
            response = await self.session.request(
                "POST",
                request.target,
                content=json.dumps(request.body).encode(),
                headers={
                    "X-CSRF-Token": self._csrf or "",
                    "Accept": "application/json",
                    "Content-Type": "application/json",
                },
            )
            if response.status_code == 403 and (
                response.headers.get("X-CSRF-Token", "").lower() == "required"
            ):
                self._csrf = None  # expired or invalidated: fetch a new one and repeat once
                if attempt == 1:
                    continue
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fetch_csrf(self) -> None:
        response = await self.session.request(
            "GET",
            f"{CONFIRMATION_SERVICE}/",
            headers={"X-CSRF-Token": "Fetch", "Accept": "application/json"},
        )
        token = response.headers.get("X-CSRF-Token")
        if response.status_code >= 400 or not token or token.lower() == "required":
            raise httpx.HTTPStatusError(
                f"no CSRF token from {CONFIRMATION_SERVICE} (HTTP {response.status_code})",
                request=response.request,
                response=response,
            )
        self._csrf = token


def _reference(response: httpx.Response) -> str | None:
    try:
        entity = response.json()["d"]
    except (ValueError, KeyError, TypeError):
        return None
    return _entity_reference(entity) if isinstance(entity, dict) else None


def _entity_reference(entity: Mapping[str, Any]) -> str:
    if "ConfirmationGroup" in entity:
        return f"{entity['ConfirmationGroup']}/{entity.get('ConfirmationCount', '')}"
    if "MaterialDocument" in entity:
        return f"{entity['MaterialDocument']}/{entity.get('MaterialDocumentYear', '')}"
    return str(entity.get("InspectionLot") or "")
