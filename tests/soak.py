"""Soak run: the real daemon for an hour at a plant's load, watched for leaks.

Not a pytest module (its name does not start with `test_`): run it as
`.venv/bin/python tests/soak.py [--duration 3600]`, which is what `make soak` does.

The plant: 50 machines and about 5,000 tags. Forty Modbus machines, each its own driver polling
123 tags every second (counters, state, a float32 process value with limits, an int16, and 118
more registers) from two PLC simulators; ten machines on one OPC UA simulator, all eight
variables each, published every 500 ms; MES consumption messages over mosquitto at `--mes-rate`
a second for the Modbus machines' orders. Confirmations every 50 units and every minute,
everything routed to the ERP simulator.

Every `--interval` seconds (30) it samples the daemon process: resident memory (VmRSS), open
files (/proc/PID/fd), threads (/proc/PID/status Threads; the daemon exposes no asyncio task
count on /metrics or /status, and nothing is added to it for this), CPU, and the gateway's own
figures (events committed, delivered, owed). At the end the inputs stop, the outbox drains, the
gateway stops gracefully and every id the outbox committed, and every MES message the broker
accepted, is looked up in ERP's store. It prints one JSON report: start, end and max of each
series, a least-squares slope per hour after the warm-up (`--warmup`, default a fifth of the run
up to 5 min), events delivered, lost, and whether each target holds:

- RSS under 200 MB at every sample;
- flat: |slope| of RSS under 10 MB/h, of open files under 10/h, of threads under 5/h, or a
  fitted change over the run (slope x hours) under 5 MB, 3 files, 2 threads (a short run's
  noise is not a trend);
- nothing lost, nothing held twice at ERP.

It exits 1 if a target fails, 2 if the run itself could not be made. Logs and databases stay
in `--dir` (a new temporary directory by default; its path is in the report).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from edge.model.events import EVENT_MODELS  # noqa: E402
from edge.model.ids import event_id  # noqa: E402
from simulators.mes_publisher import MesPublisher  # noqa: E402
from tests.conftest import Mosquitto, free_port  # noqa: E402
from tests.processes import spawn  # noqa: E402

SITE = "1010"
MODBUS_MACHINES = 40
MODBUS_PLCS = 2
OPCUA_MACHINES = 10
EXTRA_REGISTERS = range(100, 218)  # 118 uint16 tags besides the press's own 5
OPCUA_VARIABLES = [
    "Status.StateCurrent",
    "Admin.ProdProcessedCount",
    "Admin.ProdDefectiveCount",
    "Admin.StopReason",
    "Admin.StopReasonText",
    "Process.Temperature",
    "Process.Pressure",
    "Process.Speed",
]
RSS_LIMIT_MB = 200.0
FLAT = {"rss_mb": (10.0, 5.0), "open_files": (10.0, 3.0), "threads": (5.0, 2.0)}
"""Per series: (largest |slope| per hour, largest fitted change over the run) still flat."""
TASKS_NOTE = (
    "asyncio tasks are not exposed by /metrics or /status; threads are counted "
    "instead, from /proc/PID/status Threads"
)


class Child:
    """A process of the soak, its output in a log file, ready once a line appears."""

    def __init__(self, name: str, argv: list[str], directory: Path, ready: str) -> None:
        self.name = name
        self.log = directory / f"{name}.log"
        with self.log.open("ab") as out:
            self.process = spawn(
                argv,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + 90
        while not re.search(ready, self.log.read_text(errors="replace")):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


# -- the plant ----------------------------------------------------------------------------------


def modbus_name(number: int) -> str:
    return f"press-{number:02d}"


def opcua_name(number: int) -> str:
    return f"filler-{number + 2:02d}"


def order_of(machine: str) -> str:
    digits = re.sub(r"\D", "", machine)
    return f"{'72' if machine.startswith('press') else '73'}{int(digits):05d}"


def write_config(
    directory: Path,
    plc_ports: list[int],
    opcua_port: int,
    broker: Mosquitto,
    erp_url: str,
    api_port: int,
) -> tuple[Path, int]:
    drivers, machines, tags = [], [], 0
    for number in range(MODBUS_MACHINES):
        name = modbus_name(number)
        extra = "".join(
            f"\n      - {{name: r{address}, address: {address}}}" for address in EXTRA_REGISTERS
        )
        drivers.append(f"""
  - name: {name}
    type: modbus
    host: 127.0.0.1
    port: {plc_ports[number % len(plc_ports)]}
    unit: {number + 1}
    poll_interval: 1s
    timeout: 2s
    tags:
      - {{name: good, address: 0, type: uint32}}
      - {{name: bad, address: 2, type: uint32}}
      - {{name: state, address: 10, type: uint16}}
      - {{name: force, address: 20, type: float32}}
      - {{name: temperature, address: 30, type: int16}}{extra}""")
        tags += 5 + len(EXTRA_REGISTERS)
        machines.append(f"""
  - id: {name}
    line: LINE-{number % 4}
    signals: {{good: {name}.good, defective: {name}.bad, state: {name}.state}}
    order: {{order_id: "{order_of(name)}", operation: "0010", material: FG-4711}}
    confirm: {{every_units: 50, every: 1m}}
    state_map: {{4: Idle, 6: Execute, 11: Held, 17: Complete}}
    limits:
      - {{signal: {name}.force, low: 12.0, high: 15.0, for: 5s, uom: NEW}}""")
    namespace = "nsu=urn:plantsync:sim:machine;s="
    opcua_tags = []
    for number in range(OPCUA_MACHINES):
        name = opcua_name(number)
        opcua_tags += [
            f"\n      - {{name: {name}-{variable.replace('.', '-')}, "
            f'node: "{namespace}{name}.{variable}"}}'
            for variable in OPCUA_VARIABLES
        ]
        tags += len(OPCUA_VARIABLES)
        machines.append(f"""
  - id: {name}
    line: LINE-F
    signals: {{processed: fillers.{name}-Admin-ProdProcessedCount,
              defective: fillers.{name}-Admin-ProdDefectiveCount,
              state: fillers.{name}-Status-StateCurrent,
              stop_reason: fillers.{name}-Admin-StopReason}}
    order: {{order_id: "{order_of(name)}", operation: "0010"}}
    confirm: {{every_units: 50, every: 1m}}
    state_map: {{2: Stopped, 4: Idle, 6: Execute, 11: Held, 17: Complete}}""")
    drivers.append(f"""
  - name: fillers
    type: opcua
    endpoint: "opc.tcp://127.0.0.1:{opcua_port}"
    publishing_interval: 500ms
    tags:{"".join(opcua_tags)}""")
    drivers.append(f"""
  - name: mes
    type: mqtt
    host: {broker.host}
    port: {broker.port}
    client_id: plantsync-soak-{uuid.uuid4().hex[:8]}
    topics:
      - filter: mes/{SITE}/+/consumption
        event: material.consumed
        fields: {{order_id: order_id, material: material, lot_id: lot_id,
                 quantity.value: quantity, quantity.uom: uom, occurred_at: occurred_at}}""")
    routes = "".join(f"\n  {event_type}: [erp]" for event_type in sorted(EVENT_MODELS))
    config = directory / "plant.yaml"
    config.write_text(f"""
site: "{SITE}"
data_dir: {directory / "data"}
api: {{listen: "127.0.0.1:{api_port}"}}
shutdown_timeout: 20s
drivers:{"".join(drivers)}
machines:{"".join(machines)}
destinations:
  erp:
    base_url: {erp_url}
    path: /api/events
    max_in_flight: 4
    retry: {{base: 500ms, cap: 30s}}
routes:{routes}
""")
    return config, tags


# -- MES messages -------------------------------------------------------------------------------


class MesTraffic:
    """Consumption messages at `rate` a second, round robin over the Modbus machines' orders."""

    def __init__(self, broker: Mosquitto, rate: float) -> None:
        self.publisher = MesPublisher(
            broker.host,
            broker.port,
            site=SITE,
            machine="press-00",
            run=uuid.uuid4().hex[:12],
            window=5000,
        )
        self.publisher.connect()
        self.rate = rate
        self.message_ids: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mes", daemon=True)

    def _run(self) -> None:
        started, number = time.monotonic(), 0
        while not self.stopping.is_set():
            machine = modbus_name(number % MODBUS_MACHINES)
            publication = self.publisher.consume(
                order_of(machine), "RM-STEEL", f"RM-{number:08d}", Decimal("2.500")
            )
            assert publication.message_id is not None
            self.message_ids.append(publication.message_id)
            number += 1
            self.stopping.wait(max(0.0, started + number / self.rate - time.monotonic()))

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(30)
        self.publisher.close(60)

    def expected(self) -> set[str]:
        return {
            event_id("material.consumed", SITE, "material.consumed", mid)
            for mid in self.message_ids
        }


# -- sampling -----------------------------------------------------------------------------------


@dataclass
class Series:
    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, at: float, value: float) -> None:
        self.times.append(at)
        self.values.append(value)

    def slope_per_hour(self, since: float) -> float:
        """Least-squares slope of the samples at or after `since`, per hour."""
        points = [(t, v) for t, v in zip(self.times, self.values, strict=True) if t >= since]
        if len(points) < 2:
            return 0.0
        mean_t = sum(t for t, _ in points) / len(points)
        mean_v = sum(v for _, v in points) / len(points)
        spread = sum((t - mean_t) ** 2 for t, _ in points)
        if spread == 0:
            return 0.0
        slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / spread
        return slope * 3600.0

    def summary(self, since: float, run_hours: float) -> dict[str, Any]:
        slope = self.slope_per_hour(since)
        return {
            "start": round(self.values[0], 1),
            "end": round(self.values[-1], 1),
            "max": round(max(self.values), 1),
            "min": round(min(self.values), 1),
            "slope_per_hour": round(slope, 2),
            "fitted_change_over_run": round(slope * run_hours, 2),
        }


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def cpu_seconds(pid: int) -> float:
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def metrics(api: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in httpx.get(f"{api}/metrics", timeout=10).text.splitlines():
        match = re.fullmatch(r"([a-z_]+?)(?:_total)?(\{[^}]*\})? ([-+0-9.eEinfa]+)", line)
        if match and not line.startswith("#"):
            if match[1] == "plantsync_outbox_depth" and 'state="pending"' not in line:
                continue
            found[match[1]] = found.get(match[1], 0.0) + float(match[3])
    return found


def query(database: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=60)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


# -- the run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    children: list[Child] = []
    broker = Mosquitto(shutil.which("mosquitto") or "/usr/sbin/mosquitto", directory / "mosquitto")
    broker.directory.mkdir(parents=True, exist_ok=True)
    broker.start()
    mes: MesTraffic | None = None
    gateway: Child | None = None
    try:
        erp_db = directory / "erp.db"
        erp = Child(
            "erp",
            [sys.executable, "-m", "simulators.erp", "--port", "0", "--db", str(erp_db)],
            directory,
            r"erp-api listening on http://\S+",
        )
        children.append(erp)
        erp_url = re.search(r"listening on (http://\S+)", erp.log.read_text())[1]  # type: ignore[index]
        plc_ports = []
        for number in range(MODBUS_PLCS):
            port = free_port()
            children.append(
                Child(
                    f"plc-{number}",
                    [
                        sys.executable,
                        "-m",
                        "simulators.modbus_plc",
                        "--port",
                        str(port),
                        "--rate",
                        str(args.rate),
                        "--scrap-rate",
                        str(args.rate / 25),
                    ],
                    directory,
                    "modbus-plc listening",
                )
            )
            plc_ports.append(port)
        opcua_port = free_port()
        children.append(
            Child(
                "opcua",
                [
                    sys.executable,
                    "-m",
                    "simulators.opcua_machine",
                    "--port",
                    str(opcua_port),
                    "--machines",
                    str(OPCUA_MACHINES),
                    "--rate",
                    str(args.rate),
                    "--scrap-rate",
                    str(args.rate / 25),
                ],
                directory,
                "opcua-machine listening",
            )
        )
        api_port = free_port()
        config, tags = write_config(directory, plc_ports, opcua_port, broker, erp_url, api_port)
        api = f"http://127.0.0.1:{api_port}"
        gateway = Child(
            "gateway",
            [
                sys.executable,
                "-m",
                "edge.cli",
                "run",
                "--config",
                str(config),
                "--log-format",
                "text",
            ],
            directory,
            "PlantSync Edge is running",
        )
        deadline = time.monotonic() + 60
        while "connected as" not in gateway.log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError("the MQTT driver did not connect")
            time.sleep(0.2)
        mes = MesTraffic(broker, args.mes_rate)
        mes.thread.start()

        series = {name: Series() for name in ("rss_mb", "open_files", "threads")}
        samples: list[dict[str, Any]] = []
        started = time.monotonic()
        cpu_start = cpu_seconds(gateway.pid)
        next_sample = started
        while True:
            now = time.monotonic()
            elapsed = now - started
            status = proc_status(gateway.pid)
            rss = int(status["VmRSS"].split()[0]) / 1024
            files = len(os.listdir(f"/proc/{gateway.pid}/fd"))
            threads = int(status["Threads"])
            for name, value in (("rss_mb", rss), ("open_files", files), ("threads", threads)):
                series[name].add(elapsed, value)
            try:
                figures = metrics(api)
            except httpx.HTTPError:
                figures = {}
            sample = {
                "t": round(elapsed, 1),
                "rss_mb": round(rss, 1),
                "open_files": files,
                "threads": threads,
                "cpu_percent": round(100 * (cpu_seconds(gateway.pid) - cpu_start) / elapsed, 1)
                if elapsed >= 1
                else None,
                "samples": int(figures.get("plantsync_driver_samples", 0)),
                "events": int(figures.get("plantsync_events", 0)),
                "delivered": int(figures.get("plantsync_outbox_delivered", 0)),
                "owed": int(figures.get("plantsync_outbox_depth", 0)),
                "mes_published": len(mes.message_ids),
            }
            samples.append(sample)
            print(json.dumps({"soak_sample": sample}), file=sys.stderr, flush=True)
            if gateway.process.poll() is not None:
                raise RuntimeError(f"the gateway exited with {gateway.process.returncode}")
            if elapsed >= args.duration:
                break
            next_sample += args.interval
            time.sleep(max(0.0, min(next_sample, started + args.duration) - time.monotonic()))
        run_s = time.monotonic() - started
        cpu_percent = 100 * (cpu_seconds(gateway.pid) - cpu_start) / run_s

        # The end: inputs stop, the outbox drains, the gateway stops, ERP is read.
        mes.stop()
        for child in children[1:]:
            child.stop()
        database = directory / "data" / "outbox.db"
        deadline = time.monotonic() + 300
        while query(database, "SELECT COUNT(*) FROM deliveries")[0][0]:
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
        stopped = gateway.stop()
        committed = {row[0] for row in query(database, "SELECT id FROM event_ids")}
        owed = query(database, "SELECT COUNT(*) FROM deliveries")[0][0]
        held = [row[0] for row in query(erp_db, "SELECT event_id FROM received_events")]
        duplicates_absorbed = query(
            erp_db, "SELECT COALESCE(SUM(duplicates), 0) FROM received_events"
        )[0][0]
        expected = committed | mes.expected()
        lost = expected - set(held)
        mes_lost = mes.expected() - set(held)
    finally:
        if mes is not None and not mes.stopping.is_set():
            mes.stopping.set()
        for child in reversed([*children, *([gateway] if gateway else [])]):
            child.stop()
        broker.stop()

    warmup = args.warmup if args.warmup is not None else min(300.0, args.duration / 5)
    hours = max(run_s - warmup, 1e-9) / 3600
    summaries = {name: s.summary(warmup, hours) for name, s in series.items()}
    for name, summary in summaries.items():
        summary["flat_limits"] = {
            "slope_per_hour": FLAT[name][0],
            "fitted_change_over_run": FLAT[name][1],
        }
    flat = {
        name: abs(s["slope_per_hour"]) <= FLAT[name][0]
        or abs(s["fitted_change_over_run"]) <= FLAT[name][1]
        for name, s in summaries.items()
    }
    targets = {
        "rss_under_200mb": summaries["rss_mb"]["max"] < RSS_LIMIT_MB,
        **{f"{name}_flat": ok for name, ok in flat.items()},
        "nothing_lost": not lost,
        "nothing_held_twice": len(held) == len(set(held)),
        "outbox_drained": owed == 0,
        "graceful_stop": stopped == 0,
    }
    return {
        "soak": {
            "duration_s": round(run_s, 1),
            "interval_s": args.interval,
            "warmup_s": warmup,
            "machines": MODBUS_MACHINES + OPCUA_MACHINES,
            "tags": tags,
            "modbus_poll": "1s",
            "opcua_publishing": "500ms",
            "counting_per_machine_per_s": args.rate,
            "mes_per_s": args.mes_rate,
        },
        "rss_mb": summaries["rss_mb"],
        "open_files": summaries["open_files"],
        "threads": summaries["threads"],
        "tasks": TASKS_NOTE,
        "cpu_percent": round(cpu_percent, 1),
        "tag_samples_per_s": round(
            (samples[-1]["samples"] - samples[0]["samples"])
            / max(samples[-1]["t"] - samples[0]["t"], 1e-9)
        ),
        "events_committed": len(committed),
        "mes_published": len(mes.message_ids),
        "events_delivered": len(set(held) & expected),
        "lost": len(lost),
        "mes_lost": len(mes_lost),
        "held_twice": len(held) - len(set(held)),
        "duplicate_deliveries": int(duplicates_absorbed),
        "owed_at_end": owed,
        "targets": targets,
        "ok": all(targets.values()),
        "directory": str(directory),
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds (default 3600)")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds left out of the slopes (default: a fifth, at most 300)",
    )
    parser.add_argument(
        "--rate", type=float, default=5.0, help="good units a second each machine counts"
    )
    parser.add_argument("--mes-rate", type=float, default=2.0, help="MES messages a second")
    parser.add_argument("--dir", type=Path, default=None, help="where logs and databases go")
    args = parser.parse_args(argv)
    directory = args.dir or Path(tempfile.mkdtemp(prefix="plantsync-soak-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        report = run(args, directory)
    except Exception as exc:  # the run could not be made: say why, exit 2
        print(
            json.dumps(
                {
                    "soak": "failed",
                    "error": f"{type(exc).__name__}: {exc}",
                    "directory": str(directory),
                }
            ),
            flush=True,
        )
        return 2
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
