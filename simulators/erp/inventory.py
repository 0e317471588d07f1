"""Batches and their stock in the ERP simulator: goods receipts into quality inspection, usage
decisions and dispositions that release or block, goods issues; each move kept in the batch's
history with what did it. Used inside one store transaction.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from simulators.erp.canonical import short_type

JsonObject = dict[str, Any]
Endpoint = Callable[[Request], Awaitable[Response]]


STOCK_TYPES = ("unrestricted", "quality_inspection", "blocked")
USABILITY_CODES = {
    "": "unrestricted",
    "2": "quality_inspection",
    "X": "quality_inspection",
    "3": "blocked",
}
DISPOSITION_STOCK = {"release": "unrestricted", "reject": "blocked", "hold": "blocked"}
CANONICAL_DECIMAL = re.compile(r"^\d+(\.\d+)?$")


def decimal_text(value: Decimal) -> str:
    """A plain decimal string without exponent or trailing zeros: "100", "12.5", "-3"."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


@dataclass
class Batch:
    """A batch of a material: its status and its stock per stock type."""

    material: str
    batch: str
    plant: str | None = None
    unit: str | None = None
    status: str | None = None
    stock: dict[str, Decimal] = field(
        default_factory=lambda: {stock_type: Decimal(0) for stock_type in STOCK_TYPES}
    )


@dataclass(frozen=True)
class Change:
    """What moved a batch, for its history."""

    source: str
    """"sap" or "canonical"."""
    action: str
    """goods_receipt, goods_issue, usage_decision, lot.produced or lot.disposition."""
    reference: str
    """The confirmation, inspection lot or ERP reference that did it."""
    text: str | None
    """The sender's own reference: ConfirmationText, ChangedByText or the event id."""
    at: str


class Inventory:
    """Batch status and stock inside one store transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def load(self, material: str, batch: str) -> Batch:
        row = self._db.execute(
            "SELECT plant, unit, status, unrestricted, quality_inspection, blocked"
            " FROM batches WHERE material = ? AND batch = ?",
            (material, batch),
        ).fetchone()
        if row is None:
            return Batch(material, batch)
        plant, unit, status, unrestricted, quality_inspection, blocked = row
        stock = {
            "unrestricted": Decimal(unrestricted),
            "quality_inspection": Decimal(quality_inspection),
            "blocked": Decimal(blocked),
        }
        return Batch(material, batch, plant, unit, status, stock)

    def materials_of(self, batch: str) -> list[str]:
        rows = self._db.execute(
            "SELECT material FROM batches WHERE batch = ? ORDER BY material", (batch,)
        ).fetchall()
        return [material for (material,) in rows]

    def receive(
        self,
        change: Change,
        material: str,
        batch: str,
        quantity: Decimal,
        stock_type: str,
        *,
        plant: str | None,
        unit: str | None,
    ) -> Batch:
        """A goods receipt: quality-inspection receipts put the batch under inspection."""
        state = self.load(material, batch)
        before = state.status
        state.stock[stock_type] += quantity
        if stock_type == "blocked":
            state.status = "blocked"
        elif stock_type == "quality_inspection":
            if state.status != "blocked":
                state.status = "quality_inspection"
        elif state.status is None:
            state.status = "unrestricted"
        self._save(
            state,
            change,
            before,
            plant=plant,
            unit=unit,
            detail={"quantity": decimal_text(quantity), "stock_type": stock_type},
        )
        return state

    def issue(
        self,
        change: Change,
        material: str,
        batch: str,
        quantity: Decimal,
        *,
        plant: str | None,
        unit: str | None,
    ) -> Batch:
        """A goods issue from unrestricted stock (it may go negative, as nothing checks it)."""
        state = self.load(material, batch)
        before = state.status
        state.stock["unrestricted"] -= quantity
        if state.status is None:
            state.status = "unrestricted"
        self._save(
            state,
            change,
            before,
            plant=plant,
            unit=unit,
            detail={"quantity": decimal_text(-quantity), "stock_type": "unrestricted"},
        )
        return state

    def decide(
        self,
        change: Change,
        material: str,
        batch: str,
        code: str,
        target: str,
        *,
        plant: str | None,
    ) -> Batch:
        """A decision on the batch: all of its stock moves to `target` (unrestricted for an
        accepting usage decision or a release; blocked for a rejection or a hold)."""
        state = self.load(material, batch)
        before = state.status
        moved = Decimal(0)
        for stock_type in STOCK_TYPES:
            if stock_type != target and state.stock[stock_type] > 0:
                moved += state.stock[stock_type]
                state.stock[stock_type] = Decimal(0)
        state.stock[target] += moved
        state.status = target
        self._save(
            state,
            change,
            before,
            plant=plant,
            unit=None,
            detail={"code": code, "quantity": decimal_text(moved), "stock_type": target},
        )
        return state

    def _save(
        self,
        state: Batch,
        change: Change,
        before: str | None,
        *,
        plant: str | None,
        unit: str | None,
        detail: JsonObject,
    ) -> None:
        state.plant = plant or state.plant
        state.unit = unit or state.unit
        assert state.status is not None
        self._db.execute(
            "INSERT INTO batches (material, batch, plant, unit, status, unrestricted,"
            " quality_inspection, blocked, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (material, batch) DO UPDATE SET plant = excluded.plant,"
            " unit = excluded.unit, status = excluded.status,"
            " unrestricted = excluded.unrestricted,"
            " quality_inspection = excluded.quality_inspection, blocked = excluded.blocked,"
            " updated_at = excluded.updated_at",
            (
                state.material,
                state.batch,
                state.plant,
                state.unit,
                state.status,
                str(state.stock["unrestricted"]),
                str(state.stock["quality_inspection"]),
                str(state.stock["blocked"]),
                change.at,
            ),
        )
        entry = {
            "at": change.at,
            "source": change.source,
            "action": change.action,
            "reference": change.reference,
            "text": change.text,
            **detail,
            "unit": unit,
            "status_before": before,
            "status_after": state.status,
        }
        self._db.execute(
            "INSERT INTO batch_history (material, batch, entry_json) VALUES (?, ?, ?)",
            (state.material, state.batch, json.dumps(entry, ensure_ascii=False)),
        )


def apply_canonical(inventory: Inventory, event: JsonObject, reference: str, at: str) -> None:
    """Move stock for a new lot.produced or lot.disposition event; ignore what does not fit."""
    data = event.get("data")
    if not isinstance(data, dict):
        return
    lot = data.get("lot_id")
    material = data.get("material")
    if not isinstance(lot, str) or not lot:
        return
    event_type = short_type(event["type"])
    change = Change("canonical", event_type, reference, event["id"], at)
    if event_type == "lot.produced":
        quantity = data.get("quantity")
        if not isinstance(material, str) or not material or not isinstance(quantity, dict):
            return
        value, uom = quantity.get("value"), quantity.get("uom")
        if not isinstance(value, str) or not CANONICAL_DECIMAL.match(value):
            return
        inventory.receive(
            change,
            material,
            lot,
            Decimal(value),
            "quality_inspection",
            plant=None,
            unit=uom if isinstance(uom, str) else None,
        )
    elif event_type == "lot.disposition":
        disposition = str(data.get("disposition"))
        target = DISPOSITION_STOCK.get(disposition)
        if target is None:
            return
        if isinstance(material, str) and material:
            materials = [material]
        else:
            # Without a material, the decision is about every material with that batch number.
            materials = inventory.materials_of(lot) or [""]
        for each in materials:
            inventory.decide(change, each, lot, disposition, target, plant=None)
