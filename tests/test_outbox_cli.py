"""`plantsync outbox ...` against a running daemon (through its API, with the token) and
against the database directly when the daemon is down."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from edge.model.ids import event_id
from simulators.mes_publisher import MesPublisher
from tests.conftest import ROOT, ErpSim, Mosquitto, Peer, PlcSim, free_port, start_plc
from tests.gateway_process import start_gateway
from tests.processes import run_process
from tests.test_gateway import wait_for, write_config

pytestmark = pytest.mark.integration


def outbox_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_process(
        [sys.executable, "-m", "edge.cli", "outbox", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_dead_letters_seen_retried_and_journalled(
    peers: list[Peer], erp_sim: ErpSim, tmp_path: Path
) -> None:
    # The gateway first, then the PLC on the port it polls: on a loaded box the PLC would
    # otherwise reach its stop value before the gateway's first reading (its baseline).
    port = free_port()
    erp_sim.set_faults(error_rate=1.0, error_status=422)
    config = write_config(tmp_path, PlcSim(None, port), erp_sim, every_units=50)  # type: ignore[arg-type]
    gateway = start_gateway(peers, config, tmp_path)
    start_plc(peers, tmp_path, "--rate", "100", "--stop-at", "200", port=port)

    def dead_count() -> int:
        done = outbox_cli(config, "--json", "status")
        assert done.returncode == 0, done.stderr
        return int(json.loads(done.stdout)["destinations"].get("erp", {}).get("dead", 0))

    wait_for(lambda: dead_count() >= 2, 30, "dead letters")
    status = outbox_cli(config, "status")
    assert "erp" in status.stdout and "(from the running daemon)" in status.stdout
    listed = outbox_cli(config, "--json", "list", "--state", "dead")
    dead = json.loads(listed.stdout)
    assert dead[0]["last_status"] == 422
    shown = outbox_cli(config, "show", dead[0]["id"])
    assert "production.confirmation" in shown.stdout and '"yield_quantity": {' in shown.stdout

    # Changing anything over the API needs the token; the CLI finds the daemon's token file.
    port = gateway.api_port
    refused = httpx.post(f"http://127.0.0.1:{port}/outbox/retry", json={"all_dead": True})
    assert refused.status_code == 401
    erp_sim.set_faults(error_rate=0.0)
    retried = outbox_cli(config, "retry", "--all-dead", "--reason", "ERP fixed the 422")
    assert retried.returncode == 0 and "put back in line" in retried.stdout, retried.stderr
    wait_for(lambda: dead_count() == 0 and len(erp_sim.events()) >= 2, 30, "redelivery")
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert "plantsync_outbox_dead_letters_retried_total" in metrics
    wait_for(
        lambda: (
            json.loads(outbox_cli(config, "--json", "status").stdout)["destinations"]
            .get("erp", {})
            .get("pending", 0)
            == 0
        ),
        30,
        "everything delivered",
    )
    assert gateway.stop() == 0

    # Daemon down: the CLI reads the database itself.
    journal = outbox_cli(config, "journal", "--since", "1h")
    assert journal.returncode == 0
    assert "(from the database directly)" in journal.stdout
    assert journal.stdout.count("production.confirmation") == len(erp_sim.events())
    assert re.search(r"\s201\s+1\s+ERP-\d+$", journal.stdout, re.MULTILINE), journal.stdout


FIXED = "ZCS added to uom_codes"


def mes_plant(tmp_path: Path, broker: Mosquitto, erp: ErpSim, *, uom_codes: str = "[]") -> Path:
    config = tmp_path / "plant.yaml"
    config.write_text(f"""
site: "1010"
data_dir: {tmp_path / "data"}
api: {{listen: "127.0.0.1:{free_port()}"}}
shutdown_timeout: 5s
uom_codes: {uom_codes}
validation: {{require_known_order: false}}
drivers:
  - name: mes
    type: mqtt
    host: {broker.host}
    port: {broker.port}
    client_id: plantsync-reingest-{uuid.uuid4().hex[:8]}
    topics:
      - filter: mes/1010/+/consumption
        event: material.consumed
        fields: {{order_id: order_id, material: material, lot_id: lot_id,
                 quantity.value: quantity, quantity.uom: uom, occurred_at: occurred_at}}
destinations:
  erp:
    base_url: {erp.url}
    path: /api/events
    retry: {{base: 100ms, cap: 1s}}
routes:
  material.consumed: [erp]
""")
    return config


def test_a_rejected_mes_message_is_traced_and_reingested_after_the_fix(
    peers: list[Peer], mosquitto: Mosquitto, erp_sim: ErpSim, tmp_path: Path
) -> None:
    """Issue 12 item 10: an input dead letter keeps the MES message id and the payload as it
    arrived; the id rides in the canonical event (`sourcemessageid`) and in the log lines; and
    `outbox reingest ID` runs the message through the config once it is fixed, through the
    running daemon or, with none running, on the database."""
    config = mes_plant(tmp_path, mosquitto, erp_sim)
    gateway = start_gateway(peers, config, tmp_path)
    wait_for(lambda: "connected as" in gateway.output(), 30, "the MQTT driver")
    with MesPublisher(
        mosquitto.host, mosquitto.port, site="1010", machine="press-01", run=uuid.uuid4().hex
    ) as mes:
        # The plant's ERP counts cases in ZCS, which the gateway does not know yet.
        refused = [mes.consume("1000123", "RM-CASE", f"RM-{n}", "4", uom="ZCS") for n in (1, 2)]
        accepted = mes.consume("1000123", "RM-STEEL", "RM-9", "12.5", uom="KGM")
        for publication in (*refused, accepted):
            publication.wait()
    wait_for(lambda: len(erp_sim.events()) == 1, 30, "the accepted message in ERP")

    # Traced: the ERP event names the MES message, and its id is derived from it alone.
    (row,) = erp_sim.events()
    event = row["event"]
    assert isinstance(event, dict)
    assert event["sourcemessageid"] == accepted.message_id
    assert event["id"] == event_id(
        "material.consumed", "1010", "material.consumed", str(accepted.message_id)
    )
    listed = outbox_cli(config, "--json", "rejected")
    assert listed.returncode == 0, listed.stderr
    rows = sorted(json.loads(listed.stdout), key=lambda r: r["id"])
    assert [r["message_id"] for r in rows] == [p.message_id for p in refused]
    # The payload as it arrived, byte for byte, not the fields the mapping made of it.
    assert [r["payload"] for r in rows] == [p.payload.decode() for p in refused]
    assert all("ZCS" in r["reason"] for r in rows)
    output = gateway.output()
    assert all(f"Rejected MES message {p.message_id}" in output for p in refused)
    assert f"from MES message {accepted.message_id}" in output

    # Run again before the fix: rejected again, the dead letter stays (one row, new reason).
    again = outbox_cli(config, "reingest", str(rows[0]["id"]), "--reason", "ZCS not known yet")
    assert again.returncode == 1 and "rejected again" in again.stdout, again
    assert len(json.loads(outbox_cli(config, "--json", "rejected").stdout)) == 2

    # The fix: the config learns the unit; the gateway restarts on it.
    assert gateway.stop() == 0
    config.write_text(config.read_text().replace("uom_codes: []", "uom_codes: [ZCS]"))
    gateway = start_gateway(peers, config, tmp_path)
    done = outbox_cli(config, "--json", "reingest", str(rows[0]["id"]), "--reason", FIXED)
    assert done.returncode == 0, done
    first = json.loads(done.stdout)
    expected = [
        event_id("material.consumed", "1010", "material.consumed", str(p.message_id))
        for p in refused
    ]
    assert first == {
        "id": rows[0]["id"],
        "message_id": refused[0].message_id,
        "outcome": "accepted",
        "events": [expected[0]],
    }
    assert "Manual intervention: input dead letter" in gateway.output()
    hand = json.loads(outbox_cli(config, "--json", "hand-actions").stdout)
    assert [(h["action"], h["reason"], h["affected"]) for h in hand] == [
        ("reingest", "ZCS not known yet", 0),
        ("reingest", FIXED, 1),
    ]
    twice = outbox_cli(config, "reingest", str(rows[0]["id"]), "--reason", "ZCS not known yet")
    assert twice.returncode != 0 and "no input dead letter" in twice.stderr, twice

    # With no daemon running, the CLI runs the other one on the database itself; the next
    # start delivers it.
    assert gateway.stop() == 0
    offline = outbox_cli(config, "reingest", str(rows[1]["id"]), "--reason", FIXED)
    assert offline.returncode == 0, offline
    assert "accepted" in offline.stdout and "(from the database directly)" in offline.stdout
    gateway = start_gateway(peers, config, tmp_path)
    wait_for(lambda: len(erp_sim.events()) == 3, 30, "the reingested messages in ERP")
    events = {r["id"]: r["event"] for r in erp_sim.events()}
    for publication, expected_id in zip(refused, expected, strict=True):
        assert events[expected_id]["sourcemessageid"] == publication.message_id  # type: ignore[index]
        assert events[expected_id]["data"]["quantity"] == {"uom": "ZCS", "value": "4"}  # type: ignore[index]
    assert json.loads(outbox_cli(config, "--json", "rejected").stdout) == []
    assert erp_sim.stats()["duplicates"] == 0
    assert gateway.stop() == 0
