"""Stored data shown on a technician's terminal, made harmless.

What the CLI prints comes partly from outside: MES payloads kept as input dead letters, a
receiver's error text, topics, lot ids. Printed raw, `\\e[2J\\e]0;pwned\\a` in an MQTT payload
clears the technician's screen and sets the window title; a stored newline forges a line of
output. `printable` shows every control character (C0, DEL, C1, and the Unicode bidi and
zero-width controls that reorder or hide text) as a visible escape (`\\x1b`, `\\u202e`).
`--json` output needs none of this: JSON escapes control characters itself.
"""

from __future__ import annotations

import re
from typing import Any

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` with every control character shown as an escape, newlines and tabs included."""
    return _CONTROL.sub(_escape, text)


def printable_data(data: Any) -> Any:
    """Plain JSON-able data with every string made printable (keys too)."""
    match data:
        case str():
            return printable(data)
        case dict():
            return {printable_data(key): printable_data(value) for key, value in data.items()}
        case list() | tuple():
            return [printable_data(item) for item in data]
    return data
