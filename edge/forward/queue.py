"""What the forwarder engine takes deliveries from and reports outcomes to: the plant's outbox
(buffer.outbox.Outbox), or the hub's stream for a relay (edge.hub.inbox.HubInbox).

Call-order contract: `lease` hands out the due head of each partition key not in `busy_keys`
(with `per_key` above 1, a queue may follow each head with up to `per_key - 1` of its key's next
deliveries, in order and listed together; handing out heads only is always correct); each
leased delivery gets exactly one outcome: `ack` (the target took it), `retry` (again at `at`)
or `dead_letter` (a permanent rejection), or all of a request's at once by `settle` (whose
`others_follow` says that other requests' outcomes will follow soon and nothing waits on these
keys: a queue may wait briefly to record them together); the event
from `listener()` is set whenever new deliveries may be due.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Protocol

from buffer.outbox import Delivery, Settlement


class DeliveryQueue(Protocol):
    def listener(self) -> asyncio.Event: ...

    async def lease(
        self, destination: str, limit: int, *, busy_keys: Iterable[str] = (), per_key: int = 1
    ) -> list[Delivery]: ...

    async def next_due(self, destination: str) -> float | None: ...

    async def ack(
        self, delivery: Delivery, *, status: int | None, reference: str | None = None
    ) -> None: ...

    async def retry(
        self, delivery: Delivery, *, at: float, status: int | None, error: str
    ) -> None: ...

    async def dead_letter(self, delivery: Delivery, *, status: int | None, reason: str) -> None: ...

    async def settle(
        self, settlements: Sequence[Settlement], *, others_follow: bool = False
    ) -> None: ...
