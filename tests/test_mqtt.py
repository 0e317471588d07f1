"""MQTT driver and MES publisher tests: config and field mapping as pure units, the rest against a
real mosquitto on a free port, stopped and restarted to prove reconnection and session
persistence. The sink is a fake that records batches and can block, lag or fail like a commit."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho_mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from drivers.base import MesMessage, Reading, RejectedMessage
from drivers.mqtt import SAMPLE_CONFIG, MqttConfig, MqttDriver, to_reading
from drivers.mqtt.client import READ_AHEAD, ReadAheadClient
from simulators.mes_publisher import InputLot, MesPublisher
from tests.conftest import Mosquitto, free_port, missing_peer
from tests.driver_harness import running, wait_until
from tests.processes import run_process, spawn

REPO_ROOT = Path(__file__).resolve().parents[1]
CONSUMPTION = "mes/1010/press-01/consumption"
LOT_COMPLETED = "mes/1010/press-01/lot/completed"

# Mapped like SAMPLE_CONFIG: what the demo plant uses for the publisher's events.
TOPICS: list[dict[str, Any]] = [
    {
        "filter": "mes/+/+/consumption",
        "event": "material.consumed",
        "fields": {
            "machine_id": "$topic[2]",
            "order_id": "order_id",
            "material": "material",
            "lot_id": "lot_id",
            "quantity.value": "quantity",
            "quantity.uom": "uom",
            "occurred_at": "occurred_at",
        },
    },
    {
        "filter": "mes/+/+/lot/completed",
        "event": "lot.produced",
        "fields": {
            "machine_id": "$topic[2]",
            "order_id": "order_id",
            "material": "material",
            "lot_id": "lot_id",
            "quantity.value": "quantity",
            "quantity.uom": "uom",
            "input_lots": "input_lots",
        },
    },
]


def config(port: int = 1883, /, **options: Any) -> MqttConfig:
    """A driver config for the broker on `port`, with a client id of its own."""
    document = {
        "name": "mes",
        "type": "mqtt",
        "host": "127.0.0.1",
        "port": port,
        "client_id": f"test-{uuid.uuid4().hex[:12]}",
        "keepalive": "5s",
        "topics": TOPICS,
    }
    return MqttConfig.model_validate(document | options)


class Recorder:
    """A sink that keeps every batch; it can lag like a commit, block, or fail."""

    def __init__(self, latency: float = 0.0, failures: int = 0, block: bool = False) -> None:
        self.batches: list[list[Reading]] = []
        self.committed: list[list[Reading]] = []
        self.latency = latency
        self.failures = failures
        self.block = block

    async def __call__(self, readings: Sequence[Reading]) -> None:
        self.batches.append(list(readings))
        if self.block:
            await asyncio.Event().wait()  # until cancelled: a commit that never finishes
        if self.latency:
            await asyncio.sleep(self.latency)
        if self.failures:
            self.failures -= 1
            raise OSError("database is locked")
        self.committed.append(list(readings))

    def readings(self) -> list[Reading]:
        return [reading for batch in self.batches for reading in batch]

    def ids(self) -> list[str]:
        return [r.message_id for r in self.readings() if isinstance(r, MesMessage)]

    def rejected(self) -> list[RejectedMessage]:
        return [r for r in self.readings() if isinstance(r, RejectedMessage)]


@contextlib.asynccontextmanager
async def publisher(broker: Mosquitto, **options: Any) -> AsyncIterator[MesPublisher]:
    async with MesPublisher(broker.host, broker.port, **options) as mes:
        yield mes


async def nothing_pending(broker: Mosquitto, settings: MqttConfig) -> list[Reading]:
    """Connect a new driver with the same client id and return what the broker still had for
    the session: a marker published after the connection arrives after any redelivery."""
    driver = MqttDriver(settings)
    sink = Recorder()
    async with running(driver, sink), publisher(broker, run=uuid.uuid4().hex) as mes:
        await wait_until(lambda: driver.health.connected)
        marker = await asyncio.to_thread(mes.consume, "MARKER", "RM", "L", 1)
        await marker
        await wait_until(lambda: marker.message_id in sink.ids())
    return [r for r in sink.readings() if getattr(r, "message_id", None) != marker.message_id]


def log_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("drivers.mqtt") and text in record.getMessage()
    ]


# --- delivery and acknowledgement -------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_acknowledged_only_after_the_sink_returns(
    mosquitto: Mosquitto, protocol: str
) -> None:
    settings = config(mosquitto.port, protocol=protocol)
    await _subscribe_once(settings)
    async with publisher(mosquitto) as mes:
        sent = [
            await asyncio.to_thread(mes.consume, "4711", "RM-STEEL", "RM-A-1", "12.500"),
            await asyncio.to_thread(
                mes.lot_completed,
                "4711",
                "FG-100",
                "FG-1",
                100,
                input_lots=[InputLot("RM-A-1", "RM-STEEL", "12.500")],
            ),
        ]
        for publication in sent:
            await publication
    sent_ids = [publication.message_id for publication in sent]

    # A commit that never returns; the gateway dies during it (the task is cancelled).
    stuck = Recorder(block=True)
    async with running(MqttDriver(settings), stuck):
        await wait_until(lambda: stuck.batches)
    assert stuck.ids() and stuck.ids() == sent_ids[: len(stuck.ids())]

    # The same session again: the broker sends them again, nothing was lost.
    sink = Recorder()
    async with running(MqttDriver(settings), sink):
        await wait_until(lambda: sink.ids() == sent_ids)

    consumed, produced = sink.readings()
    assert isinstance(consumed, MesMessage) and isinstance(produced, MesMessage)
    assert consumed.kind == "material.consumed" and consumed.topic == CONSUMPTION
    assert consumed.driver == "mes"
    assert consumed.fields == {
        "machine_id": "press-01",
        "order_id": "4711",
        "material": "RM-STEEL",
        "lot_id": "RM-A-1",
        "quantity": {"value": Decimal("12.500"), "uom": "KGM"},
        "occurred_at": consumed.fields["occurred_at"],
    }
    assert str(consumed.fields["quantity"]["value"]) == "12.500"
    assert produced.kind == "lot.produced"
    assert produced.fields["input_lots"] == [
        {
            "lot_id": "RM-A-1",
            "material": "RM-STEEL",
            "quantity": {"value": Decimal("12.500"), "uom": "KGM"},
        }
    ]

    # Committed and acknowledged: a third connection gets nothing of it.
    assert await nothing_pending(mosquitto, settings) == []


async def _subscribe_once(settings: MqttConfig) -> None:
    """Create the persistent session (and its subscriptions) before anything is published."""
    driver = MqttDriver(settings)
    async with running(driver, Recorder()):
        await wait_until(lambda: driver.health.connected)
        await asyncio.sleep(0.2)  # the SUBACK


@pytest.mark.integration
async def test_without_a_persistent_session_nothing_is_kept(mosquitto: Mosquitto) -> None:
    settings = config(mosquitto.port, persistent_session=False)
    await _subscribe_once(settings)
    async with publisher(mosquitto) as mes:
        await (await asyncio.to_thread(mes.consume, "4711", "RM", "L-1", 1))
    assert await nothing_pending(mosquitto, settings) == []


@pytest.mark.integration
async def test_a_failed_commit_is_not_acknowledged_and_comes_again(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.mqtt")
    settings = config(mosquitto.port)
    # The session and its subscription first: a message published between the CONNACK and
    # the SUBACK of a new session is not the session's (seen once in a loaded full run).
    await _subscribe_once(settings)
    driver = MqttDriver(settings)
    sink = Recorder(failures=2)
    async with running(driver, sink), publisher(mosquitto) as mes:
        await wait_until(lambda: driver.health.connected)
        publication = await asyncio.to_thread(mes.consume, "4711", "RM", "L-1", 3)
        await publication
        await wait_until(lambda: sink.committed, within=15)

    assert sink.ids() == [publication.message_id] * 3  # twice refused, then committed
    committed = [r for batch in sink.committed for r in batch]
    assert [getattr(r, "message_id", None) for r in committed] == [publication.message_id]
    assert len(log_lines(caplog, "could not commit")) == 1
    assert len(log_lines(caplog, "commits again")) == 1
    assert not log_lines(caplog, "unavailable")
    assert driver.health.errors >= 2
    assert await nothing_pending(mosquitto, settings) == []


# --- reconnection -----------------------------------------------------------------------------


@pytest.mark.integration
async def test_broker_restart_mid_stream_loses_nothing(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.mqtt")
    driver = MqttDriver(config(mosquitto.port))
    sink = Recorder(latency=0.002)
    total = 600

    def publish_steadily(mes: MesPublisher) -> list[str]:
        ids = []
        for n in range(total):
            ids.append(mes.consume("4711", "RM-STEEL", f"L-{n}", n).message_id or "")
            time.sleep(0.004)
        mes.flush(60)  # every one acknowledged by the broker, before or after its restart
        return ids

    async with running(driver, sink), publisher(mosquitto) as mes:
        await wait_until(lambda: driver.health.connected)
        publishing = asyncio.create_task(asyncio.to_thread(publish_steadily, mes))
        await wait_until(lambda: len(sink.ids()) >= 100)
        await asyncio.to_thread(mosquitto.stop)
        await wait_until(lambda: not driver.health.connected)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(mosquitto.start)
        published = await publishing
        try:
            await wait_until(lambda: set(published) <= set(sink.ids()), within=30)
        except AssertionError as exc:  # say what the reconnects met (once seen under load)
            raise AssertionError(
                f"{exc}: connected {driver.health.connected}, {driver.health.errors} "
                f"error(s), the last: {driver.health.last_error}; "
                f"{len(set(published) - set(sink.ids()))} of {total} not received"
            ) from None
        assert driver.health.connected

    assert len(set(published)) == total
    assert len(log_lines(caplog, "is unavailable")) == 1
    back = log_lines(caplog, "available again")
    assert len(back) == 1 and "session resumed" in back[0]
    assert not log_lines(caplog, "did not keep the session")


@pytest.mark.integration
async def test_resubscribes_when_the_broker_lost_the_session(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.mqtt")
    driver = MqttDriver(config(mosquitto.port))
    sink = Recorder()
    async with running(driver, sink):
        await wait_until(lambda: driver.health.connected)
        await asyncio.to_thread(mosquitto.stop)
        mosquitto.forget_sessions()  # no session, no subscriptions: only resubscribing helps
        await asyncio.to_thread(mosquitto.start)
        await wait_until(lambda: driver.health.connected and log_lines(caplog, "again"))
        async with publisher(mosquitto) as mes:
            publication = await asyncio.to_thread(mes.consume, "4711", "RM", "L-1", 1)
            await publication
            await wait_until(lambda: sink.ids() == [publication.message_id])

    assert len(log_lines(caplog, "did not keep the session")) == 1
    assert "new session" in log_lines(caplog, "available again")[0]


@pytest.mark.integration
async def test_unreachable_broker_at_start_up_is_retried(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.mqtt")
    mosquitto.stop()
    driver = MqttDriver(config(mosquitto.port))
    async with running(driver, Recorder()):
        await wait_until(lambda: driver.health.errors >= 2)
        assert not driver.health.connected
        assert driver.health.last_error is not None
        assert "Connection refused" in driver.health.last_error
        await asyncio.to_thread(mosquitto.start)
        await wait_until(lambda: driver.health.connected, within=20)
    unavailable = log_lines(caplog, "unavailable")
    assert len(unavailable) == 1 and f"127.0.0.1:{mosquitto.port}" in unavailable[0]
    assert len(log_lines(caplog, "available again")) == 1


@pytest.mark.integration
async def test_tls_setup_errors_are_retried_not_raised(
    mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.mqtt")
    missing = tmp_path / "no-such-ca.pem"
    driver = MqttDriver(config(mosquitto.port, tls={"ca_file": str(missing)}))
    async with running(driver, Recorder()):
        await wait_until(lambda: driver.health.errors >= 2)
    assert not driver.health.connected
    assert driver.health.last_error is not None and "No such file" in driver.health.last_error
    assert len(log_lines(caplog, "unavailable")) == 1


def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA and a server certificate for DNS name `localhost` only, made with openssl."""

    def openssl(*args: str) -> None:
        run_process(["openssl", *args], cwd=directory, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=plantsync test CA",
    )
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (directory / "san.cnf").write_text("subjectAltName=DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.cnf",
    )
    return {name: directory / f"{name}" for name in ("ca.pem", "server.pem", "server.key")}


@pytest.mark.integration
async def test_tls_verifies_the_broker_certificate(mosquitto: Mosquitto, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        missing_peer("openssl is not installed (apt-get install openssl)")
    directory = tmp_path / "tls"
    directory.mkdir()
    files = make_certificates(directory)
    broker = Mosquitto(
        mosquitto.binary,
        directory,
        listener_options=[
            f"cafile {files['ca.pem']}",
            f"certfile {files['server.pem']}",
            f"keyfile {files['server.key']}",
        ],
    ).start()
    trusting = {"ca_file": str(files["ca.pem"])}
    try:

        async def connects(host: str, tls: dict[str, Any]) -> tuple[bool, str]:
            driver = MqttDriver(config(broker.port, host=host, tls=tls))
            async with running(driver, Recorder()):
                await wait_until(lambda: driver.health.connected or driver.health.errors)
                return driver.health.connected, driver.health.last_error or ""

        assert await connects("localhost", trusting) == (True, "")
        # The certificate names localhost, not 127.0.0.1: refused unless told not to check.
        connected, error = await connects("127.0.0.1", trusting)
        assert not connected and "certificate verify failed" in error
        assert await connects("127.0.0.1", {**trusting, "insecure": True}) == (True, "")
        # Without ca_file the system's CAs are used, and they do not know this one.
        connected, error = await connects("localhost", {})
        assert not connected and "certificate verify failed" in error
    finally:
        broker.kill()


# --- bursts -----------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_burst_is_absorbed_in_batches(
    mosquitto: Mosquitto, protocol: str, capsys: pytest.CaptureFixture[str]
) -> None:
    total = 5000
    settings = config(mosquitto.port, protocol=protocol)
    driver = MqttDriver(settings)
    sink = Recorder(latency=0.002)  # a 2 ms commit per batch
    async with running(driver, sink):
        published = await publish_burst(mosquitto, driver, total)
        # Until the last batch is committed (and so acknowledged), not merely handed over.
        await wait_until(lambda: sum(map(len, sink.committed)) >= total, within=30)

    assert set(sink.ids()) == set(published)
    sizes = [len(batch) for batch in sink.batches]
    assert driver.batch_sizes == collections.Counter(sizes)
    assert max(sizes) <= 500  # batch_max
    assert len(sizes) < total  # messages shared commits
    # A batch's PUBACKs leave as one write: the broker took every one of them for its message.
    assert await nothing_pending(mosquitto, settings) == []
    with capsys.disabled():
        print(
            f"\nMQTT {protocol} burst of {total}: {len(sizes)} commits, batch sizes "
            f"min {min(sizes)} / median {sorted(sizes)[len(sizes) // 2]} / max {max(sizes)}"
        )


@pytest.mark.integration
@pytest.mark.parametrize("transport", ["tcp", "tls"])
async def test_a_burst_of_mixed_sizes_arrives_byte_for_byte_in_order(
    mosquitto: Mosquitto, transport: str, tmp_path: Path
) -> None:
    """The driver reads ahead of paho's packet boundaries (`ReadAheadClient`): messages that
    share one read, a message split over many (larger than a read), one over max_payload, and a
    burst's tail with nothing after it (kept bytes no `select()` would announce) all arrive as
    published, in order, once; the oracle is the publisher's own bytes."""
    broker, plain, options = mosquitto, mosquitto, {}
    if transport == "tls":
        if shutil.which("openssl") is None:
            missing_peer("openssl is not installed (apt-get install openssl)")
        files = make_certificates(tmp_path)
        plain_port = free_port()
        broker = Mosquitto(
            mosquitto.binary,
            tmp_path,
            listener_options=[
                f"cafile {files['ca.pem']}",
                f"certfile {files['server.pem']}",
                f"keyfile {files['server.key']}",
                f"listener {plain_port} 127.0.0.1",  # for the publisher
            ],
        ).start()
        plain = dataclasses.replace(broker, port=plain_port)
        options = {"host": "localhost", "tls": {"ca_file": str(files["ca.pem"])}}
    sizes = [40, 1_500, 70_000, 0, 0, 200_000, 0, 300_000, 9_000, *[0] * 300]
    payloads = [
        json.dumps(
            {
                "order_id": "4711",
                "material": "RM",
                "lot_id": f"L-{number}",
                "quantity": number,
                "uom": "KGM",
                "occurred_at": "2026-12-05T08:00:00Z",
                "pad": "x" * size,
            }
        ).encode()
        for number, size in enumerate(sizes)
    ]
    try:
        # Kept bytes stuck until something else arrives would wait for the next PINGRESP:
        # with a keepalive of a minute, for longer than the wait below.
        settings = config(broker.port, keepalive="60s", **options)
        driver = MqttDriver(settings)
        sink = Recorder()
        async with running(driver, sink), publisher(plain, run=uuid.uuid4().hex) as mes:
            await wait_until(lambda: driver.health.connected)
            await asyncio.sleep(0.3)  # the SUBACK

            def burst() -> None:
                for payload in payloads:
                    mes.publish_raw(CONSUMPTION, payload)
                mes.flush(30)

            await asyncio.to_thread(burst)
            await wait_until(lambda: sum(map(len, sink.committed)) >= len(payloads), within=10)

        limit = 256 * 1024  # max_payload's default
        assert [reading.payload for reading in sink.readings()] == [
            payload[:limit] for payload in payloads
        ]
        assert [type(reading) for reading in sink.readings()] == [
            RejectedMessage if len(payload) > limit else MesMessage for payload in payloads
        ]
        assert await nothing_pending(plain, settings) == []
    finally:
        if broker is not mosquitto:
            broker.kill()


@pytest.mark.integration
def test_a_backlog_is_read_a_chunk_at_a_time_so_acks_and_pings_go_out(
    mosquitto: Mosquitto,
) -> None:
    """paho's thread must come back to its loop, where it writes PUBACKs and PINGREQs and
    checks the keepalive, while a backlog is still arriving: one pass of `ReadAheadClient`'s
    reading takes at most one read ahead of bytes from the socket. (Reading on while the
    socket had bytes, a backlog longer than 1.5 keepalives got the driver disconnected by the
    broker with nothing acknowledged, on every connection: found by a review, with the
    reviewer's 30,000- and 100,000-message backlogs.) Then every message arrives, in order."""
    client_id = f"test-{uuid.uuid4().hex[:12]}"
    total = 3000
    arrived: list[bytes] = []

    def client() -> ReadAheadClient:
        made = ReadAheadClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho_mqtt.MQTTv5,
        )
        made.on_message = lambda _client, _userdata, message: arrived.append(message.payload)
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 600
        properties.ReceiveMaximum = 65535  # the driver's default: the broker sends it all
        made.connect(mosquitto.host, mosquitto.port, clean_start=False, properties=properties)
        return made

    session = client()  # the session and its subscription, then away
    subacks: list[int] = []
    session.on_subscribe = lambda _client, _userdata, mid, *_: subacks.append(mid)
    session.subscribe(CONSUMPTION, qos=1)
    deadline = time.monotonic() + 10
    while not subacks and time.monotonic() < deadline:
        session.loop(0.1)
    assert subacks, "no SUBACK"
    session.disconnect()
    with MesPublisher(mosquitto.host, mosquitto.port, run=uuid.uuid4().hex) as mes:
        published = [mes.consume("4711", "RM", f"L-{n}", n).payload for n in range(total)]
        mes.flush(30)
    smallest = min(map(len, published)) + len(CONSUMPTION)

    backlog = client()
    time.sleep(0.5)  # the broker sends the CONNACK and as much of the backlog as TCP takes
    backlog.loop(0.0)  # one pass: select(), read, handle
    assert 0 < len(arrived) <= READ_AHEAD // smallest + 1, len(arrived)
    deadline = time.monotonic() + 30
    while len(arrived) < total and time.monotonic() < deadline:
        backlog.loop(0.1)
    backlog.disconnect()
    assert arrived == published


async def publish_burst(broker: Mosquitto, driver: MqttDriver, total: int) -> list[str]:
    """Once the running driver is connected and subscribed: `total` consumption messages as
    fast as the broker takes them, each acknowledged by the broker; their message ids."""
    async with publisher(broker, window=1000) as mes:
        await wait_until(lambda: driver.health.connected)
        await asyncio.sleep(0.3)  # the SUBACK

        def burst() -> list[str]:
            ids = [mes.consume("4711", "RM", f"L-{n}", n).message_id or "" for n in range(total)]
            mes.flush(60)
            return ids

        return await asyncio.to_thread(burst)


# --- malformed payloads -----------------------------------------------------------------------


@pytest.mark.integration
async def test_malformed_payloads_are_rejected_acknowledged_and_survived(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = config(mosquitto.port, max_payload="1KiB")
    driver = MqttDriver(settings)
    sink = Recorder()
    good = b'{"order_id": "4711", "material": "RM", "lot_id": "L", "quantity": 1, "uom": "KGM",'
    cases = {
        b"not json": "payload is not JSON: Expecting value",
        b"[1, 2]": "payload is an array, expected a JSON object",
        b'"text"': "payload is a string, expected a JSON object",
        b'{"order_id": "4711"}': "field 'material': the payload has no 'material'",
        b'{"quantity": NaN}': "payload is not JSON: NaN is not a JSON number",
        b'{"order_id": "\xff"}': "payload is not UTF-8",
        b"{" + b" " * 2000 + b"}": "payload of 2002 bytes exceeds max_payload (1024 bytes)",
        good
        + b'"occurred_at": "2024-01-01T00:00:00Z", "message_id": [1]}': "message id at 'message_id' must be a string or an integer, not an array",  # noqa: E501
    }
    async with running(driver, sink), publisher(mosquitto) as mes:
        await wait_until(lambda: driver.health.connected)
        await asyncio.sleep(0.2)
        for payload in cases:
            await asyncio.to_thread(mes.publish_raw, CONSUMPTION, payload)
        valid = await asyncio.to_thread(mes.consume, "4711", "RM", "L-1", 1)
        await mes.aflush()
        await wait_until(lambda: valid.message_id in sink.ids())

    # A connection lost before the acknowledgements went out makes the broker send the
    # unacknowledged messages again (at least once, as it must): a repeat is allowed only
    # then, and only as a repeat, in order, of what came before. Seen once in a loaded full
    # run (six rejections twice); the log says whether the connection was lost.
    repeats = len(sink.rejected()) - len({r.payload for r in sink.rejected()})
    reconnected = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert repeats == 0 or reconnected, f"{repeats} repeated rejections, connection never lost"
    rejected = list({r.payload: r for r in sink.rejected()}.values())
    assert [r.payload for r in rejected] == [p if len(p) <= 1024 else p[:1024] for p in cases]
    for reading, expected in zip(rejected, cases.values(), strict=True):
        assert expected in reading.reason, reading.reason
        assert reading.topic == CONSUMPTION and reading.driver == "mes"
    assert driver.health.errors >= len(cases)
    assert driver.health.reads >= len(cases) + 1
    assert driver.health.reads == len(cases) + 1 or reconnected
    assert driver.health.last_sample_at is not None
    assert await nothing_pending(mosquitto, settings) == []


# --- field mapping, pure ----------------------------------------------------------------------


def mapped(
    payload: bytes,
    fields: dict[str, str],
    topic: str = "mes/1010/press-01/x/y",
    **topic_options: Any,
) -> Reading:
    settings = config(
        topics=[{"filter": "mes/+/+/#", "event": "lot.produced", "fields": fields, **topic_options}]
    )
    return to_reading(settings, topic, payload, 1700000000.0)


def test_mapping_from_topic_levels_literals_and_nested_paths() -> None:
    payload = (
        b'{"header": {"id": "M-1", "site": "1010"}, "lot": {"no": "FG-1"},'
        b' "qty": 12.340, "inputs": [{"lot": "RM-1"}, {"lot": "RM-2"}]}'
    )
    reading = mapped(
        payload,
        {
            "machine_id": "$topic[2]",
            "site": "$topic[1]",
            "quantity.value": "qty",
            "quantity.uom": "=KGM",
            "lot_id": "lot.no",
            "input_lots.first": "inputs.1.lot",
            "note": "==literal",
        },
        id_field="header.id",
    )
    assert isinstance(reading, MesMessage)
    assert reading.message_id == "M-1"
    assert reading.kind == "lot.produced"
    assert reading.received_at == 1700000000.0
    assert reading.fields == {
        "machine_id": "press-01",
        "site": "1010",
        "quantity": {"value": Decimal("12.340"), "uom": "KGM"},
        "lot_id": "FG-1",
        "input_lots": {"first": "RM-2"},
        "note": "=literal",
    }
    value = reading.fields["quantity"]["value"]
    assert type(value) is Decimal and str(value) == "12.340"


def test_empty_mapping_takes_the_payload_as_it_is() -> None:
    reading = mapped(b'{"a": {"b": 1.5}, "n": 10, "message_id": 42}', {})
    assert isinstance(reading, MesMessage)
    assert reading.fields == {"a": {"b": Decimal("1.5")}, "n": 10, "message_id": 42}
    assert type(reading.fields["n"]) is int
    assert reading.message_id == "42"


@pytest.mark.parametrize(
    ("payload", "fields", "reason"),
    [
        (
            b'{"lot": "x"}',
            {"lot_id": "lot.no"},
            "field 'lot_id': 'lot' is a string, not an object (source 'lot.no')",
        ),
        (b'{"inputs": []}', {"x": "inputs.0.lot"}, "field 'x': 'inputs' has only 0 items"),
        (b"{}", {"order_id": "order.id"}, "field 'order_id': the payload has no 'order'"),
        (b"{}", {"x": "$topic[9]"}, "field 'x': topic 'mes/1010/press-01/x/y' has no level 9"),
    ],
)
def test_mapping_failures_name_the_field_and_source(
    payload: bytes, fields: dict[str, str], reason: str
) -> None:
    reading = mapped(payload, fields)
    assert isinstance(reading, RejectedMessage)
    assert reading.reason.startswith(reason), reading.reason
    assert reading.payload == payload


def test_message_id_without_an_id_field_is_a_hash_of_topic_and_payload() -> None:
    first = mapped(b'{"a": 1}', {})
    again = mapped(b'{"a": 1}', {})
    elsewhere = mapped(b'{"a": 1}', {}, topic="mes/1010/press-02/x/y")
    not_looked_up = mapped(b'{"a": 1, "message_id": "M-1"}', {}, id_field=None)
    assert isinstance(first, MesMessage) and isinstance(again, MesMessage)
    assert isinstance(elsewhere, MesMessage) and isinstance(not_looked_up, MesMessage)
    assert first.message_id == again.message_id
    assert first.message_id.startswith("sha256:") and len(first.message_id) == 7 + 64
    assert elsewhere.message_id != first.message_id
    assert not_looked_up.message_id.startswith("sha256:")


def test_first_matching_topic_wins_and_unmatched_topics_are_rejected() -> None:
    settings = config(
        topics=[
            {"filter": "mes/+/+/consumption", "event": "material.consumed"},
            {"filter": "mes/#", "event": "lot.produced"},
        ]
    )
    consumed = to_reading(settings, CONSUMPTION, b"{}", 0.0)
    produced = to_reading(settings, LOT_COMPLETED, b"{}", 0.0)
    stray = to_reading(settings, "erp/orders", b"{}", 0.0)
    assert isinstance(consumed, MesMessage) and consumed.kind == "material.consumed"
    assert isinstance(produced, MesMessage) and produced.kind == "lot.produced"
    assert isinstance(stray, RejectedMessage)
    assert stray.reason == "topic 'erp/orders' matches no configured filter"


# --- config -----------------------------------------------------------------------------------


def test_config_defaults() -> None:
    settings = MqttConfig.model_validate(
        {"name": "mes", "type": "mqtt", "host": "broker", "topics": TOPICS}
    )
    assert settings.client_id == "plantsync-mes" and settings.persistent_session
    assert settings.port == 1883 and settings.protocol == "5" and settings.keepalive == 30
    assert settings.max_payload == 256 * 1024 and settings.batch_max == 500
    assert settings.inflight_window == 65535 and settings.session_expiry == 7 * 86400
    assert settings.topics[0].id_field == "message_id"


def test_the_sample_config_is_valid() -> None:
    document = yaml.safe_load(SAMPLE_CONFIG.replace("${MES_MQTT_PASSWORD}", "secret"))
    settings = MqttConfig.model_validate(document)
    assert settings.max_payload == 256 * 1024
    assert settings.password is not None and settings.password.get_secret_value() == "secret"
    assert [topic.event for topic in settings.topics] == ["material.consumed", "lot.produced"]


@pytest.mark.parametrize(
    "topic_filter", ["#", "+", "mes/+/+/consumption", "mes/#", "/", "$share/gw/mes/#", "$SYS/#"]
)
def test_valid_filters(topic_filter: str) -> None:
    config(topics=[{"filter": topic_filter, "event": "material.consumed"}])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"topics": [{"filter": "mes/#/x", "event": "lot.produced"}]}, "'#' must be"),
        ({"topics": [{"filter": "mes/a#", "event": "lot.produced"}]}, "'#' must be"),
        ({"topics": [{"filter": "mes/a+/b", "event": "lot.produced"}]}, "'+' must be"),
        ({"topics": [{"filter": "", "event": "lot.produced"}]}, "must not be empty"),
        ({"topics": [{"filter": "$share/g", "event": "lot.produced"}]}, "$share/<group>"),
        ({"topics": [{"filter": "mes/#", "event": "mes.order"}]}, "material.consumed"),
        ({"topics": [{"filter": "mes/#", "event": "lot.produced", "qos": 2}]}, "qos"),
        ({"topics": []}, "at least 1"),
        (
            {"topics": [{"filter": "a/b", "event": "lot.produced", "fields": {"x": "$topic[2]"}}]},
            "past the last level",
        ),
        (
            {"topics": [{"filter": "a/b", "event": "lot.produced", "fields": {"x": "$host"}}]},
            "$topic[2]",
        ),
        (
            {
                "topics": [
                    {
                        "filter": "a",
                        "event": "lot.produced",
                        "fields": {"quantity": "q", "quantity.uom": "u"},
                    }
                ]
            },
            "both set",
        ),
        (
            {"topics": [{"filter": "a", "event": "lot.produced", "fields": {"x.": "q"}}]},
            "dotted path",
        ),
        ({"topics": [{"filter": "a", "event": "lot.produced"}] * 2}, "repeated: a"),
        ({"qos": 1}, "Extra inputs"),
        ({"protocol": "3.1"}, "'3.1.1' or '5'"),
        ({"password": "secret"}, "password needs username"),
        ({"tls": {"key_file": "/k.pem"}}, "key_file needs cert_file"),
        ({"tls": {"ca": "/ca.pem"}}, "Extra inputs"),
        ({"keepalive": "soon"}, "not a duration"),
        ({"batch_max": 0}, "greater than or equal to 1"),
        ({"max_payload": "lots"}, "could not parse value and unit"),
    ],
)
def test_invalid_config_is_rejected(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        config(**change)


# --- the MES publisher ------------------------------------------------------------------------


@pytest.mark.integration
async def test_publisher_command_line_publishes_and_stops_on_sigterm(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    driver = MqttDriver(config(mosquitto.port))
    sink = Recorder()
    argv = [
        sys.executable,
        "-m",
        "simulators.mes_publisher",
        "--port",
        str(mosquitto.port),
        "--site",
        "1010",
        "--machine",
        "press-07",
        "--run",
        "t1",
    ]
    async with running(driver, sink):
        await wait_until(lambda: driver.health.connected)
        await asyncio.sleep(0.2)
        counted = await asyncio.to_thread(
            run_process,
            [*argv, "--count", "10", "--rate", "500"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert counted.returncode == 0, counted.stderr
        assert f"mes-publisher connected to 127.0.0.1:{mosquitto.port}" in counted.stdout
        assert "10 acknowledged" in counted.stdout
        # Two orders: 2 x (start, consumption, consumption, lot completed, end); the driver
        # subscribes to consumption and lot completion.
        await wait_until(lambda: len(sink.ids()) == 6)

        endless = spawn(
            [*argv, "--rate", "50", "--run", "t2"], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
        )
        await wait_until(lambda: len(sink.ids()) >= 9)
        endless.send_signal(signal.SIGTERM)
        output, _ = await asyncio.to_thread(endless.communicate, timeout=30)
        assert endless.returncode == 0 and "without PUBACK" in output

    kinds = [r.kind for r in sink.readings() if isinstance(r, MesMessage)][:6]
    assert kinds == ["material.consumed", "material.consumed", "lot.produced"] * 2
    first_lot = next(
        r for r in sink.readings() if isinstance(r, MesMessage) and r.kind == "lot.produced"
    )
    assert first_lot.fields["machine_id"] == "press-07"
    assert [lot["quantity"]["value"] for lot in first_lot.fields["input_lots"]] == [
        Decimal("12.500"),
        Decimal("0.750"),
    ]


def test_publisher_message_ids_are_reproducible() -> None:
    first = MesPublisher(site="1010", machine="press-01", run="r1")
    again = MesPublisher(site="1010", machine="press-01", run="r1")
    other = MesPublisher(site="1010", machine="press-01", run="r2")
    ids = [first.next_message_id() for _ in range(3)]
    assert ids == [again.next_message_id() for _ in range(3)]
    assert len(set(ids)) == 3 and other.next_message_id() != ids[0]


# --- a stock broker: its queue limit, and its $SYS figures --------------------------------------


async def stock_burst(
    broker: Mosquitto, total: int, **options: Any
) -> tuple[MqttDriver, Recorder, list[str]]:
    """`total` messages published as fast as the broker takes them, to a driver whose commits
    take 200 ms a batch (a busy outbox): far more arrive than it takes in meanwhile."""
    driver = MqttDriver(config(broker.port, **options))
    sink = Recorder(latency=0.2)
    async with running(driver, sink):
        published = await publish_burst(broker, driver, total)
        # Until everything published arrived, or the broker's own figures say it dropped
        # some and nothing has come for a while.
        last, quiet_since = -1, time.monotonic()
        while len(set(sink.ids())) < total:
            if len(sink.ids()) != last:
                last, quiet_since = len(sink.ids()), time.monotonic()
            if time.monotonic() - quiet_since > 3 and driver.broker.get("dropped", 0.0):
                break
            await asyncio.sleep(0.1)
        await wait_until(lambda: "dropped" in driver.broker, within=5)
    return driver, sink, published


@pytest.mark.integration
async def test_a_burst_at_a_stock_broker_loses_nothing_with_the_default_window(
    stock_mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    total = 5000
    driver, sink, published = await stock_burst(stock_mosquitto, total)
    assert set(sink.ids()) == set(published), (
        f"{total - len(set(sink.ids()))} of {total} lost at the broker"
    )
    assert driver.broker["dropped"] == 0.0 and not driver.health.degraded
    # Intake stays bounded although the broker may send 65535 at once: the driver stops
    # reading while 4 batches wait for their commit.
    assert driver.peak_backlog <= 4 * 500 + 500, driver.peak_backlog
    with capsys.disabled():
        print(
            f"\nstock broker, burst of {total} with receive_maximum 65535: "
            f"{len(set(sink.ids()))} received, peak backlog {driver.peak_backlog} messages, "
            f"{len(sink.batches)} commits"
        )


@pytest.mark.integration
async def test_the_broker_dropping_messages_is_seen_logged_and_degrades(
    stock_mosquitto: Mosquitto,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.mqtt")
    total = 5000
    # The old default window: 1000 in flight plus the broker's 1000 queued, the rest dropped.
    driver, sink, _ = await stock_burst(stock_mosquitto, total, receive_maximum=1000)
    received = len(set(sink.ids()))
    dropped = driver.broker["dropped"]
    with capsys.disabled():
        print(
            f"\nstock broker, burst of {total} with receive_maximum 1000: {received} "
            f"received, the broker says it dropped {dropped:.0f}"
        )
    assert received < total and dropped == total - received
    warnings = log_lines(caplog, "has dropped")
    assert len(warnings) == 1, warnings  # once, not at every $SYS update
    assert "$SYS/broker/publish/messages/dropped" in warnings[0]
    assert "max_queued_messages 0" in warnings[0] and "max_queued_bytes" in warnings[0]
    (note,) = driver.health.degraded.values()
    assert f"has dropped {int(dropped)} message(s)" in note and "max_queued_messages" in note
    assert isinstance(driver.broker.get("uptime"), float)
    assert str(driver.broker.get("version", "")).startswith("mosquitto version")


# --- plantsync doctor mqtt --------------------------------------------------------------------


def plant_with_broker(tmp_path: Path, broker: Mosquitto) -> Path:
    plant = tmp_path / "plant.yaml"
    plant.write_text(f"""site: "1010"
data_dir: {tmp_path / "data"}
drivers:
  - name: mes
    type: mqtt
    host: {broker.host}
    port: {broker.port}
    topics: [{{filter: "mes/1010/+/consumption", event: material.consumed}}]
""")
    return plant


@pytest.mark.integration
async def test_doctor_finds_a_stock_brokers_queue_limit_its_drops_and_its_autosave(
    stock_mosquitto: Mosquitto, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge.cli.main import main

    # A gateway's session, offline while 1,500 messages arrive: the stock broker keeps 1,000.
    settings = config(stock_mosquitto.port)
    async with running(MqttDriver(settings), Recorder()):
        await asyncio.sleep(0.5)
    async with publisher(stock_mosquitto, window=1000) as mes:
        await asyncio.to_thread(
            lambda: [mes.consume("4711", "RM", f"L-{n}", n) for n in range(1500)] and mes.flush(60)
        )
    plant = plant_with_broker(tmp_path, stock_mosquitto)
    status = await asyncio.to_thread(
        main,
        [
            "doctor",
            "mqtt",
            "--config",
            str(plant),
            "--broker-config",
            str(stock_mosquitto.config_path),
            "--wait",
            "2500ms",
        ],
    )
    report = capsys.readouterr().out
    assert status == 1, report
    assert f"MQTT broker mes at 127.0.0.1:{stock_mosquitto.port}" in report
    assert "info: broker: mosquitto version 2." in report
    assert "problem: the broker has dropped 500 message(s) since it started" in report
    assert "problem: max_queued_messages 1000: beyond 1000 messages" in report
    assert "problem: autosave_interval 1800 s" in report and "autosave_on_changes true" in report
    assert f"ok: persistence_location {stock_mosquitto.directory} is writable by root" in report
    assert "holds 1 session(s) of disconnected clients" in report


@pytest.mark.integration
def test_doctor_passes_a_broker_set_up_as_the_readme_advises(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge.cli.main import main
    from tests.conftest import mosquitto_binary

    directory = tmp_path / "advised"
    directory.mkdir()
    broker = Mosquitto(
        mosquitto_binary(),
        directory,
        settings={
            "sys_interval": "1",
            "max_queued_messages": "0",
            "max_queued_bytes": "1000000000",
            "autosave_interval": "100",
            "autosave_on_changes": "true",
            "persistent_client_expiration": "14d",
        },
    ).start()
    try:
        status = main(
            [
                "doctor",
                "mqtt",
                "--config",
                str(plant_with_broker(tmp_path, broker)),
                "--broker-config",
                str(broker.config_path),
                "--wait",
                "1500ms",
            ]
        )
    finally:
        broker.kill()
    report = capsys.readouterr().out
    assert status == 0, report
    assert "problem" not in report
    assert "ok: max_queued_messages 0, max_queued_bytes 1000000000" in report
    assert "ok: the broker has dropped no message since it started" in report


def test_doctor_says_when_the_persistence_directory_is_not_the_brokers_to_write(
    tmp_path: Path,
) -> None:
    from drivers.mqtt import check_broker_settings

    location = tmp_path / "store"
    location.mkdir(mode=0o755)  # root's, as `mkdir` by an installer running as root leaves it
    found = check_broker_settings(
        {
            "persistence": "true",
            "persistence_location": str(location),
            "user": "nobody",
            "max_queued_messages": "0",
        }
    )
    problems = [f.text for f in found if f.level == "problem"]
    assert any(
        f"persistence_location {location} is not writable by the broker's user nobody" in text
        and f"chown nobody {location}" in text
        for text in problems
    ), problems
    off = check_broker_settings({})
    assert any("persistence is off" in f.text for f in off if f.level == "problem")
