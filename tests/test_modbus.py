"""Modbus driver tests: config, read planning and decoding as pure units, the rest against the
real PLC simulator, started as a subprocess on a free port and killed to prove reconnection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from drivers.base import Quality, Sample
from drivers.modbus import (
    ModbusConfig,
    ModbusDriver,
    ModbusTag,
    decode,
    plan_reads,
    tag_value,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
STEADY_GOOD_COUNT = 123_456_789  # 0x075B_CD15: both words non-zero, so word order shows
EXECUTE, IDLE, COMPLETE = 6, 4, 17


# --- the simulator as a real peer ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_plc(port: int, *args: str, ready_within: float = 10.0) -> subprocess.Popen[str]:
    """Start `python -m simulators.modbus_plc` and return once it says it is listening."""
    proc = subprocess.Popen(
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


class Collector:
    """A sink that keeps every batch."""

    def __init__(self) -> None:
        self.batches: list[list[Sample]] = []

    async def __call__(self, samples: Sequence[Sample]) -> None:
        self.batches.append(list(samples))

    def latest(self) -> dict[str, Sample]:
        return {sample.tag: sample for sample in self.batches[-1]}

    def values(self, tag: str) -> list[tuple[float, Any]]:
        return [(s.source_time, s.value) for batch in self.batches for s in batch if s.tag == tag]


async def wait_until(condition: Callable[[], object], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(driver: ModbusDriver, sink: Collector) -> AsyncIterator[None]:
    """Run the driver for the body; fail if it ended on its own, then cancel it."""
    task = asyncio.create_task(driver.run(sink), name=f"driver {driver.name}")
    try:
        yield
        await asyncio.sleep(0)
        assert not task.done(), f"run() ended by itself: {task.exception()!r}"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


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
        if record.name == "drivers.modbus" and text in record.getMessage()
    ]


# --- decoding against the real PLC ---------------------------------------------------------


async def test_driver_decodes_every_type_and_word_order(steady_plc: int) -> None:
    tags: list[dict[str, Any]] = [
        {"name": "good", "address": 0, "type": "uint32", "word_order": "big"},
        {"name": "good_int32", "address": 0, "type": "int32"},
        {"name": "good_read_little", "address": 0, "type": "uint32", "word_order": "little"},
        {"name": "good_read_little_int32", "address": 0, "type": "int32", "word_order": "little"},
        {"name": "scrap", "address": 2, "type": "uint32"},
        {"name": "state", "address": 10, "type": "uint16"},
        {"name": "force", "address": 20, "type": "float32"},
        {"name": "temperature", "address": 30, "type": "int16"},
        {"name": "temperature_raw", "address": 30, "type": "uint16"},
        {"name": "temperature_f", "address": 30, "type": "int16", "scale": 1.8, "offset": 32},
        {"name": "good_little", "address": 40, "type": "uint32", "word_order": "little"},
        {"name": "good_input", "address": 0, "table": "input", "type": "uint32"},
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
        "good_read_little": swapped,
        "good_read_little_int32": swapped - 2**32,
        "scrap": 0,
        "state": IDLE,
        "force": pytest.approx(13.5, abs=0.5),
        "temperature": -5,
        "temperature_raw": 65531,
        "temperature_f": pytest.approx(23.0),
        "good_little": STEADY_GOOD_COUNT,
        "good_input": STEADY_GOOD_COUNT,
    }
    assert type(values["good"]) is int and type(values["force"]) is float


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


# --- reconnection -----------------------------------------------------------------------------


async def test_driver_reconnects_after_the_plc_dies(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="drivers.modbus")
    port = free_port()
    proc = await asyncio.to_thread(start_plc, port, "--rate", "20")
    driver = ModbusDriver(config(port, COUNTER_TAGS))
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

            batches_before = len(collector.batches)
            proc = await asyncio.to_thread(start_plc, port, "--rate", "20", "--start", "5000")
            await wait_until(lambda: len(collector.batches) > batches_before, within=15)
            assert driver.health.connected
            assert collector.latest()["good"].value >= 5000
            assert collector.latest()["good"].quality is Quality.GOOD
    finally:
        stop_plc(proc)

    unavailable = modbus_warnings(caplog, "unavailable")
    assert len(unavailable) == 1
    assert f"127.0.0.1:{port}" in unavailable[0]
    assert len(modbus_warnings(caplog, "available again")) == 1
    record = next(r for r in caplog.records if "unavailable" in r.getMessage())
    assert record.levelno == logging.WARNING


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


async def test_silent_device_times_out_and_is_retried(caplog: pytest.LogCaptureFixture) -> None:
    # A fake peer, because the simulator cannot be made to accept and then stay silent.
    async def accept_and_ignore(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the driver gives up and closes
        writer.close()

    caplog.set_level(logging.INFO, logger="drivers.modbus")
    server = await asyncio.start_server(accept_and_ignore, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    driver = ModbusDriver(config(port, COUNTER_TAGS, timeout="300ms"))
    collector = Collector()
    async with server, running(driver, collector):
        await wait_until(lambda: driver.health.errors >= 2)
    assert not collector.batches and not driver.health.connected
    assert driver.health.last_error == "no valid response within 0.3s"
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


# --- decoding, pure ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("registers", "register_type", "word_order", "expected"),
    [
        ([0x1234], "uint16", "big", 0x1234),
        ([0xFFFB], "uint16", "big", 65531),
        ([0xFFFB], "int16", "big", -5),
        ([0x7FFF], "int16", "little", 32767),
        ([0x0001, 0x0002], "uint32", "big", 0x0001_0002),
        ([0x0001, 0x0002], "uint32", "little", 0x0002_0001),
        ([0xFFFF, 0xFFFE], "int32", "big", -2),
        ([0xFFFE, 0xFFFF], "int32", "little", -2),
        ([0x4158, 0x0000], "float32", "big", 13.5),
        ([0x0000, 0x4158], "float32", "little", 13.5),
        ([0xC120, 0x0000], "float32", "big", -10.0),
    ],
)
def test_decode(registers: list[int], register_type: Any, word_order: Any, expected: Any) -> None:
    assert decode(registers, register_type, word_order) == expected


def test_decode_rejects_the_wrong_register_count() -> None:
    with pytest.raises(ValueError, match="needs 2 registers"):
        decode([1], "uint32", "big")


def test_scaling_only_when_asked() -> None:
    plain = ModbusTag(name="t", address=30, type="int16")
    scaled = ModbusTag(name="t", address=30, type="int16", scale=0.1, offset=273.15)
    assert tag_value(plain, [0xFFFB]) == -5 and type(tag_value(plain, [0xFFFB])) is int
    assert tag_value(scaled, [0xFFFB]) == pytest.approx(272.65)


# --- config -----------------------------------------------------------------------------------


def test_config_parses_durations_and_defaults() -> None:
    parsed = config(502, COUNTER_TAGS, poll_interval="500ms", timeout="2s")
    assert parsed.poll_interval == 0.5 and parsed.timeout == 2.0
    assert parsed.unit == 1 and parsed.max_gap == 8
    assert parsed.tags[0].table == "holding" and parsed.tags[2].type == "uint16"


@pytest.mark.parametrize(
    "change",
    [
        {"baud": 9600},  # unknown key
        {"type": "modbus-rtu"},  # wrong driver type
        {"tags": [{"name": "good", "address": 0, "type": "float64"}]},  # wrong tag type
        {"tags": [{"name": "good", "address": 0, "scaling": 2}]},  # unknown tag key
        {"tags": [{"name": "good", "address": 0}, {"name": "good", "address": 2}]},  # repeated
        {"tags": []},
        {"tags": [{"name": "good", "address": 65535, "type": "uint32"}]},  # runs past 65535
        {"unit": 248},
        {"name": "press 01"},
        {"tags": [{"name": "good.count", "address": 0}]},  # a dot would break `driver.tag`
        {"poll_interval": "soon"},
    ],
)
def test_invalid_config_is_rejected(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        config(502, COUNTER_TAGS, **change)  # an override replaces the valid value
