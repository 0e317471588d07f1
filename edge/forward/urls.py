"""Outbound URLs built from parts, never by pasting text into a path.

Every id that goes into a URL the gateway sends (lot, order, inspection lot, event id) comes
from outside: an MES message, a QMS answer, a local API caller. Pasted into an f-string, a lot
id of `../../admin/users?q=` becomes a different request on the target host, sent with the
gateway's credentials. So paths are joined from segments that are each percent-encoded whole
(`/` inside an id is `%2F`, never a separator), a segment that a server would read as a dot
segment is refused, and OData string literals are quoted by OData's rule (a `'` doubled) and
then percent-encoded with spaces as `%20` (SAP's gateway does not read `+` as a space in
`$filter`).
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

# Kept readable in a query: OData's own punctuation; everything else is percent-encoded.
_QUERY_SAFE = "$'(),:"


class UnsafeUrlPart(ValueError):
    """A value that cannot be put into a URL segment at all (empty, a dot segment, or NUL)."""


def segment(value: str) -> str:
    """One path segment, percent-encoded whole."""
    if value in ("", ".", "..") or "\x00" in value:
        raise UnsafeUrlPart(f"{value!r} cannot be a URL path segment")
    return quote(value, safe="")


def path(*parts: str, prefix: str = "") -> str:
    """`prefix` (a fixed, trusted path such as an OData service root) followed by each of
    `parts` as one encoded segment: `path("lots", lot_id, "disposition")`."""
    encoded = "/".join(segment(part) for part in parts)
    return f"{prefix.rstrip('/')}/{encoded}" if prefix else encoded


def odata_string(value: str) -> str:
    """An OData V2 string literal: `'it''s'`."""
    if "\x00" in value:
        raise UnsafeUrlPart(f"{value!r} cannot be an OData literal")
    return "'" + value.replace("'", "''") + "'"


def query(params: Mapping[str, str]) -> str:
    """A query string, each name and value percent-encoded with spaces as `%20`."""
    return "&".join(
        f"{quote(name, safe='$')}={quote(value, safe=_QUERY_SAFE)}"
        for name, value in params.items()
    )
