"""The machine rule against the published PackML state model, not against our reading of it.

`tests/fixtures/packml_isa_tr88.json` holds ISA-TR88.00.02-2015's states (number and name) and
transitions as the OPC Foundation publishes them in OPC 30050 (its nodeset and text; the file
names its source and copy). From that table alone this test works out what the rule must do:

- the wait states are those left only on a command (every exit has a cause); the others end by
  themselves when done ("state complete");
- the completion path is where Execute's `Complete` leads until the machine waits;
- every path through the table that leaves Execute and comes back to it (30 of them) is played
  to a machine with an order bound, and must give: an interruption at the first state off the
  completion path (none if the machine completed first), a downtime from leaving Execute to
  coming back, labelled by the first wait state on the path, and a resumption at Execute (a
  completed operation does not resume).

It also checks that the config's state names and the OPC UA simulator's numbers are the table's.
"""

from __future__ import annotations

import itertools
import json
import typing
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from drivers.base import Sample
from edge.config.models import MachineConfig, OrderBinding, PackMLState
from edge.rules.machine import MachineRule
from edge.rules.state import COMPLETION_PATH, EXECUTE, WAIT_STATES
from simulators.opcua_machine import PackMLState as SimulatorState

TABLE = json.loads((Path(__file__).parent / "fixtures" / "packml_isa_tr88.json").read_text())
NUMBER = {state["name"]: state["number"] for state in TABLE["states"]}
T0 = 1_796_032_800.0


def _members(name: str) -> list[str]:
    """The StateCurrent states a (composite) state of the table stands for."""
    composite = TABLE["composite_states"].get(name)
    if composite is None:
        return [name]
    return [leaf for member in composite["contains"] for leaf in _members(member)]


def _entered(name: str) -> str:
    composite = TABLE["composite_states"].get(name)
    return name if composite is None else _entered(composite["entered_at"])


def transitions(tr88_only: bool = True) -> list[tuple[str, str, str | None]]:
    """The table's transitions between the 17 states a machine reports: a transition from a
    composite state leaves any state in it; one into a composite enters its first state."""
    flat = []
    for transition in TABLE["transitions"]:
        if tr88_only and not transition["in_tr88_2015"]:
            continue
        for source in _members(transition["from"]):
            target = _entered(transition["to"])
            if source != target:
                flat.append((source, target, transition["cause"]))
    return flat


def wait_states() -> set[str]:
    """States left only on a command. Stop and Abort leave every state of Running or
    Cleared alike, so they say nothing about a state; Execute is the production state."""
    exits: dict[str, list[str | None]] = defaultdict(list)
    for source, _target, cause in transitions():
        if cause not in ("Stop", "Abort"):
            exits[source].append(cause)
    return {state for state, causes in exits.items() if state != EXECUTE and causes and all(causes)}


def completion_path() -> set[str]:
    """Where Execute's `Complete` leads, through states that end by themselves, up to the
    state the machine waits in."""
    nexts = {(source, cause): target for source, target, cause in transitions()}
    state, path = nexts[(EXECUTE, "Complete")], set()
    while True:
        path.add(state)
        if state in wait_states():
            return path
        state = nexts[(state, None)]


def journeys() -> list[list[str]]:
    """Every path that leaves Execute and comes back to it visiting no state twice; then, for
    each transition none of them takes (Idle -> Stopping: Idle is only reached through
    Stopped), the shortest way out of Execute to it, it, and the shortest way back."""
    graph: dict[str, set[str]] = defaultdict(set)
    for source, target, _cause in transitions():
        graph[source].add(target)
    found: list[list[str]] = []

    def walk(path: list[str]) -> None:
        for state in sorted(graph[path[-1]]):
            if state == EXECUTE:
                found.append([*path, state])
            elif state not in path:
                walk([*path, state])

    def shortest(start: str, goal: str) -> list[str]:
        ways, seen = [[start]], {start}
        while ways:
            way = ways.pop(0)
            for state in sorted(graph[way[-1]]):
                if state == goal:
                    return [*way, state]
                if state not in seen and state != EXECUTE:
                    seen.add(state)
                    ways.append([*way, state])
        raise AssertionError(f"no way from {start} to {goal}")

    walk([EXECUTE])
    taken = {(a, b) for path in found for a, b in itertools.pairwise(path)}
    for source, target, _cause in transitions():
        if (source, target) not in taken and source != EXECUTE:
            found.append(
                shortest(EXECUTE, source) + shortest(target, EXECUTE)
                if target != EXECUTE
                else [*shortest(EXECUTE, source), target]
            )
            taken |= set(itertools.pairwise(found[-1]))
    return found


def test_the_table_is_the_published_one() -> None:
    assert sorted(NUMBER.values()) == list(range(1, 18))
    assert "ISA-TR88.00.02-2015" in TABLE["source"]["standard"]
    assert len(TABLE["transitions"]) == 26 and len(transitions(tr88_only=False)) > 26


def test_state_names_and_numbers_everywhere_are_the_tables() -> None:
    assert set(typing.get_args(PackMLState)) == set(NUMBER)
    assert {state.value: state.name for state in SimulatorState} == {
        number: name.upper() for name, number in NUMBER.items()
    }


def test_the_rules_wait_states_and_completion_path_are_the_tables() -> None:
    assert (
        wait_states()
        == WAIT_STATES
        == {"Idle", "Suspended", "Held", "Complete", "Stopped", "Aborted"}
    )
    assert completion_path() == COMPLETION_PATH


PATHS = journeys()


def test_the_journeys_take_every_transition_of_the_table() -> None:
    simple = [path for path in PATHS if len(set(path)) == len(path) - 1]
    assert len(simple) == 30
    taken = {(a, b) for path in PATHS for a, b in itertools.pairwise(path)}
    assert {(a, b) for a, b, _cause in transitions()} == taken


def expected(path: list[str]) -> dict[str, Any]:
    """What the table says a journey out of Execute and back must give (one state a second,
    the first state out at second 1, Execute again at second len(path) - 1)."""
    completion = completion_path()
    completed = False
    interrupted = None
    for second, state in enumerate(path[1:-1], 1):
        if state == "Complete" and interrupted is None:
            completed = True
        if state not in completion and not completed and interrupted is None:
            interrupted = (second, state)
    label = next(state for state in path[1:-1] if state in wait_states())
    return {
        "completed": completed,
        "interrupted": interrupted,
        "label": label,
        "downtime": (1, len(path) - 1),
    }


@pytest.mark.parametrize("path", PATHS, ids=["-".join(p[1:-1]) for p in PATHS])
def test_a_journey_out_of_execute_and_back(path: list[str]) -> None:
    config = MachineConfig.model_validate(
        {
            "id": "filler-02",
            "signals": {"good": "plc.good", "state": "plc.state"},
            "state_map": {number: name for name, number in NUMBER.items()},
            "confirm": {"every_units": 1000},
        }
    )
    rule = MachineRule("1010", config)
    rule.start_order(OrderBinding(order_id="4711"), T0 - 1)
    events = rule.on_sample(Sample("plc", "state", NUMBER[EXECUTE], T0))
    assert [e.type for e in events] == ["operation.started"]
    for second, state in enumerate(path[1:], 1):
        events += rule.on_sample(Sample("plc", "state", NUMBER[state], T0 + second))
    want = expected(path)
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        by_type[event.type].append(event.data)
    at = {second: f"2026-11-30T10:00:{second:02d}Z" for second in range(len(path))}
    if want["interrupted"] is None:
        assert by_type["operation.interrupted"] == []
    else:
        second, state = want["interrupted"]
        (interrupted,) = by_type["operation.interrupted"]
        assert (interrupted["occurred_at"], interrupted["machine_state"]) == (at[second], state)
    assert len(by_type["operation.completed"]) == int(want["completed"])
    (downtime,) = by_type["downtime.recorded"]
    start, end = want["downtime"]
    assert (downtime["started_at"], downtime["ended_at"], downtime["machine_state"]) == (
        at[start],
        at[end],
        want["label"],
    )
    resumed = by_type["operation.resumed"]
    assert [r["occurred_at"] for r in resumed] == ([] if want["completed"] else [at[end]])
