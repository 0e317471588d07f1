"""What a config problem is: a place in the file's data (`Loc`), one `Problem` per finding, and
`ConfigError`, which holds them all as `file:line: field: message` lines.
"""

from __future__ import annotations

from collections.abc import Sequence

Loc = tuple[str | int, ...]


class ConfigError(Exception):
    """A config file that cannot be used; `problems` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        lines = [one_line(problem) for problem in problems]
        super().__init__("\n".join(lines))
        self.problems = lines


def one_line(text: str) -> str:
    """A problem stays one line whatever the file held: a key or value with a line break or
    another control character in it is shown escaped (`\\n`), never as a second line."""
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() or char == " " else char.encode("unicode_escape").decode()
        for char in text
    )


class Problem(Exception):
    """One problem at one place of the file's data; `ConfigError` gets them all, with lines."""

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


def format_loc(loc: Loc) -> str:
    """A place as the technician writes it: `drivers[0].tags[2].type`."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"
