"""The OPC UA driver's subscription: the one subscription of a session, created with the
server's own status (StartTime and State) watched in it, one monitored item per tag (its
sampling interval, queue and deadband), the words for an item the server refused, and the two
watchers that say a session is dead (the connection went, or the subscription went quiet).

Plain functions and the `Monitored` record; `OpcUaDriver` decides what to do with what they
return (a refused tag is marked bad, a watcher that returns ends the session).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from asyncua import ua
from asyncua.client.client import Client
from asyncua.client.ua_client import UaClientState
from asyncua.common.subscription import OverflowPolicy, Subscription
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.status_codes import StatusCodes

from drivers.opcua.config import OpcUaConfig, OpcUaTag
from drivers.opcua.restarts import (
    SERVER_START_TIME,
    SERVER_STATE,
    START_TIME_HANDLE,
    STATE_HANDLE,
)

SUBSCRIPTION_QUEUE = 0
"""asyncua's per-subscription notification queue: unbounded. asyncua puts a whole publish into
it at once and drops the oldest beyond its bound without a word (at 10,000, a tick of 25,000
changes lost 15,000); the pump empties it as notifications come, into the driver's buffer,
whose bound keeps the latest value per tag and counts what it drops."""

PUMP_YIELD_EVERY = 1_000
"""Notifications the pump moves before it lets other tasks (the delivery to the sink) run."""


@dataclass(slots=True)
class Monitored:
    tag: OpcUaTag
    node_id: ua.NodeId
    level: int | None = None
    """For a packml_state tag: which nested state machine's CurrentState.Id this item is
    (0 BaseStateMachine, 1 MachineState, 2 ExecuteState)."""


async def create_subscription(client: Client, config: OpcUaConfig) -> tuple[Subscription, float]:
    """Create the subscription, with the server's status items in it; return it with the
    keep-alive interval the server granted, in seconds."""
    keepalive_count = max(1, math.ceil(config.keepalive / config.publishing_interval))
    params = ua.CreateSubscriptionParameters(
        RequestedPublishingInterval=config.publishing_interval * 1000,
        RequestedLifetimeCount=max(
            3 * keepalive_count, math.ceil(config.session_timeout / config.publishing_interval)
        ),
        RequestedMaxKeepAliveCount=keepalive_count,
        MaxNotificationsPerPublish=0,
        PublishingEnabled=True,
        Priority=0,
    )
    # Built directly rather than through client.create_subscription(), which registers it
    # with asyncua's own stale watchdog and reconnect supervisor: this driver owns both.
    subscription = Subscription(
        client.uaclient.session,
        params,
        None,
        queue_maxsize=SUBSCRIPTION_QUEUE,
        overflow=OverflowPolicy.DROP_OLDEST,
    )
    granted = await subscription.init()
    keepalive = granted.RevisedPublishingInterval * granted.RevisedMaxKeepAliveCount / 1000
    # The server's own status, watched in the same subscription: a new StartTime while
    # the session lives (a redundant server taking over) is a restart too, and a State
    # other than Running (Shutdown announced) ends the session before the socket does.
    status_items = [
        ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(NodeId=node_id, AttributeId=AttributeIds.Value),
            MonitoringMode=ua.MonitoringMode.Reporting,
            RequestedParameters=ua.MonitoringParameters(
                ClientHandle=handle, SamplingInterval=-1.0, QueueSize=1, DiscardOldest=True
            ),
        )
        for handle, node_id in (
            (START_TIME_HANDLE, SERVER_START_TIME),
            (STATE_HANDLE, SERVER_STATE),
        )
    ]
    await subscription.create_monitored_items(status_items)
    return subscription, keepalive


def monitor_request(handle: int, item: Monitored) -> ua.MonitoredItemCreateRequest:
    tag = item.tag
    parameters = ua.MonitoringParameters(
        ClientHandle=handle,
        # -1 asks for the publishing interval (OPC UA Part 4, 7.21).
        SamplingInterval=(
            tag.sampling_interval * 1000 if tag.sampling_interval is not None else -1.0
        ),
        QueueSize=tag.queue_size,
        DiscardOldest=True,
    )
    if tag.deadband is not None:
        parameters.Filter = ua.DataChangeFilter(
            Trigger=ua.DataChangeTrigger.StatusValue,
            DeadbandType=(
                ua.DeadbandType.Absolute
                if tag.deadband.type == "absolute"
                else ua.DeadbandType.Percent
            ),
            DeadbandValue=tag.deadband.value,
        )
    return ua.MonitoredItemCreateRequest(
        ItemToMonitor=ua.ReadValueId(NodeId=item.node_id, AttributeId=AttributeIds.Value),
        MonitoringMode=ua.MonitoringMode.Reporting,
        RequestedParameters=parameters,
    )


def refusal(item: Monitored, status: ua.StatusCode) -> str:
    if status.value in (StatusCodes.BadNodeIdUnknown, StatusCodes.BadNodeIdInvalid):
        return f"the server has no node {item.node_id.to_string()} ({status.name})"
    if status.value in (
        StatusCodes.BadMonitoredItemFilterUnsupported,
        StatusCodes.BadMonitoredItemFilterInvalid,
        StatusCodes.BadFilterNotAllowed,
        StatusCodes.BadDeadbandFilterInvalid,
    ):
        return f"the server cannot apply its deadband ({status.name})"
    return f"the server refused to monitor it ({status.name})"


async def watch_connection(client: Client) -> str:
    """Return once asyncua sees the connection go: a closed socket or a failed keep-alive."""
    async with client.subscribe_state() as states:
        while client.state is UaClientState.CONNECTED:
            await states.next_change()
    return "the connection was closed"


async def watch_staleness(subscription: Subscription, threshold: float) -> str:
    """Return when neither a data change nor a keep-alive came for `threshold` seconds."""
    started = time.monotonic()
    while True:
        last = max(subscription.last_publish_at or started, started)
        quiet = time.monotonic() - last
        if quiet >= threshold:
            return f"no data change and no keep-alive for {threshold:g}s"
        await asyncio.sleep(threshold - quiet)
