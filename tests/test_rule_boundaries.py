"""The rules at their edges, derived by hand from the documented behaviour (README, "From
signals to milestones"): a value exactly on a limit is inside it; a breach lasting exactly
`for` is raised; the hysteresis band is inclusive; a lower-only or upper-only limit works
alone; a counter at exactly half its range wraps; values too large to be a quantity are not
process values. Each case names the mutant (from `make mutate`) it exists to kill.
"""

from __future__ import annotations

from typing import Any

from drivers.base import Sample
from edge.config.models import MachineConfig
from edge.rules.machine import MachineRule
from edge.rules.state import Counter

T0 = 1_800_000_000.0


def machine(**limit: Any) -> MachineConfig:
    return MachineConfig.model_validate(
        {
            "id": "press-01",
            "line": "LINE-A",
            "signals": {"processed": "plc.good"},
            "order": {"order_id": "1000123", "operation": "0010"},
            "confirm": {"every_units": 1000},
            "limits": [{"signal": "plc.force", "uom": "NEW", **limit}],
        }
    )


def force(value: float, at: float) -> Sample:
    return Sample("plc", "force", value, T0 + at)


def raised(rule: MachineRule, *readings: tuple[float, float]) -> list[str]:
    """The inspection requests the readings raise, as `measured@seconds`."""
    out = []
    for value, at in readings:
        for event in rule.on_sample(force(value, at)):
            out.append(f"{event.data['measured_value']['value']}@{at:g}")
    return out


def test_a_value_on_a_limit_is_inside_it() -> None:
    # `value < low` / `value > high`: a mutant with <= or >= raises on the limit itself.
    rule = MachineRule("1010", machine(low=12.0, high=15.0))
    assert raised(rule, (12.0, 0), (15.0, 1), (12.0, 2)) == []
    assert rule.state.excursions == {}
    assert raised(rule, (15.5, 3)) == ["15.5@3"]


def test_a_lower_only_and_an_upper_only_limit() -> None:
    # `low is not None and value < low`: the `low is None` mutant never sees a low breach.
    low_only = MachineRule("1010", machine(low=12.0))
    assert raised(low_only, (11.0, 0)) == ["11@0"]
    high_only = MachineRule("1010", machine(high=15.0))
    assert raised(high_only, (16.0, 0)) == ["16@0"]
    assert raised(MachineRule("1010", machine(high=15.0)), (-1e9, 0)) == []


def test_a_breach_lasting_exactly_for_is_raised_then_once() -> None:
    # `at - since >= for`: the `>` mutant waits past `for`.
    rule = MachineRule("1010", machine(high=15.0, **{"for": "5s"}))
    assert raised(rule, (16.0, 0), (16.5, 4.999)) == []
    assert raised(rule, (16.2, 5)) == ["16.5@5"]  # the worst value of the excursion
    assert raised(rule, (17.0, 6), (18.0, 60)) == []  # once per excursion
    # The same by the clock alone (a tick), exactly at `for`.
    ticked = MachineRule("1010", machine(high=15.0, **{"for": "5s"}))
    assert raised(ticked, (16.0, 0)) == []
    assert [e.type for e in ticked.on_tick(T0 + 5)] == ["inspection.requested"]


def test_the_hysteresis_band_is_inclusive() -> None:
    # Back inside means `value <= high - band` (and `>= low + band`): exactly on the band edge
    # ends the excursion; just outside it does not.
    rule = MachineRule("1010", machine(low=10.0, high=15.0, hysteresis=1.0))
    assert raised(rule, (16.0, 0)) == ["16@0"]
    assert raised(rule, (14.5, 1), (16.0, 2)) == []  # still the same excursion
    assert raised(rule, (14.0, 3)) == []  # on the band edge: over
    assert rule.state.excursions == {}
    assert raised(rule, (16.0, 4)) == ["16@4"]  # a new excursion
    low = MachineRule("1010", machine(low=10.0, high=15.0, hysteresis=1.0))
    assert raised(low, (9.0, 0), (10.5, 1), (9.5, 2)) == ["9@0"]
    assert raised(low, (11.0, 3), (9.0, 4)) == ["9@4"]


def test_the_worst_value_is_kept_by_distance_beyond_the_limit() -> None:
    # `_beyond`: distance outside [low, high], 0 inside; the report carries the worst.
    rule = MachineRule("1010", machine(low=10.0, high=15.0, **{"for": "10s"}))
    assert raised(rule, (9.0, 0), (7.5, 1), (8.0, 2), (9.9, 10)) == ["7.5@10"]
    upper = MachineRule("1010", machine(low=10.0, high=15.0, **{"for": "10s"}))
    assert raised(upper, (15.5, 0), (17.25, 1), (16.0, 10)) == ["17.25@10"]


def test_values_no_quantity_can_carry_are_not_process_values() -> None:
    # `abs(value) >= 1e15`: exactly 1e15 is refused too (a quantity has at most 28 digits,
    # and a float above 1e15 has no decimals left to trust).
    rule = MachineRule("1010", machine(high=15.0))
    assert raised(rule, (1e15, 0), (-1e15, 1), (1e16, 2)) == []
    assert raised(rule, (999_999_999_999_999.0, 3)) == ["999999999999999@3"]


def test_a_counter_wraps_only_when_the_wrapped_step_is_under_half_its_range() -> None:
    # 16-bit, by hand: a drop is a wrap when the last value was in the upper half and
    # raw + 65536 - last < 32768; otherwise a reset (counted from the new raw value).
    assert Counter(last_raw=40000).advance(100, 16, "c") == (25636, False)  # 100+65536-40000
    assert Counter(last_raw=30000).advance(100, 16, "c") == (100, True)  # lower half: reset
    assert Counter(last_raw=65535).advance(32766, 16, "c") == (32767, False)  # just under
    assert Counter(last_raw=65535).advance(32767, 16, "c") == (32767, True)  # exactly half
    # (From last = 32768 exactly every drop steps 32768 or more: `>= half` and `> half` on the
    # last value cannot differ, an equivalent mutant.)
    assert Counter(last_raw=32768).advance(100, 16, "c") == (100, True)
    first = Counter()
    assert first.advance(7, 16, "c") == (0, True) and first.last_raw == 7
    same = Counter(last_raw=7, total=3)
    assert same.advance(7, 16, "c") == (0, False) and same.total == 3
    up = Counter(last_raw=7, total=3)
    assert up.advance(10, 16, "c") == (3, False) and (up.total, up.last_raw) == (6, 10)


def counting(**extra: Any) -> MachineConfig:
    return MachineConfig.model_validate(
        {
            "id": "press-01",
            "line": "LINE-A",
            "signals": {
                "processed": "plc.good",
                "defective": "plc.bad",
                "state": "plc.state",
                "stop_reason": "plc.reason",
            },
            "state_map": {4: "Idle", 6: "Execute", 11: "Held", 17: "Complete"},
            "stop_reasons": {3: "Material shortage"},
            "counter_width": 16,
            **extra,
        }
    )


def read(signal: str, value: Any, at: float, quality: str = "good") -> Sample:
    from drivers.base import Quality

    return Sample("plc", signal, value, T0 + at, Quality(quality))


def confirmed(events: list[Any]) -> list[tuple[int, int, str, str]]:
    return [
        (
            e.data["counter_from"],
            e.data["counter_to"],
            e.data["yield_quantity"]["value"],
            e.data["trigger"],
        )
        for e in events
        if e.type == "production.confirmation"
    ]


def test_a_drop_from_the_upper_half_that_is_not_a_short_wrap_is_a_reset() -> None:
    # 40000 -> 39000 would be a step of 64536 if it wrapped: more than half the range, so a
    # reset counting 39000 (kills `last >= half or wrapped < half`).
    assert Counter(last_raw=40000).advance(39000, 16, "c") == (39000, True)


def test_units_pending_at_exactly_every_units_confirm_before_a_state_change() -> None:
    rule = MachineRule(
        "1010",
        counting(order={"order_id": "42"}, confirm={"every_units": 10, "on_state_change": False}),
    )
    rule.on_samples([read("state", 6, 0), read("good", 0, 0)])
    rule.on_sample(read("good", 9, 1))  # 9 pending: not yet
    events = rule.on_samples([read("good", 10, 2)])
    assert confirmed(events) == [(0, 10, "10", "units")]
    rule.on_sample(read("good", 20, 3))  # 10 pending when the state sample comes
    assert confirmed(rule.on_sample(read("state", 11, 3))) == []  # (confirmed by the poll)


def test_the_stop_reason_of_a_downtime_is_the_first_one_seen_while_down() -> None:
    rule = MachineRule("1010", counting(order={"order_id": "42"}))
    rule.on_samples([read("state", 6, 0), read("good", 0, 0)])
    rule.on_sample(read("reason", 9, 1))  # while running: not a downtime's reason
    rule.on_sample(read("state", 11, 2))
    assert rule.state.down_reason == 9  # the reason active at the stop
    rule.on_sample(read("reason", 0, 3))
    rule.on_sample(read("reason", 3, 4))  # a later code does not replace it
    events = rule.on_sample(read("state", 6, 10))
    (downtime,) = [e for e in events if e.type == "downtime.recorded"]
    assert (downtime.data["reason_code"], downtime.data["duration_seconds"]) == ("9", 8.0)
    fresh = MachineRule("1010", counting(order={"order_id": "42"}))
    fresh.on_samples([read("state", 6, 0), read("good", 0, 0)])
    fresh.on_sample(read("state", 11, 1))
    fresh.on_sample(read("reason", 3, 2))  # down with no reason yet: this one explains it
    (downtime,) = [e for e in fresh.on_sample(read("state", 6, 5)) if e.type == "downtime.recorded"]
    assert (downtime.data["reason_code"], downtime.data["reason_text"]) == (
        "3",
        "Material shortage",
    )


def test_an_order_ended_that_is_not_the_bound_one_is_refused() -> None:
    from edge.config.models import OrderBinding

    rule = MachineRule("1010", counting())
    events, problem = rule.end_order("42", None, T0)
    assert events == [] and problem == "order 42/* is not bound to machine press-01 (nothing is)"
    rule.start_order(OrderBinding(order_id="42", operation="0010"), T0)
    _, problem = rule.end_order("43", "0010", T0 + 1)
    assert problem == "order 43/0010 is not bound to machine press-01 (42/0010 is)"
    _, problem = rule.end_order("42", "0020", T0 + 1)
    assert problem == "order 42/0020 is not bound to machine press-01 (42/0010 is)"
    events, problem = rule.end_order("42", None, T0 + 2)
    assert problem is None
    assert [e.type for e in events] == ["production.confirmation", "operation.completed"]
    assert events[0].data["is_final"] is True
    assert rule.state.binding is None


def test_a_new_order_while_one_is_bound_completes_it_first() -> None:
    from edge.config.models import OrderBinding

    rule = MachineRule("1010", counting(confirm={"every_units": 100}))
    rule.on_samples([read("state", 6, 0), read("good", 0, 0)])
    rule.start_order(OrderBinding(order_id="42", operation="0010"), T0 + 1)
    rule.on_sample(read("good", 5, 2))
    events = rule.start_order(OrderBinding(order_id="43", operation="0010"), T0 + 3)
    assert [(e.type, e.data["order_id"]) for e in events] == [
        ("production.confirmation", "42"),
        ("operation.completed", "42"),
        ("operation.started", "43"),
    ]
    assert confirmed(events) == [(0, 5, "5", "order_end")]
    assert rule.state.binding is not None and rule.state.binding.source == "mes"
    assert rule.start_order(OrderBinding(order_id="43", operation="0010"), T0 + 4) == []


def test_an_unknown_state_number_is_logged_once_and_ignored(
    caplog: Any,
) -> None:
    rule = MachineRule("1010", counting())
    with caplog.at_level("WARNING"):
        for at in range(3):
            assert rule.on_sample(read("state", 99, at)) == []
    assert caplog.text.count("state 99, which state_map does not name") == 1
    assert rule.state.machine_state is None
