"""Tests of the canonical model: event ids, the CloudEvent envelope, quantities, the versioned
data models, priorities and the exported JSON Schemas."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from edge.model.codes import BUILTIN_UOM_CODES, UOM_CODES_CONTEXT_KEY
from edge.model.envelope import (
    CLOUDEVENT_VERSION,
    CloudEvent,
    build_event,
    event_type_of,
    validate_event_data,
)
from edge.model.event_data import EventData
from edge.model.events import (
    EVENT_MODELS,
    DowntimeRecorded,
    InputLot,
    InspectionRequested,
    InspectionResult,
    LotDisposition,
    LotProduced,
    MaterialConsumed,
    NonconformanceRaised,
    OperationCompleted,
    OperationInterrupted,
    OperationResumed,
    OperationStarted,
    ProductionConfirmation,
    priority_of,
)
from edge.model.ids import (
    EVENT_ID_NAMESPACE,
    EventType,
    event_id,
    format_sequence,
    source_key,
    state_key,
)
from edge.model.order_events import (
    OrderCancelled,
    OrderChanged,
    OrderComponent,
    OrderOperation,
    OrderReleased,
)
from edge.model.quantities import Quantity, SignedQuantity
from edge.model.schemas import json_schemas, write_schemas

AT = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)
ORDER = "000001000123"


def pieces(value: int | str) -> Quantity:
    return Quantity.of(value, "H87")


def confirmation(**overrides: Any) -> ProductionConfirmation:
    fields: dict[str, Any] = {
        "site": "1010",
        "machine_id": "press-01",
        "work_center": "LINE-A",
        "order_id": ORDER,
        "operation": "0010",
        "material": "FG-4711",
        "yield_quantity": pieces(100),
        "scrap_quantity": pieces(2),
        "counter_from": 0,
        "counter_to": 102,
        "is_final": False,
        "trigger": "units",
        "occurred_at": AT,
    }
    fields.update(overrides)
    return ProductionConfirmation(**fields)


def sample_data() -> dict[str, EventData]:
    """One valid instance of every event type, as a rule or the MES adapter would build it."""
    on_press = {"site": "1010", "machine_id": "press-01", "order_id": ORDER, "operation": "0010"}
    force = SignedQuantity.of("15.8", "NEW")
    samples: list[EventData] = [
        OperationStarted(**on_press, occurred_at=AT, planned_quantity=pieces(1000)),
        OperationInterrupted(
            **on_press, occurred_at=AT, machine_state="Held", reason_code="MAT-SHORT"
        ),
        OperationResumed(**on_press, occurred_at=AT, interrupted_at=AT - timedelta(minutes=5)),
        OperationCompleted(
            **on_press,
            occurred_at=AT,
            started_at=AT - timedelta(hours=2),
            yield_quantity=pieces(998),
            scrap_quantity=pieces(4),
        ),
        confirmation(),
        MaterialConsumed(
            site="1010",
            order_id=ORDER,
            material="RM-100",
            lot_id="L24-0001",
            quantity=Quantity.of("12.500", "KGM"),
            occurred_at=AT,
        ),
        LotProduced(
            site="1010",
            order_id=ORDER,
            material="FG-4711",
            lot_id="L24-0815",
            quantity=pieces(998),
            input_lots=(
                InputLot(lot_id="L24-0001", material="RM-100", quantity=Quantity.of("12.5", "KGM")),
            ),
            occurred_at=AT,
        ),
        DowntimeRecorded(
            site="1010",
            machine_id="press-01",
            started_at=AT - timedelta(minutes=7, milliseconds=250),
            ended_at=AT,
            duration_seconds=420.25,
            category="unplanned",
            occurred_at=AT,
        ),
        InspectionRequested(
            **on_press,
            lot_id="L24-0815",
            trigger="limit_violation",
            characteristic="press-01.force",
            measured_value=force,
            lower_limit=SignedQuantity.of("12.0", "NEW"),
            upper_limit=SignedQuantity.of("15.0", "NEW"),
            occurred_at=AT,
        ),
        InspectionResult(
            site="1010",
            lot_id="L24-0815",
            inspection_id="890000000042",
            characteristic="surface temperature",
            measured_value=SignedQuantity.of("-18.5", "CEL"),
            upper_limit=SignedQuantity.of("-15", "CEL"),
            result="pass",
            occurred_at=AT,
        ),
        NonconformanceRaised(
            site="1010",
            order_id=ORDER,
            defect_code="SCRATCH",
            severity="minor",
            affected_quantity=pieces(3),
            occurred_at=AT,
        ),
        LotDisposition(
            site="1010",
            lot_id="L24-0815",
            disposition="hold",
            disposition_source="qms",
            reason_text="Press force above limit",
            occurred_at=AT,
        ),
    ]
    order = {
        "site": "1010",
        "order_id": ORDER,
        "material": "FG-4711",
        "quantity": pieces(1000),
        "bom_version": "0001",
        "planned_lot": "L24-0815",
        "operations": (
            OrderOperation(operation="0010", work_center="PRESS"),
            OrderOperation(operation="0020", work_center="PACK"),
        ),
        "components": (
            OrderComponent(
                material="RM-100", quantity=Quantity.of("12.5", "KGM"), operation="0010"
            ),
        ),
        "erp_changed_at": AT,
        "occurred_at": AT,
    }
    samples += [
        OrderReleased(**order, status="released", version=1),
        OrderChanged(**order, status="locked", version=2),
        OrderCancelled(**order, status="technically_completed", version=3),
    ]
    return {sample.EVENT_TYPE: sample for sample in samples}


SAMPLES = sample_data()


def wrap(data: EventData, *, sequence: int = 7, subject: str | None = "lot/L24-0815") -> CloudEvent:
    return build_event(
        data,
        natural_key=[data.site, data.EVENT_TYPE, "k-1"],
        subject=subject,
        partitionkey=f"order/{ORDER}",
        sequence=sequence,
    )


# ---------------------------------------------------------------------------- registry


def test_event_type_literal_and_registry_agree() -> None:
    assert set(get_args(EventType)) == set(EVENT_MODELS)
    assert set(SAMPLES) == set(EVENT_MODELS)
    for event_type, model in EVENT_MODELS.items():
        assert event_type == model.EVENT_TYPE
        assert DATA_MODEL_VERSIONS[event_type] == model.VERSION


DATA_MODEL_VERSIONS = {
    "operation.started": 1,
    "operation.interrupted": 2,
    "operation.resumed": 2,
    "operation.completed": 1,
    "production.confirmation": 1,
    "material.consumed": 1,
    "lot.produced": 1,
    "downtime.recorded": 2,
    "inspection.requested": 1,
    "inspection.result": 1,
    "nonconformance.raised": 1,
    "lot.disposition": 1,
    "order.released": 1,
    "order.changed": 1,
    "order.cancelled": 1,
}
"""Pinned: a change to a data model must bump its version (v2: data_quality, source_gap)."""


def test_registry_is_immutable() -> None:
    with pytest.raises(TypeError):
        EVENT_MODELS["operation.started"] = OperationStarted  # type: ignore[index]


@pytest.mark.parametrize("event_type", sorted(EVENT_MODELS))
def test_every_field_is_documented(event_type: str) -> None:
    model = EVENT_MODELS[event_type]
    assert model.__doc__
    undocumented = [name for name, field in model.model_fields.items() if not field.description]
    assert undocumented == []


def test_shared_field_definitions_keep_their_own_requiredness() -> None:
    assert not EventData.model_fields["machine_id"].is_required()
    assert ProductionConfirmation.model_fields["machine_id"].is_required()
    assert not LotDisposition.model_fields["machine_id"].is_required()
    assert LotDisposition.model_fields["lot_id"].is_required()
    assert not InspectionResult.model_fields["lot_id"].is_required()


def test_priorities() -> None:
    expected = {
        "inspection.requested": 0,
        "inspection.result": 0,
        "nonconformance.raised": 0,
        "lot.disposition": 0,
        "production.confirmation": 1,
        "material.consumed": 1,
        "lot.produced": 1,
        "operation.completed": 1,
        "operation.started": 2,
        "operation.interrupted": 2,
        "operation.resumed": 2,
        "downtime.recorded": 2,
        "order.released": 1,
        "order.changed": 1,
        "order.cancelled": 1,
    }
    assert {event_type: priority_of(event_type) for event_type in EVENT_MODELS} == expected
    assert all(type(priority_of(event_type)) is int for event_type in EVENT_MODELS)
    with pytest.raises(ValueError, match="unknown event type"):
        priority_of("production.confirmed")


# ---------------------------------------------------------------------------- event ids


def test_event_id_is_stable_and_keyed() -> None:
    key = ("1010", "press-01", ORDER, "0010", 0, 102)
    first = event_id("production.confirmation", *key)
    assert first == event_id("production.confirmation", *key)
    # Golden value: changing the namespace or the name format would re-send every event.
    assert first == "b9de84d4-ac8f-5098-b8b8-52cc0af4f28f"
    assert uuid.UUID(first).version == 5
    assert first != event_id("production.confirmation", "1010", "press-01", ORDER, "0010", 0, 103)
    assert first != event_id("operation.completed", *key)


def test_event_id_namespace_is_derived_as_documented() -> None:
    assert uuid.uuid5(uuid.NAMESPACE_URL, "urn:plantsync:event-id") == EVENT_ID_NAMESPACE
    expected = uuid.uuid5(EVENT_ID_NAMESPACE, "lot.produced|1010|L24-0815")
    assert event_id("lot.produced", "1010", "L24-0815") == str(expected)


def test_event_id_renders_ints_as_text() -> None:
    assert event_id("lot.produced", "1010", 42) == event_id("lot.produced", "1010", "42")


def test_event_id_separators_inside_parts_do_not_collide() -> None:
    assert event_id("lot.produced", "a|b", "c") != event_id("lot.produced", "a", "b|c")
    assert event_id("lot.produced", "a\\", "b") != event_id("lot.produced", "a", "\\b")
    assert event_id("lot.produced", "a", "") != event_id("lot.produced", "a")


def test_event_id_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown event type"):
        event_id("lot.made", "1010")
    with pytest.raises(ValueError, match="natural key"):
        event_id("lot.produced")
    with pytest.raises(TypeError):
        event_id("lot.produced", True)
    with pytest.raises(TypeError):
        event_id("lot.produced", 1.5)  # type: ignore[arg-type]


key_parts = st.lists(st.one_of(st.text(max_size=12), st.integers()), min_size=1, max_size=6)


@given(
    event_type=st.sampled_from(sorted(EVENT_MODELS)),
    first=key_parts,
    second=key_parts,
)
def test_event_id_is_deterministic_and_distinct(
    event_type: str, first: list[str | int], second: list[str | int]
) -> None:
    # The oracle is the documented derivation, written out here: UUIDv5 under the stored
    # namespace over "type|part|part", with "\\" and "|" inside a part escaped by a backslash.
    assert event_id(event_type, *first) == by_hand(event_type, *first)
    same_key = [str(part) for part in first] == [str(part) for part in second]
    assert (event_id(event_type, *first) == event_id(event_type, *second)) == same_key


STORED_NAMESPACE = uuid.UUID("2c271f3e-a0d6-5b13-92ec-d92edb3e29dd")
"""The namespace every id ever sent was derived under, as stored in ERP: never derived from the
code under test."""


def by_hand(event_type: str, *parts: str | int) -> str:
    escaped = [re.sub(r"([\\|])", r"\\\1", str(part)) for part in parts]
    return str(uuid.uuid5(STORED_NAMESPACE, "|".join([event_type, *escaped])))


def test_state_keys_carry_the_epoch_and_source_keys_do_not() -> None:
    # A state key: what the rules derive from counters and bindings. Stored ids, derived by
    # hand: the same counter range in another outbox (another epoch) is another event.
    key = state_key(
        "9f86d081884c7d65",
        "1010",
        "press-01",
        ORDER,
        "0010",
        0,
        "confirmation",
        0,
        20,
        0,
        0,
        "partial",
    )
    assert event_id("production.confirmation", *key) == by_hand(
        "production.confirmation",
        "epoch",
        "9f86d081884c7d65",
        "1010",
        "press-01",
        ORDER,
        "0010",
        0,
        "confirmation",
        0,
        20,
        0,
        0,
        "partial",
    )
    assert event_id("production.confirmation", *key) == "43d240fb-ee90-5c23-a290-5fe78e7afdd2"
    other = state_key(
        "0b7f1ad0e9e2c4d6",
        "1010",
        "press-01",
        ORDER,
        "0010",
        0,
        "confirmation",
        0,
        20,
        0,
        0,
        "partial",
    )
    assert event_id("production.confirmation", *other) != event_id("production.confirmation", *key)
    with pytest.raises(ValueError, match="epoch"):
        state_key("", "1010", "press-01")
    # A source key: the MES message id alone names the event, in any outbox.
    assert source_key("1010", "material.consumed", "m-1") == ("1010", "material.consumed", "m-1")
    assert event_id(
        "material.consumed", *source_key("1010", "material.consumed", "m-1")
    ) == by_hand("material.consumed", "1010", "material.consumed", "m-1")


# ---------------------------------------------------------------------------- envelope


@pytest.mark.parametrize("event_type", sorted(EVENT_MODELS))
def test_every_type_round_trips(event_type: str) -> None:
    data = SAMPLES[event_type]
    event = wrap(data)
    raw = event.to_json()
    parsed = CloudEvent.from_json(raw)
    assert parsed == event
    assert parsed.to_json() == raw
    assert validate_event_data(parsed) == data
    assert type(validate_event_data(parsed)) is type(data)


def test_build_event_fills_the_envelope() -> None:
    data = confirmation(
        occurred_at=datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone(timedelta(hours=2)))
    )
    key: list[str | int] = ["1010", "press-01", ORDER, "0010", 0, 102]
    event = build_event(
        data,
        natural_key=key,
        subject=f"order/{ORDER}/0010",
        partitionkey=f"order/{ORDER}",
        sequence=42,
    )
    assert event.specversion == "1.0"
    assert event.id == event_id("production.confirmation", *key)
    assert event.type == "production.confirmation"
    assert event.source == "urn:plantsync:1010:press-01"
    assert event.dataschema == "urn:plantsync:schema:production.confirmation:1"
    assert event.datacontenttype == "application/json"
    assert event.time == AT
    assert event.sequence == "00000000000000000042"
    assert event.data["yield_quantity"] == {"uom": "H87", "value": "100"}

    document = json.loads(event.to_json())
    assert document["time"] == "2024-05-01T10:00:00Z"
    assert document["data"]["occurred_at"] == "2024-05-01T10:00:00Z"
    assert document["sequence"] == "00000000000000000042"
    assert list(document)[:4] == ["specversion", "id", "source", "type"]
    assert list(document)[-1] == "data"
    assert list(document["data"]) == sorted(document["data"])
    assert b" " not in event.to_json()


def test_build_event_source_for_site_level_events_and_override() -> None:
    disposition = SAMPLES["lot.disposition"]
    assert wrap(disposition).source == "urn:plantsync:1010:site"
    custom = build_event(
        disposition,
        natural_key=["x"],
        subject=None,
        partitionkey="lot/L24-0815",
        sequence=0,
        source="urn:plantsync:1010:qms",
    )
    assert custom.source == "urn:plantsync:1010:qms"


STORED_CONFIRMATION = (
    b'{"specversion":"1.0","id":"cbc4350b-9ee1-52dc-81d9-1cd6c01f0d7f",'
    b'"source":"urn:plantsync:1010:press-01",'
    b'"type":"com.plantsync.edge.production.confirmation.v1",'
    b'"time":"2024-05-01T10:00:00Z","subject":"lot/L24-0815",'
    b'"datacontenttype":"application/json",'
    b'"dataschema":"urn:plantsync:schema:production.confirmation:1",'
    b'"partitionkey":"order/000001000123","sequence":"00000000000000000007",'
    b'"data":{"counter_from":0,"counter_to":102,"is_final":false,"lot_id":null,'
    b'"machine_id":"press-01","material":"FG-4711","occurred_at":"2024-05-01T10:00:00Z",'
    b'"operation":"0010","order_id":"000001000123",'
    b'"scrap_quantity":{"uom":"H87","value":"2"},"site":"1010","trigger":"units",'
    b'"work_center":"LINE-A","yield_quantity":{"uom":"H87","value":"100"}}}'
)
"""The bytes of `wrap(confirmation())` as an earlier process wrote them to the outbox and ERP
holds them: a crash and a rebuild in a new process must give exactly these, not only the same
bytes twice in one process (which a clock or a random number in the id would also give)."""


def test_rebuilding_after_a_crash_gives_the_same_bytes() -> None:
    assert wrap(confirmation()).to_json() == STORED_CONFIRMATION
    assert json.loads(STORED_CONFIRMATION)["id"] == by_hand(
        "production.confirmation", "1010", "production.confirmation", "k-1"
    )


def test_time_keeps_microseconds_and_always_says_z() -> None:
    moment = datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=timezone(timedelta(hours=-5)))
    event = wrap(confirmation(occurred_at=moment))
    document = json.loads(event.to_json())
    assert document["time"] == "2024-05-01T15:00:00.123456Z"
    assert CloudEvent.from_json(event.to_json()).time == moment


def test_absent_subject_is_left_out() -> None:
    event = wrap(confirmation(), subject=None)
    assert "subject" not in json.loads(event.to_json())
    assert CloudEvent.from_json(event.to_json()).subject is None


def test_sequence_is_zero_padded_and_bounded() -> None:
    assert format_sequence(0) == "0" * 20
    assert format_sequence(2**64 - 1) == "18446744073709551615"
    assert format_sequence(9) < format_sequence(10)
    with pytest.raises(ValueError):
        format_sequence(-1)
    with pytest.raises(ValueError):
        format_sequence(10**20)
    with pytest.raises(TypeError):
        format_sequence(True)
    event = wrap(confirmation())
    with pytest.raises(ValidationError):
        CloudEvent.model_validate(event.model_dump() | {"sequence": "42"})


def test_natural_key_must_be_parts_not_one_string() -> None:
    with pytest.raises(TypeError):
        build_event(confirmation(), natural_key="1010", subject=None, partitionkey="p", sequence=1)


def test_data_is_canonical_json() -> None:
    event = wrap(confirmation())
    shuffled = dict(reversed(list(event.data.items())))
    rebuilt = CloudEvent.model_validate(event.model_dump() | {"data": shuffled})
    assert rebuilt.to_json() == event.to_json()
    for bad in ({"x": float("nan")}, {"x": Decimal("1")}, {"x": {1: "a"}}):
        with pytest.raises(ValidationError):
            CloudEvent.model_validate(event.model_dump() | {"data": bad})


def test_envelope_refuses_what_the_spec_does_not_allow() -> None:
    document = json.loads(wrap(confirmation()).to_json())
    for field, value in [
        ("specversion", "0.3"),
        ("type", "production.confirmed"),
        ("time", "2024-05-01T10:00:00"),
        ("source", "has spaces"),
        ("datacontenttype", "text/plain"),
        ("id", ""),
    ]:
        with pytest.raises(ValidationError):
            CloudEvent.from_json(json.dumps(document | {field: value}))
    with pytest.raises(ValidationError):
        CloudEvent.from_json(json.dumps(document | {"unknownattr": "x"}))


def test_validate_event_data_catches_bad_data() -> None:
    document = json.loads(wrap(confirmation()).to_json())
    document["data"]["scrap_quantity"]["value"] = "-1"
    with pytest.raises(ValidationError):
        validate_event_data(CloudEvent.model_validate(document))


def test_validate_event_data_checks_schema_version_and_time() -> None:
    event = wrap(confirmation())
    other_version = CloudEvent.model_validate(
        event.model_dump() | {"dataschema": "urn:plantsync:schema:production.confirmation:2"}
    )
    with pytest.raises(ValueError, match="dataschema"):
        validate_event_data(other_version)
    moved = CloudEvent.model_validate(event.model_dump() | {"time": AT + timedelta(seconds=1)})
    with pytest.raises(ValueError, match="occurred_at"):
        validate_event_data(moved)


def test_validate_event_data_allows_configured_units() -> None:
    data = confirmation(
        yield_quantity=Quantity.of(5, "XCR", uom_codes={"XCR"}),
        scrap_quantity=Quantity.of(0, "XCR", uom_codes={"XCR"}),
    )
    event = wrap(data)
    with pytest.raises(ValidationError, match="XCR"):
        validate_event_data(event)
    assert validate_event_data(event, uom_codes=frozenset({"XCR"})) == data


# ---------------------------------------------------------------------------- quantities


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (100, "100"),
        (Decimal("100"), "100"),
        ("100", "100"),
        ("1.50", "1.50"),
        (Decimal("1E+2"), "100"),
        ("1e3", "1000"),
        (Decimal("1.5E-7"), "0.00000015"),
        ("+7", "7"),
        ("007.10", "7.10"),
        (".5", "0.5"),
        (" 12.5 ", "12.5"),
        ("-0", "0"),
        ("-0.00", "0.00"),
        (Decimal("0E+9"), "0"),
        (0, "0"),
    ],
)
def test_quantity_value_is_normalised(raw: Decimal | int | str, expected: str) -> None:
    quantity = Quantity.of(raw, "KGM")
    assert quantity.value == expected
    assert quantity.as_decimal() == Decimal(expected)


@pytest.mark.parametrize(
    "raw",
    [
        float("nan"),
        "NaN",
        Decimal("NaN"),
        Decimal("sNaN"),
        "Infinity",
        Decimal("-Infinity"),
        -1,
        "-0.5",
        Decimal("-3"),
        True,
        "",
        "abc",
        "1_000",
        "1,5",
        "--1",
        "0x10",
        None,
        [1],
        "1" * 29,
        "1E+40",
        "0.0000000000000000001",
    ],
)
def test_quantity_value_rejects(raw: Any) -> None:
    with pytest.raises(ValidationError):
        Quantity.model_validate({"value": raw, "uom": "KGM"})


@pytest.mark.parametrize("raw", [0.1, 1.0, 100.0, 0.1 + 0.2])
def test_quantity_refuses_floats_even_round_ones(raw: float) -> None:
    with pytest.raises(ValidationError, match="floats are not accepted"):
        Quantity.model_validate({"value": raw, "uom": "KGM"})
    assert Quantity.of(Decimal(str(raw)), "KGM").value == str(Decimal(str(raw)))


def test_quantity_accepts_json_numbers_only_as_integers() -> None:
    assert Quantity.model_validate_json('{"value": 12, "uom": "KGM"}').value == "12"
    with pytest.raises(ValidationError):
        Quantity.model_validate_json('{"value": 12.5, "uom": "KGM"}')


def test_signed_quantity_allows_negatives_only_where_declared() -> None:
    assert SignedQuantity.of("-18.50", "CEL").value == "-18.50"
    assert SignedQuantity.of("-0", "CEL").value == "0"
    with pytest.raises(ValidationError):
        SignedQuantity.of(float("-inf"), "CEL")  # type: ignore[arg-type]
    # A signed quantity is not a Quantity, so a negative one cannot slip into a confirmation.
    with pytest.raises(ValidationError):
        confirmation(scrap_quantity=SignedQuantity.of("-1", "H87"))


@pytest.mark.parametrize("uom", ["XXX", "kilogram", "K", "KG M", "", "ROL"])
def test_quantity_rejects_unknown_units(uom: str) -> None:
    with pytest.raises(ValidationError):
        Quantity.of(1, uom)


def test_quantity_unit_is_upper_cased() -> None:
    assert Quantity.of(1, "kgm").uom == "KGM"


def test_builtin_units_cover_what_plants_use() -> None:
    expected = {
        "C62", "H87", "EA", "KGM", "GRM", "MGM", "TNE", "LTR", "MLT", "MTQ", "MTR", "CMT",
        "MMT", "MTK", "SET", "PR", "XBX", "XCT", "XPK", "XPX", "XRO", "SEC", "MIN", "HUR",
        "DAY", "KWH", "WHR", "CEL", "FAH", "BAR", "PAL", "NEW", "KMT",
    }  # fmt: skip
    assert expected <= BUILTIN_UOM_CODES
    # Rec 21 package codes are no Rec 20 units (Rec 20 carries them with an X in front).
    assert not {"BX", "CT", "CS", "PK", "BG", "BO", "DR", "PF", "RO"} & BUILTIN_UOM_CODES
    assert len(BUILTIN_UOM_CODES) >= 40
    assert isinstance(BUILTIN_UOM_CODES, frozenset)


def test_units_extend_through_the_validation_context() -> None:
    raw = {"value": "3", "uom": "KGS"}
    with pytest.raises(ValidationError):
        Quantity.model_validate(raw)
    assert Quantity.model_validate(raw, context={UOM_CODES_CONTEXT_KEY: {"KGS"}}).uom == "KGS"
    assert Quantity.model_validate(raw, context={UOM_CODES_CONTEXT_KEY: ["kgs"]}).uom == "KGS"
    assert Quantity.model_validate(raw, context={UOM_CODES_CONTEXT_KEY: "KGS"}).uom == "KGS"
    assert Quantity.of(3, "KGS", uom_codes={"KGS"}).uom == "KGS"
    # The context reaches nested quantities, and leaves nothing behind for the next caller.
    nested = confirmation().model_dump(mode="json") | {"yield_quantity": raw, "scrap_quantity": raw}
    context = {UOM_CODES_CONTEXT_KEY: frozenset({"KGS"})}
    extended = ProductionConfirmation.model_validate(nested, context=context)
    assert extended.yield_quantity.uom == "KGS"
    with pytest.raises(ValidationError):
        ProductionConfirmation.model_validate(nested)
    with pytest.raises(ValidationError):
        Quantity.model_validate(raw, context={UOM_CODES_CONTEXT_KEY: {"KGSS"}})


def test_quantities_are_frozen() -> None:
    quantity = pieces(1)
    with pytest.raises(ValidationError):
        quantity.value = "2"
    with pytest.raises(ValidationError):
        Quantity.model_validate({"value": "1", "uom": "H87", "note": "x"})


# ---------------------------------------------------------------------------- data models


def test_confirmation_counter_range_and_units() -> None:
    assert confirmation(counter_from=102, counter_to=102, is_final=True, trigger="order_end")
    with pytest.raises(ValidationError, match="counter_to"):
        confirmation(counter_from=10, counter_to=9)
    with pytest.raises(ValidationError):
        confirmation(counter_from=-1)
    with pytest.raises(ValidationError):
        confirmation(counter_to="102")
    with pytest.raises(ValidationError):
        confirmation(is_final="yes")
    with pytest.raises(ValidationError, match="one unit"):
        confirmation(scrap_quantity=Quantity.of(1, "KGM"))
    with pytest.raises(ValidationError):
        confirmation(trigger="shift_end")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("site", "10 10"),
        ("site", "12345678901"),
        ("operation", "10"),
        ("operation", "00a0"),
        ("machine_id", ""),
        ("order_id", " 123"),
        ("occurred_at", datetime(2024, 5, 1, 10, 0, 0)),
        ("unknown_field", "x"),
    ],
)
def test_confirmation_refuses_bad_identifiers(field: str, value: Any) -> None:
    with pytest.raises(ValidationError):
        confirmation(**{field: value})


def test_models_are_frozen() -> None:
    with pytest.raises(ValidationError):
        confirmation().counter_to = 5


def test_downtime_duration_must_match_its_period() -> None:
    sample = SAMPLES["downtime.recorded"].model_dump()
    with pytest.raises(ValidationError, match="duration_seconds"):
        DowntimeRecorded.model_validate(sample | {"duration_seconds": 400})
    with pytest.raises(ValidationError, match="ended_at"):
        DowntimeRecorded.model_validate(
            sample | {"ended_at": sample["started_at"] - timedelta(seconds=1)}
        )


def test_uncertain_comes_with_its_gap_and_only_then() -> None:
    gap = {"started_at": AT - timedelta(seconds=40), "ended_at": AT - timedelta(seconds=5)}
    for event_type in ("downtime.recorded", "operation.interrupted", "operation.resumed"):
        model = EVENT_MODELS[event_type]
        sample = SAMPLES[event_type].model_dump()
        assert model.model_validate(sample).data_quality == "good"  # type: ignore[attr-defined]
        uncertain = model.model_validate(sample | {"data_quality": "uncertain", "source_gap": gap})
        assert uncertain.model_dump(mode="json")["source_gap"]["started_at"].endswith("Z")
        with pytest.raises(ValidationError, match="source_gap"):
            model.model_validate(sample | {"data_quality": "uncertain"})
        with pytest.raises(ValidationError, match="source_gap"):
            model.model_validate(sample | {"source_gap": gap})
        with pytest.raises(ValidationError, match="ended_at"):
            model.model_validate(
                sample
                | {
                    "data_quality": "uncertain",
                    "source_gap": {"started_at": gap["ended_at"], "ended_at": gap["started_at"]},
                }
            )


def test_quality_events_need_an_order_or_a_lot() -> None:
    sample = SAMPLES["nonconformance.raised"].model_dump()
    with pytest.raises(ValidationError, match="order_id or a lot_id"):
        NonconformanceRaised.model_validate(sample | {"order_id": None})
    assert NonconformanceRaised.model_validate(sample | {"order_id": None, "lot_id": "L1"})


def test_inspection_limits() -> None:
    sample = SAMPLES["inspection.requested"].model_dump()
    with pytest.raises(ValidationError, match="measured_value"):
        InspectionRequested.model_validate(sample | {"measured_value": None})
    with pytest.raises(ValidationError, match="lower_limit"):
        InspectionRequested.model_validate(sample | {"lower_limit": {"value": "16", "uom": "NEW"}})
    with pytest.raises(ValidationError, match="one unit"):
        InspectionRequested.model_validate(sample | {"upper_limit": {"value": "15", "uom": "BAR"}})
    assert InspectionRequested.model_validate(
        sample | {"trigger": "lot_completed", "measured_value": None, "characteristic": None}
    )


def test_operation_times_are_ordered() -> None:
    sample = SAMPLES["operation.resumed"].model_dump()
    with pytest.raises(ValidationError, match="interrupted_at"):
        OperationResumed.model_validate(sample | {"interrupted_at": AT + timedelta(seconds=1)})
    completed = SAMPLES["operation.completed"].model_dump()
    with pytest.raises(ValidationError, match="started_at"):
        OperationCompleted.model_validate(completed | {"started_at": AT + timedelta(seconds=1)})


def test_disposition_values() -> None:
    sample = SAMPLES["lot.disposition"].model_dump()
    for disposition in ("release", "hold", "reject"):
        assert LotDisposition.model_validate(sample | {"disposition": disposition})
    with pytest.raises(ValidationError):
        LotDisposition.model_validate(sample | {"disposition": "released"})
    with pytest.raises(ValidationError):
        LotDisposition.model_validate(sample | {"lot_id": None})


def test_genealogy_survives_the_round_trip() -> None:
    event = wrap(SAMPLES["lot.produced"])
    produced = validate_event_data(CloudEvent.from_json(event.to_json()))
    assert isinstance(produced, LotProduced)
    assert produced.input_lots[0].quantity == Quantity.of("12.5", "KGM")
    consumed = SAMPLES["material.consumed"]
    assert isinstance(consumed, MaterialConsumed)
    assert consumed.quantity.value == "12.500"


# ---------------------------------------------------------------------------- schemas


def test_every_type_has_a_schema_file(tmp_path: Path) -> None:
    written = write_schemas(tmp_path / "schemas")
    names = {path.name for path in written}
    expected = {
        f"{event_type}.v{DATA_MODEL_VERSIONS[event_type]}.json" for event_type in EVENT_MODELS
    } | {"cloudevent.json"}
    assert names == expected
    assert written == sorted(written)
    for path in written:
        text = path.read_text(encoding="utf-8")
        schema = json.loads(text)
        assert isinstance(schema, dict)
        assert schema["properties"]
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert text == json.dumps(schema, indent=2, sort_keys=True) + "\n"
    for model in EVENT_MODELS.values():
        schema = json.loads((tmp_path / "schemas" / model.schema_file_name()).read_text())
        assert schema["$id"] == model.dataschema()
        assert schema["additionalProperties"] is False
        assert set(schema["properties"]) == set(model.model_fields)
        assert {"site", "occurred_at"} <= set(schema["required"])


def test_schemas_describe_the_wire_format() -> None:
    schemas = json_schemas()
    confirmation_schema = schemas["production.confirmation.v1.json"]
    assert {
        "machine_id", "order_id", "operation", "yield_quantity", "scrap_quantity",
        "counter_from", "counter_to", "is_final", "trigger",
    } <= set(confirmation_schema["required"])  # fmt: skip
    quantity = confirmation_schema["$defs"]["Quantity"]
    assert quantity["properties"]["value"]["type"] == "string"
    assert quantity["properties"]["uom"]["pattern"] == "^[A-Z0-9]{2,3}$"
    envelope = schemas["cloudevent.json"]
    assert envelope["properties"]["time"]["format"] == "date-time"
    assert envelope["properties"]["sequence"]["pattern"] == r"^\d{20}$"
    assert set(envelope["properties"]["type"]["enum"]) == {
        f"com.plantsync.edge.{name}.v{version}" for name, version in DATA_MODEL_VERSIONS.items()
    }


def test_the_exported_schemas_accept_what_the_rules_emit_and_refuse_the_rest() -> None:
    """The JSON Schemas are what ERP and QMS teams check payloads with: every event the golden
    cases expect (v2 data quality included) validates against the schema its `dataschema`
    names, and a v2 payload with an unknown quality does not."""
    import jsonschema

    by_id = {schema["$id"]: schema for schema in json_schemas().values()}
    seen = set()
    for expected in sorted((Path(__file__).parent / "cases").glob("*/expected.jsonl")):
        for line in expected.read_text().splitlines():
            event = json.loads(line)
            if "data" not in event:
                continue
            jsonschema.validate(event["data"], by_id[event["dataschema"]])
            jsonschema.validate(
                {k: v for k, v in event.items() if k != "data"} | {"data": {}},
                by_id[f"urn:plantsync:schema:cloudevent:{CLOUDEVENT_VERSION}"],
            )
            seen.add((event_type_of(event["type"]), event["data"].get("data_quality")))
    assert ("downtime.recorded", "uncertain") in seen, "a golden case with a gap is missing"
    downtime = by_id[DowntimeRecorded.dataschema()]
    sample = SAMPLES["downtime.recorded"].model_dump(mode="json")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(sample | {"data_quality": "probably"}, downtime)


def test_write_schemas_is_repeatable(tmp_path: Path) -> None:
    first = {path.name: path.read_bytes() for path in write_schemas(tmp_path)}
    second = {path.name: path.read_bytes() for path in write_schemas(tmp_path)}
    assert first == second


def test_the_source_message_id_rides_as_a_versioned_extension() -> None:
    """Issue 12 item 10: an event made from an MES message names it (`sourcemessageid`,
    envelope version 2); one made from machine signals has no such attribute at all."""
    data = SAMPLES["material.consumed"]
    event = build_event(
        data,
        natural_key=source_key("1010", "material.consumed", "m-1"),
        subject=None,
        partitionkey=f"order/{ORDER}",
        sequence=3,
        source_message_id="m-1",
    )
    document = json.loads(event.to_json())
    assert document["sourcemessageid"] == "m-1"
    assert list(document)[-1] == "data"
    assert CloudEvent.from_json(event.to_json()) == event
    assert "sourcemessageid" not in json.loads(wrap(data).to_json())
    envelope = json_schemas()["cloudevent.json"]
    assert envelope["$id"] == "urn:plantsync:schema:cloudevent:2"
    assert "sourcemessageid" in envelope["properties"]
    assert "sourcemessageid" not in envelope.get("required", [])
