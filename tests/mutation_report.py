"""The score of a `make mutate` run: one JSON line per mutated module and one for them all,
from mutmut's own records (mutants/**/*.py.meta), and every surviving mutant's diff in
mutants/survivors.txt, to kill with a test or explain as equivalent (README, "Proof").

A mutant counts as killed when a test failed on it, or it made the tests time out (an endless
loop is caught too); it survives when every test passed, and "no tests" means no test in the
killer set reaches its function at all. Score = killed / (killed + survived + no tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

KILLED = {1, 3, 37}
TIMED_OUT = {24, -24, 36, 152, 255}
SURVIVED = {0}
NO_TESTS = {5, 33}


def main() -> int:
    root = Path("mutants")
    metas = sorted(root.rglob("*.py.meta"))
    if not metas:
        print("no mutmut results under mutants/: run `make mutate` first", file=sys.stderr)
        return 1
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=False).stdout.strip()
    totals: Counter[str] = Counter()
    survivors: list[str] = []
    for meta in metas:
        module = meta.relative_to(root).as_posix().removesuffix(".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts: Counter[str] = Counter()
        for name, code in codes.items():
            if code in KILLED:
                counts["killed"] += 1
            elif code in TIMED_OUT:
                counts["killed"] += 1
                counts["timeout"] += 1
            elif code in SURVIVED:
                counts["survived"] += 1
                survivors.append(name)
            elif code in NO_TESTS:
                counts["no_tests"] += 1
                survivors.append(name)
            else:
                counts["other"] += 1
        totals.update(counts)
        print(json.dumps(_line(module, counts, revision)))
    print(json.dumps(_line("all", totals, revision)))
    with (root / "survivors.txt").open("w") as out:
        for name in survivors:
            shown = subprocess.run([sys.executable, "-m", "mutmut", "show", name],
                                   capture_output=True, text=True, check=False)
            out.write(f"## {name}\n{shown.stdout}\n")
    print(f"{len(survivors)} survivor(s), diffs in {root / 'survivors.txt'}", file=sys.stderr)
    return 0


def _line(module: str, counts: Counter[str], revision: str) -> dict[str, object]:
    judged = counts["killed"] + counts["survived"] + counts["no_tests"]
    return {"mutate": module, "revision": revision, "killed": counts["killed"],
            "of_which_timeout": counts["timeout"],
            "survived": counts["survived"], "no_tests": counts["no_tests"],
            "not_judged": counts["other"],
            "score": round(counts["killed"] / judged, 3) if judged else None}


if __name__ == "__main__":
    sys.exit(main())
