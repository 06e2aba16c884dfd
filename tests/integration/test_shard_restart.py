"""A shard actor killed under live rooms comes back, with no presence flicker.

Real Ray (the session's), a dedicated small gateway (2 shards, 1 front door,
Redis on). Ray restarts the killed actor on a new port; the supervisor
pushes the new address in a new book; the front door relinks and sends
`Sync` with its members, and the shard rebuilds its rooms (DESIGN.md
"Data plane"; `Join.restore`): nobody sees anyone leave or arrive, and each
member is told its room again (an unsolicited `RESOURCE_STATE`), since
deliveries to it may have been lost with the old process.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import ray

from rounds.routing import HashRing
from tests.client import Client, Frame, eventually
from tests.conftest import GatewayHandle, gateway_settings

pytestmark = pytest.mark.ray

RECOVERY_S = 15.0



async def join_when_back(url: str, token: str, room: str) -> tuple[Client, Frame]:
    """Join `room` from a new client, retrying while its shard is away."""
    client = await Client.connect(url, token)
    deadline = time.monotonic() + RECOVERY_S
    while True:
        answer = await client.join(room)
        if answer.type == "RESOURCE_STATE":
            return client, answer
        assert (answer.type, answer.data.get("code")) == ("ERROR", "UNAVAILABLE"), answer
        if time.monotonic() > deadline:
            raise AssertionError(f"the shard did not come back within {RECOVERY_S}s")
        await asyncio.sleep(0.2)


async def test_a_killed_shard_is_restarted_and_its_rooms_rebuilt_without_spurious_events(
        ray_session: None, redis_url: str, var_root: Path, uid: str) -> None:
    handle = await asyncio.to_thread(GatewayHandle, gateway_settings(
        var_root, f"restart-{uid}", shards=2, frontdoors=1, redis_url=redis_url))
    clients: list[Client] = []
    try:
        room = f"page:/patient/12345-{uid}"
        owner = HashRing(range(2)).shard_for(room)
        a = await Client.connect(handle.url, handle.token(f"a-{uid}"))
        b = await Client.connect(handle.url, handle.token(f"b-{uid}"))
        clients += [a, b]
        await a.join(room)
        await b.join(room)
        await a.expect("USER_JOINED")
        before = await asyncio.to_thread(handle.gateway.status)
        old = before["shards"][owner]
        assert old["rooms"] == 1 and old["members"] == 2
        marks = {id(c): len(c.seen) for c in (a, b)}

        ray.kill(handle.gateway.shards[owner], no_restart=False)

        # Ray restarts it (new process, new port); the supervisor tells the
        # front door, which relinks and resyncs its members.
        async def back() -> Any:
            status = await asyncio.to_thread(handle.gateway.status)
            shard, door = status["shards"][owner], status["frontdoors"][0]
            return (shard is not None and shard["address"] != old["address"] and shard["members"] == 2
                    and door is not None and door["shards"].get(owner) is True and status)

        status = await eventually(back, RECOVERY_S, "shard back with its rooms")
        assert status["shards"][owner]["rooms"] == 1
        assert status["shards"][owner]["frontdoors"] == [0]
        assert status["bookVersion"] > 1

        c, state = await join_when_back(handle.url, handle.token(f"c-{uid}"), room)
        clients.append(c)
        assert [u["userId"] for u in state.data["users"]] == [f"a-{uid}", f"b-{uid}", f"c-{uid}"]
        for client in (a, b):
            joined = await client.expect("USER_JOINED")
            assert joined.data["user"]["userId"] == f"c-{uid}"
        # the originals saw no USER_LEFT, no USER_JOINED for each other: their room told again, then c
        for client in (a, b):
            await client.quiet(0.3)
            since = [(f.type, f.data.get("user", {}).get("userId", f.data.get("userId")))
                     for f in client.seen[marks[id(client)]:]]
            assert since == [("RESOURCE_STATE", None), ("USER_JOINED", f"c-{uid}")]
            refresh = client.seen[marks[id(client)]]
            assert refresh.ref is None
            assert [u["userId"] for u in refresh.data["users"]] == [f"a-{uid}", f"b-{uid}"]
        # and the room still works: a leave is fanned out
        await b.request("LEAVE_RESOURCE", {"resourceId": room}, ref="bye")
        for client in (a, c):
            assert (await client.expect("USER_LEFT")).data == {"resourceId": room, "userId": f"b-{uid}"}
    finally:
        for client in clients:
            await client.close()
        await asyncio.to_thread(handle.stop)
