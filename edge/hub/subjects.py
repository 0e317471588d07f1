"""Hub subjects: where a plant's event lands in the hub stream, and how the stream partitions.

A subject pattern is dot-separated tokens, each a literal (letters, digits, `_`, `-`) or one
placeholder: `{site}` (the plant code), `{type}` (the event type with `.` written `_`, so it
is one token: `production_confirmation`) and `{key}` (the event's partition key, the order or
lot). `{key}` is required and comes last: the stream's subject transform appends a partition
token computed from it with NATS's deterministic `partition(n, i)` mapping, so every event of
one key lands in one partition, and each partition has its own consumers.

A key is any text; NATS subject tokens cannot hold `.`, `*`, `>`, whitespace or control
characters, so those (and `%`, the escape, and anything beyond ASCII) are written `%XX` per
UTF-8 byte: the same key always gives the same token, and the token reads back to the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PLACEHOLDERS = ("{site}", "{type}", "{key}")
_LITERAL = re.compile(r"[A-Za-z0-9_-]+")
_SAFE = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_/:=+@#!$&'()[]{},;~^|<>?"
)
_UNSAFE_KEY = frozenset(".*>")


def key_token(key: str) -> str:
    """The partition key as one subject token (escaped as the module says)."""
    out = []
    for char in key:
        if char in _SAFE and char not in _UNSAFE_KEY:
            out.append(char)
        else:
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
    return "".join(out) or "%00"


def type_token(event_type: str) -> str:
    return event_type.replace(".", "_")


@dataclass(frozen=True)
class SubjectPattern:
    """A validated pattern; `parse` raises ValueError saying what is wrong."""

    tokens: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> SubjectPattern:
        tokens = tuple(text.split("."))
        for position, token in enumerate(tokens, 1):
            if token in PLACEHOLDERS:
                if tokens.count(token) > 1:
                    raise ValueError(f"{token} appears more than once in {text!r}")
            elif not _LITERAL.fullmatch(token):
                raise ValueError(
                    f"token {position} of {text!r} ({token!r}) is neither a literal (letters, "
                    "digits, _ and -) nor one of " + ", ".join(PLACEHOLDERS)
                )
        if tokens[-1] != "{key}":
            raise ValueError(
                f"{text!r} must end with {{key}}: the hub partitions by the "
                "event's key (order, lot), e.g. plantsync.{site}.{type}.{key}"
            )
        if tokens[0] in PLACEHOLDERS:
            raise ValueError(
                f"{text!r} must start with a literal token (e.g. plantsync), so "
                "the hub stream's subjects do not catch other traffic"
            )
        return cls(tokens)

    def __str__(self) -> str:
        return ".".join(self.tokens)

    def subject(self, *, site: str, event_type: str, key: str) -> str:
        values = {
            "{site}": key_token(site),
            "{type}": type_token(event_type),
            "{key}": key_token(key),
        }
        return ".".join(values.get(token, token) for token in self.tokens)

    @property
    def filter(self) -> str:
        """The stream's subject filter: every placeholder a `*`."""
        return ".".join("*" if t in PLACEHOLDERS else t for t in self.tokens)

    def partition_transform(self, partitions: int) -> tuple[str, str]:
        """(source, destination) of the stream's subject transform: the subject as published,
        with the partition number of its key appended as one more token."""
        wildcards = [t for t in self.tokens if t in PLACEHOLDERS]
        numbered = iter(range(1, len(wildcards) + 1))
        dest = [
            f"{{{{wildcard({next(numbered)})}}}}" if t in PLACEHOLDERS else t for t in self.tokens
        ]
        key_position = wildcards.index("{key}") + 1
        return self.filter, ".".join([*dest, f"{{{{partition({partitions},{key_position})}}}}"])

    def partition_filter(self, partition: int) -> str:
        """Stored subjects of one partition (a consumer's filter)."""
        return f"{self.filter}.{partition}"
