"""Where the config's secrets are, so that they never show and never sit in a file others read.

`secret_values(config)` lists every secret the loaded config holds (tokens, client secrets,
passwords: every `SecretStr` field that is set), for the log redaction. `exposed_secrets(path,
config)` warns about files that hold a secret and that group or others may read (the config
file itself when a secret is written in it literally, and every `${file:PATH}` a secret is read
from), and about secrets a section allows to cross the network without TLS
(`allow_insecure: true`; without it such a config is refused). A secret given through
`${ENV_VAR}` or `${cred:NAME}` (systemd's LoadCredential=, which only the service's user can
read) puts nothing in a file, so the file's mode does not matter.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr

from edge.config.checks import cleartext_secrets
from edge.config.destinations import DestinationConfig
from edge.config.errors import Loc, format_loc
from edge.config.models import PlantConfig
from edge.hub.settings import NatsCredentials, NatsNKey

_FILE_REF = re.compile(r"\$\{file:([^}]+)\}")

MIN_REDACTED_LENGTH = 4
"""Shorter secrets are not redacted from text: they would blank out ordinary words."""


def _secrets(value: Any, loc: Loc) -> Iterator[tuple[Loc, SecretStr]]:
    match value:
        case SecretStr():
            if value.get_secret_value():
                yield loc, value
        case BaseModel():
            for name, field in type(value).model_fields.items():
                yield from _secrets(getattr(value, name), (*loc, field.alias or name))
        case list() | tuple():
            for index, item in enumerate(value):
                yield from _secrets(item, (*loc, index))
        case dict():
            for key, item in value.items():
                yield from _secrets(item, (*loc, str(key)))


def secret_values(config: PlantConfig) -> set[str]:
    """Every secret value the config holds (long enough to be told apart from plain words)."""
    return {
        secret.get_secret_value()
        for _, secret in _secrets(config, ())
        if len(secret.get_secret_value()) >= MIN_REDACTED_LENGTH
    }


def _raw_at(data: Any, loc: Loc) -> Any:
    for part in loc:
        found = (isinstance(data, dict) and part in data) or (
            isinstance(data, list) and isinstance(part, int) and part < len(data)
        )
        if not found:
            return None
        data = data[part]
    return data


def _readable_by(mode: int) -> str | None:
    group, others = bool(mode & stat.S_IRGRP), bool(mode & stat.S_IROTH)
    if group and others:
        return "group and others"
    return "group" if group else ("others" if others else None)


def exposed_secrets(path: Path, config: PlantConfig) -> list[str]:
    """One warning per file that holds a secret and is readable beyond its owner."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    literal: list[str] = []
    referenced: dict[Path, list[str]] = {}
    for loc, _secret in _secrets(config, ()):
        written = _raw_at(raw, loc)
        if not isinstance(written, str):
            continue
        if "${" not in written:
            literal.append(format_loc(loc))
        for file in _FILE_REF.findall(written):
            referenced.setdefault(Path(file), []).append(format_loc(loc))
    for loc, key_file in _nats_key_files(config):
        referenced.setdefault(key_file, []).append(format_loc(loc))
    warnings = []
    if literal:
        warning = _check_mode(path, f"holds secrets written in it ({', '.join(literal)})")
        if warning:
            warnings.append(
                warning + "; make it readable by its owner only (chmod 0600), or "
                "move the secrets out with ${cred:NAME} (systemd LoadCredential=) "
                "or ${ENV_VAR}"
            )
    for file, fields in sorted(referenced.items()):
        warning = _check_mode(file, f"holds the secret of {', '.join(fields)}")
        if warning:
            warnings.append(warning + "; make it readable by its owner only (chmod 0600)")
    for loc, what, host in cleartext_secrets(config):  # refused unless allowed: these are
        warnings.append(
            f"{format_loc(loc)}: {what} cross the network in cleartext to "
            f"{host} (allow_insecure: true); anyone on the path can read them"
        )
    return warnings


def _nats_key_files(config: PlantConfig) -> Iterator[tuple[Loc, Path]]:
    """The hub's NKey seed and creds files: secrets named by path, not by reference."""
    for name, destination in config.destinations.items():
        if not isinstance(destination, DestinationConfig) or destination.profile != "jetstream":
            continue
        auth = destination.jetstream.auth
        at: Loc = ("destinations", name, "jetstream", "auth")
        if isinstance(auth, NatsNKey):
            yield (*at, "seed_file"), auth.seed_file
        elif isinstance(auth, NatsCredentials):
            yield (*at, "file"), auth.file


def _check_mode(path: Path, what: str) -> str | None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    readers = _readable_by(mode)
    if readers is None:
        return None
    return f"{path} {what} and is readable by {readers} (mode {stat.S_IMODE(mode):04o})"


def scrub(data: Any, secrets: set[str] | frozenset[str]) -> Any:
    """`data` (plain JSON-able values) with every secret value replaced, wherever it occurs in
    a string: for what the API and the CLI show, which may quote a peer's error text."""
    if not secrets:
        return data
    match data:
        case str():
            for secret in sorted(secrets, key=len, reverse=True):
                if secret in data:
                    data = data.replace(secret, "[redacted]")
            return data
        case dict():
            return {key: scrub(value, secrets) for key, value in data.items()}
        case list() | tuple():
            return [scrub(item, secrets) for item in data]
    return data
