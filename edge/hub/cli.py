"""The hub's commands: `plantsync hub init`, `plantsync relay` and `plantsync doctor
jetstream` (exit codes: 0 fine, 1 something needs fixing, 2 a usage or config error)."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from pathlib import Path

import nats.errors
import nats.js.errors

from edge.config.destinations import DestinationConfig
from edge.config.errors import ConfigError
from edge.config.loader import load_config
from edge.hub.config import HubConfig, load_hub_config
from edge.hub.connection import HubUnavailable, connect
from edge.hub.stream import describe, init_hub, patiently


def add_hub_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    hub = commands.add_parser(
        "hub",
        help="the plants' hub (NATS JetStream): hub init creates or checks the stream, "
        "its dead letter stream and the relays' consumers",
        description="Create the hub stream, dead letter stream and relay consumers from "
        "hub.yaml, or check that they match it; safe to run again. Exit 1 when the hub's "
        "stream differs in a way that cannot be changed in place.",
    )
    hub.add_argument("action", choices=("init",))
    hub.add_argument("--config", "-c", required=True, type=Path, help="hub YAML file")
    relay = commands.add_parser(
        "relay",
        help="deliver the hub's events to ERP and QMS (run N of them anywhere)",
        description="Consume the hub stream's partitions and deliver to hub.yaml's "
        "destinations with the gateway's profiles, retries and dead letters; /metrics shows "
        "consumer lag per partition, redeliveries and dead letter depth.",
    )
    relay.add_argument("--config", "-c", required=True, type=Path, help="hub YAML file")
    relay.add_argument(
        "--name", default=None, help="this relay's name in logs and the hub (default: host-pid)"
    )
    relay.add_argument("--log-format", choices=("json", "text"), default="json")
    relay.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def _hub_config(path: Path) -> HubConfig | None:
    try:
        return load_hub_config(path)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return None


def hub_main(args: argparse.Namespace) -> int:
    config = _hub_config(args.config)
    if config is None:
        return 2
    return asyncio.run(_init(config))


async def _init(config: HubConfig) -> int:
    try:
        client = await connect(
            "plantsync-hub-init",
            config.nats.servers,
            config.nats.tls,
            config.nats.auth,
            connect_timeout=config.nats.timeout,
        )
    except HubUnavailable as exc:
        print(f"plantsync hub init: {exc}", file=sys.stderr)
        return 1
    try:
        report = await init_hub(client.jetstream(timeout=config.nats.timeout), config)
    except nats.js.errors.APIError as exc:
        print(
            f"plantsync hub init: the hub refused: {exc.description} (error {exc.err_code})",
            file=sys.stderr,
        )
        return 1
    except nats.errors.TimeoutError:
        print(
            "plantsync hub init: the hub did not answer (no JetStream meta leader: are a "
            "majority of its servers up?)",
            file=sys.stderr,
        )
        return 1
    finally:
        await client.close()
    print("\n".join(report.lines))
    return 0 if report.ok else 1


def relay_main(args: argparse.Namespace) -> int:
    from edge.cli.main import run_until_signalled
    from edge.hub.relay import run_relay
    from edge.ops.logs import setup_logging

    setup_logging(args.log_format, args.log_level)
    config = _hub_config(args.config)
    if config is None:
        return 2
    if not config.destinations:
        print(f"plantsync relay: {args.config} has no destinations to deliver to", file=sys.stderr)
        return 2
    name = args.name or f"{socket.gethostname()}-{os.getpid()}"
    try:
        return run_until_signalled(run_relay(config, name))
    except HubUnavailable as exc:
        print(f"plantsync relay: {exc}", file=sys.stderr)
        return 1
    except nats.js.errors.APIError as exc:
        print(
            f"plantsync relay: the hub refused: {exc.description} (error {exc.err_code}); "
            f"has plantsync hub init --config {args.config} been run?",
            file=sys.stderr,
        )
        return 1


def doctor_main(path: Path) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    hubs = {name: d for name, d in config.destinations.items() if d.profile == "jetstream"}
    if not hubs:
        print(
            f"plantsync doctor: {path} has no destination with profile jetstream", file=sys.stderr
        )
        return 2
    status = 0
    for name, destination in hubs.items():
        code, lines = asyncio.run(_doctor_one(name, destination))
        print("\n".join(lines))
        status = max(status, code)
    return status


async def _doctor_one(name: str, destination: DestinationConfig) -> tuple[int, list[str]]:
    settings = destination.jetstream
    servers = [destination.base_url, *settings.servers]
    try:
        client = await connect(
            "plantsync-doctor",
            servers,
            destination.tls,
            settings.auth,
            connect_timeout=destination.timeout,
        )
    except HubUnavailable as exc:
        return 1, [f"destination {name}: {exc}"]
    url = client.connected_url
    lines = [f"destination {name}: connected to {url.netloc if url else '?'}"]
    try:
        js = client.jetstream(timeout=destination.timeout)
        try:
            info = await patiently(lambda: js.stream_info(settings.stream))
        except nats.js.errors.NotFoundError:
            return 1, [
                *lines,
                f"  stream {settings.stream} does not exist: create it with "
                "plantsync hub init --config hub.yaml",
            ]
        lines += ["  " + line for line in describe(info)]
        code = 0
        sample = settings.pattern.subject(
            site="SITE", event_type="production.confirmation", key="KEY"
        )
        if not any(_matches(subject, sample) for subject in info.config.subjects or []):
            lines.append(
                f"  PROBLEM: the stream's subjects do not take {settings.subject} "
                f"(e.g. {sample}): the plant's pattern and the hub's differ"
            )
            code = 1
        window = info.config.duplicate_window or 0
        if window < settings.longest_outage:
            lines.append(
                f"  WARNING: duplicate window {window:g}s is shorter than the longest outage "
                f"this plant may buffer (jetstream.longest_outage, {settings.longest_outage:g}"
                "s): a publish retried after the window is stored twice; then the relay "
                "delivers it twice and the receiver's Idempotency-Key is what drops the "
                "repeat. Raise stream.duplicate_window in hub.yaml and run hub init."
            )
        if (info.config.num_replicas or 1) < 3:
            lines.append(
                f"  WARNING: {info.config.num_replicas} replica(s): losing one server "
                "loses (or stops) the stream; use 3"
            )
        return code, lines
    except nats.errors.Error as exc:
        return 1, [*lines, f"  the hub did not answer: {exc or type(exc).__name__}"]
    finally:
        await client.close()


def _matches(pattern: str, subject: str) -> bool:
    wanted, tokens = pattern.split("."), subject.split(".")
    for i, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > i
        if i >= len(tokens) or (token != "*" and token != tokens[i]):
            return False
    return len(tokens) == len(wanted)
