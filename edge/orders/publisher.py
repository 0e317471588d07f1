"""The MES as a destination: released orders from the outbox to an MQTT broker, run by the
forwarder engine like any HTTP destination (the engine owns leasing, order per order, retries
with backoff, the circuit breaker and dead letters; this module only publishes).

Each order has one topic (`orders.mes.topic`, e.g. `mes/1010/orders/<order_id>`). Its message
is the order's CloudEvent (`order.released`, `order.changed`, `order.cancelled`, whose `data`
carries the release `version`), published at QoS 1 with the retain flag, so an MES that
connects later, or comes back, finds every current order on its topic. Delivered means the
broker's PUBACK (the broker holds the message then); no PUBACK within `timeout`, or no
connection, is a retry. A finished order (`order.cancelled`: technically completed, closed or
deleted in ERP) is published once without the retain flag, for an MES listening now, and its
retained message is then cleared (an empty retained message): a reconnecting MES no longer
finds it. A PUBACK refusing the message (MQTT 5 reason code, e.g. not authorized) is a dead
letter with the broker's reason.

With `accepted_on: ack_topic` the same connection subscribes to `ack_topic`, whose messages
(`{"order_id": ..., "version": ...}`) tell the order book the MES accepted the order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from buffer.outbox import Delivery
from drivers.common.availability import Availability
from drivers.mqtt.pubacks import Pubacks
from edge.config.orders import OrdersMesConfig
from edge.forward.outcome import Outcome, Result

log = logging.getLogger(__name__)


class MesOrderPublisher:
    """Call order: `async with MesOrderPublisher.connected(...) as publisher`, then `send` from
    the forwarder engine; `topic_of` is pure."""

    batch_size = 1
    per_key = 1

    def __init__(
        self, config: OrdersMesConfig, site: str, on_ack: Callable[[str], None] | None = None
    ) -> None:
        self.config = config
        self.site = site
        self._on_ack = on_ack
        self._loop: asyncio.AbstractEventLoop | None = None
        self.pubacks = Pubacks()
        self.connected = False
        self._stopping = False
        # Said once when the broker goes (with the reason) and once when it is back; the
        # first connection is logged as before.
        self.availability = Availability(
            f"MQTT broker {config.host}:{config.port} for released orders", log
        )
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=config.client_id or f"plantsync-{site}-orders",
            protocol=mqtt.MQTTv5,
        )
        # paho reconnects by itself; what was in flight is retried by the engine, keyed by
        # the order's version, never lost.
        self.client.reconnect_delay_set(1, 10)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self.pubacks.on_publish
        self.client.on_message = self._on_message

    def topic_of(self, order_id: str) -> str:
        return self.config.topic.replace("{site}", self.site).replace("{order_id}", order_id)

    @classmethod
    @contextlib.asynccontextmanager
    async def connected_to(
        cls, config: OrdersMesConfig, site: str, on_ack: Callable[[str], None] | None = None
    ) -> AsyncIterator[MesOrderPublisher]:
        publisher = cls(config, site, on_ack)
        await publisher.open()
        try:
            yield publisher
        finally:
            await publisher.close()

    async def open(self) -> None:
        """Start connecting (in paho's thread); a broker that is down is tried again by paho."""
        self._loop = asyncio.get_running_loop()
        self.pubacks.bind()
        config = self.config
        if config.username is not None:
            password = config.password.get_secret_value() if config.password else None
            self.client.username_pw_set(config.username, password)
        if config.tls is not None:
            tls = config.tls
            context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
            if tls.cert_file is not None:
                context.load_cert_chain(tls.cert_file, tls.key_file if tls.key_file else None)
            context.check_hostname = not tls.insecure
            self.client.tls_set_context(context)
        self.client.connect_async(config.host, config.port, keepalive=round(config.keepalive))
        self.client.loop_start()

    async def close(self) -> None:
        self._stopping = True
        self.client.disconnect()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.to_thread(self.client.loop_stop), 5.0)
        self.pubacks.cancel_all()

    async def send(self, deliveries: Sequence[Delivery]) -> list[Result]:
        return [await self._send_one(delivery) for delivery in deliveries]

    async def _send_one(self, delivery: Delivery) -> Result:
        try:
            event = json.loads(delivery.payload)
            order_id = str(event["data"]["order_id"])
            version = event["data"]["version"]
        except (ValueError, KeyError, TypeError) as exc:
            return Result(Outcome.REJECTED, None, f"not an order event: {exc}")
        if not self.connected:
            return Result(
                Outcome.RETRY,
                None,
                f"not connected to the MES broker {self.config.host}:{self.config.port}",
            )
        topic = self.topic_of(order_id)
        finished = delivery.event_type == "order.cancelled"
        # A finished order: told once to whoever listens, then its retained message cleared.
        steps = [(delivery.payload, not finished)] + ([(b"", True)] if finished else [])
        for payload, retain in steps:
            outcome = await self._publish(topic, payload, retain)
            if outcome is not None:
                return outcome
        return Result(Outcome.DELIVERED, None, reference=f"{topic} v{version}")

    async def _publish(self, topic: str, payload: bytes, retain: bool) -> Result | None:
        assert self._loop is not None
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return Result(
                Outcome.RETRY, None, f"publish to {topic} failed: {mqtt.error_string(info.rc)}"
            )
        try:
            async with asyncio.timeout(self.config.timeout):
                code = await self.pubacks.wait(info.mid)
        except TimeoutError:
            return Result(
                Outcome.RETRY,
                None,
                f"no PUBACK for {topic} within {self.config.timeout:g}s",
                ambiguous=True,
            )
        if code.is_failure:
            return Result(Outcome.REJECTED, None, f"the broker refused {topic}: {code}")
        return None

    # paho's thread -------------------------------------------------------------------------

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(callback, *args)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._post(self._set_connected, False, f"refused: {reason_code}")
            return
        if self.config.accepted_on == "ack_topic" and self.config.ack_topic:
            client.subscribe(self.config.ack_topic, qos=1)
        self._post(self._set_connected, True, None)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._post(self._set_connected, False, str(reason_code))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            order_id = str(json.loads(message.payload)["order_id"])
        except (ValueError, KeyError, TypeError):
            self._post(
                log.warning,
                "Ignored an MES order acknowledgement on %s that names no order_id",
                message.topic,
            )
            return
        if self._on_ack is not None:
            self._post(self._on_ack, order_id)

    # the asyncio loop ----------------------------------------------------------------------

    def _set_connected(self, connected: bool, reason: str | None) -> None:
        if connected and not self.connected and self.availability.available is None:
            log.info(
                "Connected to the MES broker %s:%d for released orders",
                self.config.host,
                self.config.port,
            )
        if connected:
            self.availability.back()
        elif not self._stopping:  # our own disconnect at a stop is no outage
            self.availability.lost(
                f"{reason or 'disconnected'}; released orders wait in the outbox until it is back"
            )
        self.connected = connected
