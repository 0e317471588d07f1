"""The gateway's record of the orders ERP released: per order its release version, what that
version said (a fingerprint), its ERP status, when it was released to the MES and when the MES
accepted it. Plain data, saved in the outbox's state in the same transaction as the events it
decided (the poller's commits and the pipeline's), so a crash re-derives exactly the versions and
event ids it had derived before.

It answers three questions: is this order from ERP new or changed (and which version is it), may
the MES start this order (`validation.require_released_order`), and how long the MES took to
accept a release. Exceptions it finds (an invalid order, an order started that ERP never
released) are kept as `OrderIssue` records and handed to whoever listens (`listeners`): the
exceptions module routes them by role.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from edge.model.order_events import FINISHED_ORDER_STATUSES

log = logging.getLogger(__name__)

BOOK_KEY: Final = "orders:book"
CURSOR_KEY: Final = "orders:cursor"
ACCEPTED_KEY: Final = "orders:accepted"
KEEP_ORDERS: Final = 5000
"""Orders remembered; the oldest finished ones are forgotten first."""
KEEP_ISSUES: Final = 500
ACCEPTANCE_BUCKETS: Final = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 86400.0)

Role = Literal["integration", "supervisor"]


@dataclass(frozen=True)
class OrderIssue:
    """An exception about an order, for the role that must act on it."""

    kind: str
    """`order.invalid` (ERP sent an order the plant cannot run), `order.not_released` (the MES
    started an order ERP never released, or ended)."""
    role: Role
    order_id: str
    reason: str
    at: float
    correlation_id: str | None = None
    """The MES message id, or ERP's change time of the order."""
    inspect: str = "plantsync outbox --config FILE rejected"
    """The command that shows the dead letter it made."""
    cleared: bool = False
    """True when the condition ended (ERP sent a valid version of an invalid order): the
    exception of this kind and order is to be cleared, not raised."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Decision:
    """What one order read from ERP becomes."""

    event_type: str | None
    """`order.released`, `order.changed`, `order.cancelled`, or None: nothing to tell the MES."""
    version: int


def fingerprint(fields: Mapping[str, Any]) -> str:
    """What the MES must see of an order, hashed: a re-read that hashes the same is no change."""
    shown = {
        name: value
        for name, value in fields.items()
        if name not in ("version", "occurred_at", "erp_changed_at")
    }
    text = json.dumps(shown, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class OrderBook:
    """Call order: `decide` then `committed` for each order the poller commits; `started` and
    `accepted` from the pipeline or the ack topic; `release_state()` in the poller's commits,
    `acceptance_state()` in the pipeline's."""

    def __init__(self, saved: Mapping[str, str], *, accept_within: float = 900.0) -> None:
        self.orders: dict[str, dict[str, Any]] = json.loads(saved.get(BOOK_KEY) or "{}")
        self.cursor: str = saved.get(CURSOR_KEY, "")
        self.acceptances: dict[str, float] = json.loads(saved.get(ACCEPTED_KEY) or "{}")
        """When the MES accepted each order: written by the pipeline's commits only, as the
        book and cursor are by the poller's, so neither commit can carry the other's news
        ahead of the events it belongs to."""
        self.accept_within = accept_within
        self.issues: deque[OrderIssue] = deque(maxlen=KEEP_ISSUES)
        self.listeners: list[Callable[[OrderIssue], None]] = []
        self.acceptance = Histogram(
            "plantsync_order_release_acceptance_seconds",
            "From the order's release being "
            "committed for the MES to the MES accepting it (order.started or its ack)",
            buckets=ACCEPTANCE_BUCKETS,
            registry=None,
        )
        self.rejected = 0
        """Orders from ERP that became dead letters since the daemon started."""
        self.refused_starts = 0
        """MES order starts refused since start (require_released_order)."""
        self._refused: set[str] = set()
        """Orders whose MES start was refused, until ERP releases them (this process only)."""

    # -- from ERP ----------------------------------------------------------------------------

    def known_rejection(self, order_id: str, raw_hash: str) -> bool:
        """Whether exactly this input of the order was rejected before (the SAP source reads
        the newest second again at every poll: one dead letter, not one per poll)."""
        return bool(self.orders.get(order_id, {}).get("rejected") == raw_hash)

    def reject(self, order_id: str, raw_hash: str, reason: str, correlation: str | None) -> None:
        entry = self.orders.setdefault(order_id, {})
        entry["rejected"] = raw_hash
        self.rejected += 1
        self.raise_issue(
            OrderIssue("order.invalid", "integration", order_id, reason, time.time(), correlation)
        )
        self._trim()

    def decide(self, order_id: str, status: str, printed: str) -> Decision:
        """Whether an order read from ERP is news for the MES, and its version."""
        entry = self.orders.get(order_id) or {}
        finished = status in FINISHED_ORDER_STATUSES
        version = int(entry.get("version", 0))
        if not entry.get("published"):
            if finished or status == "locked" or entry.get("fingerprint") == printed:
                return Decision(None, version)  # never released to the MES: nothing to say
            return Decision("order.released", version + 1)
        if entry.get("fingerprint") == printed:
            return Decision(None, version)
        return Decision("order.cancelled" if finished else "order.changed", version + 1)

    def committed(
        self, order_id: str, status: str, printed: str, decision: Decision, now: float
    ) -> None:
        """Record what `decide` said, once its event is in the outbox (or nothing was due)."""
        entry = self.orders.setdefault(order_id, {})
        if entry.pop("rejected", None) is not None:
            self.raise_issue(
                OrderIssue(
                    "order.invalid",
                    "integration",
                    order_id,
                    "ERP sent a version the plant can run",
                    now,
                    cleared=True,
                )
            )
        entry["status"] = status
        entry["fingerprint"] = printed
        if decision.event_type is None:
            entry.setdefault("version", decision.version)
            return
        entry["version"] = decision.version
        if decision.event_type == "order.released" and not entry.get("published"):
            entry["published"] = True
            entry["released_at"] = now
            if order_id in self._refused:
                self._refused.discard(order_id)
                self.raise_issue(
                    OrderIssue(
                        "order.not_released",
                        "supervisor",
                        order_id,
                        "ERP released the order",
                        now,
                        cleared=True,
                    )
                )
        if status in FINISHED_ORDER_STATUSES:
            entry["finished_at"] = now
        self._trim()

    # -- from the MES ------------------------------------------------------------------------

    def started(
        self, order_id: str, at: float, *, require_released: bool, message_id: str | None = None
    ) -> str | None:
        """The MES started the order: it accepts the release. Returns why the start is refused
        (`require_released`), or None."""
        entry = self.orders.get(order_id)
        status = entry.get("status") if entry else None
        problem = None
        if entry is None or not entry.get("published"):
            problem = (
                f"order {order_id!r} was never released by ERP to this gateway "
                "(validation.require_released_order)"
            )
        elif status in FINISHED_ORDER_STATUSES or status == "locked":
            problem = (
                f"order {order_id!r} is {str(status).replace('_', ' ')} in ERP "
                "(validation.require_released_order)"
            )
        if problem is not None and require_released:
            self.refused_starts += 1
            self._refused.add(order_id)
            self.raise_issue(
                OrderIssue(
                    "order.not_released", "supervisor", order_id, problem, time.time(), message_id
                )
            )
            return problem
        self.accepted(order_id)
        return None

    def accepted(self, order_id: str) -> None:
        entry = self.orders.get(order_id)
        if entry is None or not entry.get("published") or order_id in self.acceptances:
            return
        now = time.time()
        self.acceptances[order_id] = now
        while len(self.acceptances) > KEEP_ORDERS:
            self.acceptances.pop(next(iter(self.acceptances)))
        released = entry.get("released_at")
        if isinstance(released, int | float):
            self.acceptance.observe(max(0.0, now - released))

    # -- state and figures -------------------------------------------------------------------

    def release_state(self) -> dict[str, str]:
        """The poller's part of the saved state: the book and the cursor."""
        return {
            BOOK_KEY: json.dumps(self.orders, separators=(",", ":"), sort_keys=True),
            CURSOR_KEY: self.cursor,
        }

    def acceptance_state(self) -> dict[str, str]:
        """The pipeline's part: when the MES accepted which order."""
        return {ACCEPTED_KEY: json.dumps(self.acceptances, separators=(",", ":"))}

    def raise_issue(self, issue: OrderIssue) -> None:
        self.issues.append(issue)
        for listener in self.listeners:
            try:
                listener(issue)
            except Exception:  # a listener's bug must not stop order release
                log.exception("An order exception listener failed")

    def figures(self, now: float | None = None) -> dict[str, Any]:
        """Counts for /status and /metrics: released (ever published), accepted, released and
        not accepted within `accept_within`, the sync success ratio (accepted / released)."""
        when = time.time() if now is None else now
        released = accepted = late = 0
        for order_id, entry in self.orders.items():
            if not entry.get("published"):
                continue
            released += 1
            if order_id in self.acceptances:
                accepted += 1
            elif (
                entry.get("status") not in FINISHED_ORDER_STATUSES
                and when - float(entry.get("released_at", when)) > self.accept_within
            ):
                late += 1
        return {
            "released": released,
            "accepted": accepted,
            "not_accepted_in_time": late,
            "sync_success_ratio": round(accepted / released, 4) if released else None,
            "rejected_since_start": self.rejected,
            "refused_starts_since_start": self.refused_starts,
            "cursor": self.cursor,
        }

    def collect(self) -> Iterator[Metric]:
        figures = self.figures()
        yield GaugeMetricFamily(
            "plantsync_orders_released",
            "Orders released to the MES (remembered)",
            value=figures["released"],
        )
        yield GaugeMetricFamily(
            "plantsync_orders_accepted",
            "Released orders the MES accepted",
            value=figures["accepted"],
        )
        yield GaugeMetricFamily(
            "plantsync_orders_not_accepted",
            "Orders released longer than orders.accept_within ago and not accepted by the MES",
            value=figures["not_accepted_in_time"],
        )
        if figures["sync_success_ratio"] is not None:
            yield GaugeMetricFamily(
                "plantsync_order_sync_success_ratio",
                "Released orders the MES accepted / released orders",
                value=figures["sync_success_ratio"],
            )
        yield CounterMetricFamily(
            "plantsync_orders_rejected",
            "Orders from ERP that became dead letters (invalid), since start",
            value=self.rejected,
        )
        yield CounterMetricFamily(
            "plantsync_order_starts_refused",
            "MES order starts refused by validation.require_released_order, since start",
            value=self.refused_starts,
        )
        yield from self.acceptance.collect()

    def _trim(self) -> None:
        if len(self.orders) <= KEEP_ORDERS:
            return
        finished = [
            order_id
            for order_id, entry in self.orders.items()
            if entry.get("finished_at") or "version" not in entry
        ]
        for order_id in finished[: len(self.orders) - KEEP_ORDERS]:
            del self.orders[order_id]
        while len(self.orders) > KEEP_ORDERS:
            self.orders.pop(next(iter(self.orders)))
