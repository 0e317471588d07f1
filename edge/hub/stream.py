"""The hub stream and its consumers: `plantsync hub init` creates or checks them (idempotent:
run it again and it says what already matches), and `plantsync doctor jetstream` reports what
a plant's destination will publish into.

The stream takes every subject the plants' pattern can make (`plantsync.*.*.*`) and stores
each under that subject plus a partition token, computed by the server's deterministic
`partition(n, i)` subject transform from the `{key}` token (NATS docs: "Deterministic
subject token partitioning"). Each destination has one durable pull consumer per partition,
filtered on it, with `max_ack_pending: 1`: the hub gives a partition's next event to whichever
relay asks only once the previous one is acked, so events of one key reach the target in
stream order however many relays run, and a killed relay's unacked event goes to another
after `ack_wait`.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
    SubjectTransform,
)

from edge.hub.config import HubConfig, HubStream
from edge.hub.members import ensure_bucket

T = TypeVar("T")
META_LEADER_WAIT = 60.0
"""A cluster just started elects its meta leader within seconds; requests time out until."""


def stream_config(stream: HubStream) -> StreamConfig:
    source, destination = stream.pattern.partition_transform(stream.partitions)
    return StreamConfig(
        name=stream.name,
        subjects=[source],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=stream.replicas,
        discard=DiscardPolicy.OLD,
        duplicate_window=stream.duplicate_window,
        max_age=stream.max_age,
        max_bytes=int(stream.max_bytes) if stream.max_bytes is not None else -1,
        subject_transform=SubjectTransform(src=source, dest=destination),
        description="PlantSync hub: plant events, partitioned by order/lot key",
    )


def dead_letter_config(stream: HubStream) -> StreamConfig:
    return _side_stream(
        stream,
        stream.dead_letter_stream,
        stream.dead_letter_subject,
        "PlantSync hub: events a target refused for good, with the reason",
    )


def journal_config(stream: HubStream) -> StreamConfig:
    return _side_stream(
        stream,
        stream.journal_stream,
        stream.journal_subject,
        "PlantSync hub: the relays' delivery journal",
    )


def _side_stream(stream: HubStream, name: str, subject: str, description: str) -> StreamConfig:
    """A stream beside the hub stream, kept as long and as safely; two minutes of dedup are
    enough for what relays write (a repeat comes within ack_wait)."""
    return StreamConfig(
        name=name,
        subjects=[f"{subject}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=stream.replicas,
        max_age=stream.max_age,
        duplicate_window=120.0,
        description=description,
    )


def consumer_name(destination: str, partition: int) -> str:
    return f"relay_{destination}_p{partition}"


def consumer_config(config: HubConfig, destination: str, partition: int) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=consumer_name(destination, partition),
        description=f"PlantSync relay to {destination}, partition {partition}",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=config.relay.ack_wait,
        max_deliver=-1,
        max_ack_pending=1,
        filter_subject=config.stream.pattern.partition_filter(partition),
        num_replicas=config.stream.replicas,
    )


async def patiently(request: Callable[[], Awaitable[T]]) -> T:
    """A JetStream API request, repeated while a new cluster elects its meta leader."""
    deadline = time.monotonic() + META_LEADER_WAIT
    while True:
        try:
            return await request()
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


# What `hub init` compares, by the name `nats stream info` shows.
_COMPARED = {
    "subjects": "subjects",
    "num_replicas": "replicas",
    "storage": "storage",
    "duplicate_window": "duplicate window",
    "max_age": "max age",
    "max_bytes": "max bytes",
    "subject_transform": "subject transform",
    "retention": "retention",
}
_FIXED = {"storage", "retention"}
"""Settings a stream cannot change once made (NATS refuses the update)."""


@dataclass
class InitReport:
    lines: list[str]
    ok: bool = True


async def ensure_stream(
    js: JetStreamContext, wanted: StreamConfig, report: InitReport
) -> StreamInfo | None:
    name = wanted.name or "?"
    try:
        info = await patiently(lambda: js.stream_info(name))
    except nats.js.errors.NotFoundError:
        info = await patiently(lambda: js.add_stream(wanted))
        report.lines.append(f"stream {name}: created ({_summary(info.config)})")
        return info
    have = info.config
    changes = [
        key for key in _COMPARED if _normal(getattr(have, key)) != _normal(getattr(wanted, key))
    ]
    if not changes:
        report.lines.append(f"stream {name}: OK, as configured ({_summary(have)})")
        return info
    fixed = [key for key in changes if key in _FIXED]
    transform = "subject_transform" in changes and have.subject_transform is not None
    if fixed or transform:
        why = ", ".join(_COMPARED[k] for k in changes)
        report.lines.append(
            f"stream {name}: differs in {why}, which cannot be changed in place"
            + (
                " (a new partition count moves keys between partitions: events of one order "
                "could overtake each other)"
                if transform
                else ""
            )
            + ": create a new stream, or set the file back to what the stream has"
        )
        report.ok = False
        return info
    info = await patiently(lambda: js.update_stream(wanted))
    report.lines.append(
        f"stream {name}: updated {', '.join(_COMPARED[k] for k in changes)} "
        f"({_summary(info.config)})"
    )
    return info


async def ensure_consumers(js: JetStreamContext, config: HubConfig, report: InitReport) -> None:
    made = kept = 0
    for destination in config.destinations:
        for partition in range(config.stream.partitions):
            wanted = consumer_config(config, destination, partition)
            name = consumer_name(destination, partition)
            try:
                await patiently(partial(js.consumer_info, config.stream.name, name))
                kept += 1
            except nats.js.errors.NotFoundError:
                made += 1
            # Creating a durable with the same config again is a no-op; a changed ack_wait is
            # applied (NATS updates consumers in place).
            await patiently(partial(js.add_consumer, config.stream.name, wanted))
    report.lines.append(
        f"consumers: {made} created, {kept} already there "
        f"({len(config.destinations)} destinations x "
        f"{config.stream.partitions} partitions)"
    )


async def init_hub(js: JetStreamContext, config: HubConfig) -> InitReport:
    report = InitReport([])
    await ensure_stream(js, stream_config(config.stream), report)
    await ensure_stream(js, dead_letter_config(config.stream), report)
    await ensure_stream(js, journal_config(config.stream), report)
    if report.ok:
        await ensure_consumers(js, config, report)
        report.lines.append(await patiently(lambda: ensure_bucket(js, config)))
    return report


def _normal(value: object) -> object:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, SubjectTransform):
        return (value.src, value.dest)
    if isinstance(value, float):
        return round(value, 3)
    if value is None:
        return -1
    return value


def _summary(config: StreamConfig) -> str:
    return (
        f"subjects {', '.join(config.subjects or [])}, {config.num_replicas} replicas, "
        f"{_storage(config)}, duplicate window {_duration(config.duplicate_window)}, "
        f"max age {_duration(config.max_age or 0)}, max bytes "
        f"{'unlimited' if (config.max_bytes or -1) < 0 else config.max_bytes}"
    )


def _storage(config: StreamConfig) -> str:
    storage = config.storage
    return f"{getattr(storage, 'value', storage) or '?'} storage"


def _duration(seconds: float) -> str:
    if not seconds:
        return "none"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def describe(info: StreamInfo) -> list[str]:
    """What `doctor jetstream` prints of a stream."""
    config = info.config
    lines = [f"stream {config.name}: {_summary(config)}"]
    if config.subject_transform is not None:
        lines.append(
            f"  partitions: {config.subject_transform.src} -> {config.subject_transform.dest}"
        )
    state = info.state
    lines.append(
        f"  holds {state.messages} events, {state.bytes} bytes, {state.consumer_count} consumers"
    )
    cluster = info.cluster
    if cluster is not None:
        replicas = ", ".join(
            f"{r.name} ({'current' if r.current else 'behind'}{', offline' if r.offline else ''})"
            for r in cluster.replicas or []
        )
        lines.append(f"  leader {cluster.leader or 'none'}; replicas {replicas or 'none'}")
    return lines
