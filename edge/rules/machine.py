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
transition times, and the outbox's epoch: `edge.model.ids.state_key`), so a crash at any point
yields neither a duplicate nor a gap, and a new outbox never reissues an id.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Final

from drivers.base import Quality, Sample
from drivers.modbus import ModbusConfig
from drivers.opcua import OpcUaConfig
from edge.config.models import MachineConfig, OrderBinding, PlantConfig
from edge.model.envelope import CloudEvent
from edge.model.ids import OFFLINE_EPOCH
from edge.rules.limits import LimitWatch
from edge.rules.packml import PackMLStates
from edge.rules.state import EXECUTE, MAX_PROCESS_VALUE

log = logging.getLogger(__name__)

CODE_RANGE: Final = (-(1 << 31), (1 << 32) - 1)
"""A state or stop reason code is a whole number a 16- or 32-bit register can hold, signed or
not: written as the event's reason code (at most 20 characters), 1e20 from a float tag was not
(the rule raised on it, found by tests/test_fuzz.py)."""


class MachineRule(PackMLStates, LimitWatch):
    """Stateful per machine: samples, MES order events and ticks in; milestones out."""

    def __init__(
        self,
        site: str,
        machine: MachineConfig,
        saved: str | None = None,
        *,
        uom_codes: frozenset[str] = frozenset(),
        settle: float = 0.0,
        epoch: str = OFFLINE_EPOCH,
    ) -> None:
        super().__init__(site, machine, saved, uom_codes=uom_codes, settle=settle, epoch=epoch)
        if machine.order is not None:
            self._bind_from_config(machine.order)

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
        return {
            "good_total": good_total,
            "scrap_total": scrap_total,
            "good_pending": good_pending,
            "scrap_pending": scrap_pending,
        }

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
        signals = self.machine.signals
        if sample.signal in (signals.state, signals.stop_reason) and not (
            value == int(value) and CODE_RANGE[0] <= value <= CODE_RANGE[1]
        ):
            self._not_a_number(sample.signal, f"{value!r}, not a code of a 32-bit register")
            return None
        if sample.signal in self._no_number:
            self._no_number.discard(sample.signal)
            log.info("Signal %s reads a number again (%r)", sample.signal, value)
        return value

    def _not_a_number(self, signal: str, what: str) -> None:
        if signal not in self._no_number:
            self._no_number.add(signal)
            log.warning(
                "Signal %s sent %s: taken as bad quality (not counted, neither a limit "
                "breach nor a recovery, a gap in a state) until it reads a number "
                "again",
                signal,
                what,
            )

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
        if binding and (binding.order_id, binding.operation) == (order.order_id, order.operation):
            return []  # a redelivered start: already bound
        at = self._now(at)
        # State changes waiting for the counters apply now: they belong to what is bound.
        events = self._advance_time(at) + self._apply_changes(everything=True)
        if binding is not None:
            if not binding.completed:
                log.warning(
                    "Machine %s starts order %s/%s while %s/%s is bound: ending that one first",
                    self.machine.id,
                    order.order_id,
                    order.operation,
                    binding.order_id,
                    binding.operation,
                )
            events += self._end_binding(at)
        events += self._bind(order, "mes", at)
        # Bound while running: started now; a breach still open raises for this order.
        return events + self._advance_time(at)

    def end_order(
        self, order_id: str, operation: str | None, at: float
    ) -> tuple[list[CloudEvent], str | None]:
        """MES says the operation ended: the final confirmation, completion, unbinding.
        Returns the events, or why the message does not fit (an order not bound here)."""
        binding = self.state.binding
        if (
            binding is None
            or binding.order_id != order_id
            or (operation is not None and binding.operation != operation)
        ):
            ended = self.state.last_ended
            if ended is not None and ended[0] == order_id and operation in (None, ended[1]):
                return [], None  # redelivered (its commit made it, its acknowledgement not)
            bound = f"{binding.order_id}/{binding.operation}" if binding else "nothing"
            return [], (
                f"order {order_id}/{operation or '*'} is not bound to machine "
                f"{self.machine.id} ({bound} is)"
            )
        at = self._now(at)
        events = self._advance_time(at) + self._apply_changes(everything=True)
        events += self._end_binding(at)
        return events, None

    def _advance_time(self, now: float) -> list[CloudEvent]:
        events: list[CloudEvent] = []
        state = self.state
        if (
            state.candidate is not None
            and state.candidate_since is not None
            and (now - state.candidate_since >= self.machine.debounce)
        ):
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
        if binding is not None and binding.started_at is None and (state.machine_state == EXECUTE):
            # Bound while running, or Execute seen first after a debounce: started when both
            # were true.
            events += self._started(binding, max(binding.bound_at, state.state_since or now))
        for index, limit in enumerate(self.machine.limits):
            excursion = state.excursions.get(str(index))
            if excursion is not None:
                events += self._raise_if_due(index, limit, excursion, now)
        return events


def machine_rules(
    config: PlantConfig, saved: Mapping[str, str], epoch: str = OFFLINE_EPOCH
) -> list[MachineRule]:
    """One rule per configured machine, each from its committed state in `saved` (by
    `MachineRule.state_key`): the pipeline's rules, and what `plantsync status` reads of the
    machines when no daemon answers."""
    return [
        MachineRule(
            config.site,
            machine,
            saved.get(f"machine:{machine.id}"),
            uom_codes=config.all_uom_codes,
            settle=settle_for(config, machine),
            epoch=epoch,
        )
        for machine in config.machines
    ]


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
                sampling = (
                    tag.sampling_interval
                    if tag is not None and (tag.sampling_interval is not None)
                    else opcua.publishing_interval
                )
                lag = max(lag, opcua.publishing_interval + sampling)
            case ModbusConfig() as modbus:
                group = next((t.group for t in modbus.tags if t.name == tag_name), "default")
                polls[(driver_name, group)] = modbus.poll_groups.get(group, modbus.poll_interval)
    if len(polls) > 1:
        lag = max(lag, *polls.values())
    return lag
