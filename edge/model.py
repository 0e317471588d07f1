"""The canonical model: the one shape every business milestone takes between rules and targets.

A milestone is a CloudEvents 1.0 event in structured JSON mode (`CloudEvent`) whose `data` is
validated by a versioned pydantic model per event type (`EVENT_MODELS`); the models' JSON Schemas
are exported so that ERP and QMS teams can check payloads without reading Python. Quantities are
decimal strings with a UN/ECE Recommendation 20 unit code, never floats, so that ERP, MES and QMS
add up to the same number. An event's id is a UUIDv5 over its natural key, never random and never
time based: deriving it again after a crash gives the same id, which is what lets the outbox and
the receivers drop duplicates. Natural keys come in two kinds (`source_key`, `state_key`): what
a source system names (an MES message id, a lot id, a QMS decision) and what the gateway derives
from its own state, which carries the outbox's epoch so that a new outbox never reissues an id.
Nothing here does I/O except `write_schemas`, and nothing here keeps mutable state at package
level: extra unit codes come from configuration through the pydantic validation context (key
`UOM_CODES_CONTEXT_KEY`).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from enum import IntEnum
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Final, Literal, Self, get_args

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

__all__ = [
    "BUILTIN_UOM_CODES",
    "CLOUDEVENT_TYPE_PREFIX",
    "CLOUDEVENT_VERSION",
    "EVENT_ID_NAMESPACE",
    "EVENT_MODELS",
    "FINISHED_ORDER_STATUSES",
    "OFFLINE_EPOCH",
    "ORDER_EVENT_MODELS",
    "REC21_PACKAGE_CODES",
    "SEQUENCE_DIGITS",
    "UOM_CODES_CONTEXT_KEY",
    "CloudEvent",
    "DataQuality",
    "DowntimeRecorded",
    "EventData",
    "EventType",
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
    "OrderCancelled",
    "OrderChanged",
    "OrderComponent",
    "OrderOperation",
    "OrderReleased",
    "OrderStatus",
    "Priority",
    "ProductionConfirmation",
    "Quantity",
    "SignedQuantity",
    "SourceGap",
    "UomCode",
    "UtcDateTime",
    "build_event",
    "cloudevent_type",
    "event_id",
    "event_type_of",
    "format_sequence",
    "json_schemas",
    "priority_of",
    "source_key",
    "state_key",
    "validate_event_data",
    "write_schemas",
]

# --------------------------------------------------------------------------------------------
# Event types, priorities, ids
# --------------------------------------------------------------------------------------------

EventType = Literal[
    "operation.started",
    "operation.interrupted",
    "operation.resumed",
    "operation.completed",
    "production.confirmation",
    "material.consumed",
    "lot.produced",
    "downtime.recorded",
    "inspection.requested",
    "inspection.result",
    "nonconformance.raised",
    "lot.disposition",
    "order.released",
    "order.changed",
    "order.cancelled",
]
"""Every CloudEvent `type` the gateway emits."""

EVENT_ID_NAMESPACE: Final = uuid.UUID("2c271f3e-a0d6-5b13-92ec-d92edb3e29dd")
"""Namespace of event ids: `uuid5(NAMESPACE_URL, "urn:plantsync:event-id")`. Never change it:
every id already sent to ERP and QMS was derived under it."""

SEQUENCE_DIGITS: Final = 20
"""Width of the zero-padded `sequence` extension (enough for any unsigned 64-bit counter), so
that lexical order equals numeric order."""

UOM_CODES_CONTEXT_KEY: Final = "uom_codes"
"""Validation-context key holding extra UN/ECE Rec 20 codes allowed beyond `BUILTIN_UOM_CODES`,
for example `Quantity.model_validate(raw, context={UOM_CODES_CONTEXT_KEY: {"KGS"}})`."""

SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"


class Priority(IntEnum):
    """Outbox priority class: lower goes first when a destination has a backlog."""

    QUALITY = 0
    """Quality and disposition: a hold must reach ERP before more stock moves."""
    BUSINESS = 1
    """Confirmations, consumption, genealogy, completion: what ERP books."""
    INFORMATIONAL = 2
    """Start, interruption, resumption, downtime: useful, never blocking."""


def _escape_key_part(part: str | int) -> str:
    if isinstance(part, bool) or not isinstance(part, str | int):
        raise TypeError(f"natural key parts must be str or int, not {type(part).__name__}")
    # Escaping keeps the join injective: ("a|b", "c") and ("a", "b|c") must not meet.
    return str(part).replace("\\", "\\\\").replace("|", "\\|")


def event_id(event_type: str, *natural_key: str | int) -> str:
    """Return the id of the event of `event_type` identified by `natural_key`.

    The id is a UUIDv5 under `EVENT_ID_NAMESPACE` over `"event_type|part|part|..."` (a `|` or
    `\\` inside a part is escaped with a backslash). It depends on nothing else: no clock, no
    random number, no arrival order, so deriving it again after a crash gives the same id and the
    outbox and receivers see a duplicate, not a new event. Parts are rendered as text, so `10`
    and `"10"` are the same part. Put in the key whatever makes the milestone unique: site,
    machine, order, operation, counter range, MES message id.
    """
    if event_type not in EVENT_MODELS:
        raise ValueError(f"unknown event type {event_type!r}")
    if not natural_key:
        raise ValueError("an event id needs a natural key of at least one part")
    name = "|".join([event_type, *(_escape_key_part(part) for part in natural_key)])
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, name))


NaturalKey = tuple[str | int, ...]

OFFLINE_EPOCH: Final = "offline"
"""The epoch of events derived offline (`plantsync replay`, the golden cases, unit tests): fixed,
so that the same input gives the same ids on every run. A running gateway never uses it: its
epoch is its outbox's (`Outbox.epoch`), random and made with the database."""


def source_key(site: str, *names: str | int) -> NaturalKey:
    """The natural key of an event that a source system identifies: an MES message id, a lot id
    the MES named, a QMS decision on a lot. The same message or decision always gives the same
    id, in any outbox, so a redelivery after the outbox was lost is still a duplicate."""
    return (site, *names)


def state_key(epoch: str, site: str, machine_id: str, *parts: str | int) -> NaturalKey:
    """The natural key of an event the gateway derives from its own state: counter ranges and
    totals, the time an order was bound (0 for an order fixed in the config), transition
    times. That state starts from nothing when the outbox database is replaced (moved aside as
    damaged, or deleted), so the key carries the outbox's `epoch`: without it the new
    database would derive ids that receivers already hold for other units, and an idempotent
    receiver would drop the new ones as duplicates. Within one outbox the epoch never
    changes, so deriving an event again after a crash still gives the same id."""
    if not epoch:
        raise ValueError("a state key needs the outbox epoch")
    return ("epoch", epoch, site, machine_id, *parts)


def priority_of(event_type: str) -> int:
    """Return the outbox priority class of `event_type` (0 quality, 1 business, 2 informational)."""
    model = EVENT_MODELS.get(event_type)
    if model is None:
        raise ValueError(f"unknown event type {event_type!r}")
    return int(model.PRIORITY)


def format_sequence(sequence: int) -> str:
    """Render `sequence` as the CloudEvents `sequence` extension: 20 zero-padded digits."""
    if isinstance(sequence, bool) or not isinstance(sequence, int):
        raise TypeError("sequence must be an int")
    if not 0 <= sequence < 10**SEQUENCE_DIGITS:
        raise ValueError(f"sequence must be in [0, 10**{SEQUENCE_DIGITS}), got {sequence}")
    return f"{sequence:0{SEQUENCE_DIGITS}d}"


# --------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------


def _to_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


UtcDateTime = Annotated[
    AwareDatetime,
    AfterValidator(_to_utc),
    PlainSerializer(_rfc3339, return_type=str, when_used="json"),
]
"""A timezone-aware instant, held in UTC and written RFC 3339 with `Z`; naive times are refused
because a plant clock without an offset is a guess."""

# --------------------------------------------------------------------------------------------
# Quantities
# --------------------------------------------------------------------------------------------

BUILTIN_UOM_CODES: Final[frozenset[str]] = frozenset(
    {
        # counts and packaging
        "C62",  # one (unit)
        "H87",  # piece
        "EA",  # each
        "SET",  # set
        "PR",  # pair
        "DZN",  # dozen
        # packages: Rec 20 carries Rec 21's package codes with an X in front
        "XBX",  # box
        "XCT",  # carton
        "XCS",  # case
        "XPK",  # package
        "XBG",  # bag
        "XBO",  # bottle
        "XDR",  # drum
        "XPX",  # pallet
        "XRO",  # roll
        # mass
        "KGM",  # kilogram
        "GRM",  # gram
        "MGM",  # milligram
        "TNE",  # tonne
        "LBR",  # pound
        "ONZ",  # ounce (avoirdupois)
        # volume
        "LTR",  # litre
        "MLT",  # millilitre
        "HLT",  # hectolitre
        "MTQ",  # cubic metre
        "GLL",  # gallon (US)
        # length and area
        "MTR",  # metre
        "CMT",  # centimetre
        "MMT",  # millimetre
        "KMT",  # kilometre
        "INH",  # inch
        "FOT",  # foot
        "MTK",  # square metre
        # time
        "SEC",  # second
        "MIN",  # minute
        "HUR",  # hour
        "DAY",  # day
        # energy and power
        "KWH",  # kilowatt hour
        "WHR",  # watt hour
        "MWH",  # megawatt hour
        "KWT",  # kilowatt
        "WTT",  # watt
        # temperature
        "CEL",  # degree Celsius
        "FAH",  # degree Fahrenheit
        "KEL",  # kelvin
        # pressure, force, torque
        "BAR",  # bar
        "MBR",  # millibar
        "PAL",  # pascal
        "KPA",  # kilopascal
        "MPA",  # megapascal
        "NEW",  # newton
        "NU",  # newton metre
        # electrical, rotation, ratio
        "AMP",  # ampere
        "VLT",  # volt
        "HTZ",  # hertz
        "RPM",  # revolutions per minute
        "P1",  # percent
    }
)
"""UN/ECE Recommendation 20 common codes accepted without configuration."""

REC21_PACKAGE_CODES: Final[Mapping[str, str]] = MappingProxyType({
    "BX": "XBX", "CT": "XCT", "CS": "XCS", "PK": "XPK", "BG": "XBG", "BO": "XBO",
    "DR": "XDR", "PF": "XPX", "RO": "XRO",
})
"""Rec 21 package codes an earlier release took as units, and their Rec 20 codes. They are no
units of Rec 20: events never carry them; an old config is read with them replaced (and says
so), an MES message that sends one is refused with the Rec 20 code to use."""

_UOM_SHAPE = re.compile(r"[A-Z0-9]{2,3}")
_DECIMAL_TEXT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_MAX_INTEGER_DIGITS: Final = 28
_MAX_FRACTION_DIGITS: Final = 18


def _extra_uom_codes(info: ValidationInfo) -> frozenset[str]:
    context = info.context
    if not isinstance(context, Mapping):
        return frozenset()
    extra = context.get(UOM_CODES_CONTEXT_KEY)
    if extra is None:
        return frozenset()
    if isinstance(extra, str):
        return frozenset({extra.upper()})
    if not isinstance(extra, Iterable):
        raise ValueError(f"validation context {UOM_CODES_CONTEXT_KEY!r} must be a set of codes")
    return frozenset(str(code).upper() for code in extra)


def _check_uom(code: str, info: ValidationInfo) -> str:
    normalised = code.strip().upper()
    if not _UOM_SHAPE.fullmatch(normalised):
        raise ValueError(f"{code!r} is not a UN/ECE Rec 20 code (2 or 3 letters or digits)")
    if normalised in REC21_PACKAGE_CODES and normalised not in _extra_uom_codes(info):
        raise ValueError(
            f"{normalised!r} is a UN/ECE Rec 21 package code, not a Rec 20 unit: send "
            f"{REC21_PACKAGE_CODES[normalised]!r}"
        )
    if normalised not in BUILTIN_UOM_CODES and normalised not in _extra_uom_codes(info):
        raise ValueError(
            f"unit {normalised!r} is not a known UN/ECE Rec 20 code; add it to the plant's "
            "extra unit codes if the plant uses it"
        )
    return normalised


def _parse_decimal(raw: Any) -> Decimal:
    if isinstance(raw, bool):
        raise ValueError("a quantity must be a decimal number, not a boolean")
    if isinstance(raw, float):
        # A float cannot say which decimal it meant (0.1 is 0.1000000000000000055...); whoever
        # reads the device knows its precision and must convert, e.g. Decimal(str(x)).
        raise ValueError("floats are not accepted: pass a Decimal, an int or a decimal string")
    if isinstance(raw, Decimal):
        return raw
    if isinstance(raw, int):
        return Decimal(raw)
    if isinstance(raw, str):
        text = raw.strip()
        if not _DECIMAL_TEXT.fullmatch(text):
            raise ValueError(f"{raw!r} is not a decimal number")
        try:
            return Decimal(text)
        except InvalidOperation as error:  # pragma: no cover - the pattern already checked it
            raise ValueError(f"{raw!r} is not a decimal number") from error
    raise ValueError(
        f"a quantity must be a Decimal, int or decimal string, not {type(raw).__name__}"
    )


def _decimal_text(raw: Any, *, allow_negative: bool) -> str:
    number = _parse_decimal(raw)
    if not number.is_finite():
        raise ValueError("a quantity must be finite (no NaN or Infinity)")
    tuple_exponent = number.as_tuple().exponent
    if not isinstance(tuple_exponent, int):  # pragma: no cover - finite numbers have an int one
        raise ValueError("a quantity must be finite")
    exponent = tuple_exponent
    if number.is_zero():
        # Zero in any spelling ("-0", "0E+9") is zero; keep only its decimal places.
        exponent = min(exponent, 0)
        number = Decimal(0).scaleb(exponent)
    if number < 0 and not allow_negative:
        raise ValueError("a quantity must not be negative")
    if -exponent > _MAX_FRACTION_DIGITS:
        raise ValueError(
            f"more than {_MAX_FRACTION_DIGITS} decimal places; round it to the unit's precision"
        )
    if number.adjusted() >= _MAX_INTEGER_DIGITS:
        raise ValueError(f"more than {_MAX_INTEGER_DIGITS} integer digits")
    return format(number, "f")


def _non_negative_decimal_text(raw: Any) -> str:
    return _decimal_text(raw, allow_negative=False)


def _signed_decimal_text(raw: Any) -> str:
    return _decimal_text(raw, allow_negative=True)


UomCode = Annotated[
    str,
    AfterValidator(_check_uom),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": "^[A-Z0-9]{2,3}$",
            "description": "UN/ECE Recommendation 20 common code of the unit, e.g. H87 (piece), "
            "KGM (kilogram), LTR (litre); the plant may allow more codes in its configuration.",
            "examples": ["H87", "KGM", "LTR"],
        }
    ),
]


class _QuantityBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    value: str
    uom: UomCode

    def as_decimal(self) -> Decimal:
        """The value as a Decimal, for arithmetic in rules."""
        return Decimal(self.value)

    @classmethod
    def of(
        cls, value: Decimal | int | str, uom: str, *, uom_codes: Iterable[str] = frozenset()
    ) -> Self:
        """Build one from a value and a unit, allowing `uom_codes` beyond the built-in units."""
        return cls.model_validate(
            {"value": value, "uom": uom}, context={UOM_CODES_CONTEXT_KEY: frozenset(uom_codes)}
        )


class Quantity(_QuantityBase):
    """A non-negative amount in a unit, e.g. `{"value": "100", "uom": "H87"}`.

    The value is a plain decimal string without exponent (1E+2 is written "100"; "1.50" keeps
    its places); floats, NaN, Infinity and negative numbers are refused. The unit is a UN/ECE
    Recommendation 20 code: a built-in set plus the codes the plant adds in its configuration.
    """

    value: Annotated[
        str,
        BeforeValidator(_non_negative_decimal_text),
        Field(description="Non-negative decimal number as a string, without exponent."),
        WithJsonSchema(
            {"type": "string", "pattern": r"^\d+(\.\d+)?$", "examples": ["100", "12.500"]}
        ),
    ]


class SignedQuantity(_QuantityBase):
    """A measured amount that may be negative (a temperature, a deviation); otherwise a Quantity."""

    value: Annotated[
        str,
        BeforeValidator(_signed_decimal_text),
        Field(description="Decimal number as a string, without exponent; may be negative."),
        WithJsonSchema(
            {"type": "string", "pattern": r"^-?\d+(\.\d+)?$", "examples": ["-18.5", "13.20"]}
        ),
    ]


def _same_uom(*quantities: _QuantityBase | None) -> None:
    units = {quantity.uom for quantity in quantities if quantity is not None}
    if len(units) > 1:
        raise ValueError(f"quantities must share one unit, got {sorted(units)}")


# --------------------------------------------------------------------------------------------
# Event data models
# --------------------------------------------------------------------------------------------

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
    "known, so times may be off by up to the gap's length.")
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



# --------------------------------------------------------------------------------------------
# Orders released by ERP, on their way to the MES
# --------------------------------------------------------------------------------------------

OrderStatus = Literal["released", "locked", "technically_completed", "closed", "deleted"]
"""An order's state in ERP as the plant needs it: released (MES may run it), locked (ERP
blocked it: MES must not start it), or one of the ends (technically completed, closed,
deleted or marked for deletion): MES must stop and forget it."""

FINISHED_ORDER_STATUSES: Final = frozenset({"technically_completed", "closed", "deleted"})


class OrderOperation(BaseModel):
    """One operation of a released order's routing, in sequence."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    operation: Annotated[str, _OPERATION]
    work_center: Annotated[str | None, _WORK_CENTER] = None
    description: Annotated[str | None, Field(min_length=1, max_length=80)] = None
    quantity: Quantity | None = Field(default=None, description="Planned quantity of the "
                                      "operation, when ERP gives one.")


class OrderComponent(BaseModel):
    """One component (bill of materials item) the order consumes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    material: Annotated[str, _MATERIAL]
    quantity: Quantity = Field(description="Required quantity for the whole order.")
    operation: Annotated[str | None, _OPERATION] = None


class _OrderData(EventData):
    """A production order as ERP released it, with its routing and bill of materials."""

    PRIORITY: ClassVar[Priority] = Priority.BUSINESS

    order_id: Annotated[str, _ORDER_ID]
    material: Annotated[str, _MATERIAL]
    quantity: Quantity = Field(description="Total quantity to produce (positive).")
    bom_version: Annotated[str, Field(
        min_length=1, max_length=40, description="Version of the bill of materials or recipe "
        "the order was exploded with (SAP: ProductionVersion).")]
    planned_lot: Annotated[str | None, _LOT_ID] = None
    operations: tuple[OrderOperation, ...] = Field(
        min_length=1, description="The routing's operations, numbers strictly ascending.")
    components: tuple[OrderComponent, ...] = Field(
        default=(), description="The bill of materials: what the order consumes.")
    status: OrderStatus = Field(description="The order's state in ERP.")
    version: int = Field(ge=1, description="Release version of this order: 1 at its "
                         "release, one more at every change the MES must see. A consumer "
                         "keeps the highest and ignores what is not higher.")
    erp_changed_at: UtcDateTime = Field(description="ERP's last change time of the order.")

    @model_validator(mode="after")
    def _routing(self) -> Self:
        numbers = [op.operation for op in self.operations]
        if numbers != sorted(set(numbers)):
            raise ValueError(f"operations must be unique and in ascending order, got "
                             f"{', '.join(numbers)}")
        if self.quantity.as_decimal() <= 0:
            raise ValueError("quantity must be positive")
        for component in self.components:
            if component.quantity.as_decimal() <= 0:
                raise ValueError(f"component {component.material}: quantity must be positive")
            if component.operation is not None and component.operation not in numbers:
                raise ValueError(f"component {component.material} names operation "
                                 f"{component.operation}, which the routing does not have")
        return self


class OrderReleased(_OrderData):
    """ERP released a production order: MES may start it."""

    EVENT_TYPE: ClassVar[EventType] = "order.released"


class OrderChanged(_OrderData):
    """ERP changed a released order (quantity, routing, components, a lock...)."""

    EVENT_TYPE: ClassVar[EventType] = "order.changed"


class OrderCancelled(_OrderData):
    """ERP ended a released order (technically completed, closed, deleted): MES must not
    start it, and stops it if it runs."""

    EVENT_TYPE: ClassVar[EventType] = "order.cancelled"


ORDER_EVENT_MODELS: Final[Mapping[str, type[_OrderData]]] = MappingProxyType(
    {model.EVENT_TYPE: model for model in (OrderReleased, OrderChanged, OrderCancelled)})


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

# --------------------------------------------------------------------------------------------
# The envelope
# --------------------------------------------------------------------------------------------

CLOUDEVENT_TYPE_PREFIX: Final = "com.plantsync.edge."
"""The reverse-DNS prefix of every CloudEvents `type` the gateway emits (CloudEvents 1.0: a
type SHOULD be prefixed with a reverse-DNS name of the organisation that defines it)."""

_CLOUDEVENT_TYPE = re.compile(rf"^{re.escape(CLOUDEVENT_TYPE_PREFIX)}(.+)\.v(\d+)$")


def cloudevent_type(event_type: str) -> str:
    """The CloudEvents `type` on the wire of an event type as the code and the config name it
    (`production.confirmation` -> `com.plantsync.edge.production.confirmation.v1`). This and
    `event_type_of` are the one place where the two spellings meet."""
    model = EVENT_MODELS.get(event_type)
    if model is None:
        raise ValueError(f"unknown event type {event_type!r}")
    return f"{CLOUDEVENT_TYPE_PREFIX}{event_type}.v{model.VERSION}"


def event_type_of(value: object) -> object:
    """The short event type (the config's and the code's name) of a CloudEvents `type`: the
    current prefixed and versioned one, or the bare name earlier releases sent (still read).
    Anything else is returned as it is, for the caller's validation to refuse."""
    if not isinstance(value, str):
        return value
    match = _CLOUDEVENT_TYPE.match(value)
    if match is None:
        return value
    name, version = match.groups()
    model = EVENT_MODELS.get(name)
    if model is None or int(version) != model.VERSION:
        return value  # an unknown type or a version this release cannot read
    return name



def _canonical_json(value: Any, path: str = "data") -> Any:
    """Return `value` as plain JSON data with object keys sorted, or raise ValueError."""
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            raise ValueError(f"{path}: object keys must be strings")
        return {key: _canonical_json(value[key], f"{path}.{key}") for key in sorted(value)}
    if isinstance(value, list | tuple):
        return [_canonical_json(item, f"{path}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path}: JSON has no NaN or Infinity")
    if value is None or isinstance(value, str | int | float):
        return value
    raise ValueError(f"{path}: {type(value).__name__} is not JSON; dump models with mode='json'")


CLOUDEVENT_VERSION: Final = 2
"""Version of the envelope (its exported schema is `urn:plantsync:schema:cloudevent:<n>`).
2 added the optional `sourcemessageid` extension; a receiver of version 1 ignores it, as the
CloudEvents spec asks of unknown extensions."""


class CloudEvent(BaseModel):
    """A CloudEvents 1.0 event in structured JSON mode, with `partitionkey` and `sequence`, and
    `sourcemessageid` when a source system's message made it.

    `data` holds the JSON form of the type's data model (its keys are kept sorted so the bytes
    of an event do not depend on who built it); `validate_event_data` checks it against the
    model. Build events with `build_event` rather than by hand.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    specversion: Literal["1.0"] = Field(default="1.0", description="CloudEvents version.")
    id: str = Field(
        min_length=1,
        max_length=128,
        description="Event id: a UUIDv5 over the natural key (see `event_id`); receivers use "
        "it as the idempotency key.",
    )
    source: str = Field(
        min_length=1,
        pattern=r"^\S+$",
        description="URI-reference of the producer.",
        examples=["urn:plantsync:1010:press-01"],
    )
    type: Annotated[
        EventType,
        BeforeValidator(event_type_of),
        PlainSerializer(cloudevent_type, return_type=str, when_used="json"),
        WithJsonSchema({
            "type": "string",
            "enum": sorted(cloudevent_type(name) for name in get_args(EventType)),
            "description": "Event type: a reverse-DNS prefix, the type and its version "
            f"({CLOUDEVENT_TYPE_PREFIX}<type>.v<version>); selects the data model.",
        }),
    ] = Field(description="Event type; selects the data model. In Python it is the short name "
              "(production.confirmation); in JSON it is the CloudEvents type "
              "(com.plantsync.edge.production.confirmation.v1).")
    time: UtcDateTime = Field(description="When it happened (the data's occurred_at), UTC.")
    subject: str | None = Field(
        default=None,
        min_length=1,
        description="What the event is about within the source, e.g. the order or lot.",
        examples=["order/000001000123/0010"],
    )
    datacontenttype: Literal["application/json"] = Field(
        default="application/json", description="Media type of data."
    )
    dataschema: str = Field(
        min_length=1,
        pattern=r"^\S+$",
        description="URI of the data model's schema, type and version.",
        examples=["urn:plantsync:schema:production.confirmation:1"],
    )
    partitionkey: str = Field(
        min_length=1,
        description="Partitioning extension: events with the same key are delivered in order.",
        examples=["order/000001000123"],
    )
    sequence: str = Field(
        pattern=rf"^\d{{{SEQUENCE_DIGITS}}}$",
        description=f"Sequence extension: a decimal counter zero-padded to {SEQUENCE_DIGITS} "
        "digits, so lexical order is numeric order.",
        examples=["00000000000000000042"],
    )
    sourcemessageid: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Extension (envelope version 2): the id of the source system's message this "
        "event was made from (the MES message id), so a posting can be traced to the message. "
        "Absent for events the gateway derives from machine signals.",
        examples=["3f1c2a9e-8d7b-5c1e-9a4f-0b6d2e8c7a51"],
    )
    data: dict[str, Any] = Field(description="The event data, per the type's data model.")

    @field_validator("data", mode="after")
    @classmethod
    def _plain_sorted_json(cls, data: dict[str, Any]) -> dict[str, Any]:
        canonical: dict[str, Any] = _canonical_json(data)
        return canonical

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON: attributes in spec order, `data` keys sorted, no null subject or
        extension."""
        payload = self.model_dump(mode="json")
        for optional in ("subject", "sourcemessageid"):
            if payload[optional] is None:
                del payload[optional]
        return json.dumps(
            payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Self:
        """Parse an event written by `to_json` (or any conforming producer)."""
        return cls.model_validate_json(raw)


def build_event(
    data: EventData,
    *,
    natural_key: Sequence[str | int],
    subject: str | None,
    partitionkey: str,
    sequence: int,
    source: str | None = None,
    source_message_id: str | None = None,
) -> CloudEvent:
    """Wrap `data` in its CloudEvent.

    The id is `event_id(type, *natural_key)`, the time is `data.occurred_at`, the source
    defaults to `urn:plantsync:<site>:<machine_id or "site">`, and `sequence` is rendered with
    `format_sequence`. `source_message_id` (the MES message it was made from, if any) becomes
    the `sourcemessageid` extension.
    """
    if isinstance(natural_key, str):
        raise TypeError("natural_key must be a sequence of parts, not one string")
    return CloudEvent(
        id=event_id(data.EVENT_TYPE, *natural_key),
        source=source or f"urn:plantsync:{data.site}:{data.machine_id or 'site'}",
        type=data.EVENT_TYPE,
        time=data.occurred_at,
        subject=subject,
        dataschema=data.dataschema(),
        partitionkey=partitionkey,
        sequence=format_sequence(sequence),
        sourcemessageid=source_message_id,
        data=data.model_dump(mode="json"),
    )


def validate_event_data(event: CloudEvent, *, uom_codes: frozenset[str] = frozenset()) -> EventData:
    """Validate `event.data` against the model of `event.type` and return the model.

    Used to re-check an event before it is sent. `uom_codes` are the plant's extra unit codes.
    Raises ValueError (pydantic's ValidationError is one) when the data does not fit the model,
    when `dataschema` names another version than the current one, or when `time` is not the
    data's `occurred_at`.
    """
    model = EVENT_MODELS[event.type]
    if event.dataschema != model.dataschema():
        raise ValueError(
            f"event {event.id}: dataschema {event.dataschema!r} is not {model.dataschema()!r}"
        )
    data = model.model_validate(event.data, context={UOM_CODES_CONTEXT_KEY: uom_codes})
    if data.occurred_at != event.time:
        raise ValueError(f"event {event.id}: time is not the data's occurred_at")
    return data


# --------------------------------------------------------------------------------------------
# JSON Schema export
# --------------------------------------------------------------------------------------------

CLOUDEVENT_SCHEMA_FILE: Final = "cloudevent.json"


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schemas by file name: one per data model (`<type>.v<version>.json`) and the envelope."""
    schemas: dict[str, dict[str, Any]] = {}
    for model in EVENT_MODELS.values():
        schemas[model.schema_file_name()] = {
            "$schema": SCHEMA_DIALECT,
            "$id": model.dataschema(),
            **model.model_json_schema(),
        }
    schemas[CLOUDEVENT_SCHEMA_FILE] = {
        "$schema": SCHEMA_DIALECT,
        "$id": f"urn:plantsync:schema:cloudevent:{CLOUDEVENT_VERSION}",
        **CloudEvent.model_json_schema(),
    }
    return schemas


def write_schemas(directory: Path) -> list[Path]:
    """Write every schema of `json_schemas` into `directory` (created if missing) as pretty JSON
    with sorted keys; return the paths written, sorted."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for file_name, schema in sorted(json_schemas().items()):
        path = directory / file_name
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(path)
    return written
