"""The aiohttp transport under httpx's API (edge/forward/transport.py), against real sockets on
loopback: what reaches the forwarder when a connection fails must say whether the request can
have arrived. The oracle is what the server side did (never accepted, or read the request and
hung up), not the transport's own mapping."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from edge.config.destinations import DestinationConfig
from edge.forward.outcome import Outcome, transport_failure
from edge.forward.session import make_client


def config(url: str, transport: str = "aiohttp") -> DestinationConfig:
    return DestinationConfig.model_validate(
        {"base_url": url, "http_transport": transport, "timeout": "5s"}
    )


async def post(url: str, transport: str = "aiohttp") -> httpx.HTTPError:
    async with make_client("erp", config(url, transport)) as client:
        try:
            await client.post(f"{url}/api/events", content=b"{}")
        except httpx.HTTPError as exc:
            return exc
    raise AssertionError("the request did not fail")


async def test_a_refused_connection_is_a_connect_error_and_unambiguous() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for transport in ("aiohttp", "httpcore"):
        error = await post(f"http://127.0.0.1:{port}", transport)
        assert isinstance(error, httpx.ConnectError), (transport, error)
        assert transport_failure(error, 5.0).ambiguous is False


async def test_a_server_that_read_the_request_and_hung_up_is_ambiguous() -> None:
    """httpx-aiohttp maps aiohttp's ServerDisconnectedError to ConnectTimeout; the request had
    arrived (the server read it), so the forwarder must be told it may have the event."""
    received: list[bytes] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        for transport in ("aiohttp", "httpcore"):
            error = await post(f"http://127.0.0.1:{port}", transport)
            assert not isinstance(error, httpx.ConnectError | httpx.ConnectTimeout), (
                transport,
                error,
            )
            result = transport_failure(error, 5.0)
            assert (result.outcome, result.ambiguous) == (Outcome.RETRY, True), transport
    assert len(received) == 2 and all(r.startswith(b"POST /api/events") for r in received)


def test_a_proxy_in_the_environment_is_named_when_the_transport_ignores_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.plant:3128")
    make_client("erp", config("https://erp.example"))
    assert "ignores the proxy in HTTPS_PROXY" in caplog.text
    caplog.clear()
    make_client("erp", config("https://erp.example", "httpcore"))
    assert "proxy" not in caplog.text


async def test_an_answer_reads_the_same_on_both_transports() -> None:
    """The aiohttp transport reads an answer whole inside itself (edge/forward/transport.py);
    what the forwarder gets must be what httpx's own transport gives: status, reason, headers,
    a gzip body decoded, a chunked one joined, an empty one empty, and the request that was
    sent (method, URL with its query, body and headers as the server saw them)."""
    import gzip
    import json

    from aiohttp import web

    seen: list[tuple[str, str, bytes, str]] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.append((request.method, request.path_qs, body, request.headers["X-Trace"]))
        kind = request.query["kind"]
        if kind == "gzip":
            return web.Response(
                body=gzip.compress(json.dumps({"reference": "G-1"}).encode()),
                status=201,
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
            )
        if kind == "chunked":
            response = web.StreamResponse(status=202, reason="Taken Later")
            response.enable_chunked_encoding()
            await response.prepare(request)
            for part in (b'{"refer', b'ence": "C-', b'1"}'):
                await response.write(part)
            await response.write_eof()
            return response
        return web.Response(status=204, headers={"X-Reference": "E-1"})

    app = web.Application()
    app.router.add_route("*", "/api/{name}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    got: dict[str, list[tuple[object, ...]]] = {}
    try:
        for transport in ("aiohttp", "httpcore"):
            async with make_client("erp", config(url, transport)) as client:
                for kind in ("gzip", "chunked", "empty"):
                    response = await client.post(
                        f"{url}/api/events?kind={kind}&n=1",
                        content=b'{"id": "ev-1"}',
                        headers={"X-Trace": f"{transport}-{kind}"},
                    )
                    got.setdefault(transport, []).append(
                        (
                            response.status_code,
                            response.reason_phrase,
                            response.content,
                            response.headers.get("content-type"),
                            response.headers.get("x-reference"),
                            response.headers.get("content-length"),
                            response.elapsed is not None,
                            str(response.request.url),
                        )
                    )
    finally:
        await runner.cleanup()
    assert got["aiohttp"] == got["httpcore"]
    assert [row[:3] for row in got["aiohttp"]] == [
        (201, "Created", b'{"reference": "G-1"}'),
        (202, "Taken Later", b'{"reference": "C-1"}'),
        (204, "No Content", b""),
    ]
    assert [s[:3] for s in seen] == [
        ("POST", f"/api/events?kind={kind}&n=1", b'{"id": "ev-1"}')
        for kind in ("gzip", "chunked", "empty")
    ] * 2
    assert [s[3] for s in seen] == [
        f"{t}-{k}" for t in ("aiohttp", "httpcore") for k in ("gzip", "chunked", "empty")
    ]
