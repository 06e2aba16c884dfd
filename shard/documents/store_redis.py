"""Documents on a real Redis (the `DocStore` of `rounds.shard.documents.store`).

Keys (the `{...}` hash tag keeps a document's keys in one cluster slot):
- `doc:{resourceId}`: hash `state` (bytes), `revision`, `savedAt` (ms)
- `doc:{resourceId}:log`: list of msgpack `[revision, update]`
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import redis.asyncio as aioredis

from rounds.ids import ResourceId
from rounds.redisconn import ping
from rounds.shard.documents.store import StoredDoc


def doc_key(room: str) -> str:
    return f"doc:{{{room}}}"


def doc_log_key(room: str) -> str:
    return f"doc:{{{room}}}:log"


class RedisDocStore:
    name = "redis"

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client  # decode_responses=False: states are bytes

    async def load(self, room: ResourceId) -> StoredDoc:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hmget(doc_key(room), "state", "revision")
            pipe.lrange(doc_log_key(room), 0, -1)
            (state, revision), raw_log = await pipe.execute()
        log = [(int(rev), bytes(update)) for rev, update in (msgpack.unpackb(item) for item in raw_log)]
        return StoredDoc(state or None, int(revision or 0), log)

    async def append(self, logs: Mapping[ResourceId, Sequence[tuple[int, bytes]]]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:  # one round trip for all
            for room, entries in logs.items():
                pipe.rpush(doc_log_key(room), *(msgpack.packb([rev, update]) for rev, update in entries))
            await pipe.execute()

    async def compact(self, room: ResourceId, state: bytes, revision: int, covered: int) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(doc_key(room), mapping={"state": state, "revision": revision,
                                              "savedAt": int(time.time() * 1000)})
            pipe.ltrim(doc_log_key(room), covered, -1)
            await pipe.execute()

    async def health(self) -> dict[str, Any]:
        return await ping(self.client, self.name)

    async def aclose(self) -> None:
        await self.client.aclose()
