"""Reading the plant's YAML configuration, with error messages a technician can act on.

`load_config(path)` reads the YAML (keeping the line of every key), substitutes `${ENV_VAR}`
references, validates against `PlantConfig`, then checks cross references (signals name a
configured driver tag, routes name a known event type and a configured destination). Every
problem becomes one line `plant.yaml:14: drivers[0].tags[2].type: must be one of ...`, and all of
them are raised together in one `ConfigError`. Nothing here does network or disk I/O beyond
reading the file: an unreachable device is the drivers' business, at run time.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
)

from edge.config.base import Strict
from edge.config.checks import cross_check, doubts, rec20_units
from edge.config.document import Document, read_config_text, read_document
from edge.config.errors import ConfigError, Loc, Problem, format_loc
from edge.config.models import ApiConfig, LocalAccess, PlantConfig


def _data_loc(data: Any, loc: Sequence[Any]) -> Loc:
    """Drop the union tags pydantic inserts into error paths (e.g. `modbus` in
    `drivers.0.modbus.tags`) so the path matches what the technician wrote."""
    clean: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, list) and isinstance(part, int):
            clean.append(part)
            node = node[part] if part < len(node) else None
        elif isinstance(node, dict):
            if part in node:
                clean.append(part)
                node = node[part]
            elif node.get("type") == part or not isinstance(part, str) or "[" in part:
                continue  # discriminator tag or pydantic's type label, not a key of the file
            else:
                clean.append(part)
                node = None
        elif isinstance(part, str) and ("[" in part or part.startswith("function-")):
            continue
        else:
            clean.append(part)
            node = None
    return tuple(clean)


def _model_at(loc: Loc, data: Any) -> type[BaseModel] | None:
    """The config model that describes the mapping at `loc`, to suggest field names."""
    annotation: Any = PlantConfig
    node = data
    for part in loc:
        annotation = _pick_model(annotation, node)
        if isinstance(part, int) or (annotation is None):
            args = typing.get_args(annotation) if annotation is not None else ()
            annotation = args[-1] if args else None
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part)
            annotation = field.annotation if field else None
        else:  # dict[str, X]
            args = typing.get_args(annotation)
            annotation = args[-1] if args else None
        node = (
            node.get(part)
            if isinstance(node, dict)
            else (
                node[part]
                if isinstance(node, list) and isinstance(part, int) and part < len(node)
                else None
            )
        )
    annotation = _pick_model(annotation, node)
    return (
        annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    )


def _pick_model(annotation: Any, node: Any) -> Any:
    """Unwrap Annotated/Optional/unions down to the member that matches `node`'s `type`."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        for model in models:
            tag = model.model_fields.get("type")
            if (
                tag is not None
                and isinstance(node, dict)
                and node.get("type") in typing.get_args(tag.annotation)
            ):
                return model
        return models[0] if len(models) == 1 else (members[0] if len(members) == 1 else annotation)
    return annotation


def _is_type_tag(loc: Loc, data: Any) -> bool:
    """True when `loc` is a `type` that selects a kind of section (`type: modbus`), as
    opposed to a setting that happens to be called type (a tag's `type: uint32`)."""
    model = _model_at(loc[:-1], data)
    field = model.model_fields.get("type") if model is not None else None
    return field is not None and len(typing.get_args(field.annotation)) == 1


def _message(error: Mapping[str, Any], loc: Loc, data: Any) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}".replace(" or ", ", ")
    if kind == "union_tag_invalid":
        return f"type must be one of {ctx.get('expected_tags', '')}"
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1], data)
        hint = ""
        if model is not None:
            close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
            hint = (
                f" (did you mean {close[0]!r}?)"
                if close
                else (f" (known keys: {', '.join(model.model_fields)})")
            )
        return f"unknown key{hint}"
    if kind == "missing":
        return "is required"
    text = str(error["msg"]).removeprefix("Value error, ")
    return text[:1].lower() + text[1:]


def parse_config(
    text: str,
    filename: str = "<config>",
    environ: Mapping[str, str] | None = None,
    *,
    offline: bool = False,
) -> PlantConfig:
    """Validate YAML text; raise ConfigError with every problem, one line each. `offline`
    checks everything but the values of `${ENV}`, `${file:...}` and `${cred:...}`, which it
    does not resolve (`plantsync check --offline`, in a shell without the plant's secrets)."""
    return _validated(
        read_document(text, filename, os.environ if environ is None else environ, offline=offline),
        filename,
    )


def _validated(document: Document, filename: str) -> PlantConfig:
    problems = list(document.problems)
    notices = list(rec20_units(document.data))
    config: PlantConfig | None = None
    if not isinstance(document.data, dict):
        problems.append(Problem((), "the file must be a mapping of settings (site: ..., ...)"))
    else:
        try:
            config = PlantConfig.model_validate(document.data)
        except ValidationError as exc:
            found = [(_data_loc(document.data, e["loc"]), e) for e in exc.errors()]
            # A section whose `type` is wrong gets that one message, not one per field that
            # the wrong type's model happens to miss.
            bad_types = {
                loc[:-1]
                for loc, e in found
                if loc
                and loc[-1] == "type"
                and e["type"] == "literal_error"
                and _is_type_tag(loc, document.data)
            }
            # A mapping with a merge key is missing what the merge would have brought: its
            # one problem is the merge key.
            merged = {p.loc[:-1] for p in document.problems if p.loc[-1:] == ("<<",)}
            for loc, error in found:
                if any(loc[: len(p)] == p and loc != (*p, "type") for p in bad_types):
                    continue
                if any(loc[: len(m)] == m for m in merged):
                    continue
                problems.append(Problem(loc, _message(error, loc, document.data)))
    if config is not None:
        problems.extend(cross_check(config))
    if document.unresolved:  # offline: what a reference would give cannot be judged
        problems = [
            p for p in problems if not any(p.loc[: len(at)] == at for at in document.unresolved)
        ]
    if problems:
        lines = sorted({(document.line_of(p.loc), format_loc(p.loc), p.message) for p in problems})
        raise ConfigError([f"{filename}:{line}: {where}: {what}" for line, where, what in lines])
    if config is None:
        # Offline, a placeholder where a reference stands did not fit its field (a URL, a
        # port): every other setting was checked, but no whole config can be built to
        # cross-check. What the check can still say, it says from the raw settings.
        return PlantConfig.model_construct(**document.data)
    config._warnings = [
        f"{filename}:{document.line_of(loc)}: {format_loc(loc)}: {message}"
        for loc, message in [*notices, *doubts(config)]
    ]
    return config


def load_config(
    path: str | Path, environ: Mapping[str, str] | None = None, *, offline: bool = False
) -> PlantConfig:
    """Read and validate a config file; raise ConfigError naming file, line and field."""
    path = Path(path)
    return parse_config(read_config_text(path), str(path), environ, offline=offline)


def unresolved_references(path: str | Path) -> list[str]:
    """The `${...}` references an offline check leaves unresolved, in file order."""
    path = Path(path)
    document = read_document(read_config_text(path), str(path), {}, offline=True)
    found = sorted(
        (document.line_of(loc), ref) for loc, refs in document.unresolved.items() for ref in refs
    )
    return [ref for _, ref in found]


def load_local_access(path: str | Path, environ: Mapping[str, str] | None = None) -> LocalAccess:
    """`api`, `data_dir` and `site` of a config file, whatever the rest holds; ConfigError
    (file:line: field: message) only for problems in those."""
    path = Path(path)
    filename = str(path)
    document = read_document(
        read_config_text(path), filename, os.environ if environ is None else environ, offline=False
    )
    data = document.data if isinstance(document.data, dict) else {}
    used = ("api", "data_dir", "site")
    problems = [p for p in document.problems if p.loc and p.loc[0] in used]

    class _Local(Strict):
        model_config = ConfigDict(extra="ignore", frozen=True)
        api: ApiConfig = Field(default_factory=ApiConfig)  # type: ignore[arg-type]
        data_dir: Path = PlantConfig.model_fields["data_dir"].default
        site: str | None = None

    local: _Local | None = None
    try:
        local = _Local.model_validate({k: data[k] for k in used if k in data})
    except ValidationError as exc:
        for error in exc.errors():
            loc = _data_loc(data, error["loc"])
            problems.append(Problem(loc, _message(error, loc, data)))
    if problems or local is None:
        lines = sorted({(document.line_of(p.loc), format_loc(p.loc), p.message) for p in problems})
        raise ConfigError([f"{filename}:{line}: {where}: {what}" for line, where, what in lines])
    return LocalAccess(local.api, local.data_dir, local.site)
