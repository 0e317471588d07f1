"""The text `plantsync reconcile` prints: per order, the gateway's, ERP's and MES's figures,
each lot's QMS disposition beside ERP's stock status, and every mismatch with its likely cause
and where to look (a `Reconciliation` from `edge/ops/reconcile.py`; `--json` prints its
`as_json()` instead).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edge.ops.reconcile import Reconciliation


def render(result: Reconciliation) -> str:
    """The text `plantsync reconcile` prints."""
    lines = [
        f"Reconciled {len(result.orders)} order(s): {len(result.mismatches)} mismatch(es)"
        + (f"; ERP could not be asked about {len(result.failed)}" if result.failed else "")
    ]
    for order in result.orders:
        g, e, m = order.gateway, order.erp, order.mes
        mes = (
            f"MES yield {m['yield']} scrap {m['scrap'] or '-'}"
            if m.get("reported")
            else "MES reported no quantities"
        )
        lines.append("")
        lines.append(
            f"order {order.order_id}: gateway yield {g['yield']} scrap {g['scrap']} "
            f"{g['uom'] or ''} ({g['confirmations']} confirmation(s)); ERP yield "
            f"{e['yield']} scrap {e['scrap']} ({e['confirmations']}); {mes}"
            + ("  OK" if not order.mismatches else "")
        )
        for lot in order.lots:
            lines.append(f"  lot {lot['lot_id']}: QMS {lot['qms']}, ERP stock {lot['erp_stock']}")
        for mismatch in order.mismatches:
            where = f" lot {mismatch.lot_id}" if mismatch.lot_id else ""
            lines.append(f"  MISMATCH {mismatch.kind}{where}: {_figures(mismatch.figures)}")
            lines.append(f"    likely cause: {mismatch.cause}")
            if mismatch.inspect:
                lines.append(f"    inspect: {mismatch.inspect}")
    for order_id, why in sorted(result.failed.items()):
        lines.append(f"\norder {order_id}: not reconciled: {why}")
    return "\n".join(lines)


def _figures(figures: Mapping[str, Any]) -> str:
    parts = []
    for side, figure in figures.items():
        if isinstance(figure, Mapping):
            shown = ", ".join(f"{k} {v}" for k, v in figure.items() if v is not None)
            parts.append(f"{side}: {shown or '-'}")
        else:
            parts.append(f"{side}: {'nothing' if figure is None else figure}")
    return "; ".join(parts)
