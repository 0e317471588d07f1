"""`plantsync demo` (what `make demo` runs) delivers confirmations to the ERP simulator within
30 seconds and stops everything cleanly on Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port
from tests.processes import reap, spawn

pytestmark = pytest.mark.integration


def test_demo_delivers_within_30_seconds_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    demo = (ROOT / "config" / "demo.yaml").read_text()
    demo = demo.replace("port: 5020", f"port: {free_port()}")
    demo = demo.replace("127.0.0.1:8480", f"127.0.0.1:{free_port()}")
    demo = demo.replace("127.0.0.1:8470", f"127.0.0.1:{free_port()}")
    config = tmp_path / "demo.yaml"
    config.write_text(demo)
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        process = spawn(
            [sys.executable, "-m", "edge.cli", "demo", "--config", str(config)],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while "ERP received production.confirmation" not in log.read_text():
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            process.send_signal(signal.SIGINT)
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
            reap(process)  # the simulators the demo started, if it left any
    output = log.read_text()
    assert "Stopped; outbox holds" in output
    assert re.search(r"\[erp\] ERP received production.confirmation .* -> ERP-000001", output)
    assert (tmp_path / "data" / "demo" / "outbox.db").exists()
