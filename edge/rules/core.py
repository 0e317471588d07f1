"""What every part of a machine rule shares: its configuration, its state, what the counters and
the bound order are, and how an event is built (natural key, subject, partition, sequence).
The rule is assembled from parts that each own one concern (`counters`, `orders`, `packml`,
`limits`) and build on this one; `edge.rules.machine.MachineRule` is the whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from edge.config.models import LimitConfig, MachineConfig
from edge.model.envelope import CloudEvent, build_event
from edge.model.event_data import EventData
from edge.model.ids import OFFLINE_EPOCH, state_key
from edge.rules.state import Binding, Counter, CounterName, load_state, ms, utc


class RuleCore:
    """The state and the event builder the parts of a machine rule share."""

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
        self.site = site
        self.epoch = epoch
        """The outbox's epoch, part of every id this rule derives (`edge.model.ids.state_key`)."""
        self.machine = machine
        self.uom_codes = uom_codes
        self.settle = settle if machine.signals.state is not None else 0.0
        self.state = load_state(saved, machine.signals)
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
            "scrap" if signals.defective else "good" if signals.good and signals.processed else None
        )
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

    def _open_binding(self) -> Binding | None:
        """The binding production counts against: bound and not yet completed."""
        binding = self.state.binding
        return binding if binding is not None and not binding.completed else None

    def _binding_key(self) -> str:
        return self.state.binding.key if self.state.binding is not None else ""

    def _counter(self, which: CounterName) -> Counter:
        state = self.state
        return (
            state.good
            if which == "good"
            else state.processed
            if which == "processed"
            else state.scrap
        )

    def dump_state(self) -> str:
        self.needs_save = self.dirty = False
        return json.dumps(asdict(self.state), separators=(",", ":"), sort_keys=True)

    def _operation_fields(self, binding: Binding, at: float) -> dict[str, Any]:
        return {
            "site": self.site,
            "machine_id": self.machine.id,
            "work_center": self.machine.line,
            "order_id": binding.order_id,
            "operation": binding.operation,
            "occurred_at": utc(at),
        }

    def _event(
        self, data: EventData, binding: Binding | None, key: tuple[str | int, ...]
    ) -> CloudEvent:
        self.state.sequence += 1
        self.needs_save = True
        # Every key here comes from the rule's own state, which starts from nothing with a new
        # outbox: the epoch keeps those keys from meeting the ones of an outbox before it.
        if binding is not None:
            natural = state_key(
                self.epoch,
                self.site,
                self.machine.id,
                binding.order_id,
                binding.operation,
                ms(binding.bound_at),
                *key,
            )
            subject, partition = f"{binding.order_id}/{binding.operation}", binding.order_id
        else:
            natural = state_key(self.epoch, self.site, self.machine.id, *key)
            subject = partition = self.machine.id
        return build_event(
            data,
            natural_key=natural,
            subject=subject,
            partitionkey=partition,
            sequence=self.state.sequence,
        )
