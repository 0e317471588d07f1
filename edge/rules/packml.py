"""Machine states (PackML, ISA-TR88.00.02): debounced, applied once the counters' last readings
are in (`settle`), driving the operation (started, interrupted, resumed, completed) and the
downtime labelled by the wait state the machine settled in; across a gap in the state source
what is derived is flagged `uncertain` with the gap.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from edge.model.envelope import CloudEvent
from edge.model.events import DowntimeRecorded, OperationInterrupted, OperationResumed, SourceGap
from edge.rules.orders import Orders
from edge.rules.state import (
    COMPLETE,
    COMPLETION_PATH,
    EXECUTE,
    WAIT_STATES,
    Binding,
    Gap,
    StateChange,
    ms,
    utc,
)

log = logging.getLogger(__name__)


class PackMLStates(Orders):
    """Follows the machine's state and derives operations and downtime from it."""

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
                log.warning(
                    "Machine %s reports state %d, which state_map does not name; ignored",
                    self.machine.id,
                    raw,
                )
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

    def _apply_changes(
        self, *, due_by: float | None = None, wall: float | None = None, everything: bool = False
    ) -> list[CloudEvent]:
        """Apply the waiting state changes, oldest first, that are due: `due_by` the rule's
        clock, due by a tick's `wall` time, or all."""
        events: list[CloudEvent] = []
        state = self.state
        while state.changes:
            change = state.changes[0]
            if not (
                everything
                or (due_by is not None and change.due <= due_by)
                or (wall is not None and change.wall_due is not None and change.wall_due <= wall)
            ):
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
            if (
                binding is not None
                and binding.started_at is not None
                and (
                    binding.interrupted_at is None
                    and previous in COMPLETION_PATH
                    and name not in COMPLETION_PATH
                )
            ):
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
        if binding is not None and binding.started_at is not None and (name not in COMPLETION_PATH):
            return self._interrupted(binding, name, at, gap)
        return []

    def _leave_down(self, at: float, gap: Gap | None) -> list[CloudEvent]:
        """The machine is back in Execute (or, across a gap, ran in it): the downtime ends and
        an interrupted operation resumes."""
        events: list[CloudEvent] = []
        if self.state.down_since is not None:
            events += self._downtime(at, gap)
        binding = self._open_binding()
        if (
            binding is not None
            and binding.started_at is not None
            and (binding.interrupted_at is not None)
        ):
            events.append(
                self._event(
                    OperationResumed(
                        **self._operation_fields(binding, at),
                        interrupted_at=utc(min(binding.interrupted_at, at)),
                        **_quality(gap),
                    ),
                    binding,
                    ("resumed", ms(at)),
                )
            )
            binding.interrupted_at = None
        return events

    def _down_across_gap(
        self, name: str, gap: Gap, counted: bool, source_time: float
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

    def _interrupted(
        self, binding: Binding, name: str, at: float, gap: Gap | None
    ) -> list[CloudEvent]:
        binding.interrupted_at = at
        code = self.state.stop_reason
        return [
            self._event(
                OperationInterrupted(
                    **self._operation_fields(binding, at),
                    machine_state=name,
                    reason_code=str(code) if code else None,
                    reason_text=self.machine.stop_reasons.get(code) if code else None,
                    **_quality(gap),
                ),
                binding,
                ("interrupted", ms(at)),
            )
        ]

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
            site=self.site,
            machine_id=self.machine.id,
            work_center=self.machine.line,
            order_id=binding.order_id if binding else None,
            operation=binding.operation if binding else None,
            occurred_at=utc(at),
            started_at=utc(since),
            ended_at=utc(at),
            duration_seconds=(ms(at) - ms(since)) / 1000,
            machine_state=label,
            reason_code=str(code) if code else None,
            reason_text=self.machine.stop_reasons.get(code) if code else None,
            **_quality(gaps),
        )
        return [self._event(data, binding, ("downtime", ms(since)))]


def _time_across_gap(source_time: float, gap: Gap, counted: bool, before: str, after: str) -> float:
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
    return {
        "data_quality": "uncertain",
        "source_gap": SourceGap(started_at=utc(gap[0]), ended_at=utc(max(gap))),
    }
