"""Config models of a `jetstream` destination (a plant publishing to the hub): the stream
and subject pattern it publishes to, and how it proves who it is to the NATS servers.

Kept apart from edge.config so the hub's own config (edge.hub.config) and the plant's share
them; this module imports nothing from the daemon.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from drivers.common.timing import Duration
from edge.hub.subjects import SubjectPattern


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NatsNoAuth(_Section):
    type: Literal["none"] = "none"


class NatsToken(_Section):
    type: Literal["token"]
    token: SecretStr = Field(
        description="The server's authorization token; write "
        "`${ENV_VAR}` or `${cred:NAME}`, never the token."
    )


class NatsUserPassword(_Section):
    type: Literal["user_password"]
    user: str = Field(description="NATS user name.")
    password: SecretStr = Field(
        description="Its password; write `${ENV_VAR}` or `${cred:NAME}`, never the password."
    )


class NatsCredentials(_Section):
    type: Literal["creds"]
    file: Path = Field(
        description="A `.creds` file (user JWT and NKey seed, as `nsc` "
        "writes it); keep it readable by the service user only."
    )


class NatsNKey(_Section):
    type: Literal["nkey"]
    seed_file: Path = Field(
        description="File holding the user's NKey seed (SU...); keep "
        "it readable by the service user only."
    )


NatsAuth = Annotated[
    NatsNoAuth | NatsToken | NatsUserPassword | NatsCredentials | NatsNKey,
    Field(discriminator="type"),
]


def nats_urls(servers: list[str]) -> list[str]:
    """NATS server URLs, or ValueError naming the one that is not."""
    for url in servers:
        if not url.startswith(("nats://", "tls://")):
            raise ValueError(
                f"{url!r} is not a NATS server URL (nats://host:4222 or tls://host:4222)"
            )
    return servers


DEFAULT_SUBJECT = "plantsync.{site}.{type}.{key}"
DEFAULT_STREAM = "PLANTSYNC"
STREAM_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class JetStreamSettings(_Section):
    """What only a `jetstream` destination needs. Its `base_url` is one NATS server
    (`nats://host:4222`, or `tls://host:4222` for TLS with the destination's `tls:` settings);
    the client learns the cluster's other servers from it, and `servers` names more to try
    at start."""

    servers: list[str] = Field(
        default_factory=list,
        description="More servers of the hub cluster (nats:// or "
        "tls://), tried when base_url's is down.",
    )
    stream: str = Field(
        DEFAULT_STREAM,
        pattern=STREAM_NAME,
        description="The hub stream: a "
        "publish is settled only on this stream's PubAck (stored with its "
        "replicas), never on another stream's.",
    )
    subject: str = Field(
        DEFAULT_SUBJECT,
        description="Subject pattern of each event: literal tokens and "
        "{site}, {type} (the event type with . written _), {key} (its partition key, last: "
        "the hub partitions by it). Must match the hub stream's subject_pattern.",
    )
    auth: NatsAuth = Field(default_factory=NatsNoAuth)
    longest_outage: Duration = Field(
        86400.0,
        description="Longest hub outage this plant must ride out (the outbox keeps "
        "events meanwhile); `doctor jetstream` warns when the stream's duplicate window is "
        "shorter, as a publish retried after the window is stored twice (the relay and the "
        "receiver's Idempotency-Key then catch it).",
    )

    @field_validator("subject")
    @classmethod
    def _pattern(cls, text: str) -> str:
        SubjectPattern.parse(text)
        return text

    @field_validator("servers")
    @classmethod
    def _urls(cls, servers: list[str]) -> list[str]:
        return nats_urls(servers)

    @property
    def pattern(self) -> SubjectPattern:
        return SubjectPattern.parse(self.subject)
