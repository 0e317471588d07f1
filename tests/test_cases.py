"""Golden cases: `tests/cases/<name>/{config.yaml, input.jsonl, expected.jsonl}`.

Each case replays its input through the real pipeline, rules and outbox (`edge.replay`), and the
committed events (and rejected inputs) must equal `expected.jsonl`, line for line. After a
deliberate change, regenerate with `UPDATE_GOLDENS=1 pytest tests/test_cases.py` and read the
diff before committing it: the expected files are the contract with ERP and QMS.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edge.config import load_config
from edge.replay import read_lines, replay

CASES = sorted(p for p in (Path(__file__).parent / "cases").iterdir() if p.is_dir())


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
    expected = expected_path.read_text().splitlines()
    assert rendered == expected


def test_there_are_at_least_twelve_cases() -> None:
    assert len(CASES) >= 12
