"""`plantsync status --config FILE`: the gateway on one screen, for the technician.

Drivers (connected, last sample age), machines (bound order, state, counts, unassigned
production), the outbox per destination (pending, retrying, dead, oldest) and the most recent
dead letters, and the input dead letters (MES messages that could not be used). It asks the
running daemon (`/status` and the outbox operations on its local API); when no daemon answers,
it reads the database itself: machines from the committed rule state, the outbox as it stands,
and drivers as unknown. It needs only `api`, `data_dir` and the token of the config; when the
rest does not load in this shell, machines and drivers are left out, and it says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any, Literal

import httpx

from buffer.outbox import DestinationCounts, Outbox
from drivers.base import finite_json
from edge.cli.outbox import format_age, local_time, shown_secrets, table
from edge.config.checks import fully_validated
from edge.config.errors import ConfigError
from edge.config.loader import load_config, load_local_access
from edge.config.models import LocalAccess, PlantConfig
from edge.config.secrets import scrub
from edge.ops.operations import DaemonRefused, api_token, call
from edge.ops.status import (
    STOPPED,
    DestinationFacts,
    DriverFacts,
    GatewayFacts,
    OutboxFacts,
    machine_status,
    status_report,
)
from edge.ops.terminal import printable_data
from edge.rules.machine import machine_rules

RECENT_DEAD = 5
Source = Literal["daemon", "database"]


def add_status_parser(commands: Any) -> None:
    status = commands.add_parser(
        "status",
        help="drivers, machines, outbox and recent dead "
        "letters on one screen (from the daemon, or the database "
        "when it is down)",
    )
    status.add_argument("--config", "-c", required=True, type=Path)
    status.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_status_command(args: argparse.Namespace) -> int:
    try:
        access = load_local_access(args.config)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    try:
        report, source = asyncio.run(gather(access, args.config))
    except DaemonRefused as exc:
        print(exc, file=sys.stderr)
        return 1
    report = scrub(report, shown_secrets(args.config, access))
    if args.json:
        print(
            json.dumps(
                finite_json({**report, "source": source}), indent=2, default=str, allow_nan=False
            )
        )
    else:
        print(render(printable_data(report), source))
    return 0


async def gather(access: LocalAccess, path: Path) -> tuple[dict[str, Any], Source]:
    """The status, and the dead letters, from the daemon or else from the database."""
    headers = {}
    if not access.api.on_loopback and (token := api_token(access)):
        headers["Authorization"] = f"Bearer {token}"
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            response = await client.get(f"http://{access.api.listen}/status", headers=headers)
    except httpx.ConnectError:
        return await from_database(access, path), "database"
    if response.status_code != 200:
        raise DaemonRefused(
            response.status_code, f"the daemon answered {response.status_code}: {response.text}"
        )
    report: dict[str, Any] = response.json()
    # The outbox's own counts, read after /status, match the dead letters listed below them.
    live, _ = await call(access, "status", {})
    nothing_owed = vars(DestinationCounts())
    for name, counts in {
        **{name: nothing_owed for name in report["destinations"]},
        **live["destinations"],
    }.items():
        shown = report["destinations"].get(name) or report.setdefault(
            "unconfigured_destinations", {}
        ).setdefault(name, {})
        shown.update(counts)
    dead, _ = await call(access, "list", {"state": "dead", "limit": 1000})
    report["dead_letters"] = dead
    report["rejected"], _ = await call(access, "rejected", {"since": 0, "limit": RECENT_DEAD})
    return report, "daemon"


def _machines_config(path: Path) -> PlantConfig | None:
    """The whole config for the machines' rule state, when it loads here (with or without
    the secrets of this shell); None when it does not."""
    for offline in (False, True):
        try:
            config = load_config(path, offline=offline)
        except ConfigError:
            continue
        if fully_validated(config):
            return config
    return None


async def from_database(access: LocalAccess, path: Path) -> dict[str, Any]:
    """The status as the database tells it, in the daemon's words (`edge.ops.status`): what
    only a running daemon knows (connections, reachability) is unknown."""
    config = _machines_config(path)
    async with Outbox.open(access.database_path) as outbox:
        rules = machine_rules(config, await outbox.load_state()) if config else []
        counts = await outbox.counts()
        facts = GatewayFacts(
            site=access.site,
            phase=STOPPED,
            ready_max_backlog_age=access.api.ready_max_backlog_age,
            drivers=[DriverFacts(d.name) for d in (config.drivers if config else [])],
            # Without a config, every destination the outbox holds events for is shown.
            destinations=[
                DestinationFacts(name)
                for name in (config.destinations if config else sorted(counts))
            ],
            counts=counts,
            outbox=OutboxFacts(
                back_pressure=outbox.back_pressure,
                used_bytes=outbox.used_bytes,
                max_bytes=int(config.outbox.max_size) if config else None,
                recovered_from=outbox.recovered_from,
                integrity_problem=outbox.integrity_problem,
            ),
            configured_destinations=frozenset(config.destinations) if config else None,
            input_dead_letters=await outbox.rejected_count(),
            machines=[machine_status(rule) for rule in rules],
            operations={"exceptions": _open_exceptions(access)},
        )
        return {
            **status_report(facts),
            "config_note": None
            if config
            else "the config does not load here (plantsync "
            "check --config FILE says why): drivers and machines are not shown",
            "dead_letters": await outbox.deliveries(state="dead", limit=1000),
            "rejected": await outbox.rejected_inputs(0.0, limit=RECENT_DEAD),
        }


def _open_exceptions(access: LocalAccess) -> list[dict[str, Any]]:
    """The open exceptions as the operations database holds them (the daemon is down)."""
    from edge.ops.exceptions import listing
    from edge.ops.ledger import OPS_DATABASE, connect

    path = access.data_dir / OPS_DATABASE
    if not path.exists():
        return []
    db = connect(path, read_only=True)
    try:
        return listing(db, "open")
    except sqlite3.Error:
        return []
    finally:
        db.close()


def _cell(value: Any, missing: str = "-") -> str:
    return missing if value is None else str(value)


def _short(text: str | None, width: int = 60) -> str:
    if not text:
        return "-"
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def render(report: dict[str, Any], source: Source) -> str:
    lines: list[str] = []
    site = report.get("site") or "?"
    if source == "daemon":
        state = "READY" if report.get("ready", True) else "NOT READY"
        uptime = format_age(report.get("uptime_seconds"))
        lines.append(
            f"PlantSync Edge, site {site}: {report.get('phase', 'running')} "
            f"for {uptime}, {state}  (from the running daemon)"
        )
    else:
        lines.append(
            f"PlantSync Edge, site {site}: the daemon is not answering  "
            "(from the database directly)"
        )
    if source == "daemon":  # from the database, the header says the daemon is not running
        lines += [f"  not ready: {reason}" for reason in report.get("not_ready_reasons", [])]
    lines += [f"  note: {note}" for note in report.get("degraded", [])]
    lines += [f"  ALARM: {alarm}" for alarm in report.get("alarms", [])]
    if pressure := report.get("outbox", {}).get("back_pressure"):
        lines.append(f"  BACK-PRESSURE: {pressure}")
    if report.get("config_note"):
        lines.append(f"  note: {report['config_note']}")

    lines.append("")
    lines += table(
        ["DRIVERS", "connected", "last sample", "errors", "last error"],
        [
            [
                driver["name"],
                {True: "yes", False: "NO", None: "?"}[driver["connected"]],
                format_age(driver["last_sample_age"]),
                _cell(driver["errors"], "?"),
                _short(driver["last_error"]),
            ]
            for driver in report["drivers"]
        ],
        right=frozenset({2, 3}),
    )
    if not report["drivers"]:
        lines.append("(no drivers configured)")

    lines.append("")
    rows = []
    for machine in report["machines"]:
        order = (
            f"{machine['order_id']}/{machine['operation']}" if machine["order_id"] else "(no order)"
        )
        rows.append(
            [
                machine["id"],
                order,
                _cell(machine.get("lot_id")),
                _cell(machine["state"]),
                machine["good_total"],
                machine["scrap_total"],
                machine["good_pending"] + machine["scrap_pending"],
                machine["unassigned"] + machine["unassigned_scrap"],
            ]
        )
    lines += table(
        ["MACHINES", "order/op", "lot", "state", "good", "scrap", "pending", "unassigned"],
        rows,
        right=frozenset({4, 5, 6, 7}),
    )
    if not report["machines"]:
        lines.append("(no machines configured)")

    lines.append("")
    destinations = {**report["destinations"], **report.get("unconfigured_destinations", {})}
    rows = []
    for name, counts in sorted(destinations.items()):
        if source == "daemon":
            reach = {True: "up", False: "FAILING", None: "not tried yet"}[counts.get("reachable")]
            if name in report.get("unconfigured_destinations", {}):
                reach = "NOT CONFIGURED: kept until it is"
        else:
            reach = "?"
        rows.append(
            [
                name,
                counts["pending"],
                counts["retrying"],
                counts["dead"],
                format_age(counts["oldest_pending_age"]),
                reach,
            ]
        )
    lines += table(
        ["OUTBOX", "pending", "retrying", "dead", "oldest", "destination"],
        rows,
        right=frozenset({1, 2, 3, 4}),
    )
    if not destinations:
        lines.append("(nothing owed to any destination)")

    dead = report.get("dead_letters", [])
    lines += [
        "",
        f"RECENT DEAD LETTERS ({len(dead)} in all; "
        "plantsync outbox --config FILE show|retry EVENT_ID)",
    ]
    lines += (
        table(
            ["event id", "type", "destination", "key", "status", "error"],
            [
                [
                    row["id"],
                    row["type"],
                    row["destination"],
                    row["partition_key"],
                    _cell(row["last_status"]),
                    _short(row["last_error"], 50),
                ]
                for row in dead[-RECENT_DEAD:]
            ],
        )
        if dead
        else ["(none)"]
    )

    rejected = report.get("input_dead_letters", {})
    by_source = ", ".join(
        f"{name}: {count}" for name, count in rejected.get("by_source", {}).items()
    )
    lines += [
        "",
        f"INPUT DEAD LETTERS ({rejected.get('count', 0)} in all"
        + (f": {by_source}" if by_source else "")
        + "; plantsync outbox --config FILE rejected)",
    ]
    recent = report.get("rejected", [])
    lines += [
        f"{local_time(row['received_at'])}  {row['source']}  {row['topic']}: "
        f"{_short(row['reason'], 80)}"
        for row in recent
    ] or ["(none)"]

    exceptions = report.get("exceptions", [])
    lines += ["", f"OPEN EXCEPTIONS ({len(exceptions)}; GET /exceptions lists open and closed)"]
    lines += (
        table(
            ["since", "kind", "roles", "subject", "what", "inspect"],
            [
                [
                    local_time(row["raised_at"]),
                    row["kind"],
                    ",".join(row["roles"]) or "-",
                    _short(row["subject"], 40),
                    _short(row["text"], 60),
                    _short(row["inspect"], 50),
                ]
                for row in exceptions
            ],
        )
        if exceptions
        else ["(none)"]
    )
    if kpis := report.get("kpis"):
        lines += [
            "",
            f"KPIS (ratios over the last {format_age(kpis['window_seconds'])}; "
            "latencies since the daemon started)",
        ]
        lines += [f"  {name}: {value}" for name, value in _kpi_lines(kpis)]
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def _mean(figure: dict[str, Any]) -> str:
    if not figure["count"]:
        return "- (none measured)"
    return f"{format_age(figure['mean_seconds'])} mean over {figure['count']}"


def _kpi_lines(kpis: dict[str, Any]) -> list[tuple[str, str]]:
    failure = (
        ", ".join(
            f"{name} {_ratio(share)}"
            for name, share in sorted(kpis["integration_failure_ratio"].items())
        )
        or "-"
    )
    by_order = ", ".join(
        f"{order}: {count}" for order, count in kpis["manual_interventions_by_order"].items()
    )
    return [
        (
            "order sync success",
            f"{_ratio(kpis['order_sync_success_ratio'])} "
            f"({kpis['orders_accepted']} of {kpis['orders_released']} "
            "released orders accepted by MES)",
        ),
        ("completion posting latency", _mean(kpis["completion_posting_latency"])),
        ("inspection turnaround", _mean(kpis["inspection_turnaround"])),
        ("lot hold to release", _mean(kpis["lot_hold_to_release"])),
        ("genealogy completeness", _ratio(kpis["genealogy_completeness_ratio"])),
        ("reconciliation error rate", _ratio(kpis["reconciliation_error_ratio"])),
        ("integration failure rate", failure),
        (
            "manual interventions per cycle",
            f"{_cell(kpis['manual_interventions_per_cycle'])}"
            f" ({kpis['manual_interventions']} hand action(s), {kpis['production_cycles']} "
            f"order(s) ended){'; by order: ' + by_order if by_order else ''}",
        ),
    ]
