"""The pipeline on a real outbox: MES messages become canonical events or input dead letters,
in the same commit as the rules' state."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from buffer.outbox import Outbox
from drivers.base import MesMessage, RejectedMessage, Sample
from edge.config.loader import parse_config
from edge.runtime.pipeline import Pipeline

CONFIG = """
site: "1010"
data_dir: /tmp/unused
drivers:
  - {name: plc, type: modbus, host: 127.0.0.1, tags: [{name: good, address: 0, type: uint32}]}
machines:
  - {id: press-01, signals: {good: plc.good}, order: {order_id: "42"},
     confirm: {every_units: 10}}
destinations:
  erp: {base_url: "http://127.0.0.1:1"}
routes:
  production.confirmation: [erp]
  material.consumed: [erp]
"""


def consumption(message_id: str, quantity: object = Decimal("12.5"), **extra: object) -> MesMessage:
    fields = {
        "order_id": "42",
        "material": "RM-1",
        "lot_id": "L-7",
        "quantity": {"value": quantity, "uom": "KGM"},
        **extra,
    }
    return MesMessage(
        "mes",
        "mes/1010/press-01/consumption",
        "material.consumed",
        fields,
        message_id,
        1_800_000_000.0,
    )


async def test_mes_messages_become_events_or_input_dead_letters(tmp_path: Path) -> None:
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        pipeline = Pipeline(parse_config(CONFIG, "p", {}), outbox, {})
        await pipeline.on_readings(
            [
                Sample("plc", "good", 0, 1.0),
                consumption("m-1"),
                consumption("m-2", quantity="-3"),
                RejectedMessage(
                    "mes", "mes/1010/x/consumption", b"{not json", "not JSON: ...", 2.0
                ),
                Sample("plc", "good", 10, 2.0),
            ]
        )
        (first,) = await outbox.lease("erp", 5)
        assert first.event_type == "material.consumed"  # before the confirmation: commit order
        event = json.loads(first.payload)
        assert event["data"]["quantity"] == {"value": "12.5", "uom": "KGM"}
        assert event["partitionkey"] == "42"
        rejected = await outbox.rejected_inputs()
        reasons = sorted(r["reason"] for r in rejected)
        assert any("quantity.value" in r for r in reasons), reasons
        assert any("not JSON" in r for r in reasons)
        assert pipeline.rejected_by_driver["mes"] == 2
        # A redelivered MES message derives the same id: the outbox ignores it.
        await pipeline.on_readings([consumption("m-1")])
        assert outbox.stats.duplicates_ignored == 1

    # The MES sequence and rule state came back from the same commits.
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        saved = await outbox.load_state()
        assert saved["pipeline:mes-sequence"] == "2"
        assert json.loads(saved["machine:press-01"])["good"]["total"] == 10


async def test_genealogy_completeness_per_order(tmp_path: Path) -> None:
    from edge.cli.replay import read_lines, replay
    from edge.config.loader import load_config
    from edge.runtime.mes_intake import Genealogy
    from edge.runtime.pipeline import GENEALOGY_KEY

    case = Path(__file__).parent / "cases" / "genealogy_and_consumption"
    config = load_config(case / "config.yaml", {})
    with (case / "input.jsonl").open() as source:
        await replay(config, read_lines(source), tmp_path)
    async with Outbox.open(tmp_path / "replay-outbox.db") as outbox:
        genealogy = Genealogy((await outbox.load_state())[GENEALOGY_KEY])
    # LOT-A names inputs of both required materials; LOT-B lacks RM-2; the redelivered LOT-A
    # (without inputs) does not change the first report.
    assert genealogy.figures() == {"4711": {"lots": 2, "complete": 1, "completeness": 0.5}}


def test_genealogy_holds_a_bounded_number_of_lots_per_order() -> None:
    """An order that produces lots for months: memory and the state dumped with every commit
    stay bounded, and the figures still count every lot (soak-mem)."""
    from edge.runtime.mes_intake import KEEP_LOTS_PER_ORDER, Genealogy

    genealogy = Genealogy(None)
    genealogy.require("4711", ["RM-1", "RM-2"])
    produced = KEEP_LOTS_PER_ORDER * 3 + 7
    for number in range(produced):  # every third lot lacks RM-2
        inputs = ["RM-1"] if number % 3 == 0 else ["RM-1", "RM-2"]
        genealogy.produced("4711", f"LOT-{number:06d}", inputs)
    lots = genealogy.orders["4711"]["lots"]
    assert len(lots) <= KEEP_LOTS_PER_ORDER
    # Counted by hand: lots 0, 3, 6, ... are incomplete.
    incomplete = len(range(0, produced, 3))
    expected = {
        "lots": produced,
        "complete": produced - incomplete,
        "completeness": round((produced - incomplete) / produced, 4),
    }
    assert genealogy.figures() == {"4711": expected}
    # The newest lot is still known one by one: its redelivery keeps the first verdict.
    last = produced - 1
    assert genealogy.produced("4711", f"LOT-{last:06d}", []) is bool(last % 3)
    assert genealogy.figures() == {"4711": expected}
    # Saved and read back (a restart): the same figures, and a dump no bigger than its bound.
    assert Genealogy(genealogy.dump()).figures() == {"4711": expected}
    assert len(genealogy.dump()) < 40 * KEEP_LOTS_PER_ORDER


def test_genealogy_drops_the_oldest_lot_also_after_a_restart() -> None:
    """Lot ids that do not sort in production order (a plant's own numbering): after a restart
    the lot folded into the counts is still the oldest, so a redelivered report of a recent
    lot keeps its first verdict instead of being counted again."""
    from edge.runtime.mes_intake import KEEP_LOTS_PER_ORDER, Genealogy

    genealogy = Genealogy(None)
    genealogy.require("4711", ["RM-1"])
    # Produced newest-id-first: Z-... before A-..., so a sorted dump would put them backwards.
    names = [f"Z{KEEP_LOTS_PER_ORDER - n:06d}" for n in range(KEEP_LOTS_PER_ORDER)]
    for name in names:
        genealogy.produced("4711", name, ["RM-1"])
    restarted = Genealogy(genealogy.dump())
    restarted.produced("4711", "A000000", [])  # one more: the oldest (names[0]) is folded
    held = restarted.orders["4711"]["lots"]
    assert names[0] not in held and names[-1] in held and "A000000" in held
    # The most recent lots' redelivery counts nothing again (counted by hand: 1,001 lots, one
    # incomplete).
    restarted.produced("4711", names[-1], ["RM-1"])
    assert restarted.figures()["4711"] == {
        "lots": KEEP_LOTS_PER_ORDER + 1,
        "complete": KEEP_LOTS_PER_ORDER,
        "completeness": round(KEEP_LOTS_PER_ORDER / (KEEP_LOTS_PER_ORDER + 1), 4),
    }
