"""What goes over the wire to a Modbus device, without the driver's state: tags planned into as
few reads as possible (per unit and table, sorted by address, at most 125 registers or 2000
bits per read, bridging gaps up to `max_gap`) and split in halves when the device refuses a
read for an address; registers decoded (bits, 16/32/64-bit integers and floats in any of the
four byte orders, or for 64-bit values any of the eight-letter ones, strings) and scaled;
the connection opened and one read sent, with why it failed said in words.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pymodbus.client import ModbusBaseClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from drivers.base import (
    TagValue,
    honour_cancellation,
)
from drivers.modbus.config import (
    AS_64,
    BIT_TABLES,
    DEFAULT_GROUP,
    READ_LIMIT,
    REGISTER_WIDTH,
    TABLE_LABEL,
    TABLES,
    ByteOrder,
    ModbusConfig,
    ModbusTag,
    NumberType,
    Table,
)

SPLIT_ON_EXCEPTION = frozenset({ExcCodes.ILLEGAL_ADDRESS, ExcCodes.ILLEGAL_VALUE})
"""Exceptions that refuse a read for its addresses: a read of several tags that gets one is
split to find the address. Others (device busy, gateway path) say nothing about addresses."""


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
    return (
        block_of(block.tags[:half], block.table, block.unit),
        block_of(block.tags[half:], block.table, block.unit),
    )


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
                (
                    tag
                    for tag in tags
                    if tag.table == table and (unit if tag.unit is None else tag.unit) == unit_id
                ),
                key=lambda tag: (tag.address, tag.name),
            )
            if not coalesce:
                blocks.extend(
                    ReadBlock(table, tag.address, tag.width, (tag,), unit_id) for tag in in_table
                )
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
            blocks = plan_reads(members, config.max_gap, coalesce=config.coalesce, unit=config.unit)
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
        pattern = AS_64[pattern]
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


def response_problem(response: ModbusPDU, table: Table, count: int) -> str | None:
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
NOT_THERE = ("connection refused or host unreachable",)
"""Failures that mean nothing answered at all (a connect that timed out says so too)."""


async def open_client(
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


def request_failure(exc: Exception, timeout: float, retries: int) -> str:
    """Why a request failed, from what pymodbus raised."""
    if isinstance(exc, ConnectionException):
        return "the connection was closed"
    if isinstance(exc, ModbusIOException):
        tries = f" (sent {retries + 1} times)" if retries else ""
        return f"no valid response within {timeout:g}s{tries}"
    return f"read failed ({exc})"


async def read_table(
    client: ModbusBaseClient, table: Table, start: int, count: int, unit: int
) -> Any:
    match table:
        case "holding":
            return await client.read_holding_registers(start, count=count, device_id=unit)
        case "input":
            return await client.read_input_registers(start, count=count, device_id=unit)
        case "coil":
            return await client.read_coils(start, count=count, device_id=unit)
        case "discrete_input":
            return await client.read_discrete_inputs(start, count=count, device_id=unit)
