"""The local API on this box: `/healthz`, `/readyz`, `/status` and Prometheus `/metrics`.

Metrics are collected at scrape time from the live objects (driver health, outbox counters,
forwarder health, the delivery KPIs' histograms) through one collector on a registry owned by
the daemon: there is no second set of counters to keep in step, and no package-level metric
state. `/healthz` says the process answers; `/readyz` says it does its job: the outbox open and
taking input, every driver connected, every destination delivering or buffering within
`api.ready_max_backlog_age`; it names each reason when it is not. Nothing it answers carries a
secret: every body is scrubbed of the config's secret values. The outbox's counts are read when
`/metrics`, `/status` or `/readyz` answer, so none lags behind a purge or a delivery.

Who may call what, how large and how slow a request may be, and how many connections the API
holds are `edge/ops/api_guard.py`'s business; a lot id is checked against the canonical model here
before it goes anywhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import typing
from collections.abc import Generator, Iterator
from typing import Annotated, Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from buffer.outbox import DestinationCounts
from drivers.base import finite_json
from edge.config.models import ApiConfig
from edge.config.secrets import scrub
from edge.model.events import LotDisposition
from edge.ops.api_guard import ApiGuard, ApiServerConfig, Asgi
from edge.ops.operations import (
    API_TOKEN_WHO,
    CHANGE_PATHS,
    CLI_USER_HEADER,
    NotFound,
    Operation,
    OperationError,
)
from edge.ops.status import (
    GatewayView,
    not_ready_reasons,
    readiness,
    status_report,
    sync_success_ratio,
)
from edge.ops.terminal import printable

log = logging.getLogger(__name__)


class GatewayCollector(Collector):
    """The gateway's metrics, collected at scrape time from one snapshot of it."""

    def __init__(self, view: GatewayView) -> None:
        self.view = view

    def collect(self) -> Iterator[Any]:
        facts = self.view.facts()
        connected = GaugeMetricFamily(
            "plantsync_driver_connected",
            "1 when the driver is connected to its device",
            labels=["driver"],
        )
        samples = CounterMetricFamily(
            "plantsync_driver_samples", "Samples received from the driver", labels=["driver"]
        )
        errors = CounterMetricFamily(
            "plantsync_driver_errors", "Read or connection errors of the driver", labels=["driver"]
        )
        age = GaugeMetricFamily(
            "plantsync_driver_last_sample_age_seconds",
            "Seconds since the driver's last sample",
            labels=["driver"],
        )
        for driver in facts.drivers:
            connected.add_metric([driver.name], 1.0 if driver.connected else 0.0)
            samples.add_metric([driver.name], driver.samples)
            errors.add_metric([driver.name], driver.errors or 0)
            if driver.last_sample_age is not None:
                age.add_metric([driver.name], driver.last_sample_age)
        rejected = CounterMetricFamily(
            "plantsync_driver_rejected_messages",
            "Messages kept as input dead letters (malformed or invalid)",
            labels=["driver"],
        )
        dropped = CounterMetricFamily(
            "plantsync_driver_dropped_messages",
            "QoS 0 messages dropped while the outbox could not take them",
            labels=["driver"],
        )
        broker = {
            name: GaugeMetricFamily(f"plantsync_mqtt_broker_{name}", text, labels=["driver"])
            for name, text in (
                (
                    "dropped_messages",
                    "Messages the MQTT broker dropped since it started (its "
                    "$SYS/broker/publish/messages/dropped, all clients): full client queues",
                ),
                ("stored_messages", "Messages the MQTT broker holds ($SYS store count)"),
                ("uptime_seconds", "Seconds since the MQTT broker started ($SYS uptime)"),
            )
        }
        backlog = GaugeMetricFamily(
            "plantsync_mqtt_backlog_peak_messages",
            "Most MQTT messages received and not yet committed at once (bounded by 4 batches)",
            labels=["driver"],
        )
        for driver in facts.drivers:
            rejected.add_metric([driver.name], driver.rejected)
            if driver.dropped_qos0 is not None:
                dropped.add_metric([driver.name], driver.dropped_qos0)
            for metric, figure in (
                ("dropped_messages", "dropped"),
                ("stored_messages", "stored_messages"),
                ("uptime_seconds", "uptime"),
            ):
                value = driver.broker.get(figure)
                if isinstance(value, float):
                    broker[metric].add_metric([driver.name], value)
            if driver.peak_backlog is not None:
                backlog.add_metric([driver.name], driver.peak_backlog)
        yield from (connected, samples, errors, age, rejected, dropped, *broker.values(), backlog)

        # Renamed in this release (a name ending in _units reads as a unit; a ratio says so);
        # the old names stay, with the same values, for one release (README: metrics).
        for name, deprecated in (
            ("plantsync_unassigned_production", ""),
            ("plantsync_unassigned_units", " (deprecated: plantsync_unassigned_production_total)"),
        ):
            unassigned = CounterMetricFamily(
                name,
                f"Units counted with no order bound (reported, not posted){deprecated}",
                labels=["machine"],
            )
            for machine in facts.machines:
                unassigned.add_metric([machine["id"]], machine["unassigned"])
            yield unassigned
        lots = list(facts.genealogy.values())
        if lots:
            complete = sum(f["complete"] for f in lots) / sum(f["lots"] for f in lots)
            for name, deprecated in (
                ("plantsync_genealogy_completeness_ratio", ""),
                (
                    "plantsync_genealogy_completeness",
                    " (deprecated: plantsync_genealogy_completeness_ratio)",
                ),
            ):
                yield GaugeMetricFamily(
                    name,
                    "Share of produced lots (recent orders) whose "
                    "input lots cover every required material"
                    f"{deprecated}",
                    value=complete,
                )
        events = CounterMetricFamily(
            "plantsync_events", "Events committed to the outbox", labels=["type"]
        )
        for event_type, count in sorted(facts.events_by_type.items()):
            events.add_metric([event_type], count)
        yield events

        stats = facts.outbox.stats
        for name, value, text in (
            ("delivered", stats.delivered, "Deliveries acknowledged by their destination"),
            ("retries", stats.retries, "Delivery attempts that will be retried"),
            ("dead_letters", stats.dead_lettered, "Deliveries moved to dead letters"),
            (
                "duplicates_ignored",
                stats.duplicates_ignored,
                "Events committed again with an id the outbox already held",
            ),
            ("transactions", stats.transactions, "Outbox transactions (group commits)"),
            (
                "refused_informational",
                stats.refused_informational,
                "Informational events refused because the outbox was at its disk budget",
            ),
            (
                "dead_letters_retried",
                stats.dead_retried,
                "Dead letters put back in line by hand (manual interventions)",
            ),
            ("disk_full_waits", stats.disk_full_waits, "Times the disk was full"),
            (
                "payloads_purged",
                stats.payloads_purged,
                "Payloads of delivered events deleted in bulk, after their settle",
            ),
            (
                "leased_from_memory",
                stats.leased_from_memory,
                "Deliveries leased without a read: committed by this process, held in memory",
            ),
        ):
            yield CounterMetricFamily(f"plantsync_outbox_{name}", text, value=value)

        depth = GaugeMetricFamily(
            "plantsync_outbox_depth", "Deliveries held, by state", labels=["destination", "state"]
        )
        oldest = GaugeMetricFamily(
            "plantsync_outbox_oldest_pending_seconds",
            "Age of the oldest pending delivery",
            labels=["destination"],
        )
        # Every configured destination has its series, at 0 too: a series that vanishes
        # when the outbox empties reads as "no data", not "nothing owed".
        held = {name: DestinationCounts() for name in facts.configured_destinations or ()}
        for destination, counts in sorted((held | dict(facts.counts)).items()):
            depth.add_metric([destination, "pending"], counts.pending)
            depth.add_metric([destination, "retrying"], counts.retrying)
            depth.add_metric([destination, "dead"], counts.dead)
            if counts.oldest_pending_age is not None:
                oldest.add_metric([destination], counts.oldest_pending_age)
        yield from (depth, oldest)

        reachable = GaugeMetricFamily(
            "plantsync_destination_up",
            "1 when the last delivery attempt succeeded",
            labels=["destination"],
        )
        for forwarder in facts.destinations:
            reachable.add_metric([forwarder.name], 0.0 if forwarder.reachable is False else 1.0)
        yield reachable
        delivered = CounterMetricFamily(
            "plantsync_destination_delivered",
            "Deliveries acknowledged since the daemon started (from the journal)",
            labels=["destination"],
        )
        for name, count in sorted(facts.delivered_since_start.items()):
            delivered.add_metric([name], count)
        ratio = GaugeMetricFamily(
            "plantsync_sync_success_ratio",
            "Delivery success per destination: acknowledged since start "
            "/ (acknowledged + dead letters parked now); the order sync "
            "success rate is plantsync_order_sync_success_ratio",
            labels=["destination"],
        )
        for name, share in sync_success_ratio(facts).items():
            ratio.add_metric([name], share)
        yield from (delivered, ratio)
        yield from self.view.kpi_metrics()
        yield CounterMetricFamily(
            "plantsync_kpi_untracked",
            "Events or lots that fell out of the KPI bounds unmeasured",
            value=facts.kpi_untracked,
        )
        yield GaugeMetricFamily(
            "plantsync_ready",
            "1 when /readyz answers ready",
            value=0.0 if not_ready_reasons(facts) else 1.0,
        )
        reloads = CounterMetricFamily(
            "plantsync_config_reloads", "Config reloads (SIGHUP) by outcome", labels=["outcome"]
        )
        for outcome, count in sorted(facts.reloads.items()):
            reloads.add_metric([outcome], count)
        yield reloads
        outbox = facts.outbox
        yield GaugeMetricFamily(
            "plantsync_outbox_database_bytes",
            "Size of the outbox files",
            value=outbox.database_bytes,
        )
        yield GaugeMetricFamily(
            "plantsync_outbox_used_bytes",
            "Bytes the outbox's data uses, measured against max_size",
            value=outbox.used_bytes,
        )
        yield GaugeMetricFamily(
            "plantsync_outbox_back_pressure",
            "1 while input is paused because the outbox has no room",
            value=0.0 if outbox.back_pressure is None else 1.0,
        )
        yield GaugeMetricFamily(
            "plantsync_outbox_recovered_from_corruption",
            "1 when a damaged outbox database was moved aside at start",
            value=0.0 if outbox.recovered_from is None else 1.0,
        )
        yield GaugeMetricFamily(
            "plantsync_outbox_integrity_problem",
            "1 when the integrity check found the database damaged",
            value=0.0 if outbox.integrity_problem is None else 1.0,
        )


def create_app(gateway: GatewayView, api: ApiConfig) -> Asgi:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(GatewayCollector(gateway))

    def answer(body: Any, status_code: int = 200) -> Response:
        return JSONResponse(scrub(finite_json(body), gateway.secrets), status_code=status_code)

    async def healthz(request: Request) -> Response:
        return answer({"status": "alive", "phase": str(gateway.phase)})

    async def readyz(request: Request) -> Response:
        await gateway.refresh_counts()
        body = readiness(gateway.facts())
        return answer(body, status_code=200 if body["ready"] else 503)

    async def status(request: Request) -> Response:
        await gateway.refresh_counts()
        return answer(status_report(gateway.facts()))

    async def metrics(request: Request) -> Response:
        await gateway.refresh_counts()
        text = scrub(generate_latest(registry).decode(), gateway.secrets)
        return Response(text.encode(), media_type=CONTENT_TYPE_LATEST)

    async def outbox(request: Request) -> Response:
        operation = request.path_params["operation"]
        if operation not in typing.get_args(Operation):
            return JSONResponse({"error": f"unknown operation {operation!r}"}, status_code=404)
        # The token was checked by the guard where it is needed; the OS user is what the CLI
        # says, journalled as such.
        claimed = request.headers.get(CLI_USER_HEADER)
        who = API_TOKEN_WHO + (f" ({printable(claimed[:100])}, as the CLI says)" if claimed else "")
        try:
            args = json.loads(await request.body() or b"{}")
            if not isinstance(args, dict):
                raise OperationError("the body must be a JSON object")
            result = await gateway.perform(operation, args, who)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return JSONResponse({"error": f"the body is not JSON: {exc}"}, status_code=400)
        except OperationError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except NotFound as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        return answer(result)

    async def lot(request: Request) -> Response:
        lot_id = request.path_params["lot_id"]
        problem = lot_id_problem(lot_id)
        if problem is not None:
            return JSONResponse({"error": problem}, status_code=400)
        return answer(await gateway.lot_status(lot_id))

    async def exceptions(request: Request) -> Response:
        state = request.query_params.get("state", "all")
        if state not in ("open", "closed", "all"):
            return JSONResponse({"error": "state must be open, closed or all"}, status_code=400)
        try:
            since = float(request.query_params.get("since", "0"))
            limit = min(1000, int(request.query_params.get("limit", "200")))
        except ValueError:
            return JSONResponse({"error": "since is a Unix time, limit a number"}, status_code=400)
        rows = gateway.exception_list(state, since, limit)
        return answer(
            {"exceptions": rows, "open": sum(1 for row in rows if row["state"] == "open")}
        )

    async def reconciliation(request: Request) -> Response:
        return answer(gateway.reconciliation())

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/status", status),
            Route("/metrics", metrics),
            Route("/outbox/{operation}", outbox, methods=["POST"]),
            Route("/lots/{lot_id:path}", lot),
            Route("/exceptions", exceptions),
            Route("/reconciliation", reconciliation),
        ]
    )
    return ApiGuard(
        app, token=lambda: gateway.api_token, changes=CHANGE_PATHS, on_loopback=api.on_loopback
    )


_LOT_ID: TypeAdapter[str] = TypeAdapter(
    Annotated[str, LotDisposition.model_fields["lot_id"]]
)  # the canonical model's rule


def lot_id_problem(lot_id: str) -> str | None:
    """Why `lot_id` cannot be a lot number of the canonical model, or None when it can. Checked
    before the id goes anywhere (the outbox, the QMS)."""
    try:
        _LOT_ID.validate_python(lot_id)
    except ValidationError as exc:
        error = exc.errors()[0]
        if error["type"] == "string_too_long":
            return (
                f"lot_id is {len(lot_id)} characters long; a lot number has at most "
                f"{error['ctx']['max_length']}"
            )
        return (
            f"lot_id {printable(lot_id[:80])!r} is not a lot number: it must start with a "
            "letter or digit and hold only letters, digits and . _ : / -"
        )
    return None


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside our daemon: the daemon owns the signals, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def make_server(gateway: GatewayView, api: ApiConfig) -> EmbeddedServer:
    if not api.on_loopback:
        log.warning(
            "The local API listens off loopback, on %s: every call but /healthz, "
            "/readyz and /metrics needs the token (Authorization: Bearer ...)",
            api.listen,
        )
    config = ApiServerConfig(
        create_app(gateway, api),
        host=api.host,
        port=api.port,
        max_connections=api.max_connections,
        request_timeout=api.request_timeout,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    return EmbeddedServer(config)
