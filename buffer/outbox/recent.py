"""The deliveries this process committed and has not settled, kept in memory so that a lease
of them needs no read (`Outbox.lease`). Each entry is the delivery as a read would return it
(attempts 0).

Per destination and partition key, memory holds a run of the key's owed deliveries in commit
order that ends with its newest: only leased deliveries leave it (settled), and a key leases
from its head on, so what is missing is always at the front. A lease may therefore take a
key's head, and the run behind it, from memory only when memory's first entry is the head.
A key owed at open gains entries only behind what the file holds for it (a gap at the front,
so it is read until memory's first entry is its head). A key one of whose deliveries was not
kept for the budget could have a gap in the middle: it is read until it owes nothing.
"""

from __future__ import annotations

import itertools

from buffer.outbox.records import Delivery

ENTRY = 300
"""Bytes an entry holds beyond its payload: the Delivery, its place in the dicts and the
event's id (tracemalloc: 162 bytes beside the event's own objects)."""


class Recent:
    def __init__(self, budget: int) -> None:
        self.budget = budget
        """Bytes held at most (`ENTRY` each and the payload): beyond it a delivery is not
        kept and its key is read."""
        self.bytes = 0
        self._held: dict[str, dict[str, dict[int, Delivery]]] = {}
        self._partial: dict[str, set[str]] = {}
        """Per destination, the keys memory may have a gap in the middle of."""

    def add(self, delivery: Delivery) -> None:
        destination, key = delivery.destination, delivery.partition_key
        if key in self._partial.get(destination, ()):
            return
        if self.bytes >= self.budget:
            self._partial.setdefault(destination, set()).add(key)
            return
        self._held.setdefault(destination, {}).setdefault(key, {})[delivery.seq] = delivery
        self.bytes += ENTRY + len(delivery.payload)

    def drop(self, delivery: Delivery) -> None:
        """Settled: delivered or dead, gone; retried, its row changed (attempts)."""
        keys = self._held.get(delivery.destination)
        held = keys.get(delivery.partition_key) if keys else None
        if held is not None and (dropped := held.pop(delivery.seq, None)) is not None:
            self.bytes -= ENTRY + len(dropped.payload)

    def owes_nothing(self, destination: str, key: str) -> None:
        """The key has no owed delivery left: a gap can no longer be."""
        if partial := self._partial.get(destination):
            partial.discard(key)
        if (keys := self._held.get(destination)) is not None and not keys.get(key, True):
            del keys[key]

    def keep_only(self, destinations: set[str]) -> None:
        """Forget the entries of every other destination (one a reload removed: none of its
        entries would be settled again). If it comes back, what it owes is read (the front
        of each key is missing, as at open)."""
        for destination in [d for d in self._held if d not in destinations]:
            for held in self._held.pop(destination).values():
                self.bytes -= sum(ENTRY + len(d.payload) for d in held.values())
        for destination in [d for d in self._partial if d not in destinations]:
            del self._partial[destination]

    def run(self, destination: str, key: str, head: int, room: int) -> list[Delivery] | None:
        """The key's head and up to `room - 1` deliveries behind it, or None: read them."""
        held = self._held.get(destination, {}).get(key)
        if not held or next(iter(held)) != head or key in self._partial.get(destination, ()):
            return None
        return list(itertools.islice(held.values(), room))
