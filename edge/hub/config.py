"""The hub's config file (hub.yaml), read by `plantsync hub init` and `plantsync relay`: the
NATS servers, the stream (subjects, partitions, replicas, duplicate window, limits), the dead
letter stream, and the relay's destinations and routes, which are the plant daemon's own
destination settings (profiles, auth, retries, rate limits).

The file is read as the plant's is: `${ENV}`, `${file:...}` and `${cred:...}` references,
and every problem reported with file, line and field.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from pydantic import ByteSize, Field, ValidationError, field_validator, model_validator

from drivers.common.timing import Duration
from edge.config.destinations import PROFILE_EVENT_TYPES, DestinationConfig, TlsConfig
from edge.config.document import read_config_text, read_document
from edge.config.errors import ConfigError, format_loc
from edge.config.loader import _data_loc
from edge.hub.settings import (
    DEFAULT_STREAM,
    DEFAULT_SUBJECT,
    STREAM_NAME,
    NatsAuth,
    NatsNoAuth,
    _Section,
    nats_urls,
)
from edge.hub.subjects import SubjectPattern
from edge.model.events import EVENT_MODELS


class NatsConnection(_Section):
    servers: list[str] = Field(
        min_length=1,
        description="The hub cluster's servers (nats://host:4222, or tls://host:4222 for TLS).",
    )
    tls: TlsConfig = Field(default_factory=TlsConfig)  # type: ignore[arg-type]
    auth: NatsAuth = Field(default_factory=NatsNoAuth)
    timeout: Duration = Field(10.0, description="Timeout of one request to the hub.")

    @field_validator("servers")
    @classmethod
    def _urls(cls, servers: list[str]) -> list[str]:
        return nats_urls(servers)


class HubStream(_Section):
    name: str = Field(DEFAULT_STREAM, pattern=STREAM_NAME, description="Stream name.")
    subject_pattern: str = Field(
        DEFAULT_SUBJECT,
        description="The plants' subject pattern (their jetstream.subject): "
        "the stream takes every subject it can make and partitions by its {key}.",
    )
    partitions: int = Field(
        8,
        ge=1,
        le=1024,
        description="Partitions of the stream (by order/lot key): the most "
        "events delivered at once per destination, whatever the number of relays. Fixed once "
        "events flow: changing it moves keys between partitions.",
    )
    replicas: int = Field(
        3,
        ge=1,
        le=5,
        description="Copies of each event on different servers; 3 survives the loss of one server.",
    )
    duplicate_window: Duration = Field(
        86400.0,
        description="How long the stream remembers a Nats-Msg-Id (the event id) and "
        "drops a repeat: longer than the longest outage a plant must ride out.",
    )
    max_age: Duration = Field(
        30 * 86400.0, description="Events older than this are removed (the replay horizon)."
    )
    max_bytes: ByteSize | None = Field(
        None, description="Most bytes the stream keeps (none: no limit but the servers' own)."
    )
    dead_letter_stream: str = Field(
        f"{DEFAULT_STREAM}_DLQ",
        pattern=STREAM_NAME,
        description="Stream of the relays' dead letters.",
    )
    dead_letter_subject: str = Field(
        "plantsync-dlq",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Dead letters go to "
        "<this>.<destination>; `nats stream view` shows them with their reason header.",
    )

    journal_stream: str = Field(
        f"{DEFAULT_STREAM}_JOURNAL",
        pattern=STREAM_NAME,
        description="Stream of the relays' delivery journal: one "
        "record per event delivered (id, type, destination, time, "
        "attempts, status, the receiver's reference, relay).",
    )
    journal_subject: str = Field(
        "plantsync-journal",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Journal records go to <this>.<destination>.",
    )

    @field_validator("subject_pattern")
    @classmethod
    def _pattern(cls, text: str) -> str:
        SubjectPattern.parse(text)
        return text

    @property
    def pattern(self) -> SubjectPattern:
        return SubjectPattern.parse(self.subject_pattern)


class RelaySettings(_Section):
    ack_wait: Duration = Field(
        60.0,
        description="How long the hub waits for a relay's answer before giving the "
        "event to another relay (a killed relay's partitions move after this). The relay "
        "extends it while a delivery is still retrying.",
    )
    metrics_host: str = Field("127.0.0.1", description="Where /metrics listens.")
    metrics_port: int = Field(9480, ge=0, le=65535, description="Port of /metrics (0: any).")
    stats_interval: Duration = Field(
        5.0, description="How often consumer lag and dead letter depth are read from the hub."
    )
    members_bucket: str = Field(
        f"{DEFAULT_STREAM}_RELAYS",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="JetStream key-value bucket of the live relays (a key each): they "
        "share the partitions out by it. Made by hub init, or by the first relay.",
    )
    heartbeat: Duration = Field(
        2.0,
        gt=0,
        description="How often a relay renews its key in the members bucket and "
        "recomputes which partitions it owns.",
    )
    member_ttl: Duration = Field(
        6.0,
        gt=0,
        description="A relay's key is gone this long after its last heartbeat (the "
        "bucket's max age): a killed relay's partitions move to the others after it; at "
        "least twice the heartbeat.",
    )

    @model_validator(mode="after")
    def _ttl(self) -> RelaySettings:
        if self.member_ttl < 2 * self.heartbeat:
            raise ValueError(
                f"member_ttl ({self.member_ttl:g}s) must be at least twice the heartbeat "
                f"({self.heartbeat:g}s), or a live relay's key could expire between beats"
            )
        return self


class HubConfig(_Section):
    nats: NatsConnection
    stream: HubStream = Field(default_factory=HubStream)  # type: ignore[arg-type]
    relay: RelaySettings = Field(default_factory=RelaySettings)  # type: ignore[arg-type]
    destinations: dict[str, DestinationConfig] = Field(
        default_factory=dict,
        description="Where relays deliver: the plant daemon's "
        "destination settings (canonical, sap_s4hana, qms_rest).",
    )
    routes: dict[str, list[str]] = Field(
        default_factory=dict, description="Event type to the destinations that receive it."
    )

    @model_validator(mode="after")
    def _routes(self) -> HubConfig:
        problems = []
        for name, destination in self.destinations.items():
            if destination.profile == "jetstream":
                problems.append(
                    f"destination {name}: a relay delivers out of the hub; "
                    "profile jetstream would publish back into it"
                )
            if not name.replace("-", "").replace("_", "").isalnum():
                problems.append(
                    f"destination {name!r}: letters, digits, - and _ only (it "
                    "names the hub's consumers)"
                )
        for event_type, names in self.routes.items():
            if event_type not in EVENT_MODELS:
                close = difflib.get_close_matches(event_type, list(EVENT_MODELS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"routes: unknown event type {event_type!r}{hint}")
            for name in names:
                target = self.destinations.get(name)
                if target is None:
                    problems.append(f"routes.{event_type}: no destination named {name!r}")
                    continue
                supported = PROFILE_EVENT_TYPES[target.profile]
                if supported is not None and event_type not in supported:
                    problems.append(
                        f"routes.{event_type}: destination {name!r} (profile "
                        f"{target.profile}) cannot take {event_type}"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def destinations_for(self, event_type: str) -> list[str]:
        return self.routes.get(event_type, [])


def load_hub_config(path: str | Path) -> HubConfig:
    """Read and validate hub.yaml; ConfigError names file, line and field of each problem."""
    import os

    path = Path(path)
    document = read_document(read_config_text(path), str(path), os.environ, offline=False)
    problems = [(document.line_of(p.loc), format_loc(p.loc), p.message) for p in document.problems]
    config: HubConfig | None = None
    if not isinstance(document.data, dict):
        problems.append(
            (1, "(top level)", "the file must be a mapping of settings (nats: ..., stream: ...)")
        )
    else:
        try:
            config = HubConfig.model_validate(document.data)
        except ValidationError as exc:
            for error in exc.errors():
                loc = _data_loc(document.data, error["loc"])
                message = str(error["msg"]).removeprefix("Value error, ")
                if error["type"] == "extra_forbidden":
                    message = "unknown key"
                elif error["type"] == "missing":
                    message = "is required"
                problems.append((document.line_of(loc), format_loc(loc), message))
    if problems or config is None:
        raise ConfigError(
            [f"{path}:{line}: {where}: {what}" for line, where, what in sorted(set(problems))]
        )
    return config
