"""An OPC UA machine for offline work: a filler with PackML states, counters and process values.

It is a real peer (an asyncua server) for the OPC UA driver's tests, the demo plant and the
scenario runner. Under Objects, each machine is an object whose variables have string node ids
in the namespace `urn:plantsync:sim:machine`, e.g. `nsu=urn:plantsync:sim:machine;s=filler-02.
Status.StateCurrent`:

| variable                   | type    | content                                                   |
|----------------------------|---------|-----------------------------------------------------------|
| Status.StateCurrent        | Int32   | PackML state number (1 Clearing ... 6 Execute ... 17)     |
| Admin.ProdProcessedCount   | UInt32  | units processed, good and defective, accumulating         |
| Admin.ProdDefectiveCount   | UInt32  | defective units, accumulating                             |
| Admin.StopReason           | Int32   | stop reason code, 0 = none                                |
| Admin.StopReasonText       | String  | stop reason as text                                       |
| Process.Temperature        | Double  | degrees Celsius, 72.0 with noise                          |
| Process.Pressure           | Double  | bar, 4.2 with noise                                       |
| Process.Speed              | Double  | units per minute: 60 x rate while in Execute, else 0      |

A machine starts in Execute. Every 100 ms the counters advance at `rate` processed and
`scrap_rate` defective units per second (fractions accumulate) while in Execute, and not in any
other state; with `stop_at` a machine turns Complete when its processed count reaches it.
With `sampling="per_tag"` (`--sampling per-tag`) the server behaves like one that
samples each variable on its own timer (node-opcua does): a state change counts the units made
up to it and shows the new state at once, but the counters show their last values only at the
next tick, so a subscriber can see Complete before the count of the last units before it.
`OpcUaMachineServer` is the control API for tests and the scenario runner: change the
state, the rate, add counts, pin a process value. The command line (`main`) prints
`opcua-machine listening on opc.tcp://HOST:PORT` once it accepts connections, so a parent
process can wait for that line. With `--security sign|encrypt` it offers only endpoints of one
policy (`--policy`, Basic256Sha256 by default), with a self-signed server certificate made at
start (or `--certificate`), and trusts any client
certificate; with `--user USER:PASS` it accepts only that user.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import logging
import random
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from asyncua import ua
from asyncua.common.instantiate_util import instantiate
from asyncua.common.node import Node
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager
from asyncua.ua.object_ids import ObjectIds
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

log = logging.getLogger(__name__)

NAMESPACE_URI = "urn:plantsync:sim:machine"
APPLICATION_URI = "urn:plantsync:sim:opcua-machine"
TICK_SECONDS = 0.1
WRITES_PER_YIELD = 1_000
"""At a tick, the server answers requests after this many writes: a tick of 6,250 machines
(25,000 writes) otherwise keeps it silent for seconds, longer than clients wait for a reply to
their keep-alive read, as a PLC's server that answers while its values change does not."""
DEFAULT_MACHINE = "filler-02"

TEMPERATURE_NOMINAL, TEMPERATURE_NOISE = 72.0, 0.1
PRESSURE_NOMINAL, PRESSURE_NOISE = 4.2, 0.02

Security = Literal["none", "sign", "encrypt"]
Model = Literal["plantsync", "opc30050"]
ServerPolicy = Literal["Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]

PACKML_NAMESPACE_URI = "http://opcfoundation.org/UA/PackML/"
PACKML_NODESET = Path(__file__).resolve().parent / "nodesets" / "Opc.Ua.PackML.NodeSet2.xml"
"""OPC 30050's information model, as the OPC Foundation publishes it (see nodesets/README.md)."""
NO_TIME = datetime(1601, 1, 1, tzinfo=UTC)
"""OPC UA's "no time" (the DateTime epoch)."""
PACKML_MATERIAL_ID = 1
"""The ID of the one material each machine counts, in its PackMLCountDataType elements."""

_OPC30050_MACHINE_STATES = frozenset({"STOPPED", "STOPPING", "RESETTING"})
_OPC30050_BASE_STATES = frozenset({"ABORTED", "ABORTING", "CLEARING"})
"""Where a PackML state lives among OPC 30050's nested state machines: BaseStateMachine (these,
and Cleared), its MachineState (these, and Running), and that one's ExecuteState (the rest)."""
Sampling = Literal["together", "per_tag"]
STATE_VARIABLES = (
    "Status.StateCurrent",
    "Admin.StopReason",
    "Admin.StopReasonText",
    "Process.Speed",
)
"""What a state change writes at once in `per_tag` sampling; the counters wait for the clock."""


class PackMLState(enum.IntEnum):
    """PackML (ISA-TR88.00.02) state numbers, as StateCurrent reports them."""

    CLEARING = 1
    STOPPED = 2
    STARTING = 3
    IDLE = 4
    SUSPENDED = 5
    EXECUTE = 6
    STOPPING = 7
    ABORTING = 8
    ABORTED = 9
    HOLDING = 10
    HELD = 11
    UNHOLDING = 12
    SUSPENDING = 13
    UNSUSPENDING = 14
    RESETTING = 15
    COMPLETING = 16
    COMPLETE = 17

    @classmethod
    def of(cls, state: PackMLState | int | str) -> PackMLState:
        """The state for a number or a name such as `Execute` or `held`."""
        if isinstance(state, str) and not state.strip().isdigit():
            try:
                return cls[state.strip().upper()]
            except KeyError:
                raise ValueError(f"{state!r} is not a PackML state name") from None
        return cls(int(state))


VARIABLE_TYPES: dict[str, ua.VariantType] = {
    "Status.StateCurrent": ua.VariantType.Int32,
    "Admin.ProdProcessedCount": ua.VariantType.UInt32,
    "Admin.ProdDefectiveCount": ua.VariantType.UInt32,
    "Admin.StopReason": ua.VariantType.Int32,
    "Admin.StopReasonText": ua.VariantType.String,
    "Process.Temperature": ua.VariantType.Double,
    "Process.Pressure": ua.VariantType.Double,
    "Process.Speed": ua.VariantType.Double,
}
"""Every variable of a machine, by its path below the machine object."""

UINT32_MAX = 2**32 - 1


def node_id_string(machine: str, variable: str) -> str:
    """The portable node id of a machine's variable, as the driver's YAML writes it."""
    return f"nsu={NAMESPACE_URI};s={machine}.{variable}"


@dataclass
class Machine:
    """One simulated machine: what its variables say, and how it moves on."""

    name: str
    rate: float = 10.0
    scrap_rate: float = 0.0
    state: PackMLState = PackMLState.EXECUTE
    processed: float = 0.0
    defective: float = 0.0
    stop_reason: int = 0
    stop_reason_text: str = ""
    temperature: float = TEMPERATURE_NOMINAL
    pressure: float = PRESSURE_NOMINAL
    stop_at: int | None = None
    """Processed count at which the machine turns Complete (the order is done)."""
    pinned: set[str] = field(default_factory=set)
    """Process values set through the control API; the noise leaves them alone."""
    rng: random.Random = field(default_factory=random.Random, repr=False)

    @property
    def processed_count(self) -> int:
        """Admin.ProdProcessedCount as the server shows it."""
        return int(self.processed) & UINT32_MAX

    @property
    def defective_count(self) -> int:
        """Admin.ProdDefectiveCount as the server shows it."""
        return int(self.defective) & UINT32_MAX

    @property
    def speed(self) -> float:
        """Units per minute: the rate while in Execute, 0 otherwise."""
        return self.rate * 60.0 if self.state is PackMLState.EXECUTE else 0.0

    def advance(self, seconds: float) -> None:
        """Let `seconds` of production pass."""
        if "Process.Temperature" not in self.pinned:
            self.temperature = TEMPERATURE_NOMINAL + self.rng.gauss(0.0, TEMPERATURE_NOISE)
        if "Process.Pressure" not in self.pinned:
            self.pressure = PRESSURE_NOMINAL + self.rng.gauss(0.0, PRESSURE_NOISE)
        if self.state is PackMLState.EXECUTE:
            self.processed += max(self.rate, 0.0) * seconds
            self.defective += max(self.scrap_rate, 0.0) * seconds
            if self.stop_at is not None and self.processed >= self.stop_at:
                self.defective = min(self.defective, float(self.stop_at))
                self.processed = float(self.stop_at)
                self.state = PackMLState.COMPLETE

    def values(self) -> dict[str, Any]:
        """Every variable's current value, by path."""
        return {
            "Status.StateCurrent": int(self.state),
            "Admin.ProdProcessedCount": self.processed_count,
            "Admin.ProdDefectiveCount": self.defective_count,
            "Admin.StopReason": self.stop_reason,
            "Admin.StopReasonText": self.stop_reason_text,
            "Process.Temperature": self.temperature,
            "Process.Pressure": self.pressure,
            "Process.Speed": self.speed,
        }


class _OneUser(UserManager):
    """An asyncua user manager that accepts exactly one username and password."""

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self.password = password

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        # Said in the log, so a test can tell whether a client ever sent its password here.
        if username == self.username and password == self.password:
            log.info("Login of user %r accepted.", username)
            return User(role=UserRole.User, name=username)
        log.info("Login of user %r refused.", username)
        return None


def make_self_signed_certificate(
    certificate: Path,
    private_key: Path,
    application_uri: str,
    usage: Sequence[x509.ObjectIdentifier],
    host_name: str | None = None,
) -> None:
    """Write a self-signed application instance certificate (DER) and its key (PEM).

    The certificate names `application_uri` and the host in its SubjectAltName, as OPC UA
    peers expect. Used for the simulator's server certificate and for test client certificates.
    """
    key = cert_gen.generate_private_key()
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(application_uri),
        x509.DNSName(host_name or socket.gethostname()),
    ]
    cert = cert_gen.generate_self_signed_app_certificate(
        key, application_uri, {}, names, extended=list(usage), days=365
    )
    private_key.write_bytes(cert_gen.dump_private_key_as_pem(key))
    certificate.write_bytes(cert.public_bytes(encoding=Encoding.DER))


class OpcUaMachineServer:
    """The simulator's server and its control API; `start()`/`stop()` or `async with`.

    Control methods name a machine (`filler-02`) and take effect on the server at once, so a
    subscribed client sees the change at its next publishing interval.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 4840,
        *,
        machines: Sequence[str] = (DEFAULT_MACHINE,),
        rate: float = 10.0,
        scrap_rate: float = 0.0,
        start_count: int = 0,
        stop_at: int | None = None,
        security: Security = "none",
        policy: ServerPolicy = "Basic256Sha256",
        user: tuple[str, str] | None = None,
        certificate: Path | None = None,
        private_key: Path | None = None,
        tick: float = TICK_SECONDS,
        model: Model = "plantsync",
        sampling: Sampling = "together",
        on_publish: Callable[[datetime, int], None] | None = None,
    ) -> None:
        """`on_publish`, if given, hears of every round of writes: its source timestamp and
        how many values it changed (one data change per subscribed item each), so a benchmark
        or test counts what a client should get from the server's own count."""
        if not machines:
            raise ValueError("at least one machine is needed")
        if len(set(machines)) != len(machines):
            raise ValueError("machine names must be unique")
        if (certificate is None) != (private_key is None):
            raise ValueError("give both a certificate and a private key, or neither")
        self.host = host
        self.requested_port = port
        self.security = security
        self.policy = policy
        self.user = user
        self.certificate = certificate
        self.private_key = private_key
        self.tick = tick
        self.model = model
        self.sampling = sampling
        self.on_publish = on_publish
        self._last_advance = time.monotonic()
        self.machines: dict[str, Machine] = {
            name: Machine(
                name,
                rate=rate,
                scrap_rate=scrap_rate,
                processed=float(start_count),
                stop_at=stop_at,
            )
            for name in machines
        }
        self._server: Server | None = None
        self._namespace = 0
        self._nodes: dict[tuple[str, str], Node] = {}
        self._written: dict[tuple[str, str], Any] = {}
        self._packml = 0
        self._packml_states: dict[tuple[int, str], ua.NodeId] = {}
        """OPC 30050 state objects by (state machine level, state name): CurrentState.Id."""
        self._ticker: asyncio.Task[None] | None = None
        self._temp_dir: tempfile.TemporaryDirectory[str] | None = None

    # --- lifetime -----------------------------------------------------------------------------

    async def __aenter__(self) -> OpcUaMachineServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The bound port (a free one was picked if 0 was asked for)."""
        if self._server is None or self._server.bserver is None:
            return self.requested_port
        return int(self._server.bserver.port)

    @property
    def endpoint(self) -> str:
        """`opc.tcp://host:port`, for clients."""
        return f"opc.tcp://{self.host}:{self.port}"

    async def start(self, listen_after: float = 0.0) -> None:
        """Build the address space, start the production clock and start listening.

        `listen_after` seconds pass between the two, as on a PLC whose program runs (and
        counts) before its OPC UA server is up."""
        server = Server(user_manager=_OneUser(*self.user) if self.user else None)
        await server.init()
        server.set_endpoint(f"opc.tcp://{self.host}:{self.requested_port}")
        server.set_server_name("PlantSync OPC UA machine simulator")
        await server.set_application_uri(APPLICATION_URI)
        await self._configure_security(server)
        self._namespace = await server.register_namespace(NAMESPACE_URI)
        if self.model == "opc30050":
            await server.import_xml(str(PACKML_NODESET))
            await server.load_data_type_definitions()
            self._packml = await server.get_namespace_index(PACKML_NAMESPACE_URI)
        for machine in self.machines.values():
            if self.model == "opc30050":
                await self._add_packml_machine(server, machine)
            else:
                await self._add_machine(server, machine)
        self._server = server
        # Every variable holds the machine's value before anyone can connect: an OPC 30050
        # variable made by `add_variable(None, ...)` holds a null ExtensionObject (TypeId i=0)
        # until written, which a client reading before the clock's first tick would get.
        await self._publish_all()
        self._ticker = asyncio.create_task(self._run_clock(), name="opcua-machine clock")
        if listen_after > 0:
            await asyncio.sleep(listen_after)
        await server.start()

    async def stop(self) -> None:
        """Stop the clock and the server; clients see the connection close."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._server is not None:
            await self._server.stop()
            self._server = None
        if self._temp_dir is not None:
            self._temp_dir.cleanup()
            self._temp_dir = None

    async def serve_forever(self) -> None:
        """Start, run until cancelled, then stop."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    async def _configure_security(self, server: Server) -> None:
        anonymous_or_user = ua.UserNameIdentityToken if self.user else ua.AnonymousIdentityToken
        server.set_identity_tokens([anonymous_or_user])
        if self.security == "none":
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            return
        if self.certificate is None or self.private_key is None:
            self._temp_dir = tempfile.TemporaryDirectory(prefix="opcua-machine-")
            self.certificate = Path(self._temp_dir.name) / "server-cert.der"
            self.private_key = Path(self._temp_dir.name) / "server-key.pem"
            make_self_signed_certificate(
                self.certificate,
                self.private_key,
                APPLICATION_URI,
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            )
        await server.load_certificate(str(self.certificate))
        await server.load_private_key(str(self.private_key))
        mode = "Sign" if self.security == "sign" else "SignAndEncrypt"
        name = self.policy.replace("_", "")
        server.set_security_policy([ua.SecurityPolicyType[f"{name}_{mode}"]])

    async def _add_machine(self, server: Server, machine: Machine) -> None:
        ns = self._namespace
        root = await server.nodes.objects.add_object(f"ns={ns};s={machine.name}", machine.name)
        groups: dict[str, Node] = {}
        values = machine.values()
        for path, variant_type in VARIABLE_TYPES.items():
            group, name = path.split(".")
            if group not in groups:
                groups[group] = await root.add_object(
                    f"ns={ns};s={machine.name}.{group}", f"{ns}:{group}"
                )
            node = await groups[group].add_variable(
                f"ns={ns};s={machine.name}.{path}",
                f"{ns}:{name}",
                values[path],
                variant_type,
            )
            self._nodes[(machine.name, path)] = node
            self._written[(machine.name, path)] = values[path]

    async def _add_packml_machine(self, server: Server, machine: Machine) -> None:
        """An instance of OPC 30050's PackMLBaseObjectType, with the optional Admin variables a
        counting machine has. Node ids: `<machine>.Admin.ProdProcessedCount`,
        `<machine>.BaseStateMachine.MachineState.ExecuteState.CurrentState`, ..."""
        ns, packml = self._namespace, self._packml
        types = server.nodes.base_object_type
        base_type = await types.get_child(f"{packml}:PackMLBaseObjectType")
        [root, *_] = await instantiate(
            server.nodes.objects,
            base_type,
            nodeid=ua.NodeId.from_string(f"ns={ns};s={machine.name}"),
            bname=ua.QualifiedName(machine.name, ns),
            dname=ua.LocalizedText(machine.name),
        )
        admin = await root.get_child(f"{packml}:Admin")
        for name, data_type in (
            ("ProdProcessedCount", "PackMLCountDataType"),
            ("ProdDefectiveCount", "PackMLCountDataType"),
            ("StopReason", "PackMLAlarmDataType"),
        ):
            type_node = await server.nodes.base_data_type.get_child(
                ["0:Structure", f"{packml}:{data_type}"]
            )
            node = await admin.add_variable(
                f"ns={ns};s={machine.name}.Admin.{name}",
                ua.QualifiedName(name, packml),
                None,
                varianttype=ua.VariantType.ExtensionObject,
                datatype=type_node.nodeid,
            )
            if data_type == "PackMLCountDataType":
                await node.write_value_rank(ua.ValueRank.OneDimension)
                await node.write_array_dimensions([0])
            self._nodes[(machine.name, f"Admin.{name}")] = node
        status = await root.get_child(f"{packml}:Status")
        self._nodes[(machine.name, "Status.CurMachSpeed")] = await status.get_child(
            f"{packml}:CurMachSpeed"
        )
        path = [f"{packml}:BaseStateMachine"]
        for level, type_name in enumerate(
            (
                "PackMLBaseStateMachineType",
                "PackMLMachineStateMachineType",
                "PackMLExecuteStateMachineType",
            )
        ):
            state_machine = await root.get_child(path)
            self._nodes[(machine.name, f"StateMachine{level}")] = await state_machine.get_child(
                "0:CurrentState"
            )
            self._nodes[(machine.name, f"StateMachine{level}.Id")] = await state_machine.get_child(
                ["0:CurrentState", "0:Id"]
            )
            machine_type = await server.nodes.base_object_type.get_child(
                ["0:StateMachineType", "0:FiniteStateMachineType", f"{packml}:{type_name}"]
            )
            for state in await machine_type.get_children():
                self._packml_states[(level, (await state.read_browse_name()).Name)] = state.nodeid
            path += [f"{packml}:MachineState", f"{packml}:ExecuteState"][level : level + 1]

    def _packml_values(self, machine: Machine) -> dict[str, Any]:
        """What an OPC 30050 machine's variables say, by the keys of `_nodes`."""
        unit = ua.EUInformation(
            NamespaceUri="http://www.opcfoundation.org/UA/units/un/cefact",
            UnitId=4532560,
            DisplayName=ua.LocalizedText("PCE"),
            Description=ua.LocalizedText("piece"),
        )

        def counts(count: int) -> list[Any]:
            return [
                ua.PackMLCountDataType(  # type: ignore[attr-defined]
                    ID=PACKML_MATERIAL_ID,
                    Name="bottle 0.5 l",
                    Unit=unit,
                    Count=count,
                    AccCount=count,
                )
            ]

        state = machine.state.name
        if state in _OPC30050_BASE_STATES:
            levels: list[str | None] = [state, None, None]
        elif state in _OPC30050_MACHINE_STATES:
            levels = ["CLEARED", state, None]
        else:
            levels = ["CLEARED", "RUNNING", state]
        values: dict[str, Any] = {
            "Admin.ProdProcessedCount": counts(machine.processed_count),
            "Admin.ProdDefectiveCount": counts(machine.defective_count),
            "Admin.StopReason": ua.PackMLAlarmDataType(  # type: ignore[attr-defined]
                ID=machine.stop_reason,
                Value=0,
                Message=machine.stop_reason_text,
                Category=0,
                DateTime=NO_TIME,
                AckDateTime=NO_TIME,
                Trigger=machine.stop_reason != 0,
            ),
            "Status.CurMachSpeed": machine.speed,
        }
        for level, name in enumerate(levels):
            title = name.title() if name else None
            values[f"StateMachine{level}"] = ua.LocalizedText(title or None)
            values[f"StateMachine{level}.Id"] = (
                self._packml_states[(level, title)] if title else ua.NodeId()
            )
        return values

    # --- the production clock -----------------------------------------------------------------

    async def _run_clock(self) -> None:
        self._last_advance = time.monotonic()
        while True:
            await asyncio.sleep(self.tick)
            self._advance()
            await self._publish_all(yield_every=WRITES_PER_YIELD)

    def _advance(self) -> None:
        now = time.monotonic()
        for machine in self.machines.values():
            machine.advance(now - self._last_advance)
        self._last_advance = now

    async def _publish_all(
        self, only: Sequence[str] | None = None, yield_every: int | None = None
    ) -> None:
        """Write every value that changed since the last write (of the `only` variables, if
        given), with a source timestamp; with `yield_every`, let the server answer requests
        after that many writes (the clock, on a server of thousands of machines)."""
        if self._server is None:
            return
        stamp = ua.DateTime.now(UTC)
        written = 0
        for machine in self.machines.values():
            opc30050 = self.model == "opc30050"
            values = self._packml_values(machine) if opc30050 else machine.values()
            for path, value in values.items():
                if only is not None and not opc30050 and path not in only:
                    continue
                key = (machine.name, path)
                if self._written.get(key) == value:
                    continue
                self._written[key] = value
                variant_type = _opc30050_variant_type(path) if opc30050 else VARIABLE_TYPES[path]
                datavalue = ua.DataValue(
                    ua.Variant(value, variant_type),
                    SourceTimestamp=stamp,
                    ServerTimestamp=stamp,
                )
                await self._server.write_attribute_value(self._nodes[key].nodeid, datavalue)
                written += 1
                if yield_every is not None and written % yield_every == 0:
                    await asyncio.sleep(0)
        if written and self.on_publish is not None:
            self.on_publish(stamp, written)

    # --- control API --------------------------------------------------------------------------

    def machine(self, name: str) -> Machine:
        """The machine called `name`; its properties read the counts and the state."""
        try:
            return self.machines[name]
        except KeyError:
            raise KeyError(f"no machine {name!r}; machines: {', '.join(self.machines)}") from None

    def node_id(self, machine: str, variable: str) -> str:
        """The portable node id of a variable: `node_id("filler-02", "Status.StateCurrent")`."""
        self.machine(machine)
        if variable not in VARIABLE_TYPES:
            raise KeyError(f"no variable {variable!r}; variables: {', '.join(VARIABLE_TYPES)}")
        return node_id_string(machine, variable)

    async def set_state(
        self,
        machine: str,
        state: PackMLState | int | str,
        stop_reason: int = 0,
        text: str = "",
    ) -> None:
        """Move the machine to a PackML state (number or name), with a stop reason if stopping.
        In `per_tag` sampling the units made up to now are counted first, and shown with the
        next tick; the state shows at once."""
        target = self.machine(machine)
        per_tag = self.sampling == "per_tag"
        if per_tag:
            self._advance()
        target.state = PackMLState.of(state)
        target.stop_reason = stop_reason
        target.stop_reason_text = text
        await self._publish_all(STATE_VARIABLES if per_tag else None)

    async def set_rate(self, machine: str, rate: float, scrap_rate: float | None = None) -> None:
        """Processed (and optionally defective) units per second while in Execute."""
        target = self.machine(machine)
        target.rate = rate
        if scrap_rate is not None:
            target.scrap_rate = scrap_rate
        await self._publish_all()

    async def add_counts(self, machine: str, good: int, scrap: int = 0) -> None:
        """Count `good` good and `scrap` defective units at once (processed counts both)."""
        target = self.machine(machine)
        target.processed += good + scrap
        target.defective += scrap
        await self._publish_all()

    async def set_value(self, machine: str, name: str, value: float) -> None:
        """Set a process value (`Temperature`, `Pressure` or `Process.Temperature`...) and keep it.

        The noise no longer moves a value set here.
        """
        target = self.machine(machine)
        path = name if "." in name else f"Process.{name}"
        if path == "Process.Temperature":
            target.temperature = float(value)
        elif path == "Process.Pressure":
            target.pressure = float(value)
        else:
            raise KeyError(f"{name!r} is not a settable process value (Temperature, Pressure)")
        target.pinned.add(path)
        await self._publish_all()

    @contextlib.asynccontextmanager
    async def offline(self) -> AsyncIterator[None]:
        """A network outage for the body: every client connection drops and new ones are
        refused; then the server listens again on the same port. The machine goes on."""
        if self._server is None or self._server.bserver is None:
            raise RuntimeError("the server is not running")
        listener = self._server.bserver
        await listener.stop()
        try:
            yield
        finally:
            await listener.start()

    async def set_server_state(self, state: ua.ServerState) -> None:
        """Set `Server.ServerStatus.State` (Shutdown, Suspended...), as a server announces
        that it is going down or not serving."""
        if self._server is None:
            raise RuntimeError("the server is not running")
        node = self._server.get_node(f"i={ObjectIds.Server_ServerStatus_State}")
        await node.write_value(ua.Variant(state, ua.VariantType.Int32))

    async def drop_subscriptions(self) -> int:
        """A fault: forget every client's subscriptions while their sessions stay up, as a server
        that lost them would. Reads still work; data changes and keep-alives stop."""
        if self._server is None:
            return 0
        service = self._server.iserver.subscription_service
        ids = list(service.subscriptions)
        await service.delete_subscriptions(ids)
        return len(ids)


def _opc30050_variant_type(path: str) -> ua.VariantType:
    if path.endswith(".Id"):
        return ua.VariantType.NodeId
    if path.startswith("StateMachine"):
        return ua.VariantType.LocalizedText
    if path == "Status.CurMachSpeed":
        return ua.VariantType.Float
    return ua.VariantType.ExtensionObject


def _user(text: str) -> tuple[str, str]:
    username, colon, password = text.partition(":")
    if not colon or not username:
        raise argparse.ArgumentTypeError("expected USER:PASS")
    return username, password


async def _serve_until_signal(args: argparse.Namespace) -> None:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    names = [f"filler-{number:02d}" for number in range(2, 2 + args.machines)]
    machine_server = OpcUaMachineServer(
        args.host,
        args.port,
        machines=names,
        rate=args.rate,
        scrap_rate=args.scrap_rate,
        start_count=args.start,
        stop_at=args.stop_at,
        model=args.model,
        security=args.security,
        policy=args.policy,
        user=args.user,
        certificate=args.certificate,
        private_key=args.private_key,
        sampling="per_tag" if args.sampling == "per-tag" else "together",
    )
    try:
        await machine_server.start(listen_after=args.listen_after)
        try:
            print(f"opcua-machine listening on {machine_server.endpoint}", flush=True)
            log.info(
                "OPC UA machine simulator is listening on %s with %s, security %s.",
                machine_server.endpoint,
                ", ".join(names),
                args.security,
                extra={"endpoint": machine_server.endpoint},
            )
            await asyncio.Event().wait()
        finally:
            await machine_server.stop()
    except asyncio.CancelledError:
        log.info("OPC UA machine simulator stopped.")


def main(argv: list[str] | None = None, prog: str = "python -m simulators.opcua_machine") -> int:
    """Run the simulator from the command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="OPC UA machine simulator: PackML state, counters and process values.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=4840, help="TCP port (0 picks a free one)")
    parser.add_argument(
        "--machines", type=int, default=1, help="number of machines: filler-02, filler-03, ..."
    )
    parser.add_argument(
        "--rate", type=float, default=10.0, help="processed units per second in Execute"
    )
    parser.add_argument(
        "--scrap-rate", type=float, default=0.0, help="defective units per second in Execute"
    )
    parser.add_argument("--start", type=int, default=0, help="initial processed count")
    parser.add_argument(
        "--model",
        choices=("plantsync", "opc30050"),
        default="plantsync",
        help="plantsync: plain variables (Status.StateCurrent...); opc30050: the PackML "
        "companion specification's types (count structures, nested state machines)",
    )
    parser.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="processed count at which each machine stops counting and turns Complete (17)",
    )
    parser.add_argument(
        "--listen-after",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="count this long before the server listens (a PLC whose program runs before "
        "its OPC UA server is up)",
    )
    parser.add_argument(
        "--security",
        choices=("none", "sign", "encrypt"),
        default="none",
        help="none, or Basic256Sha256 with Sign or SignAndEncrypt",
    )
    parser.add_argument(
        "--policy",
        choices=("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"),
        default="Basic256Sha256",
        help="the security policy offered with --security",
    )
    parser.add_argument(
        "--user", type=_user, default=None, metavar="USER:PASS", help="accept only this user"
    )
    parser.add_argument(
        "--sampling",
        choices=("together", "per-tag"),
        default="together",
        help="per-tag: each variable shows changes on its own timer, so a state change can "
        "show before the count of the units made just before it (as node-opcua servers do)",
    )
    parser.add_argument("--certificate", type=Path, help="server certificate (default: generated)")
    parser.add_argument("--private-key", type=Path, help="server private key (default: generated)")
    args = parser.parse_args(argv)
    if args.machines < 1:
        parser.error("--machines must be at least 1")
    if (args.certificate is None) != (args.private_key is None):
        parser.error("give both --certificate and --private-key, or neither")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # asyncua logs a refused login or a dropped client as an error; this simulator's own log
    # says what matters.
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C before the handler is installed
        asyncio.run(_serve_until_signal(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
