"""The hub stream as the forwarder engine's delivery queue for one destination of a relay:
what the outbox is to a plant daemon (edge.forward.queue.DeliveryQueue).

One fetch task per partition this relay owns (edge.hub.members shares the partitions out
among the live relays; `assign()` changes the set) pulls from that partition's durable
consumer, one event at a time (the consumer's `max_ack_pending: 1` lets no relay have a second
one out, whoever owns what), and holds it until the engine settles it:
- `ack` (the target answered 2xx) acks it to JetStream, and waits for the server to confirm
  the ack, before the partition's next event is fetched;
- `retry` naks it with the engine's backoff as the delay: JetStream keeps it pending (no later
  event of its partition overtakes it) and redelivers it, to this relay or another, when due;
- `dead_letter` publishes it to the dead letter stream (awaiting that stream's PubAck) with
  the reason in headers, then terminates it.
An event the relay does not route to this destination is acked without delivery. While an
event is held, `in_progress` is sent every third of `ack_wait`, so a slow target does not make
the hub hand it to another relay. A relay killed mid-delivery loses nothing: its held event
is redelivered after `ack_wait` (the receiver's Idempotency-Key catches a repeat).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from buffer.outbox import Delivery, Settlement
from drivers.common.timing import Backoff
from edge.hub.config import HubConfig
from edge.hub.stream import consumer_name
from edge.model.envelope import event_type_of

log = logging.getLogger(__name__)
FETCH_WAIT = 2.0
FETCH_RETRY_CAP = 10.0
"""The longest wait before a failed fetch is tried again (backoff with jitter)."""


@dataclass
class InboxStats:
    fetched: int = 0
    skipped: int = 0
    redelivered: int = 0
    acked: int = 0
    retried: int = 0
    dead_lettered: int = 0
    settle_failures: int = 0
    journalled: int = 0
    journal_failures: int = 0
    fetch_failures: int = 0


@dataclass
class _Held:
    message: Msg
    delivery: Delivery
    partition: int
    held_since: float = field(default_factory=time.monotonic)
    leased: bool = False


class HubInbox:
    """Call order: `run()` in a task (fetching) while the engine leases and settles."""

    def __init__(
        self, js: JetStreamContext, config: HubConfig, destination: str, relay_name: str = "relay"
    ) -> None:
        self._js = js
        self.relay_name = relay_name
        self._config = config
        self.destination = destination
        self._held: dict[int, _Held] = {}  # by stream sequence
        self._listeners: set[asyncio.Event] = set()
        self._stopping = False
        self.owned: frozenset[int] = frozenset(range(config.stream.partitions))
        """The partitions this inbox fetches from (edge.hub.members decides; all until then)."""
        self._fetchers: dict[int, asyncio.Task[None]] = {}
        self._changed = asyncio.Event()
        self.stats = InboxStats()

    # -- the DeliveryQueue side, called by the engine --

    def listener(self) -> asyncio.Event:
        event = asyncio.Event()
        self._listeners.add(event)
        return event

    async def lease(
        self, destination: str, limit: int, *, busy_keys: Iterable[str] = (), per_key: int = 1
    ) -> list[Delivery]:
        # `per_key` is a most: the relay hands out what JetStream holds, as before.
        busy = set(busy_keys)
        leased: list[Delivery] = []
        for held in sorted(self._held.values(), key=lambda h: h.delivery.seq):
            if len(leased) >= limit:
                break
            if not held.leased and held.delivery.partition_key not in busy:
                held.leased = True
                leased.append(held.delivery)
        return leased

    async def next_due(self, destination: str) -> float | None:
        return None  # retries wait in JetStream (nak with delay), not here

    async def settle(
        self, settlements: Sequence[Settlement], *, others_follow: bool = False
    ) -> None:
        """A request's outcomes, each its own ack, nak or term (JetStream has no bulk ack),
        all at once as the engine sent them before it settled in bulk. Nothing is gained by
        waiting for others (`others_follow`): each ack is its own message."""
        await asyncio.gather(*(self._settle_one(settlement) for settlement in settlements))

    async def _settle_one(self, settlement: Settlement) -> None:
        delivery = settlement.delivery
        match settlement.outcome:
            case "delivered":
                await self.ack(delivery, status=settlement.status, reference=settlement.reference)
            case "retry":
                await self.retry(
                    delivery,
                    at=settlement.retry_at,
                    status=settlement.status,
                    error=settlement.reason,
                )
            case "dead":
                await self.dead_letter(delivery, status=settlement.status, reason=settlement.reason)

    async def ack(
        self, delivery: Delivery, *, status: int | None, reference: str | None = None
    ) -> None:
        held = self._held.get(delivery.seq)
        if held is None:
            return
        await self._journal(delivery, status, reference)
        try:
            await held.message.ack_sync(timeout=self._config.nats.timeout)
            self.stats.acked += 1
        except nats.errors.Error as exc:
            # Delivered but not acked: the hub redelivers after ack_wait, and the receiver's
            # Idempotency-Key recognises the repeat.
            self._settle_failed(delivery, "ack", exc)
        self._release(held)

    async def _journal(self, delivery: Delivery, status: int | None, reference: str | None) -> None:
        """The audit record of a delivery, in the hub's journal stream (stored R3 before the
        event is acked). Its Nats-Msg-Id makes a redelivered event's second record a no-op
        within two minutes; a journal the hub cannot take is logged, never a reason to
        deliver again."""
        stream = self._config.stream
        record = {
            "event_id": delivery.event_id,
            "event_type": delivery.event_type,
            "destination": self.destination,
            "delivered_at": time.time(),
            "attempts": delivery.attempts + 1,
            "status": status,
            "reference": reference,
            "relay": self.relay_name,
            "partition_key": delivery.partition_key,
            "stream_seq": delivery.seq,
        }
        try:
            await self._js.publish(
                f"{stream.journal_subject}.{self.destination}",
                json.dumps(record, separators=(",", ":")).encode(),
                timeout=self._config.nats.timeout,
                stream=stream.journal_stream,
                headers={"Nats-Msg-Id": f"{self.destination}:{delivery.event_id}"},
            )
            self.stats.journalled += 1
        except nats.errors.Error as exc:
            self.stats.journal_failures += 1
            log.warning(
                "Could not journal the delivery of event %s to %s (%s)",
                delivery.event_id,
                self.destination,
                exc or type(exc).__name__,
                extra={"event_id": delivery.event_id, "destination": self.destination},
            )

    async def retry(self, delivery: Delivery, *, at: float, status: int | None, error: str) -> None:
        held = self._held.get(delivery.seq)
        if held is None:
            return
        try:
            await held.message.nak(delay=max(0.0, at - time.time()))
            self.stats.retried += 1
        except nats.errors.Error as exc:
            self._settle_failed(delivery, "nak", exc)
        self._release(held)

    async def dead_letter(self, delivery: Delivery, *, status: int | None, reason: str) -> None:
        held = self._held.get(delivery.seq)
        if held is None:
            return
        stream = self._config.stream
        try:
            await self._js.publish(
                f"{stream.dead_letter_subject}.{self.destination}",
                delivery.payload,
                timeout=self._config.nats.timeout,
                stream=stream.dead_letter_stream,
                headers={
                    "Nats-Msg-Id": f"{self.destination}:{delivery.event_id}",
                    "PlantSync-Destination": self.destination,
                    "PlantSync-Status": str(status or ""),
                    "PlantSync-Reason": " ".join(reason.split())[:1000],
                },
            )
            await held.message.term()
            self.stats.dead_lettered += 1
        except nats.errors.Error as exc:
            # Not parked: nak it, so it is tried (and refused) again rather than lost.
            self._settle_failed(delivery, "dead letter", exc)
            await self._quietly(held.message.nak(delay=self._config.relay.ack_wait))
        self._release(held)

    # -- the fetching side --

    async def run(self) -> None:
        """Fetch from the owned partitions until `give_back()`; `assign()` starts and ends
        fetch tasks meanwhile."""
        async with asyncio.TaskGroup() as group:
            keep_alive = group.create_task(
                self._keep_alive(), name=f"in-progress-{self.destination}"
            )
            while not self._stopping:
                self._changed.clear()
                for partition in sorted(self.owned):
                    running = self._fetchers.get(partition)
                    if running is None or running.done():  # a lost one's task may still end
                        task = group.create_task(
                            self._fetch(partition), name=f"fetch-{self.destination}-p{partition}"
                        )
                        task.add_done_callback(lambda _: self._changed.set())
                        self._fetchers[partition] = task
                await self._changed.wait()
            if self._fetchers:
                await asyncio.wait(self._fetchers.values())
            keep_alive.cancel()

    async def assign(self, partitions: frozenset[int]) -> None:
        """Fetch from these partitions from now on. A lost partition's fetch ends with its
        pending request (within FETCH_WAIT: a flag, see `_fetch`); an event of it held but
        not yet handed to the engine goes back to the hub now, one being delivered is
        finished and settled."""
        lost = self.owned - partitions
        self.owned = partitions
        self._changed.set()
        for held in list(self._held.values()):
            if held.partition in lost and not held.leased:
                self._release(held)
                await self._quietly(held.message.nak())

    def _fetching(self, partition: int) -> bool:
        return not self._stopping and partition in self.owned

    async def _fetch(self, partition: int) -> None:
        stream = self._config.stream.name
        name = consumer_name(self.destination, partition)
        # A flag, not only cancellation: nats-py's fetch (asyncio.wait_for on Python 3.11)
        # can swallow a cancel that arrives as its answer does, and the loop would go on.
        # The next pull request waits at the hub while this partition's event is being
        # delivered (the hub holds it back until the ack: max_ack_pending 1), so the next
        # event comes with the ack's answer, not a round trip later. Before relays owned
        # partitions another relay's waiting request hid that round trip; without it two
        # relays of 32 partitions each delivered less than one relay of 64 (bench/hub.py).
        backoff = Backoff(base=0.5, cap=FETCH_RETRY_CAP)
        failing: str | None = None
        subscription: JetStreamContext.PullSubscription | None = None
        try:
            while self._fetching(partition):
                try:
                    if subscription is None:  # bound here, so a refusal is retried too
                        subscription = await self._js.pull_subscribe_bind(name, stream)
                    messages = await subscription.fetch(1, timeout=FETCH_WAIT)
                except TimeoutError:  # nats-py's, or asyncio's: fetch raises either
                    messages = []
                except nats.errors.Error as exc:
                    # The connection is away (nats-py reconnects; the relay connects again if
                    # nats-py gives up: a closed connection fails here until then) or the hub
                    # refuses this consumer (deleted by hand): said once per failure, tried
                    # again with backoff and jitter.
                    reason = str(exc) or type(exc).__name__
                    if failing is None:
                        log.warning(
                            "Relay %s cannot fetch from %s (%s); trying again with backoff",
                            self.relay_name,
                            name,
                            reason,
                            extra={"destination": self.destination, "consumer": name},
                        )
                    failing = reason
                    self.stats.fetch_failures += 1
                    await self._pause(backoff.next_delay())
                    continue
                if failing is not None:
                    failing = None
                    backoff.reset()
                    log.info(
                        "Relay %s fetches from %s again",
                        self.relay_name,
                        name,
                        extra={"destination": self.destination, "consumer": name},
                    )
                for message in messages:
                    if not self._fetching(partition):  # stopped or lost meanwhile: back now
                        await self._quietly(message.nak())
                        continue
                    await self._take(message, partition)
        finally:
            if subscription is not None:
                with contextlib.suppress(nats.errors.Error):
                    await subscription.unsubscribe()

    async def _pause(self, seconds: float) -> None:
        """A wait that a stop or a change of partitions ends early."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._changed.wait()

    async def _take(self, message: Msg, partition: int) -> None:
        metadata = message.metadata
        self.stats.fetched += 1
        if metadata.num_delivered > 1:
            self.stats.redelivered += 1
        held = self._held.get(metadata.sequence.stream)
        if held is not None:
            # Our own held event again (its ack_wait ran out mid-delivery, in_progress lost):
            # settle it through the newest delivery, and deliver it only once from here.
            held.message = message
            return
        try:
            event = json.loads(message.data)
            event_type = str(event_type_of(event.get("type")))
            delivery = Delivery(
                seq=metadata.sequence.stream,
                destination=self.destination,
                event_id=str(event["id"]),
                event_type=event_type,
                partition_key=str(event.get("partitionkey") or event["id"]),
                payload=message.data,
                attempts=metadata.num_delivered - 1,
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            # Not a CloudEvent: no target would take it. Parked, not dropped.
            msg_id = (message.headers or {}).get("Nats-Msg-Id", f"seq-{metadata.sequence.stream}")
            delivery = Delivery(
                seq=metadata.sequence.stream,
                destination=self.destination,
                event_id=msg_id,
                event_type="?",
                partition_key=msg_id,
                payload=message.data,
                attempts=metadata.num_delivered - 1,
            )
            self._hold(message, delivery, partition)
            await self.dead_letter(
                delivery, status=None, reason="not a CloudEvent in JSON (structured mode)"
            )
            return
        if self.destination not in self._config.destinations_for(event_type):
            self.stats.skipped += 1
            # If this ack is lost, the event comes back after ack_wait and is skipped again.
            await self._quietly(message.ack_sync(timeout=self._config.nats.timeout))
            return
        self._hold(message, delivery, partition)
        for listener in self._listeners:
            listener.set()

    def _hold(self, message: Msg, delivery: Delivery, partition: int) -> None:
        self._held[delivery.seq] = _Held(message, delivery, partition)

    async def _keep_alive(self) -> None:
        period = max(1.0, self._config.relay.ack_wait / 3)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for held in list(self._held.values()):
                if now - held.held_since >= period:
                    await self._quietly(held.message.in_progress())

    def _release(self, held: _Held) -> None:
        self._held.pop(held.delivery.seq, None)

    def _settle_failed(self, delivery: Delivery, what: str, exc: Exception) -> None:
        self.stats.settle_failures += 1
        log.warning(
            "Could not %s event %s on the hub (%s); it comes back after ack_wait",
            what,
            delivery.event_id,
            exc or type(exc).__name__,
            extra={"event_id": delivery.event_id, "destination": self.destination},
        )

    @staticmethod
    async def _quietly(request: Awaitable[object]) -> None:
        with contextlib.suppress(nats.errors.Error):
            await request

    async def give_back(self) -> None:
        """On stop: no more fetches (within FETCH_WAIT); events held but not being delivered
        go back to the hub now (nak), for another relay, instead of after ack_wait."""
        self._stopping = True
        self._changed.set()
        for held in list(self._held.values()):
            if not held.leased:
                await self._quietly(held.message.nak())
                self._release(held)

    async def give_back_unsent(self) -> None:
        """After the engine has stopped: what it leased but never sent (its read-ahead,
        dropped by `drain`) goes back to the hub now too; left held, each would stall its
        partition for ack_wait."""
        for held in list(self._held.values()):
            await self._quietly(held.message.nak())
            self._release(held)
