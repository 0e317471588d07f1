"""Exceptions by role: conditions a person must act on, raised once when they begin and
cleared once when they end, each sent to the roles the config routes its kind to.

An exception has a kind (`dead_letter`, `outage`, `held_lot`, `missing_inspection`,
`unresolved_nonconformance`, `blocked_order`, `unknown_order`, `reconciliation_mismatch`), a
subject (what it is about, in words: `event <id> to erp`, `destination erp`, `lot L1`,
`order 1000123`), a text, correlation ids (event, order, lot, MES message, destination) and
the command that inspects it. The board keeps them in the operations database
(`data_dir/ops.db`): at most one open exception per kind and subject, so a condition that
persists is raised once, however often it is seen, and a restart does not raise it again.

Two ways in. Conditions the gateway can see for itself are *level-triggered*: the watch
(`ExceptionWatch`) looks every `exceptions.check_every` and hands each kind's current set to
`sync`, which raises what is new and clears what is gone (dead letters, outages past
`outage_after`, lots on hold, produced lots without a disposition past
`missing_inspection_after`, nonconformances whose lot has no disposition yet). Conditions
another part of the gateway knows of are *edge-triggered*: it calls `raise_exception` and
`clear_exception` (order release: blocked and unknown orders; reconciliation: mismatches).

Channels, per role: the local API (`GET /exceptions`, every role), webhooks and an MQTT topic.
A webhook is a destination of the existing delivery engine: each raise and each clear is
committed to the outbox as a CloudEvent (`com.plantsync.edge.exception.raised.v1` /
`...cleared.v1`, id derived from kind, subject and raise time), so it is retried, ordered per
exception, dead-lettered and journalled like any delivery. The MQTT topic gets the same JSON at
QoS 1 through a client of its own. A raise or clear counts as handed on only when the broker
acknowledged it (PUBACK); until then the board keeps it due in its database and tries again
every `MQTT_RETRY` seconds, also after a restart. So nothing is lost to a broker that is away
or a gateway that stops; a subscriber may see one twice (the same CloudEvent id), when a PUBACK
was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from buffer.outbox import Outbox, OutboxEvent
from drivers.common.availability import Availability
from drivers.mqtt import MqttConfig, set_credentials
from drivers.mqtt.pubacks import Pubacks
from edge.config.models import PlantConfig
from edge.model.ids import EVENT_ID_NAMESPACE
from edge.ops.settings import EXCEPTION_KINDS, ExceptionKind

log = logging.getLogger(__name__)

RAISED_TYPE = "com.plantsync.edge.exception.raised.v1"
CLEARED_TYPE = "com.plantsync.edge.exception.cleared.v1"
NOTIFY_PRIORITY = 1

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS exceptions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        roles TEXT NOT NULL,
        text TEXT NOT NULL,
        correlation TEXT NOT NULL,
        inspect TEXT,
        raised_at REAL NOT NULL,
        cleared_at REAL,
        cleared_because TEXT,
        notified TEXT NOT NULL DEFAULT 'none'
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS exceptions_open ON exceptions(kind, subject)"
    " WHERE cleared_at IS NULL",
    "CREATE INDEX IF NOT EXISTS exceptions_by_time ON exceptions(raised_at)",
)


@dataclass(frozen=True, slots=True)
class Condition:
    """What is wrong now, as a watch or a caller sees it."""

    subject: str
    text: str
    correlation: Mapping[str, str] = field(default_factory=dict)
    inspect: str | None = None


def create_tables(db: sqlite3.Connection) -> None:
    for statement in _SCHEMA:
        db.execute(statement)


def _row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    found = {column[0]: value for column, value in zip(cursor.description, row, strict=True)}
    found["roles"] = json.loads(found["roles"])
    found["correlation"] = json.loads(found["correlation"])
    found["state"] = "open" if found["cleared_at"] is None else "closed"
    return found


def listing(
    db: sqlite3.Connection, state: str = "all", since: float = 0.0, limit: int = 200
) -> list[dict[str, Any]]:
    """Exceptions newest first: `open`, `closed` or `all`; closed ones since `since`."""
    where = {"open": "cleared_at IS NULL", "closed": "cleared_at IS NOT NULL", "all": "1"}[state]
    cursor = db.execute(
        f"SELECT id, kind, subject, roles, text, correlation, inspect, raised_at, cleared_at,"
        f" cleared_because, notified FROM exceptions WHERE {where} AND"
        f" (cleared_at IS NULL OR cleared_at >= ?) ORDER BY id DESC LIMIT ?",
        (since, limit),
    )
    return [_row(cursor, row) for row in cursor.fetchall()]


MQTT_RETRY = 5.0
"""Seconds between tries of exceptions an MQTT broker has not acknowledged."""
PUBACK_WAIT = 10.0
"""Seconds to wait for the broker's PUBACK before a publication counts as not handed on."""
QUEUE_BOUND = 1000
"""At most this many publications waiting in paho's memory (the database keeps the rest)."""


class MqttChannel:
    """Publishes exceptions of one role to an MQTT topic, at QoS 1, through its own client."""

    def __init__(self, driver: MqttConfig, topic: str) -> None:
        self.topic = topic
        self.connected = False
        self.pubacks = Pubacks()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"plantsync-exceptions-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5 if driver.protocol == "5" else mqtt.MQTTv311,
        )
        set_credentials(self.client, driver)
        self.client.reconnect_delay_set(1, int(driver.reconnect_max_delay) or 30)
        self.host, self.port = driver.host, driver.port
        # paho reconnects by itself; the shared piece says once when the broker goes and once
        # when it is back (from paho's thread: two log lines and a flag).
        self.availability = Availability(
            f"MQTT broker {driver.host}:{driver.port} for exceptions on {topic}", log
        )
        self._stopping = False
        self.client.max_queued_messages_set(QUEUE_BOUND)
        self.client.on_connect = self._connected
        self.client.on_disconnect = self._disconnected
        self.client.on_publish = self.pubacks.on_publish

    def _connected(
        self, client: mqtt.Client, userdata: Any, flags: Any, code: Any, properties: Any
    ) -> None:
        if code.is_failure:
            self.availability.lost(f"the broker refused the connection ({code})")
        else:
            self.connected = True
            self.availability.back()

    def _disconnected(
        self, client: mqtt.Client, userdata: Any, flags: Any, code: Any, properties: Any
    ) -> None:
        self.connected = False
        if not self._stopping:  # our own disconnect at a stop is no outage
            self.availability.lost(
                f"disconnected ({code}); exceptions wait in the database until it is back"
            )

    def start(self) -> None:
        # paho's own loop thread reconnects; what it had not sent is tried again by the board.
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()

    async def publish(self, document: Mapping[str, Any]) -> bool:
        """True once the broker acknowledged the document; False when it is away, refused it
        or sent no PUBACK within PUBACK_WAIT (the caller tries again later)."""
        if not self.connected:
            return False
        self.pubacks.bind()
        info = self.client.publish(self.topic, json.dumps(document, default=str), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        try:
            async with asyncio.timeout(PUBACK_WAIT):
                return not (await self.pubacks.wait(info.mid)).is_failure
        except TimeoutError:
            return False

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()


class ExceptionBoard:
    """Call order: construct, `start()` (channels), then `raise_exception`, `clear_exception`
    and `sync` from anywhere in the event loop, `run()` as a task (it hands raises and clears to
    the channels), `stop()`."""

    def __init__(
        self, config: PlantConfig, db: sqlite3.Connection, outbox: Outbox | None = None
    ) -> None:
        self.config = config
        self.db = db
        self.outbox = outbox
        create_tables(db)
        self._wake = asyncio.Event()
        self.raised: dict[str, int] = dict.fromkeys(EXCEPTION_KINDS, 0)
        self.cleared: dict[str, int] = dict.fromkeys(EXCEPTION_KINDS, 0)
        self.mqtt: dict[str, MqttChannel] = {}
        self.unpublished = 0
        """Raises and clears an MQTT broker has not acknowledged yet, at the last notify."""
        self._committed: set[tuple[int, str]] = set()
        """(exception, step) whose webhook copy is in the outbox while MQTT still owes it."""
        drivers = {d.name: d for d in config.drivers if isinstance(d, MqttConfig)}
        for role, channels in config.exceptions.roles.items():
            if channels.mqtt is not None and channels.mqtt.driver in drivers:
                self.mqtt[role] = MqttChannel(drivers[channels.mqtt.driver], channels.mqtt.topic)

    def roles_for(self, kind: ExceptionKind) -> list[str]:
        return list(self.config.exceptions.routes.get(kind, []))

    # -- raise and clear ---------------------------------------------------------------------

    def raise_exception(
        self, kind: ExceptionKind, condition: Condition, now: float | None = None
    ) -> bool:
        """Raise unless an exception of this kind and subject is open; True if raised."""
        at = time.time() if now is None else now
        roles = self.roles_for(kind)
        try:
            self._write(
                "INSERT INTO exceptions(kind, subject, roles, text, correlation, inspect,"
                " raised_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    kind,
                    condition.subject,
                    json.dumps(roles),
                    condition.text,
                    json.dumps(dict(condition.correlation)),
                    condition.inspect,
                    at,
                ),
            )
        except sqlite3.IntegrityError:
            return False  # open already: raised once
        self.raised[kind] += 1
        log.warning(
            "Exception raised for %s: %s: %s",
            ", ".join(roles) or "no role",
            condition.subject,
            condition.text,
            extra={"exception_kind": kind, **dict(condition.correlation)},
        )
        self._wake.set()
        return True

    def clear_exception(
        self, kind: ExceptionKind, subject: str, because: str = "it ended", now: float | None = None
    ) -> bool:
        """Clear the open exception of this kind and subject; True if one was open."""
        at = time.time() if now is None else now
        changed = self._write(
            "UPDATE exceptions SET cleared_at = ?, cleared_because = ? WHERE kind = ? AND"
            " subject = ? AND cleared_at IS NULL",
            (at, because, kind, subject),
        )
        if not changed:
            return False
        self.cleared[kind] += 1
        log.info(
            "Exception cleared: %s (%s): %s", subject, kind, because, extra={"exception_kind": kind}
        )
        self._wake.set()
        return True

    def sync(
        self, kind: ExceptionKind, current: Sequence[Condition], now: float | None = None
    ) -> None:
        """Level-triggered kinds: raise each condition not open yet, clear each open one that
        is no longer among `current`."""
        seen = {condition.subject for condition in current}
        for condition in current:
            self.raise_exception(kind, condition, now)
        for (subject,) in self.db.execute(
            "SELECT subject FROM exceptions WHERE kind = ? AND cleared_at IS NULL", (kind,)
        ).fetchall():
            if subject not in seen:
                self.clear_exception(kind, subject, "the condition ended", now)

    def open_exceptions(self) -> list[dict[str, Any]]:
        return listing(self.db, "open", limit=1000)

    def open_counts(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(EXCEPTION_KINDS, 0)
        for kind, count in self.db.execute(
            "SELECT kind, COUNT(*) FROM exceptions WHERE cleared_at IS NULL GROUP BY kind"
        ):
            counts[kind] = count
        return counts

    def _write(self, statement: str, parameters: tuple[Any, ...]) -> int:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            changed = self.db.execute(statement, parameters).rowcount
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        return int(changed)

    # -- channels -----------------------------------------------------------------------------

    def start(self) -> None:
        for channel in self.mqtt.values():
            channel.start()

    def stop(self) -> None:
        for channel in self.mqtt.values():
            channel.stop()

    async def run(self) -> None:
        """Hand every raise and clear not yet handed on to its roles' channels, until
        cancelled (also those a crash left: the outbox ignores an id it holds)."""
        while True:
            await self.notify()
            # What an MQTT broker has not acknowledged is due again after MQTT_RETRY.
            timeout = MQTT_RETRY if self.unpublished else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()

    async def notify(self) -> int:
        due = self.db.execute(
            "SELECT id, kind, subject, roles, text, correlation, inspect, raised_at,"
            " cleared_at, cleared_because, notified FROM exceptions WHERE notified = 'none'"
            " OR (notified = 'raised' AND cleared_at IS NOT NULL) ORDER BY id"
        )
        rows = [_row(due, row) for row in due.fetchall()]
        self.unpublished = 0
        for row in rows:
            steps = ["raised", "cleared"] if row["notified"] == "none" else ["cleared"]
            if row["cleared_at"] is None:
                steps = ["raised"]
            for step in steps:
                document = self.cloudevent(row, step)
                webhooks = sorted({name for role in row["roles"] for name in self._webhooks(role)})
                committed = (row["id"], step) in self._committed
                if webhooks and self.outbox is not None and not committed:
                    await self.outbox.commit(
                        [
                            OutboxEvent(
                                id=document["id"],
                                type=f"exception.{step}",
                                partition_key=document["partitionkey"],
                                payload=json.dumps(document).encode(),
                                destinations=tuple(webhooks),
                                priority=NOTIFY_PRIORITY,
                            )
                        ]
                    )
                published = True
                for role in row["roles"]:
                    if role in self.mqtt:
                        published = await self.mqtt[role].publish(document) and published
                if not published:
                    # Still due: tried again, to every MQTT role (one that had it may see it
                    # twice); its webhook copy is in the outbox already, not committed again.
                    self.unpublished += 1
                    self._committed.add((row["id"], step))
                    break
                self._committed.discard((row["id"], step))
                self._write("UPDATE exceptions SET notified = ? WHERE id = ?", (step, row["id"]))
        return len(rows)

    def _webhooks(self, role: str) -> list[str]:
        channels = self.config.exceptions.roles.get(role)
        return (
            []
            if channels is None
            else [name for name in channels.webhook if name in self.config.destinations]
        )

    def cloudevent(self, row: Mapping[str, Any], step: str) -> dict[str, Any]:
        """The CloudEvent a webhook receives for a raise or a clear."""
        at = row["raised_at"] if step == "raised" else row["cleared_at"]
        key = f"exception:{row['kind']}:{row['subject']}"
        return {
            "specversion": "1.0",
            # Derived, as every event id: a raise handed on again after a crash is the same
            # event, which the outbox ignores.
            "id": str(
                uuid.uuid5(
                    EVENT_ID_NAMESPACE,
                    "|".join(
                        (
                            f"exception.{step}",
                            self.config.site,
                            row["kind"],
                            row["subject"],
                            str(int(row["raised_at"] * 1000)),
                        )
                    ),
                )
            ),
            "source": f"urn:plantsync:{self.config.site}:exceptions",
            "type": RAISED_TYPE if step == "raised" else CLEARED_TYPE,
            "time": datetime.fromtimestamp(at, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "subject": row["subject"],
            "datacontenttype": "application/json",
            "partitionkey": key,
            "data": {
                "exception_id": row["id"],
                "kind": row["kind"],
                "state": "open" if step == "raised" else "closed",
                "roles": row["roles"],
                "subject": row["subject"],
                "text": row["text"],
                "correlation": row["correlation"],
                "inspect": row["inspect"],
                "raised_at": row["raised_at"],
                "cleared_at": row["cleared_at"],
                "cleared_because": row["cleared_because"],
            },
        }
