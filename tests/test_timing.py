from __future__ import annotations

import random

import pytest
from pydantic import BaseModel, ValidationError

from drivers.common.timing import Backoff, Duration, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("15s", 15),
        ("15m", 900),
        ("2h", 7200),
        ("1h30m", 5400),
        ("1.5s", 1.5),
        ("1d", 86400),
        (0, 0.0),
        ("0", 0.0),
    ],
)
def test_durations_parse(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "15", "ms", "15x", "-1s", "1m-2s", True, None])
def test_bad_durations_are_rejected(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("number", [500, "500", 0.25, " 3 "])
def test_a_number_without_a_unit_is_refused_with_both_readings(number: object) -> None:
    # `poll_interval: 500` used to mean 500 s while "500" was refused: both are refused now,
    # naming the two things the technician may have meant.
    shown = str(number).strip()
    with pytest.raises(ValueError, match=rf"^add a unit: {shown}ms or {shown}s "):
        parse_duration(number)


def test_duration_field_round_trips() -> None:
    class Model(BaseModel):
        every: Duration

    model = Model.model_validate({"every": "15m"})
    assert model.every == 900
    assert model.model_dump(mode="json") == {"every": "15m"}
    assert format_duration(0.005) == "5ms"
    with pytest.raises(ValidationError, match="not a duration"):
        Model.model_validate({"every": "fifteen minutes"})


def test_backoff_has_full_jitter_under_an_exponential_cap() -> None:
    backoff = Backoff(base=1.0, cap=10.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(10)]
    ceilings = [min(10.0, 2.0**n) for n in range(10)]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    # The oracle is the policy as published (AWS, "Exponential Backoff And Jitter"): attempt n
    # waits uniform(0, min(cap, base * 2**n)); the same seed gives exactly those draws, so a
    # delay of 0, of the ceiling, or of a fixed step fails here.
    oracle = random.Random(7)
    assert delays == [oracle.uniform(0, ceiling) for ceiling in ceilings]
    assert backoff.attempt == 10
    backoff.reset()
    assert backoff.attempt == 0
    assert Backoff(base=1.0, cap=10.0, rng=random.Random(7)).next_delay() == delays[0]


def test_backoff_jitter_spreads_over_the_whole_window() -> None:
    """Full jitter, not equal jitter or none: at each attempt the waits cover [0, ceiling)
    evenly (mean about half the ceiling, some near 0, some near it), and never pass the cap."""
    for attempt, ceiling in ((0, 0.5), (3, 4.0), (6, 30.0), (40, 30.0)):
        waits = []
        for seed in range(2000):
            backoff = Backoff(base=0.5, cap=30.0, attempt=attempt, rng=random.Random(seed))
            waits.append(backoff.next_delay())
        assert max(waits) <= ceiling
        assert 0.45 * ceiling < sum(waits) / len(waits) < 0.55 * ceiling, (attempt, ceiling)
        assert min(waits) < 0.02 * ceiling and max(waits) > 0.98 * ceiling
