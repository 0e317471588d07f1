"""What the driver tests share: waiting for a condition, and running a driver for a block."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest

from drivers.base import Driver, SampleSink


async def wait_until(condition: Callable[[], object], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(driver: Driver, sink: SampleSink) -> AsyncIterator[None]:
    """Run the driver for the body; fail if it ended on its own, then cancel it."""
    task = asyncio.create_task(driver.run(sink), name=f"driver {driver.name}")
    try:
        yield
        await asyncio.sleep(0)
        assert not task.done(), f"run() ended by itself: {task.exception()!r}"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
