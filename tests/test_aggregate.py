"""The confirmation rule: counters to production confirmations, across rollovers, resets and
restarts, with the sum of confirmations always equal to the counter advance."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.base import Quality, Sample
from edge.aggregate import Counter, MachineRule
from edge.config import MachineConfig
from edge.model import CloudEvent


def machine(every_units: int | None = 10, every: str | None = None, width: int = 32,
            order: bool = True, uom: str = "C62") -> MachineConfig:
    return MachineConfig.model_validate({
        "id": "press-01", "line": "LINE-A",
        "signals": {"processed": "plc.good", "defective": "plc.bad"},
        "order": {"order_id": "1000123", "operation": "0010"} if order else None,
        "confirm": {"every_units": every_units, "every": every, "uom": uom},
        "counter_width": width,
    })


def good(value: int | None, at: float = 1000.0, quality: Quality = Quality.GOOD) -> Sample:
    return Sample("plc", "good", value, at, quality)


def bad(value: int, at: float = 1000.0) -> Sample:
    return Sample("plc", "bad", value, at)


def yields(events: list[CloudEvent]) -> int:
    return sum(int(Decimal(e.data["yield_quantity"]["value"])) for e in events)


def test_first_reading_is_the_baseline_and_must_be_saved() -> None:
    rule = MachineRule("1010", machine())
    assert rule.on_sample(good(500)) == []
    assert rule.needs_save  # else a restart would take a new baseline and lose the units
    rule.dump_state()
    assert not rule.needs_save
    assert rule.on_sample(good(509)) == []
    (event,) = rule.on_sample(good(512))
    assert event.type == "production.confirmation"
    assert event.data["yield_quantity"] == {"value": "12", "uom": "C62"}
    assert (event.data["counter_from"], event.data["counter_to"]) == (0, 12)
    assert event.partitionkey == "1000123" and event.subject == "1000123/0010"
    assert event.data["trigger"] == "units"


def test_scrap_rides_with_the_next_confirmation() -> None:
    rule = MachineRule("1010", machine())
    rule.on_sample(good(0))
    rule.on_sample(bad(0))
    rule.on_sample(bad(3))
    (event,) = rule.on_sample(good(10))
    assert event.data["scrap_quantity"]["value"] == "3"


def test_rollover_keeps_counting_and_a_drop_is_a_reset() -> None:
    counter = Counter()
    assert counter.advance(65530, 16, "c") == (0, True)
    assert counter.advance(4, 16, "c") == (10, False)  # wrapped at 65536
    assert counter.total == 10
    assert counter.advance(2, 16, "c") == (2, True)  # a drop that is no wrap: a reset
    assert counter.total == 12


def test_bad_quality_and_non_numbers_are_not_counted() -> None:
    rule = MachineRule("1010", machine())
    rule.on_sample(good(0))
    assert rule.on_sample(good(None, quality=Quality.BAD)) == []
    assert rule.on_sample(Sample("plc", "good", "12", 1.0)) == []
    assert rule.state.good.total == 0


def test_time_trigger_confirms_at_wall_clock_boundaries() -> None:
    rule = MachineRule("1010", machine(every_units=None, every="15m"))
    rule.on_sample(good(100, at=1000.0))  # window [900, 1800)
    rule.on_sample(good(103, at=1010.0))
    assert rule.on_tick(1799.0) == []
    (event,) = rule.on_tick(1800.0)  # :15 past the hour, aligned to the clock
    assert event.data["trigger"] == "time" and event.data["yield_quantity"]["value"] == "3"
    assert rule.on_tick(2700.0) == []  # nothing pending, nothing posted


def test_unbound_machine_counts_unassigned_production_and_posts_nothing() -> None:
    rule = MachineRule("1010", machine(order=False))
    rule.on_sample(good(0))
    assert rule.on_sample(good(25)) == []
    assert rule.state.unassigned == 25


def test_plant_unit_codes_reach_the_quantities() -> None:
    rule = MachineRule("1010", machine(uom="ZCS"), uom_codes=frozenset({"ZCS"}))
    rule.on_sample(good(0))
    (event,) = rule.on_sample(good(10))
    assert event.data["yield_quantity"]["uom"] == "ZCS"


def test_ids_are_derived_again_after_a_crash() -> None:
    rule = MachineRule("1010", machine())
    rule.on_sample(good(0))
    saved = rule.dump_state()
    first = rule.on_sample(good(10))
    # Crash before the commit: resume from the last saved state, read the same counter.
    again = MachineRule("1010", machine(), saved).on_sample(good(10))
    assert [e.id for e in first] == [e.id for e in again]


readings = st.lists(
    st.one_of(
        st.tuples(st.just("step"), st.integers(0, 40)),
        st.tuples(st.just("reset"), st.integers(0, 5)),
        st.tuples(st.just("crash"), st.booleans()),
        st.tuples(st.just("tick"), st.integers(0, 120)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(readings, st.integers(1, 30), st.integers(65400, 65535))
def test_confirmations_add_up_to_the_counter_advance(
    steps: list[tuple[str, int]], every_units: int, start: int
) -> None:
    """Random 16-bit counter histories that roll over, reset, and see the gateway crash (it
    resumes from its last committed state; what it had not committed is lost): the committed
    confirmations tile the counter's real advance exactly, and no id repeats."""
    config = machine(every_units=every_units, every="60s", width=16)
    rule = MachineRule("1010", config)
    raw, now, advance = start, 0.0, 0
    committed: list[CloudEvent] = []
    uncommitted: list[CloudEvent] = []
    saved = ""

    def commit_if_due(produced: list[CloudEvent]) -> None:
        nonlocal saved, uncommitted
        uncommitted += produced
        if produced or rule.needs_save:  # what the pipeline does
            committed.extend(uncommitted)
            uncommitted = []
            saved = rule.dump_state()

    commit_if_due(rule.on_sample(good(raw, now)))
    for kind, amount in steps:
        now += 1.0
        if kind == "crash":
            if amount:  # the pending commit made it to disk before the crash
                commit_if_due(uncommitted)
            uncommitted = []
            rule = MachineRule("1010", config, saved)
            commit_if_due(rule.on_sample(good(raw, now)))  # the device kept its count
        elif kind == "tick":
            now += amount
            commit_if_due(rule.on_tick(now))
        else:
            if kind == "reset" and raw < 32768 and amount < raw:
                raw = amount  # unambiguous reset: a drop that cannot be a rollover
            else:
                raw = (raw + amount) % 65536  # counting on, rolling over at 16 bits
            advance += amount
            commit_if_due(rule.on_sample(good(raw, now)))
    commit_if_due(rule.on_tick(now + 61))
    ids = [e.id for e in committed]
    assert len(ids) == len(set(ids))
    position = 0
    for event in committed:
        assert event.data["counter_from"] == position
        position = event.data["counter_to"]
    assert rule.state.good.total == advance
    assert rule.state.good.pending == 0
    assert yields(committed) == position == advance


def full_machine(every_units: int) -> MachineConfig:
    return MachineConfig.model_validate({
        "id": "press-01", "signals": {"processed": "plc.good", "state": "plc.state"},
        "state_map": {4: "Idle", 6: "Execute", 11: "Held", 17: "Complete"},
        "confirm": {"every_units": every_units, "every": "60s", "on_state_change": True},
        "counter_width": 16,
    })


shift = st.lists(
    st.one_of(
        st.tuples(st.just("count"), st.integers(0, 40)),
        st.tuples(st.just("reset"), st.integers(0, 5)),
        st.tuples(st.just("state"), st.sampled_from([4, 6, 11, 17, 99])),
        st.tuples(st.just("start"), st.sampled_from(["A", "B", "C"])),
        st.tuples(st.just("end"), st.sampled_from(["A", "B", "C"])),
        st.tuples(st.just("crash"), st.booleans()),
        st.tuples(st.just("tick"), st.integers(0, 120)),
    ),
    max_size=100,
)


@settings(max_examples=300, deadline=None)
@given(shift, st.integers(1, 30))
def test_orders_states_and_crashes_never_lose_or_double_count(
    steps: list[tuple[str, object]], every_units: int
) -> None:
    """Random shifts: counts, resets, rollovers, state changes, MES order starts and ends, and
    crashes that lose what was not committed. Committed confirmations plus unassigned units
    always equal the counter's real advance; counter ranges never overlap; ids never repeat."""
    from edge.config import OrderBinding

    config = full_machine(every_units)
    rule = MachineRule("1010", config)
    raw, now, advance = 65500, 0.0, 0
    committed: list[CloudEvent] = []
    uncommitted: list[CloudEvent] = []
    saved = ""

    def commit_if_due(produced: list[CloudEvent]) -> None:
        nonlocal saved, uncommitted
        uncommitted += produced
        if produced or rule.needs_save:
            committed.extend(uncommitted)
            uncommitted = []
            saved = rule.dump_state()

    commit_if_due(rule.on_sample(good(raw, now)))
    for kind, value in steps:
        now += 1.0
        if kind == "crash":
            if value:
                commit_if_due(uncommitted)
            uncommitted = []
            rule = MachineRule("1010", config, saved)
            commit_if_due(rule.on_sample(good(raw, now)))
        elif kind == "tick":
            now += float(value)  # type: ignore[arg-type]
            commit_if_due(rule.on_tick(now))
        elif kind == "state":
            commit_if_due(rule.on_sample(Sample("plc", "state", value, now)))  # type: ignore[arg-type]
        elif kind == "start":
            commit_if_due(rule.start_order(OrderBinding(order_id=str(value)), now))
        elif kind == "end":
            events, _problem = rule.end_order(str(value), None, now)
            commit_if_due(events)
        else:
            amount = int(value)  # type: ignore[call-overload]
            if kind == "reset" and raw < 32768 and amount < raw:
                raw = amount
            else:
                raw = (raw + amount) % 65536
            advance += amount
            commit_if_due(rule.on_sample(good(raw, now)))
    commit_if_due(rule.on_sample(good(raw, now + 1)))
    ids = [e.id for e in committed]
    assert len(ids) == len(set(ids))
    confirmations = [e for e in committed if e.type == "production.confirmation"]
    end = 0
    for event in confirmations:
        assert event.data["counter_from"] >= end  # ranges never overlap, always move on
        end = event.data["counter_to"]
    state = rule.state
    assert state.good.total == advance
    assert yields(confirmations) + state.unassigned + state.good.pending == advance


def test_a_stop_reason_in_the_same_poll_explains_the_state_change() -> None:
    from edge.config import OrderBinding

    config = MachineConfig.model_validate({
        "id": "press-01", "signals": {"processed": "plc.good", "state": "plc.state",
                                      "stop_reason": "plc.reason"},
        "state_map": {6: "Execute", 11: "Held"}, "stop_reasons": {3: "Jam"}})
    rule = MachineRule("1010", config)
    rule.start_order(OrderBinding(order_id="4711"), 1.0)
    rule.on_samples([Sample("plc", "state", 6, 2.0)])
    rule.on_samples([Sample("plc", "state", 6, 3.0)])
    # The device sent the state before the reason (OPC UA orders by first change).
    events = rule.on_samples([Sample("plc", "state", 11, 4.0), Sample("plc", "reason", 3, 4.0)])
    (interrupted,) = [e for e in events if e.type == "operation.interrupted"]
    assert interrupted.data["reason_code"] == "3" and interrupted.data["reason_text"] == "Jam"
