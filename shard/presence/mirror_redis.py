"""The seed's presence keys on a real Redis (BE-001.2):

- `resource:{id}:users`: set of user ids in the room
- `resource:{id}:user:{userId}`: hash `mode`, `joinedAt`
- `rounds:mirror:{owner}:rooms`: the rooms a shard has mirrored and not yet
  emptied, so that shard can clear them when it restarts (`reset`)

Written with pipelines, one round trip per batch of events.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import redis.asyncio as aioredis

from rounds.clock import iso_ms
from rounds.redisconn import ping
from rounds.shard.events import MirrorJoin, MirrorLeave
from rounds.shard.presence.mirror import MirrorEvent


def room_users_key(room: str) -> str:
    return f"resource:{room}:users"


def room_user_key(room: str, user: str) -> str:
    return f"resource:{room}:user:{user}"


def owner_rooms_key(owner: str) -> str:
    return f"rounds:mirror:{owner}:rooms"


class RedisPresence:
    name = "redis"

    def __init__(self, client: aioredis.Redis, owner: str = "shard-0") -> None:
        self.client = client
        self.owner = owner
        self._rooms_key = owner_rooms_key(owner)

    async def apply(self, events: Sequence[MirrorEvent]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for event in events:
                match event:
                    case MirrorJoin(resource_id=room, user_id=user, mode=mode, joined_at_ms=at):
                        pipe.sadd(room_users_key(room), user)
                        pipe.hset(room_user_key(room, user), mapping={"mode": mode, "joinedAt": iso_ms(at)})
                        pipe.sadd(self._rooms_key, room)
                    case MirrorLeave(resource_id=room, user_id=user, room_empty=empty):
                        pipe.srem(room_users_key(room), user)
                        pipe.delete(room_user_key(room, user))
                        if empty:
                            pipe.srem(self._rooms_key, room)
            await pipe.execute()

    async def reset(self) -> int:
        rooms = sorted(cast(set[str], await self.client.smembers(self._rooms_key)))  # decode_responses: str
        for start in range(0, len(rooms), 500):
            chunk = rooms[start:start + 500]
            async with self.client.pipeline(transaction=False) as pipe:
                for room in chunk:
                    pipe.smembers(room_users_key(room))
                members = await pipe.execute()
            async with self.client.pipeline(transaction=False) as pipe:
                for room, users in zip(chunk, members, strict=False):
                    pipe.delete(room_users_key(room), *(room_user_key(room, u) for u in users))
                    pipe.srem(self._rooms_key, room)
                await pipe.execute()
        return len(rooms)

    async def health(self) -> dict[str, Any]:
        return await ping(self.client, self.name)

    async def aclose(self) -> None:
        await self.client.aclose()
