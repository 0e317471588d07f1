"""The Modbus driver's configuration: the device (TCP, RTU over TCP or a serial RTU line), its tags
(table, address, type, byte order, scale, poll group) and the restart marker, validated
without I/O; also the protocol's names and limits that the config checks against (tables,
value types and their widths, byte orders, the most registers or bits one read may ask for).
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
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
    "ABCD",
    "CDAB",
    "BADC",
    "DCBA",
    "ABCDEFGH",
    "BADCFEHG",
    "CDABGHEF",
    "DCBAHGFE",
    "EFGHABCD",
    "FEHGBADC",
    "GHEFCDAB",
    "HGFEDCBA",
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
    "ABCDEFGH",
    "BADCFEHG",
    "CDABGHEF",
    "DCBAHGFE",
    "EFGHABCD",
    "FEHGBADC",
    "GHEFCDAB",
    "HGFEDCBA",
)
"""The eight-letter orders, for 64-bit values only: every combination of the 32-bit halves'
order, the words' order within a half, and the bytes' order within a word."""
AS_64: dict[str, str] = {
    "ABCD": "ABCDEFGH",
    "CDAB": "GHEFCDAB",
    "BADC": "BADCFEHG",
    "DCBA": "HGFEDCBA",
}
"""What a four-letter order means for a 64-bit value: CDAB reverses all four words."""
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
        default=DEFAULT_RECONNECT_MAX_DELAY,
        gt=0,
        description=RECONNECT_MAX_DELAY_DOC,
        examples=["10s"],
    )
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
            if meant is None or meant not in (
                tag.table,
                *(("holding", "input") if tag.table in ("holding", "input") else ()),
            ):
                continue
            zero_based = tag.address - MODICON_BASE[meant]
            name = TABLE_LABEL[meant].removesuffix("s")
            if meant == tag.table:
                where = f"address {zero_based}"
                fix = f"address: {zero_based}"
            else:
                where = f"address {zero_based} of table {meant}"
                fix = f"table: {meant}, address: {zero_based}"
            found.append(
                (
                    ("tags", index, "address"),
                    f"{tag.address} looks like a Modicon register number: {name} "
                    f"{tag.address} is {where} (0-based protocol address); if that is "
                    f"what you mean, write {fix}",
                )
            )
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
            raise ValueError(
                f"restart_marker names tag {marker.tag!r}, which tags do not define{hint}"
            )
        if tag.type not in _INTEGER_TYPES or tag.scale != 1.0 or tag.offset != 0.0:
            raise ValueError(
                f"restart_marker tag {tag.name} must be an unscaled integer, not a {tag.type}"
            )
        if marker.kind == "uptime" and tag.type in ("uint16", "int16"):
            raise ValueError(
                f"restart_marker tag {tag.name}: a 16-bit uptime wraps within "
                "hours or days and would look like a restart; use a 32- or "
                "64-bit uptime, or kind boot_count"
            )
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
