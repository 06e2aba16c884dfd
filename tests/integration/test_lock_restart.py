"""A lock outlives the shard that granted it, until its TTL (issue 3).

Real Ray (the session's), a dedicated small gateway (2 shards, 1 front door,
Redis on, 8 s locks). The shard owning the lock's room is killed; Ray
restarts it with empty memory. Redis still holds `lock:{id}` for the rest of
its TTL, so the new shard's grant (SET NX) is refused and another user is
denied until then; after it, the next grant's fencing token is higher than
the first, because `lock:{id}:fence` survived.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import ray
import redis

from rounds.routing import HashRing
from tests.client import Client, Frame, eventually
from tests.conftest import GatewayHandle, gateway_settings

pytestmark = pytest.mark.ray

RECOVERY_S = 15.0
# Longer than a restart and relink take here (about 3.3 s measured), with room
# to spare, so the lock is still live in Redis when the restarted shard is
# first asked about it.
LOCK_TTL_MS = 8_000



async def acquire_when_back(client: Client, resource: str) -> Frame:
    """LOCK_ACQUIRE, retrying while the room's shard is away (ERROR UNAVAILABLE)."""
    deadline = time.monotonic() + RECOVERY_S
    while True:
        answer = await client.request("LOCK_ACQUIRE", {"resourceId": resource}, ref="acquire")
        if answer.type != "ERROR":
            return answer
        assert answer.data["code"] == "UNAVAILABLE", answer
        if time.monotonic() > deadline:
            raise AssertionError(f"the shard did not come back within {RECOVERY_S}s")
        await asyncio.sleep(0.1)


async def test_a_lock_survives_its_shards_restart_until_its_ttl_and_the_next_token_is_higher(
        ray_session: None, redis_url: str, var_root: Path, rdb: redis.Redis, uid: str) -> None:
    handle = await asyncio.to_thread(GatewayHandle, gateway_settings(
        var_root, f"lock-restart-{uid}", shards=2, frontdoors=1, redis_url=redis_url, lock_ttl_ms=LOCK_TTL_MS))
    clients: list[Client] = []
    try:
        room = f"page:/patient/12345-{uid}"
        owner = HashRing(range(2)).shard_for(room)
        holder_id, other_id = f"holder-{uid}", f"other-{uid}"
        holder = await Client.connect(handle.url, handle.token(holder_id))
        other = await Client.connect(handle.url, handle.token(other_id))
        clients += [holder, other]
        await holder.join(room)
        await other.join(room)
        first = await holder.request("LOCK_ACQUIRE", {"resourceId": room}, ref="first")
        assert first.type == "LOCK_ACQUIRED"
        await other.expect("RESOURCE_LOCKED")
        before = await asyncio.to_thread(handle.gateway.status)
        old_address = before["shards"][owner]["address"]
        assert [lock["resourceId"] for lock in before["shards"][owner]["locks"]] == [room]

        ray.kill(handle.gateway.shards[owner], no_restart=False)

        async def back() -> Any:
            status = await asyncio.to_thread(handle.gateway.status)
            shard, door = status["shards"][owner], status["frontdoors"][0]
            return (shard is not None and shard["address"] != old_address and shard["members"] == 2
                    and door is not None and door["shards"].get(owner) is True and status)

        status = await eventually(back, RECOVERY_S, "shard back with its rooms")
        assert status["shards"][owner]["locks"] == []  # the new shard's memory is empty ...
        assert rdb.get(f"lock:{room}") == holder_id  # ... but Redis still holds the lock

        # while the Redis key lives, another user is denied: the lock survived
        denied = await acquire_when_back(other, room)
        pttl = rdb.pttl(f"lock:{room}")
        assert pttl > 0, "the restart outlasted the lock's TTL; raise LOCK_TTL_MS"
        assert denied.type == "LOCK_DENIED", denied
        assert (denied.data["reason"], denied.data["lockedBy"]) == ("already_locked", holder_id)
        drift = abs(_ms(denied.data["expiresAt"]) - _ms(first.data["expiresAt"]))
        assert drift < 500, f"denial says the lock ends {drift:.0f} ms away from its grant's expiresAt"
        assert rdb.hget(f"lock:{room}:metadata", "lockId") == first.data["lockId"]

        # after the TTL the lock is gone from Redis, and the next grant's token is higher
        async def expired() -> bool:
            return not rdb.exists(f"lock:{room}", f"lock:{room}:metadata")

        await eventually(expired, LOCK_TTL_MS / 1000 + 1, "lock key expired in Redis")
        second = await acquire_when_back(other, room)
        assert second.type == "LOCK_ACQUIRED", second
        assert second.data["fencingToken"] > first.data["fencingToken"]
        assert rdb.get(f"lock:{room}") == other_id
        assert rdb.get(f"lock:{room}:fence") == str(second.data["fencingToken"])
        locked = await holder.expect("RESOURCE_LOCKED")
        assert locked.data["lockedBy"] == other_id
    finally:
        for client in clients:
            await client.close()
        await asyncio.to_thread(handle.stop)


def _ms(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp() * 1000
