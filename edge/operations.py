"""Outbox operations a technician runs: status, list, show, retry and purge dead letters, the
audit journal, and input dead letters (list them; reingest one after a config fix). The same
functions serve the daemon's local API and the CLI.

The CLI asks the running daemon over its local API (so the daemon's in-memory view stays true);
when no daemon answers, it opens the database itself. Calls that change something carry the
API token: the configured one, or the one the daemon wrote to `data_dir/api-token` at start.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import httpx

from buffer.outbox import Outbox
from edge.config import PlantConfig
from edge.pipeline import Pipeline

Operation = Literal["status", "list", "show", "retry", "purge-dead", "journal", "rejected",
                    "reingest"]
CHANGES: frozenset[Operation] = frozenset({"retry", "purge-dead", "reingest"})

log = logging.getLogger(__name__)
TOKEN_FILE = "api-token"


async def perform(outbox: Outbox, operation: Operation, args: Mapping[str, Any], *,
                  pipeline: Pipeline | None = None) -> Any:
    """Run one operation on an open outbox; the result is plain JSON-able data. `reingest`
    needs the pipeline that owns the rules (the daemon's, or one made on the database)."""
    match operation:
        case "status":
            counts = await outbox.counts()
            return {
                "destinations": {name: vars(c) for name, c in sorted(counts.items())},
                "back_pressure": outbox.back_pressure,
                "used_bytes": outbox.used_bytes,
                "recovered_from": outbox.recovered_from,
                "integrity_problem": outbox.integrity_problem,
            }
        case "list":
            return await outbox.deliveries(destination=args.get("destination"),
                                           state=args.get("state", "pending"),
                                           limit=int(args.get("limit", 100)))
        case "show":
            return await outbox.show(str(args["id"]))
        case "retry":
            event_id = None if args.get("all_dead") else args.get("id")
            if event_id is None and not args.get("all_dead"):
                raise ValueError("say which event to retry, or all_dead")
            retried = await outbox.retry_dead(event_id, args.get("destination"))
            log.info("Manual intervention: %d dead letter(s) put back in line (%s)", retried,
                     _which(event_id, args.get("destination")),
                     extra={"event_id": event_id, "destination": args.get("destination")})
            return {"retried": retried}
        case "purge-dead":
            purged = await outbox.purge_dead(args.get("id"), args.get("destination"))
            log.warning("Manual intervention: %d dead letter(s) deleted for good (%s)", purged,
                        _which(args.get("id"), args.get("destination")),
                        extra={"event_id": args.get("id"),
                               "destination": args.get("destination")})
            return {"purged": purged}
        case "journal":
            return await outbox.journal(float(args.get("since", 0.0)),
                                        limit=int(args.get("limit", 1000)))
        case "rejected":
            return await outbox.rejected_inputs(float(args.get("since", 0.0)),
                                                limit=int(args.get("limit", 100)))
        case "reingest":
            if pipeline is None:
                raise ValueError("reingest needs the gateway's pipeline")
            return await pipeline.reingest(int(args["id"]))
    raise ValueError(f"unknown operation {operation!r}")


def _which(event_id: str | None, destination: str | None) -> str:
    what = f"event {event_id}" if event_id else "all dead letters"
    return what + (f" for {destination}" if destination else "")


def api_token(config: PlantConfig) -> str | None:
    """The token the CLI presents: configured, else the one the daemon wrote at start."""
    if config.api.token is not None:
        return config.api.token.get_secret_value()
    try:
        return (config.data_dir / TOKEN_FILE).read_text().strip()
    except OSError:
        return None


def issue_token(config: PlantConfig) -> str:
    """The token the daemon requires; a fresh random one in data_dir unless configured."""
    if config.api.token is not None:
        return config.api.token.get_secret_value()
    token = secrets.token_urlsafe(32)
    path: Path = config.data_dir / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    return token


class DaemonRefused(Exception):
    """The running daemon answered with an error."""


async def call(config: PlantConfig, operation: Operation, args: Mapping[str, Any]
               ) -> tuple[Any, Literal["daemon", "database"]]:
    """Run an operation through the running daemon, or on the database when none answers."""
    url = f"http://{config.api.listen}/outbox/{operation}"
    headers = {}
    if operation in CHANGES and (token := api_token(config)):
        headers["Authorization"] = f"Bearer {token}"
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            response = await client.post(url, json=dict(args), headers=headers)
    except httpx.ConnectError:
        outbox = await Outbox.open(config.database_path)
        try:
            pipeline = (Pipeline(config, outbox, await outbox.load_state())
                        if operation == "reingest" else None)
            return await perform(outbox, operation, args, pipeline=pipeline), "database"
        finally:
            await outbox.close()
    if response.status_code != 200:
        raise DaemonRefused(f"the daemon answered {response.status_code}: {response.text}")
    return response.json(), "daemon"
