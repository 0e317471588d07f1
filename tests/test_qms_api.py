"""The QMS API simulator, run as a real process on a free port with a real SQLite file."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.sim_process import RunningSimulator, start_simulator

pytestmark = pytest.mark.integration  # every test runs the simulator as a process

WAIT_SECONDS = 5.0


def start_qms(db_path: Path, *options: str) -> RunningSimulator:
    return start_simulator("qms-api", db_path, *options)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "qms.sqlite"


@pytest.fixture
def qms(db_path: Path) -> Iterator[RunningSimulator]:
    """Decisions at once, no authentication."""
    running = start_qms(db_path, "--decision-delay", "0")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def shared_qms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSimulator]:
    """One simulator for many small cases, reset before each."""
    running = start_qms(tmp_path_factory.mktemp("qms") / "qms.sqlite", "--decision-delay", "0")
    yield running
    running.stop()


def newton(value: str) -> dict[str, str]:
    return {"value": value, "uom": "NEW"}


def inspection(
    external_id: str, lot_id: str | None = "L-1", measured: str | None = "13.2", **changes: Any
) -> dict[str, Any]:
    """What the gateway's qms_rest profile sends for an inspection.requested (nulls included)."""
    body: dict[str, Any] = {
        "external_id": external_id,
        "site": "1010",
        "order_id": "4711",
        "lot_id": lot_id,
        "material": "FG-4711",
        "machine_id": "press-01",
        "trigger": "limit_violation",
        "characteristic": "press-01.force",
        "measured_value": None if measured is None else newton(measured),
        "lower_limit": newton("12.0"),
        "upper_limit": newton("15.0"),
        "reason": None,
        "requested_at": "2026-03-01T08:00:00Z",
    }
    return body | changes


def nonconformance(external_id: str, lot_id: str) -> dict[str, Any]:
    return {
        "external_id": external_id,
        "site": "1010",
        "order_id": "4711",
        "lot_id": lot_id,
        "material": None,
        "machine_id": "press-01",
        "defect_code": "FORCE",
        "severity": "major",
        "affected_quantity": {"value": "12", "uom": "H87"},
        "description": None,
    }


def post(
    qms: RunningSimulator, path: str, body: dict[str, Any], key: str | None = None, **headers: str
) -> httpx.Response:
    if key is not None:
        headers["Idempotency-Key"] = key
    return qms.client.post(f"/api/v1/{path}", json=body, headers=headers)


def feed(qms: RunningSimulator, after: int = 0, **headers: str) -> dict[str, Any]:
    response = qms.client.get("/api/v1/dispositions", params={"after": after}, headers=headers)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


def wait_for(check: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT_SECONDS
    while not (outcome := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)
    return outcome


def decisions(qms: RunningSimulator) -> list[tuple[str, str]]:
    return [(entry["lot_id"], entry["disposition"]) for entry in feed(qms)["dispositions"]]


def test_in_spec_request_passes_and_the_release_reaches_the_feed_after_the_delay(
    db_path: Path,
) -> None:
    qms = start_qms(db_path, "--decision-delay", "0.5")
    try:
        assert qms.client.get("/api/v1/lots/L-1/disposition").json() == {"error": "unknown lot"}
        started = time.monotonic()
        created = post(qms, "inspections", inspection("evt-1"), key="evt-1")
        assert (created.status_code, created.json()) == (
            201,
            {"inspection_id": "INS-000001", "status": "open"},
        )
        assert qms.client.get("/api/v1/lots/L-1/disposition").status_code == 404
        assert feed(qms) == {"dispositions": [], "next": 0}
        assert qms.client.get("/api/v1/inspections/INS-000001").json()["status"] == "open"

        page = wait_for(lambda: feed(qms)["dispositions"] and feed(qms), "the release")
        assert time.monotonic() - started >= 0.5
        (entry,) = page["dispositions"]
        assert entry["lot_id"] == "L-1"
        assert entry["disposition"] == "release"
        assert entry["inspection_id"] == "INS-000001"
        assert entry["order_id"] == "4711"
        assert entry["material"] == "FG-4711"
        assert entry["source"] == "inspection"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["decided_at"])
        assert page["next"] == entry["cursor"]
        assert feed(qms, after=page["next"]) == {"dispositions": [], "next": page["next"]}

        lot = qms.client.get("/api/v1/lots/L-1/disposition")
        assert lot.status_code == 200
        assert lot.json() == entry
        shown = qms.client.get("/api/v1/inspections/INS-000001").json()
        assert (shown["status"], shown["result"], shown["external_id"]) == (
            "closed",
            "pass",
            "evt-1",
        )
        assert shown["measured_value"] == newton("13.2")
        assert qms.client.get("/api/v1/inspections/INS-999999").status_code == 404
        assert [row["lot_id"] for row in qms.client.get("/_sim/lots").json()] == ["L-1"]
        assert len(qms.client.get("/_sim/inspections").json()) == 1
    finally:
        qms.stop()


def test_out_of_spec_fails_and_a_rejected_lot_stays_rejected(qms: RunningSimulator) -> None:
    # Decision delay 0: the inspection is decided within its own request.
    failed = post(qms, "inspections", inspection("evt-1", measured="15.4"), key="evt-1")
    assert failed.json() == {"inspection_id": "INS-000001", "status": "closed"}
    post(qms, "inspections", inspection("evt-2", measured="13.0"), key="evt-2")
    # On the limit is within the limits.
    post(qms, "inspections", inspection("evt-3", lot_id="L-2", measured="12.0"), key="evt-3")
    post(qms, "inspections", inspection("evt-4", lot_id="L-2", measured="11.9"), key="evt-4")

    assert decisions(qms) == [("L-1", "reject"), ("L-2", "release"), ("L-2", "reject")]
    cursors = [entry["cursor"] for entry in feed(qms)["dispositions"]]
    assert cursors == sorted(cursors) and len(set(cursors)) == 3
    shown = qms.client.get("/api/v1/inspections/INS-000001").json()
    assert (shown["result"], shown["result_reason"]) == (
        "fail",
        "press-01.force 15.4 NEW above upper limit 15.0",
    )
    assert qms.client.get("/api/v1/inspections/INS-000002").json()["result"] == "pass"
    assert qms.client.get("/api/v1/lots/L-1/disposition").json()["inspection_id"] == "INS-000001"
    paged = feed(qms, after=cursors[0])
    assert [entry["cursor"] for entry in paged["dispositions"]] == cursors[1:]
    one = qms.client.get("/api/v1/dispositions", params={"after": 0, "limit": 1}).json()
    assert one["next"] == cursors[0]


def test_reject_and_hold_lists_and_forced_decisions(db_path: Path) -> None:
    qms = start_qms(db_path, "--decision-delay", "0", "--reject-lot", "L-R", "--hold-lot", "L-H")
    try:
        post(qms, "inspections", inspection("evt-1", lot_id="L-R"), key="evt-1")
        post(qms, "inspections", inspection("evt-2", lot_id="L-H", measured="99"), key="evt-2")
        assert decisions(qms) == [("L-R", "reject"), ("L-H", "hold")]

        forced = qms.client.post(
            "/_sim/decide", json={"lot_id": "L-H", "disposition": "release", "reason": "MRB ok"}
        )
        assert forced.status_code == 200
        assert (forced.json()["disposition"], forced.json()["source"]) == ("release", "forced")
        assert forced.json()["reason"] == "MRB ok"
        # A lot id with a slash (the canonical model allows it), percent-encoded in the path.
        qms.client.post("/_sim/decide", json={"lot_id": "L/9", "disposition": "hold"})
        assert qms.client.get("/api/v1/lots/L%2F9/disposition").json()["disposition"] == "hold"
        assert qms.client.get("/api/v1/lots/L-H/disposition").json()["disposition"] == "release"
        assert decisions(qms)[-2:] == [("L-H", "release"), ("L/9", "hold")]

        refused = qms.client.post("/_sim/decide", json={"lot_id": "L-H", "disposition": "ok"})
        assert (refused.status_code, refused.json()["field"]) == (400, "disposition")
    finally:
        qms.stop()


def test_nonconformance_holds_a_lot_unless_it_is_rejected(qms: RunningSimulator) -> None:
    created = post(qms, "nonconformances", nonconformance("nc-1", "L-1"), key="nc-1")
    assert (created.status_code, created.json()) == (201, {"nonconformance_id": "NC-000001"})
    post(qms, "inspections", inspection("evt-1", lot_id="L-2", measured="20"), key="evt-1")
    post(qms, "nonconformances", nonconformance("nc-2", "L-2"), key="nc-2")
    # A passed inspection does not lift a hold: that takes a decision.
    post(qms, "inspections", inspection("evt-2", lot_id="L-1"), key="evt-2")

    assert decisions(qms) == [("L-1", "hold"), ("L-2", "reject")]
    lot = qms.client.get("/api/v1/lots/L-1/disposition").json()
    assert lot["reason"] == "nonconformance NC-000001: FORCE (major)"
    assert lot["inspection_id"] is None


def test_results_count_for_their_inspection_or_reject_the_lot(db_path: Path) -> None:
    qms = start_qms(db_path, "--decision-delay", "0.3")
    try:
        post(qms, "inspections", inspection("evt-1", lot_id="L-1"), key="evt-1")
        result = {
            "external_id": "res-1",
            "site": "1010",
            "order_id": None,
            "lot_id": None,
            "material": None,
            "machine_id": None,
            "inspection_id": "INS-000001",
            "characteristic": "visual",
            "measured_value": None,
            "result": "fail",
        }
        linked = post(qms, "results", result, key="res-1")
        assert linked.status_code == 400
        assert linked.json()["field"] == "lot_id"
        linked = post(qms, "results", result | {"lot_id": "L-1"}, key="res-1")
        assert (linked.status_code, linked.json()) == (
            201,
            {"result_id": "RES-000001", "inspection_id": "INS-000001"},
        )
        # The measured value is in spec, but the linked result failed.
        wait_for(lambda: decisions(qms), "the decision")
        assert decisions(qms) == [("L-1", "reject")]
        shown = qms.client.get("/api/v1/inspections/INS-000001").json()
        assert shown["result"] == "fail"
        assert [row["result_id"] for row in shown["results"]] == ["RES-000001"]

        unlinked = result | {"external_id": "res-2", "inspection_id": None, "lot_id": "L-3"}
        assert post(qms, "results", unlinked, key="res-2").status_code == 201
        assert decisions(qms)[-1] == ("L-3", "reject")
        unknown = post(qms, "results", result | {"inspection_id": "INS-424242", "lot_id": "L-1"})
        assert (unknown.status_code, unknown.json()["field"]) == (400, "inspection_id")
    finally:
        qms.stop()


def test_idempotency_key_replays_the_first_answer(qms: RunningSimulator) -> None:
    body = inspection("evt-1")
    first = post(qms, "inspections", body, key="evt-1")
    repeats = [post(qms, "inspections", body, key="evt-1") for _ in range(2)]

    assert first.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    for repeat in repeats:
        assert (repeat.status_code, repeat.json()) == (201, first.json())
        assert repeat.headers["Idempotent-Replayed"] == "true"
    assert qms.client.get("/stats").json() == {
        "received": 3,
        "unique": 1,
        "duplicates": 2,
        "inspections": 1,
        "dispositions": 1,
        "errors_injected": 0,
    }
    other_body = post(qms, "inspections", inspection("evt-1", measured="14"), key="evt-1")
    assert other_body.status_code == 422
    other_path = post(qms, "nonconformances", nonconformance("evt-1", "L-1"), key="evt-1")
    assert other_path.status_code == 422
    # Without a key nothing is deduplicated: that is what the key is for.
    post(qms, "inspections", inspection("evt-9"))
    post(qms, "inspections", inspection("evt-9"))
    assert qms.client.get("/stats").json()["inspections"] == 3

    assert qms.client.post("/_sim/reset").json() == {"cleared": 3}
    assert qms.client.get("/stats").json()["received"] == 0
    again = post(qms, "inspections", body, key="evt-1")
    assert again.json()["inspection_id"] == "INS-000001"
    # Cursors are never handed out twice, so a gateway's persisted cursor stays valid.
    assert feed(qms)["dispositions"][0]["cursor"] > 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"lot_id": None, "order_id": None}, "lot_id"),
        ({"measured_value": {"value": "15,4", "uom": "NEW"}}, "measured_value.value"),
        ({"measured_value": {"value": 15.4, "uom": "NEW"}}, "measured_value.value"),
        ({"upper_limit": {"value": "NaN", "uom": "NEW"}}, "upper_limit.value"),
        ({"upper_limit": {"value": "15", "uom": "MMT"}}, "upper_limit.uom"),
        ({"lower_limit": newton("16")}, "lower_limit"),
        ({"trigger": "whim"}, "trigger"),
        ({"external_id": None}, "external_id"),
        ({"site": None}, "site"),
        ({"requested_at": "yesterday"}, "requested_at"),
        ({"requested_at": "2026-03-01T08:00:00"}, "requested_at"),
    ],
)
def test_invalid_inspection_requests_name_the_field(
    shared_qms: RunningSimulator, change: dict[str, Any], field: str
) -> None:
    qms = shared_qms
    qms.client.post("/_sim/reset")
    response = post(qms, "inspections", inspection("evt-1") | change, key="evt-1")

    assert response.status_code == 400
    assert response.json()["field"] == field
    assert response.json()["error"]
    # A refused request leaves its key free for a corrected one.
    assert post(qms, "inspections", inspection("evt-1"), key="evt-1").status_code == 201


def test_oauth_client_credentials(db_path: Path) -> None:
    qms = start_qms(db_path, "--decision-delay", "0", "--client", "gw:s3cret", "--token-ttl", "1")
    try:
        anonymous = post(qms, "inspections", inspection("evt-1"), key="evt-1")
        assert anonymous.status_code == 401
        assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
        assert qms.client.get("/api/v1/dispositions").status_code == 401

        wrong = qms.client.post(
            "/oauth/token",
            data={"grant_type": "client_credentials", "client_id": "gw", "client_secret": "x"},
        )
        assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_client")
        bad_grant = qms.client.post(
            "/oauth/token", data={"grant_type": "password"}, auth=("gw", "s3cret")
        )
        assert (bad_grant.status_code, bad_grant.json()["error"]) == (400, "unsupported_grant_type")

        # The gateway sends the client in the form; HTTP Basic works as well.
        issued = qms.client.post(
            "/oauth/token",
            data={"grant_type": "client_credentials", "client_id": "gw", "client_secret": "s3cret"},
        )
        assert issued.status_code == 200
        assert issued.json()["token_type"] == "Bearer"
        assert issued.json()["expires_in"] == 1
        basic = qms.client.post(
            "/oauth/token", data={"grant_type": "client_credentials"}, auth=("gw", "s3cret")
        )
        assert basic.status_code == 200
        bearer = {"Authorization": f"Bearer {issued.json()['access_token']}"}
        accepted = post(qms, "inspections", inspection("evt-1"), key="evt-1", **bearer)
        assert accepted.status_code == 201
        assert feed(qms, **bearer)["dispositions"][0]["disposition"] == "release"

        time.sleep(1.1)
        expired = qms.client.get("/api/v1/dispositions", headers=bearer)
        assert expired.status_code == 401
        assert 'error="invalid_token"' in expired.headers["WWW-Authenticate"]
        # The simulator's own endpoints stay open.
        assert qms.client.get("/stats").status_code == 200
        assert qms.client.get("/healthz").status_code == 200
    finally:
        qms.stop()


def test_api_key(db_path: Path) -> None:
    qms = start_qms(db_path, "--decision-delay", "0", "--api-key", "k-123")
    try:
        assert post(qms, "inspections", inspection("evt-1"), key="evt-1").status_code == 401
        wrong = post(qms, "inspections", inspection("evt-1"), key="evt-1", **{"X-API-Key": "k"})
        assert (wrong.status_code, wrong.json()) == (401, {"error": "invalid API key"})
        good = {"X-API-Key": "k-123"}
        assert post(qms, "inspections", inspection("evt-1"), key="evt-1", **good).status_code == 201
        assert qms.client.get("/api/v1/lots/L-1/disposition", headers=good).status_code == 200
        assert qms.client.get("/api/v1/lots/L-1/disposition").status_code == 401
        # No OAuth configured here.
        assert qms.client.post("/oauth/token", data={}).status_code == 404
    finally:
        qms.stop()


def test_faults_429_with_retry_after_sequence_and_outage(db_path: Path) -> None:
    qms = start_qms(
        db_path,
        "--decision-delay",
        "0",
        "--error-rate",
        "1",
        "--error-status",
        "429",
        "--retry-after",
        "7",
    )
    try:
        refused = post(qms, "inspections", inspection("evt-1"), key="evt-1")
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "7"
        assert qms.client.get("/stats").json()["inspections"] == 0

        settings = qms.client.post(
            "/_sim/faults", json={"error_rate": 0, "status_sequence": [503, 500, 201]}
        )
        assert settings.json() == {
            "error_rate": 0,
            "error_status": 429,
            "retry_after": 7,
            "latency": 0.0,
            "outage_seconds": 0.0,
            "status_sequence": [503, 500, 201],
        }
        first = post(qms, "inspections", inspection("evt-1"), key="evt-1")
        assert (first.status_code, first.headers["Retry-After"]) == (503, "7")
        second = post(qms, "inspections", inspection("evt-1"), key="evt-1")
        assert second.status_code == 500
        assert "Retry-After" not in second.headers
        assert post(qms, "inspections", inspection("evt-1"), key="evt-1").status_code == 201
        assert post(qms, "inspections", inspection("evt-2"), key="evt-2").status_code == 201

        qms.client.post("/_sim/faults", json={"outage_seconds": 0.5, "retry_after": 1})
        during = qms.client.get("/api/v1/dispositions")
        assert (during.status_code, during.headers["Retry-After"]) == (503, "1")
        assert 0 < qms.client.get("/_sim/faults").json()["outage_seconds"] <= 0.5
        wait_for(lambda: qms.client.get("/api/v1/dispositions").status_code == 200, "the end")
        assert qms.client.get("/stats").json()["errors_injected"] >= 4

        assert qms.client.post("/_sim/faults", json={"error_rate": 2}).status_code == 400
        assert qms.client.post("/_sim/faults", json={"speed": 1}).status_code == 400
        assert qms.client.post("/_sim/faults", json={"status_sequence": [302]}).status_code == 400
    finally:
        qms.stop()


def test_state_survives_a_restart_and_due_decisions_are_made_after_it(db_path: Path) -> None:
    first_run = start_qms(db_path, "--decision-delay", "0.3", "--log-requests")
    post(first_run, "inspections", inspection("evt-1", lot_id="L-1"), key="evt-1")
    wait_for(lambda: decisions(first_run), "the first decision")
    post(first_run, "inspections", inspection("evt-2", lot_id="L-2", measured="99"), key="evt-2")
    exit_code, output = first_run.stop()
    assert exit_code == 0
    assert "QMS decided lot L-1: release (cursor 1, inspection)" in output.splitlines()

    second_run = start_qms(db_path, "--decision-delay", "0.3")
    try:
        # Nothing asks for it: the decision task finds the open inspection on its own.
        wait_for(
            lambda: second_run.client.get("/_sim/inspections").json()[1]["status"] == "closed",
            "the inspection left open by the first run",
        )
        assert decisions(second_run) == [("L-1", "release"), ("L-2", "reject")]
        repeat = post(second_run, "inspections", inspection("evt-1", lot_id="L-1"), key="evt-1")
        assert (repeat.status_code, repeat.json()["inspection_id"]) == (201, "INS-000001")
        fresh = post(second_run, "inspections", inspection("evt-3", lot_id="L-3"), key="evt-3")
        assert fresh.json()["inspection_id"] == "INS-000003"
        assert second_run.client.get("/stats").json()["duplicates"] == 1
    finally:
        second_run.stop()
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
