"""One connection to the MQTT broker, as the driver uses it: a fresh paho client per connection,
its callbacks handed over to the asyncio loop, messages queued in a bounded inbox, and
acknowledgements sent only when the driver says so.

Threading: paho's network loop runs in paho's own thread (`loop_start`), which keeps pings
going while a commit waits on a full disk; its callbacks only hand over to the asyncio loop with
`call_soon_threadsafe`. Acknowledgements are sent from the asyncio thread, a committed batch's
PUBACKs as one entry of paho's outgoing packet deque (`ReadAheadClient.ack_all`), which wakes
its thread once (the same path as a `publish()` from another thread). paho's own reconnect is
disabled (`reconnect_on_failure=False`): every connection gets a fresh client, so an
acknowledgement can only ever reach the connection that delivered the message. MQTT packet ids
are per connection, and a PUBACK sent late on a newer connection could otherwise acknowledge a
different message that reused the id.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.client import PUBACK
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from drivers.mqtt.config import (
    BROKER_FIGURES,
    BROKER_VERSION_TOPIC,
    CLOSE_TIMEOUT,
    CONNECT_TIMEOUT,
    INBOX_BATCHES,
    QOS0_BACKLOG_PER_BATCH,
    MqttConfig,
)

_PUBACK: Final = struct.Struct("!BBH")
"""A PUBACK packet: its fixed header (type 4, no flags), Remaining Length 2, the packet id."""

READ_AHEAD: Final = 65536
"""Bytes asked of the socket at once when paho wants a few: what a burst's messages share."""


class ReadAheadClient(mqtt.Client):
    """paho's client with its reads buffered and a batch's PUBACKs sent as one write.

    Stock paho reads a packet with a system call per part (its type byte, each byte of its
    length, its body) and goes back to `select()` after every packet when it only subscribes
    (`loop_read` reads as many packets as messages are in flight *out*, so one). In a burst that
    was half of paho's thread's CPU per message, and that thread holds the interpreter lock
    the asyncio loop and the outbox's writer need. Here a read asks for up to `READ_AHEAD` bytes
    and keeps what the packet did not use; `loop_read` goes on while bytes are kept, so none
    wait for the next `select()` (which sees only the socket's bytes, not these), but it does
    not read the socket again: a packet whose end is not kept yet waits for `select()`, so
    paho's loop writes (PUBACKs, PINGREQ) and checks the keepalive at least every
    `READ_AHEAD` bytes. (Read on until the socket was empty, a backlog kept paho's thread
    reading for as long as the broker kept sending: nothing acknowledged, no ping, and the
    broker closed the connection after 1.5 keepalives, again on every connection.)

    Relies on three of paho's internals, the same in 2.0, 2.1 and 2.2 (read in each release's
    wheel; pyproject.toml holds paho below 2.3 until the next is read): every read of the
    network goes through `_sock_recv(bufsize)` (and an empty result is the end of the stream),
    `_packet_read` keeps a partly read packet between calls, and `_packet_queue(command,
    packet, mid, qos)` queues bytes to send (used by `ack()` itself). A fresh client is made
    per connection, so kept bytes never cross from one socket to another.
    """

    _kept = b""
    _kept_from = 0
    _may_read = True

    def _sock_recv(self, bufsize: int) -> bytes:
        kept, start = self._kept, self._kept_from
        if start < len(kept):
            self._kept_from = start + bufsize
            return kept[start : start + bufsize]
        if not self._may_read:
            # The rest is on the socket: paho keeps the partial packet, select() sees the rest.
            raise BlockingIOError
        data = super()._sock_recv(max(bufsize, READ_AHEAD))
        if len(data) <= bufsize:
            return data
        self._kept, self._kept_from = data, bufsize
        return data[:bufsize]

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        self._may_read = False  # only what is kept, from here on
        try:
            while (
                rc == MQTTErrorCode.MQTT_ERR_SUCCESS
                and self._sock is not None
                and self._kept_from < len(self._kept)
            ):
                rc = super().loop_read(max_packets)
        finally:
            self._may_read = True
        return rc

    def ack_all(self, mids: Sequence[int]) -> None:
        """PUBACK the QoS 1 messages `mids` in one write.

        The bytes on the wire are those of `ack(mid, 1)` for each (MQTT 3.1.1 §3.4, MQTT 5
        §3.4.2.1: a Remaining Length of 2 is success without properties), but paho's thread is
        woken and writes once per batch, not once per message. Only PUBLISH and DISCONNECT
        entries of paho's queue are looked at after they are written.
        """
        if mids:
            self._packet_queue(
                PUBACK, b"".join([_PUBACK.pack(PUBACK, 2, mid) for mid in mids]), 0, 1
            )


def set_credentials(client: mqtt.Client, config: MqttConfig) -> None:
    """The broker's user, password and TLS settings of `config`, on any client that connects
    to it (the driver's, the doctor's, the exceptions channel's)."""
    if config.username is not None:
        password = config.password.get_secret_value() if config.password else None
        client.username_pw_set(config.username, password)
    if config.tls is not None:
        context = ssl.create_default_context(
            cafile=str(config.tls.ca_file) if config.tls.ca_file else None
        )
        if config.tls.cert_file is not None:
            context.load_cert_chain(config.tls.cert_file, config.tls.key_file or None)
        context.check_hostname = not config.tls.insecure
        client.tls_set_context(context)


@dataclass(frozen=True, slots=True)
class Arrival:
    mid: int
    qos: int
    topic: str
    payload: bytes
    received_at: float


@dataclass(frozen=True, slots=True)
class _Connected:
    session_present: bool


class Connection:
    """One MQTT connection: a fresh paho client whose network loop runs in paho's thread.

    Callbacks run in paho's thread and only post to the asyncio loop. `close()` must be awaited
    whatever happened; after it, the client is never used again.
    """

    def __init__(self, config: MqttConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.inbox: collections.deque[Arrival] = collections.deque()
        self.changed = asyncio.Event()
        self.connack: asyncio.Future[_Connected | str] = loop.create_future()
        self.ended: str | None = None
        self.refused: list[tuple[str, str]] = []
        self.broker: dict[str, float | str] = {}
        """The broker's `$SYS` figures received on this connection (see BROKER_FIGURES), and
        `version`; `sys_refused` when the broker did not let the driver read them."""
        self.peak_backlog = 0
        """The most messages received and not yet handed to the sink at once."""
        self._sys_mid: int | None = None
        self.dropped_qos0 = 0
        self._closing = threading.Lock()
        self._closed = False
        # Arrivals pass from paho's thread in bunches: one loop wake-up per burst, not per
        # message (a cross-thread call per message is most of the cost at high rates).
        self._incoming: list[Arrival] = []
        self._incoming_lock = threading.Lock()
        v5 = config.protocol == "5"
        self.client = ReadAheadClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else not config.persistent_session,
            manual_ack=True,
            reconnect_on_failure=False,  # this driver reconnects, with a fresh client
        )
        self.client.connect_timeout = CONNECT_TIMEOUT
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    def open(self) -> None:
        """Configure auth and TLS, connect and start paho's thread. Blocking: run in a thread.

        Raises OSError (refused, unreachable, TLS) or ValueError with the cause.
        """
        config = self.config
        set_credentials(self.client, config)
        if config.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            persistent = config.persistent_session
            properties.SessionExpiryInterval = int(config.session_expiry) if persistent else 0
            properties.ReceiveMaximum = config.inflight_window
            self.client.connect(
                config.host,
                config.port,
                keepalive=round(config.keepalive),
                clean_start=not persistent,
                properties=properties,
            )
        else:
            self.client.connect(config.host, config.port, keepalive=round(config.keepalive))
        with self._closing:
            if self._closed:  # cancelled while connecting: close() already ran
                self.client.disconnect()
                return
            self.client.loop_start()

    async def close(self) -> None:
        """Send DISCONNECT (the session stays on the broker) and end paho's thread, bounded."""
        with self._closing:
            self._closed = True
            self.client.disconnect()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.to_thread(self.client.loop_stop), CLOSE_TIMEOUT)

    def ack(self, arrivals: Sequence[Arrival]) -> None:
        """PUBACK the QoS 1 messages, unless the connection that delivered them has ended."""
        if self.ended is None:
            self.client.ack_all([arrival.mid for arrival in arrivals if arrival.qos == 1])

    # paho's thread -----------------------------------------------------------------------

    def _post(self, callback: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the driver is gone
            self.loop.call_soon_threadsafe(callback, *args)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._post(self._connack, f"the broker refused the connection ({reason_code})")
            return
        # Subscribe on every connection, even a resumed session: the broker may have lost it.
        if self.config.protocol == "5":
            # Retained messages only for a new subscription, not again on every reconnection.
            options = SubscribeOptions(
                qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
            )
            client.subscribe([(topic.filter, options) for topic in self.config.topics])
        else:
            client.subscribe([(topic.filter, 1) for topic in self.config.topics])
        # The broker's own figures, at QoS 0 (nothing to acknowledge, nothing queued): how
        # many messages it dropped is the only trace of MES events lost at a stock broker.
        _, self._sys_mid = client.subscribe(
            [(topic, 0) for topic in (*BROKER_FIGURES, BROKER_VERSION_TOPIC)]
        )
        self._post(self._connack, _Connected(flags.session_present))

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if mid == self._sys_mid:
            if all(code.is_failure for code in reason_codes):
                self._post(self._broker_figure, "sys_refused", str(reason_codes[0]))
            return
        refused = [
            (topic.filter, str(code))
            for topic, code in zip(self.config.topics, reason_codes, strict=False)
            if code.is_failure
        ]
        if refused:
            self._post(self.refused.extend, refused)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:  # brokers refuse such topics; keep it visible if not
            topic = message._topic.decode("utf-8", "replace")
        payload = bytes(message.payload)
        if topic.startswith("$SYS/"):
            self._sys_message(topic, payload)
            return
        arrival = Arrival(message.mid, message.qos, topic, payload, time.time())
        # Back-pressure on the socket: a broker that ignores our receive maximum (mosquitto
        # 2.0 lets 10-18 times more through while acks flow) must not fill our memory. While
        # the backlog is over its bound, paho's thread waits here, the socket stops being
        # read, and the broker keeps the rest.
        # (QoS 0 is not held: over its own bound it is dropped and counted, as QoS 0 allows.)
        bound = INBOX_BATCHES * self.config.batch_max
        while (
            message.qos == 1 and len(self.inbox) + len(self._incoming) >= bound and not self._closed
        ):
            time.sleep(0.005)
        with self._incoming_lock:
            first = not self._incoming
            self._incoming.append(arrival)
        if first:
            self._post(self._take_incoming)

    def _sys_message(self, topic: str, payload: bytes) -> None:
        text = payload.decode("utf-8", "replace").strip()
        if topic == BROKER_VERSION_TOPIC:
            self._post(self._broker_figure, "version", text)
            return
        name = BROKER_FIGURES.get(topic)
        number = text.split()[0] if text else ""  # "1234 seconds" for the uptime
        with contextlib.suppress(ValueError):
            if name is not None:
                self._post(self._broker_figure, name, float(number))

    def _take_incoming(self) -> None:
        with self._incoming_lock:
            arrivals, self._incoming = self._incoming, []
        for arrival in arrivals:
            self._arrived(arrival)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if flags.is_disconnect_packet_from_server:
            reason = f"the broker closed the connection ({reason_code})"
        elif str(reason_code) == "Keep alive timeout":
            reason = "no answer from the broker within the keepalive"
        else:
            reason = "the connection was lost"
        self._post(self._end, reason)

    # the asyncio loop ---------------------------------------------------------------------

    def _connack(self, result: _Connected | str) -> None:
        if not self.connack.done():
            self.connack.set_result(result)

    def _arrived(self, arrival: Arrival) -> None:
        limit = QOS0_BACKLOG_PER_BATCH * self.config.batch_max
        if arrival.qos == 0 and len(self.inbox) >= limit:
            self.dropped_qos0 += 1
            return
        self.inbox.append(arrival)
        self.peak_backlog = max(self.peak_backlog, len(self.inbox))
        self.changed.set()

    def _broker_figure(self, name: str, value: float | str) -> None:
        self.broker[name] = value
        self.changed.set()

    def _end(self, reason: str) -> None:
        if self.ended is None:
            self.ended = reason
        self._connack(reason)
        self.changed.set()
