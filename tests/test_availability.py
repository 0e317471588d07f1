"""The one availability piece: said once when lost and once when back, `health.connected` kept,
the backoff reset when the peer is back, and the reconnect loop around connect-and-serve.

The oracle is counted by hand: which log lines a sequence of answers must produce, and which
delays a backoff with a fixed random source gives."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from drivers.base import DriverHealth
from drivers.common.availability import Availability, Ended, reconnect_forever
from drivers.common.timing import Backoff

log = logging.getLogger("tests.availability")


def said(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [
        (record.levelno, record.getMessage())
        for record in caplog.records
        if record.name == log.name
    ]


def test_lost_and_back_are_each_said_once_per_change(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    health = DriverHealth()
    backoff = Backoff(base=1.0, cap=8.0)
    peer = Availability(
        "Modbus device press-01 at 10.0.0.21:502",
        log,
        health=health,
        backoff=backoff,
        extra={"driver": "press-01"},
    )
    assert peer.available is None and not health.connected
    peer.lost("connection refused")
    peer.lost("connection refused")
    peer.lost("no answer")
    backoff.next_delay(), backoff.next_delay()
    assert not health.connected and peer.available is False
    assert peer.back() is True
    assert health.connected and backoff.attempt == 0
    assert peer.back() is False
    peer.lost("the connection was closed")
    assert said(caplog) == [
        (
            logging.WARNING,
            "Modbus device press-01 at 10.0.0.21:502 is unavailable: "
            "connection refused. Retrying with backoff.",
        ),
        (logging.INFO, "Modbus device press-01 at 10.0.0.21:502 is available again."),
        (
            logging.WARNING,
            "Modbus device press-01 at 10.0.0.21:502 is unavailable: "
            "the connection was closed. Retrying with backoff.",
        ),
    ]
    assert caplog.records[0].__dict__["reason"] == "connection refused"
    assert caplog.records[0].__dict__["driver"] == "press-01"


def test_a_reason_a_person_must_fix_is_said_again_when_it_is_new(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    peer = Availability("OPC UA server filler at opc.tcp://h:4840", log)
    peer.lost("connection refused")
    peer.lost("the server does not trust us", say_again=True)
    peer.lost("connection refused")
    peer.lost("the server does not trust us", say_again=True)  # said already: not again
    peer.lost("the user was rejected", say_again=True)
    peer.back()
    peer.lost("the user was rejected", say_again=True)  # back in between: a new outage
    reasons = [text.split(": ", 1)[1] for level, text in said(caplog) if level == logging.WARNING]
    assert reasons == [
        "connection refused. Retrying with backoff.",
        "the server does not trust us. Retrying with backoff.",
        "the user was rejected. Retrying with backoff.",
        "the user was rejected. Retrying with backoff.",
    ]


def test_connected_without_back_logs_nothing_and_keeps_the_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Modbus device's first answer: connected, but "back" only after a whole poll."""
    caplog.set_level(logging.INFO, logger=log.name)
    health = DriverHealth()
    backoff = Backoff()
    peer = Availability("device", log, health=health, backoff=backoff)
    peer.lost("refused")
    backoff.next_delay()
    peer.connected()
    assert health.connected and backoff.attempt == 1 and peer.available is False
    assert len(said(caplog)) == 1
    peer.back(reset_backoff=False)
    assert backoff.attempt == 1 and len(said(caplog)) == 2


def test_custom_sentences_for_a_destination(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    peer = Availability(
        "erp",
        log,
        lost_says="Destination {peer} is failing ({reason})",
        back_says="Destination {peer} is delivering again",
    )
    peer.back()  # the first answer is no return
    peer.lost("HTTP 503")
    peer.back()
    assert [text for _, text in said(caplog)] == [
        "Destination erp is failing (HTTP 503)",
        "Destination erp is delivering again",
    ]


class Script:
    """Connections that end as the test says; the waits the loop asked for."""

    def __init__(self, peer: Availability, endings: list[Ended | None]) -> None:
        self.peer = peer
        self.endings = endings
        self.waits: list[float] = []
        self.connects = 0

    async def connect_once(self) -> Ended:
        self.connects += 1
        ending = self.endings.pop(0)
        if ending is None:  # this connection works, until the gateway's own commit fails
            self.peer.back()
            return Ended("commit failed", peer_lost=False)
        return ending

    async def wait(self, ended: Ended, delay: float) -> None:
        self.waits.append(delay)
        if not self.endings:
            raise asyncio.CancelledError


def by_hand(seed: int, ceilings: list[float]) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0, ceiling) for ceiling in ceilings]


async def test_reconnect_forever_backs_off_resets_when_back_and_counts_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    health = DriverHealth()
    peer = Availability("broker", log, health=health)
    script = Script(
        peer,
        [
            Ended("refused"),
            Ended("refused"),
            None,
            Ended("full", retry_after=2.5),
            Ended("refused"),
        ],
    )
    backoff = Backoff(base=1.0, cap=3.0, rng=random.Random(7))
    with pytest.raises(asyncio.CancelledError):
        await reconnect_forever(script.connect_once, backoff, peer, wait=script.wait)
    # Attempts 0, 1; back resets; 0 (commit), 1 (replaced by retry_after), 2.
    expected = by_hand(7, [1.0, 2.0, 1.0, 2.0, 3.0])
    assert script.waits == pytest.approx([*expected[:3], 2.5, expected[4]])
    assert script.connects == 5 and health.errors == 5
    assert health.last_error == "refused" and not health.connected
    # refused (said), refused (not again), back, commit (not the broker's: not said), full
    # (said: the broker was back), refused (already said).
    assert [text.split(" is ")[1] for _, text in said(caplog)] == [
        "unavailable: refused. Retrying with backoff.",
        "available again.",
        "unavailable: full. Retrying with backoff.",
    ]


async def test_a_stop_during_a_connection_leaves_it_disconnected() -> None:
    health = DriverHealth()
    peer = Availability("device", log, health=health)
    serving = asyncio.Event()

    async def connect_once() -> Ended:
        peer.back()
        serving.set()
        await asyncio.sleep(3600)
        raise AssertionError("not stopped")

    task = asyncio.create_task(reconnect_forever(connect_once, Backoff(), peer))
    await serving.wait()
    assert health.connected
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not health.connected
