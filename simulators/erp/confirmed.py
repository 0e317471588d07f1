"""ERP simulator: an order's confirmed totals, for reconciliation (canonical profile).

``GET /api/orders/{order_id}/confirmed`` answers what this ERP holds for the order: each
``production.confirmation`` it took (its event id, ERP's reference, operation, yield and
scrap, final flag; ``entered_by`` is ``gateway`` for events that came with an
``Idempotency-Key`` and ``hand`` for those posted through ``POST /_sim/orders/{order_id}/
confirmations``), the totals per unit, and the stock status of every batch the order's
confirmations, lot completions or dispositions name (``unrestricted``,
``quality_inspection``, ``blocked``; ``unknown`` when ERP holds no stock of it). An order ERP
knows nothing of answers 200 with empty lists: an order is not an error for ERP to not know.

``POST /_sim/orders/{order_id}/confirmations`` (test only, never guarded) stores a
confirmation as a person would post it in ERP's own screen: a JSON body
``{"operation", "yield", "scrap", "uom"}``, a reference of its own and no gateway event id.

The SAP side needs nothing new: ``ProdnOrdConf2?$filter=OrderID eq '…'`` and the inspection lot
services are in ``simulators/erp/sap_services.py``; a confirmation posted by hand there is a
POST of ProdnOrdConf2 with a ConfirmationText that is no gateway event id.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from simulators.erp.canonical import short_type
from simulators.erp.store import EventStore

Endpoint = Callable[[Request], Any]
HAND_TYPE = "production.confirmation"


def _decimal(value: Any) -> Decimal:
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        return Decimal(0)


def _text(value: Decimal) -> str:
    return format(value.normalize(), "f") if value != value.to_integral() else str(int(value))


def confirmed_routes(store: EventStore, guard: Callable[..., Endpoint]) -> list[Route]:
    """The routes to add to the ERP simulator app (`guard`: its auth and fault wrapper)."""

    def _hand_rows(order_id: str) -> list[dict[str, Any]]:
        with store._transaction() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS hand_confirmations (seq INTEGER PRIMARY KEY,"
                " order_id TEXT NOT NULL, entity_json TEXT NOT NULL)"
            )
            rows = db.execute(
                "SELECT entity_json FROM hand_confirmations WHERE order_id = ? ORDER BY seq",
                (order_id,),
            ).fetchall()
        return [json.loads(text) for (text,) in rows]

    async def confirmed(request: Request) -> Response:
        order_id = request.path_params["order_id"]
        confirmations: list[dict[str, Any]] = []
        lots: dict[str, str | None] = {}
        for row in store.list_events():
            event = row["event"]
            data = event.get("data") or {}
            if data.get("order_id") != order_id:
                continue
            if data.get("lot_id"):
                lots.setdefault(data["lot_id"], data.get("material"))
            if short_type(str(row["type"])) != HAND_TYPE:
                continue
            confirmations.append(
                {
                    "id": row["id"],
                    "reference": row["reference"],
                    "entered_by": "gateway",
                    "operation": data.get("operation"),
                    "yield_quantity": data.get("yield_quantity"),
                    "scrap_quantity": data.get("scrap_quantity"),
                    "is_final": bool(data.get("is_final")),
                    "reversed": False,
                }
            )
        confirmations += _hand_rows(order_id)
        totals: dict[str, dict[str, Decimal]] = {}
        for confirmation in confirmations:
            uom = (confirmation.get("yield_quantity") or {}).get("uom") or "?"
            total = totals.setdefault(uom, {"yield": Decimal(0), "scrap": Decimal(0)})
            total["yield"] += _decimal((confirmation.get("yield_quantity") or {}).get("value"))
            total["scrap"] += _decimal((confirmation.get("scrap_quantity") or {}).get("value"))
        stock = []
        for lot_id, material in sorted(lots.items()):
            found = store.batches(material=material, batch=lot_id) if material else []
            found = found or store.batches(batch=lot_id)
            stock.append(
                {
                    "lot_id": lot_id,
                    "material": material,
                    "stock_status": found[0]["status"] if found else "unknown",
                }
            )
        return JSONResponse(
            {
                "order_id": order_id,
                "confirmations": confirmations,
                "totals": [
                    {"uom": uom, "yield": _text(t["yield"]), "scrap": _text(t["scrap"])}
                    for uom, t in sorted(totals.items())
                ],
                "lots": stock,
            }
        )

    async def post_by_hand(request: Request) -> Response:
        order_id = request.path_params["order_id"]
        try:
            body = json.loads(await request.body())
            uom = str(body.get("uom", "C62"))
            entity = {
                "id": None,
                "reference": f"HAND-{uuid.uuid4().hex[:8]}",
                "entered_by": "hand",
                "operation": str(body.get("operation", "0010")),
                "yield_quantity": {"value": _text(_decimal(body["yield"])), "uom": uom},
                "scrap_quantity": {"value": _text(_decimal(body.get("scrap", 0))), "uom": uom},
                "is_final": bool(body.get("is_final", False)),
                "reversed": False,
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return JSONResponse({"error": f"body: {exc}"}, status_code=400)
        _hand_rows(order_id)  # makes the table
        with store._transaction() as db:
            db.execute(
                "INSERT INTO hand_confirmations(order_id, entity_json) VALUES (?, ?)",
                (order_id, json.dumps(entity)),
            )
        return JSONResponse(entity, status_code=201)

    return [
        Route(
            "/api/orders/{order_id}/confirmed",
            guard(confirmed, odata=False, delivery=False),
            methods=["GET"],
        ),
        Route("/_sim/orders/{order_id}/confirmations", post_by_hand, methods=["POST"]),
    ]
