"""Outbound URL parts: the oracle is RFC 3986 by hand, not the helper."""

import pytest

from edge.forward.urls import UnsafeUrlPart, odata_string, path, query, segment


def test_a_slash_inside_an_id_is_not_a_separator() -> None:
    assert path("lots", "../../admin/users?q=", "disposition") == (
        "lots/..%2F..%2Fadmin%2Fusers%3Fq%3D/disposition"
    )


def test_prefix_is_kept_and_joined_once() -> None:
    assert path("A_InspectionLot", prefix="/sap/x/") == "/sap/x/A_InspectionLot"


@pytest.mark.parametrize("bad", ["", ".", "..", "a\x00b"])
def test_dot_segments_empty_and_nul_are_refused(bad: str) -> None:
    with pytest.raises(UnsafeUrlPart):
        segment(bad)


def test_odata_literal_doubles_quotes_and_query_encodes_spaces_as_percent_20() -> None:
    literal = odata_string("it's")
    assert literal == "'it''s'"
    assert query({"$filter": f"ConfirmationText eq {literal}", "$format": "json"}) == (
        "$filter=ConfirmationText%20eq%20'it''s'&$format=json"
    )
    assert query({"$filter": "A eq 'x&y=z#'"}) == "$filter=A%20eq%20'x%26y%3Dz%23'"
