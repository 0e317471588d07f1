"""The profile contract: `send` takes up to `batch_size` deliveries (each the head of its own
partition key) and returns one Result per delivery, in the same order. It raises only for a
failure of the whole request (httpx.HTTPError, AuthError); the forwarder turns that into a
retry for all of them."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from buffer.outbox import Delivery
from edge.config import DestinationConfig
from edge.forward.outcome import Result
from edge.forward.session import Session


class Profile(ABC):
    batch_size = 1

    def __init__(self, config: DestinationConfig, session: Session) -> None:
        self.config = config
        self.session = session

    @abstractmethod
    async def send(self, deliveries: Sequence[Delivery]) -> list[Result]:
        """Deliver; one Result per delivery, in order."""


def event_of(delivery: Delivery) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(delivery.payload)
    return event
