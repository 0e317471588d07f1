"""Order to quality release, end to end, from simulators alone.

A real mosquitto carries MES events, the Modbus PLC simulator counts, the ERP simulator speaks
SAP S/4HANA OData behind OAuth2 client credentials (short-lived tokens), the QMS simulator
inspects and decides, and the gateway runs as `plantsync run` in its own process:

    MES order start (lot A) -> counts -> confirmations (101 receipt into quality-inspection
    stock of lot A) -> MES lot A completed + order end -> inspection.requested to the QMS ->
    the QMS rejects lot A -> the gateway polls the feed -> lot.disposition (usage decision R)
    -> ERP batch LOT-A blocked.
    The same for lot B of a second order, which the QMS releases -> ERP batch LOT-B
    unrestricted.

Meanwhile a watcher asks the gateway's local API `GET /lots/{lot_id}` about both lots every
100 ms and keeps every answer: each lot must read `hold` until its disposition arrived and the
decided value after, never `release` before the QMS released it; a lot nobody knows reads
`hold` (fail closed).

`lot.produced` is routed nowhere: the sap_s4hana profile does not take it (the goods receipt
into quality-inspection stock rides on each confirmation's 101 movement), and the gateway
keeps the lot's genealogy and status itself; its follow-up `inspection.requested` goes to the
QMS.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from simulators.mes_publisher import InputLot, MesPublisher, encode
from tests.conftest import (
    ErpSim,
    Mosquitto,
    Peer,
    PlcSim,
    free_port,
    start_erp,
    start_plc,
    start_qms,
)
from tests.gateway_process import GatewayProcess, start_gateway

pytestmark = pytest.mark.integration

SITE = "1010"
MACHINE = "press-01"
MATERIAL = "FG-4711"
COMPONENT = "RM-STEEL"
ERP_CLIENT = "gw"
ERP_SECRET = "erp-s3cret-7f2a"  # distinctive, so the log check below means something
WAIT = 30.0  # generous: every wait below normally ends within a few seconds


@dataclass(frozen=True)
class Answer:
    """One answer of the local API about a lot, with when the request was sent."""

    lot_id: str
    asked_at: float
    status: str
    source: str | None


class LotWatcher(threading.Thread):
    """Asks the gateway's local API about some lots, over and over, and keeps every answer."""

    def __init__(self, api: str, lots: list[str], interval: float = 0.1) -> None:
        super().__init__(name="lot-watcher", daemon=True)
        self.api, self.lots, self.interval = api, lots, interval
        self.answers: list[Answer] = []
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            while not self._stop_event.is_set():
                for lot_id in self.lots:
                    asked_at = time.time()
                    try:
                        response = client.get(f"{self.api}/lots/{lot_id}")
                        if response.status_code != 200:
                            self.errors.append(
                                f"{lot_id}: HTTP {response.status_code} {response.text[:200]!r}"
                            )
                            continue
                        body = response.json()
                    except (httpx.HTTPError, ValueError) as exc:
                        self.errors.append(f"{lot_id}: {type(exc).__name__}: {exc}")
                        continue
                    self.answers.append(
                        Answer(lot_id, asked_at, body["status"], body.get("source"))
                    )
                self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)

    def of(self, lot_id: str) -> list[Answer]:
        return [a for a in list(self.answers) if a.lot_id == lot_id]

    def latest(self, lot_id: str) -> str | None:
        answers = self.of(lot_id)
        return answers[-1].status if answers else None


Abort = Callable[[], str | None]
"""Why waiting any longer is pointless (the gateway died, its API fails), or None."""


def wait_for(
    condition: Callable[[], object], what: str, timeout: float = WAIT, *, abort: Abort | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if abort is not None and (reason := abort()) is not None:
            raise AssertionError(f"{reason}, while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


def write_config(
    tmp_path: Path, *, plc: PlcSim, broker: Mosquitto, erp: ErpSim, qms: ErpSim, api_port: int
) -> Path:
    config = tmp_path / "plant.yaml"
    config.write_text(f"""
site: "{SITE}"
data_dir: {tmp_path / "data"}
api: {{listen: "127.0.0.1:{api_port}"}}
shutdown_timeout: 5s
quality: {{qms: qms, poll_interval: 500ms}}
drivers:
  - name: {MACHINE}
    type: modbus
    host: 127.0.0.1
    port: {plc.port}
    poll_interval: 100ms
    timeout: 1s
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
    line: LINE-A
    signals: {{good: {MACHINE}.good, defective: {MACHINE}.bad}}
    confirm: {{every_units: 20, every: 1s}}
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
""")
    return config


def get_json(url: str) -> Any:
    response = httpx.get(url, timeout=10)
    response.raise_for_status()
    return response.json()


def batch(erp: ErpSim, lot_id: str) -> dict[str, Any] | None:
    response = httpx.get(f"{erp.url}/_sim/batches/{lot_id}", timeout=10)
    if response.status_code == 404:
        return None
    response.raise_for_status()
    found: dict[str, Any] = response.json()
    return found


def confirmations(erp: ErpSim, order_id: str) -> list[dict[str, Any]]:
    return [c for c in get_json(f"{erp.url}/_sim/sap/confirmations") if c["OrderID"] == order_id]


def received_into(erp: ErpSim, lot_id: str) -> Decimal:
    """What the confirmations' 101 goods receipts put into batch `lot_id`."""
    return sum(
        (
            Decimal(item["QuantityInEntryUnit"])
            for confirmation in get_json(f"{erp.url}/_sim/sap/confirmations")
            for item in confirmation["to_ProdnOrdConfMatlDocItm"]
            if item["Batch"] == lot_id and item["GoodsMovementType"] == "101"
        ),
        Decimal(0),
    )


def qms_decision(qms: ErpSim, lot_id: str) -> dict[str, Any] | None:
    response = httpx.get(f"{qms.url}/api/v1/lots/{lot_id}/disposition", timeout=10)
    if response.status_code == 404:
        return None
    response.raise_for_status()
    found: dict[str, Any] = response.json()
    return found


def unix(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def order_start(mes: MesPublisher, order_id: str, lot_id: str) -> None:
    """MES starts operation 0010 of `order_id` on the press, producing `lot_id`. (The
    publisher's `order_start` has no lot; the payload is the same plus `lot_id` and the
    order's components.)"""
    document = {
        "message_id": mes.next_message_id(),
        "site": SITE,
        "machine": MACHINE,
        "order_id": order_id,
        "operation": "0010",
        "material": MATERIAL,
        "lot_id": lot_id,
        "components": [COMPONENT],
        "quantity": 100,
        "uom": "C62",
        "occurred_at": datetime.now().astimezone().isoformat(timespec="milliseconds"),
    }
    mes.publish_raw(mes.topic("order/start"), encode(document)).wait()


def broken(gateway: GatewayProcess, watcher: LotWatcher) -> Abort:
    def reason() -> str | None:
        if gateway.process is not None and gateway.process.poll() is not None:
            return f"the gateway exited ({gateway.process.returncode}):\n{gateway.output()[-3000:]}"
        if watcher.errors:
            return f"the local API failed: {watcher.errors[:3]}"
        return None

    return reason


def run_lot(
    mes: MesPublisher,
    erp: ErpSim,
    watcher: LotWatcher,
    abort: Abort,
    *,
    order_id: str,
    lot_id: str,
    input_lot: str,
) -> None:
    """One order producing one lot, up to its final confirmation being in ERP."""
    order_start(mes, order_id, lot_id)
    # Counts become confirmations whose 101 receipts put the lot into quality inspection.
    wait_for(
        lambda: (found := batch(erp, lot_id)) and found["status"] == "quality_inspection",
        f"ERP to receive {lot_id} into quality-inspection stock",
        abort=abort,
    )
    assert watcher.latest(lot_id) == "hold"
    mes.consume(order_id, COMPONENT, input_lot, "12.5", uom="KGM").wait()
    mes.lot_completed(
        order_id,
        MATERIAL,
        lot_id,
        100,
        uom="C62",
        input_lots=[InputLot(input_lot, COMPONENT, "12.5", "KGM")],
    ).wait()
    mes.order_end(order_id).wait()
    wait_for(
        lambda: any(c["IsFinalConfirmation"] for c in confirmations(erp, order_id)),
        f"the final confirmation of order {order_id} in ERP",
        abort=abort,
    )


def check_answers(watcher: LotWatcher, lot_id: str, decided: str, decided_at: float) -> None:
    """`hold` until the disposition, `decided` after; nothing else, never back."""
    answers = watcher.of(lot_id)
    statuses = [a.status for a in answers]
    assert set(statuses) <= {"hold", decided}, f"{lot_id}: unexpected answers {set(statuses)}"
    first = statuses.index(decided)  # ValueError: never answered the decision
    assert all(s == "hold" for s in statuses[:first]), statuses
    assert all(s == decided for s in statuses[first:]), (
        f"{lot_id} went back from {decided}: {statuses[first:]}"
    )
    # Every question asked before the QMS decided was answered hold: the gateway cannot have
    # known, and it must not guess. (decided_at is cut to the millisecond: never late.)
    before = [a for a in answers if a.asked_at < decided_at]
    assert before and all(a.status == "hold" for a in before)
    # And the hold came from the gateway's own record of the produced lot, not only from the
    # unknown-lot default: the lot was held while the QMS was deciding.
    assert any(a.source == "produced, awaiting quality" for a in before), {a.source for a in before}
    assert answers[-1].source == "qms"


def test_rejected_lot_is_blocked_and_released_lot_is_unrestricted(
    peers: list[Peer], mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    erp = start_erp(peers, tmp_path, "--client", f"{ERP_CLIENT}:{ERP_SECRET}", "--token-ttl", "5")
    qms = start_qms(peers, tmp_path, "--decision-delay", "2", "--reject-lot", "LOT-A")
    plc = start_plc(peers, tmp_path, "--rate", "20")
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    config = write_config(tmp_path, plc=plc, broker=mosquitto, erp=erp, qms=qms, api_port=api_port)
    monkeypatch.setenv("ERP_SECRET", ERP_SECRET)  # the secret comes from the environment
    gateway = start_gateway(peers, config, tmp_path)
    wait_for(lambda: _listening(api), "the local API")
    watcher = LotWatcher(api, ["LOT-A", "LOT-B"])
    watcher.start()
    abort = broken(gateway, watcher)
    try:
        with MesPublisher(
            mosquitto.host, mosquitto.port, site=SITE, machine=MACHINE, run=uuid.uuid4().hex
        ) as mes:
            # Lot A: the QMS rejects it; ERP ends with the batch blocked.
            run_lot(mes, erp, watcher, abort, order_id="1000123", lot_id="LOT-A", input_lot="RM-1")
            wait_for(
                lambda: watcher.latest("LOT-A") == "reject",
                "the local API to answer reject for LOT-A",
                abort=abort,
            )
            wait_for(
                lambda: (batch(erp, "LOT-A") or {}).get("status") == "blocked",
                "ERP to block LOT-A",
                abort=abort,
            )
            # Lot B, of a second order: the QMS releases it; ERP ends with it unrestricted.
            assert watcher.latest("LOT-B") == "hold"
            run_lot(mes, erp, watcher, abort, order_id="1000124", lot_id="LOT-B", input_lot="RM-2")
            wait_for(
                lambda: watcher.latest("LOT-B") == "release",
                "the local API to answer release for LOT-B",
                abort=abort,
            )
            wait_for(
                lambda: (batch(erp, "LOT-B") or {}).get("status") == "unrestricted",
                "ERP to release LOT-B",
                abort=abort,
            )
            time.sleep(0.5)  # a few more answers after the decisions
    finally:
        watcher.stop()

    assert not watcher.errors, watcher.errors[:5]

    # The QMS: one lot_completed inspection per lot, one decision each.
    decision_a, decision_b = qms_decision(qms, "LOT-A"), qms_decision(qms, "LOT-B")
    assert decision_a is not None and decision_a["disposition"] == "reject"
    assert decision_b is not None and decision_b["disposition"] == "release"
    inspections = get_json(f"{qms.url}/_sim/inspections")
    assert sorted(
        (i["lot_id"], i["trigger"], i["order_id"], i["material"]) for i in inspections
    ) == [
        ("LOT-A", "lot_completed", "1000123", MATERIAL),
        ("LOT-B", "lot_completed", "1000124", MATERIAL),
    ]
    assert get_json(f"{qms.url}/stats")["dispositions"] == 2

    # The local API: hold until each decision, the decision after.
    check_answers(watcher, "LOT-A", "reject", unix(decision_a["decided_at"]))
    check_answers(watcher, "LOT-B", "release", unix(decision_b["decided_at"]))
    assert "release" not in {a.status for a in watcher.of("LOT-A")}
    unknown = get_json(f"{api}/lots/UNKNOWN")
    assert unknown["status"] == "hold" and unknown["source"] == "default (unknown lot)"

    # ERP: everything confirmed into a lot went into quality inspection first, then the usage
    # decision moved all of it: blocked for A, unrestricted for B. Same quantity on each side.
    lot_a, lot_b = batch(erp, "LOT-A"), batch(erp, "LOT-B")
    assert lot_a is not None and lot_b is not None
    assert lot_a["material"] == lot_b["material"] == MATERIAL
    assert Decimal(lot_a["quantity"]["blocked"]) == received_into(erp, "LOT-A") > 0
    assert Decimal(lot_a["quantity"]["quality_inspection"]) == 0
    assert Decimal(lot_a["quantity"]["unrestricted"]) == 0
    assert Decimal(lot_b["quantity"]["unrestricted"]) == received_into(erp, "LOT-B") > 0
    assert Decimal(lot_b["quantity"]["quality_inspection"]) == 0
    for lot, decided in ((lot_a, "blocked"), (lot_b, "unrestricted")):
        trail = [(h["action"], h["status_after"]) for h in lot["history"]]
        assert trail[0] == ("goods_receipt", "quality_inspection"), trail
        assert trail[-1] == ("usage_decision", decided), trail
        assert [action for action, _ in trail].count("usage_decision") == 1, trail
    decisions = get_json(f"{erp.url}/_sim/sap/usage-decisions")
    assert sorted((d["_lot"]["Batch"], d["InspectionLotUsageDecisionCode"]) for d in decisions) == [
        ("LOT-A", "R"),
        ("LOT-B", "A"),
    ]
    stats = erp.stats()
    assert stats["sap_duplicate_texts"] == 0
    assert stats["tokens_issued"] >= 2  # 5 s tokens over the run: refreshed, not failed
    # Both orders confirmed, each ending with one final confirmation.
    for order_id in ("1000123", "1000124"):
        finals = [c for c in confirmations(erp, order_id) if c["IsFinalConfirmation"]]
        assert len(finals) == 1, finals

    # The gateway: nothing dead-lettered anywhere, genealogy complete, the secret never logged.
    metrics = httpx.get(f"{api}/metrics", timeout=10).text
    assert _metric(metrics, "plantsync_outbox_dead_letters_total") == 0
    # Renamed (a ratio says so); the old name is kept, the same value, for one release.
    assert _metric(metrics, "plantsync_genealogy_completeness_ratio") == 1.0
    assert _metric(metrics, "plantsync_genealogy_completeness") == 1.0
    assert "plantsync_unassigned_production_total{" in metrics
    assert "plantsync_unassigned_units_total{" in metrics
    status = get_json(f"{api}/status")
    assert status["quality"]["decisions"] == 2 and status["quality"]["reachable"] is True
    assert {order: figure["completeness"] for order, figure in status["genealogy"].items()} == {
        "1000123": 1.0,
        "1000124": 1.0,
    }
    assert ERP_SECRET not in gateway.output()
    assert ERP_SECRET not in config.read_text()


def _listening(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"no {name} in /metrics"
    return float(match.group(1))


# -- fail closed: what the local API answers for a lot the gateway does not know ----------------


def lookup_config(tmp_path: Path, qms: ErpSim, api_port: int, unknown_lot: str) -> Path:
    """A gateway with only a QMS: it polls the disposition feed once at start (then not for an
    hour), so every lot decided after that is one only the QMS knows."""
    config = tmp_path / f"plant-{unknown_lot}.yaml"
    config.write_text(f"""
site: "{SITE}"
data_dir: {tmp_path / f"data-{unknown_lot}"}
api: {{listen: "127.0.0.1:{api_port}"}}
shutdown_timeout: 5s
quality: {{qms: qms, poll_interval: 1h, lookup_timeout: 500ms, unknown_lot: {unknown_lot}}}
destinations:
  qms:
    base_url: {qms.url}/api/v1
    profile: qms_rest
    retry: {{base: 100ms, cap: 1s}}
routes:
  inspection.requested: [qms]
""")
    return config


def decide(qms: ErpSim, lot_id: str, disposition: str) -> None:
    """A quality engineer decides in the QMS: the gateway does not hear of it (no poll)."""
    httpx.post(
        f"{qms.url}/_sim/decide", json={"lot_id": lot_id, "disposition": disposition}, timeout=10
    ).raise_for_status()


def ask(api: str, lot_id: str) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    response = httpx.get(f"{api}/lots/{lot_id}", timeout=10)
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found, time.monotonic() - started


@pytest.mark.parametrize("unknown_lot", ["hold", "release"])
def test_lot_lookup_fails_closed(peers: list[Peer], tmp_path: Path, unknown_lot: str) -> None:
    """Issue 18 item 2. The oracle is the QMS's own decision (set in the QMS, never seen by the
    gateway's feed) and the configured default: a lot only the QMS knows reads as the QMS
    decided it, whatever the default; a lot nobody knows, or one the QMS cannot tell in time
    (too slow, failing, down), reads as the configured default, never as a guess."""
    qms = start_qms(peers, tmp_path, "--decision-delay", "0")
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    config = lookup_config(tmp_path, qms, api_port, unknown_lot)
    gateway = start_gateway(peers, config, tmp_path, log_name=f"gateway-{unknown_lot}")
    wait_for(lambda: _listening(api), "the local API")
    # The one poll of the feed is done (reachable is set by it): what is decided from now on,
    # only the QMS knows.
    wait_for(lambda: get_json(f"{api}/status")["quality"]["reachable"] is True, "the first poll")
    default = {"status": unknown_lot, "source": "default (unknown lot)"}

    # Lots only the QMS knows: every decision is answered as the QMS made it.
    for lot_id, decided in (("QL-REL", "release"), ("QL-REJ", "reject"), ("QL-HLD", "hold")):
        decide(qms, lot_id, decided)
        answer, _ = ask(api, lot_id)
        assert (answer["status"], answer["source"]) == (decided, "qms (asked)"), answer
    # Asked once, then known: the second answer comes from the gateway's own record.
    again, _ = ask(api, "QL-REJ")
    assert again["status"] == "reject", again

    # A lot nobody knows: the QMS answers 404.
    answer, _ = ask(api, "QL-NOBODY")
    assert {k: answer[k] for k in default} == default, answer

    # A QMS slower than lookup_timeout: the default, within the timeout, not the late release.
    decide(qms, "QL-SLOW", "release")
    qms.set_faults(latency=3.0)
    answer, took = ask(api, "QL-SLOW")
    assert {k: answer[k] for k in default} == default, answer
    assert took < 2.0, f"the lookup took {took:.1f}s, lookup_timeout is 0.5s"
    qms.set_faults(latency=0.0)

    # A QMS that fails (HTTP 500, then 503): the default, not its body's guess.
    decide(qms, "QL-ERR", "release")
    qms.set_faults(error_rate=1.0, error_status=500)
    answer, _ = ask(api, "QL-ERR")
    assert {k: answer[k] for k in default} == default, answer
    qms.set_faults(error_status=503)
    answer, _ = ask(api, "QL-ERR")
    assert {k: answer[k] for k in default} == default, answer
    qms.set_faults(error_rate=0.0)

    # A QMS that is down: the default.
    decide(qms, "QL-DOWN", "release")
    qms.peer.stop()
    answer, took = ask(api, "QL-DOWN")
    assert {k: answer[k] for k in default} == default, answer
    assert took < 2.0, took
    # What it learnt while the QMS answered stays true while it is down.
    assert ask(api, "QL-REJ")[0]["status"] == "reject"
    assert ask(api, "QL-HLD")[0]["status"] == "hold"
    assert gateway.stop() == 0
