"""Northbound delivery: one forwarder per destination, taking events from the outbox to an HTTP API.

The forwarder leases due deliveries (the head of each partition key, so a key's events arrive in
commit order), POSTs each one with an `Idempotency-Key` equal to the event id, and reports the
outcome back to the outbox: a 2xx acknowledges (and only then is the delivery deleted); 408,
409, 425, 429, 5xx, timeouts and connection errors retry with exponential backoff and full
jitter (honouring `Retry-After`); any other 4xx is a permanent rejection and goes to dead
letters with the response body as its reason. At most `max_in_flight` requests are open at
once. A destination going down is logged once, and once when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import enum
import logging
import time
from dataclasses import dataclass

import httpx

from buffer.outbox import Delivery, Outbox
from edge.config import ApiKeyAuth, BearerAuth, DestinationConfig
from edge.timing import Backoff

log = logging.getLogger(__name__)

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


def classify(response: httpx.Response) -> Result:
    """Map an HTTP response to what the outbox should do with the event."""
    status = response.status_code
    if 200 <= status < 300:
        return Result(Outcome.DELIVERED, status, reference=_reference(response))
    body = response.text[:BODY_LIMIT]
    reason = f"HTTP {status}: {body}" if body else f"HTTP {status}"
    if status in RETRYABLE_4XX or status >= 500:
        return Result(Outcome.RETRY, status, reason, retry_after=parse_retry_after(response))
    return Result(Outcome.REJECTED, status, reason)


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
            reference = body.get("reference")
            return str(reference) if reference is not None else None
    return None


@dataclass
class ForwarderHealth:
    reachable: bool | None = None
    in_flight: int = 0
    delivered: int = 0
    failures: int = 0
    last_error: str | None = None


class HttpForwarder:
    """Delivers one destination's events. Call order: `run()` until cancelled, or `drain()`
    to stop leasing and wait for what is in flight."""

    def __init__(
        self, name: str, config: DestinationConfig, outbox: Outbox, client: httpx.AsyncClient
    ) -> None:
        self.name = name
        self.config = config
        self._outbox = outbox
        self._client = client
        self._url = config.base_url.rstrip("/") + "/" + config.path.lstrip("/")
        self._wake = outbox.listener()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._draining = False
        self.health = ForwarderHealth()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as deliveries:
                while not self._draining:
                    free = self.config.max_in_flight - self.health.in_flight
                    leased: list[Delivery] = []
                    if free > 0:
                        self._wake.clear()
                        leased = await self._outbox.lease(self.name, free,
                                                          busy_keys=self._in_flight.keys())
                        for delivery in leased:
                            self._in_flight[delivery.partition_key] = deliveries.create_task(
                                self._deliver(delivery),
                                name=f"deliver-{self.name}-{delivery.event_id}")
                    if not leased:
                        await self._sleep()
                if self._in_flight:
                    await asyncio.wait(list(self._in_flight.values()))
        finally:
            self.health.in_flight = 0

    def drain(self) -> None:
        """Stop leasing new deliveries; `run()` returns when in-flight requests are done."""
        self._draining = True
        self._wake.set()

    async def _sleep(self) -> None:
        """Until new events, a free slot, or the next retry falls due (at most 1 s)."""
        timeout = 1.0
        next_due = await self._outbox.next_due(self.name)
        if next_due is not None and next_due > time.time():
            timeout = min(timeout, next_due - time.time())
        # A head that is due but was not leased has its key in flight: the end of that
        # delivery sets the wake event.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _deliver(self, delivery: Delivery) -> None:
        # The request slot frees as soon as the answer is in; the key stays busy until the
        # outcome is committed, so its next event cannot overtake this one.
        self.health.in_flight += 1
        try:
            try:
                result = await self.send(delivery)
            finally:
                self.health.in_flight -= 1
                self._wake.set()
            await self._record(delivery, result)
        finally:
            del self._in_flight[delivery.partition_key]
            self._wake.set()

    async def send(self, delivery: Delivery) -> Result:
        headers = {
            "Content-Type": "application/cloudevents+json",
            "Idempotency-Key": delivery.event_id,
            **self._auth_headers(),
        }
        try:
            response = await self._client.post(
                self._url, content=delivery.payload, headers=headers,
                timeout=self.config.timeout)
        except httpx.TimeoutException:
            return Result(Outcome.RETRY, None, f"timed out after {self.config.timeout:g}s")
        except httpx.TransportError as exc:
            return Result(Outcome.RETRY, None, f"{type(exc).__name__}: {exc}")
        return classify(response)

    def _auth_headers(self) -> dict[str, str]:
        auth = self.config.auth
        match auth:
            case BearerAuth():
                return {"Authorization": f"Bearer {auth.token.get_secret_value()}"}
            case ApiKeyAuth():
                return {auth.header: auth.key.get_secret_value()}
        return {}

    async def _record(self, delivery: Delivery, result: Result) -> None:
        match result.outcome:
            case Outcome.DELIVERED:
                await self._outbox.ack(delivery, status=result.status,
                                       reference=result.reference)
                self.health.delivered += 1
                self._set_reachable(True, None)
            case Outcome.RETRY:
                backoff = Backoff(base=self.config.retry.base, cap=self.config.retry.cap,
                                  attempt=delivery.attempts)
                delay = backoff.next_delay()
                if result.retry_after is not None:
                    delay = max(delay, min(result.retry_after, self.config.retry.cap))
                await self._outbox.retry(delivery, at=time.time() + delay, status=result.status,
                                         error=result.reason)
                self.health.failures += 1
                self._set_reachable(False, result.reason)
            case Outcome.REJECTED:
                await self._outbox.dead_letter(delivery, status=result.status,
                                               reason=result.reason)
                self._set_reachable(True, None)
                log.error("Destination %s rejected event %s (%s, key %s): %s; moved to dead "
                          "letters", self.name, delivery.event_id, delivery.event_type,
                          delivery.partition_key, result.reason,
                          extra={"event_id": delivery.event_id,
                                 "destination": self.name})

    def _set_reachable(self, reachable: bool, reason: str | None) -> None:
        if self.health.reachable is not False and not reachable:
            log.warning("Destination %s is failing (%s); events stay in the outbox and are "
                        "retried with backoff", self.name, reason,
                        extra={"destination": self.name})
        elif self.health.reachable is False and reachable:
            log.info("Destination %s is delivering again", self.name,
                     extra={"destination": self.name})
        self.health.reachable = reachable
        self.health.last_error = reason
