"""The canonical profile of the ERP simulator: structured CloudEvents on `POST /api/events`
(one, with an `Idempotency-Key`) and `POST /api/events:batch` (keyed by each event's id),
checked as CloudEvents 1.0 and stored once per key.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from simulators.http_common import (
    idempotency_key,
    json_error,
    media_type,
    read_json,
)

if TYPE_CHECKING:
    from simulators.erp.store import EventStore

JsonObject = dict[str, Any]
Endpoint = Callable[[Request], Awaitable[Response]]


EVENT_CONTENT_TYPES = frozenset({"application/json", "application/cloudevents+json"})
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
REQUIRED_ATTRIBUTES = ("id", "type")
OPTIONAL_STRING_ATTRIBUTES = ("subject", "partitionkey")

GATEWAY_TYPE = re.compile(r"^com\.plantsync\.edge\.(.+)\.v\d+$")


def short_type(cloudevent_type: str) -> str:
    """A PlantSync CloudEvents type without its reverse-DNS prefix and version
    (`com.plantsync.edge.lot.produced.v1` -> `lot.produced`); older gateways sent the short
    name itself, and other types are kept as they are."""
    match = GATEWAY_TYPE.match(cloudevent_type)
    return match.group(1) if match else cloudevent_type


class InvalidEvent(ValueError):
    """A request body that is not an acceptable CloudEvent; the message is sent back."""


@dataclass(frozen=True)
class Receipt:
    """What the ERP answers for one accepted delivery."""

    reference: str
    duplicate: bool


@dataclass(frozen=True)
class Delivery:
    """One validated event and the idempotency key it was delivered under."""

    key: str
    event: JsonObject


def validate_event(candidate: object) -> JsonObject:
    """Return ``candidate`` if it is a usable structured CloudEvent, else raise InvalidEvent."""
    if not isinstance(candidate, dict):
        raise InvalidEvent("event must be a JSON object (one structured CloudEvent)")
    missing = [
        name
        for name in REQUIRED_ATTRIBUTES
        if not isinstance(candidate.get(name), str) or not candidate[name]
    ]
    if missing:
        raise InvalidEvent(
            f"event is missing required attribute(s) {', '.join(missing)}"
            " (non-empty strings expected)"
        )
    for name in OPTIONAL_STRING_ATTRIBUTES:
        value = candidate.get(name)
        if value is not None and not isinstance(value, str):
            raise InvalidEvent(f"event attribute {name} must be a string")
    return candidate


class CanonicalApi:
    """The canonical profile's request handlers over the simulator's store."""

    def __init__(self, store: EventStore, say: Callable[[str], None]) -> None:
        self.store = store
        self._say = say

    def _log(self, delivery: Delivery, receipt: Receipt) -> None:
        event = delivery.event
        line = (
            f"ERP received {short_type(event['type'])} subject={event.get('subject')}"
            f" id={event['id']}"
            f" -> {receipt.reference}"
        )
        self._say(line + (" (duplicate)" if receipt.duplicate else ""))

    def _accept(self, deliveries: Sequence[Delivery]) -> list[Receipt]:
        receipts = self.store.record(deliveries)
        for delivery, receipt in zip(deliveries, receipts, strict=True):
            self._log(delivery, receipt)
        return receipts

    async def post_event(self, request: Request) -> Response:
        try:
            key = idempotency_key(request)
        except ValueError as exc:
            return json_error(400, str(exc))
        if not key:
            return json_error(400, "Idempotency-Key header is required")
        content_type = media_type(request)
        if content_type not in EVENT_CONTENT_TYPES:
            return json_error(
                415,
                f"content type {content_type or '(none)'} is not accepted here; send"
                f" application/cloudevents+json or application/json"
                f" ({BATCH_CONTENT_TYPE} goes to /api/events:batch)",
            )
        try:
            event = validate_event(await read_json(request, InvalidEvent))
        except InvalidEvent as exc:
            return json_error(400, str(exc))
        (receipt,) = self._accept([Delivery(key=key, event=event)])
        return JSONResponse(
            {"reference": receipt.reference, "duplicate": receipt.duplicate},
            status_code=200 if receipt.duplicate else 201,
        )

    async def post_batch(self, request: Request) -> Response:
        content_type = media_type(request)
        if content_type != BATCH_CONTENT_TYPE:
            return json_error(
                415, f"content type {content_type or '(none)'} is not {BATCH_CONTENT_TYPE}"
            )
        try:
            candidates = await read_json(request, InvalidEvent)
        except InvalidEvent as exc:
            return json_error(400, str(exc))
        if not isinstance(candidates, list):
            return json_error(400, "batch body must be a JSON array of CloudEvents")
        checked: list[Delivery | InvalidEvent] = []
        for candidate in candidates:
            try:
                event = validate_event(candidate)
            except InvalidEvent as exc:
                checked.append(exc)
            else:
                checked.append(Delivery(key=event["id"], event=event))
        receipts = iter(self._accept([item for item in checked if isinstance(item, Delivery)]))
        outcomes: list[JsonObject] = []
        for candidate, item in zip(candidates, checked, strict=True):
            if isinstance(item, InvalidEvent):
                candidate_id = candidate.get("id") if isinstance(candidate, dict) else None
                outcomes.append(
                    {"id": candidate_id, "status": 400, "reference": None, "error": str(item)}
                )
                continue
            receipt = next(receipts)
            outcomes.append(
                {
                    "id": item.event["id"],
                    "status": 200 if receipt.duplicate else 201,
                    "reference": receipt.reference,
                    "error": None,
                }
            )
        return JSONResponse(outcomes)
