"""The relays' partition map (edge.hub.members): rendezvous hashing, checked against a map
derived by hand from its definition, owner = the member with the highest 64-bit BLAKE2b of
"<consumer>/<member>", with the weights below computed by
`python3 -c 'import hashlib; print(hashlib.blake2b(b"relay_erp_p0/a", digest_size=8).hexdigest())'`
(one line per consumer and member, not through the code under test)."""

from __future__ import annotations

import pytest

from edge.hub.config import HubConfig
from edge.hub.members import member_id, owners

UNITS = [f"relay_erp_p{p}" for p in range(6)]
# Weights (hex, first 4 digits) per consumer for members a, b, c:
#   p0: a 69fd  b c4a6  c 49d2  -> b        without b: a (69fd > 49d2)
#   p1: a fcb4  b 6437  c 91f0  -> a
#   p2: a 5592  b 3968  c 655a  -> c        without c: a (5592 > 3968)
#   p3: a f0e4  b 2f8a  c 13fc  -> a
#   p4: a f75d  b f8a8  c 5c8a  -> b        without b: a (f75d > 5c8a)
#   p5: a 86c8  b a0ae  c 98f4  -> b        without b: c (98f4 > 86c8)
THREE = {"p0": "b", "p1": "a", "p2": "c", "p3": "a", "p4": "b", "p5": "b"}
WITHOUT_C = {**THREE, "p2": "a"}
WITHOUT_B = {"p0": "a", "p1": "a", "p2": "c", "p3": "a", "p4": "a", "p5": "c"}


def short(mapping: dict[str, str]) -> dict[str, str]:
    return {unit.removeprefix("relay_erp_"): member for unit, member in mapping.items()}


def test_three_relays_get_the_hand_derived_disjoint_complete_map() -> None:
    assert short(owners(UNITS, ["c", "a", "b"])) == THREE  # order of the list does not matter
    assert short(owners(UNITS, ["a", "b", "c", "b"])) == THREE


def test_a_relay_gone_moves_only_its_own_partitions() -> None:
    assert short(owners(UNITS, ["a", "b"])) == WITHOUT_C  # only c's p2 moved
    assert short(owners(UNITS, ["a", "c"])) == WITHOUT_B  # only b's p0, p4, p5 moved
    # A relay coming back takes back exactly what it had.
    assert short(owners(UNITS, ["a", "b", "c"])) == THREE


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_any_membership_covers_every_partition_once_and_removal_is_minimal(count: int) -> None:
    units = [f"relay_erp_p{p}" for p in range(64)]
    members = [f"relay-{n}" for n in range(count)]
    before = owners(units, members)
    assert set(before) == set(units)  # complete; a dict: each unit one owner (disjoint)
    assert set(before.values()) <= set(members)
    gone = members[0]
    after = owners(units, members[1:])
    for unit, owner in before.items():
        if owner != gone:
            assert after[unit] == owner
        else:
            assert after.get(unit, None) != gone
    assert owners(units, []) == {}


def test_two_relays_of_one_name_are_two_members() -> None:
    first, second = member_id("relay-1"), member_id("relay-1")
    assert first != second and first.startswith("relay-1-") and second.startswith("relay-1-")
    assert member_id("hall 3/relay*").startswith("hall_3_relay-")  # a key's characters only


def test_a_member_ttl_shorter_than_two_heartbeats_is_refused() -> None:
    nats = {"servers": ["nats://127.0.0.1:4222"]}
    with pytest.raises(ValueError, match=r"member_ttl \(3s\) must be at least twice"):
        HubConfig.model_validate({"nats": nats, "relay": {"heartbeat": "2s", "member_ttl": "3s"}})
    relay = HubConfig.model_validate({"nats": nats}).relay
    assert (relay.heartbeat, relay.member_ttl, relay.members_bucket) == (
        2.0,
        6.0,
        "PLANTSYNC_RELAYS",
    )
