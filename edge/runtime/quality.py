"""The quality link: QMS dispositions in, lot status out.

`QualityLink.run` polls the QMS's disposition change feed (`GET dispositions?after=<cursor>`)
and hands each decision to the pipeline, which turns it into a `lot.disposition` event for ERP,
updates the lot's status, and moves the cursor, all in one commit: a crash re-reads the feed
from the committed cursor, and the event ids (lot, decision, time) make that harmless.

`lot_status` answers "may lot X be used?" for the local API: from the gateway's own record; if
it has none, by asking the QMS with a short timeout; and if nobody knows, with the configured
default, `hold` (fail closed). The lot id comes from a local API caller: the API checks it
against the canonical model first, and it goes into the QMS URL as one percent-encoded path
segment, so no id can reach another path on the QMS host, which gets our credentials.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any

import httpx
from pydantic import ValidationError

from buffer.outbox import LotStatus, Outbox
from drivers.common.availability import Availability, Ended, reconnect_forever
from drivers.common.timing import Backoff
from edge.config.destinations import DestinationConfig
from edge.config.models import PlantConfig
from edge.forward.auth import AuthError
from edge.forward.session import Session, make_client
from edge.forward.urls import path
from edge.model.events import LotDisposition
from edge.runtime.pipeline import Pipeline

log = logging.getLogger(__name__)

PAGE = 200


class QualityLink:
    def __init__(self, config: PlantConfig, outbox: Outbox, pipeline: Pipeline) -> None:
        self.config = config
        self.outbox = outbox
        self.pipeline = pipeline
        self.destination: DestinationConfig | None = (
            config.destinations[config.quality.qms] if config.quality.qms else None
        )
        self._session: Session | None = None
        self._backoff = Backoff(base=1.0, cap=60.0)
        self.availability = Availability(
            "The QMS",
            log,
            backoff=self._backoff,
            lost_says="{peer} is not answering for dispositions ({reason}); asking again with "
            "backoff",
            back_says="{peer} answers for dispositions again",
        )
        self.polls = 0
        self.decisions = 0

    @property
    def reachable(self) -> bool | None:
        """None before the first poll; then whether the QMS answered the last one."""
        return self.availability.available

    async def run(self) -> None:
        """Poll the QMS for dispositions until cancelled (returns at once without a QMS)."""
        if self.destination is None:
            return
        assert self.config.quality.qms is not None
        async with make_client(self.config.quality.qms, self.destination) as client:
            self._session = Session(self.destination, client)
            await reconnect_forever(
                self._poll_until_failure,
                self._backoff,
                self.availability,
                wait=self._wait_to_poll_again,
            )

    async def _poll_until_failure(self) -> Ended:
        """Poll page after page while the QMS answers; how it stopped answering."""
        while True:
            try:
                more = await self._poll_once()
            except (httpx.HTTPError, AuthError, ValueError) as exc:
                return Ended(f"{type(exc).__name__}: {exc}")
            except Exception as exc:
                # A bug must not end the daemon, nor spin: say it, wait, try again (the
                # cursor moves only with a committed page, so nothing is skipped).
                log.exception("Handling the QMS dispositions failed; retrying")
                return Ended(f"{type(exc).__name__}: {exc}", peer_lost=False)
            self.availability.back()
            if not more:
                await asyncio.sleep(self.config.quality.poll_interval)

    async def _wait_to_poll_again(self, ended: Ended, delay: float) -> None:
        """Never sooner than the next regular poll would have been."""
        await asyncio.sleep(max(self.config.quality.poll_interval, delay))

    async def _poll_once(self) -> bool:
        """Fetch one page of the feed; True when there may be more right away."""
        assert self._session is not None
        response = await self._session.request(
            "GET", "dispositions", params={"after": self.pipeline.qms_cursor, "limit": PAGE}
        )
        if response.status_code != 200:
            raise ValueError(f"the QMS answered {response.status_code}: {response.text[:200]}")
        body = response.json()
        entries = body.get("dispositions", [])
        self.polls += 1
        if not entries:
            return False
        decisions = []
        for entry in entries:
            decision = self._decision(entry)
            if decision is not None:
                decisions.append(decision)
        await self.pipeline.dispositions(decisions, str(body.get("next", entries[-1]["cursor"])))
        self.decisions += len(decisions)
        for decision in decisions:
            log.info(
                "QMS decided lot %s: %s",
                decision.lot_id,
                decision.disposition,
                extra={"lot_id": decision.lot_id, "order_id": decision.order_id},
            )
        return len(entries) >= PAGE

    def _decision(self, entry: dict[str, Any]) -> LotDisposition | None:
        try:
            return LotDisposition(
                site=self.config.site,
                lot_id=entry["lot_id"],
                disposition=entry["disposition"],
                disposition_source="qms",
                order_id=entry.get("order_id"),
                material=entry.get("material"),
                inspection_id=entry.get("inspection_id"),
                reason_text=entry.get("reason") or None,
                occurred_at=datetime.fromisoformat(entry["decided_at"].replace("Z", "+00:00")),
            )
        except (KeyError, ValueError, ValidationError) as exc:
            log.error(
                "Skipped a disposition the QMS sent that does not fit the canonical model (%s): %s",
                exc,
                entry,
            )
            return None

    async def lot_status(self, lot_id: str) -> dict[str, Any]:
        """What the local API answers for a lot: status, since, source."""
        known = await self.outbox.lot_status(lot_id)
        if known is None and self._session is not None:
            known = await self._ask_qms(lot_id)
        if known is None:
            return {
                "lot_id": lot_id,
                "status": self.config.quality.unknown_lot,
                "since": None,
                "source": "default (unknown lot)",
            }
        return {
            "lot_id": lot_id,
            "status": known.status,
            "since": datetime.fromtimestamp(known.since).astimezone().isoformat(),
            "source": known.source,
            "order_id": known.order_id,
            "material": known.material,
        }

    async def _ask_qms(self, lot_id: str) -> LotStatus | None:
        assert self._session is not None
        try:
            response = await asyncio.wait_for(
                self._session.request("GET", path("lots", lot_id, "disposition")),
                self.config.quality.lookup_timeout,
            )
        except (TimeoutError, httpx.HTTPError, AuthError):
            return None
        if response.status_code != 200:
            return None
        decision = self._decision(response.json())
        if decision is None:
            return None
        status = LotStatus(
            lot_id,
            decision.disposition,
            decision.occurred_at.timestamp(),
            "qms (asked)",
            decision.order_id,
            decision.material,
        )
        await self.pipeline.remember_lot(status)
        return status
