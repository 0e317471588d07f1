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


class ReadsHeldAfterTheFirst:
    """The outbox, its leases after the first held until `release` (a slow disk, a read queued
    behind others); everything else goes straight to it."""

    def __init__(self, outbox: Any) -> None:
        self._outbox = outbox
        self.holding = asyncio.Event()
        self._released = asyncio.Event()
        self._leases = 0

    def release(self) -> None:
        self._released.set()

    def listener(self) -> asyncio.Event:
        return self._outbox.listener()  # type: ignore[no-any-return]

    async def lease(
        self, destination: str, limit: int, *, busy_keys: Any = (), per_key: int = 1
    ) -> list[Delivery]:
        self._leases += 1
        leased: list[Delivery] = await self._outbox.lease(
            destination, limit, busy_keys=busy_keys, per_key=per_key
        )
        if self._leases > 1 and not self._released.is_set():
            self.holding.set()
            await self._released.wait()
        return leased

    async def next_due(self, destination: str) -> float | None:
        return await self._outbox.next_due(destination)  # type: ignore[no-any-return]

    async def settle(self, settlements: Any, *, others_follow: bool = False) -> None:
        await self._outbox.settle(settlements, others_follow=others_follow)

    async def ack(
        self, delivery: Delivery, *, status: int | None, reference: str | None = None
    ) -> None:
        await self._outbox.ack(delivery, status=status, reference=reference)

    async def retry(self, delivery: Delivery, *, at: float, status: int | None, error: str) -> None:
        await self._outbox.retry(delivery, at=at, status=status, error=error)

    async def dead_letter(self, delivery: Delivery, *, status: int | None, reason: str) -> None:
        await self._outbox.dead_letter(delivery, status=status, reason=reason)


@pytest.mark.integration
async def test_a_freed_slot_sends_the_next_leased_request_while_a_read_is_pending(
    peers: Any, tmp_path: Path
) -> None:
    """Issue 17 item 1: a request that got its answer starts the next one already leased; it
    does not wait for the lease loop, which may be awaiting an outbox read (that wait left the
    slot empty a quarter of the time in bench/forward.py). One request in flight, reads after
    the first held: the ERP must receive the third event while the second read still waits.
    The oracle is the ERP simulator's own record of what it received."""
    from buffer.outbox import Outbox, OutboxEvent
    from edge.config.destinations import DestinationConfig
    from edge.forward import HttpForwarder
    from tests.conftest import start_erp

    erp = start_erp(peers, tmp_path)
    body = (
        '{{"specversion":"1.0","id":"ev-{n}","source":"urn:test",'
        '"type":"production.confirmation","partitionkey":"K{n}","data":{{}}}}'
    )
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        await outbox.commit(
            [
                OutboxEvent(
                    f"ev-{n}",
                    "production.confirmation",
                    f"K{n}",
                    body.format(n=n).encode(),
                    ("erp",),
                )
                for n in range(6)
            ]
        )
        reads = ReadsHeldAfterTheFirst(outbox)
        forwarder = HttpForwarder(
            "erp",
            DestinationConfig.model_validate(
                {"base_url": erp.url, "path": "/api/events", "max_in_flight": 1}
            ),
            reads,
        )
        async with asyncio.TaskGroup() as group:
            task = group.create_task(forwarder.run(), name="forward")
            await asyncio.wait_for(reads.holding.wait(), 10)
            deadline = time.monotonic() + 10
            received: list[dict[str, object]] = []
            while len(received) < 3 and time.monotonic() < deadline:
                received = await asyncio.to_thread(erp.events)
                await asyncio.sleep(0.02)
            held_back = len(received)
            reads.release()
            while forwarder.health.delivered < 6 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            forwarder.drain()
            await asyncio.wait_for(task, 10)
    assert held_back == 3, f"{held_back} events reached the ERP while the read was held"
    assert [e["key"] for e in erp.events()] == [f"ev-{n}" for n in range(6)]


class SettlesRecorded(ReadsHeldAfterTheFirst):
    """The outbox, with what each settle said of the requests behind it recorded."""

    def __init__(self, outbox: Any) -> None:
        super().__init__(outbox)
        self._released.set()
        self.others_follow: list[bool] = []

    async def settle(self, settlements: Any, *, others_follow: bool = False) -> None:
        self.others_follow.append(others_follow)
        await self._outbox.settle(settlements, others_follow=others_follow)


@pytest.mark.integration
async def test_outcomes_wait_for_others_only_while_more_requests_are_ready(
    peers: Any, tmp_path: Path
) -> None:
    """Issue 17 item 1: an outcome's transaction may wait briefly for the outcomes of other
    requests (`others_follow`, `Outbox.settle`) only when other requests are in flight AND
    more are ready behind them, so that no key waits on it. A burst on one order (each event
    waits on the one before) and a last pair with nothing behind them are settled at once;
    forty orders at four in flight share transactions. Every event reaches the ERP once, in
    order (the ERP simulator's record)."""
    from buffer.outbox import Outbox, OutboxEvent
    from edge.config.destinations import DestinationConfig
    from edge.forward import HttpForwarder
    from tests.conftest import start_erp

    erp = start_erp(peers, tmp_path)
    body = (
        '{{"specversion":"1.0","id":"{id}","source":"urn:test",'
        '"type":"production.confirmation","partitionkey":"{key}","data":{{}}}}'
    )

    committed: dict[str, str] = {}  # event id -> its order, in commit order

    async def deliver(outbox: Outbox, keys: list[str], in_flight: int) -> list[bool]:
        start = outbox.stats.delivered
        ids = [f"ev-{start + n}" for n in range(len(keys))]
        committed.update(zip(ids, keys, strict=True))
        await outbox.commit(
            [
                OutboxEvent(
                    i, "production.confirmation", k, body.format(id=i, key=k).encode(), ("erp",)
                )
                for i, k in zip(ids, keys, strict=True)
            ]
        )
        recorded = SettlesRecorded(outbox)
        forwarder = HttpForwarder(
            "erp",
            DestinationConfig.model_validate(
                {"base_url": erp.url, "path": "/api/events", "max_in_flight": in_flight}
            ),
            recorded,
        )
        async with asyncio.TaskGroup() as group:
            task = group.create_task(forwarder.run(), name="forward")
            deadline = time.monotonic() + 20
            while forwarder.health.delivered < len(keys) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            forwarder.drain()
            await asyncio.wait_for(task, 10)
        assert forwarder.health.delivered == len(keys)
        return recorded.others_follow

    async with Outbox.open(tmp_path / "outbox.db", settle_wait=0.002) as outbox:
        one_order = await deliver(outbox, ["order-1"] * 12, in_flight=4)
        last_pair = await deliver(outbox, ["order-2", "order-3"], in_flight=2)
        forty = await deliver(outbox, [f"order-{10 + n % 40}" for n in range(120)], in_flight=4)
    assert one_order == [False] * 12
    assert last_pair == [False, False]
    assert forty.count(True) >= 40, forty
    arrived = [str(e["key"]) for e in erp.events()]
    assert sorted(arrived) == sorted(committed)  # each once
    for order in set(committed.values()):  # each order's events in commit order
        mine = [i for i in committed if committed[i] == order]
        assert [i for i in arrived if committed[i] == order] == mine, order
