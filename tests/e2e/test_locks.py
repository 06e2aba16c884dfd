"""Seed story BE-001.3, "Distributed Lock Management", over real WebSockets.

The scenarios run against the main gateway (two shards, two front doors as
Ray actors sharing one port, Redis on) through `/ws`, and the seed's Redis
commands are checked by their effects on the real Redis: `lock:{id}` holds
the userId with a TTL in ms, `lock:{id}:metadata` the seed's fields plus
`lockId`, `fencingToken` and what adoption needs (`roomId`, `connId`,
`ttlMs`), `lock:{id}:fence` the counter. Tests that wait
for a TTL use a second gateway with 1.5 s locks, started once for this
module, so nothing waits the default 30 s. Ids carry the test's `uid`.

A lock lives on the shard of the room told about it (`roomId`, else the
resource itself), and only a member of that room may take it (issue 3).
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from pycrdt import Doc, Text

from rounds.routing import HashRing
from tests.client import Client, Frame, eventually
from tests.conftest import GatewayHandle, gateway_settings
from tests.e2e.conftest import Connect

pytestmark = pytest.mark.ray

ISO_MS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
SHORT_TTL_MS = 1_500


@pytest.fixture(scope="module")
def short_gateway(ray_session: None, redis_url: str, var_root: Path) -> Iterator[GatewayHandle]:
    """A gateway whose locks live 1.5 s, for the expiry and renewal scenarios."""
    handle = GatewayHandle(gateway_settings(var_root, f"locks-{uuid.uuid4().hex[:8]}", shards=2, frontdoors=2,
                                            redis_url=redis_url, lock_ttl_ms=SHORT_TTL_MS))
    yield handle
    handle.stop()





def ms_of(iso: str) -> float:
    assert ISO_MS.fullmatch(iso), iso
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp() * 1000


def types(frames: list[Frame]) -> list[str]:
    return [f.type for f in frames]


def keys_of(resource: str) -> tuple[str, str, str]:
    return f"lock:{resource}", f"lock:{resource}:metadata", f"lock:{resource}:fence"


def no_lock_in_redis(rdb: redis.Redis, resource: str) -> bool:
    lock, meta, _ = keys_of(resource)
    return rdb.exists(lock, meta) == 0


async def acquire(client: Client, resource: str, **extra: Any) -> Frame:
    return await client.request("LOCK_ACQUIRE", {"resourceId": resource, **extra}, ref=f"acquire:{resource}")


async def members(connect: Connect, room: str, *users: str, on: GatewayHandle | None = None) -> list[Client]:
    """Connect each user and join `room` in order, every earlier member having heard the later ones."""
    clients: list[Client] = []
    for user in users:
        client = await connect(user, on=on)
        assert (await client.join(room)).type == "RESOURCE_STATE"
        for earlier in clients:
            await earlier.expect("USER_JOINED")
        clients.append(client)
    return clients


# --- Scenario: Acquire lock on available resource ----------------------------------------


async def test_acquire_lock_on_available_resource(
        connect: Connect, gateway: GatewayHandle, rdb: redis.Redis, uid: str) -> None:
    resource = f"input-field-123-{uid}"
    user = f"usr_001-{uid}"
    other, me = await members(connect, resource, f"usr_002-{uid}", user)
    lock_key, meta_key, fence_key = keys_of(resource)
    assert not rdb.exists(lock_key)  # the resource is not locked

    before_ms = time.time() * 1000
    acquired = await acquire(me, resource)
    after_ms = time.time() * 1000

    # I receive LOCK_ACQUIRED with a unique lock id, a fencing token and expiresAt = now + 30 s
    assert (acquired.type, acquired.ref) == ("LOCK_ACQUIRED", f"acquire:{resource}")
    assert set(acquired.data) == {"resourceId", "lockId", "fencingToken", "expiresAt"}
    assert acquired.data["resourceId"] == resource
    lock_id, token, expires_at = acquired.data["lockId"], acquired.data["fencingToken"], acquired.data["expiresAt"]
    assert isinstance(lock_id, str) and len(lock_id) >= 16
    assert isinstance(token, int) and token >= 1
    assert before_ms + 30_000 - 5 <= ms_of(expires_at) <= after_ms + 30_000 + 5

    # Redis: SET lock:{id} {userId} with a 30 s TTL (NX), the fence counter, the metadata hash
    assert rdb.get(lock_key) == user
    assert 29_000 < rdb.pttl(lock_key) <= 30_000
    assert rdb.get(fence_key) == str(token)
    assert rdb.pttl(fence_key) > 29 * 24 * 3_600_000  # the counter outlives the lock by 30 days
    meta = rdb.hgetall(meta_key)
    # the seed's fields, then ours: the lock id and token, and what a restarted shard needs to adopt it
    assert set(meta) == {"lockType", "acquiredAt", "expiresAt", "userId", "lockId", "fencingToken",
                         "roomId", "connId", "ttlMs"}
    assert (meta["roomId"], meta["ttlMs"]) == (resource, "30000") and int(meta["connId"]) > 0
    assert meta["lockType"] == "exclusive"
    assert meta["userId"] == user
    assert meta["lockId"] == lock_id
    assert meta["fencingToken"] == str(token)
    assert meta["expiresAt"] == expires_at
    assert before_ms - 5 <= ms_of(meta["acquiredAt"]) <= after_ms + 5
    assert 29_000 < rdb.pttl(meta_key) <= 30_000

    # other users receive RESOURCE_LOCKED; I do not
    locked = await other.expect("RESOURCE_LOCKED")
    assert locked.data == {"resourceId": resource, "lockedBy": user, "expiresAt": expires_at}
    assert "RESOURCE_LOCKED" not in types(await me.quiet(0.3))

    # an audit log records the acquisition
    record = await gateway.wait_audit("LOCK_ACQUIRED", userId=user, resourceId=resource)
    assert record["outcome"] == "ok"
    assert record["source"].startswith("shard-")
    assert record["details"]["lockId"] == lock_id
    assert record["details"]["fencingToken"] == token


# --- Scenario: Lock denied when resource already locked --------------------------------------


async def test_lock_denied_when_resource_already_locked(
        connect: Connect, gateway: GatewayHandle, rdb: redis.Redis, uid: str) -> None:
    resource = f"input-field-123-{uid}"
    holder_id, me_id = f"usr_002-{uid}", f"usr_001-{uid}"
    holder, me, watcher = await members(connect, resource, holder_id, me_id, f"watcher-{uid}")
    held = await acquire(holder, resource)
    assert held.type == "LOCK_ACQUIRED"
    await me.expect("RESOURCE_LOCKED")
    await watcher.expect("RESOURCE_LOCKED")

    denied = await acquire(me, resource)

    # I receive LOCK_DENIED: already_locked, by usr_002, until its expiry
    assert (denied.type, denied.ref) == ("LOCK_DENIED", f"acquire:{resource}")
    assert denied.data == {"resourceId": resource, "reason": "already_locked", "lockedBy": holder_id,
                           "expiresAt": held.data["expiresAt"]}
    # I am not granted the lock: Redis still names the holder, nobody hears of a new lock
    lock_key, meta_key, fence_key = keys_of(resource)
    assert rdb.get(lock_key) == holder_id
    assert rdb.hget(meta_key, "lockId") == held.data["lockId"]
    assert rdb.get(fence_key) == str(held.data["fencingToken"])
    assert "RESOURCE_LOCKED" not in types(await watcher.quiet(0.3)) + types(await holder.quiet(0.1))
    record = await gateway.wait_audit("LOCK_DENIED", userId=me_id, resourceId=resource)
    assert (record["outcome"], record["details"]["lockedBy"]) == ("denied", holder_id)


async def test_a_lock_held_in_redis_by_someone_the_shard_does_not_know_is_denied(
        connect: Connect, rdb: redis.Redis, uid: str) -> None:
    # The seed's "Redis SET NX should return nil": the key is the truth others
    # see, so a lock written by another gateway (or this shard's previous life) wins.
    resource = f"input-field-123-{uid}"
    lock_key, meta_key, fence_key = keys_of(resource)
    rdb.set(lock_key, f"usr_elsewhere-{uid}", px=10_000)
    [me] = await members(connect, resource, f"usr_001-{uid}")

    before_ms = time.time() * 1000
    denied = await acquire(me, resource)
    assert denied.type == "LOCK_DENIED"
    assert denied.data["reason"] == "already_locked"
    assert denied.data["lockedBy"] == f"usr_elsewhere-{uid}"
    assert abs(ms_of(denied.data["expiresAt"]) - (before_ms + 10_000)) < 1_000
    assert rdb.get(lock_key) == f"usr_elsewhere-{uid}"
    assert not rdb.exists(meta_key) and not rdb.exists(fence_key)

    rdb.delete(lock_key)
    granted = await acquire(me, resource)
    assert granted.type == "LOCK_ACQUIRED"
    assert rdb.get(lock_key) == f"usr_001-{uid}"


# --- Scenario: Lock renewal before expiration (1.5 s locks) ---------------------------------


async def test_lock_renewal_before_expiration(
        connect: Connect, short_gateway: GatewayHandle, rdb: redis.Redis, uid: str) -> None:
    resource = f"input-field-123-{uid}"
    user = f"usr_001-{uid}"
    me, other = await members(connect, resource, user, f"usr_002-{uid}", on=short_gateway)
    lock_key, meta_key, _ = keys_of(resource)
    acquired = await acquire(me, resource)
    granted_at = time.monotonic()
    lock_id = acquired.data["lockId"]
    await asyncio.sleep(0.8)  # the lock now expires in about 0.7 s
    assert rdb.pttl(lock_key) < 800

    renewed = await me.request("LOCK_RENEW", {"resourceId": resource, "lockId": lock_id}, ref="renew")

    # I receive LOCK_RENEWED, expiring a full TTL from now
    assert (renewed.type, renewed.ref) == ("LOCK_RENEWED", "renew")
    assert set(renewed.data) == {"resourceId", "lockId", "expiresAt"}
    assert (renewed.data["resourceId"], renewed.data["lockId"]) == (resource, lock_id)
    gained = ms_of(renewed.data["expiresAt"]) - ms_of(acquired.data["expiresAt"])
    assert 700 <= gained <= 1_500
    # the others hear RESOURCE_LOCKED again with the new expiry, so their views stay right
    relocked = await other.expect("RESOURCE_LOCKED", expiresAt=renewed.data["expiresAt"])
    assert relocked.data == {"resourceId": resource, "lockedBy": user, "expiresAt": renewed.data["expiresAt"]}
    # the TTL of both keys is back to about the full 1.5 s, the metadata says until when
    await eventually(lambda: rdb.pttl(lock_key) > 1_200 and rdb.pttl(meta_key) > 1_200, timeout=1.0)
    assert rdb.pttl(lock_key) <= SHORT_TTL_MS and rdb.pttl(meta_key) <= SHORT_TTL_MS
    assert rdb.hget(meta_key, "expiresAt") == renewed.data["expiresAt"]
    # an audit log records the renewal
    record = await short_gateway.wait_audit("LOCK_RENEWED", userId=user, resourceId=resource)
    assert record["details"]["lockId"] == lock_id
    assert record["details"]["expiresAt"] == renewed.data["expiresAt"]

    # past the first deadline the lock is still mine; it expires at the new one
    await asyncio.sleep(max(0.0, granted_at + 1.5 + 0.3 - time.monotonic()))
    assert rdb.get(lock_key) == user
    assert "RESOURCE_UNLOCKED" not in types(await other.quiet(0.05))
    unlocked = await other.expect("RESOURCE_UNLOCKED", timeout=2.0)
    assert unlocked.data == {"resourceId": resource, "reason": "expired"}


# --- Scenario: Lock expires automatically (1.5 s locks) --------------------------------------


async def test_lock_expires_automatically(
        connect: Connect, short_gateway: GatewayHandle, rdb: redis.Redis, uid: str) -> None:
    resource = f"input-field-123-{uid}"
    holder_id, other_id = f"usr_001-{uid}", f"usr_002-{uid}"
    holder, other = await members(connect, resource, holder_id, other_id, on=short_gateway)
    lock_key, _, fence_key = keys_of(resource)
    start = time.monotonic()
    first = await acquire(holder, resource)
    assert first.type == "LOCK_ACQUIRED"
    await other.expect("RESOURCE_LOCKED")

    # nobody asks: within TTL + 1 s the room hears RESOURCE_UNLOCKED "expired", the holder too
    unlocked = await other.expect("RESOURCE_UNLOCKED", timeout=SHORT_TTL_MS / 1000 + 1.0)
    elapsed = time.monotonic() - start
    assert unlocked.data == {"resourceId": resource, "reason": "expired"}
    assert 1.4 <= elapsed <= SHORT_TTL_MS / 1000 + 1.0
    assert (await holder.expect("RESOURCE_UNLOCKED", timeout=1.0)).data == unlocked.data
    # the lock key has expired in Redis (the fence counter stays)
    await eventually(lambda: no_lock_in_redis(rdb, resource), timeout=1.0)
    assert rdb.get(fence_key) == str(first.data["fencingToken"])
    record = await short_gateway.wait_audit("LOCK_EXPIRED", userId=holder_id, resourceId=resource)
    assert record["details"]["lockId"] == first.data["lockId"]

    # another user can acquire it, with a higher fencing token
    second = await acquire(other, resource)
    assert second.type == "LOCK_ACQUIRED"
    assert second.data["fencingToken"] > first.data["fencingToken"]
    assert rdb.get(lock_key) == other_id
    assert (await holder.expect("RESOURCE_LOCKED")).data["lockedBy"] == other_id


# --- Scenario: Explicit lock release --------------------------------------------------------


async def test_explicit_lock_release(
        connect: Connect, gateway: GatewayHandle, rdb: redis.Redis, uid: str) -> None:
    resource = f"input-field-123-{uid}"
    user = f"usr_001-{uid}"
    me, other = await members(connect, resource, user, f"usr_002-{uid}")
    acquired = await acquire(me, resource)
    await other.expect("RESOURCE_LOCKED")

    released = await me.request("LOCK_RELEASE", {"resourceId": resource, "lockId": acquired.data["lockId"]},
                                ref="release")

    # I receive LOCK_RELEASED; the others RESOURCE_UNLOCKED "released"; I am not told twice
    assert (released.type, released.ref, released.data) == ("LOCK_RELEASED", "release", {"resourceId": resource})
    unlocked = await other.expect("RESOURCE_UNLOCKED")
    assert unlocked.data == {"resourceId": resource, "reason": "released"}
    assert "RESOURCE_UNLOCKED" not in types(await me.quiet(0.3))
    # the lock is removed from Redis
    await eventually(lambda: no_lock_in_redis(rdb, resource))
    # an audit log records the release
    record = await gateway.wait_audit("LOCK_RELEASED", userId=user, resourceId=resource)
    assert record["details"]["lockId"] == acquired.data["lockId"]
    assert record["details"]["unlockReason"] == "released"
    # and the next grant gets a higher token
    again = await acquire(other, resource)
    assert again.type == "LOCK_ACQUIRED"
    assert again.data["fencingToken"] > acquired.data["fencingToken"]


# --- only the holder, only editors, only members ------------------------------------------------


async def test_only_the_holder_can_renew_or_release_its_lock(
        connect: Connect, gateway: GatewayHandle, rdb: redis.Redis, uid: str) -> None:
    resource = f"input-field-123-{uid}"
    holder_id, other_id = f"holder-{uid}", f"other-{uid}"
    holder, other = await members(connect, resource, holder_id, other_id)
    acquired = await acquire(holder, resource)
    lock_id = acquired.data["lockId"]
    lock_key, meta_key, _ = keys_of(resource)
    pttl_before = rdb.pttl(lock_key)

    # another user, even with the right lock id, is refused
    for type_ in ("LOCK_RENEW", "LOCK_RELEASE"):
        answer = await other.request(type_, {"resourceId": resource, "lockId": lock_id}, ref=type_)
        assert (answer.type, answer.ref, answer.data["code"]) == ("ERROR", type_, "NOT_LOCK_HOLDER")
        assert answer.data["resourceId"] == resource
    # the holder with a wrong lock id is refused too
    wrong = await holder.request("LOCK_RENEW", {"resourceId": resource, "lockId": "not-the-id"}, ref="wrong")
    assert (wrong.type, wrong.data["code"]) == ("ERROR", "NOT_LOCK_HOLDER")
    # nothing changed: still held, not extended, nobody told
    assert rdb.get(lock_key) == holder_id
    assert rdb.hget(meta_key, "lockId") == lock_id
    assert rdb.pttl(lock_key) <= pttl_before
    assert "RESOURCE_UNLOCKED" not in types(await holder.quiet(0.2)) + types(await other.quiet(0.1))
    for event_type in ("LOCK_RENEW_DENIED", "LOCK_RELEASE_DENIED"):  # the refused are named
        record = await gateway.wait_audit(event_type, userId=other_id, resourceId=resource)
        assert (record["outcome"], record["details"]["code"]) == ("denied", "NOT_LOCK_HOLDER")

    # once released, renewing or releasing again finds no lock
    released = await holder.request("LOCK_RELEASE", {"resourceId": resource, "lockId": lock_id}, ref="rel")
    assert released.type == "LOCK_RELEASED"
    for type_ in ("LOCK_RENEW", "LOCK_RELEASE"):
        answer = await holder.request(type_, {"resourceId": resource, "lockId": lock_id}, ref=type_)
        assert (answer.type, answer.data["code"]) == ("ERROR", "UNKNOWN_LOCK")


async def test_a_viewer_cannot_lock(connect: Connect, gateway: GatewayHandle, rdb: redis.Redis, uid: str) -> None:
    resource = f"input-field-123-{uid}"
    editor = await connect(f"editor-{uid}")
    await editor.join(resource)
    viewer_id = f"observer-{uid}"
    viewer = await connect(viewer_id, role="observer")
    assert (await viewer.join(resource, "viewer")).type == "RESOURCE_STATE"

    answer = await acquire(viewer, resource)
    assert (answer.type, answer.data["code"], answer.data["resourceId"]) == (
        "PERMISSION_DENIED", "PERMISSION_DENIED", resource)
    assert not rdb.exists(keys_of(resource)[0])
    assert "RESOURCE_LOCKED" not in types(await editor.quiet(0.3))
    record = await gateway.wait_audit("LOCK_DENIED", userId=viewer_id, resourceId=resource)
    assert record["details"]["reason"] == "mode"


async def test_locking_in_a_room_not_joined_is_refused_with_not_joined(
        connect: Connect, rdb: redis.Redis, uid: str) -> None:
    resource = f"input-field-123-{uid}"
    member = await connect(f"member-{uid}")
    await member.join(resource)
    stranger = await connect(f"stranger-{uid}")

    answer = await acquire(stranger, resource)
    assert (answer.type, answer.ref, answer.data["code"]) == ("ERROR", f"acquire:{resource}", "NOT_JOINED")
    # naming a room one has not joined is refused the same way, even for a member of the resource
    other_room = await acquire(member, f"{resource}-x", roomId=f"document:1-{uid}")
    assert (other_room.type, other_room.data["code"]) == ("ERROR", "NOT_JOINED")
    assert not rdb.exists(keys_of(resource)[0]) and not rdb.exists(keys_of(f"{resource}-x")[0])
    assert "RESOURCE_LOCKED" not in types(await member.quiet(0.3))


# --- rooms: roomId, leaving, disconnecting, idle timeout ----------------------------------------


async def test_a_field_lock_is_announced_to_the_room_named_by_room_id(
        connect: Connect, rdb: redis.Redis, uid: str) -> None:
    room = f"document:7-{uid}"
    field = f"{room}/field:dose"
    holder_id = f"holder-{uid}"
    holder, other = await members(connect, room, holder_id, f"other-{uid}")

    acquired = await acquire(holder, field, roomId=room)
    assert acquired.type == "LOCK_ACQUIRED"
    assert acquired.data["resourceId"] == field
    locked = await other.expect("RESOURCE_LOCKED")
    assert locked.data == {"resourceId": field, "lockedBy": holder_id, "expiresAt": acquired.data["expiresAt"]}
    assert rdb.get(f"lock:{field}") == holder_id
    assert not rdb.exists(f"lock:{room}")  # the room itself is not locked
    own = await acquire(other, room)  # so another member may lock the room's own resource
    assert own.type == "LOCK_ACQUIRED"

    renewed = await holder.request("LOCK_RENEW", {"resourceId": field, "lockId": acquired.data["lockId"]}, ref="n")
    assert renewed.type == "LOCK_RENEWED"
    released = await holder.request("LOCK_RELEASE", {"resourceId": field, "lockId": acquired.data["lockId"]},
                                    ref="r")
    assert released.type == "LOCK_RELEASED"
    assert (await other.expect("RESOURCE_UNLOCKED")).data == {"resourceId": field, "reason": "released"}
    await eventually(lambda: no_lock_in_redis(rdb, field))


def on_other_shards(uid: str) -> tuple[str, str]:
    """A room and a lock resource whose own hashes land on different shards."""
    ring = HashRing(range(2))
    room = f"page:/patient/12345-{uid}"
    n = 0
    while ring.shard_for(f"input-field-{n}-{uid}") == ring.shard_for(room):
        n += 1
    return room, f"input-field-{n}-{uid}"


async def test_a_lock_lives_with_its_room_even_when_its_own_id_hashes_to_another_shard(
        connect: Connect, gateway: GatewayHandle, rdb: redis.Redis, uid: str) -> None:
    room, field = on_other_shards(uid)
    holder_id = f"holder-{uid}"
    holder, other = await members(connect, room, holder_id, f"other-{uid}")
    acquired = await acquire(holder, field, roomId=room)
    assert acquired.type == "LOCK_ACQUIRED"
    await other.expect("RESOURCE_LOCKED", resourceId=field)

    status = await asyncio.to_thread(gateway.gateway.status)
    owner = HashRing(range(2)).shard_for(room)
    by_shard = {s["shard"]: [lock["resourceId"] for lock in s["locks"]] for s in status["shards"]}
    assert field in by_shard[owner] and field not in by_shard[1 - owner]

    lock_id = acquired.data["lockId"]
    assert (await holder.request("LOCK_RENEW", {"resourceId": field, "lockId": lock_id}, ref="n")).type == \
        "LOCK_RENEWED"
    assert (await holder.request("LOCK_RELEASE", {"resourceId": field, "lockId": lock_id}, ref="r")).type == \
        "LOCK_RELEASED"
    await eventually(lambda: no_lock_in_redis(rdb, field))


async def test_a_holder_leaving_the_room_releases_its_lock_as_left(
        connect: Connect, gateway: GatewayHandle, rdb: redis.Redis, uid: str) -> None:
    room = f"document:8-{uid}"
    field = f"{room}/field:dose"
    holder_id = f"holder-{uid}"
    holder, other = await members(connect, room, holder_id, f"other-{uid}")
    assert (await acquire(holder, room)).type == "LOCK_ACQUIRED"
    assert (await acquire(holder, field, roomId=room)).type == "LOCK_ACQUIRED"

    await holder.request("LEAVE_RESOURCE", {"resourceId": room}, ref="bye")

    got = [(await other.expect("RESOURCE_UNLOCKED", resourceId=r)).data for r in (room, field)]
    assert got == [{"resourceId": room, "reason": "left"}, {"resourceId": field, "reason": "left"}]
    for resource in (room, field):
        await eventually(lambda resource=resource: no_lock_in_redis(rdb, resource))
    record = await gateway.wait_audit("LOCK_RELEASED", userId=holder_id, resourceId=room)
    assert record["details"]["unlockReason"] == "left"
    assert (await acquire(other, field, roomId=room)).type == "LOCK_ACQUIRED"


async def test_a_holder_disconnecting_releases_its_lock_as_disconnected(
        connect: Connect, rdb: redis.Redis, uid: str) -> None:
    resource = f"input-field-123-{uid}"
    holder, other = await members(connect, resource, f"holder-{uid}", f"other-{uid}")
    assert (await acquire(holder, resource)).type == "LOCK_ACQUIRED"
    await other.expect("RESOURCE_LOCKED")

    await holder.close()

    unlocked = await other.expect("RESOURCE_UNLOCKED")
    assert unlocked.data == {"resourceId": resource, "reason": "disconnected"}
    await eventually(lambda: no_lock_in_redis(rdb, resource))
    assert (await acquire(other, resource)).type == "LOCK_ACQUIRED"


async def test_a_holder_timing_out_releases_its_lock_as_disconnected(
        connect: Connect, tight_gateway: GatewayHandle, rdb: redis.Redis, uid: str) -> None:
    # tight_gateway closes a client silent for 1.5 s; DESIGN.md's reasons have
    # no "timeout", the implementation reports a timed-out holder as disconnected.
    resource = f"input-field-123-{uid}"
    holder, other = await members(connect, resource, f"holder-{uid}", f"other-{uid}", on=tight_gateway)
    assert (await acquire(holder, resource)).type == "LOCK_ACQUIRED"
    await other.expect("RESOURCE_LOCKED")

    async def keep_alive() -> None:
        while True:
            await other.send("HEARTBEAT")
            await asyncio.sleep(0.3)

    alive = asyncio.create_task(keep_alive())
    try:
        unlocked = await other.expect("RESOURCE_UNLOCKED", timeout=5.0)
    finally:
        alive.cancel()
    assert unlocked.data == {"resourceId": resource, "reason": "disconnected"}
    assert await holder.closed() == 4008
    await eventually(lambda: no_lock_in_redis(rdb, resource))


# --- what others can see: RESOURCE_STATE, status ----------------------------------------------


async def test_joining_a_room_lists_its_current_locks(connect: Connect, uid: str) -> None:
    room = f"document:12-{uid}"
    field = f"{room}/field:dose"
    holder_id = f"holder-{uid}"
    [holder] = await members(connect, room, holder_id)
    on_room = await acquire(holder, room)
    on_field = await acquire(holder, field, roomId=room)
    elsewhere = f"document:13-{uid}"
    await holder.join(elsewhere)
    assert (await acquire(holder, elsewhere)).type == "LOCK_ACQUIRED"

    newcomer = await connect(f"newcomer-{uid}")
    state = await newcomer.join(room)
    assert state.data["locks"] == [
        {"resourceId": room, "lockedBy": holder_id, "expiresAt": on_room.data["expiresAt"]},
        {"resourceId": field, "lockedBy": holder_id, "expiresAt": on_field.data["expiresAt"]},
    ]
    # released locks are no longer listed
    await holder.request("LOCK_RELEASE", {"resourceId": room, "lockId": on_room.data["lockId"]}, ref="r")
    late = await connect(f"late-{uid}")
    assert [lock["resourceId"] for lock in (await late.join(room)).data["locks"]] == [field]


async def test_the_gateway_status_shows_held_locks(connect: Connect, gateway: GatewayHandle, uid: str) -> None:
    resource = f"input-field-123-{uid}"
    holder_id = f"holder-{uid}"
    [holder] = await members(connect, resource, holder_id)
    acquired = await acquire(holder, resource)
    entry = {"resourceId": resource, "lockedBy": holder_id, "expiresAt": acquired.data["expiresAt"]}
    owner = HashRing(range(2)).shard_for(resource)

    status = await asyncio.to_thread(gateway.gateway.status)
    [shard] = [s for s in status["shards"] if s["shard"] == owner]
    assert entry in shard["locks"]

    await holder.request("LOCK_RELEASE", {"resourceId": resource, "lockId": acquired.data["lockId"]}, ref="r")
    status = await asyncio.to_thread(gateway.gateway.status)
    assert all(lock["resourceId"] != resource for s in status["shards"] for lock in s["locks"])


# --- TTL requests ----------------------------------------------------------------------------


async def test_a_requested_ttl_is_honoured_up_to_the_configured_maximum(
        connect: Connect, gateway: GatewayHandle, rdb: redis.Redis, uid: str) -> None:
    short, huge = f"input-field-1-{uid}", f"input-field-2-{uid}"
    client = await connect(f"holder-{uid}")
    for resource in (short, huge):
        await client.join(resource)

    before_ms = time.time() * 1000
    five = await acquire(client, short, ttlMs=5_000)
    capped = await acquire(client, huge, ttlMs=10**9)
    after_ms = time.time() * 1000

    assert 4_000 < rdb.pttl(f"lock:{short}") <= 5_000
    assert before_ms + 5_000 - 5 <= ms_of(five.data["expiresAt"]) <= after_ms + 5_000 + 5
    max_ttl = gateway.settings.lock_max_ttl_ms
    assert max_ttl == 300_000
    assert max_ttl - 1_000 < rdb.pttl(f"lock:{huge}") <= max_ttl
    assert max_ttl - 1_000 < rdb.pttl(f"lock:{huge}:metadata") <= max_ttl
    assert before_ms + max_ttl - 5 <= ms_of(capped.data["expiresAt"]) <= after_ms + max_ttl + 5
    for resource, frame in ((short, five), (huge, capped)):
        await client.request("LOCK_RELEASE", {"resourceId": resource, "lockId": frame.data["lockId"]}, ref="r")
        await eventually(lambda resource=resource: no_lock_in_redis(rdb, resource))


# --- fencing: a paused holder whose lock expired cannot keep writing (issue 3) -------------------


async def test_an_update_fenced_with_a_stale_token_is_refused_with_stale_lock(
        connect: Connect, short_gateway: GatewayHandle, uid: str) -> None:
    room = f"document:7-{uid}"
    field = f"{room}/field:dose"
    slow, fast = await members(connect, room, f"slow-{uid}", f"fast-{uid}", on=short_gateway)
    writer = Doc()
    writer.get("dose", type=Text).insert(0, "5 mg")
    update = base64.b64encode(writer.get_update()).decode()

    def fenced(token: int) -> dict[str, Any]:
        return {"resourceId": room, "update": update, "lockResourceId": field, "fencingToken": token}

    first = await acquire(slow, field, roomId=room)
    token = first.data["fencingToken"]
    # with the live token the fence passes and the update is applied
    live = await slow.request("RESOURCE_UPDATE", fenced(token), ref="u1")
    assert (live.type, live.ref, live.data["revision"]) == ("UPDATE_ACK", "u1", 1)

    # the slow holder pauses; its lock expires
    await slow.expect("RESOURCE_UNLOCKED", timeout=SHORT_TTL_MS / 1000 + 1.0, resourceId=field)
    orphan = await slow.request("RESOURCE_UPDATE", fenced(token), ref="u2")
    assert (orphan.type, orphan.ref, orphan.data["code"]) == ("ERROR", "u2", "STALE_LOCK")

    # someone else takes it: the old token is stale, the new one passes
    second = await acquire(fast, field, roomId=room)
    assert second.data["fencingToken"] > token
    stale = await slow.request("RESOURCE_UPDATE", fenced(token), ref="u3")
    assert (stale.type, stale.ref, stale.data["code"]) == ("ERROR", "u3", "STALE_LOCK")
    assert stale.data["lockResourceId"] == field
    assert stale.data["fencingToken"] == token
    assert stale.data["currentToken"] == second.data["fencingToken"]
    record = await short_gateway.wait_audit("LOCK_FENCE_DENIED", userId=f"slow-{uid}", resourceId=field)
    assert record["details"]["fencingToken"] == token
    current = await fast.request("RESOURCE_UPDATE", fenced(second.data["fencingToken"]), ref="u4")
    assert (current.type, current.data["revision"]) == ("UPDATE_ACK", 2)
    # a token from the future is no better than an old one
    future = await fast.request("RESOURCE_UPDATE", fenced(second.data["fencingToken"] + 1), ref="u5")
    assert (future.type, future.data["code"]) == ("ERROR", "STALE_LOCK")
