"""The daemon's start-up heap, kept out of the garbage collector's full passes.

What the daemon makes before it starts (modules, classes, the config, the open outbox) lives as
long as it does, yet every full pass of CPython's cyclic collector walks all of it: about
110,000 objects after the daemon's imports, 26-108 ms a pass on the 2-core box (the event loop
stopped meanwhile, so no request, acknowledgement or ping goes out), one pass every few seconds
at batched rates. `gc.freeze()` moves them into the permanent generation, which no pass walks.
Reference counting still frees any of them that are dropped; a garbage cycle that passes
through a frozen object is never collected (nor anything it reaches), so the freeze comes
before the first gateway is built: a reload replaces the gateway, whose cycles must stay
collectable. Hunting a leak in a running daemon: `gc.get_objects()` does not list frozen
objects; call `gc.unfreeze()` first.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect what start-up left behind, then freeze the rest; returns how many objects."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
