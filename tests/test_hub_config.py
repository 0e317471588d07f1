"""The hub's settings without a server: subject patterns and key tokens, the jetstream
destination's validation, hub.yaml's errors with file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.config.errors import ConfigError
from edge.config.loader import parse_config
from edge.hub.config import load_hub_config
from edge.hub.stream import stream_config
from edge.hub.subjects import SubjectPattern, key_token
from tests.processes import run_process

ROOT = Path(__file__).resolve().parents[1]

PLANT = """\
site: "1010"
data_dir: /tmp/plantsync
destinations:
  hub:
    base_url: {url}
    profile: jetstream
    jetstream: {jetstream}
routes:
  production.confirmation: [hub]
"""


def plant(url: str = "nats://127.0.0.1:4222", jetstream: str = "{}") -> list[str]:
    try:
        parse_config(PLANT.format(url=url, jetstream=jetstream), "plant.yaml", {"T": "tok"})
    except ConfigError as exc:
        return exc.problems
    return []


def test_a_good_jetstream_destination_loads() -> None:
    assert plant() == []
    assert plant("tls://hub.example:4222", "{auth: {type: token, token: '${T}'}}") == []


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("plantsync.{site}.{type}", "must end with {key}"),
        ("{site}.{type}.{key}", "must start with a literal token"),
        ("plant sync.{key}", "token 1 of 'plant sync.{key}'"),
        ("plantsync.{key}.{key}", "{key} appears more than once"),
        ("plantsync.*.{key}", "token 2"),
    ],
)
def test_a_bad_subject_pattern_is_refused_with_the_reason(subject: str, expected: str) -> None:
    (problem,) = plant(jetstream=f"{{subject: '{subject}'}}")
    assert problem.startswith("plant.yaml:7: destinations.hub.jetstream.subject: ")
    assert expected in problem


def test_the_url_scheme_must_fit_the_profile_and_auth_goes_under_jetstream() -> None:
    (problem,) = plant("https://hub.example")
    assert "profile jetstream takes a nats:// or tls:// base_url" in problem
    text = PLANT.format(url="nats://127.0.0.1:4222", jetstream="{}").replace(
        "    profile: jetstream\n", "    profile: jetstream\n    auth: {type: bearer, token: x}\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "plant.yaml", {})
    assert "credentials go under jetstream.auth" in caught.value.problems[0]


def test_a_hub_token_over_plain_nats_off_this_box_is_refused() -> None:
    (problem,) = plant("nats://hub.example:4222", "{auth: {type: token, token: '${T}'}}")
    assert "NATS token would cross the network in cleartext to hub.example" in problem
    assert plant("tls://hub.example:4222", "{auth: {type: token, token: '${T}'}}") == []


def test_subjects_and_partition_transform_from_the_pattern() -> None:
    pattern = SubjectPattern.parse("plantsync.{site}.{type}.{key}")
    assert pattern.subject(
        site="1010", event_type="production.confirmation", key="000001000123"
    ) == ("plantsync.1010.production_confirmation.000001000123")
    assert pattern.partition_transform(8) == (
        "plantsync.*.*.*",
        "plantsync.{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}.{{partition(8,3)}}",
    )
    assert pattern.partition_filter(5) == "plantsync.*.*.*.5"


@pytest.mark.parametrize(
    "key", ["order/4711", "a.b", "x*y>z", "two words", "100%", "Müller", "tab\there", ""]
)
def test_a_key_is_one_valid_subject_token(key: str) -> None:
    token = key_token(key)
    # NATS subject tokens: no dot, wildcard, whitespace or control character, not empty.
    assert token and not any(c in token for c in ".*> \t\r\n")
    assert all(" " < c <= "~" for c in token)


def test_different_keys_give_different_tokens() -> None:
    keys = ["a.b", "a%2Eb", "a_b", "a b", "a%20b", "ab"]
    assert len({key_token(k) for k in keys}) == len(keys)


def test_the_example_hub_config_loads_and_builds_an_r3_partitioned_stream() -> None:
    config = load_hub_config(ROOT / "config" / "hub.example.yaml")
    stream = stream_config(config.stream)
    assert stream.num_replicas == 3 and stream.subjects == ["plantsync.*.*.*"]
    assert stream.subject_transform is not None
    assert stream.subject_transform.dest.endswith("{{partition(8,3)}}")


def test_hub_yaml_problems_name_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "hub.yaml"
    path.write_text(
        "nats:\n  servers: [http://x]\nstream:\n  partitions: 0\n  replica: 3\n"
        "destinations:\n  erp: {base_url: 'http://127.0.0.1:1'}\n"
        "routes:\n  production.confirmaton: [erp]\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_hub_config(path)
    text = "\n".join(caught.value.problems)
    assert f"{path}:2: nats.servers: " in text and "not a NATS server URL" in text
    assert f"{path}:4: stream.partitions: " in text
    assert f"{path}:5: stream.replica: unknown key" in text


@pytest.mark.integration
def test_systemd_analyze_accepts_the_relay_unit(tmp_path: Path) -> None:
    import shutil
    import sys

    from tests.conftest import missing_peer

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        missing_peer("systemd-analyze is not installed (apt-get install systemd)")
    unit = (ROOT / "systemd" / "plantsync-relay@.service").read_text()
    binary = Path(sys.executable).with_name("plantsync")
    copy = tmp_path / "plantsync-relay@1.service"
    copy.write_text(
        unit.replace("/opt/plantsync/bin/plantsync", str(binary)).replace(
            "/etc/plantsync/hub.yaml", str(ROOT / "config" / "hub.example.yaml")
        )
    )
    done = run_process([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    complaints = [
        line for line in (done.stdout + done.stderr).splitlines() if "plantsync-relay" in line
    ]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr
    assert "plantsync relay --config" in unit and "hub init --config" in unit
