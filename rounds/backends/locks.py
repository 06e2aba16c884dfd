"""The lock store: where a grant is decided, for others to see (story BE-001.3).

`LockStore` is the Protocol (habit 5), `MemoryLockStore` the embedded
default, `RedisLockStore` the seed's keys written by Lua scripts
(`lua/lock_*.lua`, one atomic script per step, never read-then-write):

- `lock:{resourceId}` = holder's userId, TTL in ms. The seed writes
  `SET lock:{id} {userId} EX 30 NX`; we use `PX` so a request's `ttlMs` counts.
- `lock:{resourceId}:metadata` hash: `lockType`, `acquiredAt`, `expiresAt`
  (ISO, like the seed's timestamps), `userId`, `lockId`, `fencingToken`, same TTL.
- `lock:{resourceId}:fence`: the fencing counter (`INCR`), never expires, so
  tokens keep increasing across holders and shard restarts (issue 3).

`perform(store, request)` is the shell's step between the pure machine
(`rounds.shard.locks`) and a store: it runs one `StoreRequest` and returns
the command to feed back. This module holds the store side only; which
store a deployment uses is the factory's choice, and nothing here knows
about rooms or clients.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis

from rounds.backends.redis import _lua, _ping
from rounds.clock import iso_ms, now_ms
from rounds.ids import ResourceId, UserId
from rounds.shard.lock_events import (
    EXCLUSIVE,
    GrantFailed,
    GrantRefused,
    GrantStored,
    LockId,
    LockLost,
    StoreGrant,
    StoreRelease,
    StoreRenew,
    StoreRequest,
)

log = logging.getLogger("rounds.locks")


def lock_key(resource: str) -> str:
    return f"lock:{resource}"


def lock_meta_key(resource: str) -> str:
    return f"lock:{resource}:metadata"


def lock_fence_key(resource: str) -> str:
    return f"lock:{resource}:fence"


@dataclass(frozen=True, slots=True)
class Granted:
    fencing_token: int


@dataclass(frozen=True, slots=True)
class Refused:
    """Someone holds it: the seed's `SET NX` returned nil."""

    holder_user_id: UserId
    expires_at_ms: int


GrantResult = Granted | Refused


class LockStore(Protocol):
    """Exclusive locks with fencing tokens. Every method is atomic on its own;
    renew and release act only when `lock_id` and `user_id` still hold it."""

    name: str

    async def grant(self, resource_id: ResourceId, lock_id: LockId, user_id: UserId, ttl_ms: int,
                    acquired_at_ms: int, expires_at_ms: int, lock_type: str = EXCLUSIVE) -> GrantResult:
        """Take the lock if free: its next fencing token, or who holds it and until when."""
        ...

    async def renew(self, resource_id: ResourceId, lock_id: LockId, user_id: UserId, ttl_ms: int,
                    expires_at_ms: int) -> bool:
        """Give the lock `ttl_ms` more from now; False if it is no longer this holder's."""
        ...

    async def release(self, resource_id: ResourceId, lock_id: LockId, user_id: UserId) -> bool:
        """Delete the lock; False if it was no longer this holder's (nothing changes)."""
        ...

    async def health(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


# --- memory -----------------------------------------------------------------------


@dataclass(slots=True)
class MemoryLock:
    user_id: UserId
    lock_id: LockId
    deadline_ms: int  # by `clock`, like Redis's own PX countdown
    metadata: dict[str, str]  # what Redis keeps in lock:{id}:metadata


class MemoryLockStore:
    """The same semantics in one process, expiring against `clock` (ms).

    Fencing counters start, per resource and per instance, at `clock() * 1000`:
    a restarted shard (a new instance) keeps issuing higher tokens as long as a
    resource averages under 1,000 grants per ms and the clock does not go back."""

    name = "memory"

    def __init__(self, clock: Callable[[], int] = now_ms) -> None:
        self._clock = clock
        self.locks: dict[ResourceId, MemoryLock] = {}
        self.fences: dict[ResourceId, int] = {}

    def live(self, resource_id: ResourceId) -> MemoryLock | None:
        """The unexpired lock on a resource (an expired one is forgotten here)."""
        lock = self.locks.get(resource_id)
        if lock is not None and lock.deadline_ms <= self._clock():
            del self.locks[resource_id]
            return None
        return lock

    async def grant(self, resource_id: ResourceId, lock_id: LockId, user_id: UserId, ttl_ms: int,
                    acquired_at_ms: int, expires_at_ms: int, lock_type: str = EXCLUSIVE) -> GrantResult:
        held = self.live(resource_id)
        if held is not None:
            return Refused(held.user_id, held.deadline_ms)
        token = self.fences.get(resource_id, self._clock() * 1000) + 1
        self.fences[resource_id] = token
        self.locks[resource_id] = MemoryLock(user_id, lock_id, self._clock() + ttl_ms, {
            "lockType": lock_type, "acquiredAt": iso_ms(acquired_at_ms), "expiresAt": iso_ms(expires_at_ms),
            "userId": user_id, "lockId": lock_id, "fencingToken": str(token)})
        return Granted(token)

    async def renew(self, resource_id: ResourceId, lock_id: LockId, user_id: UserId, ttl_ms: int,
                    expires_at_ms: int) -> bool:
        held = self._holders(resource_id, lock_id, user_id)
        if held is None:
            return False
        held.deadline_ms = self._clock() + ttl_ms
        held.metadata["expiresAt"] = iso_ms(expires_at_ms)
        return True

    async def release(self, resource_id: ResourceId, lock_id: LockId, user_id: UserId) -> bool:
        if self._holders(resource_id, lock_id, user_id) is None:
            return False
        del self.locks[resource_id]
        return True

    def _holders(self, resource_id: ResourceId, lock_id: LockId, user_id: UserId) -> MemoryLock | None:
        held = self.live(resource_id)
        return held if held is not None and held.lock_id == lock_id and held.user_id == user_id else None

    async def health(self) -> dict[str, Any]:
        return {"backend": self.name, "ok": True, "locks": len(self.locks)}

    async def aclose(self) -> None:
        return None


# --- redis ------------------------------------------------------------------------


class RedisLockStore:
    """The seed's keys on a real Redis; `clock` only turns a holder's PTTL
    into an `expires_at_ms` for LOCK_DENIED."""

    name = "redis"

    def __init__(self, client: aioredis.Redis, clock: Callable[[], int] = now_ms) -> None:
        self.client = client
        self._clock = clock
        self._grant = client.register_script(_lua("lock_grant"))
        self._renew = client.register_script(_lua("lock_renew"))
        self._release = client.register_script(_lua("lock_release"))

    async def grant(self, resource_id: ResourceId, lock_id: LockId, user_id: UserId, ttl_ms: int,
                    acquired_at_ms: int, expires_at_ms: int, lock_type: str = EXCLUSIVE) -> GrantResult:
        reply = await self._grant(
            keys=[lock_key(resource_id), lock_meta_key(resource_id), lock_fence_key(resource_id)],
            args=[user_id, lock_id, ttl_ms, lock_type, iso_ms(acquired_at_ms), iso_ms(expires_at_ms)])
        if int(reply[0]) == 1:
            return Granted(int(reply[1]))
        holder, pttl_ms = reply[1], int(reply[2])
        if isinstance(holder, bytes):  # a client without decode_responses
            holder = holder.decode()
        return Refused(UserId(holder), self._clock() + max(pttl_ms, 0))

    async def renew(self, resource_id: ResourceId, lock_id: LockId, user_id: UserId, ttl_ms: int,
                    expires_at_ms: int) -> bool:
        renewed = await self._renew(keys=[lock_key(resource_id), lock_meta_key(resource_id)],
                                    args=[lock_id, user_id, ttl_ms, iso_ms(expires_at_ms)])
        return int(renewed) == 1

    async def release(self, resource_id: ResourceId, lock_id: LockId, user_id: UserId) -> bool:
        released = await self._release(keys=[lock_key(resource_id), lock_meta_key(resource_id)],
                                       args=[lock_id, user_id])
        return int(released) == 1

    async def health(self) -> dict[str, Any]:
        return await _ping(self.client, self.name)

    async def aclose(self) -> None:
        await self.client.aclose()


# --- the shell's step -------------------------------------------------------------


async def perform(store: LockStore, request: StoreRequest,
                  timeout_s: float = 2.0) -> GrantStored | GrantRefused | GrantFailed | LockLost | None:
    """Run one store request of the lock machine; return the command to feed
    back to `Locks.handle`, if any.

    Run the requests of one resource in the order the machine emitted them
    (a release must reach the store before the next grant). Every grant gets
    an answer: an error or a timeout becomes `GrantFailed`. A failed renew or
    release is logged and changes nothing here: the store's TTL ends the lock
    there, the machine's deadline here."""
    match request:
        case StoreGrant(resource_id=rid, lock_id=lock_id):
            try:
                async with asyncio.timeout(timeout_s):
                    result = await store.grant(rid, lock_id, request.user_id, request.ttl_ms,
                                               request.acquired_at_ms, request.expires_at_ms, request.lock_type)
            except Exception as exc:  # answered as GrantFailed, logged with its stack
                log.exception("lock store grant of %s failed", rid)
                return GrantFailed(rid, lock_id, f"{type(exc).__name__}: {exc}")
            match result:
                case Granted(fencing_token=token):
                    return GrantStored(rid, lock_id, token)
                case Refused(holder_user_id=holder, expires_at_ms=expires_at_ms):
                    return GrantRefused(rid, lock_id, holder, expires_at_ms)
        case StoreRenew(resource_id=rid, lock_id=lock_id):
            try:
                async with asyncio.timeout(timeout_s):
                    renewed = await store.renew(rid, lock_id, request.user_id, request.ttl_ms,
                                                request.expires_at_ms)
            except Exception:
                log.exception("lock store renew of %s failed; the lock stays held here", rid)
                return None
            return None if renewed else LockLost(rid, lock_id)
        case StoreRelease(resource_id=rid, lock_id=lock_id):
            try:
                async with asyncio.timeout(timeout_s):
                    await store.release(rid, lock_id, request.user_id)
            except Exception:
                log.exception("lock store release of %s failed; its TTL will end it", rid)
            return None
    raise TypeError(f"not a store request: {request!r}")
