"""The ERP simulator's production orders: released orders served in SAP's shape and in the
canonical feed, and test controls that release, change and end them.

SAP (`API_PRODUCTION_ORDER_2_SRV`, OData v2, JSON): ``GET .../A_ProductionOrder_2`` with
``$filter`` (``Property op 'value'`` with eq, ne, gt, ge, lt or le, joined by ``and``, on the
entity set's string properties), ``$expand`` (its navigation properties
``to_ProductionOrderOperation``, ``to_ProductionOrderComponent``, ``to_ProductionOrderItem``;
the others are deferred), ``$orderby`` (properties, ``asc``/``desc``), ``$top``, ``$skip`` and
``$format=json``. A property the entity set does not have, an option not served, a literal
longer than the property's MaxLength is a 400 in SAP Gateway's error shape, checked against
SAP's published metadata (``tests/fixtures/sap/API_PRODUCTION_ORDER_2_SRV.json``). Status flags
are SAP's String(1) indicators ("X" or ""); ``LastChangeDateTime`` is SAP's short UTC time stamp
``YYYYMMDDhhmmss``. Every entity the simulator builds is itself checked against the metadata
before it is stored, so an order SAP could not hold (a 13-character order number, a unit the
unit table lacks) is refused when a test releases it.

Canonical: ``GET /api/orders?since=CURSOR&limit=N`` answers ``{"events": [...], "next":
CURSOR}``, CloudEvents of type ``order.released``, ``order.changed`` or ``order.cancelled``
whose ``data`` is the order in the canonical shape (Rec 20 units: SAP's PCE reads H87).

Test controls (never faulted): ``POST /_sim/orders`` releases an order (``order_id``,
``material``, ``quantity``, ``unit`` as SAP's ISO code, ``production_version``, ``batch``,
``plant``, ``operations`` [{``operation``, ``work_center``, ``text``}] in routing order,
``components`` [{``material``, ``quantity``, ``unit``, ``operation``}]); ``POST
/_sim/orders/{id}/change`` changes any of those; ``POST /_sim/orders/{id}/status`` with
``{"status": "locked" | "released" | "technically_completed" | "closed" | "deleted"}`` sets
SAP's flags; ``GET /_sim/orders`` lists them with the number of reads each API served.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from simulators.http_common import SqliteStore, read_json

JsonObject = dict[str, Any]
Guard = Callable[..., Any]

ORDER_SERVICE: Final = "/sap/opu/odata/sap/API_PRODUCTION_ORDER_2_SRV"
ORDER_SET: Final = "A_ProductionOrder_2"
EXPANDABLE: Final = {
    "to_ProductionOrderOperation": "A_ProductionOrderOperation_2",
    "to_ProductionOrderComponent": "A_ProductionOrderComponent_2",
    "to_ProductionOrderItem": "A_ProductionOrderItem_2",
}
STATUS_FLAGS: Final = {
    "locked": "OrderIsLocked",
    "technically_completed": "OrderIsTechnicallyCompleted",
    "closed": "OrderIsClosed",
    "deleted": "OrderIsMarkedForDeletion",
}
FINISHED: Final = frozenset({"technically_completed", "closed", "deleted"})
FILTER_TERM: Final = re.compile(r"\s*([A-Za-z_]\w*)\s+(eq|ne|gt|ge|lt|le)\s+'((?:[^']|'')*)'\s*")
FILTER_AND: Final = re.compile(r"and\s+")
ORDERBY_TERM: Final = re.compile(r"^\s*([A-Za-z_]\w*)(?:\s+(asc|desc))?\s*$")
SERVED_OPTIONS: Final = frozenset(
    {"$filter", "$expand", "$orderby", "$top", "$skip", "$format", "$inlinecount"}
)
COMPARE: Final[dict[str, Callable[[str, str], bool]]] = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
}

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS erp_orders (
    order_id TEXT PRIMARY KEY, request TEXT NOT NULL, entity TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS erp_order_feed (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT NOT NULL, order_id TEXT NOT NULL,
    data TEXT NOT NULL, time TEXT NOT NULL);
"""


class OrderRefused(ValueError):
    """A release or change SAP would refuse."""


class OrderStore(SqliteStore):
    """Orders (the planner's request and the SAP entity built from it) and the canonical feed."""

    def __init__(self, db_path: str) -> None:
        super().__init__(db_path, SCHEMA, "ERP order store")

    def put(
        self,
        order_id: str,
        request: JsonObject,
        entity: JsonObject,
        feed_type: str,
        data: JsonObject,
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO erp_orders(order_id, request, entity) VALUES (?, ?, ?)"
                " ON CONFLICT(order_id) DO UPDATE SET request = excluded.request,"
                " entity = excluded.entity",
                (order_id, json.dumps(request), json.dumps(entity)),
            )
            db.execute(
                "INSERT INTO erp_order_feed(type, order_id, data, time) VALUES (?, ?, ?, ?)",
                (feed_type, order_id, json.dumps(data), data["erp_changed_at"]),
            )

    def get(self, order_id: str) -> tuple[JsonObject, JsonObject] | None:
        with self._transaction() as db:
            row = db.execute(
                "SELECT request, entity FROM erp_orders WHERE order_id = ?", (order_id,)
            ).fetchone()
        return None if row is None else (json.loads(row[0]), json.loads(row[1]))

    def entities(self) -> list[JsonObject]:
        with self._transaction() as db:
            rows = db.execute("SELECT entity FROM erp_orders ORDER BY order_id").fetchall()
        return [json.loads(row[0]) for row in rows]

    def feed(self, since: int, limit: int) -> list[tuple[int, str, JsonObject, str]]:
        with self._transaction() as db:
            rows = db.execute(
                "SELECT seq, type, data, time FROM erp_order_feed WHERE seq > ?"
                " ORDER BY seq LIMIT ?",
                (since, limit),
            ).fetchall()
        return [(seq, kind, json.loads(data), at) for seq, kind, data, at in rows]


def _sap_time(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y%m%d%H%M%S")


def _iso_time(sap: str) -> str:
    return (
        datetime.strptime(sap, "%Y%m%d%H%M%S")
        .replace(tzinfo=UTC)
        .isoformat()
        .replace("+00:00", "Z")
    )


def _rec20(iso: str) -> str:
    return "H87" if iso == "PCE" else iso


class ErpOrders:
    """The handlers; `metadata` checks entities and queries, `units` is SAP's unit table
    (internal -> ISO)."""

    def __init__(
        self,
        store: OrderStore,
        metadata: Any,
        units: dict[str, str],
        odata_error: Callable[[str, str], Exception],
    ) -> None:
        self.store = store
        self.metadata = metadata
        self.units = units
        self._refuse = odata_error
        self.reads = {"sap": 0, "canonical": 0}

    # -- building what SAP holds -----------------------------------------------------------

    def _internal(self, iso: object, where: str) -> str:
        for internal, code in self.units.items():
            if code == iso:
                return internal
        raise OrderRefused(f"{where}: ISO code {iso!r} is not assigned to any unit")

    def build(
        self, request: JsonObject, status: str, changed: str
    ) -> tuple[JsonObject, JsonObject]:
        """The SAP entity (with its expansions) and the canonical data of a planner's
        request."""
        try:
            order_id = str(request["order_id"])
            plant = str(request.get("plant", "1010"))
            unit = request.get("unit", "PCE")
            operations = list(request.get("operations") or [{"operation": "0010"}])
            components = list(request.get("components") or [])
            quantity = str(request["quantity"])
        except (KeyError, TypeError) as exc:
            raise OrderRefused(f"the order needs {exc}") from exc
        routing = f"{zlib.crc32(order_id.encode()) % 10**10:010d}"
        flags = {flag: "X" if name == status else "" for name, flag in STATUS_FLAGS.items()}
        entity: JsonObject = {
            "ManufacturingOrder": order_id,
            "ManufacturingOrderCategory": "10",
            "ManufacturingOrderType": "PP01",
            "OrderIsCreated": "X",
            "OrderIsReleased": "X",
            "OrderIsDeleted": "",
            **flags,
            "LastChangeDateTime": changed,
            "Material": request.get("material", ""),
            "ProductionPlant": plant,
            "Plant": plant,
            "ProductionVersion": request.get("production_version", ""),
            "OrderInternalBillOfOperations": routing,
            "ProductionUnit": self._internal(unit, "ProductionUnitISOCode"),
            "ProductionUnitISOCode": unit,
            "TotalQuantity": quantity,
        }
        entity["to_ProductionOrderOperation"] = {
            "results": [
                {
                    "OrderInternalBillOfOperations": routing,
                    "OrderIntBillOfOperationsItem": f"{number:08d}",
                    "ManufacturingOrder": order_id,
                    "ManufacturingOrderSequence": "0",
                    "ManufacturingOrderOperation": str(op.get("operation", "")),
                    "ManufacturingOrderSubOperation": "",
                    "MfgOrderOperationText": str(op.get("text", "")),
                    "WorkCenter": str(op.get("work_center", "")),
                    "ProductionPlant": plant,
                    "OperationIsReleased": "X",
                    "OperationIsDeleted": "",
                    "OperationUnit": self._internal(unit, "OperationUnitISOCode"),
                    "OperationUnitISOCode": unit,
                    "OpPlannedTotalQuantity": quantity,
                }
                for number, op in enumerate(operations, start=1)
            ]
        }
        entity["to_ProductionOrderComponent"] = {
            "results": [
                {
                    "Reservation": routing,
                    "ReservationItem": f"{number:04d}",
                    "Material": str(item.get("material", "")),
                    "Plant": plant,
                    "ManufacturingOrder": order_id,
                    "ManufacturingOrderOperation": str(item.get("operation", "")),
                    "RequiredQuantity": str(item.get("quantity", "")),
                    "BaseUnit": self._internal(item.get("unit", "KGM"), "BaseUnitISOCode"),
                    "BaseUnitISOCode": item.get("unit", "KGM"),
                }
                for number, item in enumerate(components, start=1)
            ]
        }
        entity["to_ProductionOrderItem"] = {
            "results": [
                {
                    "ManufacturingOrder": order_id,
                    "ManufacturingOrderItem": "0001",
                    "Material": request.get("material", ""),
                    "ProductionPlant": plant,
                    "Plant": plant,
                    "Batch": request.get("batch") or "",
                    "ProductionUnit": self._internal(unit, "ProductionUnitISOCode"),
                    "ProductionUnitISOCode": unit,
                    "MfgOrderItemPlannedTotalQty": quantity,
                }
            ]
        }
        data: JsonObject = {
            "site": plant,
            "order_id": order_id,
            "material": request.get("material"),
            "quantity": {"value": quantity, "uom": _rec20(unit)},
            "bom_version": request.get("production_version") or None,
            "planned_lot": request.get("batch") or None,
            "operations": [
                {
                    "operation": op.get("operation"),
                    "work_center": op.get("work_center") or None,
                    "description": op.get("text") or None,
                }
                for op in operations
            ],
            "components": [
                {
                    "material": item.get("material"),
                    "quantity": {
                        "value": str(item.get("quantity")),
                        "uom": _rec20(item.get("unit", "KGM")),
                    },
                    "operation": item.get("operation") or None,
                }
                for item in components
            ],
            "status": status,
            "erp_changed_at": _iso_time(changed),
        }
        return entity, data

    def _store(self, request: JsonObject, status: str, feed_type: str) -> JsonObject:
        entity, data = self.build(request, status, _sap_time(time.time()))
        try:
            self.metadata.check_entity(ORDER_SERVICE, ORDER_SET, entity, "order")
        except Exception as exc:  # the simulator's ODataError: SAP would not hold it
            raise OrderRefused(str(getattr(exc, "message", exc))) from exc
        self.store.put(
            str(request["order_id"]), {**request, "status": status}, entity, feed_type, data
        )
        return entity

    # -- test controls -----------------------------------------------------------------------

    async def release(self, request: Request) -> Response:
        body = await read_json(request, OrderRefused)
        if not isinstance(body, dict) or "order_id" not in body:
            return JSONResponse({"error": "an order needs order_id"}, status_code=400)
        if self.store.get(str(body["order_id"])) is not None:
            return JSONResponse({"error": f"order {body['order_id']} exists"}, status_code=409)
        try:
            entity = self._store(body, "released", "order.released")
        except OrderRefused as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(entity, status_code=201)

    async def change(self, request: Request) -> Response:
        known = self.store.get(request.path_params["order_id"])
        if known is None:
            return JSONResponse({"error": "no such order"}, status_code=404)
        body = await read_json(request, OrderRefused)
        if not isinstance(body, dict):
            return JSONResponse({"error": "send a JSON object"}, status_code=400)
        merged = {**known[0], **body, "order_id": known[0]["order_id"]}
        status = str(merged.pop("status", "released"))
        try:
            entity = self._store(
                merged, status, "order.cancelled" if status in FINISHED else "order.changed"
            )
        except OrderRefused as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(entity)

    async def set_status(self, request: Request) -> Response:
        known = self.store.get(request.path_params["order_id"])
        if known is None:
            return JSONResponse({"error": "no such order"}, status_code=404)
        body = await read_json(request, OrderRefused)
        status = body.get("status") if isinstance(body, dict) else None
        if status not in (*STATUS_FLAGS, "released"):
            return JSONResponse(
                {"error": f"status must be one of released, {', '.join(STATUS_FLAGS)}"},
                status_code=400,
            )
        entity = self._store(
            {**known[0], "status": status},
            str(status),
            "order.cancelled" if status in FINISHED else "order.changed",
        )
        return JSONResponse(entity)

    async def list_orders(self, request: Request) -> Response:
        return JSONResponse({"orders": self.store.entities(), "reads": self.reads})

    # -- SAP ---------------------------------------------------------------------------------

    async def sap_orders(self, request: Request) -> Response:
        params = request.query_params
        unknown = sorted(
            name for name in params if name.startswith("$") and name not in SERVED_OPTIONS
        )
        if unknown:
            raise self._refuse("INVALID_OPTION", f"{', '.join(unknown)} is not served here")
        if params.get("$format", "json") != "json":
            raise self._refuse("INVALID_OPTION", "$format: use json")
        properties = self.metadata.entity_type(ORDER_SERVICE, ORDER_SET)["properties"]
        terms = self._filter(params.get("$filter", ""), properties)
        expand = [name.strip() for name in params.get("$expand", "").split(",") if name.strip()]
        for name in expand:
            if name not in self.metadata.entity_type(ORDER_SERVICE, ORDER_SET)["navigation"]:
                raise self._refuse(
                    "INVALID_EXPAND",
                    f"Property '{name}' is not a navigation property of {ORDER_SET}",
                )
        entities = [
            entity
            for entity in self.store.entities()
            if all(COMPARE[op](str(entity.get(name, "")), value) for name, op, value in terms)
        ]
        for term in reversed([t for t in params.get("$orderby", "").split(",") if t.strip()]):
            match = ORDERBY_TERM.match(term)
            if match is None or match.group(1) not in properties:
                raise self._refuse(
                    "INVALID_ORDERBY", f"$orderby {term!r}: not a property of {ORDER_SET}"
                )
            key = match.group(1)
            entities.sort(
                key=lambda entity: str(entity.get(key, "")), reverse=match.group(2) == "desc"
            )
        skip, top = self._number(params.get("$skip")) or 0, self._number(params.get("$top"))
        entities = entities[skip:] if top is None else entities[skip : skip + top]
        base = str(request.base_url).rstrip("/") + ORDER_SERVICE
        results = []
        for entity in entities:
            uri = f"{base}/{ORDER_SET}('{entity['ManufacturingOrder']}')"
            kind = f"API_PRODUCTION_ORDER_2_SRV.{ORDER_SET}Type"
            shown: JsonObject = {"__metadata": {"id": uri, "uri": uri, "type": kind}}
            for name, value in entity.items():
                if name in EXPANDABLE:
                    shown[name] = (
                        value if name in expand else {"__deferred": {"uri": f"{uri}/{name}"}}
                    )
                else:
                    shown[name] = value
            results.append(shown)
        self.reads["sap"] += 1
        return JSONResponse({"d": {"results": results}}, headers={"DataServiceVersion": "2.0"})

    def _filter(self, expression: str, properties: JsonObject) -> list[tuple[str, str, str]]:
        terms: list[tuple[str, str, str]] = []
        position = 0
        while expression.strip():
            term = FILTER_TERM.match(expression, position)
            if term is None:
                raise self._refuse(
                    "INVALID_FILTER",
                    f"$filter {expression!r} is not "
                    "understood here: Property op 'value', joined by and",
                )
            name, op, value = term.group(1), term.group(2), term.group(3).replace("''", "'")
            fact = properties.get(name)
            if fact is None:
                raise self._refuse(
                    "INVALID_FILTER", f"Property '{name}' is not a property of {ORDER_SET}"
                )
            if fact["type"] != "Edm.String":
                raise self._refuse(
                    "INVALID_FILTER", f"$filter: {name} is {fact['type']}, not a string literal"
                )
            if len(value) > fact.get("max_length", len(value)):
                raise self._refuse(
                    "INVALID_FILTER",
                    f"$filter: '{value}' is longer than {name} ({fact['max_length']} characters)",
                )
            terms.append((name, op, value))
            position = term.end()
            if position == len(expression):
                break
            joined = FILTER_AND.match(expression, position)
            if joined is None:
                raise self._refuse("INVALID_FILTER", f"$filter {expression!r}: expected and")
            position = joined.end()
        return terms

    def _number(self, text: str | None) -> int | None:
        if text is None:
            return None
        if not text.isdigit():
            raise self._refuse("INVALID_OPTION", "$top and $skip take non-negative integers")
        return int(text)

    # -- canonical ---------------------------------------------------------------------------

    async def canonical_feed(self, request: Request) -> Response:
        since_text = request.query_params.get("since") or "0"
        limit_text = request.query_params.get("limit") or "100"
        if not (since_text.isdigit() and limit_text.isdigit() and 1 <= int(limit_text) <= 1000):
            return JSONResponse(
                {"error": "since is a cursor this feed gave (digits); limit is 1..1000"},
                status_code=400,
            )
        rows = self.store.feed(int(since_text), int(limit_text))
        events = [
            {
                "specversion": "1.0",
                "id": f"erp-order-{seq}",
                "source": "urn:erp:orders",
                "type": kind,
                "time": at,
                "subject": data["order_id"],
                "datacontenttype": "application/json",
                "data": data,
            }
            for seq, kind, data, at in rows
        ]
        self.reads["canonical"] += 1
        return JSONResponse({"events": events, "next": str(rows[-1][0]) if rows else since_text})


def order_routes(orders: ErpOrders, guard: Guard) -> Sequence[Route]:
    """The routes, the APIs behind the simulator's guard (outages, tokens) and the controls
    not."""
    return [
        Route(
            f"{ORDER_SERVICE}/{ORDER_SET}",
            guard(orders.sap_orders, odata=True, delivery=False),
            methods=["GET"],
        ),
        Route(
            "/api/orders",
            guard(orders.canonical_feed, odata=False, delivery=False),
            methods=["GET"],
        ),
        Route("/_sim/orders", orders.release, methods=["POST"]),
        Route("/_sim/orders", orders.list_orders, methods=["GET"]),
        Route("/_sim/orders/{order_id}/change", orders.change, methods=["POST"]),
        Route("/_sim/orders/{order_id}/status", orders.set_status, methods=["POST"]),
    ]
