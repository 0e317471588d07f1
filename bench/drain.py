"""Catch-up benchmark: after an ERP outage, how long a backlog of 1,000,000 events takes to
drain to the ERP, and how much memory the gateway holds while it drains.

The backlog is written to a fresh outbox file (outside the measured time) the way
`bench/outbox_restart.py` writes it (the rows `Outbox.commit` writes, checked there against a
real commit): confirmation-shaped CloudEvents over `--keys` orders. Then one interpreter opens
the outbox and runs a real `HttpForwarder`, batched (canonical profile, `--batch-size` events
per request, `--max-in-flight` requests), to the ERP simulator (a subprocess on a free
loopback port) until every event is acknowledged durably, and the ERP must then hold exactly
that many distinct events. Resident memory (VmRSS) is sampled every half second from before
`Outbox.open` to the end; the line gives it at the start, its peak, at the end, and the slope.

Baseline, same run: the same forwarder and receiver on a small backlog (`--baseline-events`,
committed through `Outbox.commit`), which is the batched rate of `bench/forward.py`; the ratio
says whether a million pending events slow delivery down (target: ~1). The ERP simulator's
own store grows by a million rows as it takes them, which slows the receiver too: its rate
over the last tenth of the drain is given beside the first tenth's.

Prints one JSON line. Run it as `.venv/bin/python bench/drain.py` (`--quick`: 20,000 events).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _common import (
    DESTINATION,
    chunks,
    erp_simulator,
    event_loop_runner,
    make_events,
    reset_simulator,
    simulator_unique,
)
from _heap import freeze_as_the_daemon
from outbox_restart import fill, proc_status_mb

from buffer.outbox import Outbox
from edge.config.destinations import DestinationConfig
from edge.forward import HttpForwarder

EVENT_PATH = "/api/events"
BATCH_PATH = "/api/events:batch"
RSS_EVERY = 0.5


def destination(base_url: str, batch_size: int, max_in_flight: int) -> DestinationConfig:
    return DestinationConfig.model_validate(
        {
            "base_url": base_url,
            "path": EVENT_PATH,
            "batch_path": BATCH_PATH,
            "batch_size": batch_size,
            "max_in_flight": max_in_flight,
        }
    )


async def drain(
    path: Path, config: DestinationConfig, count: int, time_limit: float
) -> dict[str, Any]:
    """Open the outbox at `path` and deliver its `count` events; time and memory."""
    rss: list[tuple[float, float]] = [(0.0, proc_status_mb("VmRSS"))]
    started = time.perf_counter()
    progress: list[tuple[float, int]] = []
    async with Outbox.open(path) as outbox:
        forwarder = HttpForwarder(DESTINATION, config, outbox)
        health = forwarder.health
        deadline = started + time_limit
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(forwarder.run(), name="bench-drain-forwarder")
            while (
                health.delivered < count
                and health.failures == 0
                and (time.perf_counter() < deadline)
            ):
                await asyncio.sleep(RSS_EVERY)
                now = time.perf_counter() - started
                rss.append((now, proc_status_mb("VmRSS")))
                progress.append((now, health.delivered))
            await outbox.purge()  # the payloads still queued are deleted on the clock
            seconds = time.perf_counter() - started
            forwarder.drain()
        if health.failures:
            raise RuntimeError(f"delivery failed: {health.last_error}")
    rss.append((time.perf_counter() - started, proc_status_mb("VmRSS")))

    def rate_between(low: float, high: float) -> float:
        """Events/s while the delivered count went from low to high (fractions of count)."""
        inside = [(t, n) for t, n in progress if low * count <= n <= high * count]
        if len(inside) < 2 or inside[-1][0] == inside[0][0]:
            return 0.0
        return round((inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]), 1)

    tail = [(t, m) for t, m in rss if t >= seconds / 2]
    slope = (
        (tail[-1][1] - tail[0][1]) / (tail[-1][0] - tail[0][0]) * 60
        if len(tail) > 1 and tail[-1][0] > tail[0][0]
        else 0.0
    )
    return {
        "delivered": health.delivered,
        "seconds": round(seconds, 1),
        "events_per_s": round(health.delivered / seconds, 1),
        "first_tenth_events_per_s": rate_between(0.0, 0.1),
        "last_tenth_events_per_s": rate_between(0.9, 1.0),
        "requests": health.requests,
        "time_limited": health.delivered < count,
        "rss_mb_start": rss[0][1],
        "rss_mb_peak": max(m for _, m in rss),
        "rss_mb_end": rss[-1][1],
        "rss_mb_per_min_second_half": round(slope, 2),
    }


async def measure(directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    backlog = directory / "backlog.sqlite"
    fill_started = time.perf_counter()
    written = fill(backlog, args.events, start=0, partition_keys=args.keys, run="drain")
    fill_seconds = time.perf_counter() - fill_started
    with erp_simulator(directory) as base_url:
        config = destination(base_url, args.batch_size, args.max_in_flight)
        async with httpx.AsyncClient(timeout=30.0) as control:
            baselines = []
            for number in range(args.baseline_rounds):
                await reset_simulator(control, base_url)
                small = directory / f"baseline-{number}.sqlite"
                async with Outbox.open(small) as outbox:
                    for chunk in chunks(
                        make_events(args.baseline_events, args.keys, f"base{number}"), 500
                    ):
                        await outbox.commit(chunk)
                baselines.append(await drain(small, config, args.baseline_events, args.time_limit))
            await reset_simulator(control, base_url)
            backlog_run = await drain(backlog, config, written, args.time_limit)
            received = await simulator_unique(control, base_url)
    if received != backlog_run["delivered"]:
        raise RuntimeError(
            f"the ERP holds {received} events, {backlog_run['delivered']} were acknowledged"
        )
    baseline_rate = sorted(b["events_per_s"] for b in baselines)[len(baselines) // 2]
    return {
        "backlog_events": written,
        "drain_seconds": backlog_run["seconds"],
        "drain_events_per_s": backlog_run["events_per_s"],
        "baseline_batched_events_per_s": baseline_rate,
        "ratio": round(backlog_run["events_per_s"] / baseline_rate, 3),
        "rss_mb_start": backlog_run["rss_mb_start"],
        "rss_mb_peak": backlog_run["rss_mb_peak"],
        "rss_mb_end": backlog_run["rss_mb_end"],
        "drain": backlog_run,
        "baselines": baselines,
        "fill_seconds": round(fill_seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="backlog size")
    parser.add_argument("--keys", type=int, default=200, help="distinct orders (partition keys)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--max-in-flight", type=int, default=4)
    parser.add_argument("--baseline-events", type=int, default=20_000)
    parser.add_argument("--baseline-rounds", type=int, default=3)
    parser.add_argument(
        "--time-limit",
        type=float,
        default=1800.0,
        help="seconds the drain may take before it is cut short",
    )
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument(
        "--no-freeze",
        action="store_true",
        help="leave the start-up heap to the garbage collector (the daemon freezes it)",
    )
    parser.add_argument("--quick", action="store_true", help="20,000 events, one baseline")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.baseline_events, args.baseline_rounds = 20_000, 5_000, 1
    frozen = freeze_as_the_daemon(args.no_freeze)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-drain-") as directory:
        figures = event_loop_runner(args.loop)(measure(Path(directory), args))
    line = {
        "benchmark": "drain",
        "heap_frozen": frozen,
        **figures,
        "params": {
            "events": args.events,
            "keys": args.keys,
            "batch_size": args.batch_size,
            "max_in_flight": args.max_in_flight,
            "baseline_events": args.baseline_events,
            "loop": args.loop,
            "quick": args.quick,
            "seconds": round(time.perf_counter() - started, 1),
        },
    }
    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
