"""Exceptions are raised once per condition and cleared once, also across a restart (the board
is a SQLite file), and reach the outbox as one delivery per raise and per clear."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from buffer.outbox import Outbox
from edge.config.errors import ConfigError
from edge.config.loader import parse_config
from edge.model.envelope import build_event
from edge.model.events import NonconformanceRaised
from edge.ops.exceptions import Condition, ExceptionBoard, listing
from edge.ops.ledger import OrderLedger
from edge.ops.watch import ExceptionWatch
from tests.conftest import Mosquitto

WHEN = datetime(2026, 12, 4, 6, 0, tzinfo=UTC)


def config_text(tmp_path: Path) -> str:
    return yaml.safe_dump(
        {
            "site": "1010",
            "data_dir": str(tmp_path),
            "destinations": {"hook": {"base_url": "http://127.0.0.1:9", "path": "/hook"}},
            "exceptions": {
                "roles": {"integration": {"webhook": ["hook"]}, "supervisor": {}, "quality": {}}
            },
        }
    )


@pytest.mark.integration
def test_raised_once_cleared_once_and_one_delivery_each(tmp_path: Path) -> None:
    config = parse_config(config_text(tmp_path))

    async def run() -> list[tuple[str, str]]:
        async with Outbox.open(tmp_path / "outbox.db") as outbox:
            ledger = OrderLedger.open(tmp_path)
            board = ExceptionBoard(config, ledger.db, outbox)
            lot = Condition("lot L1", "lot L1 is on hold (qms)", {"lot_id": "L1"})
            for _ in range(3):  # seen at every check
                board.sync("held_lot", [lot])
                board.sync("dead_letter", [Condition("event e1 to erp", "refused")])
            await board.notify()
            ledger.close()
            # A restart: a new board on the same file raises nothing again.
            ledger = OrderLedger.open(tmp_path)
            board = ExceptionBoard(config, ledger.db, outbox)
            board.sync("held_lot", [lot])
            board.sync("dead_letter", [Condition("event e1 to erp", "refused")])
            assert board.raised == dict.fromkeys(board.raised, 0)
            board.sync("dead_letter", [])  # retried: the condition ended
            board.sync("dead_letter", [])
            assert board.clear_exception("dead_letter", "event e1 to erp") is False
            await board.notify()
            rows = listing(ledger.db)
            assert [(r["kind"], r["state"], r["roles"]) for r in rows] == [
                ("dead_letter", "closed", ["integration"]),
                ("held_lot", "open", ["supervisor"]),
            ]
            ledger.close()
            held = await outbox.deliveries(destination="hook", limit=100)
            shown = [await outbox.show(str(row["id"])) for row in held]
            return [
                (json.loads(s["payload"])["type"], json.loads(s["payload"])["subject"])
                for s in shown
                if s
            ]

    # Only the integration role has a webhook: the dead letter's raise and clear, once each.
    assert asyncio.run(run()) == [
        ("com.plantsync.edge.exception.raised.v1", "event e1 to erp"),
        ("com.plantsync.edge.exception.cleared.v1", "event e1 to erp"),
    ]


def test_a_nonconformance_is_open_until_its_lot_is_decided(tmp_path: Path) -> None:
    config = parse_config(config_text(tmp_path))
    ledger = OrderLedger.open(tmp_path)
    board = ExceptionBoard(config, ledger.db)
    watch = ExceptionWatch(None, board, ledger.db)  # type: ignore[arg-type]
    raised = build_event(
        NonconformanceRaised(
            site="1010",
            order_id="1000123",
            lot_id="L1",
            defect_code="LIM",
            severity="major",
            occurred_at=WHEN,
        ),
        natural_key=("nc", 1),
        subject="L1",
        partitionkey="1000123",
        sequence=1,
    )
    ledger.record_events([raised], now=100.0)
    (open_one,) = watch._nonconformances()
    assert open_one.subject == f"nonconformance {raised.id}"
    assert open_one.correlation == {"event_id": raised.id, "order_id": "1000123", "lot_id": "L1"}
    ledger.db.execute(
        "INSERT INTO order_events(event_id, event_type, order_id, lot_id,"
        " disposition, committed_at) VALUES ('d1', 'lot.disposition', '1000123',"
        " 'L1', 'reject', 101.0)"
    )
    assert watch._nonconformances() == []
    ledger.close()


def test_check_names_what_the_sections_refer_to(tmp_path: Path) -> None:
    text = yaml.safe_dump(
        {
            "site": "1010",
            "data_dir": str(tmp_path),
            "destinations": {"erp": {"base_url": "http://127.0.0.1:9", "profile": "qms_rest"}},
            "reconcile": {"erp": "erpp"},
            "exceptions": {
                "routes": {"held_lot": ["supervsor"]},
                "roles": {
                    "supervisor": {"webhook": ["erp"], "mqtt": {"driver": "mes", "topic": "t"}}
                },
            },
        }
    )
    try:
        parse_config(text, "plant.yaml")
    except ConfigError as exc:
        problems = "\n".join(exc.problems)
    else:
        raise AssertionError("the config was accepted")
    assert "reconcile.erp: no destination named 'erpp'" in problems
    assert "exceptions.routes.held_lot[0]: no role named 'supervsor'" in problems
    assert (
        "exceptions.roles.supervisor.webhook[0]: destination 'erp' has profile qms_rest; a "
        "webhook is a canonical destination"
    ) in problems
    assert "exceptions.roles.supervisor.mqtt.driver: no MQTT driver named 'mes'" in problems


@pytest.mark.integration
async def test_an_mqtt_exception_is_handed_on_only_once_the_broker_acknowledged_it(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """The broker is away when an exception is raised, and the gateway stops before it is
    back: the raise stays due in the board's file, and the next board publishes it once the
    broker is there. The oracle is a separate subscriber's record of what the broker sent."""
    from tests.test_reconcile import TopicWatcher

    topic = "plantsync/1010/exceptions/integration"
    text = yaml.safe_dump(
        {
            "site": "1010",
            "data_dir": str(tmp_path),
            "drivers": [
                {
                    "name": "mes",
                    "type": "mqtt",
                    "host": mosquitto.host,
                    "port": mosquitto.port,
                    "topics": [{"filter": "mes/#", "event": "material.consumed"}],
                }
            ],
            "destinations": {"hook": {"base_url": "http://127.0.0.1:9", "path": "/hook"}},
            "exceptions": {
                "roles": {
                    "integration": {
                        "mqtt": {"driver": "mes", "topic": topic},
                        "webhook": ["hook"],
                    },
                    "supervisor": {},
                    "quality": {},
                }
            },
        }
    )
    config = parse_config(text)
    mosquitto.stop()
    ledger = OrderLedger.open(tmp_path)
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        board = ExceptionBoard(config, ledger.db, outbox)
        board.start()
        board.raise_exception("dead_letter", Condition("event e1 to erp", "refused by erp"))
        for _ in range(3):  # tried again while the broker stays away
            await board.notify()
            assert board.unpublished == 1
        # The webhook's copy went into the outbox once, not once per try.
        assert outbox.stats.duplicates_ignored == 0
        assert (await outbox.counts())["hook"].pending == 1
        board.stop()  # the gateway stops while the broker is away
    ledger.close()

    mosquitto.start()
    watcher = TopicWatcher(mosquitto, topic)
    ledger = OrderLedger.open(tmp_path)
    board = ExceptionBoard(config, ledger.db)
    board.start()
    try:
        async with asyncio.timeout(30):
            async with asyncio.TaskGroup() as group:
                task = group.create_task(board.run(), name="exceptions")
                while not watcher.messages:
                    await asyncio.sleep(0.05)
                task.cancel()
        assert board.unpublished == 0
    finally:
        board.stop()
        watcher.stop()
        ledger.close()
    (message,) = watcher.messages
    assert message["type"] == "com.plantsync.edge.exception.raised.v1"
    assert message["data"]["subject"] == "event e1 to erp"
