"""Modbus driver: polls the coils, discrete inputs, input and holding registers of one device and
emits one Sample per tag; `probe_main` is `plantsync probe modbus`.

The device is reached over Modbus TCP, RTU frames over TCP (serial-to-Ethernet gateways) or a
serial RTU line. Tags belong to a poll group; each group is polled on its own interval by its own
loop, all on the one connection and one request at a time. Within a group, tags are planned into
as few reads as possible (per table, sorted by address, at most 125 registers or 2000 bits per
read, bridging gaps up to `max_gap`), decoded (bits, 16/32/64-bit integers and floats in any of
the four byte orders, strings), scaled, and handed to the sink as one batch per group poll. The
driver owns its reconnect loop: a lost connection, or a request unanswered after `retries`
repeats, closes the client, logs once that the device is unavailable, retries with the shared
backoff and logs once when samples flow again. A Modbus exception response for one read marks
only that read's tags bad; the others keep going. The probe reads one block and prints it decoded
as every type in every byte order, to settle "which order is this PLC?" in a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import importlib.util
import logging
import struct
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient, ModbusBaseClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from drivers.base import (
    DEFAULT_RECONNECT_MAX_DELAY,
    NAME_PATTERN,
    RECONNECT_MAX_DELAY_DOC,
    Driver,
    Quality,
    Sample,
    SampleSink,
    TagValue,
    unique_names,
)
from edge.timing import Backoff, Duration, parse_duration

log = logging.getLogger(__name__)

Table = Literal["holding", "input", "coil", "discrete_input"]
ValueType = Literal[
    "uint16",
    "int16",
    "uint32",
    "int32",
    "float32",
    "uint64",
    "int64",
    "float64",
    "bool",
    "string",
]
NumberType = Literal["uint16", "int16", "uint32", "int32", "float32", "uint64", "int64", "float64"]
ByteOrder = Literal["ABCD", "CDAB", "BADC", "DCBA"]
Transport = Literal["tcp", "rtu_over_tcp", "rtu"]
Parity = Literal["none", "even", "odd"]

TABLES: tuple[Table, ...] = ("holding", "input", "coil", "discrete_input")
BIT_TABLES: tuple[Table, ...] = ("coil", "discrete_input")
BYTE_ORDERS: tuple[ByteOrder, ...] = ("ABCD", "CDAB", "BADC", "DCBA")
DEFAULT_GROUP = "default"
"""The poll group of tags that name none; it is polled every `poll_interval`."""

MAX_REGISTERS_PER_READ = 125
"""The Modbus limit for one read of holding or input registers (function codes 3 and 4)."""
MAX_BITS_PER_READ = 2000
"""The Modbus limit for one read of coils or discrete inputs (function codes 1 and 2)."""

READ_LIMIT: dict[Table, int] = {
    "holding": MAX_REGISTERS_PER_READ,
    "input": MAX_REGISTERS_PER_READ,
    "coil": MAX_BITS_PER_READ,
    "discrete_input": MAX_BITS_PER_READ,
}
TABLE_LABEL: dict[Table, str] = {
    "holding": "holding registers",
    "input": "input registers",
    "coil": "coils",
    "discrete_input": "discrete inputs",
}
REGISTER_WIDTH: dict[NumberType, int] = {
    "uint16": 1,
    "int16": 1,
    "uint32": 2,
    "int32": 2,
    "float32": 2,
    "uint64": 4,
    "int64": 4,
    "float64": 4,
}
_STRUCT_FORMAT: dict[NumberType, str] = {
    "uint16": ">H",
    "int16": ">h",
    "uint32": ">I",
    "int32": ">i",
    "float32": ">f",
    "uint64": ">Q",
    "int64": ">q",
    "float64": ">d",
}
_PARITY_LETTER: dict[Parity, str] = {"none": "N", "even": "E", "odd": "O"}
_TCP_FRAMER: dict[Transport, FramerType] = {
    "tcp": FramerType.SOCKET,
    "rtu_over_tcp": FramerType.RTU,
}

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Interval = Annotated[Duration, Field(gt=0)]


class ModbusTag(BaseModel):
    """One value on the device: where it lives and how it decodes."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=NAME_PATTERN,
        description="Tag name; samples are published as `<driver>.<name>`.",
        examples=["good", "state"],
    )
    address: int = Field(
        ge=0,
        le=65535,
        description="0-based protocol address of the first register or bit (register 40001 is "
        "0, coil 00001 is 0).",
        examples=[0, 10],
    )
    table: Table = Field(
        default="holding",
        description="`holding` registers (function code 3), `input` registers (4), `coil` (1) "
        "or `discrete_input` (2).",
    )
    type: ValueType = Field(
        default="uint16",
        description="How the value decodes: 16-bit types take one register, 32-bit types two, "
        "64-bit types four, `string` takes `length`. Coils and discrete inputs are `bool`, the "
        "default there; so is a tag with `bit`.",
    )
    byte_order: ByteOrder = Field(
        default="ABCD",
        description="The value's bytes, most significant first, as they appear in address "
        "order: `ABCD` big-endian, high word first; `CDAB` words swapped (the low word first; "
        "for 64-bit types all four words reversed); `BADC` bytes swapped within each word; "
        "`DCBA` little-endian. A string keeps its words in address order: only BADC and DCBA "
        "swap the two characters of each register.",
        examples=["ABCD", "CDAB"],
    )
    bit: int | None = Field(
        default=None,
        ge=0,
        le=15,
        description="Read one bit of a register as a bool: 0 is the least significant bit.",
        examples=[0, 15],
    )
    length: int | None = Field(
        default=None,
        ge=1,
        le=MAX_REGISTERS_PER_READ,
        description="For `string`: its size in registers (two characters each). The text is "
        "read as Latin-1 (so ASCII too); trailing NULs and spaces are dropped.",
        examples=[10],
    )
    group: Name = Field(
        default=DEFAULT_GROUP,
        description="The poll group that reads this tag: a name from the driver's `poll_groups`, "
        "or `default` (every `poll_interval`).",
        examples=["fast"],
    )
    scale: float = Field(
        default=1.0,
        description="Multiplier applied to a number: value = raw * scale + offset.",
        examples=[0.1],
    )
    offset: float = Field(
        default=0.0,
        description="Added after scaling. Without scale or offset, integers stay integers.",
    )

    @property
    def width(self) -> int:
        """Number of registers (or bits, in coils and discrete inputs) the tag spans."""
        if self.type == "bool":
            return 1
        if self.type == "string":
            return self.length or 0
        return REGISTER_WIDTH[self.type]

    @model_validator(mode="before")
    @classmethod
    def _bits_default_to_bool(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if "word_order" in data:
            raise ValueError(
                "word_order was replaced by byte_order: `big` is ABCD, `little` is CDAB"
            )
        if "type" not in data and (data.get("table") in BIT_TABLES or data.get("bit") is not None):
            return {**data, "type": "bool"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ModbusTag:
        in_bits = self.table in BIT_TABLES
        if in_bits and self.type != "bool":
            raise ValueError(f"{TABLE_LABEL[self.table]} hold single bits: type must be bool")
        if self.bit is not None:
            if in_bits:
                raise ValueError("bit picks a bit of a register; coils and inputs are bits already")
            if self.type != "bool":
                raise ValueError("a tag with bit is a bool: drop type or write type: bool")
        elif self.type == "bool" and not in_bits:
            raise ValueError("a bool in a register table needs bit (0..15)")
        if self.type == "string" and self.length is None:
            raise ValueError("a string tag needs length, its size in registers")
        if self.type != "string" and self.length is not None:
            raise ValueError("length applies only to type string")
        if self.type in ("bool", "string") and (self.scale != 1.0 or self.offset != 0.0):
            raise ValueError(f"scale and offset apply to numbers, not to a {self.type}")
        if self.address + self.width - 1 > 65535:
            raise ValueError(f"a {self.type} at address {self.address} runs past address 65535")
        return self


class ModbusConfig(BaseModel):
    """A Modbus device, polled in one or more poll groups over one connection."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=NAME_PATTERN,
        description="Driver name, unique in the plant; the prefix of every signal it emits.",
        examples=["press-01"],
    )
    reconnect_max_delay: Duration = Field(
        default=DEFAULT_RECONNECT_MAX_DELAY, gt=0, description=RECONNECT_MAX_DELAY_DOC,
        examples=["10s"])
    type: Literal["modbus"] = Field(description="Selects this driver.")
    transport: Transport = Field(
        default="tcp",
        description="`tcp` is Modbus TCP; `rtu_over_tcp` sends RTU frames over a TCP socket, as "
        "many serial-to-Ethernet gateways expect; `rtu` is a serial line (needs pyserial).",
    )
    host: str | None = Field(
        default=None,
        min_length=1,
        description="Device or gateway IP address or host name; required for the TCP transports.",
        examples=["10.0.0.21"],
    )
    port: int = Field(default=502, ge=1, le=65535, description="TCP port.")
    serial_port: str | None = Field(
        default=None,
        min_length=1,
        description="For `rtu`: the serial device.",
        examples=["/dev/ttyUSB0", "COM3"],
    )
    baudrate: int = Field(
        default=19200, gt=0, description="For `rtu`: line speed in bit/s.", examples=[9600]
    )
    parity: Parity = Field(default="even", description="For `rtu`: parity bit.")
    stopbits: Literal[1, 2] = Field(default=1, description="For `rtu`: stop bits.")
    bytesize: Literal[7, 8] = Field(default=8, description="For `rtu`: data bits per character.")
    unit: int = Field(
        default=1, ge=0, le=247, description="Modbus unit (device) id; gateways route on it."
    )
    poll_interval: Duration = Field(
        default=1.0,
        gt=0,
        description="Time between two polls of the tags of the default poll group.",
        examples=["1s", "500ms"],
    )
    poll_groups: dict[Name, Interval] = Field(
        default_factory=dict,
        description="More poll groups, each name with its own interval; a tag joins one with "
        "`group`. Each group is polled on its own, all over the one connection.",
        examples=[{"fast": "100ms", "slow": "10s"}],
    )
    timeout: Duration = Field(
        default=3.0,
        gt=0,
        description="Timeout for connecting and for each response.",
        examples=["3s"],
    )
    retries: int = Field(
        default=1,
        ge=0,
        le=5,
        description="How often an unanswered request is sent again before the connection is "
        "taken as dead and reopened.",
    )
    coalesce: bool = Field(
        default=True,
        description="Read neighbouring tags of a table and poll group in one request; false "
        "sends one request per tag (for devices that refuse reads over unmapped addresses).",
    )
    max_gap: int = Field(
        default=8,
        ge=0,
        le=MAX_REGISTERS_PER_READ - 2,
        description="Unused registers (or bits, for coils and discrete inputs) bridged to read "
        "two tags in one request.",
    )
    tags: list[ModbusTag] = Field(min_length=1, description="The values to read.")

    @field_validator("tags")
    @classmethod
    def _unique_tag_names(cls, tags: list[ModbusTag]) -> list[ModbusTag]:
        unique_names(tags)
        return tags

    @model_validator(mode="after")
    def _known_poll_groups(self) -> ModbusConfig:
        if DEFAULT_GROUP in self.poll_groups:
            raise ValueError(
                f"poll_groups: {DEFAULT_GROUP!r} is the group polled every poll_interval; "
                "set poll_interval instead"
            )
        known = [DEFAULT_GROUP, *self.poll_groups]
        for tag in self.tags:
            if tag.group not in known:
                close = difflib.get_close_matches(tag.group, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
                raise ValueError(
                    f"tag {tag.name} names poll group {tag.group!r}, which poll_groups does not "
                    f"define ({hint})"
                )
        return self

    @model_validator(mode="after")
    def _transport_settings(self) -> ModbusConfig:
        given = self.model_fields_set
        serial = sorted({"serial_port", "baudrate", "parity", "stopbits", "bytesize"} & given)
        if self.transport == "rtu":
            if self.serial_port is None:
                raise ValueError("transport rtu needs serial_port")
            if self.host is not None or "port" in given:
                raise ValueError("host and port apply to the TCP transports; rtu uses serial_port")
        else:
            if self.host is None:
                raise ValueError(f"transport {self.transport} needs host")
            if serial:
                raise ValueError(f"{', '.join(serial)} apply only to transport rtu")
        if not self.coalesce and "max_gap" in given:
            raise ValueError("max_gap has no effect with coalesce: false; drop one of them")
        return self


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One read request: `count` registers (or bits) of `table` from `start`, covering `tags`."""

    table: Table
    start: int
    count: int
    tags: tuple[ModbusTag, ...]

    @property
    def end(self) -> int:
        """First address after the block."""
        return self.start + self.count

    @property
    def label(self) -> str:
        """What the block reads, as logs say it: `holding registers 0-3`."""
        return f"{TABLE_LABEL[self.table]} {self.start}-{self.end - 1}"


@dataclass(frozen=True, slots=True)
class PollGroup:
    """Tags polled together every `interval` seconds, as the reads that cover them."""

    name: str
    interval: float
    blocks: tuple[ReadBlock, ...]


def plan_reads(
    tags: Sequence[ModbusTag], max_gap: int, *, coalesce: bool = True
) -> list[ReadBlock]:
    """Plan the reads for tags: per table, by address, within the table's read limit.

    Coalesced, two neighbouring tags share a read when at most `max_gap` unused registers (or
    bits) lie between them and the merged read stays within the limit (125 registers, 2000
    bits). Otherwise every tag is a read of its own. Tables come in the order of `TABLES`.
    """
    blocks: list[ReadBlock] = []
    for table in TABLES:
        in_table = sorted(
            (tag for tag in tags if tag.table == table), key=lambda tag: (tag.address, tag.name)
        )
        if not coalesce:
            blocks.extend(ReadBlock(table, tag.address, tag.width, (tag,)) for tag in in_table)
            continue
        limit = READ_LIMIT[table]
        start = end = 0
        members: list[ModbusTag] = []
        for tag in in_table:
            tag_end = tag.address + tag.width
            if members and tag.address - end <= max_gap and max(end, tag_end) - start <= limit:
                members.append(tag)
                end = max(end, tag_end)
                continue
            if members:
                blocks.append(ReadBlock(table, start, end - start, tuple(members)))
            start, end, members = tag.address, tag_end, [tag]
        if members:
            blocks.append(ReadBlock(table, start, end - start, tuple(members)))
    return blocks


def plan_poll_groups(config: ModbusConfig) -> list[PollGroup]:
    """The poll groups that have tags, the default group first, each with its planned reads."""
    intervals = {DEFAULT_GROUP: config.poll_interval, **config.poll_groups}
    groups: list[PollGroup] = []
    for name, interval in intervals.items():
        members = [tag for tag in config.tags if tag.group == name]
        if members:
            blocks = plan_reads(members, config.max_gap, coalesce=config.coalesce)
            groups.append(PollGroup(name, interval, tuple(blocks)))
    return groups


def value_bytes(registers: Sequence[int], byte_order: ByteOrder) -> bytes:
    """The bytes of a value, most significant first, from its registers in address order."""
    words = [register.to_bytes(2, "big") for register in registers]
    if byte_order in ("CDAB", "DCBA"):
        words.reverse()
    if byte_order in ("BADC", "DCBA"):
        words = [word[::-1] for word in words]
    return b"".join(words)


def decode(
    registers: Sequence[int], type: NumberType, byte_order: ByteOrder = "ABCD"
) -> int | float:
    """Decode the registers of one number. For one register only BADC and DCBA matter (they
    swap its two bytes); for 32- and 64-bit types all four orders do."""
    width = REGISTER_WIDTH[type]
    if len(registers) != width:
        raise ValueError(f"a {type} needs {width} registers, got {len(registers)}")
    value: int | float = struct.unpack(_STRUCT_FORMAT[type], value_bytes(registers, byte_order))[0]
    return value


def decode_string(registers: Sequence[int], byte_order: ByteOrder = "ABCD") -> str:
    """Latin-1 text from registers in address order, two characters each, the first in the high
    byte (BADC and DCBA: in the low byte); trailing NULs and spaces dropped."""
    swap = byte_order in ("BADC", "DCBA")
    raw = b"".join(register.to_bytes(2, "little" if swap else "big") for register in registers)
    return raw.decode("latin-1").rstrip("\0 ")


def tag_value(tag: ModbusTag, registers: Sequence[int]) -> TagValue:
    """Decode and scale one register tag from its own registers."""
    if tag.type == "string":
        return decode_string(registers, tag.byte_order)
    if tag.type == "bool":
        if tag.bit is None:
            raise ValueError(f"tag {tag.name} is a bool without a bit: read it from a bit table")
        word = int(decode(registers, "uint16", tag.byte_order))
        return bool(word >> tag.bit & 1)
    raw = decode(registers, tag.type, tag.byte_order)
    if tag.scale != 1.0 or tag.offset != 0.0:
        return raw * tag.scale + tag.offset
    return raw


def _exception_name(code: int) -> str:
    try:
        return ExcCodes(code).name.lower().replace("_", " ")
    except ValueError:
        return "unknown exception"


def _response_problem(response: ModbusPDU, table: Table, count: int) -> str | None:
    """Why a read's response cannot be used, or None when it carries all `count` values."""
    if response.isError():
        code = response.exception_code
        return f"exception code {code} ({_exception_name(code)})"
    received = len(response.bits if table in BIT_TABLES else response.registers)
    if received < count:
        return f"{received} of {count} values"
    return None


async def _open(
    client: ModbusBaseClient, answer_within: float, serial_port: str | None
) -> str | None:
    """Open the connection (the client applies its timeout, `answer_within` seconds); return
    why it failed, or None when connected."""
    started = time.monotonic()
    try:
        connected = await client.connect()
    except (ModbusException, OSError) as exc:
        return f"connection failed ({exc})"
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        # Python 3.11's wait_for (inside pymodbus's connect) can swallow a cancellation that
        # arrives as the connection completes: honour it here, or a stop would hang.
        raise asyncio.CancelledError
    if connected:
        return None
    # pymodbus reports a failed connect as False and logs the cause itself.
    if serial_port is not None:
        return f"serial port {serial_port} cannot be opened"
    if time.monotonic() - started >= answer_within * 0.9:
        return f"no answer to connect within {answer_within:g}s"
    return "connection refused or host unreachable"


def _request_failure(exc: Exception, timeout: float, retries: int) -> str:
    """Why a request failed, from what pymodbus raised."""
    if isinstance(exc, ConnectionException):
        return "the connection was closed"
    if isinstance(exc, ModbusIOException):
        tries = f" (sent {retries + 1} times)" if retries else ""
        return f"no valid response within {timeout:g}s{tries}"
    return f"read failed ({exc})"


async def _read(client: ModbusBaseClient, table: Table, start: int, count: int, unit: int) -> Any:
    match table:
        case "holding":
            return await client.read_holding_registers(start, count=count, device_id=unit)
        case "input":
            return await client.read_input_registers(start, count=count, device_id=unit)
        case "coil":
            return await client.read_coils(start, count=count, device_id=unit)
        case "discrete_input":
            return await client.read_discrete_inputs(start, count=count, device_id=unit)


@dataclass
class _Connection:
    """One connection shared by the poll group loops: requests take turns, and the first loop
    that sees the connection fail stops them all at their next request or sleep (not in the
    middle of handing samples to the sink)."""

    client: ModbusBaseClient
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str | None = None

    def drop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.lost.set()


class ModbusDriver(Driver):
    """Polls one Modbus device and owns its reconnection.

    `requests` counts the read requests sent, by poll group name; `health.reads` the reads
    that came back with values.
    """

    def __init__(self, config: ModbusConfig) -> None:
        super().__init__(config.name)
        if config.transport == "rtu" and importlib.util.find_spec("serial") is None:
            raise RuntimeError(
                f"Modbus driver {config.name}: transport rtu needs the pyserial package, "
                "which is not installed"
            )
        self.config = config
        self.groups = plan_poll_groups(config)
        self.requests: Counter[str] = Counter()
        self._backoff = Backoff(base=0.5, cap=config.reconnect_max_delay)
        self._unavailable = False
        self._failing_blocks: set[tuple[str, Table, int]] = set()

    @property
    def blocks(self) -> list[ReadBlock]:
        """Every planned read, group by group."""
        return [block for group in self.groups for block in group.blocks]

    @property
    def endpoint(self) -> str:
        """`host:port` or the serial port, as logs show it."""
        if self.config.transport == "rtu":
            return str(self.config.serial_port)
        return f"{self.config.host}:{self.config.port}"

    def new_client(self) -> ModbusBaseClient:
        """A client for the configured transport; it does no I/O until `connect()`."""
        config = self.config
        # reconnect_delay=0 disables pymodbus's own reconnect task: `run` owns reconnection.
        match config.transport:
            case "rtu":
                assert config.serial_port is not None  # the config validator makes sure
                return AsyncModbusSerialClient(
                    config.serial_port,
                    framer=FramerType.RTU,
                    baudrate=config.baudrate,
                    bytesize=config.bytesize,
                    parity=_PARITY_LETTER[config.parity],
                    stopbits=config.stopbits,
                    name=self.name,
                    timeout=config.timeout,
                    retries=config.retries,
                    reconnect_delay=0,
                )
            case "tcp" | "rtu_over_tcp":
                assert config.host is not None  # the config validator makes sure
                return AsyncModbusTcpClient(
                    config.host,
                    port=config.port,
                    framer=_TCP_FRAMER[config.transport],
                    name=self.name,
                    timeout=config.timeout,
                    retries=config.retries,
                    reconnect_delay=0,
                )

    async def run(self, sink: SampleSink) -> None:
        """Connect, poll and reconnect until cancelled; device errors never end it."""
        serial_port = self.config.serial_port if self.config.transport == "rtu" else None
        while True:
            # A fresh client per connection: pymodbus keeps per-connection state (transaction
            # ids, a pending response future) that must not leak into the next attempt.
            client = self.new_client()
            try:
                reason = await _open(client, self.config.timeout, serial_port)
                if reason is None:
                    self.health.connected = True
                    reason = await self._poll(client, sink)
            finally:
                client.close()
                self.health.connected = False
            self._record_error(reason)
            if not self._unavailable:
                self._unavailable = True
                log.warning(
                    "Modbus device %s at %s is unavailable: %s. Retrying with backoff.",
                    self.name,
                    self.endpoint,
                    reason,
                    extra={"driver": self.name, "endpoint": self.endpoint, "reason": reason},
                )
            await asyncio.sleep(self._backoff.next_delay())

    async def _poll(self, client: ModbusBaseClient, sink: SampleSink) -> str:
        """Poll every group on its own interval until the connection fails; return why."""
        connection = _Connection(client)
        async with asyncio.TaskGroup() as tasks:
            for group in self.groups:
                tasks.create_task(
                    self._poll_group(connection, group, sink),
                    name=f"modbus {self.name} poll group {group.name}",
                )
        return connection.reason or "the connection was closed"

    async def _poll_group(
        self, connection: _Connection, group: PollGroup, sink: SampleSink
    ) -> None:
        """Read the group's blocks every `group.interval` until the connection is lost."""
        next_poll = time.monotonic()
        while True:
            samples: list[Sample] = []
            for block in group.blocks:
                async with connection.turn:
                    if connection.lost.is_set():
                        return
                    response = await self._request(connection, group, block)
                if response is None:
                    return
                samples.extend(self._samples(group, block, response, time.time()))
            self._mark_available()
            good = [sample.source_time for sample in samples if sample.quality is Quality.GOOD]
            if good:
                self.health.last_sample_at = max(good)
            await sink(samples)
            next_poll += group.interval
            delay = next_poll - time.monotonic()
            if delay < 0:  # a slow device or sink: skip the missed polls rather than burst
                next_poll = time.monotonic()
                delay = 0.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await connection.lost.wait()
                    return

    async def _request(
        self, connection: _Connection, group: PollGroup, block: ReadBlock
    ) -> ModbusPDU | None:
        """Send one read; on a connection failure drop the connection and return None."""
        if not connection.client.connected:
            connection.drop("the connection was closed")
            return None
        self.requests[group.name] += 1
        try:
            response: ModbusPDU = await _read(
                connection.client, block.table, block.start, block.count, self.config.unit
            )
        except (ModbusException, OSError) as exc:
            connection.drop(_request_failure(exc, self.config.timeout, self.config.retries))
            return None
        return response

    def _samples(
        self, group: PollGroup, block: ReadBlock, response: ModbusPDU, read_at: float
    ) -> list[Sample]:
        problem = _response_problem(response, block.table, block.count)
        if problem is not None:
            self._block_failed(group, block, problem)
            return [Sample(self.name, tag.name, None, read_at, Quality.BAD) for tag in block.tags]
        self.health.reads += 1
        self._block_recovered(group, block)
        samples = []
        for tag in block.tags:
            offset = tag.address - block.start
            value: TagValue
            if block.table in BIT_TABLES:
                value = bool(response.bits[offset])
            else:
                value = tag_value(tag, response.registers[offset : offset + tag.width])
            samples.append(Sample(self.name, tag.name, value, read_at, Quality.GOOD))
        return samples

    def _block_failed(self, group: PollGroup, block: ReadBlock, problem: str) -> None:
        self._record_error(f"{block.label}: {problem}")
        key = (group.name, block.table, block.start)
        if key in self._failing_blocks:
            return
        self._failing_blocks.add(key)
        log.warning(
            "Modbus device %s at %s answered %s for %s; tags %s are marked bad until it reads "
            "again.",
            self.name,
            self.endpoint,
            problem,
            block.label,
            ", ".join(tag.name for tag in block.tags),
            extra={"driver": self.name, "endpoint": self.endpoint, "poll_group": group.name},
        )

    def _block_recovered(self, group: PollGroup, block: ReadBlock) -> None:
        key = (group.name, block.table, block.start)
        if key in self._failing_blocks:
            self._failing_blocks.discard(key)
            log.info(
                "Modbus device %s at %s reads %s again.",
                self.name,
                self.endpoint,
                block.label,
                extra={"driver": self.name, "endpoint": self.endpoint, "poll_group": group.name},
            )

    def _mark_available(self) -> None:
        # Availability means a full poll answered, not just an accepted TCP connection, so a
        # device that accepts and then drops does not log "back" on every attempt.
        self._backoff.reset()
        if self._unavailable:
            self._unavailable = False
            log.info(
                "Modbus device %s at %s is available again.",
                self.name,
                self.endpoint,
                extra={"driver": self.name, "endpoint": self.endpoint},
            )

    def _record_error(self, message: str) -> None:
        self.health.errors += 1
        self.health.last_error = message


# --- plantsync probe modbus ---------------------------------------------------------------------

_PROBE_32: tuple[NumberType, ...] = ("int32", "uint32", "float32")
_PROBE_64: tuple[NumberType, ...] = ("int64", "uint64", "float64")
_PROBE_COLUMNS = (
    "address",
    "raw",
    "int16",
    "uint16",
    "order",
    "int32",
    "uint32",
    "float32",
    "int64",
    "uint64",
    "float64",
)


class ProbeError(Exception):
    """The probe could not read the block; the message says why."""


def _number_text(value: int | float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _printable(raw: bytes) -> str:
    return "".join(chr(byte) if 0x20 <= byte < 0x7F else "." for byte in raw)


def format_probe(registers: Sequence[int], start: int, heading: str) -> str:
    """A table of the block decoded at every start address, in every type and byte order.

    Per address: the raw register in hex and as int16/uint16, then one row per byte order with
    the 32-bit (and, where four registers remain, 64-bit) values that start there. Below, the
    whole block as text, both ways round. Non-printable bytes show as `.`.
    """
    rows: list[list[str]] = []
    for index, register in enumerate(registers):
        raw = [str(start + index), f"{register:04X}", str(decode([register], "int16"))]
        raw.append(str(register))
        pair, quad = registers[index : index + 2], registers[index : index + 4]
        if len(pair) < 2:  # the last register: nothing wider starts here
            rows.append(raw + [""] * (len(_PROBE_COLUMNS) - len(raw)))
            continue
        for order in BYTE_ORDERS:
            row = (raw if order == "ABCD" else [""] * len(raw)) + [order]
            row += [_number_text(decode(pair, type_name, order)) for type_name in _PROBE_32]
            if len(quad) == 4:
                row += [_number_text(decode(quad, type_name, order)) for type_name in _PROBE_64]
            rows.append(row + [""] * (len(_PROBE_COLUMNS) - len(row)))
    widths = [
        max(len(text) for text in [name, *(row[i] for row in rows)])
        for i, name in enumerate(_PROBE_COLUMNS)
    ]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(width) if name == "order" else cell.rjust(width)
            for name, cell, width in zip(_PROBE_COLUMNS, cells, widths, strict=True)
        ]
        return "  ".join(parts).rstrip()

    as_sent = b"".join(register.to_bytes(2, "big") for register in registers)
    swapped = b"".join(register.to_bytes(2, "little") for register in registers)
    return "\n".join(
        [
            heading,
            "",
            line(_PROBE_COLUMNS),
            *(line(row) for row in rows),
            "",
            f"text, high byte first (ABCD, CDAB): {_printable(as_sent)}",
            f"text, low byte first  (BADC, DCBA): {_printable(swapped)}",
        ]
    )


async def probe_read(
    host: str,
    port: int,
    unit: int,
    table: Table,
    address: int,
    count: int,
    answer_within: float,
) -> list[int]:
    """Read one block of registers over Modbus TCP; raise ProbeError with the reason."""
    client = AsyncModbusTcpClient(
        host, port=port, name="probe", timeout=answer_within, retries=0, reconnect_delay=0
    )
    block = f"{TABLE_LABEL[table]} {address}-{address + count - 1}"
    try:
        reason = await _open(client, answer_within, None)
        if reason is not None:
            raise ProbeError(f"cannot connect to {host}:{port}: {reason}")
        try:
            response: ModbusPDU = await _read(client, table, address, count, unit)
        except (ModbusException, OSError) as exc:
            reason = _request_failure(exc, answer_within, 0)
            raise ProbeError(f"reading {block} from {host}:{port} failed: {reason}") from exc
        problem = _response_problem(response, table, count)
        if problem is not None:
            raise ProbeError(f"{host}:{port} unit {unit} answered {problem} for {block}")
        return list(response.registers[:count])
    finally:
        client.close()


def probe_main(argv: list[str] | None = None) -> int:
    """`plantsync probe modbus`: read one block and print it decoded every way; exit status."""
    parser = argparse.ArgumentParser(
        prog="plantsync probe modbus",
        description="Read one block of holding or input registers and print it decoded as "
        "int16/uint16 and, in each byte order ABCD/CDAB/BADC/DCBA, as int32/uint32/float32 and "
        "int64/uint64/float64 from every start address, plus the block as text. Look for a "
        "value you know (a counter, a set point) to see which type and byte order the device "
        "uses.",
    )
    parser.add_argument("--host", required=True, help="device IP address or host name")
    parser.add_argument("--port", type=int, default=502, help="TCP port (default: 502)")
    parser.add_argument("--unit", type=int, default=1, help="Modbus unit id (default: 1)")
    parser.add_argument(
        "--address", type=int, required=True, help="0-based address of the first register"
    )
    parser.add_argument(
        "--count", type=int, required=True, help=f"registers to read, 1..{MAX_REGISTERS_PER_READ}"
    )
    parser.add_argument("--table", choices=("holding", "input"), default="holding")
    parser.add_argument(
        "--timeout", type=parse_duration, default=3.0, help="e.g. 500ms or 3s (default: 3s)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.count <= MAX_REGISTERS_PER_READ:
        parser.error(f"--count must be 1..{MAX_REGISTERS_PER_READ}")
    if not 0 <= args.address <= 65536 - args.count:
        parser.error("--address and --count must stay within addresses 0..65535")
    if not 0 <= args.unit <= 255:
        parser.error("--unit must be 0..255")
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # the probe says what went wrong
    table: Table = args.table
    try:
        registers = asyncio.run(
            probe_read(
                args.host, args.port, args.unit, table, args.address, args.count, args.timeout
            )
        )
    except ProbeError as exc:
        print(f"plantsync probe modbus: {exc}", file=sys.stderr)
        return 1
    heading = (
        f"{TABLE_LABEL[table]} {args.address}-{args.address + args.count - 1} from "
        f"{args.host}:{args.port}, unit {args.unit}"
    )
    print(format_probe(registers, args.address, heading))
    return 0
