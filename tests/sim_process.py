"""Start an HTTP simulator as a real process on a free port and wait for its ready line.

The simulator is asked for port 0, so the kernel picks a free one, and says which it bound in
its ``NAME listening on http://HOST:PORT`` line; that address is the client's base URL.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.processes import spawn

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS = 10.0
SIMULATOR_MODULES = {"erp-api": "simulators.erp", "qms-api": "simulators.qms_api"}
"""The module `python -m` runs, by the name the simulator gives in its ready line."""


@dataclass
class RunningSimulator:
    process: subprocess.Popen[str]
    client: httpx.Client

    def stop(self) -> tuple[int, str]:
        """SIGTERM the simulator; return its exit code and the rest of its output."""
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            remaining, _ = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            remaining, _ = self.process.communicate()
        return self.process.returncode, remaining


def start_simulator(name: str, db_path: Path, *options: str) -> RunningSimulator:
    """Run the simulator that calls itself `name` (``erp-api``, ``qms-api``) on a SQLite file."""
    module = SIMULATOR_MODULES[name]
    ready_line = re.compile(rf"^{re.escape(name)} listening on (http://127\.0\.0\.1:\d+)$")
    process = spawn(
        [sys.executable, "-m", module, "--port", "0", "--db", str(db_path), *options],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    # A simulator that hangs before its ready line is killed, which ends the reads below.
    watchdog = threading.Timer(START_TIMEOUT_SECONDS, process.kill)
    watchdog.start()
    seen: list[str] = []
    try:
        for line in process.stdout:
            seen.append(line)
            if match := ready_line.match(line.strip()):
                return RunningSimulator(process, httpx.Client(base_url=match.group(1), timeout=5.0))
    finally:
        watchdog.cancel()
    process.kill()
    process.wait()
    pytest.fail(f"{name} simulator did not become ready:\n" + "".join(seen))
