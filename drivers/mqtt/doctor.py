"""`plantsync doctor mqtt`: reads a broker's `$SYS` figures (and, when given, its mosquitto.conf)
and says which of the settings MES events rely on (persistence, queue limits, autosave, a
persistence directory the broker can write) are missing, with the line to change.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from drivers.mqtt.client import set_credentials
from drivers.mqtt.config import BROKER_VERSION_TOPIC, CONNECT_TIMEOUT, QUEUE_ADVICE, MqttConfig

BROKER_DEFAULTS: Final[dict[str, str]] = {
    "persistence": "false",
    "autosave_interval": "1800",
    "autosave_on_changes": "false",
    "max_queued_messages": "1000",
    "max_queued_bytes": "0",
    "max_inflight_messages": "20",
    "persistent_client_expiration": "",
    "user": "mosquitto",
}
"""mosquitto 2.x's defaults for the settings the doctor checks (mosquitto.conf(5))."""


@dataclass
class Finding:
    """One line of the doctor's report: `ok`, `info` or a `problem` with what to do."""

    level: Literal["ok", "info", "problem"]
    text: str


def read_sys_tree(config: MqttConfig, wait: float) -> dict[str, str]:
    """Connect as a client of its own (a clean session: never the gateway's, which it would
    take over), read the broker's `$SYS` tree for `wait` seconds and return it by topic.
    Raises OSError or RuntimeError with the reason when the broker cannot be read."""
    figures: dict[str, str] = {}
    connected = threading.Event()
    refused: list[str] = []
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"plantsync-doctor-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5 if config.protocol == "5" else mqtt.MQTTv311,
    )

    def on_connect(
        client: mqtt.Client, userdata: Any, flags: Any, code: ReasonCode, properties: Any
    ) -> None:
        if code.is_failure:
            refused.append(f"the broker refused the connection ({code})")
        else:
            client.subscribe("$SYS/#", 0)
        connected.set()

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        figures[message.topic] = bytes(message.payload).decode("utf-8", "replace")

    client.on_connect = on_connect
    client.on_message = on_message
    set_credentials(client, config)
    client.connect(config.host, config.port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(CONNECT_TIMEOUT):
            raise RuntimeError(f"no CONNACK within {CONNECT_TIMEOUT:g}s")
        if refused:
            raise RuntimeError(refused[0])
        time.sleep(wait)
    finally:
        client.disconnect()
        client.loop_stop()
    return figures


def read_broker_config(path: Path) -> dict[str, str]:
    """The settings of a mosquitto.conf (the last of each wins), without its listeners."""
    settings: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        words = line.strip().split(None, 1)
        if words and not words[0].startswith("#"):
            settings[words[0]] = words[1].strip() if len(words) > 1 else ""
    return settings


def diagnose(figures: dict[str, str], settings: dict[str, str] | None) -> list[Finding]:
    """What the broker's `$SYS` tree (and its mosquitto.conf, when given) tell of the queue
    limits and persistence the gateway relies on."""
    found: list[Finding] = []
    version = figures.get(BROKER_VERSION_TOPIC)
    if not figures:
        found.append(
            Finding(
                "problem",
                "the broker sent no $SYS figures: it does not publish "
                "them (sys_interval 0) or its ACL hides $SYS/# from this user; "
                "dropped messages cannot be watched by the gateway",
            )
        )
    else:
        found.append(
            Finding(
                "info",
                f"broker: {version or 'version not published'}, up "
                f"{figures.get('$SYS/broker/uptime', '?')}",
            )
        )

    def number(topic: str) -> float | None:
        with contextlib.suppress(ValueError, IndexError, KeyError):
            return float(figures[topic].split()[0])
        return None

    dropped = number("$SYS/broker/publish/messages/dropped")
    if dropped is not None and dropped > 0:
        found.append(
            Finding(
                "problem",
                f"the broker has dropped {int(dropped)} message(s) since "
                "it started: a client's queue was full (max_queued_messages or "
                f"max_queued_bytes); if the gateway was that client, MES events "
                f"are lost; {QUEUE_ADVICE}",
            )
        )
    elif dropped is not None:
        found.append(Finding("ok", "the broker has dropped no message since it started"))
    uptime = number("$SYS/broker/uptime")
    offline = number("$SYS/broker/clients/disconnected")
    if uptime is not None and offline is not None and offline > 0:
        found.append(
            Finding(
                "ok" if uptime < 3600 else "info",
                f"the broker holds {int(offline)} session(s) of disconnected "
                f"clients, {int(uptime)} s after its start"
                + (": they survived the start, so persistence works" if uptime < 3600 else ""),
            )
        )
    if settings is None:
        found.append(
            Finding(
                "info",
                "queue limit and persistence settings are not in $SYS: "
                "run on the broker's host with --broker-config "
                "/etc/mosquitto/mosquitto.conf to check them",
            )
        )
        return found
    found.extend(check_broker_settings(settings))
    return found


def check_broker_settings(settings: dict[str, str]) -> list[Finding]:
    """The mosquitto.conf settings the gateway relies on, each as ok or a problem with the fix
    (README, "MQTT broker settings")."""
    value = {**BROKER_DEFAULTS, **settings}
    found: list[Finding] = []
    if "include_dir" in settings:
        found.append(
            Finding(
                "info",
                f"settings in include_dir {settings['include_dir']} are "
                "not read here; check them too",
            )
        )
    if value["persistence"] != "true":
        found.append(
            Finding(
                "problem",
                "persistence is off: a broker restart loses the "
                "gateway's session and every message queued for it; set "
                "persistence true",
            )
        )
    else:
        location = Path(value.get("persistence_location") or "/var/lib/mosquitto/")
        user = value["user"]
        found.append(_writable_by(location, user))
        if value["autosave_on_changes"] != "true" and float(value["autosave_interval"]) > 60:
            found.append(
                Finding(
                    "problem",
                    f"autosave_interval {value['autosave_interval']} s: "
                    "a broker crash loses what arrived since the last save; set "
                    "autosave_interval 100 with autosave_on_changes true (save "
                    "after every 100 changes)",
                )
            )
        else:
            found.append(
                Finding(
                    "ok",
                    f"autosave_interval {value['autosave_interval']}, "
                    f"autosave_on_changes {value['autosave_on_changes']}",
                )
            )
    queued = int(value["max_queued_messages"])
    if queued != 0:
        found.append(
            Finding(
                "problem",
                f"max_queued_messages {queued}: beyond {queued} "
                "messages queued for the gateway the broker drops the rest "
                f"without telling anyone; {QUEUE_ADVICE}",
            )
        )
    elif int(value["max_queued_bytes"]) == 0:
        found.append(
            Finding(
                "info",
                "max_queued_messages 0 and max_queued_bytes 0: no limit "
                "at all; set max_queued_bytes to what the broker may hold",
            )
        )
    else:
        found.append(
            Finding("ok", f"max_queued_messages 0, max_queued_bytes {value['max_queued_bytes']}")
        )
    if not value["persistent_client_expiration"]:
        found.append(
            Finding(
                "info",
                "persistent_client_expiration is not set: MQTT 3.1.1 "
                "sessions never expire (MQTT 5 ones after the gateway's "
                "session_expiry)",
            )
        )
    return found


def _writable_by(location: Path, user: str) -> Finding:
    import pwd

    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return Finding(
            "info", f"persistence_location {location}: no user {user!r} here to check it against"
        )
    try:
        status = location.stat()
    except OSError as exc:
        return Finding(
            "problem",
            f"persistence_location {location} cannot be read "
            f"({exc.strerror}): create it, owned by {user}",
        )
    if account.pw_uid == 0:
        writable = True
    elif status.st_uid == account.pw_uid:
        writable = bool(status.st_mode & 0o200)
    elif status.st_gid == account.pw_gid:
        writable = bool(status.st_mode & 0o020)
    else:
        writable = bool(status.st_mode & 0o002)
    if not writable:
        return Finding(
            "problem",
            f"persistence_location {location} is not writable by the "
            f"broker's user {user}: mosquitto only logs the failed save, and a "
            f"restart loses every session; chown {user} {location}",
        )
    return Finding("ok", f"persistence_location {location} is writable by {user}")


def doctor(config: MqttConfig, broker_config: Path | None, wait: float) -> tuple[int, str]:
    """`plantsync doctor mqtt` for one driver: the exit status and the report."""
    lines = [f"MQTT broker {config.name} at {config.host}:{config.port}"]
    try:
        figures = read_sys_tree(config, wait)
    except (OSError, ValueError, RuntimeError) as exc:
        return 1, "\n".join([*lines, f"problem: cannot read the broker: {exc}"])
    settings = None
    if broker_config is not None:
        try:
            settings = read_broker_config(broker_config)
        except OSError as exc:
            lines.append(f"problem: cannot read {broker_config}: {exc.strerror}")
    findings = diagnose(figures, settings)
    lines += [f"{finding.level}: {finding.text}" for finding in findings]
    return (1 if any(f.level == "problem" for f in findings) else 0), "\n".join(lines)
