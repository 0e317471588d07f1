"""From driver readings to committed events: routes each sample to the rules that watch its
signal, turns MES messages into canonical events, and commits what they produce together with
the rules' state and the inputs that had to be rejected, in one transaction.

Drivers await `on_readings`; it returns once everything those readings produced is durable in
the outbox. That await is the back-pressure: a driver cannot read faster than the outbox
commits, and a driver that acknowledges a source (MQTT) does so only after it returns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from pydantic import ValidationError

from buffer.outbox import Outbox, OutboxEvent, RejectedInput
from drivers.base import MesMessage, Reading, RejectedMessage, Sample
from edge.aggregate import ConfirmationRule
from edge.config import PlantConfig, format_loc
from edge.model import (
    EVENT_MODELS,
    UOM_CODES_CONTEXT_KEY,
    CloudEvent,
    build_event,
    priority_of,
)

log = logging.getLogger(__name__)

MES_SEQUENCE_KEY = "pipeline:mes-sequence"


class Pipeline:
    def __init__(self, config: PlantConfig, outbox: Outbox, saved: dict[str, str]) -> None:
        self.config = config
        self.outbox = outbox
        self.rules = [
            ConfirmationRule(config.site, machine, saved.get(f"machine:{machine.id}"),
                             uom_codes=config.all_uom_codes)
            for machine in config.machines
        ]
        self._by_signal: dict[str, list[ConfirmationRule]] = {}
        for rule in self.rules:
            for signal in rule.signals:
                self._by_signal.setdefault(signal, []).append(rule)
        self._mes_sequence = int(saved.get(MES_SEQUENCE_KEY, "0"))
        self.samples_by_driver: Counter[str] = Counter()
        self.events_by_type: Counter[str] = Counter()
        self.rejected_by_driver: Counter[str] = Counter()
        self.last_sample: dict[str, Sample] = {}

    async def on_readings(self, readings: Sequence[Reading]) -> None:
        events: list[CloudEvent] = []
        touched: list[ConfirmationRule] = []
        rejected: list[RejectedInput] = []
        for reading in readings:
            match reading:
                case Sample():
                    self.samples_by_driver[reading.driver] += 1
                    self.last_sample[reading.signal] = reading
                    for rule in self._by_signal.get(reading.signal, ()):
                        produced = rule.on_sample(reading)
                        if produced or rule.needs_save:
                            events.extend(produced)
                            touched.append(rule)
                case MesMessage():
                    self.samples_by_driver[reading.driver] += 1
                    event, problem = self._mes_event(reading)
                    if event is not None:
                        events.append(event)
                    else:
                        rejected.append(RejectedInput(
                            reading.driver, reading.topic,
                            json.dumps(reading.fields, default=str).encode(), problem,
                            reading.received_at))
                case RejectedMessage():
                    self.samples_by_driver[reading.driver] += 1
                    rejected.append(RejectedInput(reading.driver, reading.topic,
                                                  reading.payload, reading.reason,
                                                  reading.received_at))
        for rejection in rejected:
            self.rejected_by_driver[rejection.source] += 1
            log.warning("Rejected a message from %s on %s: %s; kept as an input dead letter",
                        rejection.source, rejection.topic, rejection.reason,
                        extra={"driver": rejection.source, "topic": rejection.topic})
        if events or touched or rejected:
            await self._commit(events, touched, rejected)

    async def tick(self, now: float | None = None) -> None:
        """Run the time triggers of every rule once."""
        when = time.time() if now is None else now
        events: list[CloudEvent] = []
        touched: list[ConfirmationRule] = []
        for rule in self.rules:
            produced = rule.on_tick(when)
            if produced:
                events.extend(produced)
                touched.append(rule)
        if touched:
            await self._commit(events, touched)

    async def run_ticks(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.tick()

    def _mes_event(self, message: MesMessage) -> tuple[CloudEvent | None, str]:
        """The canonical event of an MES message, or why it cannot be one."""
        model = EVENT_MODELS.get(message.kind)
        if model is None:
            return None, f"no canonical event type {message.kind!r}"
        fields = {"site": self.config.site,
                  "occurred_at": datetime.fromtimestamp(message.received_at, UTC),
                  **message.fields}
        try:
            data = model.model_validate(
                fields, context={UOM_CODES_CONTEXT_KEY: self.config.all_uom_codes})
        except ValidationError as exc:
            return None, "; ".join(f"{format_loc(tuple(e['loc']))}: {e['msg']}"
                                   for e in exc.errors())
        key = data.order_id or getattr(data, "lot_id", None) or message.driver
        self._mes_sequence += 1
        event = build_event(data, natural_key=(self.config.site, message.kind,
                                               message.message_id),
                            subject=key, partitionkey=key, sequence=self._mes_sequence,
                            source=f"urn:plantsync:{self.config.site}:mes:{message.driver}")
        return event, ""

    async def _commit(self, events: Sequence[CloudEvent], rules: Iterable[ConfirmationRule],
                      rejected: Sequence[RejectedInput] = ()) -> None:
        # State is dumped now, synchronously with the events it produced: a later reading
        # cannot slip into this commit's state while we await the disk.
        state = {rule.state_key: rule.dump_state() for rule in rules}
        state[MES_SEQUENCE_KEY] = str(self._mes_sequence)
        rows = [
            OutboxEvent(
                id=event.id, type=event.type, partition_key=event.partitionkey,
                payload=event.to_json(),
                destinations=tuple(self.config.destinations_for(event.type)),
                priority=priority_of(event.type),
            )
            for event in events
        ]
        result = await self.outbox.commit(rows, state, rejected=rejected)
        for event in events:
            self.events_by_type[event.type] += 1
            log.info("Committed %s %s for %s (%s)", event.type, event.subject,
                     event.source, _summary(event),
                     extra={"event_id": event.id, "order_id": event.data.get("order_id"),
                            "lot_id": event.data.get("lot_id")})
        if result.duplicates:
            log.info("Ignored %d event(s) the outbox already held", result.duplicates)


def _summary(event: CloudEvent) -> str:
    data = event.data
    if event.type == "production.confirmation":
        return (f"yield {data['yield_quantity']['value']} {data['yield_quantity']['uom']}, "
                f"scrap {data['scrap_quantity']['value']}, "
                f"counter {data['counter_from']}..{data['counter_to']}")
    if "quantity" in data:
        return f"{data['quantity']['value']} {data['quantity']['uom']}"
    return event.id
