"""Reconciliation: per production order, the gateway's figures beside ERP's, MES's and the
QMS's, and every disagreement with each side's figure and its likely cause.

Four sides, per order:
- the gateway: the confirmations it committed (the order ledger, `edge/ops/ledger.py`) and
  where each stands with the ERP destination (the outbox's journal: delivered, with ERP's
  reference; or still pending; or a dead letter);
- ERP: the order's confirmations as ERP holds them. `sap_s4hana`:
  `API_PROD_ORDER_CONFIRMATION_2_SRV/ProdnOrdConf2?$filter=OrderID eq '…'` (each carries the
  gateway's event id in `ConfirmationText`; reversed and reversal records are left out of the
  totals). `canonical`: `GET <orders_path>/<order_id>/confirmed` (README: *Reconciliation*);
- MES: the quantities its `order.ended` reported, per operation;
- quality: each lot's QMS disposition as the gateway received it, beside ERP's stock status of
  the batch (`sap_s4hana`: the batch's inspection lot of origin 04 and its usage decision, read
  through the decision codes of `sap.usage_decisions`; `canonical`: the `lots` of the same GET).

The same function serves `plantsync reconcile` (in its own process, reading the databases
read-only) and the daemon's periodic job (recently ended orders, feeding
`plantsync_reconciliation_mismatches`, the reconciliation error rate and the
`reconciliation_mismatch` exceptions).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from edge.config.models import PlantConfig
from edge.forward.session import make_client
from edge.forward.urls import UnsafeUrlPart
from edge.ops import ledger
from edge.ops.ledger import decimal_of
from edge.ops.reconcile_erp import (
    ErpReader,
    ReconcileError,
    StockStatus,
    erp_destination,
    erp_reader,
)

log = logging.getLogger(__name__)

EXPECTED_STOCK: Mapping[str, StockStatus] = {
    "release": "unrestricted",
    "reject": "blocked",
    "hold": "quality_inspection",
}
"""The ERP stock status that agrees with each QMS disposition."""
PRODUCED_LOT_EVENTS = frozenset(
    {"production.confirmation", "lot.produced", "inspection.requested", "lot.disposition"}
)


@dataclass(slots=True)
class Mismatch:
    kind: str
    order_id: str
    figures: dict[str, Any]
    cause: str
    inspect: str | None = None
    lot_id: str | None = None
    event_id: str | None = None


@dataclass(slots=True)
class OrderReconciliation:
    order_id: str
    gateway: dict[str, Any]
    erp: dict[str, Any]
    mes: dict[str, Any]
    lots: list[dict[str, Any]]
    mismatches: list[Mismatch]

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "mismatches": [asdict(m) for m in self.mismatches]}


# -- the gateway's side -------------------------------------------------------------------------


def delivery_states(
    outbox: sqlite3.Connection, destination: str, event_ids: Sequence[str]
) -> dict[str, tuple[str, str | None]]:
    """Per event id: (`delivered` | `pending` | `dead` | `not routed`, ERP's reference)."""
    found: dict[str, tuple[str, str | None]] = {}
    for start in range(0, len(event_ids), 500):
        chunk = list(event_ids[start : start + 500])
        marks = ",".join("?" * len(chunk))
        for event_id, reference in outbox.execute(
            f"SELECT event_id, reference FROM journal WHERE destination = ? AND event_id IN"
            f" ({marks})",
            [destination, *chunk],
        ):
            found[event_id] = ("delivered", reference)
        for event_id, state in outbox.execute(
            # From each event (by id) to its delivery by the deliveries' key.
            f"SELECT e.id, d.state FROM events e CROSS JOIN deliveries d WHERE e.id IN ({marks})"
            " AND d.destination = ? AND d.partition_key = e.partition_key AND d.event_seq = e.seq",
            [*chunk, destination],
        ):
            found[event_id] = ("dead" if state == 2 else "pending", None)
    return {event_id: found.get(event_id, ("not routed", None)) for event_id in event_ids}


def _text(value: Decimal) -> str:
    normal = value.normalize()
    return format(normal if normal != normal.to_integral() else normal.quantize(Decimal(1)), "f")


def _show(event_id: str) -> str:
    return f"plantsync outbox --config FILE show {event_id}"


async def reconcile_order(
    order_id: str,
    ledger_db: sqlite3.Connection,
    outbox_db: sqlite3.Connection,
    destination: str,
    reader: ErpReader,
) -> OrderReconciliation:
    rows = ledger.order_events(ledger_db, order_id)
    confirmations = [r for r in rows if r["event_type"] == "production.confirmation"]
    states = delivery_states(outbox_db, destination, [r["event_id"] for r in confirmations])
    lots: dict[str, str | None] = {}
    dispositions: dict[str, dict[str, Any]] = {}
    for row in rows:
        # The order's own lots; a consumed lot is an input, another order's output.
        if row["lot_id"] and row["event_type"] in PRODUCED_LOT_EVENTS:
            lots[row["lot_id"]] = row["material"] or lots.get(row["lot_id"])
        if row["event_type"] == "lot.disposition" and row["lot_id"]:
            dispositions[row["lot_id"]] = row  # committed in order: the newest wins
    erp = await reader.order(order_id, lots)
    mismatches: list[Mismatch] = []

    gateway_yield = sum((decimal_of(r["yield_value"]) for r in confirmations), Decimal(0))
    gateway_scrap = sum((decimal_of(r["scrap_value"]) for r in confirmations), Decimal(0))
    by_state = Counter(state for state, _ in states.values())
    counted = [c for c in erp.confirmations if not c.reversed]
    erp_yield = sum((c.yield_value for c in counted), Decimal(0))
    erp_scrap = sum((c.scrap_value for c in counted), Decimal(0))
    ours = {r["event_id"]: r for r in confirmations}
    held = Counter(c.event_id for c in counted if c.event_id in ours)

    for confirmation in erp.confirmations:
        figures = {
            "erp": {
                "reference": confirmation.reference,
                "yield": _text(confirmation.yield_value),
                "scrap": _text(confirmation.scrap_value),
                "uom": confirmation.uom,
                "text": confirmation.event_id,
                "entered_by": confirmation.entered_by,
            },
            "gateway": None,
        }
        match = ours.get(confirmation.event_id or "")
        if confirmation.reversed:
            mismatches.append(
                Mismatch(
                    "reversed_in_erp",
                    order_id,
                    figures,
                    "the confirmation was reversed (or is a "
                    "reversal) in ERP: its quantity is left out of ERP's total",
                    event_id=confirmation.event_id if match else None,
                )
            )
        elif match is None:
            mismatches.append(
                Mismatch(
                    "not_from_gateway",
                    order_id,
                    figures,
                    "ERP holds a confirmation the gateway did not send: posted by hand in ERP, or "
                    "by another system",
                )
            )
        elif (decimal_of(match["yield_value"]), decimal_of(match["scrap_value"])) != (
            confirmation.yield_value,
            confirmation.scrap_value,
        ):
            figures["gateway"] = {
                "event_id": match["event_id"],
                "yield": match["yield_value"],
                "scrap": match["scrap_value"],
                "uom": match["uom"],
            }
            mismatches.append(
                Mismatch(
                    "quantity_changed_in_erp",
                    order_id,
                    figures,
                    "ERP holds the gateway's "
                    "confirmation with another quantity: changed in ERP after it was posted",
                    _show(match["event_id"]),
                    event_id=match["event_id"],
                )
            )
    for event_id, times in held.items():
        if event_id is not None and times > 1:
            mine = ours[event_id]
            mismatches.append(
                Mismatch(
                    "posted_twice",
                    order_id,
                    {
                        "gateway": {"event_id": event_id, "yield": mine["yield_value"]},
                        "erp": {"times": times},
                    },
                    "ERP holds the same gateway confirmation more than once: a retry reached ERP "
                    "after the first attempt had arrived",
                    _show(event_id),
                    event_id=event_id,
                )
            )
    for event_id, mine in ours.items():
        state, reference = states[event_id]
        if held[event_id]:
            continue
        figures = {
            "gateway": {
                "event_id": event_id,
                "yield": mine["yield_value"],
                "scrap": mine["scrap_value"],
                "uom": mine["uom"],
                "delivery": state,
                "erp_reference": reference,
            },
            "erp": None,
        }
        cause = {
            "delivered": "ERP acknowledged it (the journal holds its reference) but does not "
            "hold it now: reversed or deleted in ERP",
            "pending": "not delivered yet: it waits in the outbox (ERP unreachable, or "
            "behind other events of the order)",
            "dead": "ERP refused it for good: it is a dead letter; fix the cause, then retry "
            "it, or post it by hand and purge it",
            "not routed": "the gateway never sent it to this ERP destination (routes), or the "
            "journal row is past its retention",
        }[state]
        mismatches.append(
            Mismatch(
                f"gateway_{state.replace(' ', '_')}",
                order_id,
                figures,
                cause,
                _show(event_id),
                event_id=event_id,
            )
        )
    if (erp_yield, erp_scrap) != (gateway_yield, gateway_scrap) and not mismatches:
        mismatches.append(
            Mismatch(
                "totals",
                order_id,
                {
                    "gateway": {"yield": _text(gateway_yield), "scrap": _text(gateway_scrap)},
                    "erp": {"yield": _text(erp_yield), "scrap": _text(erp_scrap)},
                },
                "the totals differ although every confirmation matches: ERP sums confirmations "
                "this ERP does not identify",
            )
        )

    reports = ledger.mes_reports(ledger_db, order_id)
    mes: dict[str, Any] = {"reported": False}
    for report in reports:
        if report["kind"] != "ended" or report["yield_value"] is None:
            continue
        operation = report["operation"]
        of_operation = [r for r in confirmations if r["operation"] == operation]
        our_yield = sum((decimal_of(r["yield_value"]) for r in of_operation), Decimal(0))
        our_scrap = sum((decimal_of(r["scrap_value"]) for r in of_operation), Decimal(0))
        mes_yield = decimal_of(report["yield_value"])
        mes_scrap = decimal_of(report["scrap_value"]) if report["scrap_value"] else None
        mes = {
            "reported": True,
            "operation": operation,
            "yield": _text(mes_yield),
            "scrap": None if mes_scrap is None else _text(mes_scrap),
            "uom": report["uom"],
        }
        units = {r["uom"] for r in of_operation if r["uom"]}
        if report["uom"] and units and units != {report["uom"]}:
            cause = (
                f"MES counts in {report['uom']}, the machine's confirmations in "
                f"{', '.join(sorted(units))}: the units differ"
            )
        elif our_yield < mes_yield:
            cause = (
                "the machine's counters confirmed less than MES reported: units counted "
                "before the order was bound (unassigned production), a counter reset "
                "while the gateway could not read it, or an MES count by hand"
            )
        else:
            cause = (
                "MES reported less than the machine's counters confirmed: units counted "
                "after MES ended the order, or scrap MES booked that the machine counted "
                "as good"
            )
        if our_yield != mes_yield or (mes_scrap is not None and our_scrap != mes_scrap):
            mismatches.append(
                Mismatch(
                    "mes_vs_gateway",
                    order_id,
                    {
                        "mes": mes,
                        "gateway": {
                            "operation": operation,
                            "yield": _text(our_yield),
                            "scrap": _text(our_scrap),
                        },
                    },
                    cause,
                )
            )

    lot_rows = []
    for lot_id, material in sorted(lots.items()):
        decided = dispositions.get(lot_id)
        qms = decided["disposition"] if decided else None
        stock = erp.lots.get(lot_id, "unknown")
        lot_rows.append(
            {"lot_id": lot_id, "material": material, "qms": qms or "none yet", "erp_stock": stock}
        )
        if decided is None or EXPECTED_STOCK.get(qms or "") == stock:
            continue
        state, _ = delivery_states(outbox_db, destination, [decided["event_id"]])[
            decided["event_id"]
        ]
        cause = {
            "pending": "the disposition waits in the outbox: not in ERP yet",
            "dead": "ERP refused the disposition for good: it is a dead letter",
            "delivered": "ERP acknowledged the disposition, and its stock status is another "
            "now: changed by hand in ERP (usage decision or stock transfer)",
            "not routed": "lot.disposition is not routed to this ERP destination",
        }[state]
        if stock == "unknown":
            cause = (
                "ERP has no inspection lot or stock status for this batch: the goods "
                "receipt was not posted, or posted under another material or plant"
            )
        mismatches.append(
            Mismatch(
                "lot_status",
                order_id,
                {"qms": qms, "erp": stock, "expected_erp": EXPECTED_STOCK.get(qms or "")},
                cause,
                _show(decided["event_id"]),
                lot_id=lot_id,
                event_id=decided["event_id"],
            )
        )

    return OrderReconciliation(
        order_id,
        gateway={
            "yield": _text(gateway_yield),
            "scrap": _text(gateway_scrap),
            "uom": next((r["uom"] for r in confirmations if r["uom"]), None),
            "confirmations": len(confirmations),
            **dict(sorted(by_state.items())),
        },
        erp={
            "yield": _text(erp_yield),
            "scrap": _text(erp_scrap),
            "confirmations": len(erp.confirmations),
            "reversed": len(erp.confirmations) - len(counted),
        },
        mes=mes,
        lots=lot_rows,
        mismatches=mismatches,
    )


@dataclass(slots=True)
class Reconciliation:
    """One run: the orders compared, their mismatches, and orders ERP could not be asked
    about."""

    at: float
    orders: list[OrderReconciliation]
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def mismatches(self) -> list[Mismatch]:
        return [m for order in self.orders for m in order.mismatches]

    @property
    def error_ratio(self) -> float | None:
        """Orders with at least one mismatch / orders reconciled (None when none were)."""
        if not self.orders:
            return None
        return sum(1 for order in self.orders if order.mismatches) / len(self.orders)

    def as_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "orders_reconciled": len(self.orders),
            "orders_with_mismatches": sum(1 for o in self.orders if o.mismatches),
            "mismatches": len(self.mismatches),
            "error_ratio": self.error_ratio,
            "failed": self.failed,
            "orders": [o.as_json() for o in self.orders],
        }


async def reconcile(
    config: PlantConfig,
    ledger_db: sqlite3.Connection,
    outbox_db: sqlite3.Connection,
    order_ids: Sequence[str],
    client: httpx.AsyncClient | None = None,
) -> Reconciliation:
    """Reconcile `order_ids` against the configured ERP destination. Raises ReconcileError
    when no ERP destination is configured."""
    found = erp_destination(config)
    if found is None:
        raise ReconcileError(
            "no ERP destination to reconcile against: set reconcile.erp, or "
            "route production.confirmation to a sap_s4hana or canonical one"
        )
    name, destination = found
    own_client = client is None
    http = client or make_client(name, destination)
    result = Reconciliation(time.time(), [])
    try:
        reader = erp_reader(config, name, destination, http)
        for order_id in order_ids:
            try:
                result.orders.append(
                    await reconcile_order(order_id, ledger_db, outbox_db, name, reader)
                )
            except (ReconcileError, httpx.HTTPError, UnsafeUrlPart) as exc:
                result.failed[order_id] = str(exc) or type(exc).__name__
    finally:
        if own_client:
            await http.aclose()
    return result


def open_databases(data_dir: Path) -> tuple[sqlite3.Connection, sqlite3.Connection]:
    """The ledger and the outbox, read-only (the CLI, beside a running daemon)."""
    ops_path, outbox_path = data_dir / ledger.OPS_DATABASE, data_dir / "outbox.db"
    for needed in (ops_path, outbox_path):
        if not needed.exists():
            raise ReconcileError(
                f"{needed} does not exist: has the gateway run with this data_dir?"
            )
    return ledger.connect(ops_path, read_only=True), sqlite3.connect(
        f"file:{outbox_path}?mode=ro", uri=True, check_same_thread=False
    )


class Reconciler:
    """The daemon's periodic job: every `reconcile.every`, orders that ended between
    `reconcile.window` and `reconcile.settle` ago. Its last run is what `/metrics`,
    `/status` and `GET /reconciliation` show; `on_result` hands it to the exceptions."""

    def __init__(
        self,
        config: PlantConfig,
        ledger_db: sqlite3.Connection,
        outbox_path: Path,
        on_result: Callable[[Reconciliation], None] | None = None,
    ) -> None:
        self.config = config
        self.ledger_db = ledger_db
        self.outbox_path = outbox_path
        self.on_result = on_result
        self.last: Reconciliation | None = None
        self.runs: Counter[str] = Counter()
        self.last_error: str | None = None

    async def run(self) -> None:
        settings = self.config.reconcile
        if not settings.every or erp_destination(self.config) is None:
            return
        while True:
            await asyncio.sleep(settings.every)
            await self.once()

    async def once(self, now: float | None = None) -> Reconciliation | None:
        settings = self.config.reconcile
        now = time.time() if now is None else now
        orders = ledger.orders_ended_since(
            self.ledger_db, now - settings.window, now - settings.settle
        )
        outbox_db = sqlite3.connect(
            f"file:{self.outbox_path}?mode=ro", uri=True, check_same_thread=False
        )
        try:
            result = await reconcile(self.config, self.ledger_db, outbox_db, orders)
        except ReconcileError as exc:
            self.runs["failed"] += 1
            self.last_error = str(exc)
            return None
        finally:
            outbox_db.close()
        self.runs["failed" if result.failed else "done"] += 1
        if result.failed:
            first = next(iter(result.failed.items()))
            if self.last_error is None:
                log.warning(
                    "Reconciliation could not ask ERP about %d order(s) (order %s: %s)",
                    len(result.failed),
                    *first,
                )
            self.last_error = f"order {first[0]}: {first[1]}"
        else:
            self.last_error = None
        if result.mismatches:
            log.warning(
                "Reconciliation found %d mismatch(es) in %d of %d order(s): "
                "plantsync reconcile --config FILE shows them",
                len(result.mismatches),
                sum(1 for o in result.orders if o.mismatches),
                len(result.orders),
            )
        self.last = result
        if self.on_result is not None:
            self.on_result(result)
        return result

    def mismatch_counts(self) -> Counter[str]:
        return Counter(m.kind for m in self.last.mismatches) if self.last else Counter()
