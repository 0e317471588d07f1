"""Reconciliation's ERP side: what ERP holds of an order, read from the ERP destination the
gateway confirms to. `SapErpReader` asks SAP S/4HANA for the order's confirmations
(`ProdnOrdConf2`) and each lot's inspection lot and usage decision; `CanonicalErpReader` asks the
canonical ERP's `GET <orders_path>/<order_id>/confirmed`. `erp_destination` picks the destination
to reconcile against and `erp_reader` the reader for its profile; `ReconcileError` is what they
raise when ERP cannot be asked. `edge/ops/reconcile.py` compares what they read with the
gateway's, MES's and the QMS's figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, Protocol

import httpx

from edge.config.destinations import DestinationConfig
from edge.config.models import PlantConfig
from edge.forward.profiles.sap_s4hana import (
    CONFIRMATION_SERVICE,
    inspection_lot_lookup,
    usage_decision_lookup,
)
from edge.forward.session import Session
from edge.forward.urls import odata_string, path, query
from edge.ops.ledger import decimal_of

StockStatus = Literal["unrestricted", "quality_inspection", "blocked", "unknown"]
MAX_PAGES = 100


class ReconcileError(Exception):
    """ERP could not be asked (unreachable, refused, an answer that cannot be read)."""


@dataclass(frozen=True, slots=True)
class ErpConfirmation:
    reference: str
    """ERP's own key (SAP: ConfirmationGroup/ConfirmationCount; canonical: its reference)."""
    event_id: str | None
    """The gateway's event id it carries (SAP: ConfirmationText), None if it carries none."""
    operation: str | None
    yield_value: Decimal
    scrap_value: Decimal
    uom: str | None
    reversed: bool
    entered_by: str | None = None


@dataclass(frozen=True, slots=True)
class ErpOrder:
    confirmations: list[ErpConfirmation]
    lots: dict[str, StockStatus] = field(default_factory=dict)


class ErpReader(Protocol):
    async def order(self, order_id: str, lots: Mapping[str, str | None]) -> ErpOrder: ...


# -- ERP readers --------------------------------------------------------------------------------


def _results(response: httpx.Response, what: str) -> tuple[list[dict[str, Any]], str | None]:
    if response.status_code != 200:
        raise ReconcileError(
            f"ERP answered {response.status_code} to {what}: {response.text[:300]}"
        )
    try:
        body = response.json()["d"]
        results = body["results"] if isinstance(body, dict) and "results" in body else body
        if not isinstance(results, list):
            raise TypeError("no result list")
    except (ValueError, KeyError, TypeError) as exc:
        raise ReconcileError(f"ERP's answer to {what} is not an OData list: {exc}") from exc
    next_link = body.get("__next") if isinstance(body, dict) else None
    return [r for r in results if isinstance(r, dict)], next_link


class SapErpReader:
    """SAP S/4HANA: an order's confirmations, and each lot's inspection lot and usage decision."""

    def __init__(self, session: Session, destination: DestinationConfig, site: str) -> None:
        self.session = session
        self.sap = destination.sap
        self.site = site

    async def _list(self, target: str, what: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for _ in range(MAX_PAGES):  # server-side paging: follow __next
            response = await self.session.request(
                "GET", target, headers={"Accept": "application/json"}
            )
            results, next_link = _results(response, what)
            found += results
            if not next_link:
                return found
            target = next_link
        raise ReconcileError(f"{what}: more than {MAX_PAGES} pages")

    async def order(self, order_id: str, lots: Mapping[str, str | None]) -> ErpOrder:
        target = (
            path("ProdnOrdConf2", prefix=CONFIRMATION_SERVICE)
            + "?"
            + query({"$filter": f"OrderID eq {odata_string(order_id)}", "$format": "json"})
        )
        rows = await self._list(target, f"the confirmations of order {order_id}")
        confirmations = [
            ErpConfirmation(
                reference=f"{row.get('ConfirmationGroup')}/{row.get('ConfirmationCount')}",
                event_id=str(row.get("ConfirmationText") or "") or None,
                operation=row.get("OrderOperation"),
                yield_value=decimal_of(row.get("ConfirmationYieldQuantity")),
                scrap_value=decimal_of(row.get("ConfirmationScrapQuantity")),
                uom=row.get("ConfirmationUnitISOCode") or row.get("ConfirmationUnit"),
                reversed=bool(row.get("IsReversed") or row.get("IsReversal")),
                entered_by=row.get("EnteredByUser"),
            )
            for row in rows
        ]
        statuses = {
            lot_id: await self._lot(order_id, lot_id, material)
            for lot_id, material in lots.items()
            if material
        }
        return ErpOrder(confirmations, statuses)

    async def _lot(self, order_id: str, lot_id: str, material: str) -> StockStatus:
        request = inspection_lot_lookup(
            {"material": material, "lot_id": lot_id, "site": self.site, "order_id": order_id}
        )
        inspection_lots = await self._list(request.target, f"the inspection lots of {lot_id}")
        if not inspection_lots:
            return "unknown"
        newest = max(inspection_lots, key=lambda row: str(row.get("InspectionLot")))
        if not newest.get("InspectionLotHasUsageDecision"):
            return "quality_inspection"
        decision_request = usage_decision_lookup(str(newest["InspectionLot"]))
        decisions = await self._list(decision_request.target, f"the usage decision of {lot_id}")
        codes = {d.get("InspectionLotUsageDecisionCode") for d in decisions}
        release, reject = (
            self.sap.usage_decisions.get("release"),
            self.sap.usage_decisions.get("reject"),
        )
        if release is not None and release.code in codes:
            return "unrestricted"
        if reject is not None and reject.code in codes:
            return "blocked"
        return "unknown"


class CanonicalErpReader:
    """The canonical ERP: `GET <orders_path>/<order_id>/confirmed` (README: *Reconciliation*)."""

    def __init__(self, session: Session, orders_path: str) -> None:
        self.session = session
        self.orders_path = orders_path

    async def order(self, order_id: str, lots: Mapping[str, str | None]) -> ErpOrder:
        target = path(order_id, "confirmed", prefix=self.orders_path)
        response = await self.session.request("GET", target, headers={"Accept": "application/json"})
        if response.status_code == 404:
            return ErpOrder([])
        if response.status_code != 200:
            raise ReconcileError(
                f"ERP answered {response.status_code} to GET {target}: {response.text[:300]}"
            )
        try:
            body = response.json()
            confirmations = [
                ErpConfirmation(
                    reference=str(row.get("reference") or row["id"]),
                    event_id=row.get("id"),
                    operation=row.get("operation"),
                    yield_value=decimal_of((row.get("yield_quantity") or {}).get("value")),
                    scrap_value=decimal_of((row.get("scrap_quantity") or {}).get("value")),
                    uom=(row.get("yield_quantity") or {}).get("uom"),
                    reversed=bool(row.get("reversed")),
                    entered_by=row.get("entered_by"),
                )
                for row in body["confirmations"]
            ]
            statuses: dict[str, StockStatus] = {
                str(lot["lot_id"]): lot.get("stock_status", "unknown")
                for lot in body.get("lots", [])
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ReconcileError(f"ERP's answer to GET {target} cannot be read: {exc}") from exc
        return ErpOrder(confirmations, {lot_id: statuses.get(lot_id, "unknown") for lot_id in lots})


def erp_destination(config: PlantConfig) -> tuple[str, DestinationConfig] | None:
    name = config.reconcile.erp
    if name is None:
        routed = [
            n
            for n in config.destinations_for("production.confirmation")
            if config.destinations[n].profile in ("sap_s4hana", "canonical")
        ]
        name = routed[0] if routed else None
    return None if name is None else (name, config.destinations[name])


def erp_reader(
    config: PlantConfig, name: str, destination: DestinationConfig, client: httpx.AsyncClient
) -> ErpReader:
    session = Session(destination, client)
    if destination.profile == "sap_s4hana":
        return SapErpReader(session, destination, config.site)
    return CanonicalErpReader(session, config.reconcile.orders_path)
