"""One destination's HTTP session: its client (TLS settings), its authentication, and the one
repeat after a 401 that a refreshed token deserves."""

from __future__ import annotations

import functools
import logging
import os
import ssl
from typing import Any, Literal

import httpx

from edge.config.destinations import DestinationConfig
from edge.forward.auth import Authenticator, authenticator
from edge.forward.transport import SafeAiohttpTransport

log = logging.getLogger(__name__)

PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
)


def make_client(name: str, config: DestinationConfig) -> httpx.AsyncClient:
    """An HTTP client with the destination's TLS settings (verification on unless turned off,
    a plant CA bundle, a client certificate for mutual TLS)."""
    tls = config.tls
    verify: bool | ssl.SSLContext = tls.verify
    if not tls.verify:
        log.warning(
            "TLS certificate verification is OFF for destination %s: anyone on the "
            "network path can read and change what is sent",
            name,
            extra={"destination": name},
        )
    elif tls.ca_file is not None or tls.cert_file is not None:
        context = ssl.create_default_context(
            cafile=str(tls.ca_file) if tls.ca_file is not None else None
        )
        if tls.cert_file is not None and tls.key_file is not None:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        verify = context
    limits = httpx.Limits(
        max_connections=config.max_in_flight + 1, max_keepalive_connections=config.max_in_flight + 1
    )
    match config.http_transport:
        case "aiohttp":
            proxies = sorted(name for name in PROXY_VARIABLES if os.environ.get(name))
            if proxies:
                log.warning(
                    "Destination %s ignores the proxy in %s: its http_transport is "
                    "aiohttp, which does not read proxy variables; set http_transport: "
                    "httpcore to send through the proxy",
                    name,
                    ", ".join(proxies),
                    extra={"destination": name},
                )
            transport = SafeAiohttpTransport(verify=verify, limits=limits)
            return httpx.AsyncClient(transport=transport, timeout=config.timeout)
        case "httpcore":
            return httpx.AsyncClient(verify=verify, limits=limits, timeout=config.timeout)


CookieUse = Literal["kept", "none"]
"""Whether a destination's cookies are kept between requests (httpx's cookie jar): SAP's CSRF
token belongs to the session its cookies name; the canonical API carries everything a request
needs in its headers, so its profile says `none` (the others keep httpx's default, `kept`)."""


class Session:
    cookies: CookieUse = "kept"
    """Set by the profile: with `none`, a request goes from httpx's client straight to its
    transport (see `_send`)."""

    def __init__(
        self,
        config: DestinationConfig,
        client: httpx.AsyncClient,
        auth: Authenticator | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.auth = auth if auth is not None else authenticator(config.auth)
        self.base_url = config.base_url.rstrip("/")
        self._timeout = httpx.Timeout(config.timeout)
        self._timeout_extension = self._timeout.as_dict()

    def url(self, path: str) -> str:
        return (
            path
            if path.startswith(("http://", "https://"))
            else (f"{self.base_url}/{path.lstrip('/')}")
        )

    def _url(self, path: str) -> httpx.URL:
        """`url(path)` parsed: parsing a URL string is a third of what httpx spends building
        a request, and a destination sends to a handful of paths (SAP's hold ids: bounded)."""
        return _parsed_url(self.url(path))

    async def request(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send with credentials; on a 401, drop the cached token and try once more."""
        response = await self._send(method, path, headers or {}, **kwargs)
        if response.status_code == 401 and self.auth.invalidate():
            response = await self._send(method, path, headers or {}, **kwargs)
        return response

    async def _send(
        self, method: str, path: str, headers: dict[str, str], **kwargs: Any
    ) -> httpx.Response:
        credentials = await self.auth.headers(self.client)
        client = self.client
        merged = {**headers, **credentials}
        if (
            self.cookies == "kept"
            or client.auth is not None
            or client.follow_redirects
            or any(client.event_hooks.values())
        ):
            return await client.send(self._built_request(method, path, merged, kwargs))
        if kwargs.keys() <= {"content"} and not client.cookies:
            request = self._plain_request(method, path, merged, kwargs)
        else:
            request = self._built_request(method, path, merged, kwargs)
        return await _send_plain(client, request)

    def _built_request(
        self, method: str, path: str, headers: dict[str, str], kwargs: dict[str, Any]
    ) -> httpx.Request:
        return self.client.build_request(
            method, self._url(path), headers=headers, timeout=self._timeout, **kwargs
        )

    def _plain_request(
        self, method: str, path: str, headers: dict[str, str], kwargs: dict[str, Any]
    ) -> httpx.Request:
        """The request `client.build_request` makes for a body in memory (or none) and no
        cookies, made directly: the same headers in the same order (Host; the client's own,
        less those the call overrides; the call's; Content-Length), the same body and
        timeout, in a fifth of the CPU (httpx normalises and merges headers three times
        over). tests/test_session.py compares the two."""
        content = kwargs.get("content")
        if (
            (content is not None and not isinstance(content, bytes))
            or self.client.params
            or not all(isinstance(v, str) and isinstance(k, str) for k, v in headers.items())
        ):
            return self._built_request(method, path, headers, kwargs)
        url = self._url(path)
        call = [(k.encode("ascii"), v.encode("ascii")) for k, v in headers.items()]
        named = {k.lower() for k, _ in call}
        raw = [(k, v) for k, v in self.client.headers.raw if k.lower() not in named]
        raw += call
        named.update(k.lower() for k, _ in raw)
        if content and b"content-length" not in named:
            raw.append((b"Content-Length", str(len(content)).encode()))
            named.add(b"content-length")
        auto = [(b"Host", url.netloc)] if b"host" not in named and url.host else []
        if method.upper() in ("POST", "PUT", "PATCH") and not named & {
            b"content-length",
            b"transfer-encoding",
        }:
            auto.append((b"Content-Length", b"0"))
        raw = auto + raw
        request = httpx.Request(
            method,
            url,
            headers=raw,
            stream=httpx.ByteStream(content or b""),
            extensions={"timeout": dict(self._timeout_extension)},
        )
        request.read()
        return request


async def _send_plain(client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    """`AsyncClient.send` for a request that uses none of what it adds around the transport:
    no httpx auth flow (the Session adds credentials itself), no redirects followed, no event
    hooks, no cookie jar. Those cost about a fifth of the gateway's CPU per unbatched event
    (profiled: bench/forward.py, /work/notes/fwd-speed.md). The transport is the one the
    client picks for the URL (its mounts and proxies), the request and response httpx's own,
    and transport errors the same httpx errors."""
    if client.is_closed:  # as httpx says it
        raise RuntimeError("Cannot send a request, as the client has been closed.")
    transport = client._transport_for_url(request.url)
    try:
        response = await transport.handle_async_request(request)
    except httpx.RequestError as exc:
        exc.request = request  # as httpx's send attaches it
        raise
    response.request = request
    try:
        await response.aread()
    except BaseException:
        await response.aclose()
        raise
    return response


@functools.lru_cache(maxsize=512)
def _parsed_url(url: str) -> httpx.URL:
    return httpx.URL(url)
