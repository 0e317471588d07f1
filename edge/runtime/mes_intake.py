"""MES intake: what an MES message on the plant's broker becomes. An order start or end binds
or releases a machine's order (checked against the ERP's release and the destination profile
first); a milestone message (lot produced, lot disposition, ...) becomes its canonical event,
with the produced lot's genealogy checked against the order's required materials and a QMS
inspection requested for it. A message that cannot be used gets the reason it becomes an input
dead letter. `MesIntake` is a part of `edge.runtime.pipeline.Pipeline`, which commits what
these produce; the per-order `Genealogy` it feeds is saved with the pipeline's state.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from buffer.outbox import LotStatus
from drivers.base import MesMessage
from edge.config.errors import format_loc
from edge.config.models import PlantConfig
from edge.forward.profiles import input_problems
from edge.model.codes import UOM_CODES_CONTEXT_KEY
from edge.model.envelope import CloudEvent, build_event
from edge.model.event_data import EventData
from edge.model.events import (
    EVENT_MODELS,
    InspectionRequested,
    LotDisposition,
    LotProduced,
)
from edge.model.ids import source_key
from edge.orders.book import OrderBook
from edge.rules.machine import MachineRule
from edge.rules.mes import MES_INPUT_MODELS, OrderEnded, OrderStarted

log = logging.getLogger(__name__)

KEEP_ORDERS = 500
"""Orders remembered for validation and genealogy figures (the most recent ones)."""
KEEP_LOTS_PER_ORDER = 1000
"""Produced lots remembered one by one per order (the most recent ones, also after a restart:
the state keeps their order), for a redelivered report to keep the first one's verdict.
An order that runs for months (a repetitive or process order) would otherwise hold every lot
it ever produced, in memory and in the state dumped with every commit; older lots are folded
into the order's counts instead."""


class Genealogy:
    """Per order: the materials every produced lot must name an input lot of, and each
    produced lot's completeness. Plain data, saved with the pipeline's state."""

    def __init__(self, saved: str | None) -> None:
        self.orders: dict[str, dict[str, Any]] = json.loads(saved) if saved else {}

    def require(self, order_id: str, components: Sequence[str]) -> None:
        entry = self.orders.setdefault(order_id, {"required": [], "lots": {}})
        entry["required"] = sorted(set(entry["required"]) | set(components))
        self._trim()

    def produced(self, order_id: str | None, lot_id: str, inputs: Sequence[str]) -> bool:
        if order_id is None:
            return True
        entry = self.orders.setdefault(order_id, {"required": [], "lots": {}})
        if lot_id in entry["lots"]:
            return bool(entry["lots"][lot_id])  # a redelivery: the first report stands
        complete = set(entry["required"]) <= set(inputs)
        lots = entry["lots"]
        lots[lot_id] = complete
        if len(lots) > KEEP_LOTS_PER_ORDER:
            # The oldest lot's verdict goes into the order's counts ("folded": lots,
            # complete), so the figures stay exact; only its redelivery would count again.
            folded = entry.setdefault("folded", [0, 0])
            oldest = next(iter(lots))
            folded[0] += 1
            folded[1] += bool(lots.pop(oldest))
        self._trim()
        return complete

    def figures(self) -> dict[str, dict[str, Any]]:
        result = {}
        for order_id, entry in self.orders.items():
            lots = entry["lots"]
            folded_lots, folded_complete = entry.get("folded", (0, 0))
            count = len(lots) + folded_lots
            if count:
                complete = sum(1 for ok in lots.values() if ok) + folded_complete
                result[order_id] = {
                    "lots": count,
                    "complete": complete,
                    "completeness": round(complete / count, 4),
                }
        return result

    def dump(self) -> str:
        # In insertion order (not sorted): after a restart the oldest order and the oldest
        # lot of an order are still the first ones, which the bounds drop.
        return json.dumps(self.orders, separators=(",", ":"))

    def _trim(self) -> None:
        while len(self.orders) > KEEP_ORDERS:
            self.orders.pop(next(iter(self.orders)))


class MesIntake:
    """The pipeline's MES messages into events (the pipeline sets these attributes up)."""

    config: PlantConfig
    known_orders: dict[str, float]
    genealogy: Genealogy
    order_book: OrderBook | None
    _by_machine: dict[str, MachineRule]
    _mes_sequence: int
    _lots: list[LotStatus]
    _followups: list[CloudEvent]
    _order_inputs: list[OrderStarted | OrderEnded]

    def _mes(self, message: MesMessage) -> tuple[list[CloudEvent], MachineRule | None, str | None]:
        """What an MES message produces: events, the rule whose state it moved, or why it
        cannot be used (it then becomes an input dead letter)."""
        fields = {"occurred_at": datetime.fromtimestamp(message.received_at, UTC), **message.fields}
        site = fields.setdefault("site", self.config.site)
        if site != self.config.site:
            return [], None, f"site {site!r} is not this plant ({self.config.site})"
        if message.kind in MES_INPUT_MODELS:
            return self._order_input(message, fields)
        event, problem = self._mes_event(message, fields)
        return ([event] if event else []), None, problem

    def _order_input(
        self, message: MesMessage, fields: dict[str, Any]
    ) -> tuple[list[CloudEvent], MachineRule | None, str | None]:
        try:
            order = MES_INPUT_MODELS[message.kind].model_validate(fields)
        except ValidationError as exc:
            return [], None, _problems(exc)
        rule = self._by_machine.get(order.machine_id)
        if rule is None:
            return [], None, f"no machine {order.machine_id!r} is configured"
        if isinstance(order, OrderStarted):
            # The binding ends up in every confirmation of the order: refuse it now if the
            # ERP would refuse those (a batch longer than SAP's 10 characters...).
            problem = input_problems(
                self.config,
                "production.confirmation",
                {"site": self.config.site, **order.binding().model_dump()},
            )
            if problem is not None:
                return [], None, problem
        at = order.occurred_at.timestamp()
        if isinstance(order, OrderStarted) and self.order_book is not None:
            problem = self.order_book.started(
                order.order_id,
                at,
                message_id=message.message_id,
                require_released=self.config.validation.require_released_order,
            )
            if problem is not None:
                return [], None, problem
        if isinstance(order, OrderStarted):
            self._order_inputs.append(order)
            self.known_orders.setdefault(order.order_id, at)
            while len(self.known_orders) > KEEP_ORDERS:
                self.known_orders.pop(next(iter(self.known_orders)))
            if order.components:
                self.genealogy.require(order.order_id, order.components)
            return rule.start_order(order.binding(), at), rule, None
        assert isinstance(order, OrderEnded)
        events, problem = rule.end_order(order.order_id, order.operation, at)
        if problem is None:
            # An end that names no operation ended the bound one: say which, for the ledger.
            ended = order.operation or next(
                (str(e.data["operation"]) for e in events if e.data.get("operation")), None
            )
            self._order_inputs.append(order.model_copy(update={"operation": ended}))
        return events, rule, problem

    def _mes_event(
        self, message: MesMessage, fields: dict[str, Any]
    ) -> tuple[CloudEvent | None, str | None]:
        """The canonical event of an MES milestone message, or why it cannot be one."""
        model = EVENT_MODELS.get(message.kind)
        if model is None:
            return None, f"no canonical event type {message.kind!r}"
        try:
            data = model.model_validate(
                fields, context={UOM_CODES_CONTEXT_KEY: self.config.all_uom_codes}
            )
        except ValidationError as exc:
            return None, _problems(exc)
        problem = input_problems(self.config, message.kind, data.model_dump(mode="json"))
        if problem is not None:
            return None, problem
        if (
            data.order_id is not None
            and data.order_id not in self.known_orders
            and (self.config.validation.require_known_order)
        ):
            return None, (
                f"order {data.order_id!r} is not known: no machine was bound to it "
                "(validation.require_known_order)"
            )
        if isinstance(data, LotProduced):
            complete = self.genealogy.produced(
                data.order_id, data.lot_id, [lot.material for lot in data.input_lots]
            )
            if not complete:
                log.warning(
                    "Lot %s of order %s names no input lot of some required material: "
                    "its genealogy is incomplete",
                    data.lot_id,
                    data.order_id,
                    extra={"lot_id": data.lot_id, "order_id": data.order_id},
                )
        if isinstance(data, LotDisposition):
            self._lots.append(
                LotStatus(
                    data.lot_id,
                    data.disposition,
                    data.occurred_at.timestamp(),
                    data.disposition_source,
                    data.order_id,
                    data.material,
                )
            )
        key = data.order_id or getattr(data, "lot_id", None) or message.driver
        event = self._build(
            data,
            source_key(self.config.site, message.kind, message.message_id),
            key,
            f"mes:{message.driver}",
            message.message_id,
        )
        if isinstance(data, LotProduced):
            self._lot_produced(data, event)
        return event, None

    def _build(
        self,
        data: EventData,
        natural_key: tuple[str | int, ...],
        key: str,
        source: str,
        message_id: str | None = None,
    ) -> CloudEvent:
        self._mes_sequence += 1
        return build_event(
            data,
            natural_key=natural_key,
            subject=key,
            partitionkey=key,
            sequence=self._mes_sequence,
            source=f"urn:plantsync:{self.config.site}:{source}",
            source_message_id=message_id,
        )

    def _lot_produced(self, data: LotProduced, event: CloudEvent) -> None:
        """A produced lot is on hold until quality decides; the QMS is asked to inspect it."""
        if not self.config.quality.inspect_produced_lots:
            return
        at = data.occurred_at.timestamp()
        self._lots.append(
            LotStatus(
                data.lot_id,
                "hold",
                at,
                "produced, awaiting quality",
                data.order_id,
                data.material,
                decided=False,
            )
        )
        request = InspectionRequested(
            site=data.site,
            order_id=data.order_id,
            lot_id=data.lot_id,
            material=data.material,
            occurred_at=data.occurred_at,
            trigger="lot_completed",
            reason_text=f"lot {data.lot_id} completed",
        )
        self._followups.append(
            self._build(
                request,
                source_key(self.config.site, "lot-inspection", data.lot_id),
                data.lot_id,
                "quality",
                event.sourcemessageid,
            )
        )


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{format_loc(tuple(e['loc']))}: {str(e['msg']).removeprefix('Value error, ')}"
        for e in exc.errors()
    )
