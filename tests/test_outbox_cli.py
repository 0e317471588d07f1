"""`plantsync outbox ...` against a running daemon (through its API, with the token) and
against the database directly when the daemon is down."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, ErpSim, Peer, PlcSim, free_port, start_plc
from tests.test_gateway import _api_port, start_gateway, wait_for, write_config

pytestmark = pytest.mark.integration


def outbox_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge.cli", "outbox", "--config", str(config),
                           *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


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
    port = _api_port(gateway)
    refused = httpx.post(f"http://127.0.0.1:{port}/outbox/retry", json={"all_dead": True})
    assert refused.status_code == 401
    erp_sim.set_faults(error_rate=0.0)
    retried = outbox_cli(config, "retry", "--all-dead", "--reason", "ERP fixed the 422")
    assert retried.returncode == 0 and "put back in line" in retried.stdout, retried.stderr
    wait_for(lambda: dead_count() == 0 and len(erp_sim.events()) >= 2, 30, "redelivery")
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert "plantsync_outbox_dead_letters_retried_total" in metrics
    wait_for(lambda: json.loads(outbox_cli(config, "--json", "status").stdout)["destinations"]
             .get("erp", {}).get("pending", 0) == 0, 30, "everything delivered")
    assert gateway.stop() == 0

    # Daemon down: the CLI reads the database itself.
    journal = outbox_cli(config, "journal", "--since", "1h")
    assert journal.returncode == 0
    assert "(from the database directly)" in journal.stdout
    assert journal.stdout.count("production.confirmation") == len(erp_sim.events())
    assert re.search(r"\s201\s+1\s+ERP-\d+$", journal.stdout, re.MULTILINE), journal.stdout
