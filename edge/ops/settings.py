"""The `reconcile:` and `exceptions:` sections of the config: how often and against which ERP
destination orders are reconciled, and which role hears about which exception, on which
channels. Kept apart from `edge/config.py` so that the operations code and the config loader
do not import each other; `PlantConfig` names these models, and `plantsync check` checks the
names they refer to (destinations, MQTT drivers)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from drivers.common.timing import Duration

ExceptionKind = Literal[
    "dead_letter",
    "outage",
    "held_lot",
    "missing_inspection",
    "unresolved_nonconformance",
    "blocked_order",
    "unknown_order",
    "reconciliation_mismatch",
]
EXCEPTION_KINDS: tuple[ExceptionKind, ...] = (
    "dead_letter",
    "outage",
    "held_lot",
    "missing_inspection",
    "unresolved_nonconformance",
    "blocked_order",
    "unknown_order",
    "reconciliation_mismatch",
)

DEFAULT_ROUTES: dict[ExceptionKind, list[str]] = {
    "dead_letter": ["integration"],
    "outage": ["integration"],
    "reconciliation_mismatch": ["integration"],
    "held_lot": ["supervisor"],
    "blocked_order": ["supervisor"],
    "unknown_order": ["supervisor"],
    "missing_inspection": ["quality"],
    "unresolved_nonconformance": ["quality"],
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReconcileConfig(_Section):
    """`plantsync reconcile` and the periodic reconciliation of recently ended orders."""

    erp: str | None = Field(
        None,
        description="Destination whose ERP is compared (its profile says how: "
        "sap_s4hana asks ProdnOrdConf2 and the inspection lots, canonical GETs "
        "`orders_path`/ORDER/confirmed). Default: the destination production.confirmation is "
        "routed to.",
    )
    every: Duration = Field(
        300.0,
        description="How often the daemon reconciles recently ended orders; 0 turns "
        "the periodic job off (`plantsync reconcile` still works).",
    )
    window: Duration = Field(
        86400.0, description="Orders ended within this long are reconciled by the periodic job."
    )
    settle: Duration = Field(
        120.0,
        description="An order is reconciled by the periodic job once it ended at least "
        "this long ago, so its last deliveries have arrived.",
    )
    orders_path: str = Field(
        "/orders",
        description="canonical: path under base_url of the confirmed-totals GET "
        "(`GET <orders_path>/<order_id>/confirmed`).",
    )


class MqttChannel(_Section):
    driver: str = Field(
        description="MQTT driver whose broker (host, port, TLS, credentials) "
        "carries the messages; the channel has its own client id."
    )
    topic: str = Field(
        description="Topic each exception of the role is published to (QoS 1, JSON).", min_length=1
    )


class RoleChannels(_Section):
    """Where one role hears about its exceptions. Every exception is also in `GET /exceptions`
    and `plantsync status`."""

    webhook: list[str] = Field(
        default_factory=list,
        description="Destinations (canonical profile, any base_url) that "
        "get each exception raised or cleared as a CloudEvent JSON POST, retried like any "
        "delivery.",
    )
    mqtt: MqttChannel | None = Field(None, description="An MQTT topic for the role.")


class ExceptionsConfig(_Section):
    """Exceptions by role: each kind goes to roles, each role to channels."""

    routes: dict[ExceptionKind, list[str]] = Field(
        default_factory=lambda: dict(DEFAULT_ROUTES),
        description="Exception kind to the roles that act on it (kinds: dead_letter, outage, "
        "held_lot, missing_inspection, unresolved_nonconformance, blocked_order, "
        "unknown_order, reconciliation_mismatch).",
    )
    roles: dict[str, RoleChannels] = Field(
        default_factory=dict, description="Role name to its channels."
    )
    check_every: Duration = Field(5.0, description="How often open conditions are checked.")
    outage_after: Duration = Field(
        60.0, description="A destination, driver or the QMS down this long is an outage."
    )
    missing_inspection_after: Duration = Field(
        1800.0,
        description="A produced lot with no QMS disposition after this long is a "
        "missing inspection.",
    )
