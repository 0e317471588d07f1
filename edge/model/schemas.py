"""JSON Schema export of the data models and the envelope, so that ERP and QMS teams can check
payloads without reading Python. The one place in the model that does I/O (`write_schemas`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from edge.model.envelope import CLOUDEVENT_VERSION, CloudEvent
from edge.model.events import EVENT_MODELS

__all__ = [
    "json_schemas",
    "write_schemas",
]


SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"

CLOUDEVENT_SCHEMA_FILE: Final = "cloudevent.json"


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schemas by file name: one per data model (`<type>.v<version>.json`) and the envelope."""
    schemas: dict[str, dict[str, Any]] = {}
    for model in EVENT_MODELS.values():
        schemas[model.schema_file_name()] = {
            "$schema": SCHEMA_DIALECT,
            "$id": model.dataschema(),
            **model.model_json_schema(),
        }
    schemas[CLOUDEVENT_SCHEMA_FILE] = {
        "$schema": SCHEMA_DIALECT,
        "$id": f"urn:plantsync:schema:cloudevent:{CLOUDEVENT_VERSION}",
        **CloudEvent.model_json_schema(),
    }
    return schemas


def write_schemas(directory: Path) -> list[Path]:
    """Write every schema of `json_schemas` into `directory` (created if missing) as pretty JSON
    with sorted keys; return the paths written, sorted."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for file_name, schema in sorted(json_schemas().items()):
        path = directory / file_name
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(path)
    return written
