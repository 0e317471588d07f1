"""The value types every event is made of: instants in UTC, and quantities.

Quantities are decimal strings with a UN/ECE Recommendation 20 unit code, never floats, so that
ERP, MES and QMS add up to the same number.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Final, Self

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
)

from edge.model.codes import BUILTIN_UOM_CODES, REC21_PACKAGE_CODES, UOM_CODES_CONTEXT_KEY

__all__ = [
    "Quantity",
    "SignedQuantity",
    "UomCode",
    "UtcDateTime",
]


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
