"""Modbus TCP driver: polls holding and input registers of one device and emits one Sample per tag.

Tags are planned into as few reads as possible (per table, sorted by address, at most 125
registers per read, bridging small gaps), decoded from 16-bit words into integers and floats,
scaled, and handed to the sink as one batch per poll. The driver owns its reconnect loop: a lost
connection or a timeout closes the client, logs once that the device is unavailable, retries with
the shared backoff and logs once when samples flow again. A Modbus exception response for one
read marks only that read's tags bad; the others keep going.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from drivers.base import Driver, Quality, Sample, SampleSink
from edge.timing import Backoff, Duration

log = logging.getLogger(__name__)

Table = Literal["holding", "input"]
RegisterType = Literal["uint16", "int16", "uint32", "int32", "float32"]
WordOrder = Literal["big", "little"]

MAX_REGISTERS_PER_READ = 125
"""The Modbus limit for one read of holding or input registers (function codes 3 and 4)."""

REGISTER_WIDTH: dict[RegisterType, int] = {
    "uint16": 1,
    "int16": 1,
    "uint32": 2,
    "int32": 2,
    "float32": 2,
}
_STRUCT_FORMAT: dict[RegisterType, str] = {
    "uint16": ">H",
    "int16": ">h",
    "uint32": ">I",
    "int32": ">i",
    "float32": ">f",
}


class ModbusTag(BaseModel):
    """One value on the device: where it lives and how its registers decode."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Tag name; samples are published as `<driver>.<name>`.",
        examples=["good", "state"],
    )
    address: int = Field(
        ge=0,
        le=65535,
        description="0-based protocol address of the first register (register 40001 is 0).",
        examples=[0, 10],
    )
    table: Table = Field(
        default="holding",
        description="Register table: `holding` (function code 3) or `input` (function code 4).",
    )
    type: RegisterType = Field(
        default="uint16",
        description="How the registers decode; 32-bit types span two registers.",
    )
    word_order: WordOrder = Field(
        default="big",
        description="For 32-bit types: `big` means the high word is at the lower address.",
    )
    scale: float = Field(
        default=1.0,
        description="Multiplier applied to the raw value: value = raw * scale + offset.",
        examples=[0.1],
    )
    offset: float = Field(
        default=0.0,
        description="Added after scaling. Without scale or offset, integers stay integers.",
    )

    @property
    def width(self) -> int:
        """Number of 16-bit registers the tag spans."""
        return REGISTER_WIDTH[self.type]

    @model_validator(mode="after")
    def _fits_address_space(self) -> ModbusTag:
        if self.address + self.width - 1 > 65535:
            raise ValueError(f"a {self.type} at address {self.address} runs past register 65535")
        return self


class ModbusConfig(BaseModel):
    """A Modbus TCP device polled at a fixed interval."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Driver name, unique in the plant; the prefix of every signal it emits.",
        examples=["press-01"],
    )
    type: Literal["modbus"] = Field(description="Selects this driver.")
    host: str = Field(
        min_length=1, description="Device IP address or host name.", examples=["10.0.0.21"]
    )
    port: int = Field(default=502, ge=1, le=65535, description="Modbus TCP port.")
    unit: int = Field(
        default=1, ge=0, le=247, description="Modbus unit (device) id; gateways route on it."
    )
    poll_interval: Duration = Field(
        default=1.0,
        gt=0,
        description="Time between two polls of all tags.",
        examples=["1s", "500ms"],
    )
    timeout: Duration = Field(
        default=3.0,
        gt=0,
        description="Timeout for connecting and for each response; a timeout means reconnect.",
        examples=["3s"],
    )
    max_gap: int = Field(
        default=8,
        ge=0,
        le=MAX_REGISTERS_PER_READ - 2,
        description="Unused registers bridged to merge two tags into one read.",
    )
    tags: list[ModbusTag] = Field(min_length=1, description="The values to read.")

    @field_validator("tags")
    @classmethod
    def _unique_tag_names(cls, tags: list[ModbusTag]) -> list[ModbusTag]:
        names = [tag.name for tag in tags]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"tag names must be unique; repeated: {', '.join(duplicates)}")
        return tags


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One read request: `count` registers of `table` from `start`, covering `tags`."""

    table: Table
    start: int
    count: int
    tags: tuple[ModbusTag, ...]

    @property
    def end(self) -> int:
        """First address after the block."""
        return self.start + self.count

    @property
    def key(self) -> tuple[Table, int]:
        """Identifies the block: blocks of one table never overlap."""
        return (self.table, self.start)


def plan_reads(
    tags: Sequence[ModbusTag],
    max_gap: int,
    max_count: int = MAX_REGISTERS_PER_READ,
) -> list[ReadBlock]:
    """Coalesce tags into reads: per table, by address, at most `max_count` registers each.

    Two neighbouring tags share a read when at most `max_gap` unused registers lie between them
    and the merged read stays within `max_count`. Holding-register reads come first.
    """
    blocks: list[ReadBlock] = []
    for table in ("holding", "input"):
        in_table = sorted(
            (tag for tag in tags if tag.table == table), key=lambda tag: (tag.address, tag.name)
        )
        start = end = 0
        members: list[ModbusTag] = []
        for tag in in_table:
            tag_end = tag.address + tag.width
            if members and tag.address - end <= max_gap and max(end, tag_end) - start <= max_count:
                members.append(tag)
                end = max(end, tag_end)
                continue
            if members:
                blocks.append(ReadBlock(table, start, end - start, tuple(members)))
            start, end, members = tag.address, tag_end, [tag]
        if members:
            blocks.append(ReadBlock(table, start, end - start, tuple(members)))
    return blocks


def decode(
    registers: Sequence[int], type: RegisterType, word_order: WordOrder = "big"
) -> int | float:
    """Decode the registers of one tag; `word_order` matters only for 32-bit types."""
    width = REGISTER_WIDTH[type]
    if len(registers) != width:
        raise ValueError(f"a {type} needs {width} registers, got {len(registers)}")
    words = list(registers)
    if word_order == "little":
        words.reverse()
    raw = b"".join(word.to_bytes(2, "big") for word in words)
    value: int | float = struct.unpack(_STRUCT_FORMAT[type], raw)[0]
    return value


def tag_value(tag: ModbusTag, registers: Sequence[int]) -> int | float:
    """Decode and scale one tag from its own registers."""
    raw = decode(registers, tag.type, tag.word_order)
    if tag.scale != 1.0 or tag.offset != 0.0:
        return raw * tag.scale + tag.offset
    return raw


def _exception_name(code: int) -> str:
    try:
        return ExcCodes(code).name.lower().replace("_", " ")
    except ValueError:
        return "unknown exception"


class ModbusDriver(Driver):
    """Polls one Modbus TCP device and owns its reconnection."""

    def __init__(self, config: ModbusConfig) -> None:
        super().__init__(config.name)
        self.config = config
        self.blocks = plan_reads(config.tags, config.max_gap)
        self._backoff = Backoff(base=0.5, cap=30.0)
        self._unavailable = False
        self._failing_blocks: set[tuple[Table, int]] = set()

    @property
    def endpoint(self) -> str:
        """`host:port`, as logs show it."""
        return f"{self.config.host}:{self.config.port}"

    async def run(self, sink: SampleSink) -> None:
        """Connect, poll and reconnect until cancelled; device errors never end it."""
        while True:
            # A fresh client per connection: pymodbus keeps per-connection state (transaction
            # ids, a pending response future) that must not leak into the next attempt.
            client = AsyncModbusTcpClient(
                self.config.host,
                port=self.config.port,
                name=self.name,
                timeout=self.config.timeout,
                retries=0,
                reconnect_delay=0,  # 0 disables pymodbus's own reconnect task: this loop owns it
            )
            try:
                reason = await self._connect(client)
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

    async def _connect(self, client: AsyncModbusTcpClient) -> str | None:
        """Open the connection; return why it failed, or None when connected."""
        started = time.monotonic()
        try:
            connected = await client.connect()
        except (ModbusException, OSError) as exc:
            return f"connection failed ({exc})"
        if connected:
            return None
        # pymodbus reports a failed connect as False and logs the cause itself.
        if time.monotonic() - started >= self.config.timeout * 0.9:
            return f"no answer to connect within {self.config.timeout:g}s"
        return "connection refused or host unreachable"

    async def _poll(self, client: AsyncModbusTcpClient, sink: SampleSink) -> str:
        """Read every block each poll interval; return why the connection ended."""
        next_poll = time.monotonic()
        while True:
            if not client.connected:
                return "the connection was closed"
            samples: list[Sample] = []
            for block in self.blocks:
                try:
                    response = await self._read(client, block)
                except ConnectionException:
                    return "the connection was closed"
                except ModbusIOException:
                    return f"no valid response within {self.config.timeout:g}s"
                except (ModbusException, OSError) as exc:
                    return f"read failed ({exc})"
                samples.extend(self._samples(block, response, time.time()))
            self._mark_available()
            good = [sample.source_time for sample in samples if sample.quality is Quality.GOOD]
            if good:
                self.health.last_sample_at = max(good)
            await sink(samples)
            next_poll += self.config.poll_interval
            delay = next_poll - time.monotonic()
            if delay < 0:  # a slow device or sink: skip the missed polls rather than burst
                next_poll = time.monotonic()
                delay = 0.0
            await asyncio.sleep(delay)

    async def _read(self, client: AsyncModbusTcpClient, block: ReadBlock) -> ModbusPDU:
        if block.table == "holding":
            return await client.read_holding_registers(
                block.start, count=block.count, device_id=self.config.unit
            )
        return await client.read_input_registers(
            block.start, count=block.count, device_id=self.config.unit
        )

    def _samples(self, block: ReadBlock, response: ModbusPDU, read_at: float) -> list[Sample]:
        registers = list(response.registers)
        if response.isError() or len(registers) < block.count:
            if response.isError():
                code = response.exception_code
                problem = f"exception code {code} ({_exception_name(code)})"
            else:
                problem = f"{len(registers)} of {block.count} registers"
            self._block_failed(block, problem)
            return [Sample(self.name, tag.name, None, read_at, Quality.BAD) for tag in block.tags]
        self.health.reads += 1
        self._block_recovered(block)
        samples = []
        for tag in block.tags:
            offset = tag.address - block.start
            value = tag_value(tag, registers[offset : offset + tag.width])
            samples.append(Sample(self.name, tag.name, value, read_at, Quality.GOOD))
        return samples

    def _block_failed(self, block: ReadBlock, problem: str) -> None:
        self._record_error(f"{block.table} registers {block.start}-{block.end - 1}: {problem}")
        if block.key in self._failing_blocks:
            return
        self._failing_blocks.add(block.key)
        log.warning(
            "Modbus device %s at %s answered %s for %s registers %d-%d; "
            "tags %s are marked bad until it reads again.",
            self.name,
            self.endpoint,
            problem,
            block.table,
            block.start,
            block.end - 1,
            ", ".join(tag.name for tag in block.tags),
            extra={"driver": self.name, "endpoint": self.endpoint},
        )

    def _block_recovered(self, block: ReadBlock) -> None:
        if block.key in self._failing_blocks:
            self._failing_blocks.discard(block.key)
            log.info(
                "Modbus device %s at %s reads %s registers %d-%d again.",
                self.name,
                self.endpoint,
                block.table,
                block.start,
                block.end - 1,
                extra={"driver": self.name, "endpoint": self.endpoint},
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
