"""Scenario runner: one YAML file starts the plant's simulators and plays a shift on them.

A scenario names the simulators to run in this process (the OPC UA machine server, the Modbus
PLC, an MES publisher per machine, and optionally a mosquitto broker it starts itself) and a
timeline of steps at offsets from the start: orders starting, machines running, holding with a
stop reason, a scrap burst, consumption, lot completion, orders ending. Each step calls the
simulators' in-process control API and prints one line as it happens (`t+60s opcua filler-02
state Held (stop reason 3 Jam)`). `scenario running: <name>` is printed once every simulator
listens (and the MES publishers are connected), so a parent process can wait for that line. At
the end of the timeline it prints each machine's counts and exits 0, or with `--hold` keeps the
simulators up until SIGTERM or Ctrl-C (both a clean exit 0). `--wait` holds the timeline back
until a line (Enter) arrives on stdin, time to start a gateway and let it connect first.

`speed` is a time factor for the whole plant: at speed 10 steps come ten times sooner and the
machines count ten times faster, so the counts match a run at speed 1. Printed offsets are
scenario time. With `repeat: true` the timeline starts again after `duration` (default: the
last step's offset); MES message ids keep counting up, so a second pass is not a duplicate.

The file, in short (`config/scenarios/shift.yaml` is a complete one):

    name: shift
    speed: 1.0
    simulators:
      broker: {port: 1884}                         # optional: a mosquitto of our own
      opcua: {port: 4841, machines: [{name: filler-02, state: Idle, rate: 8}]}
      modbus: {port: 5021, machine: press-01, rate: 0}
      mes: {site: "1010"}                          # broker host/port: the broker's by default
    timeline:
      - at: 0s
        mes.order_start: {machine: filler-02, order_id: "1000123", lot_id: LOT-1,
                          components: [RM-1]}
      - at: 60s
        opcua.state: {machine: filler-02, state: Held, stop_reason: 3, text: Jam}

Every step is `at` plus exactly one action:

| action              | arguments                                                              |
|---------------------|------------------------------------------------------------------------|
| `opcua.state`       | machine, state (PackML name or number), stop_reason, text              |
| `opcua.rate`        | machine, rate, scrap_rate (units per second while in Execute)          |
| `opcua.counts`      | machine, good, scrap (added at once)                                   |
| `opcua.value`       | machine, name (Temperature, Pressure), value (pinned)                  |
| `modbus.state`      | state (Stopped, Idle, Suspended, Execute, Aborted, Held, Complete, auto)|
| `modbus.rate`       | rate, scrap_rate                                                       |
| `modbus.counts`     | good, scrap (the counters are set: a reset)                            |
| `modbus.stop_at`    | good (Complete when the good count reaches it; null: never)            |
| `mes.order_start`   | machine, order_id, operation, material, quantity, uom, lot_id,         |
|                     | components                                                             |
| `mes.order_end`     | machine, order_id, operation                                           |
| `mes.consume`       | machine, order_id, operation, material, lot_id, quantity, uom          |
| `mes.lot_completed` | machine, order_id, material, lot_id, quantity, uom, input_lots         |

A file that does not validate is refused before anything starts, with every problem as
`file:line: field: message`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import typing
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from drivers.common.timing import Duration
from simulators.mes_publisher import InputLot, MesPublisher, Publication
from simulators.modbus_plc import MachineState, ModbusPlc
from simulators.opcua_machine import OpcUaMachineServer, PackMLState

log = logging.getLogger(__name__)

Loc = tuple[str | int, ...]

PUBACK_TIMEOUT = 30.0
"""Seconds a step waits for the broker to acknowledge an MES message."""

BROKER_SETTINGS = {
    # Far above mosquitto's default of 1000, beyond which it silently drops QoS 1 messages
    # queued for a client: a gateway that is away for a while must find them all.
    "max_queued_messages": "100000",
    "max_inflight_messages": "1000",
}

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def _packml_state(value: Any) -> PackMLState:
    if isinstance(value, PackMLState):
        return value
    if not isinstance(value, int | str) or isinstance(value, bool):
        raise ValueError("must be a PackML state name (Execute, Held, ...) or number")
    try:
        return PackMLState.of(value)
    except ValueError:
        names = ", ".join(state.name.title() for state in PackMLState)
        raise ValueError(f"{value!r} is not a PackML state; states: {names}") from None


def _plc_state(value: Any) -> MachineState | None:
    """A state the PLC simulator can be forced into; `auto` (or null) lets it decide."""
    if value is None or isinstance(value, MachineState):
        return value
    names = ", ".join(state.name.title() for state in MachineState)
    try:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return None
        if isinstance(value, str) and not value.strip().isdigit():
            return MachineState[value.strip().upper()]
        if isinstance(value, int | str) and not isinstance(value, bool):
            return MachineState(int(value))
    except (KeyError, ValueError):
        pass
    raise ValueError(f"{value!r} is not a state of the PLC simulator; states: {names}, or auto")


PackMLStateField = Annotated[PackMLState, BeforeValidator(_packml_state)]
PlcStateField = Annotated[MachineState | None, BeforeValidator(_plc_state)]
Rate = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Amount = Annotated[Decimal, Field(ge=0, allow_inf_nan=False)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Model(BaseModel):
    """Base of the scenario models: unknown keys are errors, a typo must not pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- the simulators --------------------------------------------------------------------------


class BrokerSpec(_Model):
    """A mosquitto broker the runner starts and stops itself, with persistence on."""

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: Port = Field(description="TCP port; MES publishers and gateways connect here.")
    directory: Path | None = Field(
        None,
        description="Where mosquitto keeps its config, log and persistence file (sessions and "
        "queued messages survive a restart of the scenario). Default: a temporary directory, "
        "removed at exit.",
    )
    binary: str | None = Field(
        None, description="The mosquitto executable (default: found on PATH or /usr/sbin)."
    )


class OpcUaMachineSpec(_Model):
    """One machine on the OPC UA server, and how it is when the scenario starts."""

    name: str = Field(pattern=NAME, description="Machine name, as node ids and steps name it.")
    state: PackMLStateField = Field(
        PackMLState.EXECUTE, description="PackML state at start; it counts only in Execute."
    )
    rate: Rate = Field(10.0, description="Processed units per second while in Execute.")
    scrap_rate: Rate = Field(0.0, description="Defective units per second while in Execute.")
    processed: int = Field(0, ge=0, description="Processed count at start.")
    defective: int = Field(0, ge=0, description="Defective count at start.")


class OpcUaSpec(_Model):
    """The OPC UA machine server (PackML state numbers, see simulators/opcua_machine.py)."""

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: Port = Field(description="TCP port of opc.tcp://host:port.")
    machines: list[OpcUaMachineSpec] = Field(
        min_length=1, description="Machines, by name (`[filler-02]`) or with their start state."
    )

    @field_validator("machines", mode="before")
    @classmethod
    def _names_are_machines(cls, machines: Any) -> Any:
        if isinstance(machines, list):
            return [{"name": item} if isinstance(item, str) else item for item in machines]
        return machines

    @field_validator("machines")
    @classmethod
    def _unique_names(cls, machines: list[OpcUaMachineSpec]) -> list[OpcUaMachineSpec]:
        names = [machine.name for machine in machines]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"machine names must be unique; repeated: {', '.join(repeated)}")
        return machines


class ModbusSpec(_Model):
    """The Modbus PLC simulator: one press (see simulators/modbus_plc.py for the registers)."""

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: Port = Field(description="TCP port.")
    machine: str = Field(
        "press-01", pattern=NAME, description="What the printed lines call the press."
    )
    rate: Rate = Field(10.0, description="Good units per second (0 and 0: the press is Idle).")
    scrap_rate: Rate = Field(0.0, description="Scrap units per second.")
    start: int = Field(0, ge=0, description="Good count at start.")
    stop_at: int | None = Field(
        None, ge=0, description="Good count at which the press turns Complete and stops."
    )
    state: PlcStateField = Field(
        None, description="A state forced from the start (counters stand still unless Execute)."
    )


class MesSpec(_Model):
    """MES publishers: one per machine the timeline's mes steps name, QoS 1 over MQTT 5."""

    host: str = Field("127.0.0.1", description="MQTT broker address.")
    port: Port | None = Field(
        None, description="MQTT broker port; default: the scenario's broker, else 1883."
    )
    site: str = Field("1010", description="Plant code in the topics and payloads.")
    run: str | None = Field(
        None,
        description="Run name in the message ids (default: the start time). The same run "
        "replays the same ids, which a gateway then ignores as duplicates.",
    )
    quantities: Literal["number", "string"] = Field(
        "number", description="Quantities as JSON numbers (12.500) or strings."
    )


class Simulators(_Model):
    broker: BrokerSpec | None = Field(None, description="A mosquitto of the scenario's own.")
    opcua: OpcUaSpec | None = Field(None, description="The OPC UA machine server.")
    modbus: ModbusSpec | None = Field(None, description="The Modbus PLC.")
    mes: MesSpec | None = Field(None, description="MES publishers.")

    @model_validator(mode="after")
    def _something_to_run(self) -> Simulators:
        if not (self.opcua or self.modbus or self.mes):
            raise ValueError("name at least one of opcua, modbus and mes")
        return self


# --- the actions -----------------------------------------------------------------------------


class OpcUaState(_Model):
    kind: Literal["opcua.state"]
    machine: str = Field(description="Machine on the OPC UA server.")
    state: PackMLStateField = Field(description="PackML state name (Held) or number (11).")
    stop_reason: int = Field(0, ge=0, description="Stop reason code; 0 = none.")
    text: str = Field("", description="Stop reason as text.")

    def describe(self) -> str:
        reason = " ".join(part for part in (str(self.stop_reason or ""), self.text) if part)
        return f"opcua {self.machine} state {self.state.name.title()}" + (
            f" (stop reason {reason})" if reason else ""
        )


class OpcUaRate(_Model):
    kind: Literal["opcua.rate"]
    machine: str = Field(description="Machine on the OPC UA server.")
    rate: Rate = Field(description="Processed units per second while in Execute.")
    scrap_rate: Rate | None = Field(None, description="Defective units per second.")

    def describe(self) -> str:
        scrap = "" if self.scrap_rate is None else f", scrap {self.scrap_rate:g}/s"
        return f"opcua {self.machine} rate {self.rate:g}/s{scrap}"


class OpcUaCounts(_Model):
    kind: Literal["opcua.counts"]
    machine: str = Field(description="Machine on the OPC UA server.")
    good: int = Field(0, ge=0, description="Good units counted at once.")
    scrap: int = Field(0, ge=0, description="Defective units counted at once.")

    def describe(self) -> str:
        return f"opcua {self.machine} counts +{self.good} good, +{self.scrap} scrap"


class OpcUaValue(_Model):
    kind: Literal["opcua.value"]
    machine: str = Field(description="Machine on the OPC UA server.")
    name: Literal["Temperature", "Pressure"] = Field(description="The process value.")
    value: float = Field(allow_inf_nan=False, description="Its value, kept until set again.")

    def describe(self) -> str:
        return f"opcua {self.machine} {self.name} = {self.value:g}"


class ModbusStateAction(_Model):
    kind: Literal["modbus.state"]
    state: PlcStateField = Field(description="State to force, or auto.")

    def describe(self) -> str:
        return "state " + ("automatic" if self.state is None else self.state.name.title())


class ModbusRate(_Model):
    kind: Literal["modbus.rate"]
    rate: Rate = Field(description="Good units per second.")
    scrap_rate: Rate | None = Field(None, description="Scrap units per second.")

    def describe(self) -> str:
        scrap = "" if self.scrap_rate is None else f", scrap {self.scrap_rate:g}/s"
        return f"rate {self.rate:g}/s{scrap}"


class ModbusCounts(_Model):
    kind: Literal["modbus.counts"]
    good: int | None = Field(None, ge=0, description="New good count (a reset).")
    scrap: int | None = Field(None, ge=0, description="New scrap count.")

    def describe(self) -> str:
        parts = [
            f"{name} = {value}"
            for name, value in (("good", self.good), ("scrap", self.scrap))
            if value is not None
        ]
        return "counts " + (", ".join(parts) or "unchanged")


class ModbusStopAt(_Model):
    kind: Literal["modbus.stop_at"]
    good: int | None = Field(description="Good count that completes the press; null: never.")

    def describe(self) -> str:
        return "stop at " + ("never" if self.good is None else f"good count {self.good}")


class InputLotSpec(_Model):
    lot_id: str = Field(description="The input lot.")
    material: str = Field(description="Its material.")
    quantity: Amount = Field(description="How much of it went in.")
    uom: str = Field("KGM", description="UN/ECE Rec 20 unit.")


class MesOrderStart(_Model):
    kind: Literal["mes.order_start"]
    machine: str = Field(pattern=NAME, description="Machine id in the topic.")
    order_id: str = Field(min_length=1, description="Production order.")
    operation: str = Field("0010", pattern=r"^\d{4}$", description="Operation number.")
    material: str = Field("FG-100", description="Material produced.")
    quantity: Amount = Field(Decimal(100), description="Planned quantity.")
    uom: str = Field("H87", description="UN/ECE Rec 20 unit of the quantity.")
    lot_id: str | None = Field(None, description="Lot to be produced.")
    components: list[str] = Field(
        default_factory=list, description="Materials every produced lot must have an input of."
    )

    def describe(self) -> str:
        text = (
            f"mes {self.machine} order_start {self.order_id}/{self.operation} "
            f"{self.material} {self.quantity} {self.uom}"
        )
        if self.lot_id:
            text += f" lot {self.lot_id}"
        if self.components:
            text += f" components {', '.join(self.components)}"
        return text


class MesOrderEnd(_Model):
    kind: Literal["mes.order_end"]
    machine: str = Field(pattern=NAME, description="Machine id in the topic.")
    order_id: str = Field(min_length=1, description="Production order.")
    operation: str = Field("0010", pattern=r"^\d{4}$", description="Operation number.")

    def describe(self) -> str:
        return f"mes {self.machine} order_end {self.order_id}/{self.operation}"


class MesConsume(_Model):
    kind: Literal["mes.consume"]
    machine: str = Field(pattern=NAME, description="Machine id in the topic.")
    order_id: str = Field(min_length=1, description="Production order.")
    operation: str = Field("0010", pattern=r"^\d{4}$", description="Operation number.")
    material: str = Field(description="Material consumed.")
    lot_id: str = Field(description="Lot it was taken from.")
    quantity: Amount = Field(description="Quantity consumed.")
    uom: str = Field("KGM", description="UN/ECE Rec 20 unit.")

    def describe(self) -> str:
        return (
            f"mes {self.machine} consume {self.quantity} {self.uom} {self.material} "
            f"lot {self.lot_id} for {self.order_id}/{self.operation}"
        )


class MesLotCompleted(_Model):
    kind: Literal["mes.lot_completed"]
    machine: str = Field(pattern=NAME, description="Machine id in the topic.")
    order_id: str = Field(min_length=1, description="Production order.")
    material: str = Field(description="Material of the lot.")
    lot_id: str = Field(description="The produced lot.")
    quantity: Amount = Field(description="Quantity of the lot.")
    uom: str = Field("H87", description="UN/ECE Rec 20 unit.")
    input_lots: list[InputLotSpec] = Field(
        default_factory=list, description="Genealogy: the lots that went into it."
    )

    def describe(self) -> str:
        inputs = ", ".join(lot.lot_id for lot in self.input_lots) or "no input lots"
        return (
            f"mes {self.machine} lot_completed {self.lot_id} {self.quantity} {self.uom} "
            f"{self.material} for {self.order_id} from {inputs}"
        )


OpcUaAction = OpcUaState | OpcUaRate | OpcUaCounts | OpcUaValue
ModbusAction = ModbusStateAction | ModbusRate | ModbusCounts | ModbusStopAt
MesAction = MesOrderStart | MesOrderEnd | MesConsume | MesLotCompleted
Action = Annotated[OpcUaAction | ModbusAction | MesAction, Field(discriminator="kind")]

ACTION_MODELS: tuple[type[_Model], ...] = (
    OpcUaState,
    OpcUaRate,
    OpcUaCounts,
    OpcUaValue,
    ModbusStateAction,
    ModbusRate,
    ModbusCounts,
    ModbusStopAt,
    MesOrderStart,
    MesOrderEnd,
    MesConsume,
    MesLotCompleted,
)
ACTIONS: tuple[str, ...] = tuple(
    typing.get_args(model.model_fields["kind"].annotation)[0] for model in ACTION_MODELS
)
"""Every action's name, as steps write it: `opcua.state`, `mes.order_start`, ..."""


class Step(_Model):
    """`at` an offset from the start, one action with its arguments."""

    at: Duration = Field(description="Offset from the start of the timeline (scenario time).")
    action: Action

    @model_validator(mode="before")
    @classmethod
    def _one_action(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError("a step is a mapping such as {at: 60s, opcua.state: {...}}")
        names = [key for key in data if key != "at"]
        if len(names) != 1:
            found = f"found {', '.join(map(repr, names))}" if names else "found none"
            raise ValueError(
                f"a step has `at` and exactly one action ({found}); actions: {', '.join(ACTIONS)}"
            )
        name = names[0]
        if name not in ACTIONS:
            close = difflib.get_close_matches(name, ACTIONS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"actions: {', '.join(ACTIONS)}"
            raise ValueError(f"unknown action {name!r} ({hint})")
        arguments = data[name] if data[name] is not None else {}
        if not isinstance(arguments, dict):
            raise ValueError(f"{name}: the arguments are a mapping such as {{machine: ...}}")
        return {"at": data.get("at"), "action": {**arguments, "kind": name}}


class Scenario(_Model):
    """A scenario file: which simulators, and what happens when."""

    name: str = Field(min_length=1, description="Printed in the ready line.")
    description: str | None = Field(None, description="What the scenario shows.")
    speed: float = Field(1.0, gt=0, allow_inf_nan=False, description="Time factor.")
    repeat: bool = Field(False, description="Play the timeline again and again.")
    duration: Duration | None = Field(
        None,
        description="Length of one pass of the timeline (default: the last step's offset); "
        "with repeat, the next pass starts then.",
    )
    simulators: Simulators
    timeline: list[Step] = Field(min_length=1, description="The steps, in order of `at`.")

    @property
    def length(self) -> float:
        """Seconds of scenario time one pass takes."""
        return self.duration if self.duration is not None else self.timeline[-1].at

    def mes_machines(self) -> list[str]:
        """Every machine an mes step names, in order of first appearance."""
        machines: dict[str, None] = {}
        for step in self.timeline:
            if isinstance(step.action, MesAction):
                machines[step.action.machine] = None
        return list(machines)


# --- loading ---------------------------------------------------------------------------------


class ScenarioError(Exception):
    """A scenario file that cannot be used; `problems` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def _compose(text: str) -> tuple[Any, dict[Loc, int]]:
    """YAML to plain data, with the line of every key and list item."""
    lines: dict[Loc, int] = {}
    scalars = yaml.SafeLoader("")

    def build(node: yaml.Node, loc: Loc) -> Any:
        lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            mapping: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = str(scalars.construct_object(key_node))
                lines[(*loc, key)] = key_node.start_mark.line + 1
                mapping[key] = build(value_node, (*loc, key))
            return mapping
        if isinstance(node, yaml.SequenceNode):
            return [build(item, (*loc, index)) for index, item in enumerate(node.value)]
        return scalars.construct_object(node)

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    return ({} if root is None else build(root, ())), lines


def _field_names() -> list[str]:
    models: list[type[BaseModel]] = [
        Scenario,
        Simulators,
        BrokerSpec,
        OpcUaSpec,
        OpcUaMachineSpec,
        ModbusSpec,
        MesSpec,
        InputLotSpec,
        *ACTION_MODELS,
    ]
    return sorted({name for model in models for name in model.model_fields} - {"kind"})


def _where(loc: Sequence[Any]) -> Loc:
    """A pydantic error location as the file's path: `timeline[3].opcua.state.machine`."""
    clean: list[str | int] = []
    for index, part in enumerate(loc):
        if part == "action" and index >= 2 and loc[index - 2] == "timeline":
            continue  # the step's action sits under its name in the file
        clean.append(part if isinstance(part, int) else str(part))
    return tuple(clean)


def _format_loc(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


def _message(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(error["loc"][-1]), _field_names(), n=1)
        return "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
    if error["type"] == "missing":
        return "is required"
    text = str(error["msg"]).removeprefix("Value error, ")
    return text[:1].lower() + text[1:]


def _cross_check(scenario: Scenario) -> Iterator[tuple[Loc, str]]:
    simulators = scenario.simulators
    opcua_machines = [m.name for m in simulators.opcua.machines] if simulators.opcua else []
    previous = 0.0
    for index, step in enumerate(scenario.timeline):
        action = step.action
        at: Loc = ("timeline", index, action.kind)
        if step.at < previous:
            yield (
                ("timeline", index, "at"),
                (
                    f"{step.at:g}s is before the previous step's {previous:g}s: keep the timeline "
                    "in order"
                ),
            )
        previous = max(previous, step.at)
        if isinstance(action, OpcUaAction):
            if simulators.opcua is None:
                yield at, "needs simulators.opcua"
            elif action.machine not in opcua_machines:
                close = difflib.get_close_matches(action.machine, opcua_machines, n=1)
                hint = (
                    f"did you mean {close[0]!r}?"
                    if close
                    else (f"machines: {', '.join(opcua_machines)}")
                )
                yield (*at, "machine"), f"no OPC UA machine {action.machine!r} ({hint})"
        elif isinstance(action, ModbusAction) and simulators.modbus is None:
            yield at, "needs simulators.modbus"
        elif isinstance(action, MesAction) and simulators.mes is None:
            yield at, "needs simulators.mes"
    if scenario.duration is not None and scenario.duration < previous:
        yield (
            ("duration",),
            (
                f"{scenario.duration:g}s is shorter than the timeline, whose last "
                f"step is at {previous:g}s"
            ),
        )
    if scenario.repeat and scenario.length <= 0:
        yield ("repeat",), "a repeated timeline needs a duration above 0s"


def parse_scenario(text: str, filename: str = "<scenario>") -> Scenario:
    """Validate scenario YAML; raise ScenarioError with every problem, one line each."""
    try:
        data, lines = _compose(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ScenarioError([f"{filename}:{line}: not valid YAML: {exc.problem or exc}"]) from None

    def line_of(loc: Loc) -> int:
        for end in range(len(loc), -1, -1):
            if loc[:end] in lines:
                return lines[loc[:end]]
        return 1

    problems: list[tuple[Loc, str]] = []
    scenario: Scenario | None = None
    if not isinstance(data, dict):
        problems.append(((), "the file must be a mapping (name: ..., simulators: ..., ...)"))
    else:
        try:
            scenario = Scenario.model_validate(data)
        except ValidationError as exc:
            problems += [(_where(error["loc"]), _message(error)) for error in exc.errors()]
    if scenario is not None:
        problems += _cross_check(scenario)
    if problems:
        found = sorted({(line_of(loc), _format_loc(loc), text) for loc, text in problems})
        raise ScenarioError([f"{filename}:{line}: {where}: {text}" for line, where, text in found])
    assert scenario is not None
    return scenario


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; raise ScenarioError naming file, line and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError([f"{path}: cannot read the scenario: {exc.strerror}"]) from None
    return parse_scenario(text, str(path))


# --- running ---------------------------------------------------------------------------------


class StartError(Exception):
    """A simulator that could not start (a port in use, no broker); the message says which."""


class StepError(Exception):
    """A step the simulators could not carry out (an MES message the broker never took)."""


class Broker:
    """mosquitto as a child process, with persistence in `directory` (as the tests run it)."""

    def __init__(self, spec: BrokerSpec, directory: Path) -> None:
        self.spec = spec
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "mosquitto.log"

    def start(self, timeout: float = 10.0) -> None:
        """Write the config, start mosquitto and return once it accepts connections."""
        binary = self.spec.binary or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.access(binary, os.X_OK):
            raise StartError(f"broker: {binary} is not there (apt-get install mosquitto)")
        self.directory.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.spec.port} {self.spec.host}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.directory.resolve()}/",
            *(f"{key} {value}" for key, value in BROKER_SETTINGS.items()),
        ]
        if os.geteuid() == 0:
            # As root mosquitto switches to its own user, which cannot write here.
            lines.append("user root")
        config = self.directory / "mosquitto.conf"
        config.write_text("\n".join(lines) + "\n")
        with self.log_path.open("ab") as output:
            self.process = subprocess.Popen(
                [binary, "-c", str(config)], stdout=output, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((self.spec.host, self.spec.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                    raise StartError(
                        f"broker: mosquitto did not start on "
                        f"{self.spec.host}:{self.spec.port}: "
                        f"{' / '.join(tail) or 'no output'}"
                    ) from None
                time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, which makes mosquitto save its sessions; killed if it takes too long."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class ScenarioMesPublisher(MesPublisher):
    """The MES publisher, with order starts that name the lot and the components.

    `MesPublisher.order_start` does not publish `lot_id` and `components`; a gateway maps both
    to bind the lot and check genealogy. Both are always in the payload (null and [] when not
    given), so that one field mapping fits every order start.
    """

    def order_start_with_lot(self, step: MesOrderStart) -> Publication:
        return self._event(
            "order/start",
            None,
            order_id=step.order_id,
            operation=step.operation,
            material=step.material,
            quantity=self._quantity(step.quantity),
            uom=step.uom,
            lot_id=step.lot_id,
            components=list(step.components),
        )


class Plant:
    """The simulators a scenario runs, and the one place where steps act on them.

    Call order: `start()` (each simulator listens, the publishers connect), then `perform()`
    per step, then `stop()`, which is safe after a failed or partial start.
    """

    def __init__(self, scenario: Scenario, speed: float) -> None:
        self.scenario = scenario
        self.speed = speed
        self.broker: Broker | None = None
        self.opcua: OpcUaMachineServer | None = None
        self.plc: ModbusPlc | None = None
        self.publishers: dict[str, ScenarioMesPublisher] = {}
        self._temp_dir: tempfile.TemporaryDirectory[str] | None = None

    async def start(self) -> None:
        simulators = self.scenario.simulators
        if simulators.broker is not None:
            directory = simulators.broker.directory
            if directory is None:
                self._temp_dir = tempfile.TemporaryDirectory(prefix="plantsync-broker-")
                directory = Path(self._temp_dir.name)
            self.broker = Broker(simulators.broker, directory)
            await asyncio.to_thread(self.broker.start)
            print(
                f"mosquitto listening on {simulators.broker.host}:{simulators.broker.port}",
                flush=True,
            )
        if simulators.opcua is not None:
            await self._start_opcua(simulators.opcua)
        if simulators.modbus is not None:
            await self._start_modbus(simulators.modbus)
        if simulators.mes is not None:
            await self._connect_mes(simulators.mes)

    async def _start_opcua(self, spec: OpcUaSpec) -> None:
        server = OpcUaMachineServer(
            spec.host, spec.port, machines=[machine.name for machine in spec.machines]
        )
        for machine_spec in spec.machines:
            # Set before start, so the very first values served are the scenario's.
            machine = server.machine(machine_spec.name)
            machine.state = machine_spec.state
            machine.rate = machine_spec.rate * self.speed
            machine.scrap_rate = machine_spec.scrap_rate * self.speed
            machine.processed = float(machine_spec.processed)
            machine.defective = float(machine_spec.defective)
        self.opcua = server
        try:
            await server.start()
        except OSError as exc:
            raise StartError(
                f"opcua: cannot listen on {spec.host}:{spec.port}: {exc.strerror or exc}"
            ) from None
        names = ", ".join(machine.name for machine in spec.machines)
        print(f"opcua-machine listening on {server.endpoint} ({names})", flush=True)

    async def _start_modbus(self, spec: ModbusSpec) -> None:
        plc = ModbusPlc(
            spec.host,
            spec.port,
            rate=spec.rate * self.speed,
            scrap_rate=spec.scrap_rate * self.speed,
            start=spec.start,
            stop_at=spec.stop_at,
        )
        try:
            await plc.start()
        except (OSError, RuntimeError) as exc:  # pymodbus says RuntimeError and logs the cause
            reason = _bind_problem(spec.host, spec.port) or str(exc)
            raise StartError(
                f"modbus: cannot listen on {spec.host}:{spec.port}: {reason}"
            ) from None
        self.plc = plc
        if spec.state is not None:
            plc.set_state(spec.state)
        print(f"modbus-plc listening on {spec.host}:{plc.port} ({spec.machine})", flush=True)

    async def _connect_mes(self, spec: MesSpec) -> None:
        broker = self.scenario.simulators.broker
        port = spec.port or (broker.port if broker is not None else 1883)
        run = spec.run or datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        for machine in self.scenario.mes_machines():
            publisher = ScenarioMesPublisher(
                spec.host,
                port,
                site=spec.site,
                machine=machine,
                run=run,
                quantities=spec.quantities,
            )
            self.publishers[machine] = publisher
            try:
                await asyncio.to_thread(publisher.connect, 15.0)
            except ConnectionError as exc:
                raise StartError(f"mes: {exc}") from None
            except asyncio.CancelledError:
                publisher.interrupt()  # the connecting thread gives up at once
                raise
        if self.publishers:
            print(
                f"mes-publisher connected to {spec.host}:{port} ({', '.join(self.publishers)})",
                flush=True,
            )

    async def stop(self) -> None:
        """Stop everything that started, the broker last (publishers flush into it first)."""
        for publisher in self.publishers.values():
            publisher.interrupt()
            await asyncio.to_thread(publisher.close, 5.0)
        self.publishers.clear()
        if self.plc is not None:
            await self.plc.stop()
            self.plc = None
        if self.opcua is not None:
            await self.opcua.stop()
            self.opcua = None
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)
            self.broker = None
        if self._temp_dir is not None:
            self._temp_dir.cleanup()
            self._temp_dir = None

    async def perform(self, action: OpcUaAction | ModbusAction | MesAction) -> str:
        """Carry out one step; return its line (without the time)."""
        match action:
            case OpcUaState():
                server = self._opcua()
                if action.stop_reason or action.text:
                    # A machine names its stop reason as it stops, never after: the reason
                    # goes out first, so a subscriber has it when the new state arrives.
                    current = server.machine(action.machine).state
                    await server.set_state(action.machine, current, action.stop_reason, action.text)
                await server.set_state(
                    action.machine, action.state, action.stop_reason, action.text
                )
            case OpcUaRate():
                scrap = None if action.scrap_rate is None else action.scrap_rate * self.speed
                await self._opcua().set_rate(action.machine, action.rate * self.speed, scrap)
            case OpcUaCounts():
                await self._opcua().add_counts(action.machine, action.good, action.scrap)
            case OpcUaValue():
                await self._opcua().set_value(action.machine, action.name, action.value)
            case ModbusStateAction():
                self._plc().set_state(action.state)
            case ModbusRate():
                scrap = None if action.scrap_rate is None else action.scrap_rate * self.speed
                self._plc().set_rate(action.rate * self.speed, scrap)
            case ModbusCounts():
                self._plc().set_counts(action.good, action.scrap)
            case ModbusStopAt():
                self._plc().set_stop_at(action.good)
            case MesOrderStart():
                await self._acknowledged(
                    self.publishers[action.machine].order_start_with_lot(action)
                )
            case MesOrderEnd():
                await self._acknowledged(
                    self.publishers[action.machine].order_end(
                        action.order_id, operation=action.operation
                    )
                )
            case MesConsume():
                await self._acknowledged(
                    self.publishers[action.machine].consume(
                        action.order_id,
                        action.material,
                        action.lot_id,
                        action.quantity,
                        uom=action.uom,
                        operation=action.operation,
                    )
                )
            case MesLotCompleted():
                lots = [
                    InputLot(lot.lot_id, lot.material, lot.quantity, lot.uom)
                    for lot in action.input_lots
                ]
                await self._acknowledged(
                    self.publishers[action.machine].lot_completed(
                        action.order_id,
                        action.material,
                        action.lot_id,
                        action.quantity,
                        uom=action.uom,
                        input_lots=lots,
                    )
                )
        if isinstance(action, ModbusAction):
            return f"modbus {self._modbus_name()} {action.describe()}"
        return action.describe()

    def counts(self) -> list[str]:
        """Each machine's state and counters, one line each."""
        lines = []
        if self.opcua is not None:
            for machine in self.opcua.machines.values():
                lines.append(
                    f"opcua {machine.name} state {machine.state.name.title()}, "
                    f"processed {machine.processed_count}, "
                    f"defective {machine.defective_count}"
                )
        if self.plc is not None:
            self.plc.set_counts()  # with no values: only brings the counters up to date
            press = self.plc.press
            lines.append(
                f"modbus {self._modbus_name()} state {press.state.name.title()}, "
                f"good {int(press.good_count)}, scrap {int(press.defective_count)}"
            )
        return lines

    async def _acknowledged(self, publication: Publication) -> None:
        async with asyncio.timeout(PUBACK_TIMEOUT):
            await publication

    def _opcua(self) -> OpcUaMachineServer:
        assert self.opcua is not None  # the scenario's cross-check makes sure
        return self.opcua

    def _plc(self) -> ModbusPlc:
        assert self.plc is not None  # the scenario's cross-check makes sure
        return self.plc

    def _modbus_name(self) -> str:
        spec = self.scenario.simulators.modbus
        return spec.machine if spec is not None else "plc"


def _bind_problem(host: str, port: int) -> str | None:
    """Why listening on host:port fails (address in use...), or None if it would work now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _offset(seconds: float) -> str:
    return f"t+{seconds:g}s"


async def _enter_pressed() -> None:
    """Return once a line (or the end of input) arrives on stdin."""
    loop = asyncio.get_running_loop()
    pressed = asyncio.Event()

    def read() -> None:
        sys.stdin.readline()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(pressed.set)

    # A daemon thread, not the default executor: asyncio.run would wait for it at exit.
    threading.Thread(target=read, name="scenario-wait-for-enter", daemon=True).start()
    await pressed.wait()


async def play(scenario: Scenario, plant: Plant, speed: float) -> None:
    """Play the timeline (over and over with `repeat`), each step at its offset / speed."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    passes = 0
    while True:
        passes += 1
        if passes > 1:
            print(f"pass {passes} of {scenario.name}", flush=True)
        for step in scenario.timeline:
            await asyncio.sleep(max(0.0, started + step.at / speed - loop.time()))
            try:
                line = await plant.perform(step.action)
            except Exception as exc:
                raise StepError(
                    f"{_offset(step.at)} {step.action.kind} failed: {exc or type(exc).__name__}"
                ) from exc
            print(f"{_offset(step.at)} {line}", flush=True)
        started += scenario.length / speed
        await asyncio.sleep(max(0.0, started - loop.time()))
        if not scenario.repeat:
            return


async def run(scenario: Scenario, *, speed: float, hold: bool, wait: bool) -> int:
    """Start the simulators, play the timeline, stop; 0 at the end, 1 when something failed."""
    plant = Plant(scenario, speed)
    try:
        await plant.start()
        steps = len(scenario.timeline)
        print(
            f"scenario running: {scenario.name} ({steps} steps over "
            f"{scenario.length:g}s at speed {speed:g})",
            flush=True,
        )
        if wait:
            print("press Enter to start the timeline", flush=True)
            await _enter_pressed()
        await play(scenario, plant, speed)
        print(f"scenario finished: {scenario.name}", flush=True)
        for line in plant.counts():
            print(f"end: {line}", flush=True)
        if hold:
            print("holding the simulators until Ctrl-C", flush=True)
            await asyncio.Event().wait()
        return 0
    except (StartError, StepError) as exc:
        print(f"scenario {scenario.name}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        await plant.stop()


async def _run_until_signal(scenario: Scenario, args: argparse.Namespace, speed: float) -> int:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    try:
        return await run(scenario, speed=speed, hold=args.hold, wait=args.wait)
    except asyncio.CancelledError:
        print(f"scenario stopped: {scenario.name}", flush=True)
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run a scenario from the command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="plantsync sim scenario",
        description="Start the OPC UA machine, the Modbus PLC and the MES publisher (and a "
        "broker) from one scenario file and play its timeline on them.",
    )
    parser.add_argument("scenario", type=Path, help="scenario YAML (config/scenarios/...)")
    parser.add_argument(
        "--speed", type=float, default=None, help="time factor (default: the file's speed)"
    )
    parser.add_argument(
        "--hold",
        action="store_true",
        help="keep the simulators up after the timeline, until Ctrl-C",
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="start the timeline only when Enter is pressed (a line on stdin)",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.speed is not None and not 0 < args.speed < float("inf"):
        parser.error("--speed must be above 0")
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        count = len(exc.problems)
        print(f"{args.scenario}: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
        return 1
    speed = args.speed if args.speed is not None else scenario.speed
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    # asyncua logs a dropped client as an error; the simulators' own lines say what matters.
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C before the handler is installed
        return asyncio.run(_run_until_signal(scenario, args, speed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
