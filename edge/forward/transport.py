"""What carries a destination's requests under httpx's API: aiohttp's connection pool and HTTP
parser (the `httpx-aiohttp` transport) or httpx's own httpcore, by `http_transport`.

Measured on the gateway's 2-core hardware with `bench/forward.py` (same run, 4 in flight, the
ERP simulator on loopback): httpx on httpcore makes about 1,400 POSTs/s, on aiohttp about
4,400, bare aiohttp about 4,600; a forwarder's rate follows its client's, so aiohttp is the
default. The code keeps httpx's API (requests, responses, errors, timeouts), so profiles do
not change.

Two things differ from `httpx-aiohttp`'s own `handle_async_request`:

- Connection errors are told apart. `httpx-aiohttp` maps every aiohttp connection error to
  `httpx.ConnectTimeout`, including a server that closed the connection after it got the
  request (`ServerDisconnectedError`) or a reset while the answer was awaited. The outcome of
  such a failure must say "the target may have the event" (`Result.ambiguous`) and the
  technician must read what happened, not "connect timeout": here only a failure to connect
  stays a connect error (`ConnectError`, or `ConnectTimeout` for a connection not made in
  time); everything else becomes `httpx.ReadError`, named after aiohttp's error, also while
  the body is read.
- A request whose body is in memory (every request the gateway makes) takes a shorter way:
  its URL is parsed by yarl once per URL, not once per request, its aiohttp timeout is built
  once per set of timeouts, and the answer is read whole here, so the httpx response streams
  from memory, without `httpx-aiohttp`'s stream wrapper and the async generators it drives.
  About 6 us less of the event loop's CPU per unbatched event (bench/forward.py's profile,
  medians of 5 alternating runs). A streamed body, a proxy or an SNI override take
  `httpx-aiohttp`'s way. tests/test_transport.py checks that an answer (gzip, chunked,
  empty, a reason phrase) reads the same as on httpx's own transport.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import map_aiohttp_exceptions
from yarl import URL

HTTP_1_1 = b"HTTP/1.1"


class SafeAiohttpTransport(AiohttpTransport):
    """`httpx-aiohttp`'s transport, with connection errors told apart and in-memory bodies
    sent the short way (see the module doc)."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with _connection_errors_told_apart(request):
            if self.proxy is not None or "sni_hostname" in request.extensions:
                return await super().handle_async_request(request)
            try:
                data = request.content
            except httpx.RequestNotRead:  # a streamed body
                return await super().handle_async_request(request)
            if not isinstance(self.client, aiohttp.ClientSession):
                self.client = self.get_client()
            timeout = request.extensions.get("timeout", {})
            with map_aiohttp_exceptions():
                async with self.client.request(
                    request.method,
                    _yarl_url(str(request.url)),
                    headers=request.headers.multi_items(),
                    data=data or None,
                    allow_redirects=False,
                    auto_decompress=False,
                    compress=False,
                    timeout=_client_timeout(
                        timeout.get("connect"), timeout.get("read"), timeout.get("pool")
                    ),
                ) as answer:
                    body = await answer.read()
            extensions: dict[str, object] = {"http_version": HTTP_1_1}
            if answer.reason:
                extensions["reason_phrase"] = answer.reason.encode()
            # A stream, not `content=`: httpx would add a Content-Length the server did not
            # send, and a response never closed has no `elapsed`.
            return httpx.Response(
                status_code=answer.status,
                headers=answer.raw_headers,
                stream=httpx.ByteStream(body),
                request=request,
                extensions=extensions,
            )


@contextmanager
def _connection_errors_told_apart(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        cause = exc.__cause__
        if isinstance(cause, aiohttp.ConnectionTimeoutError):
            raise  # ConnectTimeout: no connection within the timeout
        if isinstance(cause, aiohttp.ClientConnectorError):  # refused, unreachable, DNS
            raise httpx.ConnectError(str(exc), request=request) from cause
        raise httpx.ReadError(f"{type(cause).__name__}: {exc}", request=request) from cause


@functools.lru_cache(maxsize=512)
def _yarl_url(url: str) -> URL:
    return URL(url, encoded=True)


@functools.lru_cache(maxsize=64)
def _client_timeout(
    connect: float | None, read: float | None, pool: float | None
) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(sock_connect=connect, sock_read=read, connect=pool)
