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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.core import Metric

from buffer.outbox import DestinationCounts, Outbox, RejectedInput
from drivers.base import Driver
from drivers.mqtt import MqttDriver
from edge.config.errors import ConfigError
from edge.config.models import PlantConfig
from edge.config.orders import ORDERS_DESTINATION
from edge.config.secrets import secret_values
from edge.forward import HttpForwarder
from edge.model.envelope import CloudEvent
from edge.ops import status
from edge.ops.api import make_server
from edge.ops.exceptions import Condition, ExceptionBoard
from edge.ops.exceptions import listing as exception_listing
from edge.ops.kpis import DeliveryKpis
from edge.ops.ledger import MesOrderReport, OrderLedger, read_back
from edge.ops.logs import redact
from edge.ops.operations import Operation, issue_token, perform
from edge.ops.reconcile import Reconciler, Reconciliation
from edge.ops.settings import ExceptionKind
from edge.ops.watch import ExceptionWatch, scorecard
from edge.ops.watch import metrics as ops_metrics
from edge.orders.book import OrderBook, OrderIssue
from edge.orders.publisher import MesOrderPublisher
from edge.orders.release import OrderRelease
from edge.rules.mes import OrderEnded, OrderStarted
from edge.runtime.pipeline import Pipeline
from edge.runtime.quality import QualityLink
from edge.runtime.registry import create_driver
from edge.runtime.reload import describe_changes
from edge.runtime.systemd import Notifier, Supervisor

log = logging.getLogger(__name__)


ORDER_ISSUE_KINDS: dict[str, ExceptionKind] = {
    "order.invalid": "blocked_order",
    "order.not_released": "unknown_order",
}
"""The order book's issue kinds as the exceptions module names them."""


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


class Gateway:
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

    @property
    def ready_max_backlog_age(self) -> float:
        return self.config.api.ready_max_backlog_age

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

    def _reconciled(self, result: Reconciliation) -> None:
        """Each order with a mismatch is an exception until a run finds it reconciled."""
        for order in result.orders:
            subject = f"order {order.order_id}"
            if order.mismatches:
                kinds = sorted({m.kind for m in order.mismatches})
                self.exceptions.raise_exception(
                    "reconciliation_mismatch",
                    Condition(
                        subject,
                        f"order {order.order_id} does not reconcile: "
                        f"{len(order.mismatches)} mismatch(es) ({', '.join(kinds)})",
                        {"order_id": order.order_id},
                        f"plantsync reconcile --config FILE --order {order.order_id}",
                    ),
                )
            else:
                self.exceptions.clear_exception(
                    "reconciliation_mismatch", subject, "the order reconciles"
                )

    def raise_exception(
        self,
        kind: ExceptionKind,
        subject: str,
        text: str,
        *,
        correlation: Mapping[str, str] | None = None,
        inspect: str | None = None,
    ) -> bool:
        """For other parts of the gateway (order release: `blocked_order`, `unknown_order`):
        raise an exception once; True if it was not open already."""
        return self.exceptions.raise_exception(
            kind, Condition(subject, text, correlation or {}, inspect)
        )

    def clear_exception(self, kind: ExceptionKind, subject: str, because: str) -> bool:
        """Clear it once the condition ended; True if it was open."""
        return self.exceptions.clear_exception(kind, subject, because)

    def _order_issue(self, issue: OrderIssue) -> None:
        """The order release's issues as exceptions: an order ERP sent that the plant cannot
        run (`blocked_order`), an MES start of an order ERP did not release (`unknown_order`);
        each cleared once the order book says the condition ended."""
        kind = ORDER_ISSUE_KINDS[issue.kind]
        subject = f"order/{issue.order_id}"
        if issue.cleared:
            self.clear_exception(kind, subject, issue.reason)
            return
        correlation = {"order_id": issue.order_id}
        if issue.correlation_id:
            correlation["correlation_id"] = issue.correlation_id
        self.raise_exception(
            kind, subject, issue.reason, correlation=correlation, inspect=issue.inspect
        )

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

    def database_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += Path(f"{self.config.database_path}{suffix}").stat().st_size
        return total

    def orphaned(self) -> dict[str, DestinationCounts]:
        """Undelivered events held for destinations the config no longer names."""
        return status.orphaned(self.facts())

    def facts(self) -> status.GatewayFacts:
        """What every status answer (`/status`, `/readyz`, `/metrics`, `STATUS=`) is built
        from: a read-only snapshot of the gateway now."""
        now = time.time()
        pipeline, outbox = self.pipeline, self.outbox
        return status.GatewayFacts(
            site=self.config.site,
            phase=str(self.phase),
            ready_max_backlog_age=self.ready_max_backlog_age,
            drivers=[self._driver_facts(driver, now) for driver in self.drivers],
            destinations=[
                status.DestinationFacts(
                    name=f.name,
                    reachable=f.health.reachable,
                    delivered=f.health.delivered,
                    in_flight=f.health.in_flight,
                    last_error=f.health.last_error,
                )
                for f in self.forwarders
            ],
            counts=dict(self.outbox_counts),
            outbox=status.OutboxFacts(
                back_pressure=outbox.back_pressure,
                used_bytes=outbox.used_bytes,
                max_bytes=int(self.config.outbox.max_size),
                recovered_from=outbox.recovered_from,
                integrity_problem=outbox.integrity_problem,
                stats=dataclasses.replace(outbox.stats),
                database_bytes=self.database_bytes(),
            ),
            configured_destinations=frozenset(self.config.destinations)
            | ({ORDERS_DESTINATION} if self.config.orders is not None else set()),
            uptime_seconds=now - self.started_at,
            input_dead_letters=dict(self.input_dead_letters),
            machines=[status.machine_status(rule) for rule in pipeline.rules],
            signals=dict(pipeline.last_sample),
            genealogy=pipeline.genealogy.figures(),
            quality={
                "qms": self.config.quality.qms,
                "reachable": self.quality.reachable,
                "decisions": self.quality.decisions,
                "cursor": pipeline.qms_cursor,
            },
            events_by_type=dict(pipeline.events_by_type),
            delivered_since_start=dict(self.kpis.delivered),
            kpi_untracked=self.kpis.untracked,
            reloads=dict(self.control.reloads),
            orders=self.orders_status(),
            operations=self._operations(now),
        )

    def _operations(self, now: float) -> dict[str, Any]:
        """Open exceptions, the eight KPIs and the last reconciliation, for `/status`."""
        last = self.reconciler.last
        return {
            "exceptions": self.exceptions.open_exceptions(),
            "kpis": scorecard(
                self, self.ledger.db, last.error_ratio if last is not None else None, now
            ),
            "reconciliation": None
            if last is None
            else {
                "at": last.at,
                "orders_reconciled": len(last.orders),
                "mismatches": len(last.mismatches),
                "failed": len(last.failed),
            },
        }

    def _driver_facts(self, driver: Driver, now: float) -> status.DriverFacts:
        health = driver.health
        mqtt = driver if isinstance(driver, MqttDriver) else None
        return status.DriverFacts(
            name=driver.name,
            connected=health.connected,
            last_sample_age=health.last_sample_age(now),
            reads=health.reads,
            errors=health.errors,
            last_error=health.last_error,
            degraded=dict(health.degraded),
            samples=self.pipeline.samples_by_driver[driver.name],
            rejected=self.pipeline.rejected_by_driver[driver.name],
            dropped_qos0=mqtt.dropped_qos0 if mqtt else None,
            broker=dict(mqtt.broker) if mqtt else {},
            peak_backlog=mqtt.peak_backlog if mqtt else None,
        )

    def status_line(self) -> str:
        """The systemd STATUS= line (see `edge.ops.status.status_line`)."""
        return status.status_line(self.facts())

    def kpi_metrics(self) -> Iterator[Metric]:
        yield from self.kpis.collect()
        if self.order_book is not None:
            yield from self.order_book.collect()
        yield from ops_metrics(self)

    def orders_status(self) -> dict[str, Any] | None:
        """Released orders: the source's health and the order book's figures."""
        if self.order_release is None or self.order_book is None:
            return None
        return {
            "source": self.order_release.orders.source,
            "reachable": self.order_release.reachable,
            "last_error": self.order_release.last_error,
            "polls": self.order_release.polls,
            **self.order_book.figures(),
            "issues": [issue.as_dict() for issue in list(self.order_book.issues)[-20:]],
        }

    def exception_list(self, state: str, since: float, limit: int) -> list[dict[str, Any]]:
        """`GET /exceptions`: newest first, `open`, `closed` or `all`."""
        return exception_listing(self.ledger.db, state, since, limit)

    def reconciliation(self) -> dict[str, Any]:
        """`GET /reconciliation`: the periodic job's last run."""
        last = self.reconciler.last
        return {
            "last": None if last is None else last.as_json(),
            "runs": dict(self.reconciler.runs),
            "last_error": self.reconciler.last_error,
        }

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
