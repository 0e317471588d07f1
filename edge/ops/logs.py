"""Logging for a daemon under systemd: JSON lines on stdout (journald keeps them), or plain text
for a person at a terminal. Structured fields passed with `extra=` (event_id, order_id, lot_id,
destination, driver) appear as JSON keys.

Secrets never reach the log: `redact(values)` gives the handler the config's secret values, and
every line is scrubbed of them (a peer that echoes a token in an error body, a library that puts
a password in an exception) before it is written. The values live on the handler's formatter,
not in a module global.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import Literal

LogFormat = Literal["json", "text"]

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


REDACTED = "[redacted]"


class RedactingFormatter(logging.Formatter):
    """A formatter that replaces known secret values in whatever it writes."""

    secrets: tuple[str, ...] = ()

    def format(self, record: logging.LogRecord) -> str:
        return self.scrub(self.render(record))

    def render(self, record: logging.LogRecord) -> str:
        return super().format(record)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


class JsonFormatter(RedactingFormatter):
    def render(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and value is not None and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


def setup_logging(fmt: LogFormat = "json", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            RedactingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library chatter (pymodbus retries, httpx per request) is theirs; ours says what matters.
    for noisy in ("pymodbus", "httpx", "httpcore", "asyncua", "uvicorn"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # These two log every lost connection with a traceback; the drivers say it once, better.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)


def redact(secrets: Iterable[str]) -> None:
    """Scrub these values from every line the handlers set up here write (longest first, so a
    secret that contains another is replaced whole)."""
    # JSON lines escape quotes, backslashes and non-ASCII: scrub the escaped form as well.
    forms = {form for s in secrets if s for form in (s, json.dumps(s)[1:-1])}
    values = tuple(sorted(forms, key=len, reverse=True))
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, RedactingFormatter):
            handler.formatter.secrets = values
