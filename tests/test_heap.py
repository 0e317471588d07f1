"""The daemon's start-up heap is frozen out of the garbage collector's full passes
(edge/runtime/heap.py), and a gateway a reload replaced is still collected: the freeze comes
before the first gateway is built, not after (then every reload would leave the old gateway's
reference cycles frozen for good)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.config.loader import load_config
from edge.config.models import PlantConfig
from edge.runtime import daemon
from tests.driver_harness import wait_until

CONFIG = """\
site: "1010"
data_dir: {data}
api: {{listen: "127.0.0.1:0"}}
destinations:
  erp: {{base_url: "http://127.0.0.1:{port}"}}
"""


def plant(tmp_path: Path, port: int) -> PlantConfig:
    path = tmp_path / f"plant-{port}.yaml"
    path.write_text(CONFIG.format(data=tmp_path / "data", port=port))
    return load_config(path, {})


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """This test process's heap as it was: the daemon's freeze is undone after the test."""
    yield
    gc.unfreeze()


async def test_a_gateway_a_reload_replaced_is_collected_and_start_up_is_frozen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unfrozen: None
) -> None:
    gc.unfreeze()
    gateways: list[weakref.ref[daemon.Gateway]] = []

    class Recorded(daemon.Gateway):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            gateways.append(weakref.ref(self))

    monkeypatch.setattr(daemon, "Gateway", Recorded)
    control = daemon.Control()
    serving = asyncio.create_task(
        daemon.serve(plant(tmp_path, 9), control, lambda: plant(tmp_path, 10))
    )
    try:
        await wait_until(lambda: gateways)
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # the modules and classes of start-up, at least
        control.reload()
        await wait_until(lambda: len(gateways) == 2)
        # Frozen once, at start-up (frozen objects freed by reference counting leave it).
        assert gc.get_freeze_count() <= frozen
    finally:
        control.stop()
        await asyncio.wait_for(serving, 30)
    gc.collect()
    assert gateways[0]() is None  # frozen, its reference cycles would keep it
