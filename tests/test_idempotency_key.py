"""Idempotency-Key as draft-ietf-httpapi-idempotency-key-header defines it: a Structured Field
String (RFC 8941 3.3.3). The oracle is the RFC's grammar written out by hand below."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import httpx
import pytest

from edge.forward.profiles.base import batch_idempotency_key, idempotency_key
from tests.conftest import Peer, start_erp, start_qms

# sf-string = DQUOTE *( unescaped / "%" / bs-escaped ) DQUOTE, over printable ASCII.
SF_STRING = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*"$')


def test_keys_are_structured_field_strings() -> None:
    event_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "x"))
    assert idempotency_key(event_id) == f'"{event_id}"'
    assert SF_STRING.match(idempotency_key('a"b\\c')) and idempotency_key('a"b\\c') == (
        '"a\\"b\\\\c"'
    )
    odd = idempotency_key("lot-\u00e9\x00")  # not printable ASCII: a digest, stable
    assert SF_STRING.match(odd) and odd == idempotency_key("lot-\u00e9\x00")


def test_a_batch_key_has_a_fixed_length_whatever_the_batch() -> None:
    ids = [str(uuid.uuid4()) for _ in range(1000)]
    one, thousand = batch_idempotency_key(ids[:1]), batch_idempotency_key(ids)
    assert len(one) == len(thousand) == len('"batch-sha256:"') + 64  # far below 8 KB
    assert SF_STRING.match(thousand)
    assert batch_idempotency_key(ids) == thousand != batch_idempotency_key(ids[::-1])


EVENT = {
    "specversion": "1.0",
    "id": "evt-1",
    "source": "urn:x",
    "type": "lot.produced",
    "time": "2026-03-01T10:00:00Z",
    "data": {},
}


@pytest.mark.integration
def test_simulators_accept_the_quoted_form_and_the_bare_one(
    peers: list[Peer], tmp_path: Path
) -> None:
    erp = start_erp(peers, tmp_path)
    headers = {"Content-Type": "application/cloudevents+json"}
    with httpx.Client(base_url=erp.url, headers=headers) as client:
        first = client.post("/api/events", json=EVENT, headers={"Idempotency-Key": '"evt-1"'})
        bare = client.post("/api/events", json=EVENT, headers={"Idempotency-Key": "evt-1"})
        assert (first.status_code, bare.status_code) == (201, 200)  # the same key
        assert bare.json()["reference"] == first.json()["reference"]
        for broken in ('"evt-1', '"evt\\x"', '"a" b'):
            refused = client.post("/api/events", json=EVENT, headers={"Idempotency-Key": broken})
            assert refused.status_code == 400, broken
            assert "Idempotency-Key" in refused.json()["error"]
    rows = httpx.get(f"{erp.url}/events").json()
    assert [row["key"] for row in rows] == ["evt-1"]

    qms = start_qms(peers, tmp_path)
    body = {
        "external_id": "e-1",
        "site": "1010",
        "order_id": "4711",
        "lot_id": "L-1",
        "material": None,
        "machine_id": "press-01",
        "defect_code": "FORCE",
        "severity": "major",
        "affected_quantity": None,
        "description": None,
    }
    with httpx.Client(base_url=f"{qms.url}/api/v1") as client:
        quoted = client.post("nonconformances", json=body, headers={"Idempotency-Key": '"e-1"'})
        again = client.post("nonconformances", json=body, headers={"Idempotency-Key": "e-1"})
        assert quoted.status_code == 201, quoted.text
        assert again.json() == quoted.json()
        assert again.headers.get("Idempotent-Replayed") == "true"
        assert (
            client.post(
                "nonconformances", json=body, headers={"Idempotency-Key": '"e-2'}
            ).status_code
            == 400
        )
