"""Modbus driver tests: config, read planning and decoding as pure units, the rest against the
real PLC simulator: as a subprocess on a free port (killed to prove reconnection), or in-process
(`ModbusPlc`) where a test steers it or counts the requests it saw. The probe is run against the
simulator's fixed block, which holds a known value for every type and byte order."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import random
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from drivers.base import DeviceRestarted, Quality, Reading, Sample
from drivers.common.timing import Backoff
from drivers.modbus import (
    ModbusConfig,
    ModbusDriver,
    ModbusTag,
    decode,
    decode_string,
    plan_poll_groups,
    plan_reads,
    probe_main,
    tag_value,
)
from simulators.modbus_plc import (
    BIT_PATTERN,
    COILS,
    DISCRETE_INPUTS,
    FIXED_BLOCK,
    INPUT_ONLY_VALUE,
    KNOWN_VALUES,
    MachineState,
    ModbusPlc,
)
from tests.conftest import Peer, missing_peer
from tests.conftest import start_plc as start_peer_plc
from tests.driver_harness import running, wait_until
from tests.processes import run_process, spawn
from tests.test_daemon_drivers import Gateway

REPO_ROOT = Path(__file__).resolve().parents[1]
STEADY_GOOD_COUNT = 123_456_789  # 0x075B_CD15: both words non-zero, so word order shows
EXECUTE, IDLE, COMPLETE = 6, 4, 17
HAS_PYSERIAL = importlib.util.find_spec("serial") is not None


# --- the simulator as a real peer ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_plc(port: int, *args: str, ready_within: float = 10.0) -> subprocess.Popen[str]:
    """Start `python -m simulators.modbus_plc` and return once it says it is listening."""
    proc = spawn(
        [sys.executable, "-m", "simulators.modbus_plc", "--port", str(port), *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + ready_within
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([proc.stdout], [], [], remaining)
        if not readable:
            break
        line = proc.stdout.readline()
        if not line:  # exited before listening
            break
        if line.strip() == f"modbus-plc listening on 127.0.0.1:{port}":
            return proc
    kill_plc(proc)
    raise RuntimeError(f"the Modbus PLC simulator did not start on port {port}")


def stop_plc(proc: subprocess.Popen[str]) -> int | None:
    """SIGTERM the simulator and return its exit status (None if it had to be killed)."""
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                kill_plc(proc)
                return None
        return proc.returncode
    finally:
        if proc.stdout:
            proc.stdout.close()


def kill_plc(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the simulator: a crash, not a clean close."""
    proc.kill()
    proc.wait()
    if proc.stdout:
        proc.stdout.close()


@contextlib.contextmanager
def plc(*args: str) -> Iterator[int]:
    port = free_port()
    proc = start_plc(port, *args)
    try:
        yield port
    finally:
        assert stop_plc(proc) == 0, "the simulator should exit 0 on SIGTERM"


@pytest.fixture(scope="module")
def steady_plc() -> Iterator[int]:
    """A PLC that does not count, so every value is known exactly."""
    with plc("--rate", "0", "--start", str(STEADY_GOOD_COUNT)) as port:
        yield port


@pytest.fixture
async def press() -> AsyncIterator[ModbusPlc]:
    """The same steady PLC in-process, to count the requests it saw or to steer it."""
    async with ModbusPlc(rate=0, start=STEADY_GOOD_COUNT) as plc_in_process:
        yield plc_in_process


class Collector:
    """A sink that keeps every batch of samples, and every reading in order."""

    def __init__(self) -> None:
        self.batches: list[list[Sample]] = []
        self.readings: list[Reading] = []

    async def __call__(self, readings: Sequence[Reading]) -> None:
        self.readings.extend(readings)
        samples = [reading for reading in readings if isinstance(reading, Sample)]
        if samples:
            self.batches.append(samples)

    def restarts(self) -> list[DeviceRestarted]:
        return [r for r in self.readings if isinstance(r, DeviceRestarted)]

    def latest(self) -> dict[str, Sample]:
        """The newest sample of each tag (poll groups deliver separate batches)."""
        return {sample.tag: sample for batch in self.batches for sample in batch}

    def values(self, tag: str) -> list[tuple[float, Any]]:
        return [(s.source_time, s.value) for batch in self.batches for s in batch if s.tag == tag]


def config(port: int, tags: list[dict[str, Any]], /, **options: Any) -> ModbusConfig:
    """A driver config for the simulator on `port`; `options` override any key."""
    document = {
        "name": "press-01",
        "type": "modbus",
        "host": "127.0.0.1",
        "port": port,
        "poll_interval": "100ms",
        "timeout": "1s",
        "tags": tags,
    }
    return ModbusConfig.model_validate(document | options)


COUNTER_TAGS: list[dict[str, Any]] = [
    {"name": "good", "address": 0, "type": "uint32"},
    {"name": "scrap", "address": 2, "type": "uint32"},
    {"name": "state", "address": 10},
]


def modbus_warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("drivers.modbus") and text in record.getMessage()
    ]


# --- decoding against the real PLC ---------------------------------------------------------


@pytest.mark.integration
async def test_driver_decodes_the_press_registers(steady_plc: int) -> None:
    tags: list[dict[str, Any]] = [
        {"name": "good", "address": 0, "type": "uint32", "byte_order": "ABCD"},
        {"name": "good_int32", "address": 0, "type": "int32"},
        {"name": "good_read_cdab", "address": 0, "type": "uint32", "byte_order": "CDAB"},
        {"name": "good_read_cdab_int32", "address": 0, "type": "int32", "byte_order": "CDAB"},
        {"name": "scrap", "address": 2, "type": "uint32"},
        {"name": "state", "address": 10, "type": "uint16"},
        {"name": "force", "address": 20, "type": "float32"},
        {"name": "temperature", "address": 30, "type": "int16"},
        {"name": "temperature_raw", "address": 30, "type": "uint16"},
        {"name": "temperature_f", "address": 30, "type": "int16", "scale": 1.8, "offset": 32},
        {"name": "good_cdab", "address": 40, "type": "uint32", "byte_order": "CDAB"},
        {"name": "good_input", "address": 0, "table": "input", "type": "uint32"},
        {"name": "input_only", "address": 50, "table": "input", "type": "uint32"},
        {"name": "input_only_in_holding", "address": 50, "type": "uint32"},
    ]
    driver = ModbusDriver(config(steady_plc, tags))
    collector = Collector()
    before = time.time()
    async with running(driver, collector):
        await wait_until(lambda: collector.batches)
    after = time.time()

    batch = collector.batches[0]
    assert sorted(s.tag for s in batch) == sorted(t["name"] for t in tags)
    assert all(s.driver == "press-01" and s.quality is Quality.GOOD for s in batch)
    assert all(before <= s.source_time <= after for s in batch)
    values = {s.tag: s.value for s in batch}
    swapped = 0xCD15_075B  # the two words of 0x075B_CD15 taken low word first
    assert values == {
        "good": STEADY_GOOD_COUNT,
        "good_int32": STEADY_GOOD_COUNT,
        "good_read_cdab": swapped,
        "good_read_cdab_int32": swapped - 2**32,
        "scrap": 0,
        "state": IDLE,
        "force": pytest.approx(13.5, abs=0.5),
        "temperature": -5,
        "temperature_raw": 65531,
        "temperature_f": pytest.approx(23.0),
        "good_cdab": STEADY_GOOD_COUNT,
        "good_input": STEADY_GOOD_COUNT,
        "input_only": INPUT_ONLY_VALUE,
        "input_only_in_holding": 0,
    }
    assert type(values["good"]) is int and type(values["force"]) is float


def known_value_tags() -> list[dict[str, Any]]:
    """One tag for each value of the simulator's fixed block, named after type, order, address."""
    tags = []
    for known in KNOWN_VALUES:
        tag: dict[str, Any] = {
            "name": f"{known.type}_{known.byte_order}_{known.address}",
            "address": known.address,
            "type": known.type,
            "byte_order": known.byte_order,
        }
        if known.length:
            tag["length"] = known.length
        tags.append(tag)
    return tags


def expected_known_values() -> dict[str, Any]:
    return {
        f"{k.type}_{k.byte_order}_{k.address}": (
            pytest.approx(k.value, rel=1e-7) if k.type == "float32" else k.value
        )
        for k in KNOWN_VALUES
    }


@pytest.mark.integration
async def test_every_type_and_byte_order_decodes_to_the_known_value(steady_plc: int) -> None:
    tags = known_value_tags()
    orders_by_type: dict[str, set[str]] = {}
    for tag in tags:
        orders_by_type.setdefault(tag["type"], set()).add(tag["byte_order"])
    for wide in ("int32", "uint32", "float32", "string"):
        assert orders_by_type[wide] == {"ABCD", "CDAB", "BADC", "DCBA"}, wide
    # 64-bit: the four orders, the halves swapped, and (for uint64) every eight-letter order.
    for wide in ("int64", "float64"):
        assert orders_by_type[wide] == {"ABCD", "CDAB", "BADC", "DCBA", "EFGHABCD"}, wide
    assert orders_by_type["uint64"] == {
        "ABCD",
        "CDAB",
        "BADC",
        "DCBA",
        "EFGHABCD",
        "CDABGHEF",
        "DCBAHGFE",
        "FEHGBADC",
    }
    assert {"int16", "uint16"} <= orders_by_type.keys()
    driver = ModbusDriver(config(steady_plc, tags))
    collector = Collector()
    async with running(driver, collector):
        await wait_until(lambda: collector.batches)

    batch = collector.batches[0]
    assert all(s.quality is Quality.GOOD for s in batch)
    values = {s.tag: s.value for s in batch}
    assert values == expected_known_values()
    assert type(values["float64_DCBA_182"]) is float and type(values["int64_BADC_158"]) is int
    assert values["string_ABCD_220"] == "PLANTSYNC"  # trailing spaces dropped too


@pytest.mark.integration
async def test_bits_of_a_register_coils_and_discrete_inputs(steady_plc: int) -> None:
    tags: list[dict[str, Any]] = [
        *({"name": f"pattern_bit{bit}", "address": 192, "bit": bit} for bit in range(16)),
        {"name": "swapped_bit0", "address": 192, "bit": 0, "byte_order": "BADC"},
        *({"name": f"coil{n}", "address": n, "table": "coil"} for n in range(0, 64, 5)),
        *({"name": f"di{n}", "address": n, "table": "discrete_input"} for n in range(1, 64, 7)),
    ]
    driver = ModbusDriver(config(steady_plc, tags))
    collector = Collector()
    async with running(driver, collector):
        await wait_until(lambda: collector.batches)

    values = {s.tag: s.value for s in collector.batches[0]}
    for bit in range(16):
        assert values[f"pattern_bit{bit}"] is bool(BIT_PATTERN >> bit & 1)
    assert values["swapped_bit0"] is bool(BIT_PATTERN >> 8 & 1)  # the low byte's bit 0 moved up
    for n in range(0, 64, 5):
        assert values[f"coil{n}"] is COILS[n]
    for n in range(1, 64, 7):
        assert values[f"di{n}"] is DISCRETE_INPUTS[n]
    assert any(values[f"coil{n}"] for n in range(0, 64, 5))
    assert not all(values[f"coil{n}"] for n in range(0, 64, 5))
    # One register read for the bits, one read per bit table.
    assert [(b.table, b.start, b.count) for b in driver.blocks] == [
        ("holding", 192, 1),
        ("coil", 0, 61),
        ("discrete_input", 1, 57),
    ]


async def test_coalescing_reads_the_same_values_with_fewer_requests(press: ModbusPlc) -> None:
    tags = [
        *known_value_tags(),
        *({"name": f"coil{n}", "address": n, "table": "coil"} for n in range(0, 40, 3)),
        *({"name": f"bit{n}", "address": 192, "bit": n} for n in range(0, 16, 4)),
    ]
    seen: dict[bool, tuple[dict[str, Any], int]] = {}
    for coalesce in (True, False):
        driver = ModbusDriver(config(press.port, tags, coalesce=coalesce))
        collector = Collector()
        press.requests.clear()
        async with running(driver, collector):
            await wait_until(lambda: len(collector.batches) >= 3)  # noqa: B023
        per_poll = len(driver.blocks)
        sent, polls = driver.requests["default"], len(collector.batches)
        # Requests go one at a time: at most one poll was cut short by the cancel, and at most
        # one request of it did not reach the device.
        assert polls * per_poll <= sent < (polls + 1) * per_poll
        assert sent - 1 <= sum(press.requests.values()) <= sent
        values = {s.tag: s.value for s in collector.batches[-1]}
        assert all(s.quality is Quality.GOOD for s in collector.batches[-1])
        seen[coalesce] = (values, per_poll)

    (coalesced, coalesced_per_poll), (alone, alone_per_poll) = seen[True], seen[False]
    assert coalesced == alone
    assert {k: v for k, v in coalesced.items() if k in expected_known_values()} == (
        expected_known_values()
    )
    assert alone_per_poll == len(tags)
    # 100-225 is one register more than a read may take: two holding reads, one coil read.
    assert coalesced_per_poll == 3


async def test_poll_groups_poll_at_their_own_rates_over_one_connection(press: ModbusPlc) -> None:
    tags: list[dict[str, Any]] = [
        {"name": "good", "address": 0, "type": "uint32", "group": "fast"},
        {"name": "scrap", "address": 2, "type": "uint32", "group": "fast"},
        {"name": "temperature", "address": 30, "type": "int16"},
        {"name": "state", "address": 10, "group": "slow"},
    ]
    settings = {"poll_interval": "250ms", "poll_groups": {"fast": "50ms", "slow": "1s"}}
    driver = ModbusDriver(config(press.port, tags, **settings))
    assert [(g.name, g.interval, len(g.blocks)) for g in driver.groups] == [
        ("default", 0.25, 1),
        ("fast", 0.05, 1),
        ("slow", 1.0, 1),
    ]
    collector = Collector()
    async with running(driver, collector):
        await wait_until(lambda: driver.health.connected)
        started = time.monotonic()
        await asyncio.sleep(2.0)
        assert press.connections == 1
        window = time.monotonic() - started

    fast, default, slow = (driver.requests[name] for name in ("fast", "default", "slow"))
    assert 0.5 * window / 0.05 <= fast <= window / 0.05 + 3
    assert 0.5 * window / 0.25 <= default <= window / 0.25 + 2
    assert 2 <= slow <= window / 1.0 + 2
    assert fast > 2 * default > 2 * slow
    # Each poll of a group is a batch of its own tags only.
    assert {frozenset(s.tag for s in batch) for batch in collector.batches} == {
        frozenset({"good", "scrap"}),
        frozenset({"temperature"}),
        frozenset({"state"}),
    }
    assert press.requests["holding"] >= fast + default + slow - 1


async def test_rtu_frames_over_tcp() -> None:
    async with ModbusPlc(rate=0, start=STEADY_GOOD_COUNT, framer="rtu") as rtu_gateway:
        tags = [*COUNTER_TAGS, {"name": "coil3", "address": 3, "table": "coil"}]
        driver = ModbusDriver(config(rtu_gateway.port, tags, transport="rtu_over_tcp"))
        collector = Collector()
        async with running(driver, collector):
            await wait_until(lambda: collector.batches)
    values = {s.tag: s.value for s in collector.batches[0]}
    assert values == {"good": STEADY_GOOD_COUNT, "scrap": 0, "state": IDLE, "coil3": True}


SERIAL_DEVICE: dict[str, Any] = {
    "name": "oven-02",
    "type": "modbus",
    "transport": "rtu",
    "serial_port": "/dev/ttyUSB0",
    "baudrate": 9600,
    "parity": "none",
    "stopbits": 2,
    "bytesize": 8,
    "unit": 3,
    "tags": COUNTER_TAGS,
}


async def test_serial_rtu_builds_a_serial_client_without_touching_the_port() -> None:
    if not HAS_PYSERIAL:
        missing_peer("pyserial is not installed (it is in the dev extra: make setup)")
    from pymodbus.client import AsyncModbusSerialClient

    driver = ModbusDriver(ModbusConfig.model_validate(SERIAL_DEVICE))
    client = driver.new_client()
    assert isinstance(client, AsyncModbusSerialClient)
    params = client.comm_params
    assert (params.host, params.baudrate, params.parity, params.stopbits, params.bytesize) == (
        "/dev/ttyUSB0",
        9600,
        "N",
        2,
        8,
    )
    assert driver.endpoint == "/dev/ttyUSB0" and not client.connected


def test_serial_rtu_without_pyserial_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    # pyserial is in the dev extra, so its absence is made here: no real install lacks it on
    # purpose, and the refusal must still be tested.
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "serial" else find_spec(name, *args),
    )
    settings = ModbusConfig.model_validate(SERIAL_DEVICE)  # the config itself is fine
    assert settings.parity == "none" and settings.host is None
    with pytest.raises(RuntimeError, match="transport rtu needs the pyserial package"):
        ModbusDriver(settings)


@pytest.fixture
def serial_line(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A real serial line: two linked pseudo-terminals made by socat; what is written to one
    end is read at the other, byte by byte, as on an RS-485 pair."""
    import shutil

    socat = shutil.which("socat")
    if socat is None:
        missing_peer("socat is not installed (apt-get install socat, or make setup)")
    plc_end, gateway_end = str(tmp_path / "ttyPLC"), str(tmp_path / "ttyGW")
    process = spawn(
        [socat, "pty,raw,echo=0,link=" + plc_end, "pty,raw,echo=0,link=" + gateway_end],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 10
    while not (Path(plc_end).exists() and Path(gateway_end).exists()):
        assert process.poll() is None and time.monotonic() < deadline, "socat did not start"
        time.sleep(0.02)
    yield plc_end, gateway_end
    process.terminate()
    process.wait(10)


@pytest.mark.integration
async def test_serial_rtu_reads_a_plc_over_a_real_serial_line(
    serial_line: tuple[str, str],
) -> None:
    """Issue 18 item 7: the rtu transport end to end, over a serial line (a socat pty pair),
    against the PLC simulator answering RTU frames on the other end."""
    if not HAS_PYSERIAL:
        missing_peer("pyserial is not installed (it is in the dev extra: make setup)")
    plc_end, gateway_end = serial_line
    async with ModbusPlc(rate=0, start=STEADY_GOOD_COUNT, serial_port=plc_end, baudrate=38400):
        device = {
            **SERIAL_DEVICE,
            "serial_port": gateway_end,
            "baudrate": 38400,
            "stopbits": 1,
            "tags": [*COUNTER_TAGS, {"name": "coil3", "address": 3, "table": "coil"}],
        }
        driver = ModbusDriver(ModbusConfig.model_validate(device))
        collector = Collector()
        async with running(driver, collector):
            await wait_until(lambda: collector.batches)
    values = {s.tag: s.value for s in collector.batches[0]}
    assert values == {"good": STEADY_GOOD_COUNT, "scrap": 0, "state": IDLE, "coil3": True}


@pytest.mark.integration
async def test_exception_response_marks_only_its_block_bad(
    steady_plc: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.modbus")
    tags = [*COUNTER_TAGS, {"name": "missing", "address": 1000, "type": "uint32"}]
    driver = ModbusDriver(config(steady_plc, tags))
    collector = Collector()
    async with running(driver, collector):
        await wait_until(lambda: len(collector.batches) >= 3)
        assert driver.health.connected

    for batch in collector.batches:
        by_tag = {s.tag: s for s in batch}
        assert by_tag["missing"].quality is Quality.BAD and by_tag["missing"].value is None
        assert by_tag["good"].quality is Quality.GOOD
        assert by_tag["good"].value == STEADY_GOOD_COUNT
    health = driver.health
    assert health.reads >= 3 and health.errors >= 3
    assert health.last_error is not None and "exception code 2" in health.last_error
    assert health.last_sample_at is not None and health.last_sample_age() is not None
    # Logged when the block starts failing, not on every poll.
    assert len(modbus_warnings(caplog, "registers 1000-1001")) == 1


# --- the simulator's counters ---------------------------------------------------------------


@pytest.mark.integration
async def test_good_count_advances_at_the_rate() -> None:
    with plc("--rate", "40") as port:
        driver = ModbusDriver(config(port, COUNTER_TAGS))
        collector = Collector()
        async with running(driver, collector):
            await wait_until(lambda: len(collector.batches) >= 12)

    (t0, first), (t1, last) = collector.values("good")[0], collector.values("good")[-1]
    assert 0.7 * 40 <= (last - first) / (t1 - t0) <= 1.3 * 40
    assert collector.latest()["state"].value == EXECUTE
    assert collector.latest()["scrap"].value == 0


@pytest.mark.integration
async def test_stop_at_holds_the_count_and_completes() -> None:
    with plc("--rate", "100", "--scrap-rate", "20", "--stop-at", "80") as port:
        driver = ModbusDriver(config(port, COUNTER_TAGS))
        collector = Collector()
        async with running(driver, collector):
            await wait_until(lambda: collector.batches and collector.latest()["state"].value == 17)
            completed_at = len(collector.batches)
            await wait_until(lambda: len(collector.batches) >= completed_at + 3)

    after_completion = collector.batches[completed_at - 1 :]
    assert {s.value for b in after_completion for s in b if s.tag == "good"} == {80}
    assert {s.value for b in after_completion for s in b if s.tag == "state"} == {COMPLETE}
    assert len({s.value for b in after_completion for s in b if s.tag == "scrap"}) == 1
    assert EXECUTE in {value for _, value in collector.values("state")}


async def test_in_process_plc_is_steered_by_its_controls(press: ModbusPlc) -> None:
    driver = ModbusDriver(config(press.port, COUNTER_TAGS, poll_interval="50ms"))
    collector = Collector()

    def now(tag: str) -> Any:
        return collector.latest()[tag].value if collector.batches else None

    async with running(driver, collector):
        await wait_until(lambda: now("good") == STEADY_GOOD_COUNT and now("state") == IDLE)
        press.set_counts(good=5000, defective=7)
        await wait_until(lambda: now("good") == 5000 and now("scrap") == 7)
        press.set_rate(200, scrap_rate=0)
        await wait_until(lambda: now("state") == EXECUTE and now("good") > 5000)
        press.set_state(MachineState.HELD)
        await wait_until(lambda: now("state") == MachineState.HELD)
        held_at = now("good")
        await asyncio.sleep(0.3)
        assert now("good") == held_at and now("state") == MachineState.HELD
        press.set_state(None)
        await wait_until(lambda: now("state") == EXECUTE and now("good") > held_at)
        press.set_stop_at(now("good") + 20)
        await wait_until(lambda: now("state") == COMPLETE)
    assert press.requests["holding"] >= len(collector.batches)


# --- reconnection -----------------------------------------------------------------------------


@pytest.mark.integration
async def test_driver_reconnects_after_the_plc_dies(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="drivers.modbus")
    port = free_port()
    proc = await asyncio.to_thread(start_plc, port, "--rate", "20")
    # Two poll groups: losing the connection must end both loops and reconnect once.
    tags = [*COUNTER_TAGS[:2], {**COUNTER_TAGS[2], "group": "fast"}]
    driver = ModbusDriver(config(port, tags, poll_groups={"fast": "50ms"}))
    collector = Collector()
    try:
        async with running(driver, collector):
            await wait_until(lambda: collector.batches and driver.health.connected)

            await asyncio.to_thread(kill_plc, proc)
            await wait_until(lambda: not driver.health.connected)
            errors_at_loss = driver.health.errors
            # Several failed reconnects, to show the warning is not repeated per retry.
            await wait_until(lambda: driver.health.errors >= errors_at_loss + 2, within=10)
            assert not driver.health.connected

            proc = await asyncio.to_thread(start_plc, port, "--rate", "20", "--start", "5000")
            await wait_until(lambda: collector.latest()["good"].value >= 5000, within=15)
            assert driver.health.connected
            assert collector.latest()["good"].quality is Quality.GOOD
            batches_after = len(collector.batches)
            await wait_until(lambda: len(collector.batches) >= batches_after + 4)
            assert collector.latest()["state"].value == EXECUTE
    finally:
        stop_plc(proc)

    unavailable = modbus_warnings(caplog, "unavailable")
    assert len(unavailable) == 1
    assert f"127.0.0.1:{port}" in unavailable[0]
    assert len(modbus_warnings(caplog, "available again")) == 1
    record = next(r for r in caplog.records if "unavailable" in r.getMessage())
    assert record.levelno == logging.WARNING


@pytest.mark.integration
async def test_unreachable_device_at_start_up_is_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.modbus")
    port = free_port()  # nothing listens here yet
    driver = ModbusDriver(config(port, COUNTER_TAGS))
    collector = Collector()
    async with running(driver, collector):
        await wait_until(lambda: driver.health.errors >= 2)
        assert not driver.health.connected and not collector.batches
        assert driver.health.last_error == "connection refused or host unreachable"
        proc = await asyncio.to_thread(start_plc, port, "--rate", "0")
        try:
            await wait_until(lambda: collector.batches, within=15)
        finally:
            stop_plc(proc)
    assert len(modbus_warnings(caplog, "unavailable")) == 1
    assert len(modbus_warnings(caplog, "available again")) == 1


@pytest.mark.parametrize("retries", [0, 1, 2])
async def test_silent_device_times_out_after_its_retries_and_is_reconnected(
    retries: int, caplog: pytest.LogCaptureFixture
) -> None:
    # A fake peer, because the simulator cannot be made to accept and then stay silent.
    requests_per_connection: list[int] = []

    async def accept_and_ignore(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests_per_connection.append(0)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:  # until the driver gives up and closes
                await reader.readexactly(12)  # one Modbus TCP read request
                requests_per_connection[-1] += 1
        writer.close()

    caplog.set_level(logging.INFO, logger="drivers.modbus")
    server = await asyncio.start_server(accept_and_ignore, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    driver = ModbusDriver(config(port, COUNTER_TAGS, timeout="200ms", retries=retries))
    collector = Collector()
    async with server, running(driver, collector):
        await wait_until(lambda: driver.health.errors >= 2)
    assert not collector.batches and not driver.health.connected
    tries = f" (sent {retries + 1} times)" if retries else ""
    assert driver.health.last_error == f"no valid response within 0.2s{tries}"
    # The request is repeated `retries` times on the connection, then the connection is closed.
    assert requests_per_connection[:2] == [retries + 1, retries + 1]
    assert len(modbus_warnings(caplog, "unavailable")) == 1


# --- read planning, pure ----------------------------------------------------------------------


def tags_of(*specs: tuple[str, int, str] | tuple[str, int, str, str]) -> list[ModbusTag]:
    """Tags from (name, address, type[, table]) tuples."""
    return [
        ModbusTag.model_validate(dict(zip(("name", "address", "type", "table"), spec)))  # noqa: B905
        for spec in specs
    ]


def layout(tags: list[ModbusTag], max_gap: int = 8) -> list[tuple[str, int, int, list[str]]]:
    return [
        (b.table, b.start, b.count, [t.name for t in b.tags]) for b in plan_reads(tags, max_gap)
    ]


def test_contiguous_tags_share_one_read() -> None:
    tags = tags_of(("state", 4, "uint16"), ("good", 0, "uint32"), ("scrap", 2, "uint32"))
    assert layout(tags) == [("holding", 0, 5, ["good", "scrap", "state"])]


def test_gaps_up_to_max_gap_are_bridged() -> None:
    tags = tags_of(("a", 0, "uint16"), ("b", 9, "uint16"), ("c", 19, "float32"))
    # 8 unused registers between a and b are bridged; 9 between b and c are not.
    assert layout(tags, max_gap=8) == [("holding", 0, 10, ["a", "b"]), ("holding", 19, 2, ["c"])]
    assert layout(tags, max_gap=0) == [
        ("holding", 0, 1, ["a"]),
        ("holding", 9, 1, ["b"]),
        ("holding", 19, 2, ["c"]),
    ]


def test_tables_are_read_separately_and_overlaps_merge() -> None:
    tags = tags_of(("in", 0, "uint32", "input"), ("good", 0, "uint32"), ("good_lo", 1, "uint16"))
    assert layout(tags) == [
        ("holding", 0, 2, ["good", "good_lo"]),
        ("input", 0, 2, ["in"]),
    ]


def test_reads_are_split_at_125_registers() -> None:
    singles = tags_of(*[(f"r{i}", i, "uint16") for i in range(130)])
    assert [(b.start, b.count) for b in plan_reads(singles, 8)] == [(0, 125), (125, 5)]

    # A 32-bit tag that would straddle the limit starts the next read instead of being split.
    doubles = tags_of(*[(f"d{i}", 2 * i, "uint32") for i in range(63)])
    blocks = plan_reads(doubles, 8)
    assert [(b.start, b.count) for b in blocks] == [(0, 124), (124, 2)]
    for block in blocks:
        assert block.count <= 125
        for tag in block.tags:
            assert block.start <= tag.address and tag.address + tag.width <= block.end


def test_bits_are_read_up_to_2000_per_request() -> None:
    coils = [ModbusTag(name=f"c{i}", address=i, table="coil") for i in range(2100)]
    blocks = plan_reads(coils, 8)
    assert [(b.table, b.start, b.count) for b in blocks] == [("coil", 0, 2000), ("coil", 2000, 100)]
    inputs = [
        ModbusTag(name="a", address=0, table="discrete_input"),
        ModbusTag(name="b", address=9, table="discrete_input"),
    ]
    assert layout(inputs, max_gap=8) == [("discrete_input", 0, 10, ["a", "b"])]
    assert len(plan_reads(inputs, max_gap=7)) == 2


def test_coalescing_off_reads_every_tag_alone() -> None:
    tags = tags_of(("state", 4, "uint16"), ("good", 0, "uint32"), ("scrap", 2, "uint32"))
    blocks = plan_reads(tags, 8, coalesce=False)
    assert [(b.start, b.count, [t.name for t in b.tags]) for b in blocks] == [
        (0, 2, ["good"]),
        (2, 2, ["scrap"]),
        (4, 1, ["state"]),
    ]


def test_strings_and_64_bit_values_take_their_width() -> None:
    tags = [
        ModbusTag(name="recipe", address=10, type="string", length=8),
        ModbusTag(name="energy", address=18, type="uint64"),
        ModbusTag(name="flag", address=22, bit=3),
    ]
    assert [t.width for t in tags] == [8, 4, 1]
    assert layout(tags) == [("holding", 10, 13, ["recipe", "energy", "flag"])]


def test_poll_groups_are_planned_apart() -> None:
    settings = config(
        502,
        [
            {"name": "good", "address": 0, "type": "uint32", "group": "fast"},
            {"name": "scrap", "address": 2, "type": "uint32"},
            {"name": "state", "address": 10, "group": "fast"},
            {"name": "idle", "address": 40, "group": "unused_soon"},
        ],
        poll_interval="2s",
        poll_groups={"fast": "100ms", "slow": "10s", "unused_soon": "1m"},
    )
    groups = plan_poll_groups(settings)
    assert [(g.name, g.interval, [(b.start, b.count) for b in g.blocks]) for g in groups] == [
        ("default", 2.0, [(2, 2)]),
        ("fast", 0.1, [(0, 11)]),
        ("unused_soon", 60.0, [(40, 1)]),
    ]  # `slow` has no tags: no loop polls it


# --- decoding, pure ---------------------------------------------------------------------------

# Each value in every byte order, as literal registers: the definition the driver and the
# simulator are both held to.
GOOD_COUNT_REGISTERS = {  # 123456789 = 0x075B_CD15
    "ABCD": [0x075B, 0xCD15],
    "CDAB": [0xCD15, 0x075B],
    "BADC": [0x5B07, 0x15CD],
    "DCBA": [0x15CD, 0x5B07],
}
UINT64_REGISTERS = {  # 0x0102_0304_0506_0708
    "ABCD": [0x0102, 0x0304, 0x0506, 0x0708],
    "CDAB": [0x0708, 0x0506, 0x0304, 0x0102],
    "BADC": [0x0201, 0x0403, 0x0605, 0x0807],
    "DCBA": [0x0807, 0x0605, 0x0403, 0x0201],
}


@pytest.mark.parametrize(
    ("registers", "register_type", "byte_order", "expected"),
    [
        ([0x1234], "uint16", "ABCD", 0x1234),
        ([0xFFFB], "uint16", "ABCD", 65531),
        ([0xFFFB], "int16", "ABCD", -5),
        ([0x7FFF], "int16", "CDAB", 32767),  # one word: nothing to swap
        ([0xFBFF], "int16", "BADC", -5),
        ([0xFBFF], "int16", "DCBA", -5),
        ([0x0001, 0x0002], "uint32", "ABCD", 0x0001_0002),
        ([0x0001, 0x0002], "uint32", "CDAB", 0x0002_0001),
        ([0xFFFF, 0xFFFE], "int32", "ABCD", -2),
        ([0xFFFE, 0xFFFF], "int32", "CDAB", -2),
        ([0xFFFF, 0xFEFF], "int32", "BADC", -2),
        ([0xFEFF, 0xFFFF], "int32", "DCBA", -2),
        ([0x4158, 0x0000], "float32", "ABCD", 13.5),
        ([0x0000, 0x4158], "float32", "CDAB", 13.5),
        ([0x5841, 0x0000], "float32", "BADC", 13.5),
        ([0x0000, 0x5841], "float32", "DCBA", 13.5),
        ([0xC120, 0x0000], "float32", "ABCD", -10.0),
        ([0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE], "int64", "ABCD", -2),
        ([0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF], "int64", "CDAB", -2),
        ([0xFFFF, 0xFFFF, 0xFFFF, 0xFEFF], "int64", "BADC", -2),
        ([0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF], "int64", "DCBA", -2),
        ([0xC004, 0, 0, 0], "float64", "ABCD", -2.5),
        ([0, 0, 0, 0xC004], "float64", "CDAB", -2.5),
        ([0x04C0, 0, 0, 0], "float64", "BADC", -2.5),
        ([0, 0, 0, 0x04C0], "float64", "DCBA", -2.5),
        *(
            (registers, "uint32", order, 123_456_789)
            for order, registers in GOOD_COUNT_REGISTERS.items()
        ),
        *(
            (registers, "uint64", order, 0x0102_0304_0506_0708)
            for order, registers in UINT64_REGISTERS.items()
        ),
    ],
)
def test_decode(registers: list[int], register_type: Any, byte_order: Any, expected: Any) -> None:
    assert decode(registers, register_type, byte_order) == expected


def test_the_simulator_lays_out_its_known_values_by_the_same_definition() -> None:
    assert list(FIXED_BLOCK[100:108]) == [
        word for order in ("ABCD", "CDAB", "BADC", "DCBA") for word in GOOD_COUNT_REGISTERS[order]
    ]
    assert FIXED_BLOCK[192] == BIT_PATTERN == 0xA5C3
    assert list(FIXED_BLOCK[200:205]) == [0x504C, 0x414E, 0x5453, 0x594E, 0x4300]  # "PLANTSYNC"
    assert list(FIXED_BLOCK[210:215]) == [0x4C50, 0x4E41, 0x5354, 0x4E59, 0x0043]


def test_decode_strings() -> None:
    plantsync = [0x504C, 0x414E, 0x5453, 0x594E, 0x4300]
    assert decode_string(plantsync) == "PLANTSYNC"
    assert decode_string(plantsync, "CDAB") == "PLANTSYNC"  # words stay in address order
    swapped = [0x4C50, 0x4E41, 0x5354, 0x4E59, 0x0043]
    assert decode_string(swapped, "BADC") == decode_string(swapped, "DCBA") == "PLANTSYNC"
    assert decode_string([0x4F4B, 0x2020, 0x0000]) == "OK"  # trailing spaces and NULs
    assert decode_string([0xC46E]) == "\xc4n"  # Latin-1, never an error
    tag = ModbusTag(name="recipe", address=0, type="string", length=2)
    assert tag_value(tag, [0x5231, 0x0000]) == "R1"


def test_bit_of_a_register() -> None:
    tags = [ModbusTag(name=f"b{bit}", address=192, bit=bit) for bit in range(16)]
    assert all(tag.type == "bool" for tag in tags)
    assert [tag_value(tag, [0xA5C3]) for tag in tags] == [
        bool(0xA5C3 >> bit & 1) for bit in range(16)
    ]
    assert tag_value(tags[0], [0x0001]) is True and tag_value(tags[15], [0x8000]) is True
    swapped = ModbusTag(name="s", address=0, bit=0, byte_order="BADC")
    assert tag_value(swapped, [0x0100]) is True


def test_decode_rejects_the_wrong_register_count() -> None:
    with pytest.raises(ValueError, match="needs 2 registers"):
        decode([1], "uint32", "ABCD")


def test_scaling_only_when_asked() -> None:
    plain = ModbusTag(name="t", address=30, type="int16")
    scaled = ModbusTag(name="t", address=30, type="int16", scale=0.1, offset=273.15)
    assert tag_value(plain, [0xFFFB]) == -5 and type(tag_value(plain, [0xFFFB])) is int
    assert tag_value(scaled, [0xFFFB]) == pytest.approx(272.65)


# --- the probe --------------------------------------------------------------------------------


def probe(port: int, *args: str) -> int:
    return probe_main(["--host", "127.0.0.1", "--port", str(port), *args])


def probe_rows(
    output: str,
) -> tuple[dict[int, dict[str, str]], dict[tuple[int, str], dict[str, str]]]:
    """Parse the probe's table: per address the raw columns, per (address, order) the values."""
    lines = output.splitlines()
    header_at = next(i for i, line in enumerate(lines) if line.split()[:2] == ["address", "raw"])
    names = lines[header_at].split()
    raw: dict[int, dict[str, str]] = {}
    values: dict[tuple[int, str], dict[str, str]] = {}
    address = -1
    for line in lines[header_at + 1 :]:
        cells = line.split()
        if not cells:
            break
        if cells[0].isdigit():  # an address's first row: address, raw, int16, uint16, ...
            address = int(cells[0])
            raw[address] = dict(zip(names[:4], cells[:4], strict=True))
            cells = cells[4:]
        if cells:  # cells stay left-packed: a missing wider value is always at the end
            values[(address, cells[0])] = dict(zip(names[5:], cells[1:], strict=False))
    return raw, values


@pytest.mark.integration
@pytest.mark.parametrize(
    ("address", "count", "type_name", "width", "shown"),
    [
        (100, 8, "uint32", 2, "123456789"),
        (110, 8, "int32", 2, "-123456789"),
        (120, 8, "float32", 2, "3.14159"),
        (130, 16, "uint64", 4, "1234567890123"),
        (150, 16, "int64", 4, "-1234567890123"),
        (170, 16, "float64", 4, "3.14159"),
    ],
)
def test_probe_shows_the_known_value_in_its_byte_order_column(
    steady_plc: int,
    capsys: pytest.CaptureFixture[str],
    address: int,
    count: int,
    type_name: str,
    width: int,
    shown: str,
) -> None:
    assert probe(steady_plc, "--address", str(address), "--count", str(count)) == 0
    output = capsys.readouterr().out
    assert output.startswith(f"holding registers {address}-{address + count - 1} from 127.0.0.1")
    raw, values = probe_rows(output)
    assert sorted(raw) == list(range(address, address + count))
    for index, order in enumerate(("ABCD", "CDAB", "BADC", "DCBA")):
        start = address + index * width
        assert values[(start, order)][type_name] == shown, (start, order)
        for other in {"ABCD", "CDAB", "BADC", "DCBA"} - {order}:
            assert values[(start, other)][type_name] != shown, (start, other)


@pytest.mark.integration
def test_probe_shows_16_bit_values_and_text(
    steady_plc: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert probe(steady_plc, "--address", "190", "--count", "25") == 0
    output = capsys.readouterr().out
    raw, values = probe_rows(output)
    assert raw[190] == {"address": "190", "raw": "CFC7", "int16": "-12345", "uint16": "53191"}
    assert raw[191]["uint16"] == "54321" and raw[192]["raw"] == "A5C3"
    assert (214, "ABCD") not in values  # the last register: nothing wider starts there
    assert "int64" not in values[(212, "ABCD")]  # only three registers left
    high_first = next(line for line in output.splitlines() if "high byte first" in line)
    low_first = next(line for line in output.splitlines() if "low byte first" in line)
    assert "PLANTSYNC" in high_first  # registers 200-204
    assert "PLANTSYNC" in low_first  # registers 210-214, bytes swapped


@pytest.mark.integration
def test_probe_reads_input_registers(steady_plc: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert probe(steady_plc, "--address", "50", "--count", "2", "--table", "input") == 0
    _, values = probe_rows(capsys.readouterr().out)
    assert values[(50, "ABCD")]["uint32"] == str(INPUT_ONLY_VALUE)


@pytest.mark.integration
def test_probe_exits_1_on_an_exception_response(
    steady_plc: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert probe(steady_plc, "--address", "1000", "--count", "4") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "exception code 2 (illegal data address) for holding registers 1000-1003" in captured.err


def test_probe_exits_1_when_it_cannot_connect(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nothing listens here
    assert probe(port, "--address", "0", "--count", "2", "--timeout", "1s") == 1
    assert f"cannot connect to 127.0.0.1:{port}" in capsys.readouterr().err


def test_probe_refuses_more_than_125_registers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        probe(502, "--address", "0", "--count", "126")
    assert exited.value.code == 2
    assert "--count must be 1..125" in capsys.readouterr().err


# --- config -----------------------------------------------------------------------------------


def test_config_parses_durations_and_defaults() -> None:
    parsed = config(502, COUNTER_TAGS, poll_interval="500ms", timeout="2s")
    assert parsed.poll_interval == 0.5 and parsed.timeout == 2.0
    assert parsed.unit == 1 and parsed.max_gap == 8 and parsed.retries == 1
    assert parsed.coalesce and parsed.transport == "tcp" and parsed.poll_groups == {}
    assert parsed.tags[0].table == "holding" and parsed.tags[2].type == "uint16"
    assert parsed.tags[0].byte_order == "ABCD" and parsed.tags[0].group == "default"


def test_config_defaults_bits_to_bool_and_parses_poll_groups() -> None:
    parsed = config(
        502,
        [
            {"name": "lamp", "address": 3, "table": "coil"},
            {"name": "guard", "address": 4, "table": "discrete_input", "group": "fast"},
            {"name": "door", "address": 12, "bit": 15, "group": "slow"},
            {"name": "recipe", "address": 100, "type": "string", "length": 8},
        ],
        poll_groups={"fast": "100ms", "slow": "10s"},
    )
    assert [tag.type for tag in parsed.tags] == ["bool", "bool", "bool", "string"]
    assert parsed.poll_groups == {"fast": 0.1, "slow": 10.0}
    assert parsed.model_dump(mode="json")["poll_groups"] == {"fast": "100ms", "slow": "10s"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"tags": [{"name": "good", "address": 0, "group": "fsat"}]},
            "tag good names poll group 'fsat', which poll_groups does not define "
            "(did you mean 'fast'?)",
        ),
        (
            {"tags": [{"name": "good", "address": 0, "byte_order": "ADCB"}]},
            "Input should be 'ABCD', 'CDAB', 'BADC', 'DCBA', 'ABCDEFGH'",
        ),
        (
            {"tags": [{"name": "recipe", "address": 0, "type": "string"}]},
            "a string tag needs length, its size in registers",
        ),
        (
            {"tags": [{"name": "good", "address": 0, "word_order": "big"}]},
            "word_order was replaced by byte_order: `big` is ABCD, `little` is CDAB",
        ),
        ({"poll_groups": {"default": "1s"}}, "set poll_interval instead"),
        ({"baudrate": 9600}, "baudrate apply only to transport rtu"),
        ({"transport": "rtu"}, "transport rtu needs serial_port"),
        ({"coalesce": False, "max_gap": 4}, "max_gap has no effect with coalesce: false"),
        ({"host": None}, "transport tcp needs host"),
    ],
)
def test_invalid_config_says_what_is_wrong(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        config(502, COUNTER_TAGS, **({"poll_groups": {"fast": "1s"}} | change))


@pytest.mark.parametrize(
    "change",
    [
        {"baud": 9600},  # unknown key
        {"type": "modbus-rtu"},  # wrong driver type
        {"tags": [{"name": "good", "address": 0, "type": "float16"}]},  # wrong tag type
        {"tags": [{"name": "good", "address": 0, "scaling": 2}]},  # unknown tag key
        {"tags": [{"name": "good", "address": 0}, {"name": "good", "address": 2}]},  # repeated
        {"tags": []},
        {"tags": [{"name": "good", "address": 65535, "type": "uint32"}]},  # runs past 65535
        {"tags": [{"name": "good", "address": 65533, "type": "uint64"}]},
        {"tags": [{"name": "good", "address": 0, "table": "register"}]},
        {"tags": [{"name": "good", "address": 0, "byte_order": "big"}]},  # the old spelling
        {"tags": [{"name": "good", "address": 0, "group": "fast"}]},  # no such poll group
        {"tags": [{"name": "good", "address": 0, "group": "two words"}]},
        {"tags": [{"name": "good", "address": 0, "type": "string", "length": 0}]},
        {"tags": [{"name": "good", "address": 0, "type": "string", "length": 126}]},
        {"tags": [{"name": "good", "address": 0, "length": 4}]},  # length on a uint16
        {"tags": [{"name": "good", "address": 0, "type": "bool"}]},  # a register bool, no bit
        {"tags": [{"name": "good", "address": 0, "bit": 16}]},
        {"tags": [{"name": "good", "address": 0, "type": "uint16", "bit": 1}]},
        {"tags": [{"name": "good", "address": 0, "table": "coil", "type": "uint16"}]},
        {"tags": [{"name": "good", "address": 0, "table": "coil", "bit": 1}]},
        {"tags": [{"name": "good", "address": 0, "table": "coil", "scale": 2}]},
        {"tags": [{"name": "good", "address": 0, "type": "string", "length": 2, "offset": 1}]},
        {"poll_groups": {"fast": "0s"}},
        {"poll_groups": {"fast lane": "1s"}},
        {"poll_groups": {"fast": "soon"}},
        {"retries": -1},
        {"retries": 6},
        {"transport": "serial"},
        {"transport": "rtu", "serial_port": "/dev/ttyUSB0"},  # host and port given too
        {"parity": "mark"},
        {"unit": 248},
        {"name": "press 01"},
        {"tags": [{"name": "good.count", "address": 0}]},  # a dot would break `driver.tag`
        {"poll_interval": "soon"},
    ],
)
def test_invalid_config_is_rejected(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        config(502, COUNTER_TAGS, **change)  # an override replaces the valid value


# --- a device restart, told by its restart marker ----------------------------------------------

MARKED_TAGS: list[dict[str, Any]] = [
    *COUNTER_TAGS,
    {"name": "uptime", "address": 60, "type": "uint32"},
    {"name": "boots", "address": 62, "type": "uint16"},
]


def first_index(readings: list[Reading], found: Any) -> int:
    return next(i for i, reading in enumerate(readings) if found(reading))


async def test_a_restart_marker_that_goes_back_is_told_before_the_samples_after_it() -> None:
    # The PLC goes away with its count at 33 and comes back restarted (uptime 5 s, where it
    # was an hour) having counted past it, at 45: no drop shows, the marker is what tells.
    first = ModbusPlc(rate=0, start=33, uptime=3600.0)
    await first.start()
    port = first.port
    driver = ModbusDriver(config(port, MARKED_TAGS, restart_marker={"tag": "uptime"}))
    collector = Collector()
    second = ModbusPlc(port=port, rate=0, start=45, uptime=5.0)
    try:
        async with running(driver, collector):
            await wait_until(lambda: collector.batches and collector.latest()["good"].value == 33)
            await first.stop()
            await wait_until(lambda: not driver.health.connected)
            await second.start()
            await wait_until(lambda: collector.latest()["good"].value == 45, within=15)
    finally:
        await first.stop()
        await second.stop()

    readings = collector.readings
    (restart,) = collector.restarts()
    assert restart.driver == "press-01" and "uptime uptime went from 36" in restart.reason
    at_restart = readings.index(restart)
    assert at_restart == first_index(
        readings, lambda r: isinstance(r, Sample) and r.tag == "good" and r.value == 45
    ) - 1 or all(not (isinstance(r, Sample) and r.value == 45) for r in readings[:at_restart])
    assert all(
        r.value == 33 for r in readings[:at_restart] if isinstance(r, Sample) and r.tag == "good"
    )
    assert all(
        r.value == 45 for r in readings[at_restart:] if isinstance(r, Sample) and r.tag == "good"
    )


@pytest.mark.parametrize("kind", ["uptime", "boot_count"])
async def test_a_warm_restart_on_the_same_connection_leads_its_poll(
    press: ModbusPlc, kind: str
) -> None:
    tag = "uptime" if kind == "uptime" else "boots"
    press.set_counts(good=100)
    press.press.uptime = 7200.0
    driver = ModbusDriver(
        config(press.port, MARKED_TAGS, restart_marker={"tag": tag, "kind": kind})
    )
    collector = Collector()
    async with running(driver, collector):
        await wait_until(lambda: collector.batches and collector.latest()["good"].value == 100)
        connections = press.connections
        press.restart(good=150)  # the program restarted; the TCP connection stays
        await wait_until(lambda: collector.latest()["good"].value == 150)
        await asyncio.sleep(0.3)  # more polls: the restart is told once
        assert press.connections == connections
    (restart,) = collector.restarts()
    # It leads the batch of the poll that read 150 first.
    batch_index = next(
        i
        for i, batch in enumerate(collector.batches)
        if batch and {s.tag: s.value for s in batch}["good"] == 150
    )
    position = collector.readings.index(restart)
    assert collector.readings[position + 1] is collector.batches[batch_index][0]
    assert (
        "boot count boots went from 1 to 2"
        if kind == "boot_count"
        else "uptime uptime went from 72"
    ) in restart.reason


async def test_no_restart_is_told_while_the_marker_only_grows(press: ModbusPlc) -> None:
    press.set_rate(100)
    driver = ModbusDriver(
        config(press.port, MARKED_TAGS, poll_interval="50ms", restart_marker={"tag": "uptime"})
    )
    collector = Collector()
    async with running(driver, collector):
        await wait_until(lambda: len(collector.batches) >= 10)
        press.set_counts(good=0)  # a reset the device does not call a restart
        await wait_until(lambda: collector.latest()["good"].value < 50)
    assert not collector.restarts()


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        (
            {"tag": "uptim"},
            "restart_marker names tag 'uptim', which tags do not define (did you mean 'uptime'?)",
        ),
        ({"tag": "boots"}, "a 16-bit uptime wraps"),
        ({"tag": "force", "kind": "boot_count"}, "must be an unscaled integer, not a float32"),
        ({"tag": "uptime", "kind": "reboots"}, "Input should be 'uptime' or 'boot_count'"),
    ],
)
def test_a_restart_marker_must_name_an_integer_tag(marker: dict[str, Any], message: str) -> None:
    tags = [*MARKED_TAGS, {"name": "force", "address": 20, "type": "float32"}]
    with pytest.raises(ValidationError, match=re.escape(message)):
        config(5020, tags, restart_marker=marker)


# --- an independent server: npm modbus-serial -----------------------------------------------------

PEERS = REPO_ROOT / "tests" / "peers"


@contextlib.contextmanager
def modbus_serial_server() -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """`tests/peers/modbus_serial_server.js` (npm modbus-serial's ServerTCP) on a free port."""
    import shutil

    node = shutil.which("node")
    if node is None or not (PEERS / "node_modules" / "modbus-serial").is_dir():
        missing_peer("the npm package modbus-serial is not installed (make peers)")
    assert node is not None
    port = free_port()
    proc = spawn(
        [node, str(PEERS / "modbus_serial_server.js"), str(port)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        assert line.strip() == f"modbus-serial listening on 127.0.0.1:{port}", line
        yield port, proc
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def serial_peer_connections(proc: subprocess.Popen[str]) -> int:
    """The connections the peer has reported so far (it prints a line for each)."""
    assert proc.stdout is not None
    seen = 0
    while select.select([proc.stdout], [], [], 0.2)[0]:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("connections "):
            seen = int(line.split()[1])
    return seen


@pytest.mark.integration
async def test_an_illegal_address_marks_only_its_tag_bad_and_the_split_is_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.modbus")
    coils = [{"name": f"coil{n}", "address": n, "table": "coil"} for n in range(32)]
    coils.append({"name": "coil40", "address": 40, "table": "coil"})  # the device has no 40
    # 16 registers, an unmapped gap of 8 (16-23) bridged by max_gap, then 6 more.
    registers = [{"name": f"hr{n}", "address": n} for n in [*range(16), *range(24, 30)]]
    with modbus_serial_server() as (port, proc):
        driver = ModbusDriver(config(port, coils + registers, max_gap=8, retries=0))
        assert [b.label for b in driver.blocks] == ["holding registers 0-29", "coils 0-40"]
        collector = Collector()
        async with running(driver, collector):
            await wait_until(lambda: len(collector.batches) >= 4)
            requests_before = sum(driver.requests.values())
            await wait_until(lambda: len(collector.batches) >= 8)
            requests_later = sum(driver.requests.values()) - requests_before
            polls_later = len(collector.batches) - 4
        connections = serial_peer_connections(proc)

    for batch in collector.batches:
        by_tag = {sample.tag: sample for sample in batch}
        assert by_tag["coil40"].quality is Quality.BAD and by_tag["coil40"].value is None
        assert {by_tag[f"coil{n}"].value for n in range(32)} != {None}
        for n in range(32):
            assert by_tag[f"coil{n}"].quality is Quality.GOOD, f"coil{n}"
            assert by_tag[f"coil{n}"].value == (n % 3 == 0)
        for n in [*range(16), *range(24, 30)]:
            assert by_tag[f"hr{n}"].quality is Quality.GOOD, f"hr{n}"
            assert by_tag[f"hr{n}"].value == 1000 + n
    # The split is remembered: later polls go straight to the reads that work.
    # The parts that answered are joined again where they touch: only addresses that were
    # read, never the unmapped gap.
    labels = [b.label for b in driver.blocks]
    assert labels == ["holding registers 0-15", "holding registers 24-29", "coils 0-31", "coil 40"]
    assert requests_later <= (polls_later + 1) * len(labels)
    # The log names the refused address, once.
    refused = [r for r in modbus_warnings(caplog, "answered exception code 2") if "coil 40" in r]
    assert len(refused) == 1 and "tag coil40 is marked bad" in refused[0]
    assert not [r for r in modbus_warnings(caplog, "answered") if "tags " in r]
    assert len(modbus_warnings(caplog, "refused a read that spans")) == 1
    assert driver.health.degraded == {
        "tag coil40": "tag coil40 is bad: the device answered exception code 2 (illegal "
        "data address) for coil 40"
    }
    assert connections == 1


@pytest.mark.integration
async def test_per_tag_units_and_64_bit_orders_against_modbus_serial() -> None:
    tags = [
        {"name": "unit1_hr0", "address": 0},
        {"name": "unit2_hr0", "address": 0, "unit": 2},
        {"name": "unit2_hr5", "address": 5, "unit": 2},
        {"name": "unit2_in3", "address": 3, "table": "input", "unit": 2},
        {"name": "energy_swapped", "address": 40, "type": "uint64", "byte_order": "EFGHABCD"},
        {"name": "energy", "address": 44, "type": "uint64", "byte_order": "ABCDEFGH"},
        {"name": "energy_read_as_cdab", "address": 40, "type": "uint64", "byte_order": "CDAB"},
        {"name": "unit9_hr0", "address": 0, "unit": 9},  # nobody answers to unit 9
    ]
    with modbus_serial_server() as (port, proc):
        driver = ModbusDriver(config(port, tags))
        collector = Collector()
        async with running(driver, collector):
            await wait_until(lambda: len(collector.batches) >= 3)
        connections = serial_peer_connections(proc)
    values = {tag: sample.value for tag, sample in collector.latest().items()}
    assert values == {
        "unit1_hr0": 1000,
        "unit2_hr0": 2000,
        "unit2_hr5": 2005,
        "unit2_in3": 203,
        "energy_swapped": 1234567890123,
        "energy": 1234567890123,
        # The halves swapped is not all four words reversed (CDAB): the peer's registers
        # 71FB 04CB 0000 011F read as GHEFCDAB.
        "energy_read_as_cdab": 0x011F_0000_04CB_71FB,
        "unit9_hr0": None,
    }
    assert collector.latest()["unit9_hr0"].quality is Quality.BAD
    assert "of unit 9" in (driver.health.last_error or "")
    assert connections == 1, "every unit is read over the one connection"


async def test_a_device_that_accepts_but_never_answers_is_not_connected() -> None:
    accepted = asyncio.Event()

    async def accept_and_ignore(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readexactly(12)
        writer.close()

    server = await asyncio.start_server(accept_and_ignore, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    driver = ModbusDriver(config(port, COUNTER_TAGS, timeout="1s", retries=0))
    seen_connected = False

    async def watch() -> None:
        nonlocal seen_connected
        while True:
            seen_connected |= driver.health.connected
            await asyncio.sleep(0.01)

    collector = Collector()
    async with server, running(driver, collector):
        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(accepted.wait(), 10)
        await wait_until(lambda: driver.health.errors >= 1)
        watcher.cancel()
    assert not seen_connected, "connected before the device ever answered"


def test_modicon_style_addresses_are_warned_about_with_the_0_based_equivalent() -> None:
    settings = config(
        5020,
        [
            {"name": "good", "address": 40001, "type": "uint32"},
            {"name": "level", "address": 30011, "table": "input"},
            {"name": "state", "address": 10},
            {"name": "in_holding", "address": 30005},
        ],
    )
    assert settings.address_warnings() == [
        (
            ("tags", 0, "address"),
            "40001 looks like a Modicon register number: holding "
            "register 40001 is address 0 (0-based protocol address); if that is what you mean, "
            "write address: 0",
        ),
        (
            ("tags", 1, "address"),
            "30011 looks like a Modicon register number: input register "
            "30011 is address 10 (0-based protocol address); if that is what you mean, write "
            "address: 10",
        ),
        (
            ("tags", 3, "address"),
            "30005 looks like a Modicon register number: input register "
            "30005 is address 4 of table input (0-based protocol address); if that is what you "
            "mean, write table: input, address: 4",
        ),
    ]


# --- NaN and infinity from a failed sensor --------------------------------------------------------


@pytest.mark.parametrize("fault", ["nan", "inf", "-inf"])
async def test_a_failed_sensor_reads_bad_quality(press: ModbusPlc, fault: Any) -> None:
    press.set_sensor_fault(fault)
    driver = ModbusDriver(
        config(press.port, [{"name": "force", "address": 20, "type": "float32"}, *COUNTER_TAGS])
    )
    collector = Collector()
    async with running(driver, collector):
        await wait_until(lambda: collector.batches)
    force = collector.latest()["force"]
    assert force.quality is Quality.BAD and isinstance(force.value, float)
    assert repr(force.value) == {"nan": "nan", "inf": "inf", "-inf": "-inf"}[fault]
    assert collector.latest()["good"].quality is Quality.GOOD


# --- mbpoll (Debian), an independent client, reads the simulator's map -------------------------


def mbpoll(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    import shutil

    binary = shutil.which("mbpoll")
    if binary is None:
        missing_peer("mbpoll is not installed (apt-get install mbpoll, or make mbpoll)")
    assert binary is not None
    return run_process(
        [binary, "-m", "tcp", "-1", "-p", str(port), *args, "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=20,
    )


def mbpoll_values(port: int, *args: str) -> list[str]:
    """mbpoll's reads (`[ref]: value`), 1-based references as mbpoll prints them."""
    result = mbpoll(port, *args)
    assert result.returncode == 0, result.stderr
    return re.findall(r"^\[\d+\]:\s+(\S+)", result.stdout, re.MULTILINE)


@pytest.mark.integration
def test_mbpoll_reads_the_simulators_register_map() -> None:
    with plc(
        "--rate", "0", "--start", str(STEADY_GOOD_COUNT), "--uptime", "100", "--boot-count", "7"
    ) as port:
        # mbpoll counts references from 1: reference r is protocol address r - 1.
        assert mbpoll_values(port, "-r", "1", "-c", "1", "-t", "4:int", "-B") == [
            str(STEADY_GOOD_COUNT)
        ]
        assert mbpoll_values(port, "-r", "11", "-c", "1", "-t", "4") == [str(IDLE)]
        assert mbpoll_values(port, "-r", "41", "-c", "1", "-t", "4:int") == [
            str(STEADY_GOOD_COUNT)
        ]  # mbpoll's default word order is low word first: CDAB
        assert mbpoll_values(port, "-r", "101", "-c", "1", "-t", "4:int", "-B") == ["123456789"]
        assert mbpoll_values(port, "-r", "103", "-c", "1", "-t", "4:int") == ["123456789"]
        assert mbpoll_values(port, "-r", "111", "-c", "1", "-t", "4:int", "-B") == ["-123456789"]
        assert mbpoll_values(port, "-r", "121", "-c", "1", "-t", "4:float", "-B") == ["3.14159"]
        assert mbpoll_values(port, "-r", "123", "-c", "1", "-t", "4:float") == ["3.14159"]
        uptime = int(mbpoll_values(port, "-r", "61", "-c", "1", "-t", "4:int", "-B")[0])
        assert 100 <= uptime < 160
        assert mbpoll_values(port, "-r", "63", "-c", "1", "-t", "4") == ["7"]
        assert mbpoll_values(port, "-r", "51", "-c", "1", "-t", "3:int", "-B") == [
            str(INPUT_ONLY_VALUE)
        ]
        assert mbpoll_values(port, "-r", "1", "-c", "7", "-t", "0") == [
            str(int(n % 3 == 0)) for n in range(7)
        ]
        assert mbpoll_values(port, "-r", "1", "-c", "6", "-t", "1") == [
            str(int(n % 4 == 1)) for n in range(6)
        ]
        refused = mbpoll(port, "-r", "257", "-c", "1", "-t", "4")
        assert refused.returncode != 0 and "Illegal data address" in refused.stderr


# --- NaN and infinity through the real daemon: every JSON output stays JSON ----------------------


def strict_json(text: str) -> Any:
    """Parse as JSON proper: NaN, Infinity and -Infinity are not JSON."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in a JSON output")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.integration
def test_a_nan_or_infinite_float_from_the_plc_is_null_in_every_json_output(
    peers: list[Peer], tmp_path: Path
) -> None:
    faulty = {
        fault: start_peer_plc(peers, tmp_path, "--rate", "5", f"--sensor-fault={fault}")
        for fault in ("nan", "inf", "-inf")
    }
    drivers = "".join(
        f"""
  - name: press-{name}
    type: modbus
    host: 127.0.0.1
    port: {plc.port}
    poll_interval: 100ms
    tags:
      - {{name: good, address: 0, type: uint32}}
      - {{name: force, address: 20, type: float32}}
      - {{name: missing, address: 1000}}"""
        for name, plc in (
            ("nan", faulty["nan"]),
            ("inf", faulty["inf"]),
            ("neginf", faulty["-inf"]),
        )
    )
    gateway = Gateway(
        peers,
        tmp_path,
        f"""
drivers:{drivers}
machines:
  - id: press-nan
    signals: {{good: press-nan.good}}
    order: {{order_id: "1000123", operation: "0010"}}
    confirm: {{every_units: 10}}
    limits: [{{signal: press-nan.force, low: 12.0, high: 15.0, for: 1s, raise: inspection}}]
destinations: {{}}
routes: {{}}
""",
    )
    gateway.start()
    api = f"http://127.0.0.1:{gateway.api_port}"
    expected = {
        "press-nan.force": "NaN",
        "press-inf.force": "Infinity",
        "press-neginf.force": "-Infinity",
    }

    def signals() -> dict[str, Any]:
        response = httpx.get(f"{api}/status", timeout=10)
        assert response.status_code == 200, response.text[:2000]
        found: dict[str, Any] = strict_json(response.text)["signals"]
        return found

    deadline = time.monotonic() + 30
    while not expected.keys() <= signals().keys():
        assert time.monotonic() < deadline, "no readings of the faulty sensors"
        time.sleep(0.2)
    for _ in range(3):  # and on every call, not just the first
        shown = signals()
        for signal, name in expected.items():
            assert shown[signal]["value"] is None and shown[signal]["quality"] == "bad"
            assert shown[signal]["nonfinite"] == name
        assert shown["press-nan.good"]["quality"] == "good"
    ready = strict_json(httpx.get(f"{api}/readyz", timeout=10).text)
    # A tag the device refuses (it has no register 1000) shows, the others read on.
    assert (
        "driver press-nan: tag missing is bad: the device answered exception code 2 "
        "(illegal data address) for holding register 1000"
    ) in ready["degraded"], ready
    metrics = httpx.get(f"{api}/metrics", timeout=10)
    assert metrics.status_code == 200 and "plantsync_driver_samples" in metrics.text

    status = run_process(
        [sys.executable, "-m", "edge.cli", "status", "--config", str(gateway.config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert status.returncode == 0, status.stderr
    assert strict_json(status.stdout)["signals"]["press-inf.force"]["nonfinite"] == "Infinity"
    text = run_process(
        [sys.executable, "-m", "edge.cli", "status", "--config", str(gateway.config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert text.returncode == 0, text.stderr

    recording = tmp_path / "shift.jsonl"
    record = run_process(
        [
            sys.executable,
            "-m",
            "edge.cli",
            "record",
            "--config",
            str(gateway.config),
            "--out",
            str(recording),
            "--duration",
            "2s",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert record.returncode == 0, record.stderr
    lines = [strict_json(line) for line in recording.read_text().splitlines()]
    forces = {line["signal"]: line for line in lines if line.get("signal") in expected}
    assert {signal: line["nonfinite"] for signal, line in forces.items()} == expected
    assert all(line["value"] is None and line["quality"] == "bad" for line in forces.values())
    replay = run_process(
        [
            sys.executable,
            "-m",
            "edge.cli",
            "replay",
            "--config",
            str(gateway.config),
            "--input",
            str(recording),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert replay.returncode == 0, replay.stderr
    assert gateway.current.stop() == 0


def test_check_warns_about_modicon_style_addresses_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge.cli.main import main

    plant = tmp_path / "plant.yaml"
    plant.write_text(f"""site: "1010"
data_dir: {tmp_path}
drivers:
  - name: press-01
    type: modbus
    host: 127.0.0.1
    tags:
      - {{name: good, address: 0, type: uint32}}
      - {{name: state, address: 40011}}
""")
    assert main(["check", "--config", str(plant)]) == 0  # valid: a warning, not an error
    err = capsys.readouterr().err
    assert (
        f"warning: {plant}:9: drivers[0].tags[1].address: 40011 looks like a Modicon "
        "register number: holding register 40011 is address 10 (0-based protocol "
        "address); if that is what you mean, write address: 10"
    ) in err


class LongestWait(random.Random):
    """Backoff jitter that always picks the longest wait, so the test knows the schedule."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.mark.integration
async def test_a_device_that_is_back_is_read_again_without_waiting_out_the_backoff() -> None:
    port = free_port()
    proc = await asyncio.to_thread(start_plc, port, "--rate", "0", "--start", "111")
    driver = ModbusDriver(config(port, COUNTER_TAGS, reconnect_max_delay="60s"))
    # Waits of 2, 4, 8, 16... s after the loss: the device returns during the 8 s one.
    driver._backoff = Backoff(base=2.0, cap=60.0, rng=LongestWait())
    collector = Collector()
    try:
        async with running(driver, collector):
            await wait_until(lambda: collector.batches and driver.health.connected)
            await asyncio.to_thread(kill_plc, proc)
            lost_at = time.monotonic()
            await wait_until(lambda: driver._backoff.attempt >= 3, within=15)  # in the 8 s wait
            proc = await asyncio.to_thread(start_plc, port, "--rate", "0", "--start", "222")
            back_at = time.monotonic()
            await wait_until(lambda: collector.latest()["good"].value == 222, within=20)
            read_after = time.monotonic() - back_at
    finally:
        stop_plc(proc)
    # The 8 s wait began 6 s after the loss; without looking, the read would come at 14 s.
    assert back_at - lost_at < 10
    assert read_after < 5.0, f"read {read_after:.1f}s after the device was back"


@pytest.mark.integration
async def test_a_busy_driver_stops_at_every_cancellation() -> None:
    """A stop must stop. Python 3.11's wait_for (inside every pymodbus request) loses a
    cancellation that arrives as the response does, and a TaskGroup cancels its poll loops
    only once: before `honour_cancellation`, about 1 stop in 10 of a driver polling as fast as
    it can never ended (31 of 300), and the daemon hung on shutdown. Oracle: the task ends."""
    with plc("--rate", "100") as port:
        config = ModbusConfig.model_validate(
            {
                "name": "press",
                "type": "modbus",
                "host": "127.0.0.1",
                "port": port,
                "poll_interval": "1ms",
                "poll_groups": {"fast": "1ms"},
                "tags": [
                    {"name": "good", "address": 0, "type": "uint32"},
                    {"name": "state", "address": 10, "group": "fast"},
                ],
            }
        )
        rng = random.Random(1234)
        hung = 0
        lost: list[asyncio.Task[None]] = []
        for _ in range(120):
            task = asyncio.create_task(ModbusDriver(config).run(Collector()))
            await asyncio.sleep(rng.uniform(0.03, 0.1))
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=2.0)
            if not done:
                hung += 1
                lost.append(task)
        for task in lost:  # do not leave them polling behind the test (bounded: they may not)
            for _ in range(20):
                task.cancel()
                if (await asyncio.wait({task}, timeout=0.05))[0]:
                    break
        assert hung == 0, f"{hung} of 120 stops were lost"
