"""Seed story BE-001.2, "User Presence and Resource Rooms", over real WebSockets.

Every scenario runs against the main gateway (two shards and two front doors
as Ray actors sharing one port, Redis on) through `/ws`. Ids carry the test's
`uid` so tests sharing the gateway never share a room or a user. The Redis
mirror is written by the shard after it answers, so Redis checks poll briefly.
The seed's "broadcasted via RabbitMQ" is cross-node fan-out, a later issue.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from datetime import datetime
from typing import Any

import pytest
import redis

from rounds.routing import HashRing
from tests.client import Client, Frame, eventually
from tests.conftest import GatewayHandle
from tests.e2e.conftest import Connect

pytestmark = pytest.mark.ray

ISO_MS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
ALL_USERS = "resource:all_users"





def users_key(room: str) -> str:
    return f"resource:{room}:users"


def user_key(room: str, user: str) -> str:
    return f"resource:{room}:user:{user}"


def ms_of(iso: str) -> float:
    assert ISO_MS.fullmatch(iso), iso
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp() * 1000


def types(frames: list[Frame]) -> list[str]:
    return [f.type for f in frames]


def me(state: Frame, user: str) -> dict[str, Any]:
    [entry] = [u for u in state.data["users"] if u["userId"] == user]
    return entry


# --- Scenario: Join resource as editor -----------------------------------------------


async def test_join_resource_as_editor(connect: Connect, rdb: redis.Redis, uid: str) -> None:
    room = f"page:/patient/12345-{uid}"
    user = f"usr_001-{uid}"
    other = await connect(f"usr_002-{uid}", username="usr_002@example.com")
    await other.join(room)

    client = await connect(user, username="usr_001@example.com")
    before_ms = time.time() * 1000
    state = await client.join(room, "editor")

    # I receive RESOURCE_STATE with the users online (me included), state, revision, locks
    assert state.type == "RESOURCE_STATE"
    assert state.ref == f"join:{room}"
    assert state.data["resourceId"] == room
    assert set(state.data) >= {"users", "state", "revision", "locks"}
    assert [u["userId"] for u in state.data["users"]] == [f"usr_002-{uid}", user]
    mine = me(state, user)
    assert set(mine) == {"userId", "username", "mode", "joinedAt"}
    assert mine["username"] == "usr_001@example.com"
    assert mine["mode"] == "editor"
    assert abs(ms_of(mine["joinedAt"]) - before_ms) < 5_000
    assert base64.b64decode(state.data["state"]) == b"\x00\x00"  # an empty Y.js update, base64 in JSON
    assert state.data["revision"] == 0
    assert state.data["locks"] == []

    # I am added to the Redis set, and my hash holds the mode and the join time
    await eventually(lambda: user in rdb.smembers(users_key(room)))
    fields = await eventually(lambda: rdb.hgetall(user_key(room, user)))
    assert fields == {"mode": "editor", "joinedAt": mine["joinedAt"]}
    assert abs(ms_of(fields["joinedAt"]) - time.time() * 1000) < 10_000

    # the others in the resource receive USER_JOINED with me
    joined = await other.expect("USER_JOINED")
    assert joined.data == {"resourceId": room, "user": mine}


# --- Scenario: Join resource as viewer -----------------------------------------------


async def test_join_resource_as_viewer(connect: Connect, rdb: redis.Redis, uid: str) -> None:
    room = f"page:/patient/12345-{uid}"
    editor = await connect(f"editor-{uid}")
    await editor.join(room, "editor")

    viewer = await connect(f"viewer-{uid}")
    state = await viewer.join(room, "viewer")
    # I see all content
    assert state.type == "RESOURCE_STATE"
    assert {u["userId"]: u["mode"] for u in state.data["users"]} == {f"editor-{uid}": "editor",
                                                                     f"viewer-{uid}": "viewer"}
    assert "state" in state.data and "revision" in state.data

    # but an update is rejected with PERMISSION_DENIED
    denied = await viewer.request("RESOURCE_UPDATE", {
        "resourceId": room, "update": base64.b64encode(b"\x01\x02\x03").decode()}, ref="upd")
    assert denied.type == "PERMISSION_DENIED"
    assert denied.data["code"] == "PERMISSION_DENIED"
    assert denied.data["resourceId"] == room
    assert "RESOURCE_UPDATE" not in types(await editor.quiet(0.3))

    # an observer may not join as editor, and is not in the room afterwards ...
    observer_id = f"observer-{uid}"
    observer = await connect(observer_id, role="observer")
    refused = await observer.join(room, "editor")
    assert refused.type == "PERMISSION_DENIED"
    assert refused.data["code"] == "PERMISSION_DENIED"
    assert "USER_JOINED" not in types(await editor.quiet(0.3))
    assert observer_id not in rdb.smembers(users_key(room))
    refused_again = await observer.request("LEAVE_RESOURCE", {"resourceId": room}, ref="leave")
    assert (refused_again.type, refused_again.data["code"]) == ("ERROR", "NOT_JOINED")

    # ... but may join as viewer
    allowed = await observer.join(room, "viewer")
    assert allowed.type == "RESOURCE_STATE"
    assert me(allowed, observer_id)["mode"] == "viewer"
    joined = await editor.expect("USER_JOINED")
    assert joined.data["user"]["userId"] == observer_id


# --- Scenario: Leave resource gracefully ------------------------------------------------


async def test_leave_resource_gracefully(connect: Connect, rdb: redis.Redis, uid: str) -> None:
    room = f"page:/patient/12345-{uid}"
    leaver_id = f"leaver-{uid}"
    stayer = await connect(f"stayer-{uid}")
    await stayer.join(room)
    leaver = await connect(leaver_id)
    await leaver.join(room)
    await stayer.expect("USER_JOINED")
    await eventually(lambda: rdb.exists(user_key(room, leaver_id)))

    left = await leaver.request("LEAVE_RESOURCE", {"resourceId": room}, ref="bye")
    assert (left.type, left.ref, left.data) == ("RESOURCE_LEFT", "bye", {"resourceId": room})

    # I am removed from the users list, the others are told
    user_left = await stayer.expect("USER_LEFT")
    assert user_left.data == {"resourceId": room, "userId": leaver_id}
    # and my metadata is deleted from Redis
    await eventually(lambda: leaver_id not in rdb.smembers(users_key(room)))
    await eventually(lambda: not rdb.exists(user_key(room, leaver_id)))
    assert rdb.smembers(users_key(room)) == {f"stayer-{uid}"}

    # a newcomer no longer sees me
    newcomer = await connect(f"newcomer-{uid}")
    state = await newcomer.join(room)
    assert [u["userId"] for u in state.data["users"]] == [f"stayer-{uid}", f"newcomer-{uid}"]


# --- Scenario: Presence list updates in real-time --------------------------------------


async def test_presence_list_updates_in_real_time(connect: Connect, uid: str) -> None:
    room = f"page:/patient/12345-{uid}"
    members = []
    for i in range(4):  # me and 3 others
        client = await connect(f"user{i}-{uid}")
        await client.join(room)
        members.append(client)
    for i, client in enumerate(members[:-1]):  # everyone has seen the later arrivals
        for _ in range(i + 1, 4):
            await client.expect("USER_JOINED", timeout=5)

    newcomer = await connect(f"newcomer-{uid}")
    state = await newcomer.join(room)
    entry = me(state, f"newcomer-{uid}")
    for client in members:  # each of the 4 is told at once
        joined = await client.expect("USER_JOINED", timeout=2, user=entry)
        assert joined.data == {"resourceId": room, "user": entry}

    # each presence list (RESOURCE_STATE on joining plus every USER_JOINED since) shows 5 users
    everyone = {f"user{i}-{uid}" for i in range(4)} | {f"newcomer-{uid}"}
    for client in [*members, newcomer]:
        presence = presence_list(client, room)
        assert set(presence) == everyone
        assert len(presence) == 5
    assert len(state.data["users"]) == 5


def presence_list(client: Client, room: str) -> list[str]:
    """The list a browser would keep: RESOURCE_STATE, then USER_JOINED/USER_LEFT."""
    users: list[str] = []
    for frame in client.seen:
        if frame.data.get("resourceId") != room:
            continue
        if frame.type == "RESOURCE_STATE":
            users = [u["userId"] for u in frame.data["users"]]
        elif frame.type == "USER_JOINED":
            users.append(frame.data["user"]["userId"])
        elif frame.type == "USER_LEFT":
            users.remove(frame.data["userId"])
    return users


# --- Scenario: Multi-tab presence tracking (cross-tab awareness) --------------------------


async def shards_rooms(gateway: GatewayHandle) -> list[int]:
    status = await asyncio.to_thread(gateway.gateway.status)
    return [s["rooms"] for s in status["shards"]]


async def settled_rooms(gateway: GatewayHandle) -> list[int]:
    """Room counts per shard once two readings agree (earlier tests' disconnects land)."""
    previous = await shards_rooms(gateway)
    for _ in range(50):
        await asyncio.sleep(0.1)
        current = await shards_rooms(gateway)
        if current == previous:
            return current
        previous = current
    raise AssertionError(f"room counts never settled (last {previous})")


def all_users(client: Client) -> list[dict[str, Any]]:
    return [f.data for f in client.seen if f.type == ALL_USERS]


async def test_multi_tab_presence_tracking_across_sub_resources(
        connect: Connect, gateway: GatewayHandle, uid: str) -> None:
    parent = f"document:999-{uid}"
    info, diag, proc = f"{parent}/tab:patient-info", f"{parent}/tab:diagnosis", f"{parent}/tab:procedure"
    rooms_before = await settled_rooms(gateway)

    tabs = {}
    joined_at = {}
    for name, sub, mode in (("alice", info, "editor"), ("bob", diag, "viewer"), ("charlie", proc, "editor")):
        client = await connect(f"{name}-{uid}", username=f"{name}@example.com")
        state = await client.join(sub, mode)
        joined_at[name] = me(state, f"{name}-{uid}")["joinedAt"]
        tabs[name] = client

    def entry(name: str, mode: str) -> dict[str, Any]:
        return {"userId": f"{name}-{uid}", "username": f"{name}@example.com", "mode": mode,
                "joinedAt": joined_at[name]}

    # Each receives resource:all_users with exactly the seed's shape, its own tab as current
    seed_shape = {
        "parentResourceId": parent,
        "totalCount": 3,
        "subResources": [
            {"subResourceId": info, "users": [entry("alice", "editor")]},
            {"subResourceId": diag, "users": [entry("bob", "viewer")]},
            {"subResourceId": proc, "users": [entry("charlie", "editor")]},
        ],
    }
    for name, sub in (("alice", info), ("bob", diag), ("charlie", proc)):
        got = await tabs[name].expect(ALL_USERS, totalCount=3)
        assert got.data == {**seed_shape, "currentSubResourceId": sub}
        assert list(got.data) == ["parentResourceId", "currentSubResourceId", "totalCount", "subResources"]
    # the joiner got one too, on its own join (alice's first one lists only her)
    assert all_users(tabs["alice"])[0]["totalCount"] == 1

    # the whole family lives on one shard (hashed by its parent)
    owner = HashRing([0, 1]).shard_for(info)
    expected = list(rooms_before)
    expected[owner] += 3
    assert await settled_rooms(gateway) == expected

    # two more users: everyone sees all users across all tabs, 5 in total
    dave = await connect(f"dave-{uid}", username="dave@example.com")
    await dave.join(info, "viewer")
    eve = await connect(f"eve-{uid}", username="eve@example.com")
    await eve.join(diag, "editor")
    tabs.update(dave=dave, eve=eve)
    own_tab = {"alice": info, "bob": diag, "charlie": proc, "dave": info, "eve": diag}
    for name, client in tabs.items():
        got = await client.expect(ALL_USERS, totalCount=5)
        assert got.data["currentSubResourceId"] == own_tab[name]
        assert [[u["userId"] for u in s["users"]] for s in got.data["subResources"]] == [
            [f"alice-{uid}", f"dave-{uid}"], [f"bob-{uid}", f"eve-{uid}"], [f"charlie-{uid}"]]
        client.inbox.clear()  # earlier updates (totalCount 4 while eve was joining) are history

    # a user disconnects: their tab's others get USER_LEFT, and everyone sees 4
    await dave.close()
    left = await tabs["alice"].expect("USER_LEFT")
    assert left.data == {"resourceId": info, "userId": f"dave-{uid}"}
    for name in ("alice", "bob", "charlie", "eve"):
        got = await tabs[name].expect(ALL_USERS, totalCount=4)
        assert got.data["currentSubResourceId"] == own_tab[name]
        assert f"dave-{uid}" not in {u["userId"] for s in got.data["subResources"] for u in s["users"]}
    for name in ("bob", "charlie", "eve"):  # USER_LEFT is per room: only dave's tab hears it
        assert "USER_LEFT" not in types(tabs[name].inbox)


async def test_a_connection_leaving_several_tabs_at_once_sends_each_tab_one_family_update(
        connect: Connect, uid: str) -> None:
    parent = f"document:31-{uid}"
    info, diag, proc = f"{parent}/tab:patient-info", f"{parent}/tab:diagnosis", f"{parent}/tab:procedure"
    bob = await connect(f"bob-{uid}")
    await bob.join(diag)
    carol = await connect(f"carol-{uid}")
    await carol.join(proc)
    alice = await connect(f"alice-{uid}")
    await alice.join(info)
    await alice.join(proc)  # one connection, two tabs of the family
    for client in (bob, carol):  # wait for the update of alice's second join, the last one due
        while True:
            update = await client.expect(ALL_USERS)
            tabs = {sub["subResourceId"]: sub["users"] for sub in update.data["subResources"]}
            if len(tabs.get(proc, ())) == 2:
                break
        client.inbox.clear()

    await alice.close()
    await carol.expect("USER_LEFT")
    for client, tab in ((bob, diag), (carol, proc)):
        updates = [f for f in await client.quiet(0.4) + client.inbox if f.type == ALL_USERS]
        assert [(u.data["currentSubResourceId"], u.data["totalCount"]) for u in updates] == [(tab, 2)]
        assert [s["subResourceId"] for s in updates[0].data["subResources"]] == [diag, proc]
        assert [u["userId"] for s in updates[0].data["subResources"] for u in s["users"]] == [
            f"bob-{uid}", f"carol-{uid}"]


async def test_a_plain_resource_id_never_yields_all_users(connect: Connect, uid: str) -> None:
    room = f"page:/patient/12345-{uid}"
    a = await connect(f"a-{uid}")
    b = await connect(f"b-{uid}")
    await a.join(room)
    await b.join(room)
    await b.request("LEAVE_RESOURCE", {"resourceId": room}, ref="leave")
    await a.expect("USER_LEFT")
    await b.join(room)
    await b.close()
    await a.expect("USER_LEFT")
    await a.quiet(0.3)
    assert ALL_USERS not in types(a.seen)
    assert ALL_USERS not in types(b.seen)


# --- errors and several rooms ---------------------------------------------------------------


async def test_joining_a_room_twice_is_refused_with_already_joined(connect: Connect, uid: str) -> None:
    room = f"page:/patient/12345-{uid}"
    client = await connect(f"twice-{uid}")
    await client.join(room)
    again = await client.request("JOIN_RESOURCE", {"resourceId": room, "resourceType": "patient_record",
                                                   "mode": "viewer"}, ref="again")
    assert (again.type, again.ref, again.data["code"]) == ("ERROR", "again", "ALREADY_JOINED")
    # still in the room, once, in the first mode
    other = await connect(f"other-{uid}")
    state = await other.join(room)
    assert [(u["userId"], u["mode"]) for u in state.data["users"]] == [
        (f"twice-{uid}", "editor"), (f"other-{uid}", "editor")]


async def test_leaving_a_room_never_joined_is_refused_with_not_joined(connect: Connect, uid: str) -> None:
    room = f"page:/patient/12345-{uid}"
    member = await connect(f"member-{uid}")
    await member.join(room)
    stranger = await connect(f"stranger-{uid}")
    answer = await stranger.request("LEAVE_RESOURCE", {"resourceId": room}, ref="nope")
    assert (answer.type, answer.ref, answer.data["code"]) == ("ERROR", "nope", "NOT_JOINED")
    assert "USER_LEFT" not in types(await member.quiet(0.3))


def rooms_on_each_shard(uid: str) -> tuple[str, str]:
    ring = HashRing([0, 1])
    found: dict[int, str] = {}
    n = 0
    while len(found) < 2:
        room = f"page:/patient/{n}-{uid}"
        found.setdefault(ring.shard_for(room), room)
        n += 1
    return found[0], found[1]


async def test_a_connection_in_rooms_on_both_shards_leaves_all_of_them_on_disconnect(
        connect: Connect, rdb: redis.Redis, uid: str) -> None:
    rooms = rooms_on_each_shard(uid)
    roamer_id = f"roamer-{uid}"
    roamer = await connect(roamer_id)
    watchers = []
    for i, room in enumerate(rooms):
        watcher = await connect(f"watcher{i}-{uid}")
        await watcher.join(room)
        watchers.append(watcher)
        state = await roamer.join(room)
        assert state.type == "RESOURCE_STATE"
        assert [u["userId"] for u in state.data["users"]] == [f"watcher{i}-{uid}", roamer_id]
        await watcher.expect("USER_JOINED")
    for room in rooms:
        await eventually(lambda room=room: rdb.exists(user_key(room, roamer_id)))

    await roamer.close()
    for room, watcher in zip(rooms, watchers, strict=False):
        left = await watcher.expect("USER_LEFT")
        assert left.data == {"resourceId": room, "userId": roamer_id}
        await eventually(lambda room=room: not rdb.exists(user_key(room, roamer_id)))
        assert rdb.smembers(users_key(room)) == {watcher.connected.data["userId"]}


async def test_one_user_with_two_tabs_in_a_room_is_listed_once_and_leaves_with_the_last_tab(
        connect: Connect, rdb: redis.Redis, uid: str) -> None:
    room = f"page:/patient/12345-{uid}"
    user = f"nurse-{uid}"
    watcher = await connect(f"watcher-{uid}")
    await watcher.join(room)

    tab1 = await connect(user)
    first = await tab1.join(room, "viewer")
    await watcher.expect("USER_JOINED")
    tab2 = await connect(user)
    second = await tab2.join(room, "editor")
    assert [u["userId"] for u in second.data["users"]] == [f"watcher-{uid}", user]
    # the user edits from one tab: listed as an editor, still since the first tab's join
    assert me(second, user) == {**me(first, user), "mode": "editor"}
    assert "USER_JOINED" not in types(await watcher.quiet(0.3))
    fields = await eventually(lambda: (f := rdb.hgetall(user_key(room, user))).get("mode") == "editor" and f)
    assert fields["joinedAt"] == me(first, user)["joinedAt"]

    await tab2.request("LEAVE_RESOURCE", {"resourceId": room}, ref="l2")
    assert "USER_LEFT" not in types(await watcher.quiet(0.3))
    await eventually(lambda: rdb.hget(user_key(room, user), "mode") == "viewer")
    await tab1.close()
    left = await watcher.expect("USER_LEFT")
    assert left.data == {"resourceId": room, "userId": user}
    await eventually(lambda: not rdb.exists(user_key(room, user)))


async def test_msgpack_and_json_clients_in_one_room_see_each_others_presence(
        connect: Connect, uid: str) -> None:
    room = f"document:77-{uid}/tab:diagnosis"
    packed = await connect(f"packed-{uid}", binary=True)
    assert packed.ws.subprotocol == "rounds.v1.msgpack"
    state = await packed.join(room)
    assert state.data["state"] == b"\x00\x00"  # an empty Y.js update, raw bytes in msgpack

    text = await connect(f"text-{uid}")
    text_state = await text.join(room, "viewer")
    assert [u["userId"] for u in text_state.data["users"]] == [f"packed-{uid}", f"text-{uid}"]
    joined = await packed.expect("USER_JOINED")
    assert joined.data == {"resourceId": room, "user": me(text_state, f"text-{uid}")}
    assert (await packed.expect(ALL_USERS, totalCount=2)).data == (await text.expect(ALL_USERS, totalCount=2)).data

    await packed.request("LEAVE_RESOURCE", {"resourceId": room}, ref="bye")
    left = await text.expect("USER_LEFT")
    assert left.data == {"resourceId": room, "userId": f"packed-{uid}"}
