"""The forwarder engine's own arithmetic, by hand: the rate limit's token bucket (at most
`rate` events per second, bursts of one second's worth, a batch larger than a second's worth
sent once the bucket is full)."""

from __future__ import annotations

import time

import pytest

from edge.forward.forwarder import TokenBucket


async def test_a_full_bucket_lets_one_seconds_worth_through_at_once() -> None:
    bucket = TokenBucket(100.0)
    started = time.monotonic()
    await bucket.take(100)
    assert time.monotonic() - started < 0.05
    assert bucket.tokens == pytest.approx(0.0, abs=1.0)


async def test_then_it_refills_at_the_rate() -> None:
    bucket = TokenBucket(100.0)
    await bucket.take(100)
    started = time.monotonic()
    await bucket.take(30)  # 30 tokens at 100/s: 0.3 s
    waited = time.monotonic() - started
    assert 0.28 <= waited < 1.0, waited
    await bucket.take(1)
    assert time.monotonic() - started >= 0.3


async def test_a_batch_larger_than_the_rate_waits_for_a_full_bucket_only() -> None:
    bucket = TokenBucket(10.0)
    await bucket.take(10)
    started = time.monotonic()
    await bucket.take(25)  # cannot ever hold 25: goes once the bucket is full (1 s)
    waited = time.monotonic() - started
    assert 0.95 <= waited < 2.0, waited
    assert bucket.tokens == pytest.approx(-15.0, abs=0.5)  # in debt: the next ones wait
    started = time.monotonic()
    await bucket.take(1)
    assert time.monotonic() - started >= 1.5  # 16 tokens at 10/s


async def test_tokens_never_pile_up_beyond_one_seconds_worth() -> None:
    bucket = TokenBucket(50.0)
    bucket.updated -= 10.0  # idle for ten seconds
    await bucket.take(1)
    assert bucket.tokens == pytest.approx(49.0, abs=0.5)
