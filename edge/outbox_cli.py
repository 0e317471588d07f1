"""`plantsync outbox ...`: what a technician needs to see and fix in the outbox.

    plantsync outbox --config FILE status
    plantsync outbox --config FILE list [--state pending|retrying|dead] [--destination D]
    plantsync outbox --config FILE show EVENT_ID
    plantsync outbox --config FILE retry EVENT_ID | --all-dead [--destination D]
    plantsync outbox --config FILE purge-dead [EVENT_ID] [--destination D]
    plantsync outbox --config FILE journal [--since 24h | 2026-11-29T06:00]
    plantsync outbox --config FILE rejected [--since 24h]     (input dead letters)
    plantsync outbox --config FILE reingest ID                (run one again after a fix)

Each talks to the running daemon when there is one, else opens the database directly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge.config import ConfigError, load_config
from edge.operations import DaemonRefused, Operation, call
from edge.secrets import scrub, secret_values
from edge.timing import parse_duration


def add_outbox_parser(commands: Any) -> None:
    outbox = commands.add_parser("outbox", help="inspect the outbox, retry or purge dead letters")
    outbox.add_argument("--config", "-c", required=True, type=Path)
    outbox.add_argument("--json", action="store_true", help="print JSON instead of text")
    actions = outbox.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("status", help="per destination: pending, retrying, dead, oldest age")
    listing = actions.add_parser("list", help="deliveries in commit order")
    listing.add_argument("--state", choices=("pending", "retrying", "dead"), default="pending")
    listing.add_argument("--destination")
    listing.add_argument("--limit", type=int, default=50)
    show = actions.add_parser("show", help="one event: payload, deliveries, journal")
    show.add_argument("id")
    retry = actions.add_parser("retry", help="put dead letters back in line")
    retry.add_argument("id", nargs="?")
    retry.add_argument("--all-dead", action="store_true")
    retry.add_argument("--destination")
    purge = actions.add_parser("purge-dead", help="delete dead letters for good")
    purge.add_argument("id", nargs="?")
    purge.add_argument("--destination")
    journal = actions.add_parser("journal", help="delivered events, for audit")
    journal.add_argument("--since", default="24h",
                         help="a duration back from now (24h, 7d) or an ISO time")
    journal.add_argument("--limit", type=int, default=1000)
    rejected = actions.add_parser("rejected", help="input dead letters: messages that could "
                                  "not be used, with the reason")
    rejected.add_argument("--since", default="24h")
    rejected.add_argument("--limit", type=int, default=100)
    reingest = actions.add_parser("reingest", help="run an input dead letter through the "
                                  "current config again (after fixing what rejected it)")
    reingest.add_argument("id", type=int, help="the input dead letter's id (see `rejected`)")


def run_outbox_command(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    operation: Operation = args.action
    request: dict[str, Any] = {}
    match operation:
        case "list":
            request = {"state": args.state, "destination": args.destination,
                       "limit": args.limit}
        case "show":
            request = {"id": args.id}
        case "retry":
            if bool(args.id) == bool(args.all_dead):
                print("retry: give one EVENT_ID or --all-dead", file=sys.stderr)
                return 2
            request = {"id": args.id, "all_dead": args.all_dead,
                       "destination": args.destination}
        case "purge-dead":
            request = {"id": args.id, "destination": args.destination}
        case "reingest":
            request = {"id": args.id}
        case "journal" | "rejected":
            try:
                request = {"since": _since(args.since), "limit": args.limit}
            except ValueError as exc:
                print(f"journal --since: {exc}", file=sys.stderr)
                return 2
    try:
        result, via = asyncio.run(call(config, operation, request))
    except DaemonRefused as exc:
        print(exc, file=sys.stderr)
        return 1
    result = scrub(result, secret_values(config))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(_text(operation, result, via))
    failed = (operation == "show" and result is None) or (
        operation == "reingest" and result["outcome"] != "accepted")
    return 1 if failed else 0


def _since(text: str) -> float:
    try:
        return time.time() - parse_duration(text)
    except ValueError:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.astimezone()
        return moment.timestamp()


def _when(stamp: float | None) -> str:
    if not stamp:
        return "-"
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def _text(operation: Operation, result: Any, via: str) -> str:
    lines: list[str] = []
    match operation:
        case "status":
            lines.append(f"{'destination':<14}{'pending':>9}{'retrying':>10}{'dead':>7}"
                         f"{'oldest':>9}")
            for name, counts in result["destinations"].items():
                lines.append(f"{name:<14}{counts['pending']:>9}{counts['retrying']:>10}"
                             f"{counts['dead']:>7}{format_age(counts['oldest_pending_age']):>9}")
            if not result["destinations"]:
                lines.append("(nothing owed to any destination)")
            lines.append(f"outbox uses {result['used_bytes'] / 1e6:.1f} MB")
            if result["back_pressure"]:
                lines.append(f"BACK-PRESSURE: {result['back_pressure']}")
            if result["recovered_from"]:
                lines.append(f"ALARM: a damaged database was moved aside: "
                             f"{result['recovered_from']}")
            if result.get("integrity_problem"):
                lines.append(f"ALARM: the integrity check failed: {result['integrity_problem']}"
                             "; the file is moved aside at the next start")
        case "list":
            for row in result:
                reason = f"  {row['last_status'] or ''} {row['last_error'] or ''}".rstrip()
                lines.append(f"{row['id']}  {row['type']:<26} {row['destination']:<8} "
                             f"key={row['partition_key']} attempts={row['attempts']}{reason}")
            if not result:
                lines.append("(none)")
        case "show":
            lines.append(json.dumps(result, indent=2, default=str) if result is not None
                         else "no such event in the outbox or its journal")
        case "retry":
            lines.append(f"{result['retried']} dead letter(s) put back in line")
        case "purge-dead":
            lines.append(f"{result['purged']} dead letter(s) deleted")
        case "journal":
            for row in result:
                lines.append(f"{_when(row['delivered_at'])}  {row['event_id']}  "
                             f"{row['event_type']:<26} {row['destination']:<8} "
                             f"status={row['status']} attempts={row['attempts']} "
                             f"ref={row['reference'] or '-'}")
            if not result:
                lines.append("(nothing delivered in that window)")
        case "rejected":
            for row in result:
                lines.append(f"#{row['id']}  {_when(row['received_at'])}  {row['source']}  "
                             f"{row['topic']}  message {row.get('message_id') or '-'}: "
                             f"{row['reason']}\n    payload: {row['payload'][:200]}")
            if not result:
                lines.append("(no rejected input in that window)")
        case "reingest":
            lines.append(f"input dead letter #{result['id']} (MES message "
                         f"{result['message_id'] or '-'}): {result['outcome']}")
            if result.get("reason"):
                lines.append(f"    {result['reason']}")
            lines += [f"    event {event_id}" for event_id in result["events"]]
    lines.append(f"(from the {'running daemon' if via == 'daemon' else 'database directly'})")
    return "\n".join(lines)
