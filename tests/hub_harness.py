"""What the hub tests, benchmark and demo share: a hub.yaml for a stream of their own, the
simulated plants (simulators.hub_plant) and relays as real processes, and the independent
oracles: the stream's own message count (JetStream's), and the ERP simulator's store, which
counts deliveries by Idempotency-Key and keeps them in arrival order, against the plants'
own numbering (`sequence`, growing per order)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.errors
import nats.js.errors

from tests.conftest import Peer, free_port, start_peer
from tests.processes import run_process

PLANTSYNC = str(Path(sys.executable).parent / "plantsync")


def write_hub_yaml(
    path: Path,
    servers: Sequence[str],
    *,
    stream: str,
    prefix: str,
    erp_url: str | None = None,
    partitions: int = 4,
    replicas: int = 3,
    ack_wait: str = "3s",
    duplicate_window: str = "1h",
    token: str | None = None,
    auth: str | None = None,
    tls: str = "{}",
    heartbeat: str = "500ms",
    member_ttl: str = "1500ms",
) -> Path:
    """`auth` (a nats.auth section in YAML flow style) wins over `token`."""
    auth = auth or (f"{{type: token, token: {token}}}" if token else "{type: none}")
    text = (
        f"nats:\n  servers: [{', '.join(servers)}]\n  auth: {auth}\n  tls: {tls}\n"
        "  timeout: 5s\n"
        f"stream:\n  name: {stream}\n  subject_pattern: {prefix}.{{site}}.{{type}}.{{key}}\n"
        f"  partitions: {partitions}\n  replicas: {replicas}\n"
        f"  duplicate_window: {duplicate_window}\n  max_age: 1d\n"
        f"  dead_letter_stream: {stream}_DLQ\n  dead_letter_subject: {prefix}-dlq\n"
        f"  journal_stream: {stream}_JOURNAL\n  journal_subject: {prefix}-journal\n"
        f"relay:\n  ack_wait: {ack_wait}\n  metrics_port: 0\n  stats_interval: 1s\n"
        f"  members_bucket: {stream}_RELAYS\n  heartbeat: {heartbeat}\n"
        f"  member_ttl: {member_ttl}\n"
    )
    if erp_url is not None:
        text += (
            f"destinations:\n  erp:\n    base_url: {erp_url}\n    path: /api/events\n"
            "    max_in_flight: 8\n    timeout: 5s\n    retry: {base: 200ms, cap: 2s}\n"
            "    circuit_breaker: {failures: 5, open_for: 1s}\n"
            "routes:\n  production.confirmation: [erp]\n"
        )
    path.write_text(text)
    return path


def plant_argv(
    site: str,
    outbox: Path,
    servers: Sequence[str],
    events: int,
    *,
    prefix: str,
    stream: str,
    rate: float = 0.0,
    orders: int = 10,
    token: str | None = None,
) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "simulators.hub_plant",
        "--site",
        site,
        "--outbox",
        str(outbox),
        "--servers",
        ",".join(servers),
        "--events",
        str(events),
        "--orders",
        str(orders),
        "--rate",
        str(rate),
        "--stream",
        stream,
        "--subject",
        f"{prefix}.{{site}}.{{type}}.{{key}}",
    ]
    return argv + (["--token", token] if token else [])


def start_relay(peers: list[Peer], hub_yaml: Path, name: str, log_dir: Path) -> Peer:
    return start_peer(
        peers,
        [PLANTSYNC, "relay", "--config", str(hub_yaml), "--name", name, "--log-format", "text"],
        log_dir / f"relay-{name}.log",
        "metrics on http",
    )


def hub_init(hub_yaml: Path) -> str:

    done = run_process(
        [PLANTSYNC, "hub", "init", "--config", str(hub_yaml)],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def stream_messages(servers: Sequence[str], stream: str, token: str | None = None) -> int:
    """How many events the stream holds: JetStream's own count, the oracle for 'nothing lost,
    nothing doubled' (each event id is stored once)."""
    client = await nats.connect(list(servers), token=token)
    try:
        for attempt in range(30):  # a node just restarted: the stream may be electing
            try:
                info = await client.jetstream(timeout=3).stream_info(stream)
                return int(info.state.messages)
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
                if attempt == 29:
                    raise
                await asyncio.sleep(0.5)
        raise AssertionError("unreachable")
    finally:
        await client.close()


def receiver_report(erp_url: str) -> dict[str, Any]:
    """What the ERP simulator received: unique events (by Idempotency-Key), repeats, and
    order violations: an order's event stored after one of the same order with a higher
    plant sequence number."""
    events = httpx.get(f"{erp_url}/events", timeout=30).json()
    last: dict[str, int] = {}
    violations = 0
    for record in events:  # arrival order
        event = record["event"]
        key, sequence = str(event["partitionkey"]), int(event["sequence"])
        if sequence < last.get(key, -1):
            violations += 1
        last[key] = max(sequence, last.get(key, -1))
    return {
        "delivered_unique": len(events),
        "duplicates_at_receiver": sum(int(r["duplicates"]) for r in events),
        "order_violations": violations,
    }


def report(name: str, **figures: Any) -> dict[str, Any]:
    line = {"scenario": name, **figures}
    print(json.dumps(line), flush=True)
    return line


async def wait_for(condition: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


__all__ = ["free_port"]
