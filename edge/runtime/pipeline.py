"""From driver readings to committed events: routes each sample to the rules that watch its
signal, turns MES messages into canonical events, and commits what they produce together with
the rules' state and the inputs that had to be rejected, in one transaction.

Drivers await `on_readings`; it returns once everything those readings produced is durable in
the outbox. That await is the back-pressure: a driver cannot read faster than the outbox
commits, and a driver that acknowledges a source (MQTT) does so only after it returns.
What an MES message becomes, and the per-order genealogy, are `edge.runtime.mes_intake`'s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from buffer.outbox import CommitResult, LotStatus, Outbox, OutboxEvent, RejectedInput
from drivers.base import DeviceRestarted, MesMessage, Quality, Reading, RejectedMessage, Sample
from drivers.mqtt import MqttConfig, to_reading
from edge.config.models import PlantConfig
from edge.model.envelope import CloudEvent
from edge.model.events import (
    LotDisposition,
    priority_of,
)
from edge.model.ids import source_key
from edge.orders.book import OrderBook
from edge.rules.machine import MachineRule, machine_rules
from edge.rules.mes import OrderEnded, OrderStarted
from edge.runtime.mes_intake import Genealogy, MesIntake

log = logging.getLogger(__name__)

MES_SEQUENCE_KEY = "pipeline:mes-sequence"
ORDERS_KEY = "pipeline:orders"
GENEALOGY_KEY = "pipeline:genealogy"
QMS_CURSOR_KEY = "quality:qms-cursor"


class Pipeline(MesIntake):
    """Call order: `on_readings` from drivers (concurrently is fine), `tick` from a timer,
    `flush` once the drivers have stopped. `observer`, when given, sees each batch of events
    once it is committed. `connected`, when given, says which drivers are connected now: a
    driver that loses its device makes its signals bad (a gap the rules must know of)."""

    def __init__(
        self,
        config: PlantConfig,
        outbox: Outbox,
        saved: dict[str, str],
        observer: Callable[[Sequence[CloudEvent], Sequence[RejectedInput]], None] | None = None,
        connected: Callable[[], Mapping[str, bool]] | None = None,
        *,
        epoch: str | None = None,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self._observer = observer
        self._connected = connected
        self._was_connected: dict[str, bool] = {}
        self.epoch = outbox.epoch if epoch is None else epoch
        """Part of every id the rules derive: the outbox's, or a fixed one for a replay."""
        self.rules = machine_rules(config, saved, self.epoch)
        for rule in self.rules:
            signals = rule.machine.signals
            note = signals.migration_note()
            log.info(
                "Machine %s counts %s; state changes wait %gs for the counters%s",
                rule.machine.id,
                signals.counting(),
                rule.settle,
                f". Note: {note}" if note else "",
                extra={"machine": rule.machine.id},
            )
        self._by_machine = {rule.machine.id: rule for rule in self.rules}
        self._by_signal: dict[str, list[MachineRule]] = {}
        self._by_driver: dict[str, list[MachineRule]] = {}
        for rule in self.rules:
            for signal in rule.signals:
                self._by_signal.setdefault(signal, []).append(rule)
            for driver in sorted({signal.partition(".")[0] for signal in rule.signals}):
                self._by_driver.setdefault(driver, []).append(rule)
        self._mes_sequence = int(saved.get(MES_SEQUENCE_KEY, "0"))
        self.known_orders: dict[str, float] = json.loads(saved.get(ORDERS_KEY, "{}"))
        for rule in self.rules:
            if rule.order_id is not None:
                self.known_orders.setdefault(rule.order_id, 0.0)
        self.genealogy = Genealogy(saved.get(GENEALOGY_KEY))
        self.qms_cursor = saved.get(QMS_CURSOR_KEY, "0")
        self.order_book: OrderBook | None = None
        self._acceptance_unsaved = False
        """Orders ERP released (set by the daemon with an `orders` section): an MES start
        accepts one, or is refused by validation.require_released_order."""
        self._lots: list[LotStatus] = []
        self._followups: list[CloudEvent] = []
        self.order_observer: Callable[[Sequence[OrderStarted | OrderEnded]], None] | None = None
        """Sees the MES order starts and ends each commit carried (the order ledger)."""
        self._order_inputs: list[OrderStarted | OrderEnded] = []
        self.samples_by_driver: Counter[str] = Counter()
        self.events_by_type: Counter[str] = Counter()
        self.rejected_by_driver: Counter[str] = Counter()
        self.last_sample: dict[str, Sample] = {}

    async def on_readings(self, readings: Sequence[Reading]) -> None:
        await self._ingest(readings)

    async def _ingest(
        self, readings: Sequence[Reading], reingested: int | None = None
    ) -> tuple[list[CloudEvent], list[RejectedInput]]:
        """Run readings through the rules and commit what they produced; return the new events
        and the rejected inputs. `reingested` is the input dead letter the (single) reading
        was made from: it goes in the same commit, updated if rejected again, else forgotten."""
        events: list[CloudEvent] = []
        touched: list[MachineRule] = []
        rejected: list[RejectedInput] = []
        polled: dict[MachineRule, list[Sample]] = {}
        for reading in readings:
            match reading:
                case Sample():
                    self.samples_by_driver[reading.driver] += 1
                    self.last_sample[reading.signal] = reading
                    for rule in self._by_signal.get(reading.signal, ()):
                        polled.setdefault(rule, []).append(reading)
                case MesMessage():
                    self.samples_by_driver[reading.driver] += 1
                    try:
                        produced, moved, problem = self._mes(reading)
                    except (ValueError, OverflowError, TypeError) as exc:
                        # A payload the models accept but the rest cannot use (a date at the
                        # edge of the calendar...): rejected with its reason, never a crash.
                        produced, moved, problem = [], None, f"cannot be used: {exc}"
                    events.extend(produced)
                    if moved is not None:
                        touched.append(moved)
                    if problem is not None:
                        # The payload as it arrived, so that a reingest runs the message
                        # itself through the fixed config (a reading made by hand has none).
                        kept = reading.payload or json.dumps(reading.fields, default=str).encode()
                        rejected.append(
                            RejectedInput(
                                reading.driver,
                                reading.topic,
                                kept,
                                problem,
                                reading.received_at,
                                reading.message_id,
                                reingested,
                            )
                        )
                case DeviceRestarted():
                    log.warning(
                        "Driver %s says its device restarted (%s): its counters count from 0",
                        reading.driver,
                        reading.reason,
                        extra={"driver": reading.driver},
                    )
                    for rule in self._by_driver.get(reading.driver, ()):
                        # Samples read before the restart are applied first, in their order.
                        if rule in polled:
                            produced = rule.on_samples(polled.pop(rule))
                            events.extend(produced)
                            touched.append(rule)
                        rule.on_device_restarted(reading.driver)
                        touched.append(rule)
                case RejectedMessage():
                    self.samples_by_driver[reading.driver] += 1
                    rejected.append(
                        RejectedInput(
                            reading.driver,
                            reading.topic,
                            reading.payload,
                            reading.reason,
                            reading.received_at,
                            reading.message_id,
                            reingested,
                        )
                    )
        for rule, samples in polled.items():
            produced = rule.on_samples(samples)
            if produced or rule.needs_save:
                events.extend(produced)
                touched.append(rule)
        for rejection in rejected:
            self.rejected_by_driver[rejection.source] += 1
            log.warning(
                "Rejected MES message %s from %s on %s: %s; kept as an input dead letter",
                rejection.message_id or "(no id)",
                rejection.source,
                rejection.topic,
                rejection.reason,
                extra={
                    "driver": rejection.source,
                    "topic": rejection.topic,
                    "message_id": rejection.message_id,
                },
            )
        resolved = [reingested] if reingested is not None and not rejected else []
        if events or touched or rejected or resolved:
            events = await self._commit(events, touched, rejected, resolved)
        return events, rejected

    async def reingest(self, number: int) -> dict[str, Any]:
        """Run input dead letter `number` through the current config (after a fix): the
        message as it arrived goes through its driver's mapping and the rules again. What it
        produces is committed with the dead letter's removal; rejected again, the dead letter
        stays with the new reason. Ids come from the MES message id, so running one twice, or
        one that was meanwhile redelivered, makes no second event."""
        kept = await self.outbox.rejected_input(number)
        if kept is None:
            raise ValueError(f"there is no input dead letter {number}")
        driver = next((d for d in self.config.drivers if d.name == kept.source), None)
        if not isinstance(driver, MqttConfig):
            raise ValueError(
                f"input dead letter {number} came from {kept.source!r}, which is "
                "not an MQTT driver of the current config: nothing can take it"
            )
        reading = to_reading(driver, kept.topic, kept.payload, kept.received_at)
        events, rejected = await self._ingest([reading], reingested=number)
        message_id = getattr(reading, "message_id", None) or kept.message_id
        outcome: dict[str, Any] = {
            "id": number,
            "message_id": message_id,
            "events": [event.id for event in events],
        }
        if rejected:
            outcome |= {"outcome": "rejected again", "reason": rejected[0].reason}
        else:
            outcome |= {"outcome": "accepted"}
        log.warning(
            "Manual intervention: input dead letter %d (MES message %s) run again "
            "through the current config: %s%s",
            number,
            message_id or "(no id)",
            outcome["outcome"],
            f" ({outcome['reason']})" if rejected else f", {len(events)} new event(s)",
            extra={"message_id": message_id, "rejected_input": number},
        )
        return outcome

    async def tick(self, now: float | None = None) -> None:
        """Run the time triggers of every rule once; commit what moved since the last commit
        (counter advances are saved at least this often)."""
        when = time.time() if now is None else now
        await self._lost_drivers(when)
        events: list[CloudEvent] = []
        touched: list[MachineRule] = []
        for rule in self.rules:
            produced = rule.on_tick(when)
            if produced or rule.needs_save or rule.dirty:
                events.extend(produced)
                touched.append(rule)
        if touched or self._acceptance_unsaved:
            self._acceptance_unsaved = False
            await self._commit(events, touched)

    async def flush(self) -> None:
        """Commit every rule's state that moved since its last commit (at a graceful stop, so
        a restart resumes from the last reading, not the last event). Done once every commit
        queued before it is."""
        await self._commit([], [rule for rule in self.rules if rule.dirty or rule.needs_save])

    async def _lost_drivers(self, now: float) -> None:
        """A driver that lost its device since the last tick: its signals read bad from now, so
        the rules see the gap (a state change seen at reconnect is dated with it in mind)."""
        if self._connected is None:
            return
        lost = []
        for driver, up in self._connected().items():
            if self._was_connected.get(driver) and not up:
                lost.append(driver)
            self._was_connected[driver] = up
        events: list[CloudEvent] = []
        touched: list[MachineRule] = []
        for driver in lost:
            for rule in self._by_driver.get(driver, ()):
                bad = [
                    Sample(driver, signal.partition(".")[2], None, now, Quality.BAD)
                    for signal in sorted(rule.signals)
                    if signal.startswith(f"{driver}.")
                ]
                for sample in bad:
                    self.last_sample[sample.signal] = sample
                events += rule.on_samples(bad)
                touched.append(rule)
        if touched:
            await self._commit(events, touched)

    async def run_ticks(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.tick()

    async def dispositions(self, decisions: Sequence[LotDisposition], cursor: str) -> None:
        """QMS decisions: lot.disposition events (to ERP), the lots' status and the feed's
        cursor, in one commit: a crash re-reads the feed from where it was committed."""
        events = []
        for data in decisions:
            known = await self.outbox.lot_status(data.lot_id)
            if known is not None and (data.order_id is None or data.material is None):
                data = data.model_copy(
                    update={
                        "order_id": data.order_id or known.order_id,
                        "material": data.material or known.material,
                    }
                )
            self._lots.append(
                LotStatus(
                    data.lot_id,
                    data.disposition,
                    data.occurred_at.timestamp(),
                    data.disposition_source,
                    data.order_id,
                    data.material,
                )
            )
            # Keyed by the order the lot was produced for: the decision must not overtake
            # the confirmations that put the lot into quality-inspection stock.
            events.append(
                self._build(
                    data,
                    source_key(
                        self.config.site,
                        "disposition",
                        data.lot_id,
                        data.disposition,
                        int(data.occurred_at.timestamp() * 1000),
                    ),
                    data.order_id or data.lot_id,
                    "quality",
                )
            )
        self.qms_cursor = cursor
        await self._commit(events, ())

    def order_accepted(self, order_id: str) -> None:
        """The MES acknowledged a released order on its ack topic: saved with the next
        commit (at the latest the next second's tick)."""
        if self.order_book is not None:
            self.order_book.accepted(order_id)
            self._acceptance_unsaved = True

    async def remember_lot(self, status: LotStatus) -> None:
        """A lot's status learnt by asking the QMS directly."""
        self._lots.append(status)
        await self._commit([], ())

    async def _commit(
        self,
        events: Sequence[CloudEvent],
        rules: Iterable[MachineRule],
        rejected: Sequence[RejectedInput] = (),
        resolved: Sequence[int] = (),
    ) -> list[CloudEvent]:
        """Commit; return the events that were new (not duplicates)."""
        # State is dumped now, synchronously with the events it produced: a later reading
        # cannot slip into this commit's state while we await the disk.
        state = {rule.state_key: rule.dump_state() for rule in rules}
        state[MES_SEQUENCE_KEY] = str(self._mes_sequence)
        state[ORDERS_KEY] = json.dumps(self.known_orders, separators=(",", ":"))
        state[GENEALOGY_KEY] = self.genealogy.dump()
        state[QMS_CURSOR_KEY] = self.qms_cursor
        if self.order_book is not None:
            state.update(self.order_book.acceptance_state())
        events = [*events, *self._followups]
        lots, self._lots, self._followups = self._lots, [], []
        order_inputs, self._order_inputs = self._order_inputs, []
        rows = [
            OutboxEvent(
                id=event.id,
                type=event.type,
                partition_key=event.partitionkey,
                payload=event.to_json(),
                destinations=tuple(self.config.destinations_for(event.type)),
                priority=priority_of(event.type),
            )
            for event in events
        ]
        commit = asyncio.ensure_future(
            self.outbox.commit(rows, state, rejected=rejected, lots=lots, resolved_inputs=resolved)
        )
        try:
            result = await asyncio.shield(commit)
        except asyncio.CancelledError:
            # A stop cancels the task that committed (a driver's, a timer's) while the writer
            # thread commits: the commit lands on disk anyway, so what follows a commit (the
            # observers, the counts, its log line) runs too before the cancel goes on.
            self._committed(events, rejected, order_inputs, await commit)
            raise
        return self._committed(events, rejected, order_inputs, result)

    def _committed(
        self,
        events: Sequence[CloudEvent],
        rejected: Sequence[RejectedInput],
        order_inputs: Sequence[OrderStarted | OrderEnded],
        result: CommitResult,
    ) -> list[CloudEvent]:
        events = [event for event in events if event.id in result.new_ids]
        if self._observer is not None:
            self._observer(events, rejected)
        if self.order_observer is not None and order_inputs:
            self.order_observer(order_inputs)
        for event in events:
            self.events_by_type[event.type] += 1
            made_from = (
                f", from MES message {event.sourcemessageid}" if event.sourcemessageid else ""
            )
            log.info(
                "Committed %s %s for %s (%s)%s",
                event.type,
                event.subject,
                event.source,
                _summary(event),
                made_from,
                extra={
                    "event_id": event.id,
                    "order_id": event.data.get("order_id"),
                    "lot_id": event.data.get("lot_id"),
                    "message_id": event.sourcemessageid,
                },
            )
        if result.duplicates:
            log.info("Ignored %d event(s) the outbox already held", result.duplicates)
        return events


def _summary(event: CloudEvent) -> str:
    data = event.data
    if event.type == "production.confirmation":
        return (
            f"yield {data['yield_quantity']['value']} {data['yield_quantity']['uom']}, "
            f"scrap {data['scrap_quantity']['value']}, "
            f"counter {data['counter_from']}..{data['counter_to']}"
        )
    if data.get("quantity"):
        return f"{data['quantity']['value']} {data['quantity']['uom']}"
    return event.id
