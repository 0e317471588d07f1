"""Forwarder benchmark: events per second the gateway's forwarder (`Outbox` + `HttpForwarder`,
canonical profile) delivers to a local receiver, the ERP simulator, against a bare httpx POST
loop to the same receiver in the same run.

Events are pre-committed to a fresh outbox (outside the measured time), confirmation-shaped
CloudEvents over ~50 partition keys; the clock runs from the forwarder's start until it has
acknowledged the last one. Two forwarder phases:

- unbatched: one event per POST to /api/events, `max_in_flight` requests at once; against the
  bare loop, `max_in_flight` tasks POSTing the same payloads one by one with the same
  headers and client settings (target: ratio >= 0.8);
- batched: `batch_size` events per POST to /api/events:batch (the receiver answers one
  outcome per event); against the bare *unbatched* loop (target: >= 10x), and, to show where
  the ceiling is, against a bare loop POSTing the same batches with the same concurrency.

The bare unbatched loop runs twice, before and after the forwarder's unbatched phase, so
that drift on the machine hits both alike; the ERP simulator is reset (`POST /_sim/reset`)
before every phase and must hold exactly what the phase delivered. The simulator runs as a
subprocess on a free loopback port, so it and the forwarder do not share a CPU core's time
slices more than the machine forces. With `--profile`, each forwarder phase runs once more,
instrumented and outside the figures, and where its time went (HTTP per request, outbox acks
and leases, transactions per event) is added to the line under `breakdown`.
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

from buffer.outbox import Outbox, OutboxEvent
from edge.config.models import DestinationConfig
from edge.forward import HttpForwarder
from edge.forward.session import make_client

EVENT_PATH = "/api/events"
BATCH_PATH = "/api/events:batch"
UNBATCHED_TARGET = 0.8
BATCHED_TARGET = 10.0


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


def destination(base_url: str, sizes: Sizes, *, batched: bool) -> DestinationConfig:
    return DestinationConfig.model_validate({
        "base_url": base_url, "path": EVENT_PATH, "max_in_flight": sizes.max_in_flight,
        "batch_size": sizes.batch_size if batched else 1,
        "batch_path": BATCH_PATH if batched else None})


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

        return {"events_per_s": round(phase.rate, 1), "requests": phase.requests,
                "events_per_request": round(phase.done / max(1, phase.requests), 1),
                "http_ms_per_request": mean_ms(self.http),
                "ack_ms_per_event": mean_ms(self.acks),
                "ack_ms_per_request": round(sum(self.acks) * 1000 / max(1, phase.requests), 2),
                "lease_ms_per_lease": mean_ms(self.leases), "leases": len(self.leases),
                "outbox_transactions_per_event": round(self.transactions / max(1, phase.done),
                                                       3)}


def instrument(forwarder: HttpForwarder, outbox: Outbox) -> Breakdown:
    """Time the forwarder's awaits on this instance only: HTTP (the profile's send), outbox
    acks and leases (each goes through the outbox's one SQLite thread)."""
    breakdown = Breakdown([], [], [])

    def timed(function: Callable[..., Coroutine[Any, Any, Any]], into: list[float]
              ) -> Callable[..., Coroutine[Any, Any, Any]]:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await function(*args, **kwargs)
            finally:
                into.append(time.perf_counter() - started)
        return wrapper

    forwarder._send = timed(forwarder._send, breakdown.http)  # type: ignore[method-assign]
    outbox.ack = timed(outbox.ack, breakdown.acks)  # type: ignore[method-assign]
    outbox.lease = timed(outbox.lease, breakdown.leases)  # type: ignore[method-assign]
    return breakdown


async def forwarder_phase(path: Path, events: Sequence[OutboxEvent], config: DestinationConfig,
                          *, time_limit: float, breakdown: list[Breakdown] | None = None
                          ) -> Phase:
    """Pre-commit `events`, then time a real forwarder until it has delivered them all."""
    async with Outbox.open(path) as outbox:
        for chunk in chunks(events, 500):
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


async def bare_phase(events: Sequence[OutboxEvent], config: DestinationConfig, *,
                     batch_size: int, time_limit: float) -> Phase:
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
                headers = {"Content-Type": "application/cloudevents-batch+json",
                           "Idempotency-Key": "batch:" + ",".join(e.id for e in chunk)}
            else:
                body = chunk[0].payload
                headers = {"Content-Type": "application/cloudevents+json",
                           "Idempotency-Key": chunk[0].id}
            response = await client.post(url, content=body, headers=headers,
                                         timeout=config.timeout)
            if response.status_code not in (200, 201):
                raise RuntimeError(f"bare POST answered {response.status_code}: "
                                   f"{response.text[:200]}")
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


async def measure(directory: Path, sizes: Sizes, profile: bool) -> dict[str, Any]:
    limit = sizes.phase_time_limit
    cut_short: list[str] = []
    samples: dict[str, list[float]] = defaultdict(list)
    requests: dict[str, list[int]] = defaultdict(list)
    counter = iter(range(1_000_000))

    with erp_simulator(directory) as base_url:
        async with httpx.AsyncClient(timeout=30.0) as control:
            unbatched = destination(base_url, sizes, batched=False)
            batched = destination(base_url, sizes, batched=True)

            async def timed(name: str, phase_of: Coroutine[Any, Any, Phase]) -> Phase:
                """Reset the receiver, then run the phase (a coroutine not started yet)."""
                await reset_simulator(control, base_url)
                phase = await phase_of
                received = await simulator_unique(control, base_url)
                if received != phase.done:
                    raise RuntimeError(f"{name}: the ERP stored {received} events, "
                                       f"{phase.done} were acknowledged")
                if phase.time_limited and name not in cut_short:
                    cut_short.append(name)
                samples[name].append(round(phase.rate, 1))
                requests[name].append(phase.requests)
                return phase

            def fresh(count: int, label: str) -> list[OutboxEvent]:
                return make_events(count, sizes.partition_keys, f"{label}{next(counter)}")

            # Open the connections and let the simulator warm up (its first requests are slow).
            await bare_phase(fresh(min(500, sizes.unbatched_events), "warm"), unbatched,
                             batch_size=1, time_limit=limit)
            await bare_phase(fresh(min(2000, sizes.batched_events), "warm"), batched,
                             batch_size=sizes.batch_size, time_limit=limit)
            budget_end = time.perf_counter() + sizes.budget
            rounds_done = 0
            for number in range(sizes.rounds):
                round_started = time.perf_counter()
                half = sizes.unbatched_events // 2
                await timed("bare_unbatched", bare_phase(
                    fresh(half, "bare"), unbatched, batch_size=1, time_limit=limit))
                await timed("forwarder_unbatched", forwarder_phase(
                    directory / f"unbatched-{number}.sqlite",
                    fresh(sizes.unbatched_events, "fwd"), unbatched, time_limit=limit))
                await timed("bare_unbatched", bare_phase(
                    fresh(half, "bare"), unbatched, batch_size=1, time_limit=limit))
                await timed("forwarder_batched", forwarder_phase(
                    directory / f"batched-{number}.sqlite", fresh(sizes.batched_events, "fwdb"),
                    batched, time_limit=limit))
                await timed("bare_batched", bare_phase(
                    fresh(sizes.batched_events, "bareb"), batched, batch_size=sizes.batch_size,
                    time_limit=limit))
                rounds_done = number + 1
                # Bounded in time: no round is started that would likely end past the budget.
                if time.perf_counter() + (time.perf_counter() - round_started) > budget_end:
                    break
            profiles: dict[str, Any] = {}
            if profile:
                for name, config, count in (("forwarder_unbatched", unbatched,
                                             sizes.unbatched_events),
                                            ("forwarder_batched", batched, sizes.batched_events)):
                    await reset_simulator(control, base_url)
                    found: list[Breakdown] = []
                    phase = await forwarder_phase(directory / f"profile-{name}.sqlite",
                                                  fresh(count, "prof"), config, time_limit=limit,
                                                  breakdown=found)
                    profiles[name] = found[0].summary(phase)

    bare, forwarder = median(samples["bare_unbatched"]), median(samples["forwarder_unbatched"])
    forwarder_batched = median(samples["forwarder_batched"])
    bare_batched = median(samples["bare_batched"])
    ratio = round(forwarder / bare, 3)
    batched_ratio = round(forwarder_batched / bare, 2)
    line: dict[str, Any] = {
        "forwarder_unbatched_events_per_s": forwarder,
        "bare_httpx_unbatched_posts_per_s": bare,
        "ratio": ratio,
        "ratio_target": UNBATCHED_TARGET,
        "forwarder_batched_events_per_s": forwarder_batched,
        "batched_vs_bare_unbatched": batched_ratio,
        "batched_target": BATCHED_TARGET,
        "bare_httpx_batched_events_per_s": bare_batched,
        "batched_vs_bare_batched": round(forwarder_batched / bare_batched, 3),
        "targets_met": ratio >= UNBATCHED_TARGET and batched_ratio >= BATCHED_TARGET,
        "requests_per_phase": {name: statistics.median(counts)
                               for name, counts in requests.items()},
        "rounds_done": rounds_done,
        "time_limited": cut_short,
        "samples": dict(samples),
    }
    if profiles:
        line["breakdown"] = profiles
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000,
                        help="events per unbatched forwarder phase (default 2000)")
    parser.add_argument("--batched-events", type=int, default=10000,
                        help="events per batched phase (default 10000)")
    parser.add_argument("--batch-size", type=int, default=100, help="events per batch")
    parser.add_argument("--max-in-flight", type=int, default=4,
                        help="forwarder max_in_flight, and the bare loops' concurrency")
    parser.add_argument("--keys", type=int, default=50, help="distinct partition keys")
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 101),
                        metavar="N",
                        help="rounds of the phases; figures are medians over rounds")
    parser.add_argument("--time-limit", type=float, default=5.0,
                        help="seconds any one phase may run before it is cut short")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds of measuring rounds: no round starts that would likely "
                        "end after it (the first always runs)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--profile", action="store_true",
                        help="also run each forwarder phase once more, instrumented, and add "
                        "where its time went (HTTP, outbox acks, leases) to the line")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the temporary databases go (default: the system temp dir)")
    parser.add_argument("--quick", action="store_true", help="a tiny run to check it works")
    args = parser.parse_args(argv)
    sizes = Sizes(
        unbatched_events=300 if args.quick else args.events,
        batched_events=2000 if args.quick else args.batched_events,
        batch_size=args.batch_size, max_in_flight=args.max_in_flight,
        partition_keys=args.keys, rounds=1 if args.quick else args.rounds,
        phase_time_limit=args.time_limit, budget=args.budget)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-forward-", dir=args.dir) as directory:
        figures = event_loop_runner(args.loop)(measure(Path(directory), sizes, args.profile))
    line = {"benchmark": "forward", **figures,
            "params": {"events": sizes.unbatched_events, "batched_events": sizes.batched_events,
                       "batch_size": sizes.batch_size, "max_in_flight": sizes.max_in_flight,
                       "partition_keys": sizes.partition_keys, "rounds": sizes.rounds,
                       "receiver": "simulators.erp (canonical, subprocess)",
                       "loop": args.loop, "quick": args.quick,
                       "seconds": round(time.perf_counter() - started, 1)}}
    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
