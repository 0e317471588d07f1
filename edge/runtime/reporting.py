"""What the running gateway reports: the status facts every `/status`, `/readyz`, `/metrics`
answer and systemd `STATUS=` line is built from, the KPI and operations series, the released
orders' figures, the exception list and the last reconciliation; and the exceptions the gateway
itself raises and clears (an order the plant cannot run or ERP did not release, an order that
does not reconcile). `GatewayReporting` is a part of `edge.runtime.daemon.Gateway`, which sets
up what it reads; none of it changes what the gateway does, only what it tells.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from prometheus_client.core import Metric

from buffer.outbox import DestinationCounts, Outbox
from drivers.base import Driver
from drivers.mqtt import MqttDriver
from edge.config.models import PlantConfig
from edge.config.orders import ORDERS_DESTINATION
from edge.forward import HttpForwarder
from edge.ops import status
from edge.ops.exceptions import Condition, ExceptionBoard
from edge.ops.exceptions import listing as exception_listing
from edge.ops.kpis import DeliveryKpis
from edge.ops.ledger import OrderLedger
from edge.ops.reconcile import Reconciler, Reconciliation
from edge.ops.settings import ExceptionKind
from edge.ops.watch import metrics as ops_metrics
from edge.ops.watch import scorecard
from edge.orders.book import OrderBook, OrderIssue
from edge.orders.release import OrderRelease
from edge.runtime.pipeline import Pipeline
from edge.runtime.quality import QualityLink

if TYPE_CHECKING:
    from edge.runtime.daemon import Control, Gateway, Phase

ORDER_ISSUE_KINDS: dict[str, ExceptionKind] = {
    "order.invalid": "blocked_order",
    "order.not_released": "unknown_order",
}
"""The order book's issue kinds as the exceptions module names them."""


class GatewayReporting:
    """The gateway's answers and its own exceptions (the gateway sets these attributes up)."""

    config: PlantConfig
    outbox: Outbox
    kpis: DeliveryKpis
    ledger: OrderLedger
    control: Control
    pipeline: Pipeline
    drivers: list[Driver]
    forwarders: list[HttpForwarder]
    order_book: OrderBook | None
    order_release: OrderRelease | None
    quality: QualityLink
    exceptions: ExceptionBoard
    reconciler: Reconciler
    outbox_counts: dict[str, DestinationCounts]
    input_dead_letters: dict[str, int]
    started_at: float
    phase: Phase

    @property
    def ready_max_backlog_age(self) -> float:
        return self.config.api.ready_max_backlog_age

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
                cast("Gateway", self),
                self.ledger.db,
                last.error_ratio if last is not None else None,
                now,
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
        yield from ops_metrics(cast("Gateway", self))

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
