"""The MES order publisher against a real mosquitto: delivered only on the broker's PUBACK,
retained, cleared when finished, a retry while the broker is away, and the MES's
acknowledgement topic. The oracle is a separate MQTT client's view of the broker."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from buffer.outbox import Delivery
from edge.config.orders import OrdersMesConfig
from edge.forward.outcome import Outcome
from edge.orders.publisher import MesOrderPublisher
from tests.conftest import Mosquitto


def delivery(order_id: str, version: int, event_type: str = "order.released") -> Delivery:
    payload = json.dumps(
        {
            "id": f"id-{order_id}-{version}",
            "type": event_type,
            "data": {"order_id": order_id, "version": version},
        }
    ).encode()
    return Delivery(
        1, "mes-orders", f"id-{order_id}-{version}", event_type, f"order/{order_id}", payload, 0
    )


def retained(port: int) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    ready = threading.Event()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_connect(client: mqtt.Client, *_: Any) -> None:
        client.subscribe("mes/1010/orders/+", qos=1)
        ready.set()

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.retain:
            found[message.topic] = bytes(message.payload)

    client.on_connect, client.on_message = on_connect, on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    ready.wait(10)
    time.sleep(0.8)
    client.disconnect()
    client.loop_stop()
    return found


async def until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.mark.integration
async def test_delivered_on_puback_retained_and_cleared(mosquitto: Mosquitto) -> None:
    config = OrdersMesConfig(
        host="127.0.0.1",
        port=mosquitto.port,
        timeout="3s",
        accepted_on="ack_topic",
        ack_topic="mes/1010/orders/+/ack",
    )
    acked: list[str] = []
    async with MesOrderPublisher.connected_to(config, "1010", acked.append) as publisher:
        await until(lambda: publisher.connected)
        [result] = await publisher.send([delivery("1000123", 1)])
        assert (result.outcome, result.reference) == (
            Outcome.DELIVERED,
            "mes/1010/orders/1000123 v1",
        )
        found = await asyncio.to_thread(retained, mosquitto.port)
        assert json.loads(found["mes/1010/orders/1000123"])["data"]["version"] == 1
        [result] = await publisher.send([delivery("1000123", 2, "order.cancelled")])
        assert result.outcome is Outcome.DELIVERED
        assert "mes/1010/orders/1000123" not in await asyncio.to_thread(retained, mosquitto.port)
        [bad] = await publisher.send(
            [Delivery(2, "mes-orders", "x", "order.released", "order/x", b"{}", 0)]
        )
        assert bad.outcome is Outcome.REJECTED
        # The MES acknowledges on its ack topic.
        sender = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        sender.connect("127.0.0.1", mosquitto.port)
        sender.loop_start()
        sender.publish(
            "mes/1010/orders/1000123/ack", json.dumps({"order_id": "1000123", "version": 1}), qos=1
        ).wait_for_publish()
        sender.disconnect()
        sender.loop_stop()
        await until(lambda: acked == ["1000123"])


@pytest.mark.integration
async def test_no_broker_is_a_retry_and_it_delivers_once_back(mosquitto: Mosquitto) -> None:
    config = OrdersMesConfig(host="127.0.0.1", port=mosquitto.port, timeout="2s")
    async with MesOrderPublisher.connected_to(config, "1010") as publisher:
        await until(lambda: publisher.connected)
        mosquitto.stop()
        await until(lambda: not publisher.connected)
        [result] = await publisher.send([delivery("1000124", 1)])
        assert result.outcome is Outcome.RETRY and "not connected" in result.reason
        mosquitto.start()
        await until(lambda: publisher.connected, 20)
        [result] = await publisher.send([delivery("1000124", 1)])
        assert result.outcome is Outcome.DELIVERED
    assert "mes/1010/orders/1000124" in await asyncio.to_thread(retained, mosquitto.port)
