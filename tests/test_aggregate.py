"""The machine rules: counters to production confirmations (across rollovers, resets, restarts
and lost commits, always adding up to the counter's advance), what each counter counts, state
changes that wait for the counters, gaps in the state source, and limits."""

from __future__ import annotations

import json
import logging
import math
import os
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.base import Quality, Sample
from edge.config.models import MachineConfig, OrderBinding
from edge.model.envelope import CloudEvent
from edge.rules.machine import MachineRule
from edge.rules.state import Counter

T0 = 1_796_032_800.0  # 2026-11-30T10:00:00Z


def machine(
    every_units: int | None = 10,
    every: str | None = None,
    width: int = 32,
    order: bool = True,
    uom: str = "C62",
    **extra: Any,
) -> MachineConfig:
    return MachineConfig.model_validate(
        {
            "id": "press-01",
            "line": "LINE-A",
            "signals": {"good": "plc.good", "defective": "plc.bad"},
            "order": {"order_id": "1000123", "operation": "0010"} if order else None,
            "confirm": {"every_units": every_units, "every": every, "uom": uom},
            "counter_width": width,
            **extra,
        }
    )


def packml_machine(signals: dict[str, str] | None = None, **extra: Any) -> MachineConfig:
    return MachineConfig.model_validate(
        {
            "id": "filler-02",
            "line": "LINE-F",
            "signals": signals
            or {
                "processed": "plc.processed",
                "defective": "plc.defective",
                "state": "plc.state",
                "stop_reason": "plc.reason",
            },
            "state_map": {
                2: "Stopped",
                4: "Idle",
                5: "Suspended",
                6: "Execute",
                10: "Holding",
                11: "Held",
                12: "Unholding",
                16: "Completing",
                17: "Complete",
            },
            "stop_reasons": {3: "Jam"},
            "confirm": {"every_units": 1000},
            **extra,
        }
    )


def good(value: int | None, at: float = 1000.0, quality: Quality = Quality.GOOD) -> Sample:
    return Sample("plc", "good", value, at, quality)


def bad(value: int, at: float = 1000.0) -> Sample:
    return Sample("plc", "bad", value, at)


def sample(tag: str, value: Any, at: float, quality: Quality = Quality.GOOD) -> Sample:
    return Sample("plc", tag, value, at, quality)


def yields(events: list[CloudEvent]) -> int:
    return sum(
        int(Decimal(e.data["yield_quantity"]["value"]))
        for e in events
        if e.type == "production.confirmation"
    )


def scraps(events: list[CloudEvent]) -> int:
    return sum(
        int(Decimal(e.data["scrap_quantity"]["value"]))
        for e in events
        if e.type == "production.confirmation"
    )


def of_type(events: list[CloudEvent], event_type: str) -> list[dict[str, Any]]:
    return [e.data for e in events if e.type == event_type]


def test_first_reading_is_the_baseline_and_must_be_saved() -> None:
    rule = MachineRule("1010", machine())
    assert rule.on_sample(good(500)) == []
    assert rule.needs_save  # else a restart would take a new baseline and lose the units
    rule.dump_state()
    assert not rule.needs_save
    assert rule.on_sample(good(509)) == []
    assert rule.dirty and not rule.needs_save  # saved with the next commit or tick
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
    assert rule.on_sample(Sample("plc", "good", math.nan, 1.0)) == []
    assert rule.state.good.total == 0


def test_time_trigger_confirms_at_wall_clock_boundaries_dated_at_the_boundary() -> None:
    rule = MachineRule("1010", machine(every_units=None, every="15m"))
    rule.on_sample(good(100, at=1000.0))  # window [900, 1800)
    rule.on_sample(good(103, at=1010.0))
    assert rule.on_tick(1799.0) == []
    (event,) = rule.on_tick(1801.5)  # :15 past the hour, aligned to the clock
    assert event.data["trigger"] == "time" and event.data["yield_quantity"]["value"] == "3"
    assert event.data["occurred_at"] == "1970-01-01T00:30:00Z"  # the boundary, not the tick
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


# -- what the counters count ---------------------------------------------------------------


def test_processed_counts_good_and_defective_so_yield_is_their_difference() -> None:
    """PackML's ProdProcessedCount counts good and defective units: 100 processed with 10
    defective is 90 yield and 10 scrap (ERP books 100), not 100 + 10."""
    rule = MachineRule("1010", packml_machine(), settle=0.0)
    rule.start_order(OrderBinding(order_id="4711"), T0)
    rule.on_samples([sample("processed", 0, T0 + 1), sample("defective", 0, T0 + 1)])
    rule.on_samples([sample("processed", 100, T0 + 2), sample("defective", 10, T0 + 2)])
    events, problem = rule.end_order("4711", None, T0 + 3)
    assert problem is None
    (confirmation,) = of_type(events, "production.confirmation")
    assert confirmation["yield_quantity"]["value"] == "90"
    assert confirmation["scrap_quantity"]["value"] == "10"
    assert (confirmation["counter_from"], confirmation["counter_to"]) == (0, 100)
    (completed,) = of_type(events, "operation.completed")
    assert (completed["yield_quantity"]["value"], completed["scrap_quantity"]["value"]) == (
        "90",
        "10",
    )


def test_a_defective_count_read_before_its_processed_count_waits_for_it() -> None:
    """OPC UA sends each tag as it changes: a defective unit can show in ProdDefectiveCount
    before ProdProcessedCount. No quantity goes negative, and nothing is lost."""
    config = packml_machine(confirm={"every_units": 1})
    rule = MachineRule("1010", config)
    rule.start_order(OrderBinding(order_id="4711"), T0)
    rule.on_samples([sample("processed", 50, T0), sample("defective", 5, T0)])
    assert rule.on_sample(sample("defective", 7, T0 + 1)) == []  # processed has not caught up
    (first,) = of_type(rule.on_sample(sample("processed", 51, T0 + 2)), "production.confirmation")
    assert (first["yield_quantity"]["value"], first["scrap_quantity"]["value"]) == ("0", "1")
    (second,) = of_type(rule.on_sample(sample("processed", 53, T0 + 3)), "production.confirmation")
    assert (second["yield_quantity"]["value"], second["scrap_quantity"]["value"]) == ("1", "1")
    assert rule.state.scrap.pending == 0 and rule.state.processed.pending == 0


@pytest.mark.parametrize(
    ("signals", "readings", "totals"),
    [
        ({"good": "plc.good", "defective": "plc.bad"}, {"good": 40, "bad": 3}, (40, 3)),
        (
            {"processed": "plc.processed", "defective": "plc.bad"},
            {"processed": 40, "bad": 3},
            (37, 3),
        ),
        (
            {"processed": "plc.processed", "good": "plc.good"},
            {"processed": 40, "good": 36},
            (36, 4),
        ),
        ({"processed": "plc.processed"}, {"processed": 40}, (40, 0)),
    ],
)
def test_status_shows_good_and_scrap_whatever_the_counters(
    signals: dict[str, str], readings: dict[str, int], totals: tuple[int, int]
) -> None:
    rule = MachineRule("1010", packml_machine(signals=signals))
    rule.on_samples([sample(tag, 0, T0) for tag in readings])
    rule.on_samples([sample(tag, value, T0 + 1) for tag, value in readings.items()])
    counted = rule.totals()
    assert (counted["good_total"], counted["scrap_total"]) == totals
    assert (counted["good_pending"], counted["scrap_pending"]) == (0, 0)  # unassigned


def test_good_and_processed_make_scrap_their_difference() -> None:
    config = packml_machine(
        signals={"good": "plc.good", "processed": "plc.processed"}, confirm={"every_units": 10}
    )
    rule = MachineRule("1010", config)
    rule.start_order(OrderBinding(order_id="4711"), T0)
    rule.on_samples([sample("processed", 0, T0), sample("good", 0, T0)])
    (event,) = rule.on_samples([sample("processed", 12, T0 + 1), sample("good", 9, T0 + 1)])
    assert (event.data["yield_quantity"]["value"], event.data["scrap_quantity"]["value"]) == (
        "9",
        "3",
    )


def test_naming_all_three_counters_or_none_is_refused() -> None:
    with pytest.raises(ValueError, match="name two of them"):
        packml_machine(signals={"good": "plc.g", "processed": "plc.p", "defective": "plc.d"})
    with pytest.raises(ValueError, match="name the machine's counter"):
        packml_machine(signals={"defective": "plc.d"})


def test_state_saved_before_counters_were_named_loads_for_a_processed_machine() -> None:
    """An old config kept `processed:` (now: good and defective), and its saved state named
    that counter `good`: it continues where it was, baseline and binding included."""
    old = {
        "good": {"last_raw": 500, "total": 120, "confirmed": 100, "restarted": False},
        "scrap": {"last_raw": 7, "total": 7, "confirmed": 5, "restarted": False},
        "sequence": 4,
        "window": None,
        "unassigned": 0,
        "unassigned_scrap": 0,
        "binding": {
            "order_id": "4711",
            "operation": "0010",
            "material": None,
            "lot_id": None,
            "source": "mes",
            "bound_at": T0,
            "good_at_bind": 40,
            "scrap_at_bind": 1,
            "started_at": T0,
            "interrupted_at": None,
            "completed": False,
        },
        "machine_state": "Execute",
        "candidate": None,
        "candidate_since": None,
        "stop_reason": 0,
        "down_since": None,
        "down_state": None,
        "down_reason": 0,
        "excursions": {},
        "unassigned_excursions": 0,
        "clock": T0 + 50,
    }
    rule = MachineRule("1010", packml_machine(), json.dumps(old))
    assert rule.state.processed.last_raw == 500 and rule.state.processed.total == 120
    assert rule.state.good.last_raw is None
    binding = rule.state.binding
    assert binding is not None and (binding.yield_confirmed, binding.scrap_confirmed) == (60, 4)


# -- state changes apply with the counter values as of them (issue 12, item 3) -------------


def test_the_last_count_arriving_after_complete_still_counts_for_the_order() -> None:
    """OPC UA samples each tag on its own timer: the count of the last units (dated before
    the change) arrives after Complete. The change waits `settle` for it."""
    rule = MachineRule("1010", packml_machine(), settle=1.0)
    rule.start_order(OrderBinding(order_id="4711"), T0)
    rule.on_samples(
        [sample("state", 6, T0 + 1), sample("processed", 0, T0 + 1), sample("defective", 0, T0 + 1)]
    )
    rule.on_sample(sample("processed", 40, T0 + 5.0))
    assert rule.on_sample(sample("state", 17, T0 + 5.2)) == []  # waits for the counters
    events = rule.on_sample(sample("processed", 41, T0 + 5.1))  # the last unit, dated before
    events += rule.on_tick(T0 + 6.3)  # the wait is over
    (final,) = of_type(events, "production.confirmation")
    assert final["is_final"] and final["yield_quantity"]["value"] == "41"
    assert final["occurred_at"] == "2026-11-30T10:00:05.200000Z"  # when Complete began
    assert of_type(events, "operation.completed")[0]["yield_quantity"]["value"] == "41"
    assert rule.state.unassigned == 0


def test_a_count_sampled_after_complete_but_while_it_waits_still_counts() -> None:
    """A server that samples per tag dates the last count when it sampled it: after Complete.
    A machine out of Execute makes no more units, so it is the count as of the change; what
    comes after the wait is not."""
    rule = MachineRule("1010", packml_machine(), settle=1.0)
    rule.start_order(OrderBinding(order_id="4711"), T0)
    rule.on_samples([sample("state", 6, T0 + 1), sample("processed", 0, T0 + 1)])
    rule.on_sample(sample("processed", 10, T0 + 2))
    rule.on_sample(sample("state", 17, T0 + 3))
    events = rule.on_sample(sample("processed", 12, T0 + 3.5))  # sampled after Complete
    events += rule.on_tick(T0 + 4.1)
    assert of_type(events, "production.confirmation")[0]["yield_quantity"]["value"] == "12"
    rule.on_sample(sample("processed", 13, T0 + 5))  # after the wait: not the order's
    assert rule.state.unassigned == 1


def test_counters_read_with_the_state_in_one_poll_come_first() -> None:
    """Without any wait: one poll (or publish) that holds the state change and the last
    count applies the count first, in whatever order the driver listed them."""
    rule = MachineRule("1010", packml_machine(), settle=0.0)
    rule.start_order(OrderBinding(order_id="4711"), T0)
    rule.on_samples([sample("state", 6, T0 + 1), sample("processed", 0, T0 + 1)])
    events = rule.on_samples([sample("state", 17, T0 + 2), sample("processed", 7, T0 + 2)])
    assert of_type(events, "production.confirmation")[0]["yield_quantity"]["value"] == "7"


def test_a_device_clock_ahead_of_the_gateway_does_not_stall_a_waiting_change() -> None:
    rule = MachineRule("1010", packml_machine(), settle=0.5)
    rule.on_tick(T0)
    rule.start_order(OrderBinding(order_id="4711"), T0)
    ahead = T0 + 3600  # the device's clock runs an hour ahead; ticks are the gateway's
    rule.on_samples([sample("state", 6, ahead), sample("processed", 0, ahead)])
    rule.on_tick(T0 + 1)
    rule.on_tick(T0 + 2)
    rule.on_sample(sample("state", 17, ahead + 10))
    assert rule.on_tick(T0 + 3) == []
    events = rule.on_tick(T0 + 4.6)
    assert of_type(events, "operation.completed")


# -- PackML sequences (issue 13, item 7; the table itself is in test_packml.py) -------------


def test_hold_through_holding_interrupts_at_holding_and_labels_the_downtime_held() -> None:
    rule = MachineRule("1010", packml_machine())
    rule.start_order(OrderBinding(order_id="4711"), T0)
    events: list[CloudEvent] = []
    for offset, state in [(1, 6), (10, 10), (12, 11), (40, 12), (43, 6)]:
        if state == 10:
            events += rule.on_sample(sample("reason", 3, T0 + offset))
        events += rule.on_sample(sample("state", state, T0 + offset))
    assert [e.type for e in events] == [
        "operation.started",
        "operation.interrupted",
        "downtime.recorded",
        "operation.resumed",
    ]
    interrupted = of_type(events, "operation.interrupted")[0]
    assert interrupted["machine_state"] == "Holding" and interrupted["reason_code"] == "3"
    assert interrupted["occurred_at"] == "2026-11-30T10:00:10Z"
    downtime = of_type(events, "downtime.recorded")[0]
    assert downtime["machine_state"] == "Held" and downtime["reason_text"] == "Jam"
    assert (downtime["started_at"], downtime["ended_at"], downtime["duration_seconds"]) == (
        "2026-11-30T10:00:10Z",
        "2026-11-30T10:00:43Z",
        33.0,
    )


def test_completing_is_no_interruption() -> None:
    rule = MachineRule("1010", packml_machine())
    rule.start_order(OrderBinding(order_id="4711"), T0)
    events: list[CloudEvent] = []
    for offset, state in [(1, 6), (10, 16), (12, 17)]:
        events += rule.on_sample(sample("state", state, T0 + offset))
    assert [e.type for e in events] == [
        "operation.started",
        "production.confirmation",
        "operation.completed",
    ]


def test_a_change_is_never_dated_before_what_was_dated_under_the_state_before() -> None:
    """Found by the property test (a crash): a change dated when it began, after a debounce or
    across a gap, came before the operation's start and failed validation."""
    config = packml_machine(debounce="5s")
    rule = MachineRule("1010", config)
    rule.on_sample(sample("state", 6, T0))
    rule.on_sample(sample("state", 6, T0 + 6))  # Execute since T0
    rule.on_sample(sample("state", 17, T0 + 10))  # Complete, a candidate since T0+10
    rule.start_order(OrderBinding(order_id="4711"), T0 + 12)  # bound (and started) meanwhile
    events = rule.on_tick(T0 + 16)
    (completed,) = of_type(events, "operation.completed")
    assert completed["occurred_at"] == completed["started_at"] == "2026-11-30T10:00:12Z"

    rule = MachineRule("1010", packml_machine())
    rule.on_sample(sample("state", 6, T0 + 1))
    restarted = MachineRule("1010", packml_machine(), rule.dump_state())  # a gap from T0+1
    restarted.start_order(OrderBinding(order_id="4711"), T0 + 3)
    events = restarted.on_sample(sample("state", 17, T0 + 4))
    (completed,) = of_type(events, "operation.completed")
    assert completed["occurred_at"] == completed["started_at"] == "2026-11-30T10:00:03Z"


# -- gaps in the state source (issue 12, item 5) --------------------------------------------


def lost(rule: MachineRule, at: float) -> list[CloudEvent]:
    return rule.on_sample(sample("state", None, at, Quality.BAD))


def running_order(settle: float = 0.0) -> MachineRule:
    rule = MachineRule("1010", packml_machine(), settle=settle)
    rule.start_order(OrderBinding(order_id="4711"), T0)
    rule.on_samples(
        [sample("state", 6, T0 + 1), sample("processed", 0, T0 + 1), sample("defective", 0, T0 + 1)]
    )
    return rule


def test_a_downtime_never_spans_production_counted_across_a_gap() -> None:
    """Held, the connection lost for 35 s, and at reconnect Execute with 202 more units: the
    machine ran in the gap, so the downtime ends where the gap began, flagged uncertain."""
    rule = running_order()
    rule.on_sample(sample("state", 11, T0 + 10))
    lost(rule, T0 + 15)
    events = rule.on_samples([sample("processed", 202, T0 + 50), sample("state", 6, T0 + 50)])
    (downtime,) = of_type(events, "downtime.recorded")
    assert (downtime["started_at"], downtime["ended_at"]) == (
        "2026-11-30T10:00:10Z",
        "2026-11-30T10:00:15Z",
    )
    assert downtime["data_quality"] == "uncertain"
    assert downtime["source_gap"] == {
        "started_at": "2026-11-30T10:00:15Z",
        "ended_at": "2026-11-30T10:00:50Z",
    }
    (resumed,) = of_type(events, "operation.resumed")
    assert resumed["data_quality"] == "uncertain"


def test_without_production_in_the_gap_the_machine_ran_again_when_seen() -> None:
    rule = running_order()
    rule.on_sample(sample("state", 11, T0 + 10))
    lost(rule, T0 + 15)
    events = rule.on_samples([sample("processed", 0, T0 + 50), sample("state", 6, T0 + 50)])
    (downtime,) = of_type(events, "downtime.recorded")
    assert downtime["ended_at"] == "2026-11-30T10:00:50Z" and downtime["duration_seconds"] == 40


def test_a_stop_first_seen_after_a_gap_starts_at_the_device_timestamp_or_the_gap() -> None:
    """Held first seen at reconnect: OPC UA reads the time the value changed (inside the gap),
    and that is when the stop began; a Modbus read has no such time: with no production in
    the gap, the stop began where the gap did."""
    opcua = running_order()
    lost(opcua, T0 + 10)
    opcua.on_tick(T0 + 45)
    events = opcua.on_samples([sample("state", 11, T0 + 20)])  # changed at T0+20, read now
    (interrupted,) = of_type(events, "operation.interrupted")
    assert interrupted["occurred_at"] == "2026-11-30T10:00:20Z"
    assert interrupted["data_quality"] == "uncertain"

    modbus = running_order()
    lost(modbus, T0 + 10)
    modbus.on_tick(T0 + 45)
    events = modbus.on_samples([sample("processed", 0, T0 + 45), sample("state", 11, T0 + 45)])
    (interrupted,) = of_type(events, "operation.interrupted")
    assert interrupted["occurred_at"] == "2026-11-30T10:00:10Z"
    events = modbus.on_samples([sample("state", 6, T0 + 47)])
    (downtime,) = of_type(events, "downtime.recorded")
    assert downtime["duration_seconds"] == 37 and downtime["data_quality"] == "uncertain"


def test_down_on_both_sides_of_a_gap_with_production_in_it_is_two_downtimes() -> None:
    rule = running_order()
    rule.on_sample(sample("state", 11, T0 + 10))
    lost(rule, T0 + 20)
    events = rule.on_samples([sample("processed", 30, T0 + 60), sample("state", 11, T0 + 60)])
    assert [e.type for e in events] == [
        "downtime.recorded",
        "operation.resumed",
        "operation.interrupted",
    ]
    events = rule.on_sample(sample("state", 6, T0 + 70))
    (second,) = of_type(events, "downtime.recorded")
    assert (second["started_at"], second["ended_at"]) == (
        "2026-11-30T10:01:00Z",
        "2026-11-30T10:01:10Z",
    )
    assert second["data_quality"] == "uncertain"


def test_the_gateway_down_is_a_gap_too() -> None:
    rule = running_order()
    rule.on_sample(sample("state", 11, T0 + 10))
    saved = rule.dump_state()
    again = MachineRule("1010", packml_machine(), saved)
    events = again.on_samples([sample("processed", 0, T0 + 90), sample("state", 6, T0 + 90)])
    (downtime,) = of_type(events, "downtime.recorded")
    assert downtime["data_quality"] == "uncertain"
    assert downtime["source_gap"]["started_at"] == "2026-11-30T10:00:10Z"


def test_a_state_that_reads_nan_is_a_gap_not_a_state() -> None:
    rule = running_order()
    assert rule.on_sample(sample("state", math.nan, T0 + 5)) == []
    assert rule.state.gap_since == T0 + 5 and rule.state.machine_state == "Execute"


# -- MES order events --------------------------------------------------------------------


def test_a_redelivered_order_end_is_no_problem() -> None:
    """The end's commit made it but its acknowledgement did not: MES sends it again."""
    rule = running_order()
    events, problem = rule.end_order("4711", "0010", T0 + 10)
    assert problem is None and of_type(events, "operation.completed")
    assert rule.end_order("4711", "0010", T0 + 11) == ([], None)
    assert rule.end_order("4712", None, T0 + 12)[1] is not None


# -- limits (issue 12, items 6 and 8) ------------------------------------------------------


def limited(order: bool = False) -> MachineRule:
    return MachineRule(
        "1010",
        machine(
            order=order,
            limits=[
                {"signal": "plc.force", "low": 12.0, "high": 15.0, "for": "5s", "hysteresis": 0.2}
            ],
        ),
    )


def force(value: float | None, at: float, quality: Quality = Quality.GOOD) -> Sample:
    return Sample("plc", "force", value, at, quality)


def test_a_breach_open_when_an_order_binds_raises_for_that_order() -> None:
    rule = limited()
    rule.on_sample(force(16.0, T0))
    assert rule.on_tick(T0 + 6) == []  # no order: counted, kept open
    assert rule.state.unassigned_excursions == 1
    assert rule.on_tick(T0 + 7) == []  # counted once
    events = rule.start_order(OrderBinding(order_id="4711", lot_id="LOT-1"), T0 + 10)
    (request,) = of_type(events, "inspection.requested")
    assert request["order_id"] == "4711" and request["measured_value"]["value"] == "16"
    assert rule.on_tick(T0 + 11) == []  # once per order
    events = rule.start_order(OrderBinding(order_id="4712"), T0 + 20)
    assert of_type(events, "inspection.requested")[0]["order_id"] == "4712"


def test_a_breach_that_ended_before_any_order_raises_nothing() -> None:
    rule = limited()
    rule.on_sample(force(16.0, T0))
    rule.on_tick(T0 + 6)
    rule.on_sample(force(13.0, T0 + 8))
    assert rule.start_order(OrderBinding(order_id="4711"), T0 + 10) == []


@pytest.mark.parametrize("unreadable", [math.nan, math.inf, -math.inf, 1e300, None])
def test_a_value_that_is_not_a_number_is_no_breach_and_no_recovery(
    unreadable: float | None, caplog: pytest.LogCaptureFixture
) -> None:
    rule = limited(order=True)
    quality = Quality.BAD if unreadable is None else Quality.GOOD
    # Not a breach: no excursion starts, however long it lasts.
    for second in range(10):
        assert rule.on_sample(force(unreadable, T0 + second, quality)) == []
    assert rule.on_tick(T0 + 20) == [] and rule.state.excursions == {}
    # Not a recovery: an excursion stays open, but does not run out on a value nobody knows.
    rule.on_sample(force(16.0, T0 + 30))
    rule.on_sample(force(unreadable, T0 + 31, quality))
    assert rule.on_tick(T0 + 40) == [] and "0" in rule.state.excursions
    (request,) = of_type(rule.on_sample(force(15.5, T0 + 41)), "inspection.requested")
    assert request["measured_value"]["value"] == "16"
    if unreadable is not None:  # said once per spell, not per reading
        said = [
            r
            for r in caplog.records
            if "plc.force" in r.getMessage() and r.levelno == logging.WARNING
        ]
        assert len(said) == 2


# -- the confirmations add up, whatever happens (issue 18, item 5) -------------------------


def business(events: list[CloudEvent]) -> list[tuple[str, str, dict[str, Any]]]:
    """What ERP books: the id, the sequence and every field but the time. A state change first
    seen after a restart is dated with the gap in mind (the gateway did not see when it came),
    so a completion derived again may carry an earlier time, under the same id."""
    return [
        (e.id, e.sequence, {k: v for k, v in e.data.items() if k != "occurred_at"})
        for e in events
        if e.type in ("production.confirmation", "operation.completed")
    ]


class Shift:
    """A rule run the way the pipeline runs it, with commits that can be lost.

    A step's outcome is `ok`; `lost` (a power cut before its commit: its events and state are
    gone, the gateway starts again from the last commit, and the input comes again: MES
    redelivers, the device still shows its count, the clock still says the time); or
    `unacked` (the commit made it, the acknowledgement did not: the same input comes again
    after the restart and must derive nothing new)."""

    def __init__(self, config: MachineConfig, settle: float = 0.0) -> None:
        self.config = config
        self.settle = settle
        self.rule = MachineRule("1010", config, settle=settle)
        self.saved = ""
        self.committed: list[CloudEvent] = []
        self.problem: str | None = None
        """Why the last MES message applied does not fit (it would be an input dead letter)."""

    def commit(self, produced: list[CloudEvent]) -> None:
        rule = self.rule
        # The pipeline commits a rule's state with its events, when it must be saved, and
        # (with whatever commits, at the latest at each tick: a step is a second) when a
        # counter moved.
        if produced or rule.needs_save or rule.dirty:
            known = {e.id for e in self.committed}
            self.committed.extend(e for e in produced if e.id not in known)  # the outbox
            self.saved = rule.dump_state()

    def step(self, apply: Any, outcome: str) -> None:
        before = self.saved
        produced = apply(self.rule)
        if outcome == "lost":
            self.rule = MachineRule("1010", self.config, before, settle=self.settle)
            again = apply(self.rule)
            # What is derived again is what was lost: what ERP books, the machine's states
            # (flagged uncertain: the gateway did not see the machine meanwhile).
            assert business(again) == business(produced)
            assert [e.type for e in again] == [e.type for e in produced]
            produced = again
        self.commit(produced)
        if outcome == "unacked":
            self.rule = MachineRule("1010", self.config, self.saved, settle=self.settle)
            ids = {e.id for e in self.committed}
            fitted = self.problem is None
            again = apply(self.rule)
            assert {e.id for e in again} <= ids, "a redelivered input derived something new"
            assert self.problem is None or not fitted, (
                f"a redelivered MES message became a dead letter: {self.problem}"
            )
            self.commit(again)


outcomes = st.sampled_from(["ok", "ok", "ok", "lost", "unacked"])
readings = st.lists(
    st.tuples(
        st.one_of(
            st.tuples(st.just("step"), st.integers(0, 40)),
            st.tuples(st.just("reset"), st.integers(0, 5)),
            st.tuples(st.just("tick"), st.integers(0, 120)),
        ),
        outcomes,
    ),
    max_size=80,
)


@settings(max_examples=int(os.environ.get("PLANTSYNC_RULE_EXAMPLES", "300")), deadline=None)
@given(readings, st.integers(1, 30), st.integers(65400, 65535))
def test_confirmations_add_up_to_the_counter_advance(
    steps: list[tuple[tuple[str, int], str]], every_units: int, start: int
) -> None:
    """Random 16-bit counter histories that roll over, reset, and see commits lost and
    acknowledgements lost: the committed confirmations tile the counter's real advance
    exactly, and no id repeats."""
    shift = Shift(machine(every_units=every_units, every="60s", width=16))
    raw, now, advance = start, 0.0, 0
    shift.step(lambda rule: rule.on_sample(good(raw, now)), "ok")
    for (kind, amount), outcome in steps:
        now += 1.0
        if kind == "tick":
            now += amount
            at = now
            shift.step(lambda rule: rule.on_tick(at), outcome)  # noqa: B023
            continue
        # A reset only where it is unambiguous (a drop that cannot be a rollover); else
        # counting on, rolling over at 16 bits.
        raw = amount if kind == "reset" and raw < 32768 and amount < raw else (raw + amount) % 65536
        advance += amount
        reading = good(raw, now)
        shift.step(lambda rule: rule.on_sample(reading), outcome)  # noqa: B023
    shift.step(lambda rule: rule.on_tick(now + 61), "ok")
    ids = [e.id for e in shift.committed]
    assert len(ids) == len(set(ids))
    position = 0
    for event in shift.committed:
        assert event.data["counter_from"] == position
        position = event.data["counter_to"]
    assert shift.rule.state.good.total == advance
    assert shift.rule.state.good.pending == 0
    assert yields(shift.committed) == position == advance


def full_machine(every_units: int) -> MachineConfig:
    return MachineConfig.model_validate(
        {
            "id": "press-01",
            "signals": {"good": "plc.good", "state": "plc.state"},
            "state_map": {4: "Idle", 6: "Execute", 10: "Holding", 11: "Held", 17: "Complete"},
            "confirm": {"every_units": every_units, "every": "60s", "on_state_change": True},
            "counter_width": 16,
        }
    )


shift_steps = st.lists(
    st.tuples(
        st.one_of(
            st.tuples(st.just("count"), st.integers(0, 40)),
            st.tuples(st.just("reset"), st.integers(0, 5)),
            st.tuples(st.just("state"), st.sampled_from([4, 6, 10, 11, 17, 99])),
            st.tuples(st.just("lost"), st.just(0)),
            st.tuples(st.just("start"), st.sampled_from(["A", "B", "C"])),
            st.tuples(st.just("end"), st.sampled_from(["A", "B", "C"])),
            st.tuples(st.just("tick"), st.integers(0, 120)),
        ),
        outcomes,
    ),
    max_size=100,
)


@settings(max_examples=int(os.environ.get("PLANTSYNC_RULE_EXAMPLES", "300")), deadline=None)
@given(shift_steps, st.integers(1, 30), st.sampled_from([0.0, 1.5]))
def test_orders_states_and_crashes_never_lose_or_double_count(
    steps: list[tuple[tuple[str, object], str]], every_units: int, settle: float
) -> None:
    """Random shifts: counts, resets, rollovers, state changes, MES order starts and ends,
    the state source lost now and then, state changes that wait for the counters (or not),
    lost commits and lost acknowledgements. Committed confirmations plus unassigned units
    always equal the counter's real advance; counter ranges never overlap; ids never repeat;
    an order's completion carries the sum of its confirmations; a redelivered MES message is
    no problem; every event passes its model (times in order)."""
    shift = Shift(full_machine(every_units), settle)
    raw, now, advance = 65500, 0.0, 0
    shift.step(lambda rule: rule.on_sample(good(raw, now)), "ok")
    for (kind, value), outcome in steps:
        now += 1.0
        at = now
        if kind == "tick":
            now += float(value)  # type: ignore[arg-type]
            at = now
            shift.step(lambda rule: rule.on_tick(at), outcome)  # noqa: B023
        elif kind == "state":
            reading = Sample("plc", "state", value, at)  # type: ignore[arg-type]
            shift.step(lambda rule: rule.on_sample(reading), outcome)  # noqa: B023
        elif kind == "lost":
            reading = Sample("plc", "state", None, at, Quality.BAD)
            shift.step(lambda rule: rule.on_sample(reading), outcome)  # noqa: B023
        elif kind == "start":
            order = OrderBinding(order_id=str(value))
            shift.step(lambda rule: rule.start_order(order, at), outcome)  # noqa: B023
        elif kind == "end":
            order_id = str(value)

            def end(rule: MachineRule) -> list[CloudEvent]:
                bound = rule.state.binding
                events, shift.problem = rule.end_order(order_id, None, at)  # noqa: B023
                if bound is not None and bound.order_id == order_id:  # noqa: B023
                    assert shift.problem is None
                return events

            shift.step(end, outcome)
        else:
            amount = int(value)  # type: ignore[call-overload]
            if kind == "reset" and raw < 32768 and amount < raw:
                raw = amount
            else:
                raw = (raw + amount) % 65536
            advance += amount
            reading = good(raw, at)
            shift.step(lambda rule: rule.on_sample(reading), outcome)  # noqa: B023
    shift.step(lambda rule: rule.on_sample(good(raw, now + 1)), "ok")
    ids = [e.id for e in shift.committed]
    assert len(ids) == len(set(ids))
    confirmations = [e for e in shift.committed if e.type == "production.confirmation"]
    end = 0
    for event in confirmations:
        assert event.data["counter_from"] >= end  # ranges never overlap, always move on
        end = event.data["counter_to"]
    state = shift.rule.state
    assert state.good.total == advance
    assert yields(confirmations) + state.unassigned + state.good.pending == advance
    confirmed: dict[str, int] = {}
    for event in shift.committed:  # in commit order: an order's completion carries its sum
        order_id = event.data["order_id"]
        if event.type == "production.confirmation":
            confirmed[order_id] = confirmed.get(order_id, 0) + yields([event])
        elif event.type == "operation.completed":
            assert int(event.data["yield_quantity"]["value"]) == confirmed.pop(order_id, 0)


def test_a_stop_reason_in_the_same_poll_explains_the_state_change() -> None:
    config = MachineConfig.model_validate(
        {
            "id": "press-01",
            "signals": {"good": "plc.good", "state": "plc.state", "stop_reason": "plc.reason"},
            "state_map": {6: "Execute", 11: "Held"},
            "stop_reasons": {3: "Jam"},
        }
    )
    rule = MachineRule("1010", config)
    rule.start_order(OrderBinding(order_id="4711"), 1.0)
    rule.on_samples([Sample("plc", "state", 6, 2.0)])
    rule.on_samples([Sample("plc", "state", 6, 3.0)])
    # The device sent the state before the reason (OPC UA orders by first change).
    events = rule.on_samples([Sample("plc", "state", 11, 4.0), Sample("plc", "reason", 3, 4.0)])
    (interrupted,) = [e for e in events if e.type == "operation.interrupted"]
    assert interrupted.data["reason_code"] == "3" and interrupted.data["reason_text"] == "Jam"
