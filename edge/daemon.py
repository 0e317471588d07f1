"""The gateway's lifetime: open the outbox, start forwarders, rules and drivers, and stop them
in the reverse order.

Start order is downstream first (outbox, forwarders, local API, rules, then drivers), so nothing
is read before there is somewhere durable to put it. On stop, drivers go first; whatever they
handed to the rules is committed (a driver's `await` on the pipeline is the commit); then the
forwarders stop leasing and finish what is in flight, all within `shutdown_timeout`. Anything
not delivered stays in the outbox for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from buffer.outbox import DestinationCounts, Outbox
from drivers.base import Driver
from edge.api import make_server
from edge.config import PlantConfig
from edge.forward import HttpForwarder
from edge.operations import issue_token
from edge.pipeline import Pipeline
from edge.quality import QualityLink
from edge.registry import create_driver

log = logging.getLogger(__name__)


class Gateway:
    def __init__(self, config: PlantConfig, outbox: Outbox, saved_state: dict[str, str]
                 ) -> None:
        self.config = config
        self.outbox = outbox
        self.pipeline = Pipeline(config, outbox, saved_state)
        self.drivers: list[Driver] = [create_driver(d) for d in config.drivers]
        self.forwarders = [HttpForwarder(name, destination, outbox)
                           for name, destination in config.destinations.items()]
        self.quality = QualityLink(config, outbox, self.pipeline)
        self.outbox_counts: dict[str, DestinationCounts] = {}
        self.started_at = time.time()
        self.api_token = issue_token(config)

    async def run(self, stop: asyncio.Event) -> None:
        config = self.config
        server = make_server(self)
        async with asyncio.TaskGroup() as downstream:
            api = downstream.create_task(self._serve_api(server), name="local-api")
            counts = downstream.create_task(self._refresh_counts(), name="outbox-counts")
            upkeep = downstream.create_task(self._prune_journal(), name="journal-retention")
            forwarding = [downstream.create_task(f.run(), name=f"forward-{f.name}")
                          for f in self.forwarders]
            quality = downstream.create_task(self.quality.run(), name="quality-dispositions")
            async with asyncio.TaskGroup() as upstream:
                upstream_tasks = [upstream.create_task(self.pipeline.run_ticks(),
                                                       name="rule-time-triggers")]
                upstream_tasks += [
                    upstream.create_task(driver.run(self.pipeline.on_readings),
                                         name=f"driver-{driver.name}")
                    for driver in self.drivers
                ]
                log.info("PlantSync Edge is running for site %s: %d driver(s), %d machine(s), "
                         "%d destination(s); local API on http://%s; outbox %s", config.site,
                         len(self.drivers), len(self.pipeline.rules), len(self.forwarders),
                         config.api.listen, config.database_path)
                await stop.wait()
                log.info("Stopping: drivers first, then the rules commit, then deliveries "
                         "drain (at most %gs)", config.shutdown_timeout)
                for task in upstream_tasks:
                    task.cancel()
            quality.cancel()
            for forwarder in self.forwarders:
                forwarder.drain()
            if forwarding:
                _, late = await asyncio.wait(forwarding, timeout=config.shutdown_timeout)
                for task in late:
                    log.warning("Deliveries of %s did not finish within the shutdown timeout; "
                                "they stay in the outbox", task.get_name())
                    task.cancel()
            counts.cancel()
            upkeep.cancel()
            server.should_exit = True
            await api
        self.outbox_counts = await self.outbox.counts()
        log.info("Stopped; outbox holds %s", _describe_counts(self.outbox_counts))

    async def _serve_api(self, server: Any) -> None:
        try:
            await server.serve()
        except SystemExit:
            log.error("The local API could not listen on %s; the gateway runs on without it",
                      self.config.api.listen)

    async def _refresh_counts(self) -> None:
        while True:
            self.outbox_counts = await self.outbox.counts()
            await asyncio.sleep(2.0)

    async def _prune_journal(self) -> None:
        while True:
            pruned = await self.outbox.prune(self.config.outbox.journal_retention)
            if pruned:
                log.info("Pruned %d journal row(s) older than the retention", pruned)
            await asyncio.sleep(3600.0)

    def database_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += Path(f"{self.config.database_path}{suffix}").stat().st_size
        return total

    def not_ready_reasons(self) -> list[str]:
        reasons = []
        if self.outbox.back_pressure is not None:
            reasons.append(self.outbox.back_pressure)
        for forwarder in self.forwarders:
            counts = self.outbox_counts.get(forwarder.name)
            if forwarder.health.reachable is False and counts is not None:
                reasons.append(f"destination {forwarder.name} is failing "
                               f"({forwarder.health.last_error}); {counts.pending} event(s) "
                               "buffered")
        return reasons

    def alarms(self) -> list[str]:
        """What needs a person even though the gateway runs on."""
        alarms = []
        if self.outbox.recovered_from:
            alarms.append("the outbox database was damaged at start and moved aside: "
                          f"{self.outbox.recovered_from}")
        if self.outbox.integrity_problem:
            alarms.append("the outbox database failed its integrity check: "
                          f"{self.outbox.integrity_problem}; it is moved aside at the next start")
        return alarms

    def status(self) -> dict[str, Any]:
        now = time.time()
        return {
            "site": self.config.site,
            "uptime_seconds": round(now - self.started_at, 1),
            "drivers": [
                {"name": d.name, "connected": d.health.connected,
                 "last_sample_age": _round(d.health.last_sample_age(now)),
                 "reads": d.health.reads, "errors": d.health.errors,
                 "last_error": d.health.last_error}
                for d in self.drivers
            ],
            "signals": {
                name: {"value": sample.value, "quality": str(sample.quality),
                       "age": _round(now - sample.source_time)}
                for name, sample in sorted(self.pipeline.last_sample.items())
            },
            "machines": [
                {"id": rule.machine.id,
                 "order_id": binding.order_id if binding else None,
                 "operation": binding.operation if binding else None,
                 "state": rule.state.machine_state,
                 "good_total": rule.state.good.total, "scrap_total": rule.state.scrap.total,
                 "good_pending": rule.state.good.pending,
                 "scrap_pending": rule.state.scrap.pending,
                 "unassigned": rule.state.unassigned,
                 "unassigned_scrap": rule.state.unassigned_scrap}
                for rule in self.pipeline.rules
                for binding in [rule.state.binding]
            ],
            "genealogy": self.pipeline.genealogy.figures(),
            "quality": {"qms": self.config.quality.qms, "reachable": self.quality.reachable,
                        "decisions": self.quality.decisions,
                        "cursor": self.pipeline.qms_cursor},
            "outbox": {
                "back_pressure": self.outbox.back_pressure,
                "used_bytes": self.outbox.used_bytes,
                "max_bytes": int(self.config.outbox.max_size),
                "recovered_from": self.outbox.recovered_from,
                "alarms": self.alarms(),
                "refused_informational": self.outbox.stats.refused_informational,
                "duplicates_ignored": self.outbox.stats.duplicates_ignored,
            },
            "destinations": {
                f.name: {"reachable": f.health.reachable, "delivered": f.health.delivered,
                         "in_flight": f.health.in_flight, "last_error": f.health.last_error,
                         **vars(self.outbox_counts.get(f.name, DestinationCounts()))}
                for f in self.forwarders
            },
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _describe_counts(counts: dict[str, DestinationCounts]) -> str:
    if not counts:
        return "nothing undelivered"
    return "; ".join(f"{name}: {c.pending} pending, {c.dead} dead"
                     for name, c in sorted(counts.items()))


async def serve(config: PlantConfig, stop: asyncio.Event) -> None:
    """Run the gateway until `stop` is set."""
    outbox = await Outbox.open(config.database_path,
                               commit_interval=config.outbox.commit_interval,
                               commit_max_rows=config.outbox.commit_max_rows,
                               max_bytes=int(config.outbox.max_size))
    try:
        saved = await outbox.load_state()
        await Gateway(config, outbox, saved).run(stop)
    finally:
        await outbox.close()
