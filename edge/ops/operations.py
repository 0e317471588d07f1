"""Outbox operations a technician runs: status, list, show, retry and purge dead letters, the
audit journal, input dead letters and the hand-action journal. The same functions serve the
daemon's local API and the CLI.

The CLI asks the running daemon over its local API (so the daemon's in-memory view stays true);
when no daemon answers, it opens the database itself. Calls that change something carry the
API token: the configured one, or the one the daemon wrote to `data_dir/api-token` at start.

Every operation takes exactly the arguments it names: an unknown one is an error, never
ignored (a misspelt `event_id` once made `purge-dead` purge every dead letter). A change that
touches more than one event says so explicitly (`all_dead`, `all`), and every change is a hand
action: it is journalled, in the same transaction, with who made it and why
(`hand_actions`; `plantsync outbox hand-actions`).
"""

from __future__ import annotations

import logging
import os
import pwd
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from buffer.outbox import HandAction, Outbox, journal_hand_action
from edge.config.models import LocalAccess, PlantConfig
from edge.runtime.pipeline import Pipeline

Operation = Literal[
    "status",
    "list",
    "show",
    "retry",
    "purge-dead",
    "journal",
    "rejected",
    "hand-actions",
    "reingest",
]
CHANGES: frozenset[Operation] = frozenset({"retry", "purge-dead", "reingest"})
CHANGE_PATHS = frozenset(f"/outbox/{operation}" for operation in CHANGES)
"""The local API paths that change something (they always need the token)."""

log = logging.getLogger(__name__)
TOKEN_FILE = "api-token"
API_TOKEN_WHO = "api token"
CLI_USER_HEADER = "X-PlantSync-User"
"""The CLI names its OS user in this header; the daemon journals it beside `api token`, as
what the caller says (only the token is proven)."""


class OperationError(ValueError):
    """The arguments do not make a valid call; the message says which and why."""


class NotFound(LookupError):
    """The call names an event the outbox does not hold in the state the call needs."""


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _NoArgs(_Args):
    pass


class _ListArgs(_Args):
    state: Literal["pending", "retrying", "dead"] = "pending"
    destination: str | None = None
    limit: int = Field(100, ge=1, le=100_000)


class _ShowArgs(_Args):
    id: str = Field(min_length=1, max_length=128)


class _SinceArgs(_Args):
    since: float = 0.0
    limit: int = Field(1000, ge=1, le=100_000)


class _ChangeArgs(_Args):
    id: str | None = Field(None, min_length=1, max_length=128)
    destination: str | None = None
    reason: str = Field(
        min_length=1, max_length=500, description="Why, for the hand-action journal."
    )


class _RetryArgs(_ChangeArgs):
    all_dead: bool = False

    @model_validator(mode="after")
    def _one_or_all(self) -> _RetryArgs:
        if (self.id is None) == (not self.all_dead):
            raise ValueError("give one event id, or all_dead: true (not both)")
        return self


class _PurgeArgs(_ChangeArgs):
    all: bool = False

    @model_validator(mode="after")
    def _one_or_all(self) -> _PurgeArgs:
        if (self.id is None) == (not self.all):
            raise ValueError(
                "give one event id, or all: true to purge every dead letter"
                + (" of that destination" if self.destination else "")
                + " (not both)"
            )
        return self


class _ReingestArgs(_Args):
    id: int = Field(ge=1, description="The input dead letter (see `rejected`).")
    reason: str = Field(
        min_length=1, max_length=500, description="Why, for the hand-action journal."
    )


ARGUMENTS: dict[Operation, type[_Args]] = {
    "status": _NoArgs,
    "list": _ListArgs,
    "show": _ShowArgs,
    "retry": _RetryArgs,
    "purge-dead": _PurgeArgs,
    "journal": _SinceArgs,
    "rejected": _SinceArgs,
    "hand-actions": _SinceArgs,
    "reingest": _ReingestArgs,
}


def parse_arguments(operation: Operation, args: Mapping[str, Any]) -> _Args:
    """The operation's arguments, or OperationError naming each one that is wrong."""
    model = ARGUMENTS[operation]
    try:
        return model.model_validate(dict(args))
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            if error["type"] == "extra_forbidden":
                known = ", ".join(model.model_fields) or "none"
                problems.append(f"unknown field {field!r} for {operation} (it takes: {known})")
            elif error["type"] == "missing":
                problems.append(
                    f"{field} is required for {operation}"
                    + (" (why: it goes in the hand-action journal)" if field == "reason" else "")
                )
            else:
                message = str(error["msg"]).removeprefix("Value error, ")
                problems.append(f"{field}: {message}" if field else message)
        raise OperationError("; ".join(problems)) from None


async def perform(
    outbox: Outbox,
    operation: Operation,
    args: Mapping[str, Any],
    who: str,
    *,
    pipeline: Pipeline | None = None,
) -> Any:
    """Run one operation on an open outbox; the result is plain JSON-able data. `who` is the
    person a change is journalled under. `reingest` needs the pipeline that owns the rules
    (the daemon's, or one made on the database)."""
    parsed = parse_arguments(operation, args)
    match parsed:
        case _ReingestArgs():
            if pipeline is None:
                raise OperationError("reingest needs the gateway's pipeline")
            try:
                outcome = await pipeline.reingest(parsed.id)
            except ValueError as exc:
                raise NotFound(str(exc)) from None
            await outbox.record_hand_action(
                HandAction(
                    "reingest",
                    f"input dead letter {parsed.id} (MES message "
                    f"{outcome['message_id'] or '-'}): {outcome['outcome']}",
                    who,
                    parsed.reason,
                ),
                affected=1 if outcome["outcome"] == "accepted" else 0,
            )
            return outcome
        case _RetryArgs():
            hand = HandAction("retry", _which(parsed.id, parsed.destination), who, parsed.reason)
            await _must_be_dead(outbox, parsed.id, parsed.destination)
            retried = await outbox.retry_dead(parsed.id, parsed.destination, hand=hand)
            log.info(
                "Hand action by %s: %d dead letter(s) put back in line (%s), because: %s",
                who,
                retried,
                hand.target,
                parsed.reason,
                extra={"event_id": parsed.id, "destination": parsed.destination},
            )
            return {"retried": retried}
        case _PurgeArgs():
            hand = HandAction(
                "purge-dead", _which(parsed.id, parsed.destination), who, parsed.reason
            )
            await _must_be_dead(outbox, parsed.id, parsed.destination)
            purged = await outbox.purge_dead(parsed.id, parsed.destination, hand=hand)
            log.warning(
                "Hand action by %s: %d dead letter(s) deleted for good (%s), because: %s",
                who,
                purged,
                hand.target,
                parsed.reason,
                extra={"event_id": parsed.id, "destination": parsed.destination},
            )
            return {"purged": purged}
        case _ListArgs():
            return await outbox.deliveries(
                destination=parsed.destination, state=parsed.state, limit=parsed.limit
            )
        case _ShowArgs():
            return await outbox.show(parsed.id)
        case _SinceArgs() if operation == "journal":
            return await outbox.journal(parsed.since, limit=parsed.limit)
        case _SinceArgs() if operation == "rejected":
            return await outbox.rejected_inputs(parsed.since, limit=parsed.limit)
        case _SinceArgs():
            return await outbox.hand_actions(parsed.since, limit=parsed.limit)
    counts = await outbox.counts()
    return {
        "destinations": {name: vars(c) for name, c in sorted(counts.items())},
        "input_dead_letters": await outbox.rejected_count(),
        "back_pressure": outbox.back_pressure,
        "used_bytes": outbox.used_bytes,
        "recovered_from": outbox.recovered_from,
        "integrity_problem": outbox.integrity_problem,
    }


async def _must_be_dead(outbox: Outbox, event_id: str | None, destination: str | None) -> None:
    """A change named one event: it must be a dead letter (of that destination), else the
    call is an error, not a quiet "0 done"."""
    if event_id is None:
        return
    where = await outbox.event_state(event_id)
    if destination is not None:
        where = {name: state for name, state in where.items() if name == destination}
    if "dead" in where.values():
        return
    if not where:
        raise NotFound(
            f"no event {event_id!r} in the outbox"
            + (f" for destination {destination}" if destination else "")
            + " (plantsync outbox list --state dead shows the dead letters)"
        )
    states = ", ".join(f"{state} for {name}" for name, state in sorted(where.items()))
    raise NotFound(f"event {event_id} is not a dead letter ({states})")


def _which(event_id: str | None, destination: str | None) -> str:
    what = f"event {event_id}" if event_id else "all dead letters"
    return what + (f" for {destination}" if destination else "")


def os_user() -> str:
    """Who runs this process, as the hand-action journal names them: the OS user, and the
    user behind sudo when there is one."""
    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        name = f"uid {os.getuid()}"
    behind = os.environ.get("SUDO_USER")
    return f"os user {name}" + (f" (sudo by {behind})" if behind and behind != name else "")


def record_hand_action(access: LocalAccess, action: HandAction, affected: int = 1) -> None:
    """Journal a hand action from a command that changed something outside the outbox (a
    trusted certificate): straight into the outbox database, daemon running or not."""
    journal_hand_action(access.database_path, action, affected)
    log.info(
        "Hand action by %s: %s %s, because: %s",
        action.who,
        action.action,
        action.target,
        action.reason,
    )


def api_token(access: LocalAccess) -> str | None:
    """The token the CLI presents: configured, else the one the daemon wrote at start."""
    if access.api.token is not None:
        return access.api.token.get_secret_value()
    try:
        return (access.data_dir / TOKEN_FILE).read_text().strip()
    except OSError:
        return None


def issue_token(access: LocalAccess) -> str:
    """The token the daemon requires; a fresh random one in data_dir unless configured."""
    if access.api.token is not None:
        return access.api.token.get_secret_value()
    token = secrets.token_urlsafe(32)
    path: Path = access.data_dir / TOKEN_FILE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    return token


class DaemonRefused(Exception):
    """The running daemon answered with an error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def call(
    access: LocalAccess,
    operation: Operation,
    args: Mapping[str, Any],
    config: PlantConfig | None = None,
) -> tuple[Any, Literal["daemon", "database"]]:
    """Run an operation through the running daemon, or on the database when none answers."""
    parse_arguments(operation, args)  # a wrong call fails here, the same with or without it
    url = f"http://{access.api.listen}/outbox/{operation}"
    headers = {CLI_USER_HEADER: os_user()}
    if (operation in CHANGES or not access.api.on_loopback) and (token := api_token(access)):
        headers["Authorization"] = f"Bearer {token}"
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            response = await client.post(url, json=dict(args), headers=headers)
    except httpx.ConnectError:
        async with Outbox.open(access.database_path) as outbox:
            # A reingest runs the message through the rules: a pipeline on the stored state.
            pipeline = (
                Pipeline(config, outbox, await outbox.load_state())
                if operation == "reingest" and config is not None
                else None
            )
            return await perform(outbox, operation, args, os_user(), pipeline=pipeline), "database"
    if response.status_code != 200:
        try:
            message = str(response.json()["error"])
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise DaemonRefused(
            response.status_code, f"the daemon answered {response.status_code}: {message}"
        )
    return response.json(), "daemon"
