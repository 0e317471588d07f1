"""What the forwarder and outbox benchmarks share: the confirmation-shaped events they commit,
the ERP simulator they deliver to (a subprocess on a free loopback port), the wait for a
forwarder to deliver, and the event loop and medians they measure with. The leading underscore
keeps `bench/run.py` from taking this module for a benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from buffer.outbox import OutboxEvent
from edge.forward import HttpForwarder

REPO = Path(__file__).resolve().parents[1]
DESTINATION = "erp"
EVENT_TYPE = "production.confirmation"
SIMULATOR_START_TIMEOUT = 15.0
SIMULATOR_STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Phase:
    """What one timed phase got through: `done` units in `seconds`, cut short or not."""

    done: int
    seconds: float
    time_limited: bool
    requests: int = 0

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


def confirmation_event(
    number: int, partition_keys: int, event_id: str, priority: int = 1
) -> OutboxEvent:
    """A confirmation-shaped CloudEvent of realistic size (~400 bytes), its order by number."""
    order = f"order/{1000000 + number % partition_keys:012d}"
    cloud_event = {
        "specversion": "1.0",
        "id": event_id,
        "source": "urn:plantsync:1010:press-01",
        "type": EVENT_TYPE,
        "time": "2024-05-01T06:00:00.000Z",
        "subject": f"{order}/0010",
        "datacontenttype": "application/json",
        "dataschema": f"urn:plantsync:schema:{EVENT_TYPE}:1",
        "partitionkey": order,
        "sequence": f"{number:020d}",
        "data": {
            "good_count": 120,
            "lot_id": f"LOT-{number:08d}",
            "operation": "0010",
            "order_id": order[6:],
            "scrap_count": 2,
            "uom": "PCE",
            "work_center": "PRESS01",
        },
    }
    payload = json.dumps(cloud_event, separators=(",", ":")).encode()
    return OutboxEvent(
        id=event_id,
        type=EVENT_TYPE,
        partition_key=order,
        payload=payload,
        destinations=(DESTINATION,),
        priority=priority,
    )


def make_events(count: int, partition_keys: int, run: str) -> list[OutboxEvent]:
    """`count` confirmation events spread over `partition_keys` orders, ids unique to `run`."""
    return [
        confirmation_event(number, partition_keys, f"bench-{run}-{number:08d}")
        for number in range(count)
    ]


def chunks(events: Sequence[OutboxEvent], size: int) -> Iterator[Sequence[OutboxEvent]]:
    for start in range(0, len(events), size):
        yield events[start : start + size]


@contextlib.contextmanager
def erp_simulator(directory: Path, server: str = "uvicorn") -> Iterator[str]:
    """The real ERP simulator as a subprocess on a free loopback port; yields its base URL.
    `server="hypercorn"`: its app on Hypercorn, which also speaks HTTP/2 (bench/_h2_receiver)."""
    errors_path = directory / f"erp-api-{server}.stderr"
    database = str(directory / f"erp-{server}.sqlite")
    argv = (
        [
            sys.executable,
            "-m",
            "simulators.erp",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--db",
            database,
        ]
        if server == "uvicorn"
        else [sys.executable, str(REPO / "bench" / "_h2_receiver.py"), database]
    )
    with errors_path.open("wb") as errors:
        process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=errors)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], SIMULATOR_START_TIMEOUT)
        text = process.stdout.readline().decode().strip() if ready else ""
        prefix = "erp-api listening on "
        if not text.startswith(prefix):
            stderr_tail = errors_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the ERP simulator did not start: {text!r} {stderr_tail}")
        yield text.removeprefix(prefix)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(SIMULATOR_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def reset_simulator(client: httpx.AsyncClient, base_url: str) -> None:
    response = await client.post(f"{base_url}/_sim/reset")
    response.raise_for_status()


async def simulator_unique(client: httpx.AsyncClient, base_url: str) -> int:
    """How many distinct events the simulator has stored."""
    response = await client.get(f"{base_url}/stats")
    response.raise_for_status()
    return int(response.json()["unique"])


async def until_delivered(forwarder: HttpForwarder, count: int, deadline: float) -> None:
    """Wait until `forwarder` has delivered `count` events, failed once, or `deadline`
    (perf_counter) has passed."""
    health = forwarder.health
    # The forwarder has no "empty" signal; poll its counters, which costs no I/O.
    while (  # noqa: ASYNC110
        health.delivered < count and health.failures == 0 and time.perf_counter() < deadline
    ):
        await asyncio.sleep(0.002)


def median(values: Sequence[float], places: int = 1) -> float:
    return round(statistics.median(values), places)


def event_loop_runner(name: str) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """The daemon runs on uvloop when it is installed (edge.cli); measure on the same loop."""
    if name == "uvloop":
        import uvloop

        return uvloop.run
    return asyncio.run


def free_ports(count: int) -> list[int]:
    """`count` different free loopback ports (the sockets are held until all are picked)."""
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
