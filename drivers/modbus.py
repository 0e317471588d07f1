"""Modbus driver: polls the coils, discrete inputs, input and holding registers of one device and
emits one Sample per tag; `probe_main` is `plantsync probe modbus`.

The device is reached over Modbus TCP, RTU frames over TCP (serial-to-Ethernet gateways) or a
serial RTU line; tags may name their own unit id, read over the same connection. Tags belong to
a poll group; each group is polled on its own interval by its own loop, all on the one
connection and one request at a time. Within a group, tags are planned into as few reads as
possible (per unit and table, sorted by address, at most 125 registers or 2000 bits per read,
bridging gaps up to `max_gap`), decoded (bits, 16/32/64-bit integers and floats in any of the
four byte orders, or for 64-bit values any of the eight-letter ones, strings), scaled, and
handed to the sink as one batch per group poll. A float that decodes to NaN or an infinity is a
sample of bad quality.

A read the device refuses with exception 2 or 3 (illegal data address or value) is split in
halves, down to the tag or the unmapped gap it refuses; the parts that answered are joined
again where they touch, and the group keeps that plan. Only the refused tag is bad, and the log
names its address. Other exceptions mark the read's tags bad; the others keep going.

The driver owns its reconnect loop: a lost connection, or a request unanswered after `retries`
repeats, closes the client, logs once that the device is unavailable, retries with the shared
backoff and logs once when samples flow again. The device counts as connected from its first
answer, not from an accepted TCP connection. While a device that was not there at all is
waited for, the driver looks every second whether it accepts TCP again and reconnects at once.

With a `restart_marker` (an uptime or boot-count register), a restart of the device shows even
when it counted past the last value seen during an outage: the marker is read alone at every
connection before any counter, and with its group at every poll, and a `DeviceRestarted` goes
to the sink before the samples read after it. The probe reads one block and prints it decoded
as every type in every byte order, to settle "which order is this PLC?" in a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import importlib.util
import logging
import math
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
from drivers.common.timing import Backoff, Duration, parse_duration

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
ByteOrder = Literal[
    "ABCD", "CDAB", "BADC", "DCBA",
    "ABCDEFGH", "BADCFEHG", "CDABGHEF", "DCBAHGFE", "EFGHABCD", "FEHGBADC", "GHEFCDAB", "HGFEDCBA",
]
"""The value's bytes (A most significant) in the order they appear in address order. Four
letters name the orders of 16- and 32-bit values (and, for 64-bit values, the order applied to
all eight bytes); eight letters name a 64-bit order in full, such as `EFGHABCD`, whose 32-bit
halves are swapped while each half keeps its high word first."""
Transport = Literal["tcp", "rtu_over_tcp", "rtu"]
Parity = Literal["none", "even", "odd"]

TABLES: tuple[Table, ...] = ("holding", "input", "coil", "discrete_input")
BIT_TABLES: tuple[Table, ...] = ("coil", "discrete_input")
BYTE_ORDERS: tuple[ByteOrder, ...] = ("ABCD", "CDAB", "BADC", "DCBA")
"""The four-letter orders, which apply to every width."""
BYTE_ORDERS_64: tuple[ByteOrder, ...] = (
    "ABCDEFGH", "BADCFEHG", "CDABGHEF", "DCBAHGFE", "EFGHABCD", "FEHGBADC", "GHEFCDAB", "HGFEDCBA",
)
"""The eight-letter orders, for 64-bit values only: every combination of the 32-bit halves'
order, the words' order within a half, and the bytes' order within a word."""
_AS_64: dict[str, str] = {
    "ABCD": "ABCDEFGH", "CDAB": "GHEFCDAB", "BADC": "BADCFEHG", "DCBA": "HGFEDCBA"}
"""What a four-letter order means for a 64-bit value: CDAB reverses all four words."""
DEFAULT_GROUP = "default"
"""The poll group of tags that name none; it is polled every `poll_interval`."""

SPLIT_ON_EXCEPTION = frozenset({ExcCodes.ILLEGAL_ADDRESS, ExcCodes.ILLEGAL_VALUE})
"""Exceptions that refuse a read for its addresses: a read of several tags that gets one is
split to find the address. Others (device busy, gateway path) say nothing about addresses."""

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
        "`DCBA` little-endian. For 64-bit types eight letters name any order in full: "
        "`EFGHABCD` has its 32-bit halves swapped (the low half first), each half high word "
        "first; also `ABCDEFGH`, `BADCFEHG`, `CDABGHEF`, `DCBAHGFE`, `FEHGBADC`, `GHEFCDAB` "
        "(= CDAB) and `HGFEDCBA` (= DCBA). A string keeps its words in address order: only "
        "BADC and DCBA swap the two characters of each register.",
        examples=["ABCD", "CDAB", "EFGHABCD"],
    )
    unit: int | None = Field(
        default=None,
        ge=0,
        le=247,
        description="Modbus unit id of this tag when it differs from the driver's `unit`: "
        "several devices behind one gateway (or one PLC's sub-units) read over the one TCP "
        "connection. Tags of different units never share a request.",
        examples=[2],
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
        if len(self.byte_order) == 8 and self.type not in ("uint64", "int64", "float64"):
            raise ValueError(
                f"byte order {self.byte_order} names eight bytes: it is for 64-bit types; a "
                f"{self.type} takes ABCD, CDAB, BADC or DCBA"
            )
        if self.type in ("bool", "string") and (self.scale != 1.0 or self.offset != 0.0):
            raise ValueError(f"scale and offset apply to numbers, not to a {self.type}")
        if self.address + self.width - 1 > 65535:
            raise ValueError(f"a {self.type} at address {self.address} runs past address 65535")
        return self


MODICON_BASE: dict[Table, int] = {"discrete_input": 10001, "input": 30001, "holding": 40001}
"""Modicon numbering: register 40001 is holding register 0, 30001 input register 0, 10001
discrete input 0 (coils start at 00001, which cannot be told from a 0-based address)."""


def _modicon_table(address: int) -> Table | None:
    """The table a five-digit Modicon number names, or None."""
    for table, base in MODICON_BASE.items():
        if base <= address <= base + 9998:
            return table
    return None


RestartMarkerKind = Literal["uptime", "boot_count"]
_INTEGER_TYPES = ("uint16", "int16", "uint32", "int32", "uint64", "int64")


class RestartMarker(BaseModel):
    """A register by which the device says it restarted: for the PLC programmer, see the
    README's "Modbus: telling the gateway the PLC restarted"."""

    model_config = ConfigDict(extra="forbid")

    tag: Name = Field(
        description="Name of one of this driver's tags (an integer) that holds the marker.",
        examples=["uptime"],
    )
    kind: RestartMarkerKind = Field(
        default="uptime",
        description="`uptime`: a value that only grows while the device runs and starts again "
        "from 0 when it restarts (seconds or minutes since power-up, a 32- or 64-bit integer "
        "so that it never wraps); the device restarted when it goes back. `boot_count`: a "
        "value the device changes at every start (a retentive count of power-ups); the device "
        "restarted when it differs from the last reading.",
    )


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
    restart_marker: RestartMarker | None = Field(
        default=None,
        description="Optional: the tag by which the device says it restarted (an uptime or a "
        "boot count). When it goes back (or, for a boot count, changes), the driver tells the "
        "rules before the samples of that poll, and this device's counters count from 0: a "
        "PLC that restarted during an outage and counted past the last value seen loses no "
        "units. Put it in the poll group of the counters.",
        examples=[{"tag": "uptime", "kind": "uptime"}],
    )

    @field_validator("tags")
    @classmethod
    def _unique_tag_names(cls, tags: list[ModbusTag]) -> list[ModbusTag]:
        unique_names(tags)
        return tags

    def address_warnings(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Addresses that look like Modicon register numbers (40001, 30001, 10001), each with
        where it is (relative to this driver) and its 0-based equivalent: a warning for
        `plantsync check`, not an error, because a device may really have such addresses."""
        found: list[tuple[tuple[str | int, ...], str]] = []
        for index, tag in enumerate(self.tags):
            meant = _modicon_table(tag.address)
            if meant is None or meant not in (tag.table, *(
                    ("holding", "input") if tag.table in ("holding", "input") else ())):
                continue
            zero_based = tag.address - MODICON_BASE[meant]
            name = TABLE_LABEL[meant].removesuffix("s")
            if meant == tag.table:
                where = f"address {zero_based}"
                fix = f"address: {zero_based}"
            else:
                where = f"address {zero_based} of table {meant}"
                fix = f"table: {meant}, address: {zero_based}"
            found.append((("tags", index, "address"),
                          f"{tag.address} looks like a Modicon register number: {name} "
                          f"{tag.address} is {where} (0-based protocol address); if that is "
                          f"what you mean, write {fix}"))
        return found

    @model_validator(mode="after")
    def _marker_is_an_integer_tag(self) -> ModbusConfig:
        marker = self.restart_marker
        if marker is None:
            return self
        tag = next((tag for tag in self.tags if tag.name == marker.tag), None)
        if tag is None:
            names = [tag.name for tag in self.tags]
            close = difflib.get_close_matches(marker.tag, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"restart_marker names tag {marker.tag!r}, which tags do not "
                             f"define{hint}")
        if tag.type not in _INTEGER_TYPES or tag.scale != 1.0 or tag.offset != 0.0:
            raise ValueError(f"restart_marker tag {tag.name} must be an unscaled integer, "
                             f"not a {tag.type}")
        if marker.kind == "uptime" and tag.type in ("uint16", "int16"):
            raise ValueError(f"restart_marker tag {tag.name}: a 16-bit uptime wraps within "
                             "hours or days and would look like a restart; use a 32- or "
                             "64-bit uptime, or kind boot_count")
        return self

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
    """One read request: `count` registers (or bits) of `table` from `start` at unit `unit`,
    covering `tags`."""

    table: Table
    start: int
    count: int
    tags: tuple[ModbusTag, ...]
    unit: int = 1

    @property
    def end(self) -> int:
        """First address after the block."""
        return self.start + self.count

    @property
    def label(self) -> str:
        """What the block reads, as logs say it: `holding registers 0-3`, `holding register
        1000`."""
        what = TABLE_LABEL[self.table]
        if self.count == 1:
            return f"{what.removesuffix('s')} {self.start}"
        return f"{what} {self.start}-{self.end - 1}"


def block_of(tags: Sequence[ModbusTag], table: Table, unit: int) -> ReadBlock:
    """The smallest read that covers `tags` (of one table and unit), sorted by address."""
    ordered = tuple(sorted(tags, key=lambda tag: (tag.address, tag.name)))
    start = ordered[0].address
    end = max(tag.address + tag.width for tag in ordered)
    return ReadBlock(table, start, end - start, ordered, unit)


def split_block(block: ReadBlock) -> tuple[ReadBlock, ReadBlock]:
    """Two reads that cover the block's tags, half of them each (by address): how a read the
    device refuses is narrowed down to the tag, or the unmapped gap, it refuses."""
    half = len(block.tags) // 2
    return (block_of(block.tags[:half], block.table, block.unit),
            block_of(block.tags[half:], block.table, block.unit))


@dataclass(frozen=True, slots=True)
class PollGroup:
    """Tags polled together every `interval` seconds, as the reads that cover them."""

    name: str
    interval: float
    blocks: tuple[ReadBlock, ...]


def plan_reads(
    tags: Sequence[ModbusTag], max_gap: int, *, coalesce: bool = True, unit: int = 1
) -> list[ReadBlock]:
    """Plan the reads for tags: per unit and table, by address, within the table's read limit.

    Coalesced, two neighbouring tags share a read when at most `max_gap` unused registers (or
    bits) lie between them and the merged read stays within the limit (125 registers, 2000
    bits). Otherwise every tag is a read of its own. A tag without its own `unit` is read at
    `unit`. Units come in ascending order, tables in the order of `TABLES`.
    """
    blocks: list[ReadBlock] = []
    units = sorted({unit if tag.unit is None else tag.unit for tag in tags})
    for unit_id in units:
        for table in TABLES:
            in_table = sorted(
                (tag for tag in tags
                 if tag.table == table and (unit if tag.unit is None else tag.unit) == unit_id),
                key=lambda tag: (tag.address, tag.name),
            )
            if not coalesce:
                blocks.extend(ReadBlock(table, tag.address, tag.width, (tag,), unit_id)
                              for tag in in_table)
                continue
            limit = READ_LIMIT[table]
            start = end = 0
            members: list[ModbusTag] = []
            for tag in in_table:
                tag_end = tag.address + tag.width
                if (members and tag.address - end <= max_gap
                        and max(end, tag_end) - start <= limit):
                    members.append(tag)
                    end = max(end, tag_end)
                    continue
                if members:
                    blocks.append(ReadBlock(table, start, end - start, tuple(members), unit_id))
                start, end, members = tag.address, tag_end, [tag]
            if members:
                blocks.append(ReadBlock(table, start, end - start, tuple(members), unit_id))
    return blocks


def plan_poll_groups(config: ModbusConfig) -> list[PollGroup]:
    """The poll groups that have tags, the default group first, each with its planned reads."""
    intervals = {DEFAULT_GROUP: config.poll_interval, **config.poll_groups}
    groups: list[PollGroup] = []
    for name, interval in intervals.items():
        members = [tag for tag in config.tags if tag.group == name]
        if members:
            blocks = plan_reads(members, config.max_gap, coalesce=config.coalesce,
                                unit=config.unit)
            groups.append(PollGroup(name, interval, tuple(blocks)))
    return groups


def value_bytes(registers: Sequence[int], byte_order: ByteOrder) -> bytes:
    """The bytes of a value, most significant first, from its registers in address order.

    The order's letters say which byte of the value (A the most significant) sits at each
    position in address order; a four-letter order on a one-register value only says whether
    the two bytes are swapped, and on a 64-bit value means its eight-letter equivalent."""
    raw = b"".join(register.to_bytes(2, "big") for register in registers)
    pattern = str(byte_order)
    if len(raw) == 8 and len(pattern) == 4:
        pattern = _AS_64[pattern]
    elif len(raw) == 2:
        pattern = "BA" if pattern[0] in "BD" else "AB"
    if len(pattern) != len(raw):
        raise ValueError(f"byte order {byte_order} does not fit a {len(raw)}-byte value")
    value = bytearray(len(raw))
    for position, letter in enumerate(pattern):
        value[ord(letter) - ord("A")] = raw[position]
    return bytes(value)


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


EXCEPTION_NAMES: dict[int, str] = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
"""Exception codes by their names in the Modbus Application Protocol Specification V1.1b3,
section 7."""


def _exception_name(code: int) -> str:
    return EXCEPTION_NAMES.get(code, "unknown exception")


def _response_problem(response: ModbusPDU, table: Table, count: int) -> str | None:
    """Why a read's response cannot be used, or None when it carries all `count` values."""
    if response.isError():
        code = response.exception_code
        return f"exception code {code} ({_exception_name(code)})"
    received = len(response.bits if table in BIT_TABLES else response.registers)
    if received < count:
        return f"{received} of {count} values"
    return None


RETURN_CHECK_INTERVAL = 1.0
"""Seconds between two looks, during a reconnect wait, whether a device that was not there
accepts TCP again."""
_NOT_THERE = ("connection refused or host unreachable",)
"""Failures that mean nothing answered at all (a connect that timed out says so too)."""


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
    honour_cancellation()  # pymodbus's connect may have swallowed a stop (Python 3.11)
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
        """The reads of each poll group; a read the device refuses for an address is replaced
        by the narrower reads that it was split into, for the driver's lifetime."""
        self.requests: Counter[str] = Counter()
        self._backoff = Backoff(base=0.5, cap=config.reconnect_max_delay)
        self.availability = Availability(
            f"Modbus device {self.name} at {self.endpoint}", log, health=self.health,
            extra={"driver": self.name, "endpoint": self.endpoint})
        self._failing_blocks: set[tuple[str, int, Table, int]] = set()
        self._joined: set[tuple[int, Table, int, int]] = set()
        marker = config.restart_marker
        self._marker = (None if marker is None
                        else next(tag for tag in config.tags if tag.name == marker.tag))
        self._marker_value: TagValue = None
        """The restart marker's last good reading, kept across connections (not restarts of
        the gateway: the device's restarts while the gateway itself is down go unseen)."""

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
        await reconnect_forever(lambda: self._connect_and_poll(sink), self._backoff,
                                self.availability, wait=self._wait_to_reconnect)

    async def _connect_and_poll(self, sink: SampleSink) -> Ended:
        """One connection, from connect to its loss."""
        serial_port = self.config.serial_port if self.config.transport == "rtu" else None
        # A fresh client per connection: pymodbus keeps per-connection state (transaction
        # ids, a pending response future) that must not leak into the next attempt.
        client = self.new_client()
        try:
            reason = await _open(client, self.config.timeout, serial_port)
            if reason is None:
                # Not connected yet: a device that accepts TCP and never answers is not
                # "connected". `connected` turns true at the first answer.
                reason = await self._poll(client, sink)
        finally:
            client.close()
        return Ended(reason)

    async def _wait_to_reconnect(self, ended: Ended, delay: float) -> None:
        """Wait the backoff's delay before the next attempt. When the device was not there at
        all (refused, unreachable, no answer to connect), look every second whether it accepts
        TCP again, and end the wait as soon as it does: a device that is back is read again
        within about a second, not after up to `reconnect_max_delay`. A device that accepts
        but then fails waits the whole delay, so it is never hammered."""
        not_there = ended.reason in _NOT_THERE or ended.reason.startswith("no answer to connect")
        host = self.config.host
        if not not_there or self.config.transport == "rtu" or host is None:
            await asyncio.sleep(delay)
            return
        deadline = time.monotonic() + delay
        while (remaining := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(RETURN_CHECK_INTERVAL, remaining))
            if time.monotonic() < deadline and await accepts_tcp(
                    host, self.config.port, min(RETURN_CHECK_INTERVAL, self.config.timeout)):
                return

    async def _poll(self, client: ModbusBaseClient, sink: SampleSink) -> str:
        """Poll every group on its own interval until the connection fails; return why."""
        connection = _Connection(client)
        if self._marker is not None:
            # Before any counter is read on this connection: did the device restart while
            # the gateway could not see it?
            restarted = await self._check_marker(connection)
            if connection.lost.is_set():
                return connection.reason or "the connection was closed"
            if restarted is not None:
                await sink([restarted])
        async with asyncio.TaskGroup() as tasks:
            for index, group in enumerate(self.groups):
                tasks.create_task(
                    self._poll_group(connection, index, sink),
                    name=f"modbus {self.name} poll group {group.name}",
                )
        return connection.reason or "the connection was closed"

    async def _check_marker(self, connection: _Connection) -> DeviceRestarted | None:
        """Read the restart marker alone; the restart it shows, if any."""
        marker = self._marker
        assert marker is not None
        unit = self.config.unit if marker.unit is None else marker.unit
        block = ReadBlock(marker.table, marker.address, marker.width, (marker,), unit)
        async with connection.turn:
            response = await self._request(connection, DEFAULT_GROUP, block)
        if response is None or _response_problem(response, block.table, block.count):
            return None  # the poll marks the tag bad and says why
        value = tag_value(marker, response.registers[: marker.width])
        return self._marker_reading(Sample(self.name, marker.name, value, time.time()))

    def _marker_reading(self, sample: Sample) -> DeviceRestarted | None:
        """Take a good reading of the restart marker; the restart it shows, if any."""
        assert self.config.restart_marker is not None
        kind = self.config.restart_marker.kind
        before, self._marker_value = self._marker_value, sample.value
        if before is None or sample.value is None:
            return None
        assert isinstance(before, int | float) and isinstance(sample.value, int | float)
        if sample.value < before if kind == "uptime" else sample.value != before:
            what = "uptime" if kind == "uptime" else "boot count"
            return DeviceRestarted(self.name, sample.source_time,
                                   f"{what} {sample.tag} went from {before} to {sample.value}")
        return None

    async def _poll_group(self, connection: _Connection, index: int, sink: SampleSink) -> None:
        """Read the group's blocks every `group.interval` until the connection is lost."""
        interval = self.groups[index].interval
        next_poll = time.monotonic()
        while True:
            group = self.groups[index]
            readings: list[Sample | DeviceRestarted] = []
            reads: list[ReadBlock] = []
            for block in group.blocks:
                answered = await self._read_narrowing(connection, group.name, block)
                if answered is None:
                    return
                read_at = time.time()
                for part, response in answered:
                    readings.extend(self._samples(group.name, part, response, read_at))
                reads.extend(self._narrowed(block, answered))
            if reads != list(group.blocks):
                self._replan(index, reads)
            self._mark_available()
            readings = self._restart_first(readings)
            good = [r.source_time for r in readings
                    if isinstance(r, Sample) and r.quality is Quality.GOOD]
            if good:
                self.health.last_sample_at = max(good)
            await sink(readings)
            next_poll += interval
            delay = next_poll - time.monotonic()
            if delay < 0:  # a slow device or sink: skip the missed polls rather than burst
                next_poll = time.monotonic()
                delay = 0.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await connection.lost.wait()
                    return

    def _restart_first(
        self, readings: list[Sample | DeviceRestarted]
    ) -> list[Sample | DeviceRestarted]:
        """The poll's readings, led by a restart when its marker shows one: the rules must
        hear of it before they take any counter of the same poll."""
        if self._marker is None:
            return readings
        for reading in readings:
            if (isinstance(reading, Sample) and reading.tag == self._marker.name
                    and reading.quality is Quality.GOOD):
                restarted = self._marker_reading(reading)
                if restarted is not None:
                    return [restarted, *readings]
        return readings

    async def _read_narrowing(
        self, connection: _Connection, group: str, block: ReadBlock
    ) -> list[tuple[ReadBlock, ModbusPDU]] | None:
        """Read a block; when the device refuses it for an address (exception 2 or 3) and it
        covers several tags, read each half instead, down to the single tag (or the unmapped
        gap) it refuses. The reads that answered, with their answers; None when the
        connection is lost."""
        async with connection.turn:
            if connection.lost.is_set():
                return None
            response = await self._request(connection, group, block)
        if response is None:
            return None
        if len(block.tags) > 1 and response.isError() and (
                response.exception_code in SPLIT_ON_EXCEPTION):
            answered: list[tuple[ReadBlock, ModbusPDU]] = []
            for half in split_block(block):
                part = await self._read_narrowing(connection, group, half)
                if part is None:
                    return None
                answered.extend(part)
            return answered
        return [(block, response)]

    def _narrowed(
        self, block: ReadBlock, answered: list[tuple[ReadBlock, ModbusPDU]]
    ) -> list[ReadBlock]:
        """The reads that replace a block the device refused: the parts that answered, joined
        again where they touch (they then cover only addresses that were read), and the parts
        it refused. A joined read refused later is not joined again."""
        if len(answered) == 1:
            return [block]
        if (block.unit, block.table, block.start, block.count) in self._joined:
            return [part for part, _ in answered]
        reads: list[ReadBlock] = []
        joinable = False
        for part, response in answered:
            works = _response_problem(response, part.table, part.count) is None
            if works and joinable and part.start <= reads[-1].end:
                reads[-1] = block_of([*reads[-1].tags, *part.tags], part.table, part.unit)
                joined = reads[-1]
                self._joined.add((joined.unit, joined.table, joined.start, joined.count))
            else:
                reads.append(part)
            joinable = works
        return reads

    def _replan(self, index: int, reads: list[ReadBlock]) -> None:
        """Remember how the group's refused reads were split, so that the next polls go
        straight to the reads that work."""
        group = self.groups[index]
        self.groups[index] = PollGroup(group.name, group.interval, tuple(reads))
        log.warning(
            "Modbus device %s at %s refused a read that spans an address it does not have; "
            "poll group %s now reads %s (was %s).",
            self.name,
            self.endpoint,
            group.name,
            ", ".join(self._where(block) for block in reads),
            ", ".join(self._where(block) for block in group.blocks),
            extra={"driver": self.name, "endpoint": self.endpoint, "poll_group": group.name},
        )

    def _where(self, block: ReadBlock) -> str:
        """The block's label, and its unit when that is not the driver's."""
        if block.unit == self.config.unit:
            return block.label
        return f"{block.label} of unit {block.unit}"

    async def _request(
        self, connection: _Connection, group: str, block: ReadBlock
    ) -> ModbusPDU | None:
        """Send one read; on a connection failure drop the connection and return None."""
        if not connection.client.connected:
            connection.drop("the connection was closed")
            return None
        self.requests[group] += 1
        try:
            response: ModbusPDU = await _read(
                connection.client, block.table, block.start, block.count, block.unit
            )
        except (ModbusException, OSError) as exc:
            connection.drop(_request_failure(exc, self.config.timeout, self.config.retries))
            return None
        finally:
            honour_cancellation()  # pymodbus's wait_for may have swallowed a stop (Python 3.11)
        self.availability.connected()  # it answered: even an exception is an answer
        return response

    def _samples(
        self, group: str, block: ReadBlock, response: ModbusPDU, read_at: float
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
            quality = Quality.GOOD
            if block.table in BIT_TABLES:
                value = bool(response.bits[offset])
            else:
                value = tag_value(tag, response.registers[offset : offset + tag.width])
                if isinstance(value, float) and not math.isfinite(value):
                    # A failed sensor (NaN) or an overflow (Inf): the value is kept for what
                    # it says, but it is no measurement.
                    quality = Quality.BAD
            samples.append(Sample(self.name, tag.name, value, read_at, quality))
        return samples

    def _block_failed(self, group: str, block: ReadBlock, problem: str) -> None:
        where = self._where(block)
        self.health.record_error(f"{where}: {problem}")
        tags = ", ".join(tag.name for tag in block.tags)
        for tag in block.tags:
            self.health.degraded[f"tag {tag.name}"] = (
                f"tag {tag.name} is bad: the device answered {problem} for {where}")
        key = (group, block.unit, block.table, block.start)
        if key in self._failing_blocks:
            return
        self._failing_blocks.add(key)
        log.warning(
            "Modbus device %s at %s answered %s for %s; %s marked bad until it reads again.",
            self.name,
            self.endpoint,
            problem,
            where,
            f"tag {tags} is" if len(block.tags) == 1 else f"tags {tags} are",
            extra={"driver": self.name, "endpoint": self.endpoint, "poll_group": group,
                   "address": block.start, "table": block.table, "unit": block.unit},
        )

    def _block_recovered(self, group: str, block: ReadBlock) -> None:
        for tag in block.tags:
            self.health.degraded.pop(f"tag {tag.name}", None)
        key = (group, block.unit, block.table, block.start)
        if key in self._failing_blocks:
            self._failing_blocks.discard(key)
            log.info(
                "Modbus device %s at %s reads %s again.",
                self.name,
                self.endpoint,
                self._where(block),
                extra={"driver": self.name, "endpoint": self.endpoint, "poll_group": group},
            )

    def _mark_available(self) -> None:
        # Availability means a full poll answered, not just an accepted TCP connection, so a
        # device that accepts and then drops does not log "back" on every attempt.
        self.availability.back()


# --- plantsync probe modbus ---------------------------------------------------------------------

_PROBE_32: tuple[NumberType, ...] = ("int32", "uint32", "float32")
_PROBE_64: tuple[NumberType, ...] = ("int64", "uint64", "float64")
_PROBE_ONLY_64: tuple[ByteOrder, ...] = tuple(
    order for order in BYTE_ORDERS_64 if order not in _AS_64.values())
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
    the 32-bit (and, where four registers remain, 64-bit) values that start there, and rows for
    the 64-bit orders only eight letters name (EFGHABCD: halves swapped...). Below, the
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
        if len(quad) == 4:  # the 64-bit orders that no four-letter order names
            for order in _PROBE_ONLY_64:
                row = [""] * len(raw) + [order] + [""] * len(_PROBE_32)
                row += [_number_text(decode(quad, type_name, order)) for type_name in _PROBE_64]
                rows.append(row)
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
        "int64/uint64/float64 from every start address (64-bit also in EFGHABCD, halves "
        "swapped, and the other eight-letter orders), plus the block as text. Look for a "
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
