"""`plantsync`: run the gateway, check a config, show its status, export schemas, start
simulators, run the demo.

Exit status, for every command: 0 done, 1 refused (an invalid config, a call the daemon turned
down, nothing found), 2 a wrong command line. `--help` works on every command, including those
that hand their options on (`sim`, `probe`, `browse`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from edge.config.checks import config_warnings, fully_validated
from edge.config.errors import ConfigError
from edge.config.loader import load_config, load_local_access, unresolved_references
from edge.config.models import PlantConfig
from edge.config.secrets import exposed_secrets
from edge.ops.logs import setup_logging

log = logging.getLogger("plantsync")

SIMULATORS = ("modbus", "erp", "qms", "opcua", "mes", "scenario")


PASS_ON = {"sim": "simulator", "probe": "protocol", "browse": "protocol", "trust": "protocol"}
"""Commands whose options after the first name belong to the tool they start."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command not in PASS_ON and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command in PASS_ON and getattr(args, PASS_ON[args.command]) is None:
        command = _subparser(parser, args.command)
        if rest and rest[0] in ("-h", "--help"):
            command.print_help()
            return 0
        command.error(
            f"say which {PASS_ON[args.command]}: "
            f"{', '.join(_choices(command, PASS_ON[args.command]))}"
        )
    match args.command:
        case "run":
            return _run(args)
        case "check":
            return _check(args.config, offline=args.offline)
        case "schema":
            return _schema(args.out)
        case "sim":
            return _sim(args.simulator, rest)
        case "probe":
            from drivers.modbus import probe_main

            return probe_main(rest)
        case "browse":
            from drivers.opcua import browse_main

            return browse_main(rest)
        case "trust":
            from drivers.opcua import trust_main

            return trust_main(
                rest,
                data_dir_of=lambda path: load_local_access(path).data_dir,
                journal=_journal_trust,
            )
        case "doctor" if args.protocol == "jetstream":
            from edge.hub.cli import doctor_main

            return doctor_main(args.config)
        case "doctor":
            return _doctor(args)
        case "hub":
            from edge.hub.cli import hub_main

            return hub_main(args)
        case "relay":
            from edge.hub.cli import relay_main

            return relay_main(args)
        case "demo":
            from edge.cli.demo import run_demo

            return run_demo(Path(args.config))
        case "record" | "replay":
            return _offline(args)
        case "outbox":
            from edge.cli.outbox import run_outbox_command

            return run_outbox_command(args)
        case "status":
            from edge.cli.status import run_status_command

            return run_status_command(args)
        case "reconcile":
            from edge.cli.reconcile import run_reconcile_command

            return run_reconcile_command(args)
    parser.print_help()
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plantsync", description=__doc__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the gateway")
    run.add_argument("--config", "-c", required=True, type=Path, help="plant YAML file")
    run.add_argument(
        "--log-format",
        choices=("json", "text"),
        default="json",
        help="json lines for journald (default) or text for a terminal",
    )
    run.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    check = commands.add_parser("check", help="validate a config file; exit 1 if invalid")
    check.add_argument("--config", "-c", required=True, type=Path)
    check.add_argument(
        "--offline",
        action="store_true",
        help="check everything but the values of ${ENV}, ${file:...} and "
        "${cred:...} references, which are not resolved (for a shell without "
        "the plant's secrets; the unit's ExecStartPre checks in full)",
    )

    schema = commands.add_parser("schema", help="write the JSON Schemas of the events")
    schema.add_argument(
        "--out",
        "-o",
        type=Path,
        default=Path("schemas"),
        help="directory to write into (default: ./schemas)",
    )

    sim = commands.add_parser(
        "sim",
        help="start a simulator: modbus (PLC), opcua (machine), "
        "mes (MQTT publisher), erp (ERP API), qms (QMS API), or a whole "
        "plant from a scenario file (scenario FILE); options after the "
        "name go to the simulator (try --help)",
        add_help=False,
    )
    sim.add_argument("simulator", choices=SIMULATORS, nargs="?")

    probe = commands.add_parser(
        "probe",
        help="read a Modbus block and show it decoded in every "
        "type and byte order (try: probe modbus --help)",
        add_help=False,
    )
    probe.add_argument("protocol", choices=("modbus",), nargs="?")

    browse = commands.add_parser(
        "browse",
        help="print an OPC UA server's address space (try: browse opcua --help)",
        add_help=False,
    )
    browse.add_argument("protocol", choices=("opcua",), nargs="?")

    trust = commands.add_parser(
        "trust",
        help="show an OPC UA server's certificate and trust it "
        "on your yes (try: trust opcua --help)",
        add_help=False,
    )
    trust.add_argument("protocol", choices=("opcua",), nargs="?")
    doctor = commands.add_parser(
        "doctor",
        help="check a peer the gateway relies on: doctor mqtt reads the broker's "
        "$SYS figures (dropped messages, sessions kept) and, with --broker-config, its "
        "queue limit and persistence settings; doctor jetstream reports the hub stream a "
        "jetstream destination publishes to",
        description="mqtt: connect to each MQTT broker of the config as a client of its own (never "
        "the gateway's session), read its $SYS tree, and report what it tells of queue limits "
        "and persistence. jetstream: report the hub stream (subjects, replicas, duplicate "
        "window, limits) and warn when the duplicate window is shorter than the outage the "
        "outbox may buffer. Exit 1 when something needs fixing.",
    )
    doctor.add_argument("protocol", choices=("mqtt", "jetstream"))
    doctor.add_argument("--config", "-c", required=True, type=Path)
    doctor.add_argument("--driver", help="only the MQTT driver of this name")
    doctor.add_argument(
        "--broker-config",
        type=Path,
        help="the broker's mosquitto.conf, to check its queue and persistence "
        "settings (run on the broker's host)",
    )
    doctor.add_argument(
        "--wait",
        default="11s",
        help="how long to read $SYS (mosquitto publishes it every sys_interval, "
        "10 s by default); default 11s",
    )

    demo = commands.add_parser("demo", help="run the simulators and the gateway together")
    demo.add_argument("--config", "-c", type=Path, default=Path("config/demo.yaml"))

    record = commands.add_parser(
        "record", help="capture live samples and MES events to a JSON lines file (for replay)"
    )
    record.add_argument("--config", "-c", required=True, type=Path)
    record.add_argument("--out", "-o", required=True, type=Path)
    record.add_argument("--duration", help="stop after this long (e.g. 8h); default: Ctrl-C")
    replay = commands.add_parser(
        "replay", help="run recorded input through the rules offline and print the events"
    )
    replay.add_argument("--config", "-c", required=True, type=Path)
    replay.add_argument("--input", "-i", required=True, type=Path)

    from edge.cli.outbox import add_outbox_parser

    add_outbox_parser(commands)
    from edge.cli.status import add_status_parser

    add_status_parser(commands)
    from edge.hub.cli import add_hub_parsers

    add_hub_parsers(commands)
    from edge.cli.reconcile import add_reconcile_parser

    add_reconcile_parser(commands)
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise KeyError(name)  # pragma: no cover - names come from PASS_ON


def _choices(parser: argparse.ArgumentParser, dest: str) -> list[str]:
    return next(list(a.choices or ()) for a in parser._actions if a.dest == dest)


def _check(path: Path, *, offline: bool = False) -> int:
    try:
        config = load_config(path, offline=offline)
        unresolved = unresolved_references(path) if offline else []
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        count = len(exc.problems)
        print(f"{path}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
        return 1
    for warning in exposed_secrets(path, config):
        print(f"warning: {warning}", file=sys.stderr)
    for doubt in config_warnings(config):
        print(f"warning: {doubt}", file=sys.stderr)
    summary = (
        f"site {config.site}: {_plural(len(config.drivers), 'driver')}, "
        f"{_plural(len(config.machines), 'machine')}, "
        f"{_plural(len(config.destinations), 'destination')}"
    )
    if offline:
        left = f"; not resolved, so not checked: {', '.join(unresolved)}" if unresolved else ""
        if not fully_validated(config):
            left += (
                "; cross references not checked, as a section with an unresolved "
                "reference cannot be built without its value"
            )
        print(f"{path}: OK offline ({summary}{left})")
    else:
        print(f"{path}: OK ({summary})")
    _explain_machines(config)
    return 0


def _explain_machines(config: PlantConfig) -> None:
    """What each machine's counters make of yield and scrap, and how long its state changes
    wait for them: the choices a technician should see before ERP books anything."""
    from edge.rules.machine import settle_for

    for machine in config.machines:
        waits = ""
        if machine.signals.state is not None:
            waits = f"; state changes wait {settle_for(config, machine):g}s for the counters"
        print(f"  machine {machine.id}: {machine.signals.counting()}{waits}")
        if note := machine.signals.migration_note():
            print(f"    note: {note}")


def _doctor(args: argparse.Namespace) -> int:
    from drivers.common.timing import parse_duration
    from drivers.mqtt import MqttConfig, doctor

    try:
        config = load_config(args.config)
        wait = parse_duration(args.wait)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"plantsync doctor: --wait: {exc}", file=sys.stderr)
        return 2
    brokers = [
        d for d in config.drivers if isinstance(d, MqttConfig) and args.driver in (None, d.name)
    ]
    if not brokers:
        which = f"named {args.driver!r} " if args.driver else ""
        print(f"plantsync doctor: {args.config} has no MQTT driver {which}", file=sys.stderr)
        return 2
    status = 0
    for broker in brokers:
        code, report = doctor(broker, args.broker_config, wait)
        print(report)
        status = max(status, code)
    return status


def _offline(args: argparse.Namespace) -> int:
    from drivers.common.timing import parse_duration
    from edge.cli.replay import run_record, run_replay

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    if args.command == "replay":
        return run_replay(config, args.input)
    setup_logging("text", "WARNING")
    try:
        duration = parse_duration(args.duration) if args.duration else None
    except ValueError as exc:
        print(f"--duration: {exc}", file=sys.stderr)
        return 2
    return run_record(config, args.out, duration)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _schema(out: Path) -> int:
    from edge.model.schemas import write_schemas

    written = write_schemas(out)
    print(f"Wrote {len(written)} JSON Schemas to {out}/")
    return 0


def _sim(name: str, rest: list[str]) -> int:
    prog = f"plantsync sim {name}"
    match name:
        case "modbus":
            from simulators import modbus_plc

            return modbus_plc.main(rest, prog)
        case "erp":
            from simulators.erp import app as erp

            return erp.main(rest, prog)
        case "opcua":
            from simulators import opcua_machine

            return opcua_machine.main(rest, prog)
        case "mes":
            from simulators import mes_publisher

            return mes_publisher.main(rest)
        case "qms":
            from simulators import qms_api

            return qms_api.main(rest, prog)
        case "scenario":
            from simulators import scenario

            return scenario.main(rest)
    return 2


def _run(args: argparse.Namespace) -> int:
    # What the daemon writes (the outbox, the API token) is for its own user: without the
    # unit's UMask= too, when someone runs it by hand.
    os.umask(0o077)
    setup_logging(args.log_format, args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("Invalid config: %s", problem)
        return 1
    for warning in exposed_secrets(args.config, config):
        log.warning("Secrets exposed: %s", warning)
    for doubt in config_warnings(config):
        log.warning("Config: %s", doubt)
    return run_until_signalled(_serve(config, args.config))


async def _serve(config: PlantConfig, path: Path) -> None:
    from edge.runtime.daemon import Control, serve

    control = Control()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None

    def on_stop(signum: int) -> None:
        if not control.stop_requested:
            log.info("Received %s; stopping", signal.Signals(signum).name)
            control.stop()
        else:
            log.warning("Received %s again; aborting the shutdown", signal.Signals(signum).name)
            main_task.cancel()

    def on_reload() -> None:
        if control.stop_requested:
            log.info("Received SIGHUP while stopping; ignored")
        else:
            log.info("Received SIGHUP; reloading %s", path)
            control.reload()

    def load() -> PlantConfig:
        reloaded = load_config(path)
        for warning in exposed_secrets(path, reloaded):
            log.warning("Secrets exposed: %s", warning)
        return reloaded

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop, signum)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    await serve(config, control, load)


def run_until_signalled(coroutine: Coroutine[Any, Any, None]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner: Any = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(coroutine)
    except asyncio.CancelledError:
        return 1
    return 0


def _journal_trust(data_dir: Path, target: str, reason: str) -> None:
    """A server certificate trusted by hand goes into the hand-action journal."""
    from buffer.outbox import HandAction, journal_hand_action
    from edge.ops.operations import os_user

    journal_hand_action(
        data_dir / "outbox.db", HandAction("trust opcua", target, os_user(), reason)
    )


if __name__ == "__main__":
    raise SystemExit(main())
