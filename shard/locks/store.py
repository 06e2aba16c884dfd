"""The lock store: where a grant is decided, for others to see (story BE-001.3).

`LockStore` is the Protocol (habit 5), `MemoryLockStore` the embedded
default; `RedisLockStore` (`store_redis`) writes the seed's keys with Lua
scripts (`lua/lock_*.lua`, one atomic script per step, never read-then-write):

- `lock:{resourceId}` = holder's userId, TTL in ms. The seed writes
  `SET lock:{id} {userId} EX 30 NX`; we use `PX` so a request's `ttlMs` counts.
- `lock:{resourceId}:metadata` hash: `lockType`, `acquiredAt`, `expiresAt`
  (ISO, like the seed's timestamps), `userId`, `lockId`, `fencingToken`, and
  what a restarted shard needs to adopt the lock: `roomId`, `connId`,
  `ttlMs`; same TTL as the lock.
- `lock:{resourceId}:fence`: the fencing counter, kept `FENCE_TTL_MS` past
  the resource's last grant or renewal (see there why that is enough).

A store takes the lock machine's own requests (`StoreGrant`, `StoreRenew`,
`StoreRelease`) with `submit(request, done)` and calls `done` with the
command to feed back to the machine. It is a callback, not a coroutine: the
Redis store writes the script call to its connection at once and answers
from the connection's `data_received`, so a lock request costs no task, no
timeout object and no pooled-connection checkout, and one connection keeps
the requests in the order they were made (a release lands before the next
grant of the resource). `held_locks()` lists the live locks for a
restarting shard to adopt. Which store a deployment uses is the
composition root's choice (`rounds.cluster.compose`), and nothing here
knows about rooms or clients.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from rounds.clock import iso_ms, now_ms
from rounds.ids import ConnId, ResourceId, UserId
from rounds.protocol.messages import LockId
from rounds.shard.locks.events import (
    GrantFailed,
    GrantRefused,
    GrantStored,
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
STORE_TIMEOUT_S = 2.0  # a request unanswered this long fails, with every other one in flight
MAX_WAITING = 10_000  # requests held while (re)connecting; past it they fail at once (habit 9)

StoreAnswer = GrantStored | GrantRefused | GrantFailed | LockLost
Done = Callable[[StoreAnswer | None], None]


def lock_key(resource: str) -> str:
    return f"lock:{resource}"


def lock_meta_key(resource: str) -> str:
    return f"lock:{resource}:metadata"


def lock_fence_key(resource: str) -> str:
    return f"lock:{resource}:fence"


META_PREFIX, META_SUFFIX = "lock:", ":metadata"


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
    """Exclusive locks with fencing tokens, for one shard's lock machine."""

    name: str

    def submit(self, request: StoreRequest, done: Done) -> None:
        """Carry out one request atomically and call `done` exactly once, never
        from inside `submit`, with what to feed back to the machine: a grant
        gets GrantStored, GrantRefused (held by someone else: the seed's
        `SET NX` returned nil) or GrantFailed (no answer: it may have landed);
        a renew gets None, or LockLost if this lock id no longer holds it; a
        release gets None. Renew and release act only while `lock_id` and
        `user_id` hold the lock; a failed one is logged, and the store's TTL
        ends the lock there. Requests take effect in the order submitted."""
        ...

    def held_locks(self) -> AsyncIterator[HeldLock]:
        """Every live lock with what adoption needs, a bounded batch at a time.
        Locks written without it (no `connId`) are skipped: they end at their TTL."""
        ...

    async def health(self) -> dict[str, Any]: ...

    async def aclose(self) -> None:
        """Let requests in flight finish (at most `STORE_TIMEOUT_S`), then close."""
        ...


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
        self._fences_swept = 0

    def live(self, resource_id: ResourceId) -> MemoryLock | None:
        """The unexpired lock on a resource (an expired one is forgotten here)."""
        lock = self.locks.get(resource_id)
        if lock is not None and lock.deadline_ms <= self._clock():
            del self.locks[resource_id]
            return None
        return lock

    def submit(self, request: StoreRequest, done: Done) -> None:
        asyncio.get_running_loop().call_soon(done, self.answer(request))

    def answer(self, request: StoreRequest) -> StoreAnswer | None:
        """Carry out `request` now; what `submit` passes to `done`."""
        match request:
            case StoreGrant():
                return self._grant(request)
            case StoreRenew(resource_id=rid, lock_id=lock_id):
                held = self._holders(rid, lock_id, request.user_id)
                if held is None:
                    return LockLost(rid, lock_id)
                held.deadline_ms = self._clock() + request.ttl_ms
                held.metadata["expiresAt"] = iso_ms(request.expires_at_ms)
                return None
            case StoreRelease(resource_id=rid, lock_id=lock_id):
                held = self._holders(rid, lock_id, request.user_id)
                if held is not None and (request.expires_at_ms is None
                                         or held.metadata["expiresAt"] == iso_ms(request.expires_at_ms)):
                    del self.locks[rid]
                return None
        raise TypeError(f"not a store request: {request!r}")

    def _grant(self, g: StoreGrant) -> GrantStored | GrantRefused:
        held = self.live(g.resource_id)
        if held is not None:
            return GrantRefused(g.resource_id, g.lock_id, held.user_id, held.deadline_ms)
        now = self._clock()
        token = max(self.fences.get(g.resource_id, 0), now * 1000) + 1
        self.fences[g.resource_id] = token
        self._sweep_fences(now)
        self.locks[g.resource_id] = MemoryLock(g.user_id, g.lock_id, now + g.ttl_ms, {
            "lockType": g.lock_type, "acquiredAt": iso_ms(g.acquired_at_ms), "expiresAt": iso_ms(g.expires_at_ms),
            "userId": g.user_id, "lockId": g.lock_id, "fencingToken": str(token),
            "roomId": g.room_id, "connId": str(g.conn), "ttlMs": str(g.ttl_ms)})
        return GrantStored(g.resource_id, g.lock_id, token)

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
