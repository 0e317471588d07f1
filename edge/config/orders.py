"""The `orders:` section: released production orders from ERP to the MES (README: Orders from
ERP to the MES)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from drivers.common.timing import Duration
from drivers.mqtt.config import MqttTls
from edge.config.base import CircuitBreaker, RetryPolicy, Strict

ORDERS_DESTINATION = "mes-orders"
"""The outbox destination of released orders on their way to the MES (`orders.mes`)."""


class OrdersMesConfig(Strict):
    """The MQTT broker released orders are published to, one retained QoS 1 message per
    order."""

    host: str = Field(description="MQTT broker of the MES.", min_length=1)
    port: int = Field(1883, ge=1, le=65535, description="Broker port (8883 with TLS, usually).")
    client_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="MQTT client id of the order publisher "
        "(default plantsync-<site>-orders); not the one of the MES driver.",
    )
    username: str | None = Field(None, description="User name, if the broker wants one.")
    password: SecretStr | None = Field(None, description="Password; write `${ENV_VAR}`.")
    tls: MqttTls | None = Field(None, description="TLS settings; plain TCP when omitted.")
    allow_insecure: bool = Field(
        False,
        description="Accept sending the password without TLS to a broker off this box "
        "(warned about at every start).",
    )
    keepalive: Duration = Field(30.0, description="MQTT keepalive.")
    topic: str = Field(
        "mes/{site}/orders/{order_id}",
        min_length=1,
        description="Topic of an order's "
        "message: {site} and {order_id} are filled in; no wildcards.",
    )
    accepted_on: Literal["order_started", "ack_topic"] = Field(
        "order_started",
        description="What counts as the MES accepting a released order: its "
        "order.started (through the MQTT driver's mapping), or a message on ack_topic.",
    )
    ack_topic: str | None = Field(
        None,
        description="accepted_on ack_topic: the topic filter the MES acknowledges "
        "orders on, payload {order_id, version}; e.g. mes/1010/orders/+/ack.",
    )
    timeout: Duration = Field(
        10.0,
        description="Longest wait for the broker's PUBACK of one "
        "order message before it is retried.",
    )
    max_in_flight: int = Field(
        4, ge=1, le=64, description="Order messages awaiting PUBACK at once."
    )
    rate_limit: float | None = Field(
        None, gt=0, description="Most order messages per second (none: no limit)."
    )
    retry: RetryPolicy = Field(default_factory=RetryPolicy)  # type: ignore[arg-type]
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _topics(self) -> OrdersMesConfig:
        if "{order_id}" not in self.topic:
            raise ValueError("topic must contain {order_id}: one topic per order")
        if any(char in self.topic for char in "+#"):
            raise ValueError("topic is a topic, not a filter: no + or #")
        if self.accepted_on == "ack_topic" and self.ack_topic is None:
            raise ValueError("accepted_on ack_topic needs ack_topic")
        return self


class OrdersConfig(Strict):
    """Released production orders from ERP to the MES: polled, validated, committed to the
    outbox, published over MQTT (README: Orders from ERP to the MES)."""

    source: str = Field(
        description="Destination (profile sap_s4hana or canonical) whose "
        "released orders are polled; its URL, auth and TLS are used."
    )
    poll_interval: Duration = Field(
        30.0, description="How often ERP is asked for orders changed since the last poll."
    )
    page_size: int = Field(100, ge=1, le=1000, description="Orders asked for per request.")
    path: str = Field(
        "/orders",
        description="canonical: path of the order feed under the "
        "source's base_url (GET <path>?since=CURSOR).",
    )
    plant: str | None = Field(
        None,
        min_length=1,
        max_length=4,
        description="sap_s4hana: the ProductionPlant to ask for (default: site).",
    )
    blocked_materials: list[str] = Field(
        default_factory=list,
        description="Materials the plant must not produce (blocked in "
        "the material master): an order for one is a dead letter, never sent to the MES.",
    )
    accept_within: Duration = Field(
        900.0,
        description="An order released this long ago and not accepted by the MES "
        "counts in plantsync_orders_not_accepted.",
    )
    mes: OrdersMesConfig
