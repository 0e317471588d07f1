"""Machine rules: from signals and MES order events to the milestones ERP and QMS can use.

A `MachineRule` follows one machine. MES order events (or a fixed order in the config) bind an
order, operation, material and lot to it, and every milestone carries them. Its numeric state
signal, mapped to PackML names, drives operation.started (first Execute of a bound operation),
operation.interrupted (Held, Suspended, Stopping, Aborting; with the stop reason active then),
operation.resumed, operation.completed (Complete, or the MES end) and downtime.recorded (when the
machine runs again after leaving Execute); a state that lasts less than `debounce` is ignored.
Its accumulating counters become production confirmations: every N units, at each wall-clock
boundary of a period, on a state change, and a final one at the order's end. A counter that
wraps at its width keeps counting; one that drops otherwise is a reset (logged), never a
negative quantity; the confirmations always add up to the counter's advance. Production with no
order bound is counted as unassigned and reported, never posted. Process limits raise an
inspection request (and a nonconformance where configured) once per excursion.

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
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from drivers.base import Quality, Sample
from edge.config import LimitConfig, MachineConfig, OrderBinding
from edge.model import (
    OFFLINE_EPOCH,
    CloudEvent,
    DowntimeRecorded,
    EventData,
    InspectionRequested,
    NonconformanceRaised,
    OperationCompleted,
    OperationInterrupted,
    OperationResumed,
    OperationStarted,
    ProductionConfirmation,
    Quantity,
    SignedQuantity,
    build_event,
    state_key,
)

log = logging.getLogger(__name__)

INTERRUPTING = frozenset({"Held", "Suspended", "Stopping", "Aborting"})
Trigger = Literal["units", "time", "state_change", "order_end"]


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
    good_at_bind: int
    scrap_at_bind: int
    started_at: float | None = None
    interrupted_at: float | None = None
    completed: bool = False


@dataclass
class Excursion:
    since: float
    value: float
    raised: bool = False


@dataclass
class RuleState:
    good: Counter = field(default_factory=Counter)
    scrap: Counter = field(default_factory=Counter)
    sequence: int = 0
    window: int | None = None
    unassigned: int = 0
    unassigned_scrap: int = 0
    binding: Binding | None = None
    machine_state: str | None = None
    candidate: str | None = None
    candidate_since: float | None = None
    stop_reason: int = 0
    down_since: float | None = None
    down_state: str | None = None
    down_reason: int = 0
    excursions: dict[str, Excursion] = field(default_factory=dict)
    unassigned_excursions: int = 0
    clock: float = 0.0
    """The latest time seen: a device clock that steps back does not move milestones back."""


class MachineRule:
    """Stateful per machine: samples, MES order events and ticks in; milestones out."""

    def __init__(self, site: str, machine: MachineConfig, saved: str | None = None, *,
                 uom_codes: frozenset[str] = frozenset(), epoch: str = OFFLINE_EPOCH) -> None:
        self.site = site
        self.epoch = epoch
        """The outbox's epoch, part of every id this rule derives (`edge.model.state_key`)."""
        self.machine = machine
        self.uom_codes = uom_codes
        self.state = _load_state(saved)
        self.needs_save = False
        signals = machine.signals
        self._counters = {signals.processed: "good"}
        if signals.defective:
            self._counters[signals.defective] = "scrap"
        self._limits: dict[str, list[tuple[int, LimitConfig]]] = {}
        for index, limit in enumerate(machine.limits):
            self._limits.setdefault(limit.signal, []).append((index, limit))
        self._unknown_states: set[int] = set()
        if machine.order is not None:
            self._bind_from_config(machine.order)

    @property
    def state_key(self) -> str:
        return f"machine:{self.machine.id}"

    @property
    def signals(self) -> Iterable[str]:
        signals = self.machine.signals
        named = [signals.processed, signals.defective, signals.state, signals.stop_reason]
        return {s for s in named if s is not None} | set(self._limits)

    @property
    def order_id(self) -> str | None:
        return self.state.binding.order_id if self.state.binding else None

    def _open_binding(self) -> Binding | None:
        """The binding production counts against: bound and not yet completed."""
        binding = self.state.binding
        return binding if binding is not None and not binding.completed else None

    def dump_state(self) -> str:
        self.needs_save = False
        return json.dumps(asdict(self.state), separators=(",", ":"), sort_keys=True)

    # -- inputs -------------------------------------------------------------------------------

    def on_sample(self, sample: Sample) -> list[CloudEvent]:
        return self.on_samples((sample,))

    def on_samples(self, samples: Sequence[Sample]) -> list[CloudEvent]:
        """One poll's samples of this machine. The unit trigger is checked once, after all of
        them, so a confirmation carries the good and the scrap counted in the same poll."""
        events: list[CloudEvent] = []
        # A stop reason read in the same poll as a state change explains that change, in
        # whatever order the device sent them.
        reason = self.machine.signals.stop_reason
        for sample in sorted(samples, key=lambda s: s.signal != reason):
            events += self._sample(sample)
        every_units = self.machine.confirm.every_units
        if samples and every_units is not None and self.state.good.pending >= every_units:
            events += self._confirm(self.state.clock, "units")
        return events

    def _now(self, at: float) -> float:
        self.state.clock = max(self.state.clock, at)
        return self.state.clock

    def _sample(self, sample: Sample) -> list[CloudEvent]:
        at = self._now(sample.source_time)
        events = self._advance_time(at)
        if sample.quality is Quality.BAD or sample.value is None:
            return events
        value = sample.value
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                isinstance(value, float) and not math.isfinite(value)):
            log.warning("Signal %s sent %r, not a finite number; ignored", sample.signal, value)
            return events
        signal = sample.signal
        which = self._counters.get(signal)
        if which is not None:
            if not 0 <= value < 1 << self.machine.counter_width:
                log.warning("Counter %s sent %r, outside 0..2^%d; ignored", signal, value,
                            self.machine.counter_width)
            else:
                events += self._count(which, int(value), at, signal)
        if signal == self.machine.signals.stop_reason:
            self._stop_reason(int(value))
        if signal == self.machine.signals.state:
            every_units = self.machine.confirm.every_units
            if every_units is not None and self.state.good.pending >= every_units:
                events += self._confirm(at, "units")  # what was counted before the change
            events += self._state_sample(int(value), at)
        for index, limit in self._limits.get(signal, ()):
            events += self._limit_sample(index, limit, float(value), at)
        return events

    def on_tick(self, now: float) -> list[CloudEvent]:
        """Time passes: debounced states settle, periods end, limit timers run out."""
        return self._advance_time(self._now(now))

    def on_device_restarted(self, driver: str) -> None:
        """A driver says its device restarted: this machine's counters read through that
        driver count from 0 at their next reading."""
        for signal, which in self._counters.items():
            if signal.startswith(f"{driver}."):
                counter = self.state.good if which == "good" else self.state.scrap
                counter.restarted = True
                self.needs_save = True

    def start_order(self, order: OrderBinding, at: float) -> list[CloudEvent]:
        """MES says the machine starts an operation of an order."""
        binding = self.state.binding
        if binding and (binding.order_id, binding.operation) == (order.order_id,
                                                                 order.operation):
            return []  # a redelivered start: already bound
        at = self._now(at)
        events = self._advance_time(at)
        if binding is not None:
            log.warning("Machine %s starts order %s/%s while %s/%s is bound: ending that one "
                        "first", self.machine.id, order.order_id, order.operation,
                        binding.order_id, binding.operation)
            events += self._end_binding(at)
        events += self._bind(order, "mes", at)
        return events + self._advance_time(at)  # bound while running: started now

    def end_order(self, order_id: str, operation: str | None, at: float
                  ) -> tuple[list[CloudEvent], str | None]:
        """MES says the operation ended: the final confirmation, completion, unbinding.
        Returns the events, or why the message does not fit (an order not bound here)."""
        binding = self.state.binding
        if binding is None or binding.order_id != order_id or (
                operation is not None and binding.operation != operation):
            bound = f"{binding.order_id}/{binding.operation}" if binding else "nothing"
            return [], (f"order {order_id}/{operation or '*'} is not bound to machine "
                        f"{self.machine.id} ({bound} is)")
        at = self._now(at)
        events = self._advance_time(at)
        events += self._end_binding(at)
        return events, None

    # -- counters and confirmations -----------------------------------------------------------

    def _count(self, which: str, raw: int, at: float, signal: str) -> list[CloudEvent]:
        counter = self.state.good if which == "good" else self.state.scrap
        added, notable = counter.advance(raw, self.machine.counter_width, signal)
        self.needs_save |= notable
        if self._open_binding() is None:
            # No order to count against: the units are unassigned production from the start,
            # reported and never posted (and never pending for a later order).
            if which == "good":
                self.state.unassigned += added
            else:
                self.state.unassigned_scrap += added
            counter.confirmed = counter.total
            return []
        return []

    def _confirm(self, at: float, trigger: Trigger, *, final: bool = False
                 ) -> list[CloudEvent]:
        good, scrap = self.state.good, self.state.scrap
        binding = self._open_binding()
        if binding is None:
            # Unassigned production stays counted in the state (and reported), never posted.
            good.confirmed, scrap.confirmed = good.total, scrap.total
            return []
        if not final and good.pending == 0 and scrap.pending == 0:
            return []
        uom = self.machine.confirm.uom
        data = ProductionConfirmation(
            **self._operation_fields(binding, at),
            material=binding.material,
            lot_id=binding.lot_id,
            yield_quantity=Quantity.of(good.pending, uom, uom_codes=self.uom_codes),
            scrap_quantity=Quantity.of(scrap.pending, uom, uom_codes=self.uom_codes),
            counter_from=good.confirmed,
            counter_to=good.total,
            is_final=final,
            trigger=trigger,
        )
        key = ("confirmation", good.confirmed, good.total, scrap.confirmed, scrap.total,
               "final" if final else "partial")
        good.confirmed, scrap.confirmed = good.total, scrap.total
        return [self._event(data, binding, key)]

    def _advance_time(self, now: float) -> list[CloudEvent]:
        events: list[CloudEvent] = []
        state = self.state
        if state.candidate is not None and state.candidate_since is not None and (
                now - state.candidate_since >= self.machine.debounce):
            events += self._enter(state.candidate, state.candidate_since)
        every = self.machine.confirm.every
        if every:
            window = math.floor(now / every)
            if state.window is None:
                state.window = window
            elif window > state.window:
                state.window = window
                events += self._confirm(now, "time")
        binding = self._open_binding()
        if binding is not None and binding.started_at is None and (
                state.machine_state == "Execute"):
            events += self._started(binding, now)  # bound while running, or bound at start
        for index, limit in enumerate(self.machine.limits):
            excursion = state.excursions.get(str(index))
            if excursion is not None and not excursion.raised and (
                    now - excursion.since >= limit.for_):
                events += self._raise(index, limit, excursion, now)
        return events

    # -- machine states -----------------------------------------------------------------------

    def _stop_reason(self, code: int) -> None:
        self.state.stop_reason = code
        if self.state.down_since is not None and code and not self.state.down_reason:
            self.state.down_reason = code

    def _state_sample(self, raw: int, at: float) -> list[CloudEvent]:
        name = self.machine.state_map.get(raw)
        if name is None:
            if raw not in self._unknown_states:
                self._unknown_states.add(raw)
                log.warning("Machine %s reports state %d, which state_map does not name; "
                            "ignored", self.machine.id, raw)
            return []
        state = self.state
        if name == state.machine_state:
            state.candidate = state.candidate_since = None
            return []
        if name != state.candidate:
            state.candidate, state.candidate_since = name, at
            self.needs_save = True
        if at - (state.candidate_since or at) >= self.machine.debounce:
            return self._enter(name, state.candidate_since or at)
        return []

    def _enter(self, name: str, at: float) -> list[CloudEvent]:
        """A state change that outlasted the debounce, dated when it began."""
        state = self.state
        previous = state.machine_state
        state.machine_state = name
        state.candidate = state.candidate_since = None
        self.needs_save = True
        events: list[CloudEvent] = []
        if previous is None:
            return events  # the first state we see is where we are, not a change
        if self.machine.confirm.on_state_change:
            events += self._confirm(at, "state_change")
        binding = state.binding
        if name == "Execute":
            if state.down_since is not None:
                events += self._downtime(at)
            if binding is not None and not binding.completed:
                if binding.started_at is None:
                    events += self._started(binding, at)
                elif binding.interrupted_at is not None:
                    events.append(self._event(OperationResumed(
                        **self._operation_fields(binding, at),
                        interrupted_at=_utc(binding.interrupted_at)),
                        binding, ("resumed", _ms(at))))
                    binding.interrupted_at = None
        elif previous == "Execute":
            state.down_since, state.down_state = at, name
            state.down_reason = state.stop_reason
            if binding is not None and binding.started_at is not None and (
                    not binding.completed and name in INTERRUPTING):
                binding.interrupted_at = at
                code = state.stop_reason
                events.append(self._event(OperationInterrupted(
                    **self._operation_fields(binding, at), machine_state=name,
                    reason_code=str(code) if code else None,
                    reason_text=self.machine.stop_reasons.get(code) if code else None),
                    binding, ("interrupted", _ms(at))))
        if name == "Complete" and binding is not None and not binding.completed:
            events += self._complete(binding, at)
        return events

    def _downtime(self, at: float) -> list[CloudEvent]:
        state = self.state
        assert state.down_since is not None
        since, code, down_state = state.down_since, state.down_reason, state.down_state
        state.down_since, state.down_state, state.down_reason = None, None, 0
        at = max(at, since)  # device clocks step back; a stop never lasts less than nothing
        binding = state.binding
        data = DowntimeRecorded(
            site=self.site, machine_id=self.machine.id, work_center=self.machine.line,
            order_id=binding.order_id if binding else None,
            operation=binding.operation if binding else None,
            occurred_at=_utc(at), started_at=_utc(since), ended_at=_utc(at),
            duration_seconds=(_ms(at) - _ms(since)) / 1000, machine_state=down_state,
            reason_code=str(code) if code else None,
            reason_text=self.machine.stop_reasons.get(code) if code else None,
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
        state.binding = Binding(order.order_id, order.operation, order.material, order.lot_id,
                                source, at, state.good.total, state.scrap.total)
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
        state = self.state
        binding.completed = True
        binding.interrupted_at = None
        events.append(self._event(OperationCompleted(
            **self._operation_fields(binding, at), material=binding.material,
            lot_id=binding.lot_id,
            started_at=_utc(binding.started_at) if binding.started_at is not None else None,
            yield_quantity=Quantity.of(state.good.total - binding.good_at_bind, uom,
                                       uom_codes=self.uom_codes),
            scrap_quantity=Quantity.of(state.scrap.total - binding.scrap_at_bind, uom,
                                       uom_codes=self.uom_codes),
        ), binding, ("completed", _ms(binding.bound_at))))
        return events

    def _end_binding(self, at: float) -> list[CloudEvent]:
        binding = self.state.binding
        assert binding is not None
        events = [] if binding.completed else self._complete(binding, at)
        self.state.binding = None
        self.needs_save = True
        return events + self._confirm(at, "order_end")  # counted after Complete: unassigned

    # -- limits -------------------------------------------------------------------------------

    def _limit_sample(self, index: int, limit: LimitConfig, value: float, at: float
                      ) -> list[CloudEvent]:
        if abs(value) >= 1e15:
            return []  # not a process value: a quantity could not even carry it
        excursions = self.state.excursions
        excursion = excursions.get(str(index))
        low, high, band = limit.low, limit.high, limit.hysteresis
        if excursion is None:
            if (low is not None and value < low) or (high is not None and value > high):
                excursions[str(index)] = excursion = Excursion(at, value)
                self.needs_save = True
                if at - excursion.since >= limit.for_:
                    return self._raise(index, limit, excursion, at)
            return []
        if (low is None or value >= low + band) and (high is None or value <= high - band):
            del excursions[str(index)]  # comfortably back inside: the excursion is over
            self.needs_save = True
            return []
        if _beyond(value, limit) > _beyond(excursion.value, limit):
            excursion.value = value
        if not excursion.raised and at - excursion.since >= limit.for_:
            return self._raise(index, limit, excursion, at)
        return []

    def _raise(self, index: int, limit: LimitConfig, excursion: Excursion, at: float
               ) -> list[CloudEvent]:
        excursion.raised = True
        self.needs_save = True
        binding = self.state.binding
        if binding is None:
            self.state.unassigned_excursions += 1
            log.warning("Machine %s: %s outside its limits with no order bound; counted, not "
                        "raised (the QMS needs an order or a lot)", self.machine.id,
                        limit.signal)
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


def _load_state(saved: str | None) -> RuleState:
    if not saved:
        return RuleState()
    raw = json.loads(saved)
    binding = raw.pop("binding", None)
    excursions = raw.pop("excursions", {})
    state = RuleState(good=Counter(**raw.pop("good")), scrap=Counter(**raw.pop("scrap")),
                      **{k: v for k, v in raw.items() if k in RuleState.__dataclass_fields__})
    state.binding = Binding(**binding) if binding else None
    state.excursions = {k: Excursion(**v) for k, v in excursions.items()}
    return state
