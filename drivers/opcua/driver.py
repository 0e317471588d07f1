"""OPC UA driver: subscribes to a server's variables and emits one Sample per data change.

One session per driver, one subscription per session, one monitored item per tag. At every
connect the driver resolves each tag's node id against the server's current namespace array (so
`nsu=<namespace uri>;s=...` survives a server that renumbers its namespaces), subscribes, and
then reads the current value of every tag and emits it, so a counter resumes from the server's
current value after an outage: no gap, and no double count, because per tag a value older than
the one already emitted in the session is dropped. Notifications leave asyncua's receive path at
once for a buffer that a delivery task drains into the sink; when the sink falls far behind, the
buffer keeps only the latest value per tag, which loses intermediate telemetry but never the
latest reading of a counter. The driver keeps only connect-and-serve: a closed connection, a
failed keep-alive read, a subscription the server ended, or no data change and no keep-alive for
`stale_after` ends the session; the shared reconnect loop (`drivers.common.availability`) logs
once that the server is unavailable, retries with the shared backoff, and logs once when it is
back. A node that does not exist marks only its tag bad.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from asyncua import ua
from asyncua.client.client import Client
from asyncua.client.ua_client import UaClientState
from asyncua.common.subscription import (
    DataChangeEvent,
    StatusChangeEvent,
    Subscription,
)
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.uaerrors import UaStatusCodeError

from drivers.base import (
    DeviceRestarted,
    Driver,
    Quality,
    Sample,
    SampleSink,
    honour_cancellation,
)
from drivers.common.availability import Availability, reconnect_forever
from drivers.common.timing import Backoff
from drivers.opcua.client import (
    close_despite_cancel,
    describe_error,
    load_structures,
    new_client,
)
from drivers.opcua.config import OpcUaConfig, OpcUaTag
from drivers.opcua.outcome import Outcome, outcome_of, wait_to_retry
from drivers.opcua.restarts import (
    START_TIME_HANDLE,
    STATE_HANDLE,
    ServerStarts,
    SessionEnded,
    check_running,
    read_server_status,
)
from drivers.opcua.subscription import (
    PUMP_YIELD_EVERY,
    Monitored,
    create_subscription,
    monitor_request,
    refusal,
    watch_connection,
    watch_staleness,
)
from drivers.opcua.trust_list import TrustList
from drivers.opcua.values import PendingSamples, quality_of, sample_from

log = logging.getLogger(__name__)


_LEVEL_HANDLES = 0x0100_0000
"""A packml_state tag's items: the tag's handle plus this times (level + 1)."""

PACKML_NAMESPACE_URI = "http://opcfoundation.org/UA/PackML/"
PACKML_CLEARED = 19
PACKML_RUNNING = 18
"""OPC 30050's StateNumbers of the two states that hold a nested state machine (Cleared holds
MachineState, Running holds ExecuteState); every other state is an ISA-TR88 number."""


class OpcUaDriver(Driver):
    """Subscribes to one OPC UA server and owns its reconnection.

    `data_dir` (the gateway's) is where the driver remembers the server's last StartTime, so
    that a server restart during a gateway restart is still seen.
    """

    def __init__(self, config: OpcUaConfig, *, data_dir: Path | None = None) -> None:
        super().__init__(config.name)
        self.config = config
        self.dropped_samples = 0
        """Intermediate samples dropped because the sink fell behind (latest values kept)."""
        self.backoff = Backoff(base=0.5, cap=config.reconnect_max_delay)
        """Delays between reconnect attempts; the shared policy (tests may shorten it)."""
        self._starts = ServerStarts(self.name, self.endpoint, data_dir, config.server_restart)
        self.availability = Availability(
            f"OPC UA server {self.name} at {self.endpoint}",
            log,
            health=self.health,
            extra={"driver": self.name, "endpoint": self.endpoint},
        )
        self._bad_tags: dict[str, str] = {}
        self._last_emitted: dict[str, Sample] = {}
        self._overloaded = False
        self._state_levels: dict[str, list[ua.NodeId | None]] = {}
        self._state_numbers: dict[ua.NodeId, int | None] = {}

    @property
    def endpoint(self) -> str:
        """The endpoint URL, as logs show it."""
        return self.config.endpoint

    @property
    def data_dir(self) -> Path | None:
        """The gateway's data_dir: the trust list and the server's last StartTime live there."""
        return self._starts.data_dir

    @data_dir.setter
    def data_dir(self, data_dir: Path | None) -> None:
        self._starts.data_dir = data_dir

    @property
    def restarts_seen(self) -> int:
        """Server restarts detected (a new ServerStatus.StartTime)."""
        return self._starts.restarts_seen

    async def run(self, sink: SampleSink) -> None:
        """Connect, subscribe and reconnect until cancelled; server errors never end it."""
        pending = PendingSamples()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._deliver(pending, sink), name=f"opcua-{self.name}-deliver")
                tasks.create_task(
                    reconnect_forever(
                        lambda: self._session(pending),
                        self.backoff,
                        self.availability,
                        wait=self._wait_to_retry,
                    ),
                    name=f"opcua-{self.name}-sessions",
                )
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:  # a failing sink: raise its error as it was
                raise group.exceptions[0] from None
            raise

    async def _deliver(self, pending: PendingSamples, sink: SampleSink) -> None:
        while True:
            batch = await pending.take()
            await sink(batch)
            if self._starts.to_save is not None and any(
                isinstance(reading, DeviceRestarted) for reading in batch
            ):
                # Only now: the rules have committed the restart, so a crash before this line
                # announces it again rather than never.
                await asyncio.to_thread(self._starts.save, self._starts.to_save)
                self._starts.to_save = None

    async def _wait_to_retry(self, outcome: Outcome, delay: float) -> None:
        """Wait the backoff delay, or less once a closed port opens (`outcome.wait_to_retry`)."""
        await wait_to_retry(outcome, delay, self.endpoint, self.config.timeout)

    async def _session(self, pending: PendingSamples) -> Outcome:
        """One session from connect to loss; return why it ended."""
        config = self.config
        client: Client | None = None
        try:
            client = await new_client(
                config.endpoint,
                config.security,
                username=config.username,
                password=config.password.get_secret_value() if config.password else None,
                request_timeout=config.timeout,
                session_timeout=config.session_timeout,
                keepalive=config.keepalive,
                client_name=f"PlantSync Edge {self.name}",
                trust=TrustList(self.data_dir / "pki") if self.data_dir is not None else None,
            )
            await client.connect()
            honour_cancellation()  # asyncua awaits with wait_for, which can lose a stop (3.11)
            return Outcome(await self._serve(client, pending))
        except SessionEnded as exc:
            return Outcome(str(exc))
        except Exception as exc:
            return outcome_of(exc, config)
        finally:
            if client is not None:
                await close_despite_cancel(client, within=config.timeout)

    async def _serve(self, client: Client, pending: PendingSamples) -> str:
        """Subscribe, read current values, then wait for the first sign the session is dead."""
        lost: list[BaseException] = []

        async def on_connection_lost(exc: Exception) -> None:
            lost.append(exc)

        client.connection_lost_callback = on_connection_lost
        self._last_emitted.clear()
        # Before any sample of this session: a restart must reach the rules before the first
        # reading taken after it.
        await self._check_server_status(client, pending)
        namespaces = await client.get_namespace_array()
        monitored = self._resolve(namespaces, pending)
        await self._prepare_structures(client, namespaces, monitored, pending)
        subscription, keepalive = await self._subscribe(client, monitored, pending)
        await self._read_current(client, monitored, pending)
        # Each of these awaits asyncua's wait_for, which on Python 3.11 can swallow a stop; the
        # watchers below would then run on, and a TaskGroup cancels its children only once.
        honour_cancellation()
        self.availability.back()

        # The server may revise the keep-alive up; never call a subscription stale before two
        # keep-alives could have come.
        threshold = max(self.config.stale_after, 2 * keepalive) if self.config.stale_after else 0
        async with asyncio.TaskGroup() as tasks:
            watchers = [
                tasks.create_task(watch_connection(client), name=f"opcua-{self.name}-connection"),
                tasks.create_task(
                    self._pump(client, subscription, monitored, pending),
                    name=f"opcua-{self.name}-pump",
                ),
            ]
            if threshold:
                watchers.append(
                    tasks.create_task(
                        watch_staleness(subscription, threshold),
                        name=f"opcua-{self.name}-staleness",
                    )
                )
            done, _ = await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
            for watcher in watchers:
                watcher.cancel()
        if client.state is not UaClientState.CONNECTED:
            # asyncua also ends the subscription when it loses the connection; the loss is
            # the reason, and a failed keep-alive read says more than a closed socket.
            if lost and not isinstance(lost[-1], ConnectionError):
                cause = describe_error(lost[-1], self.config.keepalive)
                return f"the session keep-alive failed: {cause}"
            return "the connection was closed"
        return next(watcher.result() for watcher in watchers if watcher in done)

    # --- server restarts -------------------------------------------------------------------

    async def _check_server_status(self, client: Client, pending: PendingSamples) -> None:
        """Read ServerStatus.StartTime and State at connect: a server not running ends the
        session; a new StartTime is a restart."""
        start, state = await read_server_status(client)
        check_running(state)
        self._server_started_at(start, pending)

    def _server_started_at(self, start: object, pending: PendingSamples) -> None:
        restarted = self._starts.seen(start)
        if restarted is not None:
            pending.put(restarted)

    # --- structured values and OPC 30050 state machines -------------------------------------

    async def _prepare_structures(
        self,
        client: Client,
        namespaces: Sequence[str],
        monitored: dict[int, Monitored],
        pending: PendingSamples,
    ) -> None:
        """Load the server's structure definitions when a tag selects part of one, and put one
        item per nested state machine in place of each packml_state tag."""
        self._state_levels = {}
        self._state_numbers = {}
        if any(item.tag.select is not None for item in monitored.values()):
            await load_structures(client, self.name)
        machines = [
            (handle, item) for handle, item in monitored.items() if item.tag.read == "packml_state"
        ]
        for handle, item in machines:
            del monitored[handle]
            if PACKML_NAMESPACE_URI not in namespaces:
                self._tag_failed(
                    item.tag,
                    f"the server has no PackML namespace "
                    f"({PACKML_NAMESPACE_URI}): it is not an OPC 30050 machine",
                    pending,
                )
                continue
            packml = list(namespaces).index(PACKML_NAMESPACE_URI)
            machine = client.get_node(item.node_id)
            prefix: list[str] = []
            for level, name in enumerate(("", "MachineState", "ExecuteState")):
                prefix += [f"{packml}:{name}"] if name else []
                try:
                    current_id = await machine.get_child([*prefix, "0:CurrentState", "0:Id"])
                except UaStatusCodeError as exc:
                    where = "/".join(
                        [*(step.split(":")[1] for step in prefix), "CurrentState", "Id"]
                    )
                    self._tag_failed(
                        item.tag,
                        f"{item.node_id.to_string()} is not a PackML "
                        f"BaseStateMachine: it has no {where} "
                        f"({ua.StatusCode(exc.code).name})",
                        pending,
                    )
                    for other in [h for h, i in monitored.items() if i.tag is item.tag]:
                        del monitored[other]
                    break
                monitored[handle + (level + 1) * _LEVEL_HANDLES] = Monitored(
                    item.tag, current_id.nodeid, level
                )

    async def _packml_state_changed(
        self,
        client: Client,
        item: Monitored,
        datavalue: ua.DataValue | None,
        now: float,
        pending: PendingSamples,
    ) -> None:
        """One nested state machine's CurrentState.Id changed: emit the innermost state's
        number once the machines agree (a server updates them one at a time)."""
        assert item.level is not None
        if datavalue is None or quality_of(datavalue.StatusCode) is Quality.BAD:
            self._emit(item.tag, datavalue, now, pending)
            return
        levels = self._state_levels.setdefault(item.tag.name, [None, None, None])
        state = datavalue.Value.Value if datavalue.Value is not None else None
        levels[item.level] = state if isinstance(state, ua.NodeId) and not state.is_null() else None
        number = None
        for level, state_id in enumerate(levels):
            if state_id is None:
                return  # the machine containing this one says it is active: wait for it
            number = await self._state_number(client, state_id)
            if number is None:
                return
            if (level, number) not in ((0, PACKML_CLEARED), (1, PACKML_RUNNING)):
                break  # no sub-machine of this state is active: this is the state
        last = self._last_emitted.get(item.tag.name)
        if last is not None and last.value == number and last.quality is Quality.GOOD:
            return  # another machine of the hierarchy moved, to the same innermost state
        self._emit(
            item.tag,
            ua.DataValue(
                ua.Variant(number, ua.VariantType.UInt32),
                SourceTimestamp=datavalue.SourceTimestamp,
                ServerTimestamp=datavalue.ServerTimestamp,
            ),
            now,
            pending,
        )

    async def _state_number(self, client: Client, state_id: ua.NodeId) -> int | None:
        """A state object's StateNumber (mandatory in OPC UA's StateType), read once."""
        if state_id not in self._state_numbers:
            try:
                number = await client.get_node(state_id).get_child("0:StateNumber")
                self._state_numbers[state_id] = int(await number.read_value())
            except (UaStatusCodeError, TypeError, ValueError) as exc:
                log.warning(
                    "OPC UA server %s: state %s has no readable StateNumber (%s).",
                    self.name,
                    state_id.to_string(),
                    exc,
                    extra={"driver": self.name},
                )
                self._state_numbers[state_id] = None
        return self._state_numbers[state_id]

    def _resolve(self, namespaces: Sequence[str], pending: PendingSamples) -> dict[int, Monitored]:
        """Node ids for this server's namespace array, by client handle; the rest marked bad."""
        monitored: dict[int, Monitored] = {}
        for handle, tag in enumerate(self.config.tags, start=1):
            try:
                monitored[handle] = Monitored(tag, tag.node_ref.resolve(namespaces))
            except LookupError as exc:
                self._tag_failed(tag, str(exc), pending)
        return monitored

    async def _subscribe(
        self, client: Client, monitored: dict[int, Monitored], pending: PendingSamples
    ) -> tuple[Subscription, float]:
        """Create the subscription and one monitored item per tag, dropping the refused ones;
        return it with the keep-alive interval the server granted, in seconds."""
        subscription, keepalive = await create_subscription(client, self.config)
        if not monitored:
            return subscription, keepalive
        requests = [monitor_request(handle, item) for handle, item in monitored.items()]
        results = await subscription.create_monitored_items(requests)
        for (handle, item), result in zip(list(monitored.items()), results, strict=True):
            if isinstance(result, ua.StatusCode):
                del monitored[handle]
                self._tag_failed(item.tag, refusal(item, result), pending)
        return subscription, keepalive

    async def _read_current(
        self, client: Client, monitored: dict[int, Monitored], pending: PendingSamples
    ) -> None:
        """Read and emit every monitored tag's current value (the resume point for counters)."""
        if not monitored:
            return
        items = list(monitored.values())
        params = ua.ReadParameters(
            MaxAge=0,
            TimestampsToReturn=ua.TimestampsToReturn.Both,
            NodesToRead=[
                ua.ReadValueId(NodeId=item.node_id, AttributeId=AttributeIds.Value)
                for item in items
            ],
        )
        values = await client.uaclient.read(params)
        now = time.time()
        for item, datavalue in zip(items, values, strict=True):
            if item.level is not None:
                await self._packml_state_changed(client, item, datavalue, now, pending)
            else:
                self._emit(item.tag, datavalue, now, pending)

    async def _pump(
        self,
        client: Client,
        subscription: Subscription,
        monitored: dict[int, Monitored],
        pending: PendingSamples,
    ) -> str:
        """Move notifications into the buffer as they come; return if the server ends them.

        asyncua hands over a whole publish at once (at 50,000 items one tick is 25,000
        notifications) and taking from its queue does not yield while it holds some: every
        PUMP_YIELD_EVERY notifications the delivery task gets its turn, so the buffer drops
        intermediate values only when the sink is behind, not because it never got to run."""
        pumped = 0
        async for event in subscription:
            pumped += 1
            if pumped % PUMP_YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if isinstance(event, DataChangeEvent):
                notification = event.data.monitored_item
                handle = notification.ClientHandle
                if handle in (START_TIME_HANDLE, STATE_HANDLE):
                    value = notification.Value.Value if notification.Value is not None else None
                    status = value.Value if value is not None else None
                    if handle == START_TIME_HANDLE:
                        self._server_started_at(status, pending)
                        continue
                    try:
                        check_running(status)
                    except SessionEnded as exc:
                        return str(exc)
                    continue
                item = monitored.get(handle)
                if item is not None and item.level is not None:
                    self.health.reads += 1
                    await self._packml_state_changed(
                        client, item, notification.Value, time.time(), pending
                    )
                    honour_cancellation()  # it reads the server through wait_for (3.11)
                elif item is not None:
                    self.health.reads += 1
                    self._emit(item.tag, notification.Value, time.time(), pending)
            elif isinstance(event, StatusChangeEvent) and event.notification.Status.is_bad():
                return f"the server ended the subscription ({event.notification.Status.name})"
        return "the subscription was closed"

    def _emit(
        self, tag: OpcUaTag, datavalue: ua.DataValue | None, now: float, pending: PendingSamples
    ) -> None:
        try:
            sample = sample_from(self.name, tag.name, datavalue, now, tag.selector)
        except LookupError as exc:  # the structure has no such element or field
            self._tag_failed(tag, str(exc), pending)
            return
        if self._bad_tags and sample.quality is not Quality.BAD and tag.name in self._bad_tags:
            self._tag_recovered(tag)
        last = self._last_emitted.get(tag.name)
        # The subscription's first notification can arrive after the read that followed it;
        # emitting the older value then would make a counter step back and count twice. (A
        # later source time is news: the whole-sample comparison only for an equal one.)
        if (
            last is not None
            and sample.source_time <= last.source_time
            and (sample.source_time < last.source_time or sample == last)
        ):
            return
        self._last_emitted[tag.name] = sample
        if sample.quality is not Quality.BAD:
            # Arrival, not source time: a value unchanged for hours is still fresh news.
            self.health.last_sample_at = now
        dropped = pending.put(sample)
        if dropped:
            self.dropped_samples += dropped
            if not self._overloaded:
                self._overloaded = True
                log.warning(
                    "OPC UA driver %s: the pipeline is behind; keeping only the latest value per "
                    "tag until it catches up.",
                    self.name,
                    extra={"driver": self.name, "dropped": self.dropped_samples},
                )
        elif self._overloaded and len(pending) <= 1:
            self._overloaded = False

    def _tag_failed(self, tag: OpcUaTag, reason: str, pending: PendingSamples) -> None:
        self._emit(tag, None, time.time(), pending)
        self.health.record_error(f"tag {tag.name}: {reason}")
        if self._bad_tags.get(tag.name) == reason:
            return
        self._bad_tags[tag.name] = reason
        log.warning(
            "OPC UA server %s at %s: tag %s (%s) is bad: %s.",
            self.name,
            self.endpoint,
            tag.name,
            tag.node,
            reason,
            extra={"driver": self.name, "endpoint": self.endpoint, "tag": tag.name},
        )

    def _tag_recovered(self, tag: OpcUaTag) -> None:
        if self._bad_tags.pop(tag.name, None) is not None:
            log.info(
                "OPC UA server %s at %s: tag %s (%s) reads again.",
                self.name,
                self.endpoint,
                tag.name,
                tag.node,
                extra={"driver": self.name, "endpoint": self.endpoint, "tag": tag.name},
            )
