"""The one place the tests start child processes: each child is tied to the test run.

A simulator, broker or gateway a test starts must not outlive the run, however the run ends: a
pytest worker killed by a timeout, by mutmut, or by a person's Ctrl-C twice skips every
fixture's teardown, and its children used to stay behind holding ports and burning CPU. So
every child gets, between fork and exec, `PR_SET_PDEATHSIG` = SIGKILL: the kernel kills it
when the thread that started it (the test's) ends. It is also the leader of a process group of
its own, so that `reap` can end what it started in turn (the demo's simulators), which the
death signal does not reach (the kernel clears it across a fork).

`spawn` is `subprocess.Popen` and `run_process` is `subprocess.run`, with that tie; tests call
them instead of `subprocess`'s. Linux only, like the gateway's plant boxes.

Under `make test-fast` (`PLANTSYNC_UNIT_ONLY=1`), starting a child fails the test: a test that
needs a process is an integration test and says so with `@pytest.mark.integration`, so that the
fast run stays fast and needs nothing installed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl  # resolved here: the child runs as little Python as it can before exec


def _tie_to(parent: int, then: Callable[[], object] | None) -> Callable[[], None]:
    def in_the_child() -> None:
        if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() != parent:  # the test died before the signal was armed
            os._exit(127)
        if then is not None:
            then()

    return in_the_child


def _unit_only(argv: list[str]) -> None:
    if os.environ.get("PLANTSYNC_UNIT_ONLY") == "1":
        pytest.fail(
            f"this test starts a child process ({argv[0]}) under make test-fast: "
            "mark it @pytest.mark.integration"
        )


def spawn(
    argv: list[str], *, preexec: Callable[[], object] | None = None, **options: Any
) -> subprocess.Popen[Any]:
    """`subprocess.Popen(argv, **options)` tied to the test run; `preexec` runs in the child
    after the tie (a umask, a file limit)."""
    _unit_only(argv)
    return subprocess.Popen(
        argv, preexec_fn=_tie_to(os.getpid(), preexec), process_group=0, **options
    )


def run_process(
    argv: list[str], *, preexec: Callable[[], object] | None = None, **options: Any
) -> subprocess.CompletedProcess[Any]:
    """`subprocess.run(argv, **options)` tied to the test run."""
    _unit_only(argv)
    return subprocess.run(
        argv, preexec_fn=_tie_to(os.getpid(), preexec), process_group=0, **options
    )


def reap(process: subprocess.Popen[Any]) -> None:
    """Kill what is left of the process group `process` leads (its own children), once it
    has ended or been stopped."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
