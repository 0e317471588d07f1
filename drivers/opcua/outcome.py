"""How an OPC UA session ended, and the wait before the next attempt: `Outcome` (the shared
`Ended` plus whether the server could be reached at all), what an error that ended a session
means for the retry (`outcome_of`: a full server is tried again soon, an untrusted certificate
or a rejected user is said again, an unreachable server has its TCP port watched), and
`wait_to_retry`, which ends the backoff wait early once a server's closed port opens.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from urllib.parse import urlparse

from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaStatusCodeError

from drivers.base import accepts_tcp
from drivers.common.availability import Ended
from drivers.opcua.client import (
    SECURITY_REJECTED,
    USER_REJECTED,
    SecuritySetupError,
    describe_error,
)
from drivers.opcua.config import OpcUaConfig
from drivers.opcua.trust_list import UntrustedCertificate

FULL_SERVER_RETRY = 2.0
"""Seconds between attempts while the server answers BadTooManySessions: it answers at once,
and a session frees up when an orphan's timeout runs out, so waiting longer only delays us."""

PORT_PROBE_INTERVAL = 0.5
"""While a server is down, how often its TCP port is tried (a bare connect, no session), so that
a server that is back is used at once rather than at the next backoff attempt."""


@dataclass(slots=True)
class Outcome(Ended):
    """How a session ended: why (`say_again`: waiting will not fix it, an untrusted
    certificate, a rejected user; `retry_after`: a full server answers at once, and frees up
    when an orphaned session times out), and whether the server could not be reached at all
    (then its TCP port is watched while waiting, to go again as soon as it opens)."""

    unreachable: bool = False
    port_was_closed: bool = False
    """Seen closed while waiting: its opening is then news."""


def outcome_of(exc: Exception, config: OpcUaConfig) -> Outcome:
    """How a session that `exc` ended (or never let begin) ended."""
    reason = describe_error(exc, config.timeout, config.username, config.security)
    if isinstance(exc, UaStatusCodeError) and exc.code == StatusCodes.BadTooManySessions:
        return Outcome(reason, retry_after=FULL_SERVER_RETRY)
    if isinstance(exc, UntrustedCertificate | SecuritySetupError) or (
        isinstance(exc, UaStatusCodeError) and exc.code in USER_REJECTED | SECURITY_REJECTED
    ):
        return Outcome(reason, say_again=True)
    return Outcome(
        reason,
        unreachable=isinstance(exc, OSError | TimeoutError),
        port_was_closed=isinstance(exc, ConnectionRefusedError),
    )


async def wait_to_retry(
    outcome: Outcome, delay: float, endpoint: str, connect_timeout: float
) -> None:
    """Wait the backoff delay; but while a server that could not be reached is away, try
    its TCP port every PORT_PROBE_INTERVAL, and go at once when it opens, so a server that
    is back is read within a second, not at the next backoff attempt."""
    if not outcome.unreachable:
        await asyncio.sleep(delay)
        return
    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or 4840
    deadline = time.monotonic() + delay
    while (left := deadline - time.monotonic()) > 0:
        started = time.monotonic()
        if await accepts_tcp(host, port, min(left, connect_timeout)):
            if outcome.port_was_closed:
                return  # it was closed and opens now: the server is back
            # Open although the connection failed (a server refusing connections, or
            # resetting them): the port says nothing new, so the backoff stands.
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            return
        outcome.port_was_closed = True
        await asyncio.sleep(
            max(
                0.0,
                min(
                    PORT_PROBE_INTERVAL - (time.monotonic() - started),
                    deadline - time.monotonic(),
                ),
            )
        )
