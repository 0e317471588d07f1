"""An MES for offline work: publishes order, consumption and lot events as QoS 1 JSON over MQTT.

It is a real peer (a paho client) for the MQTT driver's tests, the demo plant and the scenario
runner. `MesPublisher` runs in-process: `order_start`, `order_end`, `consume`, `lot_completed`
and `publish_raw` each return a `Publication` at once, which a caller waits for with
`.wait()` or `await`; it completes on the broker's PUBACK, so nothing is lost silently. At most
`window` publications wait for their PUBACK at a time; a further publish blocks until one is
acknowledged (in asyncio code, await each publication or `aflush()` so the window never fills).
paho keeps unacknowledged messages in memory and sends them again after a reconnection, so a
broker restart delays publications but does not lose them. `main()` publishes a repeating order
cycle (start, two consumptions, lot completed, end) at a rate, or a burst as fast as the window
allows, prints `mes-publisher connected to HOST:PORT` once connected, and exits 0 when done or
on SIGTERM.

Topics (`<site>` and `<machine>` from the command line) and payloads:

| topic                                | payload fields                                          |
|--------------------------------------|---------------------------------------------------------|
| `mes/<site>/<machine>/order/start`   | order_id, operation, material, quantity, uom            |
| `mes/<site>/<machine>/order/end`     | order_id, operation; good, scrap, uom (MES totals)      |
| `mes/<site>/<machine>/consumption`   | order_id, operation, material, lot_id, quantity, uom    |
| `mes/<site>/<machine>/lot/completed` | order_id, material, lot_id, quantity, uom, input_lots   |

Every payload also has `message_id`, `site`, `machine` and `occurred_at` (RFC 3339, UTC, `Z`).
`message_id` is `uuid5(MESSAGE_ID_NAMESPACE, "<site>/<machine>/<run>/<sequence>")`: the same run
and sequence give the same id, so a replay is a duplicate downstream; `--run` picks a new run.
Quantities are JSON numbers written exactly (`12.500`), or strings with `--quantities string`.
`input_lots` items are `{lot_id, material, quantity: {value, uom}}`, the canonical genealogy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from types import FrameType, TracebackType
from typing import Any, Final, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

MESSAGE_ID_NAMESPACE: Final = uuid.UUID("5d0c2a4e-8f1b-5c3a-9e7d-6b2f4a1c8e90")
"""Namespace of the simulator's message ids. Fixed, so ids are reproducible."""

QuantityStyle = Literal["number", "string"]


@dataclass(frozen=True)
class BrokerTls:
    """TLS towards the broker: the CA to trust (the system's when None), a client certificate,
    and whether to skip the check that the certificate names the host."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False


Quantityish = Decimal | int | str

_NUMBER_MARK = "\x00number:"
_MARKED_NUMBER = re.compile(r'"\\u0000number:(-?\d+(?:\.\d+)?)"')


class PublishError(RuntimeError):
    """A publication the broker refused, or that could not be queued."""


def _rfc3339(moment: datetime | None) -> str:
    moment = (moment or datetime.now(UTC)).astimezone(UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _exact(value: Any) -> str:
    if isinstance(value, Decimal):
        return _NUMBER_MARK + format(value, "f")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode(document: Mapping[str, Any]) -> bytes:
    """Compact JSON in which Decimals are numbers with their exact digits (`12.500`)."""
    text = json.dumps(document, default=_exact, separators=(",", ":"), ensure_ascii=False)
    return _MARKED_NUMBER.sub(r"\1", text).encode()


class Publication:
    """One message on its way to the broker; complete when the broker acknowledged it."""

    def __init__(self, topic: str, payload: bytes, message_id: str | None) -> None:
        self.topic = topic
        self.payload = payload
        self.message_id = message_id
        self._done = threading.Event()
        self._failure: str | None = None
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def acknowledged(self) -> bool:
        """True once the broker sent a PUBACK that is not a failure."""
        return self._done.is_set() and self._failure is None

    def wait(self, timeout: float | None = 30.0) -> None:
        """Block until the PUBACK; raise TimeoutError, or PublishError if it was refused."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"no PUBACK for {self.topic} within {timeout}s")
        if self._failure is not None:
            raise PublishError(self._failure)

    def __await__(self) -> Generator[Any, None, None]:
        return self._wait_async().__await__()

    async def _wait_async(self) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if not self._done.is_set():
                self._waiters.append((loop, future))
                waiting = True
            else:
                waiting = False
        if waiting:
            await future
        self.wait(0)

    def _complete(self, failure: str | None) -> None:
        with self._lock:
            self._failure = failure
            self._done.set()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass(frozen=True, slots=True)
class InputLot:
    """A lot that went into a completed lot."""

    lot_id: str
    material: str
    quantity: Quantityish
    uom: str = "KGM"


class MesPublisher:
    """Publishes MES events for one machine of one site at QoS 1 (MQTT 5)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        site: str = "1010",
        machine: str = "press-01",
        run: str = "1",
        client_id: str = "",
        quantities: QuantityStyle = "number",
        window: int = 1000,
        username: str | None = None,
        password: str | None = None,
        tls: BrokerTls | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.site, self.machine, self.run = site, machine, run
        self.quantities = quantities
        self.sequence = 0
        self.refused = 0
        """Publications the broker answered with a failure reason code."""
        self._window = threading.BoundedSemaphore(window)
        self._lock = threading.Lock()
        self._pending: dict[int, Publication] = {}
        self._early: dict[int, ReasonCode] = {}
        self._connected = threading.Event()
        self._connect_refusal: str | None = None
        self._stopping = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        # paho reconnects by itself here, and sends what was not acknowledged again.
        self.client.reconnect_delay_set(1, 2)
        self.client.max_inflight_messages_set(min(window, 100))
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls is not None:
            self.client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file)
            self.client.tls_insecure_set(tls.insecure)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish

    # lifetime --------------------------------------------------------------------------------

    def connect(self, timeout: float = 30.0) -> None:
        """Connect (retrying until `timeout`) and return once the broker accepted."""
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while not self._connected.wait(0.1):
            refused_for_good = self._connect_refusal is not None and any(
                word in self._connect_refusal.lower()
                for word in ("not authorized", "password", "banned")
            )
            if time.monotonic() > deadline or self._stopping.is_set() or refused_for_good:
                self.client.loop_stop()
                reason = self._connect_refusal or "no connection"
                raise ConnectionError(f"MQTT broker {self.host}:{self.port}: {reason}")

    def close(self, timeout: float = 30.0) -> None:
        """Wait for outstanding PUBACKs (up to `timeout`), then disconnect."""
        with contextlib.suppress(TimeoutError):
            self.flush(timeout)
        self._stopping.set()
        self.client.disconnect()
        self.client.loop_stop()

    def interrupt(self) -> None:
        """Make a publish waiting for room in the window raise PublishError, and a connect
        still waiting for the broker raise ConnectionError (for SIGTERM)."""
        self._stopping.set()

    def __enter__(self) -> MesPublisher:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> MesPublisher:
        await asyncio.to_thread(self.connect)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.close)

    @property
    def outstanding(self) -> int:
        """Publications still waiting for their PUBACK."""
        with self._lock:
            return len(self._pending)

    def flush(self, timeout: float = 30.0) -> None:
        """Block until every publication so far has its PUBACK; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                oldest = next(iter(self._pending.values()), None)
            if oldest is None:
                return
            if not oldest._done.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"{self.outstanding} publication(s) without PUBACK")

    async def aflush(self) -> None:
        """Wait until every publication so far has its PUBACK (bound it with asyncio.timeout)."""
        while True:
            with self._lock:
                oldest = next(iter(self._pending.values()), None)
            if oldest is None:
                return
            with contextlib.suppress(PublishError):
                await oldest

    # events ----------------------------------------------------------------------------------

    def topic(self, suffix: str) -> str:
        """`mes/<site>/<machine>/<suffix>`."""
        return f"mes/{self.site}/{self.machine}/{suffix}"

    def order_start(
        self,
        order_id: str,
        *,
        operation: str = "0010",
        material: str = "FG-100",
        quantity: Quantityish = 100,
        uom: str = "H87",
        lot_id: str | None = None,
        components: Sequence[str] = (),
        occurred_at: datetime | None = None,
    ) -> Publication:
        """The planned lot and the bill of materials (`components`) always travel, null and
        [] when not given, so a field mapping can name them."""
        return self._event(
            "order/start",
            occurred_at,
            order_id=order_id,
            operation=operation,
            material=material,
            quantity=self._quantity(quantity),
            uom=uom,
            lot_id=lot_id,
            components=list(components),
        )

    def order_end(
        self,
        order_id: str,
        *,
        operation: str = "0010",
        occurred_at: datetime | None = None,
        good: Quantityish | None = None,
        scrap: Quantityish | None = None,
        uom: str = "H87",
    ) -> Publication:
        """With `good` (and `scrap`), the MES's own totals of the order travel too (`good`,
        `scrap`, `uom`): what reconciliation compares with ERP and the gateway."""
        totals: dict[str, Any] = {}
        if good is not None:
            totals = {
                "good": self._quantity(good),
                "scrap": self._quantity(scrap if scrap is not None else 0),
                "uom": uom,
            }
        return self._event(
            "order/end", occurred_at, order_id=order_id, operation=operation, **totals
        )

    def consume(
        self,
        order_id: str,
        material: str,
        lot_id: str,
        quantity: Quantityish,
        *,
        uom: str = "KGM",
        operation: str = "0010",
        occurred_at: datetime | None = None,
    ) -> Publication:
        return self._event(
            "consumption",
            occurred_at,
            order_id=order_id,
            operation=operation,
            material=material,
            lot_id=lot_id,
            quantity=self._quantity(quantity),
            uom=uom,
        )

    def lot_completed(
        self,
        order_id: str,
        material: str,
        lot_id: str,
        quantity: Quantityish,
        *,
        uom: str = "H87",
        input_lots: Sequence[InputLot] = (),
        occurred_at: datetime | None = None,
    ) -> Publication:
        inputs = [
            {
                "lot_id": lot.lot_id,
                "material": lot.material,
                "quantity": {"value": self._quantity(lot.quantity), "uom": lot.uom},
            }
            for lot in input_lots
        ]
        return self._event(
            "lot/completed",
            occurred_at,
            order_id=order_id,
            material=material,
            lot_id=lot_id,
            quantity=self._quantity(quantity),
            uom=uom,
            input_lots=inputs,
        )

    def publish_raw(self, topic: str, payload: bytes) -> Publication:
        """Publish bytes as they are (malformed payloads for tests), QoS 1."""
        return self._publish(Publication(topic, payload, None))

    def next_message_id(self) -> str:
        self.sequence += 1
        name = f"{self.site}/{self.machine}/{self.run}/{self.sequence}"
        return str(uuid.uuid5(MESSAGE_ID_NAMESPACE, name))

    def _quantity(self, quantity: Quantityish) -> Decimal | str:
        exact = Decimal(str(quantity))
        if not exact.is_finite():
            raise ValueError(f"quantity {quantity!r} is not a number")
        return format(exact, "f") if self.quantities == "string" else exact

    def _event(self, suffix: str, occurred_at: datetime | None, **fields: Any) -> Publication:
        message_id = self.next_message_id()
        document = {
            "message_id": message_id,
            "site": self.site,
            "machine": self.machine,
            **fields,
            "occurred_at": _rfc3339(occurred_at),
        }
        return self._publish(Publication(self.topic(suffix), encode(document), message_id))

    def _publish(self, publication: Publication) -> Publication:
        while not self._window.acquire(timeout=0.1):
            if self._stopping.is_set():
                raise PublishError("the publisher is stopping")
        info = self.client.publish(publication.topic, publication.payload, qos=1)
        # NO_CONN is fine: paho keeps the message and sends it once connected again.
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self._window.release()
            raise PublishError(f"{publication.topic}: {mqtt.error_string(info.rc)}")
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._pending[info.mid] = publication
        if early is not None:
            self._acknowledged(publication, early)
        return publication

    def _acknowledged(self, publication: Publication, reason_code: ReasonCode) -> None:
        self._window.release()
        failure = None
        if reason_code.is_failure:
            failure = f"{publication.topic}: the broker refused it ({reason_code})"
            self.refused += 1
        publication._complete(failure)

    # paho's thread ---------------------------------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._connect_refusal = f"refused ({reason_code})"
        else:
            self._connected.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        # Called with paho's message lock held: never call into the client from here. The
        # PUBACK may beat `_publish` to registering the mid; `_early` keeps it until then.
        with self._lock:
            publication = self._pending.pop(mid, None)
            if publication is None:
                self._early[mid] = reason_code
                return
        self._acknowledged(publication, reason_code)


# --- the command line ------------------------------------------------------------------------


def order_cycle(publisher: MesPublisher) -> Iterator[Publication]:
    """Endless orders: start, two consumptions, lot completed (with genealogy), end."""
    order = 0
    while True:
        order += 1
        order_id = f"{publisher.run[-6:]}{order:06d}"
        lots = [
            InputLot(f"RM-A-{order:06d}", "RM-STEEL", Decimal("12.500"), "KGM"),
            InputLot(f"RM-B-{order:06d}", "RM-PAINT", Decimal("0.750"), "KGM"),
        ]
        yield publisher.order_start(order_id, quantity=100)
        for lot in lots:
            yield publisher.consume(order_id, lot.material, lot.lot_id, lot.quantity)
        yield publisher.lot_completed(order_id, "FG-100", f"FG-{order_id}", 100, input_lots=lots)
        yield publisher.order_end(order_id)


def main(argv: Sequence[str] | None = None) -> int:
    """Publish MES events from the command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="plantsync sim mes",
        description="MES publisher: QoS 1 JSON events for one machine (see the module doc).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="MQTT broker address")
    parser.add_argument("--port", type=int, default=1883, help="MQTT broker port")
    parser.add_argument("--site", default="1010", help="plant (site) code in the topics")
    parser.add_argument("--machine", default="press-01", help="machine id in the topics")
    parser.add_argument("--rate", type=float, default=1.0, help="events per second")
    parser.add_argument("--count", type=int, default=None, help="events to publish, then exit")
    parser.add_argument(
        "--burst", type=int, default=None, help="publish N events as fast as possible, then exit"
    )
    parser.add_argument(
        "--run",
        default=datetime.now(UTC).strftime("%Y%m%d%H%M%S"),
        help="run name in the message ids (default: the start time); the same run replays "
        "the same ids",
    )
    parser.add_argument("--quantities", choices=("number", "string"), default="number")
    parser.add_argument("--username", help="user name, for a broker that wants one")
    parser.add_argument(
        "--password",
        default=os.environ.get("MES_MQTT_PASSWORD"),
        help="password (default: $MES_MQTT_PASSWORD; the environment keeps it "
        "out of the process list)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS (port 8883 is "
        "usual); implied by the other --tls-* and --ca-file options",
    )
    parser.add_argument(
        "--ca-file",
        help="PEM CA bundle that signs the broker's certificate (default: the system's)",
    )
    parser.add_argument("--cert-file", help="PEM client certificate, for mutual TLS")
    parser.add_argument("--key-file", help="PEM key of --cert-file")
    parser.add_argument(
        "--tls-insecure", action="store_true", help="do not check that the certificate names --host"
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.rate <= 0:
        parser.error("--rate must be positive")
    if args.password and not args.username:
        parser.error("--password needs --username")
    tls = (
        BrokerTls(args.ca_file, args.cert_file, args.key_file, args.tls_insecure)
        if (args.tls or args.ca_file or args.cert_file or args.tls_insecure)
        else None
    )

    stop = threading.Event()
    publisher = MesPublisher(
        args.host,
        args.port,
        site=args.site,
        machine=args.machine,
        run=args.run,
        quantities=args.quantities,
        username=args.username,
        password=args.password,
        tls=tls,
    )

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()
        publisher.interrupt()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    try:
        publisher.connect()
    except ConnectionError as exc:
        if stop.is_set():
            return 0
        print(f"mes-publisher: {exc}", file=sys.stderr)
        return 1
    print(f"mes-publisher connected to {args.host}:{args.port}", flush=True)

    limit = args.burst if args.burst is not None else args.count
    interval = 0.0 if args.burst is not None else 1.0 / args.rate
    published = 0
    next_at = time.monotonic()
    events = order_cycle(publisher)
    try:
        while not stop.is_set() and (limit is None or published < limit):
            next(events)
            published += 1
            if interval:
                next_at += interval
                stop.wait(max(0.0, next_at - time.monotonic()))
    except PublishError:
        pass  # interrupted while the window was full
    publisher.close(5.0 if stop.is_set() else 60.0)
    lost = publisher.outstanding + publisher.refused
    print(
        f"mes-publisher published {published} events: {published - lost} acknowledged, "
        f"{publisher.refused} refused, {publisher.outstanding} without PUBACK",
        flush=True,
    )
    return 0 if stop.is_set() or lost == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
