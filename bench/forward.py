"""Forwarder benchmark: events per second the gateway's forwarder (`Outbox` + `HttpForwarder`,
canonical profile) delivers to a local receiver, the ERP simulator, against a bare httpx POST
loop to the same receiver in the same run.

Events are pre-committed to a fresh outbox (outside the measured time), confirmation-shaped
CloudEvents over ~50 partition keys; the clock runs from the forwarder's start until it has
acknowledged the last one. Two forwarder phases:

- unbatched: one event per POST to /api/events, `max_in_flight` requests at once, on the
  forwarder's default transport (httpx on aiohttp) and once more on httpx's own httpcore;
  the outbox leases what it committed itself from memory (the steady state of a plant), and
  once more cold (`ratio_cold`: committed, then the outbox reopened, so every lease reads
  the file, as after a restart);
  against bare loops of `max_in_flight` tasks POSTing the same payloads one by one with the
  same headers through each Python client worth considering (bench/_clients.py: httpx,
  httpx on aiohttp, aiohttp), and the ratio is to the fastest of them (target: >= 0.8);
- batched: `batch_size` events per POST to /api/events:batch (the receiver answers one
  outcome per event); against the forwarder's unbatched rate (target: >= 10x), and against a
  bare loop POSTing the same batches with the same concurrency and client (target: >= 0.5);
- HTTP/2 (leave out with `--no-http2`): httpx over HTTP/2 against httpx over HTTP/1.1 on one
  Hypercorn receiver (uvicorn has no HTTP/2), to say what the protocol changes.

The bare unbatched loops run twice per round, before and after the forwarder's unbatched
phases, in alternating order, so that drift on the machine hits all alike; the ERP
simulator is reset (`POST /_sim/reset`) before every phase and must hold exactly what the
phase delivered. The simulator runs as a subprocess on a free loopback port, so it and the
forwarder do not share a CPU core's time slices more than the machine forces. With
`--profile`, each forwarder phase runs once more, instrumented and outside the figures, and
where its time went (HTTP per request, outbox acks and leases, transactions per event) is
added to the line under `breakdown`.
Prints one JSON line: medians over rounds, the ratios, and under `samples` every measurement.

Run it as `.venv/bin/python bench/forward.py` (`--quick` for a smoke run, `--help` for sizes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from _clients import CLIENTS, bare_loop
from _common import (
    DESTINATION,
    Phase,
    chunks,
    erp_simulator,
    event_loop_runner,
    make_events,
    median,
    reset_simulator,
    simulator_unique,
    until_delivered,
)
from _heap import freeze_as_the_daemon

from buffer.outbox import Outbox, OutboxEvent
from edge.config.destinations import DestinationConfig
from edge.forward import HttpForwarder
from edge.forward.session import make_client

EVENT_PATH = "/api/events"
BATCH_PATH = "/api/events:batch"
UNBATCHED_TARGET = 0.8
BATCHED_TARGET = 10.0
BATCHED_VS_BARE_TARGET = 0.5


@dataclass(frozen=True)
class Sizes:
    unbatched_events: int
    batched_events: int
    batch_size: int
    max_in_flight: int
    partition_keys: int
    rounds: int
    phase_time_limit: float
    budget: float


def destination(
    base_url: str, sizes: Sizes, *, batched: bool, transport: str = "aiohttp"
) -> DestinationConfig:
    return DestinationConfig.model_validate(
        {
            "base_url": base_url,
            "path": EVENT_PATH,
            "max_in_flight": sizes.max_in_flight,
            "batch_size": sizes.batch_size if batched else 1,
            "batch_path": BATCH_PATH if batched else None,
            "http_transport": transport,
        }
    )


# -- the phases -------------------------------------------------------------------------------


@dataclass
class Breakdown:
    """Where a forwarder phase's time went: the awaits the forwarder makes, summed (they
    overlap across requests in flight, so they can add up to more than the wall time)."""

    http: list[float]
    acks: list[float]
    leases: list[float]
    transactions: int = 0

    def summary(self, phase: Phase) -> dict[str, Any]:
        def mean_ms(values: list[float]) -> float:
            return round(1000 * statistics.fmean(values), 2) if values else 0.0

        return {
            "events_per_s": round(phase.rate, 1),
            "requests": phase.requests,
            "events_per_request": round(phase.done / max(1, phase.requests), 1),
            "http_ms_per_request": mean_ms(self.http),
            "settle_ms_per_request": mean_ms(self.acks),
            "lease_ms_per_lease": mean_ms(self.leases),
            "leases": len(self.leases),
            "outbox_transactions_per_event": round(self.transactions / max(1, phase.done), 3),
        }


def instrument(forwarder: HttpForwarder, outbox: Outbox) -> Breakdown:
    """Time the forwarder's awaits on this instance only: HTTP (the profile's send), outbox
    settles (one per request: its outcomes) and leases (each goes through one of the outbox's
    SQLite threads)."""
    breakdown = Breakdown([], [], [])

    def timed(
        function: Callable[..., Coroutine[Any, Any, Any]], into: list[float]
    ) -> Callable[..., Coroutine[Any, Any, Any]]:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await function(*args, **kwargs)
            finally:
                into.append(time.perf_counter() - started)

        return wrapper

    forwarder._send = timed(forwarder._send, breakdown.http)  # type: ignore[method-assign]
    outbox.settle = timed(outbox.settle, breakdown.acks)  # type: ignore[method-assign]
    outbox.lease = timed(outbox.lease, breakdown.leases)  # type: ignore[method-assign]
    return breakdown


async def forwarder_phase(
    path: Path,
    events: Sequence[OutboxEvent],
    config: DestinationConfig,
    *,
    time_limit: float,
    breakdown: list[Breakdown] | None = None,
    cold: bool = False,
) -> Phase:
    """Pre-commit `events`, then time a real forwarder until it has delivered them all. The
    outbox leases what it committed itself from memory; `cold` commits them and reopens the
    outbox first, so that every lease reads the file (after a restart, or a backlog beyond
    the memory budget)."""
    if cold:
        async with Outbox.open(path) as outbox:
            for chunk in chunks(events, 500):
                await outbox.commit(chunk)
    async with Outbox.open(path) as outbox:
        for chunk in chunks(events, 500) if not cold else ():
            await outbox.commit(chunk)
        async with make_client(DESTINATION, config) as client:
            forwarder = HttpForwarder(DESTINATION, config, outbox, client)
            if breakdown is not None:
                breakdown.append(instrument(forwarder, outbox))
            transactions = outbox.stats.transactions
            health = forwarder.health
            deadline = time.perf_counter() + time_limit
            started = time.perf_counter()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(forwarder.run(), name=f"bench-forwarder-{DESTINATION}")
                await until_delivered(forwarder, len(events), deadline)
                # The payloads still queued for the bulk purge are deleted on the clock:
                # a steady flow pays for them too (buffer/outbox/settle.py).
                await outbox.purge()
                seconds = time.perf_counter() - started
                forwarder.drain()
            if breakdown is not None:
                breakdown[-1].transactions = outbox.stats.transactions - transactions
        if health.failures:
            raise RuntimeError(f"delivery failed: {health.last_error}")
        left = sum(c.pending + c.dead for c in (await outbox.counts()).values())
    if health.delivered + left != len(events):
        raise RuntimeError(f"{health.delivered} delivered and {left} left of {len(events)}")
    return Phase(health.delivered, seconds, left > 0, health.requests)


async def bare_phase(
    events: Sequence[OutboxEvent], config: DestinationConfig, *, batch_size: int, time_limit: float
) -> Phase:
    """The bare baseline: `max_in_flight` tasks POSTing the same payloads (one per request, or
    `batch_size` per request as the canonical profile builds them), nothing else."""
    url = config.base_url.rstrip("/") + (BATCH_PATH if batch_size > 1 else EVENT_PATH)
    work = chunks(events, batch_size)
    deadline = time.perf_counter() + time_limit
    done = requests = 0

    async def post(client: httpx.AsyncClient) -> None:
        nonlocal done, requests
        for chunk in work:
            if batch_size > 1:
                body = b"[" + b",".join(e.payload for e in chunk) + b"]"
                headers = {
                    "Content-Type": "application/cloudevents-batch+json",
                    "Idempotency-Key": "batch:" + ",".join(e.id for e in chunk),
                }
            else:
                body = chunk[0].payload
                headers = {
                    "Content-Type": "application/cloudevents+json",
                    "Idempotency-Key": chunk[0].id,
                }
            response = await client.post(url, content=body, headers=headers, timeout=config.timeout)
            if response.status_code not in (200, 201):
                raise RuntimeError(
                    f"bare POST answered {response.status_code}: {response.text[:200]}"
                )
            if batch_size > 1:
                answers = response.json()
                if len(answers) != len(chunk) or any(a["status"] != 201 for a in answers):
                    raise RuntimeError(f"bare batch not taken whole: {answers[:3]}")
            done += len(chunk)
            requests += 1
            if time.perf_counter() > deadline:
                return

    async with make_client(DESTINATION, config) as client:
        started = time.perf_counter()
        async with asyncio.TaskGroup() as tasks:
            for number in range(config.max_in_flight):
                tasks.create_task(post(client), name=f"bench-bare-post-{number}")
        seconds = time.perf_counter() - started
    return Phase(done, seconds, done < len(events), requests)


# -- the run ----------------------------------------------------------------------------------


async def http2_phases(directory: Path, sizes: Sizes) -> dict[str, Any]:
    """httpx over HTTP/2 against httpx over HTTP/1.1, both on one Hypercorn receiver (uvicorn,
    the simulator's server, has no HTTP/2), rounds interleaved: the ratio is the protocol's
    effect for this client at the same in-flight."""
    rates: dict[str, list[float]] = defaultdict(list)
    with erp_simulator(directory, server="hypercorn") as base_url:
        url = base_url + EVENT_PATH
        for number in range(sizes.rounds + 1):  # the first round warms up, not counted
            for client in ("httpx", "httpx_h2") if number % 2 else ("httpx_h2", "httpx"):
                phase = await bare_loop(
                    client,
                    url,
                    make_events(
                        sizes.unbatched_events // 2, sizes.partition_keys, f"h2-{client}-{number}"
                    ),
                    in_flight=sizes.max_in_flight,
                    request_timeout=30.0,
                    time_limit=sizes.phase_time_limit,
                )
                if number:
                    rates[client].append(round(phase.rate, 1))
    h1, h2 = median(rates["httpx"]), median(rates["httpx_h2"])
    return {
        "receiver": "simulators.erp app on hypercorn (h2c prior knowledge and h1)",
        "httpx_http1_posts_per_s": h1,
        "httpx_http2_posts_per_s": h2,
        "http2_vs_http1": round(h2 / h1, 3),
        "samples": dict(rates),
    }


async def measure(directory: Path, sizes: Sizes, profile: bool, with_http2: bool) -> dict[str, Any]:
    limit = sizes.phase_time_limit
    cut_short: list[str] = []
    samples: dict[str, list[float]] = defaultdict(list)
    requests: dict[str, list[int]] = defaultdict(list)
    counter = iter(range(1_000_000))

    with erp_simulator(directory) as base_url:
        async with httpx.AsyncClient(timeout=30.0) as control:
            unbatched = destination(base_url, sizes, batched=False)
            unbatched_httpcore = destination(base_url, sizes, batched=False, transport="httpcore")
            batched = destination(base_url, sizes, batched=True)

            async def timed(name: str, phase_of: Coroutine[Any, Any, Phase]) -> Phase:
                """Reset the receiver, then run the phase (a coroutine not started yet)."""
                await reset_simulator(control, base_url)
                phase = await phase_of
                received = await simulator_unique(control, base_url)
                if received != phase.done:
                    raise RuntimeError(
                        f"{name}: the ERP stored {received} events, {phase.done} were acknowledged"
                    )
                if phase.time_limited and name not in cut_short:
                    cut_short.append(name)
                samples[name].append(round(phase.rate, 1))
                requests[name].append(phase.requests)
                return phase

            def fresh(count: int, label: str) -> list[OutboxEvent]:
                return make_events(count, sizes.partition_keys, f"{label}{next(counter)}")

            # Open the connections and let the simulator warm up (its first requests are slow).
            await bare_phase(
                fresh(min(500, sizes.unbatched_events), "warm"),
                unbatched,
                batch_size=1,
                time_limit=limit,
            )
            await bare_phase(
                fresh(min(2000, sizes.batched_events), "warm"),
                batched,
                batch_size=sizes.batch_size,
                time_limit=limit,
            )
            budget_end = time.perf_counter() + sizes.budget
            rounds_done = 0
            unbatched_url = base_url + EVENT_PATH

            async def bare_clients(clients: Sequence[str], events: int, limit: float) -> None:
                for client in clients:
                    if client == "httpx_h2":
                        continue  # uvicorn speaks HTTP/1.1 only: see http2_phases
                    await timed(
                        f"bare_{client}",
                        bare_loop(
                            client,
                            unbatched_url,
                            fresh(events, "bare"),
                            in_flight=sizes.max_in_flight,
                            request_timeout=unbatched.timeout,
                            time_limit=limit,
                        ),
                    )

            for number in range(sizes.rounds):
                round_started = time.perf_counter()
                half = sizes.unbatched_events // 2
                # Half the bare events before the forwarder phases, half after, in mirrored
                # client order (ABBA), so drift in the box's load falls on both sides alike.
                await bare_clients(CLIENTS[::-1] if number % 2 else CLIENTS, half, limit)
                for name, config, label, cold in (
                    ("forwarder_unbatched", unbatched, "fwd", False),
                    ("forwarder_unbatched_cold", unbatched, "fwdr", True),
                    ("forwarder_unbatched_httpcore", unbatched_httpcore, "fwdc", False),
                ):
                    await timed(
                        name,
                        forwarder_phase(
                            directory / f"{name}-{number}.sqlite",
                            fresh(sizes.unbatched_events, label),
                            config,
                            time_limit=limit,
                            cold=cold,
                        ),
                    )
                await bare_clients(CLIENTS if number % 2 else CLIENTS[::-1], half, limit)
                await timed(
                    "forwarder_batched",
                    forwarder_phase(
                        directory / f"batched-{number}.sqlite",
                        fresh(sizes.batched_events, "fwdb"),
                        batched,
                        time_limit=limit,
                    ),
                )
                await timed(
                    "bare_batched",
                    bare_phase(
                        fresh(sizes.batched_events, "bareb"),
                        batched,
                        batch_size=sizes.batch_size,
                        time_limit=limit,
                    ),
                )
                rounds_done = number + 1
                # Bounded in time: no round is started that would likely end past the budget.
                if time.perf_counter() + (time.perf_counter() - round_started) > budget_end:
                    break
            profiles: dict[str, Any] = {}
            if profile:
                for name, config, count in (
                    ("forwarder_unbatched", unbatched, sizes.unbatched_events),
                    ("forwarder_batched", batched, sizes.batched_events),
                ):
                    await reset_simulator(control, base_url)
                    found: list[Breakdown] = []
                    phase = await forwarder_phase(
                        directory / f"profile-{name}.sqlite",
                        fresh(count, "prof"),
                        config,
                        time_limit=limit,
                        breakdown=found,
                    )
                    profiles[name] = found[0].summary(phase)
    http2 = await http2_phases(directory, sizes) if with_http2 else {}

    bare_by_client = {
        client: median(samples[f"bare_{client}"])
        for client in CLIENTS
        if samples.get(f"bare_{client}")
    }
    fastest = max(bare_by_client, key=bare_by_client.__getitem__)
    bare, forwarder = bare_by_client[fastest], median(samples["forwarder_unbatched"])
    forwarder_batched = median(samples["forwarder_batched"])
    bare_batched = median(samples["bare_batched"])
    ratio = round(forwarder / bare, 3)
    batched_ratio = round(forwarder_batched / forwarder, 2)
    line: dict[str, Any] = {
        "forwarder_unbatched_events_per_s": forwarder,
        "fastest_bare_client": fastest,
        "fastest_bare_unbatched_posts_per_s": bare,
        "ratio": ratio,
        "ratio_target": UNBATCHED_TARGET,
        "bare_unbatched_posts_per_s": bare_by_client,
        "bare_vs_bare_httpx": {
            client: round(rate / bare_by_client["httpx"], 2)
            for client, rate in bare_by_client.items()
        },
        "forwarder_unbatched_cold_events_per_s": median(samples["forwarder_unbatched_cold"]),
        "ratio_cold": round(median(samples["forwarder_unbatched_cold"]) / bare, 3),
        "forwarder_unbatched_httpcore_events_per_s": median(
            samples["forwarder_unbatched_httpcore"]
        ),
        "forwarder_batched_events_per_s": forwarder_batched,
        "batched_vs_unbatched": batched_ratio,
        "batched_target": BATCHED_TARGET,
        "bare_batched_events_per_s": bare_batched,
        "batched_vs_bare_batched": round(forwarder_batched / bare_batched, 3),
        "batched_vs_bare_batched_target": BATCHED_VS_BARE_TARGET,
        "targets_met": (
            ratio >= UNBATCHED_TARGET
            and batched_ratio >= BATCHED_TARGET
            and forwarder_batched / bare_batched >= BATCHED_VS_BARE_TARGET
        ),
        "requests_per_phase": {
            name: statistics.median(counts) for name, counts in requests.items()
        },
        "rounds_done": rounds_done,
        "time_limited": cut_short,
        "samples": dict(samples),
    }
    if profiles:
        line["breakdown"] = profiles
    if http2:
        line["http2"] = http2
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--events",
        type=int,
        default=2000,
        help="events per unbatched forwarder phase (default 2000)",
    )
    parser.add_argument(
        "--batched-events", type=int, default=10000, help="events per batched phase (default 10000)"
    )
    parser.add_argument("--batch-size", type=int, default=100, help="events per batch")
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=4,
        help="forwarder max_in_flight, and the bare loops' concurrency",
    )
    parser.add_argument("--keys", type=int, default=50, help="distinct partition keys")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        choices=range(1, 101),
        metavar="N",
        help="rounds of the phases; figures are medians over rounds",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=5.0,
        help="seconds any one phase may run before it is cut short",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="seconds of measuring rounds: no round starts that would likely "
        "end after it (the first always runs)",
    )
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument(
        "--no-freeze",
        action="store_true",
        help="leave the start-up heap to the garbage collector (the daemon freezes it)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also run each forwarder phase once more, instrumented, and add "
        "where its time went (HTTP, outbox acks, leases) to the line",
    )
    parser.add_argument(
        "--no-http2",
        action="store_true",
        help="leave out the HTTP/2 phases (a Hypercorn receiver of their own)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where the temporary databases go (default: the system temp dir)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run to check it works")
    args = parser.parse_args(argv)
    sizes = Sizes(
        unbatched_events=300 if args.quick else args.events,
        batched_events=2000 if args.quick else args.batched_events,
        batch_size=args.batch_size,
        max_in_flight=args.max_in_flight,
        partition_keys=args.keys,
        rounds=1 if args.quick else args.rounds,
        phase_time_limit=args.time_limit,
        budget=args.budget,
    )
    frozen = freeze_as_the_daemon(args.no_freeze)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-forward-", dir=args.dir) as directory:
        figures = event_loop_runner(args.loop)(
            measure(Path(directory), sizes, args.profile, not args.no_http2)
        )
    line = {
        "benchmark": "forward",
        **figures,
        "heap_frozen": frozen,
        "params": {
            "events": sizes.unbatched_events,
            "batched_events": sizes.batched_events,
            "batch_size": sizes.batch_size,
            "max_in_flight": sizes.max_in_flight,
            "partition_keys": sizes.partition_keys,
            "rounds": sizes.rounds,
            "receiver": "simulators.erp (canonical, subprocess)",
            "loop": args.loop,
            "quick": args.quick,
            "seconds": round(time.perf_counter() - started, 1),
        },
    }
    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
