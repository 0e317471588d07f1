"""The rule's state as plain data: counters followed across rollovers and resets, the bound order,
limit excursions, state changes waiting for their counters; the PackML names the rule acts on;
and how the state is read back from what the pipeline committed (older shapes included).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Literal

from edge.config.models import MachineSignals

log = logging.getLogger(__name__)


EXECUTE = "Execute"


COMPLETE = "Complete"


COMPLETION_PATH = frozenset({"Completing", "Complete"})
"""Execute -> Completing -> Complete ends the operation: leaving Execute that way is no
interruption."""


WAIT_STATES = frozenset({"Idle", "Suspended", "Held", "Complete", "Stopped", "Aborted"})
"""ISA-TR88.00.02's wait states: the machine rests in them until a command moves it on; every
other state ends by itself once its work is done ("state complete"). A downtime is labelled by
the first wait state the machine settles in after leaving Execute.
`tests/fixtures/packml_isa_tr88.json` holds the published table this is checked against."""


MAX_PROCESS_VALUE = 1e15
"""A limit signal beyond this is not a process value (a quantity could not even carry it)."""


Trigger = Literal["units", "time", "state_change", "order_end"]


CounterName = Literal["good", "processed", "scrap"]


Gap = list[float]
"""A gap in the state source: [last moment the state was known, when it was read again]."""


@dataclass
class Counter:
    """A device counter followed across rollovers and resets. `total` only ever grows."""

    last_raw: int | None = None
    total: int = 0
    confirmed: int = 0
    restarted: bool = False
    """The device said it restarted: the next reading counts from 0, whatever the last was."""

    def advance(self, raw: int, width: int, what: str) -> tuple[int, bool]:
        """Take a new raw reading; return the units it adds, and whether the state must be
        saved now even with no event (a new baseline or a reset would be lost otherwise)."""
        if self.restarted and self.last_raw is not None:
            # After a long outage the device may have counted past the last value we saw, so
            # no drop shows: the device's own restart signal is what says it began at 0.
            log.warning(
                "Counter %s: the device restarted; its reading %d counts from 0 "
                "(the last reading before was %d)",
                what,
                raw,
                self.last_raw,
            )
            self.restarted = False
            self.last_raw = raw
            self.total += raw
            return raw, True
        self.restarted = False
        if self.last_raw is None:
            # First reading ever: it is the baseline, what came before is not ours to count.
            log.info("Counter %s: the first reading, %d, is the baseline", what, raw)
            self.last_raw = raw
            return 0, True
        delta = raw - self.last_raw
        if delta < 0:
            modulus = 1 << width
            wrapped = raw + modulus - self.last_raw
            if self.last_raw >= modulus // 2 and 0 <= wrapped < modulus // 2:
                delta = wrapped
            else:
                log.warning(
                    "Counter %s dropped from %d to %d: treated as a reset, counting on from %d",
                    what,
                    self.last_raw,
                    raw,
                    raw,
                )
                self.last_raw = raw
                self.total += raw
                return raw, True
        self.last_raw = raw
        self.total += delta
        return delta, False

    @property
    def pending(self) -> int:
        return self.total - self.confirmed


@dataclass
class Binding:
    """The order an operation of which the machine works on."""

    order_id: str
    operation: str
    material: str | None
    lot_id: str | None
    source: Literal["config", "mes"]
    bound_at: float
    yield_confirmed: int = 0
    """Good units confirmed for this binding so far: the completion carries the sum."""
    scrap_confirmed: int = 0
    started_at: float | None = None
    interrupted_at: float | None = None
    completed: bool = False

    @property
    def key(self) -> str:
        return f"{self.order_id}/{self.operation}/{ms(self.bound_at)}"


@dataclass
class Excursion:
    since: float
    value: float
    raised_for: str | None = None
    """The binding it was raised for (`Binding.key`; "" when it was counted with no order
    bound); None until it has lasted `for`."""
    unknown: bool = False
    """The signal reads no number since (NaN, +-Inf, bad quality): neither a breach nor a
    recovery, so the excursion waits for a number before it is raised or ends."""


@dataclass
class StateChange:
    """A state change that waits for the counters' last readings (see `settle`)."""

    name: str
    at: float
    """When it happened: what its events are dated."""
    due: float
    """Applied once the rule's clock reaches this..."""
    wall_due: float | None
    """...or a tick's time this (a device clock ahead of the gateway's must not stall it)."""
    gap: Gap | None = None


@dataclass
class RuleState:
    good: Counter = field(default_factory=Counter)
    processed: Counter = field(default_factory=Counter)
    scrap: Counter = field(default_factory=Counter)
    """The counter of defective units (PackML ProdDefectiveCount), confirmed as scrap."""
    sequence: int = 0
    window: int | None = None
    unassigned: int = 0
    unassigned_scrap: int = 0
    binding: Binding | None = None
    last_ended: list[str] | None = None
    """[order, operation] of the binding last ended: a redelivered end of it is no problem."""
    machine_state: str | None = None
    state_since: float | None = None
    candidate: str | None = None
    candidate_since: float | None = None
    candidate_gap: Gap | None = None
    changes: list[StateChange] = field(default_factory=list)
    stop_reason: int = 0
    down_since: float | None = None
    down_first: str | None = None
    """The first state out of Execute."""
    down_state: str | None = None
    """The first wait state reached since: the downtime's label."""
    down_reason: int = 0
    down_gap: Gap | None = None
    gap_since: float | None = None
    """The state source has been lost since then (not read again yet)."""
    gap_units: int = 0
    """Units counted while the state source was lost: the machine ran in the gap."""
    excursions: dict[str, Excursion] = field(default_factory=dict)
    unassigned_excursions: int = 0
    clock: float = 0.0
    """The latest time seen: a device clock that steps back does not move milestones back."""
    last_tick: float | None = None


def utc(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC)


def ms(at: float) -> int:
    return round(at * 1000)


def _known(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in raw.items() if key in names}


def load_state(saved: str | None, signals: MachineSignals) -> RuleState:
    if not saved:
        return RuleState()
    raw = json.loads(saved)
    counters = {
        name: Counter(**raw.pop(name)) for name in ("good", "processed", "scrap") if name in raw
    }
    if "processed" not in counters and signals.good is None:
        # Saved before counters were named for what they count: `good` then followed the
        # signal named `processed`.
        counters["processed"] = counters.pop("good", Counter())
    binding = raw.pop("binding", None)
    excursions = raw.pop("excursions", {})
    changes = raw.pop("changes", [])
    state = RuleState(**_known(RuleState, raw))
    for name, counter in counters.items():
        setattr(state, name, counter)
    if binding:
        good_at_bind, scrap_at_bind = binding.get("good_at_bind"), binding.get("scrap_at_bind")
        state.binding = Binding(**_known(Binding, binding))
        if good_at_bind is not None:  # saved before bindings summed their confirmations
            primary = state.processed if signals.good is None else state.good
            state.binding.yield_confirmed = primary.confirmed - good_at_bind
            state.binding.scrap_confirmed = state.scrap.confirmed - (scrap_at_bind or 0)
    key = state.binding.key if state.binding is not None else ""
    for index, entry in excursions.items():
        excursion = Excursion(**_known(Excursion, entry))
        if entry.get("raised") and excursion.raised_for is None:
            excursion.raised_for = key  # saved as raised, for what was bound then
        state.excursions[index] = excursion
    state.changes = [StateChange(**change) for change in changes]
    return state
