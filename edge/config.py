"""The plant's YAML configuration: models, loading, and error messages a technician can act on.

`load_config(path)` reads the YAML (keeping the line of every key), substitutes `${ENV_VAR}`
references, validates against `PlantConfig`, then checks cross references (signals name a
configured driver tag, routes name a known event type and a configured destination). Every
problem becomes one line `plant.yaml:14: drivers[0].tags[2].type: must be one of ...`, and all of
them are raised together in one `ConfigError`. Nothing here does network or disk I/O beyond
reading the file: an unreachable device is the drivers' business, at run time.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import types
import typing
import zoneinfo
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from drivers.common.timing import Duration
from drivers.modbus import ModbusConfig
from drivers.mqtt import MqttConfig
from drivers.opcua import OpcUaConfig
from edge.model import BUILTIN_UOM_CODES, EVENT_MODELS, REC21_PACKAGE_CODES

Loc = tuple[str | int, ...]

DriverConfig = Annotated[ModbusConfig | OpcUaConfig | MqttConfig, Field(discriminator="type")]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
SIGNAL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*\.[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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
        64, ge=4, le=1000, description="Most connections the local API holds at once. At the "
        "limit, the connection that has waited longest for its request is closed to make "
        "room, so a flood of idle or slow clients cannot shut out /healthz. Keep it well "
        "below the file limit (LimitNOFILE= in the unit).")
    request_timeout: Duration = Field(
        10.0, gt=0, description="Longest a client may take to send a whole request (headers "
        "and body) once connected, or after its previous answer: a slower one is closed "
        "(408), so trickling clients cannot hold connections open.")

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
        600.0, description="/readyz says not ready when a destination's oldest pending delivery "
        "is older than this; a shorter outage is buffering within budget.")

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
                "api.token (e.g. token: \"${file:/etc/plantsync/api-token}\" with a long "
                "random value in that file, mode 0600), or listen on 127.0.0.1")
        return self


def is_loopback_host(host: str) -> bool:
    """Lexically: an IP address in the loopback range, or `localhost` (no name lookup: config
    validation does no I/O)."""
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(
            ".localhost"):
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
    "Clearing", "Stopped", "Starting", "Idle", "Suspended", "Execute", "Stopping", "Aborting",
    "Aborted", "Holding", "Held", "Unholding", "Suspending", "Unsuspending", "Resetting",
    "Completing", "Complete",
]
"""PackML (ISA-TR88.00.02) state names; `state_map` maps a vendor's numbers onto them."""


class MachineSignals(Strict):
    """Which tags say what the machine counts and what state it is in. Name each counter for
    what it counts: `good` (good units only), `processed` (every unit processed, good and
    defective: PackML's ProdProcessedCount), `defective` (PackML's ProdDefectiveCount). Two of
    them say it all: yield is `good`, or `processed` - `defective`; scrap is `defective`, or
    `processed` - `good`."""

    good: str | None = Field(
        None, description="`driver.tag` of the accumulating counter of good units.",
        pattern=SIGNAL_PATTERN, examples=["press-01.good"],
    )
    processed: str | None = Field(
        None, description="`driver.tag` of the accumulating counter of every unit processed, "
        "good and defective alike (PackML ProdProcessedCount): yield = processed - defective.",
        pattern=SIGNAL_PATTERN, examples=["filler-02.processed"],
    )
    defective: str | None = Field(
        None, description="`driver.tag` of the accumulating counter of defective (scrap) units "
        "(PackML ProdDefectiveCount).", pattern=SIGNAL_PATTERN,
    )
    state: str | None = Field(
        None, description="`driver.tag` of the numeric machine state (needs state_map).",
        pattern=SIGNAL_PATTERN,
    )
    stop_reason: str | None = Field(
        None, description="`driver.tag` of the numeric stop reason code active when the "
        "machine stops.", pattern=SIGNAL_PATTERN,
    )

    @model_validator(mode="after")
    def _counts_something(self) -> MachineSignals:
        if self.good is None and self.processed is None:
            raise ValueError("name the machine's counter: good (good units only) or processed "
                             "(good and defective units, as PackML's ProdProcessedCount counts)")
        if self.good is not None and self.processed is not None and self.defective is not None:
            raise ValueError("good, processed and defective: name two of them, the third "
                             "follows (processed = good + defective)")
        return self

    @property
    def counters(self) -> dict[str, str]:
        """The counter signals by what they count: `good`, `processed`, `defective`."""
        named = {"good": self.good, "processed": self.processed, "defective": self.defective}
        return {what: signal for what, signal in named.items() if signal is not None}

    def counting(self) -> str:
        """How yield and scrap follow from these counters, in words (for `check` and logs)."""
        if self.good is not None:
            scrap = (f"defective ({self.defective})" if self.defective else
                     f"processed - good ({self.processed} - {self.good})" if self.processed else
                     "0 (no defective counter)")
            return f"yield = good ({self.good}); scrap = {scrap}"
        if self.defective is None:
            return f"yield = processed ({self.processed}); scrap = 0 (no defective counter)"
        return (f"yield = processed - defective ({self.processed} - {self.defective}); "
                f"scrap = defective ({self.defective})")

    def migration_note(self) -> str | None:
        """For the one combination whose meaning changed when counters were named for what
        they count: `processed` with `defective` used to confirm processed as yield."""
        if self.good is not None or self.processed is None or self.defective is None:
            return None
        return (f"{self.processed} must count good and defective units, as PackML's "
                "ProdProcessedCount does. Before counters were named for what they count, "
                "`processed` meant good units only: if it counts only those, name it `good`")


class ConfirmPolicy(Strict):
    every_units: int | None = Field(
        100, ge=1, description="Confirm each time this many units have been counted (good "
        "units; processed units where the machine counts processed)."
    )
    every: Duration | None = Field(
        None,
        description="Also confirm whatever is pending at each wall-clock boundary of this "
        "period (every: 15m confirms at :00, :15, :30 and :45 UTC), so a slow line still "
        "reports.",
    )
    on_state_change: bool = Field(
        False, description="Also confirm what is pending whenever the machine state changes.")
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

    signal: str = Field(description="`driver.tag` of the process value.",
                        pattern=SIGNAL_PATTERN)
    characteristic: str | None = Field(
        None, description="Inspection characteristic as the QMS knows it (default: signal).")
    low: float | None = Field(None, description="Lower limit (none if absent).")
    high: float | None = Field(None, description="Upper limit (none if absent).")
    for_: Duration = Field(0.0, alias="for",
                           description="How long the value must stay outside before it counts.")
    hysteresis: float = Field(
        0.0, ge=0, description="An excursion ends only once the value is this far back inside "
        "the limits, so a value hovering at a limit does not flood the QMS.")
    raise_: Literal["inspection", "nonconformance", "both"] = Field(
        "inspection", alias="raise", description="What an excursion raises.")
    uom: str = Field("C62", description="UN/ECE Rec 20 unit of the value (e.g. NEW, CEL, BAR).")
    defect_code: str = Field("LIMIT", min_length=1, max_length=20,
                             description="Defect code of the nonconformance.")
    severity: Literal["minor", "major", "critical"] = Field(
        "major", description="Severity of the nonconformance.")

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
        0.0, description="A state must last this long to count; shorter ones are ignored.")
    settle: Duration | None = Field(
        None, description="How long a state change waits for the counters' last readings "
        "(OPC UA samples each tag on its own timer, so the count of the last units before "
        "Complete can arrive after Complete): what the counters read meanwhile counts before "
        "the change. Unset: the OPC UA publishing interval plus the counters' sampling "
        "interval; 0 when one Modbus poll reads the counters with the state.")
    stop_reasons: dict[int, str] = Field(
        default_factory=dict, description="Stop reason codes to text, for interruptions and "
        "downtime.")
    limits: list[LimitConfig] = Field(default_factory=list)


class NoAuth(Strict):
    type: Literal["none"] = "none"


class BearerAuth(Strict):
    type: Literal["bearer"]
    token: SecretStr = Field(description="Bearer token; write `${ENV_VAR}`, never the token.")


class ApiKeyAuth(Strict):
    type: Literal["api_key"]
    header: str = Field("X-API-Key", description="Header that carries the key.")
    key: SecretStr = Field(description="API key; write `${ENV_VAR}`, never the key.")


class OAuth2ClientCredentials(Strict):
    type: Literal["oauth2_client_credentials"]
    token_url: str = Field(description="The token endpoint.", pattern=r"^https?://")
    client_id: str = Field(description="Client id.")
    client_secret: SecretStr = Field(
        description="Client secret; write `${ENV_VAR}` or `${cred:NAME}` (a systemd "
        "credential), never the secret.")
    scope: str | None = Field(None, description="Scope to ask for, if the server wants one.")
    refresh_before: Duration = Field(
        60.0, description="Fetch a new token this long before the current one expires.")
    timeout: Duration = Field(10.0, description="Timeout of a token request.")


Auth = Annotated[NoAuth | BearerAuth | ApiKeyAuth | OAuth2ClientCredentials,
                 Field(discriminator="type")]


class TlsConfig(Strict):
    verify: bool = Field(
        True, description="Verify the server's certificate. Turning it off is logged as a "
        "warning at every start: it lets anyone on the path read and change what is sent.")
    ca_file: Path | None = Field(None, description="CA bundle to verify the server with "
                                 "(a plant's own CA), instead of the system's.")
    cert_file: Path | None = Field(None, description="Client certificate, for mutual TLS.")
    key_file: Path | None = Field(None, description="Key of the client certificate.")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class CircuitBreaker(Strict):
    failures: int = Field(5, ge=1, description="Consecutive failed attempts that open it.")
    open_for: Duration = Field(
        30.0, description="How long it stays open (no requests) before one probe is let "
        "through; the probe's success closes it.")


class RetryPolicy(Strict):
    base: Duration = Field(1.0, description="First retry waits up to this long (full jitter).")
    cap: Duration = Field(300.0, description="Longest wait between two attempts.")


Profile = Literal["canonical", "sap_s4hana", "qms_rest"]


class SapUsageDecision(Strict):
    """One usage decision as the plant's QM catalogue spells it (catalog type 3, a selected
    set of the plant, a code group and a code): SAP has no fixed codes for "release"."""

    code: str = Field(description="InspectionLotUsageDecisionCode, e.g. A.", min_length=1)
    code_group: str = Field(description="InspLotUsageDecisionCodeGroup.", min_length=1)
    selected_set: str = Field(description="InspLotUsgeDcsnSelectedSet (the plant's selected "
                              "set of usage decision codes).", min_length=1)
    selected_set_plant: str | None = Field(
        None, min_length=1, description="SelectedCodeSetPlant; default: the event's plant "
        "(site).")
    catalog: str = Field("3", min_length=1, description="InspLotUsageDecisionCatalog: the "
                         "catalog type of usage decisions, 3 in a standard system.")


class SapUnit(Strict):
    """How SAP spells one canonical (UN/ECE Rec 20) unit."""

    iso: str | None = Field(None, min_length=1, description="SAP's ISO code of the unit "
                            "(T006-ISOCODE), sent in ConfirmationUnitISOCode / "
                            "EntryUnitISOCode; e.g. PCE for piece.")
    internal: str | None = Field(None, min_length=1, description="SAP's unit as the OData "
                                 "service takes it in ConfirmationUnit / EntryUnit (T006, "
                                 "e.g. PC or ST for piece, KG); the plant's ERP decides.")


class SapConfig(Strict):
    """What only a sap_s4hana destination needs: the plant's time zone, its units, its usage
    decision codes and where produced goods are received."""

    time_zone: str = Field(
        "UTC", description="The plant's time zone (IANA name, e.g. Europe/Berlin): "
        "PostingDate is the event's date there, so goods produced before midnight and sent "
        "after an outage land in the day (and period) they were produced.")
    unit_fields: Literal["iso", "internal", "both"] = Field(
        "iso", description="Which SAP unit fields carry the unit: iso (ConfirmationUnitISOCode, "
        "EntryUnitISOCode; the same on every SAP system), internal (ConfirmationUnit, "
        "EntryUnit; as the plant's T006 spells them), or both. Material documents "
        "(consumption) have only EntryUnit, so consumed units always need an internal code.")
    units: dict[str, SapUnit] = Field(
        default_factory=dict, description="Canonical Rec 20 unit to SAP unit, on top of the "
        "defaults (README: destination table): e.g. {C62: {iso: PCE, internal: PC}}.")
    usage_decisions: dict[Literal["release", "reject"], SapUsageDecision] = Field(
        default_factory=dict, description="The usage decision posted for each QMS "
        "disposition. Hold is no usage decision in SAP (the lot stays in quality-inspection "
        "stock): nothing is posted for it.")
    goods_receipt_storage_location: str | None = Field(
        None, min_length=1, description="StorageLocation of the goods receipt (101) of "
        "produced lots; none: the order's own receiving location.")
    order_item: str = Field("0001", pattern=r"^\d{1,4}$",
                            description="OrderItem the produced lot is received for.")
    consumption: Literal["material_document"] = Field(
        "material_document", description="How material.consumed is posted: a goods issue "
        "(GoodsMovementCode 03, movement 261) through API_MATERIAL_DOCUMENT_SRV.")

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{name!r} is not an IANA time zone (e.g. Europe/Berlin, "
                             "America/Chicago, UTC)") from None
        return name

PROFILE_EVENT_TYPES: dict[str, frozenset[str] | None] = {
    "canonical": None,  # every type
    "sap_s4hana": frozenset({"production.confirmation", "material.consumed",
                             "lot.disposition"}),
    "qms_rest": frozenset({"inspection.requested", "inspection.result",
                           "nonconformance.raised"}),
}
"""Which event types each profile can map (None: all of them)."""


class DestinationConfig(Strict):
    base_url: str = Field(description="Base URL of the API.", pattern=r"^https?://")
    profile: Profile = Field(
        "canonical", description="How events are shaped for this target: canonical "
        "(CloudEvents JSON, Idempotency-Key), sap_s4hana (production order confirmation and "
        "usage decision OData services), qms_rest (a generic REST QMS).")
    path: str = Field("/events", description="canonical: path under base_url that takes one "
                      "event; sap_s4hana and qms_rest know their own paths.")
    batch_path: str | None = Field(
        None, description="canonical: path that takes a batch "
        "(application/cloudevents-batch+json); default: the same as path.")
    batch_size: int = Field(
        1, ge=1, le=1000, description="Events per request where the profile supports "
        "batches (canonical). Batching is where the throughput is.")
    timeout: Duration = Field(10.0, description="Timeout of one request.")
    max_in_flight: int = Field(
        4, ge=1, le=64, description="Requests in flight at once. Keep it small: ERP APIs and "
        "HTTP clients both degrade with many concurrent requests."
    )
    rate_limit: float | None = Field(
        None, gt=0, description="Most events per second sent to this target (none: no limit).")
    http_transport: Literal["aiohttp", "httpcore"] = Field(
        "aiohttp", description="What carries the requests under httpx's API: aiohttp's "
        "connection pool and parser (about twice the requests per second of httpcore on this "
        "gateway's hardware, see the README's benchmarks), or httpx's own httpcore. Behind a "
        "proxy given by HTTPS_PROXY/HTTP_PROXY, choose httpcore: the aiohttp transport does "
        "not read those variables.")
    auth: Auth = Field(default_factory=NoAuth)
    tls: TlsConfig = Field(default_factory=TlsConfig)  # type: ignore[arg-type]
    allow_insecure: bool = Field(
        False, description="Accept sending this destination's credentials (token, API key, "
        "OAuth client secret) over plain http:// to a host off this box, where anyone on the "
        "path reads them; warned about at every start. Without it, such a config is refused.")
    retry: RetryPolicy = Field(default_factory=RetryPolicy)  # type: ignore[arg-type]
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker)  # type: ignore[arg-type]
    sap: SapConfig = Field(default_factory=SapConfig)  # type: ignore[arg-type]


class QualityConfig(Strict):
    """The order-to-quality-release loop: lots wait for a QMS disposition before ERP may use
    them, and the gateway answers "is lot X on hold?" on its local API."""

    qms: str | None = Field(
        None, description="Destination (profile qms_rest) whose dispositions are polled; "
        "none when dispositions arrive over MQTT only.")
    poll_interval: Duration = Field(5.0, description="How often the QMS is asked for new "
                                    "dispositions.")
    lookup_timeout: Duration = Field(
        0.5, description="How long GET /lots/{lot_id} waits for the QMS when the gateway does "
        "not know the lot.")
    unknown_lot: Literal["hold", "release"] = Field(
        "hold", description="What GET /lots/{lot_id} answers for a lot nobody knows: hold "
        "(fail closed) unless you really mean otherwise.")
    inspect_produced_lots: bool = Field(
        True, description="Each produced lot raises inspection.requested (lot_completed) and "
        "is on hold until its disposition arrives.")


class ValidationConfig(Strict):
    require_known_order: bool = Field(
        True, description="Reject (as an input dead letter) MES consumption and lot events for "
        "an order no machine has been bound to, instead of posting them.")


class PlantConfig(Strict):
    _warnings: list[str] = PrivateAttr(default_factory=list)
    """What `parse_config` found doubtful but valid, as `file:line: field: message` lines."""

    site: str = Field(description="Plant code, as ERP knows it.", pattern=r"^[A-Za-z0-9]{1,10}$")
    data_dir: Path = Field(
        Path("/var/lib/plantsync"), description="Where the outbox database lives."
    )
    api: ApiConfig = Field(default_factory=ApiConfig)  # type: ignore[arg-type]
    shutdown_timeout: Duration = Field(
        10.0, description="Longest a stop waits for in-flight deliveries before leaving them "
        "in the outbox for the next start.")
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)  # type: ignore[arg-type]
    validation: ValidationConfig = Field(default_factory=ValidationConfig)  # type: ignore[arg-type]
    quality: QualityConfig = Field(default_factory=QualityConfig)  # type: ignore[arg-type]
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


class ConfigError(Exception):
    """A config file that cannot be used; `problems` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


# ---------------------------------------------------------------------------------------------
# YAML with line numbers


class _Problem(Exception):
    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


_ENV_REF = re.compile(r"\$\{(?:(cred|file):([^}]+)|([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?)\}")


class _Document:
    """YAML turned into plain data, remembering the line of each key and list item."""

    def __init__(self, text: str, environ: Mapping[str, str], *, offline: bool = False
                 ) -> None:
        self.lines: dict[Loc, int] = {}
        self.problems: list[_Problem] = []
        self.unresolved: dict[Loc, list[str]] = {}
        """Offline: the references left unresolved, by where they are."""
        self._environ = environ
        self._offline = offline
        self._scalars = yaml.SafeLoader("")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        self.data: Any = {} if root is None else self._build(root, ())

    def _build(self, node: yaml.Node, loc: Loc) -> Any:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            mapping: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    child = (*loc, "<<")
                    self.lines[child] = key_node.start_mark.line + 1
                    self.problems.append(_Problem(child, "YAML merge keys (<<: *name) are not "
                                                  "supported: write the settings out in full "
                                                  "(an anchor may still stand for a whole value)"))
                    continue
                key = str(self._scalars.construct_object(key_node))
                child = (*loc, key)
                self.lines[child] = key_node.start_mark.line + 1
                if key in mapping:
                    self.problems.append(_Problem(child, "duplicate key"))
                mapping[key] = self._build(value_node, child)
            return mapping
        if isinstance(node, yaml.SequenceNode):
            return [self._build(item, (*loc, i)) for i, item in enumerate(node.value)]
        try:
            value = self._scalars.construct_object(node)
        except (ValueError, TypeError, OverflowError, yaml.YAMLError) as exc:  # `!!int 256KiB`
            # PyYAML's own text goes on to quote the line with a caret: the problem already
            # names file and line, and stays one line.
            reason = str(exc).split("\n", 1)[0]
            self.problems.append(_Problem(loc, f"cannot read this value: {reason}"))
            return None
        if isinstance(value, str) and "${" in value:
            value = self._substitute(value, loc)
        return value

    def _substitute(self, text: str, loc: Loc) -> str:
        def replace(match: re.Match[str]) -> str:
            kind, where, name, default = match.groups()
            if self._offline:
                if default is not None:
                    return default
                self.unresolved.setdefault(loc, []).append(match.group(0))
                return OFFLINE_PLACEHOLDER
            if kind is not None:
                return self._read_secret(kind, where, loc)
            if name in self._environ:
                return self._environ[name]
            if default is not None:
                return default
            self.problems.append(_Problem(loc, f"environment variable {name} is not set"))
            return ""

        return _ENV_REF.sub(replace, text)

    def _read_secret(self, kind: str, where: str, loc: Loc) -> str:
        """`${file:/path}` or `${cred:NAME}` (a systemd credential, LoadCredential=): the
        file's content without the trailing newline."""
        if kind == "cred":
            directory = self._environ.get("CREDENTIALS_DIRECTORY")
            if not directory:
                self.problems.append(_Problem(loc, f"${{cred:{where}}} needs systemd's "
                                                   "CREDENTIALS_DIRECTORY (LoadCredential=)"))
                return ""
            path = Path(directory) / where
        else:
            path = Path(where)
        try:
            return path.read_text().rstrip("\n")
        except OSError as exc:
            self.problems.append(_Problem(loc, f"cannot read the secret file {path}: "
                                               f"{exc.strerror}"))
            return ""

    def line_of(self, loc: Loc) -> int:
        for end in range(len(loc), -1, -1):
            line = self.lines.get(loc[:end])
            if line is not None:
                return line
        return 1


def format_loc(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


def _data_loc(data: Any, loc: Sequence[Any]) -> Loc:
    """Drop the union tags pydantic inserts into error paths (e.g. `modbus` in
    `drivers.0.modbus.tags`) so the path matches what the technician wrote."""
    clean: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, list) and isinstance(part, int):
            clean.append(part)
            node = node[part] if part < len(node) else None
        elif isinstance(node, dict):
            if part in node:
                clean.append(part)
                node = node[part]
            elif node.get("type") == part or not isinstance(part, str) or "[" in part:
                continue  # discriminator tag or pydantic's type label, not a key of the file
            else:
                clean.append(part)
                node = None
        elif isinstance(part, str) and ("[" in part or part.startswith("function-")):
            continue
        else:
            clean.append(part)
            node = None
    return tuple(clean)


def _model_at(loc: Loc, data: Any) -> type[BaseModel] | None:
    """The config model that describes the mapping at `loc`, to suggest field names."""
    annotation: Any = PlantConfig
    node = data
    for part in loc:
        annotation = _pick_model(annotation, node)
        if isinstance(part, int) or (annotation is None):
            args = typing.get_args(annotation) if annotation is not None else ()
            annotation = args[-1] if args else None
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part)
            annotation = field.annotation if field else None
        else:  # dict[str, X]
            args = typing.get_args(annotation)
            annotation = args[-1] if args else None
        node = node.get(part) if isinstance(node, dict) else (
            node[part] if isinstance(node, list) and isinstance(part, int)
            and part < len(node) else None)
    annotation = _pick_model(annotation, node)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) \
        else None


def _pick_model(annotation: Any, node: Any) -> Any:
    """Unwrap Annotated/Optional/unions down to the member that matches `node`'s `type`."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        for model in models:
            tag = model.model_fields.get("type")
            if tag is not None and isinstance(node, dict) and node.get("type") in typing.get_args(
                tag.annotation
            ):
                return model
        return models[0] if len(models) == 1 else (members[0] if len(members) == 1
                                                   else annotation)
    return annotation


def _is_type_tag(loc: Loc, data: Any) -> bool:
    """True when `loc` is a `type` that selects a kind of section (`type: modbus`), as
    opposed to a setting that happens to be called type (a tag's `type: uint32`)."""
    model = _model_at(loc[:-1], data)
    field = model.model_fields.get("type") if model is not None else None
    return field is not None and len(typing.get_args(field.annotation)) == 1


def _message(error: Mapping[str, Any], loc: Loc, data: Any) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}".replace(" or ", ", ")
    if kind == "union_tag_invalid":
        return f"type must be one of {ctx.get('expected_tags', '')}"
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1], data)
        hint = ""
        if model is not None:
            close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else (
                f" (known keys: {', '.join(model.model_fields)})")
        return f"unknown key{hint}"
    if kind == "missing":
        return "is required"
    text = str(error["msg"]).removeprefix("Value error, ")
    return text[:1].lower() + text[1:]


def _cross_check(config: PlantConfig) -> Iterator[_Problem]:
    tags = {f"{d.name}.{t.name}" for d in config.drivers for t in getattr(d, "tags", ())}

    def unknown_signal(signal: str, loc: Loc) -> Iterator[_Problem]:
        if signal not in tags:
            known = difflib.get_close_matches(signal, sorted(tags), n=1)
            hint = f" (did you mean {known[0]!r}?)" if known else ""
            yield _Problem(loc, f"no driver tag named {signal!r}{hint}")

    def unknown_uom(code: str, loc: Loc) -> Iterator[_Problem]:
        if code not in config.all_uom_codes:
            yield _Problem(loc, f"{code!r} is not a known UN/ECE Rec 20 unit code; add it to "
                           "uom_codes if your ERP uses it")

    names: dict[str, int] = {}
    for i, driver in enumerate(config.drivers):
        if driver.name in names:
            yield _Problem(("drivers", i, "name"), f"driver {driver.name!r} is defined twice")
        names[driver.name] = i
    machine_ids: set[str] = set()
    for i, machine in enumerate(config.machines):
        at: Loc = ("machines", i)
        if machine.id in machine_ids:
            yield _Problem((*at, "id"), f"machine {machine.id!r} is defined twice")
        machine_ids.add(machine.id)
        for key, signal in machine.signals.model_dump().items():
            if signal is not None:
                yield from unknown_signal(signal, (*at, "signals", key))
        if machine.signals.state is not None and not machine.state_map:
            yield _Problem((*at, "state_map"), "signals.state needs a state_map (the machine's "
                           "state numbers to PackML names, e.g. {6: Execute, 11: Held})")
        yield from unknown_uom(machine.confirm.uom, (*at, "confirm", "uom"))
        for j, limit in enumerate(machine.limits):
            yield from unknown_signal(limit.signal, (*at, "limits", j, "signal"))
            yield from unknown_uom(limit.uom, (*at, "limits", j, "uom"))
    for loc, what, host in cleartext_secrets(config):
        if not _allows_insecure(config, loc):
            yield _Problem(loc, f"{what} would cross the network in cleartext to {host}: use "
                           "TLS (https://, or tls: for a broker), or set allow_insecure: true "
                           "in this section if the network is trusted")
    qms = config.quality.qms
    if qms is not None and (destination := config.destinations.get(qms)) is None:
        yield _Problem(("quality", "qms"), f"no destination named {qms!r} under destinations")
    elif qms is not None and destination is not None and destination.profile != "qms_rest":
        yield _Problem(("quality", "qms"), f"destination {qms!r} has profile "
                       f"{destination.profile}; dispositions are polled from a qms_rest one")
    yield from _sap_problems(config)
    for event_type, destinations in config.routes.items():
        if event_type not in EVENT_MODELS:
            close = difflib.get_close_matches(event_type, list(EVENT_MODELS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            yield _Problem(("routes", event_type), f"unknown event type{hint}")
        for j, name in enumerate(destinations):
            destination = config.destinations.get(name)
            if destination is None:
                yield _Problem(("routes", event_type, j),
                               f"no destination named {name!r} under destinations")
                continue
            supported = PROFILE_EVENT_TYPES[destination.profile]
            if supported is not None and event_type not in supported:
                yield _Problem(("routes", event_type, j),
                               f"destination {name!r} (profile {destination.profile}) cannot "
                               f"take {event_type}; it takes {', '.join(sorted(supported))}")


def _sap_problems(config: PlantConfig) -> Iterator[_Problem]:
    """Values in the file that a sap_s4hana destination would send and SAP would refuse:
    longer than SAP's field, or settings SAP needs that are missing."""
    # Imported here: the profile imports this module for its config types.
    from edge.forward.profiles.sap_s4hana import CONFIG_LIMITS, FIELD_LIMITS

    limits = {**FIELD_LIMITS, **CONFIG_LIMITS}
    for name, destination in config.destinations.items():
        at: Loc = ("destinations", name, "sap")
        if destination.profile != "sap_s4hana":
            if "sap" in destination.model_fields_set:
                yield _Problem(at, f"sap settings apply to profile sap_s4hana, not "
                               f"{destination.profile}")
            continue

        def too_long(value: str | None, field: str, loc: Loc,
                     destination: str = name) -> Iterator[_Problem]:
            limit = limits[field]
            if value is not None and len(value) > limit.max_length:
                yield _Problem(loc, f"{value!r} has {len(value)} characters; SAP's "
                               f"{limit.name} takes at most {limit.max_length} (destination "
                               f"{destination!r})")

        yield from too_long(config.site, "site", ("site",))
        for i, machine in enumerate(config.machines):
            if machine.order is not None:
                for field in ("order_id", "operation", "material", "lot_id"):
                    yield from too_long(getattr(machine.order, field), field,
                                        ("machines", i, "order", field))
        sap = destination.sap
        yield from too_long(sap.goods_receipt_storage_location,
                            "goods_receipt_storage_location",
                            (*at, "goods_receipt_storage_location"))
        yield from too_long(sap.order_item, "order_item", (*at, "order_item"))
        for disposition, decision in sap.usage_decisions.items():
            for field in ("code", "code_group", "selected_set", "selected_set_plant",
                          "catalog"):
                yield from too_long(getattr(decision, field), field,
                                    (*at, "usage_decisions", disposition, field))
        for uom, unit in sap.units.items():
            for field in ("iso", "internal"):
                yield from too_long(getattr(unit, field), field, (*at, "units", uom, field))
        if name in config.routes.get("lot.disposition", []):
            for disposition in ("release", "reject"):
                if disposition not in sap.usage_decisions:
                    yield _Problem((*at, "usage_decisions"), f"lot.disposition goes to "
                                   f"{name!r}: set the usage decision code, code_group and "
                                   f"selected_set SAP posts for {disposition}")


def _rec20_units(data: Any) -> Iterator[tuple[Loc, str]]:
    """Replace, in place, the Rec 21 package codes an earlier release took as units (BX, CT,
    PF...) by their Rec 20 codes (XBX, XCT, XPX...), saying where."""
    def replaced(code: object, loc: Loc) -> Iterator[tuple[Loc, str]]:
        if isinstance(code, str) and code in REC21_PACKAGE_CODES:
            yield loc, (f"{code!r} is a UN/ECE Rec 21 package code, not a Rec 20 unit; read as "
                        f"{REC21_PACKAGE_CODES[code]!r}: write that")

    if not isinstance(data, dict):
        return
    codes = data.get("uom_codes")
    if isinstance(codes, list):
        for i, code in enumerate(codes):
            for found in replaced(code, ("uom_codes", i)):
                codes[i] = REC21_PACKAGE_CODES[code]
                yield found
    machines = data.get("machines")
    for i, machine in enumerate(machines if isinstance(machines, list) else []):
        if not isinstance(machine, dict):
            continue
        confirm = machine.get("confirm")
        if isinstance(confirm, dict):
            for found in replaced(confirm.get("uom"), ("machines", i, "confirm", "uom")):
                confirm["uom"] = REC21_PACKAGE_CODES[confirm["uom"]]
                yield found
        limits = machine.get("limits")
        for j, limit in enumerate(limits if isinstance(limits, list) else []):
            if isinstance(limit, dict):
                for found in replaced(limit.get("uom"), ("machines", i, "limits", j, "uom")):
                    limit["uom"] = REC21_PACKAGE_CODES[limit["uom"]]
                    yield found
    destinations = data.get("destinations")
    for name, destination in (destinations.items() if isinstance(destinations, dict) else []):
        units = destination.get("sap", {}).get("units") if isinstance(destination, dict) and (
            isinstance(destination.get("sap"), dict)) else None
        if isinstance(units, dict):
            for code in [code for code in units if code in REC21_PACKAGE_CODES]:
                yield from replaced(code, ("destinations", name, "sap", "units", code))
                units[REC21_PACKAGE_CODES[code]] = units.pop(code)


OFFLINE_PLACEHOLDER = "offline-unresolved"
"""What `check --offline` puts where a `${...}` reference would be resolved."""


def _read_document(text: str, filename: str, environ: Mapping[str, str], *,
                   offline: bool) -> _Document:
    """The YAML as a document, or ConfigError with one line: file:line and what to do, in
    plain words rather than the parser's."""
    try:
        return _Document(text, environ, offline=offline)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError([f"{filename}:{line}: (file): {_yaml_hint(exc, text)}"]) from None
    except yaml.YAMLError as exc:  # e.g. a control character the reader refuses
        position = getattr(exc, "position", None)
        line = text.count("\n", 0, position) + 1 if isinstance(position, int) else 1
        reason = str(getattr(exc, "reason", None) or exc).splitlines()[0]
        raise ConfigError([f"{filename}:{line}: (file): a character YAML does not allow "
                           f"({reason}): remove it or put the value in quotes"]) from None
    except RecursionError:
        raise ConfigError([f"{filename}:1: (file): anchors nested too deep (an alias that "
                           "refers to itself?)"]) from None


_INI_SECTION = re.compile(r"^\s*\[[^\]]+\]\s*$")
_INI_SETTING = re.compile(r"^\s*[\w.-]+\s*=")


def _yaml_hint(exc: yaml.MarkedYAMLError, text: str) -> str:
    """What a YAML syntax error most likely means, for someone editing the file by hand."""
    problem = str(exc.problem or "")
    lines = [line for line in text.splitlines() if line.strip() and not
             line.lstrip().startswith(("#", ";"))]
    if lines and _INI_SECTION.match(lines[0]) and any(_INI_SETTING.match(x) for x in lines):
        return ("this looks like an INI file ([section], key = value), but the config is "
                "YAML (key: value, sections by indentation): start from "
                "config/plant.example.yaml")
    if "'\\t'" in problem or "\t" in problem:
        return "a tab character: YAML indents with spaces only; replace the tab with spaces"
    if "mapping values are not allowed" in problem:
        return ("a 'key:' where none can start: the line is indented deeper than its "
                "section's keys, or a value holds ': ' (put such a value in quotes)")
    if "expected <block end>" in problem or "did not find expected key" in problem or (
            "expected <block mapping start>" in problem):
        return ("the indentation does not line up: keys of one section start in the same "
                "column, list items (- ...) too, with spaces only")
    if "end of stream" in problem and "quoted" in str(exc.context or ""):
        start = exc.context_mark.line + 1 if exc.context_mark else None
        return ("a quote is never closed" + (f" (it opens on line {start})" if start else "")
                + ": close it, or drop the quotes")
    if "found undefined alias" in problem:
        return f"{problem}: define the anchor (&name) before its use (*name)"
    return f"not valid YAML here ({problem or exc}); compare with config/plant.example.yaml"


def cleartext_secrets(config: PlantConfig) -> Iterator[tuple[Loc, str, str]]:
    """Secrets the config would send without TLS to a host off this box: where, what, to
    which host. (On loopback, nothing crosses a network.)"""
    for i, driver in enumerate(config.drivers):
        if isinstance(driver, MqttConfig) and driver.password is not None and (
                driver.tls is None and not is_loopback_host(driver.host)):
            yield (("drivers", i, "password"), f"driver {driver.name}'s MQTT password",
                   driver.host)
    for name, destination in config.destinations.items():
        if not isinstance(destination, DestinationConfig):
            continue  # offline, not built (see fully_validated)
        auth = destination.auth
        at: Loc = ("destinations", name)
        base = urlsplit(destination.base_url)
        if not isinstance(auth, NoAuth) and base.scheme == "http" and not is_loopback_host(
                base.hostname or ""):
            yield ((*at, "base_url"), f"destination {name}'s {auth.type} credentials",
                   base.hostname or "?")
        if isinstance(auth, OAuth2ClientCredentials):
            token = urlsplit(auth.token_url)
            if token.scheme == "http" and not is_loopback_host(token.hostname or ""):
                yield ((*at, "auth", "token_url"), f"destination {name}'s OAuth client secret",
                       token.hostname or "?")


def _allows_insecure(config: PlantConfig, loc: Loc) -> bool:
    section: Any = config.drivers[int(loc[1])] if loc[0] == "drivers" else (
        config.destinations[str(loc[1])])
    return bool(getattr(section, "allow_insecure", False))


def parse_config(
    text: str, filename: str = "<config>", environ: Mapping[str, str] | None = None, *,
    offline: bool = False,
) -> PlantConfig:
    """Validate YAML text; raise ConfigError with every problem, one line each. `offline`
    checks everything but the values of `${ENV}`, `${file:...}` and `${cred:...}`, which it
    does not resolve (`plantsync check --offline`, in a shell without the plant's secrets)."""
    return _validated(_read_document(text, filename, os.environ if environ is None
                                     else environ, offline=offline), filename)


def _validated(document: _Document, filename: str) -> PlantConfig:
    problems = list(document.problems)
    notices = list(_rec20_units(document.data))
    config: PlantConfig | None = None
    if not isinstance(document.data, dict):
        problems.append(_Problem((), "the file must be a mapping of settings (site: ..., ...)"))
    else:
        try:
            config = PlantConfig.model_validate(document.data)
        except ValidationError as exc:
            found = [(_data_loc(document.data, e["loc"]), e) for e in exc.errors()]
            # A section whose `type` is wrong gets that one message, not one per field that
            # the wrong type's model happens to miss.
            bad_types = {loc[:-1] for loc, e in found
                         if loc and loc[-1] == "type" and e["type"] == "literal_error"
                         and _is_type_tag(loc, document.data)}
            # A mapping with a merge key is missing what the merge would have brought: its
            # one problem is the merge key.
            merged = {p.loc[:-1] for p in document.problems if p.loc[-1:] == ("<<",)}
            for loc, error in found:
                if any(loc[:len(p)] == p and loc != (*p, "type") for p in bad_types):
                    continue
                if any(loc[:len(m)] == m for m in merged):
                    continue
                problems.append(_Problem(loc, _message(error, loc, document.data)))
    if config is not None:
        problems.extend(_cross_check(config))
    if document.unresolved:  # offline: what a reference would give cannot be judged
        problems = [p for p in problems if not any(
            p.loc[:len(at)] == at for at in document.unresolved)]
    if problems:
        lines = sorted(
            {(document.line_of(p.loc), format_loc(p.loc), p.message) for p in problems}
        )
        raise ConfigError([f"{filename}:{line}: {where}: {what}" for line, where, what in lines])
    if config is None:
        # Offline, a placeholder where a reference stands did not fit its field (a URL, a
        # port): every other setting was checked, but no whole config can be built to
        # cross-check. What the check can still say, it says from the raw settings.
        return PlantConfig.model_construct(**document.data)
    config._warnings = [f"{filename}:{document.line_of(loc)}: {format_loc(loc)}: {message}"
                        for loc, message in [*notices, *_doubts(config)]]
    return config


def fully_validated(config: PlantConfig) -> bool:
    """False for what an offline check returns when a reference's placeholder did not fit
    its field: the settings were checked one by one, the cross references were not."""
    sections: list[Any] = [config.api, *config.drivers, *config.machines,
                           *config.destinations.values()]
    return all(isinstance(section, BaseModel) for section in sections)


def config_warnings(config: PlantConfig) -> list[str]:
    """Settings that are valid but probably not what was meant, one line each (`check`
    prints them and `run` logs them): Modbus addresses written Modicon-style (40001), Rec 21
    package codes read as their Rec 20 codes (BX as XBX)."""
    return list(config._warnings) if fully_validated(config) else []


def _doubts(config: PlantConfig) -> Iterator[tuple[Loc, str]]:
    for i, driver in enumerate(config.drivers):
        address_warnings = getattr(driver, "address_warnings", None)
        if address_warnings is not None:
            for loc, message in address_warnings():
                yield ("drivers", i, *loc), message


def read_config_text(path: Path) -> str:
    """The file's text, or ConfigError saying in one line why it is not a config file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the config file: {exc.strerror}"]) from None
    if b"\x00" in data:
        raise ConfigError([f"{path}: (file): not a text file (it holds NUL bytes): is this "
                           "the config? A plant config is YAML text"])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{path}:{line}: (file): not UTF-8 text (byte 0x{data[exc.start]:02x}"
                           "): save the file as UTF-8"]) from None


def load_config(path: str | Path, environ: Mapping[str, str] | None = None, *,
                offline: bool = False) -> PlantConfig:
    """Read and validate a config file; raise ConfigError naming file, line and field."""
    path = Path(path)
    return parse_config(read_config_text(path), str(path), environ, offline=offline)


def unresolved_references(path: str | Path) -> list[str]:
    """The `${...}` references an offline check leaves unresolved, in file order."""
    path = Path(path)
    document = _read_document(read_config_text(path), str(path), {}, offline=True)
    found = sorted((document.line_of(loc), ref) for loc, refs in document.unresolved.items()
                   for ref in refs)
    return [ref for _, ref in found]


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


def load_local_access(path: str | Path, environ: Mapping[str, str] | None = None
                      ) -> LocalAccess:
    """`api`, `data_dir` and `site` of a config file, whatever the rest holds; ConfigError
    (file:line: field: message) only for problems in those."""
    path = Path(path)
    filename = str(path)
    document = _read_document(read_config_text(path), filename,
                              os.environ if environ is None else environ, offline=False)
    data = document.data if isinstance(document.data, dict) else {}
    used = ("api", "data_dir", "site")
    problems = [p for p in document.problems if p.loc and p.loc[0] in used]

    class _Local(Strict):
        model_config = ConfigDict(extra="ignore", frozen=True)
        api: ApiConfig = Field(default_factory=ApiConfig)  # type: ignore[arg-type]
        data_dir: Path = PlantConfig.model_fields["data_dir"].default
        site: str | None = None

    local: _Local | None = None
    try:
        local = _Local.model_validate({k: data[k] for k in used if k in data})
    except ValidationError as exc:
        for error in exc.errors():
            loc = _data_loc(data, error["loc"])
            problems.append(_Problem(loc, _message(error, loc, data)))
    if problems or local is None:
        lines = sorted({(document.line_of(p.loc), format_loc(p.loc), p.message)
                        for p in problems})
        raise ConfigError([f"{filename}:{line}: {where}: {what}" for line, where, what in lines])
    return LocalAccess(local.api, local.data_dir, local.site)
