"""Machine rules: from counter samples to production confirmations.

A `ConfirmationRule` watches one machine's accumulating good and scrap counters. It turns their
advance into units counted since the order was bound (rollover at the configured width is more
counting; a drop that is not a rollover is a reset, logged, never a negative quantity) and
emits a `production.confirmation` for what was counted since the last one, once `every_units`
good units are pending or `every` has passed with something pending.

The rule's state is plain data. The daemon saves it in the same transaction as the events it
produced, and only then: after a crash the rule resumes from the state that matches the last
committed confirmation, and the counter's advance since then is counted again from there. Ids
come from the counter range a confirmation covers, so re-deriving an event gives the same id.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from drivers.base import Quality, Sample
from edge.config import MachineConfig
from edge.model import CloudEvent, ProductionConfirmation, Quantity, build_event

log = logging.getLogger(__name__)


@dataclass
class Counter:
    """A device counter followed across rollovers and resets. `total` only ever grows."""

    last_raw: int | None = None
    total: int = 0
    confirmed: int = 0

    def advance(self, raw: int, width: int, what: str) -> tuple[int, bool]:
        """Take a new raw reading; return the units it adds, and whether the state must be
        saved now even with no event (a new baseline or a reset would be lost otherwise)."""
        if self.last_raw is None:
            # First reading ever: it is the baseline, what came before is not ours to count.
            self.last_raw = raw
            return 0, True
        delta = raw - self.last_raw
        if delta < 0:
            modulus = 1 << width
            wrapped = raw + modulus - self.last_raw
            if self.last_raw >= modulus // 2 and wrapped < modulus // 2:
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
class RuleState:
    good: Counter
    scrap: Counter
    sequence: int = 0
    last_confirmed_at: float | None = None
    unassigned: int = 0


class ConfirmationRule:
    """Stateful per machine: samples in, confirmation events out."""

    def __init__(self, site: str, machine: MachineConfig, saved: str | None = None, *,
                 uom_codes: frozenset[str] = frozenset()) -> None:
        self.site = site
        self.machine = machine
        self.uom_codes = uom_codes
        self.state = _load_state(saved)
        self.needs_save = False
        self._signals = {machine.signals.processed: "good"}
        if machine.signals.defective:
            self._signals[machine.signals.defective] = "scrap"

    @property
    def state_key(self) -> str:
        return f"machine:{self.machine.id}"

    @property
    def signals(self) -> Iterable[str]:
        return self._signals.keys()

    def dump_state(self) -> str:
        self.needs_save = False
        return json.dumps(asdict(self.state), separators=(",", ":"), sort_keys=True)

    def on_sample(self, sample: Sample) -> list[CloudEvent]:
        which = self._signals.get(sample.signal)
        if which is None or sample.quality is Quality.BAD or sample.value is None:
            return []
        if isinstance(sample.value, bool) or not isinstance(sample.value, int | float):
            log.warning("Counter %s sent a non-numeric value %r; ignored", sample.signal,
                        sample.value)
            return []
        counter = self.state.good if which == "good" else self.state.scrap
        added, notable = counter.advance(int(sample.value), self.machine.counter_width,
                                         sample.signal)
        self.needs_save |= notable
        if self.state.last_confirmed_at is None:
            self.state.last_confirmed_at = sample.source_time
        if added and self.machine.order is None:
            self.state.unassigned += added
        every_units = self.machine.confirm.every_units
        if every_units is not None and self.state.good.pending >= every_units:
            return self._confirm(sample.source_time, "units")
        return []

    def on_tick(self, now: float) -> list[CloudEvent]:
        """The time trigger: confirm what is pending once `every` has passed."""
        every = self.machine.confirm.every
        if every is None or self.state.last_confirmed_at is None:
            return []
        if now - self.state.last_confirmed_at < every:
            return []
        if self.state.good.pending == 0 and self.state.scrap.pending == 0:
            self.state.last_confirmed_at = now
            return []
        return self._confirm(now, "time")

    def _confirm(self, at: float, trigger: str) -> list[CloudEvent]:
        order = self.machine.order
        good, scrap = self.state.good, self.state.scrap
        if order is None:
            # Unassigned production stays counted in the state (and reported), never posted.
            good.confirmed, scrap.confirmed = good.total, scrap.total
            self.state.last_confirmed_at = at
            return []
        self.state.sequence += 1
        uom = self.machine.confirm.uom
        data = ProductionConfirmation(
            site=self.site,
            machine_id=self.machine.id,
            work_center=self.machine.line,
            order_id=order.order_id,
            operation=order.operation,
            material=order.material,
            lot_id=order.lot_id,
            yield_quantity=Quantity.of(good.pending, uom, uom_codes=self.uom_codes),
            scrap_quantity=Quantity.of(scrap.pending, uom, uom_codes=self.uom_codes),
            counter_from=good.confirmed,
            counter_to=good.total,
            is_final=False,
            trigger=trigger,  # type: ignore[arg-type]
            occurred_at=datetime.fromtimestamp(at, UTC),
        )
        event = build_event(
            data,
            natural_key=(self.site, self.machine.id, order.order_id, order.operation,
                         good.confirmed, good.total, scrap.confirmed, scrap.total),
            subject=f"{order.order_id}/{order.operation}",
            partitionkey=order.order_id,
            sequence=self.state.sequence,
        )
        good.confirmed, scrap.confirmed = good.total, scrap.total
        self.state.last_confirmed_at = at
        return [event]


def _load_state(saved: str | None) -> RuleState:
    if not saved:
        return RuleState(good=Counter(), scrap=Counter())
    raw = json.loads(saved)
    return RuleState(
        good=Counter(**raw["good"]),
        scrap=Counter(**raw["scrap"]),
        sequence=raw.get("sequence", 0),
        last_confirmed_at=raw.get("last_confirmed_at"),
        unassigned=raw.get("unassigned", 0),
    )
