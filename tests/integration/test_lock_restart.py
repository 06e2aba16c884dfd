"""A restarted shard adopts the live locks of its rooms (issue 3).

Real Ray (the session's), a dedicated small gateway (2 shards, 1 front door,
Redis on, 10 s locks). The holder takes two locks in one room; the shard
owning the room is killed and Ray restarts it with empty memory. On start it
reads the live locks back from Redis (`LockShell.start`), and the front door,
which kept the clients' connections, re-announces the members. Then, as if
nothing had happened: the status and a joiner's RESOURCE_STATE list both
locks, the holder renews one (the room hears the new expiry) and releases it,
the other expires on time with the room told "expired", and each next
grant's fencing token is higher than before the restart.
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
# to spare, so the locks are still live when the restarted shard reads them.
LOCK_TTL_MS = 10_000


async def when_back(client: Client, type_: str, data: dict[str, Any], ref: str) -> Frame:
    """A request, retried while the room's shard is away (ERROR UNAVAILABLE)."""
    deadline = time.monotonic() + RECOVERY_S
    while True:
        answer = await client.request(type_, data, ref=ref)
        if answer.type != "ERROR" or answer.data.get("code") != "UNAVAILABLE":
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"the shard did not come back within {RECOVERY_S}s")
        await asyncio.sleep(0.1)


async def test_a_restarted_shard_adopts_its_live_locks_and_the_holder_carries_on(
        ray_session: None, redis_url: str, var_root: Path, rdb: redis.Redis, uid: str) -> None:
    handle = await asyncio.to_thread(GatewayHandle, gateway_settings(
        var_root, f"lock-restart-{uid}", shards=2, frontdoors=1, redis_url=redis_url, lock_ttl_ms=LOCK_TTL_MS))
    clients: list[Client] = []
    try:
        room = f"page:/patient/12345-{uid}"
        renewed_field, expiring_field = f"input-renewed-{uid}", f"input-expiring-{uid}"
        owner = HashRing(range(2)).shard_for(room)
        holder_id, other_id = f"holder-{uid}", f"other-{uid}"
        holder = await Client.connect(handle.url, handle.token(holder_id))
        other = await Client.connect(handle.url, handle.token(other_id))
        clients += [holder, other]
        await holder.join(room)
        await other.join(room)
        first: dict[str, Frame] = {}
        for field in (renewed_field, expiring_field):
            first[field] = await holder.request("LOCK_ACQUIRE", {"resourceId": field, "roomId": room}, ref=field)
            assert first[field].type == "LOCK_ACQUIRED", first[field]
            await other.expect("RESOURCE_LOCKED", resourceId=field)
        acquired_at = time.monotonic()
        before = await asyncio.to_thread(handle.gateway.status)
        old_address = before["shards"][owner]["address"]

        ray.kill(handle.gateway.shards[owner], no_restart=False)

        async def back() -> Any:
            status = await asyncio.to_thread(handle.gateway.status)
            shard, door = status["shards"][owner], status["frontdoors"][0]
            return (shard is not None and shard["address"] != old_address and shard["members"] == 2
                    and door is not None and door["shards"].get(owner) is True and status)

        status = await eventually(back, RECOVERY_S, "shard back with its rooms")
        assert time.monotonic() - acquired_at < LOCK_TTL_MS / 1000 - 2, "the restart took too long; raise LOCK_TTL_MS"

        # the new shard holds both locks again: `rounds status` and a joiner's RESOURCE_STATE show them
        ours = [lock for lock in status["shards"][owner]["locks"] if uid in lock["resourceId"]]
        assert ours == [{"resourceId": f, "lockedBy": holder_id, "expiresAt": first[f].data["expiresAt"]}
                        for f in sorted((renewed_field, expiring_field))]
        joiner = await Client.connect(handle.url, handle.token(f"joiner-{uid}"))
        clients.append(joiner)
        state = await when_back(joiner, "JOIN_RESOURCE", {"resourceId": room, "resourceType": "patient_record",
                                                          "mode": "editor"}, ref="join")
        assert state.type == "RESOURCE_STATE", state
        assert sorted(lock["resourceId"] for lock in state.data["locks"]) == sorted((renewed_field, expiring_field))
        assert {lock["lockedBy"] for lock in state.data["locks"]} == {holder_id}

        # the holder renews one across the restart; the room hears the new expiry
        lock_id = first[renewed_field].data["lockId"]
        renewed = await when_back(holder, "LOCK_RENEW", {"resourceId": renewed_field, "lockId": lock_id}, "renew")
        assert renewed.type == "LOCK_RENEWED", renewed
        assert _ms(renewed.data["expiresAt"]) > _ms(first[renewed_field].data["expiresAt"])
        relocked = await other.expect("RESOURCE_LOCKED", resourceId=renewed_field)
        assert relocked.data == {"resourceId": renewed_field, "lockedBy": holder_id,
                                 "expiresAt": renewed.data["expiresAt"]}
        assert rdb.hget(f"lock:{renewed_field}:metadata", "expiresAt") == renewed.data["expiresAt"]
        assert rdb.pttl(f"lock:{renewed_field}") > LOCK_TTL_MS - 2_000
        denied = await other.request("LOCK_ACQUIRE", {"resourceId": renewed_field, "roomId": room}, ref="deny")
        assert (denied.type, denied.data["lockedBy"]) == ("LOCK_DENIED", holder_id)

        # the other one nobody renews expires on time, the room told "expired"
        unlocked = await other.expect("RESOURCE_UNLOCKED", timeout=LOCK_TTL_MS / 1000 + 2, resourceId=expiring_field)
        late_ms = time.time() * 1000 - _ms(first[expiring_field].data["expiresAt"])
        assert unlocked.data["reason"] == "expired"
        assert -100 < late_ms < 1_000, f"expired {late_ms:.0f} ms from its expiresAt"
        await eventually(lambda: not rdb.exists(f"lock:{expiring_field}", f"lock:{expiring_field}:metadata"),
                         2.0, "expired lock's keys deleted")
        second = await other.request("LOCK_ACQUIRE", {"resourceId": expiring_field, "roomId": room}, ref="second")
        assert second.type == "LOCK_ACQUIRED", second
        assert second.data["fencingToken"] > first[expiring_field].data["fencingToken"]

        # the holder releases the renewed one; the next grant's token is higher too
        released = await holder.request("LOCK_RELEASE", {"resourceId": renewed_field, "lockId": lock_id}, ref="rel")
        assert released.type == "LOCK_RELEASED", released
        unlocked = await other.expect("RESOURCE_UNLOCKED", resourceId=renewed_field)
        assert unlocked.data["reason"] == "released"
        assert not rdb.exists(f"lock:{renewed_field}", f"lock:{renewed_field}:metadata")
        third = await other.request("LOCK_ACQUIRE", {"resourceId": renewed_field, "roomId": room}, ref="third")
        assert third.type == "LOCK_ACQUIRED", third
        assert third.data["fencingToken"] > first[renewed_field].data["fencingToken"]
        assert rdb.get(f"lock:{renewed_field}:fence") == str(third.data["fencingToken"])

        audit = await handle.wait_audit("LOCK_ADOPTED", resourceId=renewed_field)
        assert audit["userId"] == holder_id and audit["details"]["lockId"] == lock_id
    finally:
        for client in clients:
            await client.close()
        await asyncio.to_thread(handle.stop)


def _ms(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp() * 1000
