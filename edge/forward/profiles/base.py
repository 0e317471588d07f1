"""The profile contract: `send` takes up to `batch_size` deliveries (at most `per_key` of one
partition key, consecutive and in commit order) and returns one Result per delivery, in the
same order. It raises only for a failure of the whole request (httpx.HTTPError, AuthError);
the forwarder turns that into a retry for all of them."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from buffer.outbox import Delivery
from edge.config.destinations import DestinationConfig
from edge.forward.outcome import Result
from edge.forward.session import CookieUse, Session
from edge.model.envelope import event_type_of


class Profile(ABC):
    batch_size = 1
    per_key = 1
    """How many consecutive events of one partition key a request may carry: more than 1
    only where the target processes a request's events in order (the canonical batch is an
    ordered array); elsewhere a key's next event waits for the outcome of the one before."""
    cookies: CookieUse = "kept"
    """Whether the target's API needs its cookies back (a session, SAP's CSRF token); `none`
    lets the session skip httpx's cookie jar and per-request client machinery."""

    def __init__(self, config: DestinationConfig, session: Session) -> None:
        self.config = config
        self.session = session
        session.cookies = self.cookies

    @abstractmethod
    async def send(self, deliveries: Sequence[Delivery]) -> list[Result]:
        """Deliver; one Result per delivery, in order."""

    async def close(self) -> None:
        """Release what the profile opened itself (HTTP profiles use the engine's client)."""
        return None


def idempotency_key(value: str) -> str:
    """An `Idempotency-Key` header value: a Structured Field String (RFC 8941 3.3.3), as
    draft-ietf-httpapi-idempotency-key-header defines it: quoted, `\\` and `"` escaped. A
    String holds printable ASCII only: any other id (never one the gateway derives) is sent as
    the SHA-256 of its UTF-8, the same on every retry."""
    if not (value.isascii() and value.isprintable()):  # = every char in " ".."~"
        value = "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def batch_idempotency_key(event_ids: Sequence[str]) -> str:
    """One key for a batch, of fixed length whatever its size: the SHA-256 of its ids in order
    (a key of every id would be 37 kB at 1,000 events, and proxies refuse headers over 8 kB)."""
    digest = hashlib.sha256("\n".join(event_ids).encode()).hexdigest()
    return idempotency_key(f"batch-sha256:{digest}")


def event_of(delivery: Delivery) -> dict[str, Any]:
    """The delivery's CloudEvent as JSON data, its `type` in the short name profiles match on."""
    event: dict[str, Any] = json.loads(delivery.payload)
    event["type"] = event_type_of(event.get("type"))
    return event
