"""One builder of status, readiness and alarms: the daemon and `plantsync status` (from the
database, no daemon running) say the same things in the same words."""

from __future__ import annotations

import asyncio
from pathlib import Path

from buffer.outbox import DestinationCounts
from edge.cli.status import from_database
from edge.config.models import ApiConfig, LocalAccess
from edge.ops.status import (
    STOPPED,
    DestinationFacts,
    DriverFacts,
    GatewayFacts,
    OutboxFacts,
    readiness,
    status_line,
    status_report,
)

# The daemon's words, as the fault scenarios and the README's alarm table know them.
MOVED_ASIDE = "the outbox database was damaged at start and moved aside: "
DEAD = (
    "3 business event(s) for destination erp are dead letters (refused for good): look "
    "with plantsync outbox list --state dead, then retry or purge-dead them with --reason"
)


def facts(**changes: object) -> GatewayFacts:
    base: dict[str, object] = dict(
        site="1010",
        phase="running",
        ready_max_backlog_age=300.0,
        drivers=[DriverFacts("plc", connected=True)],
        destinations=[DestinationFacts("erp", reachable=True)],
        counts={"erp": DestinationCounts(pending=1, dead=3)},
        outbox=OutboxFacts(recovered_from="outbox.db.corrupt-1 (file is not a database)"),
        configured_destinations=frozenset({"erp"}),
    )
    return GatewayFacts(**{**base, **changes})  # type: ignore[arg-type]


def test_every_answer_carries_the_same_alarms() -> None:
    seen = facts()
    report, ready = status_report(seen), readiness(seen)
    expected = [MOVED_ASIDE + "outbox.db.corrupt-1 (file is not a database)", DEAD]
    assert report["alarms"] == report["outbox"]["alarms"] == ready["alarms"] == expected
    assert ready["ready"] and report["ready"]
    assert status_line(seen) == (
        "drivers 1/1 connected; outbox 1 pending (0 retrying), 3 dead; back-pressure off"
    )


def test_unknown_is_not_called_down() -> None:
    """Seen from the database, a driver's connection and a destination's reachability are
    unknown: no reason says a driver is not connected, no note says a destination fails, and
    without a config no destination is called unconfigured."""
    seen = facts(
        phase=STOPPED,
        drivers=[DriverFacts("plc")],
        destinations=[DestinationFacts("erp")],
        configured_destinations=None,
        counts={"erp": DestinationCounts(), "old": DestinationCounts(pending=2)},
    )
    report = status_report(seen)
    assert report["not_ready_reasons"] == ["the gateway is stopped"]
    assert report["degraded"] == [] and report["unconfigured_destinations"] == {}
    assert status_line(seen).startswith("stopped: drivers 0/1 connected")


def test_status_from_the_database_words_alarms_as_the_daemon(tmp_path: Path) -> None:
    (tmp_path / "outbox.db").write_bytes(b"garbage" * 1000)  # damaged: moved aside at open
    access = LocalAccess(ApiConfig(), tmp_path, "1010")
    report = asyncio.run(from_database(access, tmp_path / "missing.yaml"))
    assert len(report["alarms"]) == 1 and report["alarms"][0].startswith(MOVED_ASIDE)
    assert report["outbox"]["alarms"] == report["alarms"]
    assert report["phase"] == STOPPED and report["machines"] == [] and report["drivers"] == []
    assert report["config_note"] is not None
