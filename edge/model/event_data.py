"""What every event's data has in common: `EventData`, the fields of every milestone (site,
machine, work center, order, operation, when it happened) with its CloudEvents type, version and
outbox priority class; and the field definitions the event models share, so that an order
number, a material or a lot is spelled the same way in every event type.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)

from edge.model.ids import EventType, Priority
from edge.model.quantities import UtcDateTime

_IDENTIFIER = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"

_SITE = Field(
    description="Plant code as ERP knows it.", pattern=r"^[A-Za-z0-9]{1,10}$", examples=["1010"]
)
_MACHINE_ID = Field(
    description="Machine (equipment) name as configured in the gateway.",
    pattern=_IDENTIFIER,
    max_length=64,
    examples=["press-01"],
)
_WORK_CENTER = Field(
    description="Work center or line the machine belongs to.",
    min_length=1,
    max_length=40,
    examples=["LINE-A"],
)
_ORDER_ID = Field(
    description="Production (process) order number from ERP.",
    pattern=_IDENTIFIER,
    max_length=40,
    examples=["000001000123"],
)
_OPERATION = Field(
    description="Operation (activity) number in the order's routing.",
    pattern=r"^\d{4}$",
    examples=["0010"],
)
_MATERIAL = Field(
    description="Material (article) number.",
    pattern=_IDENTIFIER,
    max_length=40,
    examples=["FG-4711"],
)
_LOT_ID = Field(
    description="Lot (batch) number.", pattern=_IDENTIFIER, max_length=40, examples=["L24-0815"]
)
_REASON_CODE = Field(
    description="Reason code from the plant's catalogue.",
    min_length=1,
    max_length=20,
    examples=["MAT-SHORT"],
)
_REASON_TEXT = Field(
    description="Free text from the operator or the source system.", min_length=1, max_length=500
)
_MACHINE_STATE = Field(
    description="Machine state when it happened, e.g. a PackML state name.",
    min_length=1,
    max_length=40,
    examples=["Held", "Stopped"],
)
_CHARACTERISTIC = Field(
    description="Inspection characteristic (what is measured), e.g. the signal name.",
    min_length=1,
    max_length=80,
    examples=["press-01.force"],
)
_INSPECTION_ID = Field(
    description="Inspection lot number in the QMS, once it has one.",
    pattern=_IDENTIFIER,
    max_length=40,
)
_OCCURRED_AT = Field(
    description="When it happened at the source (machine or MES clock), UTC; the event's `time`."
)


def _require_order_or_lot(order_id: str | None, lot_id: str | None) -> None:
    if order_id is None and lot_id is None:
        raise ValueError("needs an order_id or a lot_id to say what it is about")


def _not_after_occurrence(moment: datetime | None, occurred_at: datetime, *, what: str) -> None:
    if moment is not None and moment > occurred_at:
        raise ValueError(f"{what} must not be after occurred_at")


class EventData(BaseModel):
    """Fields common to every milestone; subclasses are the versioned `data` of one type."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    EVENT_TYPE: ClassVar[EventType]
    VERSION: ClassVar[int] = 1
    PRIORITY: ClassVar[Priority]

    site: Annotated[str, _SITE]
    machine_id: Annotated[str | None, _MACHINE_ID] = None
    work_center: Annotated[str | None, _WORK_CENTER] = None
    order_id: Annotated[str | None, _ORDER_ID] = None
    operation: Annotated[str | None, _OPERATION] = None
    occurred_at: Annotated[UtcDateTime, _OCCURRED_AT]

    @classmethod
    def dataschema(cls) -> str:
        """The CloudEvents `dataschema` of this type and version."""
        return f"urn:plantsync:schema:{cls.EVENT_TYPE}:{cls.VERSION}"

    @classmethod
    def schema_file_name(cls) -> str:
        """File name of this model's exported JSON Schema."""
        return f"{cls.EVENT_TYPE}.v{cls.VERSION}.json"
