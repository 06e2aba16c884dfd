"""The lock store: where a grant is decided, for others to see (story BE-001.3).

`LockStore` is the Protocol (habit 5), `MemoryLockStore` the embedded
default, `RedisLockStore` the seed's keys written by Lua scripts
(`lua/lock_*.lua`, one atomic script per step, never read-then-write):

- `lock:{resourceId}` = holder's userId, TTL in ms. The seed writes
  `SET lock:{id} {userId} EX 30 NX`; we use `PX` so a request's `ttlMs` counts.
- `lock:{resourceId}:metadata` hash: `lockType`, `acquiredAt`, `expiresAt`
  (ISO, like the seed's timestamps), `userId`, `lockId`, `fencingToken`, and
  what a restarted shard needs to adopt the lock: `roomId`, `connId`,
  `ttlMs`; same TTL as the lock.
- `lock:{resourceId}:fence`: the fencing counter, kept `FENCE_TTL_MS` past
  the resource's last grant or renewal (see there why that is enough).

`held_locks()` lists the live locks for a restarting shard to adopt.
`perform(store, request)` is the shell's step between the pure machine
(`rounds.shard.locks`) and a store: it runs one `StoreRequest` and returns
the command to feed back. This module holds the store side only; which
store a deployment uses is the factory's choice, and nothing here knows
about rooms or clients.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import redis.asyncio as aioredis

from rounds.backends.redis import _lua, _ping
from rounds.clock import iso_ms, now_ms
from rounds.ids import ConnId, ResourceId, UserId
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

FENCE_TTL_MS = 30 * 24 * 3_600_000
"""How long a fencing counter outlives the last grant or renewal of its resource.

A counter per resource ever locked, kept forever, only grows (one key per
locked field). A token is only worth checking while the lock that carried it
could still be live, or a write fenced with it still in flight: at most the
longest lock TTL (`lock_max_ttl_ms`, minutes) past its last renewal. Thirty
days is far beyond that, and each grant and renewal pushes it back. Should a
counter expire all the same, the next grant starts a new one at the store's
clock in microseconds (Redis `TIME`; the memory store's clock), above any
token the old one issued unless a resource averaged more than one grant per
microsecond, so tokens never go back (issue 3)."""

ADOPT_SCAN_COUNT = 500  # SCAN COUNT per batch when a restarting shard lists live locks


def lock_key(resource: str) -> str:
    return f"lock:{resource}"


def lock_meta_key(resource: str) -> str:
    return f"lock:{resource}:metadata"


def lock_fence_key(resource: str) -> str:
    return f"lock:{resource}:fence"


_META_PREFIX, _META_SUFFIX = "lock:", ":metadata"


@dataclass(frozen=True, slots=True)
class Granted:
    fencing_token: int


@dataclass(frozen=True, slots=True)
class Refused:
    """Someone holds it: the seed's `SET NX` returned nil."""

    holder_user_id: UserId
    expires_at_ms: int


GrantResult = Granted | Refused


@dataclass(frozen=True, slots=True)
class HeldLock:
    """A live lock as the store has it, for a restarted shard to adopt."""

    resource_id: ResourceId
    lock_id: LockId
    user_id: UserId
    conn: ConnId
    room_id: ResourceId
    ttl_ms: int
    acquired_at_ms: int
    expires_at_ms: int  # the metadata's `expiresAt`
    fencing_token: int


class LockStore(Protocol):
    """Exclusive locks with fencing tokens. Every method is atomic on its own;
    renew and release act only when `lock_id` and `user_id` still hold it."""

    name: str

    async def grant(self, resource_id: ResourceId, lock_id: LockId, user_id: UserId, ttl_ms: int,
                    acquired_at_ms: int, expires_at_ms: int, *, conn: ConnId, room_id: ResourceId,
                    lock_type: str = EXCLUSIVE) -> GrantResult:
        """Take the lock if free: its next fencing token, or who holds it and until when."""
        ...

    async def renew(self, resource_id: ResourceId, lock_id: LockId, user_id: UserId, ttl_ms: int,
                    expires_at_ms: int) -> bool:
        """Give the lock `ttl_ms` more from now; False if it is no longer this holder's."""
        ...

    async def release(self, resource_id: ResourceId, lock_id: LockId, user_id: UserId,
                      if_expires_at_ms: int | None = None) -> bool:
        """Delete the lock; False if it was no longer this holder's, or (given
        `if_expires_at_ms`) its `expiresAt` is no longer that: nothing changes then."""
        ...

    def held_locks(self) -> AsyncIterator[HeldLock]:
        """Every live lock with what adoption needs, a bounded batch at a time.
        Locks written without it (no `connId`) are skipped: they end at their TTL."""
        ...

    async def health(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


def held_lock(resource_id: str, holder: str | None, remaining_ms: int, meta: dict[str, str]) -> HeldLock | None:
    """The adoptable lock described by a store's keys, or None if it is gone
    or was written without what adoption needs. It expires at the metadata's
    `expiresAt`, the time its room was told (the store's own TTL runs out a
    store round trip later)."""
    try:
        if holder is None or remaining_ms <= 0 or meta.get("userId") != holder:
            return None
        return HeldLock(ResourceId(resource_id), LockId(meta["lockId"]), UserId(holder), ConnId(int(meta["connId"])),
                        ResourceId(meta["roomId"]), int(meta["ttlMs"]), _ms_of_iso(meta["acquiredAt"]),
                        _ms_of_iso(meta["expiresAt"]), int(meta["fencingToken"]))
    except (KeyError, ValueError):
        return None


def _ms_of_iso(text: str) -> int:
    """Inverse of `iso_ms`."""
    moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)


# --- memory -----------------------------------------------------------------------


@dataclass(slots=True)
class MemoryLock:
    user_id: UserId
    lock_id: LockId
    deadline_ms: int  # by `clock`, like Redis's own PX countdown
    metadata: dict[str, str]  # what Redis keeps in lock:{id}:metadata


class MemoryLockStore:
    """The same semantics in one process, expiring against `clock` (ms).

    Fencing counters start at the clock in µs (`clock() * 1000`) and count up
    from there: a new instance (a restarted shard) keeps issuing higher tokens
    as long as a resource averages under 1,000 grants per ms and the clock
    does not go back. The same rule lets a counter go once the clock has
    passed it, which keeps `fences` to the resources locked lately."""

    name = "memory"

    def __init__(self, clock: Callable[[], int] = now_ms) -> None:
        self._clock = clock
        self.locks: dict[ResourceId, MemoryLock] = {}
        self.fences: dict[ResourceId, int] = {}
        self._fences_swept = len(self.fences)

    def live(self, resource_id: ResourceId) -> MemoryLock | None:
        """The unexpired lock on a resource (an expired one is forgotten here)."""
        lock = self.locks.get(resource_id)
        if lock is not None and lock.deadline_ms <= self._clock():
            del self.locks[resource_id]
            return None
        return lock

    async def grant(self, resource_id: ResourceId, lock_id: LockId, user_id: UserId, ttl_ms: int,
                    acquired_at_ms: int, expires_at_ms: int, *, conn: ConnId, room_id: ResourceId,
                    lock_type: str = EXCLUSIVE) -> GrantResult:
        held = self.live(resource_id)
        if held is not None:
            return Refused(held.user_id, held.deadline_ms)
        now = self._clock()
        token = max(self.fences.get(resource_id, 0), now * 1000) + 1
        self.fences[resource_id] = token
        self._sweep_fences(now)
        self.locks[resource_id] = MemoryLock(user_id, lock_id, now + ttl_ms, {
            "lockType": lock_type, "acquiredAt": iso_ms(acquired_at_ms), "expiresAt": iso_ms(expires_at_ms),
            "userId": user_id, "lockId": lock_id, "fencingToken": str(token),
            "roomId": room_id, "connId": str(conn), "ttlMs": str(ttl_ms)})
        return Granted(token)

    async def renew(self, resource_id: ResourceId, lock_id: LockId, user_id: UserId, ttl_ms: int,
                    expires_at_ms: int) -> bool:
        held = self._holders(resource_id, lock_id, user_id)
        if held is None:
            return False
        held.deadline_ms = self._clock() + ttl_ms
        held.metadata["expiresAt"] = iso_ms(expires_at_ms)
        return True

    async def release(self, resource_id: ResourceId, lock_id: LockId, user_id: UserId,
                      if_expires_at_ms: int | None = None) -> bool:
        held = self._holders(resource_id, lock_id, user_id)
        if held is None or (if_expires_at_ms is not None and held.metadata["expiresAt"] != iso_ms(if_expires_at_ms)):
            return False
        del self.locks[resource_id]
        return True

    async def held_locks(self) -> AsyncIterator[HeldLock]:
        now = self._clock()
        for rid in list(self.locks):
            lock = self.live(rid)
            if lock is not None:
                found = held_lock(rid, lock.user_id, lock.deadline_ms - now, lock.metadata)
                if found is not None:
                    yield found

    def _holders(self, resource_id: ResourceId, lock_id: LockId, user_id: UserId) -> MemoryLock | None:
        held = self.live(resource_id)
        return held if held is not None and held.lock_id == lock_id and held.user_id == user_id else None

    def _sweep_fences(self, now: int) -> None:
        """Forget counters the clock has overtaken (they would start there
        anyway); swept when their number doubles, so it costs O(1) a grant."""
        if len(self.fences) < 2 * self._fences_swept + 1_024:
            return
        floor = now * 1000
        self.fences = {rid: token for rid, token in self.fences.items() if token > floor}
        self._fences_swept = len(self.fences)

    async def health(self) -> dict[str, Any]:
        return {"backend": self.name, "ok": True, "locks": len(self.locks)}

    async def aclose(self) -> None:
        return None


# --- redis ------------------------------------------------------------------------


class RedisLockStore:
    """The seed's keys on a real Redis; `clock` only turns a holder's PTTL
    into an `expires_at_ms` for LOCK_DENIED."""

    name = "redis"

    def __init__(self, client: aioredis.Redis, clock: Callable[[], int] = now_ms, *,
                 fence_ttl_ms: int = FENCE_TTL_MS, scan_count: int = ADOPT_SCAN_COUNT) -> None:
        self.client = client
        self._clock = clock
        self.fence_ttl_ms = fence_ttl_ms
        self._scan_count = scan_count
        self._grant = client.register_script(_lua("lock_grant"))
        self._renew = client.register_script(_lua("lock_renew"))
        self._release = client.register_script(_lua("lock_release"))
        self._read = client.register_script(_lua("lock_read"))

    async def grant(self, resource_id: ResourceId, lock_id: LockId, user_id: UserId, ttl_ms: int,
                    acquired_at_ms: int, expires_at_ms: int, *, conn: ConnId, room_id: ResourceId,
                    lock_type: str = EXCLUSIVE) -> GrantResult:
        reply = await self._grant(
            keys=[lock_key(resource_id), lock_meta_key(resource_id), lock_fence_key(resource_id)],
            args=[user_id, lock_id, ttl_ms, lock_type, iso_ms(acquired_at_ms), iso_ms(expires_at_ms),
                  room_id, conn, self.fence_ttl_ms])
        if int(reply[0]) == 1:
            return Granted(int(reply[1]))
        holder, pttl_ms = reply[1], int(reply[2])
        if isinstance(holder, bytes):  # a client without decode_responses
            holder = holder.decode()
        return Refused(UserId(holder), self._clock() + max(pttl_ms, 0))

    async def renew(self, resource_id: ResourceId, lock_id: LockId, user_id: UserId, ttl_ms: int,
                    expires_at_ms: int) -> bool:
        renewed = await self._renew(
            keys=[lock_key(resource_id), lock_meta_key(resource_id), lock_fence_key(resource_id)],
            args=[lock_id, user_id, ttl_ms, iso_ms(expires_at_ms), self.fence_ttl_ms])
        return int(renewed) == 1

    async def release(self, resource_id: ResourceId, lock_id: LockId, user_id: UserId,
                      if_expires_at_ms: int | None = None) -> bool:
        args: list[Any] = [lock_id, user_id]
        if if_expires_at_ms is not None:
            args.append(iso_ms(if_expires_at_ms))
        released = await self._release(keys=[lock_key(resource_id), lock_meta_key(resource_id)], args=args)
        return int(released) == 1

    async def held_locks(self) -> AsyncIterator[HeldLock]:
        """SCAN `lock:*:metadata` hashes, `scan_count` at a time, and read each
        batch's locks with their PTTL in one script call."""
        cursor = 0
        while True:
            cursor, keys = await self.client.scan(cursor, match=f"{_META_PREFIX}*{_META_SUFFIX}",
                                                  count=self._scan_count, _type="hash")
            resources = [_text(key)[len(_META_PREFIX):-len(_META_SUFFIX)] for key in keys]
            if resources:
                pairs = [k for rid in resources for k in (lock_key(rid), lock_meta_key(rid))]
                rows = await self._read(keys=pairs)
                for rid, (holder, pttl_ms, flat) in zip(resources, rows, strict=True):
                    fields = [_text(x) for x in flat]
                    found = held_lock(rid, None if holder is None else _text(holder), int(pttl_ms),
                                      dict(zip(fields[::2], fields[1::2], strict=True)))
                    if found is not None:
                        yield found
            if int(cursor) == 0:
                return

    async def health(self) -> dict[str, Any]:
        return await _ping(self.client, self.name)

    async def aclose(self) -> None:
        await self.client.aclose()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
                                               request.acquired_at_ms, request.expires_at_ms, conn=request.conn,
                                               room_id=request.room_id, lock_type=request.lock_type)
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
                    await store.release(rid, lock_id, request.user_id, request.expires_at_ms)
            except Exception:
                log.exception("lock store release of %s failed; its TTL will end it", rid)
            return None
    raise TypeError(f"not a store request: {request!r}")
