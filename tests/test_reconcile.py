"""Reconciliation, exceptions by role and the KPIs, with real processes: mosquitto, the Modbus
PLC simulator, the ERP simulator speaking SAP OData behind OAuth2, the QMS simulator and the
gateway as `plantsync run`; `plantsync reconcile` as its own process.

The oracles are the peers' own records: the PLC's own counter (it stops at `--stop-at`), the
ERP simulator's list of confirmations and its batch stock, the QMS's decision. The MES figure
the test publishes at order end is the PLC's count less the gateway's one baseline (what MES,
counting since the order started on a machine that started counting after it, would say).
"""

from __future__ import annotations

import json
import sys
import threading
import uuid
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from simulators.mes_publisher import InputLot, MesPublisher, encode
from tests.conftest import (
    ErpSim,
    Mosquitto,
    Peer,
    PlcSim,
    counter_baselines,
    free_ports,
    start_erp,
    start_plc,
    start_qms,
)
from tests.gateway_process import start_gateway
from tests.processes import run_process
from tests.test_quality_release import _listening, batch, confirmations, get_json, wait_for

pytestmark = pytest.mark.integration

SITE = "1010"
MACHINE = "press-01"
MATERIAL = "FG-4711"
COMPONENT = "RM-STEEL"
ORDER = "1000123"
LOT = "LOT-R1"
ERP_CLIENT, ERP_SECRET = "gw", "erp-s3cret-reconcile"
STOP_AT = 80
ROOT = Path(__file__).resolve().parent.parent


def write_config(
    tmp_path: Path,
    *,
    plc_port: int,
    broker: Mosquitto,
    erp: ErpSim,
    qms: ErpSim,
    api_port: int,
    orders: bool = False,
) -> Path:
    """The plant; with `orders`, ERP's released orders go to the MES (and only those may
    start), and the press confirms in H87, the unit the MES counts released orders in."""
    released = (
        f"""
orders:
  source: erp
  poll_interval: 500ms
  mes: {{host: {broker.host}, port: {broker.port}}}
validation: {{require_released_order: true}}
"""
        if orders
        else ""
    )
    config = tmp_path / "plant.yaml"
    config.write_text(
        released
        + f"""
site: "{SITE}"
data_dir: {tmp_path / "data"}
api: {{listen: "127.0.0.1:{api_port}"}}
shutdown_timeout: 5s
quality: {{qms: qms, poll_interval: 300ms}}
reconcile: {{every: 1s, settle: 0s, window: 1h}}
exceptions:
  check_every: 200ms
  missing_inspection_after: 1s
  roles:
    integration:
      mqtt: {{driver: mes, topic: plantsync/{SITE}/exceptions/integration}}
    supervisor: {{}}
    quality: {{}}
drivers:
  - name: {MACHINE}
    type: modbus
    host: 127.0.0.1
    port: {plc_port}
    poll_interval: 100ms
    timeout: 1s
    reconnect_max_delay: 500ms
    tags:
      - {{name: good, address: 0, type: uint32}}
      - {{name: bad, address: 2, type: uint32}}
  - name: mes
    type: mqtt
    host: {broker.host}
    port: {broker.port}
    client_id: plantsync-test-{uuid.uuid4().hex[:12]}
    topics:
      - filter: mes/{SITE}/+/order/start
        event: order.started
        fields: {{machine_id: "$topic[2]", order_id: order_id, operation: operation,
                 material: material, lot_id: lot_id, components: components,
                 occurred_at: occurred_at}}
      - filter: mes/{SITE}/+/order/end
        event: order.ended
        fields: {{machine_id: "$topic[2]", order_id: order_id, operation: operation,
                 yield_quantity.value: good, yield_quantity.uom: uom,
                 occurred_at: occurred_at}}
      - filter: mes/{SITE}/+/consumption
        event: material.consumed
        fields: {{machine_id: "$topic[2]", order_id: order_id, operation: operation,
                 material: material, lot_id: lot_id, quantity.value: quantity,
                 quantity.uom: uom, occurred_at: occurred_at}}
      - filter: mes/{SITE}/+/lot/completed
        event: lot.produced
        fields: {{machine_id: "$topic[2]", order_id: order_id, material: material,
                 lot_id: lot_id, quantity.value: quantity, quantity.uom: uom,
                 input_lots: input_lots, occurred_at: occurred_at}}
machines:
  - id: {MACHINE}
    signals: {{good: {MACHINE}.good, defective: {MACHINE}.bad}}
    confirm: {{every_units: 20, every: 1s, uom: {"H87" if orders else "C62"}}}
destinations:
  erp:
    base_url: {erp.url}
    profile: sap_s4hana
    retry: {{base: 100ms, cap: 1s}}
    auth:
      type: oauth2_client_credentials
      token_url: {erp.url}/oauth/token
      client_id: {ERP_CLIENT}
      client_secret: "${{ERP_SECRET}}"
    sap:
      usage_decisions:
        release: {{code: A, code_group: "01", selected_set: "01"}}
        reject: {{code: R, code_group: "01", selected_set: "01"}}
  qms:
    base_url: {qms.url}/api/v1
    profile: qms_rest
    retry: {{base: 100ms, cap: 1s}}
routes:
  production.confirmation: [erp]
  material.consumed: [erp]
  lot.disposition: [erp]
  inspection.requested: [qms]
"""
    )
    return config


def now_text() -> str:
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def publish(mes: MesPublisher, suffix: str, **fields: Any) -> None:
    document = {
        "message_id": mes.next_message_id(),
        "site": SITE,
        "machine": MACHINE,
        "occurred_at": now_text(),
        **fields,
    }
    mes.publish_raw(mes.topic(suffix), encode(document)).wait()


def reconcile_cli(config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    done = run_process(
        [sys.executable, "-m", "edge.cli", "reconcile", "--config", str(config), "--json", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def reconcile_text(config: Path, *args: str) -> tuple[int, str]:
    done = run_process(
        [sys.executable, "-m", "edge.cli", "reconcile", "--config", str(config), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout + done.stderr


def post_by_hand_in_sap(erp: ErpSim, yield_quantity: str) -> None:
    """A planner posts a confirmation in ERP's own screen: the real OData service, with a
    token and a CSRF token, and a text that is no gateway event id."""
    token = httpx.post(
        f"{erp.url}/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": ERP_CLIENT,
            "client_secret": ERP_SECRET,
        },
        timeout=10,
    ).json()["access_token"]
    service = f"{erp.url}/sap/opu/odata/sap/API_PROD_ORDER_CONFIRMATION_2_SRV"
    with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {token}"}) as client:
        fetched = client.get(f"{service}/", headers={"X-CSRF-Token": "Fetch"})
        fetched.raise_for_status()
        created = client.post(
            f"{service}/ProdnOrdConf2",
            headers={"X-CSRF-Token": fetched.headers["X-CSRF-Token"], "Accept": "application/json"},
            json={
                "OrderID": ORDER,
                "OrderOperation": "0010",
                "ConfirmationYieldQuantity": yield_quantity,
                "ConfirmationScrapQuantity": "0",
                "ConfirmationUnitISOCode": "PCE",
                "ConfirmationText": "counted by hand at the line",
            },
        )
        assert created.status_code == 201, created.text


class TopicWatcher:
    """Everything published on one topic, as a separate MQTT client sees it."""

    def __init__(self, broker: Mosquitto, topic: str) -> None:
        self.messages: list[dict[str, Any]] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"watcher-{uuid.uuid4().hex[:8]}",
        )
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, 1)
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.append(json.loads(m.payload))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def metric(text: str, name: str, labels: str = "") -> float | None:
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} " if labels else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_order_reconciles_then_a_confirmation_posted_by_hand_is_found(
    peers: list[Peer], mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    erp = start_erp(peers, tmp_path, "--client", f"{ERP_CLIENT}:{ERP_SECRET}")
    qms = start_qms(peers, tmp_path, "--decision-delay", "3")
    plc_port, api_port = free_ports(2)
    api = f"http://127.0.0.1:{api_port}"
    config = write_config(
        tmp_path, plc_port=plc_port, broker=mosquitto, erp=erp, qms=qms, api_port=api_port
    )
    monkeypatch.setenv("ERP_SECRET", ERP_SECRET)
    watcher = TopicWatcher(mosquitto, f"plantsync/{SITE}/exceptions/integration")
    gateway = start_gateway(peers, config, tmp_path)
    try:
        wait_for(lambda: _listening(api), "the local API")
        with MesPublisher(
            mosquitto.host, mosquitto.port, site=SITE, machine=MACHINE, run=uuid.uuid4().hex
        ) as mes:
            wait_for(
                lambda: any(
                    d["name"] == "mes" and d["connected"]
                    for d in get_json(f"{api}/status")["drivers"]
                ),
                "the gateway's MES subscription",
            )
            publish(
                mes,
                "order/start",
                order_id=ORDER,
                operation="0010",
                material=MATERIAL,
                lot_id=LOT,
                components=[COMPONENT],
            )
            wait_for(
                lambda: get_json(f"{api}/status")["machines"][0]["order_id"] == ORDER,
                "the order bound to the press",
            )
            # The machine starts counting only now, and stops at STOP_AT by itself.
            plc: PlcSim = start_plc(
                peers, tmp_path, "--rate", "40", "--stop-at", str(STOP_AT), port=plc_port
            )
            wait_for(lambda: plc.counters()[0] == STOP_AT, "the PLC to finish counting")
            wait_for(
                lambda: (
                    (get_json(f"{api}/status")["signals"].get(f"{MACHINE}.good") or {}).get("value")
                    == STOP_AT
                ),
                "the gateway to read it",
            )
            (baseline,) = counter_baselines(gateway.output(), f"{MACHINE}.good")
            counted = STOP_AT - baseline
            mes.consume(ORDER, COMPONENT, "RM-9", "12.5", uom="KGM").wait()
            mes.lot_completed(
                ORDER,
                MATERIAL,
                LOT,
                counted,
                uom="C62",
                input_lots=[InputLot("RM-9", COMPONENT, "12.5", "KGM")],
            ).wait()
            publish(
                mes, "order/end", order_id=ORDER, operation="0010", good=str(counted), uom="C62"
            )
        wait_for(
            lambda: any(c["IsFinalConfirmation"] for c in confirmations(erp, ORDER)),
            "the final confirmation in ERP",
        )
        # A produced lot the QMS has not decided for a second is a missing inspection (for
        # the quality role); its decision clears it.
        wait_for(
            lambda: any(
                row["kind"] == "missing_inspection" and row["subject"] == f"lot {LOT}"
                for row in get_json(f"{api}/exceptions?state=open")["exceptions"]
            ),
            "the missing inspection to be raised",
        )
        wait_for(
            lambda: (batch(erp, LOT) or {}).get("status") == "unrestricted",
            "ERP to release the lot's stock",
        )
        erp_yield = sum(Decimal(c["ConfirmationYieldQuantity"]) for c in confirmations(erp, ORDER))
        assert erp_yield == counted > 0  # the PLC's count, less the one baseline, is in ERP

        # Every side agrees: plantsync reconcile says so and exits 0.
        code, report = reconcile_cli(config, "--order", ORDER)
        assert (code, report["mismatches"], report["failed"]) == (0, 0, {}), report
        (order,) = report["orders"]
        assert Decimal(order["gateway"]["yield"]) == Decimal(order["erp"]["yield"]) == counted
        assert order["mes"] == {
            "reported": True,
            "operation": "0010",
            "yield": str(counted),
            "scrap": None,
            "uom": "C62",
        }
        assert order["lots"] == [
            {"lot_id": LOT, "material": MATERIAL, "qms": "release", "erp_stock": "unrestricted"}
        ]
        # ...and so does the daemon's periodic job, which found the ended order by itself.
        wait_for(
            lambda: (get_json(f"{api}/reconciliation")["last"] or {}).get("orders_reconciled") == 1,
            "the periodic reconciliation",
        )
        closed = get_json(f"{api}/exceptions?state=closed")["exceptions"]
        assert [
            (row["kind"], row["subject"], row["roles"], row["correlation"])
            for row in closed
            if row["kind"] == "missing_inspection"
        ] == [("missing_inspection", f"lot {LOT}", ["quality"], {"lot_id": LOT, "order_id": ORDER})]

        # A planner posts 5 more by hand in ERP: reconcile finds it, with ERP's figure.
        post_by_hand_in_sap(erp, "5")
        code, report = reconcile_cli(config, "--order", ORDER)
        assert code == 1 and report["mismatches"] == 1, report
        (order,) = report["orders"]
        (mismatch,) = order["mismatches"]
        assert mismatch["kind"] == "not_from_gateway"
        assert mismatch["figures"]["erp"]["yield"] == "5"
        assert mismatch["figures"]["erp"]["text"] == "counted by hand at the line"
        assert mismatch["figures"]["gateway"] is None
        assert "by hand" in mismatch["cause"]
        assert Decimal(order["erp"]["yield"]) == counted + 5
        assert Decimal(order["gateway"]["yield"]) == counted
        code, text = reconcile_text(config, "--since", "1h")
        assert code == 1 and "MISMATCH not_from_gateway" in text and "likely cause" in text

        # The periodic job sees it too: the metric, the error rate, one exception for the
        # integration role, raised once however many runs see it, and on its MQTT topic.
        def mismatches() -> float | None:
            return metric(
                httpx.get(f"{api}/metrics", timeout=10).text,
                "plantsync_reconciliation_mismatches",
                'kind="not_from_gateway"',
            )

        wait_for(lambda: mismatches() == 1, "plantsync_reconciliation_mismatches")
        runs = get_json(f"{api}/reconciliation")["runs"]["done"]
        wait_for(
            lambda: get_json(f"{api}/reconciliation")["runs"]["done"] >= runs + 2,
            "two more periodic runs",
        )
        text = httpx.get(f"{api}/metrics", timeout=10).text
        assert metric(text, "plantsync_reconciliation_error_ratio") == 1.0
        raised = [
            row
            for row in get_json(f"{api}/exceptions")["exceptions"]
            if row["kind"] == "reconciliation_mismatch"
        ]
        assert [(row["state"], row["subject"], row["roles"], row["inspect"]) for row in raised] == [
            (
                "open",
                f"order {ORDER}",
                ["integration"],
                f"plantsync reconcile --config FILE --order {ORDER}",
            )
        ]
        wait_for(
            lambda: [m["data"]["kind"] for m in watcher.messages] == ["reconciliation_mismatch"],
            "the exception on the integration topic",
        )
        assert watcher.messages[0]["type"] == "com.plantsync.edge.exception.raised.v1"
        assert watcher.messages[0]["data"]["correlation"] == {"order_id": ORDER}
        status = get_json(f"{api}/status")
        assert [row["kind"] for row in status["exceptions"]] == ["reconciliation_mismatch"]
        kpis = status["kpis"]
        assert kpis["reconciliation_error_ratio"] == 1.0
        assert kpis["production_cycles"] == 1 and kpis["manual_interventions"] == 0
        assert kpis["integration_failure_ratio"] == {"erp": 0.0, "qms": 0.0}
        assert kpis["genealogy_completeness_ratio"] == 1.0
        assert kpis["completion_posting_latency"]["count"] >= 1
        shown = run_process(
            [sys.executable, "-m", "edge.cli", "status", "--config", str(config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        assert "OPEN EXCEPTIONS (1" in shown and "reconciliation error rate: 100.0 %" in shown
    finally:
        watcher.stop()
    assert ERP_SECRET not in gateway.output()


CANONICAL_ORDER = "2000001"


def write_canonical_config(
    tmp_path: Path, *, plc_port: int, erp: ErpSim, hook: ErpSim, api_port: int
) -> Path:
    config = tmp_path / "canonical.yaml"
    config.write_text(f"""
site: "{SITE}"
data_dir: {tmp_path / "data"}
api: {{listen: "127.0.0.1:{api_port}"}}
shutdown_timeout: 5s
reconcile: {{every: 0s, orders_path: /api/orders}}
exceptions:
  check_every: 200ms
  outage_after: 1s
  roles:
    integration: {{webhook: [hook]}}
    supervisor: {{}}
    quality: {{}}
drivers:
  - name: {MACHINE}
    type: modbus
    host: 127.0.0.1
    port: {plc_port}
    poll_interval: 100ms
    reconnect_max_delay: 500ms
    tags:
      - {{name: good, address: 0, type: uint32}}
machines:
  - id: {MACHINE}
    signals: {{good: {MACHINE}.good}}
    order: {{order_id: "{CANONICAL_ORDER}", operation: "0010", material: {MATERIAL}}}
    confirm: {{every_units: 10}}
destinations:
  erp:
    base_url: {erp.url}
    path: /api/events
    retry: {{base: 100ms, cap: 500ms}}
    circuit_breaker: {{failures: 1000}}
  hook:
    base_url: {hook.url}
    path: /api/events
    retry: {{base: 100ms, cap: 500ms}}
routes:
  production.confirmation: [erp]
""")
    return config


def hook_events(hook: ErpSim) -> list[tuple[str, str, str]]:
    """(type, kind, subject) of each exception the webhook received, in order; but the press's
    own outage, which a loaded box makes when the press starts a second after the gateway."""
    rows: list[dict[str, Any]] = hook.events()
    return [
        (str(row["type"]), row["event"]["data"]["kind"], row["event"]["data"]["subject"])
        for row in rows
        if row["event"]["data"]["subject"] != f"driver {MACHINE}"
    ]


def test_exceptions_reach_the_webhook_once_each_and_hand_actions_count_per_order(
    peers: list[Peer], tmp_path: Path
) -> None:
    erp = start_erp(peers, tmp_path)
    hook = start_erp(peers, tmp_path)  # the integration team's webhook receiver
    erp.set_faults(status_sequence=[422])  # ERP refuses the first confirmation for good
    plc_port, api_port = free_ports(2)
    api = f"http://127.0.0.1:{api_port}"
    config = write_canonical_config(
        tmp_path, plc_port=plc_port, erp=erp, hook=hook, api_port=api_port
    )
    gateway = start_gateway(peers, config, tmp_path)
    wait_for(lambda: _listening(api), "the local API")
    # The press counts once the gateway is up (on a loaded box the gateway can take longer to
    # start than the press takes to finish).
    plc = start_plc(peers, tmp_path, "--rate", "40", "--stop-at", "120", port=plc_port)

    # The dead letter is an exception for integration support, with its correlation ids and
    # the command that shows it; the webhook gets it once, however many checks (every 200 ms,
    # for the seconds until the retry below) see it: the list at the end says so.
    def open_of(kind: str) -> list[dict[str, Any]]:
        return [
            row
            for row in get_json(f"{api}/exceptions?state=open")["exceptions"]
            if row["kind"] == kind
        ]

    (dead,) = wait_for(lambda: open_of("dead_letter"), "the dead-letter exception")
    event_id = dead["correlation"]["event_id"]
    assert dead["correlation"] == {
        "event_id": event_id,
        "destination": "erp",
        "partition_key": CANONICAL_ORDER,
        "order_id": CANONICAL_ORDER,
    }
    assert dead["inspect"] == f"plantsync outbox --config FILE show {event_id}"
    assert dead["roles"] == ["integration"] and "HTTP 422" in dead["text"]
    wait_for(lambda: hook_events(hook), "the webhook")
    assert hook_events(hook) == [("exception.raised", "dead_letter", f"event {event_id} to erp")]

    # The technician retries the dead letter by hand, while ERP is down for 3 s: the retry
    # meets the outage, which lasts longer than outage_after, so it is one outage exception,
    # cleared when ERP answers again. The dead letter's exception clears (once) as soon as the
    # event is back in line. The hand action counts against the order.
    erp.set_faults(outage_seconds=3)
    retried = run_process(
        [
            sys.executable,
            "-m",
            "edge.cli",
            "outbox",
            "--config",
            str(config),
            "retry",
            event_id,
            "--reason",
            "ERP fixed the material master",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert retried.returncode == 0, retried.stderr

    def outages() -> list[dict[str, Any]]:
        return [
            row
            for row in get_json(f"{api}/exceptions")["exceptions"]
            if row["kind"] == "outage" and row["subject"] == "destination erp"
        ]

    wait_for(outages, "the outage exception")
    wait_for(
        lambda: [row["state"] for row in outages()] == ["closed"], "the outage to clear", timeout=20
    )
    wait_for(lambda: not open_of("dead_letter"), "the dead letter to clear")
    wait_for(lambda: plc.counters()[0] == 120, "the PLC to finish")
    wait_for(
        lambda: (
            sum(c["pending"] for c in get_json(f"{api}/status")["destinations"].values()) == 0
            and len(hook_events(hook)) == 4
        ),
        "every confirmation and exception delivered",
    )
    # In order per exception (the webhook's deliveries are ordered per exception, not across).
    per_exception: dict[str, list[str]] = {}
    for type_, kind, subject in hook_events(hook):
        per_exception.setdefault(f"{kind}: {subject}", []).append(type_)
    assert per_exception == {
        f"dead_letter: event {event_id} to erp": ["exception.raised", "exception.cleared"],
        "outage: destination erp": ["exception.raised", "exception.cleared"],
    }
    kpis = get_json(f"{api}/status")["kpis"]
    assert kpis["manual_interventions"] == 1
    assert kpis["manual_interventions_by_order"] == {CANONICAL_ORDER: 1}
    # Integration failure rate: the ERP simulator's own count of what it refused.
    stats = erp.stats()
    text = httpx.get(f"{api}/metrics", timeout=10).text
    refused = metric(text, "plantsync_delivery_attempts_total", 'destination="erp",outcome="retry"')
    dead_lettered = metric(
        text, "plantsync_delivery_attempts_total", 'destination="erp",outcome="dead_letter"'
    )
    delivered = metric(
        text, "plantsync_delivery_attempts_total", 'destination="erp",outcome="delivered"'
    )
    assert (refused, dead_lettered) == (stats["outage_rejections"], 1)
    assert refused is not None and delivered == stats["unique"]
    assert metric(
        text, "plantsync_integration_failure_ratio", 'destination="erp"'
    ) == pytest.approx((refused + 1) / (refused + 1 + delivered), abs=1e-4)

    # Canonical reconciliation: the confirmed-totals GET agrees with the gateway's ledger...
    code, report = reconcile_cli(config, "--order", CANONICAL_ORDER)
    assert (code, report["mismatches"]) == (0, 0), report
    (order,) = report["orders"]
    received: list[dict[str, Any]] = erp.events()
    erp_total = sum(
        (
            Decimal(e["event"]["data"]["yield_quantity"]["value"])
            for e in received
            if e["type"] == "production.confirmation"
        ),
        Decimal(0),
    )
    assert Decimal(order["erp"]["yield"]) == Decimal(order["gateway"]["yield"]) == erp_total > 0
    # ...until someone posts 3 by hand in ERP.
    httpx.post(
        f"{erp.url}/_sim/orders/{CANONICAL_ORDER}/confirmations",
        json={"yield": 3, "uom": "C62"},
        timeout=10,
    ).raise_for_status()
    code, report = reconcile_cli(config, "--order", CANONICAL_ORDER)
    assert code == 1, report
    (mismatch,) = report["orders"][0]["mismatches"]
    assert (
        mismatch["kind"],
        mismatch["figures"]["erp"]["yield"],
        mismatch["figures"]["erp"]["entered_by"],
    ) == ("not_from_gateway", "3", "hand")
    assert gateway.process is not None and gateway.process.poll() is None
