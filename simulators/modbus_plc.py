"""A Modbus TCP PLC for offline work: a press that counts good and scrap parts at a set rate.

It is a real peer (a pymodbus TCP server) for the Modbus driver's tests and the demo plant. The
counters advance in the serving loop every 50 ms at `rate` and `scrap_rate` units per second from
`start`, and stop when the good count reaches `stop_at`, where the machine turns Complete.

Register map (holding registers, 0-based protocol addresses; every unit id gets the same answer,
input registers mirror the holding registers, registers 0-49 read as 0 where unlisted, higher
addresses answer exception 2, illegal data address, and writes are refused):

| address | type    | word order | content                                               |
|---------|---------|------------|-------------------------------------------------------|
| 0-1     | uint32  | big        | good count                                            |
| 2-3     | uint32  | big        | defective (scrap) count                               |
| 10      | uint16  |            | machine state, PackML: 4 Idle, 6 Execute, 17 Complete |
| 20-21   | float32 | big        | process value: press force in kN, 13.5 +/- noise      |
| 30      | int16   |            | temperature in degrees Celsius, constant -5           |
| 40-41   | uint32  | little     | good count again, low word first                      |

State is Idle before the first tick and while both rates are 0, Execute while counting, and
Complete once `stop_at` is reached. Once listening it prints `modbus-plc listening on HOST:PORT`
on stdout, so a parent process can wait for that line.
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
from dataclasses import dataclass, field

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

log = logging.getLogger(__name__)

REGISTER_COUNT = 50
TICK_SECONDS = 0.05

GOOD_COUNT = 0
DEFECTIVE_COUNT = 2
MACHINE_STATE = 10
PRESS_FORCE = 20
TEMPERATURE = 30
GOOD_COUNT_LITTLE = 40

FORCE_NOMINAL = 13.5
FORCE_NOISE = 0.05
TEMPERATURE_CELSIUS = -5


class MachineState(enum.IntEnum):
    """The PackML state numbers this PLC reports."""

    IDLE = 4
    EXECUTE = 6
    COMPLETE = 17


def _uint32_words(value: int) -> tuple[int, int]:
    """(high word, low word) of the value modulo 2**32."""
    value &= 0xFFFFFFFF
    return value >> 16, value & 0xFFFF


@dataclass
class Press:
    """The machine behind the registers: counters, state and process values."""

    rate: float = 10.0
    scrap_rate: float = 0.0
    good_count: float = 0.0
    defective_count: float = 0.0
    stop_at: int | None = None
    state: MachineState = MachineState.IDLE
    force: float = FORCE_NOMINAL
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def advance(self, seconds: float) -> None:
        """Let `seconds` of production pass."""
        self.force = FORCE_NOMINAL + self.rng.gauss(0.0, FORCE_NOISE)
        if self.stop_at is not None and self.good_count >= self.stop_at:
            self.state = MachineState.COMPLETE
            return
        if self.rate <= 0 and self.scrap_rate <= 0:
            self.state = MachineState.IDLE
            return
        self.state = MachineState.EXECUTE
        self.good_count += self.rate * seconds
        self.defective_count += self.scrap_rate * seconds
        if self.stop_at is not None and self.good_count >= self.stop_at:
            self.good_count = float(self.stop_at)
            self.state = MachineState.COMPLETE

    def registers(self) -> list[int]:
        """The holding registers 0..REGISTER_COUNT-1 as the PLC exposes them now."""
        image = [0] * REGISTER_COUNT
        good = int(self.good_count)
        high, low = _uint32_words(good)
        image[GOOD_COUNT : GOOD_COUNT + 2] = [high, low]
        image[GOOD_COUNT_LITTLE : GOOD_COUNT_LITTLE + 2] = [low, high]
        image[DEFECTIVE_COUNT : DEFECTIVE_COUNT + 2] = _uint32_words(int(self.defective_count))
        image[MACHINE_STATE] = int(self.state)
        force_words = struct.unpack(">HH", struct.pack(">f", self.force))
        image[PRESS_FORCE : PRESS_FORCE + 2] = force_words
        image[TEMPERATURE] = TEMPERATURE_CELSIUS & 0xFFFF
        return image

    async def refresh(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current_registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """pymodbus calls this before it answers a request; copy the current image in."""
        # The one block starts at address 0, so list index and protocol address coincide.
        current_registers[:REGISTER_COUNT] = self.registers()
        return None


async def serve(
    host: str,
    port: int,
    *,
    rate: float = 10.0,
    scrap_rate: float = 0.0,
    start: int = 0,
    stop_at: int | None = None,
) -> None:
    """Serve the PLC on host:port until cancelled; port 0 picks a free port."""
    press = Press(rate=rate, scrap_rate=scrap_rate, good_count=float(start), stop_at=stop_at)
    device = SimDevice(
        id=0,  # 0 answers every unit id, like most TCP-native PLCs
        simdata=[
            SimData(
                address=0,
                count=REGISTER_COUNT,
                values=0,
                datatype=DataType.REGISTERS,
                readonly=True,
            )
        ],
        action=press.refresh,
    )
    server = ModbusTcpServer(device, address=(host, port))
    # background=True returns once listening; the foreground variant swallows cancellation.
    await server.serve_forever(background=True)
    try:
        sockets = getattr(server.transport, "sockets", None) or ()
        bound_port = sockets[0].getsockname()[1] if sockets else port
        print(f"modbus-plc listening on {host}:{bound_port}", flush=True)
        log.info(
            "Modbus PLC simulator is listening on %s:%d, counting %g good and %g scrap per second.",
            host,
            bound_port,
            rate,
            scrap_rate,
        )
        last = time.monotonic()
        while True:
            await asyncio.sleep(TICK_SECONDS)
            now = time.monotonic()
            press.advance(now - last)
            last = now
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]


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
        )
    except asyncio.CancelledError:
        log.info("Modbus PLC simulator stopped.")


def main(argv: list[str] | None = None) -> int:
    """Run the simulator from the command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m simulators.modbus_plc",
        description="Modbus TCP PLC simulator: a press counting good and scrap parts.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=5020, help="TCP port (0 picks a free one)")
    parser.add_argument("--rate", type=float, default=10.0, help="good units per second")
    parser.add_argument("--scrap-rate", type=float, default=0.0, help="scrap units per second")
    parser.add_argument("--start", type=int, default=0, help="initial good count")
    parser.add_argument("--stop-at", type=int, default=None, help="good count that completes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C before the handler is installed
        asyncio.run(_serve_until_signal(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
