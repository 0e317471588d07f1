"""What a config reload changes, said in the technician's words.

A reload (SIGHUP) applies a valid new config only when it differs from the running one by
value: `same_value` compares settings (secrets by their values) and ignores what a running
driver caches in a model's private attributes; `describe_changes` names every changed setting,
one line each, never its value (some are secrets). The reload itself, an internal restart on the
same open outbox, is `edge.runtime.daemon`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, SecretStr

from buffer.outbox import DestinationCounts
from edge.config.models import PlantConfig


def describe_changes(
    old: PlantConfig, new: PlantConfig, held: Mapping[str, DestinationCounts] | None = None
) -> list[str]:
    """What a reload changes, one line each, naming settings but never their values (some
    are secrets)."""
    changes: list[str] = []
    for name in PlantConfig.model_fields:
        before, after = getattr(old, name), getattr(new, name)
        if same_value(before, after):
            continue
        match name:
            case "drivers":
                changes += _named_changes(
                    "driver", {d.name: d for d in before}, {d.name: d for d in after}
                )
            case "machines":
                changes += _named_changes(
                    "machine", {m.id: m for m in before}, {m.id: m for m in after}
                )
            case "destinations":
                changes += _named_changes("destination", before, after)
                for gone in sorted(set(before) - set(after)):
                    counts = (held or {}).get(gone)
                    if counts is not None and (counts.pending or counts.dead):
                        changes.append(
                            f"the outbox keeps the {counts.pending} undelivered and "
                            f"{counts.dead} dead event(s) of removed destination "
                            f"{gone}"
                        )
            case "routes":
                changes += _named_changes("route of", before, after)
            case _:
                fields = _changed_fields(before, after)
                changes.append(f"{name} changed" + (f" ({', '.join(fields)})" if fields else ""))
    return changes


def _named_changes(kind: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    changes = [f"{kind} {name} added" for name in after if name not in before]
    changes += [f"{kind} {name} removed" for name in before if name not in after]
    for name in before:
        if name in after and not same_value(before[name], after[name]):
            fields = _changed_fields(before[name], after[name])
            changes.append(f"{kind} {name} changed" + (f" ({', '.join(fields)})" if fields else ""))
    return changes


def _changed_fields(before: Any, after: Any) -> list[str]:
    if not isinstance(before, BaseModel) or type(before) is not type(after):
        return []
    return [
        name
        for name in type(before).model_fields
        if not same_value(getattr(before, name), getattr(after, name))
    ]


def same_value(before: Any, after: Any) -> bool:
    """Equal as settings. A model's `==` also compares its private attributes, which a running
    driver fills (the MQTT driver's topic-match cache): the config it runs on then differs from
    the same file loaded again. The settings alone are compared, secrets by their values."""
    return bool(_settings(before) == _settings(after))


def _settings(value: Any) -> Any:
    match value:
        case BaseModel():
            return (
                type(value),
                {name: _settings(getattr(value, name)) for name in type(value).model_fields},
            )
        case list() | tuple():
            return [_settings(item) for item in value]
        case dict():
            return {key: _settings(item) for key, item in value.items()}
        case SecretStr():
            return ("secret", value.get_secret_value())
    return value
