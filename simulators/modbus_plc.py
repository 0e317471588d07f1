"""A Modbus TCP PLC for offline work: a press that counts good and scrap parts at a set rate.

It is a real peer (a pymodbus server) for the Modbus driver's tests, the probe, the demo plant and
the scenario runner. `ModbusPlc` runs in-process (async `start`/`stop`, and `set_rate`,
`set_counts`, `set_state`, `set_stop_at` to steer it); `serve()` and `main()` run it on its own.
The counters advance with the clock at `rate` and `scrap_rate` units per second from `start`:
they are brought up to date whenever a request arrives, so nothing ticks in the background. They
stop when the good count reaches `stop_at`, where the machine turns Complete. Besides the press,
a fixed block holds one known value for every type and byte order the driver decodes.

Holding registers (0-based protocol addresses; every unit id gets the same answer; registers
0-255 read as 0 where unlisted, higher addresses answer exception 2, illegal data address; all
tables are read-only, writes answer exception 2):

| address | type    | order | content                                                    |
|---------|---------|-------|------------------------------------------------------------|
| 0-1     | uint32  | ABCD  | good count                                                 |
| 2-3     | uint32  | ABCD  | defective (scrap) count                                    |
| 10      | uint16  |       | machine state, PackML: 4 Idle, 6 Execute, 17 Complete, ... |
| 20-21   | float32 | ABCD  | process value: press force in kN, 13.5 +/- noise           |
| 30      | int16   |       | temperature in degrees Celsius, constant -5                |
| 40-41   | uint32  | CDAB  | good count again, low word first                           |
| 60-61   | uint32  | ABCD  | uptime: seconds since the PLC started (`--uptime` adds)     |
| 62      | uint16  |       | boot count (`--boot-count`, default 1)                     |
| 100-107 | uint32  | each  | 123456789 as ABCD at 100, CDAB 102, BADC 104, DCBA 106     |
| 110-117 | int32   | each  | -123456789, same order of orders (110, 112, 114, 116)      |
| 120-127 | float32 | each  | 3.14159 (120, 122, 124, 126)                               |
| 130-145 | uint64  | each  | 1234567890123 (130, 134, 138, 142)                         |
| 150-165 | int64   | each  | -1234567890123 (150, 154, 158, 162)                        |
| 170-185 | float64 | each  | 3.14159 (170, 174, 178, 182)                               |
| 190     | int16   | ABCD  | -12345                                                     |
| 191     | uint16  | ABCD  | 54321                                                      |
| 192     | uint16  | ABCD  | 0xA5C3: bits 0, 1, 6, 7, 8, 10, 13 and 15 set              |
| 193     | int16   | BADC  | -12345 with its two bytes swapped                          |
| 200-204 | string  | ABCD  | "PLANTSYNC", NUL padded ("PL" in 200)                      |
| 210-214 | string  | BADC  | "PLANTSYNC", NUL padded, bytes swapped ("LP" in 210)       |
| 220-225 | string  | ABCD  | "PLANTSYNC" padded with spaces to 12 characters            |
| 230-241 | 64-bit  | EFGH- | halves swapped (EFGHABCD): uint64 at 230, int64 234, float64 |
|         |         | ABCD  | 238, the values of 130, 150 and 170                        |
| 242-253 | uint64  | each  | 1234567890123: CDABGHEF 242, DCBAHGFE 246, FEHGBADC 250     |

Byte orders name the value's bytes, most significant first, as they appear in address order:
ABCD is big-endian with the high word first, CDAB swaps the words, BADC swaps the bytes in each
word, DCBA is little-endian. For 64-bit values CDAB reverses all four words; the eight-letter
orders name all eight bytes (EFGHABCD: the low 32-bit half first, each half high word first). A
string keeps its words in address order; only BADC/DCBA swap the two characters in each
register.

The press force (20-21) reads NaN, +Inf or -Inf with `--sensor-fault nan|inf|-inf`, as a PLC
reports a failed sensor. A restart of the PLC shows in its uptime (60-61), which starts again
from `--uptime` (default 0), and in its boot count (62), which a test sets with `--boot-count`.

Input registers 0-255 mirror the holding registers, except 50-51: uint32 987654321 (ABCD), which
the holding registers read as 0. Coils 0-63: coil n is on when n % 3 == 0. Discrete inputs 0-63:
input n is on when n % 4 == 1. Higher bit addresses answer exception 2.

State is Idle while both rates are 0, Execute while counting, and
Complete once `stop_at` is reached, unless `set_state` forces a state (Held, Stopped, ...), in
which the counters stand still. Once listening `serve()` prints `modbus-plc listening on
HOST:PORT` on stdout, so a parent process can wait for that line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import logging
import random
import signal
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

log = logging.getLogger(__name__)

REGISTER_COUNT = 256
BIT_COUNT = 64

GOOD_COUNT = 0
DEFECTIVE_COUNT = 2
MACHINE_STATE = 10
PRESS_FORCE = 20
TEMPERATURE = 30
GOOD_COUNT_LITTLE = 40
INPUT_ONLY = 50
UPTIME = 60
BOOT_COUNT = 62

FORCE_NOMINAL = 13.5
FORCE_NOISE = 0.05
TEMPERATURE_CELSIUS = -5
INPUT_ONLY_VALUE = 987_654_321

BYTE_ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
UINT32_VALUE = 123_456_789
INT32_VALUE = -123_456_789
UINT64_VALUE = 1_234_567_890_123
INT64_VALUE = -1_234_567_890_123
FLOAT_VALUE = 3.14159
INT16_VALUE = -12345
UINT16_VALUE = 54321
BIT_PATTERN = 0xA5C3
STRING_VALUE = "PLANTSYNC"

SensorFault = Literal["nan", "inf", "-inf"]
"""What a failed force sensor reads as: NaN, or an overflow to +Inf or -Inf."""
_FAULT_VALUE: dict[SensorFault, float] = {
    "nan": float("nan"),
    "inf": float("inf"),
    "-inf": float("-inf"),
}

Framer = Literal["tcp", "rtu"]
"""How requests are framed on the TCP socket: Modbus TCP (MBAP header) or RTU frames (CRC), as
serial-to-Ethernet gateways pass them through."""

_FRAMER_TYPES: dict[Framer, FramerType] = {"tcp": FramerType.SOCKET, "rtu": FramerType.RTU}
_TABLE_OF_FUNCTION = {1: "coil", 2: "discrete_input", 3: "holding", 4: "input"}


class MachineState(enum.IntEnum):
    """The PackML state numbers this PLC reports."""

    STOPPED = 2
    IDLE = 4
    SUSPENDED = 5
    EXECUTE = 6
    ABORTED = 9
    HELD = 11
    COMPLETE = 17


@dataclass(frozen=True, slots=True)
class KnownValue:
    """A value of the fixed block: where it is and how it decodes."""

    address: int
    type: str
    byte_order: str
    value: int | float | str
    length: int = 0
    """Registers, for strings."""
    padding: str = "\0"
    """What fills a string up to `length` registers."""


def _ordered(big_endian: bytes, byte_order: str) -> list[int]:
    """The registers that hold `big_endian` (most significant byte first) in `byte_order`.

    Written from the orders' definition, not from the driver's code: the letters name the
    value's bytes (A the most significant) in address order; four letters on a 64-bit value
    apply word by word to all four words."""
    if len(byte_order) == 8:
        raw = bytes(big_endian[ord(letter) - ord("A")] for letter in byte_order)
        return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    words = [big_endian[i : i + 2] for i in range(0, len(big_endian), 2)]
    if byte_order in ("CDAB", "DCBA"):
        words.reverse()
    if byte_order in ("BADC", "DCBA"):
        words = [word[::-1] for word in words]
    return [int.from_bytes(word, "big") for word in words]


def _string_registers(known: KnownValue) -> list[int]:
    text = str(known.value)
    raw = text.encode("ascii").ljust(2 * known.length, known.padding.encode("ascii"))
    words = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    if known.byte_order in ("BADC", "DCBA"):
        words = [word[::-1] for word in words]
    return [int.from_bytes(word, "big") for word in words]


def _known_values() -> tuple[KnownValue, ...]:
    known: list[KnownValue] = []
    numbers: list[tuple[int, str, int | float, int]] = [
        (100, "uint32", UINT32_VALUE, 2),
        (110, "int32", INT32_VALUE, 2),
        (120, "float32", FLOAT_VALUE, 2),
        (130, "uint64", UINT64_VALUE, 4),
        (150, "int64", INT64_VALUE, 4),
        (170, "float64", FLOAT_VALUE, 4),
    ]
    for base, type_name, value, width in numbers:
        for index, order in enumerate(BYTE_ORDERS):
            known.append(KnownValue(base + index * width, type_name, order, value))
    known += [
        KnownValue(230, "uint64", "EFGHABCD", UINT64_VALUE),
        KnownValue(234, "int64", "EFGHABCD", INT64_VALUE),
        KnownValue(238, "float64", "EFGHABCD", FLOAT_VALUE),
        KnownValue(242, "uint64", "CDABGHEF", UINT64_VALUE),
        KnownValue(246, "uint64", "DCBAHGFE", UINT64_VALUE),
        KnownValue(250, "uint64", "FEHGBADC", UINT64_VALUE),
    ]
    known += [
        KnownValue(190, "int16", "ABCD", INT16_VALUE),
        KnownValue(191, "uint16", "ABCD", UINT16_VALUE),
        KnownValue(192, "uint16", "ABCD", BIT_PATTERN),
        KnownValue(193, "int16", "BADC", INT16_VALUE),
        KnownValue(200, "string", "ABCD", STRING_VALUE, length=5),
        KnownValue(200, "string", "CDAB", STRING_VALUE, length=5),  # word order is kept
        KnownValue(210, "string", "BADC", STRING_VALUE, length=5),
        KnownValue(210, "string", "DCBA", STRING_VALUE, length=5),
        KnownValue(220, "string", "ABCD", STRING_VALUE, length=6, padding=" "),
    ]
    return tuple(known)


KNOWN_VALUES = _known_values()
"""Every value of the fixed block, for tests and for checking a driver by hand."""

_STRUCT_FORMAT = {
    "uint16": ">H",
    "int16": ">h",
    "uint32": ">I",
    "int32": ">i",
    "float32": ">f",
    "uint64": ">Q",
    "int64": ">q",
    "float64": ">d",
}


def _fixed_block() -> tuple[int, ...]:
    image = [0] * REGISTER_COUNT
    for known in KNOWN_VALUES:
        if isinstance(known.value, str):
            words = _string_registers(known)
        else:
            words = _ordered(struct.pack(_STRUCT_FORMAT[known.type], known.value), known.byte_order)
        image[known.address : known.address + len(words)] = words
    return tuple(image)


FIXED_BLOCK = _fixed_block()
"""The holding registers with the fixed test values and zeros elsewhere."""

COILS = tuple(n % 3 == 0 for n in range(BIT_COUNT))
DISCRETE_INPUTS = tuple(n % 4 == 1 for n in range(BIT_COUNT))


@dataclass
class Press:
    """The machine behind the registers: counters, state and process values."""

    rate: float = 10.0
    scrap_rate: float = 0.0
    good_count: float = 0.0
    defective_count: float = 0.0
    stop_at: int | None = None
    state: MachineState = MachineState.IDLE
    forced_state: MachineState | None = None
    """A state set from outside (a hold, a stop, a fault); the counters stand still in it."""
    force: float = FORCE_NOMINAL
    uptime: float = 0.0
    """Seconds since the PLC started; it runs whatever the state."""
    boot_count: int = 1
    sensor_fault: SensorFault | None = None
    """The force sensor has failed and reads as this."""
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def advance(self, seconds: float) -> None:
        """Let `seconds` of production pass."""
        self.uptime += seconds
        self.force = FORCE_NOMINAL + self.rng.gauss(0.0, FORCE_NOISE)
        if self.sensor_fault is not None:
            self.force = _FAULT_VALUE[self.sensor_fault]
        forced = self.forced_state
        if forced is not None and forced is not MachineState.EXECUTE:
            self.state = forced
            return
        if self.stop_at is not None and self.good_count >= self.stop_at:
            self.state = MachineState.COMPLETE
            return
        if self.rate <= 0 and self.scrap_rate <= 0:
            self.state = forced or MachineState.IDLE
            return
        self.state = MachineState.EXECUTE
        self.good_count += self.rate * seconds
        self.defective_count += self.scrap_rate * seconds
        if self.stop_at is not None and self.good_count >= self.stop_at:
            self.good_count = float(self.stop_at)
            self.state = MachineState.COMPLETE

    def registers(self) -> list[int]:
        """The holding registers 0..REGISTER_COUNT-1 as the PLC exposes them now."""
        image = list(FIXED_BLOCK)
        good = int(self.good_count)
        image[GOOD_COUNT : GOOD_COUNT + 2] = _ordered(_uint32_bytes(good), "ABCD")
        image[GOOD_COUNT_LITTLE : GOOD_COUNT_LITTLE + 2] = _ordered(_uint32_bytes(good), "CDAB")
        defective = int(self.defective_count)
        image[DEFECTIVE_COUNT : DEFECTIVE_COUNT + 2] = _ordered(_uint32_bytes(defective), "ABCD")
        image[MACHINE_STATE] = int(self.state)
        image[PRESS_FORCE : PRESS_FORCE + 2] = _ordered(struct.pack(">f", self.force), "ABCD")
        image[TEMPERATURE] = TEMPERATURE_CELSIUS & 0xFFFF
        image[UPTIME : UPTIME + 2] = _ordered(_uint32_bytes(int(self.uptime)), "ABCD")
        image[BOOT_COUNT] = self.boot_count & 0xFFFF
        return image

    def input_registers(self) -> list[int]:
        """The input registers: the holding registers plus the input-only value."""
        image = self.registers()
        image[INPUT_ONLY : INPUT_ONLY + 2] = _ordered(_uint32_bytes(INPUT_ONLY_VALUE), "ABCD")
        return image


def _uint32_bytes(value: int) -> bytes:
    """The value modulo 2**32, big-endian."""
    return (value & 0xFFFFFFFF).to_bytes(4, "big")


class ModbusPlc:
    """The press PLC served on host:port, in this process, until `stop()`.

    Call order: `__init__` does no I/O; `await start()` listens (port 0 picks a free port, read
    it from `port` afterwards); the `set_*` methods may be called at any time; `await stop()`
    closes the server and every client connection. `requests` counts the requests that reached
    the register map, by table (`holding`, `input`, `coil`, `discrete_input`).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        rate: float = 10.0,
        scrap_rate: float = 0.0,
        start: int = 0,
        stop_at: int | None = None,
        framer: Framer = "tcp",
        serial_port: str | None = None,
        baudrate: int = 19200,
        uptime: float = 0.0,
        boot_count: int = 1,
        sensor_fault: SensorFault | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.framer = framer
        self.serial_port = serial_port
        """A serial device (e.g. one end of a pty pair) to answer RTU on instead of TCP."""
        self.baudrate = baudrate
        self.press = Press(
            rate=rate,
            scrap_rate=scrap_rate,
            good_count=float(start),
            stop_at=stop_at,
            uptime=uptime,
            boot_count=boot_count,
            sensor_fault=sensor_fault,
        )
        self.requests: Counter[str] = Counter()
        self._last_advance: float | None = None
        self._server: ModbusTcpServer | ModbusSerialServer | None = None

    async def start(self) -> None:
        """Listen; returns once connections are accepted."""
        if self._server is not None:
            raise RuntimeError("the Modbus PLC simulator is already running")
        device = SimDevice(
            id=0,  # 0 answers every unit id, like most TCP-native PLCs
            simdata=(
                [SimData(address=0, values=list(COILS), datatype=DataType.BITS, readonly=True)],
                [
                    SimData(
                        address=0,
                        values=list(DISCRETE_INPUTS),
                        datatype=DataType.BITS,
                        readonly=True,
                    )
                ],
                [self._register_block()],
                [self._register_block()],
            ),
            action=self._on_request,
        )
        server: ModbusTcpServer | ModbusSerialServer
        if self.serial_port is not None:
            server = ModbusSerialServer(
                device,
                port=self.serial_port,
                framer=FramerType.RTU,
                baudrate=self.baudrate,
                parity="N",
                stopbits=1,
            )
        else:
            server = ModbusTcpServer(
                device, address=(self.host, self.port), framer=_FRAMER_TYPES[self.framer]
            )
        # background=True returns once listening; the foreground variant swallows cancellation.
        await server.serve_forever(background=True)
        self._server = server
        self._catch_up()  # production runs from now
        sockets = getattr(server.transport, "sockets", None) or ()
        if sockets:
            self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop the client connections."""
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]

    @property
    def connections(self) -> int:
        """Client connections open now."""
        server = self._server
        return len(server.active_connections) if server is not None else 0

    async def __aenter__(self) -> ModbusPlc:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def set_rate(self, rate: float, scrap_rate: float | None = None) -> None:
        """Count `rate` good (and `scrap_rate` scrap) units per second from now on."""
        self._catch_up()
        self.press.rate = rate
        if scrap_rate is not None:
            self.press.scrap_rate = scrap_rate

    def set_counts(self, good: int | None = None, defective: int | None = None) -> None:
        """Set the counters, as a counter reset or a PLC replacement would."""
        self._catch_up()
        if good is not None:
            self.press.good_count = float(good)
        if defective is not None:
            self.press.defective_count = float(defective)

    def set_state(self, state: MachineState | None) -> None:
        """Force a state (the counters run only in Execute); None returns to automatic."""
        self._catch_up()
        self.press.forced_state = state
        self.press.advance(0.0)  # the new state shows on the next read, not after a while

    def restart(self, good: int = 0) -> None:
        """A warm restart of the PLC program with the connections kept: the uptime starts
        again from 0, the boot count goes up, and the good count starts again from `good`."""
        self._catch_up()
        self.press.uptime = 0.0
        self.press.boot_count += 1
        self.press.good_count = float(good)

    def set_sensor_fault(self, fault: SensorFault | None) -> None:
        """The force sensor fails (it reads NaN, +Inf or -Inf), or None: it works again."""
        self._catch_up()
        self.press.sensor_fault = fault
        self.press.advance(0.0)

    def set_stop_at(self, stop_at: int | None) -> None:
        """Complete when the good count reaches `stop_at`; None counts on forever."""
        self._catch_up()
        self.press.stop_at = stop_at

    def _catch_up(self) -> None:
        now = time.monotonic()
        elapsed = 0.0 if self._last_advance is None else now - self._last_advance
        self.press.advance(elapsed)
        self._last_advance = now

    @staticmethod
    def _register_block() -> SimData:
        return SimData(
            address=0, count=REGISTER_COUNT, values=0, datatype=DataType.REGISTERS, readonly=True
        )

    async def _on_request(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current_registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """pymodbus calls this before it answers; bring the table the request reads up to date."""
        table = _TABLE_OF_FUNCTION.get(function_code, "other")
        self.requests[table] += 1
        self._catch_up()
        # Each register block starts at address 0, so list index and protocol address coincide;
        # the bit tables are fixed and keep what they were built with.
        if table == "holding":
            current_registers[:REGISTER_COUNT] = self.press.registers()
        elif table == "input":
            current_registers[:REGISTER_COUNT] = self.press.input_registers()
        return None


async def serve(
    host: str,
    port: int,
    *,
    rate: float = 10.0,
    scrap_rate: float = 0.0,
    start: int = 0,
    stop_at: int | None = None,
    framer: Framer = "tcp",
    uptime: float = 0.0,
    boot_count: int = 1,
    sensor_fault: SensorFault | None = None,
) -> None:
    """Serve the PLC on host:port until cancelled; port 0 picks a free port."""
    plc = ModbusPlc(
        host,
        port,
        rate=rate,
        scrap_rate=scrap_rate,
        start=start,
        stop_at=stop_at,
        framer=framer,
        uptime=uptime,
        boot_count=boot_count,
        sensor_fault=sensor_fault,
    )
    await plc.start()
    try:
        print(f"modbus-plc listening on {host}:{plc.port}", flush=True)
        log.info(
            "Modbus PLC simulator is listening on %s:%d, counting %g good and %g scrap per second.",
            host,
            plc.port,
            rate,
            scrap_rate,
        )
        await asyncio.Event().wait()  # until cancelled
    finally:
        await plc.stop()


async def _serve_until_signal(args: argparse.Namespace) -> None:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await serve(
            args.host,
            args.port,
            rate=args.rate,
            scrap_rate=args.scrap_rate,
            start=args.start,
            stop_at=args.stop_at,
            framer=args.framer,
            uptime=args.uptime,
            boot_count=args.boot_count,
            sensor_fault=args.sensor_fault,
        )
    except asyncio.CancelledError:
        log.info("Modbus PLC simulator stopped.")


def main(argv: list[str] | None = None, prog: str = "python -m simulators.modbus_plc") -> int:
    """Run the simulator from the command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Modbus TCP PLC simulator: a press counting good and scrap parts, plus a "
        "fixed block with a known value for every type and byte order (see the module doc).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=5020, help="TCP port (0 picks a free one)")
    parser.add_argument("--rate", type=float, default=10.0, help="good units per second")
    parser.add_argument("--scrap-rate", type=float, default=0.0, help="scrap units per second")
    parser.add_argument("--start", type=int, default=0, help="initial good count")
    parser.add_argument("--stop-at", type=int, default=None, help="good count that completes")
    parser.add_argument(
        "--framer",
        choices=("tcp", "rtu"),
        default="tcp",
        help="frames on the socket: Modbus TCP (default) or RTU, as a serial gateway passes them",
    )
    parser.add_argument(
        "--uptime",
        type=float,
        default=0.0,
        help="seconds the PLC has been up at start (registers 60-61 count on from there)",
    )
    parser.add_argument(
        "--boot-count", type=int, default=1, help="the boot count in register 62 (default 1)"
    )
    parser.add_argument(
        "--sensor-fault",
        choices=("nan", "inf", "-inf"),
        default=None,
        help="the force sensor (registers 20-21) has failed and reads NaN, +Inf or -Inf",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C before the handler is installed
        asyncio.run(_serve_until_signal(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
