"""Every `PresenceMirror` passes this one suite (STYLE habit 5): memory and Redis.

The mirror is the copy of a shard's rooms that others read (seed story
BE-001.2): the set `resource:{id}:users` and one hash
`resource:{id}:user:{userId}` with `mode` and `joinedAt` per user. The same
join/leave/mode-change sequences must leave the same observable state; a
small reader per implementation reads it back (Redis: SMEMBERS and HGETALL on
the real test database; memory: its dicts).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Protocol

import pytest
import redis.asyncio as aioredis

from rounds import redisconn
from rounds.ids import ResourceId, UserId
from rounds.shard.events import MirrorJoin, MirrorLeave
from rounds.shard.presence.mirror import MemoryPresence, PresenceMirror
from rounds.shard.presence.mirror_redis import RedisPresence, room_user_key, room_users_key

# 2025-11-17T10:30:00.000Z, the seed's first `joinedAt`
T0 = int(datetime(2025, 11, 17, 10, 30, tzinfo=UTC).timestamp() * 1000)
T0_ISO = "2025-11-17T10:30:00.000Z"

Room = dict[str, dict[str, str]]  # user -> {"mode", "joinedAt"}


class Reader(Protocol):
    async def room(self, room: ResourceId) -> Room:
        """The room as a reader of the mirror sees it; {} for an empty room."""


class MemoryReader:
    def __init__(self, mirror: MemoryPresence) -> None:
        self.mirror = mirror

    async def room(self, room: ResourceId) -> Room:
        users = self.mirror.users.get(room, set())
        assert room not in self.mirror.users or users, "an empty room must not linger"
        hashes = {user: dict(fields) for (r, user), fields in self.mirror.members.items() if r == room}
        assert set(hashes) == users, "every listed user has a hash, and only they"
        return hashes


class RedisReader:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def room(self, room: ResourceId) -> Room:
        users = await self.client.smembers(room_users_key(room))
        hashes = {}
        async for key in self.client.scan_iter(match=room_user_key(room, "*")):
            hashes[key.rsplit(":user:", 1)[1]] = await self.client.hgetall(key)
        assert set(hashes) == users, "every listed user has a hash, and only they"
        return hashes


@pytest.fixture
def tag() -> str:
    return f"bk-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["memory", "redis"])
async def mirror(request: pytest.FixtureRequest, redis_url: str,
                 tag: str) -> AsyncIterator[tuple[PresenceMirror, Reader]]:
    if request.param == "memory":
        memory = MemoryPresence()
        yield memory, MemoryReader(memory)
        return
    presence = RedisPresence(redisconn.connect(redis_url), owner=f"test/{tag}")
    reader_client = redisconn.connect(redis_url)
    try:
        yield presence, RedisReader(reader_client)
    finally:
        for key in [k async for k in reader_client.scan_iter(match=f"*{tag}*")]:
            await reader_client.delete(key)
        await reader_client.aclose()
        await presence.aclose()


def joined(room: str, user: str, mode: str = "editor", at_ms: int = T0) -> MirrorJoin:
    return MirrorJoin(ResourceId(room), UserId(user), mode, at_ms)


def left(room: str, user: str) -> MirrorLeave:
    return MirrorLeave(ResourceId(room), UserId(user))


async def test_a_join_lists_the_user_with_mode_and_iso_join_time(mirror, tag) -> None:
    presence, reader = mirror
    room = f"page:/patient/12345-{tag}"
    await presence.apply([joined(room, "usr_001", "editor", T0)])
    assert await reader.room(ResourceId(room)) == {"usr_001": {"mode": "editor", "joinedAt": T0_ISO}}


async def test_join_times_keep_their_milliseconds(mirror, tag) -> None:
    presence, reader = mirror
    room = f"page:/a-{tag}"
    await presence.apply([joined(room, "u1", at_ms=T0 + 7), joined(room, "u2", at_ms=T0 + 61_123)])
    state = await reader.room(ResourceId(room))
    assert state["u1"]["joinedAt"] == "2025-11-17T10:30:00.007Z"
    assert state["u2"]["joinedAt"] == "2025-11-17T10:31:01.123Z"


async def test_several_users_and_rooms_are_kept_apart(mirror, tag) -> None:
    presence, reader = mirror
    a, b = f"page:/a-{tag}", f"document:9-{tag}/tab:diagnosis"
    await presence.apply([joined(a, "alice"), joined(a, "bob", "viewer"), joined(b, "alice", "viewer")])
    assert await reader.room(ResourceId(a)) == {
        "alice": {"mode": "editor", "joinedAt": T0_ISO},
        "bob": {"mode": "viewer", "joinedAt": T0_ISO},
    }
    assert await reader.room(ResourceId(b)) == {"alice": {"mode": "viewer", "joinedAt": T0_ISO}}


async def test_a_leave_removes_the_user_from_the_set_and_deletes_the_hash(mirror, tag) -> None:
    presence, reader = mirror
    room = f"page:/a-{tag}"
    await presence.apply([joined(room, "alice"), joined(room, "bob")])
    await presence.apply([left(room, "alice")])
    assert await reader.room(ResourceId(room)) == {"bob": {"mode": "editor", "joinedAt": T0_ISO}}


async def test_the_last_leave_empties_the_room(mirror, tag) -> None:
    presence, reader = mirror
    room = f"page:/a-{tag}"
    await presence.apply([joined(room, "alice")])
    await presence.apply([left(room, "alice")])
    assert await reader.room(ResourceId(room)) == {}


async def test_a_mode_change_rewrites_the_mode_and_keeps_the_user_listed_once(mirror, tag) -> None:
    presence, reader = mirror
    room = f"page:/a-{tag}"
    await presence.apply([joined(room, "alice", "viewer", T0)])
    # her second tab edits: the shard mirrors the new mode with the first join time
    await presence.apply([joined(room, "alice", "editor", T0)])
    assert await reader.room(ResourceId(room)) == {"alice": {"mode": "editor", "joinedAt": T0_ISO}}
    await presence.apply([joined(room, "alice", "viewer", T0)])
    assert await reader.room(ResourceId(room)) == {"alice": {"mode": "viewer", "joinedAt": T0_ISO}}


async def test_events_of_one_batch_apply_in_order(mirror, tag) -> None:
    presence, reader = mirror
    room = f"page:/a-{tag}"
    await presence.apply([joined(room, "alice"), left(room, "alice"), joined(room, "alice", "viewer", T0 + 5),
                          joined(room, "bob"), left(room, "bob")])
    assert await reader.room(ResourceId(room)) == {
        "alice": {"mode": "viewer", "joinedAt": "2025-11-17T10:30:00.005Z"}}


async def test_a_leave_of_a_user_never_mirrored_changes_nothing(mirror, tag) -> None:
    presence, reader = mirror
    room = f"page:/a-{tag}"
    await presence.apply([left(room, "ghost")])
    assert await reader.room(ResourceId(room)) == {}
    await presence.apply([joined(room, "alice"), left(room, "ghost")])
    assert set(await reader.room(ResourceId(room))) == {"alice"}


async def test_an_empty_batch_is_harmless(mirror, tag) -> None:
    presence, reader = mirror
    await presence.apply([])
    assert await reader.room(ResourceId(f"page:/a-{tag}")) == {}


async def test_a_healthy_mirror_reports_ok_with_its_name(mirror) -> None:
    presence, _ = mirror
    health = await presence.health()
    assert health["ok"] is True
    assert health["backend"] == presence.name


async def test_reset_forgets_every_room_its_owner_mirrored_before(mirror, tag) -> None:
    # A restarted shard clears what it mirrored in its previous life; the
    # front doors' Sync then re-adds who is really there.
    presence, reader = mirror
    a, b = f"page:/a-{tag}", f"page:/b-{tag}"
    await presence.apply([joined(a, "alice"), joined(a, "bob"), joined(b, "carol")])
    assert await presence.reset() == 2
    assert await reader.room(ResourceId(a)) == {}
    assert await reader.room(ResourceId(b)) == {}
    await presence.apply([joined(a, "bob")])
    assert set(await reader.room(ResourceId(a))) == {"bob"}


async def test_a_room_emptied_normally_is_not_cleared_again_on_reset(mirror, tag) -> None:
    presence, reader = mirror
    a = f"page:/a-{tag}"
    await presence.apply([joined(a, "alice")])
    await presence.apply([MirrorLeave(ResourceId(a), UserId("alice"), room_empty=True)])
    assert await presence.reset() == 0
