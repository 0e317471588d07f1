"""Delivery latency and the business KPIs, measured from two things the daemon already has: the
events the pipeline commits (its observer) and the rows the delivery journal gains as
destinations acknowledge.

- delivery latency: commit to acknowledgement, per destination;
- completion posting latency: `operation.completed` and the final `production.confirmation`,
  from when it happened on the shop floor (`occurred_at`) to the destination's acknowledgement;
- inspection turnaround: the QMS acknowledging a lot's `inspection.requested` to the lot's
  disposition arriving;
- hold to release: a lot on hold (a produced lot awaiting quality, or a `hold` disposition) to
  its `release` disposition, by the dispositions' own times;
- deliveries acknowledged per destination, for the order sync success rate.

What happened before this process started is not known here (the journal drops payloads on
delivery): each measure covers events committed, and lots held, since the daemon started. The
memory it takes is bounded; what falls out of the bounds is counted, not measured.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import Histogram
from prometheus_client.metrics_core import Metric

from buffer.outbox import Outbox, RejectedInput
from edge.model.envelope import CloudEvent

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    14400.0,
    86400.0,
)
TURNAROUND_BUCKETS = (
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    28800.0,
    86400.0,
    259200.0,
    604800.0,
)
MAX_TRACKED_EVENTS = 100_000
MAX_TRACKED_LOTS = 20_000
JOURNAL_PAGE = 1000


@dataclass(slots=True)
class _Owed:
    """An event committed by this process, until every destination acknowledged it."""

    type: str
    committed_at: float
    occurred_at: float | None
    lot_id: str | None
    completion: bool
    destinations: set[str] = field(default_factory=set)


def _timestamp(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class DeliveryKpis:
    """Call order: `on_committed` from the pipeline (its observer), `follow(outbox)` as a task;
    `collect()` and `delivered` may be read at any time."""

    def __init__(
        self, *, max_events: int = MAX_TRACKED_EVENTS, max_lots: int = MAX_TRACKED_LOTS
    ) -> None:
        self.latency = Histogram(
            "plantsync_delivery_latency_seconds",
            "From the outbox commit to the destination's acknowledgement",
            ["destination"],
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.completion_posting = Histogram(
            "plantsync_completion_posting_seconds",
            "Completions (operation.completed, final "
            "production.confirmation): from occurred_at on the shop floor to the destination's "
            "acknowledgement",
            ["destination"],
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.inspection_turnaround = Histogram(
            "plantsync_inspection_turnaround_seconds",
            "From the QMS acknowledging a lot's "
            "inspection request to the lot's disposition arriving",
            buckets=TURNAROUND_BUCKETS,
            registry=None,
        )
        self.hold_to_release = Histogram(
            "plantsync_lot_hold_to_release_seconds",
            "From a lot going on hold to its release",
            buckets=TURNAROUND_BUCKETS,
            registry=None,
        )
        self.delivered: Counter[str] = Counter()
        """Deliveries acknowledged since the daemon started, per destination (journal)."""
        self.untracked = 0
        """Events or lots that fell out of the bounds and were not measured."""
        self._max_events = max_events
        self._max_lots = max_lots
        self._owed: OrderedDict[str, _Owed] = OrderedDict()
        self._inspection_acked: OrderedDict[str, float] = OrderedDict()
        self._held_since: OrderedDict[str, float] = OrderedDict()
        self._cursor = time.time()
        self._seen_at_cursor: set[tuple[str, str]] = set()

    # -- what the pipeline commits ------------------------------------------------------------

    def on_committed(
        self,
        events: Sequence[CloudEvent],
        routes: Callable[[str], list[str]],
        now: float | None = None,
    ) -> None:
        committed_at = time.time() if now is None else now
        for event in events:
            data = event.data
            lot_id = data.get("lot_id")
            destinations = set(routes(event.type))
            if destinations:
                completion = event.type == "operation.completed" or (
                    event.type == "production.confirmation" and bool(data.get("is_final"))
                )
                self._owed[event.id] = _Owed(
                    event.type,
                    committed_at,
                    _timestamp(data.get("occurred_at")),
                    lot_id,
                    completion,
                    destinations,
                )
                self._bound(self._owed, self._max_events)
            if not isinstance(lot_id, str):
                continue
            occurred = _timestamp(data.get("occurred_at")) or committed_at
            if event.type == "inspection.requested" and data.get("trigger") == "lot_completed":
                self._held_since.setdefault(lot_id, occurred)  # produced: on hold until quality
                self._bound(self._held_since, self._max_lots)
            elif event.type == "lot.disposition":
                self._disposition(lot_id, str(data.get("disposition")), occurred, committed_at)

    def observer(
        self, routes: Callable[[str], list[str]]
    ) -> Callable[[Sequence[CloudEvent], Sequence[RejectedInput]], None]:
        """The pipeline's observer, routing by `routes` (the config of the moment)."""

        def observe(events: Sequence[CloudEvent], rejected: Sequence[RejectedInput]) -> None:
            self.on_committed(events, routes)

        return observe

    def _disposition(self, lot_id: str, disposition: str, occurred: float, received: float) -> None:
        acked = self._inspection_acked.pop(lot_id, None)
        if acked is not None:
            self.inspection_turnaround.observe(max(0.0, received - acked))
        if disposition == "hold":
            self._held_since.setdefault(lot_id, occurred)
            self._bound(self._held_since, self._max_lots)
            return
        since = self._held_since.pop(lot_id, None)
        if since is not None and disposition == "release":
            self.hold_to_release.observe(max(0.0, occurred - since))

    # -- what the destinations acknowledge ----------------------------------------------------

    def on_delivered(self, row: dict[str, Any]) -> None:
        """One journal row: an event acknowledged by one destination."""
        destination, event_id = str(row["destination"]), str(row["event_id"])
        delivered_at = float(row["delivered_at"])
        self.delivered[destination] += 1
        owed = self._owed.get(event_id)
        if owed is None:
            return  # committed before this process started, or fell out of the bounds
        self.latency.labels(destination).observe(max(0.0, delivered_at - owed.committed_at))
        if owed.completion and owed.occurred_at is not None:
            self.completion_posting.labels(destination).observe(
                max(0.0, delivered_at - owed.occurred_at)
            )
        if owed.type == "inspection.requested" and owed.lot_id is not None:
            self._inspection_acked.setdefault(owed.lot_id, delivered_at)
            self._bound(self._inspection_acked, self._max_lots)
        owed.destinations.discard(destination)
        if not owed.destinations:
            del self._owed[event_id]

    async def follow(self, outbox: Outbox, interval: float = 2.0) -> None:
        """Read the journal's new rows until cancelled."""
        while True:
            rows = await outbox.journal(self._cursor, limit=JOURNAL_PAGE)
            self._take(rows)
            if len(rows) < JOURNAL_PAGE:
                await asyncio.sleep(interval)

    def _take(self, rows: Sequence[dict[str, Any]]) -> None:
        # Rows come in journal order from `delivered_at >= cursor`; those at the cursor's very
        # time were seen by the previous read already.
        newest = self._cursor
        for row in rows:
            key = (str(row["event_id"]), str(row["destination"]))
            if key in self._seen_at_cursor:
                continue
            self.on_delivered(row)
            at = float(row["delivered_at"])
            if at > newest:
                newest, self._seen_at_cursor = at, set()
            if at == newest:
                self._seen_at_cursor.add(key)
        self._cursor = newest

    def _bound(self, table: OrderedDict[str, Any], limit: int) -> None:
        while len(table) > limit:
            table.popitem(last=False)
            self.untracked += 1

    # -- metrics ------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        for histogram in (
            self.latency,
            self.completion_posting,
            self.inspection_turnaround,
            self.hold_to_release,
        ):
            yield from histogram.collect()
