"""Where Y.js documents are kept between shard lives (issue 4).

A document is a snapshot (its whole state as one Y.js update, with the
revision it reached) plus a log of the updates applied since, in order.
The shard appends an update to the log *before* it sends `UPDATE_ACK`, and
now and then folds the log into a new snapshot (`compact`). Loading replays
the log over the snapshot; entries the snapshot already holds are harmless
(Y.js updates are idempotent), so a crash anywhere between the two writes of
a compaction loses and doubles nothing.

Redis keys (the `{...}` hash tag keeps a document's keys in one cluster slot):
- `doc:{resourceId}`: hash `state` (bytes), `revision`, `savedAt` (ms)
- `doc:{resourceId}:log`: list of msgpack `[revision, update]`

What is durable when is in docs/architecture.md ("Documents").
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import redis.asyncio as aioredis

from rounds.backends.redis import _ping
from rounds.ids import ResourceId


@dataclass(frozen=True, slots=True)
class StoredDoc:
    snapshot: bytes | None = None
    revision: int = 0  # of the snapshot
    log: list[tuple[int, bytes]] = field(default_factory=list)  # (revision, update), oldest first


class DocStore(Protocol):
    name: str

    async def load(self, room: ResourceId) -> StoredDoc: ...

    async def append(self, room: ResourceId, entries: Sequence[tuple[int, bytes]]) -> None:
        """Add updates to the log, in order; when this returns they are as
        durable as the store is."""
        ...

    async def compact(self, room: ResourceId, state: bytes, revision: int, covered: int) -> None:
        """Make `state` (at `revision`) the snapshot and drop the log's first
        `covered` entries (those the snapshot holds)."""
        ...

    async def health(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


class MemoryDocStore:
    """The embedded default: documents outlive an unload, not the process."""

    name = "memory"

    def __init__(self) -> None:
        self.docs: dict[ResourceId, StoredDoc] = {}

    async def load(self, room: ResourceId) -> StoredDoc:
        stored = self.docs.get(room)
        return StoredDoc() if stored is None else StoredDoc(stored.snapshot, stored.revision, list(stored.log))

    async def append(self, room: ResourceId, entries: Sequence[tuple[int, bytes]]) -> None:
        stored = self.docs.setdefault(room, StoredDoc())
        stored.log.extend(entries)

    async def compact(self, room: ResourceId, state: bytes, revision: int, covered: int) -> None:
        old = self.docs.get(room, StoredDoc())
        self.docs[room] = StoredDoc(state, revision, old.log[covered:])

    async def health(self) -> dict[str, Any]:
        return {"backend": self.name, "ok": True, "documents": len(self.docs)}

    async def aclose(self) -> None:
        return None


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

    async def append(self, room: ResourceId, entries: Sequence[tuple[int, bytes]]) -> None:
        await self.client.rpush(doc_log_key(room), *(msgpack.packb([rev, update]) for rev, update in entries))

    async def compact(self, room: ResourceId, state: bytes, revision: int, covered: int) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(doc_key(room), mapping={"state": state, "revision": revision,
                                              "savedAt": int(time.time() * 1000)})
            pipe.ltrim(doc_log_key(room), covered, -1)
            await pipe.execute()

    async def health(self) -> dict[str, Any]:
        return await _ping(self.client, self.name)

    async def aclose(self) -> None:
        await self.client.aclose()


def connect_binary(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, decode_responses=False, health_check_interval=30,
                                   socket_connect_timeout=2, socket_timeout=5)
