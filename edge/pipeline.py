"""From driver samples to committed events: routes each sample to the rules that watch its
signal, and commits what they produce together with their state.

Drivers await `on_samples`; it returns once the events those samples produced are durable in
the outbox. That await is the back-pressure: a driver cannot read faster than the outbox
commits, and a driver that acknowledges a source (MQTT) does so only after it returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence

from buffer.outbox import Outbox, OutboxEvent
from drivers.base import Sample
from edge.aggregate import ConfirmationRule
from edge.config import PlantConfig
from edge.model import CloudEvent, priority_of

log = logging.getLogger(__name__)


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
        self.samples_by_driver: Counter[str] = Counter()
        self.events_by_type: Counter[str] = Counter()
        self.last_sample: dict[str, Sample] = {}

    async def on_samples(self, samples: Sequence[Sample]) -> None:
        events: list[CloudEvent] = []
        touched: list[ConfirmationRule] = []
        for sample in samples:
            self.samples_by_driver[sample.driver] += 1
            self.last_sample[sample.signal] = sample
            for rule in self._by_signal.get(sample.signal, ()):
                produced = rule.on_sample(sample)
                if produced or rule.needs_save:
                    events.extend(produced)
                    touched.append(rule)
        if touched:
            await self._commit(events, touched)

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

    async def _commit(self, events: Sequence[CloudEvent], rules: Iterable[ConfirmationRule]
                      ) -> None:
        # State is dumped now, synchronously with the events it produced: a later sample
        # cannot slip into this commit's state while we await the disk.
        state = {rule.state_key: rule.dump_state() for rule in rules}
        rows = [
            OutboxEvent(
                id=event.id, type=event.type, partition_key=event.partitionkey,
                payload=event.to_json(),
                destinations=tuple(self.config.destinations_for(event.type)),
                priority=priority_of(event.type),
            )
            for event in events
        ]
        result = await self.outbox.commit(rows, state)
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
    return event.id
