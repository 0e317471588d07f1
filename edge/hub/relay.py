"""`plantsync relay --config hub.yaml`: the central relay. It delivers the hub stream's events
to ERP and QMS with the plant daemon's own engine (edge.forward: the same profiles, auth,
retries with backoff, circuit breaker, rate limits) over the hub's durable partition
consumers (edge.hub.inbox), and serves `/metrics`: consumer lag per partition, redeliveries,
dead letter depth, deliveries per destination.

Run N relays on any machines with the same hub.yaml: they share the partitions out by the
hub's members bucket (edge.hub.members: each fetches only its own, so N relays make N times
fewer pull requests, not N times more), and when one dies the others take its partitions
after the bucket's ttl (its one unacked event per partition after `ack_wait`). Order per key
never depends on that: the hub hands a partition's next event to one relay at a time. Stop
with SIGTERM: the relay leaves the bucket (its partitions move at once), fetching stops,
deliveries in flight are finished (bounded by the destinations' timeouts), and what is held
but unsent is given back to the hub at once (nak) for another relay. `/status` says which
partitions this relay owns and which relays it sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import nats.errors
import nats.js.errors
import uvicorn
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from drivers.common.availability import Availability, Ended, reconnect_forever
from drivers.common.timing import Backoff
from edge.forward import HttpForwarder
from edge.hub.config import HubConfig
from edge.hub.connection import HubUnavailable, connect
from edge.hub.inbox import HubInbox
from edge.hub.members import Membership
from edge.hub.stream import InitReport, consumer_name, ensure_consumers, patiently

log = logging.getLogger(__name__)
CLOSED_CHECK = 1.0
"""Seconds between looks at whether nats-py closed the relay's connection for good."""


class RelayMetrics(Collector):
    """Counters read from the inboxes and forwarders at scrape time (properties never do I/O:
    lag and dead letter depth are polled every `stats_interval`)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        lag = GaugeMetricFamily(
            "plantsync_relay_consumer_pending",
            "Events of a partition not yet acked by any relay (num_pending + num_ack_pending)",
            labels=["destination", "partition"],
        )
        for (destination, partition), pending in sorted(self.relay.lag.items()):
            lag.add_metric([destination, str(partition)], pending)
        yield lag
        redelivered = CounterMetricFamily(
            "plantsync_relay_redeliveries",
            "Events this relay got again (another relay or "
            "this one did not ack in time, or a retry)",
            labels=["destination"],
        )
        delivered = CounterMetricFamily(
            "plantsync_relay_delivered",
            "Events this relay delivered (2xx, then acked)",
            labels=["destination"],
        )
        retried = CounterMetricFamily(
            "plantsync_relay_retries",
            "Failed attempts handed back to the hub with a backoff delay",
            labels=["destination"],
        )
        dead = CounterMetricFamily(
            "plantsync_relay_dead_lettered",
            "Events this relay moved to the dead letter stream",
            labels=["destination"],
        )
        unjournalled = CounterMetricFamily(
            "plantsync_relay_journal_failures",
            "Deliveries the hub's journal stream did not take (delivered all the same)",
            labels=["destination"],
        )
        for name, inbox in self.relay.inboxes.items():
            redelivered.add_metric([name], inbox.stats.redelivered)
            delivered.add_metric([name], inbox.stats.acked)
            retried.add_metric([name], inbox.stats.retried)
            dead.add_metric([name], inbox.stats.dead_lettered)
            unjournalled.add_metric([name], inbox.stats.journal_failures)
        yield from (redelivered, delivered, retried, dead, unjournalled)
        depth = GaugeMetricFamily(
            "plantsync_relay_dead_letter_depth", "Events in the dead letter stream (all relays)"
        )
        if self.relay.dead_letter_depth is not None:
            depth.add_metric([], self.relay.dead_letter_depth)
        yield depth
        up = GaugeMetricFamily(
            "plantsync_relay_destination_up",
            "1 when the destination's last request succeeded",
            labels=["destination"],
        )
        for name, forwarder in self.relay.forwarders.items():
            up.add_metric([name], 0 if forwarder.health.reachable is False else 1)
        yield up
        owned = GaugeMetricFamily(
            "plantsync_relay_partitions_owned",
            "Partitions this relay fetches from (its share; all of them while the members "
            "bucket is away)",
            labels=["destination"],
        )
        for name, inbox in self.relay.inboxes.items():
            owned.add_metric([name], len(inbox.owned))
        yield owned
        membership = self.relay.membership
        members = GaugeMetricFamily(
            "plantsync_relay_members", "Live relays in the members bucket, as this relay saw"
        )
        ownership = GaugeMetricFamily(
            "plantsync_relay_ownership",
            "1 while partitions are shared out by the members bucket; 0 while this relay "
            "fetches from every partition (the bucket is away)",
        )
        if membership is not None:
            members.add_metric([], len(membership.members))
            ownership.add_metric([], 1 if membership.ownership else 0)
        yield members
        yield ownership


class Relay:
    def __init__(self, config: HubConfig, name: str = "relay") -> None:
        self.config = config
        self.name = name
        self.inboxes: dict[str, HubInbox] = {}
        self.forwarders: dict[str, HttpForwarder] = {}
        self.lag: dict[tuple[str, int], int] = {}
        self.dead_letter_depth: int | None = None
        self.membership: Membership | None = None
        self.registry = CollectorRegistry()
        self.registry.register(RelayMetrics(self))
        self.stats_read = Counter(
            "plantsync_relay_stats_reads", "Hub stats reads", registry=self.registry
        )
        self.started = Gauge(
            "plantsync_relay_start_time_seconds", "When this relay started", registry=self.registry
        )
        self.metrics_port: int | None = None
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Connect (again, with backoff, while the hub is away) and serve until `stop()`."""
        nats_config = self.config.nats
        hosts = ", ".join(urlsplit(url).netloc for url in nats_config.servers)
        availability = Availability(f"The hub ({hosts})", log, extra={"relay": self.name})
        finished = asyncio.Event()

        async def connect_and_serve() -> Ended:
            try:
                client = await connect(
                    f"plantsync-{self.name}",
                    nats_config.servers,
                    nats_config.tls,
                    nats_config.auth,
                    connect_timeout=nats_config.timeout,
                    availability=availability,
                )
            except HubUnavailable as exc:
                if self._stopping.is_set():
                    finished.set()
                return Ended(str(exc))
            try:
                js = client.jetstream(timeout=nats_config.timeout)
                report = InitReport([])
                try:
                    await ensure_consumers(js, self.config, report)
                except nats.js.errors.APIError as exc:  # no stream yet: hub init may follow
                    return Ended(
                        f"the hub refused the relay's consumers: {exc.description} "
                        f"(error {exc.err_code}); has plantsync hub init run?",
                        say_again=True,
                    )
                availability.back()  # connected and its consumers there: serving
                log.info(
                    "Relay %s serving stream %s: %s",
                    self.name,
                    self.config.stream.name,
                    report.lines[-1],
                )
                self.started.set(time.time())
                if not await self._serve(js, client):
                    # nats-py gave the connection up (it does when the hub refuses the relay's
                    # credentials on a reconnect): connect again, with backoff, said once.
                    return Ended("the hub closed the relay's connection; connecting again")
            finally:
                await client.close()
            finished.set()
            return Ended("stopped", peer_lost=False)

        async with asyncio.TaskGroup() as group:
            connection = group.create_task(
                reconnect_forever(connect_and_serve, Backoff(base=1.0, cap=30.0), availability),
                name=f"relay-{self.name}",
            )
            await self._stopping.wait()
            if not self.inboxes:  # not connected yet: nothing to finish
                finished.set()
            await finished.wait()
            connection.cancel()

    async def _until_stopped_or_closed(self, client: Client) -> bool:
        """True once stopped; False when nats-py closed the connection for good."""
        while not self._stopping.is_set():
            if client.is_closed:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSED_CHECK):
                    await self._stopping.wait()
        return True

    async def _serve(self, js: JetStreamContext, client: Client) -> bool:
        """Serve until stopped (True) or until the connection is closed for good (False)."""
        server = _metrics_server(self)
        membership = self.membership = Membership(js, self.config, self.name, self._reassign)
        partitions = range(self.config.stream.partitions)
        membership.watch(
            consumer_name(name, p) for name in self.config.destinations for p in partitions
        )
        await membership.join()
        async with asyncio.TaskGroup() as group:
            group.create_task(server.serve(), name="relay-metrics")
            heartbeat = group.create_task(membership.run(), name="relay-members")
            workers = []
            engines = []
            for name, destination in self.config.destinations.items():
                inbox = self.inboxes[name] = HubInbox(js, self.config, name, self.name)
                await inbox.assign(self._owned(name))
                forwarder = self.forwarders[name] = HttpForwarder(name, destination, inbox)
                workers.append(group.create_task(inbox.run(), name=f"inbox-{name}"))
                engines.append(group.create_task(forwarder.run(), name=f"forward-{name}"))
            poller = group.create_task(self._poll_stats(js), name="relay-stats")
            # uvicorn says it listens only through this flag.
            while not server.started:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            self.metrics_port = server.servers[0].sockets[0].getsockname()[1]
            log.info(
                "Relay %s metrics on http://%s:%d/metrics",
                self.name,
                self.config.relay.metrics_host,
                self.metrics_port,
            )
            stopped = await self._until_stopped_or_closed(client)
            if stopped:
                log.info("Relay %s stopping: finishing deliveries in flight", self.name)
            heartbeat.cancel()
            await asyncio.wait([heartbeat])
            if stopped:
                await membership.leave()  # the others take its partitions at their next beat
            for inbox in self.inboxes.values():
                await inbox.give_back()  # no new fetches; what waits goes back to the hub
            for forwarder in self.forwarders.values():
                forwarder.drain()
            await asyncio.wait(workers)
            await asyncio.wait(engines)
            for inbox in self.inboxes.values():
                await inbox.give_back_unsent()  # the engines' read-ahead, leased but not sent
            poller.cancel()
            server.should_exit = True
        return stopped

    def _owned(self, destination: str) -> frozenset[int]:
        assert self.membership is not None
        return frozenset(
            p
            for p in range(self.config.stream.partitions)
            if self.membership.owns(consumer_name(destination, p))
        )

    async def _reassign(self) -> None:
        for name, inbox in self.inboxes.items():
            owned = self._owned(name)
            if owned != inbox.owned:
                log.info(
                    "Relay %s now fetches %d of %d partitions for %s: %s",
                    self.name,
                    len(owned),
                    self.config.stream.partitions,
                    name,
                    ", ".join(map(str, sorted(owned))) or "none",
                    extra={"relay": self.name, "destination": name},
                )
                await inbox.assign(owned)

    def status(self) -> dict[str, object]:
        membership = self.membership
        return {
            "relay": self.name,
            **(membership.snapshot() if membership is not None else {}),
            "partitions": self.config.stream.partitions,
            "owned": {name: sorted(inbox.owned) for name, inbox in self.inboxes.items()},
        }

    async def _poll_stats(self, js: JetStreamContext) -> None:
        stream = self.config.stream
        while True:
            with contextlib.suppress(nats.errors.Error):
                for destination in self.config.destinations:
                    for partition in range(stream.partitions):
                        info = await js.consumer_info(
                            stream.name, consumer_name(destination, partition)
                        )
                        self.lag[destination, partition] = (info.num_pending or 0) + (
                            info.num_ack_pending or 0
                        )
                dead = await js.stream_info(stream.dead_letter_stream)
                self.dead_letter_depth = dead.state.messages
                self.stats_read.inc()
            await asyncio.sleep(self.config.relay.stats_interval)


class _QuietServer(uvicorn.Server):
    """uvicorn inside the relay: the relay owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _metrics_server(relay: Relay) -> _QuietServer:
    async def metrics(request: Request) -> Response:
        return Response(
            generate_latest(relay.registry), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def healthz(request: Request) -> Response:
        return Response("ok\n", media_type="text/plain")

    async def status(request: Request) -> Response:
        return JSONResponse(relay.status())

    app = Starlette(
        routes=[
            Route("/metrics", metrics),
            Route("/healthz", healthz),
            Route("/status", status),
        ]
    )
    settings = relay.config.relay
    return _QuietServer(
        uvicorn.Config(
            app,
            host=settings.metrics_host,
            port=settings.metrics_port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
    )


async def run_relay(config: HubConfig, name: str) -> None:
    """Until SIGTERM/SIGINT; a second signal aborts the graceful stop."""
    relay = Relay(config, name)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def on_signal(signum: int) -> None:
        if relay._stopping.is_set():
            task.cancel()
        else:
            log.info("Received %s; stopping", signal.Signals(signum).name)
            relay.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await relay.run()


__all__ = ["Relay", "patiently", "run_relay"]
