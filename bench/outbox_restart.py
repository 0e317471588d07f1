"""Outbox restart benchmark: how long a gateway restarted on a backlog of 1,000,000 pending events
takes to deliver again, and how much more memory it holds than on an empty outbox. An outbox
file is filled (outside the measured time) with pending events for one destination over ~200
partition keys, ~500-byte CloudEvent payloads, by stdlib `sqlite3` on the outbox's own schema
writing the rows `Outbox.commit` writes (checked against a real commit on every run). Then a
fresh interpreter per measurement does what the daemon does at start: `Outbox.open`, the rule
state, an httpx client, and a real `HttpForwarder` delivering to the ERP simulator (a
subprocess on a free loopback port), until the first delivery is acknowledged durably in the
outbox. `open_s` and `first_delivery_s` count from just before `Outbox.open`; the baseline is
the same in another fresh process on an outbox holding one pending event, and the ratio is
backlog over baseline. Resident memory (VmRSS) is read after the imports, after `Outbox.open`
and after the first delivery, and the peak (VmHWM) at the end. Targets from the issue: first
delivery under 2 s, RSS with the backlog under 20 MB (MiB here) more than empty; they are
reported, not enforced. Prints one JSON line: medians over rounds (backlog and baseline
alternate, ABBA), the ratios, a per-statement breakdown of `Outbox.open` on the backlog, and
under `samples` every measurement. The page cache is warm (the fill just wrote the file, and
nothing is dropped): a cold start after a power cut reads the file from disk and is slower.

Run it as `.venv/bin/python bench/outbox_restart.py` (`--quick` for a smoke run, `--help`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
from _common import (
    DESTINATION,
    REPO,
    confirmation_event,
    erp_simulator,
    event_loop_runner,
    median,
)

from buffer.outbox import Outbox, OutboxEvent
from buffer.outbox.schema import migrate
from edge.config.destinations import DestinationConfig
from edge.forward import HttpForwarder

EVENT_PATH = "/api/events"
PRIORITY = 1
FILL_BATCH = 50_000
TARGET_FIRST_DELIVERY_S = 2.0
TARGET_RSS_DELTA_MB = 20.0
CHILD_DELIVERY_TIMEOUT = 60.0
TIME_COLUMNS = frozenset({"committed_at", "created_at"})
"""Columns whose values are the commit time, which a fill cannot and need not reproduce."""


# -- the events and the fill ------------------------------------------------------------------


def event(number: int, partition_keys: int, run: str) -> OutboxEvent:
    """A confirmation-shaped CloudEvent of realistic size (~400 bytes), its key by number."""
    return confirmation_event(
        number, partition_keys, f"restart-{run}-{number:08d}", priority=PRIORITY
    )


def fill(
    path: Path,
    count: int,
    *,
    start: int,
    partition_keys: int,
    run: str,
    deadline: float = float("inf"),
) -> int:
    """Write events `start`.. as pending deliveries to DESTINATION, the rows `Outbox.commit`
    writes (event_ids, events, deliveries), in transactions of FILL_BATCH events; stops at
    `deadline` (perf_counter). Returns how many were written."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = OFF")  # set-up, not measured: no fsync per batch
        db.execute("PRAGMA cache_size = -262144")  # 256 MiB, for the index inserts
        migrate(db)
        done = 0
        while done < count and time.perf_counter() < deadline:
            events = [
                event(start + done + n, partition_keys, run)
                for n in range(min(FILL_BATCH, count - done))
            ]
            now = time.time()
            db.execute("BEGIN IMMEDIATE")
            (last_seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
            db.executemany(
                "INSERT INTO event_ids(id, committed_at) VALUES (?, ?)",
                ((e.id, now) for e in events),
            )
            db.executemany(
                "INSERT INTO events(id, type, partition_key, priority, payload, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                ((e.id, e.type, e.partition_key, e.priority, e.payload, now) for e in events),
            )
            db.execute(
                "INSERT INTO deliveries(event_seq, destination, partition_key, priority, state,"
                " attempts, next_attempt_at) SELECT seq, ?, partition_key, priority, 0, 0, 0"
                " FROM events WHERE seq > ? ORDER BY seq",
                (DESTINATION, last_seq),
            )
            db.execute("COMMIT")
            done += len(events)
    finally:
        db.close()
    return done


def pending(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        (count,) = db.execute(
            "SELECT COUNT(*) FROM deliveries WHERE destination = ? AND state = 0", (DESTINATION,)
        ).fetchone()
        return int(count)
    finally:
        db.close()


def table_rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table but the commit times, for comparing two outbox files."""
    db = sqlite3.connect(path)
    try:
        tables = [
            name
            for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        rows: dict[str, list[tuple[Any, ...]]] = {}
        for table in tables:
            columns = [
                c[1] for c in db.execute(f"PRAGMA table_info({table})") if c[1] not in TIME_COLUMNS
            ]
            positions = ", ".join(str(n + 1) for n in range(len(columns)))
            rows[table] = db.execute(
                f"SELECT {', '.join(columns)} FROM {table} ORDER BY {positions}"
            ).fetchall()
        (version,) = db.execute("PRAGMA user_version").fetchone()
        rows["user_version"] = [(version,)]
        return rows
    finally:
        db.close()


async def committed_through_outbox(path: Path, count: int, partition_keys: int) -> None:
    async with Outbox.open(path) as outbox:
        await outbox.commit([event(number, partition_keys, "check") for number in range(count)])


def check_fill(directory: Path, partition_keys: int) -> None:
    """The fill must write what `Outbox.commit` writes; the schema may change under it."""
    count = 2 * partition_keys + 3
    asyncio.run(committed_through_outbox(directory / "check-commit.sqlite", count, partition_keys))
    fill(
        directory / "check-fill.sqlite", count, start=0, partition_keys=partition_keys, run="check"
    )
    committed = table_rows(directory / "check-commit.sqlite")
    filled = table_rows(directory / "check-fill.sqlite")
    if committed != filled:
        differing = sorted(
            t for t in committed.keys() | filled.keys() if committed.get(t) != filled.get(t)
        )
        raise RuntimeError(
            f"the raw fill no longer writes what Outbox.commit writes (tables "
            f"{', '.join(differing)} differ): update fill() in {__file__}"
        )


# -- the measuring subprocess -----------------------------------------------------------------


def proc_status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (kB there), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return round(int(line.split()[1]) / 1024, 2)
    raise RuntimeError(f"no {field} in /proc/self/status")


async def restart(path: Path, base_url: str, spawned_at: float) -> dict[str, Any]:
    """What the daemon does at start (edge.runtime.daemon.serve), timed to the first acknowledged
    delivery: open the outbox, load the rule state, make the client, run the forwarder."""
    rss_imports = proc_status_mb("VmRSS")
    started = time.perf_counter()
    async with Outbox.open(path) as outbox:
        opened = time.perf_counter()
        rss_open = proc_status_mb("VmRSS")
        await outbox.load_state()
        config = DestinationConfig(base_url=base_url, path=EVENT_PATH)
        limits = httpx.Limits(max_connections=config.max_in_flight)
        async with httpx.AsyncClient(limits=limits) as client:
            forwarder = HttpForwarder(DESTINATION, config, outbox, client)
            running = asyncio.create_task(forwarder.run(), name="bench-restart-forwarder")
            health = forwarder.health
            deadline = started + CHILD_DELIVERY_TIMEOUT
            # The forwarder has no "delivered" signal; poll its counter, which costs no I/O.
            while (  # noqa: ASYNC110
                not health.delivered
                and not health.failures
                and not running.done()
                and time.perf_counter() < deadline
            ):
                await asyncio.sleep(0.0005)
            delivered_at = time.perf_counter()
            wall_delivered_at = time.time()
            forwarder.drain()
            await asyncio.wait_for(running, CHILD_DELIVERY_TIMEOUT)
        if not health.delivered:
            raise RuntimeError(
                f"no delivery within {CHILD_DELIVERY_TIMEOUT:g} s: "
                f"{health.failures} failure(s), last error {health.last_error}"
            )
        rss_delivered = proc_status_mb("VmRSS")
        left = sum(c.pending for c in (await outbox.counts()).values())
    return {
        "open_s": opened - started,
        "first_delivery_s": delivered_at - started,
        "spawn_to_first_delivery_s": wall_delivered_at - spawned_at,
        "pending_at_open": left + health.delivered,
        "delivered": health.delivered,
        "rss_mb_after_imports": rss_imports,
        "rss_mb_after_open": rss_open,
        "rss_mb_after_first_delivery": rss_delivered,
        "rss_peak_mb": proc_status_mb("VmHWM"),
    }


async def profile_open(path: Path) -> dict[str, float]:
    """Seconds of `Outbox.open` per SQL statement of `buffer.outbox.database.connect` and per other
    function of buffer/ issuing statements (each statement runs until the next one starts),
    read from a trace callback on the connections it makes: the real open, nothing replayed."""
    costs: dict[str, float] = defaultdict(float)
    last: list[Any] = [None, 0.0]  # label of the statement running, and when it started

    def charge(label: str | None) -> None:
        now = time.perf_counter()
        if last[0] is not None:
            costs[last[0]] += now - last[1]
        last[:] = [label, now]

    def traced(sql: str) -> None:
        frame = sys._getframe(1)
        while frame is not None and "/buffer/" not in frame.f_code.co_filename:
            frame = frame.f_back
        function = frame.f_code.co_name if frame is not None else "?"
        if function == "connect":
            charge(" ".join(sql.split()[:3]))
        else:
            charge(function)

    connect = sqlite3.connect

    def connect_traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        charge("sqlite3.connect")
        db = connect(*args, **kwargs)
        db.set_trace_callback(traced)
        return db

    sqlite3.connect = connect_traced  # type: ignore[assignment]
    try:
        started = time.perf_counter()
        last[:] = [None, started]
        async with Outbox.open(path):
            charge(None)
            total = time.perf_counter() - started
            sqlite3.connect = connect
    finally:
        sqlite3.connect = connect
    costs["rest"] = total - sum(costs.values())
    return {"total": round(total, 4), **{k: round(v, 4) for k, v in costs.items()}}


def child_main(args: argparse.Namespace) -> int:
    runner = event_loop_runner(args.loop)
    if args.profile_open:
        figures = runner(profile_open(args.measure))
    else:
        figures = runner(restart(args.measure, args.url, args.spawned_at))
    print(json.dumps(figures), flush=True)
    return 0


def in_fresh_process(
    path: Path, *, url: str = "", loop: str, timeout: float, profile_open: bool = False
) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--measure",
        str(path),
        "--url",
        url,
        "--loop",
        loop,
        "--spawned-at",
        repr(time.time()),
    ]
    finished = subprocess.run(
        [*command, *(["--profile-open"] if profile_open else [])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if finished.returncode != 0:
        raise RuntimeError(
            f"the measuring process exited with {finished.returncode}: {finished.stderr[-2000:]}"
        )
    figures: dict[str, Any] = json.loads(finished.stdout.strip().splitlines()[-1])
    return figures


# -- the receiver -----------------------------------------------------------------------------


def warm_up(base_url: str) -> None:
    """One delivery before any measurement, so no measured process pays the server's first."""
    warm = event(0, 1, "warm-up")
    response = httpx.post(
        f"{base_url}{EVENT_PATH}",
        content=warm.payload,
        timeout=10.0,
        headers={"Content-Type": "application/cloudevents+json", "Idempotency-Key": warm.id},
    )
    response.raise_for_status()


def received(base_url: str) -> int:
    response = httpx.get(f"{base_url}/stats", timeout=10.0)
    response.raise_for_status()
    return int(response.json()["unique"])


# -- the run ----------------------------------------------------------------------------------


def measure(directory: Path, args: argparse.Namespace, events: int) -> dict[str, Any]:
    keys = args.keys
    check_fill(directory, keys)
    backlog, baseline = directory / "outbox-backlog.sqlite", directory / "outbox-baseline.sqlite"
    started = time.perf_counter()
    filled = fill(
        backlog,
        events,
        start=0,
        partition_keys=keys,
        run="backlog",
        deadline=started + args.fill_time_limit,
    )
    fill_s = time.perf_counter() - started
    time_limited = ["fill"] if filled < events else []
    if time_limited:
        print(
            f"the fill was cut short after {fill_s:.0f} s at {filled} of {events} events "
            f"(--fill-time-limit): measuring with what it wrote",
            file=sys.stderr,
        )
    fill(baseline, 1, start=0, partition_keys=keys, run="baseline")
    db_mb = backlog.stat().st_size / 2**20
    # Each restart delivers (and so removes) a few events: top up to the same count before
    # each run, with new ids so the simulator never sees a duplicate.
    targets = {backlog: filled, baseline: 1}
    runs = {backlog: "backlog", baseline: "baseline"}
    next_number = {backlog: filled, baseline: 1}

    def top_up(path: Path) -> None:
        missing = targets[path] - pending(path)
        next_number[path] += fill(
            path, missing, start=next_number[path], partition_keys=keys, run=runs[path]
        )

    samples: dict[str, list[Any]] = defaultdict(list)
    delivered = 0
    with erp_simulator(directory) as base_url:
        warm_up(base_url)
        for number in range(args.rounds):
            order = [(baseline, "baseline"), (backlog, "backlog")]
            for path, label in order if number % 2 == 0 else reversed(order):
                top_up(path)
                figures = in_fresh_process(
                    path, url=base_url, loop=args.loop, timeout=args.child_timeout
                )
                delivered += figures.pop("delivered")
                for name, value in figures.items():
                    samples[f"{label}_{name}"].append(round(value, 4))
        stored = received(base_url) - 1
        if stored != delivered:
            raise RuntimeError(
                f"the ERP stored {stored} events, the forwarders acknowledged {delivered}"
            )
    top_up(backlog)
    breakdown = in_fresh_process(
        backlog, loop=args.loop, timeout=args.child_timeout, profile_open=True
    )

    def median_of(name: str, places: int = 3) -> float:
        return median(samples[name], places)

    first = median_of("backlog_first_delivery_s")
    first_base = median_of("baseline_first_delivery_s")
    opened, opened_base = median_of("backlog_open_s"), median_of("baseline_open_s")
    rss, rss_empty = (
        median_of("backlog_rss_mb_after_open", 1),
        median_of("baseline_rss_mb_after_open", 1),
    )
    peak, peak_empty = median_of("backlog_rss_peak_mb", 1), median_of("baseline_rss_peak_mb", 1)
    return {
        "pending_events": filled,
        "open_s": opened,
        "first_delivery_s": first,
        "baseline_open_s": opened_base,
        "baseline_first_delivery_s": first_base,
        "open_ratio": round(opened / opened_base, 2),
        "first_delivery_ratio": round(first / first_base, 2),
        "spawn_to_first_delivery_s": median_of("backlog_spawn_to_first_delivery_s"),
        "baseline_spawn_to_first_delivery_s": median_of("baseline_spawn_to_first_delivery_s"),
        "rss_mb_empty": rss_empty,
        "rss_mb_1m": rss,
        "rss_delta_mb": round(rss - rss_empty, 1),
        "rss_ratio": round(rss / rss_empty, 3),
        "rss_delta_mb_after_first_delivery": round(
            median_of("backlog_rss_mb_after_first_delivery", 1)
            - median_of("baseline_rss_mb_after_first_delivery", 1),
            1,
        ),
        "rss_peak_delta_mb": round(peak - peak_empty, 1),
        "meets_targets": {
            f"first_delivery_under_{TARGET_FIRST_DELIVERY_S:g}s": first < TARGET_FIRST_DELIVERY_S,
            f"rss_delta_under_{TARGET_RSS_DELTA_MB:g}mb": rss - rss_empty < TARGET_RSS_DELTA_MB,
        },
        "db_mb": round(db_mb, 1),
        "fill_s": round(fill_s, 1),
        "fill_events_per_s": round(filled / fill_s),
        "open_breakdown_s": breakdown,
        "time_limited": time_limited,
        "samples": dict(samples),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--events",
        type=int,
        default=1_000_000,
        help="pending events in the backlog (default 1000000)",
    )
    parser.add_argument("--keys", type=int, default=200, help="distinct partition keys")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="restarts of each outbox; figures are medians over rounds",
    )
    parser.add_argument(
        "--fill-time-limit",
        type=float,
        default=300.0,
        help="seconds the fill may take before it is cut short",
    )
    parser.add_argument(
        "--child-timeout", type=float, default=120.0, help="seconds one measuring process may take"
    )
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where the temporary databases go (default: the system temp dir)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run to check it works (20000 events, one round)",
    )
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--spawned-at", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--profile-open", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure is not None:
        return child_main(args)
    events = 20_000 if args.quick else args.events
    if args.quick:
        args.rounds = 1
    with tempfile.TemporaryDirectory(prefix="bench-restart-", dir=args.dir) as directory:
        figures = measure(Path(directory), args, events)
    line = {
        "benchmark": "outbox_restart",
        **figures,
        "params": {
            "events": events,
            "partition_keys": args.keys,
            "rounds": args.rounds,
            "destination_max_in_flight": DestinationConfig.model_fields["max_in_flight"].default,
            "payload_bytes": len(event(0, args.keys, "backlog").payload),
            "targets": {
                "first_delivery_s": TARGET_FIRST_DELIVERY_S,
                "rss_delta_mb": TARGET_RSS_DELTA_MB,
            },
            "loop": args.loop,
            "cpu_count": os.cpu_count(),
            "quick": args.quick,
        },
    }
    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
