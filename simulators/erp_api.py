"""ERP API simulator: a real HTTP peer that receives the gateway's CloudEvents offline.

It answers like the central ERP endpoint the gateway delivers milestones to: one
structured CloudEvent per ``POST /api/events`` with an ``Idempotency-Key`` header (or a
CloudEvents batch on ``POST /api/events:batch``, keyed by each event's id), stored in
SQLite with a sequential ERP reference. A repeated key is answered with the reference of
the first delivery and counted as a duplicate, never stored twice, so tests and the demo
can prove "no confirmation posted twice, none lost" by reading ``GET /events`` and
``GET /stats``. Fault knobs (error rate and status, ``Retry-After``, latency) are set
from the command line or at run time through ``/_sim/faults``, so retry and back-off
paths meet a real server that misbehaves on purpose. Run it with
``python -m simulators.erp_api --port 8480 --db erp.sqlite``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import signal
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

JsonObject = dict[str, Any]

EVENT_CONTENT_TYPES = frozenset({"application/json", "application/cloudevents+json"})
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
REQUIRED_ATTRIBUTES = ("id", "type")
OPTIONAL_STRING_ATTRIBUTES = ("subject", "partitionkey")
RETRY_AFTER_STATUSES = frozenset({429, 503})
SHUTDOWN_GRACE_SECONDS = 5


class StartupFailed(RuntimeError):
    """The HTTP server could not start (port taken, address invalid); uvicorn logged why."""


class InvalidEvent(ValueError):
    """A request body that is not an acceptable CloudEvent; the message is sent back."""


@dataclass(frozen=True)
class Faults:
    """Misbehaviour the simulator applies to event deliveries, validated on creation."""

    error_rate: float = 0.0
    """Probability (0..1) of answering ``error_status`` instead of processing."""
    error_status: int = 503
    """HTTP status of an injected error (400..599)."""
    retry_after: int = 1
    """Seconds sent in ``Retry-After`` when the injected status is 429 or 503."""
    latency: float = 0.0
    """Seconds added to each delivery before it is answered."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be between 0 and 1, got {self.error_rate}")
        if not 400 <= self.error_status <= 599:
            raise ValueError(f"error_status must be an HTTP error status, got {self.error_status}")
        if self.retry_after < 0:
            raise ValueError(f"retry_after must not be negative, got {self.retry_after}")
        if self.latency < 0:
            raise ValueError(f"latency must not be negative, got {self.latency}")

    def updated(self, changes: Mapping[str, object]) -> Faults:
        """Return these faults with ``changes`` (decoded JSON) applied, or raise ValueError."""
        known = {field.name: field.type for field in dataclasses.fields(self)}
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ValueError(f"unknown fault setting(s): {', '.join(unknown)}")
        checked: dict[str, Any] = {}
        for name, value in changes.items():
            # bool is an int in Python but never a sensible knob value in JSON.
            wants_int = known[name] == "int"
            valid = isinstance(value, int) if wants_int else isinstance(value, int | float)
            if isinstance(value, bool) or not valid:
                kind = "an integer" if wants_int else "a number"
                raise ValueError(f"{name} must be {kind}, got {json.dumps(value)}")
            checked[name] = value
        return dataclasses.replace(self, **checked)

    def as_json(self) -> JsonObject:
        return dataclasses.asdict(self)


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
"""


class EventStore:
    """The ERP's SQLite table of received events, behind one guarded connection.

    The server runs on one event loop and never awaits inside a transaction, so the lock
    is uncontended in practice; it keeps the store correct if a caller ever uses it from
    another thread (Starlette's test client runs the app on its own thread).
    """

    def __init__(self, db_path: str) -> None:
        self._db_path = db_path
        self._connection: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        connection = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False)
        if self._db_path != ":memory:":
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA busy_timeout=5000")
        connection.executescript(SCHEMA)
        self._connection = connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self._connection is None:
            raise RuntimeError("the ERP event store is not open (was the app lifespan run?)")
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    def record(self, deliveries: Sequence[Delivery]) -> list[Receipt]:
        """Store each new key once, count repeats, all in one transaction."""
        receipts = []
        received_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        with self._transaction() as db:
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
                        event["type"],
                        event.get("subject"),
                        event.get("partitionkey"),
                        json.dumps(event, ensure_ascii=False),
                        received_at,
                    ),
                )
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

    def clear(self) -> int:
        with self._transaction() as db:
            return db.execute("DELETE FROM received_events").rowcount


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


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _json_body(request: Request) -> object:
    body = await request.body()
    try:
        decoded: object = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent(f"body is not valid JSON: {exc}") from exc
    return decoded


class ErpSimulator:
    """Request handlers over one event store, the current faults and counters."""

    def __init__(self, store: EventStore, faults: Faults, log_requests: bool) -> None:
        self.store = store
        self.faults = faults
        self._log_requests = log_requests
        self._errors_injected = 0
        self._random = random.Random()

    async def _misbehave(self, request: Request) -> Response | None:
        """Apply latency, then maybe answer an injected error instead of processing."""
        faults = self.faults
        if faults.latency > 0:
            await asyncio.sleep(faults.latency)
        if faults.error_rate <= 0 or self._random.random() >= faults.error_rate:
            return None
        self._errors_injected += 1
        headers = {}
        if faults.error_status in RETRY_AFTER_STATUSES:
            headers["Retry-After"] = str(faults.retry_after)
        if self._log_requests:
            print(
                f"ERP answered {faults.error_status} to {request.url.path} (injected fault)",
                flush=True,
            )
        return _error(faults.error_status, f"injected fault {faults.error_status}", headers)

    def _log(self, delivery: Delivery, receipt: Receipt) -> None:
        if not self._log_requests:
            return
        event = delivery.event
        line = (
            f"ERP received {event['type']} subject={event.get('subject')} id={event['id']}"
            f" -> {receipt.reference}"
        )
        print(line + (" (duplicate)" if receipt.duplicate else ""), flush=True)

    def _accept(self, deliveries: Sequence[Delivery]) -> list[Receipt]:
        receipts = self.store.record(deliveries)
        for delivery, receipt in zip(deliveries, receipts, strict=True):
            self._log(delivery, receipt)
        return receipts

    async def post_event(self, request: Request) -> Response:
        if (injected := await self._misbehave(request)) is not None:
            return injected
        key = request.headers.get("idempotency-key", "").strip()
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
            event = validate_event(await _json_body(request))
        except InvalidEvent as exc:
            return _error(400, str(exc))
        (receipt,) = self._accept([Delivery(key=key, event=event)])
        return JSONResponse(
            {"reference": receipt.reference, "duplicate": receipt.duplicate},
            status_code=200 if receipt.duplicate else 201,
        )

    async def post_batch(self, request: Request) -> Response:
        if (injected := await self._misbehave(request)) is not None:
            return injected
        media_type = _media_type(request)
        if media_type != BATCH_CONTENT_TYPE:
            return _error(415, f"content type {media_type or '(none)'} is not {BATCH_CONTENT_TYPE}")
        try:
            candidates = await _json_body(request)
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

    async def list_events(self, request: Request) -> Response:
        return JSONResponse(self.store.list_events(request.query_params.get("type")))

    async def stats(self, request: Request) -> Response:
        unique, duplicates = self.store.counts()
        return JSONResponse(
            {
                "received": unique + duplicates,
                "unique": unique,
                "duplicates": duplicates,
                "errors_injected": self._errors_injected,
            }
        )

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def get_faults(self, request: Request) -> Response:
        return JSONResponse(self.faults.as_json())

    async def set_faults(self, request: Request) -> Response:
        try:
            changes = await _json_body(request)
            if not isinstance(changes, dict):
                raise InvalidEvent("fault settings must be a JSON object")
            self.faults = self.faults.updated(changes)
        except ValueError as exc:  # InvalidEvent included
            return _error(400, str(exc))
        return JSONResponse(self.faults.as_json())

    async def reset(self, request: Request) -> Response:
        cleared = self.store.clear()
        self._errors_injected = 0
        return JSONResponse({"cleared": cleared})


def create_app(
    db_path: str = ":memory:", faults: Faults | None = None, *, log_requests: bool = False
) -> Starlette:
    """Build the ERP simulator app; its store opens and closes with the app's lifespan."""
    store = EventStore(db_path)
    simulator = ErpSimulator(store, faults or Faults(), log_requests)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store.open()
        try:
            yield
        finally:
            store.close()

    routes = [
        Route("/api/events", simulator.post_event, methods=["POST"]),
        Route("/api/events:batch", simulator.post_batch, methods=["POST"]),
        Route("/events", simulator.list_events, methods=["GET"]),
        Route("/stats", simulator.stats, methods=["GET"]),
        Route("/healthz", simulator.healthz, methods=["GET"]),
        Route("/_sim/faults", simulator.get_faults, methods=["GET"]),
        Route("/_sim/faults", simulator.set_faults, methods=["POST"]),
        Route("/_sim/reset", simulator.reset, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.simulator = simulator
    return app


async def serve(
    host: str, port: int, db_path: str, faults: Faults, *, log_requests: bool = False
) -> None:
    """Serve the simulator until uvicorn is told to exit (SIGINT or SIGTERM)."""
    app = create_app(db_path, faults, log_requests=log_requests)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
    )
    server = uvicorn.Server(config)
    async with asyncio.TaskGroup() as tasks:
        serving = tasks.create_task(_serve_until_exit(server), name="erp-api-http")
        # uvicorn exposes readiness only as a flag, so poll it briefly.
        while not server.started and not serving.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if server.started:
            # Port 0 asks the kernel for a free port: announce the one actually bound.
            bound_port = server.servers[0].sockets[0].getsockname()[1]
            shown_host = f"[{host}]" if ":" in host else host
            print(f"erp-api listening on http://{shown_host}:{bound_port}", flush=True)
    if not server.started:
        raise StartupFailed(f"erp-api could not start on {host}:{port}")


async def _serve_until_exit(server: uvicorn.Server) -> None:
    # After a graceful shutdown on SIGINT or SIGTERM, uvicorn raises the signal again for
    # the previous handler; with main's handler that is a KeyboardInterrupt landing here,
    # once the work is done, so it only means "stopped as asked". A failed start-up is a
    # sys.exit() inside uvicorn after it logged the cause; serve() reports it instead.
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        await server.serve()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.erp_api", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8480, help="port (0 picks a free one)")
    parser.add_argument("--db", default=":memory:", help="SQLite file (default: in memory)")
    defaults = Faults()
    parser.add_argument(
        "--error-rate",
        type=float,
        default=defaults.error_rate,
        help="probability 0..1 of answering --error-status instead",
    )
    parser.add_argument(
        "--error-status", type=int, default=defaults.error_status, help="status of injected errors"
    )
    parser.add_argument(
        "--retry-after",
        type=int,
        default=defaults.retry_after,
        help="Retry-After seconds sent with injected 429 and 503",
    )
    parser.add_argument(
        "--latency", type=float, default=defaults.latency, help="seconds added to each delivery"
    )
    parser.add_argument(
        "--log-requests", action="store_true", help="print one line per received event"
    )
    args = parser.parse_args(argv)
    try:
        faults = Faults(
            error_rate=args.error_rate,
            error_status=args.error_status,
            retry_after=args.retry_after,
            latency=args.latency,
        )
    except ValueError as exc:
        parser.error(str(exc))
    # SIGTERM is treated like Ctrl-C, so a stop before uvicorn owns the signals (or after
    # it re-raises them) ends here with exit code 0 rather than death by signal.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        asyncio.run(serve(args.host, args.port, args.db, faults, log_requests=args.log_requests))
    except KeyboardInterrupt:
        pass
    except StartupFailed as exc:
        print(exc, file=sys.stderr, flush=True)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
