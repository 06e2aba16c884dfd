"""Redis backends: the seed's keys, written with pipelines, one round trip each.

Keys (seed stories BE-001.1 and BE-001.2):
- `user:{userId}:session`: hash session id -> JSON info, TTL `session_ttl_ms`
- `user:{userId}:activity`: last activity (ms epoch), TTL `idle_timeout_ms`
- `resource:{id}:users`: set of user ids in the room
- `resource:{id}:user:{userId}`: hash `mode`, `joinedAt`
- `rounds:mirror:{owner}:rooms`: the rooms a shard has mirrored and not yet
  emptied, so that shard can clear them when it restarts (`reset`)
A failed write is logged and reported by `health`; it never fails the
client's request (the shard's memory is the truth, Redis a mirror).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis

from rounds.backends.base import MirrorEvent
from rounds.clock import iso_ms
from rounds.ids import SessionId, UserId
from rounds.shard.events import MirrorJoin, MirrorLeave


def session_key(user: str) -> str:
    return f"user:{user}:session"


def activity_key(user: str) -> str:
    return f"user:{user}:activity"


def room_users_key(room: str) -> str:
    return f"resource:{room}:users"


def room_user_key(room: str, user: str) -> str:
    return f"resource:{room}:user:{user}"


def owner_rooms_key(owner: str) -> str:
    return f"rounds:mirror:{owner}:rooms"


def _lua(name: str) -> str:
    return resources.files("rounds.backends").joinpath(f"lua/{name}.lua").read_text()


def connect(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, decode_responses=True, health_check_interval=30,
                                   socket_connect_timeout=2, socket_timeout=5)


async def _ping(client: aioredis.Redis, name: str) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        await client.ping()
    except Exception as exc:  # any failure is "down", with its reason
        return {"backend": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"backend": name, "ok": True, "latencyMs": round((time.perf_counter() - started) * 1000, 3)}


class RedisSessions:
    name = "redis"

    def __init__(self, client: aioredis.Redis, session_ttl_ms: int, activity_ttl_ms: int) -> None:
        self.client = client
        self.session_ttl_ms = session_ttl_ms
        self.activity_ttl_ms = activity_ttl_ms
        self._close = client.register_script(_lua("session_close"))

    async def open(self, user: UserId, session: SessionId, info: dict[str, Any], now_ms: int) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(session_key(user), session, json.dumps(info, separators=(",", ":")))
            pipe.pexpire(session_key(user), self.session_ttl_ms)
            pipe.set(activity_key(user), now_ms, px=self.activity_ttl_ms)
            await pipe.execute()

    async def touch(self, user: UserId, session: SessionId, now_ms: int) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.pexpire(session_key(user), self.session_ttl_ms)
            pipe.set(activity_key(user), now_ms, px=self.activity_ttl_ms)
            await pipe.execute()

    async def close(self, user: UserId, session: SessionId) -> None:
        await self._close(keys=[session_key(user), activity_key(user)], args=[session])

    async def health(self) -> dict[str, Any]:
        return await _ping(self.client, self.name)

    async def aclose(self) -> None:
        await self.client.aclose()


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
        rooms = list(await self.client.smembers(self._rooms_key))
        for start in range(0, len(rooms), 500):
            chunk = rooms[start:start + 500]
            async with self.client.pipeline(transaction=False) as pipe:
                for room in chunk:
                    pipe.smembers(room_users_key(room))
                members = await pipe.execute()
            async with self.client.pipeline(transaction=False) as pipe:
                for room, users in zip(chunk, members):
                    pipe.delete(room_users_key(room), *(room_user_key(room, u) for u in users))
                    pipe.srem(self._rooms_key, room)
                await pipe.execute()
        return len(rooms)

    async def health(self) -> dict[str, Any]:
        return await _ping(self.client, self.name)

    async def aclose(self) -> None:
        await self.client.aclose()
