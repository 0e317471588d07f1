"""The whole loop, issue 15 item 8, with real processes: ERP (the SAP simulator) releases an
order -> the gateway polls it, validates it and publishes it to the MES over MQTT -> the MES
(simulators/mes_orders.py's follower, a real MQTT client) starts it -> the PLC counts ->
confirmations with 101 receipts into quality-inspection stock -> lot completed -> inspection
requested -> the QMS releases the lot -> ERP's stock of the batch unrestricted -> `plantsync
reconcile` reports zero mismatches, and the order sync success rate is 1. Then a planner posts a
confirmation by hand in ERP, and `plantsync reconcile` finds it.

Oracles: the PLC's own counter, the ERP simulator's confirmations and batch stock, the QMS's
decision, the MES follower's own record of what it received and started.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from simulators.mes_orders import OrderFollower
from simulators.mes_publisher import InputLot, MesPublisher
from tests.conftest import (
    Mosquitto,
    Peer,
    counter_baselines,
    free_ports,
    start_erp,
    start_plc,
    start_qms,
)
from tests.gateway_process import start_gateway
from tests.test_quality_release import _listening, batch, confirmations, get_json, wait_for
from tests.test_reconcile import (
    COMPONENT,
    ERP_CLIENT,
    ERP_SECRET,
    MACHINE,
    MATERIAL,
    SITE,
    metric,
    post_by_hand_in_sap,
    reconcile_cli,
    write_config,
)

pytestmark = pytest.mark.integration

ORDER, LOT, STOP_AT = "1000123", "LOT-R1", 80


def test_erp_release_to_quality_release_reconciles_and_a_hand_posting_is_found(
    peers: list[Peer], mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    erp = start_erp(peers, tmp_path, "--client", f"{ERP_CLIENT}:{ERP_SECRET}")
    qms = start_qms(peers, tmp_path, "--decision-delay", "1")
    plc_port, api_port = free_ports(2)
    api = f"http://127.0.0.1:{api_port}"
    config = write_config(
        tmp_path,
        plc_port=plc_port,
        broker=mosquitto,
        erp=erp,
        qms=qms,
        api_port=api_port,
        orders=True,
    )
    monkeypatch.setenv("ERP_SECRET", ERP_SECRET)
    gateway = start_gateway(peers, config, tmp_path)
    wait_for(lambda: _listening(api), "the local API")
    publisher = MesPublisher(
        mosquitto.host, mosquitto.port, site=SITE, machine=MACHINE, run=uuid.uuid4().hex
    )
    publisher.connect()
    mes = OrderFollower(
        publisher,
        host=mosquitto.host,
        port=mosquitto.port,
        site=SITE,
        client_id=f"mes-{uuid.uuid4().hex[:8]}",
    )
    mes.connect()
    try:
        wait_for(
            lambda: any(
                d["name"] == "mes" and d["connected"] for d in get_json(f"{api}/status")["drivers"]
            ),
            "the gateway's MES subscription",
        )
        # The planner releases the order in ERP.
        released = httpx.post(
            f"{erp.url}/_sim/orders",
            timeout=10,
            json={
                "order_id": ORDER,
                "material": MATERIAL,
                "quantity": str(STOP_AT),
                "unit": "PCE",
                "production_version": "0001",
                "batch": LOT,
                "plant": SITE,
                "operations": [{"operation": "0010", "work_center": "PRESS01", "text": "Press"}],
                "components": [
                    {"material": COMPONENT, "quantity": "12.5", "unit": "KGM", "operation": "0010"}
                ],
            },
        )
        assert released.status_code < 300, released.text
        # ... the gateway publishes it, the MES starts it, and it binds to the press.
        wait_for(lambda: ORDER in mes.started, "the MES to start the released order")
        wait_for(
            lambda: get_json(f"{api}/status")["machines"][0]["order_id"] == ORDER,
            "the order bound to the press",
        )
        plc = start_plc(peers, tmp_path, "--rate", "40", "--stop-at", str(STOP_AT), port=plc_port)
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
        publisher.consume(ORDER, COMPONENT, "RM-9", "12.5", uom="KGM").wait()
        publisher.lot_completed(
            ORDER,
            MATERIAL,
            LOT,
            counted,
            uom="H87",
            input_lots=[InputLot("RM-9", COMPONENT, "12.5", "KGM")],
        ).wait()
        mes.end(ORDER, good=counted).wait()
        wait_for(
            lambda: any(c["IsFinalConfirmation"] for c in confirmations(erp, ORDER)),
            "the final confirmation in ERP",
        )
        wait_for(
            lambda: (batch(erp, LOT) or {}).get("status") == "unrestricted",
            "ERP to release the lot's stock after the QMS released it",
        )
        erp_yield = sum(Decimal(c["ConfirmationYieldQuantity"]) for c in confirmations(erp, ORDER))
        assert erp_yield == counted > 0

        code, report = reconcile_cli(config, "--order", ORDER)
        assert (code, report["mismatches"], report["failed"]) == (0, 0, {}), report
        (order,) = report["orders"]
        assert order["mes"]["yield"] == str(counted) and order["mes"]["uom"] == "H87"
        assert order["lots"] == [
            {"lot_id": LOT, "material": MATERIAL, "qms": "release", "erp_stock": "unrestricted"}
        ]
        kpis = get_json(f"{api}/status")["kpis"]
        assert (
            kpis["orders_released"],
            kpis["orders_accepted"],
            kpis["order_sync_success_ratio"],
        ) == (1, 1, 1.0)
        assert (
            metric(
                httpx.get(f"{api}/metrics", timeout=10).text, "plantsync_order_sync_success_ratio"
            )
            == 1.0
        )

        post_by_hand_in_sap(erp, "5")
        code, report = reconcile_cli(config, "--order", ORDER)
        assert code == 1, report
        (mismatch,) = report["orders"][0]["mismatches"]
        assert (mismatch["kind"], mismatch["figures"]["erp"]["yield"]) == ("not_from_gateway", "5")
    finally:
        mes.close()
        publisher.close(5.0)
