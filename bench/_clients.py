"""The bare HTTP client loops the forwarder benchmark measures against: the same payloads and
headers POSTed one per request by `in_flight` tasks, through each Python HTTP client worth
considering, so that the forwarder's ratio is to the fastest of them, not to one picked in
advance. The leading underscore keeps `bench/run.py` from taking this module for a benchmark.

- `httpx`: httpx's own transport (httpcore), HTTP/1.1, one connection per request in flight;
- `httpx_h2`: httpx over HTTP/2 (the `h2` package), every request a stream of one connection;
- `httpx_aiohttp`: httpx's API on aiohttp's connection pool and parser (`httpx-aiohttp`);
- `aiohttp`: aiohttp's own API, nothing on top.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import aiohttp
import httpx
from _common import Phase
from httpx_aiohttp import AiohttpTransport

from buffer.outbox import OutboxEvent

HTTPX_CLIENTS = ("httpx", "httpx_h2", "httpx_aiohttp")
CLIENTS = (*HTTPX_CLIENTS, "aiohttp")


def httpx_client(name: str, in_flight: int, timeout: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=in_flight + 1, max_keepalive_connections=in_flight + 1)
    match name:
        case "httpx":
            return httpx.AsyncClient(limits=limits, timeout=timeout)
        case "httpx_h2":
            # Clear-text HTTP/2 by prior knowledge: the bench's receiver listens on loopback.
            return httpx.AsyncClient(http1=False, http2=True, limits=limits, timeout=timeout)
        case "httpx_aiohttp":
            return httpx.AsyncClient(transport=AiohttpTransport(limits=limits), timeout=timeout)
    raise ValueError(f"no httpx client {name!r}")


def _headers(event: OutboxEvent) -> dict[str, str]:
    return {"Content-Type": "application/cloudevents+json", "Idempotency-Key": event.id}


async def bare_loop(
    name: str,
    url: str,
    events: Sequence[OutboxEvent],
    *,
    in_flight: int,
    request_timeout: float,
    time_limit: float,
) -> Phase:
    """POST `events` one per request through client `name`, `in_flight` at once; fails on any
    answer but 201/200."""
    work = iter(events)
    deadline = time.perf_counter() + time_limit
    done = 0

    def check(status: int, event: OutboxEvent) -> None:
        nonlocal done
        if status not in (200, 201):
            raise RuntimeError(f"{name}: POST of {event.id} answered {status}")
        done += 1

    async def with_httpx(client: httpx.AsyncClient) -> None:
        for event in work:
            response = await client.post(url, content=event.payload, headers=_headers(event))
            check(response.status_code, event)
            if time.perf_counter() > deadline:
                return

    async def with_aiohttp(session: aiohttp.ClientSession) -> None:
        for event in work:
            async with session.post(url, data=event.payload, headers=_headers(event)) as answer:
                await answer.read()
                check(answer.status, event)
            if time.perf_counter() > deadline:
                return

    started = 0.0
    if name == "aiohttp":
        connector = aiohttp.TCPConnector(limit=in_flight + 1)
        limit = aiohttp.ClientTimeout(total=request_timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=limit) as session:
            started = time.perf_counter()
            async with asyncio.TaskGroup() as tasks:
                for number in range(in_flight):
                    tasks.create_task(with_aiohttp(session), name=f"bench-{name}-{number}")
            seconds = time.perf_counter() - started
    else:
        async with httpx_client(name, in_flight, request_timeout) as client:
            started = time.perf_counter()
            async with asyncio.TaskGroup() as tasks:
                for number in range(in_flight):
                    tasks.create_task(with_httpx(client), name=f"bench-{name}-{number}")
            seconds = time.perf_counter() - started
    return Phase(done, seconds, done < len(events), done)
