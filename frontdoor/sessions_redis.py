"""The seed's session keys on a real Redis (BE-001.1):

- `user:{userId}:session`: hash session id -> JSON info, TTL `session_ttl_ms`
- `user:{userId}:activity`: last activity (ms epoch), TTL `idle_timeout_ms`

Written with pipelines, one round trip each; closing a session is one Lua
script (`lua/session_close.lua`). A failed write is logged by the front
door and never fails the client's request.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from rounds.ids import SessionId, UserId
from rounds.redisconn import lua, ping


def session_key(user: str) -> str:
    return f"user:{user}:session"


def activity_key(user: str) -> str:
    return f"user:{user}:activity"


class RedisSessions:
    name = "redis"

    def __init__(self, client: aioredis.Redis, session_ttl_ms: int, activity_ttl_ms: int) -> None:
        self.client = client
        self.session_ttl_ms = session_ttl_ms
        self.activity_ttl_ms = activity_ttl_ms
        self._close = client.register_script(lua("rounds.frontdoor", "session_close"))

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
        return await ping(self.client, self.name)

    async def aclose(self) -> None:
        await self.client.aclose()
