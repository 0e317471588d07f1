"""The tie between the tests and the processes they start (tests/processes.py).

The oracle is the kernel's process table: a child started through `spawn` by a process that is
then killed with SIGKILL (no teardown, no atexit: what a timeout or mutmut does to a pytest
worker) must be gone; one started by plain `subprocess.Popen` stays, which is the leak this
guards against.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.processes import run_process

pytestmark = pytest.mark.integration

KILLED_PARENT = """
import os, signal, subprocess, sys, time
sys.path.insert(0, {root!r})
from tests.processes import spawn
start = spawn if {tied} else subprocess.Popen
child = start([sys.executable, "-c", "import time; time.sleep(60)"],
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(child.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is not alive
        return stat.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.parametrize("tied", [True, False])
def test_a_child_dies_with_the_test_process_that_started_it(tied: bool) -> None:
    script = KILLED_PARENT.format(root=str(ROOT), tied=tied)
    done = run_process([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    child = int(done.stdout.split()[0])
    try:
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(child) is not tied, (
            "the child outlived its killed parent" if tied else "the untied child died too"
        )
    finally:
        if _alive(child):
            os.kill(child, 9)
