"""The MQTT driver's configuration: the broker (address, protocol 3.1.1 or 5, TLS, user, client
id, session expiry), the in-flight window and batch size, and the topics with their MES kind
and field mapping, validated without I/O; with the limits and defaults they rely on and a
complete sample entry for the README.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any, Final, Literal

import paho.mqtt.client as mqtt
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
)
from drivers.common.timing import Duration
from drivers.mqtt.topics import (
    LiteralValue,
    MappedField,
    PayloadPath,
    TopicLevel,
    Unmappable,
    check_filter,
    dotted,
    json_kind,
    lookup,
    matching_filter,
    parse_source,
)

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
    "drops the rest without telling anyone"
)

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
        description="PEM client certificate, for brokers that authenticate clients by certificate.",
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

    _mapping: tuple[MappedField, ...] = PrivateAttr(default=())

    @field_validator("filter")
    @classmethod
    def _valid_filter(cls, topic_filter: str) -> str:
        return check_filter(topic_filter)

    @field_validator("id_field")
    @classmethod
    def _valid_id_field(cls, id_field: str | None) -> str | None:
        if id_field is not None:
            dotted(id_field, "id_field")
        return id_field

    @model_validator(mode="after")
    def _compile_fields(self) -> MqttTopic:
        levels = matching_filter(self.filter).split("/")
        mapping = []
        for target, source_text in self.fields.items():
            source = parse_source(source_text)
            if isinstance(source, TopicLevel) and "#" not in levels and source.index >= len(levels):
                raise ValueError(
                    f"field {target!r}: {source_text} is past the last level of "
                    f"{self.filter!r} (levels 0 to {len(levels) - 1})"
                )
            mapping.append(MappedField(target, dotted(target, "field"), source_text, source))
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
    def decoding_plan(self) -> tuple[tuple[MappedField, ...], tuple[str, ...] | None]:
        """The compiled mapping and id path, read on every message: a cached property lives
        in the instance's `__dict__`, where a pydantic private attribute costs a `__getattr__`
        detour (about a tenth of a message's decoding)."""
        id_parts = None if self.id_field is None else dotted(self.id_field, "id_field")
        return self._mapping, id_parts

    def map_fields(self, topic: str, document: dict[str, Any]) -> dict[str, Any]:
        """The canonical fields of one payload; raises Unmappable naming the field and source."""
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
                    value_found: Any = lookup(document, source.parts)
                except KeyError as exc:
                    raise Unmappable(
                        f"field {field.target!r}: {exc.args[0]} (source {field.source_text!r})"
                    ) from None
            elif type(source) is TopicLevel:
                if topic_levels is None:
                    topic_levels = topic.split("/")
                if source.index >= len(topic_levels):
                    raise Unmappable(
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
                value = lookup(document, id_parts)
            except KeyError:
                value = None
            if isinstance(value, str) and value:
                return value
            if isinstance(value, int) and not isinstance(value, bool):
                return str(value)
            if value not in (None, ""):
                raise Unmappable(
                    f"message id at {self.id_field!r} must be a string or an integer, not "
                    f"{json_kind(value)}"
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
        default=DEFAULT_RECONNECT_MAX_DELAY,
        gt=0,
        description=RECONNECT_MAX_DELAY_DOC,
        examples=["10s"],
    )
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
    protocol: Literal["3.1.1", "5"] = Field(default="5", description="MQTT protocol version.")
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
        found = next(
            (
                candidate
                for candidate in self.topics
                if mqtt.topic_matches_sub(matching_filter(candidate.filter), topic)
            ),
            None,
        )
        if len(matches) >= 10_000:
            matches.clear()
        matches[topic] = found
        return found

    @functools.cached_property
    def topic_matches(self) -> dict[str, MqttTopic | None]:
        """Topics seen so far and the configured topic each matched (a cached property, not a
        private attribute: it is read on every message, see `MqttTopic.decoding_plan`)."""
        return {}
