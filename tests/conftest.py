"""Real peers for the tests: simulators and the gateway as child processes on free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Peer:
    """A child process started for a test; its output is kept in a log file."""

    argv: list[str]
    log_path: Path
    ready_text: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, timeout: float = 20.0) -> Peer:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if self.ready_text:
            deadline = time.monotonic() + timeout
            while self.ready_text not in self.output():
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


def start_peer(peers: list[Peer], argv: list[str], log_path: Path,
               ready_text: str | None = None) -> Peer:
    peer = Peer(argv, log_path, ready_text).start()
    peers.append(peer)
    return peer


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


@pytest.fixture
def erp_sim(peers: list[Peer], tmp_path: Path) -> ErpSim:
    port = free_port()
    peer = start_peer(
        peers, [sys.executable, "-m", "simulators.erp_api", "--port", str(port),
                "--db", str(tmp_path / "erp.db")],
        tmp_path / "erp.log", "erp-api listening")
    return ErpSim(peer, f"http://127.0.0.1:{port}")


@dataclass
class PlcSim:
    peer: Peer
    port: int


def start_plc(peers: list[Peer], tmp_path: Path, *args: str, port: int | None = None) -> PlcSim:
    port = port or free_port()
    peer = start_peer(
        peers, [sys.executable, "-m", "simulators.modbus_plc", "--port", str(port), *args],
        tmp_path / f"plc-{port}.log", "modbus-plc listening")
    return PlcSim(peer, port)
