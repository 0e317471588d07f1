"""The technician's path (issue 11, items 9 to 15), tried as a technician would: the real CLI
and the real daemon as processes, real files, a real broker, HTTP on loopback.

`check --offline` in a shell without the plant's secrets; `status` and `outbox` after a bad
edit; durations without a unit and YAML that is not what the loader expects; `--help` and exit
codes; SIGHUP with an unchanged file; what status says of input dead letters, dead events, BAD
tags and the outbox depth; the docs a technician reads; `make demo` with a busy port.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from simulators.mes_publisher import MesPublisher
from tests.conftest import (
    ROOT,
    ErpSim,
    Mosquitto,
    Peer,
    free_port,
    free_ports,
    mes_driver,
    missing_peer,
    start_plc,
)
from tests.gateway_process import start_gateway
from tests.processes import run_process, spawn
from tests.test_gateway import wait_for

EXAMPLE = ROOT / "config" / "plant.example.yaml"
BARE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent"}
"""A technician's login shell: none of the plant's secrets, no CREDENTIALS_DIRECTORY."""


def plantsync(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return run_process(
        [sys.executable, "-m", "edge.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        env={**(env if env is not None else os.environ), "PYTHONPATH": str(ROOT)},
    )


# --- 9. check --offline; status and outbox need only what they use -------------------------------


@pytest.mark.integration
def test_check_offline_checks_the_example_in_a_shell_without_its_secrets(tmp_path: Path) -> None:
    full = plantsync("check", "--config", str(EXAMPLE), env=BARE_ENV)
    assert full.returncode == 1 and "environment variable MES_MQTT_PASSWORD is not set" in (
        full.stderr
    )
    offline = plantsync("check", "--offline", "--config", str(EXAMPLE), env=BARE_ENV)
    assert offline.returncode == 0, offline.stderr
    drivers = len(yaml.safe_load(EXAMPLE.read_text())["drivers"])
    assert offline.stdout.startswith(f"{EXAMPLE}: OK offline (site 1010: {drivers} drivers")
    for reference in (
        "${FILLER_OPCUA_PASSWORD}",
        "${MES_MQTT_PASSWORD}",
        "${cred:erp_client_secret}",
    ):
        assert reference in offline.stdout
    # Offline is not lenient about anything else.
    broken = tmp_path / "plant.yaml"
    broken.write_text(EXAMPLE.read_text().replace("poll_interval: 1s", "poll_intervall: 1s", 1))
    typo = plantsync("check", "--offline", "--config", str(broken), env=BARE_ENV)
    assert typo.returncode == 1 and "unknown key (did you mean 'poll_interval'?)" in typo.stderr
    secret_url = tmp_path / "url.yaml"
    secret_url.write_text('site: "1010"\ndestinations:\n  erp: {base_url: "${ERP_URL}"}\n')
    assert (
        plantsync("check", "--offline", "--config", str(secret_url), env=BARE_ENV).returncode == 0
    )


@pytest.mark.integration
def test_status_and_outbox_work_after_a_bad_edit_and_without_the_secrets(
    peers: list[Peer],
    erp_sim: ErpSim,
    tmp_path: Path,
) -> None:
    plc = start_plc(peers, tmp_path, "--rate", "50")
    port = free_port()
    config = tmp_path / "plant.yaml"
    good = f"""site: "1010"
data_dir: {tmp_path / "data"}
api: {{listen: "127.0.0.1:{port}"}}
drivers:
  - {{name: press-01, type: modbus, host: 127.0.0.1, port: {plc.port}, poll_interval: 100ms,
     tags: [{{name: good, address: 0, type: uint32}}]}}
machines:
  - {{id: press-01, signals: {{processed: press-01.good}}, confirm: {{every_units: 20}},
     order: {{order_id: "1000123"}}}}
destinations:
  erp: {{base_url: {erp_sim.url}, path: /api/events,
        auth: {{type: bearer, token: "${{ERP_TOKEN}}"}}}}
routes:
  production.confirmation: [erp]
"""
    config.write_text(good)
    gateway = start_gateway(peers, config, tmp_path, env={"ERP_TOKEN": "a-bearer-token"})
    wait_for(lambda: len(erp_sim.events()) >= 1, 30, "a delivery")
    # A bad edit elsewhere in the file, in a shell without ERP_TOKEN.
    config.write_text(good.replace("type: uint32", "type: uint33"))
    for args in (("status",), ("outbox", "--config", str(config), "status")):
        argv = [*args, "--config", str(config)] if args == ("status",) else list(args)
        shown = plantsync(*argv, env=BARE_ENV)
        assert shown.returncode == 0, shown.stderr
        assert "(from the running daemon)" in shown.stdout, shown.stdout
    assert gateway.stop() == 0
    offline = plantsync("status", "--config", str(config), env=BARE_ENV)
    assert offline.returncode == 0, offline.stderr
    assert "(from the database directly)" in offline.stdout
    assert "the config does not load here" in offline.stdout
    assert (
        re.search(r"^erp\s+0\s+0\s+0", offline.stdout, re.MULTILINE)
        or "erp" not in (offline.stdout.split("OUTBOX")[1].split("RECENT")[0])
    ), offline.stdout
    # A mistake in what they do use is still named.
    config.write_text(good.replace(f'listen: "127.0.0.1:{port}"', 'listen: "nowhere"'))
    refused = plantsync("status", "--config", str(config), env=BARE_ENV)
    assert refused.returncode == 1 and f"{config}:3: api.listen:" in refused.stderr


# --- 10. durations and YAML mistakes --------------------------------------------------------------


def _check_file(tmp_path: Path, content: bytes | str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "plant.yaml"
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    return plantsync("check", "--config", str(path))


@pytest.mark.integration
@pytest.mark.parametrize("written", ["500", '"500"'])
def test_a_duration_without_a_unit_is_refused(tmp_path: Path, written: str) -> None:
    done = _check_file(
        tmp_path,
        'site: "1010"\ndrivers:\n  - name: press-01\n    type: modbus\n'
        f"    host: 127.0.0.1\n    poll_interval: {written}\n"
        "    tags: [{name: good, address: 0}]\n",
    )
    assert done.returncode == 1
    assert (
        f"{tmp_path / 'plant.yaml'}:6: drivers[0].poll_interval: add a unit: 500ms or 500s"
        in done.stderr
    ), done.stderr


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            b'site: "1010"\napi:\n\tlisten: "127.0.0.1:8470"\n',
            r":3: \(file\): a tab character: YAML indents with spaces only",
        ),
        (
            b'site: "1010"\ndrivers:\n  - name: a\n    type: modbus\n   host: x\n',
            r":5: \(file\): the indentation does not line up",
        ),
        (b'site: "1010"\napi: listen: x\n', r":2: \(file\): a 'key:' where none can start"),
        (
            b"[gateway]\nsite = 1010\ndata_dir = /var/lib/plantsync\n",
            r":2: \(file\): this looks like an INI file",
        ),
        (
            b'site: "1010"\ndrivers:\n  - &b {name: a, type: modbus, host: x, tags: [{name: g, '
            b"address: 0}]}\n  - <<: *b\n    name: b\n",
            r":4: drivers\[1\]\.<<: YAML merge keys \(<<: \*name\) are not supported",
        ),
        (b'site: "1010\n', r":2: \(file\): a quote is never closed \(it opens on line 1\)"),
        (
            b'site: "1010"\n# Gr\xfc\xdfe\n',
            r":2: \(file\): not UTF-8 text \(byte 0xfc\): save the file",
        ),
        (b"\x7fELF\x02\x01\x01\x00\x00\x00", r": \(file\): not a text file"),
    ],
)
@pytest.mark.integration
def test_a_broken_file_gets_one_line_with_its_place_and_a_hint(
    tmp_path: Path,
    content: bytes,
    expected: str,
) -> None:
    done = _check_file(tmp_path, content)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "yaml." not in done.stderr
    lines = done.stderr.splitlines()
    first = lines[0]
    assert first.startswith(str(tmp_path / "plant.yaml")), done.stderr
    assert re.search(expected, first), done.stderr
    assert "found character" not in done.stderr and "<block" not in done.stderr


# --- 11. help, exit codes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "usage"),
    [
        (("browse", "--help"), "usage: plantsync browse"),
        (("probe", "--help"), "usage: plantsync probe"),
        (("sim", "--help"), "usage: plantsync sim"),
        (("sim", "modbus", "--help"), "usage: plantsync sim modbus"),
        (("sim", "erp", "--help"), "usage: plantsync sim erp"),
        (("sim", "qms", "--help"), "usage: plantsync sim qms"),
        (("sim", "opcua", "--help"), "usage: plantsync sim opcua"),
        (("sim", "mes", "--help"), "usage: plantsync sim mes"),
        (("probe", "modbus", "--help"), "usage: plantsync probe modbus"),
        (("browse", "opcua", "--help"), "usage: plantsync browse opcua"),
    ],
)
@pytest.mark.integration
def test_every_command_shows_its_help(args: tuple[str, ...], usage: str) -> None:
    done = plantsync(*args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(usage), done.stdout[:200]


@pytest.mark.integration
def test_a_wrong_command_line_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "plant.yaml"
    config.write_text(
        f'site: "1010"\ndata_dir: {tmp_path / "data"}\napi: {{listen: "127.0.0.1:{free_port()}"}}\n'
    )
    assert plantsync("browse").returncode == 2
    retried = plantsync("outbox", "--config", str(config), "retry", "--reason", "x")
    assert retried.returncode == 2 and "give one EVENT_ID, or --all-dead" in retried.stderr
    missing = plantsync("outbox", "--config", str(config), "retry", "not-an-id", "--reason", "x")
    assert missing.returncode == 1 and "no event 'not-an-id' in the outbox" in missing.stderr
    since = plantsync("outbox", "--config", str(config), "journal", "--since", "yesterday")
    assert since.returncode == 2 and "--since" in since.stderr


# --- 12. SIGHUP compares by value ----------------------------------------------------------------


@pytest.mark.integration
def test_sighup_with_an_unchanged_file_restarts_nothing_and_a_change_is_named_truthfully(
    peers: list[Peer],
    erp_sim: ErpSim,
    tmp_path: Path,
    mosquitto: Mosquitto,
) -> None:
    port = free_port()
    config = tmp_path / "plant.yaml"
    keepalive = "    keepalive: 30s\n"
    config.write_text(f"""site: "1010"
data_dir: {tmp_path / "data"}
api: {{listen: "127.0.0.1:{port}"}}
validation: {{require_known_order: false}}
drivers:
{mes_driver(mosquitto.port, extra=keepalive)}destinations:
  erp: {{base_url: {erp_sim.url}, path: /api/events}}
routes:
  material.consumed: [erp]
""")
    gateway = start_gateway(peers, config, tmp_path)
    base = f"http://127.0.0.1:{port}"
    wait_for(
        lambda: httpx.get(f"{base}/status", timeout=5).json()["drivers"][0]["connected"],
        20,
        "the MQTT driver",
    )
    with MesPublisher("127.0.0.1", mosquitto.port) as mes:  # the driver's topic cache fills
        mes.consume("1000123", "RM-1", "LOT-1", 5).wait(10)
    wait_for(lambda: len(erp_sim.events()) >= 1, 20, "the consumption at ERP")
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: "Reload: the config is unchanged; nothing restarts" in gateway.output(),
        20,
        "the unchanged reload",
    )
    output = gateway.output()
    assert "driver mes changed" not in output
    assert output.count("PlantSync Edge is running") == 1
    metrics = httpx.get(f"{base}/metrics", timeout=5).text
    assert 'plantsync_config_reloads_total{outcome="unchanged"} 1.0' in metrics

    config.write_text(config.read_text().replace("keepalive: 30s", "keepalive: 20s"))
    gateway.process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: gateway.output().count("PlantSync Edge is running") == 2, 30, "the changed reload"
    )
    reload_lines = [line for line in gateway.output().splitlines() if "Reload: " in line]
    assert len(reload_lines) == 2 and "Reload: driver mes changed (keepalive)" in reload_lines[1]
    assert gateway.stop() == 0


# --- 13. status tells the truth ------------------------------------------------------------------


@pytest.mark.integration
def test_status_counts_input_dead_letters_and_readyz_names_dead_events_and_bad_tags(
    peers: list[Peer],
    erp_sim: ErpSim,
    tmp_path: Path,
    mosquitto: Mosquitto,
) -> None:
    erp_sim.set_faults(error_rate=1.0, error_status=422)
    port = free_port()
    plc_port = free_port()  # the PLC starts after the gateway: see test_gateway
    long_driver = "press-01-line-a-hall-7-north"
    config = tmp_path / "plant.yaml"
    config.write_text(f"""site: "1010"
data_dir: {tmp_path / "data"}
api: {{listen: "127.0.0.1:{port}"}}
validation: {{require_known_order: false}}
drivers:
  - name: {long_driver}
    type: modbus
    host: 127.0.0.1
    port: {plc_port}
    poll_interval: 100ms
    tags:
      - {{name: good, address: 0, type: uint32}}
      - {{name: missing-sensor, address: 1000, type: uint16}}
{mes_driver(mosquitto.port)}machines:
  - id: press-01-with-a-long-machine-id
    signals: {{processed: {long_driver}.good}}
    order: {{order_id: "1000123-LONG-ORDER-NUMBER", operation: "0010"}}
    confirm: {{every_units: 50}}
destinations:
  erp: {{base_url: {erp_sim.url}, path: /api/events, retry: {{base: 100ms, cap: 1s}}}}
routes:
  production.confirmation: [erp]
""")
    start_gateway(peers, config, tmp_path)
    start_plc(peers, tmp_path, "--rate", "100", "--stop-at", "600", port=plc_port)
    base = f"http://127.0.0.1:{port}"
    wait_for(
        lambda: httpx.get(f"{base}/status", timeout=5).json()["drivers"][1]["connected"],
        20,
        "the MQTT driver",
    )
    with MesPublisher("127.0.0.1", mosquitto.port) as mes:
        for n in range(13):
            mes.publish_raw("mes/1010/press-01/consumption", b"not json %d" % n)
        mes.flush(10)
    wait_for(
        lambda: httpx.get(f"{base}/status", timeout=5).json()["destinations"]["erp"]["dead"] >= 2,
        30,
        "dead letters",
    )
    wait_for(
        lambda: httpx.get(f"{base}/status", timeout=5).json()["input_dead_letters"]["count"] == 13,
        20,
        "13 input dead letters",
    )

    ready = httpx.get(f"{base}/readyz", timeout=5).json()
    assert any(
        "business event(s) for destination erp are dead letters" in alarm
        for alarm in ready["alarms"]
    ), ready
    # Said once: by the Modbus driver, which knows the device refuses the address.
    bad = [note for note in ready["degraded"] if "missing-sensor" in note]
    assert len(bad) == 1, ready

    shown = plantsync("status", "--config", str(config))
    text = shown.stdout
    assert "INPUT DEAD LETTERS (13 in all: mes: 13;" in text, text
    assert "payload is not JSON" in text
    # Columns never run into each other: every cell is followed by at least two spaces.
    assert re.search(rf"^{long_driver}  +yes  +", text, re.MULTILINE), text
    assert re.search(
        r"^press-01-with-a-long-machine-id  +1000123-LONG-ORDER-NUMBER/0010  +", text, re.MULTILINE
    ), text

    # The depth gauge reads the outbox when scraped, and keeps its series at 0.
    def depth(state: str) -> float:
        metrics = httpx.get(f"{base}/metrics", timeout=5).text
        found = re.search(
            rf'^plantsync_outbox_depth{{destination="erp",state="{state}"}} (\S+)$',
            metrics,
            re.MULTILINE,
        )
        assert found is not None, f"no {state} series for erp"
        return float(found.group(1))

    assert depth("dead") >= 2

    def settled() -> bool:  # the PLC stopped, and every confirmation is a dead letter
        status = httpx.get(f"{base}/status", timeout=5).json()
        return bool(
            status["signals"][f"{long_driver}.good"]["value"] == 600
            and status["destinations"]["erp"]["pending"] == 0
        )

    wait_for(settled, 30, "the PLC to stop and the last confirmation to be refused")
    purged = plantsync(
        "outbox",
        "--config",
        str(config),
        "purge-dead",
        "--all",
        "--reason",
        "test: the ERP refused these on purpose",
    )
    assert purged.returncode == 0, purged.stderr
    assert depth("dead") == 0.0 and depth("pending") == 0.0  # at once, and still there


# --- 14. what a technician reads and runs -------------------------------------------------------


@pytest.mark.integration
def test_the_readme_documents_every_topic_and_field_the_mes_simulator_publishes(
    mosquitto: Mosquitto,
) -> None:
    """The oracle is the simulator on a real broker, not its docstring."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    received: list[tuple[str, dict[str, object]]] = []
    subscribed = threading.Event()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.on_message = lambda _c, _u, message: received.append(
        (message.topic, json.loads(message.payload))
    )
    client.on_subscribe = lambda *args: subscribed.set()
    client.on_connect = lambda c, *args: c.subscribe("mes/#", qos=1)
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    try:
        assert subscribed.wait(10)
        done = plantsync(
            "sim",
            "mes",
            "--port",
            str(mosquitto.port),
            "--count",
            "5",
            "--rate",
            "50",
            "--machine",
            "press-01",
        )
        assert done.returncode == 0, done.stderr
        wait_for(lambda: len(received) >= 5, 10, "five MES messages")
    finally:
        client.loop_stop()
        client.disconnect()
    readme = (ROOT / "README.md").read_text()
    section = readme.split("**What the MES must publish.**")[1].split("**What the counters")[0]
    for topic, payload in received:
        generic = re.sub(r"^mes/1010/press-01/", "mes/<site>/<machine>/", topic)
        row = next((line for line in section.splitlines() if f"`{generic}`" in line), None)
        assert row is not None, f"the README does not document {generic}"
        for field in payload:
            if field in ("site", "machine", "quantity", "uom") and field not in row:
                continue  # carried by the topic, or named with the quantity
            assert f"`{field}`" in row or f"`{field}`" in section, (generic, field)
    assert "path` defaults to `/events`" in readme and "`/api/events`" in readme
    assert "`signals.processed`" in readme and "`signals.defective`" in readme


@pytest.mark.integration
def test_sim_mes_authenticates_to_a_broker_that_wants_a_password(
    tmp_path: Path,
    mosquitto: Mosquitto,
) -> None:
    passwd = shutil.which("mosquitto_passwd")
    if passwd is None:
        missing_peer("mosquitto_passwd is not installed (apt-get install mosquitto)")
    directory = tmp_path / "secured"
    directory.mkdir()
    (directory / "passwords").touch()
    run_process([passwd, "-b", str(directory / "passwords"), "mes", "s3cret-pw"], check=True)
    broker = Mosquitto(
        mosquitto.binary, directory, listener_options=[f"password_file {directory / 'passwords'}"]
    ).start()
    broker.config_path.write_text(
        broker.config_path.read_text().replace("allow_anonymous true", "allow_anonymous false")
    )
    broker.stop()
    broker.process = spawn(
        [broker.binary, "-c", str(broker.config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: _listening(broker.port), 10, "the secured broker")
    try:
        args = ("sim", "mes", "--port", str(broker.port), "--count", "1")
        refused = run_process(
            [sys.executable, "-m", "edge.cli", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "MES_MQTT_PASSWORD": ""},
        )
        assert refused.returncode != 0
        done = plantsync(
            *args, "--username", "mes", env={**os.environ, "MES_MQTT_PASSWORD": "s3cret-pw"}
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "1 acknowledged" in done.stdout
    finally:
        broker.kill()
    shown = plantsync("sim", "mes", "--help").stdout
    for option in (
        "--username",
        "--password",
        "--tls",
        "--ca-file",
        "--cert-file",
        "--key-file",
        "--tls-insecure",
    ):
        assert option in shown


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.integration
def test_install_checks_venv_and_the_package_index_first(
    tmp_path: Path, package_index: str
) -> None:
    install = str(ROOT / "systemd" / "install.sh")

    def dry_run(python: str, index: str) -> subprocess.CompletedProcess[str]:
        return run_process(
            ["bash", install, "--dry-run", "--prefix", str(tmp_path / "opt"), "--python", python],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PIP_INDEX_URL": index},
        )

    ok = dry_run(sys.executable, package_index)
    assert ok.returncode == 0, ok.stderr
    assert f"package index {package_index} answers" in ok.stdout
    # A Python without venv (Debian's python3 before python3-venv is installed).
    no_venv = tmp_path / "python3"
    no_venv.write_text(
        f'#!/bin/sh\ncase "$*" in *ensurepip*) exit 1;; esac\nexec {sys.executable} "$@"\n'
    )
    no_venv.chmod(0o755)
    missing = dry_run(str(no_venv), package_index)
    assert missing.returncode == 1 and "apt-get install python3-venv" in missing.stderr
    closed = f"http://127.0.0.1:{free_port()}/simple"
    offline = dry_run(sys.executable, closed)
    assert offline.returncode == 1
    assert f"the package index {closed} does not answer" in offline.stderr
    assert "PIP_INDEX_URL" in offline.stderr
    assert not (tmp_path / "opt").exists()


# --- 15. make demo with a busy port ---------------------------------------------------------------


@pytest.mark.integration
def test_demo_with_a_busy_port_says_so_in_one_line_and_fails(tmp_path: Path) -> None:
    demo = (ROOT / "config" / "demo.yaml").read_text()
    plc, erp, api = free_ports(3)
    demo = (
        demo.replace("port: 5020", f"port: {plc}")
        .replace("127.0.0.1:8480", f"127.0.0.1:{erp}")
        .replace("127.0.0.1:8470", f"127.0.0.1:{api}")
    )
    config = tmp_path / "demo.yaml"
    config.write_text(demo)
    with socket.create_server(("127.0.0.1", erp)):
        done = run_process(
            [sys.executable, "-m", "edge.cli", "demo", "--config", str(config)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    assert done.returncode == 1
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(
        f"plantsync demo: port {erp} on 127.0.0.1 (the ERP simulator, "
        f"destinations.erp.base_url in {config}) is in use"
    )
    assert "plantsync demo --config" in line
    assert not (tmp_path / "data").exists()  # nothing was started
