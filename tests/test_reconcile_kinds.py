"""Each kind of reconciliation mismatch, with its likely cause, against hand-made figures.

The gateway's side is real: events committed to a real outbox (and the order ledger) and
moved by the outbox's own calls (acknowledged with ERP's reference, dead-lettered, left
pending). ERP's side is a stub reader: a confirmation reversed in ERP, one whose quantity a
person changed there, or the same one posted twice are states the ERP simulator does not make
(tests/test_reconcile.py covers what it does, against the real processes). The expected kinds
and figures are written out by hand below.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from buffer.outbox import Outbox, OutboxEvent
from edge.model.envelope import CloudEvent, build_event
from edge.model.events import LotDisposition, ProductionConfirmation
from edge.model.quantities import Quantity
from edge.ops.ledger import MesOrderReport, OrderLedger
from edge.ops.reconcile import reconcile_order
from edge.ops.reconcile_erp import ErpConfirmation, ErpOrder, StockStatus

ORDER = "3000001"
WHEN = datetime(2026, 12, 4, 6, 0, tzinfo=UTC)


def confirmation(number: int, good: int, scrap: int = 0) -> CloudEvent:
    data = ProductionConfirmation(
        site="1010",
        machine_id="press-01",
        order_id=ORDER,
        operation="0010",
        material="FG-1",
        lot_id="LOT-9",
        yield_quantity=Quantity(value=str(good), uom="C62"),
        scrap_quantity=Quantity(value=str(scrap), uom="C62"),
        counter_from=number * 100,
        counter_to=number * 100 + good + scrap,
        is_final=False,
        trigger="units",
        occurred_at=WHEN,
    )
    return build_event(
        data, natural_key=("test", number), subject=ORDER, partitionkey=ORDER, sequence=number
    )


def disposition(decided: str) -> CloudEvent:
    data = LotDisposition(
        site="1010",
        order_id=ORDER,
        material="FG-1",
        lot_id="LOT-9",
        disposition=decided,
        disposition_source="qms",  # type: ignore[arg-type]
        occurred_at=WHEN,
    )
    return build_event(
        data, natural_key=("test", "disposition"), subject="LOT-9", partitionkey=ORDER, sequence=99
    )


class StubErp:
    def __init__(self, confirmations: list[ErpConfirmation], lot: StockStatus) -> None:
        self.answer = ErpOrder(confirmations, {"LOT-9": lot})

    async def order(self, order_id: str, lots: Mapping[str, str | None]) -> ErpOrder:
        assert order_id == ORDER and dict(lots) == {"LOT-9": "FG-1"}
        return self.answer


def in_erp(
    event: CloudEvent | None, good: str, *, reversed_: bool = False, reference: str = "1/1"
) -> ErpConfirmation:
    return ErpConfirmation(
        reference,
        event.id if event else "typed in by hand",
        "0010",
        Decimal(good),
        Decimal(0),
        "PCE",
        reversed_,
    )


def test_every_mismatch_kind_names_each_side_and_a_cause(tmp_path: Path) -> None:
    a, b, c, d, e, f = (
        confirmation(n, good) for n, good in enumerate((10, 20, 30, 40, 50, 60), start=1)
    )
    released = disposition("release")

    async def gateway_side() -> None:
        async with Outbox.open(tmp_path / "outbox.db") as outbox:
            events = [a, b, c, d, released, e, f]
            await outbox.commit(
                [OutboxEvent(x.id, x.type, ORDER, x.to_json(), ("erp",)) for x in events]
            )
            ledger = OrderLedger.open(tmp_path)
            ledger.record_events(events)
            ledger.record_reports(
                [
                    MesOrderReport(
                        ORDER, "0010", "ended", "press-01", WHEN.timestamp(), "205", "0", "C62"
                    )
                ]
            )
            ledger.close()
            # a..d and the disposition delivered, e refused for good, f still pending.
            for x in (a, b, c, d, released, e):
                (delivery,) = await outbox.lease("erp", 1)
                assert delivery.event_id == x.id
                if x is e:
                    await outbox.dead_letter(delivery, status=400, reason="no such material")
                else:
                    await outbox.ack(delivery, status=201, reference=f"ERP-{x.id[:4]}")

    asyncio.run(gateway_side())
    erp = StubErp(
        [
            in_erp(a, "10"),
            in_erp(b, "20", reversed_=True),
            in_erp(c, "33"),
            in_erp(a, "10", reference="1/2"),
            in_erp(None, "7"),
        ],
        lot="blocked",
    )
    ledger_db = sqlite3.connect(tmp_path / "ops.db")
    outbox_db = sqlite3.connect(tmp_path / "outbox.db")
    result = asyncio.run(reconcile_order(ORDER, ledger_db, outbox_db, "erp", erp))

    found = {(m.kind, m.lot_id or m.event_id or "") for m in result.mismatches}
    assert found == {
        ("reversed_in_erp", b.id),  # reversed in ERP: out of ERP's total
        ("quantity_changed_in_erp", c.id),  # 30 sent, ERP holds 33
        ("not_from_gateway", ""),  # 7 typed in by hand
        ("posted_twice", a.id),  # a is in ERP twice
        ("gateway_delivered", b.id),  # acknowledged, no longer counted in ERP
        ("gateway_delivered", d.id),  # acknowledged, not in ERP at all
        ("gateway_dead", e.id),
        ("gateway_pending", f.id),
        ("mes_vs_gateway", ""),  # MES says 205, the machine confirmed 210
        ("lot_status", "LOT-9"),  # QMS released, ERP blocked
    }
    by_kind = {m.kind: m for m in result.mismatches}
    assert by_kind["quantity_changed_in_erp"].figures["gateway"]["yield"] == "30"
    assert by_kind["quantity_changed_in_erp"].figures["erp"]["yield"] == "33"
    assert by_kind["posted_twice"].figures["erp"] == {"times": 2}
    assert by_kind["gateway_dead"].figures["gateway"]["delivery"] == "dead"
    assert "dead letter" in by_kind["gateway_dead"].cause
    assert by_kind["mes_vs_gateway"].figures == {
        "mes": {"reported": True, "operation": "0010", "yield": "205", "scrap": "0", "uom": "C62"},
        "gateway": {"operation": "0010", "yield": "210", "scrap": "0"},
    }
    assert "after MES ended" in by_kind["mes_vs_gateway"].cause
    assert by_kind["lot_status"].figures == {
        "qms": "release",
        "erp": "blocked",
        "expected_erp": "unrestricted",
    }
    assert "changed by hand in ERP" in by_kind["lot_status"].cause
    # Totals: 10+20+30+40+50+60 committed; ERP counts 10 + 33 + 10 + 7 (b is reversed).
    assert (result.gateway["yield"], result.erp["yield"]) == ("210", "60")
    assert result.gateway["delivered"] == 4 and result.gateway["dead"] == 1
    assert result.gateway["pending"] == 1


def test_the_ledger_reads_back_what_a_crash_left_out(tmp_path: Path) -> None:
    """kill -9 between the outbox commit and the ledger write: the next start reads the
    outbox's held events back (the outbox's own rows are the oracle)."""
    events = [confirmation(n, 5) for n in range(1, 4)]

    async def commit() -> None:
        async with Outbox.open(tmp_path / "outbox.db") as outbox:
            await outbox.commit(
                [OutboxEvent(x.id, x.type, ORDER, x.to_json(), ("erp",)) for x in events]
            )

    asyncio.run(commit())
    ledger = OrderLedger.open(tmp_path)
    ledger.record_events(events[:1])  # the crash came after the first
    assert ledger.backfill(tmp_path / "outbox.db") == 2
    assert ledger.backfill(tmp_path / "outbox.db") == 0
    rows = ledger.db.execute(
        "SELECT event_id, yield_value FROM order_events ORDER BY event_id"
    ).fetchall()
    ledger.close()
    assert rows == sorted((x.id, "5") for x in events)
