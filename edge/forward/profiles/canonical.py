"""canonical: the CloudEvents as they are, with an `Idempotency-Key` equal to the event id.

One event per POST (structured mode, `application/cloudevents+json`), or, with `batch_size`
above 1, a JSON array per POST (`application/cloudevents-batch+json`) keyed by the SHA-256 of
its ids. Keys are Structured Field Strings (`Idempotency-Key: "<id>"`), as the IETF draft
says. A receiver that answers a batch with a per-event list (`[{"id", "status", "reference",
"error"}]`) gets each event's own outcome; any other 2xx counts for the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from buffer.outbox import Delivery
from edge.config.destinations import DestinationConfig
from edge.forward.outcome import BODY_LIMIT, RETRYABLE_4XX, Outcome, Result, classify, delivered
from edge.forward.profiles.base import Profile, batch_idempotency_key, idempotency_key
from edge.forward.session import CookieUse, Session


class CanonicalProfile(Profile):
    cookies: CookieUse = "none"  # everything a request needs is in its headers

    def __init__(self, config: DestinationConfig, session: Session) -> None:
        super().__init__(config, session)
        self.batch_size = config.batch_size
        # The batch is a JSON array: the receiver takes its events in array order, so a key's
        # consecutive events may share a request (a burst on one order is not serial).
        self.per_key = config.batch_size

    async def send(self, deliveries: Sequence[Delivery]) -> list[Result]:
        if len(deliveries) == 1 and self.batch_size == 1:
            (delivery,) = deliveries
            response = await self.session.request(
                "POST",
                self.config.path,
                content=delivery.payload,
                headers={
                    "Content-Type": "application/cloudevents+json",
                    "Idempotency-Key": idempotency_key(delivery.event_id),
                },
            )
            return [classify(response)]
        body = b"[" + b",".join(d.payload for d in deliveries) + b"]"
        response = await self.session.request(
            "POST",
            self.config.batch_path or self.config.path,
            content=body,
            headers={
                "Content-Type": "application/cloudevents-batch+json",
                "Idempotency-Key": batch_idempotency_key([d.event_id for d in deliveries]),
            },
        )
        if not 200 <= response.status_code < 300:
            return [classify(response)] * len(deliveries)
        return _per_event(response, deliveries)


def _per_event(response: httpx.Response, deliveries: Sequence[Delivery]) -> list[Result]:
    """A 2xx batch answer: each event's own outcome from a per-event list; any other body
    counts for the whole batch. The body is parsed once (classify would parse it again for a
    reference a list does not have)."""
    try:
        answers = response.json()
    except ValueError:
        answers = None
    if not isinstance(answers, list):
        return [classify(response)] * len(deliveries)
    by_id: dict[str, dict[str, Any]] = {str(a.get("id")): a for a in answers if isinstance(a, dict)}
    results = []
    for delivery in deliveries:
        answer = by_id.get(delivery.event_id)
        if answer is None:
            results.append(
                Result(
                    Outcome.RETRY,
                    response.status_code,
                    "the batch answer did not mention this event",
                    ambiguous=True,
                )
            )
            continue
        status = _status(answer.get("status", response.status_code))
        if status is None:
            results.append(
                Result(
                    Outcome.RETRY,
                    response.status_code,
                    "the batch answer's status for this event is not an HTTP status:"
                    f" {str(answer.get('status'))[:100]!r}",
                    ambiguous=True,
                )
            )
        elif 200 <= status < 300:
            results.append(delivered(status, _reference(answer.get("reference"))))
        else:
            reason = f"HTTP {status}: {str(answer.get('error') or '')[:BODY_LIMIT]}"
            if status in RETRYABLE_4XX or status >= 500:
                results.append(Result(Outcome.RETRY, status, reason, ambiguous=status >= 500))
            else:
                results.append(Result(Outcome.REJECTED, status, reason))
    return results


def _status(value: Any) -> int | None:
    """An event's status in a batch answer: an integer from 100 to 599 (three ASCII digits in
    a string are taken too); anything else (null, text, a float) is no status."""
    if isinstance(value, str) and len(value) == 3 and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return value
    return None


def _reference(value: Any) -> str | None:
    """The receiver's reference for an event, as the journal keeps it: text or a number, cut
    to BODY_LIMIT; an object or a list is none (the journal stores text, and an answer that
    cannot be stored must not undo the settle it belongs to)."""
    if isinstance(value, str):
        return value[:BODY_LIMIT]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None
