"""The MES simulator's order side: it subscribes to the orders the gateway releases, starts
each released order on its machine (`order.started`, through `MesPublisher`), and reports its
totals when it ends the order (`order.ended` with `good`, `scrap`, `uom`).

It behaves as the README asks of an MES: it takes every order message on
`mes/<site>/orders/+` (retained ones too, so orders released while it was away arrive when it
connects), keeps the highest `version` of each order and ignores a message whose version is
not higher (a gateway that crashed between the broker's PUBACK and its own bookkeeping sends a
version again), starts an order once, and forgets an order that is cancelled (its retained
message is then cleared by the gateway). Everything it received is kept in `received` (order,
version, event id, type, retained) for tests. Run it with
``python -m simulators.mes_orders --port 1883 --site 1010 --machine press-01``; it prints
``mes-orders following mes/1010/orders/+`` once subscribed and one line per order it starts.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from dataclasses import dataclass
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from simulators.mes_publisher import MesPublisher, Publication


@dataclass(frozen=True)
class Received:
    order_id: str
    version: int
    event_id: str
    type: str
    retained: bool


class OrderFollower:
    """Follows released orders for one machine; `start_orders` False only records them."""

    def __init__(
        self,
        publisher: MesPublisher,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        site: str = "1010",
        start_orders: bool = True,
        client_id: str = "",
    ) -> None:
        self.publisher = publisher
        self.site = site
        self.start_orders = start_orders
        self.filter = f"mes/{site}/orders/+"
        self.received: list[Received] = []
        self.versions: dict[str, int] = {}
        self.orders: dict[str, dict[str, Any]] = {}
        self.started: list[str] = []
        self.cleared: list[str] = []
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.host, self.port = host, port

    def connect(self, timeout: float = 30.0) -> None:
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self.subscribed.wait(timeout):
            raise ConnectionError(f"MQTT broker {self.host}:{self.port}: not subscribed")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def end(self, order_id: str, good: int | str, scrap: int | str = 0) -> Publication:
        """End the order's first operation with the MES's totals."""
        order = self.orders[order_id]
        operation = order["operations"][0]["operation"]
        return self.publisher.order_end(
            order_id, operation=operation, good=good, scrap=scrap, uom=order["quantity"]["uom"]
        )

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not reason_code.is_failure:
            client.subscribe(self.filter, qos=1)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self.subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        order_id = message.topic.rsplit("/", 1)[-1]
        if not message.payload:
            with self._lock:
                self.cleared.append(order_id)
            return
        try:
            event = json.loads(message.payload)
            data = event["data"]
            version = int(data["version"])
            kind = str(event["type"]).removeprefix("com.plantsync.edge.").rsplit(".v", 1)[0]
        except (ValueError, KeyError, TypeError):
            print(
                f"mes-orders ignored a message on {message.topic} that is no order event",
                flush=True,
            )
            return
        with self._lock:
            self.received.append(
                Received(order_id, version, str(event.get("id")), kind, bool(message.retain))
            )
            if version <= self.versions.get(order_id, 0):
                return  # not newer than what this MES has: a repeat
            self.versions[order_id] = version
            self.orders[order_id] = data
            first_start = (
                kind != "order.cancelled"
                and data.get("status") == "released"
                and order_id not in self.started
            )
            if first_start and self.start_orders:
                self.started.append(order_id)
        if first_start and self.start_orders:
            operation = data["operations"][0]
            self.publisher.order_start(
                order_id,
                operation=operation["operation"],
                material=data["material"],
                quantity=data["quantity"]["value"],
                uom=data["quantity"]["uom"],
                lot_id=data.get("planned_lot"),
                components=sorted({item["material"] for item in data.get("components", [])}),
            )
            print(f"mes-orders started order {order_id} version {version}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.mes_orders",
        description="MES: start the orders the gateway releases.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--site", default="1010")
    parser.add_argument("--machine", default="press-01", help="machine the orders run on")
    parser.add_argument("--run", default="orders", help="run name in the message ids")
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    publisher = MesPublisher(
        args.host, args.port, site=args.site, machine=args.machine, run=args.run
    )
    publisher.connect()
    follower = OrderFollower(publisher, host=args.host, port=args.port, site=args.site)
    follower.connect()
    print(f"mes-orders following {follower.filter}", flush=True)
    stop.wait()
    follower.close()
    publisher.close(5.0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
