"""Secrets never show: the real daemon runs with a bearer token, an OAuth client secret, an MQTT
password and an API token in its config, and none of them appears in its log, /metrics,
/status, /readyz, or what `plantsync status`, `plantsync outbox` and `plantsync check` print.
A config file that holds secrets and that group or others can read draws a warning naming the
file and its mode; the local API listens on loopback and wants the token for changes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from edge.config import parse_config
from edge.logs import redact, setup_logging
from edge.secrets import exposed_secrets, scrub, secret_values
from tests.conftest import ROOT, ErpSim, Mosquitto, Peer, free_port, start_erp, start_plc
from tests.test_gateway import start_gateway, wait_for


def secret(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge.cli", *args, "--config", str(config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def outbox_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge.cli", "outbox", "--config", str(config),
                           *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


@pytest.mark.integration
def test_secrets_never_appear_in_logs_metrics_status_or_the_cli(
    peers: list[Peer], erp_sim: ErpSim, tmp_path: Path, mosquitto: Mosquitto,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api_token, bearer, oauth_secret = secret("apitoken"), secret("bearer"), secret("oauth")
    mqtt_password, wrong_secret = secret("mqttpw"), secret("wrongsecret")
    secrets = {api_token, bearer, oauth_secret, mqtt_password, wrong_secret}
    # The OAuth ERP knows our client; the bearer ERP takes any token.
    oauth_erp = start_erp(peers, tmp_path, "--client", f"plantsync-1010:{oauth_secret}")
    plc = start_plc(peers, tmp_path, "--rate", "100")
    monkeypatch.setenv("ERP_TOKEN", bearer)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "erp_client_secret").write_text(oauth_secret + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    password_file = tmp_path / "mqtt-password"
    password_file.write_text(mqtt_password)
    password_file.chmod(0o600)
    port = free_port()
    config = tmp_path / "plant.yaml"
    config.write_text(f"""
site: "1010"
data_dir: {tmp_path / "data"}
api: {{listen: "127.0.0.1:{port}", token: "{api_token}"}}
shutdown_timeout: 5s
validation: {{require_known_order: false}}
drivers:
  - name: press-01
    type: modbus
    host: 127.0.0.1
    port: {plc.port}
    poll_interval: 100ms
    tags: [{{name: good, address: 0, type: uint32}}]
  - name: mes
    type: mqtt
    host: 127.0.0.1
    port: {mosquitto.port}
    client_id: plantsync-security-{uuid.uuid4().hex[:8]}
    username: gateway-1010
    password: "${{file:{password_file}}}"
    topics:
      - filter: mes/1010/+/consumption
        event: material.consumed
        fields: {{order_id: order_id, material: material, quantity.value: quantity,
                  quantity.uom: uom}}
machines:
  - id: press-01
    signals: {{good: press-01.good}}
    order: {{order_id: "1000123", operation: "0010"}}
    confirm: {{every_units: 50}}
destinations:
  erp:
    base_url: {erp_sim.url}
    path: /api/events
    auth: {{type: bearer, token: "${{ERP_TOKEN}}"}}
  erp_oauth:
    base_url: {oauth_erp.url}
    path: /api/events
    auth:
      type: oauth2_client_credentials
      token_url: {oauth_erp.url}/oauth/token
      client_id: plantsync-1010
      client_secret: "${{cred:erp_client_secret}}"
  erp_refused:
    base_url: {oauth_erp.url}
    path: /api/events
    retry: {{base: 100ms, cap: 500ms}}
    auth:
      type: oauth2_client_credentials
      token_url: {oauth_erp.url}/oauth/token
      client_id: plantsync-1010
      client_secret: "{wrong_secret}"
routes:
  production.confirmation: [erp, erp_oauth, erp_refused]
""")
    config.chmod(0o644)
    checked = cli(config, "check")
    assert checked.returncode == 0, checked.stderr
    assert (f"warning: {config} holds secrets written in it (api.token, "
            "destinations.erp_refused.auth.client_secret) and is readable by group and others "
            "(mode 0644)") in checked.stderr

    gateway = start_gateway(peers, config, tmp_path)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: len(erp_sim.events()) >= 2 and len(oauth_erp.events()) >= 2, 30,
             "deliveries with the bearer token and the OAuth secret")
    wait_for(lambda: "Destination erp_refused is failing" in gateway.output(), 30,
             "the refused OAuth client to be logged")
    wait_for(lambda: httpx.get(f"{base}/status", timeout=5).json()["drivers"][1]["connected"],
             20, "the MQTT driver to connect with its password")
    assert f"Secrets exposed: {config} holds secrets" in gateway.output()

    # A change over the API needs the token; reads do not.
    assert httpx.post(f"{base}/outbox/retry", json={"all_dead": True},
                      timeout=5).status_code == 401
    retried = httpx.post(f"{base}/outbox/retry", json={"all_dead": True}, timeout=5,
                         headers={"Authorization": f"Bearer {api_token}"})
    assert retried.status_code == 200

    shown = {
        "metrics": httpx.get(f"{base}/metrics", timeout=5).text,
        "status": httpx.get(f"{base}/status", timeout=5).text,
        "readyz": httpx.get(f"{base}/readyz", timeout=5).text,
        "healthz": httpx.get(f"{base}/healthz", timeout=5).text,
        "outbox list": httpx.post(f"{base}/outbox/list", json={"destination": "erp_refused"},
                                  timeout=5).text,
    }
    for name, args in (("status", ("status",)), ("status --json", ("status", "--json")),
                       ("check", ("check",))):
        done = cli(config, *args)
        shown[f"plantsync {name}"] = done.stdout + done.stderr
    for args in (("status",), ("--json", "list", "--destination", "erp_refused")):
        done = outbox_cli(config, *args)
        shown[f"plantsync outbox {' '.join(args)}"] = done.stdout + done.stderr
    assert "erp_refused" in shown["plantsync status"]
    assert gateway.stop() == 0
    done = cli(config, "status")
    assert "(from the database directly)" in done.stdout
    shown["plantsync status (daemon down)"] = done.stdout + done.stderr
    shown["log"] = gateway.output()
    assert "Manual intervention: 0 dead letter(s) put back in line" in shown["log"]
    for name, text in shown.items():
        for value in secrets:
            assert value not in text, f"a secret ({value[:8]}...) appears in {name}"


def test_secret_files_readable_by_others_draw_a_warning(tmp_path: Path) -> None:
    token_file = tmp_path / "archive-token"
    token_file.write_text("archive-token-value\n")
    config = tmp_path / "plant.yaml"
    base = f'site: "1010"\ndata_dir: {tmp_path}\n'
    literal = base + 'api: {token: "literal-api-token"}\n'

    def check() -> str:
        done = cli(config, "check")
        assert done.returncode == 0, done.stderr
        return done.stderr

    config.write_text(literal)
    for mode, readers in ((0o644, "group and others"), (0o640, "group"), (0o604, "others")):
        config.chmod(mode)
        assert (f"warning: {config} holds secrets written in it (api.token) and is readable "
                f"by {readers} (mode {mode:04o})") in check()
    assert "literal-api-token" not in check()
    config.chmod(0o600)
    assert "warning" not in check()

    # Secrets by reference: the config's mode does not matter, the secret file's does.
    config.write_text(base + f'api: {{token: "${{file:{token_file}}}"}}\n')
    config.chmod(0o644)
    token_file.chmod(0o640)
    assert (f"warning: {token_file} holds the secret of api.token and is readable by group "
            "(mode 0640)") in check()
    token_file.chmod(0o600)
    assert "warning" not in check()
    config.write_text(base + 'api: {token: "${PLANTSYNC_TEST_TOKEN}"}\n')
    env = {**os.environ, "PLANTSYNC_TEST_TOKEN": "from-the-environment"}
    done = subprocess.run([sys.executable, "-m", "edge.cli", "check", "--config", str(config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    assert done.returncode == 0 and "warning" not in done.stderr
    assert "from-the-environment" not in done.stdout + done.stderr


def test_exposed_secrets_names_fields_not_values(tmp_path: Path) -> None:
    config_path = tmp_path / "plant.yaml"
    text = (f'site: "1010"\ndata_dir: {tmp_path}\n'
            "destinations:\n  erp:\n    base_url: http://127.0.0.1:1\n"
            '    auth: {type: api_key, key: "the-api-key-value"}\n')
    config_path.write_text(text)
    config_path.chmod(0o644)
    config = parse_config(text, str(config_path))
    assert secret_values(config) == {"the-api-key-value"}
    warnings = exposed_secrets(config_path, config)
    assert len(warnings) == 1 and "destinations.erp.auth.key" in warnings[0]
    assert "the-api-key-value" not in warnings[0]


def test_log_lines_and_shown_data_are_scrubbed(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        for fmt in ("json", "text"):
            setup_logging(fmt, "INFO")
            redact({'pa"ss-word-1', "token-12345"})
            logging.getLogger("edge.test").warning(
                "peer said: token-12345 rejected", extra={"detail": 'pa"ss-word-1'})
            out = capsys.readouterr().out
            assert "token-12345" not in out and "[redacted]" in out
            assert 'pa\\"ss-word-1' not in out and 'pa"ss-word-1' not in out
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    data = {"error": "401 for token-12345", "list": [{"x": "token-12345!"}], "n": 3}
    assert scrub(data, {"token-12345"}) == {"error": "401 for [redacted]",
                                            "list": [{"x": "[redacted]!"}], "n": 3}
    assert json.dumps(scrub(data, set())) == json.dumps(data)


def test_the_local_api_listens_on_loopback_by_default() -> None:
    config = parse_config('site: "1010"\n')
    assert config.api.host == "127.0.0.1"
