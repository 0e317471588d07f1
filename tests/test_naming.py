"""Names on the wire: CloudEvents types with a reverse-DNS prefix and a version (CloudEvents
1.0, "type"), and UN/ECE Rec 20 unit codes (not Rec 21 package codes). Old spellings are
still read. The oracles are the spellings written out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from edge.cli.main import main
from edge.config.checks import config_warnings
from edge.config.loader import parse_config
from edge.model.envelope import CloudEvent, build_event
from edge.model.events import LotDisposition
from edge.model.quantities import Quantity

WIRE = "com.plantsync.edge.lot.disposition.v1"


def disposition_event() -> CloudEvent:
    data = LotDisposition(
        site="1010",
        lot_id="L-1",
        disposition="release",
        disposition_source="qms",
        occurred_at="2026-03-01T10:00:00Z",
    )  # type: ignore[arg-type]
    return build_event(data, natural_key=("x",), subject="L-1", partitionkey="L-1", sequence=1)


def test_the_type_on_the_wire_is_prefixed_and_versioned_and_short_inside() -> None:
    event = disposition_event()
    assert event.type == "lot.disposition"  # what routes and code match on
    wire = json.loads(event.to_json())
    assert wire["type"] == WIRE
    assert CloudEvent.from_json(event.to_json()).type == "lot.disposition"


def test_events_with_the_old_short_type_are_still_read() -> None:
    old = json.loads(disposition_event().to_json())
    old["type"] = "lot.disposition"
    assert CloudEvent.model_validate(old).type == "lot.disposition"
    for unknown in (
        "com.plantsync.edge.lot.disposition.v2",
        "com.example.lot.disposition.v1",
        "lot.dispositions",
    ):
        old["type"] = unknown
        with pytest.raises(ValidationError):
            CloudEvent.model_validate(old)


def test_rec21_package_codes_are_refused_in_events_with_the_rec20_code_to_use() -> None:
    with pytest.raises(ValidationError, match=r"Rec 21 package code.*'XBX'"):
        Quantity.of(3, "BX")
    assert Quantity.of(3, "XBX").uom == "XBX"
    assert Quantity.of(3, "xpx").uom == "XPX"  # pallet


OLD_CONFIG = """\
site: "1010"
uom_codes: [ZCS]
drivers:
  - {name: plc, type: modbus, host: 127.0.0.1, tags: [{name: good, address: 0, type: uint32}]}
machines:
  - id: press-01
    signals: {good: plc.good}
    confirm: {every_units: 10, uom: BX}
"""


def test_an_old_config_with_rec21_codes_is_read_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = parse_config(OLD_CONFIG, "plant.yaml", {})
    assert config.machines[0].confirm.uom == "XBX"
    assert config_warnings(config) == [
        "plant.yaml:8: machines[0].confirm.uom: 'BX' is a UN/ECE Rec 21 package code, not a "
        "Rec 20 unit; read as 'XBX': write that"
    ]
    path = tmp_path / "plant.yaml"
    path.write_text(OLD_CONFIG)
    path.chmod(0o600)
    assert main(["check", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {path}:8: machines[0].confirm.uom: 'BX' is a UN/ECE Rec 21" in err
