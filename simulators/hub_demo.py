"""`make demo-hub`: the hub of many plants on this box. Starts a 3-node NATS JetStream cluster
(R3 file storage in a temp directory), the ERP simulator, `plantsync hub init`, one relay
(`plantsync relay`) and two simulated plants (each a real outbox and forwarder publishing
through the jetstream profile), then prints every two seconds what the stream holds, what
the ERP has received (unique by Idempotency-Key, repeats) and the relay's consumer lag, until
every event has arrived (or Ctrl-C). Exits non-zero if something did not arrive or a process
died.

`python -m simulators.hub_demo --events 300 --rate 30`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nats

from simulators.nats_cluster import running_cluster

PLANTSYNC = str(Path(sys.executable).parent / "plantsync")
SITES = ("1010", "2020")


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


def _wait_for(log: Path, text: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace") if log.exists() else ""
        if text in content:
            return content
        time.sleep(0.1)
    raise TimeoutError(f"{log.name} did not say {text!r}")


async def _in_stream(urls: list[str]) -> int:
    client = await nats.connect(urls)
    try:
        return int((await client.jetstream(timeout=5).stream_info("PLANTSYNC")).state.messages)
    finally:
        await client.close()


def _lag(metrics_url: str) -> int:
    text = httpx.get(metrics_url, timeout=5).text
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("plantsync_relay_consumer_pending{")
        )
    )


def run(events: int, rate: float, directory: Path) -> int:
    processes: list[subprocess.Popen[bytes]] = []
    with running_cluster(directory / "nats") as cluster:
        print(f"hub: 3 nats-server nodes on {', '.join(cluster.urls)}", flush=True)
        erp_log = directory / "erp.log"
        processes.append(
            _start(
                [
                    sys.executable,
                    "-m",
                    "simulators.erp",
                    "--port",
                    "0",
                    "--db",
                    str(directory / "erp.db"),
                ],
                erp_log,
            )
        )
        erp_url = re.findall(r"listening on (\S+)", _wait_for(erp_log, "listening on"))[0]
        print(f"erp: simulator on {erp_url}", flush=True)
        hub_yaml = directory / "hub.yaml"
        example = Path(__file__).resolve().parents[1] / "config" / "hub.example.yaml"
        hub_yaml.write_text(
            example.read_text()
            .replace(
                "[nats://127.0.0.1:4222, nats://127.0.0.1:4223, nats://127.0.0.1:4224]",
                "[" + ", ".join(cluster.urls) + "]",
            )
            .replace("http://127.0.0.1:8480", erp_url)
            .replace("metrics_port: 9480", "metrics_port: 0")
            .replace("stats_interval: 5s", "stats_interval: 1s")
        )
        init = subprocess.run(
            [PLANTSYNC, "hub", "init", "--config", str(hub_yaml)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        print(("hub init: " + init.stdout + init.stderr).strip(), flush=True)
        if init.returncode != 0:
            return 1
        relay_log = directory / "relay.log"
        processes.append(
            _start(
                [
                    PLANTSYNC,
                    "relay",
                    "--config",
                    str(hub_yaml),
                    "--name",
                    "relay-1",
                    "--log-format",
                    "text",
                ],
                relay_log,
            )
        )
        port = re.findall(
            r"metrics on http://127\.0\.0\.1:(\d+)/metrics", _wait_for(relay_log, "/metrics")
        )[0]
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        print(f"relay: relay-1 delivering to the ERP, {metrics_url}", flush=True)
        plants = [
            _start(
                [
                    sys.executable,
                    "-m",
                    "simulators.hub_plant",
                    "--site",
                    site,
                    "--outbox",
                    str(directory / f"outbox-{site}.db"),
                    "--servers",
                    ",".join(cluster.urls),
                    "--events",
                    str(events),
                    "--rate",
                    str(rate),
                    "--orders",
                    "5",
                ],
                directory / f"plant-{site}.log",
            )
            for site in SITES
        ]
        print(
            f"plants: {', '.join(SITES)} publishing {events} confirmations each at {rate:g}/s",
            flush=True,
        )
        processes += plants
        total = events * len(SITES)
        try:
            while True:
                time.sleep(2)
                stats = httpx.get(f"{erp_url}/stats", timeout=5).json()
                stored = asyncio.run(_in_stream(cluster.urls))
                print(
                    json.dumps(
                        {
                            "in_stream": stored,
                            "erp_unique": stats["unique"],
                            "erp_repeats": stats["duplicates"],
                            "relay_lag": _lag(metrics_url),
                        }
                    ),
                    flush=True,
                )
                if stats["unique"] >= total:
                    print(f"all {total} events arrived once at the ERP", flush=True)
                    return 0
                dead = [p for p in processes if p.poll() is not None and p not in plants]
                if dead or any(p.poll() not in (None, 0) for p in plants):
                    print("a process ended; logs in " + str(directory), file=sys.stderr)
                    return 1
        except KeyboardInterrupt:
            return 130
        finally:
            for process in reversed(processes):
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
            for process in processes:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=300, help="per plant")
    parser.add_argument("--rate", type=float, default=30.0, help="events/s per plant")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="plantsync-hub-") as temp:
        return run(args.events, args.rate, Path(temp))


if __name__ == "__main__":
    sys.exit(main())
