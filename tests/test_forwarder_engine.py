"""The forwarder engine's own arithmetic, by hand: the rate limit's token bucket (at most
`rate` events per second, bursts of one second's worth, a batch larger than a second's worth
sent once the bucket is full)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from buffer.outbox import Delivery
from edge.forward.forwarder import TokenBucket, pack_runs


async def test_a_full_bucket_lets_one_seconds_worth_through_at_once() -> None:
    bucket = TokenBucket(100.0)
    started = time.monotonic()
    await bucket.take(100)
    assert time.monotonic() - started < 0.05
    assert bucket.tokens == pytest.approx(0.0, abs=1.0)


async def test_then_it_refills_at_the_rate() -> None:
    bucket = TokenBucket(100.0)
    await bucket.take(100)
    started = time.monotonic()
    await bucket.take(30)  # 30 tokens at 100/s: 0.3 s
    waited = time.monotonic() - started
    assert 0.28 <= waited < 1.0, waited
    await bucket.take(1)
    assert time.monotonic() - started >= 0.3


async def test_a_batch_larger_than_the_rate_waits_for_a_full_bucket_only() -> None:
    bucket = TokenBucket(10.0)
    await bucket.take(10)
    started = time.monotonic()
    await bucket.take(25)  # cannot ever hold 25: goes once the bucket is full (1 s)
    waited = time.monotonic() - started
    assert 0.95 <= waited < 2.0, waited
    assert bucket.tokens == pytest.approx(-15.0, abs=0.5)  # in debt: the next ones wait
    started = time.monotonic()
    await bucket.take(1)
    assert time.monotonic() - started >= 1.5  # 16 tokens at 10/s


async def test_tokens_never_pile_up_beyond_one_seconds_worth() -> None:
    bucket = TokenBucket(50.0)
    bucket.updated -= 10.0  # idle for ten seconds
    await bucket.take(1)
    assert bucket.tokens == pytest.approx(49.0, abs=0.5)


@pytest.mark.integration
async def test_an_open_circuit_waits_without_spinning(peers: Any, tmp_path: Path) -> None:
    """While the circuit is open the forwarder sleeps until its probe: it neither burns the
    CPU nor starves the event loop (a wake left set once made it spin, then freeze)."""
    from buffer.outbox import Outbox, OutboxEvent
    from edge.config.destinations import DestinationConfig
    from edge.forward import Circuit, HttpForwarder
    from tests.conftest import start_erp

    erp = start_erp(peers, tmp_path)
    erp.set_faults(outage_seconds=60, retry_after=0)
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        await outbox.commit(
            [
                OutboxEvent(f"ev-{n}", "production.confirmation", f"K{n}", b"{}", ("erp",))
                for n in range(3)
            ]
        )
        forwarder = HttpForwarder(
            "erp",
            DestinationConfig.model_validate(
                {
                    "base_url": erp.url,
                    "path": "/api/events",
                    "retry": {"base": "10ms", "cap": "50ms"},
                    "circuit_breaker": {"failures": 1, "open_for": "3s"},
                }
            ),
            outbox,
        )
        async with asyncio.TaskGroup() as group:
            task = group.create_task(forwarder.run(), name="forward")
            deadline = time.monotonic() + 10
            while forwarder.health.circuit is not Circuit.OPEN:
                assert time.monotonic() < deadline, "the circuit never opened"
                await asyncio.sleep(0.01)
            cpu, wall = time.process_time(), time.monotonic()
            ticks = 0
            while time.monotonic() - wall < 1.0:
                await asyncio.sleep(0.01)
                ticks += 1
            busy = time.process_time() - cpu
            forwarder.drain()
            await asyncio.wait_for(task, 10)
    assert forwarder.health.circuit is Circuit.OPEN
    assert ticks > 50, f"the event loop was starved: {ticks} ticks of 10 ms in a second"
    assert busy < 0.3, f"{busy:.2f}s of CPU in one second of an open circuit"


def test_requests_keep_each_keys_run_whole() -> None:
    """Two requests in flight with events of one key could arrive in either order: a run is
    never split across requests, and a request holds at most batch_size deliveries."""

    def run(key: str, first: int, count: int) -> list[Delivery]:
        return [
            Delivery(seq, "erp", f"ev-{seq}", "t", key, b"{}", 0)
            for seq in range(first, first + count)
        ]

    leased = [*run("a", 1, 3), *run("b", 10, 2), *run("c", 20, 4), *run("d", 30, 1)]
    batches = pack_runs(leased, 5)
    assert [[d.seq for d in batch] for batch in batches] == [
        [1, 2, 3, 10, 11],
        [20, 21, 22, 23, 30],
    ]
    assert [[d.seq for d in b] for b in pack_runs(leased, 4)] == [
        [1, 2, 3],
        [10, 11],
        [20, 21, 22, 23],
        [30],
    ]
    assert pack_runs([], 4) == []
