"""What carries a destination's requests under httpx's API: aiohttp's connection pool and HTTP
parser (the `httpx-aiohttp` transport) or httpx's own httpcore, by `http_transport`.

Measured on the gateway's 2-core hardware with `bench/forward.py` (same run, 4 in flight, the
ERP simulator on loopback): httpx on httpcore makes about 900 POSTs/s, on aiohttp about 2,000,
bare aiohttp about 2,500; a forwarder's rate follows its client's, so aiohttp is the default.
The code keeps httpx's API (requests, responses, errors, timeouts), so profiles do not change.

One thing is corrected on the way: `httpx-aiohttp` maps every aiohttp connection error to
`httpx.ConnectTimeout`, including a server that closed the connection after it got the request
(`ServerDisconnectedError`) or a reset while the answer was awaited. The outcome of such a
failure must say "the target may have the event" (`Result.ambiguous`) and the technician must
read what happened, not "connect timeout": here only a failure to connect stays a connect
error (`ConnectError`, or `ConnectTimeout` for a connection not made in time); everything
else becomes `httpx.ReadError`, named after aiohttp's error.
"""

from __future__ import annotations

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport


class SafeAiohttpTransport(AiohttpTransport):
    """`httpx-aiohttp`'s transport, with connection errors told apart (see the module doc)."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            cause = exc.__cause__
            if isinstance(cause, aiohttp.ConnectionTimeoutError):
                raise  # ConnectTimeout: no connection within the timeout
            if isinstance(cause, aiohttp.ClientConnectorError):  # refused, unreachable, DNS
                raise httpx.ConnectError(str(exc), request=request) from cause
            raise httpx.ReadError(f"{type(cause).__name__}: {exc}", request=request) from cause
