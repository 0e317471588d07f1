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
message id then makes the outbox ignore the copy. The driver owns its reconnect loop with the
shared backoff, logs once when the broker becomes unavailable and once when it is back, and
never ends on a broker error.

Threading: paho's network loop runs in paho's own thread (`loop_start`), which keeps pings
going while a commit waits on a full disk; its callbacks only hand over to the asyncio loop with
`call_soon_threadsafe`. Acknowledgements are sent from the asyncio thread with `client.ack()`,
which only appends to paho's outgoing packet deque and wakes its thread (the same path as a
`publish()` from another thread). paho's own reconnect is disabled (`reconnect_on_failure=False`):
every connection gets a fresh client, so an acknowledgement can only ever reach the connection
that delivered the message. MQTT packet ids are per connection, and a PUBACK sent late on a
newer connection could otherwise acknowledge a different message that reused the id.

The broker settings this relies on (persistence, queue limits, autosave) are in the README,
"MQTT broker settings"; `plantsync doctor mqtt` (`doctor`, below) checks them. On every
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
import functools
import hashlib
import json
import logging
import re
import ssl
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from drivers.base import (
    DEFAULT_RECONNECT_MAX_DELAY,
    NAME_PATTERN,
    RECONNECT_MAX_DELAY_DOC,
    Driver,
    MesMessage,
    Reading,
    RejectedMessage,
    SampleSink,
)
from drivers.common.availability import Availability, Ended, reconnect_forever
from drivers.common.timing import Backoff, Duration

log = logging.getLogger(__name__)

MesKind = Literal[
    "order.started", "order.ended", "material.consumed", "lot.produced", "lot.disposition"
]
"""The canonical MES input kinds a topic can carry."""

CONNECT_TIMEOUT: Final = 10.0
"""Seconds for the TCP and TLS handshake, and again for the broker's CONNACK."""
INBOX_BATCHES: Final = 4
"""Messages received but not yet committed are bounded to this many batches."""

DEFAULT_RECEIVE_MAXIMUM: Final = 65535
"""The MQTT 5 Receive Maximum the driver announces unless told otherwise: the most the protocol
allows. A broker counts the messages in flight to a client against it and queues the rest up to
its own `max_queued_messages` (mosquitto: 1000), dropping beyond that without telling anyone:
with 1000 here, a stock mosquitto lost half of a 20,000-message burst. Memory stays bounded all
the same: the driver stops reading the socket while `INBOX_BATCHES` batches wait for their
commit, and the broker holds the rest."""

BROKER_FIGURES: Final[dict[str, str]] = {
    "$SYS/broker/publish/messages/dropped": "dropped",
    "$SYS/broker/store/messages/count": "stored_messages",
    "$SYS/broker/store/messages/bytes": "stored_bytes",
    "$SYS/broker/clients/connected": "clients_connected",
    "$SYS/broker/uptime": "uptime",
}
"""The broker's own figures (mosquitto's `$SYS` tree, published every `sys_interval`, 10 s by
default) that the driver follows, by the name it keeps them under. `dropped` counts the QoS 1
and 2 messages the broker threw away because a client's queue was full, for all clients since
it started: the only trace a stock broker leaves of lost MES events."""
BROKER_VERSION_TOPIC: Final = "$SYS/broker/version"
DROPS_LOG_EVERY: Final = 300.0
"""Seconds: a broker that keeps dropping is logged at most this often (its count is in
`/metrics` and `/readyz` all the time)."""

QUEUE_ADVICE: Final = (
    "in mosquitto.conf set max_queued_messages 0 and max_queued_bytes to what the broker may "
    "hold for an offline gateway (e.g. 1000000000); the default max_queued_messages 1000 "
    "drops the rest without telling anyone")

CLOSE_TIMEOUT: Final = 5.0
"""Seconds to let paho's thread send DISCONNECT and end when a connection is closed."""

QOS0_BACKLOG_PER_BATCH: Final = 10
"""QoS 0 messages are dropped (and counted) once this many batches wait in memory: unlike QoS 1,
nothing at the broker bounds them."""

SAMPLE_CONFIG: Final = """\
name: mes
type: mqtt
host: 10.0.0.5
port: 1883
client_id: plantsync-1010-mes
protocol: "5"
keepalive: 30s
session_expiry: 7d
username: gateway-1010
password: ${MES_MQTT_PASSWORD}
tls: {ca_file: /etc/plantsync/mes-ca.pem}
max_payload: 256KiB
batch_max: 500
topics:
  - filter: mes/1010/+/consumption
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
  - filter: mes/1010/+/lot/completed
    event: lot.produced
    id_field: message_id
    fields:
      machine_id: $topic[2]
      order_id: order_id
      material: material
      lot_id: lot_id
      quantity.value: quantity
      quantity.uom: uom
      input_lots: input_lots
      occurred_at: occurred_at
"""
"""A complete driver entry of the plant YAML, for the README; tests load it."""


# --- topic filters ---------------------------------------------------------------------------


def check_filter(topic_filter: str) -> str:
    """Return the filter if it is a valid MQTT topic filter, else raise ValueError saying why.

    `+` must fill a whole level, `#` must be the whole last level, and a shared subscription
    `$share/<group>/<filter>` needs a group name and a filter.
    """
    if not topic_filter:
        raise ValueError("a topic filter must not be empty")
    if len(topic_filter.encode()) > 65535:
        raise ValueError("a topic filter must be at most 65535 bytes")
    if "\x00" in topic_filter:
        raise ValueError("a topic filter must not contain U+0000")
    levels = topic_filter.split("/")
    if levels[0] == "$share":
        if len(levels) < 3 or not levels[1] or "+" in levels[1] or "#" in levels[1]:
            raise ValueError(f"{topic_filter!r}: a shared subscription is $share/<group>/<filter>")
        levels = levels[2:]
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(f"{topic_filter!r}: '#' must be the whole last level")
        if "+" in level and level != "+":
            raise ValueError(f"{topic_filter!r}: '+' must be a whole level")
    return topic_filter


def matching_filter(topic_filter: str) -> str:
    """The part of a filter that topics are matched against (without `$share/<group>/`)."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


# --- field mapping ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PayloadPath:
    """A dotted path into the JSON payload; a numeric part indexes an array."""

    parts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TopicLevel:
    """Level `index` (0-based) of the message's topic."""

    index: int


@dataclass(frozen=True, slots=True)
class LiteralValue:
    """A fixed string, written `=value` in the mapping."""

    value: str


FieldSource = PayloadPath | TopicLevel | LiteralValue

_TOPIC_LEVEL = re.compile(r"\$topic\[(\d+)\]")


def _dotted(text: str, what: str) -> tuple[str, ...]:
    parts = tuple(text.split("."))
    if not text or any(not part for part in parts):
        raise ValueError(f"{what} {text!r} must be a dotted path such as 'order.id'")
    return parts


def parse_source(text: str) -> FieldSource:
    """Parse a mapping source: `a.b.c` (payload path), `$topic[N]` or `=literal`."""
    if text.startswith("="):
        return LiteralValue(text[1:])
    if text.startswith("$"):
        match = _TOPIC_LEVEL.fullmatch(text)
        if match is None:
            raise ValueError(f"source {text!r}: `$` starts a topic level such as $topic[2]")
        return TopicLevel(int(match.group(1)))
    return PayloadPath(_dotted(text, "source"))


@dataclass(frozen=True, slots=True)
class _MappedField:
    target: str
    target_parts: tuple[str, ...]
    source_text: str
    source: FieldSource


class _Unmappable(Exception):
    """A message that cannot become a MesMessage; the argument is the reason."""


def _json_kind(value: Any) -> str:
    """What a parsed JSON value is, with its article: `an array`, `a string`..."""
    match value:
        case dict():
            return "an object"
        case list():
            return "an array"
        case str():
            return "a string"
        case bool():
            return "a boolean"
        case None:
            return "null"
        case int():
            return "an integer"
        case _:
            return "a decimal number"


def _lookup(document: Any, parts: tuple[str, ...]) -> Any:
    """The value at `parts` in `document`; raises KeyError(reason) when it is not there."""
    value = document
    for depth, part in enumerate(parts):
        if isinstance(value, dict):
            if part not in value:
                raise KeyError(f"the payload has no {'.'.join(parts[: depth + 1])!r}")
            value = value[part]
        elif isinstance(value, list) and part.isdigit():
            if int(part) >= len(value):
                where = ".".join(parts[:depth]) or "the payload"
                raise KeyError(f"{where!r} has only {len(value)} items")
            value = value[int(part)]
        else:
            where = ".".join(parts[:depth])
            raise KeyError(f"{where!r} is {_json_kind(value)}, not an object")
    return value


# --- config ----------------------------------------------------------------------------------


class MqttTls(BaseModel):
    """TLS towards the broker. Files are read when connecting, never at validation."""

    model_config = ConfigDict(extra="forbid")

    ca_file: Path | None = Field(
        default=None,
        description="PEM file of the CA(s) that sign the broker certificate; the system's "
        "trusted CAs when omitted.",
        examples=["/etc/plantsync/mes-ca.pem"],
    )
    cert_file: Path | None = Field(
        default=None,
        description="PEM client certificate, for brokers that authenticate clients by "
        "certificate.",
    )
    key_file: Path | None = Field(
        default=None,
        description="PEM private key of cert_file, when the certificate file does not hold it.",
    )
    insecure: bool = Field(
        default=False,
        description="Do not check that the broker certificate names `host` (a broker reached "
        "by IP address). The certificate must still be signed by a trusted CA.",
    )

    @model_validator(mode="after")
    def _key_needs_certificate(self) -> MqttTls:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        return self


class MqttTopic(BaseModel):
    """One subscription: which messages, which canonical kind, and how their fields map."""

    model_config = ConfigDict(extra="forbid")

    filter: str = Field(
        description="MQTT topic filter, subscribed at QoS 1: `+` matches one level, `#` the "
        "rest. A message matching several topics takes the first.",
        examples=["mes/1010/+/consumption", "mes/1010/#"],
    )
    event: MesKind = Field(
        description="The canonical MES input kind the messages carry.",
        examples=["material.consumed"],
    )
    id_field: str | None = Field(
        default="message_id",
        description="Dotted path of the MES message id in the payload: the natural key that "
        "makes a redelivered message a duplicate. When a payload has none (or this is null), "
        "the id is the SHA-256 of topic and payload, so a redelivery still gets the same id.",
        examples=["message_id", "header.id"],
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Field mapping: canonical field (dotted path, e.g. `quantity.value`) to "
        "its source: a dotted path into the JSON payload (`items.0.lot`), `$topic[N]` for "
        "level N (0-based) of the topic, or `=text` for a fixed string. Empty: the payload "
        "object is taken as it is. A source missing from a payload rejects the message.",
        examples=[{"order_id": "order.id", "machine_id": "$topic[2]", "quantity.uom": "=KGM"}],
    )

    _mapping: tuple[_MappedField, ...] = PrivateAttr(default=())

    @field_validator("filter")
    @classmethod
    def _valid_filter(cls, topic_filter: str) -> str:
        return check_filter(topic_filter)

    @field_validator("id_field")
    @classmethod
    def _valid_id_field(cls, id_field: str | None) -> str | None:
        if id_field is not None:
            _dotted(id_field, "id_field")
        return id_field

    @model_validator(mode="after")
    def _compile_fields(self) -> MqttTopic:
        levels = matching_filter(self.filter).split("/")
        mapping = []
        for target, source_text in self.fields.items():
            source = parse_source(source_text)
            if isinstance(source, TopicLevel) and "#" not in levels and source.index >= len(
                levels
            ):
                raise ValueError(
                    f"field {target!r}: {source_text} is past the last level of "
                    f"{self.filter!r} (levels 0 to {len(levels) - 1})"
                )
            mapping.append(_MappedField(target, _dotted(target, "field"), source_text, source))
        for field in mapping:
            for other in mapping:
                if field is not other and other.target_parts[: len(field.target_parts)] == (
                    field.target_parts
                ):
                    raise ValueError(
                        f"fields {field.target!r} and {other.target!r} both set {field.target!r}"
                    )
        self._mapping = tuple(mapping)
        return self

    @functools.cached_property
    def decoding_plan(self) -> tuple[tuple[_MappedField, ...], tuple[str, ...] | None]:
        """The compiled mapping and id path, read on every message: a cached property lives
        in the instance's `__dict__`, where a pydantic private attribute costs a `__getattr__`
        detour (about a tenth of a message's decoding)."""
        id_parts = None if self.id_field is None else _dotted(self.id_field, "id_field")
        return self._mapping, id_parts

    def map_fields(self, topic: str, document: dict[str, Any]) -> dict[str, Any]:
        """The canonical fields of one payload; raises _Unmappable naming the field and source."""
        mapping = self.decoding_plan[0]
        if not mapping:
            return document
        mapped: dict[str, Any] = {}
        topic_levels: list[str] | None = None
        # Plain type checks, not `match` class patterns: this runs for every MES message, and
        # a class pattern costs a `__match_args__` lookup per field (a fifth of the ingest).
        for field in mapping:
            source = field.source
            if type(source) is PayloadPath:
                try:
                    value_found: Any = _lookup(document, source.parts)
                except KeyError as exc:
                    raise _Unmappable(
                        f"field {field.target!r}: {exc.args[0]} (source "
                        f"{field.source_text!r})"
                    ) from None
            elif type(source) is TopicLevel:
                if topic_levels is None:
                    topic_levels = topic.split("/")
                if source.index >= len(topic_levels):
                    raise _Unmappable(
                        f"field {field.target!r}: topic {topic!r} has no level {source.index}"
                    )
                value_found = topic_levels[source.index]
            else:
                assert type(source) is LiteralValue
                value_found = source.value
            target_parts = field.target_parts
            if len(target_parts) == 1:
                mapped[target_parts[0]] = value_found
                continue
            node = mapped
            for part in target_parts[:-1]:
                node = node.setdefault(part, {})
            node[target_parts[-1]] = value_found
        return mapped

    def message_id(self, topic: str, payload: bytes, document: dict[str, Any]) -> str:
        """The MES message id, or a SHA-256 of topic and payload when the payload has none."""
        id_parts = self.decoding_plan[1]
        if id_parts is not None:
            try:
                value = _lookup(document, id_parts)
            except KeyError:
                value = None
            if isinstance(value, str) and value:
                return value
            if isinstance(value, int) and not isinstance(value, bool):
                return str(value)
            if value not in (None, ""):
                raise _Unmappable(
                    f"message id at {self.id_field!r} must be a string or an integer, not "
                    f"{_json_kind(value)}"
                )
        digest = hashlib.sha256(topic.encode() + b"\x00" + payload).hexdigest()
        return f"sha256:{digest}"


class MqttConfig(BaseModel):
    """An MQTT broker that MES systems publish events to."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=NAME_PATTERN,
        description="Driver name, unique in the plant; MES messages carry it as their source.",
        examples=["mes"],
    )
    reconnect_max_delay: Duration = Field(
        default=DEFAULT_RECONNECT_MAX_DELAY, gt=0, description=RECONNECT_MAX_DELAY_DOC,
        examples=["10s"])
    type: Literal["mqtt"] = Field(description="Selects this driver.")
    host: str = Field(
        min_length=1, description="Broker IP address or host name.", examples=["10.0.0.5"]
    )
    port: int = Field(
        default=1883, ge=1, le=65535, description="Broker port (8883 is usual with TLS)."
    )
    client_id: str = Field(
        default="",
        max_length=256,
        description="MQTT client id. It names the persistent session that holds messages "
        "while the gateway is away, so it must stay the same across restarts and be unique on "
        "the broker. Default: `plantsync-<name>`; set it when several gateways share a broker.",
        examples=["plantsync-1010-mes"],
    )
    persistent_session: bool = Field(
        default=True,
        description="Keep a session on the broker that queues messages while the gateway is "
        "away and sends unacknowledged ones again. false only for a recorder or a probe: "
        "nothing is kept for it, and what it has not acknowledged is lost at disconnection.",
    )
    protocol: Literal["3.1.1", "5"] = Field(
        default="5", description="MQTT protocol version."
    )
    keepalive: Duration = Field(
        default=30.0,
        ge=5,
        le=65535,
        description="Keepalive: a silent broker is declared lost after about 1.5 times this.",
        examples=["30s"],
    )
    session_expiry: Duration = Field(
        default=7 * 86400.0,
        gt=0,
        le=4294967294,
        description="MQTT 5: how long the broker keeps the session (subscriptions and "
        "unacknowledged messages) after a disconnection. Longer than any outage to ride out.",
        examples=["7d"],
    )
    username: str | None = Field(
        default=None, description="User name for broker authentication.", examples=["gateway"]
    )
    password: SecretStr | None = Field(
        default=None,
        description="Password for broker authentication; write `${ENV_VAR}`, never the password.",
    )
    tls: MqttTls | None = Field(default=None, description="TLS settings; plain TCP when omitted.")
    allow_insecure: bool = Field(
        default=False,
        description="Accept sending the password without TLS to a broker off this box (it "
        "crosses the network in cleartext); warned about at every start. Without it, such a "
        "config is refused.",
    )
    max_payload: ByteSize = Field(
        default=ByteSize(256 * 1024),
        gt=0,
        description="Largest payload accepted (e.g. 256KiB); a larger message is rejected with "
        "its size and its first max_payload bytes kept.",
    )
    batch_max: int = Field(
        default=500,
        ge=1,
        le=65535,
        description="Most messages handed over in one commit. Everything that has arrived, up "
        "to this, shares one commit; acknowledgements follow it.",
    )
    receive_maximum: int = Field(
        default=DEFAULT_RECEIVE_MAXIMUM,
        ge=1,
        le=65535,
        description="MQTT 5: most unacknowledged messages the broker may send at once (its "
        "in-flight window for the gateway). Keep the default, 65535: the broker queues what "
        "does not fit up to its max_queued_messages and drops the rest silently (a stock "
        "mosquitto lost half of a 20,000-message burst with 1000). Intake stays bounded all "
        "the same: the gateway stops reading while 4 batches wait for their commit. With MQTT "
        "3.1.1 the broker's max_inflight_messages decides.",
    )
    topics: list[MqttTopic] = Field(min_length=1, description="Subscriptions, matched in order.")

    @field_validator("password")
    @classmethod
    def _empty_is_none(cls, password: SecretStr | None) -> SecretStr | None:
        return password if password is not None and password.get_secret_value() else None

    @field_validator("topics")
    @classmethod
    def _unique_filters(cls, topics: list[MqttTopic]) -> list[MqttTopic]:
        filters = [topic.filter for topic in topics]
        repeated = sorted({f for f in filters if filters.count(f) > 1})
        if repeated:
            raise ValueError(f"topic filters must be unique; repeated: {', '.join(repeated)}")
        return topics

    @model_validator(mode="after")
    def _password_needs_username(self) -> MqttConfig:
        if self.password is not None and self.username is None:
            raise ValueError("password needs username")
        return self

    @model_validator(mode="after")
    def _default_client_id(self) -> MqttConfig:
        if not self.client_id:
            self.client_id = f"plantsync-{self.name}"
        return self

    @property
    def inflight_window(self) -> int:
        """The MQTT 5 Receive Maximum the driver announces."""
        return self.receive_maximum

    def topic_for(self, topic: str) -> MqttTopic | None:
        """The first configured topic whose filter matches `topic` (remembered per topic:
        paho builds a matcher on every call)."""
        matches = self.topic_matches
        if topic in matches:
            return matches[topic]
        found = next((candidate for candidate in self.topics
                      if mqtt.topic_matches_sub(matching_filter(candidate.filter), topic)), None)
        if len(matches) >= 10_000:
            matches.clear()
        matches[topic] = found
        return found

    @functools.cached_property
    def topic_matches(self) -> dict[str, MqttTopic | None]:
        """Topics seen so far and the configured topic each matched (a cached property, not a
        private attribute: it is read on every message, see `MqttTopic.decoding_plan`)."""
        return {}


# --- messages to readings --------------------------------------------------------------------


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
            document = json.loads(text, parse_float=decimal.Decimal,
                                  parse_constant=_no_constants)
        except RecursionError:
            return rejected("payload is not JSON: nested too deeply")
        except ValueError as exc:
            return rejected(f"payload is not JSON: {exc}")
    if not isinstance(document, dict):
        return rejected(f"payload is {_json_kind(document)}, expected a JSON object")
    try:
        fields = subscription.map_fields(topic, document)
    except _Unmappable as exc:
        # Kept with its MES id where the id can be read, so the dead letter can be traced.
        with contextlib.suppress(_Unmappable):
            found = subscription.message_id(topic, payload, document)
            return RejectedMessage(config.name, topic, payload, str(exc), received_at, found)
        return rejected(str(exc))
    try:
        message_id = subscription.message_id(topic, payload, document)
    except _Unmappable as exc:
        return rejected(str(exc))
    return MesMessage(config.name, topic, subscription.event, fields, message_id, received_at,
                      payload)


# --- one connection --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Arrival:
    mid: int
    qos: int
    topic: str
    payload: bytes
    received_at: float


@dataclass(frozen=True, slots=True)
class _Connected:
    session_present: bool


class _Connection:
    """One MQTT connection: a fresh paho client whose network loop runs in paho's thread.

    Callbacks run in paho's thread and only post to the asyncio loop. `close()` must be awaited
    whatever happened; after it, the client is never used again.
    """

    def __init__(self, config: MqttConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.inbox: collections.deque[_Arrival] = collections.deque()
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
        self._incoming: list[_Arrival] = []
        self._incoming_lock = threading.Lock()
        v5 = config.protocol == "5"
        self.client = mqtt.Client(
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
        if config.username is not None:
            password = config.password.get_secret_value() if config.password else None
            self.client.username_pw_set(config.username, password)
        if config.tls is not None:
            context = ssl.create_default_context(
                cafile=str(config.tls.ca_file) if config.tls.ca_file else None
            )
            if config.tls.cert_file is not None:
                context.load_cert_chain(
                    config.tls.cert_file, config.tls.key_file if config.tls.key_file else None
                )
            context.check_hostname = not config.tls.insecure
            self.client.tls_set_context(context)
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

    def ack(self, arrivals: Sequence[_Arrival]) -> None:
        """PUBACK the QoS 1 messages, unless the connection that delivered them has ended."""
        if self.ended is not None:
            return
        for arrival in arrivals:
            if arrival.qos == 1:
                self.client.ack(arrival.mid, 1)

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
            [(topic, 0) for topic in (*BROKER_FIGURES, BROKER_VERSION_TOPIC)])
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
        arrival = _Arrival(message.mid, message.qos, topic, payload, time.time())
        # Back-pressure on the socket: a broker that ignores our receive maximum (mosquitto
        # 2.0 lets 10-18 times more through while acks flow) must not fill our memory. While
        # the backlog is over its bound, paho's thread waits here, the socket stops being
        # read, and the broker keeps the rest.
        # (QoS 0 is not held: over its own bound it is dropped and counted, as QoS 0 allows.)
        bound = INBOX_BATCHES * self.config.batch_max
        while (message.qos == 1 and len(self.inbox) + len(self._incoming) >= bound
               and not self._closed):
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

    def _arrived(self, arrival: _Arrival) -> None:
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


# --- the driver ------------------------------------------------------------------------------


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
            f"MQTT broker {self.name} at {self.endpoint}", log, health=self.health,
            extra=self._log_extra())
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
        await reconnect_forever(lambda: self._connect_and_consume(loop, sink), self._backoff,
                                self.availability)

    async def _connect_and_consume(
        self, loop: asyncio.AbstractEventLoop, sink: SampleSink
    ) -> Ended:
        """One connection, from connect to its end."""
        connection = _Connection(self.config, loop)
        try:
            ended = await self._connect(connection)
            if ended is None:
                ended = await self._consume(connection, sink)
        finally:
            self.availability.disconnected()  # already while the connection closes
            await connection.close()
        return ended

    async def _connect(self, connection: _Connection) -> Ended | None:
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
            reset_backoff=not self._commit_failing)
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

    async def _consume(self, connection: _Connection, sink: SampleSink) -> Ended:
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

    def _count(self, readings: Sequence[Reading], batch: Sequence[_Arrival]) -> None:
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

    def _note_refusals(self, connection: _Connection) -> None:
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

    def _note_broker(self, connection: _Connection) -> None:
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
                self.name, self.endpoint, figures["sys_refused"], extra=self._log_extra())
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
            f"the gateway may be among them; {QUEUE_ADVICE}")
        self.health.record_error(f"the broker has dropped {count} message(s)")
        now = time.monotonic()
        if self._drops_logged_at is None or now - self._drops_logged_at >= DROPS_LOG_EVERY:
            self._drops_logged_at = now
            rose = "" if before is None else f" (up {count - int(before)})"
            log.warning(
                "MQTT broker %s at %s has dropped %d message(s) since it started%s, by its "
                "$SYS/broker/publish/messages/dropped (all clients): MES events for the "
                "gateway may be lost there. To stop it, %s.",
                self.name, self.endpoint, count, rose, QUEUE_ADVICE,
                extra={**self._log_extra(), "broker_dropped": count})

    def _note_dropped(self, connection: _Connection) -> None:
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



# --- plantsync doctor mqtt --------------------------------------------------------------------

BROKER_DEFAULTS: Final[dict[str, str]] = {
    "persistence": "false",
    "autosave_interval": "1800",
    "autosave_on_changes": "false",
    "max_queued_messages": "1000",
    "max_queued_bytes": "0",
    "max_inflight_messages": "20",
    "persistent_client_expiration": "",
    "user": "mosquitto",
}
"""mosquitto 2.x's defaults for the settings the doctor checks (mosquitto.conf(5))."""


@dataclass
class Finding:
    """One line of the doctor's report: `ok`, `info` or a `problem` with what to do."""

    level: Literal["ok", "info", "problem"]
    text: str


def read_sys_tree(config: MqttConfig, wait: float) -> dict[str, str]:
    """Connect as a client of its own (a clean session: never the gateway's, which it would
    take over), read the broker's `$SYS` tree for `wait` seconds and return it by topic.
    Raises OSError or RuntimeError with the reason when the broker cannot be read."""
    figures: dict[str, str] = {}
    connected = threading.Event()
    refused: list[str] = []
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                         client_id=f"plantsync-doctor-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5 if config.protocol == "5" else mqtt.MQTTv311)

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, code: ReasonCode,
                   properties: Any) -> None:
        if code.is_failure:
            refused.append(f"the broker refused the connection ({code})")
        else:
            client.subscribe("$SYS/#", 0)
        connected.set()

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        figures[message.topic] = bytes(message.payload).decode("utf-8", "replace")

    client.on_connect = on_connect
    client.on_message = on_message
    if config.username is not None:
        password = config.password.get_secret_value() if config.password else None
        client.username_pw_set(config.username, password)
    if config.tls is not None:
        context = ssl.create_default_context(
            cafile=str(config.tls.ca_file) if config.tls.ca_file else None)
        if config.tls.cert_file is not None:
            context.load_cert_chain(config.tls.cert_file, config.tls.key_file or None)
        context.check_hostname = not config.tls.insecure
        client.tls_set_context(context)
    client.connect(config.host, config.port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(CONNECT_TIMEOUT):
            raise RuntimeError(f"no CONNACK within {CONNECT_TIMEOUT:g}s")
        if refused:
            raise RuntimeError(refused[0])
        time.sleep(wait)
    finally:
        client.disconnect()
        client.loop_stop()
    return figures


def read_broker_config(path: Path) -> dict[str, str]:
    """The settings of a mosquitto.conf (the last of each wins), without its listeners."""
    settings: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        words = line.strip().split(None, 1)
        if words and not words[0].startswith("#"):
            settings[words[0]] = words[1].strip() if len(words) > 1 else ""
    return settings


def diagnose(figures: dict[str, str], settings: dict[str, str] | None) -> list[Finding]:
    """What the broker's `$SYS` tree (and its mosquitto.conf, when given) tell of the queue
    limits and persistence the gateway relies on."""
    found: list[Finding] = []
    version = figures.get(BROKER_VERSION_TOPIC)
    if not figures:
        found.append(Finding("problem", "the broker sent no $SYS figures: it does not publish "
                             "them (sys_interval 0) or its ACL hides $SYS/# from this user; "
                             "dropped messages cannot be watched by the gateway"))
    else:
        found.append(Finding("info", f"broker: {version or 'version not published'}, up "
                             f"{figures.get('$SYS/broker/uptime', '?')}"))

    def number(topic: str) -> float | None:
        with contextlib.suppress(ValueError, IndexError, KeyError):
            return float(figures[topic].split()[0])
        return None

    dropped = number("$SYS/broker/publish/messages/dropped")
    if dropped is not None and dropped > 0:
        found.append(Finding("problem", f"the broker has dropped {int(dropped)} message(s) since "
                             "it started: a client's queue was full (max_queued_messages or "
                             f"max_queued_bytes); if the gateway was that client, MES events "
                             f"are lost; {QUEUE_ADVICE}"))
    elif dropped is not None:
        found.append(Finding("ok", "the broker has dropped no message since it started"))
    uptime = number("$SYS/broker/uptime")
    offline = number("$SYS/broker/clients/disconnected")
    if uptime is not None and offline is not None and offline > 0:
        found.append(Finding("ok" if uptime < 3600 else "info",
                             f"the broker holds {int(offline)} session(s) of disconnected "
                             f"clients, {int(uptime)} s after its start"
                             + (": they survived the start, so persistence works"
                                if uptime < 3600 else "")))
    if settings is None:
        found.append(Finding("info", "queue limit and persistence settings are not in $SYS: "
                             "run on the broker's host with --broker-config "
                             "/etc/mosquitto/mosquitto.conf to check them"))
        return found
    found.extend(check_broker_settings(settings))
    return found


def check_broker_settings(settings: dict[str, str]) -> list[Finding]:
    """The mosquitto.conf settings the gateway relies on, each as ok or a problem with the fix
    (README, "MQTT broker settings")."""
    value = {**BROKER_DEFAULTS, **settings}
    found: list[Finding] = []
    if "include_dir" in settings:
        found.append(Finding("info", f"settings in include_dir {settings['include_dir']} are "
                             "not read here; check them too"))
    if value["persistence"] != "true":
        found.append(Finding("problem", "persistence is off: a broker restart loses the "
                             "gateway's session and every message queued for it; set "
                             "persistence true"))
    else:
        location = Path(value.get("persistence_location") or "/var/lib/mosquitto/")
        user = value["user"]
        found.append(_writable_by(location, user))
        if value["autosave_on_changes"] != "true" and float(value["autosave_interval"]) > 60:
            found.append(Finding("problem", f"autosave_interval {value['autosave_interval']} s: "
                                 "a broker crash loses what arrived since the last save; set "
                                 "autosave_interval 100 with autosave_on_changes true (save "
                                 "after every 100 changes)"))
        else:
            found.append(Finding("ok", f"autosave_interval {value['autosave_interval']}, "
                                 f"autosave_on_changes {value['autosave_on_changes']}"))
    queued = int(value["max_queued_messages"])
    if queued != 0:
        found.append(Finding("problem", f"max_queued_messages {queued}: beyond {queued} "
                             "messages queued for the gateway the broker drops the rest "
                             f"without telling anyone; {QUEUE_ADVICE}"))
    elif int(value["max_queued_bytes"]) == 0:
        found.append(Finding("info", "max_queued_messages 0 and max_queued_bytes 0: no limit "
                             "at all; set max_queued_bytes to what the broker may hold"))
    else:
        found.append(Finding("ok", f"max_queued_messages 0, max_queued_bytes "
                             f"{value['max_queued_bytes']}"))
    if not value["persistent_client_expiration"]:
        found.append(Finding("info", "persistent_client_expiration is not set: MQTT 3.1.1 "
                             "sessions never expire (MQTT 5 ones after the gateway's "
                             "session_expiry)"))
    return found


def _writable_by(location: Path, user: str) -> Finding:
    import pwd

    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return Finding("info", f"persistence_location {location}: no user {user!r} here to "
                       "check it against")
    try:
        status = location.stat()
    except OSError as exc:
        return Finding("problem", f"persistence_location {location} cannot be read "
                       f"({exc.strerror}): create it, owned by {user}")
    if account.pw_uid == 0:
        writable = True
    elif status.st_uid == account.pw_uid:
        writable = bool(status.st_mode & 0o200)
    elif status.st_gid == account.pw_gid:
        writable = bool(status.st_mode & 0o020)
    else:
        writable = bool(status.st_mode & 0o002)
    if not writable:
        return Finding("problem", f"persistence_location {location} is not writable by the "
                       f"broker's user {user}: mosquitto only logs the failed save, and a "
                       f"restart loses every session; chown {user} {location}")
    return Finding("ok", f"persistence_location {location} is writable by {user}")


def doctor(config: MqttConfig, broker_config: Path | None, wait: float) -> tuple[int, str]:
    """`plantsync doctor mqtt` for one driver: the exit status and the report."""
    lines = [f"MQTT broker {config.name} at {config.host}:{config.port}"]
    try:
        figures = read_sys_tree(config, wait)
    except (OSError, ValueError, RuntimeError) as exc:
        return 1, "\n".join([*lines, f"problem: cannot read the broker: {exc}"])
    settings = None
    if broker_config is not None:
        try:
            settings = read_broker_config(broker_config)
        except OSError as exc:
            lines.append(f"problem: cannot read {broker_config}: {exc.strerror}")
    findings = diagnose(figures, settings)
    lines += [f"{finding.level}: {finding.text}" for finding in findings]
    return (1 if any(f.level == "problem" for f in findings) else 0), "\n".join(lines)
