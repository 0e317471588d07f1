"""Outbox benchmark: how fast events become durable through `Outbox.commit`, and how fast a
real `HttpForwarder` drains them to the ERP simulator, each against a bare baseline measured in
the same run. Commits: many producers (one per machine, each committing what one poll produced:
a single event) and then lists of 100 events per call, through the outbox's group commit, on a
fresh SQLite file; the baseline is stdlib `sqlite3` with the same PRAGMAs and schema inserting
the same rows in transactions of the batch size the outbox achieved on average. Drain: events
pre-committed to one destination over ~50 partition keys, delivered by the forwarder to the
simulator running as a subprocess on a free loopback port; the baseline is a bare httpx POST
loop with the same concurrency, client settings and payloads against the same simulator (half
of them before the drain, half after). Prints one JSON line: medians over rounds, the ratios,
and under `samples` every measurement they came from.

Run it as `.venv/bin/python bench/outbox.py` (`--quick` for a smoke run, `--help` for sizes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import sqlite3
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
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
from buffer.outbox.schema import migrate
from edge.config.destinations import DestinationConfig
from edge.forward import HttpForwarder

MAX_IN_FLIGHT = 4
SINGLE_ROW_EVENTS = 5000


@dataclass(frozen=True)
class Sizes:
    commit_events: int
    drain_events: int
    producers: int
    batch: int
    partition_keys: int
    rounds: int
    phase_time_limit: float


# -- commits ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommitRun:
    phase: Phase
    rows_per_transaction: float


async def outbox_commits(
    path: Path, events: Sequence[OutboxEvent], *, producers: int, per_call: int, time_limit: float
) -> CommitRun:
    """`producers` tasks take the next `per_call` events from a shared queue of work and
    commit them, each waiting for its own commit, until the work or the time runs out."""
    async with Outbox.open(path) as outbox:
        work = chunks(events, per_call)
        deadline = time.perf_counter() + time_limit

        async def produce() -> None:
            for chunk in work:
                await outbox.commit(chunk)
                if time.perf_counter() > deadline:
                    return

        started = time.perf_counter()
        async with asyncio.TaskGroup() as tasks:
            for number in range(producers):
                tasks.create_task(produce(), name=f"bench-producer-{number}")
        seconds = time.perf_counter() - started
        stats = outbox.stats
    if stats.duplicates_ignored:
        raise RuntimeError(f"{stats.duplicates_ignored} events were unexpectedly duplicates")
    phase = Phase(stats.committed, seconds, stats.committed < len(events))
    return CommitRun(phase, stats.committed / max(1, stats.transactions))


def raw_sqlite_inserts(
    path: Path, events: Sequence[OutboxEvent], *, rows_per_transaction: int, time_limit: float
) -> Phase:
    """The bare baseline: the outbox's PRAGMAs, schema and statements, no outbox around them."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
        migrate(db)
        # Since schema 2 the outbox first records every id in event_ids (duplicates are found
        # there); the baseline does that work too whenever the schema has the table.
        remembers_ids = remembers_event_ids(db)
        done = 0
        deadline = time.perf_counter() + time_limit
        started = time.perf_counter()
        for chunk in chunks(events, rows_per_transaction):
            db.execute("BEGIN IMMEDIATE")
            for event in chunk:
                if remembers_ids:
                    db.execute(
                        "INSERT INTO event_ids(id, committed_at) VALUES (?, ?)"
                        " ON CONFLICT(id) DO NOTHING",
                        (event.id, time.time()),
                    )
                cursor = db.execute(
                    "INSERT INTO events(id, type, partition_key, priority, payload, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
                    (
                        event.id,
                        event.type,
                        event.partition_key,
                        event.priority,
                        event.payload,
                        time.time(),
                    ),
                )
                db.executemany(
                    "INSERT INTO deliveries(event_seq, destination, partition_key, priority,"
                    " state, attempts, next_attempt_at) VALUES (?, ?, ?, ?, 0, 0, 0)",
                    [
                        (cursor.lastrowid, destination, event.partition_key, event.priority)
                        for destination in event.destinations
                    ],
                )
            db.execute("COMMIT")
            done += len(chunk)
            if time.perf_counter() > deadline:
                break
        seconds = time.perf_counter() - started
    finally:
        db.close()
    return Phase(done, seconds, done < len(events))


def remembers_event_ids(db: sqlite3.Connection) -> bool:
    found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'event_ids'")
    return found.fetchone() is not None


def raw_baseline_tables() -> list[str]:
    """The tables the raw baseline writes, as the current schema dictates (for the record)."""
    db = sqlite3.connect(":memory:")
    try:
        migrate(db)
        return [*(["event_ids"] if remembers_event_ids(db) else []), "events", "deliveries"]
    finally:
        db.close()


# -- drain ------------------------------------------------------------------------------------


def http_client() -> httpx.AsyncClient:
    """The client settings of the daemon (edge.runtime.daemon.serve) for one destination."""
    return httpx.AsyncClient(limits=httpx.Limits(max_connections=MAX_IN_FLIGHT))


async def forwarder_drain(
    path: Path,
    events: Sequence[OutboxEvent],
    client: httpx.AsyncClient,
    base_url: str,
    *,
    time_limit: float,
) -> Phase:
    """Pre-commit `events`, then time a real forwarder until it has delivered them all."""
    async with Outbox.open(path) as outbox:
        for chunk in chunks(events, 500):
            await outbox.commit(chunk)
        config = DestinationConfig(
            base_url=base_url, path="/api/events", max_in_flight=MAX_IN_FLIGHT
        )
        forwarder = HttpForwarder(DESTINATION, config, outbox, client)
        deadline = time.perf_counter() + time_limit
        started = time.perf_counter()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(forwarder.run(), name=f"bench-forwarder-{DESTINATION}")
            await until_delivered(forwarder, len(events), deadline)
            await outbox.purge()  # the payloads still queued are deleted on the clock
            forwarder.drain()
        seconds = time.perf_counter() - started
        if forwarder.health.failures:
            raise RuntimeError(f"delivery failed: {forwarder.health.last_error}")
        left = sum(c.pending + c.dead for c in (await outbox.counts()).values())
    delivered = forwarder.health.delivered
    if delivered + left != len(events):
        raise RuntimeError(f"{delivered} delivered and {left} left of {len(events)} events")
    return Phase(delivered, seconds, left > 0)


async def bare_posts(
    events: Sequence[OutboxEvent],
    client: httpx.AsyncClient,
    url: str,
    *,
    workers: int,
    time_limit: float,
) -> Phase:
    """The bare baseline: `workers` tasks POSTing the same payloads, nothing else."""
    queue = iter(events)
    deadline = time.perf_counter() + time_limit
    done = 0

    async def post() -> None:
        nonlocal done
        for event in queue:
            response = await client.post(
                url,
                content=event.payload,
                timeout=10.0,
                headers={
                    "Content-Type": "application/cloudevents+json",
                    "Idempotency-Key": event.id,
                },
            )
            if response.status_code != 201:
                raise RuntimeError(
                    f"bare POST answered {response.status_code}: {response.text[:200]}"
                )
            done += 1
            if time.perf_counter() > deadline:
                return

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tasks:
        for number in range(workers):
            tasks.create_task(post(), name=f"bench-bare-post-{number}")
    return Phase(done, time.perf_counter() - started, done < len(events))


# -- the run ----------------------------------------------------------------------------------


async def measure(directory: Path, sizes: Sizes) -> dict[str, Any]:
    limit = sizes.phase_time_limit
    cut_short: list[str] = []
    samples: dict[str, list[float]] = defaultdict(list)

    def sample(name: str, phase: Phase) -> float:
        if phase.time_limited and name not in cut_short:
            cut_short.append(name)
        samples[name].append(round(phase.rate, 1))
        return phase.rate

    # Each round measures the outbox and then its raw baseline at the batch size the outbox
    # just achieved, on fresh files; medians over rounds damp a noisy neighbour on a small VM.
    events = make_events(sizes.commit_events, sizes.partition_keys, "commit")
    batch = f"batch{sizes.batch}"
    ratios: dict[str, list[float]] = defaultdict(list)
    rows_per_transaction: dict[str, list[float]] = defaultdict(list)
    for number in range(sizes.rounds):
        for label, per_call in (("single", 1), (batch, sizes.batch)):
            run = await outbox_commits(
                directory / f"outbox-{label}-{number}.sqlite",
                events,
                producers=sizes.producers,
                per_call=per_call,
                time_limit=limit,
            )
            rows = max(1, round(run.rows_per_transaction))
            raw = raw_sqlite_inserts(
                directory / f"raw-{label}-{number}.sqlite",
                events,
                rows_per_transaction=rows,
                time_limit=limit,
            )
            outbox_rate = sample(f"outbox_{label}", run.phase)
            ratios[label].append(outbox_rate / sample(f"raw_sqlite_{label}", raw))
            rows_per_transaction[label].append(run.rows_per_transaction)
    raw_single_row = raw_sqlite_inserts(
        directory / "raw-single-row.sqlite",
        events[:SINGLE_ROW_EVENTS],
        rows_per_transaction=1,
        time_limit=limit,
    )
    sample("raw_sqlite_single_row", raw_single_row)

    # The bare loop posts half the payloads before the drain and half after, so that drift on
    # the machine hits both alike.
    drain_events = make_events(sizes.drain_events, sizes.partition_keys, "drain")
    halves = iter((drain_events[: len(drain_events) // 2], drain_events[len(drain_events) // 2 :]))
    with erp_simulator(directory) as base_url:
        async with http_client() as client:
            url = f"{base_url}/api/events"
            # Open the connections and let the simulator warm up, then start from an empty ERP.
            warm_up = make_events(min(200, sizes.drain_events), sizes.partition_keys, "warm-up")
            await bare_posts(warm_up, client, url, workers=MAX_IN_FLIGHT, time_limit=limit)
            for step in ("bare", "drain", "bare"):
                await reset_simulator(client, base_url)
                if step == "bare":
                    bare = await bare_posts(
                        next(halves), client, url, workers=MAX_IN_FLIGHT, time_limit=limit
                    )
                    sample("bare_httpx", bare)
                    continue
                drain = await forwarder_drain(
                    directory / "drain.sqlite", drain_events, client, base_url, time_limit=limit
                )
                received = await simulator_unique(client, base_url)
                if received != drain.done:
                    raise RuntimeError(
                        f"the ERP stored {received} events, the forwarder acknowledged {drain.done}"
                    )
                sample("drain", drain)

    drain_rate, bare_rate = median(samples["drain"]), median(samples["bare_httpx"])
    return {
        "outbox_commits_per_s": median(samples["outbox_single"]),
        "outbox_rows_per_transaction": round(statistics.median(rows_per_transaction["single"]), 1),
        "raw_sqlite_rows_per_s": median(samples["raw_sqlite_single"]),
        "ratio": round(statistics.median(ratios["single"]), 3),
        f"outbox_{batch}_events_per_s": median(samples[f"outbox_{batch}"]),
        f"outbox_{batch}_rows_per_transaction": round(
            statistics.median(rows_per_transaction[batch]), 1
        ),
        f"raw_sqlite_{batch}_rows_per_s": median(samples[f"raw_sqlite_{batch}"]),
        f"{batch}_ratio": round(statistics.median(ratios[batch]), 3),
        "raw_sqlite_commits_per_s_single_row": median(samples["raw_sqlite_single_row"]),
        "drain_events_per_s": drain_rate,
        "bare_httpx_posts_per_s": bare_rate,
        "drain_ratio": round(drain_rate / bare_rate, 3),
        "time_limited": cut_short,
        "samples": dict(samples),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--events", type=int, default=20000, help="events per commit phase (default 20000)"
    )
    parser.add_argument(
        "--drain-events",
        type=int,
        default=5000,
        help="events pre-committed and drained (default 5000)",
    )
    parser.add_argument(
        "--producers", type=int, default=50, help="concurrent committing tasks (default 50)"
    )
    parser.add_argument("--batch", type=int, default=100, help="events per batched commit call")
    parser.add_argument("--keys", type=int, default=50, help="distinct partition keys")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of the commit phases; figures are medians over rounds",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=20.0,
        help="seconds any one phase may run before it is cut short",
    )
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where the temporary databases go (default: the system temp dir)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run to check it works")
    args = parser.parse_args(argv)
    sizes = Sizes(
        commit_events=1000 if args.quick else args.events,
        drain_events=200 if args.quick else args.drain_events,
        producers=args.producers,
        batch=args.batch,
        partition_keys=args.keys,
        rounds=1 if args.quick else args.rounds,
        phase_time_limit=args.time_limit,
    )
    with tempfile.TemporaryDirectory(prefix="bench-outbox-", dir=args.dir) as directory:
        figures = event_loop_runner(args.loop)(measure(Path(directory), sizes))
        filesystem = filesystem_type(Path(directory))
    line = {
        "benchmark": "outbox",
        **figures,
        "params": {
            "events": sizes.commit_events,
            "drain_events": sizes.drain_events,
            "producers": sizes.producers,
            "batch": sizes.batch,
            "partition_keys": sizes.partition_keys,
            "rounds": sizes.rounds,
            "max_in_flight": MAX_IN_FLIGHT,
            **outbox_defaults(),
            "raw_baseline_tables": raw_baseline_tables(),
            "loop": args.loop,
            "filesystem": filesystem,
            "quick": args.quick,
        },
    }
    print(json.dumps(line), flush=True)
    return 0


def outbox_defaults() -> dict[str, Any]:
    """The group-commit settings measured: `Outbox.open`'s defaults, read rather than copied."""
    parameters = inspect.signature(Outbox.open).parameters
    return {name: parameters[name].default for name in ("commit_interval", "commit_max_rows")}


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path` (fsync cost depends on it), from /proc/mounts."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        target = os.path.realpath(path)
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            mount = fields[1]
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if len(fields) > 2 and inside and len(mount) >= len(best):
                best, kind = mount, fields[2]
    return kind


if __name__ == "__main__":
    raise SystemExit(main())
