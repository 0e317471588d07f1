"""Orders from ERP to the MES with real processes: the ERP simulator, mosquitto, the gateway
(`plantsync run`) and the MES simulator's order follower.

The oracles are the MES's own record (every order message it received: order, version, event
id, whether retained) and the ERP simulator's release requests; a fresh MQTT subscriber shows
what a reconnecting MES finds retained. "Published twice" means a second event id for the same
order version, or a second live (not retained) delivery of one event to an MES that stayed
connected."""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from simulators.mes_orders import OrderFollower, Received
from simulators.mes_publisher import MesPublisher
from tests.conftest import ErpSim, Mosquitto, Peer, free_port, start_erp
from tests.gateway_process import GatewayProcess
from tests.test_order_release import order, release, set_status

pytestmark = pytest.mark.integration  # the daemon, the ERP simulator and a broker


def write_config(tmp_path: Path, erp: ErpSim, broker: Mosquitto, api_port: int) -> Path:
    client = f"plantsync-test-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "plant.yaml"
    path.write_text(f"""
site: "1010"
data_dir: {tmp_path}/data
api: {{listen: "127.0.0.1:{api_port}"}}
shutdown_timeout: 3s
validation: {{require_released_order: true}}
drivers:
  - {{name: press-01, type: modbus, host: 127.0.0.1, port: {free_port()}, poll_interval: 1s,
      tags: [{{name: good, address: 0, type: uint32}}]}}
  - name: mes
    type: mqtt
    host: 127.0.0.1
    port: {broker.port}
    client_id: {client}
    topics:
      - filter: mes/1010/+/order/start
        event: order.started
        fields: {{machine_id: "$topic[2]", order_id: order_id, operation: operation,
                 material: material, lot_id: lot_id, occurred_at: occurred_at}}
machines:
  - {{id: press-01, signals: {{good: press-01.good}}}}
destinations:
  erp: {{base_url: "{erp.url}", profile: sap_s4hana, timeout: 2s,
         retry: {{base: 100ms, cap: 1s}}}}
orders:
  source: erp
  poll_interval: 300ms
  accept_within: 1m
  mes:
    host: 127.0.0.1
    port: {broker.port}
    client_id: {client}-orders
    timeout: 5s
    retry: {{base: 100ms, cap: 1s}}
    circuit_breaker: {{failures: 3, open_for: 1s}}
""")
    return path


class Plant:
    """The peers of one test and the MES's record."""

    def __init__(self, peers: list[Peer], tmp_path: Path, broker: Mosquitto) -> None:
        self.peers, self.tmp_path, self.broker = peers, tmp_path, broker
        self.erp = start_erp(peers, tmp_path)
        self.api_port = free_port()
        self.config = write_config(tmp_path, self.erp, broker, self.api_port)
        self.gateway = GatewayProcess(
            peers, self.config, tmp_path, log_format=None, ready_timeout=40
        )
        self.mes = MesPublisher("127.0.0.1", broker.port, run=uuid.uuid4().hex[:6])
        self.mes.connect()
        self.follower = OrderFollower(
            self.mes, port=broker.port, client_id=f"mes-{uuid.uuid4().hex[:6]}"
        )
        self.follower.connect()

    def start_gateway(self) -> Peer:
        return self.gateway.start()

    def close(self) -> None:
        self.follower.close()
        self.mes.close(2.0)

    def received(self, order_id: str) -> list[Received]:
        return [r for r in list(self.follower.received) if r.order_id == order_id]

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{self.api_port}/metrics", timeout=10).text
        figures = {}
        for line in text.splitlines():
            if line.startswith("plantsync_order") and " " in line:
                name, value = line.rsplit(" ", 1)
                figures[name] = float(value)
        return figures

    def held(self) -> list[tuple[str, str]]:
        """(order id, event id) of the order events the outbox ever committed."""
        with sqlite3.connect(f"file:{self.tmp_path}/data/outbox.db?mode=ro", uri=True) as db:
            rows = db.execute("SELECT id FROM event_ids").fetchall()
            state = dict(db.execute("SELECT key, value FROM rule_state").fetchall())
        book = json.loads(state.get("orders:book", "{}"))
        return (
            [
                (order_id, str(entry.get("version")))
                for order_id, entry in book.items()
                if entry.get("published")
            ]
            if rows
            else []
        )


@pytest.fixture
def plant(peers: list[Peer], tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Plant]:
    site = Plant(peers, tmp_path, mosquitto)
    yield site
    site.close()


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.1)


def one_id_per_version(received: list[Received]) -> dict[tuple[str, int], set[str]]:
    ids: dict[tuple[str, int], set[str]] = defaultdict(set)
    for receipt in received:
        ids[(receipt.order_id, receipt.version)].add(receipt.event_id)
    return ids


def retained_now(port: int, wait: float = 1.5) -> dict[str, dict[str, Any]]:
    """What an MES that connects now finds retained on the order topics."""
    found: dict[str, dict[str, Any]] = {}
    done = threading.Event()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.retain and message.payload:
            found[message.topic.rsplit("/", 1)[-1]] = json.loads(message.payload)

    def on_connect(client: mqtt.Client, *_: Any) -> None:
        client.subscribe("mes/1010/orders/+", qos=1)
        done.set()

    client.on_message = on_message
    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    client.loop_start()
    done.wait(10)
    time.sleep(wait)
    client.disconnect()
    client.loop_stop()
    return found


def test_released_orders_reach_the_mes_once_are_accepted_and_cleared_when_finished(
    plant: Plant,
) -> None:
    gateway = plant.start_gateway()
    for order_id in ("1000001", "1000002"):
        assert release(plant.erp, order(order_id)).status_code == 201
    wait_for(
        lambda: {"1000001", "1000002"} <= set(plant.follower.started),
        30,
        "the MES to start both orders",
        gateway.log_path,
    )
    wait_for(
        lambda: plant.metrics().get("plantsync_orders_accepted") == 2,
        20,
        "both starts to count as accepted",
        gateway.log_path,
    )
    figures = plant.metrics()
    assert figures["plantsync_orders_released"] == 2
    assert figures["plantsync_order_release_acceptance_seconds_count"] == 2
    assert figures["plantsync_order_sync_success_ratio"] == 1.0
    assert figures["plantsync_orders_not_accepted"] == 0
    for order_id in ("1000001", "1000002"):
        received = plant.received(order_id)
        assert [(r.version, r.type, r.retained) for r in received] == [(1, "order.released", False)]
    # What a reconnecting MES finds: both orders, retained, with their version.
    assert {k: v["data"]["version"] for k, v in retained_now(plant.broker.port).items()} == {
        "1000001": 1,
        "1000002": 1,
    }
    # Technically completed in ERP: the MES is told, and the retained message is cleared.
    set_status(plant.erp, "1000001", "technically_completed")
    wait_for(
        lambda: "1000001" in plant.follower.cleared,
        20,
        "the retained order cleared",
        gateway.log_path,
    )
    assert [(r.version, r.type) for r in plant.received("1000001")] == [
        (1, "order.released"),
        (2, "order.cancelled"),
    ]
    assert set(retained_now(plant.broker.port)) == {"1000002"}
    # MES starts of an order ERP never released, and of one it ended: input dead letters.
    plant.mes.order_start("4711000").wait()
    plant.mes.order_start("1000001").wait()
    wait_for(
        lambda: plant.metrics().get("plantsync_order_starts_refused_total") == 2,
        20,
        "both starts refused",
        gateway.log_path,
    )
    status = httpx.get(f"http://127.0.0.1:{plant.api_port}/status", timeout=10).json()
    kinds = [(i["kind"], i["role"], i["order_id"]) for i in status["orders"]["issues"]]
    assert kinds == [
        ("order.not_released", "supervisor", "4711000"),
        ("order.not_released", "supervisor", "1000001"),
    ]
    rejected = subprocess_rejected(plant)
    assert any("never released" in reason for reason in rejected)
    assert any("technically completed" in reason for reason in rejected)
    # ... and exceptions for the supervisor, raised once each.
    assert sorted((e["kind"], e["subject"], e["roles"][0]) for e in exceptions(plant, "open")) == [
        ("unknown_order", "order/1000001", "supervisor"),
        ("unknown_order", "order/4711000", "supervisor"),
    ]
    # An order the plant cannot run (no BOM version): blocked, an exception, nothing to the
    # MES; fixed in ERP, the exception is cleared and the order released.
    release(plant.erp, order("1000003", production_version=""))
    wait_for(
        lambda: any(e["kind"] == "blocked_order" for e in exceptions(plant, "open")),
        20,
        "the blocked order's exception",
        gateway.log_path,
    )
    assert plant.received("1000003") == []
    httpx.post(
        f"{plant.erp.url}/_sim/orders/1000003/change",
        json={"production_version": "0002"},
        timeout=10,
    ).raise_for_status()
    wait_for(
        lambda: "1000003" in plant.follower.started,
        20,
        "the fixed order at the MES",
        gateway.log_path,
    )
    wait_for(
        lambda: (
            [e["subject"] for e in exceptions(plant, "closed") if e["kind"] == "blocked_order"]
            == ["order/1000003"]
        ),
        20,
        "the blocked order's exception cleared",
        gateway.log_path,
    )


def exceptions(plant: Plant, state: str) -> list[dict[str, Any]]:
    answer = httpx.get(
        f"http://127.0.0.1:{plant.api_port}/exceptions", params={"state": state}, timeout=10
    )
    answer.raise_for_status()
    found: list[dict[str, Any]] = answer.json()["exceptions"]
    return found


def subprocess_rejected(plant: Plant) -> list[str]:
    with sqlite3.connect(f"file:{plant.tmp_path}/data/outbox.db?mode=ro", uri=True) as db:
        return [reason for (reason,) in db.execute("SELECT reason FROM rejected_inputs")]


def test_erp_down_during_polling_releases_each_order_once_after_recovery(plant: Plant) -> None:
    gateway = plant.start_gateway()
    release(plant.erp, order("1000010"))
    wait_for(lambda: "1000010" in plant.follower.started, 30, "the first order", gateway.log_path)
    plant.erp.set_faults(outage_seconds=4)
    release(plant.erp, order("1000011"))  # released while ERP's API answers 503
    httpx.post(
        f"{plant.erp.url}/_sim/orders/1000010/change", json={"quantity": "120"}, timeout=10
    ).raise_for_status()
    time.sleep(2)
    assert plant.received("1000011") == []
    wait_for(
        lambda: "ERP is not answering for released orders" in gateway.output(),
        10,
        "the outage to be logged",
    )
    wait_for(
        lambda: "1000011" in plant.follower.started,
        30,
        "the order after the outage",
        gateway.log_path,
    )
    wait_for(lambda: len(plant.received("1000010")) >= 2, 10, "the change")
    time.sleep(1.5)  # a few more polls: nothing may come twice
    assert gateway.output().count("ERP answers for released orders again") == 1
    assert [(r.version, r.retained) for r in plant.received("1000011")] == [(1, False)]
    assert [(r.version, r.type) for r in plant.received("1000010")] == [
        (1, "order.released"),
        (2, "order.changed"),
    ]


def test_broker_down_while_publishing_the_retained_order_reaches_the_mes_after(
    plant: Plant,
) -> None:
    gateway = plant.start_gateway()
    plant.follower.close()
    plant.broker.stop()
    release(plant.erp, order("1000020"))
    wait_for(lambda: ("1000020", "1") in plant.held(), 20, "the order committed", gateway.log_path)
    time.sleep(1.5)  # publishing fails meanwhile, with backoff
    plant.broker.start()
    wait_for(
        lambda: "1000020" in retained_now(plant.broker.port, 0.5),
        30,
        "the order retained at the broker",
        gateway.log_path,
    )
    # An MES that connects only now finds it, and starts it.
    late = OrderFollower(plant.mes, port=plant.broker.port, client_id="mes-late")
    plant.follower = late
    late.connect()
    wait_for(lambda: "1000020" in late.started, 20, "the MES to start the order")
    assert [(r.version, r.retained) for r in late.received] == [(1, True)]
    # The order publisher's outage is said once when it begins and once when it ends.
    peer = f"MQTT broker 127.0.0.1:{plant.broker.port} for released orders"
    output = gateway.output()
    assert output.count(f"{peer} is unavailable") == 1, output
    assert output.count(f"{peer} is available again") == 1, output


def test_kill_9_between_reading_erp_and_publishing_publishes_each_release_once(
    plant: Plant,
) -> None:
    """Deterministic first: the broker is down, so the gateway reads and commits but cannot
    publish; kill -9; the broker and the gateway come back: each order arrives once. Then
    random kills while ERP releases and changes orders."""
    gateway = plant.start_gateway()
    plant.broker.stop()
    for number in range(3):
        release(plant.erp, order(f"100003{number}"))
    wait_for(lambda: len(plant.held()) == 3, 20, "three orders committed", gateway.log_path)
    gateway.kill()
    plant.broker.start()
    gateway = plant.start_gateway()
    rng = random.Random(15)
    # What the MES must end with: each order's latest quantity. How many versions it took
    # depends on the polls (a change within one poll interval of its release, or while the
    # gateway restarts, is one version), so versions are checked for gaps, not counted.
    expected: dict[str, str] = {f"100003{n}": "100" for n in range(3)}
    for number in range(12):
        order_id = f"10004{number:02d}"
        release(plant.erp, order(order_id))
        expected[order_id] = "100"
        if number % 3 == 2:
            changed = f"10004{number - 1:02d}"
            httpx.post(
                f"{plant.erp.url}/_sim/orders/{changed}/change",
                json={"quantity": str(200 + number)},
                timeout=10,
            ).raise_for_status()
            expected[changed] = str(200 + number)
        time.sleep(rng.uniform(0.05, 0.4))
        if number in (3, 7, 10):
            gateway.kill()
            gateway = plant.start_gateway()

    def quantities() -> dict[str, str]:
        return {
            o: plant.follower.orders[o]["quantity"]["value"]
            for o in expected
            if o in plant.follower.orders
        }

    try:
        wait_for(lambda: quantities() == expected, 60, "every order's latest version")
    except AssertionError:
        raise AssertionError(f"the MES has {quantities()}, not {expected}") from None
    time.sleep(1.0)
    ids = one_id_per_version(list(plant.follower.received))
    for order_id in expected:
        versions = sorted(v for o, v in ids if o == order_id)
        assert versions == list(range(1, len(versions) + 1)), (order_id, versions)
    twice = {key: found for key, found in ids.items() if len(found) != 1}
    assert twice == {}, f"a version published under two ids: {twice}"
    assert sorted(plant.follower.started) == sorted(expected)
