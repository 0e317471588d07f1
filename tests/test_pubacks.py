"""PUBACKs handed from paho's thread to the event loop (drivers/mqtt/pubacks.py), shared by the
MES order publisher and the exceptions channel."""

from __future__ import annotations

import asyncio
import threading

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from drivers.mqtt.pubacks import Pubacks

SUCCESS = ReasonCode(PacketTypes.PUBACK, "Success")
REFUSED = ReasonCode(PacketTypes.PUBACK, "Not authorized")


def from_paho(pubacks: Pubacks, mid: int, code: ReasonCode) -> None:
    thread = threading.Thread(target=pubacks.on_publish, args=(None, None, mid, code, None))
    thread.start()
    thread.join()


async def test_the_puback_of_the_awaited_id_answers_it() -> None:
    pubacks = Pubacks()
    pubacks.bind()
    waiting = asyncio.ensure_future(pubacks.wait(7))
    await asyncio.sleep(0)
    from_paho(pubacks, 7, REFUSED)
    assert (await asyncio.wait_for(waiting, 2)).is_failure


async def test_a_puback_nobody_waits_for_does_not_answer_a_later_publish_of_its_id() -> None:
    """A publish timed out and is tried again; its late PUBACK arrives before the message id is
    reused. Kept, it would answer the new publish: an order marked delivered the broker never
    had (the case of 91e5a30)."""
    pubacks = Pubacks()
    pubacks.bind()
    from_paho(pubacks, 5, SUCCESS)  # late: nobody waits
    await asyncio.sleep(0.05)  # handed to the loop
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await pubacks.wait(5)
