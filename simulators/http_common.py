"""What the HTTP simulators (ERP and QMS) have in common, written once.

The fault knobs and how a scripted or random status is drawn from them; the OAuth2
client-credentials token table and the bearer header; the SQLite store behind one guarded
connection; the control routes (``/stats``, ``/healthz``, ``/_sim/faults``, ``/_sim/reset``);
serving under uvicorn until SIGINT or SIGTERM, with the ``NAME listening on http://HOST:PORT``
ready line that tests and the demo wait for; and the command line flags both take. Each
simulator keeps its own endpoints, order of checks and wording (help texts, error messages,
realms), because clients and tests depend on them: where those differ, it passes its own in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import json
import random
import secrets
import signal
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from types import FrameType, MappingProxyType
from typing import Any, Final, Literal, Protocol, Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

RETRY_AFTER_STATUSES: Final = frozenset({429, 503})
SHUTDOWN_GRACE_SECONDS: Final = 5
DEFAULT_TOKEN_TTL: Final = 3600
TOKEN_RESPONSE_HEADERS: Final[Mapping[str, str]] = MappingProxyType(
    {"Cache-Control": "no-store", "Pragma": "no-cache"}
)
"""RFC 6749 5.1: what the token endpoint answers must not be cached."""

FaultCause = Literal["status_sequence", "error_rate"]


class StartupFailed(RuntimeError):
    """The HTTP server could not start (port taken, address invalid); uvicorn logged why."""


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


def _knob_kind(knob: dataclasses.Field[Any]) -> str:
    """A knob's type name ("int", "float"...), whether annotations are kept as strings or not."""
    kind = knob.type
    return kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))


@dataclass(frozen=True)
class FaultKnobs:
    """The fault knobs every simulator takes, validated on creation; each adds its own.

    Apart from ``error_rate`` and ``error_status``, every number knob is a duration, a time
    or a count, so none may be negative.
    """

    error_rate: float = 0.0
    """Probability (0..1) of answering ``error_status`` instead of processing a request."""
    error_status: int = 503
    """HTTP status of an injected error (400..599)."""
    retry_after: int = 1
    """Seconds sent in ``Retry-After`` with every injected 429 and 503."""
    latency: float = 0.0
    """Seconds added to each faulted request before it is answered."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be between 0 and 1, got {self.error_rate}")
        if not 400 <= self.error_status <= 599:
            raise ValueError(f"error_status must be an HTTP error status, got {self.error_status}")
        for knob in dataclasses.fields(self):
            if knob.name in ("error_rate", "error_status"):
                continue
            value = getattr(self, knob.name)
            if _knob_kind(knob) in ("int", "float") and value < 0:
                raise ValueError(f"{knob.name} must not be negative, got {value}")

    def updated(self, changes: Mapping[str, object]) -> Self:
        """Return these knobs with ``changes`` (decoded JSON) applied, or raise ValueError."""
        known = {knob.name: _knob_kind(knob) for knob in dataclasses.fields(self)}
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ValueError(f"unknown fault setting(s): {', '.join(unknown)}")
        checked: dict[str, Any] = {
            name: self._checked_knob(name, known[name], value) for name, value in changes.items()
        }
        return dataclasses.replace(self, **checked)

    def _checked_knob(self, name: str, kind: str, value: object) -> Any:
        """The value to set knob ``name`` (of type ``kind``) to; a subclass adds other kinds."""
        # bool is an int in Python but never a sensible knob value in JSON.
        wants_int = kind == "int"
        valid = isinstance(value, int) if wants_int else isinstance(value, int | float)
        if isinstance(value, bool) or not valid:
            expected = "an integer" if wants_int else "a number"
            raise ValueError(f"{name} must be {expected}, got {json.dumps(value)}")
        return value

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    async def apply_latency(self) -> None:
        if self.latency > 0:
            await asyncio.sleep(self.latency)

    def retry_after_headers(self, status: int) -> dict[str, str]:
        """``Retry-After`` for an injected 429 or 503, nothing for other statuses."""
        if status in RETRY_AFTER_STATUSES:
            return {"Retry-After": str(self.retry_after)}
        return {}


def injected_status(
    pending: deque[int], knobs: FaultKnobs, rng: random.Random
) -> tuple[int, FaultCause] | None:
    """The error status to answer instead of processing a request, or None to let it through.

    The next scripted status comes first and is used up whatever it is: a 2xx lets the request
    through without the error rate being rolled for it. ``pending`` holds 2xx, 4xx and 5xx only.
    """
    if pending:
        status = pending.popleft()
        return (status, "status_sequence") if status >= 400 else None
    if knobs.error_rate > 0 and rng.random() < knobs.error_rate:
        return knobs.error_status, "error_rate"
    return None


# --------------------------------------------------------------------------------------------
# OAuth2 client credentials
# --------------------------------------------------------------------------------------------


def check_token_ttl(ttl: int) -> None:
    if ttl < 1:
        raise ValueError(f"token_ttl must be at least 1 second, got {ttl}")


@dataclass
class TokenIssuer:
    """OAuth2 client credentials: configured clients and the bearer tokens issued to them.

    Tokens live in memory only: a restart forgets them, as it would the real systems' sessions.
    """

    clients: Mapping[str, str]
    """Client id to client secret; empty: any client may have a token."""
    ttl: int = DEFAULT_TOKEN_TTL
    """Lifetime of an issued access token, seconds."""
    _tokens: dict[str, tuple[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_token_ttl(self.ttl)

    @property
    def required(self) -> bool:
        return bool(self.clients)

    def accepts(self, client_id: str, client_secret: str) -> bool:
        if not self.clients:
            return True
        expected = self.clients.get(client_id)
        # Compared as bytes: compare_digest refuses str with characters beyond ASCII.
        return expected is not None and hmac.compare_digest(
            expected.encode(), client_secret.encode()
        )

    def issue(self, client_id: str) -> str:
        now = time.monotonic()
        # Forget expired tokens so a long soak does not grow the table.
        for token in [t for t, (_, expiry) in self._tokens.items() if expiry <= now]:
            del self._tokens[token]
        token = secrets.token_urlsafe(32)
        self._tokens[token] = (client_id, now + self.ttl)
        return token

    def grant(self, client_id: str) -> JSONResponse:
        """Issue a token to ``client_id`` and answer it as RFC 6749 section 5.1 says."""
        return JSONResponse(
            {"access_token": self.issue(client_id), "token_type": "Bearer", "expires_in": self.ttl},
            headers=TOKEN_RESPONSE_HEADERS,
        )

    def check(self, token: str) -> tuple[str | None, str]:
        """Return (client id, "") for a valid token, else (None, why it is not)."""
        known = self._tokens.get(token)
        if known is None:
            return None, "the access token is unknown or was revoked"
        client_id, expiry = known
        if expiry <= time.monotonic():
            return None, "the access token expired"
        return client_id, ""

    def revoke_all(self) -> int:
        revoked = len(self._tokens)
        self._tokens.clear()
        return revoked


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, None without one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def oauth_error(
    status: int, error: str, description: str, *, realm: str, headers: Mapping[str, str]
) -> JSONResponse:
    """An RFC 6749 section 5.2 error; a 401 asks for HTTP Basic client authentication."""
    sent = dict(headers)
    if status == 401:
        sent["WWW-Authenticate"] = f'Basic realm="{realm}"'
    return JSONResponse(
        {"error": error, "error_description": description}, status_code=status, headers=sent
    )


# --------------------------------------------------------------------------------------------
# Requests and the control routes
# --------------------------------------------------------------------------------------------


def media_type(request: Request) -> str:
    """The request's media type, lower case, without parameters (`; charset=...`)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def json_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """A plain JSON error body, ``{"error": message}``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_json(request: Request, invalid: Callable[[str], Exception]) -> object:
    """The decoded JSON body; ``invalid(reason)`` is raised when it is not JSON."""
    body = await request.body()
    try:
        decoded: object = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"body is not valid JSON: {exc}") from exc
    return decoded


def idempotency_key(request: Request) -> str | None:
    """The request's ``Idempotency-Key``, or None when it has none.

    draft-ietf-httpapi-idempotency-key-header makes the value a Structured Field String
    (RFC 8941 3.3.3: ``"..."``, printable ASCII, ``\\"`` and ``\\\\`` escaped); older clients
    send the bare value, which is taken as it is. A quoted value that is not a valid String
    raises ValueError with the reason.
    """
    raw = request.headers.get("idempotency-key", "").strip(" \t")
    if not raw:
        return None
    if not raw.startswith('"'):
        return raw
    value, escaped = [], False
    for position, char in enumerate(raw[1:], start=1):
        if not " " <= char <= "~":
            raise ValueError("Idempotency-Key: a String holds printable ASCII only")
        if escaped:
            if char not in '"\\':
                raise ValueError(f"Idempotency-Key: \\{char} is not an escape of a String")
            value.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            if position != len(raw) - 1:
                raise ValueError("Idempotency-Key: text after the closing quote")
            return "".join(value) or None
        else:
            value.append(char)
    raise ValueError("Idempotency-Key: the String has no closing quote")


class ControlSurface(Protocol):
    """The handlers behind the routes tests use to watch and steer any simulator."""

    async def stats(self, request: Request) -> Response: ...

    async def get_faults(self, request: Request) -> Response: ...

    async def set_faults(self, request: Request) -> Response: ...

    async def reset(self, request: Request) -> Response: ...


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def control_routes(simulator: ControlSurface) -> list[Route]:
    """``/stats``, ``/healthz``, ``/_sim/faults`` and ``/_sim/reset``: never faulted or guarded."""
    return [
        Route("/stats", simulator.stats, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/_sim/faults", simulator.get_faults, methods=["GET"]),
        Route("/_sim/faults", simulator.set_faults, methods=["POST"]),
        Route("/_sim/reset", simulator.reset, methods=["POST"]),
    ]


# --------------------------------------------------------------------------------------------
# SQLite
# --------------------------------------------------------------------------------------------


class SqliteStore:
    """A simulator's SQLite tables behind one guarded connection, open while the app runs.

    The server runs on one event loop and never awaits inside a transaction, so the lock is
    uncontended in practice; it keeps the store correct if a caller ever uses it from another
    thread (Starlette's test client runs the app on its own thread).
    """

    def __init__(self, db_path: str, schema: str, name: str) -> None:
        self._db_path = db_path
        self._schema = schema
        self._name = name
        self._connection: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        connection = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False)
        if self._db_path != ":memory:":
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA busy_timeout=5000")
        connection.executescript(self._schema)
        self._connection = connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    @contextlib.contextmanager
    def opened(self) -> Iterator[None]:
        """Keep the store open for the ``with`` block: an app's lifespan."""
        self.open()
        try:
            yield
        finally:
            self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self._connection is None:
            raise RuntimeError(f"the {self._name} is not open (was the app lifespan run?)")
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")


# --------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------


def uvicorn_server(app: Starlette, host: str, port: int) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
    )
    return uvicorn.Server(config)


async def serve(server: uvicorn.Server, name: str) -> None:
    """Serve until uvicorn is told to exit (SIGINT or SIGTERM); say ``NAME listening on`` once.

    Raise StartupFailed when the server never started.
    """
    host, port = server.config.host, server.config.port
    async with asyncio.TaskGroup() as tasks:
        serving = tasks.create_task(_serve_until_exit(server), name=f"{name}-http")
        # uvicorn exposes readiness only as a flag, so poll it briefly.
        while not server.started and not serving.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if server.started:
            # Port 0 asks the kernel for a free port: announce the one actually bound.
            bound_port = server.servers[0].sockets[0].getsockname()[1]
            shown_host = f"[{host}]" if ":" in host else host
            print(f"{name} listening on http://{shown_host}:{bound_port}", flush=True)
    if not server.started:
        raise StartupFailed(f"{name} could not start on {host}:{port}")


async def _serve_until_exit(server: uvicorn.Server) -> None:
    # After a graceful shutdown on SIGINT or SIGTERM, uvicorn raises the signal again for
    # the previous handler; with run_until_signalled's handler that is a KeyboardInterrupt
    # landing here, once the work is done, so it only means "stopped as asked". A failed
    # start-up is a sys.exit() inside uvicorn after it logged the cause; serve() reports it.
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        await server.serve()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_until_signalled(serving: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Run ``serving()`` until SIGINT or SIGTERM; the exit code: 0, or 1 if it could not start."""
    # SIGTERM is treated like Ctrl-C, so a stop before uvicorn owns the signals (or after
    # it re-raises them) ends here with exit code 0 rather than death by signal.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        asyncio.run(serving())
    except KeyboardInterrupt:
        pass
    except StartupFailed as exc:
        print(exc, file=sys.stderr, flush=True)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def client_argument(text: str) -> tuple[str, str]:
    """argparse type of ``--client ID:SECRET``."""
    client_id, colon, secret = text.partition(":")
    if not colon or not client_id or not secret:
        raise argparse.ArgumentTypeError(f"expected ID:SECRET, got {text!r}")
    return client_id, secret


def add_listen_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    """``--host``, ``--port`` and ``--db``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=default_port, help="port (0 picks a free one)")
    parser.add_argument("--db", default=":memory:", help="SQLite file (default: in memory)")


def add_client_arguments(
    parser: argparse.ArgumentParser, *, client_help: str, token_ttl_help: str
) -> None:
    """``--client ID:SECRET`` (repeatable) and ``--token-ttl``."""
    parser.add_argument(
        "--client",
        type=client_argument,
        action="append",
        default=[],
        metavar="ID:SECRET",
        help=client_help,
    )
    parser.add_argument("--token-ttl", type=int, default=DEFAULT_TOKEN_TTL, help=token_ttl_help)


@dataclass(frozen=True)
class FaultFlagHelp:
    """The help of the fault flags that say which requests they hit, in a simulator's words."""

    error_rate: str
    latency: str
    outage_seconds: str
    status_sequence: str
    status_metavar: str


def add_fault_arguments(
    parser: argparse.ArgumentParser,
    statuses: Callable[[str], tuple[int, ...]],
    wording: FaultFlagHelp,
) -> None:
    """``--error-rate``, ``--error-status``, ``--retry-after``, ``--latency``,
    ``--outage-seconds`` and ``--status-sequence`` (parsed by ``statuses``)."""
    defaults = FaultKnobs()
    parser.add_argument(
        "--error-rate", type=float, default=defaults.error_rate, help=wording.error_rate
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
    parser.add_argument("--latency", type=float, default=defaults.latency, help=wording.latency)
    parser.add_argument("--outage-seconds", type=float, default=0.0, help=wording.outage_seconds)
    parser.add_argument(
        "--status-sequence",
        type=statuses,
        default=(),
        metavar=wording.status_metavar,
        help=wording.status_sequence,
    )
