"""Fuzzing the gateway's input edges with Hypothesis: whatever arrives, nothing crashes.

What a plant sends is not under our control: MES payloads, a technician's YAML, register
contents, OPC UA values. Each property below feeds one edge random and near-valid input and
checks the contract it promises:

- MQTT payloads (arbitrary bytes, arbitrary JSON, JSON close to a valid MES message) through
  `drivers.mqtt.to_reading` and then the pipeline's MES validation on a real outbox: never an
  exception; every rejection (driver or pipeline) is kept with a non-empty reason.
- YAML configs (plant.example.yaml with keys deleted, values of the wrong type, unknown keys,
  random strings; and its text with characters inserted or removed) through `parse_config`:
  a PlantConfig, or a ConfigError whose every line is `file:line: path: message`.
- Modbus register decoding (`decode`, `decode_string`, `tag_value`) with random registers for
  every type and byte order: a value, or a ValueError with a message for a wrong register count;
  and every value the PLC simulator encodes decodes back to itself.
- OPC UA values (`sample_from`, `plain_value`): None, wrong types, huge strings, nested arrays,
  NaN and infinities, any status code and timestamp: a Sample of a plain type, with the quality
  the status code's severity says and a finite time.
- The machine rules fed such samples (`MachineRule.on_sample`): no exception, no negative
  quantity, and a counter total that never goes down.

The inputs these properties found crashing the gateway (since fixed) are pinned with `@example`,
so each runs every time as a regression case, not only when Hypothesis happens to draw it again.
Every property runs in a few seconds (`make test`); `PLANTSYNC_FUZZ_EXAMPLES=10` multiplies the
number of examples for a longer hunt (`make test-fast` runs a quarter of them: 0.25), and
`PLANTSYNC_FUZZ_SKIP_KNOWN=1` leaves the pinned cases out.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import os
import re
import struct
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua import ua
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from drivers.base import MesMessage, Quality, RejectedMessage, Sample
from drivers.modbus import REGISTER_WIDTH, ModbusTag, decode, decode_string, tag_value
from drivers.mqtt import MqttConfig, to_reading
from drivers.opcua import plain_value, sample_from
from edge.config.errors import ConfigError
from edge.config.loader import parse_config
from edge.config.models import PlantConfig
from edge.model.envelope import CloudEvent
from edge.rules.machine import MachineRule
from edge.runtime.pipeline import Pipeline
from simulators.modbus_plc import _ordered
from tests.held_outbox import HeldOutbox

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_TEXT = (ROOT / "config" / "plant.example.yaml").read_text()
EXAMPLE_DATA = yaml.safe_load(EXAMPLE_TEXT)

SCALE = float(os.environ.get("PLANTSYNC_FUZZ_EXAMPLES") or 1)


PHASES = (
    tuple(Phase)
    if not os.environ.get("PLANTSYNC_FUZZ_SKIP_KNOWN")
    else tuple(phase for phase in Phase if phase is not Phase.explicit)
)
"""`PLANTSYNC_FUZZ_SKIP_KNOWN=1` leaves out the pinned regression cases."""


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=max(1, round(examples * SCALE)),
        deadline=None,
        phases=PHASES,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


@pytest.fixture(autouse=True, scope="module")
def quiet_gateway_logs() -> Iterator[None]:
    """Every rejected input and odd value is logged as a warning: thousands of them here."""
    loggers = [logging.getLogger(name) for name in ("edge", "drivers", "buffer")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


# --- shared strategies -------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
"""Decoded JSON, as Python values (NaN and infinities included: some encoders write them)."""

OFFSETS = st.sampled_from(
    [
        UTC,
        timezone(timedelta(hours=14)),
        timezone(timedelta(hours=-14)),
        timezone(timedelta(hours=5, minutes=30)),
    ]
)
timestamps = st.one_of(
    st.datetimes(
        min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59), timezones=OFFSETS
    ).map(lambda d: d.isoformat()),
    st.sampled_from(
        [
            "2026-03-01T06:00:00Z",
            "2026-03-01T06:00:00",
            "2026-13-01T00:00:00Z",
            "0001-01-01T00:00:00+14:00",
            "9999-12-31T23:59:59-14:00",
            "",
            "now",
            "1970-01-01T00:00:00Z",
        ]
    ),
    st.integers(-(2**40), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=30),
)
"""occurred_at as an MES system might write it, well or badly."""

quantities = st.one_of(
    st.decimals(allow_nan=False, allow_infinity=False, places=3),
    st.sampled_from(
        [
            "12.500",
            "-1",
            "0",
            "1e400",
            "NaN",
            "Infinity",
            "1,5",
            "",
            " 3 ",
            "99999999999999999999999999999999",
        ]
    ),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    json_values,
)
identifiers = st.one_of(
    st.sampled_from(["1000123", "42", "RM-STEEL", "LOT-1", "press-01"]),
    st.text(max_size=50),
    json_values,
)


# --- MQTT payloads through the driver and the pipeline ---------------------------------------

MQTT = MqttConfig.model_validate(
    {
        "name": "mes",
        "type": "mqtt",
        "host": "127.0.0.1",
        "max_payload": "4KiB",
        "topics": [
            {
                "filter": "mes/1010/+/order/start",
                "event": "order.started",
                "fields": {
                    "machine_id": "$topic[2]",
                    "order_id": "order_id",
                    "operation": "operation",
                    "material": "material",
                    "lot_id": "lot_id",
                    "components": "components",
                    "occurred_at": "occurred_at",
                },
            },
            {
                "filter": "mes/1010/+/order/end",
                "event": "order.ended",
                "fields": {
                    "machine_id": "$topic[2]",
                    "order_id": "order_id",
                    "operation": "operation",
                    "occurred_at": "occurred_at",
                },
            },
            {
                "filter": "mes/1010/+/consumption",
                "event": "material.consumed",
                "fields": {
                    "order_id": "order_id",
                    "material": "material",
                    "lot_id": "lot_id",
                    "quantity.value": "quantity",
                    "quantity.uom": "uom",
                    "occurred_at": "occurred_at",
                },
            },
            {
                "filter": "mes/1010/+/lot/completed",
                "event": "lot.produced",
                "fields": {
                    "order_id": "order_id",
                    "material": "material",
                    "lot_id": "lot_id",
                    "quantity.value": "quantity",
                    "quantity.uom": "uom",
                    "input_lots": "input_lots",
                    "occurred_at": "occurred_at",
                },
            },
            # No mapping: the payload object is taken as it is; the id sits in a nested header.
            {"filter": "mes/1010/raw/#", "event": "lot.disposition", "id_field": "header.id"},
        ],
    }
)

PIPELINE_CONFIG = """
site: "1010"
data_dir: /tmp/unused
drivers:
  - {name: plc, type: modbus, host: 127.0.0.1, tags: [{name: good, address: 0, type: uint32},
     {name: state, address: 10, type: uint16}]}
machines:
  - {id: press-01, signals: {good: plc.good, state: plc.state},
     state_map: {4: Idle, 6: Execute, 17: Complete},
     order: {order_id: "1000123"}, confirm: {every_units: 10}}
  - {id: press-02, signals: {good: plc.good}, confirm: {every_units: 5}}
destinations:
  erp: {base_url: "http://127.0.0.1:1"}
routes:
  production.confirmation: [erp]
  material.consumed: [erp]
  lot.produced: [erp]
  lot.disposition: [erp]
  operation.started: [erp]
  operation.completed: [erp]
"""

TOPIC_KINDS = {
    "order/start": "order.started",
    "order/end": "order.ended",
    "consumption": "material.consumed",
    "lot/completed": "lot.produced",
}


def valid_payload(suffix: str) -> dict[str, Any]:
    """A well-formed payload for `mes/1010/<machine>/<suffix>`, as the MES simulator sends."""
    common = {
        "message_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
        "site": "1010",
        "order_id": "1000123",
        "occurred_at": "2026-03-01T06:00:00.000Z",
    }
    if suffix == "order/start":
        return {
            **common,
            "operation": "0010",
            "material": "FG-100",
            "lot_id": "LOT-9",
            "components": ["RM-STEEL"],
        }
    if suffix == "order/end":
        return {**common, "operation": "0010"}
    if suffix == "consumption":
        return {
            **common,
            "material": "RM-STEEL",
            "lot_id": "RM-A-1",
            "quantity": "12.500",
            "uom": "KGM",
        }
    return {
        **common,
        "material": "FG-100",
        "lot_id": "FG-1",
        "quantity": 100,
        "uom": "H87",
        "input_lots": [
            {
                "lot_id": "RM-A-1",
                "material": "RM-STEEL",
                "quantity": {"value": "12.5", "uom": "KGM"},
            }
        ],
    }


@st.composite
def near_valid_messages(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid MES message with a few fields removed, replaced or added."""
    suffix = draw(st.sampled_from(sorted(TOPIC_KINDS)))
    machine = draw(
        st.sampled_from(["press-01", "press-02", "press-99"])
        | st.text(alphabet=st.characters(exclude_characters="/+#\x00"), max_size=10)
    )
    document = valid_payload(suffix)
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from(sorted(document)) | st.text(max_size=8))
        action = draw(st.sampled_from(["delete", "value", "timestamp", "quantity", "identifier"]))
        if action == "delete":
            document.pop(key, None)
        elif action == "timestamp":
            document["occurred_at"] = draw(timestamps)
        elif action == "quantity":
            document["quantity"] = draw(quantities)
        elif action == "identifier":
            document[
                draw(
                    st.sampled_from(
                        ["order_id", "material", "lot_id", "operation", "site", "uom", "message_id"]
                    )
                )
            ] = draw(identifiers)
        else:
            document[key] = draw(json_values)
    text = json.dumps(document, default=str, allow_nan=True)
    return f"mes/1010/{machine}/{suffix}", text.encode()


topics = st.one_of(
    st.sampled_from(
        [f"mes/1010/press-01/{suffix}" for suffix in TOPIC_KINDS]
        + ["mes/1010/raw/x", "mes/9999/press-01/consumption", "other/topic", ""]
    ),
    st.text(max_size=40),
)
arbitrary_json_payloads = json_values.map(
    lambda value: json.dumps(value, allow_nan=True, default=str).encode()
)
raw_disposition_payloads = st.fixed_dictionaries(
    {"header": st.fixed_dictionaries({"id": identifiers})},
    optional={
        "lot_id": identifiers,
        "disposition": st.sampled_from(["release", "reject", "hold", "maybe"]),
        "occurred_at": timestamps,
        "site": identifiers,
        "order_id": identifiers,
    },
).map(lambda d: ("mes/1010/raw/qms", json.dumps(d, default=str, allow_nan=True).encode()))
messages = st.one_of(
    st.tuples(topics, st.binary(max_size=600)),
    st.tuples(topics, arbitrary_json_payloads),
    st.tuples(topics, st.binary(min_size=4097, max_size=6000)),  # over max_payload
    near_valid_messages(),
    raw_disposition_payloads,
)


class MesPipeline:
    """One pipeline on one real outbox (a temp file) for all examples, on a private loop."""

    def __init__(self, directory: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.held = HeldOutbox(self.loop, directory / "outbox.db")
        self.outbox = self.held.outbox
        self.pipeline = Pipeline(parse_config(PIPELINE_CONFIG, "fuzz.yaml", {}), self.outbox, {})
        self.seen_rejections = 0

    def feed(self, reading: MesMessage | RejectedMessage) -> None:
        self.loop.run_until_complete(self.pipeline.on_readings([reading]))

    def new_rejections(self) -> list[dict[str, Any]]:
        rows = self.loop.run_until_complete(self.outbox.rejected_inputs(limit=10))
        fresh = [row for row in rows if row["id"] > self.seen_rejections]
        self.seen_rejections = max([self.seen_rejections, *(row["id"] for row in rows)])
        return fresh

    def close(self) -> None:
        self.held.close()
        self.loop.close()


@pytest.fixture(scope="module")
def mes_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MesPipeline]:
    pipeline = MesPipeline(tmp_path_factory.mktemp("fuzz-pipeline"))
    yield pipeline
    pipeline.close()


@fuzz_settings(400)
@given(message=messages)
# Found by this property (a crash, fixed): an MES timestamp at the edge of the calendar (year
# 1 east of UTC, year 9999 west of it) is valid for pydantic, but its Unix time overflowed in
# the pipeline, and the MQTT driver retried the whole batch for ever.
@example(
    message=(
        "mes/1010/press-01/consumption",
        json.dumps(
            {**valid_payload("consumption"), "occurred_at": "0001-01-01T00:00:00+14:00"}
        ).encode(),
    )
)
@example(
    message=(
        "mes/1010/press-01/order/start",
        json.dumps(
            {**valid_payload("order/start"), "occurred_at": "9999-12-31T23:59:59-14:00"}
        ).encode(),
    )
)
def test_mqtt_payloads_never_crash_and_every_rejection_has_a_reason(
    mes_pipeline: MesPipeline,
    message: tuple[str, bytes],
) -> None:
    topic, payload = message
    reading = to_reading(MQTT, topic, payload, 1_800_000_000.0)
    assert isinstance(reading, MesMessage | RejectedMessage), reading
    if isinstance(reading, RejectedMessage):
        assert isinstance(reading.reason, str) and reading.reason.strip(), reading
        assert len(reading.payload) <= MQTT.max_payload
    else:
        assert reading.message_id and reading.kind in {*TOPIC_KINDS.values(), "lot.disposition"}
    committed_before = sum(mes_pipeline.pipeline.events_by_type.values())
    rejected_before = mes_pipeline.pipeline.rejected_by_driver["mes"]
    duplicates_before = mes_pipeline.outbox.stats.duplicates_ignored
    mes_pipeline.feed(reading)  # the property: this never raises
    fresh = mes_pipeline.new_rejections()
    for row in fresh:
        assert isinstance(row["reason"], str) and row["reason"].strip(), row
    rejected = mes_pipeline.pipeline.rejected_by_driver["mes"] - rejected_before
    assert rejected == len(fresh), (rejected, fresh)
    if isinstance(reading, RejectedMessage):
        assert rejected == 1
    committed = sum(mes_pipeline.pipeline.events_by_type.values()) - committed_before
    duplicate = mes_pipeline.outbox.stats.duplicates_ignored > duplicates_before
    if isinstance(reading, MesMessage) and reading.kind in (
        "material.consumed",
        "lot.produced",
        "lot.disposition",
    ):
        # A milestone message is an event (or a redelivery of one), or a dead letter.
        assert (rejected == 1) != (committed >= 1 or duplicate), (reading, rejected, committed)


# --- YAML configs ------------------------------------------------------------------------------

PROBLEM_LINE = re.compile(r"plant\.yaml:(\d+): (.*?): (\S.*)")


@pytest.fixture(scope="module")
def config_environ(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    credentials = tmp_path_factory.mktemp("credentials")
    (credentials / "erp_client_secret").write_text("s3cret\n")
    return {
        "FILLER_OPCUA_PASSWORD": "x",
        "MES_MQTT_PASSWORD": "y",
        "CREDENTIALS_DIRECTORY": str(credentials),
    }


def _paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*path, index))


def _parent(document: Any, path: tuple[Any, ...]) -> Any:
    node = document
    for part in path[:-1]:
        node = node[part]
    return node


config_values = st.one_of(
    json_values,
    st.sampled_from(
        [
            "500ms",
            "15m",
            "1h30m",
            "-1s",
            "2GB",
            "10 parsecs",
            "ABCD",
            "uint32",
            "Execute",
            "${NOT_SET}",
            "${FILLER_OPCUA_PASSWORD}",
            "opc.tcp://x",
            "http://",
            "0x10",
            "~",
            "yes",
        ]
    ),
)


@st.composite
def mutated_example_configs(draw: st.DrawFn) -> str:
    """plant.example.yaml's data with 1-4 random edits, written back as YAML."""
    document = copy.deepcopy(EXAMPLE_DATA)
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(document) if p]
        path = paths[draw(st.integers(0, len(paths) - 1))]
        parent = _parent(document, path)
        action = draw(
            st.sampled_from(
                ["delete", "wrong type", "unknown key", "typo", "random string", "duplicate item"]
            )
        )
        if action == "delete":
            del parent[path[-1]]
        elif action == "wrong type":
            parent[path[-1]] = draw(config_values)
        elif action == "random string":
            parent[path[-1]] = draw(st.text(max_size=30))
        elif action == "unknown key" and isinstance(parent, dict):
            # Keys with line breaks and other control characters too: each problem must
            # still be one line (ConfigError escapes them).
            parent[
                draw(
                    st.text(
                        alphabet=st.characters(exclude_categories=["Cs"]),
                        min_size=1,
                        max_size=12,
                    )
                )
            ] = draw(config_values)
        elif (
            action == "typo"
            and isinstance(parent, dict)
            and isinstance(path[-1], str)
            and len(path[-1]) > 1
        ):
            cut = draw(st.integers(0, len(path[-1]) - 1))
            parent[path[-1][:cut] + path[-1][cut + 1 :]] = parent.pop(path[-1])
        elif action == "duplicate item" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))
    return yaml.dump(
        document,
        Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
        sort_keys=False,
        allow_unicode=True,
    )


@st.composite
def edited_example_text(draw: st.DrawFn) -> str:
    """plant.example.yaml's text with a few characters inserted, deleted or replaced, as a
    bad copy-paste or a wrong editor would."""
    text = EXAMPLE_TEXT
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, len(text)))
        inserted = draw(
            st.text(max_size=3)
            | st.sampled_from([":", "- ", "\t", "  ", "\n", "{", "'", "&a", "*a", "!!"])
        )
        removed = draw(st.integers(0, 3))
        text = text[:position] + inserted + text[position + removed :]
    return text


def _check_config(text: str, environ: dict[str, str]) -> None:
    try:
        config = parse_config(text, "plant.yaml", environ)
    except ConfigError as error:
        assert error.problems, "a ConfigError without problems"
        last_line = text.count("\n") + 2
        for problem in error.problems:
            match = PROBLEM_LINE.fullmatch(problem)
            assert match, f"not `file:line: path: message`: {problem!r}"
            assert 1 <= int(match[1]) <= last_line, problem
        return
    assert isinstance(config, PlantConfig)


@fuzz_settings(150)
@given(text=mutated_example_configs())
def test_mutated_configs_load_or_name_every_problem(
    config_environ: dict[str, str],
    text: str,
) -> None:
    _check_config(text, config_environ)


@fuzz_settings(150)
@given(text=edited_example_text())
# Found by this property (fixed): a control character (a NUL from a bad copy, a stray BEL)
# makes PyYAML's reader raise ReaderError, not a MarkedYAMLError: it escaped parse_config.
@example(text=EXAMPLE_TEXT.replace('site: "1010"', 'site: "10\x0710"'))
# An explicit tag whose text does not parse (`!!int 256KiB`, `!!bool maybe`) raised PyYAML's
# plain ValueError or KeyError from the constructor, not a YAMLError.
@example(text=EXAMPLE_TEXT.replace("max_payload: 256KiB", "max_payload: !!int 256KiB"))
# And an alias inside its own anchor (`&a [*a]`, legal YAML) recursed without end.
@example(text=EXAMPLE_TEXT + "\nroutes: &loop {material.consumed: *loop}\n")
def test_edited_config_text_loads_or_names_every_problem(
    config_environ: dict[str, str],
    text: str,
) -> None:
    _check_config(text, config_environ)


def test_the_unedited_example_loads(config_environ: dict[str, str]) -> None:
    """The properties above start from a valid file: otherwise they would prove little."""
    assert isinstance(parse_config(EXAMPLE_TEXT, "plant.yaml", config_environ), PlantConfig)
    assert isinstance(
        parse_config(yaml.safe_dump(yaml.safe_load(EXAMPLE_TEXT)), "plant.yaml", config_environ),
        PlantConfig,
    )


# --- Modbus register decoding ------------------------------------------------------------------

NUMBER_TYPES = sorted(REGISTER_WIDTH)
BYTE_ORDERS = ["ABCD", "CDAB", "BADC", "DCBA"]
STRUCT = {
    "uint16": ">H",
    "int16": ">h",
    "uint32": ">I",
    "int32": ">i",
    "float32": ">f",
    "uint64": ">Q",
    "int64": ">q",
    "float64": ">d",
}
registers = st.lists(st.integers(0, 0xFFFF), max_size=10)


@fuzz_settings(500)
@given(kind=st.sampled_from(NUMBER_TYPES), order=st.sampled_from(BYTE_ORDERS), words=registers)
def test_decode_any_registers(kind: str, order: str, words: list[int]) -> None:
    width = REGISTER_WIDTH[kind]  # type: ignore[index]
    if len(words) != width:
        with pytest.raises(ValueError, match=rf"needs {width} registers, got {len(words)}"):
            decode(words, kind, order)  # type: ignore[arg-type]
        return
    value = decode(words, kind, order)  # type: ignore[arg-type]
    if kind.startswith("float"):
        assert isinstance(value, float)
    else:
        bits = 16 * width
        low, high = (
            (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            if kind.startswith("int")
            else (0, 2**bits - 1)
        )
        assert isinstance(value, int) and low <= value <= high


@fuzz_settings(300)
@given(data=st.data(), kind=st.sampled_from(NUMBER_TYPES), order=st.sampled_from(BYTE_ORDERS))
def test_what_the_plc_simulator_encodes_decodes_back(
    data: st.DataObject, kind: str, order: str
) -> None:
    if kind.startswith("float"):
        width = 32 if kind == "float32" else 64
        value: int | float = data.draw(st.floats(width=width, allow_nan=False))
    else:
        bits = 16 * REGISTER_WIDTH[kind]  # type: ignore[index]
        signed = kind.startswith("int")
        value = data.draw(
            st.integers(
                -(2 ** (bits - 1)) if signed else 0, 2 ** (bits - 1) - 1 if signed else 2**bits - 1
            )
        )
    words = _ordered(struct.pack(STRUCT[kind], value), order)
    assert decode(words, kind, order) == value  # type: ignore[arg-type]


@fuzz_settings(300)
@given(words=st.lists(st.integers(0, 0xFFFF), max_size=125), order=st.sampled_from(BYTE_ORDERS))
def test_decode_string_any_registers(words: list[int], order: str) -> None:
    text = decode_string(words, order)  # type: ignore[arg-type]
    assert isinstance(text, str) and len(text) <= 2 * len(words)
    assert not text.endswith(("\0", " "))


@st.composite
def modbus_tags(draw: st.DrawFn) -> ModbusTag:
    kind = draw(st.sampled_from([*NUMBER_TYPES, "bool", "string"]))
    spec: dict[str, Any] = {
        "name": "t",
        "address": draw(st.integers(0, 1000)),
        "type": kind,
        "byte_order": draw(st.sampled_from(BYTE_ORDERS)),
    }
    if kind == "bool":
        spec["bit"] = draw(st.integers(0, 15))
    elif kind == "string":
        spec["length"] = draw(st.integers(1, 20))
    elif draw(st.booleans()):
        spec["scale"] = draw(st.floats(allow_nan=True, allow_infinity=True))
        spec["offset"] = draw(st.floats(allow_nan=True, allow_infinity=True))
    return ModbusTag.model_validate(spec)


@fuzz_settings(500)
@given(tag=modbus_tags(), data=st.data())
def test_tag_value_any_registers(tag: ModbusTag, data: st.DataObject) -> None:
    words = data.draw(
        st.one_of(
            st.lists(st.integers(0, 0xFFFF), min_size=tag.width, max_size=tag.width), registers
        )
    )
    try:
        value = tag_value(tag, words)
    except ValueError as exc:
        assert str(exc).strip()
        assert tag.type != "string" and len(words) != (1 if tag.type == "bool" else tag.width)
        return
    expected = {"bool": bool, "string": str}.get(tag.type, int | float)
    assert isinstance(value, expected), (tag, value)


# --- OPC UA values -----------------------------------------------------------------------------

opcua_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=50),
    st.integers(0, 3).map(lambda n: "x" * (10 ** (n + 3))),  # up to a 1 MB string
    st.binary(max_size=50),
    st.datetimes(min_value=datetime(1601, 1, 1), max_value=datetime(9999, 12, 31)),
    st.text(max_size=10).map(ua.LocalizedText),
    st.text(max_size=10).map(lambda text: ua.QualifiedName(text, 2)),
    st.integers(0, 2**32 - 1).map(lambda n: ua.NodeId(n, 2)),
)
opcua_values = st.recursive(
    opcua_scalars, lambda children: st.lists(children, max_size=4), max_leaves=10
)
status_codes = st.one_of(
    st.sampled_from([0, 0x40000000, 0x80000000, 0x80340000, 0x408F0000, 0x00960000, 0xC0000000]),
    st.integers(0, 2**32 - 1),
)
opcua_times = st.one_of(
    st.none(),
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)),
    st.datetimes(
        min_value=datetime(1601, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
    ),
)


def _severity(code: int) -> Quality:
    return {0: Quality.GOOD, 1: Quality.UNCERTAIN}.get(code >> 30, Quality.BAD)


@st.composite
def data_values(draw: st.DrawFn) -> ua.DataValue | None:
    if draw(st.integers(0, 20)) == 0:
        return None
    value = draw(opcua_values)
    variant = None
    if draw(st.integers(0, 10)):
        try:
            variant = ua.Variant(value)
        except Exception:  # asyncua refuses to wrap it: no such value on the wire
            variant = ua.Variant(str(value))
    return ua.DataValue(
        variant,
        StatusCode=ua.StatusCode(draw(status_codes)),
        SourceTimestamp=draw(opcua_times),
        ServerTimestamp=draw(opcua_times),
    )


def _check_sample(sample: Sample, datavalue: ua.DataValue | None, now: float) -> None:
    assert isinstance(sample.value, bool | int | float | str | type(None)), sample
    assert math.isfinite(sample.source_time), sample
    if datavalue is None:
        assert sample.quality is Quality.BAD and sample.value is None
        return
    assert sample.quality is _severity(datavalue.StatusCode.value), sample
    if sample.quality is Quality.BAD:
        assert sample.value is None


@fuzz_settings(500)
@given(datavalue=data_values())
def test_opcua_sample_from_any_value(datavalue: ua.DataValue | None) -> None:
    now = 1_800_000_000.0
    sample = sample_from("filler", "good", datavalue, now)
    _check_sample(sample, datavalue, now)


@fuzz_settings(300)
@given(value=opcua_values | st.dictionaries(st.text(max_size=5), opcua_scalars, max_size=3))
def test_opcua_plain_value_of_anything(value: Any) -> None:
    plain = plain_value(value)
    assert isinstance(plain, bool | int | float | str | type(None))


# --- machine rules -----------------------------------------------------------------------------

RULE_CONFIG = parse_config(
    """
site: "1010"
drivers:
  - {name: plc, type: modbus, host: 127.0.0.1, tags: [{name: good, address: 0, type: uint32},
     {name: bad, address: 2, type: uint32}, {name: state, address: 10},
     {name: reason, address: 11}, {name: force, address: 20, type: float32}]}
machines:
  - id: press-01
    signals: {good: plc.good, defective: plc.bad, state: plc.state,
              stop_reason: plc.reason}
    order: {order_id: "1000123", material: FG-4711, lot_id: LOT-1}
    confirm: {every_units: 7, every: 5s, on_state_change: true}
    counter_width: 16
    state_map: {2: Stopped, 4: Idle, 5: Suspended, 6: Execute, 11: Held, 17: Complete}
    debounce: 500ms
    stop_reasons: {1: Jam}
    limits:
      - {signal: plc.force, low: 12.0, high: 15.0, for: 1s, hysteresis: 0.2, raise: both,
         uom: NEW}
""",
    "rule.yaml",
    {},
)
SIGNALS = ["good", "bad", "state", "reason", "force"]

rule_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.integers(0, 2**16 + 10),
    st.sampled_from([2, 4, 5, 6, 11, 17, 99]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(10.0, 17.0),
    st.text(max_size=5),
)


def _check_events(events: list[CloudEvent]) -> None:
    for event in events:
        data = event.data
        for name in ("yield_quantity", "scrap_quantity", "quantity"):
            if isinstance(data.get(name), dict):
                assert Decimal(data[name]["value"]) >= 0, (event.type, data)
        if event.type == "production.confirmation":
            assert 0 <= data["counter_from"] <= data["counter_to"], data
        if event.type == "downtime.recorded":
            assert data["duration_seconds"] >= 0, data


def _feed_rule(samples: list[Sample], tick_at: float | None = None) -> None:
    rule = MachineRule("1010", RULE_CONFIG.machines[0])
    totals = (0, 0)
    for sample in samples:
        _check_events(rule.on_sample(sample))
        now = (rule.state.good.total, rule.state.scrap.total)
        assert now[0] >= totals[0] and now[1] >= totals[1], f"a total went down: {totals}->{now}"
        assert rule.state.good.pending >= 0 and rule.state.scrap.pending >= 0
        totals = now
        rule.dump_state()
    if tick_at is not None:
        _check_events(rule.on_tick(tick_at))


@st.composite
def rule_samples(draw: st.DrawFn) -> list[Sample]:
    """Samples of the rule's signals with random values and qualities, in time order."""
    at = 1_800_000_000.0
    samples = []
    for _ in range(draw(st.integers(1, 40))):
        at += draw(st.floats(0.0, 30.0))
        samples.append(
            Sample(
                "plc",
                draw(st.sampled_from(SIGNALS)),
                draw(rule_values),
                at,
                draw(st.sampled_from(list(Quality))),
            )
        )
    return samples


@fuzz_settings(400)
@given(samples=rule_samples())
# Found by this property (crashes, fixed): a NaN or an infinity in a counter, state or stop
# reason signal (a float tag, an OPC UA Double) raised from int(value) inside the rule.
@example(samples=[Sample("plc", "good", 0, 1.8e9), Sample("plc", "good", math.nan, 1.8e9 + 1)])
@example(samples=[Sample("plc", "state", math.inf, 1.8e9)])
# A counter that drops to a negative value (a signed tag) was taken as a reset to it: the
# total went down and the next confirmation had a negative quantity.
@example(
    samples=[
        Sample("plc", "good", 100, 1.8e9),
        Sample("plc", "good", -5, 1.8e9 + 1),
        Sample("plc", "good", 50, 1.8e9 + 2),
    ]
)
# A process value of +inf (a broken sensor's float) outside the limits could not be written
# in the inspection request: the daemon died on it, and again at every start.
@example(samples=[Sample("plc", "force", math.inf, 1.8e9), Sample("plc", "force", 5.0, 1.8e9 + 2)])
# A stop reason of 1e20 (a float tag) became a 21-digit reason code the event refuses: the rule
# raised when the machine stopped (found by this property on 2026-12-05).
@example(
    samples=[
        Sample("plc", "reason", 1e20, 1.8e9),
        Sample("plc", "state", 6, 1.8e9),
        Sample("plc", "state", 2, 1.8e9 + 1),
    ]
)
def test_machine_rule_random_values_and_qualities(samples: list[Sample]) -> None:
    _feed_rule(samples, tick_at=samples[-1].source_time + 3600)


@fuzz_settings(300)
@given(
    datavalues=st.lists(st.tuples(st.sampled_from(SIGNALS), data_values()), min_size=1, max_size=30)
)
# Found by this property (a crash, fixed): OPC UA source timestamps are the device's clock,
# which can step back; a resume dated before the stop made a negative downtime.
@example(
    datavalues=[
        ("state", ua.DataValue(ua.Variant(6), SourceTimestamp=datetime(2026, 3, 1, 6, 0, 0))),
        ("state", ua.DataValue(ua.Variant(11), SourceTimestamp=datetime(2026, 3, 1, 6, 0, 5))),
        ("state", ua.DataValue(ua.Variant(11), SourceTimestamp=datetime(2026, 3, 1, 6, 0, 6))),
        ("state", ua.DataValue(ua.Variant(6), SourceTimestamp=datetime(2026, 3, 1, 5, 59, 0))),
        ("state", ua.DataValue(ua.Variant(6), SourceTimestamp=datetime(2026, 3, 1, 5, 59, 1))),
    ]
)
def test_machine_rule_fed_opcua_samples(datavalues: list[tuple[str, ua.DataValue | None]]) -> None:
    now = 1_800_000_000.0
    samples = [sample_from("plc", tag, datavalue, now) for tag, datavalue in datavalues]
    _feed_rule(samples)
