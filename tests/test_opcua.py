"""OPC UA driver tests against the real machine simulator: in-process (control API) where a test
changes the machine, as a subprocess where it must be killed or frozen; config, node ids and the
sample buffer as pure units."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import logging
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from asyncua import ua
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID
from pydantic import ValidationError

from drivers.base import DeviceRestarted, Quality, Reading, Sample
from drivers.common.timing import Backoff
from drivers.opcua import (
    NodeRef,
    OpcUaConfig,
    OpcUaDriver,
    PendingSamples,
    browse_main,
    plain_value,
    portable_node_id,
    quality_of,
    trust_main,
)
from simulators.opcua_machine import (
    APPLICATION_URI,
    NAMESPACE_URI,
    OpcUaMachineServer,
    PackMLState,
    make_self_signed_certificate,
    node_id_string,
)
from tests.conftest import Peer, free_port, missing_peer, start_erp, start_peer
from tests.driver_harness import running, wait_until
from tests.opcua_child import MachineProcess
from tests.processes import run_process, spawn

MACHINE = "filler-02"


def node(variable: str, machine: str = MACHINE) -> str:
    return node_id_string(machine, variable)


def counter_tags(machine: str) -> list[dict[str, Any]]:
    return [
        {"name": "state", "node": node("Status.StateCurrent", machine)},
        {"name": "processed", "node": node("Admin.ProdProcessedCount", machine)},
    ]


COUNTER_TAGS = counter_tags(MACHINE)
MISSING_TAGS: list[dict[str, Any]] = [
    {"name": "missing", "node": node("Admin.NoSuchCount")},
    {"name": "elsewhere", "node": "nsu=urn:no-such-namespace;s=anything"},
]


def config(endpoint: str, tags: list[dict[str, Any]], /, **options: Any) -> OpcUaConfig:
    """A driver config for the simulator at `endpoint`; `options` override any key."""
    document = {
        "name": MACHINE,
        "type": "opcua",
        "endpoint": endpoint,
        "publishing_interval": "100ms",
        "keepalive": "1s",
        "stale_after": "3s",
        "timeout": "2s",
        "tags": tags,
    }
    return OpcUaConfig.model_validate(document | options)


def fast_driver(parsed: OpcUaConfig) -> OpcUaDriver:
    """A driver that retries within a second, so outages in tests stay short."""
    driver = OpcUaDriver(parsed)
    driver.backoff = Backoff(base=0.2, cap=1.0)
    return driver


class Collector:
    """A sink that keeps every sample, and every reading in its order."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.readings: list[Reading] = []

    async def __call__(self, readings: Sequence[Reading]) -> None:
        self.readings.extend(readings)
        self.samples.extend(r for r in readings if isinstance(r, Sample))

    @property
    def restarts(self) -> list[DeviceRestarted]:
        return [r for r in self.readings if isinstance(r, DeviceRestarted)]

    def of(self, tag: str) -> list[Sample]:
        return [sample for sample in self.samples if sample.tag == tag]

    def values(self, tag: str) -> list[Any]:
        return [sample.value for sample in self.of(tag)]

    def latest(self, tag: str) -> Sample | None:
        samples = self.of(tag)
        return samples[-1] if samples else None


@contextlib.asynccontextmanager
async def machine(**options: Any) -> AsyncIterator[OpcUaMachineServer]:
    async with OpcUaMachineServer("127.0.0.1", 0, **options) as server:
        yield server


in_plant_loop = pytest.mark.asyncio(loop_scope="module")
"""For tests that use the shared `plant` server, which lives in the module's event loop."""


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def plant() -> AsyncIterator[OpcUaMachineServer]:
    """One server for the tests that only read or change their own machine; server start-up
    is the slow part of these tests. filler-02 stays untouched; rate 0 unless a test sets it."""
    machines = ("filler-02", "filler-03", "filler-04", "filler-05")
    async with OpcUaMachineServer("127.0.0.1", 0, machines=machines, rate=0) as server:
        yield server


def opcua_logs(caplog: pytest.LogCaptureFixture, text: str, level: int | None = None) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("drivers.opcua")
        and text in record.getMessage()
        and (level is None or record.levelno == level)
    ]


def start_machine(peers: list[Peer], tmp_path: Path, port: int, *args: str) -> Peer:
    return start_peer(
        peers,
        [sys.executable, "-m", "simulators.opcua_machine", "--port", str(port), *args],
        tmp_path / f"opcua-{port}-{len(peers)}.log",
        f"opcua-machine listening on opc.tcp://127.0.0.1:{port}",
    )


def positive_deltas(values: Sequence[int]) -> int:
    return sum(max(0, later - earlier) for earlier, later in itertools.pairwise(values))


# --- subscription, node ids, quality ------------------------------------------------------------


@pytest.mark.integration
@in_plant_loop
async def test_tags_resolved_by_namespace_uri_flow_with_source_timestamps(
    plant: OpcUaMachineServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.opcua")
    await plant.add_counts("filler-03", 4321)
    tags = [
        *counter_tags("filler-03"),
        {"name": "text", "node": node("Admin.StopReasonText", "filler-03")},
        {"name": "pressure", "node": node("Process.Pressure", "filler-03")},
    ]
    driver = OpcUaDriver(config(plant.endpoint, [*tags, *MISSING_TAGS]))
    collector = Collector()
    before = time.time()
    async with running(driver, collector):
        await wait_until(lambda: all(collector.of(t["name"]) for t in tags))
        await wait_until(lambda: len(collector.of("pressure")) >= 3)  # noise: changes flow
        assert driver.health.connected
    after = time.time()

    good = [s for s in collector.samples if s.tag not in ("missing", "elsewhere")]
    assert {s.driver for s in collector.samples} == {MACHINE}
    assert all(s.quality is Quality.GOOD for s in good)
    assert all(before - 5 <= s.source_time <= after for s in good)
    assert collector.values("state")[0] == PackMLState.EXECUTE
    assert type(collector.values("state")[0]) is int
    assert collector.values("processed") == [4321]  # no change, no second sample
    assert collector.values("text") == [""]
    assert all(4.0 < value < 4.4 for value in collector.values("pressure"))
    times = [s.source_time for s in collector.of("pressure")]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert driver.health.reads >= 3
    assert driver.health.last_sample_age() is not None
    # A node the server does not have, or a namespace it does not have: that tag is bad,
    # said once, and the others flow.
    for tag in ("missing", "elsewhere"):
        assert {(s.value, s.quality) for s in collector.of(tag)} == {(None, Quality.BAD)}
    assert driver.health.errors == 2
    missing = opcua_logs(caplog, "tag missing", logging.WARNING)
    assert len(missing) == 1 and "has no node ns=2;s=filler-02.Admin.NoSuchCount" in missing[0]
    elsewhere = opcua_logs(caplog, "tag elsewhere", logging.WARNING)
    assert len(elsewhere) == 1 and "no namespace 'urn:no-such-namespace'" in elsewhere[0]


# --- the machine: states, counters, deadband ---------------------------------------------------


@pytest.mark.integration
@in_plant_loop
async def test_state_changes_and_counters_follow_the_machine(plant: OpcUaMachineServer) -> None:
    filler = "filler-04"
    tags = [
        *counter_tags(filler),
        {"name": "defective", "node": node("Admin.ProdDefectiveCount", filler)},
        {"name": "stop_reason", "node": node("Admin.StopReason", filler)},
        {"name": "stop_text", "node": node("Admin.StopReasonText", filler)},
        {"name": "speed", "node": node("Process.Speed", filler)},
    ]
    await plant.set_rate(filler, 40, scrap_rate=4)
    driver = OpcUaDriver(config(plant.endpoint, tags))
    collector = Collector()
    counts = plant.machine(filler)
    async with running(driver, collector):
        await wait_until(lambda: len(set(collector.values("processed"))) >= 4)
        await plant.set_state(filler, "Held", stop_reason=31, text="bottle jam")
        await wait_until(lambda: collector.values("state")[-1] == PackMLState.HELD)
        await wait_until(lambda: collector.values("stop_text")[-1] == "bottle jam")
        held_count = counts.processed_count
        await asyncio.sleep(0.5)
        assert counts.processed_count == held_count  # no counting outside Execute
        await wait_until(lambda: collector.values("processed")[-1] == held_count)

        await plant.add_counts(filler, good=5, scrap=2)
        await wait_until(lambda: collector.values("processed")[-1] == held_count + 7)
        await plant.set_state(filler, PackMLState.EXECUTE)
        await wait_until(lambda: collector.values("processed")[-1] > held_count + 7)

    assert collector.values("state") == [6, 11, 6]
    assert collector.values("stop_reason") == [0, 31, 0]
    assert collector.values("speed") == [2400.0, 0.0, 2400.0]
    processed = collector.values("processed")
    assert processed == sorted(processed)
    defective = collector.values("defective")
    assert defective == sorted(defective) and defective[-1] >= 2
    assert all(s.quality is Quality.GOOD for s in collector.samples)


@in_plant_loop
async def test_absolute_deadband_filters_small_changes(plant: OpcUaMachineServer) -> None:
    filler = "filler-05"
    temperature = node("Process.Temperature", filler)
    deadband = {"type": "absolute", "value": 1}
    tags: list[dict[str, Any]] = [
        {"name": "temperature", "node": temperature},
        {"name": "temperature_1", "node": temperature, "deadband": deadband},
    ]
    await plant.set_value(filler, "Temperature", 72.0)  # holds it: no more noise
    driver = OpcUaDriver(config(plant.endpoint, tags))
    collector = Collector()
    async with running(driver, collector):
        await wait_until(lambda: collector.values("temperature_1") == [72.0])
        await plant.set_value(filler, "Temperature", 72.4)  # a small step
        await wait_until(lambda: collector.values("temperature")[-1] == 72.4)
        await plant.set_value(filler, "Temperature", 75.0)  # a large step
        await wait_until(lambda: collector.values("temperature")[-1] == 75.0)
        await wait_until(lambda: collector.values("temperature_1")[-1] == 75.0)

    assert collector.values("temperature") == [72.0, 72.4, 75.0]
    assert collector.values("temperature_1") == [72.0, 75.0]


@pytest.mark.integration
async def test_a_publish_larger_than_any_queue_reaches_the_sink_value_by_value() -> None:
    """12,000 changes in one publish (a tick of a plant-sized server): every counter value the
    simulator wrote reaches the sink, in order, none merged away. asyncua puts a whole publish
    into its queue at once (a bounded one drops the oldest without a word) and the pump takes
    from it without yielding, so the delivery task must get its turn before the buffer's
    bound is reached."""
    filler = "filler-06"
    tags = [
        {"name": "processed", "node": node("Admin.ProdProcessedCount", filler), "queue_size": 8000},
        {"name": "defective", "node": node("Admin.ProdDefectiveCount", filler), "queue_size": 8000},
    ]
    async with machine(machines=(filler,), rate=0) as server:
        # The burst below holds the event loop the server and the driver share for seconds on
        # a loaded box: keep-alives that wait that long must not end the session.
        options = {"keepalive": "10s", "session_timeout": "60s", "stale_after": "30s"}
        parsed = config(server.endpoint, tags, publishing_interval="500ms", **options)
        driver = OpcUaDriver(parsed)
        collector = Collector()
        counts = server.machine(filler)
        async with running(driver, collector):
            await wait_until(lambda: collector.values("processed") == [0])
            await wait_until(lambda: collector.values("defective") == [0])
            written: list[tuple[int, int]] = []
            # No await in the server's write path yields: all 12,000 land in one publish.
            for _ in range(6000):
                await server.add_counts(filler, good=0, scrap=1)
                written.append((counts.processed_count, counts.defective_count))
            await wait_until(lambda: collector.values("processed")[-1] == 6000, within=30)
            await wait_until(lambda: collector.values("defective")[-1] == 6000, within=30)

    assert collector.values("processed") == [0, *(processed for processed, _ in written)]
    assert collector.values("defective") == [0, *(defective for _, defective in written)]
    assert driver.dropped_samples == 0


# --- reconnection ---------------------------------------------------------------------------------


@pytest.mark.integration
async def test_reconnects_after_the_server_is_killed_and_counts_resume(
    peers: list[Peer], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.opcua")
    port = free_port()
    endpoint = f"opc.tcp://127.0.0.1:{port}"
    server = await asyncio.to_thread(start_machine, peers, tmp_path, port, "--rate", "20")
    driver = fast_driver(config(endpoint, COUNTER_TAGS, server_restart="counters_continue"))
    collector = Collector()
    async with running(driver, collector):
        await wait_until(lambda: len(set(collector.values("processed"))) >= 5)
        await asyncio.to_thread(server.kill)
        await wait_until(lambda: not driver.health.connected, within=5)
        last_before = collector.values("processed")[-1]
        processed_before = len(collector.of("processed"))

        # The machine went on counting while its server was down: 500 more on restart.
        restart_count = last_before + 500
        await asyncio.to_thread(
            start_machine, peers, tmp_path, port, "--rate", "20", "--start", str(restart_count)
        )
        await wait_until(lambda: driver.health.connected, within=15)
        await wait_until(lambda: len(set(collector.values("processed")[processed_before:])) >= 5)

    processed = collector.values("processed")
    first_after = processed[processed_before]
    assert restart_count <= first_after < restart_count + 100  # the server's current value
    assert processed == sorted(processed), "a counter sample went back: it would count twice"
    assert positive_deltas(processed) == processed[-1] - processed[0]
    assert all(s.quality is Quality.GOOD for s in collector.samples)
    assert len(opcua_logs(caplog, "is unavailable", logging.WARNING)) == 1
    assert endpoint in opcua_logs(caplog, "is unavailable")[0]
    assert len(opcua_logs(caplog, "available again", logging.INFO)) == 1
    # counters_continue: the restart is logged, and the rules are not told to count from 0.
    assert driver.restarts_seen == 1 and not collector.restarts
    assert len(opcua_logs(caplog, "its counters carry on", logging.INFO)) == 1


@pytest.mark.integration
async def test_counts_across_an_outage_are_counted_once() -> None:
    # Exact bookkeeping: the machine counts only when told, so every unit is known.
    async with machine(rate=0, start_count=100) as server:
        driver = fast_driver(config(server.endpoint, COUNTER_TAGS))
        collector = Collector()
        added = 0

        async def count(good: int) -> None:
            nonlocal added
            await server.add_counts(MACHINE, good)
            added += good
            await wait_until(lambda: collector.values("processed")[-1:] == [100 + added])

        async with running(driver, collector):
            await wait_until(lambda: collector.values("processed") == [100])
            for good in (3, 5, 7):
                await count(good)
            async with server.offline():
                await wait_until(lambda: not driver.health.connected)
                await server.add_counts(MACHINE, 11)  # made while nobody could see it
                added += 11
            await wait_until(lambda: collector.values("processed")[-1:] == [100 + added])
            for good in (2, 4):
                await count(good)

    assert positive_deltas(collector.values("processed")) == added == 32


# --- server restarts ------------------------------------------------------------------------------


def split_at_restarts(readings: Sequence[Reading], tag: str) -> list[list[Any]]:
    """A tag's values between restart notices: [[before the first], [after it], ...]."""
    parts: list[list[Any]] = [[]]
    for reading in readings:
        if isinstance(reading, DeviceRestarted):
            parts.append([])
        elif isinstance(reading, Sample) and reading.tag == tag:
            parts[-1].append(reading.value)
    return parts


@pytest.mark.integration
async def test_a_server_restart_is_announced_before_the_first_sample_after_it(
    peers: list[Peer], tmp_path: Path
) -> None:
    # The oracle is the simulator's own count: generation 1 stops at 33, generation 2 starts
    # from 0 and has counted past 33 (to 50) before it listens, so no drop shows.
    port = free_port()
    endpoint = f"opc.tcp://127.0.0.1:{port}"
    data_dir = tmp_path / "data"
    server = await asyncio.to_thread(
        start_machine, peers, tmp_path, port, "--rate", "50", "--stop-at", "33"
    )
    driver = fast_driver(config(endpoint, COUNTER_TAGS))
    driver.data_dir = data_dir
    collector = Collector()
    async with running(driver, collector):
        await wait_until(lambda: collector.values("processed")[-1:] == [33])
        await asyncio.to_thread(server.kill)
        await wait_until(lambda: not driver.health.connected, within=5)
        await asyncio.to_thread(
            start_machine,
            peers,
            tmp_path,
            port,
            "--rate",
            "50",
            "--stop-at",
            "50",
            "--listen-after",
            "1.5",
        )
        await wait_until(lambda: collector.values("processed")[-1:] == [50], within=15)

    before, after = split_at_restarts(collector.readings, "processed")
    assert before[-1] == 33 and after == [50], collector.readings
    [restart] = collector.restarts
    assert restart.driver == MACHINE and "restarted: ServerStatus.StartTime" in restart.reason
    assert endpoint in restart.reason
    assert abs(restart.source_time - time.time()) < 30
    assert driver.restarts_seen == 1

    # The gateway itself restarted meanwhile (a new driver on the same data_dir): the server
    # restarted while it was away, and that is still seen; without a server restart, nothing.
    await asyncio.to_thread(peers[-1].kill)
    await asyncio.to_thread(start_machine, peers, tmp_path, port, "--rate", "0", "--start", "7")
    for expected_restarts in (1, 0):
        again = fast_driver(config(endpoint, COUNTER_TAGS))
        again.data_dir = data_dir
        seen = Collector()
        async with running(again, seen):
            await wait_until(lambda: seen.values("processed") == [7])  # noqa: B023
        assert len(seen.restarts) == expected_restarts
        assert isinstance(seen.readings[0], DeviceRestarted) == bool(expected_restarts)


@pytest.mark.integration
async def test_a_server_announcing_shutdown_ends_the_session_until_it_runs_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.opcua")
    async with machine(rate=20) as server:
        driver = fast_driver(config(server.endpoint, COUNTER_TAGS))
        collector = Collector()
        async with running(driver, collector):
            await wait_until(lambda: driver.health.connected)
            await server.set_server_state(ua.ServerState.Shutdown)
            await wait_until(lambda: not driver.health.connected, within=5)
            await wait_until(lambda: driver.health.errors >= 2)  # reconnects: still Shutdown
            assert not driver.health.connected
            await server.set_server_state(ua.ServerState.Running)
            await wait_until(lambda: driver.health.connected, within=5)
    assert driver.health.last_error == "the server says its state is Shutdown, not Running"
    assert not collector.restarts  # the same server: same StartTime
    assert len(opcua_logs(caplog, "is unavailable: the server says its state is Shutdown")) == 1


@pytest.mark.integration
async def test_a_server_that_is_back_is_used_at_once_not_at_the_next_backoff_attempt(
    peers: list[Peer], tmp_path: Path
) -> None:
    port = free_port()
    server = await asyncio.to_thread(start_machine, peers, tmp_path, port)
    driver = OpcUaDriver(
        config(f"opc.tcp://127.0.0.1:{port}", COUNTER_TAGS, reconnect_max_delay="60s")
    )
    collector = Collector()
    async with running(driver, collector):
        await wait_until(lambda: driver.health.connected)
        await asyncio.to_thread(server.kill)
        await wait_until(lambda: not driver.health.connected, within=5)
        # As after a long outage: the next attempts wait long (seeded: 57.4 s, then 56.9 s).
        driver.backoff = Backoff(base=60, cap=60, rng=random.Random(2))
        assert Backoff(base=60, cap=60, rng=random.Random(2)).next_delay() > 30
        await wait_until(lambda: driver.health.errors >= 2)  # a refused attempt: waiting now
        await asyncio.sleep(1.0)
        await asyncio.to_thread(start_machine, peers, tmp_path, port)
        back = time.monotonic()
        await wait_until(lambda: driver.health.connected, within=10)
    assert time.monotonic() - back < 10, "reconnected only at the next backoff attempt"


@pytest.mark.integration
async def test_a_frozen_server_is_detected_and_reconnected(
    peers: list[Peer], tmp_path: Path
) -> None:
    port = free_port()
    server = await asyncio.to_thread(start_machine, peers, tmp_path, port, "--rate", "20")
    assert server.process is not None
    driver = fast_driver(config(f"opc.tcp://127.0.0.1:{port}", COUNTER_TAGS))
    collector = Collector()
    async with running(driver, collector):
        await wait_until(lambda: len(set(collector.values("processed"))) >= 3)
        server.process.send_signal(signal.SIGSTOP)
        try:
            await wait_until(lambda: not driver.health.connected, within=10)
            samples_frozen = len(collector.samples)
        finally:
            server.process.send_signal(signal.SIGCONT)
        await wait_until(lambda: driver.health.connected, within=20)
        await wait_until(lambda: len(set(collector.values("processed")[samples_frozen:])) >= 3)

    assert driver.health.last_error is not None
    assert driver.health.last_error.startswith(
        ("the session keep-alive failed", "no data change and no keep-alive")
    )
    processed = collector.values("processed")
    assert processed == sorted(processed)


@pytest.mark.integration
async def test_stale_watchdog_reconnects_when_publishing_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Reads still work here, so asyncua's keep-alive read is happy: only the stale-data
    # watchdog sees that no data change and no keep-alive come any more.
    caplog.set_level(logging.INFO, logger="drivers.opcua")
    async with machine(rate=20) as server:
        tags = [*COUNTER_TAGS, MISSING_TAGS[0]]
        driver = fast_driver(config(server.endpoint, tags, keepalive="500ms", stale_after="2s"))
        collector = Collector()
        async with running(driver, collector):
            await wait_until(lambda: len(set(collector.values("processed"))) >= 3)
            assert await server.drop_subscriptions() == 1
            await wait_until(lambda: not driver.health.connected, within=6)
            assert driver.health.last_error == "no data change and no keep-alive for 2s"
            samples_stale = len(collector.samples)
            await wait_until(lambda: driver.health.connected)
            await wait_until(lambda: len(set(collector.values("processed")[samples_stale:])) >= 3)

    assert len(opcua_logs(caplog, "is unavailable")) == 1
    assert len(opcua_logs(caplog, "available again")) == 1
    # Bad again in the new session, but said only once.
    assert len(collector.of("missing")) == 2
    assert len(opcua_logs(caplog, "tag missing")) == 1


# --- security -----------------------------------------------------------------------------------


def client_security(tmp_path: Path, policy: str = "Basic256Sha256") -> dict[str, str]:
    certificate, private_key = tmp_path / "client-cert.der", tmp_path / "client-key.pem"
    if not certificate.exists():
        make_self_signed_certificate(
            certificate, private_key, "urn:plantsync:test:edge", [ExtendedKeyUsageOID.CLIENT_AUTH]
        )
    return {
        "policy": policy,
        "mode": "SignAndEncrypt",
        "certificate": str(certificate),
        "private_key": str(private_key),
    }


def server_certificate(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A server certificate and key for the simulator, as a machine builder would make them."""
    certificate, private_key = tmp_path / f"{name}-cert.der", tmp_path / f"{name}-key.pem"
    make_self_signed_certificate(
        certificate,
        private_key,
        APPLICATION_URI,
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        host_name=name,
    )
    return certificate, private_key


def trusting(data_dir: Path, certificate: Path) -> Path:
    """data_dir whose trust list holds `certificate` (as `plantsync trust opcua` leaves it)."""
    (data_dir / "pki" / "trusted").mkdir(parents=True, exist_ok=True)
    shutil.copy(certificate, data_dir / "pki" / "trusted" / certificate.name)
    return data_dir


@pytest.mark.integration
@pytest.mark.parametrize(
    "policy", ["Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]
)
async def test_a_trusted_server_with_each_policy_and_a_user(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, policy: str
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.opcua")
    security = client_security(tmp_path, policy)
    certificate, private_key = server_certificate(tmp_path, "filler")
    data_dir = trusting(tmp_path / "data", certificate)
    async with machine(
        rate=20,
        security="encrypt",
        policy=policy,
        user=("operator", "s3cret"),
        certificate=certificate,
        private_key=private_key,
    ) as server:
        good = OpcUaDriver(
            config(
                server.endpoint,
                COUNTER_TAGS,
                security=security,
                username="operator",
                password="s3cret",
            ),
            data_dir=data_dir,
        )
        wrong = fast_driver(
            config(
                server.endpoint,
                COUNTER_TAGS,
                name="filler-x",
                security=security,
                username="operator",
                password="guess",
            )
        )
        wrong.data_dir = data_dir
        plain = fast_driver(config(server.endpoint, COUNTER_TAGS, name="filler-plain"))
        good_samples, wrong_samples, plain_samples = Collector(), Collector(), Collector()
        async with (
            running(good, good_samples),
            running(wrong, wrong_samples),
            running(plain, plain_samples),
        ):
            await wait_until(lambda: len(set(good_samples.values("processed"))) >= 3)
            await wait_until(lambda: wrong.health.errors >= 3 and plain.health.errors >= 2)
            assert good.health.connected and not wrong.health.connected

    assert all(s.quality is Quality.GOOD for s in good_samples.samples)
    assert not wrong_samples.samples and not plain_samples.samples
    assert wrong.health.last_error == (
        "the server rejected user 'operator' (BadUserAccessDenied): check the username and password"
    )
    assert plain.health.last_error == "the server offers no endpoint with security None None"
    unavailable = opcua_logs(caplog, "filler-x at", logging.WARNING)
    assert len(unavailable) == 1 and "BadUserAccessDenied" in unavailable[0]
    assert not (data_dir / "pki" / "rejected").exists()


@pytest.mark.integration
async def test_a_man_in_the_middle_is_refused_before_it_sees_the_password(
    peers: list[Peer], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The machine's server (certificate A, trusted) is replaced on the same endpoint by another
    # server with its own certificate B that accepts any password: the gateway refuses B at
    # the endpoint list, names the file to move, and B never sees a login. Moving that file to
    # trusted/ (a technician who checked it) is what lets the gateway in.
    caplog.set_level(logging.INFO, logger="drivers.opcua")
    port = free_port()
    genuine, genuine_key = server_certificate(tmp_path, "genuine")
    impostor, impostor_key = server_certificate(tmp_path, "impostor")
    data_dir = trusting(tmp_path / "data", genuine)
    security = client_security(tmp_path)
    machine_args = ["--security", "encrypt", "--user", "operator:s3cret", "--rate", "20"]
    server = await asyncio.to_thread(
        start_machine,
        peers,
        tmp_path,
        port,
        *machine_args,
        "--certificate",
        str(genuine),
        "--private-key",
        str(genuine_key),
    )
    driver = fast_driver(
        config(
            f"opc.tcp://127.0.0.1:{port}",
            COUNTER_TAGS,
            security=security,
            username="operator",
            password="s3cret",
        )
    )
    driver.data_dir = data_dir
    collector = Collector()
    async with running(driver, collector):
        await wait_until(lambda: driver.health.connected)
        await asyncio.to_thread(server.kill)
        await wait_until(lambda: not driver.health.connected, within=5)
        attacker = await asyncio.to_thread(
            start_machine,
            peers,
            tmp_path,
            port,
            *machine_args,
            "--certificate",
            str(impostor),
            "--private-key",
            str(impostor_key),
        )
        rejected_dir = data_dir / "pki" / "rejected"
        await wait_until(lambda: rejected_dir.exists() and any(rejected_dir.iterdir()))
        await wait_until(lambda: "not trusted" in (driver.health.last_error or ""))
        await asyncio.sleep(1.0)  # further attempts: refused the same way
        assert not driver.health.connected
        assert "Login of user" not in attacker.output(), "the impostor saw a login"
        [rejected] = list(rejected_dir.iterdir())
        assert rejected.read_bytes() == impostor.read_bytes()
        # The technician moves the file: trusted from then on.
        rejected.rename(data_dir / "pki" / "trusted" / rejected.name)
        await wait_until(lambda: driver.health.connected, within=15)

    error = opcua_logs(caplog, "is unavailable", logging.WARNING)[-1]
    assert f"saved as {rejected}" in error
    assert f"move that file to {data_dir / 'pki' / 'trusted'}/" in error
    assert "thumbprint " in error and "application URI urn:plantsync:sim:opcua-machine" in error
    assert "Login of user 'operator' accepted." in attacker.output()


@pytest.mark.integration
async def test_secure_policies_need_a_trust_list_or_a_pinned_certificate(tmp_path: Path) -> None:
    async with machine(security="encrypt", user=("operator", "s3cret")) as server:
        driver = fast_driver(
            config(
                server.endpoint,
                COUNTER_TAGS,
                security=client_security(tmp_path),
                username="operator",
                password="s3cret",
            )
        )  # no data_dir, no pin
        async with running(driver, Collector()):
            await wait_until(lambda: driver.health.errors >= 1)
    assert driver.health.last_error is not None
    assert driver.health.last_error.startswith("no trust list to check the server's certificate")


@pytest.mark.integration
@in_plant_loop
async def test_trust_opcua_shows_the_certificate_and_trusts_it_on_yes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certificate, private_key = server_certificate(tmp_path, "filler")
    async with machine(security="sign", certificate=certificate, private_key=private_key) as server:
        args = ["--endpoint", server.endpoint, "--data-dir", str(tmp_path / "data")]
        declined = await asyncio.to_thread(trust_main, args, answer=io.StringIO("n\n"))
        shown = capsys.readouterr().out
        accepted = await asyncio.to_thread(trust_main, args, answer=io.StringIO("yes\n"))
        done = capsys.readouterr().out
        again = await asyncio.to_thread(trust_main, args, answer=io.StringIO(""))
        already = capsys.readouterr().out
    cert = x509.load_der_x509_certificate(certificate.read_bytes())
    thumbprint = cert.fingerprint(hashes.SHA1()).hex().upper()
    assert declined == 1 and "Not trusted." in shown
    assert f"thumbprint:      {thumbprint} (SHA-1)" in shown
    assert "application URI: urn:plantsync:sim:opcua-machine" in shown
    assert f"subject:         {cert.subject.rfc4514_string()}" in shown
    assert f"valid:           {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to " in shown
    assert "Basic256Sha256 Sign" in shown
    assert accepted == 0 and f"[{thumbprint}].der" in done
    [trusted] = list((tmp_path / "data" / "pki" / "trusted").iterdir())
    assert trusted.read_bytes() == certificate.read_bytes()
    assert again == 0 and "Already trusted" in already


@pytest.mark.integration
@in_plant_loop
async def test_plantsync_trust_opcua_journals_the_hand_action(tmp_path: Path) -> None:
    certificate, private_key = server_certificate(tmp_path, "filler")
    config_file = tmp_path / "plant.yaml"
    config_file.write_text(f'site: "1010"\ndata_dir: {tmp_path / "data"}\n')
    async with machine(security="sign", certificate=certificate, private_key=private_key) as server:
        endpoint = server.endpoint
        done = await asyncio.to_thread(
            run_process,
            [
                sys.executable,
                "-m",
                "edge.cli",
                "trust",
                "opcua",
                "--endpoint",
                endpoint,
                "--config",
                str(config_file),
                "--reason",
                "thumbprint checked, ticket 42",
            ],
            input="y\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    thumbprint = (
        x509.load_der_x509_certificate(certificate.read_bytes())
        .fingerprint(hashes.SHA1())
        .hex()
        .upper()
    )
    db = sqlite3.connect(tmp_path / "data" / "outbox.db")
    try:
        rows = db.execute("SELECT action, target, who, reason FROM hand_actions").fetchall()
    finally:
        db.close()
    [(action, target, who, reason)] = rows
    assert action == "trust opcua" and who.startswith("os user ")
    assert target.startswith(f"server certificate {thumbprint} (") and endpoint in target
    assert reason == "thumbprint checked, ticket 42"


# --- browse ---------------------------------------------------------------------------------------


@in_plant_loop
async def test_browse_prints_portable_node_ids(
    plant: OpcUaMachineServer, capsys: pytest.CaptureFixture[str]
) -> None:
    status = await asyncio.to_thread(browse_main, ["--endpoint", plant.endpoint])
    out = capsys.readouterr().out
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "Objects  i=85  Object"
    assert f"  {MACHINE}  nsu={NAMESPACE_URI};s={MACHINE}  Object" in lines
    assert (
        f"      ProdProcessedCount  {node('Admin.ProdProcessedCount')}  Variable  UInt32 = 0"
        in lines
    )
    assert f"      StateCurrent  {node('Status.StateCurrent')}  Variable  Int32 = 6" in lines
    assert f"      StopReasonText  {node('Admin.StopReasonText')}  Variable  String = ''" in lines
    assert "  Server  i=2253  Object" in lines
    assert not any("ServerStatus" in line for line in lines)  # namespace 0 stays folded


def test_browse_reports_an_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    status = browse_main(["--endpoint", f"opc.tcp://127.0.0.1:{port}", "--timeout", "1"])
    captured = capsys.readouterr()
    assert status == 1 and captured.out == ""
    assert f"Cannot connect to opc.tcp://127.0.0.1:{port}: connection refused" in captured.err


# --- node ids, values, buffer: pure ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "namespace", "kind", "identifier"),
    [
        (
            "nsu=urn:plantsync:sim:machine;s=filler-02.Status.StateCurrent",
            "urn:plantsync:sim:machine",
            "s",
            "filler-02.Status.StateCurrent",
        ),
        ("nsu=http://example.com/UA/;i=1001", "http://example.com/UA/", "i", 1001),
        ("ns=2;s=Line1;Speed=fast", 2, "s", "Line1;Speed=fast"),
        ("i=2258", 0, "i", 2258),
        (
            "ns=3;g=72962b91-fa75-4ae6-8d28-b404dc7daf63",
            3,
            "g",
            uuid.UUID("72962b91-fa75-4ae6-8d28-b404dc7daf63"),
        ),
        ("ns=1;b=AQID", 1, "b", b"\x01\x02\x03"),
    ],
)
def test_node_ids_parse(text: str, namespace: Any, kind: str, identifier: Any) -> None:
    parsed = NodeRef.parse(text)
    assert (parsed.namespace, parsed.kind, parsed.identifier) == (namespace, kind, identifier)


@pytest.mark.parametrize(
    "text",
    ["", "Status.StateCurrent", "ns=x;s=a", "i=abc", "g=not-a-guid", "b=***", "x=1", "nsu=;s=a"],
)
def test_invalid_node_ids_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        NodeRef.parse(text)


def test_namespace_uris_resolve_against_the_current_namespace_array() -> None:
    ref = NodeRef.parse("nsu=urn:b;s=Speed")
    assert ref.resolve(["http://opcfoundation.org/UA/", "urn:a", "urn:b"]).NamespaceIndex == 2
    assert ref.resolve(["http://opcfoundation.org/UA/", "urn:b"]).NamespaceIndex == 1
    with pytest.raises(LookupError, match="no namespace 'urn:b'"):
        ref.resolve(["http://opcfoundation.org/UA/"])
    namespaces = ["http://opcfoundation.org/UA/", "urn:a", "urn:b"]
    for text in ("nsu=urn:b;s=Speed", "nsu=urn:a;i=7", "i=85", "nsu=urn:a;b=AQID"):
        assert portable_node_id(NodeRef.parse(text).resolve(namespaces), namespaces) == text


def test_status_codes_map_to_quality() -> None:
    from asyncua import ua

    assert quality_of(None) is Quality.GOOD
    assert quality_of(ua.StatusCode(ua.UInt32(0))) is Quality.GOOD
    assert quality_of(ua.StatusCode(ua.UInt32(0x40000000))) is Quality.UNCERTAIN
    assert quality_of(ua.StatusCode(ua.UInt32(0x80340000))) is Quality.BAD  # BadNodeIdUnknown
    assert plain_value(True) is True and plain_value(PackMLState.HELD) == 11
    assert type(plain_value(PackMLState.HELD)) is int
    assert plain_value(ua.LocalizedText("jam")) == "jam"
    assert plain_value(b"\x01\xff") == "01ff"


def test_pending_samples_keep_the_latest_value_per_tag_when_full() -> None:
    pending = PendingSamples(limit=4)
    for count in range(6):
        pending.put(Sample("m", "processed", count, float(count)))
    pending.put(Sample("m", "state", 6, 6.0))
    batch = asyncio.run(pending.take())
    # Over the limit, the queue shrank to the latest per tag; the latest value always survives.
    assert [(s.tag, s.value) for s in batch if isinstance(s, Sample)] == [
        ("processed", 4),
        ("processed", 5),
        ("state", 6),
    ]
    assert pending.dropped == 4 and len(pending) == 0


def test_pending_samples_hold_more_tags_than_their_limit_at_a_constant_cost() -> None:
    # 50,000 tags' first values (a plant-sized connect) in a buffer of 10,000: none is dropped
    # (each is its tag's latest), and the compactions that found nothing to drop are few
    # (each raises the next one to twice what it kept), not one per put past the limit.
    pending = PendingSamples(limit=10_000)
    for number in range(50_000):
        pending.put(Sample("m", f"t{number}", number, float(number)))
    assert pending.dropped == 0 and len(pending) == 50_000
    assert pending.compactions <= 3
    batch = asyncio.run(pending.take())
    assert [s.value for s in batch if isinstance(s, Sample)] == list(range(50_000))
    # Taken: the bound is the limit again, and a sink that is behind gets the latest per tag.
    for count in range(10_001):
        pending.put(Sample("m", "processed", count, float(count)))
    assert len(pending) == 1 and pending.dropped == 10_000


def test_pending_samples_never_merge_across_a_restart_notice() -> None:
    # The last value before a restart and the first after it both count; the notice stays.
    pending = PendingSamples(limit=3)
    for count in (31, 32, 33):
        pending.put(Sample("m", "processed", count, float(count)))
    restart = DeviceRestarted("m", 34.0, "StartTime moved")
    pending.put(restart)
    for count in (40, 45):
        pending.put(Sample("m", "processed", count, float(count)))
    batch = asyncio.run(pending.take())
    assert [r.value if isinstance(r, Sample) else r for r in batch] == [33, restart, 45]


# --- config ---------------------------------------------------------------------------------------


def test_config_defaults_and_durations() -> None:
    parsed = OpcUaConfig.model_validate(
        {
            "name": MACHINE,
            "type": "opcua",
            "endpoint": "opc.tcp://10.0.0.30:4840",
            "tags": [
                {"name": "state", "node": node("Status.StateCurrent"), "sampling_interval": "250ms"}
            ],
        }
    )
    assert parsed.publishing_interval == 0.5 and parsed.stale_after == 30.0
    assert parsed.keepalive == 5.0 and parsed.timeout == 5.0
    assert parsed.security.policy == "None" and parsed.security.mode == "None"
    assert parsed.tags[0].queue_size == 10 and parsed.tags[0].sampling_interval == 0.25
    assert parsed.tags[0].deadband is None


def test_password_is_secret() -> None:
    parsed = config("opc.tcp://h:4840", COUNTER_TAGS, username="operator", password="s3cret")
    assert "s3cret" not in repr(parsed) and parsed.password is not None
    assert parsed.password.get_secret_value() == "s3cret"


SECURE = {
    "policy": "Basic256Sha256",
    "mode": "Sign",
    "certificate": "c.der",
    "private_key": "k.pem",
}


@pytest.mark.parametrize(
    "change",
    [
        {"url": "opc.tcp://h:4840"},  # unknown key
        {"type": "opc-ua"},
        {"endpoint": "http://10.0.0.30:4840"},
        {"endpoint": "opc.tcp://:4840"},
        {"security": {"policy": "None", "mode": "Sign"}},
        {
            "security": {
                "policy": "Basic256Sha256",
                "mode": "None",
                "certificate": "c.der",
                "private_key": "k.pem",
            }
        },
        {"security": {"policy": "Basic256Sha256", "mode": "SignAndEncrypt"}},  # no cert + key
        {"security": {**SECURE, "private_key": None}},
        {"security": {"policy": "None", "certificate": "c.der"}},
        {"security": {**SECURE, "policy": "Basic128Rsa15"}},
        {"security": {**SECURE, "trust_all": True}},  # unknown security key
        {"username": "operator"},  # no password
        {"password": "s3cret"},  # no username
        {"stale_after": "1s", "keepalive": "5s"},  # stale before a keep-alive could come
        {"publishing_interval": "0s"},
        {"tags": []},
        {"tags": [{"name": "a", "node": "i=85"}, {"name": "a", "node": "i=86"}]},
        {"tags": [{"name": "a", "node": "Status.StateCurrent"}]},
        {"tags": [{"name": "a.b", "node": "i=85"}]},
        {"tags": [{"name": "a", "node": "i=85", "queue_size": 0}]},
        {"tags": [{"name": "a", "node": "i=85", "deadband": {"type": "percent", "value": 120}}]},
        {"tags": [{"name": "a", "node": "i=85", "deadband": {"type": "relative", "value": 1}}]},
        {"tags": [{"name": "a", "node": "i=85", "sampling": "1s"}]},  # unknown tag key
    ],
)
def test_invalid_config_is_rejected(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        config("opc.tcp://127.0.0.1:4840", COUNTER_TAGS, **change)


def test_valid_security_combinations() -> None:
    for mode in ("Sign", "SignAndEncrypt"):
        parsed = config("opc.tcp://h:4840", COUNTER_TAGS, security={**SECURE, "mode": mode})
        assert parsed.security.mode == mode
    assert config("opc.tcp://h:4840", COUNTER_TAGS, stale_after=0).stale_after == 0


# --- the real daemon: a device restart during a long outage -----------------------------------


@pytest.mark.integration
def test_daemon_counts_every_unit_when_the_machine_restarts_during_a_long_outage(
    peers: list[Peer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Issue 12 item 2: the machine counts to 33; its server is killed and stays down longer
    # than the old 30 s backoff cap; it comes back counting from 0 and has passed 33 before
    # its server listens (its program runs first). The oracle is the simulator's own count:
    # generation 1 stops at 33, generation 2 at 80, so the units are (33 - baseline) + 80.
    from tests.test_daemon_drivers import (
        Gateway,
        baselines,
        confirmations,
        erp_destination,
        wait_for,
        yield_sum,
    )

    erp = start_erp(peers, tmp_path)
    port = free_port()
    endpoint = f"opc.tcp://127.0.0.1:{port}"
    signal_name = f"{MACHINE}.processed"
    gateway = Gateway(
        peers,
        tmp_path,
        f"""
drivers:
  - name: {MACHINE}
    type: opcua
    endpoint: "{endpoint}"
    publishing_interval: 100ms
    keepalive: 1s
    timeout: 2s
    tags:
      - {{name: processed, node: "{node("Admin.ProdProcessedCount")}", queue_size: 50}}
machines:
  - id: {MACHINE}
    signals: {{processed: {signal_name}}}
    order: {{order_id: "2000789", operation: "0010", material: FG-300, lot_id: LOT-RST-1}}
    confirm: {{every_units: 10, every: 1s}}
{erp_destination(erp)}
routes:
  production.confirmation: [erp]
""",
    )
    start_machine(peers, tmp_path, port, "--rate", "10", "--stop-at", "33")
    gateway.start()
    unavailable = f"OPC UA server {MACHINE} at {endpoint} is unavailable"
    back = f"OPC UA server {MACHINE} at {endpoint} is available again"

    wait_for(
        lambda: gateway.status()["signals"].get(signal_name, {}).get("value") == 33,
        30,
        "the gateway to read 33",
    )
    [baseline] = baselines(gateway, signal_name)
    wait_for(lambda: yield_sum(confirmations(erp)) == 33 - baseline, 30, "33 confirmed")
    peers[-2].kill()  # the machine's server (the gateway was started after it)
    wait_for(lambda: unavailable in gateway.output(), 30, "the gateway to see the server gone")
    time.sleep(31)  # longer than the old 30 s backoff cap
    restarted = start_machine(
        peers, tmp_path, port, "--rate", "20", "--stop-at", "80", "--listen-after", "2"
    )
    listening = time.monotonic()
    wait_for(lambda: back in gateway.output(), 30, "the gateway to reconnect")
    reconnect_s = time.monotonic() - listening
    expected = 33 - baseline + 80
    wait_for(lambda: yield_sum(confirmations(erp)) >= expected, 30, f"{expected} confirmed")
    time.sleep(1.5)  # a late confirmation beyond the expected would be a double count
    delivered = int(yield_sum(confirmations(erp)))
    logs = gateway.output()
    with capsys.disabled():
        print(
            "\n"
            + json.dumps(
                {
                    "test": "opcua-device-restart-long-outage",
                    "outage_s": 31,
                    "baseline": baseline,
                    "expected": expected,
                    "delivered": delivered,
                    "lost": expected - delivered,
                    "duplicates": erp.stats()["duplicates"],
                    "reconnect_s": round(reconnect_s, 2),
                }
            )
        )
    assert restarted.process is not None and restarted.process.poll() is None
    assert delivered == expected, f"lost {expected - delivered} units; logs in {tmp_path}"
    assert f"OPC UA server {MACHINE} at {endpoint} restarted: ServerStatus.StartTime" in logs
    assert "its reading" in logs and "counts from 0" in logs
    # Promptly: the backoff had reached its cap (10 s), the server's port is what we watch.
    assert reconnect_s < 5, f"reconnected {reconnect_s:.1f} s after the server listened"
    assert gateway.current.stop() == 0


# --- OPC 30050: the PackML companion specification's structures and state machines ----------


def opc30050_tags(node_id: Any, machine_name: str = MACHINE) -> list[dict[str, Any]]:
    """Tags for an OPC 30050 machine whose variables have the node ids `node_id(path)` gives."""
    return [
        {"name": "state", "node": node_id("BaseStateMachine"), "read": "packml_state"},
        {
            "name": "processed",
            "node": node_id("Admin.ProdProcessedCount"),
            "select": "[ID=1].AccCount",
        },
        {"name": "job_count", "node": node_id("Admin.ProdProcessedCount"), "select": "[0].Count"},
        {
            "name": "defective",
            "node": node_id("Admin.ProdDefectiveCount"),
            "select": "[ID=1].AccCount",
        },
        {"name": "stop_reason", "node": node_id("Admin.StopReason"), "select": "ID"},
        {"name": "stop_text", "node": node_id("Admin.StopReason"), "select": ".Message"},
        {
            "name": "other_material",
            "node": node_id("Admin.ProdProcessedCount"),
            "select": "[ID=9].Count",
        },
        {"name": "no_field", "node": node_id("Admin.StopReason"), "select": "Reason"},
    ]


@pytest.mark.integration
async def test_an_opc30050_machine_is_read_through_its_structures_and_state_machines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The state numbers are ISA-TR88's, as OPC 30050's NodeSet gives each state object's
    # StateNumber: the simulator only points CurrentState.Id at the state object.
    caplog.set_level(logging.INFO, logger="drivers.opcua")
    # In its own process: asyncua's type registries are module-wide (see tests/opcua_child.py).
    with MachineProcess(rate=0, start_count=120, model="opc30050") as server:
        tags = opc30050_tags(lambda path: f"nsu={NAMESPACE_URI};s={MACHINE}.{path}")
        driver = OpcUaDriver(config(server.endpoint, tags))
        collector = Collector()
        async with running(driver, collector):
            await wait_until(lambda: collector.values("processed") == [120])
            await server.call("add_counts", MACHINE, good=5, scrap=2)
            await wait_until(lambda: collector.values("processed")[-1:] == [127])
            for state, reason, text, number in (
                ("Held", 31, "bottle jam", 11),
                ("Stopped", 0, "", 2),
                ("Aborted", 7, "guard open", 9),
                ("Execute", 0, "", 6),
            ):
                await server.call("set_state", MACHINE, state, stop_reason=reason, text=text)
                await wait_until(partial(lambda n: collector.values("state")[-1:] == [n], number))

    assert collector.values("state") == [6, 11, 2, 9, 6]
    assert collector.values("processed") == [120, 127]
    assert collector.values("job_count") == [120, 127]
    assert collector.values("defective") == [0, 2]
    assert collector.values("stop_reason") == [0, 31, 0, 7, 0]
    assert collector.values("stop_text") == ["", "bottle jam", "", "guard open", ""]
    assert all(type(value) is int for value in collector.values("state"))
    for tag, problem in (
        ("other_material", "no element with ID = 9"),
        ("no_field", "has no field 'Reason' (fields: ID, Value, Message"),
    ):
        assert {(s.value, s.quality) for s in collector.of(tag)} == {(None, Quality.BAD)}
        [said] = opcua_logs(caplog, f"tag {tag} ")
        assert problem in said, said


@pytest.mark.integration
async def test_an_opc30050_machine_serves_its_values_to_a_client_faster_than_its_clock() -> None:
    # A client that subscribes before the simulator's clock first ticks (here it never does)
    # must see the machine's values, not the null structures its variables are made with.
    # Oracle: the simulator's own count and the state it starts in (Execute, ISA-TR88 6).
    async with machine(rate=0, start_count=120, model="opc30050", tick=3600) as server:
        tags = opc30050_tags(lambda path: f"nsu={NAMESPACE_URI};s={MACHINE}.{path}")[:5]
        collector = Collector()
        async with running(OpcUaDriver(config(server.endpoint, tags)), collector):
            await wait_until(
                lambda: (
                    {s.tag for s in collector.samples}
                    >= {"state", "processed", "job_count", "defective", "stop_reason"}
                )
            )
            await server.add_counts(MACHINE, good=1)
            await wait_until(lambda: collector.values("processed")[-1:] == [121])

    assert [(s.value, s.quality) for s in collector.of("processed")] == [
        (120, Quality.GOOD),
        (121, Quality.GOOD),
    ]
    assert collector.values("defective") == [0]
    assert collector.values("stop_reason") == [0]
    assert collector.values("state") == [6]


# --- node-opcua: an independent server ----------------------------------------------------------

PEERS_DIR = Path(__file__).resolve().parent / "peers"
PACKML_PEER_NAMESPACE = "urn:plantsync:test:packml-peer"
PEER_MACHINE = "filler-07"


def peer_node(path: str) -> str:
    """node-opcua names an instance's children `<parent>-<BrowseName>`."""
    return f"nsu={PACKML_PEER_NAMESPACE};s={PEER_MACHINE}-{path.replace('.', '-')}"


class PackMLPeer:
    """`node tests/peers/packml_server.js`: node-opcua's server with OPC 30050's NodeSet,
    steered through its stdin; killed and started again on the same port."""

    def __init__(self, tmp_path: Path, port: int | None = None) -> None:
        node = shutil.which("node")
        if node is None or not (PEERS_DIR / "node_modules" / "node-opcua").is_dir():
            missing_peer(
                "node-opcua is not installed (make peers: npm ci in tests/peers; "
                "needs nodejs and npm)"
            )
        self.node = node or "node"
        self.port = port or free_port()
        self.log_path = tmp_path / f"packml-peer-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, *options: str) -> PackMLPeer:
        ready = "packml-server listening on"
        seen = self.output().count(ready)
        with self.log_path.open("ab") as log:
            self.process = spawn(
                [self.node, "packml_server.js", "--port", str(self.port), *options],
                cwd=PEERS_DIR,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while self.output().count(ready) <= seen:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the node-opcua peer did not start:\n{self.output()}")
            time.sleep(0.05)
        return self

    def command(self, line: str) -> None:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(f"{line}\n".encode())
        self.process.stdin.flush()

    def sessions(self) -> int:
        """The server's own count of open sessions."""
        before = len(re.findall(r"(?m)^sessions \d+$", self.output()))
        self.command("sessions")
        deadline = time.monotonic() + 10
        while len(found := re.findall(r"(?m)^sessions (\d+)$", self.output())) <= before:
            if time.monotonic() > deadline:
                raise AssertionError(f"no session count from the peer:\n{self.output()}")
            time.sleep(0.02)
        return int(found[-1])

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def packml_peers(tmp_path: Path) -> Iterator[list[PackMLPeer]]:
    started: list[PackMLPeer] = []
    yield started
    for peer in started:
        peer.kill()


@pytest.mark.integration
async def test_node_opcua_packml_machine_read_subscribed_and_reconnected_after_a_kill(
    packml_peers: list[PackMLPeer], tmp_path: Path
) -> None:
    # Another implementation's server, another namespace array (nsu= resolves it), the
    # specification's own types; its process killed and started again with its count from 0.
    peer = PackMLPeer(tmp_path)
    packml_peers.append(peer)
    await asyncio.to_thread(peer.start, "--rate", "0", "--start", "500")
    driver = fast_driver(config(peer.endpoint, opc30050_tags(peer_node)[:6], name=PEER_MACHINE))
    driver.data_dir = tmp_path / "data"
    collector = Collector()
    async with running(driver, collector):
        await wait_until(
            lambda: collector.values("processed") == [500] and collector.values("state") == [6],
            within=20,
        )
        peer.command("count 5 2")
        await wait_until(lambda: collector.values("processed")[-1:] == [507])
        for command, number in (
            ("state Held 31 bottle jam", 11),
            ("state Stopped", 2),
            ("state Aborted 7 guard open", 9),
            ("state Execute", 6),
        ):
            peer.command(command)
            await wait_until(partial(lambda n: collector.values("state")[-1:] == [n], number))
        samples_before = len(collector.readings)
        await asyncio.to_thread(peer.kill)
        await wait_until(lambda: not driver.health.connected, within=10)
        await asyncio.to_thread(peer.start, "--rate", "0", "--start", "0")
        await wait_until(lambda: driver.health.connected, within=20)
        peer.command("count 3")
        await wait_until(lambda: collector.values("processed")[-1:] == [3], within=10)

    assert collector.values("state") == [6, 11, 2, 9, 6, 6]
    assert collector.values("defective")[:2] == [0, 2]
    assert collector.values("stop_reason")[:5] == [0, 31, 0, 7, 0]
    assert collector.values("stop_text")[:3] == ["", "bottle jam", ""]
    assert all(s.quality is Quality.GOOD for s in collector.samples)
    # The restarted server has a new StartTime: the rules hear of it before its first sample.
    after = collector.readings[samples_before:]
    assert isinstance(after[0], DeviceRestarted), after[:3]
    assert len(collector.restarts) == 1
    assert collector.values("processed")[-2:] == [0, 3]


@pytest.mark.integration
def test_node_opcua_sessions_orderly_stops_a_full_server_and_a_kill_loop(
    packml_peers: list[PackMLPeer],
    peers: list[Peer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Issue 12 item 4, against node-opcua's server (10 sessions by default): orderly stops
    # (SIGTERM, a reload) close their session at once; a server full of other clients' sessions
    # is said to be full (BadTooManySessions, with what to change) and used as soon as a
    # session frees up; a crash loop (kill -9 ten times) leaves the gateway connected within a
    # bound (the default session timeout, 20 s, plus a retry).
    from asyncua.sync import Client as BlockingClient

    from tests.test_daemon_drivers import Gateway, wait_for

    peer = PackMLPeer(tmp_path)
    packml_peers.append(peer)
    peer.start("--rate", "0")
    body = f"""
drivers:
  - name: {PEER_MACHINE}
    type: opcua
    endpoint: "{peer.endpoint}"
    publishing_interval: 500ms
    tags:
      - {{name: processed, node: "{peer_node("Admin.ProdProcessedCount")}",
         select: "[ID=1].AccCount"}}
"""
    gateway = Gateway(peers, tmp_path, body)

    def connected() -> bool:
        return bool(gateway.status()["drivers"][0]["connected"])

    def sessions_become(count: int, within: float = 5.0) -> None:
        wait_for(
            lambda: peer.sessions() == count,
            within,
            f"the server to count {count} session(s), not {peer.sessions()}",
        )

    # Orderly: a reload that changes the driver replaces its session; SIGTERM ends it.
    gateway.start()
    wait_for(connected, 30, "the gateway to connect")
    sessions_become(1)
    gateway.config.write_text(gateway.config.read_text().replace("500ms", "250ms"))
    assert gateway.current.process is not None
    gateway.current.process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: "publishing_interval" in gateway.output() and connected(),
        30,
        "the reload to be applied",
    )
    sessions_become(1)
    assert gateway.current.stop() == 0
    sessions_become(0)

    # A full server: ten HMIs hold every session.
    hmis = [BlockingClient(peer.endpoint) for _ in range(10)]
    try:
        for hmi in hmis:
            hmi.connect()
        sessions_become(10)
        gateway.start()
        wait_for(
            lambda: "BadTooManySessions" in gateway.current.output(),
            30,
            "the gateway to be refused a session",
        )
        assert not connected()
        hmis.pop().disconnect()
        freed = time.monotonic()
        wait_for(connected, 30, "the gateway to take the freed session")
        full_wait_s = time.monotonic() - freed
    finally:
        for hmi in hmis:
            hmi.disconnect()
    full_logs = gateway.current.output()
    assert gateway.current.stop() == 0
    sessions_become(0)

    # A crash loop: each run killed -9 once it has its session.
    for _ in range(10):
        before = peer.sessions()
        gateway.start()
        wait_for(
            lambda: peer.sessions() > before,  # noqa: B023
            30,
            "the new run to open its session",
        )
        gateway.kill()
    orphans = peer.sessions()
    gateway.start()
    started = time.monotonic()
    wait_for(connected, 60, "the gateway to connect after the crash loop")
    ready_s = time.monotonic() - started
    with capsys.disabled():
        print(
            "\n"
            + json.dumps(
                {
                    "test": "opcua-sessions-node-opcua",
                    "server_max_sessions": 10,
                    "session_timeout_s": 20,
                    "full_server_wait_s": round(full_wait_s, 1),
                    "kills": 10,
                    "orphans_after_kills": orphans,
                    "ready_after_kills_s": round(ready_s, 1),
                }
            )
        )
    assert "the server has no room for another session (BadTooManySessions)" in full_logs
    assert "raise the server's session limit, or lower session_timeout" in full_logs
    assert full_logs.count("BadTooManySessions") == 1, "said once, not at every retry"
    assert full_wait_s < 6, f"took the freed session only after {full_wait_s:.1f} s"
    assert orphans == 10
    assert ready_s < 20 + 2 + 8, f"ready only after {ready_s:.1f} s"
    # Orphans of the killed runs may remain (until their timeout); the stopped one's may not.
    open_sessions = peer.sessions()
    assert gateway.current.stop() == 0
    wait_for(lambda: peer.sessions() <= open_sessions - 1, 5, "the stopped run's session to go")
