"""Counters and confirmations: units counted against the bound order (or as unassigned
production), split into yield and scrap, and confirmed every N units, at the end of a period, on a
state change and at the order's end, always adding up to the counter's advance.
"""

from __future__ import annotations

import logging

from edge.model.envelope import CloudEvent
from edge.model.events import ProductionConfirmation
from edge.model.quantities import Quantity
from edge.rules.core import RuleCore
from edge.rules.state import CounterName, Trigger

log = logging.getLogger(__name__)


class Counting(RuleCore):
    """Counts units and confirms them."""

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
            log.warning(
                "Machine %s: %s counted %d units beyond %s at the end of the order; "
                "they are left to the processed count that catches up",
                self.machine.id,
                "defective" if self._part == "scrap" else "good",
                part - primary,
                "processed",
            )
        return (
            (primary - covered, covered) if self._part == "scrap" else (covered, primary - covered)
        )

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

    def _confirm(self, at: float, trigger: Trigger, *, final: bool = False) -> list[CloudEvent]:
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
        key = ("confirmation", first, last, part_first, part_last, "final" if final else "partial")
        return [self._event(data, binding, key)]
