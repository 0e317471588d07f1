"""`plantsync outbox ...`: what a technician needs to see and fix in the outbox.

    plantsync outbox --config FILE status
    plantsync outbox --config FILE list [--state pending|retrying|dead] [--destination D]
    plantsync outbox --config FILE show EVENT_ID
    plantsync outbox --config FILE retry EVENT_ID | --all-dead [--destination D] --reason WHY
    plantsync outbox --config FILE purge-dead EVENT_ID | --all [--destination D] --reason WHY
    plantsync outbox --config FILE journal [--since 24h | 2026-11-29T06:00]
    plantsync outbox --config FILE rejected [--since 24h]     (input dead letters)
    plantsync outbox --config FILE hand-actions [--since 30d]  (who changed what, and why)
    plantsync outbox --config FILE reingest ID --reason WHY   (an input dead letter, again)

Each talks to the running daemon when there is one, else opens the database directly. It needs
only `api`, `data_dir` and the token of the config, so it works in a shell without the plant's
other secrets and after an edit that broke another part of the file. Stored data is printed
with control characters made visible (`--json` for scripts). Exit status: 0 done, 1 refused or
not found, 2 a wrong command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from drivers.common.timing import parse_duration
from edge.config.errors import ConfigError
from edge.config.loader import load_config, load_local_access
from edge.config.models import LocalAccess
from edge.config.secrets import scrub, secret_values
from edge.ops.operations import DaemonRefused, NotFound, Operation, OperationError, call
from edge.ops.terminal import printable, printable_data


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
    retry = actions.add_parser("retry", help="put dead letters back in line (journalled)")
    retry.add_argument("id", nargs="?", help="the dead letter's event id")
    retry.add_argument(
        "--all-dead", action="store_true", help="every dead letter (of --destination, if given)"
    )
    retry.add_argument("--destination")
    retry.add_argument(
        "--reason", help="why, for the hand-action journal (asked for on a terminal when missing)"
    )
    purge = actions.add_parser("purge-dead", help="delete dead letters for good (journalled)")
    purge.add_argument("id", nargs="?", help="the dead letter's event id")
    purge.add_argument(
        "--all",
        action="store_true",
        help="every dead letter (of --destination, if given); asks for confirmation on a terminal",
    )
    purge.add_argument("--destination")
    purge.add_argument(
        "--reason", help="why, for the hand-action journal (asked for on a terminal when missing)"
    )
    journal = actions.add_parser("journal", help="delivered events, for audit")
    journal.add_argument(
        "--since", default="24h", help="a duration back from now (24h, 7d) or an ISO time"
    )
    journal.add_argument("--limit", type=int, default=1000)
    rejected = actions.add_parser(
        "rejected", help="input dead letters: messages that could not be used, with the reason"
    )
    rejected.add_argument("--since", default="24h")
    rejected.add_argument("--limit", type=int, default=100)
    reingest = actions.add_parser(
        "reingest",
        help="run an input dead letter through the "
        "current config again, after fixing what rejected it "
        "(journalled)",
    )
    reingest.add_argument("id", type=int, help="the input dead letter's id (see `rejected`)")
    reingest.add_argument(
        "--reason", help="why, for the hand-action journal (asked for on a terminal when missing)"
    )
    hand = actions.add_parser(
        "hand-actions",
        help="the hand-action journal: every retry and purge by hand, with who and why",
    )
    hand.add_argument("--since", default="30d")
    hand.add_argument("--limit", type=int, default=1000)


class _Usage(Exception):
    """A wrong command line: exit 2 with the message."""


def run_outbox_command(args: argparse.Namespace) -> int:
    try:
        access = load_local_access(args.config)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    operation: Operation = args.action
    try:
        request = _request(operation, args)
    except _Usage as exc:
        print(f"plantsync outbox {operation}: {exc}", file=sys.stderr)
        return 2
    if request is None:
        print("Nothing done.", file=sys.stderr)
        return 1
    # A reingest runs the message through the mapping and the rules: the whole config.
    config = None
    if operation == "reingest":
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print("\n".join(exc.problems), file=sys.stderr)
            return 1
    try:
        result, via = asyncio.run(call(access, operation, request, config))
    except OperationError as exc:
        print(f"plantsync outbox {operation}: {exc}", file=sys.stderr)
        return 2
    except (DaemonRefused, NotFound) as exc:
        print(f"plantsync outbox {operation}: {exc}", file=sys.stderr)
        return 1
    result = scrub(result, shown_secrets(args.config, access))
    if operation == "show" and result is not None:
        result = _payload_as_json(result)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(_text(operation, result, via))
    failed = (operation == "show" and result is None) or (
        operation == "reingest" and result["outcome"] != "accepted"
    )
    return 1 if failed else 0


def shown_secrets(path: Path, access: LocalAccess) -> set[str]:
    """Secret values to keep out of what is printed: the whole config's when it loads here,
    else at least the API token's."""
    try:
        return secret_values(load_config(path))
    except ConfigError:
        return {access.api.token.get_secret_value()} if access.api.token else set()


def _request(operation: Operation, args: argparse.Namespace) -> dict[str, Any] | None:
    """The API call's arguments, from the command line; None when the person said no."""
    match operation:
        case "list":
            return {"state": args.state, "destination": args.destination, "limit": args.limit}
        case "show":
            return {"id": args.id}
        case "retry":
            if bool(args.id) == bool(args.all_dead):
                raise _Usage("give one EVENT_ID, or --all-dead")
            request = {"id": args.id, "all_dead": args.all_dead, "destination": args.destination}
            return {**request, "reason": _reason(args.reason)}
        case "purge-dead":
            if bool(args.id) == bool(args.all):
                raise _Usage(
                    "give one EVENT_ID, or --all to delete every dead letter"
                    + (f" of {args.destination}" if args.destination else "")
                )
            reason = _reason(args.reason)
            if args.all and not _confirmed(args.destination):
                return None
            return {
                "id": args.id,
                "all": args.all,
                "destination": args.destination,
                "reason": reason,
            }
        case "reingest":
            return {"id": args.id, "reason": _reason(args.reason)}
        case "journal" | "rejected" | "hand-actions":
            try:
                return {"since": _since(args.since), "limit": args.limit}
            except ValueError as exc:
                raise _Usage(f"--since: {exc}") from None
    return {}


def _reason(given: str | None) -> str:
    if given and given.strip():
        return given.strip()
    if sys.stdin.isatty():
        typed = input("Why? (kept in the hand-action journal): ").strip()
        if typed:
            return typed
    raise _Usage(
        "say why with --reason '...': every change by hand is journalled with who made it and why"
    )


def _confirmed(destination: str | None) -> bool:
    """Purging every dead letter cannot be undone: on a terminal, the person types yes."""
    if not sys.stdin.isatty():
        return True  # a script that wrote --all meant it
    which = (
        f"every dead letter of {destination}"
        if destination
        else ("every dead letter of every destination")
    )
    answer = input(f"Delete {which} for good? Type yes to go on: ")
    return answer.strip().lower() == "yes"


def _since(text: str) -> float:
    try:
        return time.time() - parse_duration(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(
                f"{text!r} is neither a duration (24h, 7d) nor an ISO time (2026-11-29T06:00)"
            ) from None
        if moment.tzinfo is None:
            moment = moment.astimezone()
        return moment.timestamp()


def local_time(stamp: float | None) -> str:
    """A Unix time as this box's local ISO time, to the second, with its UTC offset."""
    if not stamp:
        return "-"
    return datetime.fromtimestamp(stamp).astimezone().isoformat(timespec="seconds")


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def table(
    header: list[str], rows: list[list[str]], right: frozenset[int] = frozenset()
) -> list[str]:
    """Columns as wide as their widest cell, two spaces apart: nothing runs into its
    neighbour, however long a name is. `right` aligns those columns right (numbers)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            str(cell).rjust(widths[i]) if i in right else str(cell).ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _payload_as_json(found: dict[str, Any]) -> dict[str, Any]:
    """The stored payload (JSON text) as JSON itself, not a string holding JSON."""
    try:
        return {**found, "payload": json.loads(found["payload"])}
    except (KeyError, ValueError):
        return found


def _text(operation: Operation, result: Any, via: str) -> str:
    lines: list[str] = []
    if operation != "show":
        result = printable_data(result)
    match operation:
        case "status":
            lines += table(
                ["destination", "pending", "retrying", "dead", "oldest"],
                [
                    [
                        name,
                        counts["pending"],
                        counts["retrying"],
                        counts["dead"],
                        format_age(counts["oldest_pending_age"]),
                    ]
                    for name, counts in result["destinations"].items()
                ],
                right=frozenset({1, 2, 3, 4}),
            )
            if not result["destinations"]:
                lines.append("(nothing owed to any destination)")
            rejected = result.get("input_dead_letters", {})
            lines.append(
                f"input dead letters: {sum(rejected.values())}"
                + (
                    f" ({', '.join(f'{k}: {v}' for k, v in rejected.items())}; "
                    "plantsync outbox rejected)"
                    if rejected
                    else ""
                )
            )
            lines.append(f"outbox uses {result['used_bytes'] / 1e6:.1f} MB")
            if result["back_pressure"]:
                lines.append(f"BACK-PRESSURE: {result['back_pressure']}")
            if result["recovered_from"]:
                lines.append(
                    f"ALARM: a damaged database was moved aside: {result['recovered_from']}"
                )
            if result.get("integrity_problem"):
                lines.append(
                    f"ALARM: the integrity check failed: {result['integrity_problem']}"
                    "; the file is moved aside at the next start"
                )
        case "list":
            lines += table(
                ["event id", "type", "destination", "key", "attempts", "last error"],
                [
                    [
                        row["id"],
                        row["type"],
                        row["destination"],
                        row["partition_key"],
                        row["attempts"],
                        f"{row['last_status'] or ''} {row['last_error'] or ''}".strip(),
                    ]
                    for row in result
                ],
                right=frozenset({4}),
            )
            if not result:
                lines = ["(none)"]
        case "show":
            lines += _show(result)
        case "retry":
            lines.append(
                f"{result['retried']} dead letter(s) put back in line "
                "(journalled: plantsync outbox hand-actions)"
            )
        case "purge-dead":
            lines.append(
                f"{result['purged']} dead letter(s) deleted "
                "(journalled: plantsync outbox hand-actions)"
            )
        case "journal":
            lines += table(
                ["delivered", "event id", "type", "destination", "status", "attempts", "reference"],
                [
                    [
                        local_time(row["delivered_at"]),
                        row["event_id"],
                        row["event_type"],
                        row["destination"],
                        row["status"],
                        row["attempts"],
                        row["reference"] or "-",
                    ]
                    for row in result
                ],
            )
            if not result:
                lines = ["(nothing delivered in that window)"]
        case "rejected":
            for row in result:
                lines.append(
                    f"#{row['id']}  {local_time(row['received_at'])}  {row['source']}  "
                    f"{row['topic']}  message {row.get('message_id') or '-'}: "
                    f"{row['reason']}\n    payload: {row['payload'][:200]}"
                )
            if not result:
                lines.append("(no rejected input in that window)")
        case "reingest":
            lines.append(
                f"input dead letter #{result['id']} (MES message "
                f"{result['message_id'] or '-'}): {result['outcome']}"
            )
            if result.get("reason"):
                lines.append(f"    {result['reason']}")
            lines += [f"    event {event_id}" for event_id in result["events"]]
        case "hand-actions":
            lines += table(
                ["when", "action", "affected", "what", "who", "why"],
                [
                    [
                        local_time(row["at"]),
                        row["action"],
                        row["affected"],
                        row["target"],
                        row["who"],
                        row["reason"],
                    ]
                    for row in result
                ],
                right=frozenset({2}),
            )
            if not result:
                lines = ["(no hand actions in that window)"]
    lines.append(f"(from the {'running daemon' if via == 'daemon' else 'database directly'})")
    return "\n".join(lines)


def _show(raw: dict[str, Any] | None) -> list[str]:
    if raw is None:
        return ["no such event in the outbox or its journal"]
    found = printable_data({key: value for key, value in raw.items() if key != "payload"})
    lines = [f"event        {found['id']}"]
    if "type" in found:
        lines += [
            f"type         {found['type']}",
            f"key          {found['partition_key']}",
            f"committed    {local_time(found['created_at'])}",
        ]
    for delivery in found["deliveries"]:
        state = delivery["state"]
        detail = (
            f"dead since {local_time(delivery['dead_at'])}"
            if state == "dead"
            else f"next attempt {local_time(delivery['next_attempt_at']) or 'now'}"
        )
        error = f"{delivery['last_status'] or ''} {delivery['last_error'] or ''}".strip()
        lines.append(
            f"delivery     {delivery['destination']}: {state}, "
            f"{delivery['attempts']} attempt(s), {detail}" + (f"; last: {error}" if error else "")
        )
    for row in found["journal"]:
        lines.append(
            f"delivered    {row['destination']}: {local_time(row['delivered_at'])}, "
            f"HTTP {row['status']}, {row['attempts']} attempt(s), "
            f"ref {row['reference'] or '-'}"
        )
    if "payload" in raw:
        lines.append("payload")
        if isinstance(raw["payload"], str):  # not JSON: shown as text
            lines.append(f"  {printable(raw['payload'])}")
        else:  # JSON escapes control characters and, ASCII-only, every bidi one too
            lines += [
                "  " + line
                for line in json.dumps(raw["payload"], indent=2, ensure_ascii=True).splitlines()
            ]
    else:
        lines.append("payload      (delivered everywhere: only the journal keeps its trace)")
    return lines
