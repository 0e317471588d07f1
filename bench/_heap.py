"""The bench's process stands for the daemon's: its start-up heap is frozen out of the garbage
collector's full passes as `edge.runtime.daemon.serve` freezes the daemon's before its first
gateway (edge/runtime/heap.py). `--no-freeze` measures without it, to show what it changes; the
choice passes to child processes (the OPC UA phases) in the environment, and each bench's JSON
line says which it was (`heap_frozen`).

What the figures then leave out: a daemon builds its drivers, machines, rules and OPC UA items
after the freeze, so its full passes walk those too (about 1,800 objects for config/demo.yaml;
not measured at plant scale), as they walk up to the lease memory's deliveries in both."""

from __future__ import annotations

import os

from edge.runtime.heap import freeze_startup_heap

NO_FREEZE = "PLANTSYNC_BENCH_NO_FREEZE"


def freeze_as_the_daemon(no_freeze: bool = False) -> bool:
    """Freeze this process's heap unless told not to (here or by a parent); whether it did."""
    if no_freeze:
        os.environ[NO_FREEZE] = "1"
    if os.environ.get(NO_FREEZE):
        return False
    freeze_startup_heap()
    return True
