"""A destination's HTTP session (edge/forward/session.py): a profile whose API needs no cookies
(canonical) sends through httpx's transport without the client's cookie jar; one that does
(SAP's CSRF token lives in a session cookie) keeps them; and anything configured on the client
that the short path would skip (event hooks) sends it the long way. The oracle is what a real
HTTP server on loopback (aiohttp's) received, not the session's own bookkeeping."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from buffer.outbox import Delivery
from edge.config.destinations import DestinationConfig
from edge.forward.auth import StaticHeader
from edge.forward.outcome import Outcome
from edge.forward.profiles import create_profile
from edge.forward.session import Session, make_client


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """An HTTP server that hands out a session cookie and records each request's headers
    (names in lower case: HTTP's are case-insensitive)."""
    seen: list[dict[str, str]] = []

    async def take(request: web.Request) -> web.Response:
        await request.read()
        seen.append({name.lower(): value for name, value in request.headers.items()})
        response = web.json_response({"reference": f"R-{len(seen)}"}, status=201)
        response.set_cookie("SAP_SESSIONID_S4H_100", "session-1")
        return response

    async def take_batch(request: web.Request) -> web.Response:
        """A receiver that answers a batch with one object (`?answer=object`), or with a
        per-event list that leaves out the last event."""
        events = await request.json()
        seen.append({name.lower(): value for name, value in request.headers.items()})
        if request.query.get("answer") == "object":
            return web.json_response({"reference": "BATCH-1"}, status=201)
        return web.json_response(
            [{"id": e["id"], "status": 201, "reference": f"R-{e['id']}"} for e in events[:-1]]
        )

    app = web.Application()
    app.router.add_post("/api/events", take)
    app.router.add_post("/api/events:batch", take_batch)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


def destination(url: str, profile: str = "canonical") -> DestinationConfig:
    return DestinationConfig.model_validate(
        {"base_url": url, "path": "/api/events", "profile": profile, "timeout": "5s"}
    )


async def post_twice(session: Session) -> list[httpx.Response]:
    return [
        await session.request(
            "POST", "/api/events", content=b"{}", headers={"Idempotency-Key": f'"ev-{n}"'}
        )
        for n in range(2)
    ]


@pytest.mark.parametrize("transport", ["aiohttp", "httpcore"])
async def test_the_canonical_profile_sends_no_cookie_back_and_a_cookie_session_does(
    receiver: tuple[str, list[dict[str, str]]], transport: str
) -> None:
    url, seen = receiver
    config = DestinationConfig.model_validate(
        {**destination(url).model_dump(), "http_transport": transport}
    )
    async with make_client("erp", config) as client:
        session = Session(config, client, StaticHeader("Authorization", "Bearer t0ken"))
        create_profile(config, session)  # the canonical profile says: no cookies
        plain = await post_twice(session)
    async with make_client("erp", config) as client:
        kept = await post_twice(Session(config, client))  # a session keeps them (SAP's case)
    assert [r.status_code for r in (*plain, *kept)] == [201] * 4
    assert [r.json()["reference"] for r in plain] == ["R-1", "R-2"]
    assert plain[0].request.url == f"{url}/api/events"  # the response knows its request
    assert ["cookie" in headers for headers in seen] == [False, False, False, True]
    assert seen[3]["cookie"] == "SAP_SESSIONID_S4H_100=session-1"
    for headers in seen[:2]:  # what the client adds on the short path too
        assert headers["idempotency-key"].startswith('"ev-')
        assert headers["authorization"] == "Bearer t0ken"
        assert headers["user-agent"].startswith("python-httpx/")
        assert headers["content-length"] == "2"


async def test_a_client_with_event_hooks_sends_the_long_way(
    receiver: tuple[str, list[dict[str, str]]],
) -> None:
    """Event hooks are httpx client machinery the short path skips: with any configured, the
    session sends through `AsyncClient.send`, and the hooks see every request."""
    url, seen = receiver
    config = destination(url)
    hooked: list[str] = []

    async def on_request(request: httpx.Request) -> None:
        hooked.append(request.headers["Idempotency-Key"])

    async with httpx.AsyncClient(event_hooks={"request": [on_request]}) as client:
        session = Session(config, client)
        create_profile(config, session)
        await post_twice(session)
    assert hooked == ['"ev-0"', '"ev-1"']
    assert len(seen) == 2


async def test_a_refused_connection_on_the_short_path_is_the_same_httpx_error() -> None:
    async with make_client("erp", destination("http://127.0.0.1:9")) as client:
        session = Session(destination("http://127.0.0.1:9"), client)
        create_profile(session.config, session)
        with pytest.raises(httpx.ConnectError) as raised:
            await session.request("POST", "/api/events", content=b"{}")
        # As httpx's own send: the error names the request it failed.
        assert raised.value.request.url == "http://127.0.0.1:9/api/events"


async def test_a_batch_answer_counts_per_event_or_for_the_whole_batch(
    receiver: tuple[str, list[dict[str, str]]],
) -> None:
    """A per-event list gives each event its own outcome (one it leaves out is retried, and may
    have arrived); any other 2xx body counts for the whole batch, with its reference."""
    url, _ = receiver
    deliveries = [
        Delivery(n, "erp", f"ev-{n}", "production.confirmation", "K", b'{"id":"ev-%d"}' % n, 0)
        for n in range(3)
    ]
    outcomes = {}
    for answer in ("list", "object"):
        config = DestinationConfig.model_validate(
            {
                "base_url": url,
                "path": "/api/events",
                "batch_path": f"/api/events:batch?answer={answer}",
                "batch_size": 3,
            }
        )
        async with make_client("erp", config) as client:
            profile = create_profile(config, Session(config, client))
            outcomes[answer] = await profile.send(deliveries)
    listed = outcomes["list"]
    assert [(r.outcome, r.reference) for r in listed[:2]] == [
        (Outcome.DELIVERED, "R-ev-0"),
        (Outcome.DELIVERED, "R-ev-1"),
    ]
    assert (listed[2].outcome, listed[2].ambiguous, listed[2].status) == (Outcome.RETRY, True, 200)
    assert [(r.outcome, r.reference, r.status) for r in outcomes["object"]] == [
        (Outcome.DELIVERED, "BATCH-1", 201)
    ] * 3


@pytest.mark.parametrize(
    ("method", "path", "headers", "kwargs"),
    [
        ("POST", "/api/events", {"Idempotency-Key": '"ev-1"'}, {"content": b'{"a": 1}'}),
        ("POST", "/api/events", {"user-agent": "plant/1", "ACCEPT": "x/y"}, {"content": b"{}"}),
        ("POST", "/api/events", {}, {"content": b""}),
        ("POST", "/api/events", {}, {}),
        ("PUT", "/api/x", {"Content-Length": "3"}, {"content": b"abc"}),
        ("PATCH", "/api/x", {"Transfer-Encoding": "chunked"}, {}),
        ("get", "/api/events?since=1", {"Authorization": "Bearer t"}, {}),
        ("DELETE", "https://other.example:8443/z", {"Host": "erp.example"}, {}),
    ],
)
async def test_the_short_request_is_the_one_httpx_builds(
    method: str, path: str, headers: dict[str, str], kwargs: dict[str, bytes]
) -> None:
    """The short path makes its request itself (edge/forward/session.py, `_plain_request`):
    httpx's own `build_request` is the oracle, header for header in order, body, timeout."""
    config = destination("http://erp.example:8080/base")
    async with httpx.AsyncClient(timeout=config.timeout) as client:
        session = Session(config, client)
        ours = session._plain_request(method, path, dict(headers), dict(kwargs))
        theirs = client.build_request(
            method, session._url(path), headers=headers, timeout=session._timeout, **kwargs
        )
    assert (ours.method, ours.url) == (theirs.method, theirs.url)
    assert ours.headers.raw == theirs.headers.raw
    assert ours.content == theirs.content
    assert ours.extensions == theirs.extensions


async def test_a_header_httpx_cannot_encode_fails_the_same_on_the_short_path() -> None:
    config = destination("http://erp.example")
    async with httpx.AsyncClient() as client:
        session = Session(config, client)
        with pytest.raises(UnicodeEncodeError):
            client.build_request("POST", session._url("/e"), headers={"X-Lot": "Lös"})
        with pytest.raises(UnicodeEncodeError):
            session._plain_request("POST", "/e", {"X-Lot": "Lös"}, {"content": b"{}"})


async def test_what_the_short_request_does_not_make_itself_httpx_builds() -> None:
    """A client with query params of its own, a header value in bytes: the short path hands
    them to httpx's `build_request`, so the request is still the one httpx builds."""
    config = destination("http://erp.example")
    async with httpx.AsyncClient(params={"sap-client": "100"}) as client:
        session = Session(config, client)
        ours = session._plain_request("POST", "/e", {"X-A": "1"}, {"content": b"{}"})
        theirs = client.build_request(
            "POST",
            session._url("/e"),
            headers={"X-A": "1"},
            timeout=session._timeout,
            content=b"{}",
        )
        assert ours.url == theirs.url == "http://erp.example/e?sap-client=100"
    async with httpx.AsyncClient() as client:
        session = Session(config, client)
        given: dict[str, Any] = {"X-B": b"raw"}
        ours = session._plain_request("POST", "/e", given, {"content": b"{}"})
        theirs = client.build_request(
            "POST", session._url("/e"), headers=given, timeout=session._timeout, content=b"{}"
        )
    assert ours.headers.raw == theirs.headers.raw
