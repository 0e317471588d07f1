"""YAML with line numbers: the file's text as plain data that remembers the line of every key and
list item, with `${ENV}`, `${file:...}` and `${cred:...}` references resolved (or left as a
placeholder by an offline check), and YAML syntax errors said in plain words.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from edge.config.errors import ConfigError, Loc, Problem

_ENV_REF = re.compile(r"\$\{(?:(cred|file):([^}]+)|([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?)\}")


class Document:
    """YAML turned into plain data, remembering the line of each key and list item."""

    def __init__(self, text: str, environ: Mapping[str, str], *, offline: bool = False) -> None:
        self.lines: dict[Loc, int] = {}
        self.problems: list[Problem] = []
        self.unresolved: dict[Loc, list[str]] = {}
        """Offline: the references left unresolved, by where they are."""
        self._environ = environ
        self._offline = offline
        self._scalars = yaml.SafeLoader("")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        self.data: Any = {} if root is None else self._build(root, ())

    def _build(self, node: yaml.Node, loc: Loc) -> Any:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            mapping: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    child = (*loc, "<<")
                    self.lines[child] = key_node.start_mark.line + 1
                    self.problems.append(
                        Problem(
                            child,
                            "YAML merge keys (<<: *name) are not "
                            "supported: write the settings out in full "
                            "(an anchor may still stand for a whole value)",
                        )
                    )
                    continue
                key = str(self._scalars.construct_object(key_node))
                child = (*loc, key)
                self.lines[child] = key_node.start_mark.line + 1
                if key in mapping:
                    self.problems.append(Problem(child, "duplicate key"))
                mapping[key] = self._build(value_node, child)
            return mapping
        if isinstance(node, yaml.SequenceNode):
            return [self._build(item, (*loc, i)) for i, item in enumerate(node.value)]
        try:
            value = self._scalars.construct_object(node)
        except (ValueError, TypeError, OverflowError, yaml.YAMLError) as exc:  # `!!int 256KiB`
            # PyYAML's own text goes on to quote the line with a caret: the problem already
            # names file and line, and stays one line.
            reason = str(exc).split("\n", 1)[0]
            self.problems.append(Problem(loc, f"cannot read this value: {reason}"))
            return None
        if isinstance(value, str) and "${" in value:
            value = self._substitute(value, loc)
        return value

    def _substitute(self, text: str, loc: Loc) -> str:
        def replace(match: re.Match[str]) -> str:
            kind, where, name, default = match.groups()
            if self._offline:
                if default is not None:
                    return default
                self.unresolved.setdefault(loc, []).append(match.group(0))
                return OFFLINE_PLACEHOLDER
            if kind is not None:
                return self._read_secret(kind, where, loc)
            if name in self._environ:
                return self._environ[name]
            if default is not None:
                return default
            self.problems.append(Problem(loc, f"environment variable {name} is not set"))
            return ""

        return _ENV_REF.sub(replace, text)

    def _read_secret(self, kind: str, where: str, loc: Loc) -> str:
        """`${file:/path}` or `${cred:NAME}` (a systemd credential, LoadCredential=): the
        file's content without the trailing newline."""
        if kind == "cred":
            directory = self._environ.get("CREDENTIALS_DIRECTORY")
            if not directory:
                self.problems.append(
                    Problem(
                        loc,
                        f"${{cred:{where}}} needs systemd's "
                        "CREDENTIALS_DIRECTORY (LoadCredential=)",
                    )
                )
                return ""
            path = Path(directory) / where
        else:
            path = Path(where)
        try:
            return path.read_text().rstrip("\n")
        except OSError as exc:
            self.problems.append(
                Problem(loc, f"cannot read the secret file {path}: {exc.strerror}")
            )
            return ""

    def line_of(self, loc: Loc) -> int:
        for end in range(len(loc), -1, -1):
            line = self.lines.get(loc[:end])
            if line is not None:
                return line
        return 1


OFFLINE_PLACEHOLDER = "offline-unresolved"
"""What `check --offline` puts where a `${...}` reference would be resolved."""


def read_document(
    text: str, filename: str, environ: Mapping[str, str], *, offline: bool
) -> Document:
    """The YAML as a document, or ConfigError with one line: file:line and what to do, in
    plain words rather than the parser's."""
    try:
        return Document(text, environ, offline=offline)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError([f"{filename}:{line}: (file): {_yaml_hint(exc, text)}"]) from None
    except yaml.YAMLError as exc:  # e.g. a control character the reader refuses
        position = getattr(exc, "position", None)
        line = text.count("\n", 0, position) + 1 if isinstance(position, int) else 1
        reason = str(getattr(exc, "reason", None) or exc).splitlines()[0]
        raise ConfigError(
            [
                f"{filename}:{line}: (file): a character YAML does not allow "
                f"({reason}): remove it or put the value in quotes"
            ]
        ) from None
    except RecursionError:
        raise ConfigError(
            [f"{filename}:1: (file): anchors nested too deep (an alias that refers to itself?)"]
        ) from None


_INI_SECTION = re.compile(r"^\s*\[[^\]]+\]\s*$")
_INI_SETTING = re.compile(r"^\s*[\w.-]+\s*=")


def _yaml_hint(exc: yaml.MarkedYAMLError, text: str) -> str:
    """What a YAML syntax error most likely means, for someone editing the file by hand."""
    problem = str(exc.problem or "")
    lines = [
        line
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith(("#", ";"))
    ]
    if lines and _INI_SECTION.match(lines[0]) and any(_INI_SETTING.match(x) for x in lines):
        return (
            "this looks like an INI file ([section], key = value), but the config is "
            "YAML (key: value, sections by indentation): start from "
            "config/plant.example.yaml"
        )
    if "'\\t'" in problem or "\t" in problem:
        return "a tab character: YAML indents with spaces only; replace the tab with spaces"
    if "mapping values are not allowed" in problem:
        return (
            "a 'key:' where none can start: the line is indented deeper than its "
            "section's keys, or a value holds ': ' (put such a value in quotes)"
        )
    if (
        "expected <block end>" in problem
        or "did not find expected key" in problem
        or ("expected <block mapping start>" in problem)
    ):
        return (
            "the indentation does not line up: keys of one section start in the same "
            "column, list items (- ...) too, with spaces only"
        )
    if "end of stream" in problem and "quoted" in str(exc.context or ""):
        start = exc.context_mark.line + 1 if exc.context_mark else None
        return (
            "a quote is never closed"
            + (f" (it opens on line {start})" if start else "")
            + ": close it, or drop the quotes"
        )
    if "found undefined alias" in problem:
        return f"{problem}: define the anchor (&name) before its use (*name)"
    return f"not valid YAML here ({problem or exc}); compare with config/plant.example.yaml"


def read_config_text(path: Path) -> str:
    """The file's text, or ConfigError saying in one line why it is not a config file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the config file: {exc.strerror}"]) from None
    if b"\x00" in data:
        raise ConfigError(
            [
                f"{path}: (file): not a text file (it holds NUL bytes): is this "
                "the config? A plant config is YAML text"
            ]
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            [
                f"{path}:{line}: (file): not UTF-8 text (byte 0x{data[exc.start]:02x}"
                "): save the file as UTF-8"
            ]
        ) from None
