"""The presence machine (seed story BE-001.2) driven directly, no I/O.

Time is a plain int passed to `handle`; connection ids come from
`rounds.ids.conn_id(frontdoor, counter)` like the front doors make them.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from rounds.ids import ConnId, FrontDoorId, ResourceId, SessionId, UserId, conn_id
from rounds.protocol.messages import Deliver, Disconnect, Join, Leave, Reply, Sync
from rounds.protocol.ws import JSON, ErrorCode, MessageType
from rounds.shard.events import Event, MemberGone, MirrorJoin, MirrorLeave, TellState
from rounds.shard.presence.machine import Presence
from rounds.shard.room_state import resource_state

FD0 = FrontDoorId(0)
FD1 = FrontDoorId(1)
# 2025-11-17T10:30:00.000Z, the seed's first `joinedAt`
T0 = int(datetime(2025, 11, 17, 10, 30, tzinfo=UTC).timestamp() * 1000)
MINUTE = 60_000
PAGE = ResourceId("page:/patient/12345")
DOC = ResourceId("document:999")
INFO = ResourceId("document:999/tab:patient-info")
DIAG = ResourceId("document:999/tab:diagnosis")
PROC = ResourceId("document:999/tab:procedure")


def c(counter: int, fd: FrontDoorId = FD0) -> ConnId:
    return conn_id(fd, counter)


def join(conn: ConnId, user: str, room: str, mode: str = "editor", ref: Any = None,
         restore: bool = False) -> Join:
    return Join(conn, ref, UserId(user), f"{user}@example.com", SessionId(f"sess-{conn}"),
                ResourceId(room), "patient_record", mode, restore)


def user(name: str, mode: str, at_ms: int) -> dict[str, Any]:
    return {"userId": name, "username": f"{name}@example.com", "mode": mode,
            "joinedAt": datetime.fromtimestamp(at_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"}


def told(p: Presence, events: list[Event]) -> tuple[TellState, list[dict[str, Any]]]:
    """The one member told its room by `events`, and the users its
    `RESOURCE_STATE` lists (the shard service reads presence right after)."""
    [tell] = [e for e in events if isinstance(e, TellState)]
    return tell, p.users_wire(tell.resource_id)


def replies(events: list[Event]) -> list[Reply]:
    return [e for e in events if isinstance(e, Reply)]


def delivers(events: list[Event], type_: str) -> list[Deliver]:
    return [e for e in events if isinstance(e, Deliver) and e.type == type_]


def of(events: list[Event], cls: type) -> list[Any]:
    return [e for e in events if isinstance(e, cls)]


# --- join ---------------------------------------------------------------------


def test_joining_tells_the_joiner_its_room_with_the_users_in_it() -> None:
    p = Presence()
    events = p.handle(join(c(1), "usr_001", PAGE, ref="r1"), T0)
    assert replies(events) == []
    tell, users = told(p, events)
    assert (tell.conn, tell.ref, tell.resource_id, tell.kind, tell.refresh) == (c(1), "r1", PAGE, "ws", False)
    assert users == [
        {"userId": "usr_001", "username": "usr_001@example.com", "mode": "editor",
         "joinedAt": "2025-11-17T10:30:00.000Z"},
    ]


def test_the_resource_state_lists_everyone_in_order_of_arrival() -> None:
    p = Presence()
    p.handle(join(c(1), "alice", PAGE), T0)
    p.handle(join(c(2), "bob", PAGE, "viewer"), T0 + MINUTE)
    _, users = told(p, p.handle(join(c(3), "carol", PAGE), T0 + 2 * MINUTE))
    assert users == [
        user("alice", "editor", T0), user("bob", "viewer", T0 + MINUTE), user("carol", "editor", T0 + 2 * MINUTE),
    ]


def test_the_resource_state_encodes_to_json_with_the_state_as_base64() -> None:
    p = Presence()
    tell, users = told(p, p.handle(join(c(1), "alice", PAGE), T0))
    data = resource_state(PAGE, users, (b"\x01\x02", b"\x00", 3), [], None, tell.kind, tell.refresh)
    frame = json.loads(JSON.encode(MessageType.RESOURCE_STATE, data, tell.ref))
    assert frame["type"] == "RESOURCE_STATE"
    assert frame["data"]["state"] == "AQI=" and frame["data"]["users"][0]["userId"] == "alice"


def test_the_first_member_of_a_room_gets_no_user_joined() -> None:
    events = Presence().handle(join(c(1), "alice", PAGE), T0)
    assert delivers(events, MessageType.USER_JOINED) == []


def test_a_join_sends_user_joined_to_the_others_only() -> None:
    p = Presence()
    p.handle(join(c(1), "alice", PAGE), T0)
    p.handle(join(c(2), "bob", PAGE), T0)
    events = p.handle(join(c(3, FD1), "carol", PAGE, "viewer"), T0 + 5)
    [deliver] = delivers(events, MessageType.USER_JOINED)
    assert set(deliver.conns) == {c(1), c(2)}
    assert deliver.data == {"resourceId": PAGE, "user": user("carol", "viewer", T0 + 5)}


def test_a_join_mirrors_the_user_with_mode_and_join_time() -> None:
    events = Presence().handle(join(c(1), "alice", PAGE, "viewer"), T0)
    assert of(events, MirrorJoin) == [MirrorJoin(PAGE, UserId("alice"), "viewer", T0)]


def test_a_second_join_from_the_same_connection_is_refused_with_already_joined() -> None:
    p = Presence()
    p.handle(join(c(1), "alice", PAGE), T0)
    p.handle(join(c(2), "bob", PAGE), T0)
    events = p.handle(join(c(1), "alice", PAGE, ref=7), T0 + 1)
    assert len(events) == 1
    [reply] = events
    assert (reply.conn, reply.ref, reply.type) == (c(1), 7, MessageType.ERROR)
    assert reply.data["code"] == ErrorCode.ALREADY_JOINED
    assert reply.data["resourceId"] == PAGE
    assert p.rooms() == {PAGE: 2}


# --- leave --------------------------------------------------------------------


def test_leaving_replies_resource_left_tells_the_others_and_mirrors_the_leave() -> None:
    p = Presence()
    p.handle(join(c(1), "alice", PAGE), T0)
    p.handle(join(c(2), "bob", PAGE), T0)
    events = p.handle(Leave(c(1), "r9", PAGE), T0 + 1)
    assert replies(events) == [Reply(c(1), "r9", MessageType.RESOURCE_LEFT, {"resourceId": PAGE})]
    assert delivers(events, MessageType.USER_LEFT) == [
        Deliver((c(2),), MessageType.USER_LEFT, {"resourceId": PAGE, "userId": "alice"}),
    ]
    assert of(events, MirrorLeave) == [MirrorLeave(PAGE, UserId("alice"))]
    assert of(events, MemberGone) == [MemberGone(c(1), PAGE, "left", UserId("alice"), SessionId("sess-1"))]
    assert [u.user_id for u in p.users(PAGE)] == ["bob"]


def test_the_last_member_leaving_removes_the_room() -> None:
    p = Presence()
    p.handle(join(c(1), "alice", PAGE), T0)
    events = p.handle(Leave(c(1), None, PAGE), T0 + 1)
    assert delivers(events, MessageType.USER_LEFT) == []
    assert p.rooms() == {}
    assert p.connections() == 0


def test_leaving_a_room_never_joined_is_refused_with_not_joined() -> None:
    p = Presence()
    [reply] = p.handle(Leave(c(1), "r", PAGE), T0)
    assert (reply.conn, reply.ref, reply.type) == (c(1), "r", MessageType.ERROR)
    assert reply.data["code"] == ErrorCode.NOT_JOINED


def test_leaving_a_room_others_are_in_but_not_me_is_refused_with_not_joined() -> None:
    p = Presence()
    p.handle(join(c(2), "bob", PAGE), T0)
    [reply] = p.handle(Leave(c(1), None, PAGE), T0)
    assert reply.data["code"] == ErrorCode.NOT_JOINED
    assert p.rooms() == {PAGE: 1}


# --- several rooms, disconnects -----------------------------------------------------


def test_a_connection_can_be_in_several_rooms_at_once() -> None:
    p = Presence()
    for room in (PAGE, INFO, "page:/patient/777"):
        tell, _ = told(p, p.handle(join(c(1), "alice", room), T0))
        assert tell.resource_id == room
    assert p.rooms_of(c(1)) == {PAGE, INFO, "page:/patient/777"}
    p.handle(Leave(c(1), None, PAGE), T0)
    assert p.rooms_of(c(1)) == {INFO, "page:/patient/777"}


@pytest.mark.parametrize("reason", ["disconnected", "timeout"])
def test_a_disconnect_removes_the_connection_from_every_room(reason: str) -> None:
    p = Presence()
    for room in (PAGE, INFO, "page:/other"):
        p.handle(join(c(1), "alice", room), T0)
    p.handle(join(c(2), "bob", PAGE), T0)
    p.handle(join(c(3), "carol", INFO), T0)
    events = p.handle(Disconnect(c(1), reason), T0 + 1)
    assert replies(events) == []
    assert {(g.resource_id, g.reason) for g in of(events, MemberGone)} == {
        (PAGE, reason), (INFO, reason), ("page:/other", reason),
    }
    assert {(d.conns, d.data["resourceId"]) for d in delivers(events, MessageType.USER_LEFT)} == {
        ((c(2),), PAGE), ((c(3),), INFO),
    }
    assert {m.resource_id for m in of(events, MirrorLeave)} == {PAGE, INFO, "page:/other"}
    assert p.rooms_of(c(1)) == frozenset()
    assert p.rooms() == {PAGE: 1, INFO: 1}
    assert p.connections() == 2


def test_a_disconnect_of_an_unknown_connection_does_nothing() -> None:
    p = Presence()
    p.handle(join(c(1), "alice", PAGE), T0)
    assert p.handle(Disconnect(c(9), "disconnected"), T0) == []
    assert p.rooms() == {PAGE: 1}


def test_handle_refuses_what_is_not_a_presence_command() -> None:
    with pytest.raises(TypeError):
        Presence().handle(object(), T0)


# --- two tabs of one user ------------------------------------------------------------


def test_two_tabs_of_one_user_are_listed_once() -> None:
    p = Presence()
    p.handle(join(c(1), "alice", PAGE), T0)
    _, users = told(p, p.handle(join(c(2), "alice", PAGE), T0 + MINUTE))
    assert users == [user("alice", "editor", T0)]
    assert p.rooms() == {PAGE: 2}
    assert len(p.users(PAGE)) == 1


def test_user_joined_goes_out_only_for_the_first_tab() -> None:
    p = Presence()
    p.handle(join(c(9), "bob", PAGE), T0)
    first = p.handle(join(c(1), "alice", PAGE), T0 + 1)
    second = p.handle(join(c(2), "alice", PAGE), T0 + 2)
    assert len(delivers(first, MessageType.USER_JOINED)) == 1
    assert delivers(second, MessageType.USER_JOINED) == []
    assert of(second, MirrorJoin) == []  # same user, same mode: nothing to mirror


def test_user_left_goes_out_only_when_the_last_tab_leaves() -> None:
    p = Presence()
    p.handle(join(c(9), "bob", PAGE), T0)
    p.handle(join(c(1), "alice", PAGE), T0)
    p.handle(join(c(2), "alice", PAGE), T0)
    first = p.handle(Leave(c(1), None, PAGE), T0 + 1)
    assert delivers(first, MessageType.USER_LEFT) == []
    assert of(first, MirrorLeave) == []
    assert of(first, MemberGone) == [MemberGone(c(1), PAGE, "left", UserId("alice"), SessionId("sess-1"))]
    last = p.handle(Disconnect(c(2), "disconnected"), T0 + 2)
    assert delivers(last, MessageType.USER_LEFT) == [
        Deliver((c(9),), MessageType.USER_LEFT, {"resourceId": PAGE, "userId": "alice"}),
    ]
    assert of(last, MirrorLeave) == [MirrorLeave(PAGE, UserId("alice"))]


def test_a_user_is_an_editor_while_any_of_their_tabs_edits() -> None:
    p = Presence()
    p.handle(join(c(1), "alice", PAGE, "viewer"), T0)
    events = p.handle(join(c(2), "alice", PAGE, "editor"), T0 + MINUTE)
    assert of(events, MirrorJoin) == [MirrorJoin(PAGE, UserId("alice"), "editor", T0)]
    assert [u.mode for u in p.users(PAGE)] == ["editor"]
    events = p.handle(Leave(c(2), None, PAGE), T0 + 2 * MINUTE)
    assert of(events, MirrorJoin) == [MirrorJoin(PAGE, UserId("alice"), "viewer", T0)]
    assert [u.mode for u in p.users(PAGE)] == ["viewer"]


def test_a_users_join_time_stays_that_of_their_first_tab_after_it_leaves() -> None:
    # Without this the listing said 10:31 while Redis (mirrored at the first
    # join) still said 10:30.
    p = Presence()
    p.handle(join(c(1), "alice", PAGE), T0)
    p.handle(join(c(2), "alice", PAGE), T0 + MINUTE)
    p.handle(Leave(c(1), None, PAGE), T0 + 2 * MINUTE)
    assert [u.wire()["joinedAt"] for u in p.users(PAGE)] == ["2025-11-17T10:30:00.000Z"]


# --- seed: "Presence list updates in real-time" ---------------------------------------


def test_my_presence_list_shows_five_users_when_a_newcomer_joins_three_others_and_me() -> None:
    p = Presence()
    for i, name in enumerate(["usr_002", "usr_003", "usr_004"]):
        p.handle(join(c(10 + i, FD1), name, PAGE), T0 + i)
    _, users = told(p, p.handle(join(c(1), "usr_001", PAGE), T0 + 10))
    my_list = {u["userId"]: u for u in users}
    assert len(my_list) == 4
    events = p.handle(join(c(20, FD1), "usr_005", PAGE), T0 + 20)
    [joined] = delivers(events, MessageType.USER_JOINED)
    assert c(1) in joined.conns  # "I should receive USER_JOINED immediately"
    assert c(20, FD1) not in joined.conns
    my_list[joined.data["user"]["userId"]] = joined.data["user"]
    assert len(my_list) == 5
    assert len(p.users(PAGE)) == 5


# --- seed: "Multi-tab presence tracking (cross-tab awareness)" ---------------------------

SEED_ALL_USERS = json.loads("""
{
  "parentResourceId": "document:999",
  "currentSubResourceId": "document:999/tab:patient-info",
  "totalCount": 3,
  "subResources": [
    {
      "subResourceId": "document:999/tab:patient-info",
      "users": [{
        "userId": "alice",
        "username": "alice@example.com",
        "mode": "editor",
        "joinedAt": "2025-11-17T10:30:00.000Z"
      }]
    },
    {
      "subResourceId": "document:999/tab:diagnosis",
      "users": [{
        "userId": "bob",
        "username": "bob@example.com",
        "mode": "viewer",
        "joinedAt": "2025-11-17T10:31:00.000Z"
      }]
    },
    {
      "subResourceId": "document:999/tab:procedure",
      "users": [{
        "userId": "charlie",
        "username": "charlie@example.com",
        "mode": "editor",
        "joinedAt": "2025-11-17T10:32:00.000Z"
      }]
    }
  ]
}
""")

ALICE, BOB, CHARLIE = c(1), c(2), c(3, FD1)


def seed_family() -> tuple[Presence, list[Event]]:
    """Alice, Bob and Charlie join three tabs of document:999, a minute apart."""
    p = Presence()
    p.handle(join(ALICE, "alice", INFO, "editor"), T0)
    p.handle(join(BOB, "bob", DIAG, "viewer"), T0 + MINUTE)
    return p, p.handle(join(CHARLIE, "charlie", PROC, "editor"), T0 + 2 * MINUTE)


def all_users_for(events: list[Event], conn: ConnId) -> list[dict[str, Any]]:
    return [d.data for d in delivers(events, MessageType.ALL_USERS) if conn in d.conns]


def test_all_users_has_exactly_the_seeds_shape() -> None:
    _, events = seed_family()
    assert all_users_for(events, ALICE) == [SEED_ALL_USERS]
    # the event is plain JSON data, unchanged by a trip through the wire codec
    frame = json.loads(JSON.encode(MessageType.ALL_USERS, all_users_for(events, ALICE)[0]))
    assert frame == {"type": "resource:all_users", "data": SEED_ALL_USERS}


def test_each_tab_of_the_family_gets_all_users_with_its_own_current_sub_resource() -> None:
    _, events = seed_family()
    for conn, sub in ((ALICE, INFO), (BOB, DIAG), (CHARLIE, PROC)):
        [data] = all_users_for(events, conn)
        assert data == {**SEED_ALL_USERS, "currentSubResourceId": sub}
    assert sorted(d.conns for d in delivers(events, MessageType.ALL_USERS)) == sorted(
        [(ALICE,), (BOB,), (CHARLIE,)])


def test_all_users_goes_out_on_every_join_in_the_family_including_to_the_joiner() -> None:
    p = Presence()
    first = p.handle(join(ALICE, "alice", INFO), T0)
    [data] = all_users_for(first, ALICE)
    assert data["totalCount"] == 1
    assert [s["subResourceId"] for s in data["subResources"]] == [INFO]


def test_all_users_lists_sub_resources_in_order_of_first_join() -> None:
    p, _ = seed_family()
    events = p.handle(join(c(4), "dave", INFO, "viewer"), T0 + 3 * MINUTE)
    [data] = all_users_for(events, c(4))
    assert [s["subResourceId"] for s in data["subResources"]] == [INFO, DIAG, PROC]
    assert [u["userId"] for u in data["subResources"][0]["users"]] == ["alice", "dave"]


def test_a_user_in_two_tabs_of_a_family_counts_once_in_total_count() -> None:
    p, _ = seed_family()
    events = p.handle(join(c(5), "alice", DIAG, "viewer"), T0 + 3 * MINUTE)
    [data] = all_users_for(events, ALICE)
    assert data["totalCount"] == 3
    assert [u["userId"] for u in data["subResources"][1]["users"]] == ["bob", "alice"]


def test_a_disconnect_in_the_family_updates_everyones_total_count() -> None:
    p, _ = seed_family()
    p.handle(join(c(4), "dave", INFO, "viewer"), T0 + 3 * MINUTE)
    events = p.handle(join(c(5, FD1), "eve", DIAG, "editor"), T0 + 4 * MINUTE)
    assert {d["totalCount"] for d in (all_users_for(events, x)[0] for x in (ALICE, BOB, CHARLIE))} == {5}

    events = p.handle(Disconnect(c(4), "disconnected"), T0 + 5 * MINUTE)
    # Alice shares dave's tab: she is told he left ...
    [left] = delivers(events, MessageType.USER_LEFT)
    assert left.conns == (ALICE,)
    assert left.data == {"resourceId": INFO, "userId": "dave"}
    # ... and every tab of the family sees 4 users now.
    for conn in (ALICE, BOB, CHARLIE, c(5, FD1)):
        [data] = all_users_for(events, conn)
        assert data["totalCount"] == 4


def test_an_emptied_tab_drops_out_of_all_users() -> None:
    p, _ = seed_family()
    events = p.handle(Leave(BOB, None, DIAG), T0 + 3 * MINUTE)
    [data] = all_users_for(events, ALICE)
    assert [s["subResourceId"] for s in data["subResources"]] == [INFO, PROC]
    assert data["totalCount"] == 2
    assert all_users_for(events, BOB) == []


def test_the_last_member_of_a_family_leaving_sends_no_all_users() -> None:
    p = Presence()
    p.handle(join(ALICE, "alice", INFO), T0)
    events = p.handle(Leave(ALICE, None, INFO), T0 + 1)
    assert delivers(events, MessageType.ALL_USERS) == []
    assert p.rooms() == {}


def test_all_users_is_never_emitted_for_a_plain_resource_id() -> None:
    p = Presence()
    events = p.handle(join(c(1), "alice", PAGE), T0)
    events += p.handle(join(c(2), "bob", PAGE), T0)
    events += p.handle(join(c(3), "carol", PAGE), T0)
    events += p.handle(Leave(c(2), None, PAGE), T0)
    events += p.handle(Disconnect(c(3), "timeout"), T0)
    assert delivers(events, MessageType.ALL_USERS) == []


def test_families_are_kept_apart() -> None:
    p, _ = seed_family()
    events = p.handle(join(c(7), "zoe", "document:1000/tab:patient-info"), T0)
    [data] = all_users_for(events, c(7))
    assert data["parentResourceId"] == "document:1000"
    assert data["totalCount"] == 1
    assert all_users_for(events, ALICE) == []


# --- sync (a front door's link reopens) ------------------------------------------------------


def test_sync_restores_missing_memberships_and_tells_each_its_room_again() -> None:
    p = Presence()
    p.handle(join(c(1, FD1), "bob", INFO), T0)  # bob has been told the room without alice
    events = p.handle(Sync(FD0, (join(c(1), "alice", INFO, ref="old"), join(c(2), "carol", PAGE, "viewer"))),
                      T0 + 5)
    assert replies(events) == []
    assert set(of(events, MirrorJoin)) == {
        MirrorJoin(INFO, UserId("alice"), "editor", T0 + 5),
        MirrorJoin(PAGE, UserId("carol"), "viewer", T0 + 5),
    }
    assert [(t.conn, t.resource_id, t.ref, t.refresh) for t in of(events, TellState)] == [
        (c(1), INFO, None, True), (c(2), PAGE, None, True)]
    # bob is told alice arrived; alice and carol are told their whole rooms instead
    [arrived] = delivers(events, MessageType.USER_JOINED)
    assert arrived.conns == (c(1, FD1),) and arrived.data["user"]["userId"] == "alice"
    assert p.rooms() == {INFO: 2, PAGE: 1}
    assert p.rooms_of(c(1)) == {INFO}


def test_sync_keeps_listed_memberships_and_tells_them_their_rooms_again_announcing_nobody() -> None:
    p = Presence()
    p.handle(join(c(1), "alice", PAGE), T0)
    p.handle(join(c(2), "bob", PAGE), T0)
    events = p.handle(Sync(FD0, (join(c(1), "alice", PAGE), join(c(2), "bob", PAGE))), T0 + 5)
    assert [(t.conn, t.refresh) for t in events if isinstance(t, TellState)] == [(c(1), True), (c(2), True)]
    assert len(events) == 2  # nothing else: no mirror write, no arrival, no departure
    assert [u.joined_at_ms for u in p.users(PAGE)] == [T0, T0]


def test_sync_drops_memberships_of_that_front_door_it_does_not_list() -> None:
    p = Presence()
    p.handle(join(c(1), "alice", PAGE), T0)
    p.handle(join(c(2), "carol", PAGE), T0)
    p.handle(join(c(1, FD1), "bob", PAGE), T0)
    events = p.handle(Sync(FD0, (join(c(2), "carol", PAGE),)), T0 + 5)
    assert replies(events) == []
    assert of(events, MemberGone) == [MemberGone(c(1), PAGE, "disconnected", UserId("alice"), SessionId("sess-1"))]
    assert of(events, MirrorLeave) == [MirrorLeave(PAGE, UserId("alice"))]
    [left] = delivers(events, MessageType.USER_LEFT)
    assert set(left.conns) == {c(2), c(1, FD1)}
    assert left.data == {"resourceId": PAGE, "userId": "alice"}
    assert {m.conn for m in p.members(PAGE)} == {c(2), c(1, FD1)}


def test_an_empty_sync_after_a_front_door_restart_drops_all_its_memberships() -> None:
    p = Presence()
    p.handle(join(c(1), "alice", PAGE), T0)
    p.handle(join(c(1), "alice", INFO), T0)
    p.handle(join(c(2), "carol", DIAG), T0)
    p.handle(join(c(1, FD1), "bob", DIAG), T0)
    events = p.handle(Sync(FD0, ()), T0 + 5)
    assert {(g.conn, g.resource_id) for g in of(events, MemberGone)} == {(c(1), PAGE), (c(1), INFO), (c(2), DIAG)}
    assert p.rooms() == {DIAG: 1}
    assert p.connections() == 1
    # bob stays in the family and is told it shrank
    [data] = all_users_for(events, c(1, FD1))[-1:]
    assert data["totalCount"] == 1


def test_sync_leaves_other_front_doors_connections_alone() -> None:
    p = Presence()
    p.handle(join(c(1, FD1), "bob", PAGE), T0)
    p.handle(join(c(2, FD1), "dan", INFO), T0)
    assert p.handle(Sync(FD0, ()), T0 + 5) == []
    assert p.rooms() == {PAGE: 1, INFO: 1}


def test_a_restore_join_outside_sync_is_silent_too() -> None:
    p = Presence()
    p.handle(join(c(1), "alice", PAGE), T0)
    events = p.handle(join(c(2), "bob", PAGE, restore=True), T0)
    assert events == [MirrorJoin(PAGE, UserId("bob"), "editor", T0)]
    assert p.handle(join(c(2), "bob", PAGE, restore=True), T0) == []


# --- recovery: a shard that starts waits for every front door's Sync ------------------------


def test_a_starting_shard_restores_silently_and_tells_everyone_once_every_front_door_synced() -> None:
    p = Presence(expected_frontdoors=2)
    first = p.handle(Sync(FD0, (join(c(1), "alice", PAGE),)), T0)
    assert p.recovering and of(first, TellState) == [] and delivers(first, MessageType.USER_JOINED) == []
    assert p.next_deadline() == T0 + 1_000
    second = p.handle(Sync(FD1, (join(c(1, FD1), "bob", PAGE),)), T0 + 10)
    assert not p.recovering and p.next_deadline() is None
    assert [(t.conn, t.refresh) for t in of(second, TellState)] == [(c(1), True), (c(1, FD1), True)]
    assert delivers(second, MessageType.USER_JOINED) == []  # nobody arrived: the shard was rebuilt


def test_recovery_ends_at_the_grace_when_a_front_door_never_syncs() -> None:
    p = Presence(expected_frontdoors=3, restore_grace_ms=500)
    p.handle(Sync(FD0, (join(c(1), "alice", PAGE),)), T0)
    assert p.expire(T0 + 499) == [] and p.recovering
    [tell] = of(p.expire(T0 + 500), TellState)
    assert (tell.conn, tell.refresh) == (c(1), True) and not p.recovering
    assert p.expire(T0 + 10_000) == []


def test_a_join_while_recovering_is_answered_at_once_and_told_the_room_again_at_the_end() -> None:
    p = Presence(expected_frontdoors=2)
    p.handle(Sync(FD0, (join(c(1), "alice", PAGE),)), T0)
    joined = p.handle(join(c(2), "carol", PAGE, ref="j"), T0 + 1)
    assert [(t.conn, t.ref, t.refresh) for t in of(joined, TellState)] == [(c(2), "j", False)]
    ended = p.handle(Sync(FD1, (join(c(1, FD1), "bob", PAGE),)), T0 + 2)
    assert {t.conn for t in of(ended, TellState)} == {c(1), c(2), c(1, FD1)}


def test_a_member_gone_while_recovering_is_not_told_anything_at_the_end() -> None:
    p = Presence(expected_frontdoors=2)
    p.handle(Sync(FD0, (join(c(1), "alice", PAGE), join(c(2), "bob", PAGE))), T0)
    p.handle(Disconnect(c(2), "disconnected"), T0 + 1)
    ended = p.handle(Sync(FD1, ()), T0 + 2)
    assert [t.conn for t in of(ended, TellState)] == [c(1)]


def test_a_member_restored_after_a_shard_restart_keeps_its_original_join_time() -> None:
    p = Presence()
    original = dataclasses.replace(join(c(1), "alice", PAGE), joined_at_ms=T0 - 60_000)
    p.handle(Sync(FD0, (original,)), T0)
    assert p.users(PAGE)[0].joined_at_ms == T0 - 60_000


def test_a_fresh_join_uses_the_shards_clock_not_the_front_doors() -> None:
    p = Presence()
    p.handle(dataclasses.replace(join(c(1), "alice", PAGE), joined_at_ms=T0 - 60_000), T0)
    assert p.users(PAGE)[0].joined_at_ms == T0


def test_the_last_leave_tells_the_mirror_the_room_is_empty() -> None:
    p = Presence()
    p.handle(join(c(1), "alice", PAGE), T0)
    p.handle(join(c(2), "bob", PAGE), T0)
    first = of(p.handle(Leave(c(1), None, PAGE), T0), MirrorLeave)
    last = of(p.handle(Leave(c(2), None, PAGE), T0), MirrorLeave)
    assert [e.room_empty for e in first + last] == [False, True]
