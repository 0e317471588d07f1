"""Which relay fetches which partition: the live relays, from a JetStream key-value bucket, and
a rendezvous map of the partitions onto them.

Every relay puts its own key into the bucket (`relay.members_bucket`) every
`relay.heartbeat`; the bucket's `max_age` is `relay.member_ttl`, so the key of a relay that was
killed, or lost the hub, is gone a ttl after its last heartbeat, and a relay stopped with
SIGTERM purges its key at once. Each heartbeat also lists the bucket's keys (one stream info
request: the subjects that hold a message), and each relay computes the same map from the same
list: a partition consumer belongs to the member with the highest weight
hash(consumer, member) (rendezvous hashing). Deterministic, with no coordination, and a member
that comes or goes moves only the partitions it gains or held: every other partition keeps its
owner.

Ownership is about work, never correctness: each partition consumer has `max_ack_pending: 1`,
so the server hands a partition's next event to one relay at a time, in order, whoever asks.
Two relays that both think they own a partition for a heartbeat (a handover) only wait on each
other. So when the bucket cannot be read or written, a relay fetches every partition (as
relays did before ownership) and says so once, and once when it is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamInfo
from nats.js.client import KV_PRE_TEMPLATE, KV_STREAM_TEMPLATE

from drivers.common.availability import Availability
from edge.hub.config import HubConfig

log = logging.getLogger(__name__)
_NOT_KEY = re.compile(r"[^A-Za-z0-9_=-]+")


def weight(unit: str, member: str) -> int:
    """The rendezvous weight of a member for a unit of work: 64 bits of BLAKE2b over
    "<unit>/<member>", the same in every process and on every machine (not Python's hash())."""
    digest = hashlib.blake2b(f"{unit}/{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owners(units: Iterable[str], members: Iterable[str]) -> dict[str, str]:
    """Each unit's owner: the member with the highest weight (ties, 1 in 2^64, by name)."""
    live = sorted(set(members))
    if not live:
        return {}
    return {unit: max(live, key=lambda member: (weight(unit, member), member)) for unit in units}


def member_id(name: str) -> str:
    """This process's key in the bucket: the relay's name (characters a key cannot hold become
    `_`) and 6 random hex digits, so two relays started with the same `--name` stay two."""
    base = _NOT_KEY.sub("_", name).strip("_") or "relay"
    return f"{base[:64]}-{secrets.token_hex(3)}"


def bucket_config(config: HubConfig) -> KeyValueConfig:
    relay = config.relay
    return KeyValueConfig(
        bucket=relay.members_bucket,
        description="PlantSync hub: the live relays (a key each, gone a ttl after its last "
        "heartbeat)",
        history=1,
        ttl=relay.member_ttl,
        replicas=config.stream.replicas,
        storage=StorageType.FILE,
    )


async def ensure_bucket(js: JetStreamContext, config: HubConfig) -> str:
    """Create the bucket, or check its ttl and replicas against the file and update them; a
    line for `hub init`'s report."""
    settings = bucket_config(config)
    stream = KV_STREAM_TEMPLATE.format(bucket=settings.bucket)
    try:
        info: StreamInfo = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        await js.create_key_value(settings)
        return f"relay members bucket {settings.bucket}: created (ttl {settings.ttl:g}s)"
    have = info.config
    if round(have.max_age or 0, 3) == round(settings.ttl or 0, 3) and (
        have.num_replicas == settings.replicas
    ):
        return f"relay members bucket {settings.bucket}: OK, as configured"
    have.max_age = settings.ttl
    have.duplicate_window = min(120.0, settings.ttl or 120.0)
    have.num_replicas = settings.replicas
    await js.update_stream(have)
    return f"relay members bucket {settings.bucket}: updated (ttl {settings.ttl:g}s)"


class Membership:
    """This relay's membership: `join()` once connected, `run()` in a task (the heartbeat),
    `leave()` when stopping. `owns(unit)` is True for this relay's units, and for every unit
    while the bucket is unavailable; `on_change` is called whenever that answer may change."""

    def __init__(
        self,
        js: JetStreamContext,
        config: HubConfig,
        name: str,
        on_change: Callable[[], Awaitable[None]],
    ) -> None:
        self._js = js
        self._config = config
        self._settings = config.relay
        self.name = name
        self.member = member_id(name)
        self.on_change = on_change
        bucket = config.relay.members_bucket
        self._stream = KV_STREAM_TEMPLATE.format(bucket=bucket)
        self._prefix = KV_PRE_TEMPLATE.format(bucket=bucket)
        self.members: tuple[str, ...] = ()
        self._owners: dict[str, str] = {}
        self._units: list[str] = []
        self.availability = Availability(
            f"The relay members bucket {bucket}",
            log,
            extra={"relay": name, "member": self.member},
            lost_says="{peer} is unavailable: {reason}. This relay fetches from every "
            "partition until it is back (safe: one event in flight per partition).",
            back_says="{peer} is available again{detail}: this relay fetches only its own "
            "partitions.",
        )
        self._leaving = False
        self._short_ttl_said = False

    @property
    def ownership(self) -> bool:
        """True while the map is in force; False: every relay may fetch every partition."""
        return self.availability.available is True

    def watch(self, units: Iterable[str]) -> None:
        self._units = list(units)
        self._owners = owners(self._units, self.members)

    def owns(self, unit: str) -> bool:
        return not self.ownership or self._owners.get(unit) == self.member

    async def join(self) -> None:
        await self.beat()

    async def run(self) -> None:
        while not self._leaving:
            await asyncio.sleep(self._settings.heartbeat)
            if not self._leaving:
                await self.beat()

    async def beat(self) -> None:
        """Put this relay's key, read the live members, recompute the map."""
        before = (self.ownership, self.members)
        try:
            await self._put()
            live = await self._live()
        except nats.errors.ConnectionClosedError:
            # nats-py gave the connection up: the relay connects again within a second
            # (`Relay._serve`); widening this relay's share over a dead connection would only
            # start fetches that cannot run.
            return
        except (nats.errors.Error, OSError) as exc:
            self.availability.lost(str(exc) or type(exc).__name__)
        else:
            self.members = tuple(sorted({*live, self.member}))
            self._owners = owners(self._units, self.members)
            self.availability.back(f" ({len(self.members)} relays)")
        if (self.ownership, self.members) != before:
            if self.ownership and before[1] != self.members:
                log.info(
                    "Relay %s sees the live relays: %d (%s)",
                    self.member,
                    len(self.members),
                    ", ".join(self.members),
                    extra={"relay": self.name, "member": self.member},
                )
            await self.on_change()

    async def _put(self) -> None:
        record = {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "at": time.time(),
        }
        data = json.dumps(record, separators=(",", ":")).encode()
        subject = f"{self._prefix}{self.member}"
        try:
            await self._js.publish(subject, data, stream=self._stream)
        except nats.js.errors.NoStreamResponseError:
            # No bucket (a hub set up before relays owned partitions, `hub init` not rerun):
            # make it, as `hub init` would.
            await ensure_bucket(self._js, self._config)
            await self._js.publish(subject, data, stream=self._stream)

    async def _live(self) -> list[str]:
        info = await self._js.stream_info(self._stream, subjects_filter=f"{self._prefix}>")
        ttl = info.config.max_age or 0.0
        if 0 < ttl < 2 * self._settings.heartbeat and not self._short_ttl_said:
            # The bucket was made from another hub.yaml: this relay's key would lapse between
            # its beats and its partitions would flap between relays.
            self._short_ttl_said = True
            log.warning(
                "The relay members bucket forgets a relay after %gs, less than two of this "
                "relay's heartbeats (%gs): rerun plantsync hub init with this hub.yaml, or "
                "give every relay the same relay.heartbeat and relay.member_ttl",
                ttl,
                self._settings.heartbeat,
                extra={"relay": self.name, "member": self.member},
            )
        return [subject.removeprefix(self._prefix) for subject in info.state.subjects or {}]

    async def leave(self) -> None:
        """Purge this relay's key (no delete marker: the key is gone), so the others take its
        partitions at their next heartbeat rather than after the ttl."""
        self._leaving = True
        try:
            await self._js.purge_stream(self._stream, subject=f"{self._prefix}{self.member}")
        except nats.errors.Error as exc:
            log.warning(
                "Relay %s could not leave the members bucket (%s); its partitions move "
                "after the ttl",
                self.member,
                exc or type(exc).__name__,
                extra={"relay": self.name, "member": self.member},
            )

    def snapshot(self) -> Mapping[str, object]:
        return {
            "member": self.member,
            "ownership": "rendezvous" if self.ownership else "every partition (bucket away)",
            "members": list(self.members),
        }
