"""Where released orders come from: one source per ERP profile, each turning ERP's answer into
candidate orders in the canonical shape (not yet validated) and a cursor to resume from.

`sap_s4hana` reads `API_PRODUCTION_ORDER_2_SRV/A_ProductionOrder_2` with its operations,
components and items expanded, filtered by `ProductionPlant` and `OrderIsReleased eq 'X'` (the
REL status: SAP keeps it when the order is later locked, technically completed, closed or
flagged for deletion, so those changes stay in the filter and reach the MES as cancellations),
and by `LastChangeDateTime ge CURSOR`. That property is SAP's short UTC time stamp
(`Edm.String`, 14 characters, `YYYYMMDDhhmmss`), so its string order is its time order. The
cursor is the highest change time of a poll read to its end; `ge` rather than `gt` re-reads
the orders of that very second, which costs nothing (an order read again unchanged makes no
event) and never misses one changed later within the same second. Pages are read with `$top`
and `$skip` in `LastChangeDateTime, ManufacturingOrder` order.

`canonical` reads `GET <path>?since=CURSOR&limit=N`, which answers
`{"events": [CloudEvents order.released | order.changed | order.cancelled], "next": CURSOR}`;
each event's `data` is the order in the canonical shape (README: Orders from ERP to the MES).

A source raises `SourceUnavailable` for anything that means "ask again later" (a refused
connection, a timeout, 5xx, 429, a body that is not what the API promises); the poller backs
off. An order it cannot even read into the canonical shape is returned with its problem, and
becomes a dead letter like an invalid one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import httpx

from edge.config.destinations import DestinationConfig
from edge.config.orders import OrdersConfig
from edge.forward.auth import AuthError
from edge.forward.profiles.sap_s4hana import DEFAULT_UNITS, ODATA_ROOT
from edge.forward.session import Session
from edge.forward.urls import odata_string, path, query
from edge.model.envelope import event_type_of

ORDER_SERVICE: Final = f"{ODATA_ROOT}/API_PRODUCTION_ORDER_2_SRV"
ORDER_SET: Final = "A_ProductionOrder_2"
ORDER_EXPAND: Final = (
    "to_ProductionOrderOperation",
    "to_ProductionOrderComponent",
    "to_ProductionOrderItem",
)
SAP_TIME_FORMAT: Final = "%Y%m%d%H%M%S"

log = logging.getLogger(__name__)


class SourceUnavailable(Exception):
    """ERP did not answer usefully; ask again later."""


@dataclass
class Candidate:
    """One order as ERP sent it: `fields` in the canonical shape (to be validated), or the
    `problem` that kept it from being read; `raw` is what ERP sent, for the dead letter."""

    order_id: str
    raw: bytes
    fields: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None


@dataclass
class Page:
    candidates: list[Candidate]
    cursor: str
    """Where the next poll starts once this page is committed."""


class OrderSource:
    """Call order: `pages(cursor)` once per poll, committing each page before the next."""

    def __init__(
        self, config: OrdersConfig, destination: DestinationConfig, session: Session, site: str
    ) -> None:
        self.config = config
        self.destination = destination
        self.session = session
        self.plant = config.plant or site

    def pages(self, cursor: str) -> AsyncIterator[Page]:
        raise NotImplementedError

    async def _get_json(self, target: str) -> Any:
        try:
            response = await self.session.request(
                "GET", target, headers={"Accept": "application/json"}
            )
        except (httpx.HTTPError, AuthError) as exc:
            raise SourceUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise SourceUnavailable(
                f"ERP answered {response.status_code} to GET {target}: {response.text[:300]}"
            )
        try:
            return response.json()
        except ValueError as exc:
            raise SourceUnavailable(
                f"ERP answered GET {target} with a body that is not JSON: {response.text[:200]!r}"
            ) from exc


class CanonicalOrderSource(OrderSource):
    async def pages(self, cursor: str) -> AsyncIterator[Page]:
        while True:
            target = (
                path(*[part for part in self.config.path.split("/") if part])
                + "?"
                + query({"since": cursor, "limit": str(self.config.page_size)})
            )
            body = await self._get_json(target)
            if not isinstance(body, dict) or not isinstance(body.get("events"), list):
                raise SourceUnavailable(
                    f"the order feed answered without an events list: {str(body)[:200]}"
                )
            events: list[Any] = body["events"]
            following = str(body.get("next") or cursor)
            yield Page([canonical_candidate(event) for event in events], following)
            if not events or following == cursor or len(events) < self.config.page_size:
                return
            cursor = following


_FEED_STATUS: Final = {
    "order.released": "released",
    "order.changed": "released",
    "order.cancelled": "deleted",
}


def canonical_candidate(event: Any) -> Candidate:
    """An order of the canonical feed: the CloudEvent's data, its status from the type when
    the data does not say."""
    raw = json.dumps(event, separators=(",", ":"), default=str).encode()
    if not isinstance(event, dict) or not isinstance(event.get("data"), dict):
        return Candidate("?", raw, problem="not a CloudEvent with a data object")
    data: dict[str, Any] = dict(event["data"])
    order_id = str(data.get("order_id") or "?")
    kind = event_type_of(event.get("type"))
    if kind not in _FEED_STATUS:
        return Candidate(
            order_id,
            raw,
            problem=f"type {event.get('type')!r} is not "
            "order.released, order.changed or order.cancelled",
        )
    data.setdefault("status", _FEED_STATUS[str(kind)])
    data.setdefault("erp_changed_at", event.get("time"))
    data["plant"] = data.pop("site", None)
    return Candidate(order_id, raw, fields=data)


class SapOrderSource(OrderSource):
    async def pages(self, cursor: str) -> AsyncIterator[Page]:
        newest = cursor
        skip = 0
        size = self.config.page_size
        # Pages are read by offset ($skip). An order changed during the scan moves to the end of
        # the ordering and shifts the rest left by one, so the first row of the next page is
        # never read; the cursor must then stay where it was (the next poll reads the span
        # again; the order book makes rows read twice harmless). A shift shows as an order
        # seen twice in one scan.
        seen: set[str] = set()
        shifted = False
        while True:
            terms = [f"ProductionPlant eq {odata_string(self.plant)}", "OrderIsReleased eq 'X'"]
            if cursor:
                terms.append(f"LastChangeDateTime ge {odata_string(cursor)}")
            params = {
                "$filter": " and ".join(terms),
                "$expand": ",".join(ORDER_EXPAND),
                "$orderby": "LastChangeDateTime,ManufacturingOrder",
                "$top": str(size),
                "$skip": str(skip),
                "$format": "json",
            }
            body = await self._get_json(path(ORDER_SET, prefix=ORDER_SERVICE) + "?" + query(params))
            try:
                results = body["d"]["results"]
                if not isinstance(results, list):
                    raise TypeError("d.results is not a list")
            except (KeyError, TypeError) as exc:
                raise SourceUnavailable(
                    f"SAP answered without d.results ({exc}): {str(body)[:200]}"
                ) from exc
            candidates = [sap_candidate(entity, self.destination) for entity in results]
            for entity in results:
                changed = entity.get("LastChangeDateTime") if isinstance(entity, dict) else None
                if isinstance(changed, str) and changed > newest:
                    newest = changed
                order_id = entity.get("ManufacturingOrder") if isinstance(entity, dict) else None
                if isinstance(order_id, str):
                    shifted |= order_id in seen
                    seen.add(order_id)
            last = len(results) < size
            if last and shifted:
                log.info(
                    "An order changed in ERP while its released orders were read page by page; "
                    "the next poll reads them again from %s",
                    cursor or "the start",
                )
            # The cursor moves only once the whole result set is read: a crash in between
            # reads it again from the start, and unchanged orders make no events.
            yield Page(candidates, newest if last and not shifted else cursor)
            if last:
                return
            skip += size


def sap_candidate(entity: Any, destination: DestinationConfig) -> Candidate:
    """An `A_ProductionOrder_2` entity (operations, components, items expanded) in the
    canonical shape."""
    raw = json.dumps(entity, separators=(",", ":"), default=str).encode()
    if not isinstance(entity, dict):
        return Candidate("?", raw, problem="not an A_ProductionOrder_2 entity")
    order_id = str(entity.get("ManufacturingOrder") or "?")
    try:
        units = _iso_to_rec20(destination)
        operations = sorted(
            (
                op
                for op in _expanded(entity, "to_ProductionOrderOperation")
                if op.get("OperationIsDeleted") != "X"
                and not op.get("ManufacturingOrderSubOperation")
            ),
            key=lambda op: (
                str(op.get("ManufacturingOrderSequence", "")),
                str(op.get("OrderIntBillOfOperationsItem", "")),
            ),
        )
        items = _expanded(entity, "to_ProductionOrderItem")
        fields: dict[str, Any] = {
            "order_id": order_id,
            "plant": entity.get("ProductionPlant"),
            "material": entity.get("Material") or None,
            "quantity": _quantity(
                entity, "TotalQuantity", "ProductionUnitISOCode", "ProductionUnit", units
            ),
            "bom_version": entity.get("ProductionVersion") or None,
            "planned_lot": next((item["Batch"] for item in items if item.get("Batch")), None),
            "operations": [
                {
                    "operation": op.get("ManufacturingOrderOperation"),
                    "work_center": op.get("WorkCenter") or None,
                    "description": op.get("MfgOrderOperationText") or None,
                    "quantity": (
                        _quantity(
                            op,
                            "OpPlannedTotalQuantity",
                            "OperationUnitISOCode",
                            "OperationUnit",
                            units,
                        )
                        if op.get("OpPlannedTotalQuantity") not in (None, "")
                        else None
                    ),
                }
                for op in operations
            ],
            "components": [
                {
                    "material": component.get("Material"),
                    "quantity": _quantity(
                        component, "RequiredQuantity", "BaseUnitISOCode", "BaseUnit", units
                    ),
                    "operation": component.get("ManufacturingOrderOperation") or None,
                }
                for component in _expanded(entity, "to_ProductionOrderComponent")
            ],
            "status": sap_status(entity),
            "erp_changed_at": sap_time(str(entity.get("LastChangeDateTime", ""))),
        }
    except (KeyError, TypeError, ValueError) as exc:
        return Candidate(order_id, raw, problem=f"cannot be read: {exc}")
    return Candidate(order_id, raw, fields=fields)


def sap_status(entity: Mapping[str, Any]) -> str:
    """The order's state from SAP's status flags (String(1), 'X' when set), the most final
    one winning: a deleted order may still carry REL."""
    if entity.get("OrderIsDeleted") == "X" or entity.get("OrderIsMarkedForDeletion") == "X":
        return "deleted"
    if entity.get("OrderIsClosed") == "X":
        return "closed"
    if entity.get("OrderIsTechnicallyCompleted") == "X":
        return "technically_completed"
    if entity.get("OrderIsLocked") == "X":
        return "locked"
    return "released"


def sap_time(text: str) -> datetime:
    """SAP's short UTC time stamp `YYYYMMDDhhmmss`."""
    try:
        return datetime.strptime(text, SAP_TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f"LastChangeDateTime {text!r} is not YYYYMMDDhhmmss") from None


def _expanded(entity: Mapping[str, Any], navigation: str) -> list[dict[str, Any]]:
    value = entity.get(navigation)
    if value is None:
        return []
    results = value.get("results") if isinstance(value, dict) else None
    if not isinstance(results, list) or not all(isinstance(item, dict) for item in results):
        raise TypeError(f"{navigation} is not an expanded list")
    return results


def _iso_to_rec20(destination: DestinationConfig) -> dict[str, str]:
    """SAP's ISO and internal unit codes back to the canonical Rec 20 ones: the plant's
    `sap.units` first, then the defaults; piece (PCE, ST) reads as H87, as the MES says it."""
    table: dict[str, str] = {"PCE": "H87", "ST": "H87"}
    for canonical, unit in [*destination.sap.units.items(), *DEFAULT_UNITS.items()]:
        for spelled in (unit.iso, unit.internal):
            if spelled is not None:
                table.setdefault(spelled, canonical)
    return table


def _quantity(
    entity: Mapping[str, Any],
    value_field: str,
    iso_field: str,
    internal_field: str,
    units: Mapping[str, str],
) -> dict[str, Any]:
    value = entity.get(value_field)
    iso = entity.get(iso_field) or None
    internal = entity.get(internal_field) or None
    spelled = iso or internal
    if spelled is None:
        raise ValueError(f"{value_field} has no unit ({iso_field} and {internal_field} are empty)")
    return {"value": value, "uom": units.get(spelled, spelled)}
