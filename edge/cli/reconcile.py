"""`plantsync reconcile --config FILE [--order ID | --since 24h] [--json]`: per order, the
gateway's confirmations beside ERP's, MES's and the QMS's figures, each mismatch with every
side's figure and its likely cause (`edge/ops/reconcile.py`).

It runs in its own process, beside the daemon or without it: it reads the order ledger and the
outbox read-only from `data_dir` and asks ERP itself, with the ERP destination's credentials
(so it needs the config's secrets in its environment, as `plantsync check` without
`--offline` does). Exit code 0 when every order reconciles, 1 when some do not or ERP could
not be asked, 2 on a wrong command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from drivers.common.timing import parse_duration
from edge.config.errors import ConfigError
from edge.config.loader import load_config
from edge.config.secrets import scrub, secret_values
from edge.ops import ledger
from edge.ops.reconcile import open_databases, reconcile
from edge.ops.reconcile_erp import ReconcileError
from edge.ops.reconcile_report import render
from edge.ops.terminal import printable, printable_data


def add_reconcile_parser(commands: Any) -> None:
    command = commands.add_parser(
        "reconcile",
        help="compare, per order, what the gateway confirmed with what ERP holds, "
        "what MES reported and each lot's QMS disposition with ERP's stock; exit 1 on any "
        "mismatch",
    )
    command.add_argument("--config", "-c", required=True, type=Path)
    which = command.add_mutually_exclusive_group()
    which.add_argument("--order", action="append", metavar="ID", help="this order (again for more)")
    which.add_argument(
        "--since",
        default="24h",
        metavar="DURATION",
        help="orders that ended within this long (default 24h)",
    )
    command.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_reconcile_command(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    try:
        since = parse_duration(args.since)
    except ValueError as exc:
        print(f"--since: {exc}", file=sys.stderr)
        return 2
    try:
        ledger_db, outbox_db = open_databases(config.data_dir)
    except ReconcileError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        orders = args.order or ledger.orders_ended_since(ledger_db, time.time() - since)
        result = asyncio.run(reconcile(config, ledger_db, outbox_db, orders))
    except ReconcileError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        ledger_db.close()
        outbox_db.close()
    secrets = secret_values(config)
    if args.json:
        print(json.dumps(printable_data(scrub(result.as_json(), secrets)), indent=2, default=str))
    else:
        # ERP's texts come from outside: shown with their control characters escaped.
        print("\n".join(printable(line) for line in scrub(render(result), secrets).splitlines()))
    return 1 if result.mismatches or result.failed else 0
