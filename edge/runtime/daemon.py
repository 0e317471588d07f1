"""The gateway's lifetime: open the outbox, start forwarders, rules and drivers, stop them in the
reverse order, and reload the config without losing anything.

Start order is downstream first (outbox, forwarders, local API, rules, then drivers), so nothing
is read before there is somewhere durable to put it; then systemd hears READY=1. On stop,
drivers go first; whatever they handed to the rules is committed (a driver's `await` on the
pipeline is the commit, and a barrier commit makes sure the last of it is on disk); then the
forwarders stop leasing and finish what is in flight, all within `shutdown_timeout`. Anything
not delivered stays in the outbox for the next start. A second signal aborts the wait.

A reload (SIGHUP) loads and validates the file again. An invalid file changes nothing: each
problem is logged and the old config runs on. A valid one that differs is applied as an
internal restart: the running gateway stops exactly as on SIGTERM (so every count the rules
made is committed), and a new one starts with the new config on the same open outbox, its rules
rebuilt from the committed state. Every driver, machine and destination restarts, changed or
not: a pause of a second or so, in exchange for one code path that cannot lose a count.

What the gateway reports (status, metrics, its own exceptions) is `edge.runtime.reporting`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from buffer.outbox import DestinationCounts, Outbox, RejectedInput
from drivers.base import Driver
from edge.config.errors import ConfigError
from edge.config.models import PlantConfig
from edge.config.orders import ORDERS_DESTINATION
from edge.config.secrets import secret_values
from edge.forward import HttpForwarder
from edge.model.envelope import CloudEvent
from edge.ops.api import make_server
from edge.ops.exceptions import ExceptionBoard
from edge.ops.kpis import DeliveryKpis
from edge.ops.ledger import MesOrderReport, OrderLedger, read_back
from edge.ops.logs import redact
from edge.ops.operations import Operation, issue_token, perform
from edge.ops.reconcile import Reconciler
from edge.ops.watch import ExceptionWatch
from edge.orders.book import OrderBook
from edge.orders.publisher import MesOrderPublisher
from edge.orders.release import OrderRelease
from edge.rules.mes import OrderEnded, OrderStarted
from edge.runtime.heap import freeze_startup_heap
from edge.runtime.pipeline import Pipeline
from edge.runtime.quality import QualityLink
from edge.runtime.registry import create_driver
from edge.runtime.reload import describe_changes
from edge.runtime.reporting import GatewayReporting
from edge.runtime.systemd import Notifier, Supervisor

log = logging.getLogger(__name__)


class Phase(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    RELOADING = "reloading"
    STOPPING = "stopping"


class Control:
    """What signals ask of the daemon: stop (SIGTERM, SIGINT) or reload the config (SIGHUP).
    Also counts the reloads, for the metrics."""

    def __init__(self) -> None:
        self.stop_requested = False
        self.reload_requested = False
        self.reloads: dict[str, int] = {"applied": 0, "refused": 0, "unchanged": 0}
        self._wake = asyncio.Event()

    def stop(self) -> None:
        self.stop_requested = True
        self._wake.set()

    def reload(self) -> None:
        if not self.stop_requested:
            self.reload_requested = True
            self._wake.set()

    async def wait(self) -> None:
        await self._wake.wait()
        self._wake.clear()


ConfigLoader = Callable[[], PlantConfig]
"""Reads and validates the config file again (raises ConfigError)."""


class Gateway(GatewayReporting):
    def __init__(
        self,
        config: PlantConfig,
        outbox: Outbox,
        saved_state: dict[str, str],
        *,
        kpis: DeliveryKpis | None = None,
        notifier: Notifier | None = None,
        control: Control | None = None,
        ledger: OrderLedger | None = None,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self.kpis = kpis or DeliveryKpis()
        self.ledger = ledger or OrderLedger.open(config.data_dir)
        self.notifier = notifier or Notifier(None)
        self.control = control or Control()
        delivery_kpis = self.kpis.observer(config.destinations_for)

        def observe(events: Sequence[CloudEvent], rejected: Sequence[RejectedInput]) -> None:
            delivery_kpis(events, rejected)
            self.ledger.record_events(events)

        self.pipeline = Pipeline(
            config, outbox, saved_state, observer=observe, connected=self._drivers_connected
        )
        self.pipeline.order_observer = self._mes_reports
        self.drivers: list[Driver] = [create_driver(d, config.data_dir) for d in config.drivers]
        self.forwarders = [
            HttpForwarder(name, destination, outbox)
            for name, destination in config.destinations.items()
        ]
        self.order_book: OrderBook | None = None
        self.order_release: OrderRelease | None = None
        if config.orders is not None:
            book = OrderBook(saved_state, accept_within=config.orders.accept_within)
            self.order_book = self.pipeline.order_book = book
            self.order_release = OrderRelease(config, outbox, book)
            self.forwarders.append(
                HttpForwarder(
                    ORDERS_DESTINATION,
                    config.orders.mes,
                    outbox,
                    sender=MesOrderPublisher.connected_to(
                        config.orders.mes, config.site, self.pipeline.order_accepted
                    ),
                )
            )
        self.quality = QualityLink(config, outbox, self.pipeline)
        self.exceptions = ExceptionBoard(config, self.ledger.db, outbox)
        self.reconciler = Reconciler(
            config, self.ledger.db, config.database_path, on_result=self._reconciled
        )
        self.exception_watch = ExceptionWatch(self, self.exceptions, self.ledger.db)
        if self.order_book is not None:
            self.order_book.listeners.append(self._order_issue)
        self.outbox_counts: dict[str, DestinationCounts] = {}
        self.input_dead_letters: dict[str, int] = {}
        self.started_at = time.time()
        self.api_token = issue_token(config.local_access)
        self.secrets = secret_values(config) | {self.api_token}
        self.phase = Phase.STARTING

    async def run(
        self, control: Control | None = None, load: ConfigLoader | None = None
    ) -> PlantConfig | None:
        """Run until asked to stop (returns None) or to apply a valid new config (returns
        it, once this gateway has stopped and committed everything)."""
        if control is not None:
            self.control = control
        config = self.config
        server = make_server(self, config.api)
        await self.refresh_counts()
        async with asyncio.TaskGroup() as downstream:
            api = downstream.create_task(self._serve_api(server), name="local-api")
            counts = downstream.create_task(self._refresh_counts(), name="outbox-counts")
            upkeep = downstream.create_task(self._prune_journal(), name="journal-retention")
            journal = downstream.create_task(self.kpis.follow(self.outbox), name="delivery-kpis")
            # The outbox is read on a worker thread, the ledger written on this one: the only
            # thread that writes the ledger's connection (the journal prune runs meanwhile).
            self.ledger.add_read_back(
                await asyncio.to_thread(
                    read_back, config.database_path, self.ledger.backfill_since()
                )
            )
            self.exceptions.start()
            operations = [
                downstream.create_task(self.exceptions.run(), name="exception-channels"),
                downstream.create_task(self.exception_watch.run(), name="exception-watch"),
                downstream.create_task(self.reconciler.run(), name="reconcile-ended-orders"),
            ]
            forwarding = [
                downstream.create_task(f.run(), name=f"forward-{f.name}") for f in self.forwarders
            ]
            quality = downstream.create_task(self.quality.run(), name="quality-dispositions")
            if self.order_release is not None:
                orders = downstream.create_task(
                    self.order_release.run(), name="order-release-poller"
                )
            await _until_listening(server, api)
            async with asyncio.TaskGroup() as upstream:
                upstream_tasks = [
                    upstream.create_task(self.pipeline.run_ticks(), name="rule-time-triggers")
                ]
                upstream_tasks += [
                    upstream.create_task(
                        driver.run(self.pipeline.on_readings), name=f"driver-{driver.name}"
                    )
                    for driver in self.drivers
                ]
                log.info(
                    "PlantSync Edge is running for site %s: %d driver(s), %d machine(s), "
                    "%d destination(s); local API on http://%s; outbox %s",
                    config.site,
                    len(self.drivers),
                    len(self.pipeline.rules),
                    len(self.forwarders),
                    config.api.listen,
                    config.database_path,
                )
                self._report_orphans()
                self.phase = Phase.RUNNING
                self.notifier.ready(self.status_line())
                next_config = await self._until_stop_or_reload(load)
                deadline = asyncio.get_running_loop().time() + config.shutdown_timeout
                if next_config is None:
                    self.phase = Phase.STOPPING
                    self.notifier.stopping(self.status_line())
                    log.info(
                        "Stopping: drivers first, then the rules commit, then deliveries "
                        "drain (at most %gs)",
                        config.shutdown_timeout,
                    )
                else:
                    self.phase = Phase.RELOADING
                    log.info(
                        "Applying the new config: drivers stop, the rules commit and "
                        "deliveries drain (at most %gs), then the gateway starts again on "
                        "the same outbox",
                        config.shutdown_timeout,
                    )
                await _cancel_until_done(upstream_tasks, deadline)
            await self._commit_barrier(deadline)
            await _cancel_until_done([quality] + ([orders] if self.order_release else []), deadline)
            for forwarder in self.forwarders:
                forwarder.drain()
            if forwarding:
                remaining = max(0.0, deadline - asyncio.get_running_loop().time())
                _, late = await asyncio.wait(forwarding, timeout=remaining)
                for task in late:
                    log.warning(
                        "Deliveries of %s did not finish within the shutdown timeout; "
                        "they stay in the outbox",
                        task.get_name(),
                    )
                await _cancel_until_done(list(late), deadline)
            await _cancel_until_done([counts, upkeep, journal, *operations], deadline)
            self.exceptions.stop()
            server.should_exit = True
            await api
        self.outbox_counts = await self.outbox.counts()
        if next_config is None:
            log.info("Stopped; outbox holds %s", _describe_counts(self.outbox_counts))
        return next_config

    async def _until_stop_or_reload(self, load: ConfigLoader | None) -> PlantConfig | None:
        control = self.control
        while True:
            if control.stop_requested:
                return None
            if control.reload_requested:
                control.reload_requested = False
                self.notifier.reloading()
                new_config = await self._reloaded(load)
                if control.stop_requested:
                    return None
                if new_config is not None:
                    control.reloads["applied"] += 1
                    return new_config
                self.notifier.ready(self.status_line())
                continue
            await control.wait()

    async def _reloaded(self, load: ConfigLoader | None) -> PlantConfig | None:
        """The new config if it is valid and differs; else None, with the reason logged."""
        if load is None:
            log.warning("Reload asked for, but this gateway was not started from a file")
            self.control.reloads["refused"] += 1
            return None
        log.info("Reloading the config")
        try:
            new_config = await asyncio.to_thread(load)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("Reload refused: %s", problem)
            log.error(
                "Reload refused: the new config has %d problem(s); the gateway runs on "
                "with the config it has",
                len(exc.problems),
            )
            self.control.reloads["refused"] += 1
            return None
        changes = describe_changes(self.config, new_config, self.outbox_counts)
        if not changes:
            log.info("Reload: the config is unchanged; nothing restarts")
            self.control.reloads["unchanged"] += 1
            return None
        for change in changes:
            log.info("Reload: %s", change)
        return new_config

    def _mes_reports(self, orders: Sequence[OrderStarted | OrderEnded]) -> None:
        reports = []
        for order in orders:
            ended = isinstance(order, OrderEnded)
            quantity = order.yield_quantity if isinstance(order, OrderEnded) else None
            scrap = order.scrap_quantity if isinstance(order, OrderEnded) else None
            either = quantity or scrap
            reports.append(
                MesOrderReport(
                    order.order_id,
                    order.operation or "",
                    "ended" if ended else "started",
                    order.machine_id,
                    order.occurred_at.timestamp(),
                    quantity.value if quantity else None,
                    scrap.value if scrap else None,
                    either.uom if either else None,
                )
            )
        self.ledger.record_reports(reports)

    def _drivers_connected(self) -> dict[str, bool]:
        return {driver.name: driver.health.connected for driver in self.drivers}

    async def _commit_barrier(self, deadline: float) -> None:
        """Wait until everything the stopped drivers handed over is on disk, with the rules'
        last readings: a commit queued now is done only after every commit queued before it."""
        remaining = max(0.1, deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait_for(self.pipeline.flush(), remaining)
        except TimeoutError:
            log.warning(
                "The outbox did not finish its last commits within the shutdown "
                "timeout; they finish before it closes"
            )

    def _report_orphans(self) -> None:
        for name, counts in self.orphaned().items():
            log.warning(
                "The outbox holds %d undelivered and %d dead event(s) for destination "
                "%s, which the config no longer names: they stay in the outbox until "
                "it is configured again (plantsync outbox list --destination %s)",
                counts.pending,
                counts.dead,
                name,
                name,
                extra={"destination": name},
            )

    async def _serve_api(self, server: Any) -> None:
        try:
            await server.serve()
        except SystemExit:
            log.error(
                "The local API could not listen on %s; the gateway runs on without it",
                self.config.api.listen,
            )

    async def refresh_counts(self) -> None:
        """Read the outbox's counts now (what /metrics, /status and /readyz answer from)."""
        self.outbox_counts = await self.outbox.counts()
        self.input_dead_letters = await self.outbox.rejected_count()

    async def _refresh_counts(self) -> None:
        # For the STATUS= line and the readiness between requests; every API answer reads
        # them afresh, so none lags.
        while True:
            await self.refresh_counts()
            await asyncio.sleep(2.0)

    async def _prune_journal(self) -> None:
        while True:
            pruned = await self.outbox.prune(self.config.outbox.journal_retention)
            pruned += self.ledger.prune(self.config.outbox.journal_retention)
            if pruned:
                log.info("Pruned %d journal row(s) older than the retention", pruned)
            await asyncio.sleep(3600.0)

    async def perform(self, operation: Operation, args: dict[str, Any], who: str) -> Any:
        """An outbox operation asked for on the local API, journalled under `who`."""
        return await perform(self.outbox, operation, args, who, pipeline=self.pipeline)

    async def lot_status(self, lot_id: str) -> dict[str, Any]:
        return await self.quality.lot_status(lot_id)


async def _until_listening(server: Any, api: asyncio.Task[None], limit: float = 5.0) -> None:
    """Wait (briefly) for the local API to listen, so that READY=1 means it answers."""
    # uvicorn sets a flag, not an event: look at it every 10 ms.
    for _ in range(int(limit / 0.01)):
        if server.started or api.done():
            return
        await asyncio.sleep(0.01)


async def _cancel_until_done(tasks: list[asyncio.Task[None]], deadline: float) -> None:
    """Cancel the tasks and wait until they have ended.

    A cancellation can be lost: on Python 3.11, `asyncio.wait_for` returns its inner result
    when that completes at the moment the outer task is cancelled (pymodbus connects that way),
    and a driver then goes on to its next reconnect. So a task still running is cancelled
    again, every half second, until it ends; past the shutdown timeout, that is logged.
    """
    loop = asyncio.get_running_loop()
    pending = {task for task in tasks if not task.done()}
    late_logged = False
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
        if pending and not late_logged and loop.time() >= deadline:
            log.warning(
                "Still stopping %s after the shutdown timeout",
                ", ".join(sorted(task.get_name() for task in pending)),
            )
            late_logged = True


def _describe_counts(counts: dict[str, DestinationCounts]) -> str:
    if not counts:
        return "nothing undelivered"
    return "; ".join(
        f"{name}: {c.pending} pending, {c.dead} dead" for name, c in sorted(counts.items())
    )


def open_outbox(config: PlantConfig) -> contextlib.AbstractAsyncContextManager[Outbox]:
    return Outbox.open(
        config.database_path,
        commit_interval=config.outbox.commit_interval,
        settle_wait=config.outbox.settle_wait,
        commit_max_rows=config.outbox.commit_max_rows,
        max_bytes=int(config.outbox.max_size),
    )


async def serve(config: PlantConfig, control: Control, load: ConfigLoader | None = None) -> None:
    """Run the gateway until `control` says stop, applying reloads on the way."""
    notifier = Notifier.from_environment()
    supervisor = Supervisor(notifier)
    kpis = DeliveryKpis()
    # The outbox outlives a reload unless its settings change: held on a stack, reopened there.
    held = contextlib.AsyncExitStack()
    outbox = await held.enter_async_context(open_outbox(config))
    ledger = OrderLedger.open(config.data_dir)
    log.info("%d objects of start-up kept out of garbage collection", freeze_startup_heap())
    try:
        async with asyncio.TaskGroup() as tasks:
            watching = tasks.create_task(supervisor.run(), name="systemd-supervisor")
            try:
                while True:
                    gateway = Gateway(
                        config,
                        outbox,
                        await outbox.load_state(),
                        kpis=kpis,
                        ledger=ledger,
                        notifier=notifier,
                        control=control,
                    )
                    redact(gateway.secrets)
                    # A destination a reload removed keeps no lease memory it would never free.
                    outbox.keep_lease_memory_for(f.name for f in gateway.forwarders)
                    supervisor.watch(gateway)
                    new_config = await gateway.run(control, load)
                    if new_config is None or control.stop_requested:
                        break
                    if (new_config.database_path, new_config.outbox) != (
                        config.database_path,
                        config.outbox,
                    ):
                        # The outbox's settings are fixed at open: reopen it (everything the
                        # old gateway made is committed by now).
                        log.info(
                            "Reopening the outbox with the new settings at %s",
                            new_config.database_path,
                        )
                        supervisor.watch(None)
                        await held.aclose()
                        outbox = await held.enter_async_context(open_outbox(new_config))
                        ledger.close()
                        ledger = OrderLedger.open(new_config.data_dir)
                    config = new_config
            finally:
                watching.cancel()
    finally:
        await held.aclose()
        ledger.close()
        notifier.close()
