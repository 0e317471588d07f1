"""Order release, ERP to the MES: poll the ERP's released orders, validate each against the
canonical model and the plant, and commit what the MES must see to the outbox, together with
the order book and the source's cursor, in one transaction.

Why nothing is published twice: an order's event id is derived from the outbox epoch, the site,
the order and its release version, and the version comes from the order book, which moves only
in the commit that holds the event. A crash before that commit re-reads ERP from the committed
cursor and derives the same versions and ids (the outbox ignores an id it holds); a crash after
it finds the event in the outbox, and the MES publisher sends it. The publisher itself is
at-least-once (a crash between the broker's PUBACK and the outbox's acknowledgement sends that
version once more, retained, with the same id and version: an MES keeps the highest version it
has and ignores the rest, as the README asks).

Validation before anything reaches the MES: the plant is this site (or `orders.plant`), the
units are UN/ECE Rec 20 codes, operation numbers are four digits, unique and ascending in the
routing's order, a BOM or recipe version is present, the material is not blocked, quantities
are positive, and the order id can be one MQTT topic level. A bad order becomes an input dead
letter with its reason (`plantsync outbox rejected`, source `erp-orders`) and an `order.invalid`
issue for the integration role, once per version of the bad input.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from buffer.outbox import Outbox, OutboxEvent, RejectedInput
from drivers.common.availability import Availability, Ended, reconnect_forever
from drivers.common.timing import Backoff
from edge.config.destinations import DestinationConfig
from edge.config.errors import format_loc
from edge.config.models import PlantConfig
from edge.config.orders import ORDERS_DESTINATION
from edge.forward.session import Session, make_client
from edge.model.codes import UOM_CODES_CONTEXT_KEY
from edge.model.envelope import CloudEvent, build_event
from edge.model.events import priority_of
from edge.model.ids import state_key
from edge.model.order_events import ORDER_EVENT_MODELS
from edge.orders.book import OrderBook, fingerprint
from edge.orders.sources import (
    Candidate,
    CanonicalOrderSource,
    OrderSource,
    SapOrderSource,
    SourceUnavailable,
)

log = logging.getLogger(__name__)

REJECTED_SOURCE = "erp-orders"
"""The `source` of the input dead letters an invalid order makes."""


class OrderRelease:
    """Call order: `run()` as a task until cancelled. `book` is shared with the pipeline (MES
    starts) and read by /status and /metrics at any time."""

    def __init__(
        self,
        config: PlantConfig,
        outbox: Outbox,
        book: OrderBook,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        assert config.orders is not None
        self.config = config
        self.orders = config.orders
        self.outbox = outbox
        self.book = book
        self.destination: DestinationConfig = config.destinations[config.orders.source]
        self.plant = config.orders.plant or config.site
        self._backoff = Backoff(base=1.0, cap=max(60.0, config.orders.poll_interval))
        self.availability = Availability(
            "ERP",
            log,
            backoff=self._backoff,
            extra={"destination": config.orders.source},
            lost_says="{peer} is not answering for released orders ({reason}); asking again "
            "with backoff",
            back_says="{peer} answers for released orders again",
        )
        self.last_error: str | None = None
        self.polls = 0
        self._on_commit = on_commit
        self._sequence = 0

    def source(self, session: Session) -> OrderSource:
        match self.destination.profile:
            case "sap_s4hana":
                return SapOrderSource(self.orders, self.destination, session, self.config.site)
            case _:  # canonical (check refuses any other profile as a source)
                return CanonicalOrderSource(
                    self.orders, self.destination, session, self.config.site
                )

    @property
    def reachable(self) -> bool | None:
        """None before the first poll; then whether ERP answered the last one."""
        return self.availability.available

    async def run(self) -> None:
        """Poll ERP until cancelled: the shared reconnect loop (log once, backoff) around
        polls at `poll_interval` while ERP answers."""
        async with make_client(self.orders.source, self.destination) as client:
            source = self.source(Session(self.destination, client))
            await reconnect_forever(
                lambda: self._poll_until_failure(source), self._backoff, self.availability
            )

    async def _poll_until_failure(self, source: OrderSource) -> Ended:
        while True:
            try:
                await self.poll_once(source)
            except SourceUnavailable as exc:
                self.last_error = str(exc)
                return Ended(str(exc))
            except Exception as exc:
                # A bug must not end the daemon, nor spin: the cursor moves only with a
                # committed page, so nothing is skipped.
                log.exception("Reading released orders from ERP failed; trying again")
                self.last_error = f"{type(exc).__name__}: {exc}"
                return Ended(self.last_error, peer_lost=False)
            self.last_error = None
            self.availability.back()
            await asyncio.sleep(self.orders.poll_interval)

    async def poll_once(self, source: OrderSource) -> int:
        """Read ERP from the cursor to its end, committing each page; the new events."""
        self.polls += 1
        made = 0
        async for page in source.pages(self.book.cursor):
            made += await self.commit_page(page.candidates, page.cursor)
        return made

    async def commit_page(self, candidates: list[Candidate], cursor: str) -> int:
        """Validate one page and commit its events, dead letters, book and cursor at once."""
        now = time.time()
        # The book moves with this commit only: if it fails, what was decided is undone, so
        # the next poll decides it again (and derives the same ids).
        before = copy.deepcopy(self.book.orders), self.book.cursor
        try:
            return await self._commit_page(candidates, cursor, now)
        except BaseException:
            self.book.orders, self.book.cursor = before
            raise

    async def _commit_page(self, candidates: list[Candidate], cursor: str, now: float) -> int:
        events: list[CloudEvent] = []
        rejected: list[RejectedInput] = []
        decided: list[tuple[str, str, str, Any]] = []
        for candidate in candidates:
            raw_hash = hashlib.sha256(candidate.raw).hexdigest()[:32]
            fields, problem = self.validate(candidate)
            if problem is not None:
                if self.book.known_rejection(candidate.order_id, raw_hash):
                    continue
                correlation = str(candidate.fields.get("erp_changed_at") or "") or None
                rejected.append(
                    RejectedInput(
                        REJECTED_SOURCE,
                        f"order/{candidate.order_id}",
                        candidate.raw,
                        problem,
                        now,
                        correlation,
                    )
                )
                self.book.reject(candidate.order_id, raw_hash, problem, correlation)
                log.warning(
                    "Refused order %s from ERP: %s; kept as an input dead letter, "
                    "nothing sent to the MES",
                    candidate.order_id,
                    problem,
                    extra={"order_id": candidate.order_id},
                )
                continue
            printed = fingerprint(fields)
            decision = self.book.decide(candidate.order_id, fields["status"], printed)
            if decision.event_type is not None:
                events.append(self._event(decision.event_type, fields, decision.version))
            decided.append((candidate.order_id, fields["status"], printed, decision))
        for order_id, status, printed, decision in decided:
            self.book.committed(order_id, status, printed, decision, now)
        self.book.cursor = cursor
        rows = [
            OutboxEvent(
                id=event.id,
                type=event.type,
                partition_key=event.partitionkey,
                payload=event.to_json(),
                destinations=(ORDERS_DESTINATION,),
                priority=priority_of(event.type),
            )
            for event in events
        ]
        result = await self.outbox.commit(rows, self.book.release_state(), rejected=rejected)
        for event in events:
            if event.id in result.new_ids:
                log.info(
                    "Committed %s %s version %s for the MES",
                    event.type,
                    event.data["order_id"],
                    event.data["version"],
                    extra={"event_id": event.id, "order_id": event.data["order_id"]},
                )
        if self._on_commit is not None:
            self._on_commit()
        return len(result.new_ids)

    def validate(self, candidate: Candidate) -> tuple[dict[str, Any], str | None]:
        """The order's event data (without its version), or why the plant cannot run it."""
        if candidate.problem is not None:
            return {}, candidate.problem
        fields = dict(candidate.fields)
        plant = fields.pop("plant", None)
        if plant != self.plant:
            return {}, f"plant {plant!r} is not this plant ({self.plant})"
        order_id = str(fields.get("order_id") or "")
        if "/" in order_id or "+" in order_id or "#" in order_id:
            return {}, (
                f"order id {order_id!r} cannot be one MQTT topic level (/, + and # are not allowed)"
            )
        material = fields.get("material")
        if material in self.orders.blocked_materials:
            return {}, f"material {material!r} is blocked (orders.blocked_materials)"
        data = {
            **fields,
            "site": self.config.site,
            "version": 1,
            "occurred_at": fields.get("erp_changed_at"),
        }
        try:
            model = ORDER_EVENT_MODELS["order.released"].model_validate(
                data, context={UOM_CODES_CONTEXT_KEY: self.config.all_uom_codes}
            )
        except ValidationError as exc:
            return {}, "; ".join(
                f"{format_loc(tuple(error['loc'])) or 'order'}: "
                f"{str(error['msg']).removeprefix('Value error, ')}"
                for error in exc.errors()
            )
        return model.model_dump(mode="json", exclude={"version"}), None

    def _event(self, event_type: str, fields: dict[str, Any], version: int) -> CloudEvent:
        data = ORDER_EVENT_MODELS[event_type].model_validate(
            {**fields, "version": version},
            context={UOM_CODES_CONTEXT_KEY: self.config.all_uom_codes},
        )
        self._sequence += 1
        order_id = data.order_id
        return build_event(
            data,
            natural_key=state_key(
                self.outbox.epoch, self.config.site, "erp-orders", order_id, version
            ),
            subject=f"order/{order_id}",
            partitionkey=f"order/{order_id}",
            sequence=version,
            source=f"urn:plantsync:{self.config.site}:erp-orders",
        )
