"""The data of each event type: one versioned pydantic model per CloudEvents `type`
(`EVENT_MODELS`), with its outbox priority class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, ClassVar, Final, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

from edge.model.event_data import (
    _CHARACTERISTIC,
    _INSPECTION_ID,
    _LOT_ID,
    _MACHINE_ID,
    _MACHINE_STATE,
    _MATERIAL,
    _OPERATION,
    _ORDER_ID,
    _REASON_CODE,
    _REASON_TEXT,
    EventData,
    _not_after_occurrence,
    _require_order_or_lot,
)
from edge.model.ids import EventType, Priority
from edge.model.order_events import OrderCancelled, OrderChanged, OrderReleased
from edge.model.quantities import Quantity, SignedQuantity, UtcDateTime, _same_uom

__all__ = [
    "EVENT_MODELS",
    "DataQuality",
    "DowntimeRecorded",
    "InputLot",
    "InspectionRequested",
    "InspectionResult",
    "LotDisposition",
    "LotProduced",
    "MaterialConsumed",
    "NonconformanceRaised",
    "OperationCompleted",
    "OperationInterrupted",
    "OperationResumed",
    "OperationStarted",
    "ProductionConfirmation",
    "SourceGap",
    "priority_of",
]


class SourceGap(BaseModel):
    """A time in which the gateway could not read the machine's state: the connection to the
    device was lost, the state tag read bad, or the gateway itself was down."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    started_at: UtcDateTime = Field(description="Last moment the state was known, UTC.")
    ended_at: UtcDateTime = Field(description="When the state was read again, UTC.")

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.ended_at < self.started_at:
            raise ValueError("ended_at must not be before started_at")
        return self


DataQuality = Literal["good", "uncertain"]

_DATA_QUALITY_DOC = (
    "good: derived from an uninterrupted reading of the machine's state. uncertain: derived "
    "across a gap in the state source (source_gap); what the machine did within the gap is not "
    "known, so times may be off by up to the gap's length."
)
_SOURCE_GAP_DOC = "For uncertain data: the gap in the state source the event was derived across."


def _quality_has_gap(data_quality: DataQuality, source_gap: SourceGap | None) -> None:
    if (data_quality == "uncertain") != (source_gap is not None):
        raise ValueError("data_quality is uncertain exactly when a source_gap is given")


class _OperationEventData(EventData):
    """A milestone of one operation of one order on one machine."""

    machine_id: Annotated[str, _MACHINE_ID]
    order_id: Annotated[str, _ORDER_ID]
    operation: Annotated[str, _OPERATION]


class OperationStarted(_OperationEventData):
    """An operation of an order started on a machine."""

    EVENT_TYPE: ClassVar[EventType] = "operation.started"
    PRIORITY: ClassVar[Priority] = Priority.INFORMATIONAL

    material: Annotated[str | None, _MATERIAL] = None
    planned_quantity: Quantity | None = Field(
        default=None, description="Quantity the order plans for this operation, if known."
    )


class OperationInterrupted(_OperationEventData):
    """A running operation stopped before completion: the machine left Execute for a state
    that leads away from it (PackML Holding, Suspending, Stopping, Aborting...).

    Version 2 added `data_quality` and `source_gap`.
    """

    EVENT_TYPE: ClassVar[EventType] = "operation.interrupted"
    VERSION: ClassVar[int] = 2
    PRIORITY: ClassVar[Priority] = Priority.INFORMATIONAL

    machine_state: Annotated[str | None, _MACHINE_STATE] = None
    reason_code: Annotated[str | None, _REASON_CODE] = None
    reason_text: Annotated[str | None, _REASON_TEXT] = None
    data_quality: DataQuality = Field(default="good", description=_DATA_QUALITY_DOC)
    source_gap: SourceGap | None = Field(default=None, description=_SOURCE_GAP_DOC)

    @model_validator(mode="after")
    def _quality(self) -> Self:
        _quality_has_gap(self.data_quality, self.source_gap)
        return self


class OperationResumed(_OperationEventData):
    """An interrupted operation is running again (the machine is back in Execute).

    Version 2 added `data_quality` and `source_gap`.
    """

    EVENT_TYPE: ClassVar[EventType] = "operation.resumed"
    VERSION: ClassVar[int] = 2
    PRIORITY: ClassVar[Priority] = Priority.INFORMATIONAL

    interrupted_at: UtcDateTime | None = Field(
        default=None, description="When the interruption began, UTC, if known."
    )
    data_quality: DataQuality = Field(default="good", description=_DATA_QUALITY_DOC)
    source_gap: SourceGap | None = Field(default=None, description=_SOURCE_GAP_DOC)

    @model_validator(mode="after")
    def _interruption_before_resumption(self) -> Self:
        _not_after_occurrence(self.interrupted_at, self.occurred_at, what="interrupted_at")
        _quality_has_gap(self.data_quality, self.source_gap)
        return self


class OperationCompleted(_OperationEventData):
    """An operation finished; totals are for the whole operation."""

    EVENT_TYPE: ClassVar[EventType] = "operation.completed"
    PRIORITY: ClassVar[Priority] = Priority.BUSINESS

    material: Annotated[str | None, _MATERIAL] = None
    lot_id: Annotated[str | None, _LOT_ID] = None
    started_at: UtcDateTime | None = Field(
        default=None, description="When the operation started, UTC, if known."
    )
    yield_quantity: Quantity = Field(description="Total good quantity of the operation.")
    scrap_quantity: Quantity = Field(description="Total scrap quantity of the operation.")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        _same_uom(self.yield_quantity, self.scrap_quantity)
        _not_after_occurrence(self.started_at, self.occurred_at, what="started_at")
        return self


class ProductionConfirmation(_OperationEventData):
    """Yield and scrap produced over a range of the machine's counter, to be booked in ERP.

    Consecutive confirmations of a machine cover adjacent counter ranges `[counter_from,
    counter_to)`, so none is counted twice and none is lost; the range is part of the natural
    key of the event id.
    """

    EVENT_TYPE: ClassVar[EventType] = "production.confirmation"
    PRIORITY: ClassVar[Priority] = Priority.BUSINESS

    material: Annotated[str | None, _MATERIAL] = None
    lot_id: Annotated[str | None, _LOT_ID] = None
    yield_quantity: Quantity = Field(description="Good quantity confirmed.")
    scrap_quantity: Quantity = Field(description="Scrap quantity confirmed.")
    counter_from: int = Field(
        strict=True, ge=0, description="First unit of the machine's monotonic count covered."
    )
    counter_to: int = Field(
        strict=True, ge=0, description="End of the covered count, exclusive: [from, to)."
    )
    is_final: bool = Field(
        strict=True, description="True for the last confirmation of the operation."
    )
    trigger: Literal["units", "time", "state_change", "order_end"] = Field(
        description="What made the gateway confirm: a unit count, a period, a state change, "
        "or the end of the order."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.counter_to < self.counter_from:
            raise ValueError("counter_to must not be below counter_from")
        _same_uom(self.yield_quantity, self.scrap_quantity)
        return self


class InputLot(BaseModel):
    """One input of a produced lot: which lot of which material, and how much went in."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lot_id: Annotated[str, _LOT_ID]
    material: Annotated[str, _MATERIAL]
    quantity: Quantity = Field(description="Quantity of the input lot that went in.")


class MaterialConsumed(EventData):
    """Material was issued to an order (goods issue)."""

    EVENT_TYPE: ClassVar[EventType] = "material.consumed"
    PRIORITY: ClassVar[Priority] = Priority.BUSINESS

    order_id: Annotated[str, _ORDER_ID]
    material: Annotated[str, _MATERIAL]
    lot_id: Annotated[str | None, _LOT_ID] = None
    quantity: Quantity = Field(description="Quantity consumed.")
    storage_location: str | None = Field(
        default=None,
        min_length=1,
        max_length=20,
        description="Storage location the material was taken from.",
        examples=["0001"],
    )


class LotProduced(EventData):
    """A lot was produced, with its genealogy (the input lots that went into it)."""

    EVENT_TYPE: ClassVar[EventType] = "lot.produced"
    PRIORITY: ClassVar[Priority] = Priority.BUSINESS

    material: Annotated[str, _MATERIAL]
    lot_id: Annotated[str, _LOT_ID]
    quantity: Quantity = Field(description="Quantity of the produced lot.")
    input_lots: tuple[InputLot, ...] = Field(
        default=(), description="Genealogy: the lots consumed to make this lot."
    )


class DowntimeRecorded(EventData):
    """A machine stood still for a closed period: from leaving Execute until it was back in
    Execute, labelled by the state it settled in (PackML Held, Suspended, Stopped...).

    A period that spans a gap in the state source is `uncertain`, with the gap; it never spans
    production the counters confirmed: when units were counted across the gap, the period ends
    where the gap began (and a new one starts where it ended, if the machine was still down).
    Version 2 added `data_quality` and `source_gap`.
    """

    EVENT_TYPE: ClassVar[EventType] = "downtime.recorded"
    VERSION: ClassVar[int] = 2
    PRIORITY: ClassVar[Priority] = Priority.INFORMATIONAL

    machine_id: Annotated[str, _MACHINE_ID]
    started_at: UtcDateTime = Field(description="When the machine stopped, UTC.")
    ended_at: UtcDateTime = Field(description="When the machine ran again, UTC.")
    duration_seconds: float = Field(
        ge=0,
        allow_inf_nan=False,
        description="ended_at minus started_at, in seconds (to the millisecond).",
    )
    category: Literal["planned", "unplanned", "unclassified"] = Field(
        default="unclassified", description="Planned (changeover, break) or unplanned stop."
    )
    machine_state: Annotated[str | None, _MACHINE_STATE] = None
    reason_code: Annotated[str | None, _REASON_CODE] = None
    reason_text: Annotated[str | None, _REASON_TEXT] = None
    data_quality: DataQuality = Field(default="good", description=_DATA_QUALITY_DOC)
    source_gap: SourceGap | None = Field(default=None, description=_SOURCE_GAP_DOC)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.ended_at < self.started_at:
            raise ValueError("ended_at must not be before started_at")
        expected = (self.ended_at - self.started_at).total_seconds()
        if not math.isclose(self.duration_seconds, expected, abs_tol=0.001):
            raise ValueError(f"duration_seconds must be ended_at - started_at ({expected})")
        _quality_has_gap(self.data_quality, self.source_gap)
        return self


class _QualityEventData(EventData):
    """A quality milestone about an order, a lot, or both."""

    material: Annotated[str | None, _MATERIAL] = None
    lot_id: Annotated[str | None, _LOT_ID] = None

    @model_validator(mode="after")
    def _about_order_or_lot(self) -> Self:
        _require_order_or_lot(self.order_id, self.lot_id)
        return self


class InspectionRequested(_QualityEventData):
    """The gateway asks the QMS to inspect (a limit was violated, a lot was completed...)."""

    EVENT_TYPE: ClassVar[EventType] = "inspection.requested"
    PRIORITY: ClassVar[Priority] = Priority.QUALITY

    trigger: Literal["limit_violation", "lot_completed", "periodic", "manual"] = Field(
        description="Why the inspection is requested."
    )
    characteristic: Annotated[str | None, _CHARACTERISTIC] = None
    measured_value: SignedQuantity | None = Field(
        default=None, description="The value that violated a limit, for limit_violation."
    )
    lower_limit: SignedQuantity | None = Field(default=None, description="Lower limit, if any.")
    upper_limit: SignedQuantity | None = Field(default=None, description="Upper limit, if any.")
    reason_text: Annotated[str | None, _REASON_TEXT] = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.trigger == "limit_violation" and (
            self.characteristic is None or self.measured_value is None
        ):
            raise ValueError("a limit_violation needs its characteristic and measured_value")
        _check_limits(self.measured_value, self.lower_limit, self.upper_limit)
        return self


class InspectionResult(_QualityEventData):
    """The outcome of inspecting one characteristic."""

    EVENT_TYPE: ClassVar[EventType] = "inspection.result"
    PRIORITY: ClassVar[Priority] = Priority.QUALITY

    inspection_id: Annotated[str | None, _INSPECTION_ID] = None
    characteristic: Annotated[str, _CHARACTERISTIC]
    measured_value: SignedQuantity | None = Field(
        default=None, description="Measured value; absent for a pass/fail (attribute) check."
    )
    lower_limit: SignedQuantity | None = Field(default=None, description="Lower limit, if any.")
    upper_limit: SignedQuantity | None = Field(default=None, description="Upper limit, if any.")
    result: Literal["pass", "fail"] = Field(description="Verdict on the characteristic.")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        _check_limits(self.measured_value, self.lower_limit, self.upper_limit)
        return self


def _check_limits(
    measured: SignedQuantity | None, lower: SignedQuantity | None, upper: SignedQuantity | None
) -> None:
    _same_uom(measured, lower, upper)
    if lower is not None and upper is not None and lower.as_decimal() > upper.as_decimal():
        raise ValueError("lower_limit must not be above upper_limit")


class NonconformanceRaised(_QualityEventData):
    """A defect was found and recorded as a nonconformance."""

    EVENT_TYPE: ClassVar[EventType] = "nonconformance.raised"
    PRIORITY: ClassVar[Priority] = Priority.QUALITY

    defect_code: str = Field(
        min_length=1,
        max_length=20,
        description="Defect code from the plant's catalogue.",
        examples=["SCRATCH"],
    )
    severity: Literal["minor", "major", "critical"] = Field(description="How bad the defect is.")
    affected_quantity: Quantity | None = Field(
        default=None, description="Quantity affected, if known."
    )
    description_text: str | None = Field(
        default=None, min_length=1, max_length=500, description="What was found, in words."
    )


class LotDisposition(_QualityEventData):
    """The usage decision on a lot: release it, hold it, or reject it."""

    EVENT_TYPE: ClassVar[EventType] = "lot.disposition"
    PRIORITY: ClassVar[Priority] = Priority.QUALITY

    lot_id: Annotated[str, _LOT_ID]
    disposition: Literal["release", "hold", "reject"] = Field(
        description="release: usable stock; hold: blocked pending a decision; reject: scrap "
        "or rework."
    )
    disposition_source: Literal["qms", "mes", "operator"] = Field(
        description="Who decided: the QMS, the MES, or an operator at the gateway."
    )
    inspection_id: Annotated[str | None, _INSPECTION_ID] = None
    quantity: Quantity | None = Field(
        default=None, description="Quantity the decision applies to, if not the whole lot."
    )
    reason_code: Annotated[str | None, _REASON_CODE] = None
    reason_text: Annotated[str | None, _REASON_TEXT] = None


EVENT_MODELS: Final[Mapping[str, type[EventData]]] = MappingProxyType(
    {
        model.EVENT_TYPE: model
        for model in (
            OperationStarted,
            OperationInterrupted,
            OperationResumed,
            OperationCompleted,
            ProductionConfirmation,
            MaterialConsumed,
            LotProduced,
            DowntimeRecorded,
            InspectionRequested,
            InspectionResult,
            NonconformanceRaised,
            LotDisposition,
            OrderReleased,
            OrderChanged,
            OrderCancelled,
        )
    }
)
"""The current data model of each event type, by CloudEvent `type`."""


def priority_of(event_type: str) -> int:
    """Return the outbox priority class of `event_type` (0 quality, 1 business, 2 informational)."""
    model = EVENT_MODELS.get(event_type)
    if model is None:
        raise ValueError(f"unknown event type {event_type!r}")
    return int(model.PRIORITY)
