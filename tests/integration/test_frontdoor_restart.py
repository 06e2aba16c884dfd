"""A front-door process killed under live clients: its clients are dropped and
reconnect, everyone else is told they left, and Ray brings the door back.

Real Ray (the session's), a dedicated gateway (1 shard, 2 front doors on one
port, Redis on). The restarted front door binds the same port again
(SO_REUSEPORT), gets the address book from the supervisor and sends an empty
`Sync` to the shard, which drops its old connections (DESIGN.md, "Data plane").
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import ray

from tests.client import Client
from tests.conftest import GatewayHandle, gateway_settings

pytestmark = pytest.mark.ray

RECOVERY_S = 20.0


async def connect_on(handle: GatewayHandle, user: str, frontdoor: int) -> Client:
    """A client that landed on `frontdoor` (the kernel picks; retry until it does)."""
    for _ in range(64):
        client = await Client.connect(handle.url, handle.token(user))
        session = client.connected.data["sessionId"]
        record = await handle.wait_audit("USER_CONNECTED", sessionId=session)
        if record["source"] == f"frontdoor-{frontdoor}":
            return client
        await client.close()
    raise AssertionError(f"no connection landed on frontdoor-{frontdoor}")


async def test_a_killed_front_door_drops_only_its_clients_and_comes_back(
        ray_session: None, redis_url: str, var_root: Path, uid: str, rdb) -> None:
    handle = await asyncio.to_thread(GatewayHandle, gateway_settings(
        var_root, f"fdrestart-{uid}", shards=1, frontdoors=2, redis_url=redis_url))
    clients: list[Client] = []
    try:
        room = f"page:/patient/777-{uid}"
        stays = await connect_on(handle, f"stays-{uid}", 0)
        dropped = await connect_on(handle, f"dropped-{uid}", 1)
        clients += [stays, dropped]
        await stays.join(room)
        await dropped.join(room)
        await stays.expect("USER_JOINED")

        ray.kill(handle.gateway.frontdoors[1], no_restart=False)

        # its client loses the connection (no close frame: the process died)
        assert await dropped.closed(timeout=10) in (1006, None)
        # the other front door's client is told, once the restarted door Syncs
        left = await stays.expect("USER_LEFT", timeout=RECOVERY_S)
        assert left.data == {"resourceId": room, "userId": f"dropped-{uid}"}
        assert rdb.smembers(f"resource:{room}:users") == {f"stays-{uid}"}

        # and the door is back: new clients land on it and join the same room
        deadline = time.monotonic() + RECOVERY_S
        while True:
            status = await asyncio.to_thread(handle.gateway.status)
            door = status["frontdoors"][1]
            if door is not None and door["shards"].get(0) is True:
                break
            assert time.monotonic() < deadline, f"frontdoor-1 not back: {status}"
            await asyncio.sleep(0.2)
        again = await connect_on(handle, f"dropped-{uid}", 1)
        clients.append(again)
        state = await again.join(room)
        assert [u["userId"] for u in state.data["users"]] == [f"stays-{uid}", f"dropped-{uid}"]
        assert (await stays.expect("USER_JOINED")).data["user"]["userId"] == f"dropped-{uid}"
    finally:
        for client in clients:
            await client.close()
        await asyncio.to_thread(handle.stop)
