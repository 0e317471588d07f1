"""Run every benchmark in bench/ one after another, each in its own process with this
interpreter, and collect the JSON line each one prints last (its figures and its ratio to the
bare baseline it measured in the same run). Writes `bench/results.json` with the machine they
ran on, and prints the figures as a Markdown table for the README. A benchmark that fails (a
non-zero exit, no JSON line, or the timeout) is reported with the tail of its stderr, the rest
still run, and the exit code is 1. `--quick` is passed on to every benchmark (each takes it for
a tiny run) and then nothing is written unless `--output` says where.

Run it as `.venv/bin/python bench/run.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
STDERR_TAIL_LINES = 20


@dataclass(frozen=True)
class Outcome:
    name: str
    figures: dict[str, Any] | None
    seconds: float
    error: str | None = None


def benchmarks() -> list[Path]:
    """Every bench/*.py but this runner and the modules they share (named with a leading _)."""
    return sorted(
        path
        for path in BENCH.glob("*.py")
        if path.resolve() != Path(__file__).resolve() and not path.name.startswith("_")
    )


def last_json_line(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        try:
            figures = json.loads(line)
        except ValueError:
            continue
        if isinstance(figures, dict):
            return figures
    return None


def run_one(path: Path, extra_args: list[str], timeout: float) -> Outcome:
    started = time.perf_counter()
    try:
        finished = subprocess.run(
            [sys.executable, str(path), *extra_args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        return Outcome(
            path.stem,
            None,
            time.perf_counter() - started,
            f"timed out after {timeout:g} s\n{tail(stderr)}",
        )
    seconds = time.perf_counter() - started
    figures = last_json_line(finished.stdout)
    if finished.returncode != 0:
        return Outcome(
            path.stem, None, seconds, f"exited with {finished.returncode}\n{tail(finished.stderr)}"
        )
    if figures is None:
        return Outcome(path.stem, None, seconds, f"printed no JSON line\n{tail(finished.stderr)}")
    return Outcome(path.stem, figures, seconds)


def tail(text: str) -> str:
    return "\n".join(text.rstrip().splitlines()[-STDERR_TAIL_LINES:])


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "revision": revision(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def revision() -> str:
    """The commit measured, with `-dirty` when the tree had uncommitted changes."""
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return described.stdout.strip()


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per scalar figure; nested details (parameters) stay in results.json."""
    rows = ["| benchmark | figure | value |", "| --- | --- | ---: |"]
    for name, figures in results.items():
        for figure, value in figures.items():
            if figure == "benchmark" or isinstance(value, dict) or value in ([], None):
                continue
            rows.append(f"| {name} | {figure} | {shown(value)} |")
    return "\n".join(rows)


def shown(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny runs, to check they work")
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds one benchmark may take before it counts as failed",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="where to write the results (default bench/results.json; with --quick, nowhere)",
    )
    args = parser.parse_args(argv)
    output = args.output or (None if args.quick else BENCH / "results.json")
    extra_args = ["--quick"] if args.quick else []

    outcomes = []
    for path in benchmarks():
        print(f"running {path.name} ...", file=sys.stderr, flush=True)
        outcome = run_one(path, extra_args, args.timeout)
        outcomes.append(outcome)
        if outcome.error is not None:
            print(f"FAILED {outcome.name}: {outcome.error}", file=sys.stderr, flush=True)
        else:
            print(f"done {path.name} in {outcome.seconds:.1f} s", file=sys.stderr, flush=True)

    results = {o.name: o.figures for o in outcomes if o.figures is not None}
    failures = {o.name: o.error for o in outcomes if o.error is not None}
    report: dict[str, Any] = {"machine": machine(), "results": results}
    if failures:
        report["failures"] = failures
    if output is not None:
        output.write_text(json.dumps(report, indent=2) + "\n")
    about = report["machine"]
    print(markdown_table(results))
    print(
        f"\n{about['cpu_count']} CPUs ({about['cpu_model']}), {about['platform']}, "
        f"Python {about['python']}, {about['date']}"
    )
    if failures:
        print(f"{len(failures)} benchmark(s) failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
