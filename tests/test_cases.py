"""Golden cases: `tests/cases/<name>/{config.yaml, input.jsonl, expected.jsonl, README.md}`.

Each case replays its input through the real pipeline, rules and outbox (`edge.cli.replay`), and
the committed events (and rejected inputs) must equal `expected.jsonl`, line for line.

`expected.jsonl` alone would compare the code with itself: it was written by the code. So every
case also has a README.md with a derivation by hand, ending in a table "Expected, by hand" of
what a reviewer worked out from the input and the rules in words: one row per event, its time,
type and facts (`yield 68`, `counter 0..68`, `state Held`, ...). The committed events must match
that table too, row for row; a fact the table states that the event does not have fails the
case, and so does a row that leaves out a fact every event of its type must state.

After a deliberate change, `UPDATE_GOLDENS=1 pytest tests/test_cases.py` rewrites the expected
files, and fails: check the diff against the derivations by hand before committing it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from edge.cli.replay import read_lines, replay
from edge.config.loader import load_config
from edge.model.envelope import event_type_of

CASES = sorted(p for p in (Path(__file__).parent / "cases").iterdir() if p.is_dir())

REQUIRED = {
    "production.confirmation": ("yield", "scrap", "counter"),
    "operation.completed": ("yield", "scrap"),
    "operation.interrupted": ("state",),
    "downtime.recorded": ("from", "to", "state"),
    "inspection.requested": ("trigger",),
}
"""Facts every row of that type must state: the quantities and times ERP and QMS act on."""


def _clock(stamp: str | None) -> str:
    """`2026-11-30T10:00:51.5Z` as the derivations write it: `10:00:51.5`."""
    if stamp is None:
        return "-"
    time = stamp.split("T", 1)[1].rstrip("Z")
    return time.rstrip("0").rstrip(".") if "." in time else time


def facts(entry: dict[str, Any]) -> tuple[str, str, list[str]]:
    """An output line as (time, type, facts), in the words the derivations use."""
    if "rejected" in entry:
        return "-", "rejected", [entry["rejected"]["reason"]]
    event_type = str(event_type_of(entry["type"]))  # the short name the derivations use
    data = entry["data"]
    found: list[str] = []
    if data.get("order_id"):
        found.append(f"order {data['order_id']}")

    def quantity(name: str, word: str) -> None:
        if data.get(name):
            found.append(f"{word} {data[name]['value']}")

    quantity("yield_quantity", "yield")
    quantity("scrap_quantity", "scrap")
    quantity("quantity", "quantity")
    quantity("measured_value", "value")
    if "counter_from" in data:
        found.append(f"counter {data['counter_from']}..{data['counter_to']}")
        found.append(f"trigger {data['trigger']}")
        found.append("final" if data["is_final"] else "partial")
    if data.get("machine_state"):
        found.append(f"state {data['machine_state']}")
    if data.get("reason_code"):
        found.append(f"reason {data['reason_code']}")
    if data.get("reason_text") and "trigger" not in data:
        found.append(f"reason text {data['reason_text']}")
    if "started_at" in data and event_type == "downtime.recorded":
        found.append(f"from {_clock(data['started_at'])}")
        found.append(f"to {_clock(data['ended_at'])}")
        found.append(f"{data['duration_seconds']:g} s")
    elif data.get("started_at"):
        found.append(f"started {_clock(data['started_at'])}")
    if data.get("interrupted_at"):
        found.append(f"interrupted {_clock(data['interrupted_at'])}")
    if data.get("data_quality") is not None:
        found.append(data["data_quality"])
    if data.get("source_gap"):
        gap = data["source_gap"]
        found.append(f"gap {_clock(gap['started_at'])}..{_clock(gap['ended_at'])}")
    if data.get("trigger") and "counter_from" not in data:
        found.append(f"trigger {data['trigger']}")
    if data.get("lot_id"):
        found.append(f"lot {data['lot_id']}")
    if "input_lots" in data:
        found.append(f"inputs {len(data['input_lots'])}")
    if data.get("defect_code"):
        found.append(f"defect {data['defect_code']}")
    return _clock(data.get("occurred_at")), event_type, found


def derivation(case: Path) -> list[tuple[str, str, list[str]]]:
    """The rows of the README's table "Expected, by hand"."""
    readme = case / "README.md"
    assert readme.exists(), f"{case.name}: no README.md with a derivation by hand"
    text = readme.read_text()
    heading = re.search(r"^## Expected, by hand\s*$", text, re.MULTILINE)
    assert heading, f"{readme}: no section '## Expected, by hand'"
    assert len(text[: heading.start()].split()) >= 40, f"{readme}: the derivation is missing"
    rows = []
    for line in text[heading.end() :].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if (
            not line.startswith("|")
            or len(cells) != 3
            or cells[0] in ("at", "")
            or (set(cells[0]) <= {"-", ":"} and cells[1].startswith("-"))
        ):
            if line.startswith("## "):
                break
            continue
        what = [fact.strip() for fact in cells[2].split(",") if fact.strip()]
        rows.append((cells[0], cells[1], what))
    return rows


def matches(row: tuple[str, str, list[str]], entry: dict[str, Any]) -> str | None:
    """Why the committed event does not match the row worked out by hand (None if it does)."""
    at, kind, stated = row
    when, event_type, found = facts(entry)
    if kind != event_type:
        return f"the event is {event_type}, the derivation says {kind}"
    if at != when:
        return f"{event_type} at {when}, the derivation says {at}"
    if event_type == "rejected":
        return (
            None
            if all(fact in found[0] for fact in stated)
            else f"rejected for {found[0]!r}, the derivation says {stated}"
        )
    missing = [fact for fact in stated if fact not in found]
    if missing:
        return f"{event_type} at {at} has {found}, not {missing}"
    unstated = [
        word
        for word in REQUIRED.get(event_type, ())
        if not any(fact.split(" ")[0] == word for fact in stated)
    ]
    if unstated:
        return f"the derivation of {event_type} at {at} must state {unstated}"
    return None


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_golden_case(case: Path, tmp_path: Path) -> None:
    config = load_config(case / "config.yaml", {})
    with (case / "input.jsonl").open() as source:
        lines = read_lines(source)
    output = await replay(config, lines, tmp_path)
    rendered = [json.dumps(entry, sort_keys=True) for entry in output]
    expected_path = case / "expected.jsonl"
    if os.environ.get("UPDATE_GOLDENS"):
        expected_path.write_text("".join(line + "\n" for line in rendered))
        pytest.fail(
            f"UPDATE_GOLDENS rewrote {expected_path}: read the diff against the "
            f"derivation by hand in {case / 'README.md'} before committing it (this "
            "run checked nothing)"
        )
    expected = expected_path.read_text().splitlines()
    assert rendered == expected
    rows = derivation(case)
    assert len(rows) == len(output), (
        f"{case.name}: the derivation by hand has {len(rows)} rows, the rules made "
        f"{len(output)} events: {[facts(entry)[:2] for entry in output]}"
    )
    problems = [
        f"row {number}: {why}"
        for number, (row, entry) in enumerate(zip(rows, output, strict=True), 1)
        if (why := matches(row, entry)) is not None
    ]
    assert not problems, f"{case.name}: " + "; ".join(problems)


def test_there_are_at_least_twelve_cases() -> None:
    assert len(CASES) >= 12


def test_a_fact_the_code_does_not_derive_fails_the_case() -> None:
    """The oracle can fail: a row worked out wrong by hand is caught."""
    entry = {
        "type": "production.confirmation",
        "data": {
            "order_id": "4711",
            "occurred_at": "2026-11-30T10:00:51Z",
            "counter_from": 0,
            "counter_to": 68,
            "is_final": False,
            "trigger": "units",
            "yield_quantity": {"value": "68", "uom": "C62"},
            "scrap_quantity": {"value": "0", "uom": "C62"},
        },
    }
    good = ("10:00:51", "production.confirmation", ["yield 68", "scrap 0", "counter 0..68"])
    assert matches(good, entry) is None
    assert matches(
        ("10:00:51", "production.confirmation", ["yield 67", "scrap 0", "counter 0..68"]), entry
    )
    assert matches(("10:00:52", *good[1:]), entry)  # type: ignore[arg-type]
    assert matches(("10:00:51", "production.confirmation", ["yield 68"]), entry)
