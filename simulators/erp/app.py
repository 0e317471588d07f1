"""The ERP simulator's app: the checks every /api and /sap request passes (latency, outage,
bearer token, CSRF, delivery faults), the OAuth2 token endpoint, the test endpoints, the route
table, and the command line (`python -m simulators.erp`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import simulators.erp
from simulators.erp.canonical import CanonicalApi, InvalidEvent, short_type
from simulators.erp.confirmed import confirmed_routes
from simulators.erp.faults import Counters, FaultActions, Faults, ScriptedFaults, status_sequence
from simulators.erp.orders import ErpOrders, OrderStore, order_routes
from simulators.erp.sap_metadata import (
    CONFIRMATION_SERVICE,
    CONFIRMATION_SET,
    INSPECTION_LOT_SET,
    INSPECTION_SERVICE,
    MATERIAL_DOCUMENT_ITEM_SET,
    MATERIAL_DOCUMENT_SERVICE,
    MATERIAL_DOCUMENT_SET,
    SAP_METADATA_DIR,
    UNITS,
    USAGE_DECISION_SET,
    ODataError,
    SapMetadata,
    bad_request,
)
from simulators.erp.sap_services import (
    CSRF_HEADER,
    SAP_SESSION_COOKIE,
    CsrfSessions,
    SapServices,
    odata_error,
)
from simulators.erp.store import EventStore
from simulators.http_common import (
    DEFAULT_TOKEN_TTL,
    TOKEN_RESPONSE_HEADERS,
    FaultFlagHelp,
    TokenIssuer,
    add_client_arguments,
    add_fault_arguments,
    add_listen_arguments,
    bearer_token,
    control_routes,
    injected_status,
    json_error,
    media_type,
    oauth_error,
    read_json,
    run_until_signalled,
    uvicorn_server,
)
from simulators.http_common import serve as serve_until_stopped

JsonObject = dict[str, Any]

AUTH_REALM = "plantsync-erp-sim"
DEFAULT_USER = "PLANTSYNC"

Endpoint = Callable[[Request], Awaitable[Response]]


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

    def say(self, line: str) -> None:
        """Print one line about a request, when the simulator logs requests."""
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
                response = odata_error(exc.status, exc.code, exc.message)
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
            return odata_error(status, f"SIM/HTTP_{status}", message, headers)
        return json_error(status, message, headers)

    def _outage(self, request: Request, odata: bool) -> Response | None:
        remaining = self.faults.outage_until - time.time()
        if remaining <= 0:
            return None
        self.counters.outage_rejections += 1
        self.say(f"ERP answered 503 to {request.url.path} (outage)")
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
        self.say(f"ERP answered 401 to {request.url.path} ({message})")
        return self._refusal(401, message, {"WWW-Authenticate": challenge}, odata=odata)

    def _check_csrf(self, request: Request) -> Response | None:
        session = request.cookies.get(SAP_SESSION_COOKIE)
        if self.csrf.valid(session, request.headers.get(CSRF_HEADER)):
            return None
        self.counters.csrf_rejections += 1
        self.say(f"SAP answered 403 to {request.url.path} (CSRF token required)")
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
        self.say(f"ERP answered {status} to {request.url.path} ({how} fault)")
        return self._refusal(status, f"{how} fault {status}", headers, odata=odata)

    async def _drop(self, request: Request, when: str) -> Response:
        closer = self.connection_closer
        if closer is None or not closer(request.scope.get("client")):
            return json_error(502, "cannot drop this connection: run the simulator with uvicorn")
        if when.startswith("after"):
            self.counters.responses_dropped += 1
        else:
            self.counters.connections_dropped += 1
        self.say(f"ERP dropped the connection of {request.url.path} {when} (injected fault)")
        # Let the transport report the loss, so uvicorn discards what is sent below.
        for _ in range(3):
            await asyncio.sleep(0)
        return Response(status_code=500)

    # -- OAuth2 --------------------------------------------------------------------------------

    async def issue_token(self, request: Request) -> Response:
        def refuse(status: int, error: str, description: str) -> Response:
            self.counters.token_requests_refused += 1
            return oauth_error(
                status, error, description, realm=AUTH_REALM, headers=TOKEN_RESPONSE_HEADERS
            )

        if media_type(request) != "application/x-www-form-urlencoded":
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
        self.say(f"ERP issued an access token to {credentials[0]}")
        return self.tokens.grant(credentials[0])

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
            return json_error(404, f"no batch {batch}")
        if len(found) > 1:
            materials = ", ".join(str(each["material"]) for each in found)
            return json_error(
                409, f"batch {batch} exists for materials {materials}: add ?material="
            )
        return JSONResponse(found[0])

    async def sap_confirmations(self, request: Request) -> Response:
        return JSONResponse(self.store.confirmations())

    async def sap_usage_decisions(self, request: Request) -> Response:
        # Each with its inspection lot's material, batch and plant, so a test can tell which
        # batch was decided without a second query.
        lots = {lot["InspectionLot"]: lot for lot in self.store.inspection_lots()}
        return JSONResponse(
            [
                {
                    **decision,
                    "_lot": {
                        name: lots[decision["InspectionLot"]][name]
                        for name in ("Material", "Batch", "Plant", "ManufacturingOrder")
                    },
                }
                for decision in self.store.usage_decisions()
            ]
        )

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
            return json_error(400, str(exc))
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
            self.say(f"ERP revoked {revoked} access token(s) (injected fault)")
        if actions.invalidate_csrf:
            self.csrf.clear()
            self.say("SAP forgot every CSRF session (injected fault)")
        return JSONResponse(self._faults_json())

    async def reset(self, request: Request) -> Response:
        cleared = self.store.clear()
        self.counters = Counters()
        return JSONResponse(cleared)


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

    order_store = OrderStore(db_path)
    orders = ErpOrders(order_store, simulator.metadata, UNITS, bad_request)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        with store.opened(), order_store.opened():
            yield

    guard = simulator.guard
    canonical = CanonicalApi(store, simulator.say)
    sap = SapServices(store, simulator.metadata, simulator.say)

    def odata(path: str, handler: Endpoint, method: str = "GET") -> Route:
        """A SAP OData route: every POST is a delivery (CSRF, delivery faults)."""
        return Route(path, guard(handler, odata=True, delivery=method == "POST"), methods=[method])

    def service(root: str, *entity_sets: str) -> list[Route]:
        """A service document, with and without its trailing slash (the CSRF fetch)."""
        document = sap.service_document(*entity_sets)
        return [odata(root, document), odata(f"{root}/", document)]

    confirmations = f"{CONFIRMATION_SERVICE}/{CONFIRMATION_SET}"
    decisions = f"{INSPECTION_SERVICE}/{USAGE_DECISION_SET}"
    documents = f"{MATERIAL_DOCUMENT_SERVICE}/{MATERIAL_DOCUMENT_SET}"
    routes = [
        Route(
            "/api/events",
            guard(canonical.post_event, odata=False, delivery=True),
            methods=["POST"],
        ),
        Route(
            "/api/events:batch",
            guard(canonical.post_batch, odata=False, delivery=True),
            methods=["POST"],
        ),
        Route("/oauth/token", simulator.issue_token, methods=["POST"]),
        *service(CONFIRMATION_SERVICE, CONFIRMATION_SET, "ProdnOrdConfMatlDocItm"),
        odata(confirmations, sap.list_confirmations),
        odata(confirmations, sap.create_confirmation, "POST"),
        odata(confirmations + "({key})", sap.get_confirmation),
        *service(INSPECTION_SERVICE, INSPECTION_LOT_SET, USAGE_DECISION_SET),
        odata(decisions, sap.list_usage_decisions),
        odata(decisions, sap.create_usage_decision, "POST"),
        odata(f"{INSPECTION_SERVICE}/{INSPECTION_LOT_SET}", sap.list_inspection_lots),
        *service(MATERIAL_DOCUMENT_SERVICE, MATERIAL_DOCUMENT_SET, MATERIAL_DOCUMENT_ITEM_SET),
        odata(documents, sap.create_material_document, "POST"),
        odata(
            f"{MATERIAL_DOCUMENT_SERVICE}/{MATERIAL_DOCUMENT_ITEM_SET}",
            sap.list_material_document_items,
        ),
        Route("/events", simulator.list_events, methods=["GET"]),
        *confirmed_routes(store, guard),  # reconciliation: simulators/erp/confirmed.py
        Route("/_sim/sap/inspection-lots", simulator.sap_inspection_lots, methods=["GET"]),
        Route("/_sim/sap/material-documents", simulator.sap_material_documents, methods=["GET"]),
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


def main(argv: list[str] | None = None, prog: str = "python -m simulators.erp") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(simulators.erp.__doc__ or "").split("\n\n")[0],
        epilog="Endpoints and fault knobs: see the module docstring (pydoc simulators.erp).",
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
        "--sap-metadata",
        type=Path,
        default=SAP_METADATA_DIR,
        metavar="DIR",
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
