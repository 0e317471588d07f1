"""What the daemon watches for the people who run the plant: the conditions behind the
level-triggered exceptions (`ExceptionWatch`), and the eight business KPIs (`scorecard`),
read from the live gateway, the outbox, the order ledger and the last reconciliation.

The KPIs, and where each comes from:
- order sync success rate: orders released to MES that MES accepted (its `order.started`, or
  its acknowledgement), / orders released: the order release's order book
  (`gateway.order_book.figures()`, `plantsync_order_sync_success_ratio` is its metric); none
  without an `orders:` section;
- completion posting latency, inspection turnaround, lot hold to release: the delivery KPIs'
  histograms (`edge/kpis.py`), as mean and count;
- genealogy completeness: the pipeline's genealogy figures;
- reconciliation error rate: orders with a mismatch / orders reconciled, in the last run;
- integration failure rate, per destination: (failed attempts + dead letters) / attempts,
  since the daemon started (the forwarders' counts);
- manual interventions per production cycle: hand actions (retry, purge, reingest, trust)
  within `reconcile.window` / orders ended in it; and per order, the hand actions that name an
  event or MES message of that order.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from edge.ops import ledger
from edge.ops.exceptions import Condition, ExceptionBoard

if TYPE_CHECKING:
    from edge.runtime.daemon import Gateway

PRODUCED_AWAITING = "produced, awaiting quality"
_EVENT_TARGET = re.compile(r"\bevent ([0-9a-f-]{36})\b")
_MESSAGE_TARGET = re.compile(r"\(MES message ([^)\s]+)\)")


def _show(event_id: str) -> str:
    return f"plantsync outbox --config FILE show {event_id}"


class ExceptionWatch:
    """Every `exceptions.check_every`, the level-triggered conditions, synced to the board."""

    def __init__(
        self, gateway: Gateway, board: ExceptionBoard, ledger_db: sqlite3.Connection
    ) -> None:
        self.gateway = gateway
        self.board = board
        self.ledger_db = ledger_db
        self._down_since: dict[str, float] = {}

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.gateway.config.exceptions.check_every)

    async def check(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.board.sync("dead_letter", await self._dead_letters(), now)
        self.board.sync("outage", self._outages(now), now)
        held, missing = self._lots(now)
        self.board.sync("held_lot", held, now)
        self.board.sync("missing_inspection", missing, now)
        self.board.sync("unresolved_nonconformance", self._nonconformances(), now)

    async def _dead_letters(self) -> list[Condition]:
        rows = await self.gateway.outbox.dead_letters()
        orders = ledger.orders_of_events(self.ledger_db, [str(r["id"]) for r in rows])
        found = []
        for row in rows:
            correlation = {
                "event_id": row["id"],
                "destination": row["destination"],
                "partition_key": row["partition_key"],
            }
            if row["id"] in orders:
                correlation["order_id"] = orders[row["id"]]
            found.append(
                Condition(
                    f"event {row['id']} to {row['destination']}",
                    f"{row['type']} for {row['partition_key']} was refused by "
                    f"{row['destination']} (HTTP {row['last_status']}): "
                    f"{str(row['last_error'] or '')[:300]}",
                    correlation,
                    _show(row["id"]),
                )
            )
        return found

    def _outages(self, now: float) -> list[Condition]:
        gateway = self.gateway
        after = gateway.config.exceptions.outage_after
        down: dict[str, tuple[str, dict[str, str], str]] = {}
        for forwarder in gateway.forwarders:
            if forwarder.health.reachable is False:
                down[f"destination {forwarder.name}"] = (
                    f"deliveries to {forwarder.name} fail: {forwarder.health.last_error}",
                    {"destination": forwarder.name},
                    f"plantsync outbox --config FILE status; plantsync outbox --config FILE "
                    f"list --destination {forwarder.name}",
                )
        for driver in gateway.drivers:
            if not driver.health.connected:
                down[f"driver {driver.name}"] = (
                    f"driver {driver.name} is not connected to its device"
                    + (f": {driver.health.last_error}" if driver.health.last_error else ""),
                    {"driver": driver.name},
                    "plantsync status --config FILE",
                )
        if gateway.config.quality.qms is not None and gateway.quality.reachable is False:
            down["quality feed"] = (
                f"the QMS disposition feed ({gateway.config.quality.qms}) cannot be read",
                {"destination": gateway.config.quality.qms},
                "plantsync status --config FILE",
            )
        for subject in list(self._down_since):
            if subject not in down:
                del self._down_since[subject]
        found = []
        for subject, (text, correlation, inspect) in down.items():
            since = self._down_since.setdefault(subject, now)
            if now - since >= after:
                found.append(
                    Condition(subject, f"{text} (for {now - since:.0f}s)", correlation, inspect)
                )
        return found

    def _lots(self, now: float) -> tuple[list[Condition], list[Condition]]:
        path = self.gateway.config.database_path
        outbox = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = outbox.execute(
                "SELECT lot_id, since, source, order_id FROM lot_status WHERE status = 'hold'"
            ).fetchall()
        finally:
            outbox.close()
        after = self.gateway.config.exceptions.missing_inspection_after
        held, missing = [], []
        for lot_id, since, source, order_id in rows:
            correlation = {"lot_id": lot_id, **({"order_id": order_id} if order_id else {})}
            inspect = f"curl http://{self.gateway.config.api.listen}/lots/{lot_id}"
            if source == PRODUCED_AWAITING:
                if now - since >= after:
                    missing.append(
                        Condition(
                            f"lot {lot_id}",
                            f"lot {lot_id} was produced {now - since:.0f}s ago "
                            "and the QMS has decided nothing yet: is its inspection missing?",
                            correlation,
                            inspect,
                        )
                    )
            elif not source.startswith("default"):
                held.append(
                    Condition(
                        f"lot {lot_id}", f"lot {lot_id} is on hold ({source})", correlation, inspect
                    )
                )
        return held, missing

    def _nonconformances(self) -> list[Condition]:
        rows = self.ledger_db.execute(
            "SELECT n.event_id, n.order_id, n.lot_id FROM order_events n WHERE"
            " n.event_type = 'nonconformance.raised' AND NOT EXISTS (SELECT 1 FROM order_events d"
            " WHERE d.event_type = 'lot.disposition' AND d.committed_at >= n.committed_at AND"
            " (d.lot_id = n.lot_id OR (n.lot_id IS NULL AND d.order_id = n.order_id)))"
        ).fetchall()
        found = []
        for event_id, order_id, lot_id in rows:
            about = f"lot {lot_id}" if lot_id else f"order {order_id}"
            correlation = {
                "event_id": event_id,
                **({"order_id": order_id} if order_id else {}),
                **({"lot_id": lot_id} if lot_id else {}),
            }
            found.append(
                Condition(
                    f"nonconformance {event_id}",
                    f"a nonconformance on {about} has no disposition yet",
                    correlation,
                    _show(event_id),
                )
            )
        return found


def _mean(histogram: Histogram) -> dict[str, Any]:
    """Mean and count of a histogram, over all its label values."""
    total = count = 0.0
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
    return {"mean_seconds": round(total / count, 3) if count else None, "count": int(count)}


def interventions(
    outbox_db: sqlite3.Connection, ledger_db: sqlite3.Connection, since: float
) -> tuple[int, Counter[str]]:
    """Hand actions since `since`, and per order those that name an event or MES message of
    it (a `retry --all-dead` names none: it counts in the total only)."""
    rows = outbox_db.execute("SELECT target FROM hand_actions WHERE at >= ?", (since,)).fetchall()
    per_order: Counter[str] = Counter()
    for (target,) in rows:
        orders: set[str] = set()
        if match := _EVENT_TARGET.search(target):
            orders |= set(ledger.orders_of_events(ledger_db, [match.group(1)]).values())
        if match := _MESSAGE_TARGET.search(target):
            orders |= set(ledger.orders_of_message(ledger_db, match.group(1)))
        per_order.update(orders)
    return len(rows), per_order


def scorecard(
    gateway: Gateway,
    ledger_db: sqlite3.Connection,
    last_ratio: float | None,
    now: float | None = None,
) -> dict[str, Any]:
    """The eight KPIs, as `/status`, `plantsync status` and `/metrics` show them."""
    now = time.time() if now is None else now
    window = gateway.config.reconcile.window
    book = getattr(gateway, "order_book", None)  # the order release's, with `orders:`
    orders = book.figures(now) if book is not None else {}
    cycles = len(ledger.orders_ended_since(ledger_db, now - window, now))
    outbox_db = sqlite3.connect(f"file:{gateway.config.database_path}?mode=ro", uri=True)
    try:
        hand, per_order = interventions(outbox_db, ledger_db, now - window)
    finally:
        outbox_db.close()
    failure = {}
    for forwarder in gateway.forwarders:
        health = forwarder.health
        if health.attempts:
            failure[forwarder.name] = round(
                (health.failed_attempts + health.dead_lettered) / health.attempts, 4
            )
    lots = list(gateway.pipeline.genealogy.figures().values())
    kpis = gateway.kpis
    return {
        "window_seconds": window,
        "order_sync_success_ratio": orders.get("sync_success_ratio"),
        "orders_released": orders.get("released", 0),
        "orders_accepted": orders.get("accepted", 0),
        "completion_posting_latency": _mean(kpis.completion_posting),
        "inspection_turnaround": _mean(kpis.inspection_turnaround),
        "lot_hold_to_release": _mean(kpis.hold_to_release),
        "genealogy_completeness_ratio": round(
            sum(f["complete"] for f in lots) / sum(f["lots"] for f in lots), 4
        )
        if lots
        else None,
        "reconciliation_error_ratio": None if last_ratio is None else round(last_ratio, 4),
        "integration_failure_ratio": failure,
        "manual_interventions": hand,
        "production_cycles": cycles,
        "manual_interventions_per_cycle": round(hand / cycles, 4) if cycles else None,
        "manual_interventions_by_order": dict(per_order.most_common(20)),
    }


def metrics(gateway: Gateway) -> Iterator[Metric]:
    """The reconciliation, exception and KPI series of `/metrics`."""
    reconciler = gateway.reconciler
    mismatches = GaugeMetricFamily(
        "plantsync_reconciliation_mismatches",
        "Mismatches the last reconciliation of recently ended orders found, by kind",
        labels=["kind"],
    )
    for kind, count in sorted(reconciler.mismatch_counts().items()):
        mismatches.add_metric([kind], count)
    yield mismatches
    last = reconciler.last
    if last is not None:
        yield GaugeMetricFamily(
            "plantsync_reconciliation_orders",
            "Orders the last reconciliation compared",
            value=len(last.orders),
        )
        if last.error_ratio is not None:
            yield GaugeMetricFamily(
                "plantsync_reconciliation_error_ratio",
                "Reconciliation error rate: orders "
                "with at least one mismatch / orders reconciled (last run)",
                value=last.error_ratio,
            )
        yield GaugeMetricFamily(
            "plantsync_reconciliation_last_run_timestamp_seconds",
            "When the last reconciliation ran",
            value=last.at,
        )
    runs = CounterMetricFamily(
        "plantsync_reconciliation_runs",
        "Periodic reconciliations, by outcome (failed: ERP could not be asked about some order)",
        labels=["outcome"],
    )
    for outcome in ("done", "failed"):
        runs.add_metric([outcome], reconciler.runs[outcome])
    yield runs

    board = gateway.exceptions
    open_now = GaugeMetricFamily(
        "plantsync_exceptions_open", "Exceptions open now, by kind", labels=["kind"]
    )
    for kind, count in board.open_counts().items():
        open_now.add_metric([kind], count)
    raised = CounterMetricFamily(
        "plantsync_exceptions_raised",
        "Exceptions raised since the daemon started, by kind",
        labels=["kind"],
    )
    for kind, count in board.raised.items():
        raised.add_metric([kind], count)
    yield from (open_now, raised)

    card = scorecard(gateway, gateway.ledger.db, last.error_ratio if last is not None else None)
    # The order sync success rate and its counts are the order release's metrics
    # (plantsync_order_sync_success_ratio, plantsync_orders_released/_accepted).
    for name, figure, text in (
        (
            "plantsync_manual_interventions",
            card["manual_interventions"],
            "Hand actions (retry, purge, reingest, trust) within reconcile.window",
        ),
        (
            "plantsync_production_cycles",
            card["production_cycles"],
            "Orders ended (MES order.ended or operation.completed) within reconcile.window",
        ),
    ):
        yield GaugeMetricFamily(name, text, value=figure)
    if card["manual_interventions_per_cycle"] is not None:
        yield GaugeMetricFamily(
            "plantsync_manual_interventions_per_cycle",
            "Manual interventions per production "
            "cycle: hand actions / orders ended, within reconcile.window",
            value=card["manual_interventions_per_cycle"],
        )
    failure = GaugeMetricFamily(
        "plantsync_integration_failure_ratio",
        "Integration failure rate: (failed delivery "
        "attempts + dead letters) / attempts, since the daemon started",
        labels=["destination"],
    )
    attempts = CounterMetricFamily(
        "plantsync_delivery_attempts",
        "Delivery attempts (per event), by outcome",
        labels=["destination", "outcome"],
    )
    for forwarder in gateway.forwarders:
        health = forwarder.health
        if health.attempts:
            failure.add_metric([forwarder.name], card["integration_failure_ratio"][forwarder.name])
        attempts.add_metric([forwarder.name, "delivered"], health.delivered)
        attempts.add_metric([forwarder.name, "retry"], health.failed_attempts)
        attempts.add_metric([forwarder.name, "dead_letter"], health.dead_lettered)
    yield from (failure, attempts)
