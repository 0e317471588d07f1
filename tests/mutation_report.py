"""The score of a `make mutate` run: one JSON line per mutated module and one for them all,
from mutmut's own records (mutants/**/*.py.meta), and every surviving mutant's diff in
mutants/survivors.txt, to kill with a test or explain as equivalent (README, "Proof").

A mutant counts as killed when a test failed on it, or it made the tests time out (an endless
loop is caught too); it survives when every test passed, and "no tests" means no test in the
killer set reaches its function at all. Score = killed / (killed + survived + no tests).

Some survivors cannot be killed because they change nothing: mutmut upper- or lower-cases
string literals, and SQL keywords and identifiers, and codec names like "utf-8", are case
insensitive. A survivor whose only change is the case of a string that is SQL or a codec name is
counted as `equivalent` (listed apart in survivors.txt, not in the score's denominator: the
`score_without_equivalent` figure); every other survivor needs a test or a written reason.
"""

from __future__ import annotations

import ast
import difflib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

SQL = re.compile(
    r"\b(select|insert|update|delete|from|where|order by|join|values|set|and)\b"
    r"|^\s*\w+\.\w+\s*(=|<|>)",
    re.IGNORECASE,
)
CODEC = re.compile(r"^utf-?8$", re.IGNORECASE)

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
    recorded = root / "REVISION"  # the commit the run started on (make mutate writes it)
    revision = (
        recorded.read_text().strip()
        if recorded.exists()
        else subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    )
    totals: Counter[str] = Counter()
    survivors: list[str] = []
    equivalent: list[str] = []
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
                if _case_of_sql_or_codec(_diff(name)):
                    counts["equivalent"] += 1
                    equivalent.append(name)
                else:
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
            out.write(f"## {name}\n{_diff(name)}\n")
        out.write("# Equivalent: only the case of SQL or of a codec name changed\n")
        for name in equivalent:
            out.write(f"## {name}\n{_diff(name)}\n")
    print(
        f"{len(survivors)} survivor(s), {len(equivalent)} equivalent, diffs in "
        f"{root / 'survivors.txt'}",
        file=sys.stderr,
    )
    return 0


_DIFFS: dict[str, str] = {}


def _diff(name: str) -> str:
    """The mutant's diff, read from mutmut's mutated copy (one parse per file: `mutmut show`
    starts a process per mutant, minutes for a few hundred)."""
    if name not in _DIFFS:
        _DIFFS[name] = (
            _diff_from_copy(name)
            or subprocess.run(
                [sys.executable, "-m", "mutmut", "show", name],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
        )
    return _DIFFS[name]


_FUNCTIONS: dict[Path, dict[str, str]] = {}


def _diff_from_copy(name: str) -> str | None:
    module, _, function = name.rpartition(".")
    path = Path("mutants", *module.split(".")).with_suffix(".py")
    if not path.exists():
        return None
    if path not in _FUNCTIONS:
        source = path.read_text()
        found: dict[str, str] = {}
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (
                "__mutmut_" in node.name
            ):
                found[node.name] = ast.get_source_segment(source, node) or ""
        _FUNCTIONS[path] = found
    functions = _FUNCTIONS[path]
    original = functions.get(function.rsplit("__mutmut_", 1)[0] + "__mutmut_orig")
    mutated = functions.get(function)
    if original is None or mutated is None:
        return None
    mutated = mutated.replace(function, function.rsplit("__mutmut_", 1)[0] + "__mutmut_orig", 1)
    return "".join(
        difflib.unified_diff(
            original.splitlines(True),
            mutated.splitlines(True),
            f"{path}",
            f"{path} ({function})",
            n=1,
        )
    )


def _case_of_sql_or_codec(diff: str) -> bool:
    removed = [
        line[1:]
        for line in diff.splitlines()
        if line.startswith("-") and not line.startswith("---")
    ]
    added = [
        line[1:]
        for line in diff.splitlines()
        if line.startswith("+") and not line.startswith("+++")
    ]
    if len(removed) != 1 or len(added) != 1 or removed == added:
        return False
    before, after = removed[0], added[0]
    if before.lower() != after.lower():
        return False
    changed = [b for b, a in zip(_strings(before), _strings(after), strict=False) if b != a]
    return bool(changed) and all(SQL.search(text) or CODEC.match(text) for text in changed)


def _strings(line: str) -> list[str]:
    return re.findall(r'"([^"]*)"', line)


def _line(module: str, counts: Counter[str], revision: str) -> dict[str, object]:
    judged = counts["killed"] + counts["survived"] + counts["no_tests"]
    everything = judged + counts["equivalent"]
    return {
        "mutate": module,
        "revision": revision,
        "mutants": everything + counts["other"],
        "killed": counts["killed"],
        "of_which_timeout": counts["timeout"],
        "survived": counts["survived"],
        "no_tests": counts["no_tests"],
        "equivalent": counts["equivalent"],
        "not_judged": counts["other"],
        "score": round(counts["killed"] / everything, 3) if everything else None,
        "score_without_equivalent": round(counts["killed"] / judged, 3) if judged else None,
    }


if __name__ == "__main__":
    sys.exit(main())
