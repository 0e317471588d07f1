"""Outcome classification checked against the rules as published, status by status.

The oracle is RFC 9110 and the README's delivery semantics, written out here independently of
`edge.forward.outcome`: 2xx delivered; 408, 409, 425, 429 and every 5xx retried (5xx and a
timeout after sending are ambiguous: the request may have arrived); any other 4xx rejected with
the body as the reason, cut at 2,000 characters; `Retry-After` as delay-seconds or an HTTP-date
(RFC 9110 section 10.2.3), never negative. Every status from 200 to 599 is checked.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import httpx
import pytest

from edge.forward.outcome import (
    Outcome,
    classify,
    delivered,
    parse_retry_after,
    transport_failure,
)

REQUEST = httpx.Request("POST", "http://erp.example/api/events")


def answer(status: int, body: str = "", **headers: str) -> httpx.Response:
    return httpx.Response(status, text=body, headers=headers, request=REQUEST)


def expected_outcome(status: int) -> Outcome:
    if 200 <= status <= 299:
        return Outcome.DELIVERED
    if status in (408, 409, 425, 429) or 500 <= status <= 599:
        return Outcome.RETRY
    return Outcome.REJECTED


@pytest.mark.parametrize("status", range(200, 600))
def test_every_status_is_classified_as_published(status: int) -> None:
    result = classify(answer(status, "why" if status >= 300 else ""))
    assert result.outcome is expected_outcome(status)
    assert result.status == status
    assert result.ambiguous is (status >= 500)
    if status >= 300:
        assert result.reason == f"HTTP {status}: why"
        assert result.reference is None
    else:
        assert result.reason == ""


def test_reason_without_a_body_and_a_long_body_cut() -> None:
    assert classify(answer(400)).reason == "HTTP 400"
    long_body = "x" * 5000
    assert classify(answer(422, long_body)).reason == f"HTTP 422: {'x' * 2000}"


def test_the_receivers_reference_is_kept_on_delivery() -> None:
    for key in ("reference", "id", "inspection_id", "nonconformance_id", "result_id"):
        body = f'{{"{key}": "R-1", "other": 2}}'
        assert classify(answer(201, body)).reference == "R-1", key
    assert classify(answer(201, '{"reference": "A", "id": "B"}')).reference == "A"
    assert classify(answer(201, '{"id": 17}')).reference == "17"
    assert classify(answer(201, '{"id": null}')).reference is None
    assert classify(answer(201, "[1, 2]")).reference is None
    assert classify(answer(200, "not json")).reference is None
    assert classify(answer(201, '{"id": "B"}'), reference="given").reference == "given"
    assert delivered(204) == classify(answer(204))
    assert delivered(201, "R").reference == "R" and delivered(201).outcome is Outcome.DELIVERED


def test_retry_after_in_seconds_and_as_an_http_date() -> None:
    assert classify(answer(429, **{"Retry-After": "7"})).retry_after == 7.0
    assert classify(answer(503, **{"Retry-After": " 12 "})).retry_after == 12.0
    assert classify(answer(503)).retry_after is None
    assert classify(answer(400, **{"Retry-After": "7"})).retry_after is None  # rejected
    now = 1_800_000_000.0
    in_90s = format_datetime(datetime.fromtimestamp(now + 90, UTC), usegmt=True)
    assert parse_retry_after(answer(503, **{"Retry-After": in_90s}), now=now) == 90.0
    past = format_datetime(datetime.fromtimestamp(now - 90, UTC), usegmt=True)
    assert parse_retry_after(answer(503, **{"Retry-After": past}), now=now) == 0.0
    assert parse_retry_after(answer(503, **{"Retry-After": "soon"})) is None
    assert parse_retry_after(answer(503, **{"Retry-After": "-5"})) is None
    assert parse_retry_after(answer(503, **{"Retry-After": ""})) is None
    future = datetime.now(UTC).timestamp() + 3600
    live = parse_retry_after(
        answer(
            503,
            **{"Retry-After": format_datetime(datetime.fromtimestamp(future, UTC), usegmt=True)},
        )
    )
    assert live is not None and 3590 < live <= 3600


def test_transport_failures_retry_and_only_a_refused_connection_is_unambiguous() -> None:
    refused = transport_failure(httpx.ConnectError("refused", request=REQUEST), 5.0)
    assert (refused.outcome, refused.ambiguous, refused.status) == (Outcome.RETRY, False, None)
    assert refused.reason == "ConnectError: refused"
    connect_timeout = transport_failure(httpx.ConnectTimeout("slow", request=REQUEST), 5.0)
    assert (connect_timeout.outcome, connect_timeout.ambiguous) == (Outcome.RETRY, False)
    assert connect_timeout.reason == "ConnectTimeout: slow"
    read_timeout = transport_failure(httpx.ReadTimeout("slow", request=REQUEST), 2.5)
    assert (read_timeout.outcome, read_timeout.ambiguous) == (Outcome.RETRY, True)
    assert read_timeout.reason == "timed out after 2.5s"
    dropped = transport_failure(httpx.RemoteProtocolError("gone", request=REQUEST), 5.0)
    assert (dropped.outcome, dropped.ambiguous, dropped.status) == (Outcome.RETRY, True, None)
    assert dropped.reason == "RemoteProtocolError: gone"
