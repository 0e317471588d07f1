"""The whole flow, for real: Modbus PLC simulator -> gateway daemon -> ERP API simulator.

The daemon runs as `plantsync run` in its own process; the PLC counts to a known value and
stops; the confirmations ERP holds must add up exactly to the counter's advance with no event
id twice, including across a graceful restart and a kill -9 of the gateway mid-run.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    ErpSim,
    Peer,
    PlcSim,
    counter_baselines,
    free_port,
    start_plc,
)
from tests.gateway_process import GatewayProcess, start_gateway

pytestmark = pytest.mark.integration


def write_config(
    tmp_path: Path,
    plc: PlcSim,
    erp: ErpSim,
    *,
    every_units: int = 25,
    every: str = "1s",
    api_port: int | None = None,
) -> Path:
    config = tmp_path / "plant.yaml"
    config.write_text(f"""
site: "1010"
data_dir: {tmp_path / "data"}
api: {{listen: "127.0.0.1:{api_port or free_port()}"}}
shutdown_timeout: 5s
drivers:
  - name: press-01
    type: modbus
    host: 127.0.0.1
    port: {plc.port}
    poll_interval: 100ms
    timeout: 1s
    tags:
      - {{name: good, address: 0, type: uint32}}
      - {{name: bad, address: 2, type: uint32}}
      - {{name: state, address: 10, type: uint16}}
machines:
  - id: press-01
    line: LINE-A
    signals: {{good: press-01.good, defective: press-01.bad, state: press-01.state}}
    order: {{order_id: "1000123", operation: "0010", material: FG-4711, lot_id: LOT-1}}
    confirm: {{every_units: {every_units}, every: {every}}}
    state_map: {{4: Idle, 6: Execute, 17: Complete}}
destinations:
  erp:
    base_url: {erp.url}
    path: /api/events
    retry: {{base: 100ms, cap: 1s}}
routes:
  production.confirmation: [erp]
""")
    return config


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def confirmations(erp: ErpSim) -> list[dict[str, object]]:
    return [e["event"] for e in erp.events() if e["type"] == "production.confirmation"]  # type: ignore[misc]


def totals(events: list[dict[str, object]]) -> tuple[Decimal, Decimal]:
    good = sum(
        (Decimal(e["data"]["yield_quantity"]["value"]) for e in events),  # type: ignore[index]
        Decimal(0),
    )
    scrap = sum(
        (Decimal(e["data"]["scrap_quantity"]["value"]) for e in events),  # type: ignore[index]
        Decimal(0),
    )
    return good, scrap


def assert_exact_and_contiguous(events: list[dict[str, object]], start: int, end: int) -> None:
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)), "an event id reached ERP twice"
    ranges = sorted(
        (e["data"]["counter_from"], e["data"]["counter_to"])  # type: ignore[index]
        for e in events
    )
    # Counter ranges tile the advance: no gap, no overlap.
    position = 0
    for low, high in ranges:
        assert low == position, f"gap or overlap at {position}: {ranges}"
        position = high
    good, _ = totals(events)
    assert good == end - start == position


def test_confirmations_add_up_to_the_counter_advance(
    peers: list[Peer], erp_sim: ErpSim, tmp_path: Path
) -> None:
    # The gateway first, then the PLC on the port it polls: on a loaded box the PLC would
    # otherwise reach its stop value before the gateway's first reading (its baseline).
    port = free_port()
    config = write_config(tmp_path, PlcSim(None, port), erp_sim)  # type: ignore[arg-type]
    gateway = start_gateway(peers, config, tmp_path)
    plc = start_plc(
        peers,
        tmp_path,
        "--rate",
        "200",
        "--scrap-rate",
        "10",
        "--start",
        "1000",
        "--stop-at",
        "1600",
        port=port,
    )
    # The gateway's baseline is the first counter value it reads (it was not there before).
    wait_for(lambda: totals(confirmations(erp_sim))[0] >= 1, 30, "a first confirmation")
    events = confirmations(erp_sim)
    baseline = min(e["data"]["counter_from"] for e in events)  # type: ignore[index]
    assert baseline == 0
    wait_for(lambda: _counter_stopped(gateway), 30, "the PLC to reach its stop value")
    wait_for(lambda: _delivered_everything(erp_sim, gateway), 30, "ERP to hold everything")
    events = confirmations(erp_sim)
    status = _status(gateway)
    machine = status["machines"][0]
    assert machine["good_pending"] == 0
    assert_exact_and_contiguous(events, 0, machine["good_total"])
    # The oracle is the PLC: its own counters, less the gateway's one baseline per counter
    # (its first reading), are what ERP holds, nothing pending.
    plc_good, plc_scrap = plc.counters()
    assert plc_good == 1600
    (good_baseline,) = counter_baselines(gateway.output(), "press-01.good")
    (scrap_baseline,) = counter_baselines(gateway.output(), "press-01.bad")
    assert 1000 <= good_baseline < 1600
    good, scrap = totals(events)
    assert good == plc_good - good_baseline
    assert scrap == plc_scrap - scrap_baseline
    assert erp_sim.stats()["duplicates"] == 0
    event = events[0]
    assert event["type"] == "com.plantsync.edge.production.confirmation.v1"  # as ERP sees it
    assert event["partitionkey"] == "1000123"
    assert event["data"]["order_id"] == "1000123"  # type: ignore[index]
    assert gateway.stop() == 0


@pytest.mark.parametrize(
    "stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["graceful", "kill-9"]
)
def test_restart_mid_run_loses_nothing_and_duplicates_nothing(
    peers: list[Peer], erp_sim: ErpSim, tmp_path: Path, stop_signal: int
) -> None:
    plc = start_plc(peers, tmp_path, "--rate", "150", "--start", "0", "--stop-at", "2400")
    config = write_config(tmp_path, plc, erp_sim, every_units=10, every="500ms")
    # ERP is slow, so there is always something in flight when the gateway goes down.
    erp_sim.set_faults(latency=0.02)
    gateway = start_gateway(peers, config, tmp_path)
    wait_for(lambda: len(confirmations(erp_sim)) >= 5, 30, "deliveries before the restart")
    gateway.stop(stop_signal)
    time.sleep(1.0)  # the PLC keeps counting while the gateway is down
    gateway = start_gateway(peers, config, tmp_path)
    wait_for(lambda: len(confirmations(erp_sim)) >= 15, 30, "deliveries after the restart")
    gateway.stop(stop_signal)
    gateway = start_gateway(peers, config, tmp_path)
    erp_sim.set_faults(latency=0)
    wait_for(lambda: _counter_stopped(gateway), 40, "the PLC to reach its stop value")
    wait_for(lambda: _delivered_everything(erp_sim, gateway), 30, "ERP to hold everything")
    events = confirmations(erp_sim)
    machine = _status(gateway)["machines"][0]
    assert_exact_and_contiguous(events, 0, machine["good_total"])
    # Exactly one baseline over all runs (the restarts resumed from the committed state), and
    # everything the PLC counted after it was confirmed: nothing lost across the restarts.
    baselines = counter_baselines(gateway.output(), "press-01.good")
    assert len(baselines) == 1, baselines
    plc_good, _ = plc.counters()
    assert totals(events)[0] == machine["good_total"] == plc_good - baselines[0]
    assert gateway.stop() == 0


def test_erp_outage_is_retried_until_delivered(
    peers: list[Peer], erp_sim: ErpSim, tmp_path: Path
) -> None:
    erp_sim.set_faults(error_rate=1.0, error_status=503, retry_after=0)
    port = free_port()  # the gateway first, then the PLC (as above)
    config = write_config(tmp_path, PlcSim(None, port), erp_sim)  # type: ignore[arg-type]
    gateway = start_gateway(peers, config, tmp_path)
    start_plc(peers, tmp_path, "--rate", "100", "--stop-at", "300", port=port)
    wait_for(lambda: _counter_stopped(gateway), 30, "the PLC to stop")
    wait_for(
        lambda: _status(gateway)["destinations"]["erp"]["reachable"] is False,
        10,
        "the gateway to see ERP failing",
    )
    assert confirmations(erp_sim) == []
    erp_sim.set_faults(error_rate=0.0)
    wait_for(lambda: _delivered_everything(erp_sim, gateway), 30, "ERP to hold everything")
    machine = _status(gateway)["machines"][0]
    assert_exact_and_contiguous(confirmations(erp_sim), 0, machine["good_total"])
    assert "Destination erp is failing" in gateway.output()
    assert "Destination erp is delivering again" in gateway.output()
    assert gateway.output().count("Destination erp is failing") == 1  # no storm in retries


def _status(gateway: GatewayProcess) -> dict[str, object]:
    return gateway.get("/status").json()  # type: ignore[no-any-return]


def _counter_stopped(gateway: GatewayProcess) -> bool:
    try:
        status = _status(gateway)
    except httpx.HTTPError:
        return False
    state = status["signals"].get("press-01.state")  # type: ignore[attr-defined]
    return state is not None and state["value"] == 17


def _delivered_everything(erp: ErpSim, gateway: GatewayProcess) -> bool:
    try:
        status = _status(gateway)
    except httpx.HTTPError:
        return False
    machine = status["machines"][0]  # type: ignore[index]
    if machine["good_pending"] or machine["scrap_pending"]:
        return False
    good, scrap = totals(confirmations(erp))
    return bool(good == machine["good_total"] and scrap == machine["scrap_total"])
