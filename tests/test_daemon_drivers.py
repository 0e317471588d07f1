"""Driver faults against the real daemon: one `plantsync run` process per test, real peers.

- OPC UA: the machine simulator is killed with SIGKILL mid-run and a new one started on the same
  port, its count moved on (the machine kept counting while the network was down); twice, the
  last time standing still so that the final count is known exactly.
- Modbus: the PLC simulator is killed, stays gone for a few seconds, and comes back further on,
  then counts to a known stop value.
- MQTT, broker restart: mosquitto (persistence on) is stopped and started while the MES
  publisher publishes QoS 1 consumptions steadily.
- MQTT, gateway killed between receiving and committing: a burst of a few thousand QoS 1
  messages, then a steady stream, while the gateway (committing slowly: small batches, each
  commit lingering) is killed with SIGKILL again and again, each time once the new process has
  committed something, and restarted with the same config, outbox and client id. The broker
  logs every PUBLISH with its DUP flag, so the test counts what each killed process had been
  sent and not acknowledged, and of that how much it had not committed either (the redeliveries
  the outbox did not already hold), and requires that the kills caught some.

In the counter tests the gateway is never restarted (same PID throughout): each driver must
reconnect by itself, and the confirmations ERP holds must tile the counter's advance exactly,
from the gateway's single baseline reading to the final count: sum of yields == final count -
baseline, contiguous counter ranges, no id twice. In the MQTT tests every MES message id
published (acknowledged by the broker) must reach ERP as exactly one material.consumed event
(its id is derived from the message id, so the expected ids are computed here), none invented.

Each test prints one JSON line with its figures (expected, delivered, duplicates, lost ...).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge.model.ids import event_id
from simulators.mes_publisher import MesPublisher, Publication
from simulators.opcua_machine import node_id_string
from tests.conftest import ErpSim, Mosquitto, Peer, free_port, start_erp, start_peer, start_plc
from tests.gateway_process import READY_TEXT, GatewayProcess

pytestmark = pytest.mark.integration

SITE = "1010"
ORDERS = 8
"""MES consumptions go to this many orders (partition keys), so deliveries run in parallel."""


# --- the gateway -------------------------------------------------------------------------------


class Gateway(GatewayProcess):
    """The daemon on a config written from `body` (drivers, machines, destinations), with
    this test's site, data directory and API port."""

    def __init__(self, peers: list[Peer], tmp_path: Path, body: str) -> None:
        self.database = tmp_path / "data" / "outbox.db"
        config = tmp_path / "plant.yaml"
        config.write_text(f"""
site: "{SITE}"
data_dir: {tmp_path / "data"}
api: {{listen: "127.0.0.1:{free_port()}"}}
shutdown_timeout: 10s
{body}""")
        super().__init__(peers, config, tmp_path)
        self.client_id = ""
        """The MQTT client id, when the gateway has an MQTT driver."""
        self.created_at = time.monotonic()


def erp_destination(erp: ErpSim) -> str:
    return f"""
destinations:
  erp:
    base_url: {erp.url}
    path: /api/events
    timeout: 30s
    max_in_flight: 8
    retry: {{base: 100ms, cap: 1s}}
"""


# --- waiting and reading -----------------------------------------------------------------------


def wait_for(
    condition: Callable[[], object], timeout: float, what: str, interval: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (httpx.HTTPError, sqlite3.Error):
            pass  # a peer between two states: ask again
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def erp_rows(erp: ErpSim, event_type: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{erp.url}/events", params={"type": event_type}, timeout=120)
    response.raise_for_status()
    rows: list[dict[str, Any]] = response.json()
    return rows


def confirmations(erp: ErpSim) -> list[dict[str, Any]]:
    return [row["event"] for row in erp_rows(erp, "production.confirmation")]


def yield_sum(events: list[dict[str, Any]]) -> Decimal:
    return sum((Decimal(e["data"]["yield_quantity"]["value"]) for e in events), Decimal(0))


def query(database: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def baselines(gateway: Gateway, signal: str) -> list[int]:
    pattern = rf"Counter {re.escape(signal)}: the first reading, (\d+), is the baseline"
    return [int(value) for value in re.findall(pattern, gateway.output())]


def count_upper_bound(start: int, rate: float, spawned_at: float) -> int:
    """The most a simulator started at `spawned_at` (monotonic) can have counted by now: its
    clock starts after the process does and advances at `rate` from `start`."""
    return start + math.ceil(rate * (time.monotonic() - spawned_at)) + 1


def print_summary(
    capsys: pytest.CaptureFixture[str], gateway: Gateway, figures: dict[str, Any]
) -> None:
    figures["run_s"] = round(time.monotonic() - gateway.created_at, 1)
    with capsys.disabled():
        print(f"\n{json.dumps(figures)}", flush=True)


def assert_tiles_the_advance(events: list[dict[str, Any]], advance: int, where: str) -> None:
    """Confirmations whose counter ranges tile [0, advance) and whose yields add up to it."""
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)), f"an event id reached ERP twice {where}"
    ranges = sorted((e["data"]["counter_from"], e["data"]["counter_to"]) for e in events)
    position = 0
    for low, high in ranges:
        assert low == position < high, f"gap or overlap at {position}: ({low}, {high}) {where}"
        assert Decimal(high - low) == Decimal(
            next(e for e in events if e["data"]["counter_from"] == low)["data"]["yield_quantity"][
                "value"
            ]
        ), f"range ({low}, {high}) != its yield {where}"
        position = high
    assert position == advance, f"ranges end at {position}, the counter advanced {advance} {where}"
    total = yield_sum(events)
    assert total == advance, f"yields add up to {total}, not {advance} {where}"


# --- 1. OPC UA: the server killed and replaced, the machine counting on ----------------------


class OpcUaMachine:
    """`python -m simulators.opcua_machine` on a fixed port; killed and started again."""

    def __init__(self, peers: list[Peer], tmp_path: Path, port: int) -> None:
        self.peers, self.tmp_path, self.port = peers, tmp_path, port
        self.peer: Peer | None = None
        self.start_count = 0
        self.rate = 0.0
        self.spawned_at = 0.0
        self.generation = 0

    def start(self, start_count: int, rate: float) -> None:
        self.generation += 1
        self.start_count, self.rate = start_count, rate
        self.spawned_at = time.monotonic()
        self.peer = start_peer(
            self.peers,
            [
                sys.executable,
                "-m",
                "simulators.opcua_machine",
                "--port",
                str(self.port),
                "--rate",
                str(rate),
                "--start",
                str(start_count),
            ],
            self.tmp_path / f"opcua-{self.generation}.log",
            "opcua-machine listening",
        )

    def kill(self) -> int:
        """SIGKILL; returns an upper bound of the count it had reached."""
        assert self.peer is not None
        bound = count_upper_bound(self.start_count, self.rate, self.spawned_at)
        self.peer.kill()
        return bound


def test_opcua_server_killed_and_replaced_the_daemon_reconnects_and_counts_exactly(
    peers: list[Peer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    erp = start_erp(peers, tmp_path)
    machine = OpcUaMachine(peers, tmp_path, free_port())
    machine.start(1000, rate=40)
    signal = "filler-02.processed"
    gateway = Gateway(
        peers,
        tmp_path,
        f"""
drivers:
  - name: filler-02
    type: opcua
    endpoint: "opc.tcp://127.0.0.1:{machine.port}"
    server_restart: counters_continue  # the new server goes on from the old count
    publishing_interval: 100ms
    keepalive: 2s
    timeout: 5s
    stale_after: 15s
    tags:
      - {{name: processed, node: "{node_id_string("filler-02", "Admin.ProdProcessedCount")}",
         queue_size: 50}}
machines:
  - id: filler-02
    line: LINE-B
    signals: {{processed: {signal}}}
    order: {{order_id: "2000456", operation: "0020", material: FG-200, lot_id: LOT-OPC-1}}
    confirm: {{every_units: 25, every: 1s}}
{erp_destination(erp)}
routes:
  production.confirmation: [erp]
""",
    )
    run = gateway.start()
    assert run.process is not None
    pid = run.process.pid
    endpoint = f"opc.tcp://127.0.0.1:{machine.port}"
    unavailable = f"OPC UA server filler-02 at {endpoint} is unavailable"
    back = f"OPC UA server filler-02 at {endpoint} is available again"

    reconnect_seconds = []
    final_count = 0
    for outage, (pause, next_rate) in enumerate([(2.0, 40.0), (1.0, 0.0)], start=1):
        # Counting (and confirmed) before the outage.
        before = len(confirmations(erp))
        wait_for(
            partial(lambda n: len(confirmations(erp)) >= n, before + 3),
            60,
            f"confirmations before outage {outage}",
        )
        bound = machine.kill()
        wait_for(
            partial(lambda n: gateway.output().count(unavailable) >= n, outage),
            30,
            f"the gateway to see the OPC UA server gone (outage {outage})",
        )
        time.sleep(pause)
        # The machine kept counting while the network was down: the new server goes on from
        # beyond anything the old one can have shown. The last one stands still, so the final
        # count is known exactly.
        next_start = bound + 137 * outage
        machine.start(next_start, rate=next_rate)
        back_from = time.monotonic()
        wait_for(
            partial(lambda n: gateway.output().count(back) >= n, outage),
            60,
            f"the gateway to reconnect by itself (outage {outage})",
        )
        reconnect_seconds.append(round(time.monotonic() - back_from, 2))
        gateway.assert_alive(pid)
        final_count = next_start

    def settled() -> bool:
        status = gateway.status()
        reading = status["signals"].get(signal)
        rule = status["machines"][0]
        return bool(
            reading is not None
            and reading["value"] == final_count
            and rule["good_pending"] == 0
            and rule["scrap_pending"] == 0
            and yield_sum(confirmations(erp)) == rule["good_total"]
        )

    wait_for(settled, 60, f"the gateway to read {final_count} and ERP to hold every confirmation")
    gateway.assert_alive(pid)

    found = baselines(gateway, signal)
    assert len(found) == 1, f"one baseline in one run, not {found}"
    baseline = found[0]
    assert 1000 <= baseline < final_count
    events = confirmations(erp)
    stats = erp.stats()
    rule = gateway.status()["machines"][0]
    advance = final_count - baseline
    print_summary(
        capsys,
        gateway,
        {
            "test": "opcua-server-killed",
            "outages": 2,
            "baseline": baseline,
            "final_count": final_count,
            "units_expected": advance,
            "units_delivered": int(yield_sum(events)),
            "confirmations": len(events),
            "duplicates": stats["duplicates"],
            "lost": advance - int(yield_sum(events)),
            "reconnect_s": reconnect_seconds,
            "gateway_runs": len(gateway.runs),
        },
    )
    where = f"(baseline {baseline}, final {final_count}; logs in {tmp_path})"
    assert_tiles_the_advance(events, advance, where)
    assert rule["good_total"] == advance, where
    assert all(
        e["data"]["order_id"] == "2000456" and e["data"]["lot_id"] == "LOT-OPC-1" for e in events
    )
    assert stats["duplicates"] == 0, f"{stats} {where}"
    logs = gateway.output()
    assert logs.count(unavailable) == 2 and logs.count(back) == 2, where
    assert "treated as a reset" not in logs, where
    assert logs.count(READY_TEXT) == 1, "the daemon was restarted"
    assert gateway.current.stop() == 0


# --- 2. Modbus: the PLC killed, gone for seconds, back further on ------------------------------


def test_modbus_plc_killed_and_back_the_daemon_reconnects_and_counts_exactly(
    peers: list[Peer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    erp = start_erp(peers, tmp_path)
    rate = 100
    spawned_at = time.monotonic()
    plc = start_plc(peers, tmp_path, "--rate", str(rate), "--start", "0")
    signal = "press-01.good"
    gateway = Gateway(
        peers,
        tmp_path,
        f"""
drivers:
  - name: press-01
    type: modbus
    host: 127.0.0.1
    port: {plc.port}
    poll_interval: 100ms
    timeout: 3s
    retries: 1
    tags:
      - {{name: good, address: 0, type: uint32}}
      - {{name: state, address: 10, type: uint16}}
machines:
  - id: press-01
    line: LINE-A
    signals: {{good: {signal}}}
    order: {{order_id: "1000123", operation: "0010", material: FG-4711, lot_id: LOT-1}}
    confirm: {{every_units: 25, every: 1s}}
{erp_destination(erp)}
routes:
  production.confirmation: [erp]
""",
    )
    run = gateway.start()
    assert run.process is not None
    pid = run.process.pid
    unavailable = f"Modbus device press-01 at 127.0.0.1:{plc.port} is unavailable"
    back = f"Modbus device press-01 at 127.0.0.1:{plc.port} is available again"

    wait_for(lambda: len(confirmations(erp)) >= 3, 60, "confirmations before the outage")
    bound = count_upper_bound(0, rate, spawned_at)
    plc.peer.kill()
    wait_for(lambda: unavailable in gateway.output(), 30, "the gateway to see the PLC gone")
    time.sleep(3.0)  # the device is gone for a while; the press counts on meanwhile
    restart_at = bound + 400
    stop_at = restart_at + 600
    start_plc(
        peers,
        tmp_path,
        "--rate",
        str(rate),
        "--start",
        str(restart_at),
        "--stop-at",
        str(stop_at),
        port=plc.port,
    )
    back_from = time.monotonic()
    wait_for(lambda: back in gateway.output(), 60, "the gateway to reconnect by itself")
    reconnect_seconds = round(time.monotonic() - back_from, 2)
    gateway.assert_alive(pid)

    def settled() -> bool:
        status = gateway.status()
        good, state = status["signals"].get(signal), status["signals"].get("press-01.state")
        rule = status["machines"][0]
        return bool(
            good is not None
            and good["value"] == stop_at
            and state is not None
            and state["value"] == 17
            and rule["good_pending"] == 0
            and yield_sum(confirmations(erp)) == rule["good_total"]
        )

    wait_for(settled, 60, f"the PLC to reach {stop_at} and ERP to hold every confirmation")
    gateway.assert_alive(pid)

    found = baselines(gateway, signal)
    assert len(found) == 1, f"one baseline in one run, not {found}"
    baseline = found[0]
    events = confirmations(erp)
    stats = erp.stats()
    rule = gateway.status()["machines"][0]
    advance = stop_at - baseline
    print_summary(
        capsys,
        gateway,
        {
            "test": "modbus-plc-killed",
            "outages": 1,
            "baseline": baseline,
            "restart_count": restart_at,
            "final_count": stop_at,
            "units_expected": advance,
            "units_delivered": int(yield_sum(events)),
            "confirmations": len(events),
            "duplicates": stats["duplicates"],
            "lost": advance - int(yield_sum(events)),
            "reconnect_s": reconnect_seconds,
            "gateway_runs": len(gateway.runs),
        },
    )
    where = f"(baseline {baseline}, final {stop_at}; logs in {tmp_path})"
    assert_tiles_the_advance(events, advance, where)
    assert rule["good_total"] == advance, where
    assert stats["duplicates"] == 0, f"{stats} {where}"
    logs = gateway.output()
    assert logs.count(unavailable) == 1 and logs.count(back) == 1, where
    assert "treated as a reset" not in logs, where
    assert logs.count(READY_TEXT) == 1, "the daemon was restarted"
    assert gateway.current.stop() == 0


# --- MQTT ----------------------------------------------------------------------------------------


def mqtt_gateway(
    peers: list[Peer],
    tmp_path: Path,
    broker: Mosquitto,
    erp: ErpSim,
    *,
    batch_max: int,
    commit_interval: str = "0ms",
) -> Gateway:
    # The consumption mapping of drivers.mqtt.SAMPLE_CONFIG; no machine is bound to the
    # orders here, so validation.require_known_order is off.
    client_id = f"plantsync-{SITE}-mes-{uuid.uuid4().hex[:8]}"
    gateway = Gateway(
        peers,
        tmp_path,
        f"""
outbox: {{commit_interval: {commit_interval}}}
validation: {{require_known_order: false}}
drivers:
  - name: mes
    type: mqtt
    host: 127.0.0.1
    port: {broker.port}
    client_id: {client_id}
    keepalive: 5s
    batch_max: {batch_max}
    topics:
      - filter: mes/{SITE}/+/consumption
        event: material.consumed
        fields:
          machine_id: $topic[2]
          order_id: order_id
          operation: operation
          material: material
          lot_id: lot_id
          quantity.value: quantity
          quantity.uom: uom
          occurred_at: occurred_at
{erp_destination(erp)}
routes:
  material.consumed: [erp]
""",
    )
    gateway.client_id = client_id
    return gateway


def consumed_event_id(message_id: str) -> str:
    """The id the gateway gives the material.consumed event of an MES message."""
    return event_id("material.consumed", SITE, "material.consumed", message_id)


class Publishing:
    """The MES publisher (in this process) publishing consumptions from a thread."""

    def __init__(self, broker: Mosquitto) -> None:
        self.mes = MesPublisher(
            broker.host,
            broker.port,
            site=SITE,
            machine="press-01",
            run=uuid.uuid4().hex[:12],
            client_id=f"mes-{uuid.uuid4().hex[:8]}",
        )
        self.mes.connect()
        self.publications: list[Publication] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def one(self, lot: str) -> Publication:
        # Orders are partition keys, delivered one at a time each: spread over a few of them.
        order = f"47110{len(self.publications) % ORDERS}"
        publication = self.mes.consume(order, "RM-STEEL", lot, "1.250")
        self.publications.append(publication)
        return publication

    def run(
        self,
        *,
        burst: int = 0,
        steady_every: float = 0.005,
        at_least: int = 0,
        at_most: int | None = None,
    ) -> None:
        """In a thread: `burst` as fast as the window allows, then one every `steady_every`
        seconds until `stop` is set (and at least `at_least` in all), or `at_most` in all."""

        def publish() -> None:
            try:
                for _ in range(burst):
                    self.one(f"L-{len(self.publications):06d}")
                while at_most is None or len(self.publications) < at_most:
                    if self.stop.is_set() and len(self.publications) >= at_least:
                        break
                    self.one(f"L-{len(self.publications):06d}")
                    time.sleep(steady_every)
            except BaseException as exc:  # reported by join()
                self.error = exc

        self._thread = threading.Thread(target=publish, name="mes-publisher", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float = 120.0) -> None:
        """Wait for the thread and for every PUBACK; raise if any publication failed."""
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "the publisher did not finish"
        assert self.error is None, f"publishing failed: {self.error!r}"
        self.mes.flush(timeout)
        refused = [p for p in self.publications if not p.acknowledged]
        assert not refused and self.mes.refused == 0, f"{len(refused)} publication(s) refused"

    def close(self) -> None:
        self.stop.set()
        self.mes.close(5.0)

    def expected_ids(self) -> set[str]:
        ids = {consumed_event_id(p.message_id or "") for p in self.publications}
        assert len(ids) == len(self.publications)
        return ids


def delivered_consumptions(erp: ErpSim) -> list[dict[str, Any]]:
    return erp_rows(erp, "material.consumed")


def wait_subscribed(gateway: Gateway, publishing: Publishing, erp: ErpSim) -> None:
    """The gateway's session subscribed: a probe published now reaches ERP."""
    wait_for(
        lambda: "MQTT broker mes at" in gateway.output() and "connected as" in gateway.output(),
        30,
        "the gateway to connect to the broker",
    )
    time.sleep(0.5)  # the SUBACK follows the CONNACK
    probe = publishing.one("PROBE")
    probe.wait(30)
    wait_for(
        lambda: erp.stats()["unique"] >= 1,
        30,
        "the probe to reach ERP (is the gateway subscribed?)",
    )


def assert_exactly_once(
    erp: ErpSim, expected: set[str], where: str
) -> tuple[list[dict[str, Any]], set[str], set[str]]:
    rows = delivered_consumptions(erp)
    received = [row["id"] for row in rows]
    lost = expected - set(received)
    invented = set(received) - expected
    assert len(received) == len(set(received)), f"ERP holds an event id twice {where}"
    assert all(row["key"] == row["id"] for row in rows), f"Idempotency-Key is not the id {where}"
    return rows, lost, invented


# --- 3. MQTT: the broker restarted mid-stream -------------------------------------------------


def test_mqtt_broker_restart_mid_stream_loses_no_mes_message(
    peers: list[Peer], tmp_path: Path, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    erp = start_erp(peers, tmp_path)
    gateway = mqtt_gateway(peers, tmp_path, mosquitto, erp, batch_max=100)
    run = gateway.start()
    assert run.process is not None
    pid = run.process.pid
    endpoint = f"127.0.0.1:{mosquitto.port}"
    unavailable = f"MQTT broker mes at {endpoint} is unavailable"
    back = f"MQTT broker mes at {endpoint} is available again"

    publishing = Publishing(mosquitto)
    try:
        wait_subscribed(gateway, publishing, erp)
        total = 1500
        publishing.run(steady_every=0.005, at_most=total + 1)  # + the probe
        wait_for(
            lambda: len(publishing.publications) >= 400 and erp.stats()["unique"] >= 50,
            60,
            "publications and deliveries before the broker restart",
        )
        assert publishing.running, "the publisher finished before the restart: publish longer"
        mosquitto.stop()
        wait_for(lambda: unavailable in gateway.output(), 30, "the gateway to see the broker gone")
        time.sleep(1.0)
        mosquitto.start()
        back_from = time.monotonic()
        wait_for(lambda: back in gateway.output(), 60, "the gateway to reconnect by itself")
        reconnect_seconds = round(time.monotonic() - back_from, 2)
        publishing.join()
    finally:
        publishing.close()
    expected = publishing.expected_ids()
    assert len(expected) == total + 1
    wait_for(
        lambda: erp.stats()["unique"] >= len(expected),
        90,
        f"ERP to hold all {len(expected)} consumptions",
    )
    gateway.assert_alive(pid)
    time.sleep(1.0)  # anything extra would arrive now
    where = f"(logs in {tmp_path})"
    rows, lost, invented = assert_exactly_once(erp, expected, where)
    stats = erp.stats()
    logs = gateway.output()
    print_summary(
        capsys,
        gateway,
        {
            "test": "mqtt-broker-restart",
            "events_expected": len(expected),
            "delivered_unique": len(rows),
            "duplicates": stats["duplicates"],
            "lost": len(lost),
            "invented": len(invented),
            "reconnect_s": reconnect_seconds,
            "outbox_ignored_redeliveries": _ignored(logs),
        },
    )
    assert not lost, f"{len(lost)} MES message(s) never reached ERP {where}"
    assert not invented, f"ERP holds {len(invented)} event(s) nobody published {where}"
    assert {row["event"]["data"]["lot_id"] for row in rows} == {
        "PROBE",
        *(f"L-{n:06d}" for n in range(1, total + 1)),
    }
    assert stats["unique"] == len(expected) and stats["duplicates"] == 0, f"{stats} {where}"
    assert logs.count(unavailable) == 1, f"broker down logged {logs.count(unavailable)} times"
    assert logs.count(back) == 1, f"broker back logged {logs.count(back)} times"
    assert "session resumed" in logs.split(back, 1)[1].splitlines()[0]
    assert "did not keep the session" not in logs
    assert "Rejected a message" not in logs
    assert logs.count(READY_TEXT) == 1, "the daemon was restarted"
    assert gateway.current.stop() == 0
    ((owed,),) = query(gateway.database, "SELECT COUNT(*) FROM deliveries")
    ((rejected,),) = query(gateway.database, "SELECT COUNT(*) FROM rejected_inputs")
    assert owed == 0 and rejected == 0


# --- 4. MQTT: the gateway killed between receiving and committing -----------------------------


def test_mqtt_gateway_killed_during_intake_loses_no_mes_message(
    peers: list[Peer], tmp_path: Path, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = int(os.environ.get("PLANTSYNC_FAULT_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    where = f"[seed {seed}; replay with PLANTSYNC_FAULT_SEED={seed}; logs in {tmp_path}]"
    kills = 4
    # The broker logs every PUBLISH it sends, with its DUP flag: what it sends again to a new
    # gateway process was sent to the killed one and never acknowledged.
    mosquitto.stop()
    mosquitto.listener_options = ["log_type all"]
    mosquitto.start()
    erp = start_erp(peers, tmp_path)
    # Small batches, each commit lingering 50 ms: many slow commits, so that a kill almost
    # always finds a batch taken in but not committed, and more received behind it (the driver
    # announces a Receive Maximum of twice batch_max; mosquitto 2.0 sends far more than that
    # once acknowledgements flow).
    gateway = mqtt_gateway(peers, tmp_path, mosquitto, erp, batch_max=50, commit_interval="50ms")
    gateway.start()

    publishing = Publishing(mosquitto)
    intake_at_kill: list[int] = []
    try:
        wait_subscribed(gateway, publishing, erp)
        # A burst (the broker queues what the gateway has not taken), then a steady stream
        # until the last kill, so that every process killed was taking messages in.
        publishing.run(burst=1500, steady_every=0.05, at_least=2000)
        for _ in range(kills):
            # Kill only a process that is taking messages in: once it has committed some.
            before = committed_count(gateway)
            wait_for(
                partial(lambda n: committed_count(gateway) > n, before),
                60,
                f"the gateway process {len(gateway.runs) - 1} to commit messages {where}",
            )
            time.sleep(rng.uniform(0.0, 0.5))
            intake_at_kill.append(committed_count(gateway))
            gateway.kill()
            gateway.start()
        publishing.stop.set()
        publishing.join()
    finally:
        publishing.close()
    expected = publishing.expected_ids()
    assert len(expected) >= 2000
    wait_for(
        lambda: erp.stats()["unique"] >= len(expected),
        120,
        f"ERP to hold all {len(expected)} consumptions {where}",
        interval=0.5,
    )
    time.sleep(1.0)  # anything extra would arrive now
    assert gateway.current.stop() == 0, f"the graceful stop failed {where}"

    rows, lost, invented = assert_exactly_once(erp, expected, where)
    stats = erp.stats()
    committed_ids = {row[0] for row in query(gateway.database, "SELECT id FROM event_ids")}
    ((owed,),) = query(gateway.database, "SELECT COUNT(*) FROM deliveries")
    ((rejected,),) = query(gateway.database, "SELECT COUNT(*) FROM rejected_inputs")
    logs = gateway.output()
    unacknowledged = redelivered_after_each_kill(mosquitto, gateway.client_id)
    committed_not_acknowledged = _ignored(logs)
    print_summary(
        capsys,
        gateway,
        {
            "test": "mqtt-gateway-kill-9",
            "seed": seed,
            "kills": gateway.kills,
            "events_expected": len(expected),
            "delivered_unique": len(rows),
            "duplicates": stats["duplicates"],
            "lost": len(lost),
            "invented": len(invented),
            "committed_at_each_kill": intake_at_kill,
            "unacknowledged_at_each_kill": unacknowledged,
            "committed_not_acknowledged": committed_not_acknowledged,
            "uncommitted_at_kills": sum(unacknowledged) - committed_not_acknowledged,
        },
    )
    assert not lost, (
        f"{len(lost)} MES message(s) never reached ERP, e.g. {sorted(lost)[:3]} {where}"
    )
    assert not invented, f"ERP holds {len(invented)} event(s) nobody published {where}"
    assert committed_ids == expected, (
        f"the outbox committed {len(committed_ids - expected)} unknown and missed "
        f"{len(expected - committed_ids)} {where}"
    )
    assert stats["unique"] == len(expected), f"{stats} {where}"
    assert owed == 0, f"{owed} delivery row(s) left in the outbox {where}"
    assert rejected == 0, f"{rejected} input dead letter(s) {where}"
    assert gateway.kills == kills
    # Every kill happened with messages still to take in (the stream had not ended).
    assert all(count < len(expected) for count in intake_at_kill), (intake_at_kill, where)
    assert "did not keep the session" not in logs, where
    # The kills did catch messages on their way in: sent to the gateway, not acknowledged, and
    # not in the outbox either (they came again and were committed then, not ignored).
    assert len(unacknowledged) >= kills, (unacknowledged, where)
    assert sum(unacknowledged) > committed_not_acknowledged, (
        f"no kill caught a message between its receipt and its commit {where}"
    )


def redelivered_after_each_kill(broker: Mosquitto, client_id: str) -> list[int]:
    """Per restart of the gateway, the messages the broker sent it again (DUP set): those it
    had sent to the process killed before, which had not acknowledged them."""
    log = broker.log_path.read_text(errors="replace")
    connections = re.split(rf"New client connected from \S+ as {re.escape(client_id)} ", log)
    return [part.count(f"Sending PUBLISH to {client_id} (d1,") for part in connections[2:]]


def committed_count(gateway: Gateway) -> int:
    """Events the outbox holds (committed, ever), read beside the running gateway."""
    return int(query(gateway.database, "SELECT COUNT(*) FROM event_ids")[0][0])


def _ignored(logs: str) -> int:
    """Events the outbox ignored because it already held them: redelivered messages that had
    been committed but not yet acknowledged when the connection (or the process) ended."""
    return sum(
        int(n) for n in re.findall(r"Ignored (\d+) event\(s\) the outbox already held", logs)
    )
