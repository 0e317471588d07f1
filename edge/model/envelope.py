"""The envelope: a milestone as a CloudEvents 1.0 event in structured JSON mode, its `type` on
the wire, and its canonical JSON.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Final, Literal, Self, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    field_validator,
)

from edge.model.codes import UOM_CODES_CONTEXT_KEY
from edge.model.event_data import EventData
from edge.model.events import EVENT_MODELS
from edge.model.ids import SEQUENCE_DIGITS, EventType, event_id, format_sequence
from edge.model.quantities import UtcDateTime

__all__ = [
    "CLOUDEVENT_TYPE_PREFIX",
    "CLOUDEVENT_VERSION",
    "CloudEvent",
    "build_event",
    "cloudevent_type",
    "event_type_of",
    "validate_event_data",
]


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
        WithJsonSchema(
            {
                "type": "string",
                "enum": sorted(cloudevent_type(name) for name in get_args(EventType)),
                "description": "Event type: a reverse-DNS prefix, the type and its version "
                f"({CLOUDEVENT_TYPE_PREFIX}<type>.v<version>); selects the data model.",
            }
        ),
    ] = Field(
        description="Event type; selects the data model. In Python it is the short name "
        "(production.confirmation); in JSON it is the CloudEvents type "
        "(com.plantsync.edge.production.confirmation.v1)."
    )
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
