"""Process limits: an inspection request (and a nonconformance where configured) once per
excursion and order; a value that is not a number is neither a breach nor a recovery.
"""

from __future__ import annotations

import logging
from typing import Any

from edge.config.models import LimitConfig
from edge.model.envelope import CloudEvent
from edge.model.events import InspectionRequested, NonconformanceRaised
from edge.model.quantities import SignedQuantity
from edge.rules.core import RuleCore
from edge.rules.state import Excursion, ms, utc

log = logging.getLogger(__name__)


class LimitWatch(RuleCore):
    """Watches process values against their limits."""

    def _limit_sample(
        self, index: int, limit: LimitConfig, value: float | None, at: float
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

    def _raise_if_due(
        self, index: int, limit: LimitConfig, excursion: Excursion, at: float
    ) -> list[CloudEvent]:
        """Raise an excursion that lasted `for`, once for each order bound while it lasts."""
        key = self._binding_key()
        if excursion.unknown or at - excursion.since < limit.for_ or excursion.raised_for == key:
            return []
        if not key and excursion.raised_for is not None:
            return []  # raised (or counted) before; with no order bound now, nothing new
        return self._raise(index, limit, excursion, at)

    def _raise(
        self, index: int, limit: LimitConfig, excursion: Excursion, at: float
    ) -> list[CloudEvent]:
        excursion.raised_for = self._binding_key()
        self.needs_save = True
        binding = self.state.binding
        if binding is None:
            self.state.unassigned_excursions += 1
            log.warning(
                "Machine %s: %s outside its limits with no order bound; counted, and "
                "raised for the next order bound while it lasts (the QMS needs an "
                "order or a lot)",
                self.machine.id,
                limit.signal,
            )
            return []
        characteristic = limit.characteristic or limit.signal
        bounds = f"[{_text(limit.low) or '-inf'}, {_text(limit.high) or '+inf'}]"
        reason = (
            f"{limit.signal} = {_text(excursion.value)} outside {bounds} "
            f"for {at - excursion.since:g}s"
        )
        common: dict[str, Any] = {
            "site": self.site,
            "machine_id": self.machine.id,
            "work_center": self.machine.line,
            "order_id": binding.order_id,
            "operation": binding.operation,
            "material": binding.material,
            "lot_id": binding.lot_id,
            "occurred_at": utc(at),
        }
        key = ("limit", index, ms(excursion.since))
        events = []
        if limit.raise_ in ("inspection", "both"):
            events.append(
                self._event(
                    InspectionRequested(
                        **common,
                        trigger="limit_violation",
                        characteristic=characteristic,
                        measured_value=self._signed(excursion.value, limit.uom),
                        lower_limit=self._signed(limit.low, limit.uom),
                        upper_limit=self._signed(limit.high, limit.uom),
                        reason_text=reason,
                    ),
                    binding,
                    key,
                )
            )
        if limit.raise_ in ("nonconformance", "both"):
            events.append(
                self._event(
                    NonconformanceRaised(
                        **common,
                        defect_code=limit.defect_code,
                        severity=limit.severity,
                        description_text=reason,
                    ),
                    binding,
                    key,
                )
            )
        return events

    def _signed(self, value: float | None, uom: str) -> SignedQuantity | None:
        if value is None:
            return None
        return SignedQuantity.of(_text(value), uom, uom_codes=self.uom_codes)


def _beyond(value: float, limit: LimitConfig) -> float:
    """How far outside its limits a value is (0 inside)."""
    return max(
        0.0,
        (limit.low - value) if limit.low is not None else 0.0,
        (value - limit.high) if limit.high is not None else 0.0,
    )


def _text(value: float | None) -> str:
    if value is None:
        return ""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text
