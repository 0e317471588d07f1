"""ERP API simulator: a real HTTP peer that receives the gateway's CloudEvents offline.

It answers like the central ERP the gateway delivers milestones to, in two northbound
profiles, and misbehaves on purpose when told to, so retry, back-off, token refresh and
lookup-before-retry paths meet a real server. Run it with
``python -m simulators.erp_api --port 8480 --db erp.sqlite``; it prints
``erp-api listening on http://HOST:PORT`` once it accepts connections. Everything is kept
in the SQLite file (OAuth tokens and CSRF sessions live in memory only, like a restart of
the real systems would forget sessions).

Canonical profile: one structured CloudEvent per ``POST /api/events`` with an
``Idempotency-Key`` header (201 ``{"reference", "duplicate": false}``; a repeated key
answers 200 with the first reference and is counted, never stored twice), or a CloudEvents
batch on ``POST /api/events:batch`` keyed by each event's id (200, one outcome per event).
A new ``lot.produced`` event puts ``data.quantity`` of ``data.lot_id`` / ``data.material``
into quality-inspection stock; a new ``lot.disposition`` applies ``data.disposition``
(release: unrestricted, reject or hold: blocked) to that batch.

SAP S/4HANA profile (OData v2, JSON, no idempotency header). Every request body and
``$filter`` is checked against SAP's published metadata (``tests/fixtures/sap/*.json``, from
SAP's generated clients on npm; ``--sap-metadata DIR``): a property the entity set does not
have, a value of the wrong Edm type (a number for an Edm.Decimal string, a date not in
``/Date(ms)/``), a string longer than its MaxLength or a decimal beyond its precision and
scale answers 400 in SAP Gateway's error shape (``error.code``, ``error.message.value``,
``error.innererror.errordetails``), before anything is stored. Units are checked against a
standard unit table: ``ConfirmationUnit``/``EntryUnit`` take internal units (ST or PC, KG),
``...ISOCode`` take ISO codes (PCE, KGM); C62 or H87 are neither.

- ``API_PROD_ORDER_CONFIRMATION_2_SRV``: ``POST /ProdnOrdConf2`` creates a production order
  confirmation (201 ``{"d": {...}}``) and posts its goods movements
  (``to_ProdnOrdConfMatlDocItm``: 101 receipt, which needs ``GoodsMovementRefDocType`` F and
  a batch; into quality inspection with ``InventoryUsabilityCode`` "2", which opens an
  inspection lot of origin 04 for the batch, or adds to its open one; 261 issue);
  ``GET /ProdnOrdConf2?$filter=OrderID eq 'X' and ConfirmationText eq 'Y'`` (any string
  property, joined by ``and``) looks confirmations up; ``GET /ProdnOrdConf2(ConfirmationGroup=
  'G',ConfirmationCount='C')`` reads one. The same ConfirmationText posted twice makes two
  confirmations (``sap_duplicate_texts`` in ``/stats``), as SAP would.
- ``API_INSPECTIONLOT_SRV``: ``GET /A_InspectionLot?$filter=...`` finds inspection lots;
  ``POST /A_InspLotUsageDecision`` records the usage decision of one (keyed by
  ``InspectionLot``; catalog 3, selected set 01, code group 01, code A accepts and releases
  the batch's stock to unrestricted, R rejects and blocks it; an unknown lot, a decided lot,
  another plant or another code is a 400); ``GET /A_InspLotUsageDecision?$filter=...``.
- ``API_MATERIAL_DOCUMENT_SRV``: ``POST /A_MaterialDocumentHeader`` with
  ``GoodsMovementCode`` 03 and ``to_MaterialDocumentItem`` 261 items (order, internal
  ``EntryUnit``) issues stock; ``GET /A_MaterialDocumentItem?$filter=...`` looks items up.
- CSRF like SAP Gateway: a GET (or HEAD) with ``X-CSRF-Token: Fetch`` answers the token
  in ``X-CSRF-Token`` and a ``SAP_SESSIONID_S4H_100`` session cookie; a POST without that
  session's token is refused 403 with ``X-CSRF-Token: Required``.

OAuth2 client credentials: ``POST /oauth/token`` (form ``grant_type=client_credentials``
with ``client_id``/``client_secret``, or HTTP Basic) answers ``{"access_token",
"token_type": "Bearer", "expires_in"}``. With at least one ``--client ID:SECRET``, every
``/api/*`` and ``/sap/*`` request needs a valid unexpired ``Authorization: Bearer`` token
(401 with ``WWW-Authenticate: Bearer ...`` otherwise); without, nothing is checked.
The token endpoint itself is never faulted (no latency, outage or scripted status).

For tests (never behind a token or a fault): ``GET /events`` (``?type=``; each row's ``type``
is the short name, ``lot.produced`` for ``com.plantsync.edge.lot.produced.v1``), ``GET /stats``
(canonical received/unique/duplicates, fault and auth counters, SAP confirmations,
``sap_duplicate_texts``, usage decisions, ``issues_from_unreleased_batches``),
``GET /healthz``, ``GET /_sim/batches`` (``?material=``), ``GET /_sim/batches/{batch}``
(``?material=``), ``GET /_sim/sap/confirmations``, ``GET /_sim/sap/usage-decisions`` (each
with its inspection lot's material, batch and plant under ``_lot``),
``GET /_sim/sap/inspection-lots``, ``GET /_sim/sap/material-documents``,
``POST /_sim/reset`` (clears stored data and counters, not faults, tokens or sessions),
and ``GET``/``POST /_sim/faults`` with a JSON object of knobs:

- ``latency`` (s, every /api and /sap request), ``error_rate`` (0..1), ``error_status``,
  ``retry_after`` (s, sent with injected 429 and 503);
- ``outage_until`` (Unix time) or ``outage_seconds`` (from now): every /api and /sap
  request answers 503 with ``Retry-After`` (seconds left) until then; 0 ends it;
- ``status_sequence`` ([500, 429, 201, ...]): the next deliveries answer these statuses in
  turn without being processed; a 2xx entry lets that delivery through normally;
- ``drop_connection`` (N): the next N deliveries are cut off (connection closed, no answer,
  nothing processed); ``drop_response`` (N): the next N deliveries are processed, then
  the connection is closed without an answer (the ambiguous failure);
- ``expire_tokens_now`` (true): revoke every issued access token;
  ``invalidate_csrf`` (true): forget every CSRF session.

A delivery is a POST to /api/events, /api/events:batch, ProdnOrdConf2,
A_MaterialDocumentHeader or A_InspLotUsageDecision; knobs are applied in this order: latency,
outage, bearer token, CSRF token, drop_connection, status_sequence, error_rate. Command line
settings: ``--client ID:SECRET`` (repeatable), ``--token-ttl S``, ``--error-rate``,
``--error-status``, ``--retry-after``, ``--latency``, ``--outage-seconds``,
``--status-sequence 500,429,201``, ``--drop-connection N``, ``--drop-response N``,
``--log-requests``, ``--sap-metadata DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import math
import random
import re
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from simulators.http_common import (
    DEFAULT_TOKEN_TTL,
    TOKEN_RESPONSE_HEADERS,
    FaultFlagHelp,
    FaultKnobs,
    SqliteStore,
    TokenIssuer,
    add_client_arguments,
    add_fault_arguments,
    add_listen_arguments,
    bearer_token,
    control_routes,
    idempotency_key,
    injected_status,
    oauth_error,
    read_json,
    run_until_signalled,
    uvicorn_server,
)
from simulators.http_common import serve as serve_until_stopped

JsonObject = dict[str, Any]
Endpoint = Callable[[Request], Awaitable[Response]]

EVENT_CONTENT_TYPES = frozenset({"application/json", "application/cloudevents+json"})
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
REQUIRED_ATTRIBUTES = ("id", "type")
OPTIONAL_STRING_ATTRIBUTES = ("subject", "partitionkey")

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
SAP_SESSION_COOKIE = "SAP_SESSIONID_S4H_100"
CSRF_HEADER = "X-CSRF-Token"
AUTH_REALM = "plantsync-erp-sim"
DEFAULT_USER = "PLANTSYNC"

STOCK_TYPES = ("unrestricted", "quality_inspection", "blocked")
USABILITY_CODES = {
    "": "unrestricted",
    "2": "quality_inspection",
    "X": "quality_inspection",
    "3": "blocked",
}
DISPOSITION_STOCK = {"release": "unrestricted", "reject": "blocked", "hold": "blocked"}
CANONICAL_DECIMAL = re.compile(r"^\d+(\.\d+)?$")
FILTER_TERM = re.compile(r"\s*([A-Za-z_]\w*)\s+eq\s+'((?:[^']|'')*)'\s*")
FILTER_AND = re.compile(r"and\s+")
CONFIRMATION_KEY = re.compile(r"^ConfirmationGroup='(\d+)',ConfirmationCount='(\d+)'$")


GATEWAY_TYPE = re.compile(r"^com\.plantsync\.edge\.(.+)\.v\d+$")


def short_type(cloudevent_type: str) -> str:
    """A PlantSync CloudEvents type without its reverse-DNS prefix and version
    (`com.plantsync.edge.lot.produced.v1` -> `lot.produced`); older gateways sent the short
    name itself, and other types are kept as they are."""
    match = GATEWAY_TYPE.match(cloudevent_type)
    return match.group(1) if match else cloudevent_type


class InvalidEvent(ValueError):
    """A request body that is not an acceptable CloudEvent; the message is sent back."""


class ODataError(Exception):
    """A request the OData services refuse; answered as an OData v2 error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Faults(FaultKnobs):
    """Misbehaviour the simulator applies to /api and /sap requests, validated on creation."""

    outage_until: float = 0.0
    """Unix time until which every /api and /sap request answers 503 (0: no outage)."""


@dataclass(frozen=True)
class FaultActions:
    """The run-time knobs that act once or count down rather than stay set."""

    outage_seconds: float | None = None
    status_sequence: tuple[int, ...] | None = None
    drop_connection: int | None = None
    drop_response: int | None = None
    expire_tokens_now: bool = False
    invalidate_csrf: bool = False

    NAMES = frozenset(
        {
            "outage_seconds",
            "status_sequence",
            "drop_connection",
            "drop_response",
            "expire_tokens_now",
            "invalidate_csrf",
        }
    )

    @classmethod
    def parse(cls, changes: Mapping[str, object]) -> FaultActions:
        """Validate the action knobs among ``changes`` (decoded JSON), or raise ValueError."""
        actions: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in cls.NAMES:
                continue
            if name == "outage_seconds":
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise ValueError(f"outage_seconds must be a number >= 0, got {value!r}")
                actions[name] = float(value)
            elif name == "status_sequence":
                actions[name] = status_sequence(value)
            elif name in ("drop_connection", "drop_response"):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
                actions[name] = value
            else:
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be true or false, got {value!r}")
                actions[name] = value
        return cls(**actions)


def status_sequence(value: object) -> tuple[int, ...]:
    """Validate a scripted status list: 2xx lets a delivery through, 4xx/5xx answers it."""
    if not isinstance(value, list | tuple):
        raise ValueError(f"status_sequence must be a list of HTTP statuses, got {value!r}")
    statuses = []
    for status in value:
        if (
            isinstance(status, bool)
            or not isinstance(status, int)
            or not (200 <= status <= 299 or 400 <= status <= 599)
        ):
            raise ValueError(f"status_sequence entries must be 2xx, 4xx or 5xx, got {status!r}")
        statuses.append(status)
    return tuple(statuses)


@dataclass
class Counters:
    """What the simulator counts in memory (stored data is counted from the database)."""

    errors_injected: int = 0
    outage_rejections: int = 0
    connections_dropped: int = 0
    responses_dropped: int = 0
    tokens_issued: int = 0
    token_requests_refused: int = 0
    auth_rejections: int = 0
    csrf_tokens_fetched: int = 0
    csrf_rejections: int = 0


@dataclass
class CsrfSessions:
    """SAP Gateway CSRF protection: one token per session cookie."""

    _tokens: dict[str, str] = field(default_factory=dict)

    def fetch(self, session: str | None) -> tuple[str, str]:
        """Return (session id, token): the session's own, or a new session's."""
        if session is not None and session in self._tokens:
            return session, self._tokens[session]
        session = secrets.token_urlsafe(24)
        token = base64.b64encode(secrets.token_bytes(18)).decode("ascii")
        self._tokens[session] = token
        return session, token

    def valid(self, session: str | None, token: str | None) -> bool:
        if session is None or token is None:
            return False
        expected = self._tokens.get(session)
        return expected is not None and secrets.compare_digest(expected, token)

    def clear(self) -> None:
        self._tokens.clear()


@dataclass
class ScriptedFaults:
    """Count-down knobs: scripted statuses and dropped connections for the next deliveries."""

    statuses: deque[int] = field(default_factory=deque)
    drop_connection: int = 0
    drop_response: int = 0

    def as_json(self) -> JsonObject:
        return {
            "status_sequence": list(self.statuses),
            "drop_connection": self.drop_connection,
            "drop_response": self.drop_response,
        }


@dataclass(frozen=True)
class Receipt:
    """What the ERP answers for one accepted delivery."""

    reference: str
    duplicate: bool


@dataclass(frozen=True)
class Delivery:
    """One validated event and the idempotency key it was delivered under."""

    key: str
    event: JsonObject


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


def _decimal_text(value: Decimal) -> str:
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
            detail={"quantity": _decimal_text(quantity), "stock_type": stock_type},
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
            detail={"quantity": _decimal_text(-quantity), "stock_type": "unrestricted"},
        )
        return state

    def decide(
        self, change: Change, material: str, batch: str, code: str, target: str, *,
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
            detail={"code": code, "quantity": _decimal_text(moved), "stock_type": target},
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


def _apply_canonical(inventory: Inventory, event: JsonObject, reference: str, at: str) -> None:
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
                _apply_canonical(inventory, event, reference, received_at)
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
            entity["InspectionLotQuantity"] = _decimal_text(total)
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
            "InspectionLotQuantity": _decimal_text(quantity),
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
        return self._entities("sap_confirmations", "seq", confirmation_text=text,
                              order_id=order_id, confirmation_group=group,
                              confirmation_count=count)

    def inspection_lots(self, lot: str | None = None) -> list[JsonObject]:
        return self._entities("sap_inspection_lots", "inspection_lot", inspection_lot=lot)

    def create_usage_decision(
        self, fields: JsonObject, user: str, stock_target: str
    ) -> JsonObject:
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
                raise _bad_request("QA/NO_LOT", f"Inspection lot {lot} does not exist")
            has_decision, lot_json = row
            if has_decision:
                raise _bad_request(
                    "QA/DECIDED", f"A usage decision has already been made for inspection lot {lot}"
                )
            inspection_lot = json.loads(lot_json)
            if fields.get("SelectedCodeSetPlant", inspection_lot["Plant"]) != inspection_lot[
                "Plant"
            ]:
                raise _bad_request(
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
                    "sap", "goods_issue", f"{document}/{year}",
                    item.get("MaterialDocumentItemText") or None, at,
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
                **{name: value for name, value in fields.items()
                   if name != "to_MaterialDocumentItem"},
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
                            stock_type: _decimal_text(Decimal(amount))
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


def validate_event(candidate: object) -> JsonObject:
    """Return ``candidate`` if it is a usable structured CloudEvent, else raise InvalidEvent."""
    if not isinstance(candidate, dict):
        raise InvalidEvent("event must be a JSON object (one structured CloudEvent)")
    missing = [
        name
        for name in REQUIRED_ATTRIBUTES
        if not isinstance(candidate.get(name), str) or not candidate[name]
    ]
    if missing:
        raise InvalidEvent(
            f"event is missing required attribute(s) {', '.join(missing)}"
            " (non-empty strings expected)"
        )
    for name in OPTIONAL_STRING_ATTRIBUTES:
        value = candidate.get(name)
        if value is not None and not isinstance(value, str):
            raise InvalidEvent(f"event attribute {name} must be a string")
    return candidate


SAP_METADATA_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sap"
"""SAP's published metadata, extracted from its generated clients on npm (see extract.py)."""
SYNTAX_ERROR = "/IWBEP/CM_MGW_RT/020"
"""The SAP Gateway message a request body that does not fit the metadata is answered with."""
ODATA_DATE = re.compile(r"^/Date\((-?\d+)\)/$")
ODATA_DATE_OFFSET = re.compile(r"^/Date\((-?\d+)([+-]\d{4})?\)/$")
ISO_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?$")
ODATA_TIME = re.compile(r"^PT(\d{1,2}H)?(\d{1,2}M)?(\d{1,2}(\.\d+)?S)?$")
GUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
DECIMAL_TEXT = re.compile(r"^[+-]?(\d*)(?:\.(\d*))?$")
INTEGER_RANGES = {"Edm.Byte": (0, 255), "Edm.SByte": (-128, 127),
                  "Edm.Int16": (-(2**15), 2**15 - 1), "Edm.Int32": (-(2**31), 2**31 - 1)}

UNITS = {
    # internal unit (T006-MSEHI, or its English commercial spelling) -> ISO code (T006-ISOCODE)
    "ST": "PCE", "PC": "PCE", "EA": "EA", "KG": "KGM", "G": "GRM", "TO": "TNE",
    "L": "LTR", "ML": "MLT", "M3": "MTQ", "M": "MTR", "MM": "MMT", "CM": "CMT", "M2": "MTK",
    "H": "HUR", "MIN": "MIN", "S": "SEC", "KAR": "CT",
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
            raise _bad_request("INVALID_BODY", f"{where} must be a JSON object")
        facts = self.entity_type(service, entity_set)
        for name, value in body.items():
            if name == "__metadata":
                continue
            navigation = facts["navigation"].get(name)
            if navigation is not None:
                items = value.get("results") if isinstance(value, dict) and navigation[
                    "many"] else value
                if not navigation["many"]:
                    items = [items]
                if not isinstance(items, list):
                    raise _bad_request(
                        "INVALID_BODY", f"{where}: navigation property {name} must be a list")
                for number, item in enumerate(items):
                    self.check_entity(service, navigation["target"], item,
                                      f"{where}.{name}[{number}]")
                continue
            fact = facts["properties"].get(name)
            if fact is None:
                raise ODataError(400, SYNTAX_ERROR,
                                 f"Property '{name}' is invalid for entity set {entity_set}"
                                 f" ({where})")
            problem = _edm_problem(fact, value)
            if problem is not None:
                raise ODataError(400, SYNTAX_ERROR, f"{where}: property {name}: {problem}")

    def check_filter(self, service: str, entity_set: str,
                     terms: Sequence[tuple[str, str]]) -> None:
        properties = self.entity_type(service, entity_set)["properties"]
        for name, value in terms:
            fact = properties.get(name)
            if fact is None:
                raise _bad_request(
                    "INVALID_FILTER", f"Property '{name}' is not a property of {entity_set}")
            if fact["type"] != "Edm.String":
                raise _bad_request("INVALID_FILTER",
                                   f"$filter: {name} is {fact['type']}, not a string literal")
            if len(value) > fact.get("max_length", len(value)):
                raise _bad_request(
                    "INVALID_FILTER", f"$filter: '{value}' is longer than {name}"
                    f" ({fact['max_length']} characters)")


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
        return None if whole and low <= value <= high else (  # type: ignore[operator]
            f"{edm} expects an integer in [{low}, {high}], got {shown}")
    checks: dict[str, tuple[Callable[[object], bool], str]] = {
        "Edm.Boolean": (lambda v: isinstance(v, bool), "true or false"),
        "Edm.DateTime": (lambda v: isinstance(v, str) and bool(
            ODATA_DATE.match(v) or ISO_DATE_TIME.match(v)), '"/Date(<ms>)/"'),
        "Edm.DateTimeOffset": (lambda v: isinstance(v, str) and bool(
            ODATA_DATE_OFFSET.match(v)), '"/Date(<ms>+0000)/"'),
        "Edm.Time": (lambda v: isinstance(v, str) and bool(ODATA_TIME.match(v)),
                     "PT<h>H<m>M<s>S"),
        "Edm.Guid": (lambda v: isinstance(v, str) and bool(GUID.match(v)), "a GUID string"),
        "Edm.Int64": (lambda v: isinstance(v, str) and v.lstrip("-").isdigit(),
                      "a string of digits"),
    }
    check = checks.get(edm)
    if check is None or check[0](value):
        return None
    return f"{edm} expects {check[1]}, got {shown}"


def _bad_request(code: str, message: str) -> ODataError:
    return ODataError(400, f"SIM/{code}", message)


def _unit(body: JsonObject, internal: str, iso: str, where: str, *, required: bool) -> str | None:
    """The unit of a quantity as SAP resolves it (its ISO code), from the internal unit, the
    ISO code, or both when they agree."""
    given_internal, given_iso = body.get(internal), body.get(iso)
    if given_internal is not None and given_internal not in UNITS:
        raise _bad_request("UNIT", f"{where}: unit {given_internal} is not defined ({internal}"
                           " takes a unit of the unit table, e.g. PC or KG)")
    if given_iso is not None and given_iso not in ISO_UNITS:
        raise _bad_request("UNIT", f"{where}: ISO code {given_iso} is not assigned to any unit"
                           f" ({iso})")
    if given_internal is not None and given_iso is not None and UNITS[given_internal] != given_iso:
        raise _bad_request("UNIT", f"{where}: {internal} {given_internal} and {iso} {given_iso}"
                           " are different units")
    if given_internal is None and given_iso is None:
        if required:
            raise _bad_request("UNIT", f"{where}: give the unit in {internal} or {iso}")
        return None
    return str(given_iso if given_iso is not None else UNITS[str(given_internal)])


def _required(body: JsonObject, names: Sequence[str], where: str) -> None:
    for name in names:
        if body.get(name) in (None, ""):
            raise _bad_request("MISSING_PROPERTY", f"{where}: property {name} is required")


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
    fields = {name: value for name, value in body.items()
              if name not in ("__metadata", MATERIAL_DOCUMENT_ITEMS)}
    unit = _unit(body, "ConfirmationUnit", "ConfirmationUnitISOCode", where, required=False)
    if unit is not None:
        fields["ConfirmationUnitISOCode"] = unit
    fields.setdefault("Sequence", "0")
    fields.setdefault("ConfirmationText", "")
    for name in ("ConfirmationYieldQuantity", "ConfirmationScrapQuantity"):
        fields[name] = _decimal_text(Decimal(body.get(name) or "0"))
    fields.setdefault("IsFinalConfirmation", False)
    items = []
    for number, item in enumerate(_items(body, MATERIAL_DOCUMENT_ITEMS)):
        at = f"{MATERIAL_DOCUMENT_ITEMS}[{number}]"
        _required(item, ("Material", "Plant", "GoodsMovementType", "QuantityInEntryUnit"), at)
        movement = item["GoodsMovementType"]
        if movement not in ("101", "261"):
            raise _bad_request("MOVEMENT_TYPE", f"{at}: GoodsMovementType {movement!r} is not"
                               " 101 (goods receipt) or 261 (goods issue)")
        if movement == "101" and item.get("GoodsMovementRefDocType") != "F":
            raise _bad_request("REF_DOC_TYPE", f"{at}: a 101 receipt for the order needs"
                               " GoodsMovementRefDocType F")
        if movement == "101":
            _required(item, ("Batch",), at)
        usability = item.get("InventoryUsabilityCode", "")
        if usability not in USABILITY_CODES:
            raise _bad_request("INVALID_VALUE", f"{at}: InventoryUsabilityCode {usability!r} is"
                               " not '' (unrestricted), '2' or 'X' (quality inspection) or '3'")
        quantity = Decimal(item["QuantityInEntryUnit"])
        if quantity <= 0:
            raise _bad_request("INVALID_DECIMAL", f"{at}: QuantityInEntryUnit must be positive")
        unit = _unit(item, "EntryUnit", "EntryUnitISOCode", at, required=True)
        items.append({**{k: v for k, v in item.items() if k != "__metadata"},
                      "Batch": item.get("Batch", ""), "EntryUnitISOCode": unit,
                      "EntryUnit": item.get("EntryUnit") or unit,
                      "QuantityInEntryUnit": _decimal_text(quantity)})
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
        raise _bad_request("GM_CODE", f"{where}: GoodsMovementCode {code!r} is not 01..07")
    if code != "03":
        raise _bad_request("GM_CODE", f"{where}: only goods issues (GoodsMovementCode 03) are"
                           " simulated")
    items = _items(body, "to_MaterialDocumentItem")
    if not items:
        raise _bad_request("NO_ITEMS", f"{where}: a material document needs at least one item")
    checked = []
    for number, item in enumerate(items):
        at = f"to_MaterialDocumentItem[{number}]"
        _required(item, ("Material", "Plant", "GoodsMovementType", "QuantityInEntryUnit",
                         "EntryUnit"), at)
        if item["GoodsMovementType"] != "261":
            raise _bad_request("MOVEMENT_TYPE", f"{at}: GoodsMovementType"
                               f" {item['GoodsMovementType']!r} is not 261 (issue to an order)")
        _required(item, ("ManufacturingOrder",), at)
        _unit(item, "EntryUnit", "", at, required=True)
        quantity = Decimal(item["QuantityInEntryUnit"])
        if quantity <= 0:
            raise _bad_request("INVALID_DECIMAL", f"{at}: QuantityInEntryUnit must be positive")
        checked.append({**{k: v for k, v in item.items() if k != "__metadata"},
                        "QuantityInEntryUnit": _decimal_text(quantity)})
    fields = {name: value for name, value in body.items()
              if name not in ("__metadata", "to_MaterialDocumentItem")}
    fields["to_MaterialDocumentItem"] = checked
    return fields


def parse_usage_decision(metadata: SapMetadata, body: object) -> tuple[JsonObject, str]:
    """Validate an A_InspLotUsageDecision create body; return its properties and where the
    stock goes (the code's valuation in the selected set)."""
    where = USAGE_DECISION_SET
    metadata.check_entity(INSPECTION_SERVICE, USAGE_DECISION_SET, body, where)
    assert isinstance(body, dict)
    _required(body, ("InspectionLot", "InspLotUsgeDcsnSelectedSet",
                     "InspLotUsageDecisionCodeGroup", "InspectionLotUsageDecisionCode"), where)
    if body.get("InspLotUsageDecisionCatalog", "3") != "3":
        raise _bad_request("CATALOG", f"{where}: usage decisions are in catalog 3, not"
                           f" {body['InspLotUsageDecisionCatalog']!r}")
    key = (body["InspLotUsgeDcsnSelectedSet"], body["InspLotUsageDecisionCodeGroup"],
           body["InspectionLotUsageDecisionCode"])
    target = USAGE_DECISION_CATALOG.get(key)
    if target is None:
        raise _bad_request("UD_CODE", f"{where}: code {key[2]} of code group {key[1]} is not in"
                           f" selected set {key[0]}")
    return {name: value for name, value in body.items() if name != "__metadata"}, target


def parse_filter(expression: str) -> list[tuple[str, str]]:
    """Parse ``Prop eq 'value' [and Prop eq 'value' ...]``, the only $filter form served."""
    terms = []
    position = 0
    while True:
        term = FILTER_TERM.match(expression, position)
        if term is None:
            raise _bad_request(
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
            raise _bad_request("INVALID_FILTER", f"$filter {expression!r}: expected 'and'")
        position = joined.end()


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _odata_headers(headers: Mapping[str, str] | None = None) -> dict[str, str]:
    return {"DataServiceVersion": "2.0", **(headers or {})}


def _odata_response(
    body: JsonObject, status: int = 200, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=_odata_headers(headers))


def _odata_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    # SAP Gateway's shape: code, message {lang, value}, and the details in innererror.
    detail = {"code": code, "message": message, "propertyref": "", "severity": "error",
              "target": ""}
    body = {"error": {"code": code, "message": {"lang": "en", "value": message},
                      "innererror": {"transactionid": secrets.token_hex(16).upper(),
                                     "timestamp": datetime.now(UTC).strftime("%Y%m%d%H%M%S"),
                                     "errordetails": [detail]}}}
    return _odata_response(body, status, headers)


async def _odata_body(request: Request) -> object:
    if _media_type(request) != "application/json":
        raise ODataError(
            415, "SIM/UNSUPPORTED_MEDIA_TYPE", "send the entity as Content-Type application/json"
        )
    try:
        return await read_json(request, InvalidEvent)
    except InvalidEvent as exc:
        raise _bad_request("INVALID_JSON", str(exc)) from exc


def _client_credentials(request: Request, form: Mapping[str, str]) -> tuple[str, str] | None:
    """The client id and secret from HTTP Basic auth, else from the form; None if malformed."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        client_id, colon, secret = decoded.partition(":")
        if not colon:
            return None
        # RFC 6749 2.3.1: both parts are form-urlencoded before being joined.
        return unquote(client_id.replace("+", " ")), unquote(secret.replace("+", " "))
    return form.get("client_id", ""), form.get("client_secret", "")


def _filtered(entities: list[JsonObject], terms: Sequence[tuple[str, str]]) -> list[JsonObject]:
    return [
        entity
        for entity in entities
        if all(str(entity.get(name, "")) == value for name, value in terms)
    ]


def _paged(entities: list[JsonObject], request: Request) -> list[JsonObject]:
    def number(option: str) -> int | None:
        text = request.query_params.get(option)
        if text is None:
            return None
        if not text.isdigit():
            raise _bad_request("INVALID_OPTION", f"{option} must be a non-negative integer")
        return int(text)

    skip, top = number("$skip") or 0, number("$top")
    return entities[skip:] if top is None else entities[skip : skip + top]


def _check_format(request: Request) -> None:
    wanted = request.query_params.get("$format", "json")
    if wanted != "json":
        raise _bad_request("INVALID_OPTION", f"$format={wanted} is not served here; use json")


def _service_url(request: Request, service: str) -> str:
    return str(request.base_url).rstrip("/") + service


def _confirmation_payload(entity: JsonObject, base: str, *, expand: bool) -> JsonObject:
    group, count = entity["ConfirmationGroup"], entity["ConfirmationCount"]
    uri = f"{base}/{CONFIRMATION_SET}(ConfirmationGroup='{group}',ConfirmationCount='{count}')"
    payload: JsonObject = {
        "__metadata": {
            "id": uri,
            "uri": uri,
            "type": "API_PROD_ORDER_CONFIRMATION_2_SRV.A_ProdnOrdConf2Type",
        },
        **{name: value for name, value in entity.items() if name != MATERIAL_DOCUMENT_ITEMS},
    }
    if not expand:
        payload[MATERIAL_DOCUMENT_ITEMS] = {
            "__deferred": {"uri": f"{uri}/{MATERIAL_DOCUMENT_ITEMS}"}
        }
        return payload
    results = []
    for item in entity[MATERIAL_DOCUMENT_ITEMS]:
        item_uri = (
            f"{base}/ProdnOrdConfMatlDocItm(ConfirmationGroup='{group}',"
            f"ConfirmationCount='{count}',MaterialDocument='{item['MaterialDocument']}',"
            f"MaterialDocumentItem='{item['MaterialDocumentItem']}',"
            f"MaterialDocumentYear='{item['MaterialDocumentYear']}')"
        )
        metadata = {
            "id": item_uri,
            "uri": item_uri,
            "type": "API_PROD_ORDER_CONFIRMATION_2_SRV.A_ProdnOrdConfMatlDocItmType",
        }
        results.append({"__metadata": metadata, **item})
    payload[MATERIAL_DOCUMENT_ITEMS] = {"results": results}
    return payload


def _keyed_payload(entity: JsonObject, base: str, entity_set: str, keys: Sequence[str],
                   service: str) -> JsonObject:
    predicate = ",".join(f"{key}='{entity[key]}'" for key in keys)
    uri = f"{base}/{entity_set}({predicate})"
    metadata = {"id": uri, "uri": uri, "type": f"{service}.{entity_set}Type"}
    return {"__metadata": metadata, **entity}


def _usage_decision_payload(entity: JsonObject, base: str) -> JsonObject:
    return _keyed_payload(entity, base, USAGE_DECISION_SET, ["InspectionLot"],
                          "API_INSPECTIONLOT_SRV")


def _inspection_lot_payload(entity: JsonObject, base: str) -> JsonObject:
    return _keyed_payload(entity, base, INSPECTION_LOT_SET, ["InspectionLot"],
                          "API_INSPECTIONLOT_SRV")


DOCUMENT_KEYS = ("MaterialDocumentYear", "MaterialDocument")


def _material_document_payload(entity: JsonObject, base: str) -> JsonObject:
    header = {k: v for k, v in entity.items() if k != "to_MaterialDocumentItem"}
    payload = _keyed_payload(header, base, MATERIAL_DOCUMENT_SET, DOCUMENT_KEYS,
                             "API_MATERIAL_DOCUMENT_SRV")
    payload["to_MaterialDocumentItem"] = {"results": [
        _material_document_item_payload(item, base)
        for item in entity["to_MaterialDocumentItem"]]}
    return payload


def _material_document_item_payload(item: JsonObject, base: str) -> JsonObject:
    return _keyed_payload(item, base, MATERIAL_DOCUMENT_ITEM_SET,
                          [*DOCUMENT_KEYS, "MaterialDocumentItem"], "API_MATERIAL_DOCUMENT_SRV")


class ErpSimulator:
    """Request handlers over one store, the current faults, tokens, sessions and counters."""

    def __init__(
        self,
        store: EventStore,
        faults: Faults,
        log_requests: bool,
        *,
        tokens: TokenIssuer | None = None,
        scripted: ScriptedFaults | None = None,
        metadata: SapMetadata | None = None,
    ) -> None:
        self.store = store
        self.metadata = metadata or SapMetadata()
        self.faults = faults
        self.tokens = tokens or TokenIssuer({})
        self.csrf = CsrfSessions()
        self.scripted = scripted or ScriptedFaults()
        self.counters = Counters()
        self.connection_closer: Callable[[object], bool] | None = None
        """Set by ``serve``: aborts the connection of an ASGI scope's client, if it is open."""
        self._log_requests = log_requests
        self._random = random.Random()

    def _say(self, line: str) -> None:
        if self._log_requests:
            print(line, flush=True)

    # -- the checks every /api and /sap request passes -------------------------------------

    def guard(self, handler: Endpoint, *, odata: bool, delivery: bool) -> Endpoint:
        """Wrap ``handler`` in latency, outage, bearer token, CSRF and delivery faults."""

        async def endpoint(request: Request) -> Response:
            await self.faults.apply_latency()
            try:
                refused = self._outage(request, odata)
                if refused is None:
                    refused = self._authenticate(request, odata)
                if refused is None and delivery and odata:
                    refused = self._check_csrf(request)
                if refused is None and delivery:
                    refused = await self._delivery_faults(request, odata)
                if refused is not None:
                    return refused
                response = await handler(request)
            except ODataError as exc:
                response = _odata_error(exc.status, exc.code, exc.message)
            if odata and request.method in ("GET", "HEAD"):
                self._hand_out_csrf(request, response)
            if delivery and self.scripted.drop_response > 0:
                self.scripted.drop_response -= 1
                return await self._drop(request, "after processing it")
            return response

        return endpoint

    def _refusal(
        self, status: int, message: str, headers: Mapping[str, str], *, odata: bool
    ) -> Response:
        if odata:
            return _odata_error(status, f"SIM/HTTP_{status}", message, headers)
        return _error(status, message, headers)

    def _outage(self, request: Request, odata: bool) -> Response | None:
        remaining = self.faults.outage_until - time.time()
        if remaining <= 0:
            return None
        self.counters.outage_rejections += 1
        self._say(f"ERP answered 503 to {request.url.path} (outage)")
        headers = {"Retry-After": str(max(1, math.ceil(remaining)))}
        return self._refusal(503, "the ERP is unavailable (simulated outage)", headers, odata=odata)

    def _authenticate(self, request: Request, odata: bool) -> Response | None:
        request.state.user = DEFAULT_USER
        if not self.tokens.required:
            return None
        token = bearer_token(request)
        if token is None:
            # RFC 6750 3.1: no error code when the request carried no token at all.
            challenge = f'Bearer realm="{AUTH_REALM}"'
            message = "an OAuth2 bearer token is required (POST /oauth/token)"
        else:
            client_id, why = self.tokens.check(token)
            if client_id is not None:
                request.state.user = client_id
                return None
            challenge = f'Bearer error="invalid_token", error_description="{why}"'
            message = why
        self.counters.auth_rejections += 1
        self._say(f"ERP answered 401 to {request.url.path} ({message})")
        return self._refusal(401, message, {"WWW-Authenticate": challenge}, odata=odata)

    def _check_csrf(self, request: Request) -> Response | None:
        session = request.cookies.get(SAP_SESSION_COOKIE)
        if self.csrf.valid(session, request.headers.get(CSRF_HEADER)):
            return None
        self.counters.csrf_rejections += 1
        self._say(f"SAP answered 403 to {request.url.path} (CSRF token required)")
        return PlainTextResponse(
            "CSRF token validation failed", status_code=403, headers={CSRF_HEADER: "Required"}
        )

    def _hand_out_csrf(self, request: Request, response: Response) -> None:
        if request.headers.get(CSRF_HEADER, "").lower() != "fetch" or response.status_code >= 400:
            return
        session, token = self.csrf.fetch(request.cookies.get(SAP_SESSION_COOKIE))
        response.headers[CSRF_HEADER] = token
        response.set_cookie(SAP_SESSION_COOKIE, session, path="/", httponly=True)
        self.counters.csrf_tokens_fetched += 1

    async def _delivery_faults(self, request: Request, odata: bool) -> Response | None:
        if self.scripted.drop_connection > 0:
            self.scripted.drop_connection -= 1
            return await self._drop(request, "before processing it")
        injected = injected_status(self.scripted.statuses, self.faults, self._random)
        if injected is None:
            return None
        status, cause = injected
        how = "scripted" if cause == "status_sequence" else "injected"
        self.counters.errors_injected += 1
        headers = self.faults.retry_after_headers(status)
        self._say(f"ERP answered {status} to {request.url.path} ({how} fault)")
        return self._refusal(status, f"{how} fault {status}", headers, odata=odata)

    async def _drop(self, request: Request, when: str) -> Response:
        closer = self.connection_closer
        if closer is None or not closer(request.scope.get("client")):
            return _error(502, "cannot drop this connection: run the simulator with uvicorn")
        if when.startswith("after"):
            self.counters.responses_dropped += 1
        else:
            self.counters.connections_dropped += 1
        self._say(f"ERP dropped the connection of {request.url.path} {when} (injected fault)")
        # Let the transport report the loss, so uvicorn discards what is sent below.
        for _ in range(3):
            await asyncio.sleep(0)
        return Response(status_code=500)

    # -- canonical profile -------------------------------------------------------------------

    def _log(self, delivery: Delivery, receipt: Receipt) -> None:
        event = delivery.event
        line = (
            f"ERP received {short_type(event['type'])} subject={event.get('subject')}"
            f" id={event['id']}"
            f" -> {receipt.reference}"
        )
        self._say(line + (" (duplicate)" if receipt.duplicate else ""))

    def _accept(self, deliveries: Sequence[Delivery]) -> list[Receipt]:
        receipts = self.store.record(deliveries)
        for delivery, receipt in zip(deliveries, receipts, strict=True):
            self._log(delivery, receipt)
        return receipts

    async def post_event(self, request: Request) -> Response:
        try:
            key = idempotency_key(request)
        except ValueError as exc:
            return _error(400, str(exc))
        if not key:
            return _error(400, "Idempotency-Key header is required")
        media_type = _media_type(request)
        if media_type not in EVENT_CONTENT_TYPES:
            return _error(
                415,
                f"content type {media_type or '(none)'} is not accepted here; send"
                f" application/cloudevents+json or application/json"
                f" ({BATCH_CONTENT_TYPE} goes to /api/events:batch)",
            )
        try:
            event = validate_event(await read_json(request, InvalidEvent))
        except InvalidEvent as exc:
            return _error(400, str(exc))
        (receipt,) = self._accept([Delivery(key=key, event=event)])
        return JSONResponse(
            {"reference": receipt.reference, "duplicate": receipt.duplicate},
            status_code=200 if receipt.duplicate else 201,
        )

    async def post_batch(self, request: Request) -> Response:
        media_type = _media_type(request)
        if media_type != BATCH_CONTENT_TYPE:
            return _error(415, f"content type {media_type or '(none)'} is not {BATCH_CONTENT_TYPE}")
        try:
            candidates = await read_json(request, InvalidEvent)
        except InvalidEvent as exc:
            return _error(400, str(exc))
        if not isinstance(candidates, list):
            return _error(400, "batch body must be a JSON array of CloudEvents")
        checked: list[Delivery | InvalidEvent] = []
        for candidate in candidates:
            try:
                event = validate_event(candidate)
            except InvalidEvent as exc:
                checked.append(exc)
            else:
                checked.append(Delivery(key=event["id"], event=event))
        receipts = iter(self._accept([item for item in checked if isinstance(item, Delivery)]))
        outcomes: list[JsonObject] = []
        for candidate, item in zip(candidates, checked, strict=True):
            if isinstance(item, InvalidEvent):
                candidate_id = candidate.get("id") if isinstance(candidate, dict) else None
                outcomes.append(
                    {"id": candidate_id, "status": 400, "reference": None, "error": str(item)}
                )
                continue
            receipt = next(receipts)
            outcomes.append(
                {
                    "id": item.event["id"],
                    "status": 200 if receipt.duplicate else 201,
                    "reference": receipt.reference,
                    "error": None,
                }
            )
        return JSONResponse(outcomes)

    # -- OAuth2 --------------------------------------------------------------------------------

    async def issue_token(self, request: Request) -> Response:
        def refuse(status: int, error: str, description: str) -> Response:
            self.counters.token_requests_refused += 1
            return oauth_error(
                status, error, description, realm=AUTH_REALM, headers=TOKEN_RESPONSE_HEADERS
            )

        if _media_type(request) != "application/x-www-form-urlencoded":
            return refuse(400, "invalid_request", "send application/x-www-form-urlencoded")
        body = (await request.body()).decode("utf-8", "replace")
        form = dict(parse_qsl(body, keep_blank_values=True))
        grant_type = form.get("grant_type", "")
        if not grant_type:
            return refuse(400, "invalid_request", "grant_type is required")
        if grant_type != "client_credentials":
            return refuse(400, "unsupported_grant_type", f"{grant_type} is not supported")
        credentials = _client_credentials(request, form)
        if credentials is None or not credentials[0] or not self.tokens.accepts(*credentials):
            return refuse(401, "invalid_client", "unknown client or wrong secret")
        self.counters.tokens_issued += 1
        self._say(f"ERP issued an access token to {credentials[0]}")
        return self.tokens.grant(credentials[0])

    # -- SAP S/4HANA OData ---------------------------------------------------------------------

    def service_document(self, *entity_sets: str) -> Endpoint:
        async def document(request: Request) -> Response:
            _check_format(request)
            return _odata_response({"d": {"EntitySets": list(entity_sets)}})

        return document

    def _terms(self, request: Request, service: str, entity_set: str) -> list[tuple[str, str]]:
        _check_format(request)
        expression = request.query_params.get("$filter", "").strip()
        terms = parse_filter(expression) if expression else []
        self.metadata.check_filter(service, entity_set, terms)
        return terms

    async def create_confirmation(self, request: Request) -> Response:
        fields = parse_confirmation(self.metadata, await _odata_body(request))
        entity = self.store.create_confirmation(fields, request.state.user)
        self._say(
            f"SAP confirmation {entity['ConfirmationGroup']}/{entity['ConfirmationCount']}"
            f" order={entity['OrderID']} op={entity['OrderOperation']}"
            f" yield={entity['ConfirmationYieldQuantity']}"
            f" scrap={entity['ConfirmationScrapQuantity']}"
            f" {entity.get('ConfirmationUnitISOCode', '')}"
            f" posting={entity.get('PostingDate', 'today')} text={entity['ConfirmationText']}"
        )
        payload = _confirmation_payload(
            entity, _service_url(request, CONFIRMATION_SERVICE), expand=True
        )
        return _odata_response({"d": payload}, 201, {"Location": payload["__metadata"]["uri"]})

    async def list_confirmations(self, request: Request) -> Response:
        terms = self._terms(request, CONFIRMATION_SERVICE, CONFIRMATION_SET)
        indexed = dict(terms)
        entities = self.store.confirmations(
            text=indexed.get("ConfirmationText"), order_id=indexed.get("OrderID")
        )
        entities = _paged(_filtered(entities, terms), request)
        expand = MATERIAL_DOCUMENT_ITEMS in request.query_params.get("$expand", "").split(",")
        base = _service_url(request, CONFIRMATION_SERVICE)
        results = [_confirmation_payload(entity, base, expand=expand) for entity in entities]
        return _odata_response({"d": {"results": results}})

    async def get_confirmation(self, request: Request) -> Response:
        _check_format(request)
        key = CONFIRMATION_KEY.match(request.path_params["key"])
        found = (
            self.store.confirmations(key=(key.group(1), key.group(2))) if key is not None else []
        )
        if not found:
            raise ODataError(404, "SIM/NOT_FOUND", "Resource not found for segment ProdnOrdConf2")
        expand = MATERIAL_DOCUMENT_ITEMS in request.query_params.get("$expand", "").split(",")
        base = _service_url(request, CONFIRMATION_SERVICE)
        return _odata_response({"d": _confirmation_payload(found[0], base, expand=expand)})

    async def list_inspection_lots(self, request: Request) -> Response:
        terms = self._terms(request, INSPECTION_SERVICE, INSPECTION_LOT_SET)
        entities = _paged(_filtered(self.store.inspection_lots(), terms), request)
        base = _service_url(request, INSPECTION_SERVICE)
        return _odata_response(
            {"d": {"results": [_inspection_lot_payload(entity, base) for entity in entities]}})

    async def create_usage_decision(self, request: Request) -> Response:
        fields, target = parse_usage_decision(self.metadata, await _odata_body(request))
        entity = self.store.create_usage_decision(fields, request.state.user, target)
        self._say(
            f"SAP usage decision {entity['InspectionLotUsageDecisionCode']}"
            f" (set {entity['InspLotUsgeDcsnSelectedSet']}, group"
            f" {entity['InspLotUsageDecisionCodeGroup']}) inspection lot"
            f" {entity['InspectionLot']}: stock {target}"
        )
        payload = _usage_decision_payload(entity, _service_url(request, INSPECTION_SERVICE))
        return _odata_response({"d": payload}, 201, {"Location": payload["__metadata"]["uri"]})

    async def list_usage_decisions(self, request: Request) -> Response:
        terms = self._terms(request, INSPECTION_SERVICE, USAGE_DECISION_SET)
        entities = _paged(_filtered(self.store.usage_decisions(), terms), request)
        base = _service_url(request, INSPECTION_SERVICE)
        results = [_usage_decision_payload(entity, base) for entity in entities]
        return _odata_response({"d": {"results": results}})

    async def create_material_document(self, request: Request) -> Response:
        fields = parse_material_document(self.metadata, await _odata_body(request))
        entity = self.store.create_material_document(fields, request.state.user)
        items = entity["to_MaterialDocumentItem"]
        self._say(
            f"SAP material document {entity['MaterialDocument']}/{entity['MaterialDocumentYear']}"
            f" goods issue: "
            + ", ".join(f"{item['QuantityInEntryUnit']} {item['EntryUnit']} {item['Material']}"
                        f" batch {item.get('Batch') or '-'} to order {item['ManufacturingOrder']}"
                        for item in items)
        )
        payload = _material_document_payload(
            entity, _service_url(request, MATERIAL_DOCUMENT_SERVICE))
        return _odata_response({"d": payload}, 201, {"Location": payload["__metadata"]["uri"]})

    async def list_material_document_items(self, request: Request) -> Response:
        terms = self._terms(request, MATERIAL_DOCUMENT_SERVICE, MATERIAL_DOCUMENT_ITEM_SET)
        items = [item for header in self.store.material_documents()
                 for item in header["to_MaterialDocumentItem"]]
        base = _service_url(request, MATERIAL_DOCUMENT_SERVICE)
        results = [_material_document_item_payload(item, base)
                   for item in _paged(_filtered(items, terms), request)]
        return _odata_response({"d": {"results": results}})

    # -- for tests -------------------------------------------------------------------------------

    async def list_events(self, request: Request) -> Response:
        wanted = request.query_params.get("type")
        return JSONResponse(self.store.list_events(None if wanted is None else short_type(wanted)))

    async def stats(self, request: Request) -> Response:
        unique, duplicates = self.store.counts()
        return JSONResponse(
            {
                "received": unique + duplicates,
                "unique": unique,
                "duplicates": duplicates,
                **dataclasses.asdict(self.counters),
                **self.store.sap_counts(),
            }
        )

    async def list_batches(self, request: Request) -> Response:
        return JSONResponse(self.store.batches(material=request.query_params.get("material")))

    async def get_batch(self, request: Request) -> Response:
        batch = request.path_params["batch"]
        found = self.store.batches(material=request.query_params.get("material"), batch=batch)
        if not found:
            return _error(404, f"no batch {batch}")
        if len(found) > 1:
            materials = ", ".join(str(each["material"]) for each in found)
            return _error(409, f"batch {batch} exists for materials {materials}: add ?material=")
        return JSONResponse(found[0])

    async def sap_confirmations(self, request: Request) -> Response:
        return JSONResponse(self.store.confirmations())

    async def sap_usage_decisions(self, request: Request) -> Response:
        # Each with its inspection lot's material, batch and plant, so a test can tell which
        # batch was decided without a second query.
        lots = {lot["InspectionLot"]: lot for lot in self.store.inspection_lots()}
        return JSONResponse([
            {**decision, "_lot": {name: lots[decision["InspectionLot"]][name]
                                  for name in ("Material", "Batch", "Plant", "ManufacturingOrder")}}
            for decision in self.store.usage_decisions()])

    async def sap_inspection_lots(self, request: Request) -> Response:
        return JSONResponse(self.store.inspection_lots())

    async def sap_material_documents(self, request: Request) -> Response:
        return JSONResponse(self.store.material_documents())

    def _faults_json(self) -> JsonObject:
        return {**self.faults.as_json(), **self.scripted.as_json()}

    async def get_faults(self, request: Request) -> Response:
        return JSONResponse(self._faults_json())

    async def set_faults(self, request: Request) -> Response:
        try:
            changes = await read_json(request, InvalidEvent)
            if not isinstance(changes, dict):
                raise InvalidEvent("fault settings must be a JSON object")
            actions = FaultActions.parse(changes)
            settings = {
                name: value for name, value in changes.items() if name not in FaultActions.NAMES
            }
            if actions.outage_seconds is not None and "outage_until" in settings:
                raise ValueError("set outage_until or outage_seconds, not both")
            faults = self.faults.updated(settings)
        except ValueError as exc:  # InvalidEvent included
            return _error(400, str(exc))
        if actions.outage_seconds is not None:
            until = time.time() + actions.outage_seconds if actions.outage_seconds > 0 else 0.0
            faults = dataclasses.replace(faults, outage_until=until)
        self.faults = faults
        if actions.status_sequence is not None:
            self.scripted.statuses = deque(actions.status_sequence)
        if actions.drop_connection is not None:
            self.scripted.drop_connection = actions.drop_connection
        if actions.drop_response is not None:
            self.scripted.drop_response = actions.drop_response
        if actions.expire_tokens_now:
            revoked = self.tokens.revoke_all()
            self._say(f"ERP revoked {revoked} access token(s) (injected fault)")
        if actions.invalidate_csrf:
            self.csrf.clear()
            self._say("SAP forgot every CSRF session (injected fault)")
        return JSONResponse(self._faults_json())

    async def reset(self, request: Request) -> Response:
        cleared = self.store.clear()
        self.counters = Counters()
        return JSONResponse(cleared)


def create_app(
    db_path: str = ":memory:",
    faults: Faults | None = None,
    *,
    log_requests: bool = False,
    clients: Mapping[str, str] | None = None,
    token_ttl: int = DEFAULT_TOKEN_TTL,
    scripted: ScriptedFaults | None = None,
    sap_metadata: Path = SAP_METADATA_DIR,
) -> Starlette:
    """Build the ERP simulator app; its store opens and closes with the app's lifespan.

    ``clients`` maps OAuth2 client ids to secrets: when given, /api and /sap need tokens.
    """
    store = EventStore(db_path)
    simulator = ErpSimulator(
        store,
        faults or Faults(),
        log_requests,
        tokens=TokenIssuer(dict(clients or {}), token_ttl),
        scripted=scripted,
        metadata=SapMetadata(sap_metadata),
    )

    # Released production orders live in their own module (simulators/erp_orders.py).
    from simulators.erp_orders import ErpOrders, OrderStore, order_routes

    order_store = OrderStore(db_path)
    orders = ErpOrders(order_store, simulator.metadata, UNITS, _bad_request)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        with store.opened(), order_store.opened():
            yield

    guard = simulator.guard

    def odata(path: str, handler: Endpoint, method: str = "GET") -> Route:
        """A SAP OData route: every POST is a delivery (CSRF, delivery faults)."""
        return Route(path, guard(handler, odata=True, delivery=method == "POST"),
                     methods=[method])

    def service(root: str, *entity_sets: str) -> list[Route]:
        """A service document, with and without its trailing slash (the CSRF fetch)."""
        document = simulator.service_document(*entity_sets)
        return [odata(root, document), odata(f"{root}/", document)]

    confirmations = f"{CONFIRMATION_SERVICE}/{CONFIRMATION_SET}"
    decisions = f"{INSPECTION_SERVICE}/{USAGE_DECISION_SET}"
    documents = f"{MATERIAL_DOCUMENT_SERVICE}/{MATERIAL_DOCUMENT_SET}"
    routes = [
        Route(
            "/api/events",
            guard(simulator.post_event, odata=False, delivery=True),
            methods=["POST"],
        ),
        Route(
            "/api/events:batch",
            guard(simulator.post_batch, odata=False, delivery=True),
            methods=["POST"],
        ),
        Route("/oauth/token", simulator.issue_token, methods=["POST"]),
        *service(CONFIRMATION_SERVICE, CONFIRMATION_SET, "ProdnOrdConfMatlDocItm"),
        odata(confirmations, simulator.list_confirmations),
        odata(confirmations, simulator.create_confirmation, "POST"),
        odata(confirmations + "({key})", simulator.get_confirmation),
        *service(INSPECTION_SERVICE, INSPECTION_LOT_SET, USAGE_DECISION_SET),
        odata(decisions, simulator.list_usage_decisions),
        odata(decisions, simulator.create_usage_decision, "POST"),
        odata(f"{INSPECTION_SERVICE}/{INSPECTION_LOT_SET}", simulator.list_inspection_lots),
        *service(MATERIAL_DOCUMENT_SERVICE, MATERIAL_DOCUMENT_SET, MATERIAL_DOCUMENT_ITEM_SET),
        odata(documents, simulator.create_material_document, "POST"),
        odata(f"{MATERIAL_DOCUMENT_SERVICE}/{MATERIAL_DOCUMENT_ITEM_SET}",
              simulator.list_material_document_items),
        Route("/events", simulator.list_events, methods=["GET"]),
        Route("/_sim/sap/inspection-lots", simulator.sap_inspection_lots, methods=["GET"]),
        Route("/_sim/sap/material-documents", simulator.sap_material_documents,
              methods=["GET"]),
        Route("/_sim/batches", simulator.list_batches, methods=["GET"]),
        Route("/_sim/batches/{batch}", simulator.get_batch, methods=["GET"]),
        Route("/_sim/sap/confirmations", simulator.sap_confirmations, methods=["GET"]),
        Route("/_sim/sap/usage-decisions", simulator.sap_usage_decisions, methods=["GET"]),
        *order_routes(orders, guard),
        *control_routes(simulator),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.simulator = simulator
    return app


def _connection_closer(server: uvicorn.Server) -> Callable[[object], bool]:
    """Abort the open connection of an ASGI client address; False if there is none.

    The handler that asked then returns a response that uvicorn drops, as its connection
    is gone, so the client sees the connection closed without an answer.
    """

    def close(client: object) -> bool:
        for connection in list(server.server_state.connections):
            if client is not None and getattr(connection, "client", None) == client:
                transport = getattr(connection, "transport", None)
                if transport is None:
                    return False
                transport.abort()
                return True
        return False

    return close


async def serve(
    host: str,
    port: int,
    db_path: str,
    faults: Faults,
    *,
    log_requests: bool = False,
    clients: Mapping[str, str] | None = None,
    token_ttl: int = DEFAULT_TOKEN_TTL,
    scripted: ScriptedFaults | None = None,
    sap_metadata: Path = SAP_METADATA_DIR,
) -> None:
    """Serve the simulator until uvicorn is told to exit (SIGINT or SIGTERM)."""
    app = create_app(
        db_path,
        faults,
        log_requests=log_requests,
        clients=clients,
        token_ttl=token_ttl,
        scripted=scripted,
        sap_metadata=sap_metadata,
    )
    server = uvicorn_server(app, host, port)
    simulator: ErpSimulator = app.state.simulator
    simulator.connection_closer = _connection_closer(server)
    await serve_until_stopped(server, "erp-api")


def _statuses(text: str) -> tuple[int, ...]:
    try:
        return status_sequence([int(part) for part in text.split(",") if part.strip()])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def main(argv: list[str] | None = None, prog: str = "python -m simulators.erp_api") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog="Endpoints and fault knobs: see the module docstring (pydoc simulators.erp_api).",
    )
    add_listen_arguments(parser, default_port=8480)
    add_client_arguments(
        parser,
        client_help="an OAuth2 client (repeatable); with one, /api and /sap need a bearer token",
        token_ttl_help=f"seconds an access token lives (default {DEFAULT_TOKEN_TTL})",
    )
    add_fault_arguments(
        parser,
        _statuses,
        FaultFlagHelp(
            error_rate="probability 0..1 of answering --error-status to a delivery instead",
            latency="seconds added to each /api and /sap request",
            outage_seconds=(
                "answer 503 with Retry-After to every /api and /sap request for this long"
            ),
            status_sequence=(
                "statuses for the next deliveries in turn, e.g. 500,429,201 (2xx: let through)"
            ),
            status_metavar="S,S,...",
        ),
    )
    parser.add_argument(
        "--drop-connection",
        type=int,
        default=0,
        metavar="N",
        help="close the connection of the next N deliveries without processing or answering",
    )
    parser.add_argument(
        "--drop-response",
        type=int,
        default=0,
        metavar="N",
        help="process the next N deliveries, then close the connection without answering",
    )
    parser.add_argument(
        "--log-requests", action="store_true", help="print one line per received event"
    )
    parser.add_argument(
        "--sap-metadata", type=Path, default=SAP_METADATA_DIR, metavar="DIR",
        help="SAP's metadata facts (*.json) the SAP services validate against"
        " (default: tests/fixtures/sap of this checkout)",
    )
    args = parser.parse_args(argv)
    if args.token_ttl < 1:
        parser.error("--token-ttl must be at least 1 second")
    if args.outage_seconds < 0 or args.drop_connection < 0 or args.drop_response < 0:
        parser.error("--outage-seconds, --drop-connection and --drop-response must be >= 0")
    try:
        faults = Faults(
            error_rate=args.error_rate,
            error_status=args.error_status,
            retry_after=args.retry_after,
            latency=args.latency,
            outage_until=time.time() + args.outage_seconds if args.outage_seconds > 0 else 0.0,
        )
    except ValueError as exc:
        parser.error(str(exc))
    scripted = ScriptedFaults(deque(args.status_sequence), args.drop_connection, args.drop_response)
    return run_until_signalled(
        lambda: serve(
            args.host,
            args.port,
            args.db,
            faults,
            log_requests=args.log_requests,
            clients=dict(args.client),
            token_ttl=args.token_ttl,
            scripted=scripted,
            sap_metadata=args.sap_metadata,
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
