"""qms_rest: a generic REST QMS (`base_url` ends in its API root, e.g. `.../api/v1`).

`inspection.requested` → `POST inspections`, `inspection.result` → `POST results`,
`nonconformance.raised` → `POST nonconformances`, each with `Idempotency-Key` and the event id
as `external_id`. Dispositions come back the other way: see edge/runtime/quality.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from buffer.outbox import Delivery
from edge.forward.outcome import Outcome, Result, classify
from edge.forward.profiles.base import Profile, event_of, idempotency_key


class QmsRestProfile(Profile):
    async def send(self, deliveries: Sequence[Delivery]) -> list[Result]:
        results = []
        for delivery in deliveries:
            try:
                event = event_of(delivery)
                mapped = qms_request(event)
            except (KeyError, ValueError, TypeError) as exc:  # data the QMS cannot be given
                # A dead letter with the reason, not a retry: it would fail the same way for
                # ever, and its key's later events would wait behind it.
                reason = f"cannot map this event for the QMS: {type(exc).__name__}: {exc}"
                results.append(Result(Outcome.REJECTED, None, reason))
                continue
            if mapped is None:
                results.append(
                    Result(
                        Outcome.REJECTED,
                        None,
                        f"the qms_rest profile cannot map {event['type']} events",
                    )
                )
                continue
            path, body = mapped
            response = await self.session.request(
                "POST",
                path,
                json=body,
                headers={"Idempotency-Key": idempotency_key(delivery.event_id)},
            )
            results.append(classify(response))
        return results


def qms_request(event: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    data = event["data"]
    common = {
        "external_id": event["id"],
        "site": data["site"],
        "order_id": data.get("order_id"),
        "lot_id": data.get("lot_id"),
        "material": data.get("material"),
        "machine_id": data.get("machine_id"),
    }
    match event["type"]:
        case "inspection.requested":
            return "inspections", {
                **common,
                "trigger": data["trigger"],
                "characteristic": data.get("characteristic"),
                "measured_value": data.get("measured_value"),
                "lower_limit": data.get("lower_limit"),
                "upper_limit": data.get("upper_limit"),
                "reason": data.get("reason_text"),
                "requested_at": data["occurred_at"],
            }
        case "inspection.result":
            return "results", {
                **common,
                "inspection_id": data.get("inspection_id"),
                "characteristic": data["characteristic"],
                "measured_value": data.get("measured_value"),
                "result": data["result"],
            }
        case "nonconformance.raised":
            return "nonconformances", {
                **common,
                "defect_code": data["defect_code"],
                "severity": data["severity"],
                "affected_quantity": data.get("affected_quantity"),
                "description": data.get("description_text"),
            }
    return None
