"""The ERP API simulator, run as a real process on a free port with a real SQLite file."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.sim_process import RunningSimulator, start_simulator

pytestmark = pytest.mark.integration  # every test runs the simulator as a process

CLOUDEVENT = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
CONFIRMATIONS = "/sap/opu/odata/sap/API_PROD_ORDER_CONFIRMATION_2_SRV"
INSPECTIONS = "/sap/opu/odata/sap/API_INSPECTIONLOT_SRV"
SESSION_COOKIE = "SAP_SESSIONID_S4H_100"


def start_erp(db_path: Path, *options: str) -> RunningSimulator:
    return start_simulator("erp-api", db_path, *options)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "erp.sqlite"


@pytest.fixture
def erp(db_path: Path) -> Iterator[RunningSimulator]:
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
    erp: RunningSimulator,
    event: dict[str, Any],
    key: str | None = None,
    content_type: str = CLOUDEVENT,
) -> httpx.Response:
    headers = {"Content-Type": content_type}
    if key is not None:
        headers["Idempotency-Key"] = key
    return erp.client.post("/api/events", json=event, headers=headers)


def set_faults(erp: RunningSimulator, **settings: object) -> dict[str, Any]:
    response = erp.client.post("/_sim/faults", json=settings)
    assert response.status_code == 200, response.text
    faults: dict[str, Any] = response.json()
    return faults


def lot_produced(
    event_id: str, lot_id: str, material: str = "FG-1", value: str = "100"
) -> dict[str, Any]:
    return {
        **confirmation(event_id),
        "type": "lot.produced",
        "subject": f"lot/{lot_id}",
        "data": {
            "material": material,
            "lot_id": lot_id,
            "quantity": {"value": value, "uom": "H87"},
        },
    }


def lot_disposition(
    event_id: str, lot_id: str, disposition: str, material: str | None = "FG-1"
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "lot_id": lot_id,
        "disposition": disposition,
        "disposition_source": "qms",
    }
    if material is not None:
        data["material"] = material
    return {
        **confirmation(event_id),
        "type": "lot.disposition",
        "subject": f"lot/{lot_id}",
        "data": data,
    }


def sap_confirmation(
    text: str, order_id: str = "1000123", operation: str = "0010", **changes: Any
) -> dict[str, Any]:
    return {
        "OrderID": order_id,
        "OrderOperation": operation,
        "ConfirmationYieldQuantity": "100",
        "ConfirmationScrapQuantity": "2.5",
        "ConfirmationUnit": "ST",
        "IsFinalConfirmation": False,
        "ConfirmationText": text,
        "Plant": "1010",
        "PostingDate": "/Date(1772323200000)/",
        **changes,
    }


def receipt(batch: str, quantity: str = "100", usability: str | None = "2") -> dict[str, Any]:
    item = {
        "Material": "FG-1",
        "Plant": "1010",
        "StorageLocation": "0001",
        "Batch": batch,
        "GoodsMovementType": "101",
        "GoodsMovementRefDocType": "F",
        "OrderID": "1000123",
        "OrderItem": "0001",
        "EntryUnitISOCode": "PCE",
        "QuantityInEntryUnit": quantity,
    }
    if usability is not None:
        item["InventoryUsabilityCode"] = usability
    return item


def fetch_csrf(erp: RunningSimulator, **headers: str) -> str:
    """Fetch a CSRF token the SAP way; the client keeps the session cookie."""
    response = erp.client.get(f"{CONFIRMATIONS}/", headers={"X-CSRF-Token": "Fetch", **headers})
    assert response.status_code == 200, response.text
    token: str = response.headers["X-CSRF-Token"]
    return token


def post_confirmation(
    erp: RunningSimulator, body: dict[str, Any], csrf: str | None = None, **headers: str
) -> httpx.Response:
    if csrf is not None:
        headers["X-CSRF-Token"] = csrf
    return erp.client.post(f"{CONFIRMATIONS}/ProdnOrdConf2", json=body, headers=headers)


def inspection_lot_of(erp: RunningSimulator, batch: str) -> str:
    found = erp.client.get(
        f"{INSPECTIONS}/A_InspectionLot",
        params={
            "$filter": f"Batch eq '{batch}' and InspectionLotOrigin eq '04'",
            "$format": "json",
        },
    ).json()["d"]["results"]
    lot: str = found[-1]["InspectionLot"]
    return lot


def post_decision(
    erp: RunningSimulator, csrf: str, inspection_lot: str, code: str, **changes: str
) -> httpx.Response:
    body = {
        "InspectionLot": inspection_lot,
        "InspLotUsageDecisionCatalog": "3",
        "InspLotUsgeDcsnSelectedSet": "01",
        "SelectedCodeSetPlant": "1010",
        "InspLotUsageDecisionCodeGroup": "01",
        "InspectionLotUsageDecisionCode": code,
        **changes,
    }
    return erp.client.post(
        f"{INSPECTIONS}/A_InspLotUsageDecision", json=body, headers={"X-CSRF-Token": csrf}
    )


def lookup(erp: RunningSimulator, expression: str, **headers: str) -> httpx.Response:
    return erp.client.get(
        f"{CONFIRMATIONS}/ProdnOrdConf2",
        params={"$filter": expression, "$format": "json"},
        headers=headers,
    )


def batch_of(erp: RunningSimulator, batch: str) -> dict[str, Any]:
    response = erp.client.get(f"/_sim/batches/{batch}")
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def get_token(
    erp: RunningSimulator, client_id: str = "gw", secret: str = "s3cret"
) -> httpx.Response:
    return erp.client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret},
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_stores_events_and_lists_them_in_arrival_order(erp: RunningSimulator) -> None:
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


def test_repeated_idempotency_key_answers_same_reference_and_stores_once(
    erp: RunningSimulator,
) -> None:
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
    stats = erp.client.get("/stats").json()
    assert {name: stats[name] for name in ("received", "unique", "duplicates")} == {
        "received": 3,
        "unique": 1,
        "duplicates": 2,
    }
    assert stats["errors_injected"] == 0


def test_missing_idempotency_key_is_rejected(erp: RunningSimulator) -> None:
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
    erp: RunningSimulator, body: bytes, content_type: str, status: int, message: str
) -> None:
    response = erp.client.post(
        "/api/events",
        content=body,
        headers={"Content-Type": content_type, "Idempotency-Key": "k-1"},
    )

    assert response.status_code == status
    assert message in response.json()["error"]
    assert erp.client.get("/stats").json()["unique"] == 0


def test_batch_answers_per_event_and_keys_on_event_id(erp: RunningSimulator) -> None:
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
            "outage_until": 0.0,
            "status_sequence": [],
            "drop_connection": 0,
            "drop_response": 0,
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


def test_latency_knob_delays_each_delivery(erp: RunningSimulator) -> None:
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


def test_reset_clears_the_store(erp: RunningSimulator) -> None:
    post_event(erp, confirmation("evt-1"), key="evt-1")

    post_event(erp, lot_produced("evt-2", "L-1"), key="evt-2")
    assert post_confirmation(erp, sap_confirmation("evt-3"), fetch_csrf(erp)).status_code == 201

    assert erp.client.post("/_sim/reset").json() == {
        "cleared": 2,
        "confirmations": 1,
        "usage_decisions": 0,
        "batches": 1,
    }
    assert erp.client.get("/_sim/batches").json() == []
    assert erp.client.get("/stats").json()["sap_confirmations"] == 0
    assert erp.client.get("/stats").json()["received"] == 0
    assert post_event(erp, confirmation("evt-1"), key="evt-1").status_code == 201


def test_oauth_client_credentials_guard_api_and_sap(db_path: Path) -> None:
    erp = start_erp(db_path, "--client", "gw:s3cret", "--client", "qms:pw")
    try:
        missing = post_event(erp, confirmation("evt-1"), key="evt-1")
        assert missing.status_code == 401
        assert missing.headers["WWW-Authenticate"] == 'Bearer realm="plantsync-erp-sim"'
        assert erp.client.get(f"{CONFIRMATIONS}/").status_code == 401

        issued = get_token(erp)
        assert issued.status_code == 200
        assert issued.headers["Cache-Control"] == "no-store"
        body = issued.json()
        assert (body["token_type"], body["expires_in"]) == ("Bearer", 3600)
        token = body["access_token"]
        basic = erp.client.post(
            "/oauth/token", data={"grant_type": "client_credentials"}, auth=("qms", "pw")
        )
        assert basic.status_code == 200
        assert basic.json()["access_token"] != token

        wrong = get_token(erp, secret="nope")
        assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_client")
        unsupported = erp.client.post("/oauth/token", data={"grant_type": "password"})
        assert (unsupported.status_code, unsupported.json()["error"]) == (
            400,
            "unsupported_grant_type",
        )

        headers = {"Content-Type": CLOUDEVENT, "Idempotency-Key": "evt-1", **bearer(token)}
        accepted = erp.client.post("/api/events", json=confirmation("evt-1"), headers=headers)
        assert accepted.status_code == 201
        csrf = fetch_csrf(erp, **bearer(token))
        created = post_confirmation(erp, sap_confirmation("evt-2"), csrf, **bearer(token))
        assert created.status_code == 201, created.text
        assert created.json()["d"]["EnteredByUser"] == "gw"

        invalid = erp.client.post("/api/events", json=confirmation("evt-3"), headers=bearer("nope"))
        assert invalid.status_code == 401
        assert invalid.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
        odata = lookup(erp, "ConfirmationText eq 'evt-2'", **bearer("nope"))
        assert odata.status_code == 401
        assert odata.json()["error"]["message"]["lang"] == "en"

        stats = erp.client.get("/stats").json()  # test endpoints need no token
        assert stats["tokens_issued"] == 2
        assert stats["token_requests_refused"] == 2
        assert stats["auth_rejections"] == 4
    finally:
        erp.stop()


def test_tokens_expire_and_can_be_revoked_at_once(db_path: Path) -> None:
    erp = start_erp(db_path, "--client", "gw:s3cret", "--token-ttl", "1")
    try:
        first = get_token(erp).json()
        assert first["expires_in"] == 1
        assert erp.client.get(f"{CONFIRMATIONS}/", headers=bearer(first["access_token"])).is_success

        time.sleep(1.1)
        expired = erp.client.get(f"{CONFIRMATIONS}/", headers=bearer(first["access_token"]))
        assert expired.status_code == 401
        challenge = expired.headers["WWW-Authenticate"]
        assert 'error="invalid_token"' in challenge and "expired" in challenge

        second = get_token(erp).json()["access_token"]
        assert erp.client.get(f"{CONFIRMATIONS}/", headers=bearer(second)).is_success
        set_faults(erp, expire_tokens_now=True)
        revoked = erp.client.get(f"{CONFIRMATIONS}/", headers=bearer(second))
        assert revoked.status_code == 401
        assert 'error="invalid_token"' in revoked.headers["WWW-Authenticate"]
        third = get_token(erp).json()["access_token"]
        assert erp.client.get(f"{CONFIRMATIONS}/", headers=bearer(third)).is_success
        assert erp.client.get("/stats").json()["tokens_issued"] == 3
    finally:
        erp.stop()


def test_sap_csrf_token_is_fetched_per_session_and_required_for_posts(
    erp: RunningSimulator,
) -> None:
    without = post_confirmation(erp, sap_confirmation("evt-1"))
    assert without.status_code == 403
    assert without.headers["X-CSRF-Token"] == "Required"
    assert without.text == "CSRF token validation failed"

    fetched = erp.client.get(f"{CONFIRMATIONS}/", headers={"X-CSRF-Token": "Fetch"})
    assert fetched.status_code == 200
    assert fetched.json() == {"d": {"EntitySets": ["ProdnOrdConf2", "ProdnOrdConfMatlDocItm"]}}
    token = fetched.headers["X-CSRF-Token"]
    assert SESSION_COOKIE in erp.client.cookies
    assert erp.client.get(f"{CONFIRMATIONS}/").headers.get("X-CSRF-Token") is None
    assert fetch_csrf(erp) == token  # same session, same token
    assert post_confirmation(erp, sap_confirmation("evt-1"), token).status_code == 201

    assert post_confirmation(erp, sap_confirmation("evt-2"), "forged").status_code == 403
    with httpx.Client(base_url=str(erp.client.base_url)) as other:  # no session cookie
        refused = other.post(
            f"{CONFIRMATIONS}/ProdnOrdConf2",
            json=sap_confirmation("evt-2"),
            headers={"X-CSRF-Token": token},
        )
        assert (refused.status_code, refused.headers["X-CSRF-Token"]) == (403, "Required")

    set_faults(erp, invalidate_csrf=True)
    stale = post_confirmation(erp, sap_confirmation("evt-2"), token)
    assert (stale.status_code, stale.headers["X-CSRF-Token"]) == (403, "Required")
    renewed = fetch_csrf(erp)
    assert renewed != token
    assert post_confirmation(erp, sap_confirmation("evt-2"), renewed).status_code == 201
    head = erp.client.head(f"{INSPECTIONS}/", headers={"X-CSRF-Token": "Fetch"})
    assert head.headers["X-CSRF-Token"] == renewed

    stats = erp.client.get("/stats").json()
    assert (stats["csrf_rejections"], stats["sap_confirmations"]) == (4, 2)


def test_confirmation_posts_goods_movements_and_answers_odata(erp: RunningSimulator) -> None:
    csrf = fetch_csrf(erp)
    issue = {**receipt("C-7", "25", usability=None), "Material": "RM-9", "GoodsMovementType": "261"}
    body = sap_confirmation(
        "evt-1", IsFinalConfirmation=True, to_ProdnOrdConfMatlDocItm=[receipt("L-1"), issue]
    )

    created = post_confirmation(erp, body, csrf)

    assert created.status_code == 201, created.text
    assert created.headers["DataServiceVersion"] == "2.0"
    entity = created.json()["d"]
    assert entity["ConfirmationGroup"] == "0000000001"
    assert entity["ConfirmationCount"] == "00000001"
    sent = {name: value for name, value in body.items() if name != "to_ProdnOrdConfMatlDocItm"}
    assert {name: entity[name] for name in [*sent, "Sequence"]} == {**sent, "Sequence": "0"}
    assert entity["EnteredByUser"] == "PLANTSYNC"
    assert entity["ConfirmationEntryDate"].startswith("/Date(")
    assert created.headers["Location"] == entity["__metadata"]["uri"]
    assert entity["__metadata"]["uri"].endswith(
        "ProdnOrdConf2(ConfirmationGroup='0000000001',ConfirmationCount='00000001')"
    )
    items = entity["to_ProdnOrdConfMatlDocItm"]["results"]
    assert [(item["Batch"], item["MaterialDocumentItem"]) for item in items] == [
        ("L-1", "0001"),
        ("C-7", "0002"),
    ]
    assert items[0]["MaterialDocument"] == items[1]["MaterialDocument"] != ""
    assert "MaterialDocument" not in entity  # not a property of ProdnOrdConf2

    again = post_confirmation(erp, sap_confirmation("evt-2"), csrf).json()["d"]
    assert (again["ConfirmationGroup"], again["ConfirmationCount"]) == ("0000000001", "00000002")
    other_op = post_confirmation(erp, sap_confirmation("evt-3", operation="0020"), csrf).json()
    assert other_op["d"]["ConfirmationGroup"] == "0000000002"

    read = erp.client.get(entity["__metadata"]["uri"]).json()["d"]
    assert read["ConfirmationText"] == "evt-1"
    assert "__deferred" in read["to_ProdnOrdConfMatlDocItm"]
    produced, consumed = batch_of(erp, "L-1"), batch_of(erp, "C-7")
    assert (produced["status"], produced["quantity"]) == (
        "quality_inspection",
        {"unrestricted": "0", "quality_inspection": "100", "blocked": "0"},
    )
    assert produced["history"][0]["action"] == "goods_receipt"
    assert produced["history"][0]["text"] == "evt-1"
    assert consumed["material"] == "RM-9"
    assert consumed["quantity"]["unrestricted"] == "-25"
    assert len(erp.client.get("/_sim/sap/confirmations").json()) == 3


def test_invalid_confirmations_answer_an_odata_error(erp: RunningSimulator) -> None:
    csrf = fetch_csrf(erp)
    good = sap_confirmation("evt-1")
    cases: list[tuple[dict[str, Any], str]] = [
        ({k: v for k, v in good.items() if k != "OrderID"}, "OrderID"),
        ({**good, "OrderOperation": ""}, "OrderOperation"),
        ({**good, "ConfirmationUnit": "C62"}, "C62"),
        (
            {
                **{k: v for k, v in good.items() if k != "ConfirmationUnit"},
                "ConfirmationUnitISOCode": "H87",
            },
            "ISO code H87",
        ),
        ({**good, "ConfirmationUnitISOCode": "KGM"}, "different units"),
        ({**good, "PostingDate": "2026-03-01"}, "PostingDate"),
        ({**good, "OrderID": "1" * 13}, "MaxLength 12"),
        ({**good, "IsFinalConfirmation": "X"}, "IsFinalConfirmation"),
        ({**good, "ConfirmationYieldQuantity": "1.2345"}, "Scale=3"),
        ({**good, "ConfirmationYieldQuantity": "12345678901"}, "Precision=13"),
        ({**good, "ConfirmationYieldQuantity": "12,5"}, "ConfirmationYieldQuantity"),
        ({**good, "ConfirmationScrapQuantity": 3}, "ConfirmationScrapQuantity"),
        ({**good, "ConfirmationText": "x" * 41}, "ConfirmationText"),
        ({**good, "Yield": "1"}, "Yield"),
        (
            {**good, "to_ProdnOrdConfMatlDocItm": [{**receipt("L-1"), "GoodsMovementType": "311"}]},
            "GoodsMovementType",
        ),
        (
            {**good, "to_ProdnOrdConfMatlDocItm": [{**receipt("L-1"), "QuantityInEntryUnit": "x"}]},
            "QuantityInEntryUnit",
        ),
        (
            {**good, "to_ProdnOrdConfMatlDocItm": [{**receipt("LOT-2026-0001")}]},
            "LOT-2026-0001",
        ),
        (
            {
                **good,
                "to_ProdnOrdConfMatlDocItm": [
                    {k: v for k, v in receipt("L-1").items() if k != "GoodsMovementRefDocType"}
                ],
            },
            "GoodsMovementRefDocType",
        ),
    ]
    for body, mentioned in cases:
        refused = post_confirmation(erp, body, csrf)
        assert refused.status_code == 400, (body, refused.text)
        error = refused.json()["error"]
        assert isinstance(error["code"], str) and error["code"]
        assert error["message"]["lang"] == "en"
        assert error["innererror"]["errordetails"][0]["message"] == error["message"]["value"]
        assert mentioned in error["message"]["value"], error
    not_json = erp.client.post(
        f"{CONFIRMATIONS}/ProdnOrdConf2",
        content=b"{oops",
        headers={"X-CSRF-Token": csrf, "Content-Type": "application/json"},
    )
    assert not_json.status_code == 400
    assert "error" in not_json.json()
    assert erp.client.get("/stats").json()["sap_confirmations"] == 0


def test_same_confirmation_text_twice_makes_two_and_filter_finds_them(
    erp: RunningSimulator,
) -> None:
    csrf = fetch_csrf(erp)
    for body in (
        sap_confirmation("evt-1"),
        sap_confirmation("evt-1"),
        sap_confirmation("O'Brien", order_id="1000124"),
    ):
        assert post_confirmation(erp, body, csrf).status_code == 201

    found = lookup(erp, "ConfirmationText eq 'evt-1'")
    assert found.status_code == 200
    results = found.json()["d"]["results"]
    assert [r["ConfirmationCount"] for r in results] == ["00000001", "00000002"]
    assert {r["ConfirmationText"] for r in results} == {"evt-1"}
    assert lookup(erp, "ConfirmationText eq 'evt-9'").json() == {"d": {"results": []}}
    by_order = lookup(erp, "OrderID eq '1000124'").json()["d"]["results"]
    assert [r["ConfirmationText"] for r in by_order] == ["O'Brien"]
    quoted = lookup(erp, "ConfirmationText eq 'O''Brien' and OrderID eq '1000124'")
    assert len(quoted.json()["d"]["results"]) == 1
    assert lookup(erp, "ConfirmationText eq 'evt-1' and OrderID eq '1000124'").json() == {
        "d": {"results": []}
    }
    for bad in (
        "ConfirmationText = 'evt-1'",
        "substringof('evt', ConfirmationText)",
        "Foo eq 'x'",
        f"ConfirmationText eq '{'x' * 41}'",
        "ConfirmationYieldQuantity eq '1'",
    ):
        assert lookup(erp, bad).status_code == 400, bad

    stats = erp.client.get("/stats").json()
    assert (stats["sap_confirmations"], stats["sap_duplicate_texts"]) == (3, 1)


def test_usage_decisions_release_or_block_the_inspection_lots_batch(
    erp: RunningSimulator,
) -> None:
    csrf = fetch_csrf(erp)
    movements = [receipt("L-1", "60"), receipt("L-2", "40"), receipt("L-3", "5", usability=None)]
    body = sap_confirmation("evt-1", to_ProdnOrdConfMatlDocItm=movements)
    assert post_confirmation(erp, body, csrf).status_code == 201
    # A second receipt of the same batch adds to its open inspection lot.
    again = sap_confirmation("evt-1b", to_ProdnOrdConfMatlDocItm=[receipt("L-1", "15")])
    assert post_confirmation(erp, again, csrf).status_code == 201
    assert batch_of(erp, "L-3")["status"] == "unrestricted"
    lots = erp.client.get("/_sim/sap/inspection-lots").json()
    assert [
        (lot["Batch"], lot["InspectionLotQuantity"], lot["InspectionLotOrigin"]) for lot in lots
    ] == [("L-1", "75", "04"), ("L-2", "40", "04")]
    first, second = inspection_lot_of(erp, "L-1"), inspection_lot_of(erp, "L-2")
    assert len(first) == 12 and first != second

    accepted = post_decision(erp, csrf, first, "A")
    assert accepted.status_code == 201, accepted.text
    decision = accepted.json()["d"]
    assert decision["InspectionLotUsageDecisionCode"] == "A"
    assert decision["InspectionLot"] == first
    assert decision["__metadata"]["uri"].endswith(
        f"A_InspLotUsageDecision(InspectionLot='{first}')"
    )
    assert post_decision(erp, csrf, second, "R").status_code == 201
    refusals = {
        "decided": post_decision(erp, csrf, second, "A"),
        "unknown lot": post_decision(erp, csrf, "049999999999", "A"),
        "unknown code": post_decision(erp, csrf, second, "X"),
        "old shape": erp.client.post(
            f"{INSPECTIONS}/A_InspLotUsageDecision",
            json={
                "Material": "FG-1",
                "Batch": "L-2",
                "Plant": "1010",
                "InspLotUsageDecisionCode": "A",
                "ChangedByText": "evt",
            },
            headers={"X-CSRF-Token": csrf},
        ),
        "too long": post_decision(erp, csrf, "0" * 13, "A"),
    }
    for why, refused in refusals.items():
        assert refused.status_code == 400, (why, refused.text)
    assert "already" in refusals["decided"].json()["error"]["message"]["value"]
    assert "'Material' is invalid" in refusals["old shape"].json()["error"]["message"]["value"]
    assert post_decision(erp, "forged", second, "A").status_code == 403

    released, rejected = batch_of(erp, "L-1"), batch_of(erp, "L-2")
    assert (released["status"], released["quantity"]["unrestricted"]) == ("unrestricted", "75")
    assert released["quantity"]["quality_inspection"] == "0"
    assert [(h["action"], h["status_after"]) for h in released["history"]] == [
        ("goods_receipt", "quality_inspection"),
        ("goods_receipt", "quality_inspection"),
        ("usage_decision", "unrestricted"),
    ]
    assert (rejected["status"], rejected["quantity"]["blocked"]) == ("blocked", "40")
    assert [b["batch"] for b in erp.client.get("/_sim/batches").json()] == ["L-1", "L-2", "L-3"]
    assert erp.client.get("/_sim/batches/L-404").status_code == 404

    listed = erp.client.get(
        f"{INSPECTIONS}/A_InspLotUsageDecision",
        params={"$filter": f"InspectionLot eq '{second}'", "$format": "json"},
    ).json()["d"]["results"]
    assert [d["InspectionLotUsageDecisionCode"] for d in listed] == ["R"]
    decisions = erp.client.get("/_sim/sap/usage-decisions").json()
    assert [(d["_lot"]["Batch"], d["InspectionLotUsageDecisionCode"]) for d in decisions] == [
        ("L-1", "A"),
        ("L-2", "R"),
    ]
    assert erp.client.get("/stats").json()["usage_decisions"] == 2


MATERIAL_DOCUMENTS = "/sap/opu/odata/sap/API_MATERIAL_DOCUMENT_SRV"


def goods_issue(text: str, **changes: Any) -> dict[str, Any]:
    item = {
        "Material": "RM-9",
        "Plant": "1010",
        "StorageLocation": "0001",
        "Batch": "C-7",
        "GoodsMovementType": "261",
        "ManufacturingOrder": "1000123",
        "EntryUnit": "KG",
        "QuantityInEntryUnit": "25",
        "MaterialDocumentItemText": text,
        **changes,
    }
    return {
        "GoodsMovementCode": "03",
        "PostingDate": "/Date(1772323200000)/",
        "to_MaterialDocumentItem": [item],
    }


def test_goods_issue_material_documents_issue_stock_and_can_be_looked_up(
    erp: RunningSimulator,
) -> None:
    csrf = fetch_csrf(erp)
    created = erp.client.post(
        f"{MATERIAL_DOCUMENTS}/A_MaterialDocumentHeader",
        json=goods_issue("evt-1"),
        headers={"X-CSRF-Token": csrf},
    )
    assert created.status_code == 201, created.text
    header = created.json()["d"]
    assert header["GoodsMovementCode"] == "03" and len(header["MaterialDocument"]) == 10
    (item,) = header["to_MaterialDocumentItem"]["results"]
    assert item["MaterialDocumentItem"] == "0001"
    consumed = batch_of(erp, "C-7")
    assert (consumed["material"], consumed["quantity"]["unrestricted"]) == ("RM-9", "-25")
    found = erp.client.get(
        f"{MATERIAL_DOCUMENTS}/A_MaterialDocumentItem",
        params={
            "$filter": "MaterialDocumentItemText eq 'evt-1' and ManufacturingOrder eq '1000123'",
            "$format": "json",
        },
    ).json()["d"]["results"]
    assert [i["MaterialDocument"] for i in found] == [header["MaterialDocument"]]
    for bad, mentioned in [
        (goods_issue("e", EntryUnitISOCode="KGM"), "EntryUnitISOCode"),  # no such property
        (goods_issue("e", EntryUnit="KGM"), "KGM"),  # an ISO code is no internal unit
        (goods_issue("e", GoodsMovementType="101"), "261"),
        ({**goods_issue("e"), "GoodsMovementCode": "3"}, "GoodsMovementCode"),
        (goods_issue("e", ManufacturingOrder=""), "ManufacturingOrder"),
        (goods_issue("e", QuantityInEntryUnit=25), "QuantityInEntryUnit"),
    ]:
        refused = erp.client.post(
            f"{MATERIAL_DOCUMENTS}/A_MaterialDocumentHeader",
            json=bad,
            headers={"X-CSRF-Token": csrf},
        )
        assert refused.status_code == 400, (bad, refused.text)
        assert mentioned in refused.json()["error"]["message"]["value"], refused.text
    assert erp.client.get("/stats").json()["sap_material_documents"] == 1


def test_canonical_lot_events_set_batch_status(erp: RunningSimulator) -> None:
    assert (
        post_event(erp, lot_produced("evt-1", "L-1", value="12.500"), key="evt-1").status_code
        == 201
    )
    assert post_event(erp, lot_produced("evt-2", "L-2"), key="evt-2").status_code == 201
    produced = batch_of(erp, "L-1")
    assert (produced["material"], produced["status"], produced["unit"]) == (
        "FG-1",
        "quality_inspection",
        "H87",
    )
    assert produced["quantity"]["quality_inspection"] == "12.5"

    release = lot_disposition("evt-3", "L-1", "release")
    assert post_event(erp, release, key="evt-3").status_code == 201
    assert post_event(erp, release, key="evt-3").status_code == 200  # a repeat moves nothing
    batch = [lot_disposition("evt-4", "L-2", "reject", material=None)]
    assert erp.client.post(
        "/api/events:batch", json=batch, headers={"Content-Type": BATCH}
    ).is_success
    assert post_event(erp, lot_disposition("evt-5", "L-3", "hold"), key="evt-5").status_code == 201

    released = batch_of(erp, "L-1")
    assert (released["status"], released["quantity"]["unrestricted"]) == ("unrestricted", "12.5")
    assert [h["action"] for h in released["history"]] == ["lot.produced", "lot.disposition"]
    assert released["history"][1]["text"] == "evt-3"
    rejected = batch_of(erp, "L-2")
    assert (rejected["status"], rejected["quantity"]["blocked"]) == ("blocked", "100")
    assert batch_of(erp, "L-3")["status"] == "blocked"


def test_outage_answers_503_with_retry_after_until_it_ends(db_path: Path) -> None:
    erp = start_erp(db_path, "--outage-seconds", "30")
    try:
        down = post_event(erp, confirmation("evt-1"), key="evt-1")
        assert down.status_code == 503
        assert 20 <= int(down.headers["Retry-After"]) <= 30
        sap_down = erp.client.get(f"{CONFIRMATIONS}/", headers={"X-CSRF-Token": "Fetch"})
        assert sap_down.status_code == 503
        assert "outage" in sap_down.json()["error"]["message"]["value"]
        assert "X-CSRF-Token" not in sap_down.headers
        assert erp.client.get("/stats").json()["outage_rejections"] == 2

        set_faults(erp, outage_seconds=0)
        assert post_event(erp, confirmation("evt-1"), key="evt-1").status_code == 201
        set_faults(erp, outage_until=time.time() + 5)
        assert post_event(erp, confirmation("evt-2"), key="evt-2").status_code == 503
        set_faults(erp, outage_until=time.time() - 1)
        assert post_event(erp, confirmation("evt-2"), key="evt-2").status_code == 201
        assert erp.client.post("/_sim/faults", json={"outage_seconds": -1}).status_code == 400
    finally:
        erp.stop()


def test_status_sequence_scripts_the_next_deliveries(db_path: Path) -> None:
    erp = start_erp(db_path, "--status-sequence", "500,429,201,503", "--retry-after", "3")
    try:
        statuses = [post_event(erp, confirmation(f"evt-{n}"), key=f"evt-{n}") for n in range(1, 6)]
        assert [r.status_code for r in statuses] == [500, 429, 201, 503, 201]
        assert "Retry-After" not in statuses[0].headers
        assert statuses[1].headers["Retry-After"] == statuses[3].headers["Retry-After"] == "3"
        assert [e["id"] for e in erp.client.get("/events").json()] == ["evt-3", "evt-5"]

        set_faults(erp, status_sequence=[502, 201], latency=0.2)
        started = time.monotonic()
        csrf = fetch_csrf(erp)  # a GET is not a delivery: it consumes nothing
        assert time.monotonic() - started >= 0.2
        scripted = post_confirmation(erp, sap_confirmation("evt-6"), csrf)
        assert scripted.status_code == 502
        assert scripted.json()["error"]["message"]["lang"] == "en"
        assert erp.client.get("/_sim/faults").json()["status_sequence"] == [201]
        assert post_confirmation(erp, sap_confirmation("evt-6"), csrf).status_code == 201
        assert erp.client.get("/stats").json()["errors_injected"] == 4
        bad = erp.client.post("/_sim/faults", json={"status_sequence": [302]})
        assert bad.status_code == 400
    finally:
        erp.stop()


def test_dropped_connections_before_and_after_processing(db_path: Path) -> None:
    erp = start_erp(db_path, "--drop-connection", "1")
    try:
        with pytest.raises(httpx.TransportError):
            post_event(erp, confirmation("evt-1"), key="evt-1")
        assert erp.client.get("/events").json() == []
        assert post_event(erp, confirmation("evt-1"), key="evt-1").status_code == 201

        csrf = fetch_csrf(erp)
        set_faults(erp, drop_response=1)
        with pytest.raises(httpx.TransportError):
            post_confirmation(erp, sap_confirmation("evt-2"), csrf)
        # The ambiguous failure: SAP has the confirmation the client never heard about.
        assert len(lookup(erp, "ConfirmationText eq 'evt-2'").json()["d"]["results"]) == 1
        stats = erp.client.get("/stats").json()
        assert (stats["connections_dropped"], stats["responses_dropped"]) == (1, 1)
    finally:
        exit_code, output = erp.stop()
    assert exit_code == 0
    assert output == ""  # uvicorn took the drops without complaint
