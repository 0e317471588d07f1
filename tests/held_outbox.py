"""An outbox held open by a task of its own, for tests that drive an event loop one step at a
time (`loop.run_until_complete` per step: the Hypothesis state machines).

`Outbox.open` is an `async with` block whose TaskGroup runs the writer; the daemon holds that
block for its whole run. A test that runs each step as its own call of `run_until_complete`
cannot stay inside one block, so a holder task enters it, hands the outbox over and waits to be
released; between steps it sleeps while the writer, in its TaskGroup, keeps working whenever
the loop runs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from buffer.outbox import Outbox


class HeldOutbox:
    def __init__(self, loop: asyncio.AbstractEventLoop, path: Path, **settings: Any) -> None:
        self._loop = loop
        self._release = asyncio.Event()
        opened: asyncio.Future[Outbox] = loop.create_future()
        self._holder = loop.create_task(
            self._hold(path, settings, opened), name=f"held-outbox {path.name}"
        )
        loop.run_until_complete(
            asyncio.wait([opened, self._holder], return_when=asyncio.FIRST_COMPLETED)
        )
        if not opened.done():
            self._holder.result()  # the open failed: raise its error
        self.outbox = opened.result()

    async def _hold(
        self, path: Path, settings: dict[str, Any], opened: asyncio.Future[Outbox]
    ) -> None:
        async with Outbox.open(path, **settings) as outbox:
            opened.set_result(outbox)
            await self._release.wait()

    def close(self) -> None:
        """Leave the block: queued work finishes, then the database closes."""
        self._release.set()
        self._loop.run_until_complete(self._holder)

    def forget(self) -> None:
        """Cancel the holder of an outbox abandoned as a killed process leaves it (its tasks
        stopped and `_closed` set by the test), so that leaving the block closes nothing."""
        assert self.outbox._closed
        self._holder.cancel()
        self._loop.run_until_complete(asyncio.gather(self._holder, return_exceptions=True))
