"""Record live input and replay it through the rules offline.

`plantsync record` runs the configured drivers and writes every reading as one JSON line;
`plantsync replay` feeds such a file through the same pipeline and rules as the daemon, on a
scratch outbox, and prints each event (and each rejected input) as one JSON line, so a
technician can test a config change against yesterday's shift. The golden cases in
`tests/cases/` are written in the same format.

One line per reading, time `t` in Unix seconds:

    {"t": 1796032800.0, "signal": "press-01.good", "value": 120, "quality": "good"}
    {"t": 1796032801.5, "mes": {"kind": "order.started", "message_id": "m-1",
                                "fields": {"machine_id": "press-01", "order_id": "1000123"}}}
    {"t": 1796032900.0, "tick": true}
    {"restart": true}
    {"crash": true, "t": ..., "signal": ..., "value": ...}

`tick` lets time pass with no reading; `restart` stops the pipeline as the daemon does (the rules
commit their last readings) and rebuilds it from what was committed; `crash` processes its
reading and then dies before the commit, as a power cut would. Lines starting with `#` are
comments (the golden cases explain themselves with them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from buffer.outbox import Outbox, RejectedInput
from drivers.base import (
    NONFINITE_NAMES,
    DeviceRestarted,
    MesMessage,
    Quality,
    Reading,
    RejectedMessage,
    Sample,
    finite_json,
    json_value,
)
from drivers.mqtt import MqttConfig
from edge.config.models import DriverConfig, PlantConfig
from edge.model.envelope import CloudEvent
from edge.model.ids import OFFLINE_EPOCH
from edge.runtime.pipeline import Pipeline
from edge.runtime.registry import create_driver

log = logging.getLogger(__name__)


class _Crash(Exception):
    """The simulated power cut of a `crash` line."""


class _CrashingOutbox:
    """Stands in for the outbox for one commit that never reaches the disk."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox

    async def commit(self, *args: Any, **kwargs: Any) -> Any:
        raise _Crash


def parse_line(entry: dict[str, Any]) -> Reading | None:
    """A reading from one line, or None for a directive line."""
    at = float(entry.get("t", 0.0))
    if "signal" in entry:
        driver, tag = str(entry["signal"]).split(".", 1)
        value = entry.get("value")
        if value is None and entry.get("nonfinite") in NONFINITE_NAMES:
            value = NONFINITE_NAMES[entry["nonfinite"]]
        return Sample(driver, tag, value, at, Quality(entry.get("quality", "good")))
    if "mes" in entry:
        mes = entry["mes"]
        return MesMessage(
            mes.get("driver", "mes"),
            mes.get("topic", ""),
            mes["kind"],
            mes.get("fields", {}),
            str(mes["message_id"]),
            at,
        )
    if "device_restart" in entry:
        restart = entry["device_restart"]
        return DeviceRestarted(str(restart["driver"]), at, str(restart.get("reason", "")))
    if "rejected" in entry:
        rejected = entry["rejected"]
        return RejectedMessage(
            rejected.get("driver", "mes"),
            rejected.get("topic", ""),
            str(rejected.get("payload", "")).encode(),
            rejected["reason"],
            at,
        )
    return None


def reading_line(reading: Reading) -> dict[str, Any]:
    match reading:
        case Sample():
            # JSON has no NaN or infinity: null, with the name of what the device sent.
            value, nonfinite = json_value(reading.value)
            line = {
                "t": reading.source_time,
                "signal": reading.signal,
                "value": value,
                "quality": str(reading.quality),
            }
            if nonfinite is not None:
                line["nonfinite"] = nonfinite
            return line
        case MesMessage():
            return {
                "t": reading.received_at,
                "mes": {
                    "driver": reading.driver,
                    "topic": reading.topic,
                    "kind": reading.kind,
                    "message_id": reading.message_id,
                    "fields": reading.fields,
                },
            }
        case DeviceRestarted():
            return {
                "t": reading.source_time,
                "device_restart": {"driver": reading.driver, "reason": reading.reason},
            }
        case RejectedMessage():
            return {
                "t": reading.received_at,
                "rejected": {
                    "driver": reading.driver,
                    "topic": reading.topic,
                    "reason": reading.reason,
                    "payload": reading.payload.decode(errors="replace"),
                },
            }


async def replay(
    config: PlantConfig, lines: Iterable[dict[str, Any]], scratch: Path
) -> list[dict[str, Any]]:
    """Run input lines through the rules; return what was committed, in commit order: each
    event's CloudEvent JSON, and `{"rejected": ...}` for each rejected input."""
    output: list[dict[str, Any]] = []

    def observe(events: Sequence[CloudEvent], rejected: Sequence[RejectedInput]) -> None:
        output.extend(json.loads(event.to_json()) for event in events)
        output.extend(
            {"rejected": {"source": r.source, "topic": r.topic, "reason": r.reason}}
            for r in rejected
        )

    async with Outbox.open(scratch / "replay-outbox.db") as outbox:
        # A fixed epoch: the same input gives the same ids on every replay (a scratch outbox
        # would otherwise give new ones each time).
        pipeline = Pipeline(config, outbox, await outbox.load_state(), observe, epoch=OFFLINE_EPOCH)
        for entry in lines:
            if entry.get("restart") or entry.get("crash"):
                if entry.get("crash") and (reading := parse_line(entry)) is not None:
                    pipeline.outbox = _CrashingOutbox(outbox)  # type: ignore[assignment]
                    with contextlib.suppress(_Crash):
                        await pipeline.on_readings([reading])
                elif entry.get("restart"):
                    await pipeline.flush()
                pipeline = Pipeline(
                    config, outbox, await outbox.load_state(), observe, epoch=OFFLINE_EPOCH
                )
                continue
            reading = parse_line(entry)
            if reading is not None:
                await pipeline.on_readings([reading])
            elif entry.get("tick"):
                await pipeline.tick(float(entry["t"]))
    return output


def read_lines(source: IO[str]) -> list[dict[str, Any]]:
    lines = []
    for number, text in enumerate(source, 1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number}: not JSON: {exc.msg}") from None
        if not isinstance(entry, dict):
            raise ValueError(f"line {number}: must be a JSON object")
        lines.append(entry)
    return lines


def run_replay(config: PlantConfig, input_path: Path) -> int:
    try:
        with input_path.open() as source:
            lines = read_lines(source)
    except (OSError, ValueError) as exc:
        print(f"{input_path}: {exc}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="plantsync-replay-") as scratch:
        output = asyncio.run(replay(config, lines, Path(scratch)))
    try:
        for entry in output:
            print(json.dumps(entry, sort_keys=True, separators=(",", ":")))
    except BrokenPipeError:  # piped into head: fine
        sys.stderr.close()
    return 0


async def _record(config: PlantConfig, out: IO[str], duration: float | None) -> None:
    drivers = [create_driver(_for_recording(d), config.data_dir) for d in config.drivers]
    written = 0

    async def write(readings: Sequence[Reading]) -> None:
        nonlocal written
        for reading in readings:
            out.write(
                json.dumps(finite_json(reading_line(reading)), default=str, allow_nan=False) + "\n"
            )
        out.flush()
        written += len(readings)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    started = time.monotonic()
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(d.run(write), name=f"record-{d.name}") for d in drivers]
        waiting = group.create_task(stop.wait(), name="record-until-stopped")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiting), duration)
        for task in [*tasks, waiting]:
            task.cancel()
    print(f"Recorded {written} reading(s) in {time.monotonic() - started:.0f}s", file=sys.stderr)


def _for_recording(driver: DriverConfig) -> DriverConfig:
    """A driver config that does not disturb the running gateway: an MQTT recorder gets its
    own client id and a session that does not persist (no stolen or piled-up messages)."""
    match driver:
        case MqttConfig():
            return driver.model_copy(
                update={"client_id": f"{driver.client_id}-record", "persistent_session": False}
            )
    return driver


def run_record(config: PlantConfig, out_path: Path, duration: float | None) -> int:
    with out_path.open("a") as out:
        asyncio.run(_record(config, out, duration))
    return 0
