"""Machine rules: from signals and MES order events to the milestones ERP and QMS can use.

A `MachineRule` follows one machine. MES order events (or a fixed order in the config) bind an
order, operation, material and lot to it, and every milestone carries them.

Counters are named for what they count: `good`, `processed` (good and defective, as PackML's
ProdProcessedCount) and `defective`; yield is `good`, or `processed - defective`, and scrap is
`defective`, or `processed - good`. Accumulating counters become production confirmations: every
N units, at each wall-clock boundary of a period (dated at the boundary), on a state change, and
a final one at the order's end. A counter that wraps at its width keeps counting; one that drops
otherwise is a reset (logged), never a negative quantity; the confirmations always add up to the
counter's advance, and the operation's completion carries their sum. Production with no order
bound is counted as unassigned and reported, never posted.

The numeric state signal, mapped to PackML (ISA-TR88.00.02) names, drives the operation: the first
Execute of a bound operation starts it; the first state out of Execute that leads away (Holding,
Suspending, Stopping, Aborting, ...) interrupts it, with the stop reason active then; back in
Execute it resumes, and a downtime is recorded from leaving Execute to returning, labelled by the
wait state the machine settled in (Held, Suspended, Stopped, Aborted, ...). Execute -> Completing
-> Complete completes it (so does the MES end). A state shorter than `debounce` is ignored. A
state change waits up to `settle` for the counters' last readings and applies with the counter
values as of the change: OPC UA samples each tag on its own timer, so the count of the last
units before Complete can arrive (and be dated) after Complete itself; a machine out of Execute
makes no more units, so what the counters read in the meantime counts before the change.

When the state source has a gap (the device unreachable, the state tag bad or not a number, the
gateway down), what is derived across it is flagged `uncertain` with the gap, and a downtime never
spans production the counters confirmed: units counted across the gap mean the machine ran in it.
Process limits raise an inspection request (and a nonconformance where configured) once per
excursion and order: a breach still open when an order binds raises for that order; a value that
is not a number (NaN, +-Inf, bad quality) is neither a breach nor a recovery.

All time comes from the readings (source timestamps, or the tick's clock), so a replay of
recorded input gives the same events. The rule's state is plain data; the pipeline commits it
with the events it produced, and ids come from natural keys (counter ranges, binding and
transition times, and the outbox's epoch: `edge.model.state_key`), so a crash at any point yields
neither a duplicate nor a gap, and a new outbox never reissues an id.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Literal

from drivers.base import Quality, Sample
from drivers.modbus import ModbusConfig
from drivers.opcua import OpcUaConfig
from edge.config.models import LimitConfig, MachineConfig, MachineSignals, OrderBinding, PlantConfig
from edge.model.envelope import CloudEvent, build_event
from edge.model.events import (
    DowntimeRecorded,
    EventData,
    InspectionRequested,
    NonconformanceRaised,
    OperationCompleted,
    OperationInterrupted,
    OperationResumed,
    OperationStarted,
    ProductionConfirmation,
    SourceGap,
)
from edge.model.ids import OFFLINE_EPOCH, state_key
from edge.model.quantities import Quantity, SignedQuantity

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
            log.warning("Counter %s: the device restarted; its reading %d counts from 0 "
                        "(the last reading before was %d)", what, raw, self.last_raw)
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
                log.warning("Counter %s dropped from %d to %d: treated as a reset, counting on "
                            "from %d", what, self.last_raw, raw, raw)
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
        return f"{self.order_id}/{self.operation}/{_ms(self.bound_at)}"


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


class MachineRule:
    """Stateful per machine: samples, MES order events and ticks in; milestones out."""

    def __init__(self, site: str, machine: MachineConfig, saved: str | None = None, *,
                 uom_codes: frozenset[str] = frozenset(), settle: float = 0.0,
                 epoch: str = OFFLINE_EPOCH) -> None:
        self.site = site
        self.epoch = epoch
        """The outbox's epoch, part of every id this rule derives (`edge.model.state_key`)."""
        self.machine = machine
        self.uom_codes = uom_codes
        self.settle = settle if machine.signals.state is not None else 0.0
        self.state = _load_state(saved, machine.signals)
        self.needs_save = False
        """Save the state with the next commit even with no event: it cannot be read again."""
        self.dirty = False
        """The state moved in a way the next reading would move it again (a counter advance):
        saved with the rule's next commit, at the latest at the next tick (a second), and at a
        graceful stop. A commit per reading would cost a durable commit per poll."""
        signals = machine.signals
        self._counters: dict[str, CounterName] = {}
        for what, signal in signals.counters.items():
            self._counters[signal] = "scrap" if what == "defective" else what  # type: ignore[assignment]
        self._primary: CounterName = "processed" if signals.processed else "good"
        """The counter the confirmations' ranges cover: processed where the machine counts it."""
        self._part: CounterName | None = (
            "scrap" if signals.defective else "good" if signals.good and signals.processed
            else None)
        """The counter that splits the primary into yield and scrap, if any."""
        self._limits: dict[str, list[tuple[int, LimitConfig]]] = {}
        for index, limit in enumerate(machine.limits):
            self._limits.setdefault(limit.signal, []).append((index, limit))
        self._unknown_states: set[int] = set()
        self._no_number: set[str] = set()
        if saved and self.state.machine_state is not None and self.state.gap_since is None:
            # The gateway was down: nothing saw the machine since the state was saved.
            self.state.gap_since = self.state.clock
            self.state.gap_units = 0
        if machine.order is not None:
            self._bind_from_config(machine.order)

    @property
    def state_key(self) -> str:
        return f"machine:{self.machine.id}"

    @property
    def signals(self) -> Iterable[str]:
        signals = self.machine.signals
        named = [*signals.counters.values(), signals.state, signals.stop_reason]
        return {s for s in named if s is not None} | set(self._limits)

    @property
    def order_id(self) -> str | None:
        return self.state.binding.order_id if self.state.binding else None

    def totals(self) -> dict[str, int]:
        """Good and scrap units counted and not yet confirmed, for status pages."""
        state = self.state
        primary = self._counter(self._primary)
        if self._primary == "good" or self._part is None:  # each counted on its own
            good_total, scrap_total = primary.total, state.scrap.total
        elif self._part == "scrap":  # processed and defective
            good_total, scrap_total = max(0, primary.total - state.scrap.total), state.scrap.total
        else:  # processed and good
            good_total, scrap_total = state.good.total, max(0, primary.total - state.good.total)
        good_pending, scrap_pending = self._split(final=False)
        return {"good_total": good_total, "scrap_total": scrap_total,
                "good_pending": good_pending, "scrap_pending": scrap_pending}

    def _open_binding(self) -> Binding | None:
        """The binding production counts against: bound and not yet completed."""
        binding = self.state.binding
        return binding if binding is not None and not binding.completed else None

    def _binding_key(self) -> str:
        return self.state.binding.key if self.state.binding is not None else ""

    def _counter(self, which: CounterName) -> Counter:
        state = self.state
        return state.good if which == "good" else state.processed if which == "processed" \
            else state.scrap

    def dump_state(self) -> str:
        self.needs_save = self.dirty = False
        return json.dumps(asdict(self.state), separators=(",", ":"), sort_keys=True)

    # -- inputs -------------------------------------------------------------------------------

    def on_sample(self, sample: Sample) -> list[CloudEvent]:
        return self.on_samples((sample,))

    def on_samples(self, samples: Sequence[Sample]) -> list[CloudEvent]:
        """One poll's (or publish's) samples of this machine. Counters come first, then the
        stop reason, then the state: a state change applies with the counter values read with
        it (a machine that stopped counts no more, so a count that arrives with the stop is the
        last units before it; after a gap, what was counted across it), and a stop reason read
        with it explains it. The unit trigger is checked once, after all of them, so a
        confirmation carries the good and the scrap counted in the same poll."""
        events: list[CloudEvent] = []
        for sample in sorted(samples, key=lambda s: self._rank(s.signal)):
            events += self._sample(sample)
        every_units = self.machine.confirm.every_units
        primary = self._counter(self._primary)
        if samples and every_units is not None and primary.pending >= every_units:
            events += self._confirm(self.state.clock, "units")
        return events

    def _rank(self, signal: str) -> int:
        signals = self.machine.signals
        if signal in self._counters:
            return 0
        return 1 if signal == signals.stop_reason else 2 if signal == signals.state else 3

    def _now(self, at: float) -> float:
        self.state.clock = max(self.state.clock, at)
        return self.state.clock

    def _sample(self, sample: Sample) -> list[CloudEvent]:
        at = self._now(sample.source_time)
        value = self._number(sample)
        signal = sample.signal
        if value is not None:
            # The reading is part of the excursion the timers judge now: a breach raised at
            # this moment names the worst value, this one included.
            for index, limit in self._limits.get(signal, ()):
                self._worst(index, limit, value)
        events = self._advance_time(at)
        signals = self.machine.signals
        which = self._counters.get(signal)
        if which is not None and value is not None:
            events += self._count(which, int(value), signal)
        if signal == signals.stop_reason and value is not None:
            self._stop_reason(int(value))
        if signal == signals.state:
            if value is None:
                self._state_lost(at)
            else:
                events += self._state_sample(int(value), sample.source_time, at)
        for index, limit in self._limits.get(signal, ()):
            events += self._limit_sample(index, limit, value, at)
        return events

    def _number(self, sample: Sample) -> float | int | None:
        """The sample's value if it is a number the rules can use; None for bad quality, NaN,
        +-Inf and anything not a number (logged once until the signal reads a number)."""
        value = sample.value
        if sample.quality is Quality.BAD or value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self._not_a_number(sample.signal, f"{value!r}, not a number")
            return None
        if isinstance(value, float) and not math.isfinite(value):
            self._not_a_number(sample.signal, f"{value!r}")
            return None
        width = self.machine.counter_width
        if sample.signal in self._counters and not 0 <= value < 1 << width:
            self._not_a_number(sample.signal, f"{value!r}, outside a counter's 0..2^{width}")
            return None
        if sample.signal in self._limits and abs(value) >= MAX_PROCESS_VALUE:
            self._not_a_number(sample.signal, f"{value!r}, beyond any process value")
            return None
        if sample.signal in self._no_number:
            self._no_number.discard(sample.signal)
            log.info("Signal %s reads a number again (%r)", sample.signal, value)
        return value

    def _not_a_number(self, signal: str, what: str) -> None:
        if signal not in self._no_number:
            self._no_number.add(signal)
            log.warning("Signal %s sent %s: taken as bad quality (not counted, neither a limit "
                        "breach nor a recovery, a gap in a state) until it reads a number "
                        "again", signal, what)

    def on_tick(self, now: float) -> list[CloudEvent]:
        """Time passes: debounced states settle, periods end, limit timers run out."""
        state = self.state
        state.last_tick = now
        events = self._apply_changes(wall=now)
        return events + self._advance_time(self._now(now))

    def on_device_restarted(self, driver: str) -> None:
        """A driver says its device restarted: this machine's counters read through that
        driver count from 0 at their next reading."""
        for signal, which in self._counters.items():
            if signal.startswith(f"{driver}."):
                self._counter(which).restarted = True
                self.needs_save = True

    def start_order(self, order: OrderBinding, at: float) -> list[CloudEvent]:
        """MES says the machine starts an operation of an order."""
        binding = self.state.binding
        if binding and (binding.order_id, binding.operation) == (order.order_id,
                                                                 order.operation):
            return []  # a redelivered start: already bound
        at = self._now(at)
        # State changes waiting for the counters apply now: they belong to what is bound.
        events = self._advance_time(at) + self._apply_changes(everything=True)
        if binding is not None:
            if not binding.completed:
                log.warning("Machine %s starts order %s/%s while %s/%s is bound: ending that "
                            "one first", self.machine.id, order.order_id, order.operation,
                            binding.order_id, binding.operation)
            events += self._end_binding(at)
        events += self._bind(order, "mes", at)
        # Bound while running: started now; a breach still open raises for this order.
        return events + self._advance_time(at)

    def end_order(self, order_id: str, operation: str | None, at: float
                  ) -> tuple[list[CloudEvent], str | None]:
        """MES says the operation ended: the final confirmation, completion, unbinding.
        Returns the events, or why the message does not fit (an order not bound here)."""
        binding = self.state.binding
        if binding is None or binding.order_id != order_id or (
                operation is not None and binding.operation != operation):
            ended = self.state.last_ended
            if ended is not None and ended[0] == order_id and operation in (None, ended[1]):
                return [], None  # redelivered (its commit made it, its acknowledgement not)
            bound = f"{binding.order_id}/{binding.operation}" if binding else "nothing"
            return [], (f"order {order_id}/{operation or '*'} is not bound to machine "
                        f"{self.machine.id} ({bound} is)")
        at = self._now(at)
        events = self._advance_time(at) + self._apply_changes(everything=True)
        events += self._end_binding(at)
        return events, None

    # -- counters and confirmations -----------------------------------------------------------

    def _count(self, which: CounterName, raw: int, signal: str) -> list[CloudEvent]:
        # A reading that arrives while a state change waits for the counters counts before
        # it, whatever its timestamp: a server that samples each tag on its own timer dates the
        # count of the last units before Complete when it sampled it, after Complete, and a
        # machine out of Execute makes no more units.
        events: list[CloudEvent] = []
        counter = self._counter(which)
        added, notable = counter.advance(raw, self.machine.counter_width, signal)
        self.needs_save |= notable
        self.dirty = True
        state = self.state
        if state.gap_since is not None and which == self._primary:
            state.gap_units += added
        if self._open_binding() is None:
            # No order to count against: the units are unassigned production from the start,
            # reported and never posted (and never pending for a later order).
            good, scrap = self._split(final=False)
            self._take(good, scrap)
            state.unassigned += good
            state.unassigned_scrap += scrap
        return events

    def _split(self, final: bool) -> tuple[int, int]:
        """The good and scrap units the pending counts make. Where two counters make them
        (processed and defective, or processed and good), the second one is taken only as far
        as the first covers it: read in separate notifications, the defective count can run
        ahead of the processed one for a moment, and a quantity never goes negative."""
        primary = self._counter(self._primary).pending
        if self._part is None:
            return primary, 0
        part = self._counter(self._part).pending
        if self._primary == "good":  # good and defective, each its own quantity
            return primary, part
        covered = min(part, primary)
        if final and part > primary:
            log.warning("Machine %s: %s counted %d units beyond %s at the end of the order; "
                        "they are left to the processed count that catches up",
                        self.machine.id, "defective" if self._part == "scrap" else "good",
                        part - primary, "processed")
        return (primary - covered, covered) if self._part == "scrap" else (covered,
                                                                           primary - covered)

    def _take(self, good: int, scrap: int) -> tuple[int, int, int, int]:
        """Mark `good` and `scrap` confirmed; return the primary counter's range and the
        part counter's, before and after (the natural key of a confirmation)."""
        primary = self._counter(self._primary)
        first, last = primary.confirmed, primary.total
        primary.confirmed = primary.total
        part = self._counter(self._part) if self._part is not None else self.state.scrap
        part_first = part.confirmed
        if self._part is not None:
            part.confirmed += scrap if self._part == "scrap" else good
            if self._primary == "good":
                part.confirmed = part.total
        return first, last, part_first, part.confirmed

    def _confirm(self, at: float, trigger: Trigger, *, final: bool = False
                 ) -> list[CloudEvent]:
        binding = self._open_binding()
        good, scrap = self._split(final)
        if binding is None:
            # Unassigned production stays counted in the state (and reported), never posted.
            self._take(good, scrap)
            self.state.unassigned += good
            self.state.unassigned_scrap += scrap
            return []
        primary = self._counter(self._primary)
        if not final and primary.pending == 0 and good == 0 and scrap == 0:
            return []
        first, last, part_first, part_last = self._take(good, scrap)
        binding.yield_confirmed += good
        binding.scrap_confirmed += scrap
        uom = self.machine.confirm.uom
        data = ProductionConfirmation(
            **self._operation_fields(binding, at),
            material=binding.material,
            lot_id=binding.lot_id,
            yield_quantity=Quantity.of(good, uom, uom_codes=self.uom_codes),
            scrap_quantity=Quantity.of(scrap, uom, uom_codes=self.uom_codes),
            counter_from=first,
            counter_to=last,
            is_final=final,
            trigger=trigger,
        )
        key = ("confirmation", first, last, part_first, part_last,
               "final" if final else "partial")
        return [self._event(data, binding, key)]

    def _advance_time(self, now: float) -> list[CloudEvent]:
        events: list[CloudEvent] = []
        state = self.state
        if state.candidate is not None and state.candidate_since is not None and (
                now - state.candidate_since >= self.machine.debounce):
            events += self._accept()
        events += self._apply_changes(due_by=now)
        every = self.machine.confirm.every
        if every:
            window = math.floor(now / every)
            if state.window is None:
                state.window = window
                self.dirty = True
            elif window > state.window:
                # Dated at the end of the window the pending units were read in.
                boundary = (state.window + 1) * every
                state.window = window
                self.dirty = True
                events += self._confirm(boundary, "time")
        binding = self._open_binding()
        if binding is not None and binding.started_at is None and (
                state.machine_state == EXECUTE):
            # Bound while running, or Execute seen first after a debounce: started when both
            # were true.
            events += self._started(binding, max(binding.bound_at, state.state_since or now))
        for index, limit in enumerate(self.machine.limits):
            excursion = state.excursions.get(str(index))
            if excursion is not None:
                events += self._raise_if_due(index, limit, excursion, now)
        return events

    # -- machine states -----------------------------------------------------------------------

    def _stop_reason(self, code: int) -> None:
        self.state.stop_reason = code
        if self.state.down_since is not None and code and not self.state.down_reason:
            self.state.down_reason = code

    def _latest_state(self) -> str | None:
        """The state the machine is in as far as we know: the last one accepted."""
        state = self.state
        return state.changes[-1].name if state.changes else state.machine_state

    def _state_lost(self, at: float) -> None:
        """The state source went away (bad quality, not a number, the device unreachable)."""
        state = self.state
        if state.gap_since is None:
            state.gap_since, state.gap_units = at, 0
            self.needs_save = True
        state.candidate = state.candidate_since = None
        state.candidate_gap = None

    def _state_sample(self, raw: int, source_time: float, at: float) -> list[CloudEvent]:
        name = self.machine.state_map.get(raw)
        if name is None:
            if raw not in self._unknown_states:
                self._unknown_states.add(raw)
                log.warning("Machine %s reports state %d, which state_map does not name; "
                            "ignored", self.machine.id, raw)
            return []
        state = self.state
        events: list[CloudEvent] = []
        latest = self._latest_state()
        gap: Gap | None = None
        when = at
        if state.gap_since is not None:
            gap, counted = [state.gap_since, at], state.gap_units > 0
            state.gap_since, state.gap_units = None, 0
            self.needs_save = True
            if latest is None:
                gap = None  # the first state ever seen: nothing to be uncertain about
            elif name == latest:
                state.candidate = state.candidate_since = None
                if name != EXECUTE:
                    events += self._down_across_gap(name, gap, counted, source_time)
                return events
            else:
                when = _time_across_gap(source_time, gap, counted, latest, name)
        if name == latest:
            state.candidate = state.candidate_since = None
            state.candidate_gap = None
            return events
        if name != state.candidate or gap is not None:
            state.candidate, state.candidate_since, state.candidate_gap = name, when, gap
            self.needs_save = True
        if state.clock - (state.candidate_since or when) >= self.machine.debounce:
            events += self._accept()
        return events

    def _accept(self) -> list[CloudEvent]:
        """The candidate state outlasted the debounce: apply it, or let it wait for the
        counters' last readings."""
        state = self.state
        name, at = state.candidate, state.candidate_since
        assert name is not None and at is not None
        gap = state.candidate_gap
        state.candidate = state.candidate_since = None
        state.candidate_gap = None
        self.needs_save = True
        if self.settle <= 0:
            return self._enter(name, at, gap)
        wall_due = state.last_tick + self.settle + 1.0 if state.last_tick is not None else None
        state.changes.append(StateChange(name, at, state.clock + self.settle, wall_due, gap))
        return []

    def _apply_changes(self, *, due_by: float | None = None, wall: float | None = None,
                       everything: bool = False) -> list[CloudEvent]:
        """Apply the waiting state changes, oldest first, that are due: `due_by` the rule's
        clock, due by a tick's `wall` time, or all."""
        events: list[CloudEvent] = []
        state = self.state
        while state.changes:
            change = state.changes[0]
            if not (everything or (due_by is not None and change.due <= due_by)
                    or (wall is not None and change.wall_due is not None
                        and change.wall_due <= wall)):
                break
            state.changes.pop(0)
            self.needs_save = True
            events += self._enter(change.name, change.at, change.gap)
        return events

    def _known_until(self) -> float:
        """The latest moment the rule has dated anything by the state the machine was in (its
        start, a binding or operation start under it): a change that comes later (after a
        debounce, or first seen after a gap) is not dated before it."""
        state = self.state
        binding = state.binding
        times = [state.state_since, state.down_since]
        if binding is not None:
            times += [binding.bound_at, binding.started_at, binding.interrupted_at]
        return max((t for t in times if t is not None), default=-math.inf)

    def _enter(self, name: str, at: float, gap: Gap | None = None) -> list[CloudEvent]:
        """A state change that outlasted the debounce (and waited for the counters), dated
        when it began."""
        state = self.state
        at = max(at, self._known_until())
        previous = state.machine_state
        state.machine_state, state.state_since = name, at
        self.needs_save = True
        events: list[CloudEvent] = []
        binding = self._open_binding()
        if previous is None:
            # The first state we see is where we are, not a change.
            if name == EXECUTE and binding is not None and binding.started_at is None:
                events += self._started(binding, max(binding.bound_at, at))
            return events
        every_units = self.machine.confirm.every_units
        if every_units is not None and self._counter(self._primary).pending >= every_units:
            events += self._confirm(at, "units")  # what was counted before the change
        if self.machine.confirm.on_state_change and not (name == COMPLETE and binding):
            events += self._confirm(at, "state_change")  # (Complete's final one takes it)
        if name == EXECUTE:
            events += self._leave_down(at, gap)
            if binding is not None and binding.started_at is None:
                events += self._started(binding, max(binding.bound_at, at))
        elif previous == EXECUTE:
            events += self._go_down(name, at, gap)
        elif state.down_since is not None:
            if state.down_state is None and name in WAIT_STATES:
                state.down_state = name
            state.down_gap = _union(state.down_gap, gap)
            if binding is not None and binding.started_at is not None and (
                    binding.interrupted_at is None and previous in COMPLETION_PATH
                    and name not in COMPLETION_PATH):
                # Off the completion path (Completing -> Stopping): it did not complete.
                events += self._interrupted(binding, name, at, gap)
        if name == COMPLETE and binding is not None:
            events += self._complete(binding, at)
        return events

    def _go_down(self, name: str, at: float, gap: Gap | None) -> list[CloudEvent]:
        """The machine left Execute (or, across a gap, stopped again)."""
        state = self.state
        state.down_since, state.down_first = at, name
        state.down_state = name if name in WAIT_STATES else None
        state.down_reason, state.down_gap = state.stop_reason, gap
        binding = self._open_binding()
        if binding is not None and binding.started_at is not None and (
                name not in COMPLETION_PATH):
            return self._interrupted(binding, name, at, gap)
        return []

    def _leave_down(self, at: float, gap: Gap | None) -> list[CloudEvent]:
        """The machine is back in Execute (or, across a gap, ran in it): the downtime ends and
        an interrupted operation resumes."""
        events: list[CloudEvent] = []
        if self.state.down_since is not None:
            events += self._downtime(at, gap)
        binding = self._open_binding()
        if binding is not None and binding.started_at is not None and (
                binding.interrupted_at is not None):
            events.append(self._event(OperationResumed(
                **self._operation_fields(binding, at),
                interrupted_at=_utc(min(binding.interrupted_at, at)), **_quality(gap)),
                binding, ("resumed", _ms(at))))
            binding.interrupted_at = None
        return events

    def _down_across_gap(self, name: str, gap: Gap, counted: bool, source_time: float
                         ) -> list[CloudEvent]:
        """Down before the gap and down after it in the same state. Units counted across the
        gap say the machine ran in it: the stop before ends where the gap began, and a new one
        starts where it ended (or at the device's timestamp of the state, inside the gap)."""
        state = self.state
        if state.down_since is None:
            return []
        if not counted:
            state.down_gap = _union(state.down_gap, gap)
            return []
        ran = max(gap[0], self._known_until())
        again = max(source_time if gap[0] < source_time < gap[1] else gap[1], ran)
        return self._leave_down(ran, gap) + self._go_down(name, again, gap)

    def _interrupted(self, binding: Binding, name: str, at: float, gap: Gap | None
                     ) -> list[CloudEvent]:
        binding.interrupted_at = at
        code = self.state.stop_reason
        return [self._event(OperationInterrupted(
            **self._operation_fields(binding, at), machine_state=name,
            reason_code=str(code) if code else None,
            reason_text=self.machine.stop_reasons.get(code) if code else None,
            **_quality(gap)), binding, ("interrupted", _ms(at)))]

    def _downtime(self, at: float, gap: Gap | None) -> list[CloudEvent]:
        state = self.state
        assert state.down_since is not None
        since, code = state.down_since, state.down_reason
        label = state.down_state or state.down_first
        gaps = _union(state.down_gap, gap)
        state.down_since = state.down_first = state.down_state = state.down_gap = None
        state.down_reason = 0
        at = max(at, since)  # device clocks step back; a stop never lasts less than nothing
        binding = state.binding
        data = DowntimeRecorded(
            site=self.site, machine_id=self.machine.id, work_center=self.machine.line,
            order_id=binding.order_id if binding else None,
            operation=binding.operation if binding else None,
            occurred_at=_utc(at), started_at=_utc(since), ended_at=_utc(at),
            duration_seconds=(_ms(at) - _ms(since)) / 1000, machine_state=label,
            reason_code=str(code) if code else None,
            reason_text=self.machine.stop_reasons.get(code) if code else None,
            **_quality(gaps),
        )
        return [self._event(data, binding, ("downtime", _ms(since)))]

    # -- order binding ------------------------------------------------------------------------

    def _bind_from_config(self, order: OrderBinding) -> None:
        binding = self.state.binding
        if binding is not None and (binding.source == "mes" or (
                binding.order_id, binding.operation) == (order.order_id, order.operation)):
            return  # already bound; and what MES bound since wins over the config
        if binding is not None:
            log.warning("Machine %s: the config now binds %s/%s instead of %s/%s; what was "
                        "pending is kept as unassigned", self.machine.id, order.order_id,
                        order.operation, binding.order_id, binding.operation)
            self.state.binding = None
        self._bind(order, "config", 0.0)

    def _bind(self, order: OrderBinding, source: Literal["config", "mes"], at: float
              ) -> list[CloudEvent]:
        state = self.state
        events = self._confirm(at, "state_change")  # nothing bound: pending is unassigned
        if self._part is not None and self._counter(self._part).pending:
            # The two counters disagree on what came before this order: not this order's.
            part = self._counter(self._part)
            log.warning("Machine %s: %d %s unit(s) counted beyond processed before order %s "
                        "are kept as unassigned", self.machine.id, part.pending,
                        "defective" if self._part == "scrap" else "good", order.order_id)
            if self._part == "scrap":
                state.unassigned_scrap += part.pending
            else:
                state.unassigned += part.pending
            part.confirmed = part.total
        state.binding = Binding(order.order_id, order.operation, order.material, order.lot_id,
                                source, at)
        self.needs_save = True
        return events

    def _started(self, binding: Binding, at: float) -> list[CloudEvent]:
        binding.started_at = at
        return [self._event(OperationStarted(**self._operation_fields(binding, at),
                                             material=binding.material),
                            binding, ("started", _ms(binding.bound_at)))]

    def _complete(self, binding: Binding, at: float) -> list[CloudEvent]:
        events = self._confirm(at, "order_end", final=True)
        uom = self.machine.confirm.uom
        binding.completed = True
        binding.interrupted_at = None
        events.append(self._event(OperationCompleted(
            **self._operation_fields(binding, at), material=binding.material,
            lot_id=binding.lot_id,
            started_at=_utc(binding.started_at) if binding.started_at is not None else None,
            yield_quantity=Quantity.of(binding.yield_confirmed, uom, uom_codes=self.uom_codes),
            scrap_quantity=Quantity.of(binding.scrap_confirmed, uom, uom_codes=self.uom_codes),
        ), binding, ("completed", _ms(binding.bound_at))))
        return events

    def _end_binding(self, at: float) -> list[CloudEvent]:
        binding = self.state.binding
        assert binding is not None
        events = [] if binding.completed else self._complete(binding, at)
        self.state.binding = None
        self.state.last_ended = [binding.order_id, binding.operation]
        self.needs_save = True
        return events + self._confirm(at, "order_end")  # counted after Complete: unassigned

    # -- limits -------------------------------------------------------------------------------

    def _limit_sample(self, index: int, limit: LimitConfig, value: float | None, at: float
                      ) -> list[CloudEvent]:
        excursions = self.state.excursions
        excursion = excursions.get(str(index))
        if value is None:
            if excursion is not None and not excursion.unknown:
                excursion.unknown = True
                self.needs_save = True
            return []
        low, high, band = limit.low, limit.high, limit.hysteresis
        if excursion is None:
            if (low is not None and value < low) or (high is not None and value > high):
                excursions[str(index)] = excursion = Excursion(at, float(value))
                self.needs_save = True
                return self._raise_if_due(index, limit, excursion, at)
            return []
        if excursion.unknown:
            excursion.unknown = False
            self.needs_save = True
        if (low is None or value >= low + band) and (high is None or value <= high - band):
            del excursions[str(index)]  # comfortably back inside: the excursion is over
            self.needs_save = True
            return []
        self._worst(index, limit, value)
        return self._raise_if_due(index, limit, excursion, at)

    def _worst(self, index: int, limit: LimitConfig, value: float) -> None:
        excursion = self.state.excursions.get(str(index))
        if excursion is not None and _beyond(value, limit) > _beyond(excursion.value, limit):
            excursion.value = float(value)
            self.dirty = True

    def _raise_if_due(self, index: int, limit: LimitConfig, excursion: Excursion, at: float
                      ) -> list[CloudEvent]:
        """Raise an excursion that lasted `for`, once for each order bound while it lasts."""
        key = self._binding_key()
        if excursion.unknown or at - excursion.since < limit.for_ or excursion.raised_for == key:
            return []
        if not key and excursion.raised_for is not None:
            return []  # raised (or counted) before; with no order bound now, nothing new
        return self._raise(index, limit, excursion, at)

    def _raise(self, index: int, limit: LimitConfig, excursion: Excursion, at: float
               ) -> list[CloudEvent]:
        excursion.raised_for = self._binding_key()
        self.needs_save = True
        binding = self.state.binding
        if binding is None:
            self.state.unassigned_excursions += 1
            log.warning("Machine %s: %s outside its limits with no order bound; counted, and "
                        "raised for the next order bound while it lasts (the QMS needs an "
                        "order or a lot)", self.machine.id, limit.signal)
            return []
        characteristic = limit.characteristic or limit.signal
        bounds = f"[{_text(limit.low) or '-inf'}, {_text(limit.high) or '+inf'}]"
        reason = (f"{limit.signal} = {_text(excursion.value)} outside {bounds} "
                  f"for {at - excursion.since:g}s")
        common: dict[str, Any] = {
            "site": self.site, "machine_id": self.machine.id,
            "work_center": self.machine.line, "order_id": binding.order_id,
            "operation": binding.operation, "material": binding.material,
            "lot_id": binding.lot_id, "occurred_at": _utc(at)}
        key = ("limit", index, _ms(excursion.since))
        events = []
        if limit.raise_ in ("inspection", "both"):
            events.append(self._event(InspectionRequested(
                **common, trigger="limit_violation", characteristic=characteristic,
                measured_value=self._signed(excursion.value, limit.uom),
                lower_limit=self._signed(limit.low, limit.uom),
                upper_limit=self._signed(limit.high, limit.uom), reason_text=reason),
                binding, key))
        if limit.raise_ in ("nonconformance", "both"):
            events.append(self._event(NonconformanceRaised(
                **common, defect_code=limit.defect_code, severity=limit.severity,
                description_text=reason), binding, key))
        return events

    def _signed(self, value: float | None, uom: str) -> SignedQuantity | None:
        if value is None:
            return None
        return SignedQuantity.of(_text(value), uom, uom_codes=self.uom_codes)

    # -- building events ----------------------------------------------------------------------

    def _operation_fields(self, binding: Binding, at: float) -> dict[str, Any]:
        return {"site": self.site, "machine_id": self.machine.id,
                "work_center": self.machine.line, "order_id": binding.order_id,
                "operation": binding.operation, "occurred_at": _utc(at)}

    def _event(self, data: EventData, binding: Binding | None, key: tuple[str | int, ...]
               ) -> CloudEvent:
        self.state.sequence += 1
        self.needs_save = True
        # Every key here comes from the rule's own state, which starts from nothing with a new
        # outbox: the epoch keeps those keys from meeting the ones of an outbox before it.
        if binding is not None:
            natural = state_key(self.epoch, self.site, self.machine.id, binding.order_id,
                                binding.operation, _ms(binding.bound_at), *key)
            subject, partition = f"{binding.order_id}/{binding.operation}", binding.order_id
        else:
            natural = state_key(self.epoch, self.site, self.machine.id, *key)
            subject = partition = self.machine.id
        return build_event(data, natural_key=natural, subject=subject, partitionkey=partition,
                           sequence=self.state.sequence)


def settle_for(config: PlantConfig, machine: MachineConfig) -> float:
    """How long the machine's state changes wait for its counters' last readings: `settle`
    if configured; else, for OPC UA, one publishing interval plus the counter's sampling
    interval (a counter's final value is sampled on its own timer and sent with the next
    publish); for Modbus, nothing when one poll group reads the counters with the state (their
    values come in the same poll), else the longest poll interval involved."""
    if machine.settle is not None:
        return machine.settle
    signals = machine.signals
    if signals.state is None:
        return 0.0
    drivers = {driver.name: driver for driver in config.drivers}
    lag = 0.0
    polls: dict[tuple[str, str], float] = {}
    for signal in (signals.state, *signals.counters.values()):
        driver_name, _, tag_name = signal.partition(".")
        match drivers.get(driver_name):
            case OpcUaConfig() as opcua:
                tag = next((t for t in opcua.tags if t.name == tag_name), None)
                sampling = tag.sampling_interval if tag is not None and (
                    tag.sampling_interval is not None) else opcua.publishing_interval
                lag = max(lag, opcua.publishing_interval + sampling)
            case ModbusConfig() as modbus:
                group = next((t.group for t in modbus.tags if t.name == tag_name), "default")
                polls[(driver_name, group)] = modbus.poll_groups.get(group,
                                                                     modbus.poll_interval)
    if len(polls) > 1:
        lag = max(lag, *polls.values())
    return lag


def _time_across_gap(source_time: float, gap: Gap, counted: bool, before: str, after: str
                     ) -> float:
    """When a state change seen first after a gap happened. A device timestamp inside the gap
    says it (OPC UA reads the time the value changed); otherwise the gap's end or start,
    whichever keeps a downtime off the production counted across the gap: stopped late if it
    produced in the gap, early if not; ran again early if it produced, late if not."""
    start, end = gap
    if start < source_time < end:
        return source_time
    if before == EXECUTE:
        return end if counted else start
    if after == EXECUTE:
        return start if counted else end
    return end


def _union(first: Gap | None, second: Gap | None) -> Gap | None:
    if first is None or second is None:
        return first or second
    return [min(first[0], second[0]), max(first[1], second[1])]


def _quality(gap: Gap | None) -> dict[str, Any]:
    if gap is None:
        return {}
    return {"data_quality": "uncertain",
            "source_gap": SourceGap(started_at=_utc(gap[0]), ended_at=_utc(max(gap)))}


def _beyond(value: float, limit: LimitConfig) -> float:
    """How far outside its limits a value is (0 inside)."""
    return max(0.0, (limit.low - value) if limit.low is not None else 0.0,
               (value - limit.high) if limit.high is not None else 0.0)


def _text(value: float | None) -> str:
    if value is None:
        return ""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _utc(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC)


def _ms(at: float) -> int:
    return round(at * 1000)


def _known(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in raw.items() if key in names}


def _load_state(saved: str | None, signals: MachineSignals) -> RuleState:
    if not saved:
        return RuleState()
    raw = json.loads(saved)
    counters = {name: Counter(**raw.pop(name)) for name in ("good", "processed", "scrap")
                if name in raw}
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
