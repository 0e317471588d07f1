"""Kill -9 fault runs: the real daemon, the real PLC and ERP simulators, and many hard kills.

One Modbus PLC simulator counts good and scrap parts up to a known stop value; many drivers
poll it (the simulator answers any unit id), each feeding its own machine with its own order,
so every machine is its own partition key. With `every_units: 1` and a 50 ms poll, every poll
that sees the counter move commits one confirmation per machine: hundreds of events a second
(`every: 2s` confirms the scrap counted after the last good unit). The ERP simulator answers
with a little latency, so deliveries are in flight when the gateway is killed with SIGKILL at
random moments (seeded; the seed is in every assertion message, and `PLANTSYNC_FAULT_SEED`
replays one) and restarted right away, again and again.

At the end (PLC complete, everything delivered, a graceful stop so the outbox is quiescent):

- the ids ERP holds are exactly the ids the outbox ever committed (`event_ids`): nothing lost,
  nothing invented, and each held once (ERP honours `Idempotency-Key`; its duplicate counters
  show how many redeliveries the kills caused, which is reported, not asserted);
- no delivery is left in the outbox;
- per machine, the oracle is the machine: the PLC simulator's own counters (read from it over
  Modbus at the end) minus the gateway's single baseline per counter (its first reading; one per
  counter over all the kills, asserted) equal what ERP holds plus what is still pending, for
  good and scrap; and the confirmations' counter ranges tile [0, good total) with no gap and no
  overlap (a gateway that re-baselined after a restart, or skipped units, fails here however
  consistent its own records are);
- per partition key, ERP saw the events in commit order: first copies with `sequence` strictly
  increasing and each counter range starting where the previous one ended, and no copy
  (redeliveries included, from ERP's request log) of an event after a later event of its key.

The short size runs with `make test`; the full size (>= 20 kills, >= 20,000 events) is marked
`slow` and runs with `make faults`. Each prints one JSON line with its figures.
"""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge.model.events import EVENT_MODELS
from tests.conftest import (
    ErpSim,
    Peer,
    PlcSim,
    counter_baselines,
    free_port,
    start_peer,
    start_plc,
)
from tests.gateway_process import GatewayProcess

CONFIRMATION_TYPE = "com.plantsync.edge.production.confirmation.v1"  # as ERP receives it


@dataclass(frozen=True)
class Size:
    kills: int
    min_events: int
    machines: int
    counting_seconds: float
    """How long the PLC counts; the kills happen while it does."""
    rate: int = 1000
    """Good units per second: 50 per PLC tick, so every poll sees the counter move."""
    scrap_rate: int = 7


# The short run shares 2 cores with three other test workers in `make test`: 1,000 events
# (over 300 per kill) still make every kill land mid-traffic; it made 1,825-2,900 there.
SHORT = Size(kills=3, min_events=1_000, machines=10, counting_seconds=22.0)
FULL = Size(kills=20, min_events=20_000, machines=20, counting_seconds=110.0)


@pytest.fixture
def erp_logging(peers: list[Peer], tmp_path: Path) -> ErpSim:
    """The ERP simulator, printing one line per request it takes (duplicates included), so
    the order of every copy it received can be checked, not only of the first ones."""
    port = free_port()
    peer = start_peer(
        peers,
        [
            sys.executable,
            "-m",
            "simulators.erp",
            "--port",
            str(port),
            "--db",
            str(tmp_path / "erp.db"),
            "--log-requests",
        ],
        tmp_path / "erp.log",
        "erp-api listening",
    )
    return ErpSim(peer, f"http://127.0.0.1:{port}")


@pytest.mark.integration
@pytest.mark.parametrize(
    "size",
    [
        pytest.param(SHORT, id="short"),
        pytest.param(FULL, id="full", marks=pytest.mark.slow),
    ],
)
def test_kill_9_loses_nothing_invents_nothing_and_keeps_order(
    peers: list[Peer],
    erp_logging: ErpSim,
    tmp_path: Path,
    size: Size,
    capsys: pytest.CaptureFixture[str],
) -> None:
    erp = erp_logging
    seed = int(os.environ.get("PLANTSYNC_FAULT_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    tag = f"[seed {seed}; replay with PLANTSYNC_FAULT_SEED={seed}; logs in {tmp_path}]"

    stop_at = int(size.rate * size.counting_seconds)
    erp.set_faults(latency=0.005)  # deliveries are in flight when the gateway is killed
    plc = start_plc(
        peers,
        tmp_path,
        "--rate",
        str(size.rate),
        "--scrap-rate",
        str(size.scrap_rate),
        "--start",
        "0",
        "--stop-at",
        str(stop_at),
    )
    config = write_config(tmp_path, plc, erp, size.machines)
    database = tmp_path / "data" / "outbox.db"
    machines = [f"m{i:02d}" for i in range(size.machines)]
    runs = GatewayProcess(peers, config, tmp_path)

    counting_until = time.monotonic() + size.counting_seconds
    runs.start()
    kills_while_counting = 0
    first_delivery: list[float] = []
    for _ in range(size.kills):
        deadline = time.monotonic() + rng.uniform(0.2, 2.0)
        seen = _wait_first_delivery(erp, runs, deadline)
        if seen is not None:
            first_delivery.append(seen)
        _sleep_until(deadline)
        kills_while_counting += time.monotonic() < counting_until
        runs.kill()
        runs.start()

    # No more kills: let the PLC reach its stop value and the gateway deliver everything,
    # then stop it gracefully so that the outbox is quiescent when it is read.
    wait_for(
        lambda: _settled(database, erp, machines, stop_at),
        size.counting_seconds + 300,
        f"the PLC to complete and ERP to hold everything {tag}",
    )
    gateway = runs.current
    assert gateway.stop() == 0, f"the graceful stop failed {tag}:\n{gateway.output()[-3000:]}"

    # -- what the gateway committed, and what ERP holds ---------------------------------------
    committed, pending, states = _read_outbox(database)
    rows = _erp_events(erp)
    stats = erp.stats()
    arrivals = _arrivals(erp)
    received = [row["id"] for row in rows]
    received_set = set(received)
    lost = committed - received_set
    invented = received_set - committed
    duplicates = sum(int(row["duplicates"]) for row in rows)

    figures = {
        "test": "kill-9",
        "size": "full" if size is FULL else "short",
        "seed": seed,
        "machines": size.machines,
        "events_expected": len(committed),
        "delivered_unique": len(received_set),
        "duplicates_seen_by_receiver": duplicates,
        "received_total": stats["received"],
        "lost": len(lost),
        "invented": len(invented),
        "kills": runs.kills,
        "kills_while_plc_counting": kills_while_counting,
        "recovery_time_s": round(max(runs.ready_times[1:], default=0.0), 3),
        "first_delivery_after_restart_s": round(max(first_delivery, default=0.0), 3),
        "run_s": round(time.monotonic() - runs.started_at, 1),
    }
    with capsys.disabled():  # shown by `make faults` too, which does not pass -s
        print(f"\n{json.dumps(figures)}", flush=True)

    assert not lost, (
        f"{len(lost)} committed event(s) never reached ERP, e.g. {sorted(lost)[:5]} {tag}"
    )
    assert not invented, (
        f"ERP holds {len(invented)} event(s) never committed, e.g. {sorted(invented)[:5]} {tag}"
    )
    assert len(received) == len(received_set), f"ERP holds an event id twice {tag}"
    assert all(row["key"] == row["id"] for row in rows), f"Idempotency-Key is not the id {tag}"
    assert pending == 0, f"{pending} delivery row(s) left in the outbox {tag}"
    assert stats["unique"] == len(committed), f"{stats} vs {len(committed)} committed {tag}"
    assert stats["duplicates"] == duplicates, f"{stats} vs {duplicates} duplicates {tag}"
    assert len(arrivals) == stats["received"], f"{len(arrivals)} logged requests, {stats} {tag}"

    # -- per machine: the PLC's own counters, less one baseline, are in ERP or pending --------
    plc_good, plc_scrap = plc.counters()
    assert plc_good == stop_at, f"the PLC stopped at {plc_good}, not {stop_at} {tag}"
    logs = "".join(run.output() for run in runs.runs)
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_key[str(row["partitionkey"])].append(row["event"])
    assert sorted(by_key) == sorted(_order_id(m) for m in machines), f"{sorted(by_key)} {tag}"
    for machine in machines:
        events = by_key[_order_id(machine)]
        confirmations = [e for e in events if e["type"] == CONFIRMATION_TYPE]
        state = states[f"machine:{machine}"]
        good, scrap = state["good"], state["scrap"]
        where = f"machine {machine} {tag}"
        good_baselines = counter_baselines(logs, f"{machine}.good")
        scrap_baselines = counter_baselines(logs, f"{machine}.bad")
        assert len(good_baselines) == 1, (
            f"{len(good_baselines)} baselines of the good counter over {runs.kills} kills: "
            f"{good_baselines}, {where}"
        )
        assert len(scrap_baselines) == 1, f"scrap baselines {scrap_baselines}, {where}"
        pending_good, pending_scrap = _pending_units(database, _order_id(machine), state)
        erp_good = sum(Decimal(e["data"]["yield_quantity"]["value"]) for e in confirmations)
        erp_scrap = sum(Decimal(e["data"]["scrap_quantity"]["value"]) for e in confirmations)
        assert plc_good - good_baselines[0] == erp_good + pending_good, (
            f"the PLC counted {plc_good - good_baselines[0]} good units after the baseline "
            f"{good_baselines[0]}; ERP holds {erp_good}, {pending_good} pending, {where}"
        )
        assert plc_scrap - scrap_baselines[0] == erp_scrap + pending_scrap, (
            f"the PLC counted {plc_scrap - scrap_baselines[0]} scrap after the baseline "
            f"{scrap_baselines[0]}; ERP holds {erp_scrap}, {pending_scrap} pending, {where}"
        )
        assert pending_good == pending_scrap == 0, f"settled, yet units pending {where}"
        ranges = sorted((e["data"]["counter_from"], e["data"]["counter_to"]) for e in confirmations)
        position = 0
        for low, high in ranges:
            assert low == position <= high, f"gap or overlap at {position}: ({low}, {high}) {where}"
            position = high
        assert position == good["total"], f"ranges end at {position}, not {good['total']} {where}"
        assert (
            sum(Decimal(e["data"]["yield_quantity"]["value"]) for e in confirmations)
            == good["total"]
        ), where
        assert (
            sum(Decimal(e["data"]["scrap_quantity"]["value"]) for e in confirmations)
            == scrap["total"]
        ), where
        # The rule numbers its events 1, 2, ...: as many as it committed, all in ERP.
        assert len(events) == state["sequence"], f"{len(events)} events, state {state} {where}"

        # -- order: ERP's arrival order of first copies is the commit order ---------------------
        previous_sequence, previous_to = "", 0
        for event in events:
            sequence = event["sequence"]
            assert sequence > previous_sequence, (
                f"out of commit order: sequence {sequence} (id {event['id']}) arrived after "
                f"{previous_sequence}, {where}"
            )
            previous_sequence = sequence
            if event["type"] == CONFIRMATION_TYPE:
                low = event["data"]["counter_from"]
                assert low == previous_to, (
                    f"out of commit order: counter {low}.. (id {event['id']}, sequence "
                    f"{sequence}) arrived after a confirmation up to {previous_to}, {where}"
                )
                previous_to = event["data"]["counter_to"]

    # -- order across retries: no copy of an event arrives after a later event of its key ----
    position_of = {row["id"]: (str(row["partitionkey"]), row["event"]["sequence"]) for row in rows}
    latest: dict[str, str] = {}
    for number, (event_id, duplicate) in enumerate(arrivals):
        key, sequence = position_of[event_id]
        assert sequence >= latest.get(key, ""), (
            f"request {number} to ERP ({'a redelivery' if duplicate else 'a first copy'}) "
            f"carried sequence {sequence} of key {key} (id {event_id}) after sequence "
            f"{latest[key]} had arrived {tag}"
        )
        latest[key] = sequence

    assert "treated as a reset" not in logs, f"a counter reset was seen {tag}"
    assert runs.kills == size.kills
    assert len(committed) >= size.min_events, (
        f"only {len(committed)} events in the run, fewer than {size.min_events}: the machine "
        f"was too slow to produce the load this size promises {tag}"
    )


# -- the gateway, started and killed again and again --------------------------------------------


def write_config(tmp_path: Path, plc: PlcSim, erp: ErpSim, machines: int) -> Path:
    drivers, rules = [], []
    for i in range(machines):
        name = f"m{i:02d}"
        drivers.append(f"""
  - name: {name}
    type: modbus
    host: 127.0.0.1
    port: {plc.port}
    unit: {i + 1}
    poll_interval: 50ms
    timeout: 2s
    tags:
      - {{name: good, address: 0, type: uint32}}
      - {{name: bad, address: 2, type: uint32}}""")
        rules.append(f"""
  - id: {name}
    line: LINE-{i % 3}
    signals: {{good: {name}.good, defective: {name}.bad}}
    order: {{order_id: "{_order_id(name)}", operation: "0010", material: FG-4711}}
    confirm: {{every_units: 1, every: 2s}}""")
    # Every event type goes to ERP, so that every id the outbox commits is owed to ERP.
    routes = "".join(f"\n  {event_type}: [erp]" for event_type in sorted(EVENT_MODELS))
    config = tmp_path / "plant.yaml"
    config.write_text(f"""
site: "1010"
data_dir: {tmp_path / "data"}
api: {{listen: "127.0.0.1:{free_port()}"}}
shutdown_timeout: 20s
drivers:{"".join(drivers)}
machines:{"".join(rules)}
destinations:
  erp:
    base_url: {erp.url}
    path: /api/events
    timeout: 10s
    max_in_flight: 8
    retry: {{base: 50ms, cap: 1s}}
routes:{routes}
""")
    return config


def _order_id(machine: str) -> str:
    return f"70000{int(machine[1:]):03d}"


# -- waiting and reading ------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))


def _wait_first_delivery(erp: ErpSim, runs: GatewayProcess, deadline: float) -> float | None:
    """Seconds from the last restart to ERP's first request from the new process, if it comes
    before `deadline` (requests of the killed process were answered before it started)."""
    before = _received(erp)
    while time.monotonic() < deadline:
        if _received(erp) > before:
            return time.monotonic() - runs.restarted_at
        time.sleep(0.02)
    return None


def _received(erp: ErpSim) -> int:
    return int(httpx.get(f"{erp.url}/stats", timeout=60).json()["received"])


ARRIVAL = re.compile(
    r"^ERP received \S+ subject=\S* id=(\S+) -> \S+( \(duplicate\))?$", re.MULTILINE
)


def _arrivals(erp: ErpSim) -> list[tuple[str, bool]]:
    """Every request ERP took, in the order it took them: (event id, was a duplicate)."""
    return [(m[1], bool(m[2])) for m in ARRIVAL.finditer(erp.peer.output())]


def _erp_events(erp: ErpSim) -> list[dict[str, Any]]:
    response = httpx.get(f"{erp.url}/events", timeout=300)
    response.raise_for_status()
    rows: list[dict[str, Any]] = response.json()
    return rows


def _query(database: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def _settled(database: Path, erp: ErpSim, machines: list[str], stop_at: int) -> bool:
    """The PLC reached its stop value for every machine, nothing is owed, and ERP holds as
    many events as the outbox committed (read while the gateway runs, so checked again after
    the graceful stop)."""
    if not database.exists():
        return False
    states = dict(_query(database, "SELECT key, value FROM rule_state"))
    for machine in machines:
        state = states.get(f"machine:{machine}")
        if state is None:
            return False
        good, scrap = json.loads(state)["good"], json.loads(state)["scrap"]
        if good["last_raw"] != stop_at or good["confirmed"] != good["total"]:
            return False
        if scrap["confirmed"] != scrap["total"]:
            return False
    ((owed,),) = _query(database, "SELECT COUNT(*) FROM deliveries")
    ((committed,),) = _query(database, "SELECT COUNT(*) FROM event_ids")
    return bool(owed == 0 and erp.stats()["unique"] >= committed)


def _pending_units(database: Path, order_id: str, state: dict[str, Any]) -> tuple[int, int]:
    """Good and scrap units counted but not in ERP: in confirmations the outbox still owes,
    and counted by the rule but not yet confirmed."""
    good = state["good"]["total"] - state["good"]["confirmed"]
    scrap = state["scrap"]["total"] - state["scrap"]["confirmed"]
    for (payload,) in _query(
        database,
        "SELECT payload FROM events e WHERE type = 'production.confirmation'"
        " AND EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq)",
    ):
        data = json.loads(payload)["data"]
        if data["order_id"] == order_id:
            good += int(Decimal(data["yield_quantity"]["value"]))
            scrap += int(Decimal(data["scrap_quantity"]["value"]))
    return good, scrap


def _read_outbox(database: Path) -> tuple[set[str], int, dict[str, dict[str, Any]]]:
    committed = {row[0] for row in _query(database, "SELECT id FROM event_ids")}
    ((pending,),) = _query(database, "SELECT COUNT(*) FROM deliveries")
    states = {
        key: json.loads(value)
        for key, value in _query(database, "SELECT key, value FROM rule_state")
    }
    return committed, pending, states
