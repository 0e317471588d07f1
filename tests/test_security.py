"""Secrets never show: the real daemon runs with a bearer token, an OAuth client secret, an MQTT
password and an API token in its config, and none of them appears in its log, /metrics,
/status, /readyz, or what `plantsync status`, `plantsync outbox` and `plantsync check` print.
A config file that holds secrets and that group or others can read draws a warning naming the
file and its mode; the local API listens on loopback and wants the token for changes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from edge.config.loader import parse_config
from edge.config.secrets import exposed_secrets, scrub, secret_values
from edge.ops.logs import redact, setup_logging
from tests.conftest import (
    ROOT,
    ErpSim,
    Mosquitto,
    Peer,
    free_port,
    mes_driver,
    missing_peer,
    start_erp,
    start_plc,
)
from tests.gateway_process import start_gateway
from tests.processes import run_process, spawn
from tests.test_gateway import wait_for


def secret(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_process(
        [sys.executable, "-m", "edge.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def outbox_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_process(
        [sys.executable, "-m", "edge.cli", "outbox", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


@pytest.mark.integration
def test_secrets_never_appear_in_logs_metrics_status_or_the_cli(
    peers: list[Peer],
    erp_sim: ErpSim,
    tmp_path: Path,
    mosquitto: Mosquitto,
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
    assert (
        f"warning: {config} holds secrets written in it (api.token, "
        "destinations.erp_refused.auth.client_secret) and is readable by group and others "
        "(mode 0644)"
    ) in checked.stderr

    gateway = start_gateway(peers, config, tmp_path)
    base = f"http://127.0.0.1:{port}"
    wait_for(
        lambda: len(erp_sim.events()) >= 2 and len(oauth_erp.events()) >= 2,
        30,
        "deliveries with the bearer token and the OAuth secret",
    )
    wait_for(
        lambda: "Destination erp_refused is failing" in gateway.output(),
        30,
        "the refused OAuth client to be logged",
    )
    wait_for(
        lambda: httpx.get(f"{base}/status", timeout=5).json()["drivers"][1]["connected"],
        20,
        "the MQTT driver to connect with its password",
    )
    assert f"Secrets exposed: {config} holds secrets" in gateway.output()

    # A change over the API needs the token; reads do not.
    assert (
        httpx.post(
            f"{base}/outbox/retry", json={"all_dead": True, "reason": "test"}, timeout=5
        ).status_code
        == 401
    )
    retried = httpx.post(
        f"{base}/outbox/retry",
        json={"all_dead": True, "reason": "test"},
        timeout=5,
        headers={"Authorization": f"Bearer {api_token}"},
    )
    assert retried.status_code == 200

    shown = {
        "metrics": httpx.get(f"{base}/metrics", timeout=5).text,
        "status": httpx.get(f"{base}/status", timeout=5).text,
        "readyz": httpx.get(f"{base}/readyz", timeout=5).text,
        "healthz": httpx.get(f"{base}/healthz", timeout=5).text,
        "outbox list": httpx.post(
            f"{base}/outbox/list", json={"destination": "erp_refused"}, timeout=5
        ).text,
    }
    for name, args in (
        ("status", ("status",)),
        ("status --json", ("status", "--json")),
        ("check", ("check",)),
    ):
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
    assert "Hand action by api token: 0 dead letter(s) put back in line" in shown["log"]
    for name, text in shown.items():
        for value in secrets:
            assert value not in text, f"a secret ({value[:8]}...) appears in {name}"


@pytest.mark.integration
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
        assert (
            f"warning: {config} holds secrets written in it (api.token) and is readable "
            f"by {readers} (mode {mode:04o})"
        ) in check()
    assert "literal-api-token" not in check()
    config.chmod(0o600)
    assert "warning" not in check()

    # Secrets by reference: the config's mode does not matter, the secret file's does.
    config.write_text(base + f'api: {{token: "${{file:{token_file}}}"}}\n')
    config.chmod(0o644)
    token_file.chmod(0o640)
    assert (
        f"warning: {token_file} holds the secret of api.token and is readable by group (mode 0640)"
    ) in check()
    token_file.chmod(0o600)
    assert "warning" not in check()
    config.write_text(base + 'api: {token: "${PLANTSYNC_TEST_TOKEN}"}\n')
    env = {**os.environ, "PLANTSYNC_TEST_TOKEN": "from-the-environment"}
    done = run_process(
        [sys.executable, "-m", "edge.cli", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0 and "warning" not in done.stderr
    assert "from-the-environment" not in done.stdout + done.stderr


def test_exposed_secrets_names_fields_not_values(tmp_path: Path) -> None:
    config_path = tmp_path / "plant.yaml"
    text = (
        f'site: "1010"\ndata_dir: {tmp_path}\n'
        "destinations:\n  erp:\n    base_url: http://127.0.0.1:1\n"
        '    auth: {type: api_key, key: "the-api-key-value"}\n'
    )
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
                "peer said: token-12345 rejected", extra={"detail": 'pa"ss-word-1'}
            )
            out = capsys.readouterr().out
            assert "token-12345" not in out and "[redacted]" in out
            assert 'pa\\"ss-word-1' not in out and 'pa"ss-word-1' not in out
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    data = {"error": "401 for token-12345", "list": [{"x": "token-12345!"}], "n": 3}
    assert scrub(data, {"token-12345"}) == {
        "error": "401 for [redacted]",
        "list": [{"x": "[redacted]!"}],
        "n": 3,
    }
    assert json.dumps(scrub(data, set())) == json.dumps(data)


def test_the_local_api_listens_on_loopback_by_default() -> None:
    config = parse_config('site: "1010"\n')
    assert config.api.host == "127.0.0.1"


# --- issue 11: the local API cannot be abused ----------------------------------------------------
#
# Each test below reproduces an attack or a mistake against the real daemon over HTTP on
# loopback, and fails on the code before the fix (the mutation tried is in the notes).


class Recorder:
    """A real HTTP server on loopback that stands in for the QMS: it records every request
    (raw path as sent, headers) and answers the disposition feed with nothing."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.requests: list[tuple[str, str, dict[str, str]]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                recorder.requests.append(("GET", self.path, dict(self.headers)))
                found = self.path.startswith("/api/v1/dispositions")
                body = b'{"dispositions": []}' if found else b'{"error": "not found"}'
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def small_plant(
    tmp_path: Path, *, api: str, plc: int | None = None, erp: str | None = None, extra: str = ""
) -> Path:
    """A config for the real daemon: optionally a Modbus press and an ERP destination."""
    text = f'site: "1010"\ndata_dir: {tmp_path / "data"}\napi: {api}\nshutdown_timeout: 5s\n'
    if plc is not None:
        text += f"""drivers:
  - name: press-01
    type: modbus
    host: 127.0.0.1
    port: {plc}
    poll_interval: 100ms
    tags: [{{name: good, address: 0, type: uint32}}]
machines:
  - id: press-01
    signals: {{processed: press-01.good}}
    order: {{order_id: "1000123", operation: "0010"}}
    confirm: {{every_units: 20}}
"""
    if erp is not None:
        text += f"""destinations:
  erp: {{base_url: {erp}, path: /api/events, retry: {{base: 100ms, cap: 1s}}}}
routes:
  production.confirmation: [erp]
"""
    config = tmp_path / "plant.yaml"
    config.write_text(text + extra)
    return config


@pytest.mark.integration
def test_lot_ids_cannot_steer_the_qms_lookup(
    peers: list[Peer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    qms = Recorder()
    key = secret("qmskey")
    monkeypatch.setenv("QMS_KEY", key)
    port = free_port()
    config = small_plant(
        tmp_path,
        api=f'{{listen: "127.0.0.1:{port}"}}',
        extra=f"""
destinations:
  qms:
    base_url: {qms.url}/api/v1
    profile: qms_rest
    auth: {{type: api_key, header: X-API-Key, key: "${{QMS_KEY}}"}}
quality: {{qms: qms, poll_interval: 1s, lookup_timeout: 2s}}
""",
    )
    try:
        start_gateway(peers, config, tmp_path)
        wait_for(
            lambda: any(p.startswith("/api/v1/dispositions") for _, p, _ in qms.requests),
            20,
            "the gateway to poll the QMS",
        )
        base = f"http://127.0.0.1:{port}"
        # The attack of the report: a lot id that climbs out of /lots/ on the QMS host.
        attack = httpx.get(f"{base}/lots/..%2F..%2F..%2Fadmin%2Fusers%3Fq%3D", timeout=5)
        assert attack.status_code == 400, attack.text
        assert "is not a lot number" in attack.json()["error"]
        nul = httpx.get(f"{base}/lots/a%00b", timeout=5)
        assert nul.status_code == 400, nul.text
        too_long = httpx.get(f"{base}/lots/{'L' * 41}", timeout=5)
        assert too_long.status_code == 400 and "at most 40" in too_long.json()["error"]
        # An id the model allows, slashes and dots included, stays one path segment.
        sly = httpx.get(f"{base}/lots/A%2F..%2F..%2Fadmin", timeout=5)
        assert sly.status_code == 200 and sly.json()["status"] == "hold"
        plain = httpx.get(f"{base}/lots/LOT-2026-0001", timeout=5)
        assert plain.status_code == 200
        lookups = [p for _, p, _ in qms.requests if not p.startswith("/api/v1/dispositions")]
        assert lookups == [
            "/api/v1/lots/A%2F..%2F..%2Fadmin/disposition",
            "/api/v1/lots/LOT-2026-0001/disposition",
        ], lookups
        # The key went only where the QMS's API lives.
        assert all(
            path.startswith("/api/v1/")
            for _, path, headers in qms.requests
            if headers.get("X-API-Key") == key
        )
    finally:
        qms.close()


def raw_http(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes as they are and read the answer until the server closes or `timeout`."""
    import socket

    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            pass
    return answer


def resident_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.integration
def test_a_large_body_is_refused_before_it_is_read(peers: list[Peer], tmp_path: Path) -> None:
    import socket

    port = free_port()
    gateway = start_gateway(
        peers, small_plant(tmp_path, api=f'{{listen: "127.0.0.1:{port}"}}'), tmp_path
    )
    assert gateway.process is not None
    before = resident_kib(gateway.process.pid)
    # A declared 400 MB: refused at once, without waiting for (or reading) a byte of it.
    answer = raw_http(
        port,
        b"POST /outbox/show HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 400000000\r\n\r\n",
        timeout=5,
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # The same amount streamed in chunks (no length declared): cut off after 64 KiB.
    chunk = b"x" * 1_000_000
    refused_after = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /outbox/show HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for sent in range(400):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                refused_after = sent + 1
        except OSError:
            pass  # the server answered and closed: the rest is not read
        answer = sock.recv(200)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert refused_after < 400, "the server read 400 MB"
    grown = resident_kib(gateway.process.pid) - before
    assert grown < 30_000, f"the daemon grew by {grown} KiB"
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200


@pytest.mark.integration
def test_slow_clients_cannot_take_the_api_down(
    peers: list[Peer],
    erp_sim: ErpSim,
    tmp_path: Path,
) -> None:
    """1,100 clients trickling a header line at a time, against a daemon whose file limit is
    1,024 (the Debian default): /healthz answers all along, the driver reads and ERP receives,
    and each slow client is closed by the API's request deadline or its connection cap."""
    import resource
    import socket
    import time

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1400:  # this test's own sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    plc = start_plc(peers, tmp_path, "--rate", "50")
    port = free_port()
    config = small_plant(
        tmp_path,
        api=f'{{listen: "127.0.0.1:{port}", request_timeout: 2s}}',
        plc=plc.port,
        erp=erp_sim.url,
    )
    # The daemon runs with the plant box's default file limit.
    gateway = start_gateway(
        peers,
        config,
        tmp_path,
        preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)),
    )
    assert gateway.process is not None
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: len(erp_sim.events()) >= 1, 30, "a first delivery")

    slow: list[socket.socket] = []
    for _ in range(1100):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.setblocking(False)
        slow.append(sock)
    closed: set[int] = set()
    health: list[int] = []
    delivered_before = len(erp_sim.events())
    most_files = 0
    started = time.monotonic()
    line = 0
    while time.monotonic() - started < 8:
        for index, sock in enumerate(slow):
            if index in closed:
                continue
            try:
                sock.send(b"GET /healthz HTTP/1.1\r\n" if line == 0 else b"X-Slow: 1\r\n")
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                closed.add(index)
        line += 1
        most_files = max(most_files, len(os.listdir(f"/proc/{gateway.process.pid}/fd")))
        try:
            health.append(httpx.get(f"{base}/healthz", timeout=2).status_code)
        except httpx.HTTPError:
            health.append(0)
        time.sleep(0.5)
    status = httpx.get(f"{base}/status", timeout=5).json()
    delivered_during = len(erp_sim.events()) - delivered_before
    for sock in slow:
        sock.close()
    assert health and all(code == 200 for code in health), health
    assert status["drivers"][0]["connected"] and status["drivers"][0]["last_sample_age"] < 2
    assert delivered_during >= 2, "deliveries stalled during the flood"
    assert most_files < 1024 - 200, f"the daemon held {most_files} files"
    assert len(closed) > 1000, f"only {len(closed)} of 1100 slow clients were closed"
    assert gateway.process.poll() is None


@pytest.mark.integration
def test_off_loopback_every_read_needs_the_bearer_token(
    peers: list[Peer],
    tmp_path: Path,
) -> None:
    port = free_port()
    config = small_plant(tmp_path, api=f'{{listen: "0.0.0.0:{port}"}}')
    # No token configured: check refuses the file, and the daemon refuses to start.
    checked = cli(config, "check")
    assert checked.returncode == 1
    assert "is not a loopback address" in checked.stderr and "add api.token" in checked.stderr
    refused = run_process(
        [sys.executable, "-m", "edge.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert refused.returncode == 1 and "add api.token" in refused.stdout + refused.stderr

    token = secret("token")
    config.write_text(
        config.read_text().replace(
            f'api: {{listen: "0.0.0.0:{port}"}}',
            f'api: {{listen: "0.0.0.0:{port}", token: "{token}"}}',
        )
    )
    gateway = start_gateway(peers, config, tmp_path)
    assert "listens off loopback" in gateway.output()
    base = f"http://127.0.0.1:{port}"
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(base + path, timeout=5).status_code in (200, 503), path
    bearer = {"Authorization": f"Bearer {token}"}
    for method, path in (
        ("GET", "/status"),
        ("GET", "/lots/LOT-1"),
        ("POST", "/outbox/list"),
        ("POST", "/outbox/status"),
    ):
        bare = httpx.request(method, base + path, timeout=5, json={} if method == "POST" else None)
        assert bare.status_code == 401, (path, bare.text)
        assert bare.headers["www-authenticate"] == "Bearer"
        # The token alone, or in another header, is not the token.
        for headers in (
            {"Authorization": token},
            {"X-API-Token": token},
            {"Authorization": f"Basic {token}"},
        ):
            assert (
                httpx.request(
                    method,
                    base + path,
                    headers=headers,
                    timeout=5,
                    json={} if method == "POST" else None,
                ).status_code
                == 401
            )
        assert (
            httpx.request(
                method,
                base + path,
                headers=bearer,
                timeout=5,
                json={} if method == "POST" else None,
            ).status_code
            == 200
        ), path
    # The CLI on this box brings the token for reads too.
    shown = cli(config, "status")
    assert shown.returncode == 0 and "(from the running daemon)" in shown.stdout, shown.stderr


@pytest.mark.integration
def test_on_loopback_a_change_needs_the_token_as_bearer(
    peers: list[Peer],
    tmp_path: Path,
) -> None:
    port = free_port()
    token = secret("token")
    config = small_plant(tmp_path, api=f'{{listen: "127.0.0.1:{port}", token: "{token}"}}')
    start_gateway(peers, config, tmp_path)
    url = f"http://127.0.0.1:{port}/outbox/retry"
    body = {"all_dead": True, "reason": "test"}
    assert httpx.post(url, json=body, timeout=5).status_code == 401
    assert (
        httpx.post(url, json=body, headers={"Authorization": token}, timeout=5).status_code == 401
    )
    assert (
        httpx.post(
            url, json=body, headers={"Authorization": f"Bearer {token}x"}, timeout=5
        ).status_code
        == 401
    )
    assert (
        httpx.post(
            url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=5
        ).status_code
        == 200
    )
    # Reads stay open on loopback.
    assert httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).status_code == 200


def on_terminal(argv: list[str], answer: str, timeout: float = 60) -> tuple[int, str]:
    """Run a CLI command with its stdin and stdout on a pseudo-terminal, type `answer`, and
    return its exit status and what it printed."""
    import pty
    import select
    import time

    controller, terminal = pty.openpty()
    process = spawn(argv, stdin=terminal, stdout=terminal, stderr=terminal, cwd=ROOT)
    os.close(terminal)
    output = b""
    typed = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(controller, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
            if not typed and b"Type yes" in output:
                os.write(controller, answer.encode() + b"\n")
                typed = True
        elif process.poll() is not None:
            break
    os.close(controller)
    return process.wait(10), output.decode(errors="replace")


@pytest.mark.integration
def test_purge_dead_never_purges_everything_by_mistake_and_hand_actions_are_journalled(
    peers: list[Peer],
    erp_sim: ErpSim,
    tmp_path: Path,
) -> None:
    plc = start_plc(peers, tmp_path, "--rate", "100", "--stop-at", "400")
    erp_sim.set_faults(error_rate=1.0, error_status=422)
    port = free_port()
    token = secret("token")
    config = small_plant(
        tmp_path,
        api=f'{{listen: "127.0.0.1:{port}", token: "{token}"}}',
        plc=plc.port,
        erp=erp_sim.url,
    )
    gateway = start_gateway(peers, config, tmp_path)
    base = f"http://127.0.0.1:{port}"
    bearer = {"Authorization": f"Bearer {token}"}

    def dead() -> list[str]:
        rows = httpx.post(
            f"{base}/outbox/list", json={"state": "dead", "limit": 1000}, timeout=5
        ).json()
        return [row["id"] for row in rows]

    def settled() -> bool:  # the PLC stopped, and every confirmation is a dead letter
        status = httpx.get(f"{base}/status", timeout=5).json()
        erp = status["destinations"]["erp"]
        return bool(
            status["signals"]["press-01.good"]["value"] == 400
            and erp["pending"] == 0
            and erp["dead"] >= 3
        )

    wait_for(settled, 40, "every confirmation to be a dead letter")
    first, second, *others = dead()
    count = 2 + len(others)

    # The misspelt field of the report: refused, nothing purged.
    typo = httpx.post(
        f"{base}/outbox/purge-dead",
        headers=bearer,
        timeout=5,
        json={"event_id": first, "reason": "typo"},
    )
    assert typo.status_code == 400
    assert "unknown field 'event_id' for purge-dead" in typo.json()["error"]
    nothing = httpx.post(
        f"{base}/outbox/purge-dead", headers=bearer, timeout=5, json={"reason": "no target"}
    )
    assert nothing.status_code == 400 and "all: true" in nothing.json()["error"]
    assert (
        httpx.post(
            f"{base}/outbox/purge-dead", headers=bearer, timeout=5, json={"id": first}
        ).status_code
        == 400
    )  # no reason
    # The CLI without an id does nothing either; --all wants a reason and, on a terminal, a yes.
    bare = outbox_cli(config, "purge-dead")
    assert bare.returncode == 2 and "give one EVENT_ID, or --all" in bare.stderr
    assert outbox_cli(config, "purge-dead", "--all").returncode == 2  # no --reason, no tty
    argv = [
        sys.executable,
        "-m",
        "edge.cli",
        "outbox",
        "--config",
        str(config),
        "purge-dead",
        "--all",
        "--reason",
        "clean-up",
    ]
    code, shown = on_terminal(argv, "no")
    assert code == 1 and "Nothing done" in shown, shown
    assert len(dead()) == count

    # One by one, with a reason, through the daemon; an id that is no dead letter is an error.
    purged = outbox_cli(config, "purge-dead", first, "--reason", "duplicate of ERP doc 4711")
    assert purged.returncode == 0 and "1 dead letter(s) deleted" in purged.stdout, purged.stderr
    again = outbox_cli(config, "purge-dead", first, "--reason", "again")
    assert again.returncode == 1 and f"no event {first!r}" in again.stderr
    wrong = outbox_cli(config, "retry", "not-an-id", "--reason", "try")
    assert wrong.returncode == 1 and "no event 'not-an-id'" in wrong.stderr, wrong.stdout
    shown_event = outbox_cli(config, "show", second)
    assert shown_event.returncode == 0
    assert re.search(
        r"committed    \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", shown_event.stdout
    ), shown_event.stdout
    assert re.search(r"^type +production\.confirmation$", shown_event.stdout, re.MULTILINE)
    assert '    "yield_quantity": {' in shown_event.stdout  # the payload as JSON, not a string
    assert '\\"' not in shown_event.stdout
    as_json = json.loads(outbox_cli(config, "--json", "show", second).stdout)
    assert as_json["payload"]["id"] == second
    assert gateway.stop() == 0

    # The daemon down: the same rules on the database; a yes on a terminal purges the rest.
    code, shown = on_terminal(argv, "yes")
    assert code == 0 and f"{count - 1} dead letter(s) deleted" in shown, shown
    journal = json.loads(outbox_cli(config, "--json", "hand-actions").stdout)
    import getpass

    me = getpass.getuser()
    assert [(row["action"], row["target"], row["affected"], row["reason"]) for row in journal] == [
        ("purge-dead", f"event {first}", 1, "duplicate of ERP doc 4711"),
        ("purge-dead", "all dead letters", count - 1, "clean-up"),
    ]
    assert journal[0]["who"] == f"api token (os user {me}, as the CLI says)"
    assert journal[1]["who"] == f"os user {me}"
    text = outbox_cli(config, "hand-actions").stdout
    assert "duplicate of ERP doc 4711" in text and "clean-up" in text


@pytest.mark.integration
def test_secrets_in_cleartext_are_refused_unless_allowed_and_then_warned(tmp_path: Path) -> None:
    config = tmp_path / "plant.yaml"
    base = f'site: "1010"\ndata_dir: {tmp_path}\n'
    mqtt = (
        "drivers:\n  - name: mes\n    type: mqtt\n    host: {host}\n    username: gw\n"
        '    password: "a-broker-password"\n{extra}'
        "    topics: [{{filter: mes/#, event: material.consumed}}]\n"
    )
    oauth = (
        "destinations:\n  erp:\n    base_url: https://erp.example\n{extra}"
        "    auth: {{type: oauth2_client_credentials, token_url: '{url}',\n"
        "           client_id: gw, client_secret: 'an-oauth-secret'}}\n"
    )
    config.write_text(base + mqtt.format(host="10.0.0.5", extra=""))
    config.chmod(0o600)
    refused = cli(config, "check")
    assert refused.returncode == 1
    assert (
        "drivers[0].password: driver mes's MQTT password would cross the network in "
        "cleartext to 10.0.0.5: use TLS"
    ) in refused.stderr
    config.write_text(base + mqtt.format(host="10.0.0.5", extra="    allow_insecure: true\n"))
    allowed = cli(config, "check")
    assert allowed.returncode == 0, allowed.stderr
    assert (
        "warning: drivers[0].password: driver mes's MQTT password cross the network in "
        "cleartext to 10.0.0.5 (allow_insecure: true)"
    ) in allowed.stderr
    config.write_text(base + mqtt.format(host="127.0.0.1", extra=""))  # never leaves the box
    local = cli(config, "check")
    assert local.returncode == 0 and "warning" not in local.stderr, local.stderr

    config.write_text(base + oauth.format(url="http://erp.example/oauth/token", extra=""))
    refused = cli(config, "check")
    assert refused.returncode == 1
    assert (
        "destinations.erp.auth.token_url: destination erp's OAuth client secret would "
        "cross the network in cleartext to erp.example"
    ) in refused.stderr
    config.write_text(
        base
        + oauth.format(url="http://erp.example/oauth/token", extra="    allow_insecure: true\n")
    )
    assert "OAuth client secret cross the network" in cli(config, "check").stderr
    for value in ("a-broker-password", "an-oauth-secret"):
        assert value not in refused.stderr + allowed.stderr


@pytest.mark.integration
async def test_a_tls_failure_at_the_token_url_says_which_setting_fixes_it(
    tmp_path: Path,
) -> None:
    """A real TLS server on loopback whose certificate this box does not trust."""
    import shutil
    import ssl
    import threading

    from edge.config.destinations import OAuth2ClientCredentials
    from edge.forward.auth import AuthError, OAuth2Token
    from tests.test_mqtt import make_certificates

    if shutil.which("openssl") is None:
        missing_peer("openssl is not installed (apt-get install openssl)")
    files = make_certificates(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files["server.pem"], files["server.key"])
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        with contextlib.suppress(OSError), listener:
            connection, _ = listener.accept()
            with contextlib.suppress(OSError, ssl.SSLError):
                context.wrap_socket(connection, server_side=True).close()

    threading.Thread(target=serve, daemon=True).start()
    auth = OAuth2Token(
        OAuth2ClientCredentials.model_validate(
            {
                "type": "oauth2_client_credentials",
                "token_url": f"https://localhost:{port}/token",
                "client_id": "gw",
                "client_secret": "s3cret-value",
            }
        )
    )
    async with httpx.AsyncClient() as client:
        with pytest.raises(AuthError) as failed:
            await auth.headers(client)
    message = str(failed.value)
    assert "certificate verify failed" in message and "set tls.ca_file" in message, message


@pytest.mark.integration
def test_stored_payloads_cannot_drive_the_terminal_and_data_at_rest_is_private(
    peers: list[Peer],
    tmp_path: Path,
    mosquitto: Mosquitto,
) -> None:
    """An MES message with terminal escapes becomes an input dead letter; what the CLI prints
    of it cannot clear the screen or set the window title. The daemon, run by hand with a
    umask that leaves files readable, still makes its directory 0700 and its files 0600, and
    keeps only the first 16 KiB of a rejected payload."""
    import stat

    from simulators.mes_publisher import MesPublisher

    port = free_port()
    config = small_plant(
        tmp_path,
        api=f'{{listen: "127.0.0.1:{port}"}}',
        extra=f"""
validation: {{require_known_order: false}}
drivers:
{mes_driver(mosquitto.port)}""",
    )
    start_gateway(peers, config, tmp_path, preexec=lambda: os.umask(0o022))
    base = f"http://127.0.0.1:{port}"
    wait_for(
        lambda: httpx.get(f"{base}/status", timeout=5).json()["drivers"][0]["connected"],
        20,
        "the MQTT driver",
    )
    hostile = b"x \x1b[2J\x1b]0;pwned\x07 \xe2\x80\xae"  # clear, set title, bell, bidi override
    with MesPublisher("127.0.0.1", mosquitto.port) as mes:
        mes.publish_raw("mes/1010/press-01/consumption", hostile)
        mes.publish_raw("mes/1010/press-01/consumption", b"y" * 200_000)
        mes.flush(10)
    wait_for(
        lambda: httpx.get(f"{base}/status", timeout=5).json()["input_dead_letters"]["count"] >= 2,
        20,
        "the input dead letters",
    )

    for args in (("rejected",), ("rejected", "--since", "1h")):
        shown = outbox_cli(config, *args)
        assert shown.returncode == 0, shown.stderr
        out = shown.stdout
        assert not any(ch in out for ch in "\x1b\x07\u202e"), repr(out)
        assert "x \\x1b[2J\\x1b]0;pwned\\x07 \\u202e" in out
    status = cli(config, "status")
    assert "\x1b" not in status.stdout and "INPUT DEAD LETTERS (" in status.stdout
    # --json stays exact (JSON escapes control characters itself).
    rows = json.loads(outbox_cli(config, "--json", "rejected").stdout)
    assert any(row["payload"] == hostile.decode(errors="replace") for row in rows)
    big = next(row for row in rows if row["payload"].startswith("yyy"))
    assert len(big["payload"]) == 16 * 1024
    assert "payload of 200000 bytes; its first 16384 kept" in big["reason"]

    data = tmp_path / "data"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in ("outbox.db", "outbox.db-wal", "outbox.db-shm", "api-token"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
