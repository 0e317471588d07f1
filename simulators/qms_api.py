"""QMS API simulator: a generic SaaS quality system that inspects lots and decides on them.

It is the peer of the gateway's ``qms_rest`` profile. Under ``/api/v1`` it takes inspection
requests, inspection results and nonconformances (``POST``, each honouring an
``Idempotency-Key`` header: a repeated key gets the first answer again and is counted as a
duplicate), and it decides: ``--decision-delay`` seconds after a request, a background task
closes the inspection with a result (``fail`` when the measured value lies outside its limits,
else ``pass``) and gives the lot a disposition (``reject`` or ``release``). Automatic decisions
never make a lot better: a rejected lot stays rejected and a lot on hold (a nonconformance, or
``--hold-lot``) stays on hold, until a forced decision (``POST /_sim/decide``, the stand-in for
a quality engineer) says otherwise. Every change of a lot's disposition is appended to a change
feed the gateway polls with its persisted cursor (``GET /api/v1/dispositions?after=N``), and a
lot's current disposition can be asked for directly. Authentication is optional: OAuth2 client
credentials (``POST /oauth/token``), a static ``X-API-Key``, either, or none. Fault knobs
(error rate and status, ``Retry-After``, latency, an outage window, a scripted sequence of
statuses) apply to the ``/api/v1`` routes, set from the command line or at run time through
``/_sim/faults``. Everything but access tokens is kept in SQLite, so a restart on the same file
keeps inspections, decisions, cursors and idempotency keys. Run it with
``python -m simulators.qms_api --port 8490 --db qms.sqlite``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import hashlib
import hmac
import json
import math
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final, Literal, get_args
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from simulators.http_common import (
    DEFAULT_TOKEN_TTL,
    FaultFlagHelp,
    FaultKnobs,
    SqliteStore,
    TokenIssuer,
    add_client_arguments,
    add_fault_arguments,
    add_listen_arguments,
    bearer_token,
    check_token_ttl,
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
Handler = Callable[[Request], Awaitable[Response]]
Disposition = Literal["release", "hold", "reject"]
Verdict = Literal["pass", "fail"]
DecisionSource = Literal["inspection", "result", "nonconformance", "forced"]

API_ROOT: Final = "/api/v1"
REALM: Final = "qms-api"
DISPOSITIONS: Final[tuple[Disposition, ...]] = get_args(Disposition)
"""Dispositions from best to worst: an automatic decision never moves a lot to the left."""
TRIGGERS: Final = ("limit_violation", "lot_completed", "periodic", "manual")
VERDICTS: Final[tuple[Verdict, ...]] = get_args(Verdict)
SEVERITIES: Final = ("minor", "major", "critical")
DEFAULT_DECISION_DELAY: Final = 1.0
FEED_PAGE_DEFAULT: Final = 100
FEED_PAGE_MAX: Final = 1000
DECIDER_MAX_SLEEP: Final = 1.0
"""The decision task wakes at least this often (seconds), whatever it was told."""


class InvalidRequest(ValueError):
    """A request the QMS refuses; the message, the field at fault and the status are sent back."""

    def __init__(self, message: str, field: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.status = status

    def response(self) -> JSONResponse:
        return JSONResponse({"error": str(self), "field": self.field}, status_code=self.status)


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Faults(FaultKnobs):
    """Misbehaviour the simulator applies to ``/api/v1`` requests, validated on creation."""

    outage_seconds: float = 0.0
    """Answer 503 to every request for this long, counted from when it is set."""
    status_sequence: tuple[int, ...] = ()
    """Statuses for the next requests, one each, before the other knobs; a 2xx lets one through."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for status in self.status_sequence:
            if not (200 <= status <= 299 or 400 <= status <= 599):
                raise ValueError(
                    f"status_sequence holds HTTP statuses 200..299 or 400..599, got {status}"
                )

    def _checked_knob(self, name: str, kind: str, value: object) -> Any:
        if name != "status_sequence":
            return super()._checked_knob(name, kind, value)
        if not isinstance(value, list) or not all(
            isinstance(status, int) and not isinstance(status, bool) for status in value
        ):
            raise ValueError(
                f"status_sequence must be a list of HTTP statuses, got {json.dumps(value)}"
            )
        return tuple(value)


class FaultInjector:
    """The current faults and the clock of the outage and status sequence they started."""

    def __init__(self, faults: Faults) -> None:
        self.injected = 0
        self._random = random.Random()
        self._faults = faults
        self._outage_until = 0.0
        self._pending: collections.deque[int] = collections.deque()
        self._start(faults, {"outage_seconds", "status_sequence"})

    def _start(self, faults: Faults, changed: set[str]) -> None:
        self._faults = faults
        if "outage_seconds" in changed:
            self._outage_until = time.monotonic() + faults.outage_seconds
        if "status_sequence" in changed:
            self._pending = collections.deque(faults.status_sequence)

    def update(self, changes: Mapping[str, object]) -> None:
        """Apply knob changes; an outage or a sequence set here starts now."""
        self._start(self._faults.updated(changes), set(changes))

    def as_json(self) -> JsonObject:
        """The knobs, with the outage and sequence shown as what is left of them."""
        remaining = max(0.0, self._outage_until - time.monotonic())
        return {
            **dataclasses.asdict(self._faults),
            "outage_seconds": round(remaining, 3),
            "status_sequence": list(self._pending),
        }

    async def misbehave(self) -> JSONResponse | None:
        """Apply latency, then maybe answer an injected error instead of processing."""
        faults = self._faults
        await faults.apply_latency()
        if time.monotonic() < self._outage_until:
            status, why = 503, "simulated outage"
        elif (injected := injected_status(self._pending, faults, self._random)) is not None:
            status, why = injected
        else:
            return None
        self.injected += 1
        return JSONResponse(
            {"error": f"injected fault {status} ({why})"},
            status_code=status,
            headers=faults.retry_after_headers(status),
        )


# --------------------------------------------------------------------------------------------
# Authentication
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """Who may call ``/api/v1``: OAuth2 clients, static API keys, both, or (empty) anyone."""

    clients: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """OAuth2 client id to client secret."""
    api_keys: frozenset[str] = frozenset()
    token_ttl: int = DEFAULT_TOKEN_TTL
    """Lifetime of an issued access token, seconds."""

    def __post_init__(self) -> None:
        check_token_ttl(self.token_ttl)


def _oauth_error(status: int, error: str, description: str) -> JSONResponse:
    return oauth_error(
        status, error, description, realm=REALM, headers={"Cache-Control": "no-store"}
    )


class Gatekeeper:
    """Issues access tokens (kept in memory: a restart invalidates them) and checks requests."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials
        self.tokens = TokenIssuer(credentials.clients, credentials.token_ttl)

    async def issue_token(self, request: Request) -> Response:
        """OAuth2 client credentials grant (RFC 6749 section 4.4), form-encoded."""
        clients = self.credentials.clients
        if not clients:
            return JSONResponse(
                {"error": "OAuth2 is not enabled here (start with --client ID:SECRET)"},
                status_code=404,
            )
        try:
            form = {
                name: values[0]
                for name, values in parse_qs((await request.body()).decode("utf-8")).items()
            }
        except UnicodeDecodeError:
            return _oauth_error(400, "invalid_request", "the form is not UTF-8")
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                client_id, _, client_secret = (
                    base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
                )
            except (binascii.Error, UnicodeDecodeError):
                client_id = client_secret = None
        if client_secret is None or not self.tokens.accepts(client_id or "", client_secret):
            return _oauth_error(401, "invalid_client", "unknown client or wrong secret")
        grant_type = form.get("grant_type")
        if grant_type is None:
            return _oauth_error(400, "invalid_request", "grant_type is required")
        if grant_type != "client_credentials":
            return _oauth_error(
                400, "unsupported_grant_type", "only client_credentials is supported"
            )
        return self.tokens.grant(client_id or "")

    def refusal(self, request: Request) -> JSONResponse | None:
        """None when the request may proceed, else the 401 to answer."""
        credentials = self.credentials
        if not credentials.clients and not credentials.api_keys:
            return None
        api_key = request.headers.get("x-api-key")
        if api_key is not None and any(
            hmac.compare_digest(api_key.encode(), known.encode()) for known in credentials.api_keys
        ):
            return None
        challenge = f'Bearer realm="{REALM}"' if credentials.clients else f'ApiKey realm="{REALM}"'
        token = bearer_token(request)
        if credentials.clients and token is not None:
            client_id, _ = self.tokens.check(token)
            if client_id is not None:
                return None
            message = "invalid or expired access token"
            challenge += ', error="invalid_token"'
        elif api_key is not None:
            message = "invalid API key"
        else:
            ways = []
            if credentials.clients:
                ways.append("Authorization: Bearer <token from POST /oauth/token>")
            if credentials.api_keys:
                ways.append("X-API-Key")
            message = f"authentication required: {' or '.join(ways)}"
        return JSONResponse(
            {"error": message}, status_code=401, headers={"WWW-Authenticate": challenge}
        )


# --------------------------------------------------------------------------------------------
# Request bodies
# --------------------------------------------------------------------------------------------


def _utc_text(moment: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. 2026-03-01T08:00:00.000Z."""
    stamp = datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _optional_text(body: JsonObject, name: str, max_length: int = 500) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"{name} must be a non-empty string", name)
    if len(value) > max_length:
        raise InvalidRequest(f"{name} must be at most {max_length} characters", name)
    return value


def _text(body: JsonObject, name: str, max_length: int = 200) -> str:
    value = _optional_text(body, name, max_length)
    if value is None:
        raise InvalidRequest(f"{name} is required", name)
    return value


def _choice(body: JsonObject, name: str, choices: Sequence[str]) -> str:
    value = body.get(name)
    if value not in choices:
        raise InvalidRequest(f"{name} must be one of {', '.join(choices)}", name)
    assert isinstance(value, str)
    return value


def _quantity(body: JsonObject, name: str, *, signed: bool = True) -> JsonObject | None:
    """``{"value": decimal string, "uom": code}`` or None; numbers as JSON floats are refused."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(f'{name} must be an object {{"value": "...", "uom": "..."}}', name)
    text = value.get("value")
    if not isinstance(text, str):
        raise InvalidRequest(f"{name}.value must be a decimal string", f"{name}.value")
    try:
        number = Decimal(text.strip())
    except InvalidOperation:
        raise InvalidRequest(
            f"{name}.value {text!r} is not a decimal number", f"{name}.value"
        ) from None
    if not number.is_finite() or (not signed and number < 0):
        kind = "a finite number" if signed else "a finite, non-negative number"
        raise InvalidRequest(f"{name}.value must be {kind}, got {text!r}", f"{name}.value")
    uom = value.get("uom")
    if not isinstance(uom, str) or not uom.strip():
        raise InvalidRequest(f"{name}.uom must be a unit code", f"{name}.uom")
    return {"value": text.strip(), "uom": uom.strip()}


def _order_or_lot(body: JsonObject) -> tuple[str | None, str | None]:
    order_id, lot_id = _optional_text(body, "order_id", 40), _optional_text(body, "lot_id", 40)
    if order_id is None and lot_id is None:
        raise InvalidRequest("lot_id or order_id is required", "lot_id")
    return order_id, lot_id


def _check_limits(
    measured: JsonObject | None, lower: JsonObject | None, upper: JsonObject | None
) -> None:
    reference = measured or lower
    for name, limit in (("lower_limit", lower), ("upper_limit", upper)):
        if limit is not None and reference is not None and limit["uom"] != reference["uom"]:
            raise InvalidRequest(
                f"{name} is in {limit['uom']}, not {reference['uom']} like the others",
                f"{name}.uom",
            )
    if (
        lower is not None
        and upper is not None
        and Decimal(lower["value"]) > Decimal(upper["value"])
    ):
        raise InvalidRequest("lower_limit must not be above upper_limit", "lower_limit")


def _timestamp(body: JsonObject, name: str) -> str:
    text = _text(body, name, 64)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"{name} {text!r} is not an RFC 3339 timestamp", name) from None
    if moment.tzinfo is None:
        raise InvalidRequest(f"{name} needs a UTC offset (e.g. Z)", name)
    return text


def _common(body: JsonObject) -> JsonObject:
    order_id, lot_id = _order_or_lot(body)
    return {
        "external_id": _text(body, "external_id"),
        "site": _optional_text(body, "site", 10),
        "order_id": order_id,
        "lot_id": lot_id,
        "material": _optional_text(body, "material", 40),
        "machine_id": _optional_text(body, "machine_id", 64),
    }


def validate_inspection(body: JsonObject) -> JsonObject:
    """The normalised body of ``POST /api/v1/inspections``, or raise InvalidRequest."""
    checked = _common(body)
    if checked["site"] is None:
        raise InvalidRequest("site is required", "site")
    checked |= {
        "trigger": _choice(body, "trigger", TRIGGERS),
        "characteristic": _optional_text(body, "characteristic", 80),
        "measured_value": _quantity(body, "measured_value"),
        "lower_limit": _quantity(body, "lower_limit"),
        "upper_limit": _quantity(body, "upper_limit"),
        "reason": _optional_text(body, "reason"),
        "requested_at": _timestamp(body, "requested_at"),
    }
    _check_limits(checked["measured_value"], checked["lower_limit"], checked["upper_limit"])
    return checked


def validate_result(body: JsonObject) -> JsonObject:
    """The normalised body of ``POST /api/v1/results``, or raise InvalidRequest."""
    checked = _common(body) | {
        "inspection_id": _optional_text(body, "inspection_id", 40),
        "characteristic": _text(body, "characteristic", 80),
        "measured_value": _quantity(body, "measured_value"),
        "lower_limit": _quantity(body, "lower_limit"),
        "upper_limit": _quantity(body, "upper_limit"),
        "result": _choice(body, "result", VERDICTS),
    }
    _check_limits(checked["measured_value"], checked["lower_limit"], checked["upper_limit"])
    return checked


def validate_nonconformance(body: JsonObject) -> JsonObject:
    """The normalised body of ``POST /api/v1/nonconformances``, or raise InvalidRequest."""
    return _common(body) | {
        "defect_code": _text(body, "defect_code", 20),
        "severity": _choice(body, "severity", SEVERITIES),
        "affected_quantity": _quantity(body, "affected_quantity", signed=False),
        "description": _optional_text(body, "description"),
    }


def inspection_verdict(
    inspection: JsonObject, failed_results: Sequence[str]
) -> tuple[Verdict, str]:
    """Fail when the measured value is outside [lower, upper] or a linked result failed."""
    if failed_results:
        return "fail", f"result fail on {', '.join(failed_results)}"
    measured = inspection["measured_value"]
    if measured is None:
        return "pass", "no measured value to hold against limits"
    name = inspection["characteristic"] or "measured value"
    value, uom = Decimal(measured["value"]), measured["uom"]
    lower, upper = inspection["lower_limit"], inspection["upper_limit"]
    if lower is not None and value < Decimal(lower["value"]):
        return "fail", f"{name} {value} {uom} below lower limit {lower['value']}"
    if upper is not None and value > Decimal(upper["value"]):
        return "fail", f"{name} {value} {uom} above upper limit {upper['value']}"
    return "pass", f"{name} {value} {uom} within limits"


def _worse(current: Disposition | None, proposed: Disposition) -> Disposition:
    if current is None:
        return proposed
    return max(current, proposed, key=DISPOSITIONS.index)


# --------------------------------------------------------------------------------------------
# The store: requests, inspections, results, nonconformances and the disposition feed
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecisionPolicy:
    """How the simulated quality department decides."""

    decision_delay: float = DEFAULT_DECISION_DELAY
    """Seconds between an inspection request and its result (0: in the same request)."""
    reject_lots: frozenset[str] = frozenset()
    """Lots always rejected by automatic decisions."""
    hold_lots: frozenset[str] = frozenset()
    """Lots automatic decisions keep on hold (unless rejected)."""

    def __post_init__(self) -> None:
        if not (self.decision_delay >= 0 and math.isfinite(self.decision_delay)):
            raise ValueError(f"decision_delay must be 0 or more, got {self.decision_delay}")


@dataclass(frozen=True)
class Answer:
    """The answer to an accepted POST, replayed as is for a repeated Idempotency-Key."""

    status: int
    body: JsonObject
    replayed: bool


SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    seq             INTEGER PRIMARY KEY,
    idempotency_key TEXT UNIQUE,
    path            TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    status          INTEGER NOT NULL,
    answer_json     TEXT NOT NULL,
    received_at     TEXT NOT NULL,
    duplicates      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS inspections (
    seq             INTEGER PRIMARY KEY,
    inspection_id   TEXT NOT NULL UNIQUE,
    lot_id          TEXT,
    status          TEXT NOT NULL CHECK (status IN ('open', 'closed')),
    result          TEXT CHECK (result IN ('pass', 'fail')),
    result_reason   TEXT,
    due_at          REAL NOT NULL,
    received_at     TEXT NOT NULL,
    decided_at      TEXT,
    request_json    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS inspections_due ON inspections (status, due_at);
CREATE TABLE IF NOT EXISTS results (
    seq             INTEGER PRIMARY KEY,
    result_id       TEXT NOT NULL UNIQUE,
    inspection_id   TEXT,
    lot_id          TEXT,
    received_at     TEXT NOT NULL,
    request_json    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_inspection ON results (inspection_id);
CREATE TABLE IF NOT EXISTS nonconformances (
    seq               INTEGER PRIMARY KEY,
    nonconformance_id TEXT NOT NULL UNIQUE,
    lot_id            TEXT,
    received_at       TEXT NOT NULL,
    request_json      TEXT NOT NULL
);
-- AUTOINCREMENT: a cursor is never handed out twice, not even after /_sim/reset.
CREATE TABLE IF NOT EXISTS dispositions (
    cursor          INTEGER PRIMARY KEY AUTOINCREMENT,
    lot_id          TEXT NOT NULL,
    disposition     TEXT NOT NULL CHECK (disposition IN ('release', 'hold', 'reject')),
    inspection_id   TEXT,
    order_id        TEXT,
    material        TEXT,
    decided_at      TEXT NOT NULL,
    reason          TEXT,
    source          TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dispositions_lot ON dispositions (lot_id, cursor);
"""

DISPOSITION_COLUMNS = (
    "cursor, lot_id, disposition, inspection_id, order_id, material, decided_at, reason, source"
)


def _disposition_row(row: Sequence[Any]) -> JsonObject:
    names = [name.strip() for name in DISPOSITION_COLUMNS.split(",")]
    return dict(zip(names, row, strict=True))


class QualityStore(SqliteStore):
    """The QMS's SQLite tables behind one guarded connection, and the decisions made on them.

    Every change of state happens in one transaction with the reads it depends on.
    """

    def __init__(
        self,
        db_path: str,
        policy: DecisionPolicy,
        on_decision: Callable[[JsonObject], None] | None = None,
    ) -> None:
        super().__init__(db_path, SCHEMA, "QMS store")
        self.policy = policy
        self._on_decision = on_decision
        self._decided: list[JsonObject] = []

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A store transaction; the decisions it made are reported once it is committed."""
        with super()._transaction() as db:
            try:
                yield db
            except BaseException:
                self._decided.clear()
                raise
            decided, self._decided = self._decided, []
        if self._on_decision is not None:
            for entry in decided:
                self._on_decision(entry)

    # ---- POSTs ------------------------------------------------------------------------------

    def submit(
        self,
        key: str | None,
        path: str,
        body: JsonObject,
        create: Callable[[sqlite3.Connection, JsonObject], JsonObject],
    ) -> Answer:
        """Create once per Idempotency-Key; a repeated key replays the first answer.

        Like the IETF Idempotency-Key draft: a key reused on another path or with another body
        is a client error (422), not a replay. Requests without a key are never deduplicated.
        """
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        fingerprint = hashlib.sha256(canonical.encode()).hexdigest()
        with self._transaction() as db:
            if key is not None:
                known = db.execute(
                    "SELECT path, fingerprint, status, answer_json FROM requests"
                    " WHERE idempotency_key = ?",
                    (key,),
                ).fetchone()
                if known is not None:
                    first_path, first_fingerprint, status, answer_json = known
                    if first_path != path:
                        raise InvalidRequest(
                            f"Idempotency-Key {key!r} was first used on {first_path}", None, 422
                        )
                    if first_fingerprint != fingerprint:
                        raise InvalidRequest(
                            f"Idempotency-Key {key!r} was first used with a different body",
                            None,
                            422,
                        )
                    db.execute(
                        "UPDATE requests SET duplicates = duplicates + 1 WHERE idempotency_key = ?",
                        (key,),
                    )
                    return Answer(status, json.loads(answer_json), replayed=True)
            answer = create(db, body)
            db.execute(
                "INSERT INTO requests (idempotency_key, path, fingerprint, status, answer_json,"
                " received_at) VALUES (?, ?, ?, 201, ?, ?)",
                (key, path, fingerprint, json.dumps(answer), _utc_text(time.time())),
            )
        return Answer(201, answer, replayed=False)

    def create_inspection(self, db: sqlite3.Connection, body: JsonObject) -> JsonObject:
        inspection = validate_inspection(body)
        now = time.time()
        (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM inspections").fetchone()
        inspection_id = f"INS-{seq:06d}"
        db.execute(
            "INSERT INTO inspections (seq, inspection_id, lot_id, status, due_at, received_at,"
            " request_json) VALUES (?, ?, ?, 'open', ?, ?, ?)",
            (
                seq,
                inspection_id,
                inspection["lot_id"],
                now + self.policy.decision_delay,
                _utc_text(now),
                json.dumps(inspection),
            ),
        )
        if self.policy.decision_delay == 0:
            self._decide_due(db, now)
        (status,) = db.execute(
            "SELECT status FROM inspections WHERE inspection_id = ?", (inspection_id,)
        ).fetchone()
        return {"inspection_id": inspection_id, "status": status}

    def create_result(self, db: sqlite3.Connection, body: JsonObject) -> JsonObject:
        result = validate_result(body)
        inspection_id, lot_id = result["inspection_id"], result["lot_id"]
        inspection_open = False
        if inspection_id is not None:
            known = db.execute(
                "SELECT status, lot_id FROM inspections WHERE inspection_id = ?", (inspection_id,)
            ).fetchone()
            if known is None:
                raise InvalidRequest(f"unknown inspection {inspection_id}", "inspection_id")
            inspection_open = known[0] == "open"
            lot_id = lot_id or known[1]
        (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM results").fetchone()
        result_id = f"RES-{seq:06d}"
        db.execute(
            "INSERT INTO results (seq, result_id, inspection_id, lot_id, received_at,"
            " request_json) VALUES (?, ?, ?, ?, ?, ?)",
            (seq, result_id, inspection_id, lot_id, _utc_text(time.time()), json.dumps(result)),
        )
        # A result for an open inspection counts when that inspection is decided; any other
        # failed result is evidence enough to reject its lot now.
        if result["result"] == "fail" and lot_id is not None and not inspection_open:
            self._decide_lot(
                db,
                lot_id,
                "reject",
                source="result",
                reason=f"result {result_id} fail on {result['characteristic']}",
                inspection_id=inspection_id,
                order_id=result["order_id"],
                material=result["material"],
            )
        return {"result_id": result_id, "inspection_id": inspection_id}

    def create_nonconformance(self, db: sqlite3.Connection, body: JsonObject) -> JsonObject:
        nonconformance = validate_nonconformance(body)
        (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM nonconformances").fetchone()
        nonconformance_id = f"NC-{seq:06d}"
        lot_id = nonconformance["lot_id"]
        db.execute(
            "INSERT INTO nonconformances (seq, nonconformance_id, lot_id, received_at,"
            " request_json) VALUES (?, ?, ?, ?, ?)",
            (seq, nonconformance_id, lot_id, _utc_text(time.time()), json.dumps(nonconformance)),
        )
        if lot_id is not None:
            self._decide_lot(
                db,
                lot_id,
                "hold",
                source="nonconformance",
                reason=f"nonconformance {nonconformance_id}: {nonconformance['defect_code']}"
                f" ({nonconformance['severity']})",
                inspection_id=None,
                order_id=nonconformance["order_id"],
                material=nonconformance["material"],
            )
        return {"nonconformance_id": nonconformance_id}

    # ---- decisions --------------------------------------------------------------------------

    def decide_due(self, now: float) -> float | None:
        """Decide every open inspection due by ``now``; return when the next one is due."""
        with self._transaction() as db:
            self._decide_due(db, now)
            (next_due,) = db.execute(
                "SELECT MIN(due_at) FROM inspections WHERE status = 'open'"
            ).fetchone()
        return None if next_due is None else float(next_due)

    def force(
        self, lot_id: str, disposition: Disposition, reason: str | None, inspection_id: str | None
    ) -> JsonObject:
        """A quality engineer's decision: recorded whatever the lot's state or the lists say."""
        with self._transaction() as db:
            entry = self._decide_lot(
                db,
                lot_id,
                disposition,
                source="forced",
                reason=reason,
                inspection_id=inspection_id,
                order_id=None,
                material=None,
            )
        assert entry is not None
        return entry

    def _decide_due(self, db: sqlite3.Connection, now: float) -> None:
        due = db.execute(
            "SELECT inspection_id, lot_id, request_json FROM inspections"
            " WHERE status = 'open' AND due_at <= ? ORDER BY due_at, seq",
            (now,),
        ).fetchall()
        for inspection_id, lot_id, request_json in due:
            inspection = json.loads(request_json)
            failed = [
                f"{json.loads(result_json)['characteristic']} ({result_id})"
                for result_id, result_json in db.execute(
                    "SELECT result_id, request_json FROM results"
                    " WHERE inspection_id = ? ORDER BY seq",
                    (inspection_id,),
                )
                if json.loads(result_json)["result"] == "fail"
            ]
            verdict, why = inspection_verdict(inspection, failed)
            db.execute(
                "UPDATE inspections SET status = 'closed', result = ?, result_reason = ?,"
                " decided_at = ? WHERE inspection_id = ?",
                (verdict, why, _utc_text(time.time()), inspection_id),
            )
            if lot_id is not None:
                self._decide_lot(
                    db,
                    lot_id,
                    "reject" if verdict == "fail" else "release",
                    source="inspection",
                    reason=f"inspection {inspection_id} {verdict}: {why}",
                    inspection_id=inspection_id,
                    order_id=inspection["order_id"],
                    material=inspection["material"],
                )

    def _decide_lot(
        self,
        db: sqlite3.Connection,
        lot_id: str,
        proposed: Disposition,
        *,
        source: DecisionSource,
        reason: str | None,
        inspection_id: str | None,
        order_id: str | None,
        material: str | None,
    ) -> JsonObject | None:
        """Append a disposition when it changes the lot (always when forced); return it."""
        current_row = db.execute(
            "SELECT disposition, order_id, material FROM dispositions WHERE lot_id = ?"
            " ORDER BY cursor DESC LIMIT 1",
            (lot_id,),
        ).fetchone()
        current: Disposition | None = None if current_row is None else current_row[0]
        if current_row is not None:
            order_id = order_id or current_row[1]
            material = material or current_row[2]
        if source != "forced":
            if lot_id in self.policy.reject_lots:
                proposed, reason = "reject", f"lot {lot_id} is on the reject list; {reason}"
            elif lot_id in self.policy.hold_lots:
                proposed, reason = "hold", f"lot {lot_id} is on the hold list; {reason}"
            proposed = _worse(current, proposed)
            if proposed == current:
                return None
        cursor = db.execute(
            f"INSERT INTO dispositions ({DISPOSITION_COLUMNS})"
            " VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING cursor",
            (
                lot_id,
                proposed,
                inspection_id,
                order_id,
                material,
                _utc_text(time.time()),
                reason,
                source,
            ),
        ).fetchone()[0]
        entry = _disposition_row(
            db.execute(
                f"SELECT {DISPOSITION_COLUMNS} FROM dispositions WHERE cursor = ?", (cursor,)
            ).fetchone()
        )
        self._decided.append(entry)
        return entry

    # ---- queries ----------------------------------------------------------------------------

    def feed(self, after: int, limit: int) -> list[JsonObject]:
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT {DISPOSITION_COLUMNS} FROM dispositions WHERE cursor > ?"
                " ORDER BY cursor LIMIT ?",
                (after, limit),
            ).fetchall()
        return [_disposition_row(row) for row in rows]

    def lots(self, lot_id: str | None = None) -> list[JsonObject]:
        """The current disposition of one lot or of every decided lot."""
        query = (
            f"SELECT {DISPOSITION_COLUMNS} FROM dispositions WHERE cursor IN"
            " (SELECT MAX(cursor) FROM dispositions"
            + (" WHERE lot_id = ?" if lot_id is not None else "")
            + " GROUP BY lot_id) ORDER BY lot_id"
        )
        with self._transaction() as db:
            rows = db.execute(query, () if lot_id is None else (lot_id,)).fetchall()
        return [_disposition_row(row) for row in rows]

    def inspections(self, inspection_id: str | None = None) -> list[JsonObject]:
        query = (
            "SELECT inspection_id, status, result, result_reason, due_at, received_at,"
            " decided_at, request_json FROM inspections"
            + (" WHERE inspection_id = ?" if inspection_id is not None else "")
            + " ORDER BY seq"
        )
        with self._transaction() as db:
            rows = db.execute(query, () if inspection_id is None else (inspection_id,)).fetchall()
            linked: dict[str, list[JsonObject]] = collections.defaultdict(list)
            for linked_id, result_id, result_json in db.execute(
                "SELECT inspection_id, result_id, request_json FROM results"
                " WHERE inspection_id IS NOT NULL ORDER BY seq"
            ):
                linked[linked_id].append({"result_id": result_id, **json.loads(result_json)})
        return [
            {
                "inspection_id": inspection_id,
                **json.loads(request_json),
                "status": status,
                "result": result,
                "result_reason": result_reason,
                "received_at": received_at,
                "due_at": _utc_text(due_at),
                "decided_at": decided_at,
                "results": linked.get(inspection_id, []),
            }
            for (
                inspection_id,
                status,
                result,
                result_reason,
                due_at,
                received_at,
                decided_at,
                request_json,
            ) in rows
        ]

    def counts(self) -> JsonObject:
        with self._transaction() as db:
            unique, duplicates = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(duplicates), 0) FROM requests"
            ).fetchone()
            (inspections,) = db.execute("SELECT COUNT(*) FROM inspections").fetchone()
            (dispositions,) = db.execute("SELECT COUNT(*) FROM dispositions").fetchone()
        return {
            "received": unique + duplicates,
            "unique": unique,
            "duplicates": duplicates,
            "inspections": inspections,
            "dispositions": dispositions,
        }

    def clear(self) -> int:
        """Forget everything but the cursor sequence; return how many requests were stored."""
        with self._transaction() as db:
            cleared = db.execute("DELETE FROM requests").rowcount
            for table in ("inspections", "results", "nonconformances", "dispositions"):
                db.execute(f"DELETE FROM {table}")
        return cleared


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


async def _json_object(request: Request) -> JsonObject:
    decoded = await read_json(request, InvalidRequest)
    if not isinstance(decoded, dict):
        raise InvalidRequest("body must be a JSON object")
    return decoded


def _int_parameter(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer, got {raw!r}", name) from None
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}, got {value}", name)
    return value


def _print_decision(entry: JsonObject) -> None:
    print(
        f"QMS decided lot {entry['lot_id']}: {entry['disposition']}"
        f" (cursor {entry['cursor']}, {entry['source']})",
        flush=True,
    )


class QmsSimulator:
    """Request handlers over one store, the gatekeeper, the faults, and the decision task."""

    def __init__(
        self,
        store: QualityStore,
        gatekeeper: Gatekeeper,
        faults: FaultInjector,
        log_requests: bool,
    ) -> None:
        self.store = store
        self.gatekeeper = gatekeeper
        self.faults = faults
        self._log_requests = log_requests
        self._wake = asyncio.Event()

    def api(self, handler: Handler) -> Handler:
        """Guard an ``/api/v1`` handler: faults first, then authentication, then the work."""

        async def guarded(request: Request) -> Response:
            if (injected := await self.faults.misbehave()) is not None:
                self._log(f"QMS answered {injected.status_code} to {request.url.path} (fault)")
                return injected
            if (refused := self.gatekeeper.refusal(request)) is not None:
                return refused
            try:
                return await handler(request)
            except InvalidRequest as exc:
                return exc.response()

        return guarded

    def _log(self, line: str) -> None:
        if self._log_requests:
            print(line, flush=True)

    async def run_decisions(self) -> None:
        """Decide inspections as they fall due, until cancelled."""
        while True:
            self._wake.clear()
            next_due = self.store.decide_due(time.time())
            wait = DECIDER_MAX_SLEEP
            if next_due is not None:
                wait = min(wait, max(0.0, next_due - time.time()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _submit(
        self,
        request: Request,
        create: Callable[[sqlite3.Connection, JsonObject], JsonObject],
    ) -> Response:
        try:
            key = idempotency_key(request)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        body = await _json_object(request)
        answer = self.store.submit(key, request.url.path, body, create)
        self._wake.set()
        self._log(
            f"QMS received {request.url.path} external_id={body.get('external_id')}"
            f" -> {json.dumps(answer.body)}" + (" (duplicate)" if answer.replayed else "")
        )
        headers = {"Idempotent-Replayed": "true"} if answer.replayed else None
        return JSONResponse(answer.body, status_code=answer.status, headers=headers)

    async def post_inspection(self, request: Request) -> Response:
        return await self._submit(request, self.store.create_inspection)

    async def post_result(self, request: Request) -> Response:
        return await self._submit(request, self.store.create_result)

    async def post_nonconformance(self, request: Request) -> Response:
        return await self._submit(request, self.store.create_nonconformance)

    async def get_inspection(self, request: Request) -> Response:
        found = self.store.inspections(request.path_params["inspection_id"])
        if not found:
            return JSONResponse({"error": "unknown inspection"}, status_code=404)
        return JSONResponse(found[0])

    async def get_dispositions(self, request: Request) -> Response:
        after = _int_parameter(request, "after", 0, 0, 2**63 - 1)
        limit = _int_parameter(request, "limit", FEED_PAGE_DEFAULT, 1, FEED_PAGE_MAX)
        entries = self.store.feed(after, limit)
        return JSONResponse(
            {"dispositions": entries, "next": entries[-1]["cursor"] if entries else after}
        )

    async def get_lot(self, request: Request) -> Response:
        found = self.store.lots(request.path_params["lot_id"])
        if not found:
            return JSONResponse({"error": "unknown lot"}, status_code=404)
        return JSONResponse(found[0])

    async def list_inspections(self, request: Request) -> Response:
        return JSONResponse(self.store.inspections())

    async def list_lots(self, request: Request) -> Response:
        return JSONResponse(self.store.lots())

    async def decide(self, request: Request) -> Response:
        try:
            body = await _json_object(request)
            lot_id = _text(body, "lot_id", 40)
            disposition = DISPOSITIONS[
                DISPOSITIONS.index(_choice(body, "disposition", DISPOSITIONS))
            ]
            reason = _optional_text(body, "reason")
            inspection_id = _optional_text(body, "inspection_id", 40)
        except InvalidRequest as exc:
            return exc.response()
        entry = self.store.force(lot_id, disposition, reason, inspection_id)
        return JSONResponse(entry)

    async def stats(self, request: Request) -> Response:
        return JSONResponse({**self.store.counts(), "errors_injected": self.faults.injected})

    async def get_faults(self, request: Request) -> Response:
        return JSONResponse(self.faults.as_json())

    async def set_faults(self, request: Request) -> Response:
        try:
            self.faults.update(await _json_object(request))
        except InvalidRequest as exc:
            return exc.response()
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(self.faults.as_json())

    async def reset(self, request: Request) -> Response:
        cleared = self.store.clear()
        self.faults.injected = 0
        self._wake.set()
        return JSONResponse({"cleared": cleared})


def create_app(
    db_path: str = ":memory:",
    *,
    policy: DecisionPolicy | None = None,
    credentials: Credentials | None = None,
    faults: Faults | None = None,
    log_requests: bool = False,
) -> Starlette:
    """Build the QMS simulator app; its store and decision task live with the app's lifespan."""
    store = QualityStore(
        db_path, policy or DecisionPolicy(), on_decision=_print_decision if log_requests else None
    )
    simulator = QmsSimulator(
        store,
        Gatekeeper(credentials or Credentials()),
        FaultInjector(faults or Faults()),
        log_requests,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        with store.opened():
            async with asyncio.TaskGroup() as tasks:
                deciding = tasks.create_task(simulator.run_decisions(), name="qms-api-decisions")
                try:
                    yield
                finally:
                    deciding.cancel()

    api = simulator.api
    routes = [
        Route("/oauth/token", simulator.gatekeeper.issue_token, methods=["POST"]),
        Route(f"{API_ROOT}/inspections", api(simulator.post_inspection), methods=["POST"]),
        Route(
            f"{API_ROOT}/inspections/{{inspection_id}}",
            api(simulator.get_inspection),
            methods=["GET"],
        ),
        Route(f"{API_ROOT}/results", api(simulator.post_result), methods=["POST"]),
        Route(f"{API_ROOT}/nonconformances", api(simulator.post_nonconformance), methods=["POST"]),
        Route(f"{API_ROOT}/dispositions", api(simulator.get_dispositions), methods=["GET"]),
        # :path so that lot ids with "/" (allowed by the canonical model) still match.
        Route(
            f"{API_ROOT}/lots/{{lot_id:path}}/disposition", api(simulator.get_lot), methods=["GET"]
        ),
        Route("/_sim/inspections", simulator.list_inspections, methods=["GET"]),
        Route("/_sim/lots", simulator.list_lots, methods=["GET"]),
        Route("/_sim/decide", simulator.decide, methods=["POST"]),
        *control_routes(simulator),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.simulator = simulator
    return app


async def serve(
    host: str,
    port: int,
    db_path: str,
    *,
    policy: DecisionPolicy | None = None,
    credentials: Credentials | None = None,
    faults: Faults | None = None,
    log_requests: bool = False,
) -> None:
    """Serve the simulator until uvicorn is told to exit (SIGINT or SIGTERM)."""
    app = create_app(
        db_path, policy=policy, credentials=credentials, faults=faults, log_requests=log_requests
    )
    await serve_until_stopped(uvicorn_server(app, host, port), "qms-api")


def _statuses(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected statuses like 503,429,201, got {text!r}"
        ) from None


def main(argv: list[str] | None = None, prog: str = "python -m simulators.qms_api") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_listen_arguments(parser, default_port=8490)
    parser.add_argument(
        "--decision-delay",
        type=float,
        default=DEFAULT_DECISION_DELAY,
        help="seconds from an inspection request to its result and disposition (0: at once)",
    )
    parser.add_argument(
        "--reject-lot", action="append", default=[], metavar="LOT", help="always reject LOT"
    )
    parser.add_argument(
        "--hold-lot", action="append", default=[], metavar="LOT", help="keep LOT on hold"
    )
    add_client_arguments(
        parser,
        client_help="enable OAuth2 client credentials (POST /oauth/token) for this client",
        token_ttl_help="lifetime of issued access tokens, seconds",
    )
    parser.add_argument(
        "--api-key", action="append", default=[], metavar="KEY", help="accept X-API-Key: KEY"
    )
    add_fault_arguments(
        parser,
        _statuses,
        FaultFlagHelp(
            error_rate="probability 0..1 of answering --error-status instead",
            latency="seconds added to each request",
            outage_seconds="answer 503 to every API request for this long after start",
            status_sequence="statuses for the first API requests, one each (2xx: process normally)",
            status_metavar="S1,S2,...",
        ),
    )
    parser.add_argument(
        "--log-requests", action="store_true", help="print one line per request and decision"
    )
    args = parser.parse_args(argv)
    try:
        policy = DecisionPolicy(
            decision_delay=args.decision_delay,
            reject_lots=frozenset(args.reject_lot),
            hold_lots=frozenset(args.hold_lot),
        )
        credentials = Credentials(
            clients=dict(args.client), api_keys=frozenset(args.api_key), token_ttl=args.token_ttl
        )
        faults = Faults(
            error_rate=args.error_rate,
            error_status=args.error_status,
            retry_after=args.retry_after,
            latency=args.latency,
            outage_seconds=args.outage_seconds,
            status_sequence=args.status_sequence,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return run_until_signalled(
        lambda: serve(
            args.host,
            args.port,
            args.db,
            policy=policy,
            credentials=credentials,
            faults=faults,
            log_requests=args.log_requests,
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
