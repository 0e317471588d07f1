"""How the gateway is, said once: status, readiness, degradation and alarms.

Every place that says how the gateway is reads it from here, in the same words: `/status`,
`/readyz` and `/metrics` on the local API, the systemd `STATUS=` line, and `plantsync status`
(from the running daemon, or from the database when no daemon answers). They all start from a
`GatewayFacts`: a read-only snapshot of what one look at the gateway sees (drivers,
destinations, the outbox and its counts, machines, signals). The running gateway takes one on
every request (`Gateway.facts`, in `edge.runtime.reporting`); `plantsync status` builds one from the
database, where what only a running daemon knows (a driver's connection, a destination's
reachability) is None: unknown, never guessed.

Readiness (`not_ready_reasons`) is what stops the gateway doing its job; degradation
(`degraded`) is what is wrong but within budget; alarms (`alarms`) need a person even though the
gateway runs on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client.core import Metric

from buffer.outbox import DestinationCounts, OutboxStats
from drivers.base import Quality, Sample, json_value
from edge.ops.operations import Operation
from edge.rules.machine import MachineRule

RUNNING = "running"
STOPPED = "stopped"
"""The phase of a gateway seen from its database: no daemon answers."""


@dataclass(frozen=True)
class DriverFacts:
    """One driver as status sees it; None where only a running daemon would know."""

    name: str
    connected: bool | None = None
    last_sample_age: float | None = None
    reads: int | None = None
    errors: int | None = None
    last_error: str | None = None
    degraded: Mapping[str, str] = field(default_factory=dict)
    """The driver's own notes on what is wrong but does not stop it, by its key."""
    samples: int = 0
    rejected: int = 0
    dropped_qos0: int | None = None
    """MQTT: QoS 0 messages dropped while the outbox could not take them."""
    broker: Mapping[str, float | str] = field(default_factory=dict)
    """MQTT: the broker's `$SYS` figures."""
    peak_backlog: int | None = None
    """MQTT: most messages received and not yet committed at once."""


@dataclass(frozen=True)
class DestinationFacts:
    """One configured destination's delivery health (its forwarder's)."""

    name: str
    reachable: bool | None = None
    delivered: int = 0
    in_flight: int = 0
    last_error: str | None = None


@dataclass(frozen=True)
class OutboxFacts:
    back_pressure: str | None = None
    used_bytes: int = 0
    max_bytes: int | None = None
    recovered_from: str | None = None
    integrity_problem: str | None = None
    stats: OutboxStats = field(default_factory=OutboxStats)
    database_bytes: int = 0


@dataclass(frozen=True)
class GatewayFacts:
    """A read-only snapshot of the gateway: what every status answer is built from."""

    site: str | None
    phase: str
    ready_max_backlog_age: float
    drivers: Sequence[DriverFacts]
    destinations: Sequence[DestinationFacts]
    counts: Mapping[str, DestinationCounts]
    """The outbox's counts per destination, configured or not."""
    outbox: OutboxFacts
    configured_destinations: frozenset[str] | None = None
    """None when the config could not be read: then no destination is called unconfigured."""
    uptime_seconds: float | None = None
    input_dead_letters: Mapping[str, int] = field(default_factory=dict)
    machines: Sequence[Mapping[str, Any]] = ()
    """`machine_status` of each machine's rule."""
    signals: Mapping[str, Sample] = field(default_factory=dict)
    genealogy: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    quality: Mapping[str, Any] | None = None
    events_by_type: Mapping[str, int] = field(default_factory=dict)
    delivered_since_start: Mapping[str, int] = field(default_factory=dict)
    """Deliveries acknowledged since the daemon started, from the journal (the KPIs)."""
    kpi_untracked: int = 0
    """Events or lots that fell out of the KPI bounds unmeasured."""
    reloads: Mapping[str, int] = field(default_factory=dict)
    orders: Mapping[str, Any] | None = None
    """Released orders from ERP to the MES (with an `orders` section): the source's health
    and the order book's figures and newest issues."""
    operations: Mapping[str, Any] = field(default_factory=dict)
    """Open exceptions, the eight KPIs and the last reconciliation (`edge.ops.watch`); in
    `plantsync status` from the database, the open exceptions only."""


class GatewayView(Protocol):
    """What the local API may see and ask of the running gateway: snapshots, the outbox
    operations and the lot status. Nothing else of the daemon is in its reach."""

    @property
    def secrets(self) -> set[str]: ...

    @property
    def api_token(self) -> str: ...

    @property
    def phase(self) -> str: ...

    async def refresh_counts(self) -> None: ...

    def facts(self) -> GatewayFacts: ...

    def kpi_metrics(self) -> Iterator[Metric]: ...

    async def perform(self, operation: Operation, args: dict[str, Any], who: str) -> Any: ...

    async def lot_status(self, lot_id: str) -> dict[str, Any]: ...

    def exception_list(self, state: str, since: float, limit: int) -> list[dict[str, Any]]: ...

    def reconciliation(self) -> dict[str, Any]: ...


def orphaned(facts: GatewayFacts) -> dict[str, DestinationCounts]:
    """Undelivered events held for destinations the config no longer names."""
    if facts.configured_destinations is None:
        return {}
    return {
        name: counts
        for name, counts in sorted(facts.counts.items())
        if name not in facts.configured_destinations
    }


def not_ready_reasons(facts: GatewayFacts) -> list[str]:
    reasons = []
    if facts.phase != RUNNING:
        reasons.append(f"the gateway is {facts.phase}")
    if facts.outbox.back_pressure is not None:
        reasons.append(facts.outbox.back_pressure)
    for driver in facts.drivers:
        if driver.connected is False:
            why = f" ({driver.last_error})" if driver.last_error else ""
            reasons.append(f"driver {driver.name} is not connected{why}")
    budget = facts.ready_max_backlog_age
    for destination in facts.destinations:
        counts = facts.counts.get(destination.name)
        age = counts.oldest_pending_age if counts is not None else None
        if counts is not None and age is not None and age > budget:
            error = destination.last_error
            reasons.append(
                f"destination {destination.name}: the oldest pending delivery is {age:.0f}s "
                f"old, over the {budget:g}s budget (api.ready_max_backlog_age); "
                f"{counts.pending} event(s) buffered" + (f"; last error: {error}" if error else "")
            )
    return reasons


def degraded(facts: GatewayFacts) -> list[str]:
    """What is wrong but still within budget: worth a look, not a reason to be unready."""
    notes = []
    budget = facts.ready_max_backlog_age
    for destination in facts.destinations:
        counts = facts.counts.get(destination.name, DestinationCounts())
        age = counts.oldest_pending_age
        if destination.reachable is False and (age is None or age <= budget):
            notes.append(
                f"destination {destination.name} is failing "
                f"({destination.last_error}); {counts.pending} event(s) "
                "buffered, within budget"
            )
    for driver in facts.drivers:
        notes.extend(f"driver {driver.name}: {note}" for _, note in sorted(driver.degraded.items()))
    for name, counts in orphaned(facts).items():
        notes.append(
            f"the outbox holds {counts.pending} undelivered and {counts.dead} "
            f"dead event(s) for destination {name}, which the config no longer "
            "names"
        )
    notes += [f"tag {signal} reads BAD: {why}" for signal, why in bad_tags(facts)]
    return notes


def bad_tags(facts: GatewayFacts) -> list[tuple[str, str]]:
    """Configured tags whose latest reading has BAD quality: the device says the value
    cannot be used (a sensor fault, a node that does not exist, a stale value). A tag its
    driver already reports (`health.degraded`, e.g. one the Modbus device refuses) is
    said once, by the driver."""
    now = time.time()
    told = {
        f"{driver.name}.{key.removeprefix('tag ')}"
        for driver in facts.drivers
        for key in driver.degraded
    }
    return [
        (name, f"the device marks its value unusable (for {now - sample.source_time:.0f}s)")
        for name, sample in sorted(facts.signals.items())
        if sample.quality is Quality.BAD and name not in told
    ]


def alarms(facts: GatewayFacts) -> list[str]:
    """What needs a person even though the gateway runs on."""
    found = []
    if facts.outbox.recovered_from:
        found.append(
            "the outbox database was damaged at start and moved aside: "
            f"{facts.outbox.recovered_from}"
        )
    if facts.outbox.integrity_problem:
        found.append(
            "the outbox database failed its integrity check: "
            f"{facts.outbox.integrity_problem}; it is moved aside at the next start"
        )
    for name, counts in sorted(facts.counts.items()):
        if counts.dead:
            found.append(
                f"{counts.dead} business event(s) for destination {name} are dead "
                "letters (refused for good): look with plantsync outbox list "
                "--state dead, then retry or purge-dead them with --reason"
            )
    return found


def readiness(facts: GatewayFacts) -> dict[str, Any]:
    """The body of `/readyz`."""
    reasons = not_ready_reasons(facts)
    return {
        "ready": not reasons,
        "reasons": reasons,
        "degraded": degraded(facts),
        "alarms": alarms(facts),
    }


def status_line(facts: GatewayFacts) -> str:
    """One line for `systemctl status`: drivers, outbox depth, dead letters, back-pressure."""
    connected = sum(1 for d in facts.drivers if d.connected)
    counts = facts.counts.values()
    pending = sum(c.pending for c in counts)
    retrying = sum(c.retrying for c in counts)
    dead = sum(c.dead for c in counts)
    pressure = "ON" if facts.outbox.back_pressure is not None else "off"
    phase = "" if facts.phase in (RUNNING, "starting") else f"{facts.phase}: "
    return (
        f"{phase}drivers {connected}/{len(facts.drivers)} connected; outbox {pending} "
        f"pending ({retrying} retrying), {dead} dead; back-pressure {pressure}"
    )


def sync_success_ratio(facts: GatewayFacts) -> dict[str, float]:
    """Per destination: acknowledged / (acknowledged + dead letters parked now)."""
    ratios = {}
    for name in sorted(set(facts.configured_destinations or ()) | set(facts.counts)):
        delivered = facts.delivered_since_start.get(name, 0)
        dead = facts.counts.get(name, DestinationCounts()).dead
        if delivered + dead:
            ratios[name] = delivered / (delivered + dead)
    return ratios


def status_report(facts: GatewayFacts) -> dict[str, Any]:
    """The body of `/status`, and what `plantsync status` shows."""
    now = time.time()
    reasons = not_ready_reasons(facts)
    found = alarms(facts)
    outbox = facts.outbox
    return {
        "site": facts.site,
        "uptime_seconds": _round1(facts.uptime_seconds),
        "phase": facts.phase,
        "ready": not reasons,
        "not_ready_reasons": reasons,
        "degraded": degraded(facts),
        "drivers": [
            {
                "name": d.name,
                "connected": d.connected,
                "last_sample_age": _round(d.last_sample_age),
                "reads": d.reads,
                "errors": d.errors,
                "last_error": d.last_error,
                "degraded": sorted(d.degraded.values()),
            }
            for d in facts.drivers
        ],
        "signals": {
            name: signal_status(sample, now) for name, sample in sorted(facts.signals.items())
        },
        "machines": [dict(machine) for machine in facts.machines],
        "genealogy": dict(facts.genealogy),
        "orders": dict(facts.orders) if facts.orders is not None else None,
        "quality": dict(facts.quality) if facts.quality is not None else None,
        "outbox": {
            "back_pressure": outbox.back_pressure,
            "used_bytes": outbox.used_bytes,
            "max_bytes": outbox.max_bytes,
            "recovered_from": outbox.recovered_from,
            "alarms": found,
            "refused_informational": outbox.stats.refused_informational,
            "duplicates_ignored": outbox.stats.duplicates_ignored,
            "dead_letters_retried": outbox.stats.dead_retried,
        },
        "destinations": {
            d.name: {
                "reachable": d.reachable,
                "delivered": d.delivered,
                "in_flight": d.in_flight,
                "last_error": d.last_error,
                **vars(facts.counts.get(d.name, DestinationCounts())),
            }
            for d in facts.destinations
        },
        "unconfigured_destinations": {
            name: vars(counts) for name, counts in orphaned(facts).items()
        },
        "sync_success_ratio": {
            name: round(ratio, 4) for name, ratio in sync_success_ratio(facts).items()
        },
        "input_dead_letters": {
            "count": sum(facts.input_dead_letters.values()),
            "by_source": dict(sorted(facts.input_dead_letters.items())),
        },
        "alarms": found,
        "config_reloads": dict(facts.reloads),
        **facts.operations,
    }


def signal_status(sample: Sample, now: float) -> dict[str, Any]:
    """What `/status` shows of a signal's last reading. A NaN or infinity from the device is
    `null` with quality bad and its name in `nonfinite`: JSON has no such numbers."""
    value, nonfinite = json_value(sample.value)
    shown: dict[str, Any] = {
        "value": value,
        "quality": str(sample.quality),
        "age": _round(now - sample.source_time),
    }
    if nonfinite is not None:
        shown["quality"] = str(Quality.BAD)
        shown["nonfinite"] = nonfinite
    return shown


def machine_status(rule: MachineRule) -> dict[str, Any]:
    """What `/status` and `plantsync status` show of a machine: its order, state and counts."""
    binding = rule.state.binding
    return {
        "id": rule.machine.id,
        "order_id": binding.order_id if binding else None,
        "operation": binding.operation if binding else None,
        "lot_id": binding.lot_id if binding else None,
        "state": rule.state.machine_state,
        **rule.totals(),
        "unassigned": rule.state.unassigned,
        "unassigned_scrap": rule.state.unassigned_scrap,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _round1(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
