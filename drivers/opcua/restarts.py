"""How the OPC UA driver sees that its server restarted, and that it is not running.

At every connect, and through a monitored item while the session lasts, the driver reads
`ServerStatus.StartTime` and `ServerStatus.State`. A state other than Running ends the session.
A StartTime other than the last one seen is a restart: the last one is kept in the process and
in `data_dir/opcua/<driver>.server.json` (written atomically), so that a server restart while
the gateway itself was down is still seen. A restart goes to the rules as a `DeviceRestarted`
(their counters of this driver count from 0), unless `server_restart: counters_continue` says
the machine's counters survive its server's restarts.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds

from drivers.base import DeviceRestarted
from drivers.opcua.config import ServerRestart
from drivers.opcua.nodes import make_node_id
from drivers.opcua.values import epoch_seconds

log = logging.getLogger(__name__)

SERVER_START_TIME = make_node_id(ObjectIds.Server_ServerStatus_StartTime, 0, ua.NodeIdType.Numeric)
SERVER_STATE = make_node_id(ObjectIds.Server_ServerStatus_State, 0, ua.NodeIdType.Numeric)
START_TIME_HANDLE = 0x7FFF_0001
STATE_HANDLE = 0x7FFF_0002
"""Client handles of the driver's own monitored items (ServerStatus), beyond any tag's."""


class SessionEnded(Exception):
    """The server said something that ends this session (it is shutting down, or not
    running); the message says what, for the log."""


async def read_server_status(client: Client) -> tuple[object, object]:
    """ServerStatus.StartTime and State, as the server answers them (None when it has none)."""
    values = await client.uaclient.read(
        ua.ReadParameters(
            MaxAge=0,
            TimestampsToReturn=ua.TimestampsToReturn.Neither,
            NodesToRead=[
                ua.ReadValueId(NodeId=node_id, AttributeId=AttributeIds.Value)
                for node_id in (SERVER_START_TIME, SERVER_STATE)
            ],
        )
    )
    start, state = (value.Value.Value if value.Value is not None else None for value in values)
    return start, state


def check_running(state: object) -> None:
    """Raise SessionEnded unless the server's state is Running (or it does not say)."""
    if state is None or state == ua.ServerState.Running:
        return
    try:
        name = ua.ServerState(int(cast(int, state))).name
    except ValueError:
        name = str(state)
    raise SessionEnded(f"the server says its state is {name}, not Running")


class ServerStarts:
    """The server's last StartTime: seen in this process, or saved under `data_dir` (the
    gateway's; None: nowhere) by an earlier one.

    `seen(start)` returns the restart a new StartTime means; `to_save` is then the StartTime to
    write once the rules have committed that restart (a crash before announces it again rather
    than never)."""

    def __init__(
        self, driver: str, endpoint: str, data_dir: Path | None, policy: ServerRestart
    ) -> None:
        self.driver = driver
        self.endpoint = endpoint
        self.data_dir = data_dir
        self.policy = policy
        self.known: datetime | None = None
        self.restarts_seen = 0
        """Server restarts detected (a new ServerStatus.StartTime)."""
        self.to_save: datetime | None = None

    def seen(self, start: object) -> DeviceRestarted | None:
        """Compare the server's StartTime with the last one seen; a different one is a
        restart."""
        if not isinstance(start, datetime) or epoch_seconds(start) is None:
            return None  # a server that does not say when it started cannot tell us it restarted
        if start.tzinfo is None:
            start = start.replace(tzinfo=UTC)
        known = self.known
        if known is None:
            known = self.load()
        self.known = start
        if known is None or abs((start - known).total_seconds()) < 0.001:
            if known is None:
                self.save(start)
            return None
        self.restarts_seen += 1
        reason = (
            f"OPC UA server {self.driver} at {self.endpoint} restarted: ServerStatus."
            f"StartTime {known.isoformat()} -> {start.isoformat()}"
        )
        if self.policy == "counters_continue":
            log.info(
                "%s; its counters carry on (server_restart: counters_continue).",
                reason,
                extra={"driver": self.driver, "endpoint": self.endpoint},
            )
            self.save(start)
            return None
        self.to_save = start
        return DeviceRestarted(self.driver, start.timestamp(), reason)

    @property
    def file(self) -> Path | None:
        if self.data_dir is None:
            return None
        return self.data_dir / "opcua" / f"{self.driver}.server.json"

    def load(self) -> datetime | None:
        path = self.file
        if path is None:
            return None
        try:
            saved = json.loads(path.read_text())
            if saved.get("endpoint") != self.endpoint:
                return None  # another server: its StartTime says nothing about this one
            return datetime.fromisoformat(saved["start_time"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning(
                "OPC UA driver %s: cannot read %s (%s); a server restart while the "
                "gateway was down would go unseen.",
                self.driver,
                path,
                exc,
                extra={"driver": self.driver},
            )
            return None

    def save(self, start: datetime) -> None:
        path = self.file
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            temporary.write_text(
                json.dumps({"endpoint": self.endpoint, "start_time": start.isoformat()}) + "\n"
            )
            os.replace(temporary, path)
        except OSError as exc:
            log.warning(
                "OPC UA driver %s: cannot write %s (%s); a server restart while the "
                "gateway is down would go unseen.",
                self.driver,
                path,
                exc,
                extra={"driver": self.driver},
            )
