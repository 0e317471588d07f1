"""A simulated plant for the hub: confirmation events of a few orders, committed to a real
outbox (SQLite) and published by the real forwarder engine through the `jetstream` profile,
exactly as a plant daemon's would be. For the hub's tests, its benchmark and `make demo-hub`.

Event ids, keys and sequence numbers are a function of (site, number) only: a restarted
(even kill -9'd) plant commits the same events again, which its outbox recognises, so the
hub must end up with each of them exactly once. The `sequence` of an order's events grows
with their number: the receiver checks order per key against it.

`python -m simulators.hub_plant --site 1010 --outbox /tmp/p.db --servers nats://...
--events 500` prints one JSON line when every event is settled (PubAck'd).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence

from buffer.outbox import Outbox, OutboxEvent
from edge.config.destinations import DestinationConfig
from edge.forward import HttpForwarder
from edge.hub.settings import DEFAULT_STREAM, DEFAULT_SUBJECT
from edge.model.envelope import cloudevent_type

DESTINATION = "hub"


def plant_event(site: str, number: int, orders: int) -> OutboxEvent:
    order = f"{site}{number % orders:06d}"
    event_id = f"{site}-{number:08d}"
    cloud_event = {
        "specversion": "1.0",
        "id": event_id,
        "source": f"urn:plantsync:{site}:press-01",
        "type": cloudevent_type("production.confirmation"),
        "time": "2026-12-04T06:00:00Z",
        "subject": f"order/{order}/0010",
        "datacontenttype": "application/json",
        "dataschema": "urn:plantsync:schema:production.confirmation:1",
        "partitionkey": order,
        "sequence": f"{number:020d}",
        "data": {
            "site": site,
            "order_id": order,
            "operation": "0010",
            "good_count": 10,
            "scrap_count": 0,
            "uom": "C62",
            "number": number,
        },
    }
    return OutboxEvent(
        id=event_id,
        type="production.confirmation",
        partition_key=order,
        payload=json.dumps(cloud_event, separators=(",", ":")).encode(),
        destinations=(DESTINATION,),
    )


def hub_destination(
    servers: Sequence[str],
    *,
    token: str | None = None,
    auth: dict[str, object] | None = None,
    tls: dict[str, object] | None = None,
    batch_size: int = 64,
    max_in_flight: int = 4,
    timeout: float = 5.0,
    stream: str = DEFAULT_STREAM,
    subject: str = DEFAULT_SUBJECT,
) -> DestinationConfig:
    """`auth` (a jetstream.auth section) wins over `token`; `tls` is the destination's."""
    auth = auth or ({"type": "token", "token": token} if token else {"type": "none"})
    return DestinationConfig.model_validate(
        {
            "base_url": servers[0],
            **({"tls": tls} if tls else {}),
            "profile": "jetstream",
            "batch_size": batch_size,
            "max_in_flight": max_in_flight,
            "timeout": f"{timeout:g}s",
            "retry": {"base": "200ms", "cap": "2s"},
            "circuit_breaker": {"failures": 5, "open_for": "1s"},
            "jetstream": {
                "servers": list(servers[1:]),
                "auth": auth,
                "stream": stream,
                "subject": subject,
            },
        }
    )


async def run_plant(args: argparse.Namespace, site: str) -> dict[str, object]:
    destination = hub_destination(
        args.servers.split(","),
        token=args.token,
        batch_size=args.batch_size,
        stream=args.stream,
        subject=args.subject,
        timeout=args.timeout,
    )
    started = time.monotonic()
    committed = 0
    async with Outbox.open(
        args.outbox.replace("{site}", site), commit_interval=args.commit_interval
    ) as outbox:
        forwarder = HttpForwarder(DESTINATION, destination, outbox)
        async with asyncio.TaskGroup() as group:
            forwarding = group.create_task(forwarder.run(), name=f"forward-hub-{site}")
            chunk = max(1, int(args.rate / 10)) if args.rate else args.events
            for start in range(0, args.events, chunk):
                batch = [
                    plant_event(site, n, args.orders)
                    for n in range(start, min(args.events, start + chunk))
                ]
                result = await outbox.commit(batch)
                committed += result.inserted
                if args.rate:
                    await asyncio.sleep(len(batch) / args.rate)
            while await _owed(outbox):  # noqa: ASYNC110 - the outbox has no "empty" signal
                await asyncio.sleep(0.05)
            forwarder.drain()
            await forwarding
        journal = await outbox.journal()
    return {
        "site": site,
        "events": args.events,
        "committed_now": committed,
        "published_now": forwarder.health.delivered,
        "duplicate_pubacks": sum("(duplicate)" in str(row.get("reference")) for row in journal),
        "seconds": round(time.monotonic() - started, 3),
    }


async def run_plants(args: argparse.Namespace) -> list[dict[str, object]]:
    """Each site a plant of its own (own outbox, engine and hub connection), side by side."""
    async with asyncio.TaskGroup() as group:
        plants = [
            group.create_task(run_plant(args, site), name=f"plant-{site}")
            for site in args.site.split(",")
        ]
    return [plant.result() for plant in plants]


async def _owed(outbox: Outbox) -> int:
    counts = (await outbox.counts()).get(DESTINATION)
    return counts.pending if counts is not None else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hub_plant", description=__doc__)
    parser.add_argument(
        "--site",
        required=True,
        help="plant code; several, comma-separated, run as plants side by side in this process",
    )
    parser.add_argument(
        "--outbox",
        required=True,
        help="outbox file; {site} in it is "
        "replaced by the plant code (required with several sites)",
    )
    parser.add_argument("--servers", required=True, help="comma-separated nats:// URLs")
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--orders", type=int, default=20)
    parser.add_argument(
        "--rate", type=float, default=0.0, help="events/s committed (0: all at once)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--commit-interval",
        type=float,
        default=0.0,
        help="the outbox's "
        "linger (s): a longer one widens the window between a PubAck and its "
        "settle, where a kill -9 makes the plant publish again",
    )
    parser.add_argument("--token", default=None)
    parser.add_argument("--stream", default=DEFAULT_STREAM)
    parser.add_argument("--timeout", type=float, default=5.0, help="of a publish, seconds")
    parser.add_argument("--subject", default=DEFAULT_SUBJECT)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        if "," in args.site and "{site}" not in args.outbox:
            parser.error("several sites need {site} in --outbox (one outbox per plant)")
        for line in asyncio.run(run_plants(args)):
            print(json.dumps(line), flush=True)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
