"""The OPC UA part of the ingest benchmark (`bench/ingest.py --only opcua`): data-change
notifications per second through `OpcUaDriver` against a bare asyncua client on the same
variables of the same server, in the same run, phases in ABBA order (bare, driver, driver,
bare per round).

The server is the machine simulator in its own process, many machines on a slow production
clock: at each tick every machine's two counters and two process values change (four of its
eight variables). It writes down every round of writes (`on_publish`: the source timestamp
and how many values changed) in a file: that count, not the client under test, is the oracle
for how many notifications a client should get. Each client runs in a process of its own
(started fresh per phase, the same modules imported), so its resident memory and CPU are its
own: the driver's process stands for the gateway's ingest side. A client counts notifications
by arrival in the measured window (the rate) and by source timestamp (so that each tick
stamped inside the window is checked against the server's count for it: `delivered` is what
arrived of what the server wrote, and `lag` how long after its stamp a tick's last
notification came).

Both clients ask for the same thing on the wire: the same session timeout and keep-alive
(asyncua's health probe every `keepalive`, as the driver sets it; asyncua's default probes
every second with a one-second timeout, and a server busy writing a tick of 5,000 values
answers later than that, which asyncua takes for a dead connection), the same subscription
parameters (publishing interval, lifetime, keep-alive count, no notification cap per
publish), and per item the same sampling interval and queue size. Neither client's
notification queue is bounded: asyncua's bounded queue drops the oldest notifications of a
publish larger than its bound without a word.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Any

from _heap import freeze_as_the_daemon
from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.subscription import DataChangeEvent

from drivers.base import Reading, Sample
from drivers.opcua import OpcUaConfig, OpcUaDriver
from simulators.opcua_machine import NAMESPACE_URI, VARIABLE_TYPES, node_id_string

SERVE = "--serve-opcua"
PHASE = "--opcua-phase"
PUBLISHING_MS = 100
QUEUE_SIZE = 100
KEEPALIVE_S = 5.0
SESSION_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 60.0
"""Generous for both clients: at 50,000 items one CreateMonitoredItems takes the Python server
many seconds."""
WARMUP_S = 3.0
"""At least this long between subscribing and counting: the first publish carries every item's
current value, which is not the steady rate."""
GRACE_S = 3.0
"""After the window, how long a client keeps counting notifications stamped inside it (at least
two ticks: at 50,000 items a round of writes takes the server seconds)."""
PHASE_TIMEOUT_S = 900.0
SERVER_START_S = 20.0
"""Plus 0.1 s per machine: building the address space takes a while at thousands of them."""


def machine_names(count: int) -> list[str]:
    return [f"m{number:04d}" for number in range(count)]


def nodes(machines: int) -> list[str]:
    return [
        node_id_string(name, variable)
        for name in machine_names(machines)
        for variable in VARIABLE_TYPES
    ]


def stamp_ms(seconds: float) -> int:
    return round(seconds * 1000)


# --- the server --------------------------------------------------------------------------------


def serve(port: int, machines: int, tick: float, changes: Path) -> None:
    """The server, in its own process: `machines` machines counting fast on a `tick` clock;
    each round of writes is appended to `changes` as `<stamp ms> <values written>`."""
    import contextlib
    import logging

    from simulators.opcua_machine import OpcUaMachineServer

    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    record = changes.open("a", buffering=1)

    def written(stamp: datetime, count: int) -> None:
        record.write(f"{stamp_ms(stamp.timestamp())} {count}\n")

    async def run() -> None:
        # Rates far above one unit per tick: both counters move at every tick, and the noise
        # moves temperature and pressure: four changes per machine per tick.
        server = OpcUaMachineServer(
            "127.0.0.1",
            port,
            machines=machine_names(machines),
            rate=1000.0,
            scrap_rate=500.0,
            tick=tick,
            on_publish=written,
        )
        async with server:
            print("opcua bench server listening", flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


def read_changes(changes: Path) -> dict[int, int]:
    """What the server wrote, by source timestamp (ms)."""
    written: dict[int, int] = {}
    for line in changes.read_text().splitlines():
        stamp, count = line.split()
        written[int(stamp)] = written.get(int(stamp), 0) + int(count)
    return written


# --- one client phase, in a process of its own ------------------------------------------------


class Tally:
    """Notifications counted by arrival and by source timestamp (ms), with the arrival time of
    each timestamp's last one."""

    def __init__(self) -> None:
        self.arrived = 0
        self.by_stamp: Counter[int] = Counter()
        self.last_arrival: dict[int, float] = {}

    def add(self, source_time: float) -> None:
        self.arrived += 1
        key = stamp_ms(source_time)
        self.by_stamp[key] += 1
        self.last_arrival[key] = time.time()


def _status_kb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return 0.0


async def _window(tally: Tally, warmup: float, seconds: float, grace: float) -> dict[str, Any]:
    await asyncio.sleep(warmup)
    count, wall, cpu, started = tally.arrived, time.perf_counter(), time.process_time(), time.time()
    await asyncio.sleep(seconds)
    figures = {
        "count": tally.arrived - count,
        "seconds": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "window": [started, time.time()],
        "rss_mb": _status_kb("VmRSS:"),
        "peak_rss_mb": _status_kb("VmHWM:"),
    }
    await asyncio.sleep(grace)
    figures["by_stamp"] = dict(tally.by_stamp)
    figures["last_arrival"] = tally.last_arrival
    return figures


def subscription_parameters() -> ua.CreateSubscriptionParameters:
    """What the driver asks for at PUBLISHING_MS and KEEPALIVE_S (drivers/opcua/subscription)."""
    keepalive_count = max(1, math.ceil(KEEPALIVE_S * 1000 / PUBLISHING_MS))
    return ua.CreateSubscriptionParameters(
        RequestedPublishingInterval=PUBLISHING_MS,
        RequestedLifetimeCount=max(
            3 * keepalive_count, math.ceil(SESSION_TIMEOUT_S * 1000 / PUBLISHING_MS)
        ),
        RequestedMaxKeepAliveCount=keepalive_count,
        MaxNotificationsPerPublish=0,
        PublishingEnabled=True,
        Priority=0,
    )


async def bare_phase(endpoint: str, machines: int, warmup: float, seconds: float) -> dict[str, Any]:
    client = Client(endpoint, timeout=REQUEST_TIMEOUT_S, watchdog_intervall=KEEPALIVE_S)
    client.session_timeout = int(SESSION_TIMEOUT_S * 1000)
    await client.connect()
    try:
        namespace = await client.get_namespace_index(NAMESPACE_URI)
        items = [
            client.get_node(node.replace(f"nsu={NAMESPACE_URI}", f"ns={namespace}"))
            for node in nodes(machines)
        ]
        subscription = await client.create_subscription(
            subscription_parameters(), None, queue_maxsize=0
        )
        await subscription.subscribe_data_change(
            items, queuesize=QUEUE_SIZE, sampling_interval=ua.Double(0)
        )
        tally = Tally()

        async def consume() -> None:
            async for event in subscription:
                if isinstance(event, DataChangeEvent):
                    value = event.data.monitored_item.Value
                    stamp = value.SourceTimestamp if value is not None else None
                    tally.add(stamp.timestamp() if stamp is not None else time.time())

        async with asyncio.TaskGroup() as tasks:
            consumer = tasks.create_task(consume(), name="bench-opcua-bare")
            figures = await _window(tally, warmup, seconds, max(GRACE_S, warmup))
            consumer.cancel()
        return figures
    finally:
        await client.disconnect()


async def driver_phase(
    endpoint: str, machines: int, warmup: float, seconds: float
) -> dict[str, Any]:
    config = OpcUaConfig.model_validate(
        {
            "name": "bench",
            "type": "opcua",
            "endpoint": endpoint,
            "publishing_interval": f"{PUBLISHING_MS}ms",
            "keepalive": f"{KEEPALIVE_S}s",
            "session_timeout": f"{SESSION_TIMEOUT_S}s",
            "timeout": f"{REQUEST_TIMEOUT_S}s",
            "tags": [
                {
                    "name": f"t{index}",
                    "node": node,
                    "queue_size": QUEUE_SIZE,
                    "sampling_interval": 0,
                }
                for index, node in enumerate(nodes(machines))
            ],
        }
    )
    driver = OpcUaDriver(config)
    tally = Tally()

    async def count(readings: Sequence[Reading]) -> None:
        for reading in readings:
            if isinstance(reading, Sample):
                tally.add(reading.source_time)

    async with asyncio.TaskGroup() as tasks:
        running = tasks.create_task(driver.run(count), name="bench-opcua-driver")
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        while not driver.health.connected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the OPC UA driver did not connect: {driver.health}")
            await asyncio.sleep(0.05)
        figures = await _window(tally, warmup, seconds, max(GRACE_S, warmup))
        running.cancel()
    figures["dropped_samples"] = driver.dropped_samples
    return figures


def phase_main(argv: Sequence[str]) -> None:
    """`ingest.py --opcua-phase bare|driver ENDPOINT MACHINES WARMUP SECONDS`: one JSON line."""
    kind, endpoint, machines, warmup, seconds = argv
    freeze_as_the_daemon()  # unless the parent was told not to
    phase = bare_phase if kind == "bare" else driver_phase
    figures = asyncio.run(phase(endpoint, int(machines), float(warmup), float(seconds)))
    print(json.dumps(figures))


# --- the benchmark -----------------------------------------------------------------------------


def run_phase(
    script: Path, kind: str, endpoint: str, machines: int, warmup: float, seconds: float
) -> dict[str, Any]:
    argv = [sys.executable, str(script), PHASE, kind, endpoint, str(machines), str(warmup)]
    done = subprocess.run(
        [*argv, str(seconds)],
        capture_output=True,
        text=True,
        timeout=PHASE_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {kind} phase failed ({done.returncode}): {done.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def judge(figures: dict[str, Any], written: dict[int, int]) -> dict[str, Any]:
    """One phase against the server's own count: the ticks stamped inside its window."""
    start, end = (stamp_ms(t) for t in figures["window"])
    by_stamp = {int(k): v for k, v in figures["by_stamp"].items()}
    last_arrival = {int(k): v for k, v in figures["last_arrival"].items()}
    ticks = sorted(stamp for stamp in written if start <= stamp < end)
    expected = sum(written[stamp] for stamp in ticks)
    received = sum(min(by_stamp.get(stamp, 0), written[stamp]) for stamp in ticks)
    extra = sum(max(0, by_stamp.get(stamp, 0) - written[stamp]) for stamp in ticks)
    lags = [last_arrival[stamp] - stamp / 1000 for stamp in ticks if stamp in last_arrival]
    seconds = figures["seconds"]
    return {
        "count": figures["count"],
        "seconds": round(seconds, 3),
        "rate": round(figures["count"] / seconds, 1) if seconds else 0.0,
        "cpu_us": round(figures["cpu_s"] / figures["count"] * 1e6, 1) if figures["count"] else 0.0,
        "cpu_percent": round(figures["cpu_s"] / seconds * 100, 1) if seconds else 0.0,
        "rss_mb": round(figures["rss_mb"], 1),
        "peak_rss_mb": round(figures["peak_rss_mb"], 1),
        "ticks": len(ticks),
        "server_wrote": expected,
        "delivered": received,
        "lost": expected - received,
        "share": round(received / expected, 4) if expected else 0.0,
        "extra": extra,
        "max_lag_s": round(max(lags), 2) if lags else None,
        **({"dropped_samples": figures["dropped_samples"]} if "dropped_samples" in figures else {}),
    }


def bench(
    script: Path,
    child: Callable[[list[str], str, Path, float], AbstractContextManager[Any]],
    machines: int,
    tick: float,
    seconds: float,
    rounds: int,
    scratch: Path,
) -> dict[str, Any]:
    """Serve `machines` machines ticking every `tick` s from `script` (`child` starts it, as
    `bench/ingest.py` starts its peers) and run `rounds` of ABBA phases of `seconds` each."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    endpoint = f"opc.tcp://127.0.0.1:{port}"
    changes = scratch / "opcua-changes.txt"
    argv = [sys.executable, str(script), SERVE, str(port), str(machines), str(tick), str(changes)]
    warmup = max(WARMUP_S, 2 * tick)
    load_start = round(os.getloadavg()[0], 2)
    raw: dict[str, list[dict[str, Any]]] = {"bare": [], "driver": []}
    order: list[str] = []
    with child(argv, "listening", scratch / "opcua-server.log", SERVER_START_S + machines * 0.1):
        for _ in range(rounds):
            for kind in ("bare", "driver", "driver", "bare"):
                raw[kind].append(run_phase(script, kind, endpoint, machines, warmup, seconds))
                order.append(kind)
    written = read_changes(changes)
    phases = {kind: [judge(figures, written) for figures in runs] for kind, runs in raw.items()}

    def mid(kind: str, key: str) -> float:
        return float(statistics.median([phase[key] for phase in phases[kind]]))

    bare_rate, driver_rate = mid("bare", "rate"), mid("driver", "rate")
    # A window holds a whole number of ticks (10 or 11 of 5,000 changes...), so raw rates
    # differ by a tick between phases; the share of what the server wrote in each window
    # that a client received compares the two at the same offered load.
    bare_share, driver_share = mid("bare", "share"), mid("driver", "share")
    bare_cpu, driver_cpu = mid("bare", "cpu_us"), mid("driver", "cpu_us")
    offered = statistics.median(
        [phase["server_wrote"] / phase["seconds"] for runs in phases.values() for phase in runs]
    )
    return {
        "machines": machines,
        "monitored_items": machines * len(VARIABLE_TYPES),
        "tick_ms": round(tick * 1000),
        "publishing_interval_ms": PUBLISHING_MS,
        "server_offered_per_s": round(offered),
        "driver_notifications_per_s": round(driver_rate),
        "bare_notifications_per_s": round(bare_rate),
        "ratio": round(driver_share / bare_share, 3) if bare_share else None,
        "ratio_basis": "share of the server's writes in each window received, driver / bare",
        "driver_share_received": driver_share,
        "bare_share_received": bare_share,
        "rate_ratio": round(driver_rate / bare_rate, 3) if bare_rate else None,
        "driver_lost": sum(phase["lost"] for phase in phases["driver"]),
        "bare_lost": sum(phase["lost"] for phase in phases["bare"]),
        "driver_cpu_us_per_notification": driver_cpu,
        "bare_cpu_us_per_notification": bare_cpu,
        # What one core could take at that cost: the ceiling once the server is faster.
        "driver_capacity_per_core": round(1e6 / driver_cpu) if driver_cpu else None,
        "bare_capacity_per_core": round(1e6 / bare_cpu) if bare_cpu else None,
        "capacity_ratio": round(bare_cpu / driver_cpu, 3) if driver_cpu else None,
        "driver_cpu_percent": mid("driver", "cpu_percent"),
        "bare_cpu_percent": mid("bare", "cpu_percent"),
        "driver_rss_mb": mid("driver", "rss_mb"),
        "bare_rss_mb": mid("bare", "rss_mb"),
        "driver_peak_rss_mb": mid("driver", "peak_rss_mb"),
        "bare_peak_rss_mb": mid("bare", "peak_rss_mb"),
        "order": order,
        "load_average_1m": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "samples": phases,
    }
