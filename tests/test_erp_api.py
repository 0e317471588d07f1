"""The ERP API simulator, run as a real process on a free port with a real SQLite file."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_LINE = re.compile(r"^erp-api listening on (http://127\.0\.0\.1:\d+)$")
START_TIMEOUT_SECONDS = 10.0
CLOUDEVENT = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"


@dataclass
class RunningErp:
    process: subprocess.Popen[str]
    client: httpx.Client

    def stop(self) -> tuple[int, str]:
        """SIGTERM the simulator; return its exit code and the rest of its output."""
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            remaining, _ = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            remaining, _ = self.process.communicate()
        return self.process.returncode, remaining


def start_erp(db_path: Path, *options: str) -> RunningErp:
    # Port 0 lets the kernel pick a free port; the ready line says which one.
    process = subprocess.Popen(
        [sys.executable, "-m", "simulators.erp_api", "--port", "0", "--db", str(db_path), *options],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    # A simulator that hangs before its ready line is killed, which ends the reads below.
    watchdog = threading.Timer(START_TIMEOUT_SECONDS, process.kill)
    watchdog.start()
    seen: list[str] = []
    try:
        for line in process.stdout:
            seen.append(line)
            if match := READY_LINE.match(line.strip()):
                return RunningErp(process, httpx.Client(base_url=match.group(1), timeout=5.0))
    finally:
        watchdog.cancel()
    process.kill()
    process.wait()
    pytest.fail("ERP simulator did not become ready:\n" + "".join(seen))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "erp.sqlite"


@pytest.fixture
def erp(db_path: Path) -> Iterator[RunningErp]:
    running = start_erp(db_path)
    yield running
    running.stop()


def confirmation(event_id: str, order_id: str = "4711", good_count: str = "100") -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "plantsync://1010/press-01",
        "type": "production.confirmation",
        "time": "2026-03-01T08:00:00Z",
        "subject": f"order/{order_id}/op/0010",
        "partitionkey": order_id,
        "sequence": "1",
        "data": {"order_id": order_id, "yield": {"value": good_count, "uom": "H87"}},
    }


def post_event(
    erp: RunningErp, event: dict[str, Any], key: str | None = None, content_type: str = CLOUDEVENT
) -> httpx.Response:
    headers = {"Content-Type": content_type}
    if key is not None:
        headers["Idempotency-Key"] = key
    return erp.client.post("/api/events", json=event, headers=headers)


def set_faults(erp: RunningErp, **settings: float) -> dict[str, Any]:
    response = erp.client.post("/_sim/faults", json=settings)
    assert response.status_code == 200, response.text
    faults: dict[str, Any] = response.json()
    return faults


def test_stores_events_and_lists_them_in_arrival_order(erp: RunningErp) -> None:
    first = post_event(erp, confirmation("evt-1"), key="evt-1")
    second = post_event(
        erp, confirmation("evt-2", order_id="4712"), key="evt-2", content_type="application/json"
    )
    inspection = {**confirmation("evt-3"), "type": "inspection.requested"}
    third = post_event(erp, inspection, key="evt-3")

    assert first.status_code == 201
    assert first.json() == {"reference": "ERP-000001", "duplicate": False}
    assert second.json() == {"reference": "ERP-000002", "duplicate": False}
    assert third.json()["reference"] == "ERP-000003"

    listed = erp.client.get("/events").json()
    assert [row["reference"] for row in listed] == ["ERP-000001", "ERP-000002", "ERP-000003"]
    row = listed[1]
    assert row["key"] == row["id"] == "evt-2"
    assert row["type"] == "production.confirmation"
    assert row["subject"] == "order/4712/op/0010"
    assert row["partitionkey"] == "4712"
    assert row["duplicates"] == 0
    assert row["received_at"].endswith("Z")
    assert row["event"] == confirmation("evt-2", order_id="4712")

    only_inspections = erp.client.get("/events", params={"type": "inspection.requested"}).json()
    assert [row["id"] for row in only_inspections] == ["evt-3"]
    assert erp.client.get("/healthz").status_code == 200


def test_repeated_idempotency_key_answers_same_reference_and_stores_once(erp: RunningErp) -> None:
    event = confirmation("evt-1")
    created = post_event(erp, event, key="evt-1")
    repeats = [post_event(erp, event, key="evt-1") for _ in range(2)]

    assert created.status_code == 201
    for repeat in repeats:
        assert repeat.status_code == 200
        assert repeat.json() == {"reference": "ERP-000001", "duplicate": True}
    listed = erp.client.get("/events").json()
    assert len(listed) == 1
    assert listed[0]["duplicates"] == 2
    assert erp.client.get("/stats").json() == {
        "received": 3,
        "unique": 1,
        "duplicates": 2,
        "errors_injected": 0,
    }


def test_missing_idempotency_key_is_rejected(erp: RunningErp) -> None:
    response = post_event(erp, confirmation("evt-1"))

    assert response.status_code == 400
    assert response.json() == {"error": "Idempotency-Key header is required"}
    assert erp.client.get("/events").json() == []


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (b"{not json", CLOUDEVENT, 400, "not valid JSON"),
        (b"[1, 2]", CLOUDEVENT, 400, "JSON object"),
        (b'{"specversion": "1.0", "type": "x"}', CLOUDEVENT, 400, "id"),
        (b'{"specversion": "1.0", "id": "evt-1"}', CLOUDEVENT, 400, "type"),
        (b'{"id": "evt-1", "type": "x"}', "text/plain", 415, "content type"),
    ],
)
def test_malformed_requests_are_rejected_with_a_reason(
    erp: RunningErp, body: bytes, content_type: str, status: int, message: str
) -> None:
    response = erp.client.post(
        "/api/events",
        content=body,
        headers={"Content-Type": content_type, "Idempotency-Key": "k-1"},
    )

    assert response.status_code == status
    assert message in response.json()["error"]
    assert erp.client.get("/stats").json()["unique"] == 0


def test_batch_answers_per_event_and_keys_on_event_id(erp: RunningErp) -> None:
    assert post_event(erp, confirmation("evt-1"), key="evt-1").status_code == 201
    batch = [confirmation("evt-1"), confirmation("evt-2"), {"id": "evt-3"}, confirmation("evt-2")]

    response = erp.client.post("/api/events:batch", json=batch, headers={"Content-Type": BATCH})

    assert response.status_code == 200
    outcomes = response.json()
    assert [(o["id"], o["status"], o["reference"]) for o in outcomes] == [
        ("evt-1", 200, "ERP-000001"),
        ("evt-2", 201, "ERP-000002"),
        ("evt-3", 400, None),
        ("evt-2", 200, "ERP-000002"),
    ]
    assert "type" in outcomes[2]["error"]
    assert outcomes[1]["error"] is None
    assert erp.client.get("/stats").json()["unique"] == 2
    wrong_type = erp.client.post("/api/events:batch", json=batch)
    assert wrong_type.status_code == 415


def test_injected_429_carries_retry_after_and_is_counted(db_path: Path) -> None:
    erp = start_erp(db_path, "--error-rate", "1", "--error-status", "429", "--retry-after", "7")
    try:
        refused = post_event(erp, confirmation("evt-1"), key="evt-1")
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "7"
        assert erp.client.get("/events").json() == []

        assert set_faults(erp, error_rate=0) == {
            "error_rate": 0,
            "error_status": 429,
            "retry_after": 7,
            "latency": 0.0,
        }
        assert post_event(erp, confirmation("evt-1"), key="evt-1").status_code == 201
        assert erp.client.get("/stats").json()["errors_injected"] == 1

        set_faults(erp, error_rate=1, error_status=500)
        failed = post_event(erp, confirmation("evt-2"), key="evt-2")
        assert failed.status_code == 500
        assert "Retry-After" not in failed.headers
        assert erp.client.get("/_sim/faults").json()["error_status"] == 500
        assert erp.client.post("/_sim/faults", json={"error_rate": 2}).status_code == 400
        assert erp.client.post("/_sim/faults", json={"speed": 1}).status_code == 400
    finally:
        erp.stop()


def test_latency_knob_delays_each_delivery(erp: RunningErp) -> None:
    set_faults(erp, latency=0.3)

    started = time.monotonic()
    response = post_event(erp, confirmation("evt-1"), key="evt-1")
    elapsed = time.monotonic() - started

    assert response.status_code == 201
    assert elapsed >= 0.3


def test_store_survives_a_restart_on_the_same_file(db_path: Path) -> None:
    first_run = start_erp(db_path)
    post_event(first_run, confirmation("evt-1"), key="evt-1")
    post_event(first_run, confirmation("evt-2"), key="evt-2")
    exit_code, _ = first_run.stop()
    assert exit_code == 0

    second_run = start_erp(db_path)
    try:
        assert [row["id"] for row in second_run.client.get("/events").json()] == ["evt-1", "evt-2"]
        repeat = post_event(second_run, confirmation("evt-1"), key="evt-1")
        assert (repeat.status_code, repeat.json()["reference"]) == (200, "ERP-000001")
        fresh = post_event(second_run, confirmation("evt-3"), key="evt-3")
        assert fresh.json()["reference"] == "ERP-000003"
    finally:
        second_run.stop()
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_log_requests_prints_what_erp_received_and_sigterm_exits_cleanly(db_path: Path) -> None:
    erp = start_erp(db_path, "--log-requests")
    post_event(erp, confirmation("evt-1"), key="evt-1")
    post_event(erp, confirmation("evt-1"), key="evt-1")

    exit_code, output = erp.stop()

    assert exit_code == 0
    assert output.splitlines() == [
        "ERP received production.confirmation subject=order/4711/op/0010 id=evt-1 -> ERP-000001",
        "ERP received production.confirmation subject=order/4711/op/0010 id=evt-1 -> ERP-000001"
        " (duplicate)",
    ]


def test_reset_clears_the_store(erp: RunningErp) -> None:
    post_event(erp, confirmation("evt-1"), key="evt-1")

    assert erp.client.post("/_sim/reset").json() == {"cleared": 1}
    assert erp.client.get("/stats").json()["received"] == 0
    assert post_event(erp, confirmation("evt-1"), key="evt-1").status_code == 201
