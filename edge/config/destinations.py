"""The `destinations:` section: where events are sent and how. The base URL and profile
(canonical, sap_s4hana, qms_rest, jetstream) with `PROFILE_EVENT_TYPES`, which event types each
profile can map; the credentials (none, bearer, API key, OAuth2 client credentials); TLS; the
retry and circuit-breaker settings from `edge.config.base`; and what only a sap_s4hana
destination needs (time zone, units, usage decisions).
"""

from __future__ import annotations

import zoneinfo
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from drivers.common.timing import Duration
from edge.config.base import CircuitBreaker, RetryPolicy, Strict
from edge.hub.settings import JetStreamSettings


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
        "credential), never the secret."
    )
    scope: str | None = Field(None, description="Scope to ask for, if the server wants one.")
    refresh_before: Duration = Field(
        60.0, description="Fetch a new token this long before the current one expires."
    )
    timeout: Duration = Field(10.0, description="Timeout of a token request.")


Auth = Annotated[
    NoAuth | BearerAuth | ApiKeyAuth | OAuth2ClientCredentials, Field(discriminator="type")
]


class TlsConfig(Strict):
    verify: bool = Field(
        True,
        description="Verify the server's certificate. Turning it off is logged as a "
        "warning at every start: it lets anyone on the path read and change what is sent.",
    )
    ca_file: Path | None = Field(
        None,
        description="CA bundle to verify the server with "
        "(a plant's own CA), instead of the system's.",
    )
    cert_file: Path | None = Field(None, description="Client certificate, for mutual TLS.")
    key_file: Path | None = Field(None, description="Key of the client certificate.")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


Profile = Literal["canonical", "sap_s4hana", "qms_rest", "jetstream"]


class SapUsageDecision(Strict):
    """One usage decision as the plant's QM catalogue spells it (catalog type 3, a selected
    set of the plant, a code group and a code): SAP has no fixed codes for "release"."""

    code: str = Field(description="InspectionLotUsageDecisionCode, e.g. A.", min_length=1)
    code_group: str = Field(description="InspLotUsageDecisionCodeGroup.", min_length=1)
    selected_set: str = Field(
        description="InspLotUsgeDcsnSelectedSet (the plant's selected "
        "set of usage decision codes).",
        min_length=1,
    )
    selected_set_plant: str | None = Field(
        None, min_length=1, description="SelectedCodeSetPlant; default: the event's plant (site)."
    )
    catalog: str = Field(
        "3",
        min_length=1,
        description="InspLotUsageDecisionCatalog: the "
        "catalog type of usage decisions, 3 in a standard system.",
    )


class SapUnit(Strict):
    """How SAP spells one canonical (UN/ECE Rec 20) unit."""

    iso: str | None = Field(
        None,
        min_length=1,
        description="SAP's ISO code of the unit "
        "(T006-ISOCODE), sent in ConfirmationUnitISOCode / "
        "EntryUnitISOCode; e.g. PCE for piece.",
    )
    internal: str | None = Field(
        None,
        min_length=1,
        description="SAP's unit as the OData "
        "service takes it in ConfirmationUnit / EntryUnit (T006, "
        "e.g. PC or ST for piece, KG); the plant's ERP decides.",
    )


class SapConfig(Strict):
    """What only a sap_s4hana destination needs: the plant's time zone, its units, its usage
    decision codes and where produced goods are received."""

    time_zone: str = Field(
        "UTC",
        description="The plant's time zone (IANA name, e.g. Europe/Berlin): "
        "PostingDate is the event's date there, so goods produced before midnight and sent "
        "after an outage land in the day (and period) they were produced.",
    )
    unit_fields: Literal["iso", "internal", "both"] = Field(
        "iso",
        description="Which SAP unit fields carry the unit: iso (ConfirmationUnitISOCode, "
        "EntryUnitISOCode; the same on every SAP system), internal (ConfirmationUnit, "
        "EntryUnit; as the plant's T006 spells them), or both. Material documents "
        "(consumption) have only EntryUnit, so consumed units always need an internal code.",
    )
    units: dict[str, SapUnit] = Field(
        default_factory=dict,
        description="Canonical Rec 20 unit to SAP unit, on top of the "
        "defaults (README: destination table): e.g. {C62: {iso: PCE, internal: PC}}.",
    )
    usage_decisions: dict[Literal["release", "reject"], SapUsageDecision] = Field(
        default_factory=dict,
        description="The usage decision posted for each QMS "
        "disposition. Hold is no usage decision in SAP (the lot stays in quality-inspection "
        "stock): nothing is posted for it.",
    )
    goods_receipt_storage_location: str | None = Field(
        None,
        min_length=1,
        description="StorageLocation of the goods receipt (101) of "
        "produced lots; none: the order's own receiving location.",
    )
    order_item: str = Field(
        "0001", pattern=r"^\d{1,4}$", description="OrderItem the produced lot is received for."
    )
    consumption: Literal["material_document"] = Field(
        "material_document",
        description="How material.consumed is posted: a goods issue "
        "(GoodsMovementCode 03, movement 261) through API_MATERIAL_DOCUMENT_SRV.",
    )

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"{name!r} is not an IANA time zone (e.g. Europe/Berlin, America/Chicago, UTC)"
            ) from None
        return name


PROFILE_EVENT_TYPES: dict[str, frozenset[str] | None] = {
    "canonical": None,  # every type
    "sap_s4hana": frozenset({"production.confirmation", "material.consumed", "lot.disposition"}),
    "qms_rest": frozenset({"inspection.requested", "inspection.result", "nonconformance.raised"}),
    "jetstream": None,  # the hub takes every type; its relays route them
}
"""Which event types each profile can map (None: all of them)."""


class DestinationConfig(Strict):
    base_url: str = Field(
        description="Base URL of the API; for profile jetstream, a NATS "
        "server (nats://host:4222, tls://host:4222).",
        pattern=r"^(https?|nats|tls)://",
    )
    profile: Profile = Field(
        "canonical",
        description="How events are shaped for this target: canonical "
        "(CloudEvents JSON, Idempotency-Key), sap_s4hana (production order confirmation and "
        "usage decision OData services), qms_rest (a generic REST QMS), jetstream (the hub: "
        "a NATS JetStream stream, README: Beyond one plant).",
    )
    path: str = Field(
        "/events",
        description="canonical: path under base_url that takes one "
        "event; sap_s4hana and qms_rest know their own paths.",
    )
    batch_path: str | None = Field(
        None,
        description="canonical: path that takes a batch "
        "(application/cloudevents-batch+json); default: the same as path.",
    )
    batch_size: int = Field(
        1,
        ge=1,
        le=1000,
        description="Events per request where the profile supports "
        "batches (canonical). Batching is where the throughput is.",
    )
    timeout: Duration = Field(10.0, description="Timeout of one request.")
    max_in_flight: int = Field(
        4,
        ge=1,
        le=64,
        description="Requests in flight at once. Keep it small: ERP APIs and "
        "HTTP clients both degrade with many concurrent requests.",
    )
    rate_limit: float | None = Field(
        None, gt=0, description="Most events per second sent to this target (none: no limit)."
    )
    http_transport: Literal["aiohttp", "httpcore"] = Field(
        "aiohttp",
        description="What carries the requests under httpx's API: aiohttp's "
        "connection pool and parser (about twice the requests per second of httpcore on this "
        "gateway's hardware, see the README's benchmarks), or httpx's own httpcore. Behind a "
        "proxy given by HTTPS_PROXY/HTTP_PROXY, choose httpcore: the aiohttp transport does "
        "not read those variables.",
    )
    auth: Auth = Field(default_factory=NoAuth)
    tls: TlsConfig = Field(default_factory=TlsConfig)  # type: ignore[arg-type]
    allow_insecure: bool = Field(
        False,
        description="Accept sending this destination's credentials (token, API key, "
        "OAuth client secret) over plain http:// to a host off this box, where anyone on the "
        "path reads them; warned about at every start. Without it, such a config is refused.",
    )
    retry: RetryPolicy = Field(default_factory=RetryPolicy)  # type: ignore[arg-type]
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker)  # type: ignore[arg-type]
    sap: SapConfig = Field(default_factory=SapConfig)  # type: ignore[arg-type]
    jetstream: JetStreamSettings = Field(default_factory=JetStreamSettings)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _jetstream_url(self) -> DestinationConfig:
        nats = self.base_url.startswith(("nats://", "tls://"))
        if (self.profile == "jetstream") != nats:
            raise ValueError(
                "profile jetstream takes a nats:// or tls:// base_url, the "
                "other profiles an http(s):// one"
            )
        if self.profile == "jetstream" and not isinstance(self.auth, NoAuth):
            raise ValueError(
                "a jetstream destination's credentials go under jetstream.auth "
                "(token, user_password, creds, nkey)"
            )
        return self
