"""The gateway as the tests run it: `plantsync run --config FILE` as a real child process.

One harness for every test that starts the daemon: started, stopped with SIGTERM, killed with
SIGKILL and started again on the same config and outbox, each run with a log file of its own
(`gateway.log`, then `gateway-01.log`, ...), so that a run's readiness is the ready line in its
own log. It reads the local API at the config's `api.listen`.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import Peer

READY_TEXT = "PlantSync Edge is running"
"""The line the daemon logs once it runs (after the outbox, forwarders, rules, drivers)."""


class GatewayProcess:
    def __init__(
        self,
        peers: list[Peer],
        config: Path,
        tmp_path: Path,
        *,
        log_format: str | None = "text",
        log_name: str = "gateway",
        env: dict[str, str] | None = None,
        preexec: Callable[[], object] | None = None,
        ready_timeout: float = 120.0,
    ) -> None:
        self.peers = peers
        self.config = config
        self.tmp_path = tmp_path
        self.log_format = log_format
        self.log_name = log_name
        self.env = dict(env or {})
        self.preexec = preexec
        self.ready_timeout = ready_timeout
        self.runs: list[Peer] = []
        self.kills = 0
        self.ready_times: list[float] = []
        """Seconds from each start to its ready line."""
        self.started_at = time.monotonic()
        self.restarted_at = 0.0

    @property
    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "edge.cli", "run", "--config", str(self.config)]
        return argv + (["--log-format", self.log_format] if self.log_format else [])

    @property
    def current(self) -> Peer:
        return self.runs[-1]

    @property
    def process(self) -> Any:
        """The current run's `subprocess.Popen`."""
        return self.current.process

    @property
    def log_path(self) -> Path:
        return self.current.log_path

    @property
    def api(self) -> str:
        """The local API's base URL, from the config."""
        return f"http://{self._listen()}"

    @property
    def api_port(self) -> int:
        return int(self._listen().rsplit(":", 1)[1])

    def _listen(self) -> str:
        listen: str = yaml.safe_load(self.config.read_text())["api"]["listen"]
        return listen

    def start(self) -> Peer:
        """Start a run and wait for its ready line; returns that run."""
        number = len(self.runs)
        name = self.log_name if number == 0 else f"{self.log_name}-{number:02d}"
        peer = Peer(
            self.argv, self.tmp_path / f"{name}.log", READY_TEXT, env=self.env, preexec=self.preexec
        )
        self.peers.append(peer)
        self.runs.append(peer)
        self.restarted_at = time.monotonic()
        peer.start(timeout=self.ready_timeout)
        self.ready_times.append(time.monotonic() - self.restarted_at)
        return peer

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        return self.current.stop(sig, timeout)

    def kill(self) -> None:
        self.current.kill()
        self.kills += 1

    def output(self) -> str:
        """Every run's log, in order."""
        return "".join(run.output() for run in self.runs)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.api}{path}", timeout=10)

    def status(self) -> dict[str, Any]:
        response = self.get("/status")
        response.raise_for_status()
        status: dict[str, Any] = response.json()
        return status

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of /metrics by name (counters without their `_total`)."""
        found = {}
        for line in self.get("/metrics").text.splitlines():
            match = re.fullmatch(r"([a-z_]+?)(?:_total)?(?:\{[^}]*\})? ([-+0-9.eEinfa]+)", line)
            if match and "{" not in line:
                found[match[1]] = float(match[2])
        return found

    def signal(self, name: str) -> Any:
        """A signal's last value from /status, or None when it has none or the API is down."""
        try:
            found = self.status()["signals"].get(name)
        except httpx.HTTPError:
            return None
        return None if found is None else found["value"]

    def assert_alive(self, pid: int) -> None:
        process = self.current.process
        assert process is not None and process.pid == pid, "the gateway was restarted"
        assert process.poll() is None, (
            f"the gateway exited ({process.returncode}):\n{self.output()[-3000:]}"
        )


def start_gateway(
    peers: list[Peer], config: Path, tmp_path: Path, **options: Any
) -> GatewayProcess:
    """The gateway on `config`, started and ready (the JSON log format unless told)."""
    options.setdefault("log_format", None)
    gateway = GatewayProcess(peers, config, tmp_path, **options)
    gateway.start()
    return gateway
