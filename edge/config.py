"""The plant's YAML configuration: models, loading, and error messages a technician can act on.

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
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from drivers.modbus import ModbusConfig
from edge.model import BUILTIN_UOM_CODES, EVENT_MODELS
from edge.timing import Duration

Loc = tuple[str | int, ...]

# One member today; OPC UA and MQTT join as `Annotated[A | B | C, Field(discriminator="type")]`.
DriverConfig = ModbusConfig

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
SIGNAL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*\.[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiConfig(Strict):
    listen: str = Field(
        "127.0.0.1:8470",
        description="host:port of the local API (/healthz, /readyz, /metrics). Loopback by "
        "default: the API is for this box and its plant systems, not the internet.",
        pattern=r"^[^:\s]+:\d{1,5}$",
    )
    token: SecretStr | None = Field(
        None,
        description="Token that API calls which change something (retry, purge) must carry "
        "as `Authorization: Bearer ...`. Without one, the daemon makes a random token at each "
        "start and writes it to data_dir/api-token (readable by its user only), where the "
        "plantsync CLI on this box finds it.",
    )

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


    @field_validator("token")
    @classmethod
    def _empty_is_none(cls, token: SecretStr | None) -> SecretStr | None:
        return token if token is not None and token.get_secret_value() else None


class OutboxConfig(Strict):
    commit_interval: Duration = Field(
        0.0,
        description="Linger: longest time a commit waits for others to share its transaction. "
        "0 commits at once whatever has queued, and what arrives meanwhile shares the next "
        "transaction (group commit without added latency); a few ms helps on slow SD cards.",
    )
    commit_max_rows: int = Field(
        500, ge=1, le=100_000, description="Most events committed in one transaction."
    )
    max_size: ByteSize = Field(
        ByteSize(2_000_000_000),
        description="Disk budget of the outbox (e.g. 500MB, 2GB). When it is reached, "
        "informational events are refused (and counted) and business events wait: drivers "
        "stop taking input until deliveries free space. Nothing business is dropped.",
    )
    journal_retention: Duration = Field(
        30 * 86400.0,
        description="How long the audit journal keeps a row per delivered event (id, type, "
        "destination, time, attempts, status, receiver's reference), and how long a "
        "delivered id is still recognised as a duplicate.",
    )


class OrderBinding(Strict):
    """A fixed order for a machine, for plants (and demos) without MES order events."""

    order_id: str = Field(description="ERP production order number.", min_length=1)
    operation: str = Field(
        "0010", description="Operation (activity) number, four digits.", pattern=r"^\d{4}$"
    )
    material: str | None = Field(None, description="Material number produced.")
    lot_id: str | None = Field(None, description="Lot (batch) being produced.")


class MachineSignals(Strict):
    processed: str = Field(
        description="`driver.tag` of the accumulating good-count counter.",
        pattern=SIGNAL_PATTERN,
        examples=["press-01.good"],
    )
    defective: str | None = Field(
        None, description="`driver.tag` of the accumulating scrap counter.",
        pattern=SIGNAL_PATTERN,
    )
    state: str | None = Field(
        None, description="`driver.tag` of the numeric machine state.", pattern=SIGNAL_PATTERN
    )


class ConfirmPolicy(Strict):
    every_units: int | None = Field(
        100, ge=1, description="Confirm each time this many good units have been counted."
    )
    every: Duration | None = Field(
        None,
        description="Also confirm whatever was counted, at most this long after the last "
        "confirmation (so a slow line still reports).",
    )
    uom: str = Field("C62", description="UN/ECE Rec 20 unit of the counted units.")

    @model_validator(mode="after")
    def _some_trigger(self) -> ConfirmPolicy:
        if self.every_units is None and self.every is None:
            raise ValueError("set every_units, every, or both: otherwise nothing is confirmed")
        return self


class MachineConfig(Strict):
    id: str = Field(description="Machine id, as ERP and MES know it.", pattern=NAME_PATTERN)
    line: str | None = Field(None, description="Line or work center the machine belongs to.")
    signals: MachineSignals
    order: OrderBinding | None = Field(
        None, description="Fixed order binding; without it, counts are unassigned production."
    )
    confirm: ConfirmPolicy = Field(default_factory=ConfirmPolicy)  # type: ignore[arg-type]
    counter_width: Literal[16, 32, 64] = Field(
        32, description="Bits of the counters, for rollover: a counter that wraps keeps counting."
    )


class NoAuth(Strict):
    type: Literal["none"] = "none"


class BearerAuth(Strict):
    type: Literal["bearer"]
    token: SecretStr = Field(description="Bearer token; write `${ENV_VAR}`, never the token.")


class ApiKeyAuth(Strict):
    type: Literal["api_key"]
    header: str = Field("X-API-Key", description="Header that carries the key.")
    key: SecretStr = Field(description="API key; write `${ENV_VAR}`, never the key.")


Auth = Annotated[NoAuth | BearerAuth | ApiKeyAuth, Field(discriminator="type")]


class RetryPolicy(Strict):
    base: Duration = Field(1.0, description="First retry waits up to this long (full jitter).")
    cap: Duration = Field(300.0, description="Longest wait between two attempts.")


class DestinationConfig(Strict):
    base_url: str = Field(description="Base URL of the API.", pattern=r"^https?://")
    profile: Literal["canonical"] = Field(
        "canonical", description="How events are shaped for this target."
    )
    path: str = Field("/events", description="Path under base_url that takes one event.")
    timeout: Duration = Field(10.0, description="Timeout of one request.")
    max_in_flight: int = Field(
        4, ge=1, le=64, description="Requests in flight at once. Keep it small: ERP APIs and "
        "HTTP clients both degrade with many concurrent requests."
    )
    auth: Auth = Field(default_factory=NoAuth)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)  # type: ignore[arg-type]


class PlantConfig(Strict):
    site: str = Field(description="Plant code, as ERP knows it.", pattern=r"^[A-Za-z0-9]{1,10}$")
    data_dir: Path = Field(
        Path("/var/lib/plantsync"), description="Where the outbox database lives."
    )
    api: ApiConfig = Field(default_factory=ApiConfig)  # type: ignore[arg-type]
    shutdown_timeout: Duration = Field(
        10.0, description="Longest a stop waits for in-flight deliveries before leaving them "
        "in the outbox for the next start.")
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)  # type: ignore[arg-type]
    uom_codes: list[str] = Field(
        default_factory=list,
        description="Units of measure accepted on top of the built-in UN/ECE Rec 20 list.",
    )
    drivers: list[DriverConfig] = Field(default_factory=list)
    machines: list[MachineConfig] = Field(default_factory=list)
    destinations: dict[str, DestinationConfig] = Field(default_factory=dict)
    routes: dict[str, list[str]] = Field(
        default_factory=dict, description="Event type to the destinations that receive it."
    )

    @field_validator("uom_codes")
    @classmethod
    def _uom_format(cls, codes: list[str]) -> list[str]:
        for code in codes:
            if not re.fullmatch(r"[A-Z0-9]{2,3}", code):
                raise ValueError(f"{code!r} is not a UN/ECE Rec 20 code (2 or 3 letters/digits)")
        return codes

    @property
    def all_uom_codes(self) -> frozenset[str]:
        return BUILTIN_UOM_CODES | frozenset(self.uom_codes)

    @property
    def database_path(self) -> Path:
        return self.data_dir / "outbox.db"

    def destinations_for(self, event_type: str) -> list[str]:
        return self.routes.get(event_type, [])


class ConfigError(Exception):
    """A config file that cannot be used; `problems` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


# ---------------------------------------------------------------------------------------------
# YAML with line numbers


class _Problem(Exception):
    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Document:
    """YAML turned into plain data, remembering the line of each key and list item."""

    def __init__(self, text: str, environ: Mapping[str, str]) -> None:
        self.lines: dict[Loc, int] = {}
        self.problems: list[_Problem] = []
        self._environ = environ
        self._scalars = yaml.SafeLoader("")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        self.data: Any = {} if root is None else self._build(root, ())

    def _build(self, node: yaml.Node, loc: Loc) -> Any:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            mapping: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = self._scalars.construct_object(key_node)
                key = str(key)
                child = (*loc, key)
                self.lines[child] = key_node.start_mark.line + 1
                if key in mapping:
                    self.problems.append(_Problem(child, "duplicate key"))
                mapping[key] = self._build(value_node, child)
            return mapping
        if isinstance(node, yaml.SequenceNode):
            return [self._build(item, (*loc, i)) for i, item in enumerate(node.value)]
        value = self._scalars.construct_object(node)
        if isinstance(value, str) and "${" in value:
            value = self._substitute(value, loc)
        return value

    def _substitute(self, text: str, loc: Loc) -> str:
        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in self._environ:
                return self._environ[name]
            if default is not None:
                return default
            self.problems.append(_Problem(loc, f"environment variable {name} is not set"))
            return ""

        return _ENV_REF.sub(replace, text)

    def line_of(self, loc: Loc) -> int:
        for end in range(len(loc), -1, -1):
            line = self.lines.get(loc[:end])
            if line is not None:
                return line
        return 1


def format_loc(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


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
        node = node.get(part) if isinstance(node, dict) else (
            node[part] if isinstance(node, list) and isinstance(part, int)
            and part < len(node) else None)
    annotation = _pick_model(annotation, node)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) \
        else None


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
            if tag is not None and isinstance(node, dict) and node.get("type") in typing.get_args(
                tag.annotation
            ):
                return model
        return models[0] if len(models) == 1 else (members[0] if len(members) == 1
                                                   else annotation)
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
            hint = f" (did you mean {close[0]!r}?)" if close else (
                f" (known keys: {', '.join(model.model_fields)})")
        return f"unknown key{hint}"
    if kind == "missing":
        return "is required"
    text = str(error["msg"]).removeprefix("Value error, ")
    return text[:1].lower() + text[1:]


def _cross_check(config: PlantConfig) -> Iterator[_Problem]:
    tags = {f"{d.name}.{t.name}" for d in config.drivers for t in d.tags}
    names: dict[str, int] = {}
    for i, driver in enumerate(config.drivers):
        if driver.name in names:
            yield _Problem(("drivers", i, "name"), f"driver {driver.name!r} is defined twice")
        names[driver.name] = i
    machine_ids: set[str] = set()
    for i, machine in enumerate(config.machines):
        if machine.id in machine_ids:
            yield _Problem(("machines", i, "id"), f"machine {machine.id!r} is defined twice")
        machine_ids.add(machine.id)
        for key, signal in machine.signals.model_dump().items():
            if signal is not None and signal not in tags:
                known = difflib.get_close_matches(signal, sorted(tags), n=1)
                hint = f" (did you mean {known[0]!r}?)" if known else ""
                yield _Problem(("machines", i, "signals", key),
                               f"no driver tag named {signal!r}{hint}")
        if machine.confirm.uom not in config.all_uom_codes:
            yield _Problem(("machines", i, "confirm", "uom"),
                           f"{machine.confirm.uom!r} is not a known UN/ECE Rec 20 unit code; "
                           "add it to uom_codes if your ERP uses it")
    for event_type, destinations in config.routes.items():
        if event_type not in EVENT_MODELS:
            close = difflib.get_close_matches(event_type, list(EVENT_MODELS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            yield _Problem(("routes", event_type), f"unknown event type{hint}")
        for j, name in enumerate(destinations):
            if name not in config.destinations:
                yield _Problem(("routes", event_type, j),
                               f"no destination named {name!r} under destinations")


def parse_config(
    text: str, filename: str = "<config>", environ: Mapping[str, str] | None = None
) -> PlantConfig:
    """Validate YAML text; raise ConfigError with every problem, one line each."""
    try:
        document = _Document(text, os.environ if environ is None else environ)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError([f"{filename}:{line}: not valid YAML: {exc.problem or exc}"]) from None
    problems = list(document.problems)
    config: PlantConfig | None = None
    if not isinstance(document.data, dict):
        problems.append(_Problem((), "the file must be a mapping of settings (site: ..., ...)"))
    else:
        try:
            config = PlantConfig.model_validate(document.data)
        except ValidationError as exc:
            found = [(_data_loc(document.data, e["loc"]), e) for e in exc.errors()]
            # A section whose `type` is wrong gets that one message, not one per field that
            # the wrong type's model happens to miss.
            bad_types = {loc[:-1] for loc, e in found
                         if loc and loc[-1] == "type" and e["type"] == "literal_error"
                         and _is_type_tag(loc, document.data)}
            for loc, error in found:
                if any(loc[:len(p)] == p and loc != (*p, "type") for p in bad_types):
                    continue
                problems.append(_Problem(loc, _message(error, loc, document.data)))
    if config is not None:
        problems.extend(_cross_check(config))
    if problems:
        lines = sorted(
            {(document.line_of(p.loc), format_loc(p.loc), p.message) for p in problems}
        )
        raise ConfigError([f"{filename}:{line}: {where}: {what}" for line, where, what in lines])
    assert config is not None
    return config


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> PlantConfig:
    """Read and validate a config file; raise ConfigError naming file, line and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the config file: {exc.strerror}"]) from None
    return parse_config(text, str(path), environ)
