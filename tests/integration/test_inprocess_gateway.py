"""The whole gateway in one process (`rounds.inprocess`, no Ray), memory backends.

Two shards and two front doors sharing one port, real WebSockets and real
link streams between them. Presence must work whichever front door a client
lands on and whichever shard owns the room; a front door whose link to a
shard drops relinks and sends `Sync`, so memberships that ended while the
link was down are dropped on the shard.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from rounds.audit.events import MemoryAuditSink
from rounds.auth import mint_token, private_key_for_dev
from rounds.cluster.inprocess import InProcessGateway
from rounds.frontdoor.server import FrontDoor
from rounds.routing import HashRing
from rounds.shard.service import ShardService
from tests.client import Client, eventually
from tests.conftest import gateway_settings

Connect = Callable[..., Awaitable[Client]]


@pytest.fixture
async def inproc(var_root: Path, uid: str) -> AsyncIterator[InProcessGateway]:
    settings = gateway_settings(var_root, f"inproc-{uid}", shards=2, frontdoors=2)
    assert settings.redis_url is None  # memory backends
    gateway = await InProcessGateway(settings, MemoryAuditSink()).start()
    try:
        yield gateway
    finally:
        await gateway.stop()


@contextlib.asynccontextmanager
async def clients_of(gateway: InProcessGateway) -> AsyncIterator[Connect]:
    """Open clients, on a chosen front door if asked; all closed at the end."""
    key = private_key_for_dev(gateway.settings)
    opened: list[Client] = []

    async def open_client(user: str, frontdoor: int | None = None) -> Client:
        # The kernel spreads connections over the two listening sockets
        # (SO_REUSEPORT): reconnect until the wanted front door takes one.
        for _ in range(64):
            client = await Client.connect(gateway.url, mint_token(key, user_id=user, role="surgeon"))
            if frontdoor is None or frontdoor_of(gateway, client) == frontdoor:
                opened.append(client)
                return client
            await client.close()
        raise AssertionError(f"no connection landed on frontdoor-{frontdoor}")

    try:
        yield open_client
    finally:
        for client in opened:
            await client.close()


@pytest.fixture
async def connect(inproc: InProcessGateway) -> AsyncIterator[Connect]:
    async with clients_of(inproc) as open_client:
        yield open_client


def frontdoor_of(gateway: InProcessGateway, client: Client) -> int:
    session = client.connected.data["sessionId"]
    [index] = [fd.index for fd in gateway.frontdoors
               if any(c.session.session_id == session for c in fd.clients.values())]
    return index


def conn_of(gateway: InProcessGateway, client: Client) -> int:
    session = client.connected.data["sessionId"]
    [conn] = [c.conn for fd in gateway.frontdoors for c in fd.clients.values() if c.session.session_id == session]
    return conn


def room_on(shard: int, uid: str, template: str = "page:/ward/{n}-{uid}") -> str:
    """A resource id (or family parent) that shard `shard` of two owns."""
    ring = HashRing([0, 1])
    return next(r for r in (template.format(n=n, uid=uid) for n in range(1000)) if ring.shard_for(r) == shard)



def types(frames: list[Any]) -> list[str]:
    return [f.type for f in frames]


# --- presence across front doors and shards ----------------------------------------------


async def test_presence_works_across_two_front_doors_and_two_shards(
        inproc: InProcessGateway, connect: Connect, uid: str) -> None:
    a = await connect(f"a-{uid}", frontdoor=0)
    b = await connect(f"b-{uid}", frontdoor=1)
    rooms = [room_on(0, uid), room_on(1, uid)]
    for room in rooms:
        await a.join(room)
        state = await b.join(room, "viewer")
        assert [u["userId"] for u in state.data["users"]] == [f"a-{uid}", f"b-{uid}"]
        joined = await a.expect("USER_JOINED")
        assert joined.data["resourceId"] == room
        assert joined.data["user"]["userId"] == f"b-{uid}"
    # each shard owns exactly its room, with both connections in it
    assert [s.presence.rooms() for s in inproc.shards] == [{rooms[0]: 2}, {rooms[1]: 2}]

    # a leave on one shard is fanned out across front doors
    left = await a.request("LEAVE_RESOURCE", {"resourceId": rooms[0]}, ref="l")
    assert left.type == "RESOURCE_LEFT"
    assert (await b.expect("USER_LEFT")).data == {"resourceId": rooms[0], "userId": f"a-{uid}"}
    # a disconnect removes a from the room on the other shard
    await a.close()
    assert (await b.expect("USER_LEFT")).data == {"resourceId": rooms[1], "userId": f"a-{uid}"}
    assert [s.presence.rooms() for s in inproc.shards] == [{rooms[0]: 1}, {rooms[1]: 1}]


async def test_a_family_update_reaches_tabs_on_both_front_doors(
        inproc: InProcessGateway, connect: Connect, uid: str) -> None:
    parent = f"document:5-{uid}"
    a = await connect(f"a-{uid}", frontdoor=0)
    b = await connect(f"b-{uid}", frontdoor=1)
    mine = (await a.join(f"{parent}/tab:notes")).data["users"][0]
    await b.join(f"{parent}/tab:orders")
    for client, tab in ((a, "notes"), (b, "orders")):
        got = await client.expect("resource:all_users", totalCount=2)
        assert got.data["currentSubResourceId"] == f"{parent}/tab:{tab}"
    await b.close()
    assert (await a.expect("resource:all_users", totalCount=1)).data["subResources"] == [
        {"subResourceId": f"{parent}/tab:notes", "users": [mine]}]
    assert mine["userId"] == f"a-{uid}"


# --- a link dropped by the shard --------------------------------------------------------------


def close_link(shard: ShardService, frontdoor: int) -> Any:
    link = shard._links[frontdoor]  # the shard's side of the front door's stream
    link.close()
    return link


async def test_a_link_closed_by_the_shard_relinks_and_keeps_the_rooms(
        inproc: InProcessGateway, connect: Connect, uid: str) -> None:
    room = room_on(0, uid)
    shard = inproc.shards[0]
    a = await connect(f"a-{uid}", frontdoor=0)
    b = await connect(f"b-{uid}", frontdoor=1)
    await a.join(room)
    await b.join(room)
    await a.expect("USER_JOINED")

    old = close_link(shard, 0)
    await eventually(lambda: shard._links.get(0) not in (None, old))
    await eventually(lambda: inproc.frontdoors[0].links.status() == {0: True, 1: True})
    # the rooms survived silently and work as before
    assert shard.presence.rooms() == {room: 2}
    c = await connect(f"c-{uid}", frontdoor=0)
    state = await c.join(room)
    assert [u["userId"] for u in state.data["users"]] == [f"a-{uid}", f"b-{uid}", f"c-{uid}"]
    for client in (a, b):
        assert (await client.expect("USER_JOINED")).data["user"]["userId"] == f"c-{uid}"
    assert "USER_LEFT" not in types(a.seen + b.seen)


@contextlib.asynccontextmanager
async def link_down(shard: ShardService, frontdoor: FrontDoor) -> AsyncIterator[None]:
    """Close the shard's side of `frontdoor`'s link and refuse relinks until the
    block ends (the listener is closed; existing links stay), then listen again
    on the same address so the front door relinks."""
    assert shard._server is not None and shard.address is not None
    shard._server.close()
    close_link(shard, frontdoor.index)
    await eventually(lambda: not frontdoor.links.status()[shard.index])
    try:
        yield
    finally:
        loop = asyncio.get_running_loop()
        shard._server = await loop.create_server(shard._new_link, *shard.address)
        await eventually(lambda: frontdoor.links.status()[shard.index], timeout=5)


async def test_a_membership_that_ended_while_the_link_was_down_is_dropped_after_relink(
        inproc: InProcessGateway, connect: Connect, uid: str) -> None:
    room = room_on(1, uid)
    shard = inproc.shards[1]
    door = inproc.frontdoors[0]
    gone = await connect(f"gone-{uid}", frontdoor=0)
    stays_here = await connect(f"here-{uid}", frontdoor=0)
    stays_there = await connect(f"there-{uid}", frontdoor=1)
    for client in (gone, stays_here, stays_there):
        await client.join(room)
    gone_conn = conn_of(inproc, gone)
    await eventually(lambda: len(shard.presence.members(room)) == 3)
    await stays_here.expect("USER_JOINED")  # there's arrival; nothing else is due
    marks = {id(c): len(c.seen) for c in (stays_here, stays_there)}

    async with link_down(shard, door):
        await gone.close()
        await eventually(lambda: gone_conn not in door.clients)
        # the Disconnect could not reach the shard: it still lists the connection
        assert gone_conn in {m.conn for m in shard.presence.members(room)}

    # after relink the front door's Sync drops it, and the others are told
    await eventually(lambda: gone_conn not in {m.conn for m in shard.presence.members(room)})
    assert shard.presence.rooms_of(gone_conn) == frozenset()
    for client in (stays_here, stays_there):
        left = await client.expect("USER_LEFT")
        assert left.data == {"resourceId": room, "userId": f"gone-{uid}"}
    assert sorted(m.user_id for m in shard.presence.members(room)) == [f"here-{uid}", f"there-{uid}"]
    # the others' memberships were kept; the member behind the link that dropped
    # is told its room again (deliveries to it may have been lost), unasked
    for client in (stays_here, stays_there):
        await client.quiet(0.2)
    assert types(stays_there.seen[marks[id(stays_there)]:]) == ["USER_LEFT"]
    assert types(stays_here.seen[marks[id(stays_here)]:]) == ["USER_LEFT", "RESOURCE_STATE"]
    refresh = stays_here.seen[-1]
    assert refresh.ref is None and refresh.data["resourceId"] == room
    assert [u["userId"] for u in refresh.data["users"]] == [f"here-{uid}", f"there-{uid}"]


async def test_a_leave_while_the_link_is_down_is_answered_and_dropped_after_relink(
        inproc: InProcessGateway, connect: Connect, uid: str) -> None:
    room = room_on(0, uid)
    shard = inproc.shards[0]
    door = inproc.frontdoors[1]
    leaver = await connect(f"leaver-{uid}", frontdoor=1)
    watcher = await connect(f"watcher-{uid}", frontdoor=0)
    await leaver.join(room)
    await watcher.join(room)

    async with link_down(shard, door):
        left = await leaver.request("LEAVE_RESOURCE", {"resourceId": room}, ref="bye")
        assert (left.type, left.data) == ("RESOURCE_LEFT", {"resourceId": room})
        # a join meanwhile is refused rather than lost
        refused = await leaver.request("JOIN_RESOURCE", {"resourceId": room, "mode": "viewer"}, ref="j")
        assert (refused.type, refused.data["code"]) == ("ERROR", "UNAVAILABLE")

    assert (await watcher.expect("USER_LEFT")).data == {"resourceId": room, "userId": f"leaver-{uid}"}
    assert [m.user_id for m in shard.presence.members(room)] == [f"watcher-{uid}"]


async def test_tabs_dropped_by_a_sync_send_each_remaining_tab_one_family_update(
        inproc: InProcessGateway, connect: Connect, uid: str) -> None:
    parent = room_on(0, uid, "document:{n}-{uid}")
    notes, orders, vitals = f"{parent}/tab:notes", f"{parent}/tab:orders", f"{parent}/tab:vitals"
    shard = inproc.shards[0]
    door = inproc.frontdoors[0]
    gone = await connect(f"gone-{uid}", frontdoor=0)
    here = await connect(f"here-{uid}", frontdoor=0)
    there = await connect(f"there-{uid}", frontdoor=1)
    await here.join(orders)
    await there.join(vitals)
    await gone.join(notes)
    await gone.join(vitals)
    await eventually(lambda: shard.presence.rooms() == {orders: 1, vitals: 2, notes: 1})
    gone_conn = conn_of(inproc, gone)
    for client in (here, there):  # let every update due so far arrive
        await client.quiet(0.2)
    marks = {id(c): len(c.seen) for c in (here, there)}

    async with link_down(shard, door):
        await gone.close()
        await eventually(lambda: gone_conn not in door.clients)

    await there.expect("USER_LEFT")
    for client, tab in ((here, orders), (there, vitals)):
        await client.quiet(0.3)
        updates = [f.data for f in client.seen[marks[id(client)]:] if f.type == "resource:all_users"]
        assert [(u["currentSubResourceId"], u["totalCount"]) for u in updates] == [(tab, 2)]
        assert [s["subResourceId"] for s in updates[0]["subResources"]] == [orders, vitals]
    assert shard.presence.rooms() == {orders: 1, vitals: 1}


async def test_a_join_in_flight_when_the_link_drops_is_answered_unavailable(
        inproc: InProcessGateway, connect: Connect, uid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The shard hangs (takes the join and never answers), then the link drops:
    # the client must hear about it instead of waiting forever, and the room
    # must not be restored behind its back by the next Sync.
    room = room_on(0, uid)
    shard, door = inproc.shards[0], inproc.frontdoors[0]
    a = await connect(f"a-{uid}", frontdoor=0)
    monkeypatch.setattr(shard, "_on_message", lambda link, msg: None)
    await a.send("JOIN_RESOURCE", {"resourceId": room, "mode": "editor"}, ref="j1")
    await eventually(lambda: any(room in c.session.joining for c in door.clients.values()))
    async with link_down(shard, door):
        error = await a.expect("ERROR")
        assert (error.ref, error.data["code"], error.data["resourceId"]) == ("j1", "UNAVAILABLE", room)
        monkeypatch.undo()
    assert shard.presence.rooms() == {}
    state = await a.join(room)  # and the retry works
    assert state.type == "RESOURCE_STATE"
