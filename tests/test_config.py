"""Config loading: the example documents every option, and every mistake names file:line:field."""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from edge.config.errors import ConfigError
from edge.config.loader import load_config, parse_config
from edge.config.models import PlantConfig
from tests.processes import run_process

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "plant.example.yaml"
ENV = {"ERP_TOKEN": "t0ken"}

GOOD = """\
site: "1010"
data_dir: /tmp/plantsync
drivers:
  - name: press-01
    type: modbus
    host: 127.0.0.1
    tags:
      - {name: good, address: 0, type: uint32}
machines:
  - id: press-01
    signals: {good: press-01.good}
    order: {order_id: "42"}
destinations:
  erp: {base_url: "http://127.0.0.1:1", auth: {type: bearer, token: "${ERP_TOKEN}"}}
routes:
  production.confirmation: [erp]
"""


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "plant.yaml", ENV if environ is None else environ)
    return caught.value.problems


def test_example_and_demo_configs_load(tmp_path: Path) -> None:
    (tmp_path / "erp_client_secret").write_text("s3cret\n")
    environ = {
        **ENV,
        "FILLER_OPCUA_PASSWORD": "x",
        "MES_MQTT_PASSWORD": "y",
        "CREDENTIALS_DIRECTORY": str(tmp_path),
    }
    example = load_config(EXAMPLE, environ)
    secret = example.destinations["erp"].auth.client_secret  # type: ignore[union-attr]
    assert secret.get_secret_value() == "s3cret"  # read from the credential, newline dropped
    assert example.site == "1010"
    assert example.machines[0].confirm.every == 900
    demo = load_config(ROOT / "config" / "demo.yaml", {})
    assert demo.drivers[0].port == 5020


def _unwrap(annotation: Any) -> tuple[str, list[Any]]:
    """How a field's value nests: ("model", [M]), ("union", [M1, M2...]) for a discriminated
    union of models, ("list"/"map", [inner]), or ("leaf", [])."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Annotated:
        return _unwrap(args[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model", [annotation]
    if origin in (list, tuple, set, frozenset):
        return "list", [args[0]] if args else []
    if origin is dict:
        return "map", [args[1]]
    if origin in (typing.Union, types.UnionType):
        models = [
            a
            for a in (_unwrap(a)[1][0] if _unwrap(a)[0] == "model" else None for a in args)
            if a is not None
        ]
        if len(models) > 1:
            return "union", models
        if len(models) == 1:
            return "model", models
    return "leaf", []


def _variant(member: type[BaseModel]) -> str:
    (tag,) = typing.get_args(member.model_fields["type"].annotation)
    return str(tag)


def _option_paths(
    model: type[BaseModel], prefix: str, found: set[str], skip: frozenset[str] = frozenset()
) -> None:
    """Every option the models know, as a dotted path: `drivers[mqtt].keepalive`,
    `destinations.*.auth[oauth2_client_credentials].token_url` (a list adds nothing, a map
    adds `*`, a union member adds its `type`; the `type` that chooses it is one option of the
    union, `drivers.type`)."""
    for name, field in model.model_fields.items():
        if (field.alias or name) in skip:
            continue
        path = f"{prefix}{field.alias or name}"
        found.add(path)
        _nested_paths(field.annotation, path, found)


def _nested_paths(annotation: Any, path: str, found: set[str]) -> None:
    kind, inner = _unwrap(annotation)
    match kind:
        case "model":
            _option_paths(inner[0], f"{path}.", found)
        case "union":
            found.add(f"{path}.type")
            for member in inner:
                _option_paths(member, f"{path}[{_variant(member)}].", found, frozenset({"type"}))
        case "list":
            if inner:
                _nested_paths(inner[0], path, found)
        case "map":
            _nested_paths(inner[0], f"{path}.*", found)


def _written_paths(
    model: type[BaseModel],
    data: Any,
    prefix: str,
    found: set[str],
    skip: frozenset[str] = frozenset(),
) -> None:
    """The dotted paths the example file sets, read the way the models read it."""
    if not isinstance(data, dict):
        return
    fields = {field.alias or name: field for name, field in model.model_fields.items()}
    for key, value in data.items():
        if key not in fields or key in skip:
            continue
        path = f"{prefix}{key}"
        found.add(path)
        _written_nested(fields[key].annotation, value, path, found)


def _written_nested(annotation: Any, value: Any, path: str, found: set[str]) -> None:
    kind, inner = _unwrap(annotation)
    match kind:
        case "model":
            _written_paths(inner[0], value, f"{path}.", found)
        case "union":
            members = {_variant(m): m for m in inner}
            if isinstance(value, dict) and value.get("type") in members:
                found.add(f"{path}.type")
                member = members[value["type"]]
                _written_paths(
                    member, value, f"{path}[{value['type']}].", found, frozenset({"type"})
                )
        case "list":
            for item in value if isinstance(value, list) and inner else ():
                _written_nested(inner[0], item, path, found)
        case "map":
            for item in value.values() if isinstance(value, dict) else ():
                _written_nested(inner[0], item, f"{path}.*", found)


def test_example_names_every_option_the_models_know() -> None:
    """Issue 18 item 8: by dotted path, so an option is documented where it applies (a new
    `timeout` of the MQTT driver is not covered by the Modbus driver's `timeout`)."""
    options: set[str] = set()
    _option_paths(PlantConfig, "", options)
    written: set[str] = set()
    _written_paths(PlantConfig, yaml.safe_load(EXAMPLE.read_text()), "", written)
    assert options - written == set(), "document these options in config/plant.example.yaml"
    # The walk itself reaches deep, distinct paths (a walk that stopped at the top would make
    # the comparison above empty and meaningless).
    assert {
        "drivers[modbus].tags.address",
        "drivers[mqtt].keepalive",
        "destinations.*.auth[oauth2_client_credentials].token_url",
    } <= options


def test_secrets_come_from_the_environment_and_are_not_printed() -> None:
    config = parse_config(GOOD, "plant.yaml", {"ERP_TOKEN": "s3cret"})
    auth = config.destinations["erp"].auth
    assert auth.token.get_secret_value() == "s3cret"  # type: ignore[union-attr]
    assert "s3cret" not in repr(config) and "s3cret" not in str(config.model_dump())
    assert problems(GOOD, {}) == [
        "plant.yaml:14: destinations.erp.auth.token: environment variable ERP_TOKEN is not set"
    ]
    with_default = GOOD.replace("${ERP_TOKEN}", "${ERP_TOKEN:-fallback}")
    token = parse_config(with_default, "p", {}).destinations["erp"].auth.token  # type: ignore[union-attr]
    assert token.get_secret_value() == "fallback"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("    host: 127.0.0.1\n", "    host: 127.0.0.1\n    poll_intervall: 1s\n"),
            "plant.yaml:7: drivers[0].poll_intervall: unknown key (did you mean 'poll_interval'?)",
        ),
        (
            ("type: uint32}", "type: uint33}"),
            "plant.yaml:8: drivers[0].tags[0].type: must be one of 'uint16', 'int16', 'uint32', "
            "'int32', 'float32'",
        ),
        (
            ("address: 0", "address: zero"),
            "plant.yaml:8: drivers[0].tags[0].address: input should be a valid integer",
        ),
        (
            ("    type: modbus\n", "    type: profibus\n"),
            "plant.yaml:4: drivers[0]: type must be one of 'modbus', 'opcua', 'mqtt'",
        ),
        (('site: "1010"\n', ""), "plant.yaml:1: site: is required"),
        (
            ("press-01.good}", "press-01.goood}"),
            "plant.yaml:11: machines[0].signals.good: no driver tag named 'press-01.goood' "
            "(did you mean 'press-01.good'?)",
        ),
        (
            ("production.confirmation: [erp]", "production.confirmations: [erp]"),
            "plant.yaml:16: routes.production.confirmations: unknown event type "
            "(did you mean 'production.confirmation'?)",
        ),
        (
            ("production.confirmation: [erp]", "production.confirmation: [qms]"),
            "plant.yaml:16: routes.production.confirmation[0]: no destination named 'qms'",
        ),
        (
            ('order: {order_id: "42"}', 'order: {order_id: "42"}\n    confirm: {every: soon}'),
            "plant.yaml:13: machines[0].confirm.every: 'soon' is not a duration",
        ),
        (
            ("data_dir: /tmp/plantsync\n", 'data_dir: /tmp/plantsync\nsite: "2020"\n'),
            "plant.yaml:3: site: duplicate key",
        ),
        (
            (
                '  erp: {base_url: "http://127.0.0.1:1"',
                '  "": {base_url: "http://127.0.0.1:2"}\n  erp: {base_url: "http://127.0.0.1:1"',
            ),
            "plant.yaml:13: destinations: destination name '' must be printable text",
        ),
    ],
)
def test_each_mistake_names_file_line_and_field(change: tuple[str, str], expected: str) -> None:
    old, new = change
    assert old in GOOD
    found = problems(GOOD.replace(old, new))
    assert any(p.startswith(expected) for p in found), found


def test_all_problems_are_reported_at_once() -> None:
    text = GOOD.replace("type: uint32}", "type: uint33}").replace("address: 0", "address: -1")
    text = text.replace('site: "1010"', 'site: "10-10"')
    assert len(problems(text)) == 3


def test_broken_yaml_names_the_line() -> None:
    (problem,) = problems("site: '1010'\ndrivers: [\n  - {name: x\n")
    assert problem.startswith("plant.yaml:") and "not valid YAML" in problem


@pytest.mark.integration
def test_plantsync_check_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("type: uint32}", "type: uint33}"))
    env = {"ERP_TOKEN": "x", "PATH": "/usr/bin:/bin"}
    ok = run_process(
        [sys.executable, "-m", "edge.cli", "check", "--config", str(good)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert ok.returncode == 0 and "OK" in ok.stdout
    failed = run_process(
        [sys.executable, "-m", "edge.cli", "check", "--config", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert failed.returncode == 1
    assert f"{bad}:8: drivers[0].tags[0].type: must be one of" in failed.stderr
    missing = run_process(
        [sys.executable, "-m", "edge.cli", "check", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert missing.returncode == 1 and "cannot read the config file" in missing.stderr


@pytest.mark.integration
def test_plantsync_schema_writes_every_event_type(tmp_path: Path) -> None:
    import json

    from edge.model.events import EVENT_MODELS

    done = run_process(
        [sys.executable, "-m", "edge.cli", "schema", "--out", str(tmp_path / "schemas")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    names = {p.name for p in (tmp_path / "schemas").iterdir()}
    assert {m.schema_file_name() for m in EVENT_MODELS.values()} | {"cloudevent.json"} == names
    schema = json.loads((tmp_path / "schemas" / "production.confirmation.v1.json").read_text())
    assert "yield_quantity" in schema["properties"]


@pytest.mark.integration
def test_check_says_what_each_machine_counts_and_notes_the_changed_meaning(tmp_path: Path) -> None:
    """`processed` with `defective` now means PackML's processed (good + defective); an old
    config that meant good units by it still loads, and `check` says what it takes and how to
    keep the old meaning."""
    packml = GOOD.replace(
        "      - {name: good, address: 0, type: uint32}\n",
        "      - {name: good, address: 0, type: uint32}\n"
        "      - {name: bad, address: 2, type: uint32}\n"
        "      - {name: state, address: 10}\n",
    )
    old_style = tmp_path / "old.yaml"
    old_style.write_text(
        packml.replace(
            "signals: {good: press-01.good}",
            "signals: {processed: press-01.good, defective: press-01.bad, state: press-01.state}\n"
            "    state_map: {6: Execute, 11: Held}",
        )
    )
    env = {"ERP_TOKEN": "x", "PATH": "/usr/bin:/bin"}
    done = run_process(
        [sys.executable, "-m", "edge.cli", "check", "--config", str(old_style)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert (
        "machine press-01: yield = processed - defective (press-01.good - press-01.bad); "
        "scrap = defective (press-01.bad); state changes wait 0s for the counters"
    ) in done.stdout
    assert "note: press-01.good must count good and defective units" in done.stdout
    assert "name it `good`" in done.stdout
    renamed = tmp_path / "new.yaml"
    renamed.write_text(
        packml.replace(
            "signals: {good: press-01.good}",
            "signals: {good: press-01.good, defective: press-01.bad}",
        )
    )
    done = run_process(
        [sys.executable, "-m", "edge.cli", "check", "--config", str(renamed)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert "yield = good (press-01.good); scrap = defective (press-01.bad)" in done.stdout
    assert "note:" not in done.stdout


@pytest.mark.parametrize(
    ("signals", "expected"),
    [
        (
            "{defective: press-01.good}",
            "name the machine's counter: good (good units only) or processed",
        ),
        (
            "{good: press-01.good, processed: press-01.good, defective: press-01.good}",
            "good, processed and defective: name two of them",
        ),
    ],
)
def test_counters_must_say_what_they_count(signals: str, expected: str) -> None:
    found = problems(GOOD.replace("signals: {good: press-01.good}", f"signals: {signals}"))
    assert any(
        p.startswith("plant.yaml:11: machines[0].signals: ") and expected in p for p in found
    ), found
