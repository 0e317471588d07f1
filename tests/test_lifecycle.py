"""The daemon's life under systemd: sd_notify, the watchdog, SIGTERM and a second SIGTERM,
SIGHUP reloads, health and metrics through a broker outage, the unit file and the installer.

The daemon runs as a real process against the PLC and ERP simulators and a real mosquitto;
systemd's side of sd_notify is a unix datagram socket this test binds.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from buffer.outbox import Outbox
from edge.runtime.systemd import Notifier, Supervisor
from tests.conftest import (
    ROOT,
    ErpSim,
    Mosquitto,
    Peer,
    PlcSim,
    free_port,
    missing_peer,
    start_erp,
    start_plc,
)
from tests.gateway_process import READY_TEXT, start_gateway
from tests.processes import run_process
from tests.test_gateway import (
    _counter_stopped,
    _delivered_everything,
    _status,
    assert_exact_and_contiguous,
    confirmations,
    wait_for,
    write_config,
)


class NotifySocket:
    """systemd's end of sd_notify: collects the datagrams the daemon sends."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind("\0" + address[1:] if address.startswith("@") else address)
        self.socket.settimeout(0.1)
        self.messages: list[str] = []

    def receive(self) -> None:
        while True:
            try:
                self.messages.append(self.socket.recv(4096).decode())
            except TimeoutError:
                return

    async def listen(self, seconds: float) -> None:
        """Keep reading for a while, as systemd would (its queue holds a few datagrams)."""
        self.socket.setblocking(False)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.messages.append(self.socket.recv(4096).decode())
            except BlockingIOError:
                await asyncio.sleep(0.02)
        self.socket.settimeout(0.1)

    def lines(self) -> list[str]:
        self.receive()
        return [line for message in self.messages for line in message.splitlines()]

    def wait_for(self, line: str, timeout: float = 20.0, count: int = 1) -> None:
        wait_for(lambda: self.lines().count(line) >= count, timeout, f"{count} x {line}")

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    listener = NotifySocket(f"@plantsync-test-{uuid.uuid4().hex}")
    yield listener
    listener.close()


def metric(text: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return None if match is None else float(match.group(1))


# --- sd_notify -----------------------------------------------------------------------------------


def test_notifier_is_a_no_op_without_notify_socket() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled and notifier.watchdog_interval is None
    assert notifier.send("READY=1") is False


def test_notifier_reaches_path_and_abstract_sockets(tmp_path: Path) -> None:
    for address in (str(tmp_path / "notify.sock"), f"@plantsync-{uuid.uuid4().hex}"):
        listener = NotifySocket(address)
        notifier = Notifier.from_environment(
            {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "30000000"}
        )
        assert notifier.watchdog_interval == 15.0
        notifier.ready("drivers 1/1 connected")
        notifier.watchdog()
        assert listener.lines() == ["READY=1", "STATUS=drivers 1/1 connected", "WATCHDOG=1"]
        notifier.close()
        listener.close()
    # The watchdog belongs to another process: not ours to ping.
    other = Notifier.from_environment(
        {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    )
    assert other.watchdog_interval is None


class _Watched:
    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def status_line(self) -> str:
        return "drivers 0/0 connected"


@pytest.mark.integration
async def test_watchdog_pings_stop_while_the_outbox_is_wedged(tmp_path: Path) -> None:
    listener = NotifySocket(str(tmp_path / "notify.sock"))
    async with Outbox.open(tmp_path / "outbox.db") as outbox:
        supervisor = Supervisor(Notifier(listener.address, watchdog_usec=400_000), status_every=0.1)
        supervisor.watch(_Watched(outbox))
        running = asyncio.create_task(supervisor.run())
        try:
            await listener.listen(1.0)
            assert supervisor.pings >= 3, "no pings while healthy"
            # Another connection takes the write lock: the writer waits (busy_timeout), and the
            # probe's commit cannot finish within its deadline.
            blocker = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")
            await listener.listen(0.5)  # a probe already in flight may still get through
            wedged_at = supervisor.pings
            await listener.listen(1.5)
            assert supervisor.pings == wedged_at, "pinged while the outbox was wedged"
            blocker.execute("ROLLBACK")
            blocker.close()
            await listener.listen(1.5)
            assert supervisor.pings > wedged_at, "no pings after the outbox recovered"
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
    lines = listener.lines()
    assert "STATUS=drivers 0/0 connected" in lines
    assert lines.count("WATCHDOG=1") == supervisor.pings
    listener.close()


@pytest.mark.integration
def test_systemd_hears_ready_status_watchdog_and_stopping(
    peers: list[Peer],
    erp_sim: ErpSim,
    tmp_path: Path,
    notify_socket: NotifySocket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plc = start_plc(peers, tmp_path, "--rate", "50")
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # a ping every 0.5 s
    gateway = start_gateway(peers, write_config(tmp_path, plc, erp_sim), tmp_path)
    notify_socket.wait_for("READY=1")
    notify_socket.wait_for("WATCHDOG=1", count=4, timeout=10)
    wait_for(
        lambda: any(
            line.startswith("STATUS=drivers 1/1 connected; outbox ")
            for line in notify_socket.lines()
        ),
        20,
        "a STATUS= line",
    )
    assert gateway.stop(signal.SIGTERM) == 0
    lines = notify_socket.lines()
    assert "STOPPING=1" in lines
    assert lines.index("READY=1") < lines.index("STOPPING=1")
    status = next(line for line in lines if line.startswith("STATUS=drivers"))
    assert re.fullmatch(
        r"STATUS=drivers \d/1 connected; outbox \d+ pending \(\d+ retrying\), "
        r"\d+ dead; back-pressure off",
        status,
    ), status


# --- SIGTERM -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_sigterm_drains_within_the_timeout_and_loses_nothing(
    peers: list[Peer], erp_sim: ErpSim, tmp_path: Path
) -> None:
    plc = start_plc(peers, tmp_path, "--rate", "150", "--stop-at", "2400")
    config = write_config(tmp_path, plc, erp_sim, every_units=10, every="500ms")
    erp_sim.set_faults(latency=0.05)  # deliveries are in flight when the signal comes
    gateway = start_gateway(peers, config, tmp_path)
    wait_for(lambda: len(confirmations(erp_sim)) >= 10, 30, "deliveries before the signal")
    started = time.monotonic()
    assert gateway.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 5 + 3, "the stop overran shutdown_timeout (5s)"
    output = gateway.output()
    assert "Stopping: drivers first" in output and "Stopped; outbox holds" in output
    # Everything the rules committed is either acknowledged (journal) or still owed.
    committed = output.count("Committed production.confirmation")
    with sqlite3.connect(tmp_path / "data" / "outbox.db") as db:
        journalled = db.execute("SELECT COUNT(*) FROM journal").fetchone()[0]
        owed = db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
        journal_ids = {row[0] for row in db.execute("SELECT event_id FROM journal")}
    assert committed == journalled + owed
    assert journal_ids <= {e["id"] for e in confirmations(erp_sim)}
    erp_sim.set_faults(latency=0)
    gateway = start_gateway(peers, config, tmp_path)
    wait_for(lambda: _counter_stopped(gateway), 40, "the PLC to reach its stop value")
    wait_for(lambda: _delivered_everything(erp_sim, gateway), 30, "ERP to hold everything")
    machine = _status(gateway)["machines"][0]  # type: ignore[index]
    assert_exact_and_contiguous(confirmations(erp_sim), 0, machine["good_total"])
    assert len({e["id"] for e in confirmations(erp_sim)}) >= committed
    assert gateway.stop() == 0


@pytest.mark.integration
def test_a_second_sigterm_aborts_a_slow_drain(
    peers: list[Peer], erp_sim: ErpSim, tmp_path: Path
) -> None:
    plc = start_plc(peers, tmp_path, "--rate", "100", "--stop-at", "400")
    config = write_config(tmp_path, plc, erp_sim, every_units=50)
    text = config.read_text().replace("shutdown_timeout: 5s", "shutdown_timeout: 120s")
    config.write_text(text.replace("    retry:", "    timeout: 120s\n    retry:"))
    erp_sim.set_faults(latency=60)  # ERP takes a minute per request
    gateway = start_gateway(peers, config, tmp_path)
    wait_for(
        lambda: _status(gateway)["destinations"]["erp"]["in_flight"] >= 1,
        30,  # type: ignore[index]
        "a delivery in flight",
    )
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGTERM)
    wait_for(lambda: "Stopping: drivers first" in gateway.output(), 10, "the stop to begin")
    time.sleep(1.0)
    assert gateway.process.poll() is None, "the drain should still be waiting for ERP"
    started = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(10) == 1
    assert time.monotonic() - started < 5
    assert "again; aborting the shutdown" in gateway.output()
    # Nothing lost: the next start delivers what the aborted drain left in the outbox.
    erp_sim.set_faults(latency=0)
    gateway = start_gateway(peers, config, tmp_path)
    wait_for(lambda: _counter_stopped(gateway), 30, "the PLC to reach its stop value")
    wait_for(lambda: _delivered_everything(erp_sim, gateway), 30, "ERP to hold everything")
    machine = _status(gateway)["machines"][0]  # type: ignore[index]
    assert_exact_and_contiguous(confirmations(erp_sim), 0, machine["good_total"])
    assert gateway.stop() == 0


# --- SIGHUP --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_sighup_refuses_an_invalid_config_and_applies_a_valid_one(
    peers: list[Peer],
    erp_sim: ErpSim,
    tmp_path: Path,
    notify_socket: NotifySocket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plc = start_plc(peers, tmp_path, "--rate", "100", "--stop-at", "2500")
    archive = start_erp(peers, tmp_path)
    config = write_config(tmp_path, plc, erp_sim, every_units=50, every="1h")
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    gateway = start_gateway(peers, config, tmp_path)
    port = gateway.api_port
    wait_for(lambda: len(confirmations(erp_sim)) >= 2, 30, "confirmations of 50")
    assert gateway.process is not None
    good_config = config.read_text()

    # An invalid file: every problem is logged, and the old config runs on.
    config.write_text(good_config.replace("poll_interval: 100ms", "poll_intervall: 100ms"))
    gateway.process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: "Reload refused: the new config has 1 problem(s)" in gateway.output(),
        40,
        "the refusal",
    )
    assert re.search(
        r"Reload refused: .*plant\.yaml:\d+: drivers\[0\]\.poll_intervall: "
        r"unknown key \(did you mean 'poll_interval'\?\)",
        gateway.output(),
    )
    count = len(confirmations(erp_sim))
    wait_for(lambda: len(confirmations(erp_sim)) > count, 40, "confirmations to go on")
    assert gateway.output().count(READY_TEXT) == 1
    metrics = gateway.get("/metrics").text
    assert metric(metrics, 'plantsync_config_reloads_total{outcome="refused"}') == 1.0

    # A valid one: confirm every 20 units, a second destination, and new outbox settings (the
    # outbox is closed and opened again under the running daemon).
    write_config(tmp_path, plc, erp_sim, every_units=20, every="1h", api_port=port)
    config.write_text(
        config.read_text().replace(
            "routes:\n  production.confirmation: [erp]",
            f"  archive:\n    base_url: {archive.url}\n    path: /api/events\n"
            "routes:\n  production.confirmation: [erp, archive]",
        )
        + "outbox: {commit_interval: 2ms}\n"
    )
    gateway.process.send_signal(signal.SIGHUP)
    wait_for(lambda: gateway.output().count(READY_TEXT) == 2, 60, "the gateway to restart")
    output = gateway.output()
    assert "Reload: destination archive added" in output
    assert "Reload: machine press-01 changed (confirm)" in output
    assert "Reload: route of production.confirmation changed" in output
    assert "Reopening the outbox with the new settings" in output
    notify_socket.wait_for("READY=1", count=3)  # start, after the refusal, after the reload
    lines = notify_socket.lines()
    assert lines.count("RELOADING=1") == 2
    wait_for(lambda: len(confirmations(archive)) >= 2, 30, "the new destination to receive")
    wait_for(
        lambda: any(
            e["data"]["yield_quantity"]["value"] == "20"  # type: ignore[index]
            for e in confirmations(erp_sim)
        ),
        30,
        "a confirmation of 20",
    )

    # Nothing was lost or counted twice across the reload: one baseline, exact tiling.
    wait_for(lambda: _counter_stopped(gateway), 40, "the PLC to reach its stop value")
    wait_for(lambda: _delivered_everything(erp_sim, gateway), 30, "ERP to hold everything")
    machine = _status(gateway)["machines"][0]  # type: ignore[index]
    assert_exact_and_contiguous(confirmations(erp_sim), 0, machine["good_total"])
    assert gateway.output().count("is the baseline") == 2  # good and bad, once each
    metrics = gateway.get("/metrics").text
    assert metric(metrics, 'plantsync_config_reloads_total{outcome="applied"}') == 1.0
    assert gateway.stop() == 0


# --- health and metrics through a broker outage --------------------------------------------------


@pytest.mark.integration
def test_metrics_and_readyz_report_a_broker_outage_and_its_recovery(
    peers: list[Peer], erp_sim: ErpSim, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    from tests.conftest import free_port

    port = free_port()
    config = tmp_path / "plant.yaml"
    config.write_text(f"""
site: "1010"
data_dir: {tmp_path / "data"}
api: {{listen: "127.0.0.1:{port}"}}
validation: {{require_known_order: false}}
drivers:
  - name: mes
    type: mqtt
    host: 127.0.0.1
    port: {mosquitto.port}
    client_id: plantsync-test-{uuid.uuid4().hex[:8]}
    keepalive: 5s
    topics:
      - filter: mes/1010/+/consumption
        event: material.consumed
        fields: {{order_id: order_id, material: material, quantity.value: quantity,
                  quantity.uom: uom}}
destinations:
  erp: {{base_url: {erp_sim.url}, path: /api/events}}
routes:
  material.consumed: [erp]
""")
    gateway = start_gateway(peers, config, tmp_path)
    connected = 'plantsync_driver_connected{driver="mes"}'

    def driver_up() -> float | None:
        return metric(gateway.get("/metrics").text, connected)

    wait_for(lambda: driver_up() == 1.0, 20, "the driver to connect")
    wait_for(lambda: gateway.get("/readyz").status_code == 200, 10, "ready")
    assert metric(gateway.get("/metrics").text, "plantsync_ready") == 1.0

    mosquitto.stop()
    wait_for(lambda: driver_up() == 0.0, 20, "the metric to show the outage")
    readyz = gateway.get("/readyz")
    assert readyz.status_code == 503
    assert any(
        reason.startswith("driver mes is not connected") for reason in readyz.json()["reasons"]
    ), readyz.json()
    assert metric(gateway.get("/metrics").text, "plantsync_ready") == 0.0

    mosquitto.start()
    wait_for(lambda: driver_up() == 1.0, 40, "the metric to show the recovery")
    wait_for(lambda: gateway.get("/readyz").status_code == 200, 10, "ready again")
    output = gateway.output()
    assert output.count("MQTT broker mes at") >= 2  # once down, once back
    assert gateway.stop() == 0


# --- the status CLI ------------------------------------------------------------------------------


def status_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_process(
        [sys.executable, "-m", "edge.cli", "status", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


@pytest.mark.integration
def test_status_cli_from_the_daemon_and_from_the_database(
    peers: list[Peer], erp_sim: ErpSim, tmp_path: Path
) -> None:
    # The gateway first, then the PLC on the port it polls: on a loaded box the PLC would
    # otherwise reach its stop value before the gateway's first reading (its baseline).
    port = free_port()
    erp_sim.set_faults(error_rate=1.0, error_status=422)
    config = write_config(tmp_path, PlcSim(None, port), erp_sim, every_units=50)  # type: ignore[arg-type]
    gateway = start_gateway(peers, config, tmp_path)
    start_plc(peers, tmp_path, "--rate", "200", "--stop-at", "400", port=port)
    wait_for(lambda: _counter_stopped(gateway), 30, "the PLC to stop")
    wait_for(
        lambda: _status(gateway)["destinations"]["erp"]["dead"] >= 2,
        30,  # type: ignore[index]
        "dead letters",
    )
    shown = status_cli(config)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert "(from the running daemon)" in text
    assert re.search(r"^press-01\s+yes\s+\d", text, re.MULTILINE), text
    assert re.search(r"^press-01\s+1000123/0010\s+LOT-1\s+Complete\s+\d+", text, re.MULTILINE), text
    assert re.search(r"^erp\s+\d+\s+\d+\s+[1-9]\d*\s", text, re.MULTILINE), text
    assert re.search(r"RECENT DEAD LETTERS \([1-9]\d* in all", text), text
    assert "production.confirmation" in text and " 422 " in text
    good_total = _status(gateway)["machines"][0]["good_total"]  # type: ignore[index]
    assert gateway.stop() == 0

    offline = status_cli(config, "--json")
    assert offline.returncode == 0, offline.stderr
    import json

    report = json.loads(offline.stdout)
    assert report["source"] == "database"
    assert report["machines"][0]["good_total"] == good_total
    assert report["destinations"]["erp"]["dead"] >= 2
    text = status_cli(config).stdout
    assert "(from the database directly)" in text and re.search(
        r"^press-01\s+\?", text, re.MULTILINE
    ), text


# --- the unit file and the installer -------------------------------------------------------------


@pytest.mark.integration
def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        missing_peer("systemd-analyze is not installed (apt-get install systemd)")
    unit = (ROOT / "systemd" / "plantsync.service").read_text()
    # The unit names /opt/plantsync, which only the installer creates: verify a copy whose
    # commands point at this checkout's plantsync instead.
    binary = Path(sys.executable).with_name("plantsync")
    assert binary.exists()
    copy = tmp_path / "plantsync.service"
    copy.write_text(
        unit.replace("/opt/plantsync/bin/plantsync", str(binary)).replace(
            "/etc/plantsync/plant.yaml", str(ROOT / "config" / "demo.yaml")
        )
    )
    done = run_process([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    complaints = [
        line for line in (done.stdout + done.stderr).splitlines() if "plantsync.service" in line
    ]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr
    for setting in (
        "Type=notify",
        "WatchdogSec=",
        "ExecStartPre=",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=plantsync",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "LoadCredential=",
        "StateDirectoryMode=0700",
        "UMask=0077",
        "MemoryHigh=",
        "MemoryMax=",
    ):
        assert setting in unit


def test_the_unit_file_limit_is_far_above_what_the_local_api_may_hold() -> None:
    from edge.config.models import ApiConfig

    unit = (ROOT / "systemd" / "plantsync.service").read_text()
    files = re.search(r"^LimitNOFILE=(\d+)$", unit, re.MULTILINE)
    assert files is not None, "LimitNOFILE= is missing"
    most = ApiConfig.model_fields["max_connections"].metadata
    ceiling = next(m.le for m in most if hasattr(m, "le"))
    assert int(files.group(1)) >= 4 * ceiling  # the API at its most still leaves 3/4
    high = re.search(r"^MemoryHigh=(\d+)M$", unit, re.MULTILINE)
    top = re.search(r"^MemoryMax=(\d+)G$", unit, re.MULTILINE)
    assert high and top and int(high.group(1)) < int(top.group(1)) * 1024


def test_unit_stop_timeout_is_above_the_default_shutdown_timeout() -> None:
    from edge.config.models import PlantConfig

    unit = (ROOT / "systemd" / "plantsync.service").read_text()
    stop = re.search(r"^TimeoutStopSec=(\d+)s$", unit, re.MULTILINE)
    assert stop is not None
    default = PlantConfig.model_fields["shutdown_timeout"].default
    assert int(stop.group(1)) > default + 15


@pytest.mark.integration
def test_install_dry_run_prints_the_steps_and_changes_nothing(
    tmp_path: Path, package_index: str
) -> None:
    prefix = tmp_path / "opt-plantsync"
    done = run_process(
        [
            "bash",
            str(ROOT / "systemd" / "install.sh"),
            "--dry-run",
            "--prefix",
            str(prefix),
            "--python",
            sys.executable,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PIP_INDEX_URL": package_index},
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for expected in (
        f"{sys.executable} -m venv {prefix}",
        f"{prefix}/bin/python -m pip install --quiet {ROOT}",
        "install -d -m 0750 -o root -g plantsync /etc/plantsync",
        "/etc/systemd/system/plantsync.service",
        "systemctl daemon-reload",
        "systemctl enable plantsync.service",
    ):
        assert expected in out, out
    assert "useradd --system" in out or "user plantsync exists" in out
    assert (
        "config/plant.example.yaml /etc/plantsync/plant.yaml" in out
        or "plant.yaml exists; kept" in out
    )
    assert not prefix.exists()


def test_reload_describes_changes_by_name_never_by_value() -> None:
    from buffer.outbox import DestinationCounts
    from edge.config.loader import parse_config
    from edge.runtime.reload import describe_changes

    def config(token: str, every_units: int, destinations: str) -> str:
        return f"""
site: "1010"
shutdown_timeout: 5s
drivers:
  - {{name: press-01, type: modbus, host: 127.0.0.1, tags: [{{name: good, address: 0}}]}}
machines:
  - id: press-01
    signals: {{good: press-01.good}}
    confirm: {{every_units: {every_units}}}
destinations:
  erp: {{base_url: "https://erp", auth: {{type: bearer, token: "{token}"}}}}
{destinations}
routes:
  production.confirmation: [erp]
"""

    old = parse_config(config("old-secret-token", 100, "  qms: {base_url: 'http://qms'}"))
    new = parse_config(config("new-secret-token", 20, "").replace("5s", "8s"))
    changes = describe_changes(old, new, {"qms": DestinationCounts(pending=3, dead=1)})
    assert changes == [
        "shutdown_timeout changed",
        "machine press-01 changed (confirm)",
        "destination qms removed",
        "destination erp changed (auth)",
        "the outbox keeps the 3 undelivered and 1 dead event(s) of removed destination qms",
    ]
    assert describe_changes(old, old) == []
