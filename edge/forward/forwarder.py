"""Northbound delivery: one forwarder per destination, taking events from the outbox to its API.

The forwarder owns the engine (profiles stay small): it leases due deliveries (the head of each
partition key, so a key's events arrive in commit order), hands them to the destination's
profile one request at a time or in batches, at most `max_in_flight` requests at once and at
most `rate_limit` events per second, and reports each outcome to the outbox. A 2xx acknowledges
(and only then is the delivery deleted); a retryable failure is scheduled again with
exponential backoff and full jitter (honouring `Retry-After`), persisted; a permanent rejection
goes to dead letters with the response body. After `circuit_breaker.failures` failed requests
in a row the circuit opens: nothing is sent for `open_for`, then one probe decides whether it
closes. A destination going down is logged once, and once when it is back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import httpx

from buffer.outbox import Delivery, Settlement
from drivers.common.availability import Availability
from drivers.common.timing import Backoff
from edge.config.destinations import DestinationConfig
from edge.config.orders import OrdersMesConfig
from edge.forward.auth import AuthError
from edge.forward.outcome import BODY_LIMIT, Outcome, Result, transport_failure
from edge.forward.profiles import create_profile
from edge.forward.queue import DeliveryQueue
from edge.forward.session import Session, make_client

log = logging.getLogger(__name__)

READ_AHEAD = 2
"""Requests leased ahead of a free slot, per request in flight (see `_lease_loop`)."""


class Circuit(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class ForwarderHealth:
    availability: Availability
    """Whether the destination answers; says so once when it fails and once when it is back."""
    circuit: Circuit = Circuit.CLOSED
    in_flight: int = 0
    delivered: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    latency_sum: float = 0.0
    requests: int = 0
    attempts: int = 0
    """Deliveries attempted (one per event per try), for the integration failure rate."""
    failed_attempts: int = 0
    """Attempts that will be retried (timeouts, 5xx, 408/409/425/429, refused)."""
    dead_lettered: int = 0

    @property
    def reachable(self) -> bool | None:
        """None before the first answer; then whether the last request got one."""
        return self.availability.available


class TokenBucket:
    """At most `rate` events per second, with bursts of up to one second's worth."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.updated = time.monotonic()

    async def take(self, count: int) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.rate, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens >= count or (count > self.rate and self.tokens >= self.rate):
                self.tokens -= count
                return
            await asyncio.sleep((min(count, self.rate) - self.tokens) / self.rate)


class Sender(Protocol):
    """What the engine needs of a profile: `send` as `Profile.send` promises it."""

    batch_size: int
    per_key: int

    async def send(self, deliveries: Sequence[Delivery]) -> list[Result]: ...


class HttpForwarder:
    """Delivers one destination's events. Call order: `run()` until cancelled, or `drain()`
    to stop leasing and let `run()` return once what is in flight is settled.

    `sender`, when given, is a non-HTTP destination (the MES order publisher): an async
    context manager that yields its Sender; the engine runs it like a profile."""

    def __init__(
        self,
        name: str,
        config: DestinationConfig | OrdersMesConfig,
        outbox: DeliveryQueue,
        client: httpx.AsyncClient | None = None,
        *,
        sender: contextlib.AbstractAsyncContextManager[Sender] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._outbox = outbox
        self._client = client
        self._sender = sender
        self._wake = outbox.listener()
        self._busy_keys: set[str] = set()
        self._ready: collections.deque[list[Delivery]] = collections.deque()
        """Requests leased ahead of a free slot, their keys busy (see `_lease_loop`)."""
        self._requests: asyncio.TaskGroup | None = None
        self._draining = False
        self._bucket = TokenBucket(config.rate_limit) if config.rate_limit else None
        self._open_until = 0.0
        self.profile: Sender | None = None
        self.health = ForwarderHealth(
            Availability(
                name,
                log,
                extra={"destination": name},
                lost_says="Destination {peer} is failing ({reason}); events stay in the outbox and "
                "are retried with backoff",
                back_says="Destination {peer} is delivering again",
            )
        )

    async def run(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            if self._sender is not None:
                self.profile = await stack.enter_async_context(self._sender)
                try:
                    await self._lease_loop(self.profile)
                finally:
                    self.health.in_flight = 0
                return
            assert isinstance(self.config, DestinationConfig)
            client = self._client
            if client is None:
                client = await stack.enter_async_context(make_client(self.name, self.config))
            profile = create_profile(self.config, Session(self.config, client))
            self.profile = profile
            stack.push_async_callback(profile.close)
            try:
                await self._lease_loop(profile)
            finally:
                self.health.in_flight = 0

    def drain(self) -> None:
        """Stop leasing new deliveries; `run()` returns when in-flight requests are done."""
        self._draining = True
        self._wake.set()

    async def _lease_loop(self, profile: Sender) -> None:
        batch_size = profile.batch_size
        # Requests leased ahead of a free slot, their keys busy: when a slot frees, the next
        # request starts at once, and the outbox read for the one after it overlaps the
        # requests in flight (one read per request was a fifth of an unbatched delivery's
        # time). At most `READ_AHEAD * max_in_flight` wait so, topped up once half are gone,
        # and only while the circuit is closed; an event more urgent than they are, committed
        # meanwhile, goes after them. A request that gets its answer starts the next one
        # itself (`_deliver`): this loop may be awaiting a read then, and slots left free
        # until it returned meant nothing in flight 12-32 % of an unbatched run (profiled).
        ready = self._ready
        async with asyncio.TaskGroup() as requests:
            self._requests = requests
            while not self._draining:
                # Cleared on every turn, also with no free slot (an open circuit, everything in
                # flight): a wake left set would make the wait below return at once, and the
                # loop would spin until the circuit's probe time.
                self._wake.clear()
                self._start_ready(profile)
                slots = self._free_slots()
                wanted = slots + (
                    READ_AHEAD * self.config.max_in_flight - len(ready)
                    if self.health.circuit is Circuit.CLOSED
                    else 0
                )
                if not slots and len(ready) > self.config.max_in_flight:
                    # Top the read-ahead up once half of it is used, not after every request:
                    # one outbox read (a hop to the reader thread) for several requests.
                    wanted = 0
                leased: list[Delivery] = []
                if wanted > 0:
                    leased = await self._outbox.lease(
                        self.name,
                        wanted * batch_size,
                        busy_keys=self._busy_keys,
                        per_key=profile.per_key,
                    )
                    for batch in pack_runs(leased, batch_size)[:wanted]:
                        self._busy_keys.update(d.partition_key for d in batch)
                        ready.append(batch)
                    self._start_ready(profile)
                if not leased:
                    await self._sleep()
            for batch in ready:  # leased, never sent: their keys are free again
                self._busy_keys.difference_update(d.partition_key for d in batch)
            ready.clear()
            while self._busy_keys:
                self._wake.clear()
                await self._wake.wait()
        self._requests = None

    def _start_ready(self, profile: Sender) -> None:
        """Send leased requests while there are free slots (none once draining)."""
        ready, requests = self._ready, self._requests
        while ready and requests is not None and not self._draining and self._free_slots() > 0:
            batch = ready.popleft()
            self.health.in_flight += 1
            if self.health.circuit is Circuit.OPEN:
                self._set_circuit(Circuit.HALF_OPEN)
            requests.create_task(
                self._deliver(profile, batch), name=f"deliver-{self.name}-{batch[0].event_id}"
            )

    def _free_slots(self) -> int:
        if self.health.circuit is Circuit.CLOSED:
            return self.config.max_in_flight - self.health.in_flight
        if time.monotonic() < self._open_until or self.health.in_flight:
            return 0  # open, or its one probe is out
        return 1

    async def _sleep(self) -> None:
        """Until new events, a free slot, the circuit's probe time, or a retry falls due."""
        timeout = 1.0
        # With every slot taken nothing could be sent anyway, and the end of a request wakes
        # this: the earliest due time (a pass over every key's head) is only worth finding
        # with a slot free.
        next_due = await self._outbox.next_due(self.name) if self._free_slots() > 0 else None
        if next_due is not None and next_due > time.time():
            timeout = min(timeout, next_due - time.time())
        if self.health.circuit is not Circuit.CLOSED:
            timeout = min(timeout, max(0.0, self._open_until - time.monotonic()) + 0.01)
        # A head that is due but was not leased has its key in flight: the end of that
        # delivery sets the wake event. asyncio.timeout, not wait_for: on Python 3.11 wait_for
        # can lose a cancellation that arrives as the event is set (the outbox writer hung so).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def _deliver(self, profile: Sender, batch: Sequence[Delivery]) -> None:
        # The request slot frees as soon as the answers are in; the keys stay busy until the
        # outcomes are committed, so a key's next event cannot overtake this one.
        settled = False
        try:
            try:
                if self._bucket is not None:
                    await self._bucket.take(len(batch))
                started = time.monotonic()
                results = await self._send(profile, batch)
                self.health.latency_sum += time.monotonic() - started
                self.health.requests += 1
            finally:
                self.health.in_flight -= 1
            self._track(results)
            self._start_ready(profile)  # the freed slot's next request, before the settle
            self._poke()
            # All of a request's outcomes in one piece of work: one transaction (shared with
            # other requests' by group commit), one statement per kind of outcome. With other
            # requests in flight and more ready behind them, no key waits on this one, and its
            # transaction may wait briefly for their outcomes (`Outbox.settle`); a key that is
            # all that is left (a burst on one order) is settled at once.
            await self._outbox.settle(
                [
                    self._settlement(delivery, result)
                    for delivery, result in zip(batch, results, strict=True)
                ],
                others_follow=bool(self._ready) and self.health.in_flight > 0,
            )
            self.health.delivered += sum(r.outcome is Outcome.DELIVERED for r in results)
            settled = True
        finally:
            self._busy_keys.difference_update(d.partition_key for d in batch)
            if settled:
                self._poke()
            else:  # a failure on the way: let the loop look at everything again
                self._wake.set()

    def _poke(self) -> None:
        """Wake the lease loop when a turn of it can do something: top the read-ahead up once
        half of it is used (which also covers a slot that nothing ready could fill), probe an
        open circuit, end a drain. An answer or a settle used to wake it every time: a turn
        and a timed wait for nothing, 1.6 per unbatched event (profiled, bench/forward.py)."""
        if (
            self._draining
            or len(self._ready) <= self.config.max_in_flight
            or self.health.circuit is not Circuit.CLOSED
        ):
            self._wake.set()

    async def _send(self, profile: Sender, batch: Sequence[Delivery]) -> list[Result]:
        try:
            results = await profile.send(batch)
        except AuthError as exc:
            return [Result(Outcome.RETRY, None, f"authentication failed: {exc}")] * len(batch)
        except httpx.HTTPError as exc:
            return [transport_failure(exc, self.config.timeout)] * len(batch)
        except Exception as exc:  # a profile's failure must not end the daemon
            log.exception(
                "Destination %s: its profile failed on a request of %d event(s) (building it"
                " or reading the answer); they are tried again",
                self.name,
                len(batch),
                extra={"destination": self.name},
            )
            reason = f"the profile failed: {type(exc).__name__}: {exc}"[:BODY_LIMIT]
            return [Result(Outcome.RETRY, None, reason, ambiguous=True)] * len(batch)
        if len(results) != len(batch):  # a profile bug must not lose or mislabel events
            return [
                Result(Outcome.RETRY, None, "the profile answered for the wrong number of events")
            ] * len(batch)
        return results

    def _track(self, results: Sequence[Result]) -> None:
        """The circuit breaker and the once-down-once-back log, per request."""
        failed = all(r.outcome is Outcome.RETRY and not r.not_ready for r in results)
        if failed:
            reason = results[0].reason
            self.health.failures += 1
            self.health.consecutive_failures += 1
            self.health.availability.lost(reason)
            self.health.last_error = reason
            breaker = self.config.circuit_breaker
            if self.health.circuit is Circuit.HALF_OPEN or (
                self.health.consecutive_failures >= breaker.failures
            ):
                self._open_until = time.monotonic() + breaker.open_for
                self._set_circuit(Circuit.OPEN)
            return
        self.health.availability.back()
        self.health.last_error = None
        self.health.consecutive_failures = 0
        self._set_circuit(Circuit.CLOSED)

    def _set_circuit(self, circuit: Circuit) -> None:
        if circuit is self.health.circuit:
            return
        previous, self.health.circuit = self.health.circuit, circuit
        if circuit is Circuit.OPEN and previous is Circuit.CLOSED:
            log.warning(
                "Circuit to %s is open after %d failed requests in a row: nothing is "
                "sent for %gs, then one probe",
                self.name,
                self.health.consecutive_failures,
                self.config.circuit_breaker.open_for,
                extra={"destination": self.name},
            )
        elif circuit is Circuit.CLOSED:
            log.info("Circuit to %s is closed again", self.name, extra={"destination": self.name})

    def _settlement(self, delivery: Delivery, result: Result) -> Settlement:
        self.health.attempts += 1
        match result.outcome:
            case Outcome.DELIVERED:
                return Settlement(delivery, "delivered", result.status, reference=result.reference)
            case Outcome.RETRY:
                backoff = Backoff(
                    base=self.config.retry.base,
                    cap=self.config.retry.cap,
                    attempt=delivery.attempts,
                )
                # The target said when: believe it (capped). Otherwise back off with jitter.
                self.health.failed_attempts += 0 if result.not_ready else 1
                delay = (
                    min(result.retry_after, self.config.retry.cap)
                    if result.retry_after is not None
                    else backoff.next_delay()
                )
                return Settlement(
                    delivery,
                    "retry",
                    result.status,
                    retry_at=time.time() + delay,
                    reason=result.reason,
                )
            case Outcome.REJECTED:
                self.health.dead_lettered += 1
                log.error(
                    "Destination %s rejected event %s (%s, key %s): %s; moved to dead letters",
                    self.name,
                    delivery.event_id,
                    delivery.event_type,
                    delivery.partition_key,
                    result.reason,
                    extra={"event_id": delivery.event_id, "destination": self.name},
                )
                return Settlement(delivery, "dead", result.status, reason=result.reason)


def pack_runs(leased: Sequence[Delivery], batch_size: int) -> list[list[Delivery]]:
    """Requests of at most `batch_size` deliveries, each key's run (consecutive deliveries of
    one key, as `Outbox.lease` lists them) whole in one request: two requests in flight with
    events of the same key could arrive in either order."""
    batches: list[list[Delivery]] = []
    run: list[Delivery] = []
    for delivery in [*leased, None]:
        if run and (delivery is None or delivery.partition_key != run[0].partition_key):
            if not batches or len(batches[-1]) + len(run) > batch_size:
                batches.append([])
            batches[-1].extend(run)
            run = []
        if delivery is not None:
            run.append(delivery)
    return batches
