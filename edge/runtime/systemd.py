"""Telling systemd how the daemon is doing: the `sd_notify` protocol, written out (it is one
datagram to the socket named by `$NOTIFY_SOCKET`), and the supervisor that uses it.

`READY=1` goes once the gateway runs (outbox open, forwarders and drivers started);
`STATUS=` carries a one-line summary (drivers connected, outbox depth, dead letters,
back-pressure) whenever it changes; `RELOADING=1` and `READY=1` frame a reload; `STOPPING=1`
opens a shutdown. `WATCHDOG=1` goes at half of `$WATCHDOG_USEC`, and only while the event loop
turns *and* a commit through the outbox's writer completes within a deadline: a wedged outbox
stops the pings, and systemd restarts the daemon after `WatchdogSec=`. Without
`$NOTIFY_SOCKET` (a terminal, a test, the demo) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Protocol

from buffer.outbox import Outbox, OutboxFull

log = logging.getLogger(__name__)

WATCHDOG_STATE_KEY = "systemd:watchdog"
"""Rule-state row the watchdog probe writes: a real commit through the writer, one row."""


class Notifier:
    """Sends sd_notify messages; does nothing when the service manager did not ask for them."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog: int | None = None
        pid = env.get("WATCHDOG_PID")
        # The watchdog is ours unless systemd named another process for it.
        if env.get("WATCHDOG_USEC") and (not pid or pid == str(os.getpid())):
            with contextlib.suppress(ValueError):
                watchdog = int(env["WATCHDOG_USEC"]) or None
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two pings (half the watchdog timeout), or None without one."""
        if not self.enabled or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2e6

    def send(self, *assignments: str) -> bool:
        """Send `KEY=value` lines as one datagram; False when it could not be sent."""
        if self.address is None:
            return False
        # An abstract socket is written with a leading '@'; on the wire it is a NUL byte.
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        message = "\n".join(assignments).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                self._socket.setblocking(False)
            self._socket.sendto(message, target)
        except OSError as exc:
            if not self._failed:
                log.warning("Cannot notify systemd at %s: %s", self.address, exc)
                self._failed = True
            return False
        if self._failed:
            log.info("Notifying systemd at %s again", self.address)
            self._failed = False
        return True

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        # MONOTONIC_USEC lets a Type=notify-reload manager (systemd 253+) match the READY=1.
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={now_usec}")

    def stopping(self, status: str | None = None) -> None:
        self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class Supervised(Protocol):
    """What the supervisor asks of the running gateway."""

    @property
    def outbox(self) -> Outbox: ...

    def status_line(self) -> str: ...


async def probe_outbox(outbox: Outbox) -> None:
    """Prove the outbox's writer works: one small commit through its group-commit queue.

    Under back-pressure (disk budget reached, or disk full) the commit would wait for room,
    which is not a fault: then a read on the writer's thread stands in for it.
    """
    try:
        await outbox.commit([], {WATCHDOG_STATE_KEY: f"{time.time():.3f}"}, wait=False)
    except OutboxFull:
        await outbox.lot_status("")


class Supervisor:
    """Pings the watchdog while the gateway is healthy and keeps STATUS= up to date.

    Runs for the daemon's whole life, across reloads: `watch()` points it at the gateway of
    the moment.
    """

    def __init__(self, notifier: Notifier, *, status_every: float = 5.0) -> None:
        self.notifier = notifier
        self.status_every = status_every
        self.gateway: Supervised | None = None
        self.pings = 0
        self._probe_failing = False
        self._last_status: str | None = None

    def watch(self, gateway: Supervised | None) -> None:
        """Follow this gateway from now on (None: between two, while the outbox reopens)."""
        self.gateway = gateway

    async def run(self) -> None:
        if not self.notifier.enabled:
            return
        async with asyncio.TaskGroup() as tasks:
            if self.notifier.watchdog_interval is not None:
                tasks.create_task(
                    self._watchdog(self.notifier.watchdog_interval), name="systemd-watchdog"
                )
            tasks.create_task(self._status(), name="systemd-status")

    async def _watchdog(self, interval: float) -> None:
        # Pings go at fixed ticks; a probe may take half a tick. So two pings are never more
        # than 1.5 ticks (3/4 of WatchdogSec) apart while everything is healthy.
        loop = asyncio.get_running_loop()
        deadline = interval / 2
        next_tick = loop.time()
        while True:
            if await self._healthy(deadline):
                self.notifier.watchdog()
                self.pings += 1
            next_tick += interval
            await asyncio.sleep(max(0.0, next_tick - loop.time()))
            next_tick = max(next_tick, loop.time() - interval)

    async def _healthy(self, deadline: float) -> bool:
        gateway = self.gateway
        if gateway is None:
            return True  # starting: the event loop turns, and the outbox is being opened
        started = time.monotonic()
        try:
            await asyncio.wait_for(probe_outbox(gateway.outbox), deadline)
        except Exception as exc:  # any failure withholds the ping, whatever it is
            reason = (
                f"no answer within {deadline:g}s"
                if isinstance(exc, TimeoutError)
                else f"{type(exc).__name__}: {exc}"
            )
            if not self._probe_failing:
                log.error(
                    "The outbox writer failed the watchdog probe (%s): not telling "
                    "systemd the daemon is alive; it restarts the daemon if this lasts "
                    "WatchdogSec",
                    reason,
                )
                self._probe_failing = True
            return False
        if self._probe_failing:
            log.info(
                "The outbox writer answers the watchdog probe again (in %.2fs)",
                time.monotonic() - started,
            )
            self._probe_failing = False
        return True

    async def _status(self) -> None:
        while True:
            gateway = self.gateway
            if gateway is not None:
                line = gateway.status_line()
                if line != self._last_status:
                    self.notifier.status(line)
                    self._last_status = line
            await asyncio.sleep(self.status_every)
