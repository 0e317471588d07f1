"""What keeps the local API usable when a caller misbehaves: who may call what, how big a
request may be, how long a client may take to send it, and how many connections it may hold.

uvicorn bounds none of the last two by itself (read in its h11 protocol: no timer runs from
`connection_made` until a request's headers are complete, `timeout_keep_alive` is armed only
after a response, and `limit_concurrency` answers 503 to new requests but never closes a
connection). So a client that trickles a header line at a time held a connection, and its file
descriptor, for as long as it liked; 1,100 of them under a 1,024 file limit took `/healthz`
down. `GuardedH11Protocol` adds the two bounds at the protocol level, where the bytes arrive:

- a request deadline (`api.request_timeout`): from the moment a connection waits for a request
  (when it opens, and after each answer) to the end of the request's body; past it the
  connection is answered 408 and closed;
- a connection cap (`api.max_connections`): at the cap, the connection that has waited longest
  for its request is closed to make room for the new one, so fresh callers (a health probe, the
  CLI) get in while a flood of stalled ones pushes itself out. A connection whose request is
  being answered is never closed for room; when every one is busy, the new one is refused.

`ApiGuard` is the ASGI side: it checks the token before anything is read, and reads at most
`BODY_LIMIT` bytes of a body (a larger `Content-Length` is refused with 413 before a byte of the
body is read). On loopback only changes need the token; off loopback everything but
`/healthz`, `/readyz` and `/metrics` does. The token counts only as `Authorization: Bearer`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

BODY_LIMIT = 64 * 1024
"""Largest request body the local API reads. Its calls take a few fields of JSON."""

OPEN_OFF_LOOPBACK = frozenset({"/healthz", "/readyz", "/metrics"})
"""What anyone who can reach the API may read even off loopback: health and metrics only."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

_TIMED_OUT_BODY = b'{"error": "the request took too long to arrive"}'
_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TIMED_OUT_BODY), _TIMED_OUT_BODY)
)
_LOG_EVERY = 60.0


class ApiServerConfig(uvicorn.Config):
    """uvicorn's config plus the two bounds the guarded protocol enforces."""

    def __init__(
        self, app: Any, *, max_connections: int, request_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(app, http=GuardedH11Protocol, **kwargs)
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.last_warning = 0.0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request deadline and a connection cap (see above)."""

    config: ApiServerConfig

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.waiting_since: float | None = None
        self._deadline: asyncio.TimerHandle | None = None
        if len(self.connections) >= self.config.max_connections and not self._make_room():
            self._warn(
                "the local API is at its connection limit (%d) and every connection "
                "is being answered; refused a new one",
                self.config.max_connections,
            )
            transport.abort()
            return
        super().connection_made(transport)
        self._wait_for_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        if self.transport is not None:  # None when refused in connection_made
            super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._stop_waiting()  # the whole request is in; answering it has no deadline

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._wait_for_request()

    def _wait_for_request(self) -> None:
        self._stop_waiting()
        self.waiting_since = time.monotonic()
        self._deadline = self.loop.call_later(self.config.request_timeout, self._timed_out)

    def _stop_waiting(self) -> None:
        self.waiting_since = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        self.close_waiting()

    def close_waiting(self) -> None:
        """Close a connection whose request has not arrived in full: 408 when nothing has
        been answered on it yet, so a real client learns why."""
        self.waiting_since = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_TIMED_OUT)
        self.transport.close()

    def _make_room(self) -> bool:
        waiting = [
            c
            for c in self.connections
            if isinstance(c, GuardedH11Protocol)
            and c.waiting_since is not None
            and not c.transport.is_closing()
        ]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c.waiting_since or 0.0)
        self._warn(
            "the local API is at its connection limit (%d): closing the connections "
            "that waited longest for their request",
            self.config.max_connections,
        )
        oldest.close_waiting()
        self.connections.discard(oldest)
        return True

    def _warn(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.config.last_warning >= _LOG_EVERY:
            self.config.last_warning = now
            log.warning(message[:1].upper() + message[1:], *args)


def token_required(path: str, changes: frozenset[str], *, on_loopback: bool) -> bool:
    """Whether a call to `path` must carry the token. `changes` are the paths that change
    something."""
    if not on_loopback:
        return path not in OPEN_OFF_LOOPBACK
    return path in changes


def bearer_matches(authorization: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>` and nothing else (RFC 6750 2.1; the scheme name is
    case-insensitive, RFC 9110 11.1)."""
    if not authorization:
        return False
    scheme, _, offered = authorization.partition(" ")
    if scheme.lower() != "bearer" or not offered:
        return False
    return secrets.compare_digest(offered.encode(), token.encode())


class ApiGuard:
    """ASGI middleware: the token where it is needed, then a body of at most BODY_LIMIT."""

    def __init__(
        self,
        app: Asgi,
        *,
        token: Callable[[], str],
        changes: frozenset[str],
        on_loopback: bool,
        body_limit: int = BODY_LIMIT,
    ) -> None:
        self.app = app
        self.token = token
        self.changes = changes
        self.on_loopback = on_loopback
        self.body_limit = body_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope["headers"]
        }
        if token_required(scope["path"], self.changes, on_loopback=self.on_loopback) and (
            not bearer_matches(headers.get("authorization"), self.token())
        ):
            why = (
                "this call changes the outbox"
                if self.on_loopback
                else "the API listens off loopback, where every call but /healthz, /readyz and "
                "/metrics"
            )
            await _answer(
                send,
                401,
                f"{why}: it needs the API token as Authorization: Bearer ...",
                {"www-authenticate": "Bearer"},
            )
            return
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.body_limit):
            await _answer(
                send,
                413,
                f"the body is larger than {self.body_limit} bytes",
                {"connection": "close"},
            )
            return
        body = bytearray()
        more = scope["method"] not in ("GET", "HEAD")
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = bool(message.get("more_body"))
            if len(body) > self.body_limit:
                await _answer(
                    send,
                    413,
                    f"the body is larger than {self.body_limit} bytes",
                    {"connection": "close"},
                )
                return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _answer(send: Send, status: int, error: str, extra: dict[str, str]) -> None:
    body = json.dumps({"error": error}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.encode(), value.encode()) for name, value in extra.items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
