"""Samples per second through the machine rules, for a plant of 50 machines.

Each machine has a good and a scrap counter, a state and two process values with limits; one
"poll" hands the rules one sample of each. Measured on one core, in the same run:

- `rules_samples_per_s`: `MachineRule.on_sample` alone (the aggregation logic);
- `pipeline_samples_per_s`: the whole `Pipeline.on_readings` path, routing and committing the
  events and rule state to a real outbox on a temp file, one call per poll of a machine;
- `bare_loop_samples_per_s`: the baseline, a loop that only looks each sample's signal up and
  takes a counter delta (what any aggregation must at least do), and `ratio` = rules / bare.

Target (issue 5): 100,000 samples per second through the rules on one core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from buffer.outbox import Outbox
from drivers.base import Sample
from edge.config.loader import parse_config
from edge.config.models import PlantConfig
from edge.rules.machine import MachineRule
from edge.runtime.pipeline import Pipeline

T0 = 1_796_032_800.0


def plant(machines: int) -> PlantConfig:
    drivers, rules = [], []
    for n in range(machines):
        name = f"m{n:02d}"
        drivers.append(
            f"  - {{name: {name}, type: modbus, host: 127.0.0.1, tags: ["
            "{name: good, address: 0, type: uint32}, {name: bad, address: 2, type: uint32}, "
            "{name: state, address: 10}, {name: force, address: 20, type: float32}, "
            "{name: temp, address: 30}]}"
        )
        rules.append(
            f"  - {{id: {name}, signals: {{good: {name}.good, defective: {name}.bad, "
            f"state: {name}.state}}, order: {{order_id: 'O-{n}'}}, "
            "state_map: {4: Idle, 6: Execute, 11: Held}, "
            "confirm: {every_units: 100, every: 15m, on_state_change: true}, "
            f"limits: [{{signal: {name}.force, low: 12.0, high: 15.0, for: 5s}}, "
            f"{{signal: {name}.temp, high: 80, for: 10s}}]}}"
        )
    text = (
        "site: '1010'\ndata_dir: /tmp/unused\ndrivers:\n"
        + "\n".join(drivers)
        + "\nmachines:\n"
        + "\n".join(rules)
        + "\ndestinations: {erp: {base_url: 'http://127.0.0.1:1'}}\n"
        "routes: {production.confirmation: [erp], inspection.requested: [erp]}\n"
    )
    return parse_config(text, "bench", {})


def polls(machines: int, count: int) -> list[list[Sample]]:
    """`count` polls of every machine: counters advance, states change now and then, process
    values wander over their limits sometimes."""
    batches = []
    for i in range(count):
        at = T0 + i * 0.1
        for n in range(machines):
            name = f"m{n:02d}"
            state = 11 if (i + n) % 200 > 190 else 6
            force = 13.5 + (2.0 if (i + 3 * n) % 300 > 280 else 0.0) + (i % 7) * 0.05
            batches.append(
                [
                    Sample(name, "good", i * 3 + n, at),
                    Sample(name, "bad", i // 10, at),
                    Sample(name, "state", state, at),
                    Sample(name, "force", force, at),
                    Sample(name, "temp", 70 + i % 5, at),
                ]
            )
    return batches


def bench_rules(config: PlantConfig, batches: list[list[Sample]]) -> tuple[float, int]:
    rules = {rule.machine.id: rule for rule in (MachineRule("1010", m) for m in config.machines)}
    by_signal = {signal: rule for rule in rules.values() for signal in rule.signals}
    events = 0
    started = time.perf_counter()
    for batch in batches:
        for sample in batch:
            events += len(by_signal[sample.signal].on_sample(sample))
    return time.perf_counter() - started, events


def bench_bare(batches: list[list[Sample]]) -> float:
    last: dict[str, float] = {}
    total = 0.0
    started = time.perf_counter()
    for batch in batches:
        for sample in batch:
            previous = last.get(sample.signal)
            value = float(sample.value or 0)
            if previous is not None and value >= previous:
                total += value - previous
            last[sample.signal] = value
    return time.perf_counter() - started


async def bench_pipeline(config: PlantConfig, batches: list[list[Sample]], scratch: Path) -> float:
    async with Outbox.open(scratch / "outbox.db") as outbox:
        pipeline = Pipeline(config, outbox, {})
        started = time.perf_counter()
        for batch in batches:
            await pipeline.on_readings(batch)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--machines", type=int, default=50)
    parser.add_argument("--polls", type=int, default=2000)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    polls_count = 100 if args.quick else args.polls
    config = plant(args.machines)
    batches = polls(args.machines, polls_count)
    samples = sum(len(b) for b in batches)
    rules_s = min(bench_rules(config, batches)[0] for _ in range(3))
    _, events = bench_rules(config, batches)
    bare_s = min(bench_bare(batches) for _ in range(3))
    with tempfile.TemporaryDirectory() as scratch:
        pipeline_s = asyncio.run(bench_pipeline(config, batches, Path(scratch)))
    rules_rate = samples / rules_s
    print(
        json.dumps(
            {
                "benchmark": "aggregate",
                "machines": args.machines,
                "samples": samples,
                "events_produced": events,
                "rules_samples_per_s": round(rules_rate),
                "pipeline_samples_per_s": round(samples / pipeline_s),
                "bare_loop_samples_per_s": round(samples / bare_s),
                "ratio": round(rules_rate / (samples / bare_s), 3),
                "meets_target_100k": rules_rate >= 100_000,
            }
        )
    )


if __name__ == "__main__":
    main()
