"""PUBACKs awaited by message id, for an asyncio publisher on paho's threaded client: the MES
order publisher and the exceptions channel.

paho calls `on_publish` from its own thread; the acknowledgement is handed to the event loop
with `call_soon_threadsafe`, so a publisher that calls `wait` before it next yields cannot miss
it. A PUBACK nobody waits for any more (its wait timed out and the publication is tried again)
is dropped: kept, it would answer a later publication that reuses its message id.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from paho.mqtt.reasoncodes import ReasonCode


class Pubacks:
    """Call order: `bind()` in the event loop before the first publish, `on_publish` as paho's
    callback, `wait(mid)` right after each `client.publish`, `cancel_all()` at close."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, asyncio.Future[ReasonCode]] = {}

    def bind(self) -> None:
        self._loop = asyncio.get_running_loop()

    def on_publish(
        self, client: Any, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any
    ) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(self._arrived, mid, reason_code)

    def _arrived(self, mid: int, reason_code: ReasonCode) -> None:
        future = self._pending.get(mid)
        if future is not None and not future.done():
            future.set_result(reason_code)

    async def wait(self, mid: int) -> ReasonCode:
        """The broker's answer to publication `mid` (bound it with `asyncio.timeout`)."""
        assert self._loop is not None, "bind() first"
        future: asyncio.Future[ReasonCode] = self._loop.create_future()
        self._pending[mid] = future
        try:
            return await future
        finally:
            self._pending.pop(mid, None)

    def cancel_all(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
