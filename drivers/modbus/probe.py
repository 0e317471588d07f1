"""`plantsync probe modbus`: reads one block and prints it decoded as every type in every byte
order, to settle "which order is this PLC?" in a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU

from drivers.common.timing import parse_duration
from drivers.modbus.client import decode, open_client, read_table, request_failure, response_problem
from drivers.modbus.config import (
    AS_64,
    BYTE_ORDERS,
    BYTE_ORDERS_64,
    MAX_REGISTERS_PER_READ,
    TABLE_LABEL,
    ByteOrder,
    NumberType,
    Table,
)

# --- plantsync probe modbus ---------------------------------------------------------------------

_PROBE_32: tuple[NumberType, ...] = ("int32", "uint32", "float32")
_PROBE_64: tuple[NumberType, ...] = ("int64", "uint64", "float64")
_PROBE_ONLY_64: tuple[ByteOrder, ...] = tuple(
    order for order in BYTE_ORDERS_64 if order not in AS_64.values()
)
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
        reason = await open_client(client, answer_within, None)
        if reason is not None:
            raise ProbeError(f"cannot connect to {host}:{port}: {reason}")
        try:
            response: ModbusPDU = await read_table(client, table, address, count, unit)
        except (ModbusException, OSError) as exc:
            reason = request_failure(exc, answer_within, 0)
            raise ProbeError(f"reading {block} from {host}:{port} failed: {reason}") from exc
        problem = response_problem(response, table, count)
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
