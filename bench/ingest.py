"""Ingest benchmark: how fast readings get into the gateway through its three southbound
drivers, each against a bare client of the same protocol measured in the same run.

- OPC UA (`bench/_opcua.py`): data-change notifications per second through `OpcUaDriver`
  (its sink only counts) against a bare asyncua client (a subscription in iterator mode, the
  cheapest asyncua path) asking for the same session, subscription and items, on the same
  variables of the same server: the machine simulator in its own process, many machines on a
  slow clock, four of each machine's eight variables changing at each tick. Phases run in
  ABBA order (bare, driver, driver, bare per round), each client in a fresh process of its own
  (its RSS and CPU are its own). The oracle is the server's own count of what it wrote per
  tick: each phase says how much of what was written inside its window it received (`lost`),
  and how late. The Python server is the limit here (a few thousand changes per second), so
  the rates say whether the driver keeps up (target: ratio >= 0.8) and the CPU time per
  notification says what the driver adds on top of asyncua, and so where its ceiling is.
- MQTT: MES messages per second ingested by `MqttDriver` into a sink that commits them to a
  real `Outbox` (temp file, `synchronous=FULL`), acknowledged after the commit, against a bare
  paho subscriber (QoS 1, acknowledged on receipt) on the same broker, a mosquitto of our own
  on a free port. Each phase has its own persistent session and topic: the session is made
  (and proven by one probe message), the client goes away, the same burst of consumption
  messages is published (MES publisher simulator, QoS 1) into the broker's queue, and the
  clock runs from the client's connect to its last message (driver: committed). Same Receive
  Maximum for both (target: ratio >= 0.6). A second bare subscriber is paho with the driver's
  own read-ahead (`ReadAheadClient`; paho acknowledges each message on receipt, its PUBACKs
  written once per pass of paho's loop): the ratio to it says what the driver's commit and
  mapping cost, apart from how it reads the socket.
- Modbus: registers per second read through `ModbusDriver` polling as fast as it can (one
  poll group, a realistic tag list over holding, input, coil and discrete input tables)
  against the PLC simulator in its own process, with coalescing on and off, against a bare
  pymodbus client reading the driver's planned blocks back to back; and the requests per
  poll that coalescing saves.

Prints one JSON line: medians over rounds, the ratios, and under `samples` every measurement.
Run it as `.venv/bin/python bench/ingest.py` (`--quick` for a smoke run, `--help` for sizes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import _opcua
import msgspec
import paho.mqtt.client as mqtt
from _heap import freeze_as_the_daemon
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pymodbus.client import AsyncModbusTcpClient

from buffer.outbox import Outbox, OutboxEvent
from drivers.base import MesMessage, Reading, Sample
from drivers.modbus import ModbusConfig, ModbusDriver, ReadBlock
from drivers.mqtt import MqttConfig, MqttDriver
from drivers.mqtt.client import ReadAheadClient
from edge.ops.logs import setup_logging
from simulators.mes_publisher import MesPublisher
from simulators.opcua_machine import VARIABLE_TYPES

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 20.0
MQTT_BATCH_MAX = 500
MQTT_RECEIVE_MAXIMUM = 2 * MQTT_BATCH_MAX  # what the driver announces by default
MQTT_DRAIN_TIMEOUT = 60.0

PROTOCOLS = ("opcua", "mqtt", "modbus")
TARGETS = {"opcua": 0.8, "mqtt": 0.6}
"""The ratio each driver should reach against its bare client."""

MODBUS_TAGS: list[dict[str, Any]] = [
    # The press: counters, state, process values.
    {"name": "good", "address": 0, "type": "uint32"},
    {"name": "bad", "address": 2, "type": "uint32"},
    {"name": "state", "address": 10, "type": "uint16"},
    {"name": "force", "address": 20, "type": "float32"},
    {"name": "temperature", "address": 30, "type": "int16", "scale": 0.1},
    {"name": "good_low_word_first", "address": 40, "type": "uint32", "byte_order": "CDAB"},
    # A recipe and status block, as PLC programmers lay them out: neighbours with small gaps.
    {"name": "batch_size", "address": 100, "type": "uint32"},
    {"name": "offset", "address": 110, "type": "int32"},
    {"name": "setpoint", "address": 120, "type": "float32"},
    {"name": "total_strokes", "address": 130, "type": "uint64"},
    {"name": "energy", "address": 150, "type": "int64"},
    {"name": "cycle_time", "address": 170, "type": "float64"},
    {"name": "alarm_code", "address": 190, "type": "int16"},
    {"name": "tool_id", "address": 191, "type": "uint16"},
    {"name": "door_open", "address": 192, "bit": 3},
    {"name": "recipe", "address": 200, "type": "string", "length": 5},
    # Other tables.
    {"name": "input_only", "address": 50, "table": "input", "type": "uint32"},
    {"name": "hydraulics_on", "address": 0, "table": "coil"},
    {"name": "guard_closed", "address": 1, "table": "discrete_input"},
]


@dataclass(frozen=True)
class Sizes:
    opcua_machines: int
    opcua_tick: float
    opcua_seconds: float
    mqtt_messages: int
    modbus_seconds: float
    rounds: int


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


@contextlib.contextmanager
def child(argv: list[str], ready: str, log_path: Path, timeout: float = START_TIMEOUT) -> Any:
    """A child process that prints `ready` once it serves; SIGTERM at the end."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + timeout
        while ready not in process.stdout.readline().decode(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv} did not start: {log_path.read_text()}")
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- shared ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """`count` units in `seconds` wall time, with `cpu` seconds of this process's CPU."""

    count: int
    seconds: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_unit(self) -> float:
        return self.cpu / self.count * 1e6 if self.count else 0.0


async def measure_window(counter: list[int], warmup: float, seconds: float) -> Measured:
    """Let `warmup` pass, then count what `counter[0]` gains over `seconds`."""
    await asyncio.sleep(warmup)
    count, wall, cpu = counter[0], time.perf_counter(), time.process_time()
    await asyncio.sleep(seconds)
    return Measured(counter[0] - count, time.perf_counter() - wall, time.process_time() - cpu)


def _figures(measured: Measured) -> dict[str, float]:
    figures = {
        "count": measured.count,
        "seconds": round(measured.seconds, 3),
        "rate": round(measured.rate),
        "cpu_us": round(measured.cpu_us_per_unit, 1),
    }
    return figures


def bench_opcua(sizes: Sizes, scratch: Path) -> dict[str, Any]:
    """See `bench/_opcua.py`: driver against bare asyncua, ABBA, the server's count as oracle."""
    script = Path(__file__).resolve()
    return _opcua.bench(
        script,
        child,
        sizes.opcua_machines,
        sizes.opcua_tick,
        sizes.opcua_seconds,
        sizes.rounds,
        scratch,
    )


# --- MQTT ------------------------------------------------------------------------------------


@dataclass
class Broker:
    """A mosquitto on a free port that queues generously (nothing dropped, big windows)."""

    directory: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.access(binary, os.X_OK):
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.port = free_port()
        config = self.directory / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "max_queued_messages 1000000",
            f"max_inflight_messages {MQTT_RECEIVE_MAXIMUM}",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        config.write_text("\n".join(lines) + "\n")
        with (self.directory / "mosquitto.log").open("wb") as log:
            self.process = subprocess.Popen(
                [binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mosquitto did not start") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def publish_burst(port: int, machine: str, count: int, *, first: int = 0) -> None:
    """`count` MES consumption messages for `machine`, QoS 1, every PUBACK awaited."""
    with MesPublisher(
        "127.0.0.1", port, site="1010", machine=machine, run=f"bench-{first}", window=1000
    ) as publisher:
        for number in range(first, first + count):
            publisher.consume(
                f"{4000000 + number // 100}", "RM-STEEL", f"RM-{number:08d}", Decimal("12.500")
            )
        publisher.flush(MQTT_DRAIN_TIMEOUT)


def mqtt_config(port: int, machine: str) -> MqttConfig:
    return MqttConfig.model_validate(
        {
            "name": "mes",
            "type": "mqtt",
            "host": "127.0.0.1",
            "port": port,
            "client_id": f"bench-driver-{machine}",
            "batch_max": MQTT_BATCH_MAX,
            "receive_maximum": MQTT_RECEIVE_MAXIMUM,
            "topics": [
                {
                    "filter": f"mes/1010/{machine}/consumption",
                    "event": "material.consumed",
                    "fields": {
                        "site": "site",
                        "machine_id": "$topic[2]",
                        "order_id": "order_id",
                        "operation": "operation",
                        "material": "material",
                        "lot_id": "lot_id",
                        "quantity.value": "quantity",
                        "quantity.uom": "uom",
                        "occurred_at": "occurred_at",
                    },
                }
            ],
        }
    )


FIELDS_JSON = msgspec.json.Encoder()
"""The sink's serialiser: msgspec writes Decimal as a string, as `json.dumps(default=str)` did,
without a Python callback per quantity (that callback was a seventh of the driver phase's CPU,
a cost of this harness, not of the driver)."""


class CommittingSink:
    """Each MES message becomes an outbox event; returns once the batch is committed."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.committed = 0
        self.done = asyncio.Event()
        self.target = 0
        self.finished_at = 0.0

    async def __call__(self, readings: Sequence[Reading]) -> None:
        rows = []
        for reading in readings:
            if not isinstance(reading, MesMessage):
                raise RuntimeError(f"unexpected reading {reading!r}")
            payload = FIELDS_JSON.encode(reading.fields)
            rows.append(
                OutboxEvent(
                    id=reading.message_id,
                    type=reading.kind,
                    partition_key=str(reading.fields.get("order_id")),
                    payload=payload,
                    destinations=("erp",),
                )
            )
        result = await self.outbox.commit(rows)
        self.committed += len(result.new_ids)
        if self.target and self.committed >= self.target and not self.done.is_set():
            self.finished_at = time.perf_counter()
            self.done.set()


async def mqtt_driver_phase(
    port: int, machine: str, count: int, outbox: Outbox
) -> tuple[Measured, float]:
    """Make the session, publish the burst while the driver is away, then time the drain."""
    config = mqtt_config(port, machine)
    sink = CommittingSink(outbox)
    sink.target = 1
    async with asyncio.TaskGroup() as tasks:
        running = tasks.create_task(MqttDriver(config).run(sink), name="bench-mqtt-setup")
        async with asyncio.timeout(MQTT_DRAIN_TIMEOUT):
            probe = 10_000_000
            while not sink.done.is_set():  # until a probe comes through: subscribed
                await asyncio.to_thread(publish_burst, port, machine, 1, first=probe)
                probe += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(sink.done.wait(), 0.5)
        running.cancel()
    await asyncio.to_thread(publish_burst, port, machine, count)

    sink = CommittingSink(outbox)
    sink.target = count
    driver = MqttDriver(config)
    async with asyncio.TaskGroup() as tasks:
        started, cpu = time.perf_counter(), time.process_time()
        running = tasks.create_task(driver.run(sink), name="bench-mqtt-driver")
        async with asyncio.timeout(MQTT_DRAIN_TIMEOUT):
            await sink.done.wait()
        cpu = time.process_time() - cpu
        running.cancel()
    batches = sum(driver.batch_sizes.values())
    return (
        Measured(sink.committed, sink.finished_at - started, cpu),
        sink.committed / batches if batches else 0.0,
    )


def mqtt_bare_phase(
    port: int, machine: str, count: int, client_class: type[mqtt.Client] = mqtt.Client
) -> Measured:
    """The same with a bare paho client: QoS 1, acknowledged by paho as each message arrives."""
    client_id = f"bench-bare-{machine}"
    subscribed = threading.Event()
    done = threading.Event()
    received = [0]
    finished_at = [0.0]

    def on_connect(
        client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        client.subscribe(f"mes/1010/{machine}/consumption", qos=1)

    def on_subscribe(
        client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        subscribed.set()

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        received[0] += 1
        if received[0] >= count:
            finished_at[0] = time.perf_counter()
            done.set()

    def connect(subscribe: bool) -> mqtt.Client:
        client = client_class(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        if subscribe:
            client.on_connect = on_connect
            client.on_subscribe = on_subscribe
        client.on_message = on_message
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 3600
        properties.ReceiveMaximum = MQTT_RECEIVE_MAXIMUM
        client.connect("127.0.0.1", port, clean_start=False, properties=properties)
        client.loop_start()
        return client

    setup = connect(subscribe=True)
    if not subscribed.wait(START_TIMEOUT):
        raise RuntimeError("the bare subscriber got no SUBACK")
    setup.disconnect()
    setup.loop_stop()
    publish_burst(port, machine, count)

    received[0] = 0
    started, cpu = time.perf_counter(), time.process_time()
    client = connect(subscribe=False)
    if not done.wait(MQTT_DRAIN_TIMEOUT):
        raise RuntimeError(f"the bare subscriber got {received[0]} of {count}")
    cpu = time.process_time() - cpu
    client.disconnect()
    client.loop_stop()
    return Measured(received[0], finished_at[0] - started, cpu)


async def mqtt_driver_rounds(
    port: int, sizes: Sizes, scratch: Path, round_number: int
) -> tuple[Measured, float]:
    async with Outbox.open(scratch / f"mqtt-outbox-{round_number}.db") as outbox:
        return await mqtt_driver_phase(port, f"driver-r{round_number}", sizes.mqtt_messages, outbox)


def bench_mqtt(sizes: Sizes, scratch: Path) -> dict[str, Any]:
    directory = scratch / "mosquitto"
    directory.mkdir()
    broker = Broker(directory)
    broker.start()
    bare: list[Measured] = []
    read_ahead: list[Measured] = []
    driven: list[Measured] = []
    batch_means: list[float] = []

    def bares(number: int) -> None:
        bare.append(mqtt_bare_phase(broker.port, f"bare-r{number}", sizes.mqtt_messages))
        read_ahead.append(
            mqtt_bare_phase(broker.port, f"bare-ra-r{number}", sizes.mqtt_messages, ReadAheadClient)
        )

    try:
        for number in range(sizes.rounds):
            bares(number)
            measured, mean_batch = asyncio.run(
                mqtt_driver_rounds(broker.port, sizes, scratch, number)
            )
            driven.append(measured)
            batch_means.append(mean_batch)
        bares(sizes.rounds)
    finally:
        broker.stop()
    bare_rate = median([m.rate for m in bare])
    read_ahead_rate = median([m.rate for m in read_ahead])
    driver_rate = median([m.rate for m in driven])
    return {
        "messages": sizes.mqtt_messages,
        "batch_max": MQTT_BATCH_MAX,
        "receive_maximum": MQTT_RECEIVE_MAXIMUM,
        "driver_committed_per_s": round(driver_rate),
        "bare_received_per_s": round(bare_rate),
        "ratio": round(driver_rate / bare_rate, 3) if bare_rate else None,
        "bare_read_ahead_received_per_s": round(read_ahead_rate),
        "ratio_to_bare_read_ahead": (
            round(driver_rate / read_ahead_rate, 3) if read_ahead_rate else None
        ),
        "driver_mean_batch": round(median(batch_means), 1),
        "driver_cpu_us_per_message": round(median([m.cpu_us_per_unit for m in driven]), 1),
        "bare_cpu_us_per_message": round(median([m.cpu_us_per_unit for m in bare]), 1),
        "bare_read_ahead_cpu_us_per_message": round(
            median([m.cpu_us_per_unit for m in read_ahead]), 1
        ),
        "samples": {
            "driver": [_figures(m) for m in driven],
            "bare": [_figures(m) for m in bare],
            "bare_read_ahead": [_figures(m) for m in read_ahead],
        },
    }


# --- Modbus ----------------------------------------------------------------------------------


def modbus_config(port: int, *, coalesce: bool) -> ModbusConfig:
    return ModbusConfig.model_validate(
        {
            "name": "press",
            "type": "modbus",
            "host": "127.0.0.1",
            "port": port,
            "poll_interval": "1ms",
            "timeout": "2s",
            "coalesce": coalesce,
            "tags": MODBUS_TAGS,
        }
    )


async def modbus_driver_phase(config: ModbusConfig, seconds: float) -> dict[str, Any]:
    driver = ModbusDriver(config)
    blocks = driver.blocks
    polls = [0]
    bad = [0]

    async def count(readings: Sequence[Reading]) -> None:
        polls[0] += 1
        bad[0] += sum(1 for r in readings if isinstance(r, Sample) and r.value is None)

    async with asyncio.TaskGroup() as tasks:
        running = tasks.create_task(driver.run(count), name="bench-modbus-driver")
        measured = await measure_window(polls, 0.5, seconds)
        running.cancel()
    if bad[0]:
        raise RuntimeError(f"{bad[0]} tag reads came back bad")
    registers = sum(block.count for block in blocks if block.table in ("holding", "input"))
    return {
        "requests_per_poll": len(blocks),
        "registers_per_poll": registers,
        "polls_per_s": round(measured.rate, 1),
        "registers_per_s": round(measured.rate * registers),
        "tags_per_s": round(measured.rate * len(config.tags)),
        "cpu_us_per_poll": round(measured.cpu_us_per_unit),
    }


async def modbus_bare_phase(
    port: int, blocks: Sequence[ReadBlock], seconds: float
) -> dict[str, Any]:
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    await client.connect()
    try:
        polls = 0
        started, cpu = time.perf_counter(), time.process_time()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            for block in blocks:
                match block.table:
                    case "holding":
                        await client.read_holding_registers(block.start, count=block.count)
                    case "input":
                        await client.read_input_registers(block.start, count=block.count)
                    case "coil":
                        await client.read_coils(block.start, count=block.count)
                    case "discrete_input":
                        await client.read_discrete_inputs(block.start, count=block.count)
            polls += 1
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        client.close()
    registers = sum(block.count for block in blocks if block.table in ("holding", "input"))
    return {
        "polls_per_s": round(polls / elapsed, 1),
        "registers_per_s": round(polls / elapsed * registers),
        "cpu_us_per_poll": round(cpu / polls * 1e6) if polls else 0,
    }


def bench_modbus(sizes: Sizes, scratch: Path) -> dict[str, Any]:
    port = free_port()
    argv = [sys.executable, "-m", "simulators.modbus_plc", "--port", str(port)]
    coalesced, separate, bare = [], [], []
    with child(argv, "modbus-plc listening", scratch / "modbus-plc.log"):
        on = modbus_config(port, coalesce=True)
        off = modbus_config(port, coalesce=False)
        blocks = ModbusDriver(on).blocks
        for _ in range(sizes.rounds):
            bare.append(asyncio.run(modbus_bare_phase(port, blocks, sizes.modbus_seconds)))
            coalesced.append(asyncio.run(modbus_driver_phase(on, sizes.modbus_seconds)))
            separate.append(asyncio.run(modbus_driver_phase(off, sizes.modbus_seconds)))

    def figure(runs: list[dict[str, Any]], key: str) -> float:
        return median([run[key] for run in runs])

    driver_registers = figure(coalesced, "registers_per_s")
    bare_registers = figure(bare, "registers_per_s")
    return {
        "tags": len(MODBUS_TAGS),
        "requests_per_poll_coalesced": coalesced[0]["requests_per_poll"],
        "requests_per_poll_uncoalesced": separate[0]["requests_per_poll"],
        "requests_saved_per_poll": (
            separate[0]["requests_per_poll"] - coalesced[0]["requests_per_poll"]
        ),
        "registers_per_poll_coalesced": coalesced[0]["registers_per_poll"],
        "registers_per_poll_uncoalesced": separate[0]["registers_per_poll"],
        "driver_registers_per_s": round(driver_registers),
        "driver_polls_per_s": round(figure(coalesced, "polls_per_s")),
        "driver_tags_per_s": round(figure(coalesced, "tags_per_s")),
        "uncoalesced_polls_per_s": round(figure(separate, "polls_per_s")),
        "uncoalesced_tags_per_s": round(figure(separate, "tags_per_s")),
        "coalescing_speedup": round(
            figure(coalesced, "polls_per_s") / figure(separate, "polls_per_s"), 2
        ),
        "bare_registers_per_s": round(bare_registers),
        "ratio": round(driver_registers / bare_registers, 3) if bare_registers else None,
        "driver_cpu_us_per_poll": round(figure(coalesced, "cpu_us_per_poll")),
        "bare_cpu_us_per_poll": round(figure(bare, "cpu_us_per_poll")),
        "samples": {"coalesced": coalesced, "uncoalesced": separate, "bare": bare},
    }


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run (smoke test)")
    parser.add_argument(
        "--no-freeze",
        action="store_true",
        help="leave the start-up heap to the garbage collector (the daemon freezes it)",
    )
    parser.add_argument(
        "--opcua-machines",
        type=int,
        default=40,
        help="machines on the OPC UA server (8 monitored items each, 4 of "
        "which change at every tick)",
    )
    parser.add_argument(
        "--opcua-items",
        type=int,
        default=None,
        help="monitored items on the OPC UA server (rounded up to whole "
        "machines of 8; overrides --opcua-machines), e.g. 10000 or 50000",
    )
    parser.add_argument(
        "--opcua-tick",
        type=float,
        default=0.05,
        help="the server's production clock, seconds per tick",
    )
    parser.add_argument(
        "--opcua-seconds", type=float, default=3.0, help="measured seconds per OPC UA phase"
    )
    parser.add_argument(
        "--mqtt-messages", type=int, default=20_000, help="messages in each MQTT burst"
    )
    parser.add_argument(
        "--modbus-seconds", type=float, default=2.5, help="measured seconds per Modbus phase"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="driver phases per protocol (the bare ones get one more)",
    )
    parser.add_argument(
        "--only",
        choices=PROTOCOLS,
        action="append",
        help="run only this protocol's part (repeatable)",
    )
    args = parser.parse_args()
    if args.quick:
        sizes = Sizes(
            opcua_machines=5,
            opcua_tick=0.05,
            opcua_seconds=1.0,
            mqtt_messages=500,
            modbus_seconds=0.5,
            rounds=1,
        )
    else:
        machines = (
            args.opcua_machines
            if args.opcua_items is None
            else -(-args.opcua_items // len(VARIABLE_TYPES))
        )
        sizes = Sizes(
            machines,
            args.opcua_tick,
            args.opcua_seconds,
            args.mqtt_messages,
            args.modbus_seconds,
            args.rounds,
        )
    setup_logging("text", "WARNING")  # as the daemon: library chatter off
    started = time.perf_counter()
    parts = {"opcua": bench_opcua, "mqtt": bench_mqtt, "modbus": bench_modbus}
    figures: dict[str, Any] = {
        "benchmark": "ingest",
        "quick": args.quick,
        "heap_frozen": freeze_as_the_daemon(args.no_freeze),
    }
    with tempfile.TemporaryDirectory(prefix="plantsync-bench-ingest-") as scratch:
        for protocol in args.only or PROTOCOLS:
            part_started = time.perf_counter()
            figures[protocol] = parts[protocol](sizes, Path(scratch))
            figures[protocol]["seconds"] = round(time.perf_counter() - part_started, 1)
    for protocol, target in TARGETS.items():
        if protocol in figures:
            ratio = figures[protocol]["ratio"]
            figures[f"{protocol}_meets_target"] = bool(ratio and ratio >= target)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == _opcua.SERVE:
        _opcua.serve(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), Path(sys.argv[5]))
    elif len(sys.argv) == 7 and sys.argv[1] == _opcua.PHASE:
        _opcua.phase_main(sys.argv[2:])
    else:
        main()
