"""OPC UA driver: subscribes to a server's variables and emits one Sample per data change.

One session per driver, one subscription per session, one monitored item per tag. At every
connect the driver resolves each tag's node id against the server's current namespace array (so
`nsu=<namespace uri>;s=...` survives a server that renumbers its namespaces), subscribes, and
then reads the current value of every tag and emits it, so a counter resumes from the server's
current value after an outage: no gap, and no double count, because per tag a value older than
the one already emitted in the session is dropped. Notifications leave asyncua's receive path at
once for a buffer that a delivery task drains into the sink; when the sink falls far behind, the
buffer keeps only the latest value per tag, which loses intermediate telemetry but never the
latest reading of a counter. The driver owns its reconnection: a closed connection, a failed
keep-alive read, a subscription the server ended, or no data change and no keep-alive for
`stale_after` ends the session; it logs once that the server is unavailable, retries with the
shared backoff, and logs once when it is back. A node that does not exist marks only its tag bad.

`browse_main` is `plantsync browse opcua`: it prints a server's address space with node ids in
the portable `nsu=` form, ready to copy into YAML.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO, cast
from urllib.parse import urlparse

from asyncua import ua
from asyncua.client.client import Client
from asyncua.client.ua_client import UaClientState
from asyncua.common.subscription import (
    DataChangeEvent,
    OverflowPolicy,
    StatusChangeEvent,
    Subscription,
)
from asyncua.crypto import security_policies, uacrypto
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIdNames, ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from drivers.base import (
    DEFAULT_RECONNECT_MAX_DELAY,
    NAME_PATTERN,
    RECONNECT_MAX_DELAY_DOC,
    DeviceRestarted,
    Driver,
    Quality,
    Sample,
    SampleSink,
    TagValue,
    accepts_tcp,
    honour_cancellation,
    unique_names,
)
from drivers.common.availability import Availability, Ended, reconnect_forever
from drivers.common.timing import Backoff, Duration

log = logging.getLogger(__name__)

SecurityPolicyName = Literal[
    "None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]
ServerRestart = Literal["counters_restart", "counters_continue"]
TagRead = Literal["value", "packml_state"]

DEFAULT_SESSION_TIMEOUT = 20.0
"""Seconds. A session of a killed gateway stays on the server this long: a crash loop on a
server allowing 10 sessions (node-opcua's default) locks everyone out only if it leaves 10
within this time, and a restarted gateway waits at most this long for a free session."""

FULL_SERVER_RETRY = 2.0
"""Seconds between attempts while the server answers BadTooManySessions: it answers at once,
and a session frees up when an orphan's timeout runs out, so waiting longer only delays us."""

PORT_PROBE_INTERVAL = 0.5
"""While a server is down, how often its TCP port is tried (a bare connect, no session), so that
a server that is back is used at once rather than at the next backoff attempt."""
SecurityModeName = Literal["None", "Sign", "SignAndEncrypt"]

DEFAULT_APPLICATION_URI = "urn:plantsync:edge"
"""The client's application URI when no client certificate names one."""

MAX_PENDING_SAMPLES = 10_000
"""Samples waiting for the sink before the buffer keeps only the latest value per tag."""

SUBSCRIPTION_QUEUE = 10_000
"""asyncua's per-subscription notification queue; the pump empties it as notifications come."""

_SECURITY_POLICY: dict[SecurityPolicyName, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}

_MESSAGE_SECURITY_MODE: dict[SecurityModeName, ua.MessageSecurityMode] = {
    "None": ua.MessageSecurityMode.None_,
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}

_USER_REJECTED = {
    StatusCodes.BadUserAccessDenied,
    StatusCodes.BadIdentityTokenInvalid,
    StatusCodes.BadIdentityTokenRejected,
    StatusCodes.BadUserSignatureInvalid,
}
_SECURITY_REJECTED = {
    StatusCodes.BadSecurityChecksFailed,
    StatusCodes.BadSecurityPolicyRejected,
    StatusCodes.BadSecurityModeRejected,
    StatusCodes.BadCertificateInvalid,
    StatusCodes.BadCertificateUntrusted,
    StatusCodes.BadCertificateUriInvalid,
    StatusCodes.BadCertificateTimeInvalid,
    StatusCodes.BadCertificateRevoked,
    StatusCodes.BadCertificateUseNotAllowed,
}


# --- node ids -------------------------------------------------------------------------------------

_NODE_ID = re.compile(
    r"(?:nsu=(?P<uri>[^;]+);|ns=(?P<index>\d+);)?(?P<kind>[isgb])=(?P<identifier>.+)", re.DOTALL
)
_KIND_TYPE = {
    "i": ua.NodeIdType.Numeric,
    "s": ua.NodeIdType.String,
    "g": ua.NodeIdType.Guid,
    "b": ua.NodeIdType.ByteString,
}


@dataclass(frozen=True, slots=True)
class NodeRef:
    """A node id as written in YAML, before it meets a server.

    `namespace` is a namespace URI (`nsu=`, portable across servers and restarts) or an index
    (`ns=`, valid only for the server's current namespace array); no prefix means namespace 0.
    """

    namespace: str | int
    kind: Literal["i", "s", "g", "b"]
    identifier: int | str | uuid.UUID | bytes

    @classmethod
    def parse(cls, text: str) -> NodeRef:
        """Parse `nsu=<uri>;s=...`, `ns=2;s=...`, `i=85`, `g=<uuid>` or `b=<base64>`."""
        match = _NODE_ID.fullmatch(text.strip())
        if match is None:
            raise ValueError(
                f"{text!r} is not a node id such as nsu=urn:example;s=Line1.Speed, "
                "ns=2;s=Line1.Speed or i=2258"
            )
        namespace: str | int = match["uri"] if match["uri"] else int(match["index"] or 0)
        raw = match["identifier"]
        identifier: int | str | uuid.UUID | bytes
        match match["kind"]:
            case "i":
                if not raw.isdigit() or int(raw) > 0xFFFFFFFF:
                    raise ValueError(f"{text!r}: a numeric identifier is 0 to 4294967295")
                identifier = int(raw)
            case "g":
                try:
                    identifier = uuid.UUID(raw)
                except ValueError:
                    raise ValueError(f"{text!r}: {raw!r} is not a GUID") from None
            case "b":
                try:
                    identifier = base64.b64decode(raw, validate=True)
                except (binascii.Error, ValueError):
                    raise ValueError(f"{text!r}: {raw!r} is not base64") from None
            case _:
                identifier = raw
        return cls(namespace, match["kind"], identifier)  # type: ignore[arg-type]

    def resolve(self, namespaces: Sequence[str]) -> ua.NodeId:
        """The NodeId on a server with this namespace array; LookupError if the URI is absent."""
        if isinstance(self.namespace, str):
            try:
                index = list(namespaces).index(self.namespace)
            except ValueError:
                raise LookupError(f"the server has no namespace {self.namespace!r}") from None
        else:
            index = self.namespace
        return make_node_id(self.identifier, index, _KIND_TYPE[self.kind])


def make_node_id(identifier: object, namespace_index: int, kind: ua.NodeIdType) -> ua.NodeId:
    """A NodeId from plain Python values (asyncua annotates its own int and str subclasses)."""
    return ua.NodeId(cast(Any, identifier), cast(Any, namespace_index), kind)


def portable_node_id(node_id: ua.NodeId, namespaces: Sequence[str]) -> str:
    """`nsu=<uri>;s=...` for a node outside namespace 0, `i=85` style inside it."""
    local = make_node_id(node_id.Identifier, 0, node_id.NodeIdType).to_string()
    index = node_id.NamespaceIndex
    if index == 0:
        return local
    if index < len(namespaces):
        return f"nsu={namespaces[index]};{local}"
    return node_id.to_string()


# --- structured values ----------------------------------------------------------------------------

_SELECT_STEP = re.compile(
    r"\[(?P<index>\d+)\]|\[(?P<field>[A-Za-z_]\w*)=(?P<match>[^\]]*)\]|\.?(?P<name>[A-Za-z_]\w*)"
)


@dataclass(frozen=True, slots=True)
class Selector:
    """A path into a structured value: array elements (`[0]`, `[ID=1]`) and fields (`.Count`)."""

    text: str
    steps: tuple[tuple[str, str, str], ...]
    """Each step: ("index", "0", ""), ("match", field, value) or ("field", name, "")."""

    @classmethod
    def parse(cls, text: str) -> Selector:
        steps: list[tuple[str, str, str]] = []
        position = 0
        while position < len(text):
            step = _SELECT_STEP.match(text, position)
            if step is None:
                raise ValueError(f"select {text!r}: cannot read {text[position:]!r}; write "
                                 "e.g. [0].AccCount, [ID=1].Count or Message")
            if step["index"] is not None:
                steps.append(("index", step["index"], ""))
            elif step["field"] is not None:
                steps.append(("match", step["field"], step["match"]))
            else:
                steps.append(("field", step["name"], ""))
            position = step.end()
        if not steps:
            raise ValueError("select must not be empty")
        return cls(text, tuple(steps))

    def apply(self, value: object) -> object:
        """The selected part; LookupError in words when the value has no such part."""
        for kind, key, wanted in self.steps:
            if isinstance(value, ua.ExtensionObject):
                raise LookupError(
                    f"select {self.text}: the server sent a structure of type "
                    f"{value.TypeId.to_string()} that cannot be decoded (it publishes no "
                    "definition of that data type)")
            if kind == "field":
                if not hasattr(value, "__dataclass_fields__") or not hasattr(value, key):
                    fields = ", ".join(getattr(value, "__dataclass_fields__", {})) or "none"
                    raise LookupError(f"select {self.text}: the value has no field {key!r} "
                                      f"(fields: {fields})")
                value = getattr(value, key)
                continue
            if not isinstance(value, list | tuple):
                raise LookupError(f"select {self.text}: the value is not an array")
            if kind == "index":
                if int(key) >= len(value):
                    raise LookupError(f"select {self.text}: the array has {len(value)} "
                                      f"element(s), no [{key}]")
                value = value[int(key)]
                continue
            found = [element for element in value
                     if str(plain_value(getattr(element, key, None))) == wanted]
            if not found:
                raise LookupError(f"select {self.text}: no element with {key} = {wanted}")
            value = found[0]
        return value


# --- config -----------------------------------------------------------------------------------


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
                raise ValueError(f"mode {self.mode} needs a policy such as Basic256Sha256, "
                                 "not None")
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
        default=DEFAULT_RECONNECT_MAX_DELAY, gt=0, description=RECONNECT_MAX_DELAY_DOC,
        examples=["10s"])
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


# --- values -----------------------------------------------------------------------------------


def quality_of(status: ua.StatusCode | None) -> Quality:
    """OPC UA severity bits to sample quality: Good, Uncertain, anything else Bad."""
    if status is None or status.is_good():
        return Quality.GOOD
    if status.is_uncertain():
        return Quality.UNCERTAIN
    return Quality.BAD


def plain_value(value: object) -> TagValue:
    """An OPC UA value as a sample value: numbers, booleans and strings as they are, text
    types as their text, timestamps in ISO 8601, anything else (arrays, structures) as text."""
    if value is None or isinstance(value, bool | float | str):
        return value
    if isinstance(value, int):
        return int(value)  # drops an IntEnum's class
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, ua.LocalizedText):
        return value.Text
    if isinstance(value, ua.QualifiedName | ua.NodeId):
        return value.to_string()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _epoch_seconds(stamp: datetime | None) -> float | None:
    if stamp is None or stamp.year <= 1601:  # 1601 is OPC UA's "no timestamp"
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def sample_from(
    driver: str,
    tag: str,
    datavalue: ua.DataValue | None,
    now: float,
    select: Selector | None = None,
) -> Sample:
    """The Sample for one DataValue (the part `select` picks of it): its source timestamp, else
    the server's, else `now`. LookupError when `select` finds no such part."""
    if datavalue is None:
        return Sample(driver, tag, None, now, Quality.BAD)
    quality = quality_of(datavalue.StatusCode)
    value = None
    if quality is not Quality.BAD and datavalue.Value is not None:
        raw = datavalue.Value.Value
        value = plain_value(select.apply(raw) if select is not None else raw)
    source_time = (
        _epoch_seconds(datavalue.SourceTimestamp)
        or _epoch_seconds(datavalue.ServerTimestamp)
        or now
    )
    return Sample(driver, tag, value, source_time, quality)


class PendingSamples:
    """Samples on their way from asyncua's receive path to the sink.

    `put` never blocks, so a slow sink cannot stall the OPC UA connection. Past `limit` samples
    it keeps only the latest per tag: intermediate telemetry is dropped (and counted), the
    latest value of every tag, and so a counter's total, is kept.
    """

    def __init__(self, limit: int = MAX_PENDING_SAMPLES) -> None:
        self.limit = limit
        self.dropped = 0
        self._samples: list[Sample | DeviceRestarted] = []
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._samples)

    def put(self, sample: Sample | DeviceRestarted) -> int:
        """Queue a sample (or a restart notice, never dropped); return how many older samples
        were dropped to make room."""
        self._samples.append(sample)
        self._ready.set()
        if len(self._samples) <= self.limit:
            return 0
        latest: dict[tuple[int, str], Sample | DeviceRestarted] = {}
        restarts = 0
        for queued in self._samples:
            # Samples are never merged across a restart notice: the last value read before
            # the restart and the first after it both count.
            if isinstance(queued, DeviceRestarted):
                restarts += 1
                latest[(restarts, "")] = queued
                continue
            key = (restarts, queued.tag)
            latest.pop(key, None)  # re-insert, so the order is by latest arrival
            latest[key] = queued
        dropped = len(self._samples) - len(latest)
        self._samples = list(latest.values())
        self.dropped += dropped
        return dropped

    async def take(self) -> list[Sample | DeviceRestarted]:
        """Wait for samples and take them all, oldest first."""
        await self._ready.wait()
        batch, self._samples = self._samples, []
        self._ready.clear()
        return batch


# --- the client -------------------------------------------------------------------------------


async def _application_uri(certificate: Path) -> str:
    """The URI in the certificate's SubjectAltName, which servers match against the client's."""
    cert = await uacrypto.load_certificate(str(certificate))
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return DEFAULT_APPLICATION_URI
    uris = names.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else DEFAULT_APPLICATION_URI


class SecuritySetupError(Exception):
    """A client certificate, its key or a pinned server certificate does not load."""


# --- the trust list -------------------------------------------------------------------------


class UntrustedCertificate(Exception):
    """The server's certificate is not in the trust list (or no longer valid); the message
    says which file to move to trust it."""


@dataclass(frozen=True, slots=True)
class CertificateFacts:
    """What a technician checks before trusting a server certificate."""

    thumbprint: str
    """SHA-1 of the DER, upper-case hex: what UaExpert and most servers show."""
    sha256: str
    subject: str
    issuer: str
    application_uri: str | None
    not_before: datetime
    not_after: datetime

    @classmethod
    def of(cls, der: bytes) -> CertificateFacts:
        cert = x509.load_der_x509_certificate(der)
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            uris = names.value.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        return cls(
            thumbprint=hashlib.sha1(der).hexdigest().upper(),  # a name, not a MAC
            sha256=hashlib.sha256(der).hexdigest().upper(),
            subject=cert.subject.rfc4514_string(),
            issuer=cert.issuer.rfc4514_string(),
            application_uri=uris[0] if uris else None,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )

    @property
    def file_name(self) -> str:
        """`<common name> [<thumbprint>].der`, as UaExpert names its PKI files."""
        common = self.subject.split("CN=", 1)[1].split(",", 1)[0] if "CN=" in self.subject \
            else "server"
        safe = re.sub(r"[^A-Za-z0-9._ -]", "_", common).strip(" .") or "server"
        return f"{safe[:64]} [{self.thumbprint}].der"

    def lines(self) -> list[str]:
        return [
            f"  subject:         {self.subject}",
            f"  issuer:          {self.issuer}"
            + ("  (self-signed)" if self.issuer == self.subject else ""),
            f"  application URI: {self.application_uri or '(none)'}",
            f"  valid:           {self.not_before:%Y-%m-%d %H:%M} to "
            f"{self.not_after:%Y-%m-%d %H:%M} UTC",
            f"  thumbprint:      {self.thumbprint} (SHA-1)",
            f"  SHA-256:         {self.sha256}",
        ]


@dataclass(frozen=True, slots=True)
class TrustList:
    """Server certificates the gateway trusts, one file each (DER or PEM) in `trusted/`; one it
    met and refused is saved in `rejected/` for a person to judge, as UaExpert and open62541
    keep theirs. Moving a file from rejected/ to trusted/ is how a certificate is trusted."""

    root: Path

    @property
    def trusted(self) -> Path:
        return self.root / "trusted"

    @property
    def rejected(self) -> Path:
        return self.root / "rejected"

    def trusted_thumbprints(self) -> set[str]:
        found: set[str] = set()
        if not self.trusted.is_dir():
            return found
        for path in sorted(self.trusted.iterdir()):
            try:
                data = path.read_bytes()
                der = (x509.load_pem_x509_certificate(data).public_bytes(Encoding.DER)
                       if data.lstrip().startswith(b"-----") else data)
                found.add(CertificateFacts.of(der).thumbprint)
            except (OSError, ValueError) as exc:
                log.warning("Trust list: %s is not a certificate (%s); ignored.", path, exc,
                            extra={"path": str(path)})
        return found

    def check(self, der: bytes, endpoint: str) -> None:
        """Return if `der` is trusted and valid now; else save it in rejected/ and raise."""
        facts = CertificateFacts.of(der)
        if facts.thumbprint in self.trusted_thumbprints():
            now = datetime.now(UTC)
            if not facts.not_before <= now <= facts.not_after:
                raise UntrustedCertificate(
                    f"the server's certificate {facts.thumbprint} ({facts.subject}) is trusted "
                    f"but not valid now (valid {facts.not_before:%Y-%m-%d} to "
                    f"{facts.not_after:%Y-%m-%d}): the server needs a new certificate")
            return
        saved = self.rejected / facts.file_name
        try:
            self.rejected.mkdir(parents=True, exist_ok=True)
            if not saved.exists():
                saved.write_bytes(der)
        except OSError as exc:
            saved_note = f"(could not save it in {self.rejected}: {exc})"
        else:
            saved_note = f"saved as {saved}"
        raise UntrustedCertificate(
            f"the server's certificate is not trusted: {facts.subject}, application URI "
            f"{facts.application_uri or '(none)'}, thumbprint {facts.thumbprint}; {saved_note}. "
            f"If this is the right server, move that file to {self.trusted}/ (or run: "
            f"plantsync trust opcua --endpoint {endpoint}); if the server should not have a "
            "new certificate, someone may be impersonating it")

    def trust(self, der: bytes) -> Path:
        """Put `der` in trusted/ (and out of rejected/); return its path."""
        facts = CertificateFacts.of(der)
        self.trusted.mkdir(parents=True, exist_ok=True)
        path = self.trusted / facts.file_name
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(der)
        os.replace(temporary, path)
        (self.rejected / facts.file_name).unlink(missing_ok=True)
        return path


async def new_client(
    endpoint: str,
    security: OpcUaSecurity,
    *,
    username: str | None = None,
    password: str | None = None,
    request_timeout: float = 5.0,
    session_timeout: float = 60.0,
    keepalive: float = 5.0,
    client_name: str = "PlantSync Edge",
    trust: TrustList | None = None,
) -> Client:
    """An asyncua client set up for `endpoint`, not yet connected.

    With a security policy and no pinned server certificate this asks the server for its
    endpoints (network I/O), because the channel needs the server's certificate, and checks
    that certificate against `trust` before anything else is sent: a server that is not
    trusted never sees the user's password. UntrustedCertificate if it is not trusted.
    """
    client = Client(endpoint, timeout=request_timeout, watchdog_intervall=keepalive)
    client.name = client.description = client_name
    client.product_uri = DEFAULT_APPLICATION_URI
    client.application_uri = DEFAULT_APPLICATION_URI
    client.session_timeout = int(session_timeout * 1000)
    if username is not None:
        client.set_user(username)
        client.set_password(password or "")
    if security.policy != "None":
        assert security.certificate is not None and security.private_key is not None
        if security.server_certificate is None and trust is None:
            raise SecuritySetupError(
                "no trust list to check the server's certificate against: pin it "
                "(server_certificate) or give a data directory (its pki/trusted)")
        try:
            client.application_uri = await _application_uri(security.certificate)
            for path in (security.private_key, security.server_certificate):
                if path is not None:
                    await asyncio.to_thread(path.read_bytes)  # a clear error, before asyncua's
        except (OSError, ValueError) as exc:
            raise SecuritySetupError(f"cannot load the certificates or key: {exc}") from exc
        await client.set_security(
            _SECURITY_POLICY[security.policy],
            certificate=str(security.certificate),
            private_key=str(security.private_key),
            server_certificate=(
                str(security.server_certificate) if security.server_certificate else None
            ),
            mode=_MESSAGE_SECURITY_MODE[security.mode],
        )
        if security.server_certificate is None and trust is not None:
            peer = client.security_policy.peer_certificate
            if not peer:
                raise SecuritySetupError("the server sent no certificate in its endpoint list")
            await asyncio.to_thread(trust.check, peer, endpoint)
    return client


def describe_error(
    exc: BaseException,
    timeout: float,
    username: str | None = None,
    security: OpcUaSecurity | None = None,
) -> str:
    """Why connecting or talking to a server failed, in words for a technician."""
    if isinstance(exc, UaStatusCodeError):
        name = ua.StatusCode(exc.code).name
        if exc.code in _USER_REJECTED:
            who = f"user {username!r}" if username else "anonymous access"
            return f"the server rejected {who} ({name}): check the username and password"
        if exc.code == StatusCodes.BadTooManySessions:
            return (
                f"the server has no room for another session ({name}). Sessions of clients "
                "that vanished without closing them (a gateway killed, an HMI crashed) stay "
                "until their session timeout runs out; retrying. To fix it for good, raise the "
                "server's session limit, or lower session_timeout in every client's config"
            )
        if exc.code in _SECURITY_REJECTED:
            return f"the server rejected the security settings or client certificate ({name})"
        return f"the server answered {name}"
    if isinstance(exc, SecuritySetupError | UntrustedCertificate):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError):
        return f"connection failed ({exc.strerror or exc})"
    if isinstance(exc, UaError):
        # asyncua's words for a server without an endpoint of the client's policy and mode.
        if "No matching endpoints" in str(exc):
            wanted = f"{security.policy} {security.mode}" if security else "this security"
            return f"the server offers no endpoint with security {wanted}"
        return f"the connection failed ({exc})"
    return f"{type(exc).__name__}: {exc}"


async def _close(client: Client, *, within: float) -> None:
    """End a session and stop asyncua's tasks for it (keep-alive, channel renewal, publish).

    The server is told when the connection is still open, but not waited for longer than
    `within`: one that stopped answering would hold up the reconnect for nothing.
    """
    protocol = client.uaclient.protocol
    try:
        async with asyncio.timeout(within):
            if protocol is not None and not protocol.is_closed:
                await client.disconnect()
            else:
                await client.close_session()
    except (Exception, TimeoutError) as exc:
        log.debug("Closing the OPC UA session did not finish cleanly: %s", exc)
    finally:
        client.disconnect_socket()  # also when cancelled mid-close: never leak the socket


async def _load_structures(client: Client, server: str) -> None:
    """Make asyncua decode the server's own structures (OPC 30050's count and alarm structures)
    instead of handing over their raw bytes. A failure leaves them undecoded; whoever selects
    a field of one then says so."""
    # asyncua warns of every namespace-0 enum a server defines a little differently: noise.
    type_log = logging.getLogger("asyncua.ua.uatypes")
    level = type_log.level
    type_log.setLevel(logging.ERROR)
    try:
        await client.load_data_type_definitions()
    except Exception as exc:  # a server with odd definitions
        log.debug("OPC UA server %s: loading its data type definitions failed: %s", server, exc)
    finally:
        type_log.setLevel(level)


async def _close_despite_cancel(client: Client, *, within: float) -> None:
    """`_close`, finished even when the caller is cancelled meanwhile (a stopping daemon
    cancels its drivers again every half second): an orderly stop must not leave the session
    on the server, where it would hold one of its few sessions for the session timeout.
    `_close` is bounded by `within`, so this is too; a cancellation is raised after it."""
    closing = asyncio.ensure_future(_close(client, within=within))
    cancelled = False
    while not closing.done():
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


# --- the driver ---------------------------------------------------------------------------------


SERVER_START_TIME = make_node_id(ObjectIds.Server_ServerStatus_StartTime, 0, ua.NodeIdType.Numeric)
SERVER_STATE = make_node_id(ObjectIds.Server_ServerStatus_State, 0, ua.NodeIdType.Numeric)
_START_TIME_HANDLE = 0x7FFF_0001
_STATE_HANDLE = 0x7FFF_0002
"""Client handles of the driver's own monitored items (ServerStatus), beyond any tag's."""


_LEVEL_HANDLES = 0x0100_0000
"""A packml_state tag's items: the tag's handle plus this times (level + 1)."""

PACKML_NAMESPACE_URI = "http://opcfoundation.org/UA/PackML/"
PACKML_CLEARED = 19
PACKML_RUNNING = 18
"""OPC 30050's StateNumbers of the two states that hold a nested state machine (Cleared holds
MachineState, Running holds ExecuteState); every other state is an ISA-TR88 number."""


class SessionEnded(Exception):
    """The server said something that ends this session (it is shutting down, or not
    running); the message says what, for the log."""


@dataclass(slots=True)
class _Monitored:
    tag: OpcUaTag
    node_id: ua.NodeId
    level: int | None = None
    """For a packml_state tag: which nested state machine's CurrentState.Id this item is
    (0 BaseStateMachine, 1 MachineState, 2 ExecuteState)."""


@dataclass(slots=True)
class _Outcome(Ended):
    """How a session ended: why (`say_again`: waiting will not fix it, an untrusted
    certificate, a rejected user; `retry_after`: a full server answers at once, and frees up
    when an orphaned session times out), and whether the server could not be reached at all
    (then its TCP port is watched while waiting, to go again as soon as it opens)."""

    unreachable: bool = False
    port_was_closed: bool = False
    """Seen closed while waiting: its opening is then news."""


class OpcUaDriver(Driver):
    """Subscribes to one OPC UA server and owns its reconnection.

    `data_dir` (the gateway's) is where the driver remembers the server's last StartTime, so
    that a server restart during a gateway restart is still seen.
    """

    def __init__(self, config: OpcUaConfig, *, data_dir: Path | None = None) -> None:
        super().__init__(config.name)
        self.config = config
        self.data_dir = data_dir
        self.dropped_samples = 0
        """Intermediate samples dropped because the sink fell behind (latest values kept)."""
        self.backoff = Backoff(base=0.5, cap=config.reconnect_max_delay)
        """Delays between reconnect attempts; the shared policy (tests may shorten it)."""
        self.restarts_seen = 0
        """Server restarts detected (a new ServerStatus.StartTime)."""
        self.availability = Availability(
            f"OPC UA server {self.name} at {self.endpoint}", log, health=self.health,
            extra={"driver": self.name, "endpoint": self.endpoint})
        self._bad_tags: dict[str, str] = {}
        self._last_emitted: dict[str, Sample] = {}
        self._overloaded = False
        self._server_start: datetime | None = None
        self._state_levels: dict[str, list[ua.NodeId | None]] = {}
        self._state_numbers: dict[ua.NodeId, int | None] = {}
        self._start_to_save: datetime | None = None

    @property
    def endpoint(self) -> str:
        """The endpoint URL, as logs show it."""
        return self.config.endpoint

    @property
    def _server_start_file(self) -> Path | None:
        if self.data_dir is None:
            return None
        return self.data_dir / "opcua" / f"{self.name}.server.json"

    async def run(self, sink: SampleSink) -> None:
        """Connect, subscribe and reconnect until cancelled; server errors never end it."""
        pending = PendingSamples()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._deliver(pending, sink), name=f"opcua-{self.name}-deliver")
                tasks.create_task(
                    reconnect_forever(lambda: self._session(pending), self.backoff,
                                      self.availability, wait=self._wait_to_retry),
                    name=f"opcua-{self.name}-sessions")
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:  # a failing sink: raise its error as it was
                raise group.exceptions[0] from None
            raise

    async def _deliver(self, pending: PendingSamples, sink: SampleSink) -> None:
        while True:
            batch = await pending.take()
            await sink(batch)
            if self._start_to_save is not None and any(
                isinstance(reading, DeviceRestarted) for reading in batch
            ):
                # Only now: the rules have committed the restart, so a crash before this line
                # announces it again rather than never.
                await asyncio.to_thread(self._save_server_start, self._start_to_save)
                self._start_to_save = None

    async def _wait_to_retry(self, outcome: _Outcome, delay: float) -> None:
        """Wait the backoff delay; but while a server that could not be reached is away, try
        its TCP port every PORT_PROBE_INTERVAL, and go at once when it opens, so a server that
        is back is read within a second, not at the next backoff attempt."""
        if not outcome.unreachable:
            await asyncio.sleep(delay)
            return
        url = urlparse(self.endpoint)
        host, port = url.hostname or "", url.port or 4840
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            started = time.monotonic()
            if await accepts_tcp(host, port, min(left, self.config.timeout)):
                if outcome.port_was_closed:
                    return  # it was closed and opens now: the server is back
                # Open although the connection failed (a server refusing connections, or
                # resetting them): the port says nothing new, so the backoff stands.
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                return
            outcome.port_was_closed = True
            await asyncio.sleep(max(0.0, min(PORT_PROBE_INTERVAL - (time.monotonic() - started),
                                             deadline - time.monotonic())))

    async def _session(self, pending: PendingSamples) -> _Outcome:
        """One session from connect to loss; return why it ended."""
        config = self.config
        client: Client | None = None
        try:
            client = await new_client(
                config.endpoint,
                config.security,
                username=config.username,
                password=config.password.get_secret_value() if config.password else None,
                request_timeout=config.timeout,
                session_timeout=config.session_timeout,
                keepalive=config.keepalive,
                client_name=f"PlantSync Edge {self.name}",
                trust=TrustList(self.data_dir / "pki") if self.data_dir is not None else None,
            )
            await client.connect()
            honour_cancellation()  # asyncua awaits with wait_for, which can lose a stop (3.11)
            return _Outcome(await self._serve(client, pending))
        except SessionEnded as exc:
            return _Outcome(str(exc))
        except Exception as exc:
            reason = describe_error(exc, config.timeout, config.username, config.security)
            if isinstance(exc, UaStatusCodeError) and exc.code == StatusCodes.BadTooManySessions:
                return _Outcome(reason, retry_after=FULL_SERVER_RETRY)
            if isinstance(exc, UntrustedCertificate | SecuritySetupError) or (
                    isinstance(exc, UaStatusCodeError)
                    and exc.code in _USER_REJECTED | _SECURITY_REJECTED):
                return _Outcome(reason, say_again=True)
            return _Outcome(reason, unreachable=isinstance(exc, OSError | TimeoutError),
                            port_was_closed=isinstance(exc, ConnectionRefusedError))
        finally:
            if client is not None:
                await _close_despite_cancel(client, within=config.timeout)

    async def _serve(self, client: Client, pending: PendingSamples) -> str:
        """Subscribe, read current values, then wait for the first sign the session is dead."""
        lost: list[BaseException] = []

        async def on_connection_lost(exc: Exception) -> None:
            lost.append(exc)

        client.connection_lost_callback = on_connection_lost
        self._last_emitted.clear()
        # Before any sample of this session: a restart must reach the rules before the first
        # reading taken after it.
        await self._check_server_status(client, pending)
        namespaces = await client.get_namespace_array()
        monitored = self._resolve(namespaces, pending)
        await self._prepare_structures(client, namespaces, monitored, pending)
        subscription, keepalive = await self._subscribe(client, monitored, pending)
        await self._read_current(client, monitored, pending)
        # Each of these awaits asyncua's wait_for, which on Python 3.11 can swallow a stop; the
        # watchers below would then run on, and a TaskGroup cancels its children only once.
        honour_cancellation()
        self.availability.back()

        # The server may revise the keep-alive up; never call a subscription stale before two
        # keep-alives could have come.
        threshold = max(self.config.stale_after, 2 * keepalive) if self.config.stale_after else 0
        async with asyncio.TaskGroup() as tasks:
            watchers = [
                tasks.create_task(
                    self._watch_connection(client), name=f"opcua-{self.name}-connection"
                ),
                tasks.create_task(
                    self._pump(client, subscription, monitored, pending),
                    name=f"opcua-{self.name}-pump",
                ),
            ]
            if threshold:
                watchers.append(
                    tasks.create_task(
                        self._watch_staleness(subscription, threshold),
                        name=f"opcua-{self.name}-staleness",
                    )
                )
            done, _ = await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
            for watcher in watchers:
                watcher.cancel()
        if client.state is not UaClientState.CONNECTED:
            # asyncua also ends the subscription when it loses the connection; the loss is
            # the reason, and a failed keep-alive read says more than a closed socket.
            if lost and not isinstance(lost[-1], ConnectionError):
                cause = describe_error(lost[-1], self.config.keepalive)
                return f"the session keep-alive failed: {cause}"
            return "the connection was closed"
        return next(watcher.result() for watcher in watchers if watcher in done)

    # --- server restarts -------------------------------------------------------------------

    async def _check_server_status(self, client: Client, pending: PendingSamples) -> None:
        """Read ServerStatus.StartTime and State at connect: a server not running ends the
        session; a new StartTime is a restart."""
        values = await client.uaclient.read(ua.ReadParameters(
            MaxAge=0,
            TimestampsToReturn=ua.TimestampsToReturn.Neither,
            NodesToRead=[
                ua.ReadValueId(NodeId=node_id, AttributeId=AttributeIds.Value)
                for node_id in (SERVER_START_TIME, SERVER_STATE)
            ],
        ))
        start, state = (value.Value.Value if value.Value is not None else None
                        for value in values)
        self._server_state_is(state)
        self._server_started_at(start, pending)

    def _server_state_is(self, state: object) -> None:
        if state is None or state == ua.ServerState.Running:
            return
        try:
            name = ua.ServerState(int(cast(int, state))).name
        except ValueError:
            name = str(state)
        raise SessionEnded(f"the server says its state is {name}, not Running")

    def _server_started_at(self, start: object, pending: PendingSamples) -> None:
        """Compare the server's StartTime with the last one seen (in this process, or saved
        in data_dir by an earlier one); a different one is a restart."""
        if not isinstance(start, datetime) or _epoch_seconds(start) is None:
            return  # a server that does not say when it started cannot tell us it restarted
        if start.tzinfo is None:
            start = start.replace(tzinfo=UTC)
        known = self._server_start
        if known is None:
            known = self._load_server_start()
        self._server_start = start
        if known is None or abs((start - known).total_seconds()) < 0.001:
            if known is None:
                self._save_server_start(start)
            return
        self.restarts_seen += 1
        reason = (f"OPC UA server {self.name} at {self.endpoint} restarted: ServerStatus."
                  f"StartTime {known.isoformat()} -> {start.isoformat()}")
        if self.config.server_restart == "counters_continue":
            log.info("%s; its counters carry on (server_restart: counters_continue).", reason,
                     extra={"driver": self.name, "endpoint": self.endpoint})
            self._save_server_start(start)
            return
        pending.put(DeviceRestarted(self.name, start.timestamp(), reason))
        self._start_to_save = start

    def _load_server_start(self) -> datetime | None:
        path = self._server_start_file
        if path is None:
            return None
        try:
            saved = json.loads(path.read_text())
            if saved.get("endpoint") != self.endpoint:
                return None  # another server: its StartTime says nothing about this one
            return datetime.fromisoformat(saved["start_time"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("OPC UA driver %s: cannot read %s (%s); a server restart while the "
                        "gateway was down would go unseen.", self.name, path, exc,
                        extra={"driver": self.name})
            return None

    def _save_server_start(self, start: datetime) -> None:
        path = self._server_start_file
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            temporary.write_text(json.dumps(
                {"endpoint": self.endpoint, "start_time": start.isoformat()}) + "\n")
            os.replace(temporary, path)
        except OSError as exc:
            log.warning("OPC UA driver %s: cannot write %s (%s); a server restart while the "
                        "gateway is down would go unseen.", self.name, path, exc,
                        extra={"driver": self.name})

    # --- structured values and OPC 30050 state machines -------------------------------------

    async def _prepare_structures(
        self,
        client: Client,
        namespaces: Sequence[str],
        monitored: dict[int, _Monitored],
        pending: PendingSamples,
    ) -> None:
        """Load the server's structure definitions when a tag selects part of one, and put one
        item per nested state machine in place of each packml_state tag."""
        self._state_levels = {}
        self._state_numbers = {}
        if any(item.tag.select is not None for item in monitored.values()):
            await _load_structures(client, self.name)
        machines = [(handle, item) for handle, item in monitored.items()
                    if item.tag.read == "packml_state"]
        for handle, item in machines:
            del monitored[handle]
            if PACKML_NAMESPACE_URI not in namespaces:
                self._tag_failed(item.tag, f"the server has no PackML namespace "
                                 f"({PACKML_NAMESPACE_URI}): it is not an OPC 30050 machine",
                                 pending)
                continue
            packml = list(namespaces).index(PACKML_NAMESPACE_URI)
            machine = client.get_node(item.node_id)
            prefix: list[str] = []
            for level, name in enumerate(("", "MachineState", "ExecuteState")):
                prefix += [f"{packml}:{name}"] if name else []
                try:
                    current_id = await machine.get_child([*prefix, "0:CurrentState", "0:Id"])
                except UaStatusCodeError as exc:
                    where = "/".join([*(step.split(":")[1] for step in prefix), "CurrentState",
                                      "Id"])
                    self._tag_failed(item.tag, f"{item.node_id.to_string()} is not a PackML "
                                     f"BaseStateMachine: it has no {where} "
                                     f"({ua.StatusCode(exc.code).name})", pending)
                    for other in [h for h, i in monitored.items() if i.tag is item.tag]:
                        del monitored[other]
                    break
                monitored[handle + (level + 1) * _LEVEL_HANDLES] = _Monitored(
                    item.tag, current_id.nodeid, level)

    async def _packml_state_changed(
        self,
        client: Client,
        item: _Monitored,
        datavalue: ua.DataValue | None,
        now: float,
        pending: PendingSamples,
    ) -> None:
        """One nested state machine's CurrentState.Id changed: emit the innermost state's
        number once the machines agree (a server updates them one at a time)."""
        assert item.level is not None
        if datavalue is None or quality_of(datavalue.StatusCode) is Quality.BAD:
            self._emit(item.tag, datavalue, now, pending)
            return
        levels = self._state_levels.setdefault(item.tag.name, [None, None, None])
        state = datavalue.Value.Value if datavalue.Value is not None else None
        levels[item.level] = state if isinstance(state, ua.NodeId) and not state.is_null() \
            else None
        number = None
        for level, state_id in enumerate(levels):
            if state_id is None:
                return  # the machine containing this one says it is active: wait for it
            number = await self._state_number(client, state_id)
            if number is None:
                return
            if (level, number) not in ((0, PACKML_CLEARED), (1, PACKML_RUNNING)):
                break  # no sub-machine of this state is active: this is the state
        last = self._last_emitted.get(item.tag.name)
        if last is not None and last.value == number and last.quality is Quality.GOOD:
            return  # another machine of the hierarchy moved, to the same innermost state
        self._emit(item.tag, ua.DataValue(
            ua.Variant(number, ua.VariantType.UInt32),
            SourceTimestamp=datavalue.SourceTimestamp,
            ServerTimestamp=datavalue.ServerTimestamp,
        ), now, pending)

    async def _state_number(self, client: Client, state_id: ua.NodeId) -> int | None:
        """A state object's StateNumber (mandatory in OPC UA's StateType), read once."""
        if state_id not in self._state_numbers:
            try:
                number = await client.get_node(state_id).get_child("0:StateNumber")
                self._state_numbers[state_id] = int(await number.read_value())
            except (UaStatusCodeError, TypeError, ValueError) as exc:
                log.warning("OPC UA server %s: state %s has no readable StateNumber (%s).",
                            self.name, state_id.to_string(), exc, extra={"driver": self.name})
                self._state_numbers[state_id] = None
        return self._state_numbers[state_id]

    def _resolve(self, namespaces: Sequence[str], pending: PendingSamples) -> dict[int, _Monitored]:
        """Node ids for this server's namespace array, by client handle; the rest marked bad."""
        monitored: dict[int, _Monitored] = {}
        for handle, tag in enumerate(self.config.tags, start=1):
            try:
                monitored[handle] = _Monitored(tag, tag.node_ref.resolve(namespaces))
            except LookupError as exc:
                self._tag_failed(tag, str(exc), pending)
        return monitored

    async def _subscribe(
        self, client: Client, monitored: dict[int, _Monitored], pending: PendingSamples
    ) -> tuple[Subscription, float]:
        """Create the subscription and one monitored item per tag, dropping the refused ones;
        return it with the keep-alive interval the server granted, in seconds."""
        config = self.config
        keepalive_count = max(1, math.ceil(config.keepalive / config.publishing_interval))
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=config.publishing_interval * 1000,
            RequestedLifetimeCount=max(
                3 * keepalive_count, math.ceil(config.session_timeout / config.publishing_interval)
            ),
            RequestedMaxKeepAliveCount=keepalive_count,
            MaxNotificationsPerPublish=0,
            PublishingEnabled=True,
            Priority=0,
        )
        # Built directly rather than through client.create_subscription(), which registers it
        # with asyncua's own stale watchdog and reconnect supervisor: this driver owns both.
        subscription = Subscription(
            client.uaclient.session,
            params,
            None,
            queue_maxsize=SUBSCRIPTION_QUEUE,
            overflow=OverflowPolicy.DROP_OLDEST,
        )
        granted = await subscription.init()
        keepalive = granted.RevisedPublishingInterval * granted.RevisedMaxKeepAliveCount / 1000
        # The server's own status, watched in the same subscription: a new StartTime while
        # the session lives (a redundant server taking over) is a restart too, and a State
        # other than Running (Shutdown announced) ends the session before the socket does.
        status_items = [
            ua.MonitoredItemCreateRequest(
                ItemToMonitor=ua.ReadValueId(NodeId=node_id, AttributeId=AttributeIds.Value),
                MonitoringMode=ua.MonitoringMode.Reporting,
                RequestedParameters=ua.MonitoringParameters(
                    ClientHandle=handle, SamplingInterval=-1.0, QueueSize=1, DiscardOldest=True),
            )
            for handle, node_id in ((_START_TIME_HANDLE, SERVER_START_TIME),
                                    (_STATE_HANDLE, SERVER_STATE))
        ]
        await subscription.create_monitored_items(status_items)
        if not monitored:
            return subscription, keepalive
        requests = [self._monitor_request(handle, item) for handle, item in monitored.items()]
        results = await subscription.create_monitored_items(requests)
        for (handle, item), result in zip(list(monitored.items()), results, strict=True):
            if isinstance(result, ua.StatusCode):
                del monitored[handle]
                self._tag_failed(item.tag, _refusal(item, result), pending)
        return subscription, keepalive

    def _monitor_request(self, handle: int, item: _Monitored) -> ua.MonitoredItemCreateRequest:
        tag = item.tag
        parameters = ua.MonitoringParameters(
            ClientHandle=handle,
            # -1 asks for the publishing interval (OPC UA Part 4, 7.21).
            SamplingInterval=(
                tag.sampling_interval * 1000 if tag.sampling_interval is not None else -1.0
            ),
            QueueSize=tag.queue_size,
            DiscardOldest=True,
        )
        if tag.deadband is not None:
            parameters.Filter = ua.DataChangeFilter(
                Trigger=ua.DataChangeTrigger.StatusValue,
                DeadbandType=(
                    ua.DeadbandType.Absolute
                    if tag.deadband.type == "absolute"
                    else ua.DeadbandType.Percent
                ),
                DeadbandValue=tag.deadband.value,
            )
        return ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(NodeId=item.node_id, AttributeId=AttributeIds.Value),
            MonitoringMode=ua.MonitoringMode.Reporting,
            RequestedParameters=parameters,
        )

    async def _read_current(
        self, client: Client, monitored: dict[int, _Monitored], pending: PendingSamples
    ) -> None:
        """Read and emit every monitored tag's current value (the resume point for counters)."""
        if not monitored:
            return
        items = list(monitored.values())
        params = ua.ReadParameters(
            MaxAge=0,
            TimestampsToReturn=ua.TimestampsToReturn.Both,
            NodesToRead=[
                ua.ReadValueId(NodeId=item.node_id, AttributeId=AttributeIds.Value)
                for item in items
            ],
        )
        values = await client.uaclient.read(params)
        now = time.time()
        for item, datavalue in zip(items, values, strict=True):
            if item.level is not None:
                await self._packml_state_changed(client, item, datavalue, now, pending)
            else:
                self._emit(item.tag, datavalue, now, pending)

    async def _pump(
        self,
        client: Client,
        subscription: Subscription,
        monitored: dict[int, _Monitored],
        pending: PendingSamples,
    ) -> str:
        """Move notifications into the buffer as they come; return if the server ends them."""
        async for event in subscription:
            if isinstance(event, DataChangeEvent):
                notification = event.data.monitored_item
                value = notification.Value.Value if notification.Value is not None else None
                if notification.ClientHandle == _START_TIME_HANDLE:
                    self._server_started_at(value.Value if value is not None else None, pending)
                    continue
                if notification.ClientHandle == _STATE_HANDLE:
                    try:
                        self._server_state_is(value.Value if value is not None else None)
                    except SessionEnded as exc:
                        return str(exc)
                    continue
                item = monitored.get(notification.ClientHandle)
                if item is not None and item.level is not None:
                    self.health.reads += 1
                    await self._packml_state_changed(
                        client, item, notification.Value, time.time(), pending)
                    honour_cancellation()  # it reads the server through wait_for (3.11)
                elif item is not None:
                    self.health.reads += 1
                    self._emit(item.tag, notification.Value, time.time(), pending)
            elif isinstance(event, StatusChangeEvent) and event.notification.Status.is_bad():
                return f"the server ended the subscription ({event.notification.Status.name})"
        return "the subscription was closed"

    async def _watch_connection(self, client: Client) -> str:
        """Return once asyncua sees the connection go: a closed socket or a failed keep-alive."""
        async with client.subscribe_state() as states:
            while client.state is UaClientState.CONNECTED:
                await states.next_change()
        return "the connection was closed"

    async def _watch_staleness(self, subscription: Subscription, threshold: float) -> str:
        """Return when neither a data change nor a keep-alive came for `threshold` seconds."""
        started = time.monotonic()
        while True:
            last = max(subscription.last_publish_at or started, started)
            quiet = time.monotonic() - last
            if quiet >= threshold:
                return f"no data change and no keep-alive for {threshold:g}s"
            await asyncio.sleep(threshold - quiet)

    def _emit(
        self, tag: OpcUaTag, datavalue: ua.DataValue | None, now: float, pending: PendingSamples
    ) -> None:
        try:
            sample = sample_from(self.name, tag.name, datavalue, now, tag.selector)
        except LookupError as exc:  # the structure has no such element or field
            self._tag_failed(tag, str(exc), pending)
            return
        if sample.quality is not Quality.BAD and tag.name in self._bad_tags:
            self._tag_recovered(tag)
        last = self._last_emitted.get(tag.name)
        # The subscription's first notification can arrive after the read that followed it;
        # emitting the older value then would make a counter step back and count twice.
        if last is not None and (sample.source_time < last.source_time or sample == last):
            return
        self._last_emitted[tag.name] = sample
        if sample.quality is not Quality.BAD:
            # Arrival, not source time: a value unchanged for hours is still fresh news.
            self.health.last_sample_at = now
        dropped = pending.put(sample)
        if dropped:
            self.dropped_samples += dropped
            if not self._overloaded:
                self._overloaded = True
                log.warning(
                    "OPC UA driver %s: the pipeline is behind; keeping only the latest value per "
                    "tag until it catches up.",
                    self.name,
                    extra={"driver": self.name, "dropped": self.dropped_samples},
                )
        elif self._overloaded and len(pending) <= 1:
            self._overloaded = False

    def _tag_failed(self, tag: OpcUaTag, reason: str, pending: PendingSamples) -> None:
        self._emit(tag, None, time.time(), pending)
        self.health.record_error(f"tag {tag.name}: {reason}")
        if self._bad_tags.get(tag.name) == reason:
            return
        self._bad_tags[tag.name] = reason
        log.warning(
            "OPC UA server %s at %s: tag %s (%s) is bad: %s.",
            self.name,
            self.endpoint,
            tag.name,
            tag.node,
            reason,
            extra={"driver": self.name, "endpoint": self.endpoint, "tag": tag.name},
        )

    def _tag_recovered(self, tag: OpcUaTag) -> None:
        if self._bad_tags.pop(tag.name, None) is not None:
            log.info(
                "OPC UA server %s at %s: tag %s (%s) reads again.",
                self.name,
                self.endpoint,
                tag.name,
                tag.node,
                extra={"driver": self.name, "endpoint": self.endpoint, "tag": tag.name},
            )


def _refusal(item: _Monitored, status: ua.StatusCode) -> str:
    if status.value in (StatusCodes.BadNodeIdUnknown, StatusCodes.BadNodeIdInvalid):
        return f"the server has no node {item.node_id.to_string()} ({status.name})"
    if status.value in (
        StatusCodes.BadMonitoredItemFilterUnsupported,
        StatusCodes.BadMonitoredItemFilterInvalid,
        StatusCodes.BadFilterNotAllowed,
        StatusCodes.BadDeadbandFilterInvalid,
    ):
        return f"the server cannot apply its deadband ({status.name})"
    return f"the server refused to monitor it ({status.name})"


# --- browse -------------------------------------------------------------------------------------


def _browse_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plantsync browse opcua",
        description="Print an OPC UA server's address space as a tree, with node ids in the "
        "portable nsu= form to copy into the driver's tags.",
    )
    parser.add_argument("--endpoint", required=True, help="opc.tcp://host:port")
    parser.add_argument("--depth", type=int, default=6, help="levels below the start node")
    parser.add_argument("--start", default="i=85", help="start node id (default: Objects)")
    parser.add_argument(
        "--standard",
        action="store_true",
        help="also expand the server's own namespace-0 objects (Server, Aliases, ...)",
    )
    parser.add_argument("--username", help="user name (default: anonymous)")
    parser.add_argument("--password", help="password for --username")
    parser.add_argument("--policy", choices=("None", *_SECURITY_POLICY), default="None")
    parser.add_argument("--mode", choices=("None", "Sign", "SignAndEncrypt"), default="None")
    parser.add_argument("--certificate", type=Path, help="client certificate (DER or PEM)")
    parser.add_argument("--private-key", type=Path, help="client private key")
    parser.add_argument("--server-certificate", type=Path, help="pin the server certificate")
    parser.add_argument(
        "--data-dir", type=Path,
        help="the gateway's data_dir: with a security policy, the server's certificate must be "
        "in its pki/trusted (plantsync trust opcua puts it there)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    return parser


def browse_main(argv: list[str] | None = None) -> int:
    """`plantsync browse opcua`: print the address space; 0, or 1 if it cannot connect."""
    parser = _browse_parser()
    args = parser.parse_args(argv)
    if args.depth < 0:
        parser.error("--depth must not be negative")
    try:
        security = OpcUaSecurity(
            policy=args.policy,
            mode=args.mode,
            certificate=args.certificate,
            private_key=args.private_key,
            server_certificate=args.server_certificate,
        )
        start = NodeRef.parse(args.start)
    except (ValidationError, ValueError) as exc:
        problems = (
            [str(error.get("ctx", {}).get("error", error["msg"])) for error in exc.errors()]
            if isinstance(exc, ValidationError)
            else [str(exc)]
        )
        parser.error("; ".join(problems))
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    return asyncio.run(_browse(args, security, start, sys.stdout))


async def _browse(
    args: argparse.Namespace, security: OpcUaSecurity, start: NodeRef, out: TextIO
) -> int:
    client: Client | None = None
    try:
        client = await new_client(
            args.endpoint,
            security,
            username=args.username,
            password=args.password,
            request_timeout=args.timeout,
            client_name="PlantSync Edge browse",
            trust=TrustList(args.data_dir / "pki") if args.data_dir else None,
        )
        await client.connect()
    except Exception as exc:
        reason = describe_error(exc, args.timeout, args.username, security)
        print(f"Cannot connect to {args.endpoint}: {reason}", file=sys.stderr)
        if client is not None:
            await _close(client, within=args.timeout)
        return 1
    try:
        namespaces = await client.get_namespace_array()
        await _load_structures(client, args.endpoint)
        tree = _Tree(client, namespaces, args.depth, args.standard, out)
        await tree.print_node(start.resolve(namespaces))
    except Exception as exc:
        reason = str(exc) if isinstance(exc, LookupError) else describe_error(exc, args.timeout)
        print(f"Browsing {args.endpoint} failed: {reason}", file=sys.stderr)
        return 1
    finally:
        await _close(client, within=args.timeout)
    return 0


class _Tree:
    """Prints one node per line: browse name, portable node id, class; for variables the data
    type and current value. Indented two spaces per level."""

    def __init__(
        self,
        client: Client,
        namespaces: Sequence[str],
        depth: int,
        standard: bool,
        out: TextIO,
    ) -> None:
        self.client = client
        self.namespaces = namespaces
        self.depth = depth
        self.standard = standard
        self.out = out
        self._type_names: dict[ua.NodeId, str] = {}

    async def print_node(self, node_id: ua.NodeId) -> None:
        node = self.client.get_node(node_id)
        name = await node.read_browse_name()
        node_class = await node.read_node_class()
        await self._print(node_id, name.Name, node_class, level=0)

    async def _print(
        self, node_id: ua.NodeId, name: str, node_class: ua.NodeClass, level: int
    ) -> None:
        line = f"{'  ' * level}{name}  {portable_node_id(node_id, self.namespaces)}  "
        line += node_class.name
        if node_class == ua.NodeClass.Variable:
            line += await self._variable_details(node_id)
        print(line, file=self.out)
        if level >= self.depth or node_class not in (ua.NodeClass.Object, ua.NodeClass.Variable):
            return
        if level > 0 and node_id.NamespaceIndex == 0 and not self.standard:
            return
        children = await self.client.get_node(node_id).get_children_descriptions()
        for child in children:
            child_id = make_node_id(
                child.NodeId.Identifier, child.NodeId.NamespaceIndex, child.NodeId.NodeIdType
            )
            await self._print(child_id, child.BrowseName.Name, child.NodeClass, level + 1)

    async def _variable_details(self, node_id: ua.NodeId) -> str:
        node = self.client.get_node(node_id)
        try:
            data_type = await self._type_name(await node.read_data_type())
            value = await node.read_value()
        except UaStatusCodeError as exc:
            return f"  ({ua.StatusCode(exc.code).name})"
        text = repr(plain_value(value))
        if len(text) > 60:
            text = text[:57] + "..."
        return f"  {data_type} = {text}"

    async def _type_name(self, data_type: ua.NodeId) -> str:
        if data_type not in self._type_names:
            if data_type.NamespaceIndex == 0 and isinstance(data_type.Identifier, int):
                name = ObjectIdNames.get(data_type.Identifier, data_type.to_string())
            else:
                name = (await self.client.get_node(data_type).read_browse_name()).Name
            self._type_names[data_type] = name
        return self._type_names[data_type]


# --- trust ---------------------------------------------------------------------------------------


def _trust_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plantsync trust opcua",
        description="Show an OPC UA server's certificate (thumbprint, subject, application URI, "
        "validity) and, on your yes, add it to the gateway's trust list (data_dir/pki/trusted). "
        "Compare the thumbprint with the one the machine's own display or its builder gives "
        "you before you say yes.",
    )
    parser.add_argument("--endpoint", required=True, help="opc.tcp://host:port")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="the plant config (its data_dir is used)")
    where.add_argument("--data-dir", type=Path, help="the gateway's data_dir")
    parser.add_argument("--yes", action="store_true",
                        help="trust without asking (only for a certificate checked already)")
    parser.add_argument("--reason", default="",
                        help="why, for the hand-action journal (e.g. the ticket, or 'thumbprint "
                        "checked with the machine builder')")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    return parser


TrustJournal = Callable[[Path, str, str], None]
"""Records a certificate trusted by hand: (data_dir, what was trusted, why)."""


def trust_main(
    argv: list[str] | None = None,
    *,
    answer: TextIO | None = None,
    data_dir_of: Callable[[Path], Path] | None = None,
    journal: TrustJournal | None = None,
) -> int:
    """`plantsync trust opcua`: 0 when the server's certificate is trusted (now or already),
    1 when it is not (declined, or the server cannot be reached). `data_dir_of` reads a plant
    config's data_dir and `journal` records the hand action: both given by the CLI, whose
    layer knows configs and the journal."""
    parser = _trust_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        if data_dir_of is None:
            parser.error("--config needs the plantsync command; give --data-dir")
        try:
            data_dir = data_dir_of(args.config)
        except Exception as exc:  # the config's own error, said as it is
            print(exc, file=sys.stderr)
            return 1
    else:
        data_dir = args.data_dir
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    try:
        certificates = asyncio.run(_server_certificates(args.endpoint, args.timeout))
    except Exception as exc:
        print(f"Cannot read the endpoints of {args.endpoint}: "
              f"{describe_error(exc, args.timeout)}", file=sys.stderr)
        return 1
    if not certificates:
        print(f"{args.endpoint} offers no endpoint with a certificate (security None only): "
              "there is nothing to trust.", file=sys.stderr)
        return 1
    trust = TrustList(data_dir / "pki")
    trusted = trust.trusted_thumbprints()
    answer = answer or sys.stdin
    status = 0
    for der, offers in certificates.items():
        facts = CertificateFacts.of(der)
        print(f"Server certificate of {args.endpoint} (for {', '.join(offers)}):")
        print("\n".join(facts.lines()))
        if facts.thumbprint in trusted:
            print(f"Already trusted (in {trust.trusted}).")
            continue
        if not args.yes:
            print("Trust this certificate? Compare the thumbprint first. [y/N] ", end="",
                  flush=True)
            reply = answer.readline().strip().lower()
            if reply not in ("y", "yes"):
                print("Not trusted.")
                status = 1
                continue
        path = trust.trust(der)
        print(f"Trusted: {path}")
        if journal is not None:
            try:
                journal(data_dir, f"server certificate {facts.thumbprint} ({facts.subject}) of "
                        f"{args.endpoint}", args.reason or "(no reason given)")
            except Exception as exc:  # the trust stands; the journal says why it lacks it
                print(f"Trusted, but not journaled as a hand action: {exc}", file=sys.stderr)
        log.info("Server certificate %s of %s trusted by hand.", facts.thumbprint,
                 args.endpoint, extra={"endpoint": args.endpoint, "path": str(path)})
    return status


async def _server_certificates(endpoint: str, request_timeout: float) -> dict[bytes, list[str]]:
    """The distinct certificates a server's endpoints carry, each with the policy and mode
    of the endpoints that carry it. Asks with security None (GetEndpoints needs none)."""
    client = Client(endpoint, timeout=request_timeout)
    endpoints = await client.connect_and_get_server_endpoints()
    found: dict[bytes, list[str]] = {}
    for described in endpoints:
        chain = described.ServerCertificate
        if not chain:
            continue
        der = _first_certificate(chain)
        offer = (f"{described.SecurityPolicyUri.rsplit('#', 1)[-1]} "
                 f"{described.SecurityMode.name}")
        found.setdefault(der, []).append(offer)
    return found


def _first_certificate(chain: bytes) -> bytes:
    """The leaf certificate of a DER chain (certificates back to back): the first DER SEQUENCE,
    its length read from its header."""
    if len(chain) < 2 or chain[0] != 0x30:
        return chain
    if chain[1] & 0x80:
        size = chain[1] & 0x7F
        return chain[:2 + size + int.from_bytes(chain[2:2 + size], "big")]
    return chain[:2 + chain[1]]
