"""jetstream: the hub. Each event is published, as the CloudEvents NATS binding says
(structured mode: the payload is the event's JSON format), to a subject from the configured
pattern (`plantsync.{site}.{type}.{key}`) with `Nats-Msg-Id` = the event id, so the stream
stores a retried event once (within its duplicate window). The delivery is settled only on
the PubAck of the configured stream, which JetStream sends once the event is stored with the
stream's replication; anything else (no answer, no stream, another stream) is a retry.

A batch is published concurrently, each event with its own PubAck and its own Result; the
engine still hands over only the head of each partition key, so a key's events are stored in
commit order. The connection is opened at the first send (a failure is a retry like a
refused TCP connection) and closed by `close`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from buffer.outbox import Delivery
from edge.config.destinations import DestinationConfig
from edge.forward.outcome import Outcome, Result, delivered
from edge.forward.profiles.base import Profile
from edge.forward.session import Session
from edge.hub.connection import HubUnavailable, connect

MAX_PAYLOAD_EXCEEDED = 10054
"""JetStream's error code for a message larger than the stream takes."""


class JetStreamProfile(Profile):
    def __init__(self, config: DestinationConfig, session: Session) -> None:
        super().__init__(config, session)
        self.batch_size = config.batch_size
        self.settings = config.jetstream
        self.pattern = config.jetstream.pattern
        self._client: Client | None = None
        self._connecting = asyncio.Lock()

    async def send(self, deliveries: Sequence[Delivery]) -> list[Result]:
        try:
            stream = await self._jetstream()
        except HubUnavailable as exc:
            return [Result(Outcome.RETRY, None, str(exc))] * len(deliveries)
        return list(await asyncio.gather(*(self._publish(stream, d) for d in deliveries)))

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def _jetstream(self) -> JetStreamContext:
        async with self._connecting:  # one connection for all the requests that found none
            if self._client is not None and self._client.is_closed:
                # nats-py closes a connection for good on most -ERR from the server (an
                # authorization violation after the hub's users changed, an expired user
                # JWT) and never reconnects it: make a new one, as at the start.
                self._client = None
            if self._client is None:
                self._client = await connect(
                    f"plantsync-{self.config.jetstream.stream}",
                    [self.config.base_url, *self.settings.servers],
                    self.config.tls,
                    self.settings.auth,
                    connect_timeout=self.config.timeout,
                )
            return self._client.jetstream(timeout=self.config.timeout)

    def subject_of(self, delivery: Delivery) -> str:
        event = json.loads(delivery.payload)
        data = event.get("data") if isinstance(event, dict) else None
        site = (
            str(data.get("site"))
            if isinstance(data, dict) and data.get("site")
            else (_site_of_source(str(event.get("source", ""))))
        )
        return self.pattern.subject(
            site=site, event_type=delivery.event_type, key=delivery.partition_key
        )

    async def _publish(self, stream: JetStreamContext, delivery: Delivery) -> Result:
        subject = self.subject_of(delivery)
        try:
            ack = await stream.publish(
                subject,
                delivery.payload,
                timeout=self.config.timeout,
                stream=self.settings.stream,
                headers={
                    "Nats-Msg-Id": delivery.event_id,
                    "Content-Type": "application/cloudevents+json",
                },
            )
        except nats.js.errors.NoStreamResponseError:
            return Result(
                Outcome.RETRY,
                None,
                f"no stream takes subject {subject}: create "
                f"it with plantsync hub init (stream {self.settings.stream})",
            )
        except nats.js.errors.APIError as exc:
            reason = (
                f"stream {self.settings.stream} refused {subject}: {exc.description} "
                f"(error {exc.err_code})"
            )
            if exc.err_code == MAX_PAYLOAD_EXCEEDED:
                return Result(Outcome.REJECTED, exc.code, reason)
            return Result(Outcome.RETRY, exc.code, reason)
        except nats.errors.TimeoutError:
            return Result(
                Outcome.RETRY,
                None,
                f"no PubAck from stream {self.settings.stream} within {self.config.timeout:g}s",
                ambiguous=True,
            )
        except nats.errors.Error as exc:
            return Result(Outcome.RETRY, None, f"{type(exc).__name__}: {exc}", ambiguous=True)
        reference = f"{ack.stream}/{ack.seq}" + (" (duplicate)" if ack.duplicate else "")
        return delivered(None, reference)


def _site_of_source(source: str) -> str:
    """`urn:plantsync:<site>:...`, the gateway's own sources."""
    parts = source.split(":")
    return parts[2] if len(parts) > 2 and parts[0] == "urn" else "unknown"
