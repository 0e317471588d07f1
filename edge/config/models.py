"""The plant's configuration as pydantic models: `PlantConfig` and its sections, their fields and
their documentation (`Field(description=...)`, checked against `config/plant.example.yaml` by a
test), and what one section can check on its own. The `destinations:` section lives in
`edge.config.destinations`, the `orders:` one in `edge.config.orders`. Reading the file is
`edge.config.loader`'s job.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from drivers.common.timing import Duration
from drivers.modbus import ModbusConfig
from drivers.mqtt import MqttConfig
from drivers.opcua import OpcUaConfig
from edge.config.base import Strict
from edge.config.destinations import DestinationConfig
from edge.config.orders import OrdersConfig
from edge.model.codes import BUILTIN_UOM_CODES
from edge.ops.settings import ExceptionsConfig, ReconcileConfig

DriverConfig = Annotated[ModbusConfig | OpcUaConfig | MqttConfig, Field(discriminator="type")]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
SIGNAL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*\.[A-Za-z0-9][A-Za-z0-9_.-]*$"


class ApiConfig(Strict):
    listen: str = Field(
        "127.0.0.1:8470",
        description="host:port of the local API (/healthz, /readyz, /metrics). Loopback by "
        "default: the API is for this box and its plant systems, not the internet. Off "
        "loopback (e.g. 0.0.0.0:8470), every endpoint but /healthz, /readyz and /metrics needs "
        "the token, and the daemon refuses to start without a configured one.",
        pattern=r"^[^:\s]+:\d{1,5}$",
    )
    token: SecretStr | None = Field(
        None,
        description="Token that API calls must carry as `Authorization: Bearer ...`: calls "
        "that change something (retry, purge) always, and every call but /healthz, /readyz "
        "and /metrics when the API listens off loopback. Without one, the daemon makes a "
        "random token at each start and writes it to data_dir/api-token (readable by its user "
        "only), where the plantsync CLI on this box finds it; off loopback, set one.",
    )
    max_connections: int = Field(
        64,
        ge=4,
        le=1000,
        description="Most connections the local API holds at once. At the "
        "limit, the connection that has waited longest for its request is closed to make "
        "room, so a flood of idle or slow clients cannot shut out /healthz. Keep it well "
        "below the file limit (LimitNOFILE= in the unit).",
    )
    request_timeout: Duration = Field(
        10.0,
        gt=0,
        description="Longest a client may take to send a whole request (headers "
        "and body) once connected, or after its previous answer: a slower one is closed "
        "(408), so trickling clients cannot hold connections open.",
    )

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    @property
    def on_loopback(self) -> bool:
        """True when only this box can reach the API (127.0.0.0/8, ::1, localhost)."""
        return is_loopback_host(self.host)

    ready_max_backlog_age: Duration = Field(
        600.0,
        description="/readyz says not ready when a destination's oldest pending delivery "
        "is older than this; a shorter outage is buffering within budget.",
    )

    @field_validator("token")
    @classmethod
    def _empty_is_none(cls, token: SecretStr | None) -> SecretStr | None:
        return token if token is not None and token.get_secret_value() else None

    @model_validator(mode="after")
    def _token_off_loopback(self) -> ApiConfig:
        if not self.on_loopback and self.token is None:
            raise ValueError(
                f"listen {self.listen!r} is not a loopback address, so every call but "
                "/healthz, /readyz and /metrics needs a token, and none is set: add "
                'api.token (e.g. token: "${file:/etc/plantsync/api-token}" with a long '
                "random value in that file, mode 0600), or listen on 127.0.0.1"
            )
        return self


def is_loopback_host(host: str) -> bool:
    """Lexically: an IP address in the loopback range, or `localhost` (no name lookup: config
    validation does no I/O)."""
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(
        ".localhost"
    ):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class OutboxConfig(Strict):
    commit_interval: Duration = Field(
        0.0,
        description="Linger: longest time a commit waits for others to share its transaction. "
        "0 commits at once whatever has queued, and what arrives meanwhile shares the next "
        "transaction (group commit without added latency); a few ms helps on slow SD cards.",
    )
    commit_max_rows: int = Field(
        500, ge=1, le=100_000, description="Most events committed in one transaction."
    )
    settle_wait: Duration = Field(
        0.002,
        le=1.0,
        description="Longest time the outcome of a delivery waits for the outcomes of "
        "requests still in flight to share its transaction, only while its forwarder has more "
        "requests ready (no key waits on it). Fewer fsyncs per event: unbatched delivery "
        "about a tenth faster at 2ms (bench/forward.py). 0 turns it off.",
    )
    max_size: ByteSize = Field(
        ByteSize(2_000_000_000),
        description="Disk budget of the outbox (e.g. 500MB, 2GB). When it is reached, "
        "informational events are refused (and counted) and business events wait: drivers "
        "stop taking input until deliveries free space. Nothing business is dropped.",
    )
    journal_retention: Duration = Field(
        30 * 86400.0,
        description="How long the audit journal keeps a row per delivered event (id, type, "
        "destination, time, attempts, status, receiver's reference), and how long a "
        "delivered id is still recognised as a duplicate.",
    )


class OrderBinding(Strict):
    """A fixed order for a machine, for plants (and demos) without MES order events."""

    order_id: str = Field(description="ERP production order number.", min_length=1)
    operation: str = Field(
        "0010", description="Operation (activity) number, four digits.", pattern=r"^\d{4}$"
    )
    material: str | None = Field(None, description="Material number produced.")
    lot_id: str | None = Field(None, description="Lot (batch) being produced.")


PackMLState = Literal[
    "Clearing",
    "Stopped",
    "Starting",
    "Idle",
    "Suspended",
    "Execute",
    "Stopping",
    "Aborting",
    "Aborted",
    "Holding",
    "Held",
    "Unholding",
    "Suspending",
    "Unsuspending",
    "Resetting",
    "Completing",
    "Complete",
]
"""PackML (ISA-TR88.00.02) state names; `state_map` maps a vendor's numbers onto them."""


class MachineSignals(Strict):
    """Which tags say what the machine counts and what state it is in. Name each counter for
    what it counts: `good` (good units only), `processed` (every unit processed, good and
    defective: PackML's ProdProcessedCount), `defective` (PackML's ProdDefectiveCount). Two of
    them say it all: yield is `good`, or `processed` - `defective`; scrap is `defective`, or
    `processed` - `good`."""

    good: str | None = Field(
        None,
        description="`driver.tag` of the accumulating counter of good units.",
        pattern=SIGNAL_PATTERN,
        examples=["press-01.good"],
    )
    processed: str | None = Field(
        None,
        description="`driver.tag` of the accumulating counter of every unit processed, "
        "good and defective alike (PackML ProdProcessedCount): yield = processed - defective.",
        pattern=SIGNAL_PATTERN,
        examples=["filler-02.processed"],
    )
    defective: str | None = Field(
        None,
        description="`driver.tag` of the accumulating counter of defective (scrap) units "
        "(PackML ProdDefectiveCount).",
        pattern=SIGNAL_PATTERN,
    )
    state: str | None = Field(
        None,
        description="`driver.tag` of the numeric machine state (needs state_map).",
        pattern=SIGNAL_PATTERN,
    )
    stop_reason: str | None = Field(
        None,
        description="`driver.tag` of the numeric stop reason code active when the machine stops.",
        pattern=SIGNAL_PATTERN,
    )

    @model_validator(mode="after")
    def _counts_something(self) -> MachineSignals:
        if self.good is None and self.processed is None:
            raise ValueError(
                "name the machine's counter: good (good units only) or processed "
                "(good and defective units, as PackML's ProdProcessedCount counts)"
            )
        if self.good is not None and self.processed is not None and self.defective is not None:
            raise ValueError(
                "good, processed and defective: name two of them, the third "
                "follows (processed = good + defective)"
            )
        return self

    @property
    def counters(self) -> dict[str, str]:
        """The counter signals by what they count: `good`, `processed`, `defective`."""
        named = {"good": self.good, "processed": self.processed, "defective": self.defective}
        return {what: signal for what, signal in named.items() if signal is not None}

    def counting(self) -> str:
        """How yield and scrap follow from these counters, in words (for `check` and logs)."""
        if self.good is not None:
            scrap = (
                f"defective ({self.defective})"
                if self.defective
                else f"processed - good ({self.processed} - {self.good})"
                if self.processed
                else "0 (no defective counter)"
            )
            return f"yield = good ({self.good}); scrap = {scrap}"
        if self.defective is None:
            return f"yield = processed ({self.processed}); scrap = 0 (no defective counter)"
        return (
            f"yield = processed - defective ({self.processed} - {self.defective}); "
            f"scrap = defective ({self.defective})"
        )

    def migration_note(self) -> str | None:
        """For the one combination whose meaning changed when counters were named for what
        they count: `processed` with `defective` used to confirm processed as yield."""
        if self.good is not None or self.processed is None or self.defective is None:
            return None
        return (
            f"{self.processed} must count good and defective units, as PackML's "
            "ProdProcessedCount does. Before counters were named for what they count, "
            "`processed` meant good units only: if it counts only those, name it `good`"
        )


class ConfirmPolicy(Strict):
    every_units: int | None = Field(
        100,
        ge=1,
        description="Confirm each time this many units have been counted (good "
        "units; processed units where the machine counts processed).",
    )
    every: Duration | None = Field(
        None,
        description="Also confirm whatever is pending at each wall-clock boundary of this "
        "period (every: 15m confirms at :00, :15, :30 and :45 UTC), so a slow line still "
        "reports.",
    )
    on_state_change: bool = Field(
        False, description="Also confirm what is pending whenever the machine state changes."
    )
    uom: str = Field("C62", description="UN/ECE Rec 20 unit of the counted units.")

    @model_validator(mode="after")
    def _some_trigger(self) -> ConfirmPolicy:
        if self.every_units is None and self.every is None:
            raise ValueError("set every_units, every, or both: otherwise nothing is confirmed")
        return self


class LimitConfig(Strict):
    """A process value that must stay within [low, high]; outside for longer than `for`, it
    raises an inspection request (and a nonconformance where configured), once per excursion."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    signal: str = Field(description="`driver.tag` of the process value.", pattern=SIGNAL_PATTERN)
    characteristic: str | None = Field(
        None, description="Inspection characteristic as the QMS knows it (default: signal)."
    )
    low: float | None = Field(None, description="Lower limit (none if absent).")
    high: float | None = Field(None, description="Upper limit (none if absent).")
    for_: Duration = Field(
        0.0, alias="for", description="How long the value must stay outside before it counts."
    )
    hysteresis: float = Field(
        0.0,
        ge=0,
        description="An excursion ends only once the value is this far back inside "
        "the limits, so a value hovering at a limit does not flood the QMS.",
    )
    raise_: Literal["inspection", "nonconformance", "both"] = Field(
        "inspection", alias="raise", description="What an excursion raises."
    )
    uom: str = Field("C62", description="UN/ECE Rec 20 unit of the value (e.g. NEW, CEL, BAR).")
    defect_code: str = Field(
        "LIMIT", min_length=1, max_length=20, description="Defect code of the nonconformance."
    )
    severity: Literal["minor", "major", "critical"] = Field(
        "major", description="Severity of the nonconformance."
    )

    @model_validator(mode="after")
    def _some_limit(self) -> LimitConfig:
        if self.low is None and self.high is None:
            raise ValueError("set low, high, or both")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError("low must not be above high")
        return self


class MachineConfig(Strict):
    id: str = Field(description="Machine id, as ERP and MES know it.", pattern=NAME_PATTERN)
    line: str | None = Field(None, description="Line or work center the machine belongs to.")
    signals: MachineSignals
    order: OrderBinding | None = Field(
        None, description="Fixed order binding; without it, counts are unassigned production."
    )
    confirm: ConfirmPolicy = Field(default_factory=ConfirmPolicy)  # type: ignore[arg-type]
    counter_width: Literal[16, 32, 64] = Field(
        32, description="Bits of the counters, for rollover: a counter that wraps keeps counting."
    )
    state_map: dict[int, PackMLState] = Field(
        default_factory=dict,
        description="The machine's state numbers to PackML state names (vendors differ).",
        examples=[{2: "Stopped", 4: "Idle", 6: "Execute", 11: "Held", 17: "Complete"}],
    )
    debounce: Duration = Field(
        0.0, description="A state must last this long to count; shorter ones are ignored."
    )
    settle: Duration | None = Field(
        None,
        description="How long a state change waits for the counters' last readings "
        "(OPC UA samples each tag on its own timer, so the count of the last units before "
        "Complete can arrive after Complete): what the counters read meanwhile counts before "
        "the change. Unset: the OPC UA publishing interval plus the counters' sampling "
        "interval; 0 when one Modbus poll reads the counters with the state.",
    )
    stop_reasons: dict[int, str] = Field(
        default_factory=dict,
        description="Stop reason codes to text, for interruptions and downtime.",
    )
    limits: list[LimitConfig] = Field(default_factory=list)


class QualityConfig(Strict):
    """The order-to-quality-release loop: lots wait for a QMS disposition before ERP may use
    them, and the gateway answers "is lot X on hold?" on its local API."""

    qms: str | None = Field(
        None,
        description="Destination (profile qms_rest) whose dispositions are polled; "
        "none when dispositions arrive over MQTT only.",
    )
    poll_interval: Duration = Field(
        5.0, description="How often the QMS is asked for new dispositions."
    )
    lookup_timeout: Duration = Field(
        0.5,
        description="How long GET /lots/{lot_id} waits for the QMS when the gateway does "
        "not know the lot.",
    )
    unknown_lot: Literal["hold", "release"] = Field(
        "hold",
        description="What GET /lots/{lot_id} answers for a lot nobody knows: hold "
        "(fail closed) unless you really mean otherwise.",
    )
    inspect_produced_lots: bool = Field(
        True,
        description="Each produced lot raises inspection.requested (lot_completed) and "
        "is on hold until its disposition arrives.",
    )


class ValidationConfig(Strict):
    require_known_order: bool = Field(
        True,
        description="Reject (as an input dead letter) MES consumption and lot events for "
        "an order no machine has been bound to, instead of posting them.",
    )
    require_released_order: bool = Field(
        False,
        description="Reject (as an input dead letter) an MES order.started for an order "
        "ERP never released to this gateway, or has ended (cancelled, technically completed, "
        "closed, deleted) or locked. Needs the orders section.",
    )


class PlantConfig(Strict):
    _warnings: list[str] = PrivateAttr(default_factory=list)
    """What `parse_config` found doubtful but valid, as `file:line: field: message` lines."""

    site: str = Field(description="Plant code, as ERP knows it.", pattern=r"^[A-Za-z0-9]{1,10}$")
    data_dir: Path = Field(
        Path("/var/lib/plantsync"), description="Where the outbox database lives."
    )
    api: ApiConfig = Field(default_factory=ApiConfig)  # type: ignore[arg-type]
    shutdown_timeout: Duration = Field(
        10.0,
        description="Longest a stop waits for in-flight deliveries before leaving them "
        "in the outbox for the next start.",
    )
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)  # type: ignore[arg-type]
    validation: ValidationConfig = Field(default_factory=ValidationConfig)  # type: ignore[arg-type]
    quality: QualityConfig = Field(default_factory=QualityConfig)  # type: ignore[arg-type]
    orders: OrdersConfig | None = Field(
        None,
        description="Released orders from ERP to the MES; none: the gateway does not carry them.",
    )
    uom_codes: list[str] = Field(
        default_factory=list,
        description="Units of measure accepted on top of the built-in UN/ECE Rec 20 list.",
    )
    drivers: list[DriverConfig] = Field(default_factory=list)
    machines: list[MachineConfig] = Field(default_factory=list)
    destinations: dict[str, DestinationConfig] = Field(default_factory=dict)
    routes: dict[str, list[str]] = Field(
        default_factory=dict, description="Event type to the destinations that receive it."
    )
    reconcile: ReconcileConfig = Field(default_factory=ReconcileConfig)  # type: ignore[arg-type]
    exceptions: ExceptionsConfig = Field(default_factory=ExceptionsConfig)  # type: ignore[arg-type]

    @field_validator("destinations")
    @classmethod
    def _destination_names(
        cls, destinations: dict[str, DestinationConfig]
    ) -> dict[str, DestinationConfig]:
        for name in destinations:
            if not name.strip() or name != name.strip() or not name.isprintable():
                raise ValueError(
                    f"destination name {name!r} must be printable text without leading or"
                    " trailing spaces (it names the destination in the outbox, logs and metrics)"
                )
        return destinations

    @field_validator("uom_codes")
    @classmethod
    def _uom_format(cls, codes: list[str]) -> list[str]:
        for code in codes:
            if not re.fullmatch(r"[A-Z0-9]{2,3}", code):
                raise ValueError(f"{code!r} is not a UN/ECE Rec 20 code (2 or 3 letters/digits)")
        return codes

    @property
    def all_uom_codes(self) -> frozenset[str]:
        return BUILTIN_UOM_CODES | frozenset(self.uom_codes)

    @property
    def database_path(self) -> Path:
        return self.data_dir / "outbox.db"

    @property
    def local_access(self) -> LocalAccess:
        return LocalAccess(self.api, self.data_dir, self.site)

    def destinations_for(self, event_type: str) -> list[str]:
        return self.routes.get(event_type, [])


@dataclass(frozen=True)
class LocalAccess:
    """What the technician's commands on this box (`status`, `outbox`) need of the config:
    where the local API listens, its token, and the data directory. Read on their own, so that
    these commands work in a shell without the plant's other secrets and after an edit that
    broke another part of the file."""

    api: ApiConfig
    data_dir: Path
    site: str | None = None

    @property
    def database_path(self) -> Path:
        return self.data_dir / "outbox.db"
