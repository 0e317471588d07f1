"""The scenario runner: one scenario file drives the OPC UA machine, the Modbus PLC and the MES
publisher (on a mosquitto of its own), and the real gateway turns what they do into the
milestones the ERP simulator receives. The shipped shift (config/scenarios/shift.yaml, at speed
10) runs against the shipped gateway config (shift-gateway.yaml), both moved to free ports.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from edge.config.loader import load_config
from simulators.scenario import Scenario, load_scenario, main
from tests.conftest import ROOT, ErpSim, Peer, free_port, free_ports, missing_peer, start_erp
from tests.gateway_process import start_gateway
from tests.processes import spawn

SCENARIOS = ROOT / "config" / "scenarios"


def wait_for(
    condition: Callable[[], object],
    timeout: float,
    what: str,
    output: Callable[[], str] = lambda: "",
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{output()}")
        time.sleep(0.2)


# --- the shipped files -----------------------------------------------------------------------


def test_the_shift_and_its_gateway_config_fit_together() -> None:
    scenario = load_scenario(SCENARIOS / "shift.yaml")
    plant = load_config(SCENARIOS / "shift-gateway.yaml")
    simulators = scenario.simulators
    assert simulators.opcua and simulators.modbus and simulators.mes and simulators.broker
    drivers = {driver.type: driver for driver in plant.drivers}
    assert drivers["opcua"].endpoint.endswith(f":{simulators.opcua.port}")  # type: ignore[union-attr]
    assert drivers["modbus"].port == simulators.modbus.port  # type: ignore[union-attr]
    assert drivers["mqtt"].port == simulators.broker.port  # type: ignore[union-attr]
    machines = {machine.id for machine in plant.machines}
    assert {m.name for m in simulators.opcua.machines} | {simulators.modbus.machine} == machines
    assert set(scenario.mes_machines()) == machines
    kinds = {step.action.kind for step in scenario.timeline}
    assert {
        "mes.order_start",
        "opcua.state",
        "opcua.rate",
        "modbus.state",
        "mes.consume",
        "mes.lot_completed",
        "mes.order_end",
    } <= kinds
    assert 150 <= scenario.length <= 240  # one shift in about three minutes at speed 1


def problems_of(path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    path.write_text(text)
    assert main([str(path)]) == 1
    problems = capsys.readouterr().err.splitlines()
    assert all(problem.startswith(f"{path}:") for problem in problems), problems
    return [problem.removeprefix(str(path)) for problem in problems]


def test_problems_are_reported_with_file_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.yaml"
    problems = problems_of(
        path,
        """\
name: broken
simulators:
  opcua: {port: 4841, machines: [filler-02]}
  modbus: {port: 5021, scrap_rat: 1}
timeline:
  - at: 10s
    opcua.state: {machine: filler-02, state: Hold}
  - at: 20s
    opcua.stat: {machine: filler-02}
  - at: 30s
    mes.order_end: {machine: filler-02}
  - {at: 40s}
""",
        capsys,
    )
    assert problems[:3] == [
        ":4: simulators.modbus.scrap_rat: unknown key (did you mean 'scrap_rate'?)",
        ":7: timeline[0].opcua.state.state: 'Hold' is not a PackML state; states: Clearing, "
        "Stopped, Starting, Idle, Suspended, Execute, Stopping, Aborting, Aborted, Holding, "
        "Held, Unholding, Suspending, Unsuspending, Resetting, Completing, Complete",
        ":8: timeline[1]: unknown action 'opcua.stat' (did you mean 'opcua.state'?)",
    ]
    assert problems[3] == ":11: timeline[2].mes.order_end.order_id: is required"
    assert problems[4].startswith(":12: timeline[3]: a step has `at` and exactly one action")
    assert problems[5] == ": 5 problems"

    # Once every step is well formed: what the steps refer to, and their order.
    problems = problems_of(
        path,
        """\
name: broken
simulators:
  opcua: {port: 4841, machines: [filler-02]}
timeline:
  - at: 10s
    opcua.state: {machine: filler-03, state: Held}
  - at: 5s
    modbus.rate: {rate: 3}
  - at: 30s
    mes.order_end: {machine: filler-02, order_id: "1"}
""",
        capsys,
    )
    assert problems == [
        ":6: timeline[0].opcua.state.machine: no OPC UA machine 'filler-03' (did you mean "
        "'filler-02'?)",
        ":7: timeline[1].at: 5s is before the previous step's 10s: keep the timeline in order",
        ":8: timeline[1].modbus.rate: needs simulators.modbus",
        ":10: timeline[2].mes.order_end: needs simulators.mes",
        ": 4 problems",
    ]


@pytest.mark.integration
def test_a_timeline_without_hold_plays_to_the_end_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "short.yaml"
    path.write_text(f"""\
name: short
speed: 4
simulators:
  opcua: {{port: {free_port()}, machines: [{{name: filler-02, state: Idle, rate: 5}}]}}
  modbus: {{port: {free_port()}, rate: 0}}
timeline:
  - at: 0s
    opcua.state: {{machine: filler-02, state: Execute}}
  - at: 0s
    modbus.rate: {{rate: 5, scrap_rate: 1}}
  - at: 2s
    opcua.state: {{machine: filler-02, state: Held, stop_reason: 3, text: Jam}}
  - at: 2s
    modbus.state: {{state: Held}}
  - at: 2s
    opcua.counts: {{machine: filler-02, good: 7, scrap: 2}}
""")
    assert main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("scenario running: short")
    assert "t+2s opcua filler-02 state Held (stop reason 3 Jam)" in lines
    assert "t+2s modbus press-01 state Held" in lines
    assert lines[-3] == "scenario finished: short"
    # Counted while in Execute (about ten), plus the 7 + 2 counted at once; no scrap rate.
    processed, defective = map(int, re.findall(r"processed (\d+), defective (\d+)", lines[-2])[0])
    assert lines[-2].startswith("end: opcua filler-02 state Held")
    assert processed > 9 and defective == 2
    assert lines[-1].startswith("end: modbus press-01 state Held")


# --- the whole chain ---------------------------------------------------------------------------


class ScenarioProcess:
    """`python -m simulators.scenario FILE --hold --wait`, its stdin kept for the go signal."""

    def __init__(self, scenario: Path, log_path: Path, *args: str) -> None:
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.process = spawn(
                [sys.executable, "-m", "simulators.scenario", str(scenario), *args],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_line(self, text: str, timeout: float) -> None:
        def seen() -> bool:
            assert self.process.poll() is None or text in self.output(), self.output()
            return text in self.output()

        wait_for(seen, timeout, repr(text), self.output)

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"\n")
        self.process.stdin.flush()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@pytest.fixture
def scenario_processes() -> Iterator[list[ScenarioProcess]]:
    started: list[ScenarioProcess] = []
    yield started
    for process in started:
        process.stop()


def shift_on_free_ports(tmp_path: Path, erp: ErpSim) -> tuple[Path, Path, int]:
    """The shipped scenario and gateway config, moved to free ports and into tmp_path."""
    opcua_port, modbus_port, broker_port, api_port = free_ports(4)
    scenario: dict[str, Any] = yaml.safe_load((SCENARIOS / "shift.yaml").read_text())
    simulators = scenario["simulators"]
    simulators["broker"] = {"port": broker_port, "directory": str(tmp_path / "broker")}
    simulators["opcua"]["port"] = opcua_port
    simulators["modbus"]["port"] = modbus_port
    gateway: dict[str, Any] = yaml.safe_load((SCENARIOS / "shift-gateway.yaml").read_text())
    gateway["data_dir"] = str(tmp_path / "gateway")
    gateway["api"]["listen"] = f"127.0.0.1:{api_port}"
    for driver in gateway["drivers"]:
        match driver["type"]:
            case "opcua":
                driver["endpoint"] = f"opc.tcp://127.0.0.1:{opcua_port}"
            case "modbus":
                driver["port"] = modbus_port
            case "mqtt":
                driver["port"] = broker_port
    gateway["destinations"]["erp"]["base_url"] = erp.url
    gateway["destinations"]["erp"]["retry"] = {"base": "100ms", "cap": "1s"}
    scenario_path, gateway_path = tmp_path / "shift.yaml", tmp_path / "shift-gateway.yaml"
    scenario_path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    gateway_path.write_text(yaml.safe_dump(gateway, sort_keys=False))
    return scenario_path, gateway_path, api_port


def events_of(erp: ErpSim, event_type: str, subject: str | None = None) -> list[dict[str, Any]]:
    return [
        entry["event"]
        for entry in erp.events()  # type: ignore[misc]
        if entry["type"] == event_type and (subject is None or entry["event"]["subject"] == subject)
    ]  # type: ignore[index]


def quantity(event: dict[str, Any], field: str) -> Decimal:
    return Decimal(event["data"][field]["value"])


@pytest.mark.integration
def test_one_scenario_file_drives_the_whole_chain_to_erp(
    peers: list[Peer], scenario_processes: list[ScenarioProcess], tmp_path: Path
) -> None:
    if shutil.which("mosquitto") is None and not os.access("/usr/sbin/mosquitto", os.X_OK):
        missing_peer("mosquitto is not installed (apt-get install mosquitto)")
    erp = start_erp(peers, tmp_path)
    scenario_path, gateway_path, api_port = shift_on_free_ports(tmp_path, erp)
    shift: Scenario = load_scenario(scenario_path)
    load_config(gateway_path)  # valid as moved

    runner = ScenarioProcess(
        scenario_path, tmp_path / "scenario.log", "--speed", "10", "--hold", "--wait"
    )
    scenario_processes.append(runner)
    runner.wait_for_line("scenario running: shift", 30)
    gateway = start_gateway(peers, gateway_path, tmp_path, log_format="text")

    def all_connected() -> bool:
        try:  # the local API starts listening a moment after the ready line
            status = httpx.get(f"http://127.0.0.1:{api_port}/status", timeout=5).json()
        except httpx.HTTPError:
            return False
        return all(driver["connected"] for driver in status["drivers"])

    # The MQTT session must exist before MES publishes, and the counters' baseline must be
    # read before the machines run: the timeline starts once the gateway is connected.
    wait_for(all_connected, 30, "the gateway's drivers to connect", gateway.output)
    runner.go()
    runner.wait_for_line("scenario finished: shift", 60)
    output = runner.output()
    assert "t+60s opcua filler-02 state Held (stop reason 3 Jam)" in output
    filler = re.search(
        r"end: opcua filler-02 state Complete, processed (\d+), defective (\d+)", output
    )
    press = re.search(r"end: modbus press-01 state Complete, good (\d+), scrap (\d+)", output)
    assert filler and press, output
    # The simulators' own counts are the oracle. The filler's ProdProcessedCount counts good
    # and defective units (wired as `processed`): its yield is processed - defective and its
    # counter ranges cover processed. The press counts good and scrap apart.
    processed, defective = map(int, filler.groups())
    good_count, scrap_count = map(int, press.groups())
    counts = {
        "1000123/0010": (processed - defective, defective, processed),
        "1000124/0010": (good_count, scrap_count, good_count),
    }

    def delivered() -> bool:
        return (
            len(events_of(erp, "operation.completed")) == 2
            and len(events_of(erp, "lot.produced")) == 2
            and len(events_of(erp, "material.consumed")) == 3
        )

    wait_for(delivered, 30, "ERP to receive the shift", gateway.output)

    for subject, (good, scrap, counted) in counts.items():
        started = events_of(erp, "operation.started", subject)
        assert len(started) == 1, subject
        confirmations = events_of(erp, "production.confirmation", subject)
        # Every unit counted during the order, once: the counter ranges tile 0..counted.
        ranges = sorted((e["data"]["counter_from"], e["data"]["counter_to"]) for e in confirmations)
        assert ranges[0][0] == 0 and ranges[-1][1] == counted, ranges
        assert all(low == high for (_, high), (low, _) in itertools.pairwise(ranges))
        assert sum(quantity(e, "yield_quantity") for e in confirmations) == good
        assert sum(quantity(e, "scrap_quantity") for e in confirmations) == scrap
        assert [e["data"]["is_final"] for e in confirmations].count(True) == 1
        completed = events_of(erp, "operation.completed", subject)
        assert len(completed) == 1
        assert quantity(completed[0], "yield_quantity") == good
        assert quantity(completed[0], "scrap_quantity") == scrap
        interrupted = events_of(erp, "operation.interrupted", subject)
        assert [e["data"]["machine_state"] for e in interrupted] == ["Held"]

    jam = events_of(erp, "operation.interrupted", "1000123/0010")[0]["data"]
    assert (jam["reason_code"], jam["reason_text"]) == ("3", "Jam")
    consumed = {
        (
            e["data"]["order_id"],
            e["data"]["material"],
            e["data"]["lot_id"],
            e["data"]["quantity"]["value"],
            e["data"]["quantity"]["uom"],
        )
        for e in events_of(erp, "material.consumed")
    }
    assert consumed == {
        ("1000123", "RM-SYRUP", "RM-SYRUP-0042", "180.500", "LTR"),
        ("1000123", "RM-BOTTLE", "RM-BOTTLE-0815", "520", "H87"),
        ("1000124", "RM-STEEL", "RM-STEEL-0007", "310.250", "KGM"),
    }
    lots = {e["data"]["lot_id"]: e["data"] for e in events_of(erp, "lot.produced")}
    assert [lot["lot_id"] for lot in lots["LOT-FG-0001"]["input_lots"]] == [
        "RM-SYRUP-0042",
        "RM-BOTTLE-0815",
    ]
    assert [lot["lot_id"] for lot in lots["LOT-PR-0001"]["input_lots"]] == ["RM-STEEL-0007"]
    assert lots["LOT-FG-0001"]["order_id"] == "1000123"
    assert len(events_of(erp, "downtime.recorded")) == 2

    ids = [entry["id"] for entry in erp.events()]
    assert len(ids) == len(set(ids))
    assert erp.stats()["duplicates"] == 0
    assert "Rejected a message" not in gateway.output()
    assert len(shift.timeline) == output.count("\nt+")
    assert gateway.stop() == 0
    assert runner.stop() == 0
    assert "scenario stopped: shift" in runner.output()
