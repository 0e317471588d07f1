"""Modbus driver: polls the coils, discrete inputs, input and holding registers of one device and
emits one Sample per tag (the reads and their decoding are in `drivers.modbus.client`).

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

The driver keeps only connect-and-poll; the shared reconnect loop (`drivers.common.availability`)
does the rest: a lost connection, or a request unanswered after `retries` repeats, closes the
client, logs once that the device is unavailable, retries with the shared backoff and logs once
when samples flow again. The device counts as connected from its first answer, not from an
accepted TCP connection. While a device that was not there at all is waited for, the driver
looks every second whether it accepts TCP again and reconnects at once.

With a `restart_marker` (an uptime or boot-count register), a restart of the device shows even
when it counted past the last value seen during an outage: the marker is read alone at every
connection before any counter, and with its group at every poll, and a `DeviceRestarted` goes
to the sink before the samples read after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient, ModbusBaseClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from drivers.base import (
    DeviceRestarted,
    Driver,
    Quality,
    Sample,
    SampleSink,
    TagValue,
    accepts_tcp,
    honour_cancellation,
)
from drivers.common.availability import Availability, Ended, reconnect_forever
from drivers.common.timing import Backoff
from drivers.modbus.client import (
    NOT_THERE,
    RETURN_CHECK_INTERVAL,
    SPLIT_ON_EXCEPTION,
    PollGroup,
    ReadBlock,
    block_of,
    open_client,
    plan_poll_groups,
    read_table,
    request_failure,
    response_problem,
    split_block,
    tag_value,
)
from drivers.modbus.config import BIT_TABLES, DEFAULT_GROUP, ModbusConfig, Parity, Table, Transport

log = logging.getLogger(__name__)


_PARITY_LETTER: dict[Parity, str] = {"none": "N", "even": "E", "odd": "O"}
_TCP_FRAMER: dict[Transport, FramerType] = {
    "tcp": FramerType.SOCKET,
    "rtu_over_tcp": FramerType.RTU,
}


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
            f"Modbus device {self.name} at {self.endpoint}",
            log,
            health=self.health,
            extra={"driver": self.name, "endpoint": self.endpoint},
        )
        self._failing_blocks: set[tuple[str, int, Table, int]] = set()
        self._joined: set[tuple[int, Table, int, int]] = set()
        marker = config.restart_marker
        self._marker = (
            None if marker is None else next(tag for tag in config.tags if tag.name == marker.tag)
        )
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
        await reconnect_forever(
            lambda: self._connect_and_poll(sink),
            self._backoff,
            self.availability,
            wait=self._wait_to_reconnect,
        )

    async def _connect_and_poll(self, sink: SampleSink) -> Ended:
        """One connection, from connect to its loss."""
        serial_port = self.config.serial_port if self.config.transport == "rtu" else None
        # A fresh client per connection: pymodbus keeps per-connection state (transaction
        # ids, a pending response future) that must not leak into the next attempt.
        client = self.new_client()
        try:
            reason = await open_client(client, self.config.timeout, serial_port)
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
        not_there = ended.reason in NOT_THERE or ended.reason.startswith("no answer to connect")
        host = self.config.host
        if not not_there or self.config.transport == "rtu" or host is None:
            await asyncio.sleep(delay)
            return
        deadline = time.monotonic() + delay
        while (remaining := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(RETURN_CHECK_INTERVAL, remaining))
            if time.monotonic() < deadline and await accepts_tcp(
                host, self.config.port, min(RETURN_CHECK_INTERVAL, self.config.timeout)
            ):
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
        if response is None or response_problem(response, block.table, block.count):
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
            return DeviceRestarted(
                self.name,
                sample.source_time,
                f"{what} {sample.tag} went from {before} to {sample.value}",
            )
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
            good = [
                r.source_time
                for r in readings
                if isinstance(r, Sample) and r.quality is Quality.GOOD
            ]
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
            if (
                isinstance(reading, Sample)
                and reading.tag == self._marker.name
                and reading.quality is Quality.GOOD
            ):
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
        if (
            len(block.tags) > 1
            and response.isError()
            and (response.exception_code in SPLIT_ON_EXCEPTION)
        ):
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
            works = response_problem(response, part.table, part.count) is None
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
            response: ModbusPDU = await read_table(
                connection.client, block.table, block.start, block.count, block.unit
            )
        except (ModbusException, OSError) as exc:
            connection.drop(request_failure(exc, self.config.timeout, self.config.retries))
            return None
        finally:
            honour_cancellation()  # pymodbus's wait_for may have swallowed a stop (Python 3.11)
        self.availability.connected()  # it answered: even an exception is an answer
        return response

    def _samples(
        self, group: str, block: ReadBlock, response: ModbusPDU, read_at: float
    ) -> list[Sample]:
        problem = response_problem(response, block.table, block.count)
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
                f"tag {tag.name} is bad: the device answered {problem} for {where}"
            )
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
            extra={
                "driver": self.name,
                "endpoint": self.endpoint,
                "poll_group": group,
                "address": block.start,
                "table": block.table,
                "unit": block.unit,
            },
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
