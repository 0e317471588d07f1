"""sap_s4hana: SAP S/4HANA OData services.

- `production.confirmation` → `API_PROD_ORDER_CONFIRMATION_2_SRV/ProdnOrdConf2`: order,
  operation, yield, scrap, unit, final flag, and a goods receipt (movement type 101) of the
  yield into quality-inspection stock for the lot, so it is not usable before quality
  releases it.
- `material.consumed` → the same service, a confirmation that only issues the material
  (movement type 261) from its lot.
- `lot.disposition` → `API_INSPECTIONLOT_SRV/A_InspLotUsageDecision`: accept (release), reject,
  or hold.

Every change needs a CSRF token, fetched with `X-CSRF-Token: Fetch` and refetched when the
server answers 403 `X-CSRF-Token: Required`. SAP knows no idempotency header: the event id
goes into `ConfirmationText`, and before any retry of a confirmation the profile looks for a
confirmation with that text, so an ambiguous failure (a timeout after sending) is never posted
twice. Units are sent as the canonical model's UN/ECE Rec 20 codes, which are SAP's ISO unit
codes; a system that wants its internal units needs them mapped (not done here yet).
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import httpx

from buffer.outbox import Delivery
from edge.forward.outcome import Outcome, Result, classify, delivered
from edge.forward.profiles.base import Profile, event_of

CONFIRMATION_SERVICE = "/sap/opu/odata/sap/API_PROD_ORDER_CONFIRMATION_2_SRV"
USAGE_DECISION_SERVICE = "/sap/opu/odata/sap/API_INSPECTIONLOT_SRV"
USAGE_DECISION_CODES = {"release": "A", "reject": "R", "hold": "H"}
QUALITY_INSPECTION_STOCK = "2"


class SapS4HanaProfile(Profile):
    _csrf: str | None = None

    async def send(self, deliveries: Sequence[Delivery]) -> list[Result]:
        return [await self._send_one(delivery) for delivery in deliveries]

    async def _send_one(self, delivery: Delivery) -> Result:
        event = event_of(delivery)
        data = event["data"]
        match event["type"]:
            case "production.confirmation":
                body = confirmation(event["id"], data)
                path = f"{CONFIRMATION_SERVICE}/ProdnOrdConf2"
            case "material.consumed":
                body = consumption(event["id"], data)
                path = f"{CONFIRMATION_SERVICE}/ProdnOrdConf2"
            case "lot.disposition":
                body = usage_decision(event["id"], data)
                path = f"{USAGE_DECISION_SERVICE}/A_InspLotUsageDecision"
            case other:
                return Result(Outcome.REJECTED, None,
                              f"the sap_s4hana profile cannot map {other} events")
        if delivery.attempts > 0 and path.endswith("ProdnOrdConf2"):
            found = await self._find_confirmation(event["id"])
            if found is not None:
                return found  # it did arrive last time: do not post it twice
        response = await self._post(path, body)
        if response.status_code == 201 or 200 <= response.status_code < 300:
            return classify(response, reference=_reference(response))
        return classify(response)

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        for attempt in (1, 2):
            if self._csrf is None:
                await self._fetch_csrf()
            response = await self.session.request(
                "POST", path, json=body,
                headers={"X-CSRF-Token": self._csrf or "", "Accept": "application/json"})
            if response.status_code == 403 and (
                    response.headers.get("X-CSRF-Token", "").lower() == "required"):
                self._csrf = None  # expired or invalidated: fetch a new one and repeat once
                if attempt == 1:
                    continue
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fetch_csrf(self) -> None:
        response = await self.session.request(
            "GET", f"{CONFIRMATION_SERVICE}/",
            headers={"X-CSRF-Token": "Fetch", "Accept": "application/json"})
        token = response.headers.get("X-CSRF-Token")
        if response.status_code >= 400 or not token or token.lower() == "required":
            raise httpx.HTTPStatusError(
                f"no CSRF token from {CONFIRMATION_SERVICE} (HTTP {response.status_code})",
                request=response.request, response=response)
        self._csrf = token

    async def _find_confirmation(self, event_id: str) -> Result | None:
        response = await self.session.request(
            "GET", f"{CONFIRMATION_SERVICE}/ProdnOrdConf2",
            params={"$filter": f"ConfirmationText eq '{event_id}'", "$format": "json"},
            headers={"Accept": "application/json"})
        if response.status_code != 200:
            return None
        try:
            results = response.json()["d"]["results"]
        except (ValueError, KeyError, TypeError):
            return None
        if not results:
            return None
        return delivered(200, f"{_confirmation_reference(results[0])} (found by lookup)")


def confirmation(event_id: str, data: dict[str, Any]) -> dict[str, Any]:
    uom = data["yield_quantity"]["uom"]
    body: dict[str, Any] = {
        "OrderID": data["order_id"],
        "OrderOperation": data["operation"],
        "Plant": data["site"],
        "ConfirmationYieldQuantity": data["yield_quantity"]["value"],
        "ConfirmationScrapQuantity": data["scrap_quantity"]["value"],
        "ConfirmationUnit": uom,
        "IsFinalConfirmation": data["is_final"],
        "ConfirmationText": event_id,
        "to_ProdnOrdConfMatlDocItm": [],
    }
    if data.get("material") and data.get("lot_id") and Decimal(data["yield_quantity"]["value"]):
        body["to_ProdnOrdConfMatlDocItm"].append({
            "Material": data["material"], "Plant": data["site"], "Batch": data["lot_id"],
            "GoodsMovementType": "101", "EntryUnit": uom,
            "QuantityInEntryUnit": data["yield_quantity"]["value"],
            "InventoryUsabilityCode": QUALITY_INSPECTION_STOCK})
    return body


def consumption(event_id: str, data: dict[str, Any]) -> dict[str, Any]:
    quantity = data["quantity"]
    item: dict[str, Any] = {
        "Material": data["material"], "Plant": data["site"], "GoodsMovementType": "261",
        "EntryUnit": quantity["uom"], "QuantityInEntryUnit": quantity["value"]}
    if data.get("lot_id"):
        item["Batch"] = data["lot_id"]
    if data.get("storage_location"):
        item["StorageLocation"] = data["storage_location"]
    return {
        "OrderID": data["order_id"], "OrderOperation": data.get("operation") or "0010",
        "Plant": data["site"], "ConfirmationYieldQuantity": "0",
        "ConfirmationScrapQuantity": "0", "ConfirmationUnit": quantity["uom"],
        "IsFinalConfirmation": False,
        "ConfirmationText": event_id, "to_ProdnOrdConfMatlDocItm": [item]}


def usage_decision(event_id: str, data: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "Material": data.get("material"), "Batch": data["lot_id"], "Plant": data["site"],
        "InspLotUsageDecisionCode": USAGE_DECISION_CODES[data["disposition"]],
        "ChangedByText": event_id}
    if data.get("inspection_id"):
        body["InspectionLot"] = data["inspection_id"]
    return body


def _reference(response: httpx.Response) -> str | None:
    try:
        entity = response.json()["d"]
    except (ValueError, KeyError, TypeError):
        return None
    return _confirmation_reference(entity) if isinstance(entity, dict) else None


def _confirmation_reference(entity: dict[str, Any]) -> str:
    if "ConfirmationGroup" in entity:
        return f"{entity['ConfirmationGroup']}/{entity.get('ConfirmationCount', '')}"
    return str(entity.get("InspectionLot") or entity.get("Batch") or "")
