"""The OPC UA driver's configuration: the endpoint, security (policy, mode, certificates, user),
session timings and the tags (node, deadband, structure selector, PackML state), validated
without I/O.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from drivers.base import (
    DEFAULT_RECONNECT_MAX_DELAY,
    NAME_PATTERN,
    RECONNECT_MAX_DELAY_DOC,
    unique_names,
)
from drivers.common.timing import Duration
from drivers.opcua.nodes import NodeRef
from drivers.opcua.values import Selector

SecurityPolicyName = Literal[
    "None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"
]
ServerRestart = Literal["counters_restart", "counters_continue"]
TagRead = Literal["value", "packml_state"]


DEFAULT_SESSION_TIMEOUT = 20.0
"""Seconds. A session of a killed gateway stays on the server this long: a crash loop on a
server allowing 10 sessions (node-opcua's default) locks everyone out only if it leaves 10
within this time, and a restarted gateway waits at most this long for a free session."""


SecurityModeName = Literal["None", "Sign", "SignAndEncrypt"]


class Deadband(BaseModel):
    """A data change filter: the server reports a change only when it exceeds the deadband."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["absolute", "percent"] = Field(
        description="`absolute`: in the variable's units. `percent`: of its EURange, which the "
        "server must know; a server that cannot apply it refuses the tag, which is then bad.",
    )
    value: float = Field(ge=0, description="The deadband size.", examples=[0.5])

    @model_validator(mode="after")
    def _percent_range(self) -> Deadband:
        if self.type == "percent" and self.value > 100:
            raise ValueError("a percent deadband is at most 100")
        return self


class OpcUaTag(BaseModel):
    """One variable on the server and how to monitor it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=NAME_PATTERN,
        description="Tag name; samples are published as `<driver>.<name>`.",
        examples=["state", "processed"],
    )
    node: str = Field(
        description="Node id: `nsu=<namespace uri>;s=...` (preferred: survives namespace "
        "renumbering), `ns=<index>;s=...`, or with `i=`, `g=` or `b=` identifiers. "
        "`plantsync browse opcua` prints them.",
        examples=["nsu=urn:plantsync:sim:machine;s=filler-02.Status.StateCurrent", "i=2258"],
    )
    sampling_interval: Duration | None = Field(
        default=None,
        ge=0,
        description="How often the server samples the value; unset means the publishing "
        "interval, 0 the fastest the server can.",
        examples=["100ms"],
    )
    queue_size: int = Field(
        default=10,
        ge=1,
        le=10_000,
        description="Changes the server keeps per publishing interval, so a counter's "
        "intermediate values are not lost between two publishes.",
    )
    deadband: Deadband | None = Field(
        default=None, description="Report only changes larger than this (analog values)."
    )

    read: TagRead = Field(
        default="value",
        description="`value`: the variable's value. `packml_state`: `node` is an OPC 30050 "
        "(PackML companion specification) machine's `BaseStateMachine`; the tag's value is the "
        "ISA-TR88 number of the state it is in (6 Execute, 11 Held, 2 Stopped, 9 Aborted...), "
        "the innermost CurrentState of its nested state machines (BaseStateMachine, "
        "MachineState, ExecuteState), read through each CurrentState's Id.",
    )
    select: str | None = Field(
        default=None,
        description="One part of a structured value (an ExtensionObject, decoded with the data "
        "type definitions the server publishes): `[0]` an array element, `[ID=1]` the element "
        "whose field ID is 1, `.AccCount` (or `AccCount` first) a field; chained, e.g. "
        "`[ID=1].AccCount` for OPC 30050's ProdProcessedCount, `ID` for its StopReason.",
        examples=["[ID=1].AccCount", "Message"],
    )

    @field_validator("node")
    @classmethod
    def _node_id_parses(cls, node: str) -> str:
        NodeRef.parse(node)
        return node.strip()

    @field_validator("select")
    @classmethod
    def _selector_parses(cls, select: str | None) -> str | None:
        if select is not None:
            Selector.parse(select)
        return select

    @model_validator(mode="after")
    def _select_a_value(self) -> OpcUaTag:
        if self.read == "packml_state" and self.select is not None:
            raise ValueError("select applies to read: value, not to a packml_state")
        return self

    @property
    def node_ref(self) -> NodeRef:
        return NodeRef.parse(self.node)

    @property
    def selector(self) -> Selector | None:
        return Selector.parse(self.select) if self.select is not None else None


class OpcUaSecurity(BaseModel):
    """How the secure channel is protected, and the client's application instance certificate."""

    model_config = ConfigDict(extra="forbid")

    policy: SecurityPolicyName = Field(
        default="None",
        description="Security policy: `None`, `Basic256Sha256`, or the newer "
        "`Aes128_Sha256_RsaOaep` and `Aes256_Sha256_RsaPss` (OPC UA 1.04), which the "
        "server must offer.",
    )
    mode: SecurityModeName = Field(
        default="None",
        description="Message security mode: `None` with policy None; `Sign` or "
        "`SignAndEncrypt` with any other policy.",
    )
    certificate: Path | None = Field(
        default=None,
        description="Client certificate file (DER or PEM); its SubjectAltName URI becomes the "
        "client's application URI. Required with a policy other than None.",
        examples=["/etc/plantsync/opcua/client-cert.der"],
    )
    private_key: Path | None = Field(
        default=None,
        description="The client certificate's private key (PEM or DER). Required with a "
        "policy other than None.",
        examples=["/etc/plantsync/opcua/client-key.pem"],
    )
    server_certificate: Path | None = Field(
        default=None,
        description="Pin the server's certificate: only this one is accepted. Unset means the "
        "server's certificate must be in the trust list, `data_dir/pki/trusted/` (an unknown "
        "one is refused and saved in `data_dir/pki/rejected/`; `plantsync trust opcua` shows "
        "and trusts it).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> OpcUaSecurity:
        if self.policy == "None":
            if self.mode != "None":
                raise ValueError(
                    f"mode {self.mode} needs a policy such as Basic256Sha256, not None"
                )
            if self.certificate or self.private_key or self.server_certificate:
                raise ValueError("certificates are used only with a policy other than None")
            return self
        if self.mode == "None":
            raise ValueError(f"policy {self.policy} needs mode Sign or SignAndEncrypt")
        if self.certificate is None or self.private_key is None:
            raise ValueError(f"policy {self.policy} needs a certificate and a private_key")
        return self


class OpcUaConfig(BaseModel):
    """An OPC UA server whose variables are monitored through one subscription."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=NAME_PATTERN,
        description="Driver name, unique in the plant; the prefix of every signal it emits.",
        examples=["filler-02"],
    )
    reconnect_max_delay: Duration = Field(
        default=DEFAULT_RECONNECT_MAX_DELAY,
        gt=0,
        description=RECONNECT_MAX_DELAY_DOC,
        examples=["10s"],
    )
    type: Literal["opcua"] = Field(description="Selects this driver.")
    endpoint: str = Field(description="Server endpoint URL.", examples=["opc.tcp://10.0.0.30:4840"])
    security: OpcUaSecurity = Field(
        default_factory=OpcUaSecurity, description="Channel security; none by default."
    )
    username: str | None = Field(
        default=None, min_length=1, description="User name; unset means anonymous."
    )
    password: SecretStr | None = Field(
        default=None,
        description="Password for `username`; write `${ENV_VAR}` to keep it out of the file.",
    )
    publishing_interval: Duration = Field(
        default=0.5,
        gt=0,
        description="How often the server sends the changes it has collected.",
        examples=["500ms", "1s"],
    )
    keepalive: Duration = Field(
        default=5.0,
        gt=0,
        description="With no change to send, the server sends a keep-alive this often; the "
        "driver also reads the server state this often to check the session.",
        examples=["5s"],
    )
    session_timeout: Duration = Field(
        default=DEFAULT_SESSION_TIMEOUT,
        ge=1,
        description="How long the server keeps the session (and its subscription) for a "
        "client that went silent. A gateway killed without closing its session leaves it on "
        "the server this long, taking one of the server's sessions (often 10 or fewer): keep "
        "it short. At least twice `keepalive`, whose reads keep the session alive.",
        examples=["20s"],
    )
    server_restart: ServerRestart = Field(
        default="counters_restart",
        description="What a restart of the server (a new `ServerStatus.StartTime`) means for "
        "its counters. `counters_restart`: the device restarted and its counters began again "
        "at 0 (a PLC with an embedded server after a power cycle), so the rules count the next "
        "reading from 0 even when it is above the last one seen. `counters_continue`: the "
        "server is a separate program (an OPC UA gateway in front of the PLC) whose restart "
        "leaves the counters as they were; the restart is only logged.",
    )
    timeout: Duration = Field(
        default=5.0,
        gt=0,
        description="Timeout for connecting and for each request.",
        examples=["5s"],
    )
    stale_after: Duration = Field(
        default=30.0,
        ge=0,
        description="No data change and no keep-alive for this long means the session is dead: "
        "reconnect. Must exceed `keepalive`; 0 disables the check.",
        examples=["30s"],
    )
    tags: list[OpcUaTag] = Field(min_length=1, description="The variables to monitor.")

    @field_validator("endpoint")
    @classmethod
    def _opc_tcp_url(cls, endpoint: str) -> str:
        url = urlparse(endpoint)
        if url.scheme != "opc.tcp" or not url.hostname:
            raise ValueError(f"{endpoint!r} is not an endpoint URL such as opc.tcp://host:4840")
        try:
            url.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as exc:
            raise ValueError(f"{endpoint!r}: {exc}") from None
        return endpoint

    @field_validator("tags")
    @classmethod
    def _unique_tag_names(cls, tags: list[OpcUaTag]) -> list[OpcUaTag]:
        unique_names(tags)
        return tags

    @model_validator(mode="after")
    def _consistent(self) -> OpcUaConfig:
        if (self.username is None) != (self.password is None):
            raise ValueError("give both username and password, or neither")
        if self.session_timeout < 2 * self.keepalive:
            raise ValueError(
                f"session_timeout ({self.session_timeout:g}s) must be at least twice keepalive "
                f"({self.keepalive:g}s): the keep-alive reads are what keep the session alive"
            )
        if self.stale_after and self.stale_after <= self.keepalive:
            raise ValueError(
                f"stale_after ({self.stale_after:g}s) must exceed keepalive "
                f"({self.keepalive:g}s), or be 0 to disable the check"
            )
        return self
