"""`plantsync demo`: the Modbus PLC and ERP API simulators and the gateway, on this box.

Starts the three as child processes with the demo config, prefixes each line they print with
who said it, and every few seconds prints what the gateway reads and what ERP holds. Ctrl-C (or
SIGTERM) stops the gateway first, then the simulators, and waits for each to exit. A port the
demo needs that is taken is said in one line before anything starts, and any child that ends on
its own makes the demo exit non-zero: `make demo` fails visibly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from drivers.modbus import ModbusConfig
from edge.config.errors import ConfigError
from edge.config.loader import load_config
from edge.config.models import PlantConfig


def run_demo(config_path: Path) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 1
    if not any(isinstance(d, ModbusConfig) for d in config.drivers) or (
        "erp" not in config.destinations
    ):
        print(
            f"{config_path}: the demo needs a Modbus driver and a destination named erp",
            file=sys.stderr,
        )
        return 1
    taken = busy_port(config, config_path)
    if taken is not None:
        print(taken, file=sys.stderr)
        return 1
    return asyncio.run(_demo(config_path, config))


def _ports(config: PlantConfig) -> list[tuple[str, str, int, str]]:
    """What the demo listens on: who, host, port, and the setting that chooses it."""
    index, plc = next((i, d) for i, d in enumerate(config.drivers) if isinstance(d, ModbusConfig))
    erp = urlsplit(config.destinations["erp"].base_url)
    return [
        ("the PLC simulator", plc.host or "127.0.0.1", plc.port, f"drivers[{index}].port"),
        (
            "the ERP simulator",
            erp.hostname or "127.0.0.1",
            erp.port or 80,
            "destinations.erp.base_url",
        ),
        ("the gateway's local API", config.api.host, config.api.port, "api.listen"),
    ]


def busy_port(config: PlantConfig, config_path: Path) -> str | None:
    """One line naming the first port the demo needs that something else holds, or None."""
    for who, host, port, setting in _ports(config):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                return (
                    f"plantsync demo: port {port} on {host} ({who}, {setting} in "
                    f"{config_path}) is in use ({exc.strerror}): stop what holds it, or "
                    f"copy {config_path}, choose free ports there and run plantsync demo "
                    "--config YOUR-COPY"
                )
    return None


async def _demo(config_path: Path, config: PlantConfig) -> int:
    data_dir = config.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    # The simulators listen where the config points the gateway: one file says it all.
    plc_port = next(d.port for d in config.drivers if isinstance(d, ModbusConfig))
    erp_url = config.destinations["erp"].base_url.rstrip("/")
    erp_port = urlsplit(erp_url).port or 80
    python = sys.executable
    children: list[tuple[str, asyncio.subprocess.Process]] = []
    exit_code = 0
    try:
        for label, argv in (
            (
                "plc",
                [
                    python,
                    "-m",
                    "simulators.modbus_plc",
                    "--port",
                    str(plc_port),
                    "--rate",
                    "12",
                    "--scrap-rate",
                    "0.5",
                ],
            ),
            (
                "erp",
                [
                    python,
                    "-m",
                    "simulators.erp",
                    "--port",
                    str(erp_port),
                    "--db",
                    str(data_dir / "erp-simulator.db"),
                    "--log-requests",
                ],
            ),
            (
                "gateway",
                [
                    python,
                    "-m",
                    "edge.cli",
                    "run",
                    "--config",
                    str(config_path),
                    "--log-format",
                    "text",
                ],
            ),
        ):
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )  # Ctrl-C reaches the demo only; it stops them in order
            children.append((label, process))
            await asyncio.sleep(0.5)
        print(
            f"[demo] PLC simulator on 127.0.0.1:{plc_port}, ERP simulator on {erp_url}, "
            f"gateway API on http://{config.api.listen}; "
            "Ctrl-C stops everything",
            flush=True,
        )
        async with asyncio.TaskGroup() as group:
            pumps = [
                group.create_task(_pump(label, process), name=f"pump-{label}")
                for label, process in children
            ]
            report = group.create_task(_report(config, erp_url), name="demo-report")
            exited = group.create_task(_first_exit(children), name="watch-children")
            waiting = group.create_task(stop.wait(), name="wait-for-ctrl-c")
            await asyncio.wait([exited, waiting], return_when=asyncio.FIRST_COMPLETED)
            if exited.done() and not stop.is_set():
                exit_code = 1  # a child ended on its own: the demo did not run
            report.cancel()
            exited.cancel()
            waiting.cancel()
            print("[demo] stopping the gateway, then the simulators", flush=True)
            await _stop_all(children)
            for pump in pumps:
                await pump
    finally:
        await _stop_all(children)
    return exit_code


async def _pump(label: str, process: asyncio.subprocess.Process) -> None:
    assert process.stdout is not None
    async for raw in process.stdout:
        print(f"[{label}] {raw.decode(errors='replace').rstrip()}", flush=True)


async def _first_exit(children: list[tuple[str, asyncio.subprocess.Process]]) -> None:
    _done, _ = await asyncio.wait(
        [asyncio.ensure_future(p.wait()) for _, p in children], return_when=asyncio.FIRST_COMPLETED
    )
    for label, process in children:
        if process.returncode is not None:
            print(f"[demo] {label} exited with code {process.returncode}", flush=True)


async def _report(config: PlantConfig, erp_url: str) -> None:
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            await asyncio.sleep(5.0)
            with contextlib.suppress(httpx.HTTPError, json.JSONDecodeError):
                status = (await client.get(f"http://{config.api.listen}/status")).json()
                reads = ", ".join(f"{name}={s['value']}" for name, s in status["signals"].items())
                outbox = ", ".join(
                    f"{name}: {d['delivered']} delivered, {d['pending']} pending"
                    for name, d in status["destinations"].items()
                )
                print(f"[demo] gateway reads {reads} | {outbox}", flush=True)
            with contextlib.suppress(httpx.HTTPError, json.JSONDecodeError):
                stats = (await client.get(f"{erp_url}/stats")).json()
                print(
                    f"[demo] ERP holds {stats['unique']} event(s), saw {stats['duplicates']} "
                    "duplicate(s)",
                    flush=True,
                )


async def _stop_all(children: list[tuple[str, asyncio.subprocess.Process]]) -> None:
    # The gateway was started last; it stops first so it can drain to the ERP simulator.
    for _, process in reversed(children):
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 15.0)
            except TimeoutError:
                process.kill()
                await process.wait()
