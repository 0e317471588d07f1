"""MQTT driver: takes MES events from a broker at QoS 1 and acknowledges each only once committed.

The driver holds a persistent session on the broker (a stable client id; `clean_session=0` in
MQTT 3.1.1, `clean_start=0` plus a session expiry in MQTT 5), subscribes at QoS 1 to every
configured filter on every connection, and maps each message's JSON payload to the fields of a
canonical MES input kind (`material.consumed`, `lot.produced`): a `MesMessage`, or a
`RejectedMessage` with its reason when the payload is too large, not JSON, not an object, or
lacks a mapped field. Messages are taken in batches: everything that has arrived, up to
`batch_max`, goes to the sink in one call (one outbox commit), and only when the sink has
returned are their PUBACKs sent. A crash, a failed commit or a lost connection before that
leaves them unacknowledged, and the broker sends them again on the next connection; the same
message id then makes the outbox ignore the copy. The driver keeps only connect-and-consume: the
shared reconnect loop (`drivers.common.availability`) backs off, logs once when the broker
becomes unavailable and once when it is back, and never ends on a broker error.

The broker settings this relies on (persistence, queue limits, autosave) are in the README,
"MQTT broker settings"; `plantsync doctor mqtt` (`drivers.mqtt.doctor`) checks them. On every
connection the driver also reads the broker's `$SYS` figures: a rise of its dropped-messages
count is logged with the setting to change, shown in `/metrics` and degrades `/readyz`.

Persistent sessions keep subscriptions too: a filter removed from the configuration stays
subscribed on the broker until the session expires; its messages arrive as rejected ("matches
no configured filter"). Change `client_id` to start from a clean session.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import decimal
import json
import logging
import time
from collections.abc import Sequence
from typing import Any, Final

import msgspec

from drivers.base import (
    Driver,
    MesMessage,
    Reading,
    RejectedMessage,
    SampleSink,
)
from drivers.common.availability import Availability, Ended, reconnect_forever
from drivers.common.timing import Backoff
from drivers.mqtt.client import Arrival, Connection
from drivers.mqtt.config import CONNECT_TIMEOUT, DROPS_LOG_EVERY, QUEUE_ADVICE, MqttConfig
from drivers.mqtt.topics import Unmappable, json_kind

log = logging.getLogger(__name__)


_FAST_JSON: Final = msgspec.json.Decoder(float_hook=decimal.Decimal)
"""The MES payload decoder: msgspec (C, no intermediate objects) is about five times faster
than `json.loads` with `parse_float`; floats become Decimal (12.345 stays 12.345), and NaN and
Infinity are refused (they are not JSON)."""


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def to_reading(config: MqttConfig, topic: str, payload: bytes, received_at: float) -> Reading:
    """Convert one message: a MesMessage, or a RejectedMessage with the reason."""

    def rejected(reason: str, kept: bytes = payload) -> RejectedMessage:
        return RejectedMessage(config.name, topic, kept, reason, received_at)

    if len(payload) > config.max_payload:
        return rejected(
            f"payload of {len(payload)} bytes exceeds max_payload ({config.max_payload} bytes)",
            payload[: config.max_payload],
        )
    subscription = config.topic_for(topic)
    if subscription is None:
        return rejected(f"topic {topic!r} matches no configured filter")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return rejected(f"payload is not UTF-8: {exc}")
    try:
        document = _FAST_JSON.decode(text)
    except (msgspec.DecodeError, RecursionError):
        # The fast decoder refused it: let the standard one say why, in the words the
        # rejected-input journal has always used (NaN, nesting, where the syntax broke), and
        # take what it alone accepts (a lone surrogate in a string) as before.
        try:
            document = json.loads(text, parse_float=decimal.Decimal, parse_constant=_no_constants)
        except RecursionError:
            return rejected("payload is not JSON: nested too deeply")
        except ValueError as exc:
            return rejected(f"payload is not JSON: {exc}")
    if not isinstance(document, dict):
        return rejected(f"payload is {json_kind(document)}, expected a JSON object")
    try:
        fields = subscription.map_fields(topic, document)
    except Unmappable as exc:
        # Kept with its MES id where the id can be read, so the dead letter can be traced.
        with contextlib.suppress(Unmappable):
            found = subscription.message_id(topic, payload, document)
            return RejectedMessage(config.name, topic, payload, str(exc), received_at, found)
        return rejected(str(exc))
    try:
        message_id = subscription.message_id(topic, payload, document)
    except Unmappable as exc:
        return rejected(str(exc))
    return MesMessage(
        config.name, topic, subscription.event, fields, message_id, received_at, payload
    )


class MqttDriver(Driver):
    """Consumes MES events from one broker and owns the reconnection."""

    def __init__(self, config: MqttConfig) -> None:
        super().__init__(config.name)
        self.config = config
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        """How many batches of each size went to the sink: shows bursts being absorbed."""
        self.dropped_qos0 = 0
        self.broker: dict[str, float | str] = {}
        """The broker's latest `$SYS` figures (BROKER_FIGURES' names, and `version`)."""
        self.peak_backlog = 0
        """The most messages received and not yet handed to the sink at once, ever: what the
        in-flight window costs in memory (bounded by INBOX_BATCHES * batch_max)."""
        self._backoff = Backoff(base=0.5, cap=config.reconnect_max_delay)
        self.availability = Availability(
            f"MQTT broker {self.name} at {self.endpoint}",
            log,
            health=self.health,
            extra=self._log_extra(),
        )
        self._ever_connected = False
        self._commit_failing = False
        self._dropping = False
        self._refused_logged: set[str] = set()
        self._drops_logged_at: float | None = None
        self._sys_refused_logged = False

    @property
    def endpoint(self) -> str:
        """`host:port`, as logs show it."""
        return f"{self.config.host}:{self.config.port}"

    def _log_extra(self) -> dict[str, str]:
        return {"driver": self.name, "endpoint": self.endpoint}

    async def run(self, sink: SampleSink) -> None:
        """Connect, consume and reconnect until cancelled; broker errors never end it."""
        loop = asyncio.get_running_loop()
        await reconnect_forever(
            lambda: self._connect_and_consume(loop, sink), self._backoff, self.availability
        )

    async def _connect_and_consume(
        self, loop: asyncio.AbstractEventLoop, sink: SampleSink
    ) -> Ended:
        """One connection, from connect to its end."""
        connection = Connection(self.config, loop)
        try:
            ended = await self._connect(connection)
            if ended is None:
                ended = await self._consume(connection, sink)
        finally:
            self.availability.disconnected()  # already while the connection closes
            await connection.close()
        return ended

    async def _connect(self, connection: Connection) -> Ended | None:
        """Connect and wait for the CONNACK; return why it failed, or None when connected."""
        try:
            await asyncio.to_thread(connection.open)
        except (OSError, ValueError) as exc:
            return Ended(f"connection failed ({exc or type(exc).__name__})")
        try:
            result = await asyncio.wait_for(connection.connack, CONNECT_TIMEOUT)
        except TimeoutError:
            return Ended(f"no CONNACK within {CONNECT_TIMEOUT:g}s")
        if isinstance(result, str):
            return Ended(result)
        session = "session resumed" if result.session_present else "new session"
        # While commits fail the backoff stands: the broker is fine, the gateway is not.
        was_lost = self.availability.back(
            f" ({session}); subscribing to {len(self.config.topics)} filter(s)",
            reset_backoff=not self._commit_failing,
        )
        if not was_lost and not self._ever_connected:
            log.info(
                "MQTT broker %s at %s connected as %s (%s).",
                self.name,
                self.endpoint,
                self.config.client_id,
                session,
                extra=self._log_extra(),
            )
        if self._ever_connected and self.config.persistent_session and not result.session_present:
            log.warning(
                "MQTT broker %s at %s did not keep the session of %s: what it held for the "
                "gateway while disconnected is lost. Check the broker's persistence and the "
                "session expiry.",
                self.name,
                self.endpoint,
                self.config.client_id,
                extra=self._log_extra(),
            )
        self._ever_connected = True
        return None

    async def _consume(self, connection: Connection, sink: SampleSink) -> Ended:
        """Hand over batches and acknowledge them after the sink returns, until the end."""
        while True:
            await connection.changed.wait()
            connection.changed.clear()
            self._note_refusals(connection)
            self._note_broker(connection)
            while connection.inbox:
                self.peak_backlog = max(self.peak_backlog, connection.peak_backlog)
                batch = [
                    connection.inbox.popleft()
                    for _ in range(min(len(connection.inbox), self.config.batch_max))
                ]
                readings = [
                    to_reading(self.config, arrival.topic, arrival.payload, arrival.received_at)
                    for arrival in batch
                ]
                self._count(readings, batch)
                try:
                    await sink(readings)
                except Exception as exc:
                    return self._commit_failed(exc, len(batch))
                # Only now, with the batch committed. After a lost connection nothing is
                # acknowledged: the broker sends the batch again and the outbox drops the copies.
                connection.ack(batch)
                self._commit_recovered()
            self._note_dropped(connection)
            if connection.ended is not None:
                return Ended(connection.ended)

    def _count(self, readings: Sequence[Reading], batch: Sequence[Arrival]) -> None:
        self.batch_sizes[len(batch)] += 1
        self.health.reads += len(batch)
        self.health.last_sample_at = max(arrival.received_at for arrival in batch)
        for reading in readings:
            if isinstance(reading, RejectedMessage):
                self.health.record_error(f"{reading.topic}: {reading.reason}")

    def _commit_failed(self, exc: Exception, count: int) -> Ended:
        reason = f"the sink failed to commit {count} message(s): {exc!r}"
        if not self._commit_failing:
            self._commit_failing = True
            log.error(
                "MQTT driver %s could not commit %d message(s); they stay unacknowledged and "
                "the broker sends them again after a reconnection: %r",
                self.name,
                count,
                exc,
                exc_info=exc,
                extra=self._log_extra(),
            )
        return Ended(reason, peer_lost=False)

    def _commit_recovered(self) -> None:
        if self._commit_failing:
            self._commit_failing = False
            self.availability.back()  # connected all along: only the backoff starts again
            log.info("MQTT driver %s commits again.", self.name, extra=self._log_extra())

    def _note_refusals(self, connection: Connection) -> None:
        for topic_filter, reason in connection.refused:
            self.health.record_error(f"subscription to {topic_filter!r} refused ({reason})")
            if topic_filter not in self._refused_logged:
                self._refused_logged.add(topic_filter)
                log.warning(
                    "MQTT broker %s at %s refused the subscription to %r (%s); check the "
                    "broker's ACL. Other filters keep working.",
                    self.name,
                    self.endpoint,
                    topic_filter,
                    reason,
                    extra=self._log_extra(),
                )
        connection.refused.clear()

    def _note_broker(self, connection: Connection) -> None:
        """Take the broker's new `$SYS` figures; say so when its dropped count rises."""
        self.peak_backlog = max(self.peak_backlog, connection.peak_backlog)
        if not connection.broker:
            return
        figures, connection.broker = connection.broker, {}
        if "sys_refused" in figures and not self._sys_refused_logged:
            self._sys_refused_logged = True
            log.warning(
                "MQTT broker %s at %s does not let the gateway read $SYS (%s): messages it "
                "drops for the gateway cannot be seen. Allow read on $SYS/broker/# in its ACL.",
                self.name,
                self.endpoint,
                figures["sys_refused"],
                extra=self._log_extra(),
            )
        before = self.broker.get("dropped")
        self.broker.update(figures)
        dropped = figures.get("dropped")
        if not isinstance(dropped, float):
            return
        if isinstance(before, float) and dropped < before:
            before = None  # the broker restarted: its count began again
        if dropped <= 0:
            self.health.degraded.pop("broker drops", None)
            return
        if isinstance(before, float) and dropped <= before:
            return
        count = int(dropped)
        self.health.degraded["broker drops"] = (
            f"the MQTT broker at {self.endpoint} has dropped {count} message(s) since it "
            "started ($SYS/broker/publish/messages/dropped, all its clients): MES events for "
            f"the gateway may be among them; {QUEUE_ADVICE}"
        )
        self.health.record_error(f"the broker has dropped {count} message(s)")
        now = time.monotonic()
        if self._drops_logged_at is None or now - self._drops_logged_at >= DROPS_LOG_EVERY:
            self._drops_logged_at = now
            rose = "" if before is None else f" (up {count - int(before)})"
            log.warning(
                "MQTT broker %s at %s has dropped %d message(s) since it started%s, by its "
                "$SYS/broker/publish/messages/dropped (all clients): MES events for the "
                "gateway may be lost there. To stop it, %s.",
                self.name,
                self.endpoint,
                count,
                rose,
                QUEUE_ADVICE,
                extra={**self._log_extra(), "broker_dropped": count},
            )

    def _note_dropped(self, connection: Connection) -> None:
        dropped, connection.dropped_qos0 = connection.dropped_qos0, 0
        if not dropped:
            self._dropping = False
            return
        self.dropped_qos0 += dropped
        self.health.record_error(f"dropped {dropped} QoS 0 message(s): the sink is behind")
        if not self._dropping:  # once per overload, not once per batch
            self._dropping = True
            log.warning(
                "MQTT driver %s drops QoS 0 messages because the sink is behind (%d so far); "
                "MES events should be published at QoS 1.",
                self.name,
                self.dropped_qos0,
                extra=self._log_extra(),
            )
