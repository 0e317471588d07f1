"""What a destination's answer means for the outbox: delivered, retry (when), or rejected (why).

408, 409, 425, 429, 5xx, timeouts and connection errors are worth another try, honouring
`Retry-After`; any other 4xx is a permanent rejection, kept as a dead letter with the body.
"""

from __future__ import annotations

import contextlib
import email.utils
import enum
import time
from dataclasses import dataclass

import httpx

RETRYABLE_4XX = frozenset({408, 409, 425, 429})
BODY_LIMIT = 2000


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    status: int | None = None
    reason: str = ""
    retry_after: float | None = None
    reference: str | None = None
    ambiguous: bool = False
    """The request may have reached the target (a timeout after sending, a 5xx): a target
    without idempotency keys must be asked before the event is sent again."""
    not_ready: bool = False
    """The target answered, but this event cannot be posted yet (SAP has no inspection lot for
    the batch before its goods receipt): retried with backoff, yet no failure of the target,
    so it neither opens the circuit breaker nor marks the destination down."""


def delivered(status: int | None, reference: str | None = None) -> Result:
    return Result(Outcome.DELIVERED, status, reference=reference)


def classify(response: httpx.Response, reference: str | None = None) -> Result:
    """Map an HTTP response to what the outbox should do with the event."""
    status = response.status_code
    if 200 <= status < 300:
        return delivered(status, reference if reference is not None else _reference(response))
    body = response.text[:BODY_LIMIT]
    reason = f"HTTP {status}: {body}" if body else f"HTTP {status}"
    if status in RETRYABLE_4XX or status >= 500:
        return Result(
            Outcome.RETRY,
            status,
            reason,
            retry_after=parse_retry_after(response),
            ambiguous=status >= 500,
        )
    return Result(Outcome.REJECTED, status, reason)


def transport_failure(exc: httpx.HTTPError, timeout: float) -> Result:
    """A request that got no answer. Only a failure to connect is sure not to have arrived."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return Result(Outcome.RETRY, None, tls_hint(exc))
    if isinstance(exc, httpx.TimeoutException):
        return Result(Outcome.RETRY, None, f"timed out after {timeout:g}s", ambiguous=True)
    return Result(Outcome.RETRY, None, f"{type(exc).__name__}: {exc}", ambiguous=True)


def tls_hint(exc: httpx.HTTPError) -> str:
    """The error as a technician can act on it: a failed certificate check says which setting
    fixes it."""
    text = f"{type(exc).__name__}: {exc}"
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return (
            f"{text}; certificate verify failed: the server's certificate is not signed "
            "by a CA this box trusts: set tls.ca_file to the plant's CA bundle"
        )
    return text


def parse_retry_after(response: httpx.Response, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta seconds or an HTTP date)."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value).timestamp()
        return max(0.0, when - (time.time() if now is None else now))
    return None


def _reference(response: httpx.Response) -> str | None:
    with contextlib.suppress(ValueError):
        body = response.json()
        if isinstance(body, dict):
            for key in ("reference", "id", "inspection_id", "nonconformance_id", "result_id"):
                if body.get(key) is not None:
                    return str(body[key])
    return None
