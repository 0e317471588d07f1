"""Order binding: an order and operation bound by the MES (or fixed in the config), its start in
Execute, its completion with the sum of its confirmations, and its end.
"""

from __future__ import annotations

import logging
from typing import Literal

from edge.config.models import OrderBinding
from edge.model.envelope import CloudEvent
from edge.model.events import OperationCompleted, OperationStarted
from edge.model.quantities import Quantity
from edge.rules.counters import Counting
from edge.rules.state import Binding, ms, utc

log = logging.getLogger(__name__)


class Orders(Counting):
    """Binds orders to the machine and ends them."""

    def _bind_from_config(self, order: OrderBinding) -> None:
        binding = self.state.binding
        if binding is not None and (
            binding.source == "mes"
            or (binding.order_id, binding.operation) == (order.order_id, order.operation)
        ):
            return  # already bound; and what MES bound since wins over the config
        if binding is not None:
            log.warning(
                "Machine %s: the config now binds %s/%s instead of %s/%s; what was "
                "pending is kept as unassigned",
                self.machine.id,
                order.order_id,
                order.operation,
                binding.order_id,
                binding.operation,
            )
            self.state.binding = None
        self._bind(order, "config", 0.0)

    def _bind(
        self, order: OrderBinding, source: Literal["config", "mes"], at: float
    ) -> list[CloudEvent]:
        state = self.state
        events = self._confirm(at, "state_change")  # nothing bound: pending is unassigned
        if self._part is not None and self._counter(self._part).pending:
            # The two counters disagree on what came before this order: not this order's.
            part = self._counter(self._part)
            log.warning(
                "Machine %s: %d %s unit(s) counted beyond processed before order %s "
                "are kept as unassigned",
                self.machine.id,
                part.pending,
                "defective" if self._part == "scrap" else "good",
                order.order_id,
            )
            if self._part == "scrap":
                state.unassigned_scrap += part.pending
            else:
                state.unassigned += part.pending
            part.confirmed = part.total
        state.binding = Binding(
            order.order_id, order.operation, order.material, order.lot_id, source, at
        )
        self.needs_save = True
        return events

    def _started(self, binding: Binding, at: float) -> list[CloudEvent]:
        binding.started_at = at
        return [
            self._event(
                OperationStarted(**self._operation_fields(binding, at), material=binding.material),
                binding,
                ("started", ms(binding.bound_at)),
            )
        ]

    def _complete(self, binding: Binding, at: float) -> list[CloudEvent]:
        events = self._confirm(at, "order_end", final=True)
        uom = self.machine.confirm.uom
        binding.completed = True
        binding.interrupted_at = None
        events.append(
            self._event(
                OperationCompleted(
                    **self._operation_fields(binding, at),
                    material=binding.material,
                    lot_id=binding.lot_id,
                    started_at=utc(binding.started_at) if binding.started_at is not None else None,
                    yield_quantity=Quantity.of(
                        binding.yield_confirmed, uom, uom_codes=self.uom_codes
                    ),
                    scrap_quantity=Quantity.of(
                        binding.scrap_confirmed, uom, uom_codes=self.uom_codes
                    ),
                ),
                binding,
                ("completed", ms(binding.bound_at)),
            )
        )
        return events

    def _end_binding(self, at: float) -> list[CloudEvent]:
        binding = self.state.binding
        assert binding is not None
        events = [] if binding.completed else self._complete(binding, at)
        self.state.binding = None
        self.state.last_ended = [binding.order_id, binding.operation]
        self.needs_save = True
        return events + self._confirm(at, "order_end")  # counted after Complete: unassigned
