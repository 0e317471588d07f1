"""MQTT topic filters and field mappings as the plant YAML writes them: a filter checked against
the MQTT grammar (`+` and `#` only as whole levels, `#` last), and each canonical field's
source (`payload.path.to.value`, `$topic[2]`, or a literal), looked up in a message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


def check_filter(topic_filter: str) -> str:
    """Return the filter if it is a valid MQTT topic filter, else raise ValueError saying why.

    `+` must fill a whole level, `#` must be the whole last level, and a shared subscription
    `$share/<group>/<filter>` needs a group name and a filter.
    """
    if not topic_filter:
        raise ValueError("a topic filter must not be empty")
    if len(topic_filter.encode()) > 65535:
        raise ValueError("a topic filter must be at most 65535 bytes")
    if "\x00" in topic_filter:
        raise ValueError("a topic filter must not contain U+0000")
    levels = topic_filter.split("/")
    if levels[0] == "$share":
        if len(levels) < 3 or not levels[1] or "+" in levels[1] or "#" in levels[1]:
            raise ValueError(f"{topic_filter!r}: a shared subscription is $share/<group>/<filter>")
        levels = levels[2:]
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(f"{topic_filter!r}: '#' must be the whole last level")
        if "+" in level and level != "+":
            raise ValueError(f"{topic_filter!r}: '+' must be a whole level")
    return topic_filter


def matching_filter(topic_filter: str) -> str:
    """The part of a filter that topics are matched against (without `$share/<group>/`)."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


# --- field mapping ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PayloadPath:
    """A dotted path into the JSON payload; a numeric part indexes an array."""

    parts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TopicLevel:
    """Level `index` (0-based) of the message's topic."""

    index: int


@dataclass(frozen=True, slots=True)
class LiteralValue:
    """A fixed string, written `=value` in the mapping."""

    value: str


FieldSource = PayloadPath | TopicLevel | LiteralValue

_TOPIC_LEVEL = re.compile(r"\$topic\[(\d+)\]")


def dotted(text: str, what: str) -> tuple[str, ...]:
    parts = tuple(text.split("."))
    if not text or any(not part for part in parts):
        raise ValueError(f"{what} {text!r} must be a dotted path such as 'order.id'")
    return parts


def parse_source(text: str) -> FieldSource:
    """Parse a mapping source: `a.b.c` (payload path), `$topic[N]` or `=literal`."""
    if text.startswith("="):
        return LiteralValue(text[1:])
    if text.startswith("$"):
        match = _TOPIC_LEVEL.fullmatch(text)
        if match is None:
            raise ValueError(f"source {text!r}: `$` starts a topic level such as $topic[2]")
        return TopicLevel(int(match.group(1)))
    return PayloadPath(dotted(text, "source"))


@dataclass(frozen=True, slots=True)
class MappedField:
    target: str
    target_parts: tuple[str, ...]
    source_text: str
    source: FieldSource


class Unmappable(Exception):
    """A message that cannot become a MesMessage; the argument is the reason."""


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, with its article: `an array`, `a string`..."""
    match value:
        case dict():
            return "an object"
        case list():
            return "an array"
        case str():
            return "a string"
        case bool():
            return "a boolean"
        case None:
            return "null"
        case int():
            return "an integer"
        case _:
            return "a decimal number"


def lookup(document: Any, parts: tuple[str, ...]) -> Any:
    """The value at `parts` in `document`; raises KeyError(reason) when it is not there."""
    value = document
    for depth, part in enumerate(parts):
        if isinstance(value, dict):
            if part not in value:
                raise KeyError(f"the payload has no {'.'.join(parts[: depth + 1])!r}")
            value = value[part]
        elif isinstance(value, list) and part.isdigit():
            if int(part) >= len(value):
                where = ".".join(parts[:depth]) or "the payload"
                raise KeyError(f"{where!r} has only {len(value)} items")
            value = value[int(part)]
        else:
            where = ".".join(parts[:depth])
            raise KeyError(f"{where!r} is {json_kind(value)}, not an object")
    return value
