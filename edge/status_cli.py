"""`plantsync status --config FILE`: the gateway on one screen, for the technician.

Drivers (connected, last sample age), machines (bound order, state, counts, unassigned
production), the outbox per destination (pending, retrying, dead, oldest) and the most recent
dead letters. It asks the running daemon (`/status` and the outbox operations on its local API);
when no daemon answers, it reads the database itself: machines from the committed rule state,
the outbox as it stands, and drivers as unknown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any, Literal

import httpx

from buffer.outbox import DestinationCounts, Outbox
from drivers.base import finite_json
from edge.config import ConfigError, PlantConfig, load_config
from edge.operations import DaemonRefused, call
from edge.outbox_cli import format_age
from edge.secrets import scrub, secret_values

RECENT_DEAD = 5
Source = Literal["daemon", "database"]


def add_status_parser(commands: Any) -> None:
    status = commands.add_parser("status", help="drivers, machines, outbox and recent dead "
                                 "letters on one screen (from the daemon, or the database "
                                 "when it is down)")
    status.add_argument("--config", "-c", required=True, type=Path)
    status.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_status_command(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    try:
        report, source = asyncio.run(gather(config))
    except DaemonRefused as exc:
        print(exc, file=sys.stderr)
        return 1
    report = scrub(report, secret_values(config))
    if args.json:
        print(json.dumps(finite_json({**report, "source": source}), indent=2, default=str,
                         allow_nan=False))
    else:
        print(render(report, source))
    return 0


async def gather(config: PlantConfig) -> tuple[dict[str, Any], Source]:
    """The status, and the dead letters, from the daemon or else from the database."""
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            response = await client.get(f"http://{config.api.listen}/status")
    except httpx.ConnectError:
        return await from_database(config), "database"
    if response.status_code != 200:
        raise DaemonRefused(f"the daemon answered {response.status_code}: {response.text}")
    report: dict[str, Any] = response.json()
    # /status holds counts refreshed every few seconds; the outbox's own are live, and match
    # the dead letters listed below them.
    live, _ = await call(config, "status", {})
    nothing_owed = vars(DestinationCounts())
    for name, counts in {**{name: nothing_owed for name in report["destinations"]},
                         **live["destinations"]}.items():
        shown = report["destinations"].get(name) or report.setdefault(
            "unconfigured_destinations", {}).setdefault(name, {})
        shown.update(counts)
    dead, _ = await call(config, "list", {"state": "dead", "limit": 1000})
    report["dead_letters"] = dead
    return report, "daemon"


async def from_database(config: PlantConfig) -> dict[str, Any]:
    from edge.daemon import machine_status
    from edge.pipeline import Pipeline

    outbox = await Outbox.open(config.database_path)
    try:
        rules = Pipeline(config, outbox, await outbox.load_state()).rules
        counts = await outbox.counts()
        dead = await outbox.deliveries(state="dead", limit=1000)
        return {
            "site": config.site,
            "drivers": [{"name": d.name, "connected": None, "last_sample_age": None,
                         "errors": None, "last_error": None} for d in config.drivers],
            "machines": [machine_status(rule) for rule in rules],
            "destinations": {name: vars(c) for name, c in sorted(counts.items())},
            "outbox": {"back_pressure": outbox.back_pressure, "used_bytes": outbox.used_bytes,
                       "alarms": [f"a damaged database was moved aside: {where}"
                                  for where in [outbox.recovered_from] if where]},
            "dead_letters": dead,
        }
    finally:
        await outbox.close()


def _cell(value: Any, missing: str = "-") -> str:
    return missing if value is None else str(value)


def _short(text: str | None, width: int = 60) -> str:
    if not text:
        return "-"
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def render(report: dict[str, Any], source: Source) -> str:
    lines: list[str] = []
    if source == "daemon":
        state = "READY" if report.get("ready", True) else "NOT READY"
        uptime = format_age(report.get("uptime_seconds"))
        lines.append(f"PlantSync Edge, site {report['site']}: {report.get('phase', 'running')} "
                     f"for {uptime}, {state}  (from the running daemon)")
    else:
        lines.append(f"PlantSync Edge, site {report['site']}: the daemon is not answering  "
                     "(from the database directly)")
    lines += [f"  not ready: {reason}" for reason in report.get("not_ready_reasons", [])]
    lines += [f"  note: {note}" for note in report.get("degraded", [])]
    lines += [f"  ALARM: {alarm}" for alarm in report.get("outbox", {}).get("alarms", [])]
    if pressure := report.get("outbox", {}).get("back_pressure"):
        lines.append(f"  BACK-PRESSURE: {pressure}")

    lines += ["", f"{'DRIVERS':<16}{'connected':<11}{'last sample':>12}{'errors':>8}  last error"]
    for driver in report["drivers"]:
        connected = {True: "yes", False: "NO", None: "?"}[driver["connected"]]
        lines.append(f"{driver['name']:<16}{connected:<11}"
                     f"{format_age(driver['last_sample_age']):>12}"
                     f"{_cell(driver['errors'], '?'):>8}  {_short(driver['last_error'])}")
    if not report["drivers"]:
        lines.append("(no drivers configured)")

    lines += ["", f"{'MACHINES':<16}{'order/op':<16}{'lot':<14}{'state':<11}{'good':>8}"
                  f"{'scrap':>7}{'pending':>9}{'unassigned':>12}"]
    for machine in report["machines"]:
        order = (f"{machine['order_id']}/{machine['operation']}" if machine["order_id"]
                 else "(no order)")
        pending = machine["good_pending"] + machine["scrap_pending"]
        unassigned = machine["unassigned"] + machine["unassigned_scrap"]
        lines.append(f"{machine['id']:<16}{order:<16}{_cell(machine.get('lot_id')):<14}"
                     f"{_cell(machine['state']):<11}{machine['good_total']:>8}"
                     f"{machine['scrap_total']:>7}{pending:>9}{unassigned:>12}")
    if not report["machines"]:
        lines.append("(no machines configured)")

    lines += ["", f"{'OUTBOX':<16}{'pending':>8}{'retrying':>10}{'dead':>7}{'oldest':>9}"
                  "  destination"]
    destinations = {**report["destinations"], **report.get("unconfigured_destinations", {})}
    for name, counts in sorted(destinations.items()):
        if source == "daemon":
            reach = {True: "up", False: "FAILING", None: "not tried yet"}[counts.get("reachable")]
            if name in report.get("unconfigured_destinations", {}):
                reach = "NOT CONFIGURED: kept until it is"
        else:
            reach = "?"
        lines.append(f"{name:<16}{counts['pending']:>8}{counts['retrying']:>10}"
                     f"{counts['dead']:>7}{format_age(counts['oldest_pending_age']):>9}"
                     f"  {reach}")
    if not destinations:
        lines.append("(nothing owed to any destination)")

    dead = report.get("dead_letters", [])
    lines += ["", f"RECENT DEAD LETTERS ({len(dead)} in all; "
                  "plantsync outbox --config FILE show|retry EVENT_ID)"]
    for row in dead[-RECENT_DEAD:]:
        lines.append(f"{row['id']}  {row['type']:<24} {row['destination']:<8} "
                     f"key={row['partition_key']}  {_cell(row['last_status'])} "
                     f"{_short(row['last_error'], 50)}")
    if not dead:
        lines.append("(none)")
    return "\n".join(lines)
