"""Whether a peer is available, said once when it goes and once when it is back, and the one
reconnect loop every connection runs.

Every connection the gateway keeps (a Modbus device, an OPC UA server, an MQTT broker, the QMS's
disposition feed, a destination's API) has the same duty towards the people who read its logs
and its health: say once, at WARNING, that the peer went away and why; say nothing while it
stays away (no log spam in a retry loop); say once, at INFO, that it is back; back off between
attempts with the shared policy (exponential, full jitter, capped) and start again from the
shortest wait once the peer answers. `Availability` holds that state, and is the one place that
sets a driver's `health.connected`. `reconnect_forever` is the loop around a component's own
connect-and-serve: the component only says how one connection ended (`Ended`), and may say how
to wait for the next attempt (a driver that watches a port to go again as soon as a device is
back).

Call order: `lost(reason)` and `back()` in any order, as often as the peer's answers say; only
a change is logged. `available` is None until the first of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from drivers.base import DriverHealth, honour_cancellation
from drivers.common.timing import Backoff

LOST_SAYS = "{peer} is unavailable: {reason}. Retrying with backoff."
BACK_SAYS = "{peer} is available again{detail}."


@dataclass(slots=True)
class Ended:
    """How one connection ended, or why it never began (a component may subclass it to carry
    what its wait needs)."""

    reason: str
    peer_lost: bool = True
    """False when the peer was fine and the gateway's own side failed (a commit the MQTT driver
    could not make, a bug handling an answer): reconnect, but do not call the peer
    unavailable."""
    say_again: bool = False
    """Said in the log even while the peer is already known to be unavailable, when the reason
    is new: waiting will not fix it (an untrusted certificate, a rejected user)."""
    retry_after: float | None = None
    """A fixed wait instead of the backoff's next delay (an OPC UA server that is full)."""


class Availability:
    """One peer's availability: logs each change once, resets the backoff when the peer is back,
    and keeps `health.connected` (when given a driver's health) true exactly while connected.

    `peer` is how the log names it (`Modbus device press-01 at 10.0.0.21:502`); `lost_says` and
    `back_says` are the two sentences, with `{peer}`, `{reason}` and `{detail}` filled in;
    `extra` are the structured fields of both log lines (`reason` is added to the first)."""

    def __init__(
        self,
        peer: str,
        log: logging.Logger,
        *,
        backoff: Backoff | None = None,
        health: DriverHealth | None = None,
        extra: Mapping[str, Any] | None = None,
        lost_says: str = LOST_SAYS,
        back_says: str = BACK_SAYS,
    ) -> None:
        self.peer = peer
        self.log = log
        self.backoff = backoff
        self.health = health
        self.extra = dict(extra or {})
        self.lost_says = lost_says
        self.back_says = back_says
        self.available: bool | None = None
        """None until the peer first answered or failed; then whether it is available."""
        self._said_reason: str | None = None

    def lost(self, reason: str, *, say_again: bool = False) -> None:
        """The peer is gone (or never came): logged when it was not already known to be, or
        with `say_again` when the reason is new."""
        self.disconnected()
        if self.available is not False or (say_again and reason != self._said_reason):
            self.log.warning(
                self.lost_says.format(peer=self.peer, reason=reason, detail=""),
                extra={**self.extra, "reason": reason},
            )
            self._said_reason = reason
        self.available = False

    def back(self, detail: str = "", *, reset_backoff: bool = True) -> bool:
        """The peer answers as it should: connected, the backoff starts again from its shortest
        wait (unless `reset_backoff` is False: the gateway's own side still fails), and a
        return is logged once, with `detail` after "available again". True when it was
        unavailable before."""
        self.connected()
        if reset_backoff and self.backoff is not None:
            self.backoff.reset()
        self._said_reason = None
        was_lost = self.available is False
        self.available = True
        if was_lost:
            self.log.info(
                self.back_says.format(peer=self.peer, reason="", detail=detail), extra=self.extra
            )
        return was_lost

    def connected(self) -> None:
        """The peer answered, though not yet as far as `back()` needs (a Modbus device's first
        answer, before a whole poll did): connected, nothing logged."""
        if self.health is not None:
            self.health.connected = True

    def disconnected(self) -> None:
        """The connection is closed, whatever the reason (also a stop): not connected, nothing
        logged."""
        if self.health is not None:
            self.health.connected = False

    def ended(self, ended: Ended) -> None:
        """One connection ended: the error goes into the health; the peer is called lost when
        it was the peer that failed."""
        if self.health is not None:
            self.health.record_error(ended.reason)
        if ended.peer_lost:
            self.lost(ended.reason, say_again=ended.say_again)
        else:
            self.disconnected()


EndedHow = TypeVar("EndedHow", bound=Ended)


async def sleep(ended: Ended, delay: float) -> None:
    """The plain wait between attempts: the whole delay."""
    await asyncio.sleep(delay)


async def reconnect_forever(
    connect_once: Callable[[], Awaitable[EndedHow]],
    backoff: Backoff,
    availability: Availability,
    *,
    wait: Callable[[EndedHow, float], Awaitable[None]] = sleep,
) -> NoReturn:
    """Connect and serve, and again after the backoff's delay, until cancelled.

    `connect_once` connects, serves (and calls `availability.back()` once the peer answers as
    it should) and returns how it ended; it raises only for a stop or a bug. `wait` waits
    `delay` seconds before the next attempt, given how the last one ended (it may end the wait
    early, e.g. as soon as a device's port accepts again). `backoff` becomes
    the one `availability.back()` resets (a component may have swapped its backoff after
    building its availability: tests shorten it)."""
    availability.backoff = backoff
    while True:
        try:
            ended = await connect_once()
        finally:
            availability.disconnected()
        # A stop that a library swallowed (asyncio.wait_for on Python 3.11) must not start
        # another connection.
        honour_cancellation()
        availability.ended(ended)
        delay = backoff.next_delay()
        if ended.retry_after is not None:
            delay = ended.retry_after
        await wait(ended, delay)
