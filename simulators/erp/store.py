"""The ERP simulator's SQLite tables: canonical events received (once per idempotency key,
repeats counted), SAP confirmations, inspection lots, usage decisions and material documents
(numbered as SAP numbers them), and the batches they move.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from simulators.erp.canonical import Delivery, Receipt, short_type
from simulators.erp.inventory import (
    STOCK_TYPES,
    USABILITY_CODES,
    Change,
    Inventory,
    apply_canonical,
    decimal_text,
)
from simulators.erp.sap_metadata import MATERIAL_DOCUMENT_ITEMS, bad_request
from simulators.http_common import (
    SqliteStore,
)

JsonObject = dict[str, Any]
Endpoint = Callable[[Request], Awaitable[Response]]


SCHEMA = """
CREATE TABLE IF NOT EXISTS received_events (
    seq             INTEGER PRIMARY KEY,
    reference       TEXT NOT NULL UNIQUE,
    idempotency_key TEXT NOT NULL UNIQUE,
    event_id        TEXT NOT NULL,
    type            TEXT NOT NULL,
    subject         TEXT,
    partitionkey    TEXT,
    event_json      TEXT NOT NULL,
    received_at     TEXT NOT NULL,
    duplicates      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS received_events_type ON received_events (type, seq);
CREATE TABLE IF NOT EXISTS sap_confirmation_groups (
    order_id           TEXT NOT NULL,
    operation          TEXT NOT NULL,
    sequence           TEXT NOT NULL,
    confirmation_group TEXT NOT NULL UNIQUE,
    last_count         INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (order_id, operation, sequence)
);
CREATE TABLE IF NOT EXISTS sap_confirmations (
    seq                INTEGER PRIMARY KEY,
    confirmation_group TEXT NOT NULL,
    confirmation_count TEXT NOT NULL,
    order_id           TEXT NOT NULL,
    confirmation_text  TEXT NOT NULL,
    entity_json        TEXT NOT NULL,
    UNIQUE (confirmation_group, confirmation_count)
);
CREATE INDEX IF NOT EXISTS sap_confirmations_text ON sap_confirmations (confirmation_text);
CREATE INDEX IF NOT EXISTS sap_confirmations_order ON sap_confirmations (order_id);
CREATE TABLE IF NOT EXISTS sap_lot_usage_decisions (
    seq            INTEGER PRIMARY KEY,
    inspection_lot TEXT NOT NULL UNIQUE,
    entity_json    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sap_inspection_lots (
    inspection_lot TEXT PRIMARY KEY,
    material       TEXT NOT NULL,
    batch          TEXT NOT NULL,
    plant          TEXT NOT NULL,
    has_decision   INTEGER NOT NULL,
    entity_json    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sap_inspection_lots_batch ON sap_inspection_lots (material, batch);
CREATE TABLE IF NOT EXISTS sap_material_documents (
    seq         INTEGER PRIMARY KEY,
    entity_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    material           TEXT NOT NULL,
    batch              TEXT NOT NULL,
    plant              TEXT,
    unit               TEXT,
    status             TEXT NOT NULL,
    unrestricted       TEXT NOT NULL,
    quality_inspection TEXT NOT NULL,
    blocked            TEXT NOT NULL,
    updated_at         TEXT NOT NULL,
    PRIMARY KEY (material, batch)
);
CREATE TABLE IF NOT EXISTS batch_history (
    seq        INTEGER PRIMARY KEY,
    material   TEXT NOT NULL,
    batch      TEXT NOT NULL,
    entry_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS batch_history_batch ON batch_history (material, batch, seq);
"""
DATA_TABLES = (
    "sap_confirmation_groups",
    "sap_confirmations",
    "sap_lot_usage_decisions",
    "sap_inspection_lots",
    "sap_material_documents",
    "batches",
    "batch_history",
)


def _where(**columns: str | None) -> tuple[str, list[str]]:
    """A WHERE clause matching each column given a value (None: not filtered)."""
    given = {name: value for name, value in columns.items() if value is not None}
    clause = " AND ".join(f"{name} = ?" for name in given)
    return (f" WHERE {clause}" if clause else ""), list(given.values())


def _now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _odata_date(moment: float) -> str:
    return f"/Date({int(moment * 1000)})/"


class EventStore(SqliteStore):
    """The ERP's SQLite tables (events, SAP documents, batches) behind one guarded connection."""

    def __init__(self, db_path: str) -> None:
        super().__init__(db_path, SCHEMA, "ERP event store")

    def record(self, deliveries: Sequence[Delivery]) -> list[Receipt]:
        """Store each new key once, count repeats, all in one transaction.

        A new lot.produced or lot.disposition event moves its batch in the same transaction.
        """
        receipts = []
        received_at = _now_text()
        with self._transaction() as db:
            inventory = Inventory(db)
            for delivery in deliveries:
                known = db.execute(
                    "SELECT reference FROM received_events WHERE idempotency_key = ?",
                    (delivery.key,),
                ).fetchone()
                if known is not None:
                    db.execute(
                        "UPDATE received_events SET duplicates = duplicates + 1"
                        " WHERE idempotency_key = ?",
                        (delivery.key,),
                    )
                    receipts.append(Receipt(reference=known[0], duplicate=True))
                    continue
                (seq,) = db.execute(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM received_events"
                ).fetchone()
                reference = f"ERP-{seq:06d}"
                event = delivery.event
                db.execute(
                    "INSERT INTO received_events (seq, reference, idempotency_key, event_id,"
                    " type, subject, partitionkey, event_json, received_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        seq,
                        reference,
                        delivery.key,
                        event["id"],
                        short_type(event["type"]),
                        event.get("subject"),
                        event.get("partitionkey"),
                        json.dumps(event, ensure_ascii=False),
                        received_at,
                    ),
                )
                apply_canonical(inventory, event, reference, received_at)
                receipts.append(Receipt(reference=reference, duplicate=False))
        return receipts

    def list_events(self, event_type: str | None = None) -> list[JsonObject]:
        query = (
            "SELECT reference, idempotency_key, event_id, type, subject, partitionkey,"
            " received_at, duplicates, event_json FROM received_events"
        )
        parameters: tuple[str, ...] = ()
        if event_type is not None:
            query += " WHERE type = ?"
            parameters = (event_type,)
        with self._transaction() as db:
            rows = db.execute(query + " ORDER BY seq", parameters).fetchall()
        return [
            {
                "reference": reference,
                "key": key,
                "id": event_id,
                "type": type_,
                "subject": subject,
                "partitionkey": partitionkey,
                "received_at": received_at,
                "duplicates": duplicates,
                "event": json.loads(event_json),
            }
            for (
                reference,
                key,
                event_id,
                type_,
                subject,
                partitionkey,
                received_at,
                duplicates,
                event_json,
            ) in rows
        ]

    def counts(self) -> tuple[int, int]:
        """Return (unique events stored, repeated deliveries counted)."""
        with self._transaction() as db:
            unique, duplicates = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(duplicates), 0) FROM received_events"
            ).fetchone()
        return int(unique), int(duplicates)

    def sap_counts(self) -> JsonObject:
        with self._transaction() as db:
            confirmations, distinct_texts, texted = db.execute(
                "SELECT COUNT(*), COUNT(DISTINCT NULLIF(confirmation_text, '')),"
                " COUNT(NULLIF(confirmation_text, '')) FROM sap_confirmations"
            ).fetchone()
            (decisions,) = db.execute("SELECT COUNT(*) FROM sap_lot_usage_decisions").fetchone()
            (documents,) = db.execute("SELECT COUNT(*) FROM sap_material_documents").fetchone()
            histories = db.execute("SELECT entry_json FROM batch_history").fetchall()
        unreleased_issues = 0
        for (entry_json,) in histories:
            entry = json.loads(entry_json)
            if entry["action"] == "goods_issue" and entry["status_before"] in (
                "quality_inspection",
                "blocked",
            ):
                unreleased_issues += 1
        return {
            "sap_confirmations": int(confirmations),
            "sap_duplicate_texts": int(texted) - int(distinct_texts),
            "usage_decisions": int(decisions),
            "sap_material_documents": int(documents),
            "issues_from_unreleased_batches": unreleased_issues,
        }

    def create_confirmation(self, fields: JsonObject, user: str) -> JsonObject:
        """Create one confirmation with its goods movements; return the stored entity.

        A 101 receipt into quality inspection opens an inspection lot (origin 04) for its
        batch, or adds to the batch's open one (inspection lot control "one lot per batch").
        """
        moment = time.time()
        at = _now_text()
        with self._transaction() as db:
            key = (fields["OrderID"], fields["OrderOperation"], fields["Sequence"])
            row = db.execute(
                "SELECT confirmation_group, last_count FROM sap_confirmation_groups"
                " WHERE order_id = ? AND operation = ? AND sequence = ?",
                key,
            ).fetchone()
            if row is None:
                (groups,) = db.execute("SELECT COUNT(*) FROM sap_confirmation_groups").fetchone()
                group, last_count = f"{groups + 1:010d}", 0
                db.execute(
                    "INSERT INTO sap_confirmation_groups (order_id, operation, sequence,"
                    " confirmation_group) VALUES (?, ?, ?, ?)",
                    (*key, group),
                )
            else:
                group, last_count = row
            count = f"{last_count + 1:08d}"
            db.execute(
                "UPDATE sap_confirmation_groups SET last_count = ? WHERE confirmation_group = ?",
                (last_count + 1, group),
            )
            (seq,) = db.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM sap_confirmations"
            ).fetchone()
            items = fields[MATERIAL_DOCUMENT_ITEMS]
            document = f"49{seq:08d}" if items else ""
            year = str(datetime.fromtimestamp(moment, UTC).year) if items else ""
            entity: JsonObject = {
                "ConfirmationGroup": group,
                "ConfirmationCount": count,
                **{
                    name: value for name, value in fields.items() if name != MATERIAL_DOCUMENT_ITEMS
                },
                "EnteredByUser": user,
                "ConfirmationEntryDate": _odata_date(moment),
            }
            inventory = Inventory(db)
            change = Change("sap", "", f"{group}/{count}", fields["ConfirmationText"] or None, at)
            stored_items = []
            for number, item in enumerate(items, start=1):
                stored_items.append(
                    {
                        "ConfirmationGroup": group,
                        "ConfirmationCount": count,
                        "MaterialDocument": document,
                        "MaterialDocumentYear": year,
                        "MaterialDocumentItem": f"{number:04d}",
                        **item,
                    }
                )
                quantity = Decimal(item["QuantityInEntryUnit"])
                material, batch = item["Material"], item["Batch"]
                plant, unit = item["Plant"], item["EntryUnit"]
                if item["GoodsMovementType"] == "101":
                    stock_type = USABILITY_CODES[item.get("InventoryUsabilityCode", "")]
                    inventory.receive(
                        dataclasses.replace(change, action="goods_receipt"),
                        material,
                        batch,
                        quantity,
                        stock_type,
                        plant=plant,
                        unit=unit,
                    )
                    if stock_type == "quality_inspection":
                        self._open_inspection_lot(
                            db, item, fields["OrderID"], quantity, document, year, moment
                        )
                else:
                    inventory.issue(
                        dataclasses.replace(change, action="goods_issue"),
                        material,
                        batch,
                        quantity,
                        plant=plant,
                        unit=unit,
                    )
            entity[MATERIAL_DOCUMENT_ITEMS] = stored_items
            db.execute(
                "INSERT INTO sap_confirmations (seq, confirmation_group, confirmation_count,"
                " order_id, confirmation_text, entity_json) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    seq,
                    group,
                    count,
                    fields["OrderID"],
                    fields["ConfirmationText"],
                    json.dumps(entity, ensure_ascii=False),
                ),
            )
        return entity

    def _open_inspection_lot(
        self,
        db: sqlite3.Connection,
        item: JsonObject,
        order_id: str,
        quantity: Decimal,
        document: str,
        year: str,
        moment: float,
    ) -> None:
        row = db.execute(
            "SELECT inspection_lot, entity_json FROM sap_inspection_lots WHERE material = ?"
            " AND batch = ? AND plant = ? AND has_decision = 0 ORDER BY inspection_lot DESC",
            (item["Material"], item["Batch"], item["Plant"]),
        ).fetchone()
        if row is not None:
            lot, entity_json = row
            entity = json.loads(entity_json)
            total = Decimal(entity["InspectionLotQuantity"]) + quantity
            entity["InspectionLotQuantity"] = decimal_text(total)
            db.execute(
                "UPDATE sap_inspection_lots SET entity_json = ? WHERE inspection_lot = ?",
                (json.dumps(entity), lot),
            )
            return
        (lots,) = db.execute("SELECT COUNT(*) FROM sap_inspection_lots").fetchone()
        lot = f"04{lots + 1:010d}"
        entity = {
            "InspectionLot": lot,
            "Material": item["Material"],
            "Batch": item["Batch"],
            "Plant": item["Plant"],
            "InspectionLotOrigin": "04",
            "ManufacturingOrder": order_id,
            "InspectionLotType": "04",
            "InspectionLotQuantity": decimal_text(quantity),
            "InspectionLotQuantityUnit": item["EntryUnit"],
            "MaterialDocument": document,
            "MaterialDocumentYear": year,
            "InspectionLotHasUsageDecision": False,
            "InspectionLotCreatedOn": _odata_date(moment),
        }
        db.execute(
            "INSERT INTO sap_inspection_lots (inspection_lot, material, batch, plant,"
            " has_decision, entity_json) VALUES (?, ?, ?, ?, 0, ?)",
            (lot, item["Material"], item["Batch"], item["Plant"], json.dumps(entity)),
        )

    def confirmations(
        self,
        *,
        text: str | None = None,
        order_id: str | None = None,
        key: tuple[str, str] | None = None,
    ) -> list[JsonObject]:
        """Stored confirmations in creation order, narrowed by the indexed columns given."""
        group, count = key if key is not None else (None, None)
        return self._entities(
            "sap_confirmations",
            "seq",
            confirmation_text=text,
            order_id=order_id,
            confirmation_group=group,
            confirmation_count=count,
        )

    def inspection_lots(self, lot: str | None = None) -> list[JsonObject]:
        return self._entities("sap_inspection_lots", "inspection_lot", inspection_lot=lot)

    def create_usage_decision(self, fields: JsonObject, user: str, stock_target: str) -> JsonObject:
        """Record the usage decision of an inspection lot and move its batch's stock;
        return the stored entity. Raises ODataError for a lot that is unknown or decided."""
        moment = time.time()
        at = _now_text()
        with self._transaction() as db:
            lot = fields["InspectionLot"]
            row = db.execute(
                "SELECT has_decision, entity_json FROM sap_inspection_lots"
                " WHERE inspection_lot = ?",
                (lot,),
            ).fetchone()
            if row is None:
                raise bad_request("QA/NO_LOT", f"Inspection lot {lot} does not exist")
            has_decision, lot_json = row
            if has_decision:
                raise bad_request(
                    "QA/DECIDED", f"A usage decision has already been made for inspection lot {lot}"
                )
            inspection_lot = json.loads(lot_json)
            if (
                fields.get("SelectedCodeSetPlant", inspection_lot["Plant"])
                != inspection_lot["Plant"]
            ):
                raise bad_request(
                    "QA/PLANT",
                    f"Selected set plant {fields['SelectedCodeSetPlant']} is not the plant"
                    f" {inspection_lot['Plant']} of inspection lot {lot}",
                )
            (seq,) = db.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM sap_lot_usage_decisions"
            ).fetchone()
            entity: JsonObject = {
                **fields,
                "InspectionLotUsageDecidedBy": user,
                "InspectionLotUsageDecidedOn": _odata_date(moment),
            }
            change = Change("sap", "usage_decision", lot, None, at)
            Inventory(db).decide(
                change,
                inspection_lot["Material"],
                inspection_lot["Batch"],
                fields["InspectionLotUsageDecisionCode"],
                stock_target,
                plant=inspection_lot["Plant"],
            )
            inspection_lot["InspectionLotHasUsageDecision"] = True
            db.execute(
                "UPDATE sap_inspection_lots SET has_decision = 1, entity_json = ?"
                " WHERE inspection_lot = ?",
                (json.dumps(inspection_lot), lot),
            )
            db.execute(
                "INSERT INTO sap_lot_usage_decisions (seq, inspection_lot, entity_json)"
                " VALUES (?, ?, ?)",
                (seq, lot, json.dumps(entity, ensure_ascii=False)),
            )
        return entity

    def _entities(self, table: str, order: str, **columns: str | None) -> list[JsonObject]:
        """The stored OData entities of one of our tables, narrowed by the columns given."""
        where, parameters = _where(**columns)
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT entity_json FROM {table}{where} ORDER BY {order}", parameters
            ).fetchall()
        return [json.loads(entity_json) for (entity_json,) in rows]

    def usage_decisions(self) -> list[JsonObject]:
        return self._entities("sap_lot_usage_decisions", "seq")

    def create_material_document(self, fields: JsonObject, user: str) -> JsonObject:
        """Post a goods issue (GoodsMovementCode 03) and return the stored header."""
        moment = time.time()
        at = _now_text()
        with self._transaction() as db:
            (seq,) = db.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM sap_material_documents"
            ).fetchone()
            document = f"49{500000 + seq:08d}"
            year = str(datetime.fromtimestamp(moment, UTC).year)
            inventory = Inventory(db)
            items = []
            for number, item in enumerate(fields["to_MaterialDocumentItem"], start=1):
                stored = {
                    "MaterialDocumentYear": year,
                    "MaterialDocument": document,
                    "MaterialDocumentItem": f"{number:04d}",
                    **item,
                }
                items.append(stored)
                change = Change(
                    "sap",
                    "goods_issue",
                    f"{document}/{year}",
                    item.get("MaterialDocumentItemText") or None,
                    at,
                )
                inventory.issue(
                    change,
                    item["Material"],
                    item.get("Batch", ""),
                    Decimal(item["QuantityInEntryUnit"]),
                    plant=item["Plant"],
                    unit=item["EntryUnit"],
                )
            header: JsonObject = {
                "MaterialDocumentYear": year,
                "MaterialDocument": document,
                **{
                    name: value
                    for name, value in fields.items()
                    if name != "to_MaterialDocumentItem"
                },
                "CreatedByUser": user,
                "CreationDate": _odata_date(moment),
                "to_MaterialDocumentItem": items,
            }
            db.execute(
                "INSERT INTO sap_material_documents (seq, entity_json) VALUES (?, ?)",
                (seq, json.dumps(header, ensure_ascii=False)),
            )
        return header

    def material_documents(self) -> list[JsonObject]:
        return self._entities("sap_material_documents", "seq")

    def batches(self, *, material: str | None = None, batch: str | None = None) -> list[JsonObject]:
        """Batches with status, stock per type and history, by material then batch."""
        where, parameters = _where(material=material, batch=batch)
        with self._transaction() as db:
            rows = db.execute(
                "SELECT material, batch, plant, unit, status, unrestricted, quality_inspection,"
                f" blocked, updated_at FROM batches{where} ORDER BY material, batch",
                parameters,
            ).fetchall()
            listed = []
            for material_, batch_, plant, unit, status, *stock, updated_at in rows:
                history = db.execute(
                    "SELECT entry_json FROM batch_history WHERE material = ? AND batch = ?"
                    " ORDER BY seq",
                    (material_, batch_),
                ).fetchall()
                listed.append(
                    {
                        "material": material_ or None,
                        "batch": batch_,
                        "plant": plant,
                        "unit": unit,
                        "status": status,
                        "quantity": {
                            stock_type: decimal_text(Decimal(amount))
                            for stock_type, amount in zip(STOCK_TYPES, stock, strict=True)
                        },
                        "updated_at": updated_at,
                        "history": [json.loads(entry) for (entry,) in history],
                    }
                )
        return listed

    def clear(self) -> JsonObject:
        """Delete everything stored; return how many events, confirmations... were cleared."""
        with self._transaction() as db:
            cleared = {"cleared": db.execute("DELETE FROM received_events").rowcount}
            for table in DATA_TABLES:
                count = db.execute(f"DELETE FROM {table}").rowcount
                if table in ("sap_confirmations", "sap_lot_usage_decisions", "batches"):
                    cleared[table.removeprefix("sap_lot_").removeprefix("sap_")] = count
        return cleared
