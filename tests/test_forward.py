"""The forwarder against the real ERP simulator: outcome per response class, Retry-After, and
dead letters that keep the response body."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from buffer.outbox import Outbox, OutboxEvent
from edge.config.destinations import DestinationConfig
from edge.forward import HttpForwarder, Outcome, classify, parse_retry_after
from tests.conftest import ErpSim

pytestmark = pytest.mark.integration


def payload(n: int) -> OutboxEvent:
    body = (
        f'{{"specversion":"1.0","id":"ev-{n}","source":"urn:test","type":'
        f'"production.confirmation","subject":"1000123/0010","partitionkey":"1000123",'
        f'"sequence":"{n:020d}","data":{{"n":{n}}}}}'
    )
    return OutboxEvent(
        id=f"ev-{n}",
        type="production.confirmation",
        partition_key="1000123",
        payload=body.encode(),
        destinations=("erp",),
    )


def test_responses_map_to_outcomes() -> None:
    request = httpx.Request("POST", "http://x")

    def outcome(status: int, **headers: str) -> Outcome:
        return classify(httpx.Response(status, headers=headers, request=request)).outcome

    assert outcome(201) is Outcome.DELIVERED
    for status in (408, 409, 425, 429, 500, 502, 503):
        assert outcome(status) is Outcome.RETRY
    for status in (400, 401, 403, 404, 410, 422):
        assert outcome(status) is Outcome.REJECTED
    response = httpx.Response(429, headers={"Retry-After": "7"}, request=request)
    assert parse_retry_after(response) == 7
    dated = httpx.Response(
        503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, request=request
    )
    assert parse_retry_after(dated, now=1445412470.0) == pytest.approx(10.0)


async def drain(outbox: Outbox, forwarder: HttpForwarder, until: float = 10.0) -> None:
    import asyncio

    async with asyncio.TaskGroup() as group:
        task = group.create_task(forwarder.run(), name="forward")
        deadline = time.monotonic() + until
        while time.monotonic() < deadline:
            counts = (await outbox.counts()).get("erp")
            if counts is None or counts.pending == 0:
                break
            await asyncio.sleep(0.05)
        forwarder.drain()
        await task


async def drain_batched(outbox: Outbox, base_url: str) -> HttpForwarder:
    """Drain `outbox` to a canonical batch endpoint, 10 per request, retries 50 ms apart."""
    import asyncio

    from edge.config.base import RetryPolicy

    config = DestinationConfig(
        base_url=base_url,
        path="/api/events",
        batch_path="/api/events:batch",
        batch_size=10,
        retry=RetryPolicy(base="50ms", cap="50ms"),
    )
    forwarder = HttpForwarder("erp", config, outbox)
    await asyncio.wait_for(drain(outbox, forwarder), 20)
    return forwarder


async def test_delivers_in_order_with_idempotency_keys(erp_sim: ErpSim, tmp_path: Path) -> None:
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        await outbox.commit([payload(n) for n in range(20)])
        config = DestinationConfig(base_url=erp_sim.url, path="/api/events")
        async with httpx.AsyncClient() as client:
            await drain(outbox, HttpForwarder("erp", config, outbox, client))
        held = erp_sim.events()
        assert [e["key"] for e in held] == [f"ev-{n}" for n in range(20)]  # commit order
        journal = await outbox.journal()
        assert [j["reference"] for j in journal][:2] == ["ERP-000001", "ERP-000002"]


async def test_a_400_is_dead_lettered_with_the_body_and_the_key_moves_on(
    erp_sim: ErpSim, tmp_path: Path
) -> None:
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        await outbox.commit(
            [
                OutboxEvent(
                    id="broken",
                    type="production.confirmation",
                    partition_key="1000123",
                    payload=b"{not json",
                    destinations=("erp",),
                ),
                payload(1),
            ]
        )
        config = DestinationConfig(base_url=erp_sim.url, path="/api/events")
        async with httpx.AsyncClient() as client:
            await drain(outbox, HttpForwarder("erp", config, outbox, client))
        (dead,) = await outbox.dead_letters()
        assert dead["id"] == "broken" and dead["last_status"] == 400
        assert "JSON" in dead["last_error"] or "json" in dead["last_error"]
        assert [e["key"] for e in erp_sim.events()] == ["ev-1"]


async def test_429_retry_after_is_honoured_and_persisted(erp_sim: ErpSim, tmp_path: Path) -> None:
    erp_sim.set_faults(error_rate=1.0, error_status=429, retry_after=30)
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        await outbox.commit([payload(1)])
        config = DestinationConfig.model_validate(
            {
                "base_url": erp_sim.url,
                "path": "/api/events",
                "retry": {"base": "100ms", "cap": "1m"},
            }
        )
        async with httpx.AsyncClient() as client:
            await drain(outbox, HttpForwarder("erp", config, outbox, client), until=1.0)
    # The schedule is on disk: a restart does not hammer the target.
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        due = await outbox.next_due("erp")
        assert due is not None and due > time.time() + 25
        assert await outbox.lease("erp", 10) == []
        counts = (await outbox.counts())["erp"]
        assert (counts.pending, counts.retrying) == (1, 1)


async def test_connection_refused_is_retried(tmp_path: Path) -> None:
    from tests.conftest import free_port

    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        await outbox.commit([payload(1)])
        config = DestinationConfig(base_url=f"http://127.0.0.1:{free_port()}", path="/api/events")
        async with httpx.AsyncClient() as client:
            forwarder = HttpForwarder("erp", config, outbox, client)
            await drain(outbox, forwarder, until=0.5)
        assert forwarder.health.reachable is False
        assert "ConnectError" in (forwarder.health.last_error or "")
        assert (await outbox.counts())["erp"].pending == 1


async def test_a_burst_on_one_order_goes_in_few_ordered_batches(
    erp_sim: ErpSim, tmp_path: Path
) -> None:
    """Issue 17 item 2: the canonical batch is an ordered array, so 250 events of one order go
    in 3 requests of up to 100, in commit order, instead of 250 one at a time. The oracle is
    the receiver's own arrival order and its request count."""
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        await outbox.commit([payload(n) for n in range(250)])
        config = DestinationConfig(
            base_url=erp_sim.url,
            path="/api/events",
            batch_path="/api/events:batch",
            batch_size=100,
            max_in_flight=4,
        )
        forwarder = HttpForwarder("erp", config, outbox)
        await drain(outbox, forwarder)
        held = erp_sim.events()
        assert [e["key"] for e in held] == [f"ev-{n}" for n in range(250)]  # commit order
        assert forwarder.health.requests == 3 and forwarder.health.delivered == 250
        assert (await outbox.counts()) == {}


async def test_a_rejected_event_in_a_run_is_dead_lettered_and_the_rest_delivered(
    erp_sim: ErpSim, tmp_path: Path
) -> None:
    """Per-event outcomes of one key's run in one batch: the receiver refuses an invalid
    event (400), takes the others; the refused one goes to dead letters, its key moves on."""
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        events = [payload(n) for n in range(5)]
        broken = OutboxEvent(
            id="ev-2",
            type="production.confirmation",
            partition_key="1000123",
            payload=b'{"id":"ev-2"}',
            destinations=("erp",),
        )
        await outbox.commit([*events[:2], broken, *events[3:]])
        config = DestinationConfig(
            base_url=erp_sim.url, path="/api/events", batch_path="/api/events:batch", batch_size=10
        )
        forwarder = HttpForwarder("erp", config, outbox)
        await drain(outbox, forwarder)
        assert [e["key"] for e in erp_sim.events()] == ["ev-0", "ev-1", "ev-3", "ev-4"]
        assert forwarder.health.requests == 1
        (dead,) = await outbox.dead_letters()
        assert dead["id"] == "ev-2" and "400" in str(dead["last_status"])
        assert [j["event_id"] for j in await outbox.journal()] == ["ev-0", "ev-1", "ev-3", "ev-4"]


async def test_a_batch_answer_with_a_status_that_is_no_status_retries_those_events(
    tmp_path: Path,
) -> None:
    """A receiver whose per-event list says "ok", null, 2.5, a superscript two or full-width digits
    where an HTTP status belongs: those events are tried again (the answer may mean they were
    taken), the others are settled as said, and the forwarder goes on. A reference that is an
    object or a list is dropped, a number kept as text: the journal stores text, and a value
    it could not store undid the whole settle. Both used to end the daemon (int() raised, the
    settle's binding raised), again at every restart. The receiver's own log is the oracle."""
    import json

    from aiohttp import web

    got: list[list[str]] = []
    odd = {"ev-1": "ok", "ev-2": None, "ev-3": 2.5, "ev-5": "\u00b2", "ev-6": "\uff12\uff10\uff10"}
    references = {"ev-0": {"doc": "4711"}, "ev-4": 4711, "ev-7": ["x"]}

    async def answer(request: web.Request) -> web.Response:
        ids = [event["id"] for event in json.loads(await request.read())]
        got.append(ids)
        return web.json_response(
            [
                {
                    "id": i,
                    "status": odd.get(i, "201" if i == "ev-4" else 201) if len(got) == 1 else 201,
                    "reference": references.get(i, f"R-{i}"),
                }
                for i in ids
            ]
        )

    app = web.Application()
    app.router.add_post("/api/events:batch", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with Outbox.open(tmp_path / "outbox.db") as outbox:
            await outbox.commit([payload(n) for n in range(8)])
            await drain_batched(outbox, f"http://127.0.0.1:{runner.addresses[0][1]}")
            journal = {
                j["event_id"]: (j["attempts"], j["reference"]) for j in await outbox.journal()
            }
            assert await outbox.dead_letters() == []
    finally:
        await runner.cleanup()
    assert got == [[f"ev-{n}" for n in range(8)], ["ev-1", "ev-2", "ev-3", "ev-5", "ev-6"]]
    # One key: of its retries in one settle only the first counts an attempt (settle.py).
    assert journal == {
        "ev-0": (1, None),
        "ev-1": (2, "R-ev-1"),
        "ev-2": (1, "R-ev-2"),
        "ev-3": (1, "R-ev-3"),
        "ev-4": (1, "4711"),
        "ev-5": (1, "R-ev-5"),
        "ev-6": (1, "R-ev-6"),
        "ev-7": (1, None),
    }


async def test_a_profile_that_fails_on_an_answer_retries_the_request_and_goes_on(
    tmp_path: Path,
    erp_sim: ErpSim,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A profile's failure (here made to happen, as a receiver's answer no longer can in the
    canonical profile) costs the request a retry, logged, never the daemon."""

    from edge.forward.profiles import canonical

    failures = iter([RuntimeError("boom")])
    read = canonical._per_event

    def flaky(response: httpx.Response, deliveries: object) -> object:
        for failure in failures:
            raise failure
        return read(response, deliveries)  # type: ignore[arg-type]

    monkeypatch.setattr(canonical, "_per_event", flaky)
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        await outbox.commit([payload(n) for n in range(3)])
        forwarder = await drain_batched(outbox, erp_sim.url)
        assert [j["event_id"] for j in await outbox.journal()] == ["ev-0", "ev-1", "ev-2"]
    assert forwarder.health.requests == 2
    assert "its profile failed on a request of 3 event(s)" in caplog.text
    assert [e["key"] for e in erp_sim.events()] == ["ev-0", "ev-1", "ev-2"]  # taken once each
