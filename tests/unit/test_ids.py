"""Ids as data: connection ids that name their front door, and the one rule
about resource ids (hierarchy, seed story BE-001.2 "Multi-tab presence")."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rounds.ids import FrontDoorId, ResourceId, conn_id, frontdoor_of, parent_of, routing_key


@given(frontdoor=st.integers(0, 1_000), counter=st.integers(0, (1 << 40) - 1))
@settings(max_examples=200, deadline=None)
def test_a_connection_id_names_its_front_door(frontdoor: int, counter: int) -> None:
    conn = conn_id(FrontDoorId(frontdoor), counter)
    assert frontdoor_of(conn) == frontdoor
    assert conn & ((1 << 40) - 1) == counter


@given(a=st.tuples(st.integers(0, 64), st.integers(0, (1 << 40) - 1)),
       b=st.tuples(st.integers(0, 64), st.integers(0, (1 << 40) - 1)))
@settings(max_examples=200, deadline=None)
def test_different_front_doors_or_counters_never_share_a_connection_id(
        a: tuple[int, int], b: tuple[int, int]) -> None:
    if a != b:
        assert conn_id(FrontDoorId(a[0]), a[1]) != conn_id(FrontDoorId(b[0]), b[1])


def test_a_counter_past_forty_bits_wraps_without_touching_the_front_door() -> None:
    assert frontdoor_of(conn_id(FrontDoorId(3), 1 << 40)) == 3
    assert conn_id(FrontDoorId(3), (1 << 40) + 5) == conn_id(FrontDoorId(3), 5)


def test_connection_ids_of_front_door_zero_are_the_counter_itself() -> None:
    assert conn_id(FrontDoorId(0), 42) == 42


@pytest.mark.parametrize(("resource", "parent"), [
    # the seed's examples
    ("document:999/tab:patient-info", "document:999"),
    ("document:999/tab:diagnosis", "document:999"),
    ("page:/patient/12345", None),
    # plain ids
    ("document:999", None),
    ("input-field-123", None),
    ("a/b", None),
    ("document:999/tab", None),  # last segment has no `type:`
    ("document:999/tab:", None),  # `type:` with an empty id
    ("document:999/:diagnosis", None),  # an id with an empty type
    ("document:999/9tab:x", None),  # a type starts with a letter or `_`
    # edge cases
    ("document:999/", None),  # trailing slash: empty last segment
    ("/tab:a", None),  # empty parent
    ("tab:a", None),  # no slash at all
    ("", None),
    ("x:1/y:2/z:3", "x:1/y:2"),  # the parent is everything before the last slash
    ("a/tab:x", "a"),  # the parent itself need not be typed
    ("page:/patient/12345/tab:notes", "page:/patient/12345"),
    ("document:999/tab:a:b", "document:999"),  # the id may hold colons
    ("document:999/sub_type.v2-x:7", "document:999"),
    ("document:999/tab:x\n", None),  # a newline is never part of a typed segment
])
def test_parent_of(resource: str, parent: str | None) -> None:
    assert parent_of(ResourceId(resource)) == parent


def test_a_family_routes_by_its_parent_and_a_plain_id_by_itself() -> None:
    assert routing_key(ResourceId("document:999/tab:diagnosis")) == "document:999"
    assert routing_key(ResourceId("page:/patient/12345")) == "page:/patient/12345"


@given(st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_a_parent_is_always_a_proper_prefix_before_a_slash(resource: str) -> None:
    parent = parent_of(ResourceId(resource))
    if parent is not None:
        assert parent
        assert resource.startswith(parent + "/")
        assert "/" not in resource[len(parent) + 1:]
