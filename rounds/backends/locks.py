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

A store takes the lock machine's own requests (`StoreGrant`, `StoreRenew`,
`StoreRelease`) with `submit(request, done)` and calls `done` with the
command to feed back to the machine. It is a callback, not a coroutine: the
Redis store writes the script call to its connection at once and answers
from the connection's `data_received`, so a lock request costs no task, no
timeout object and no pooled-connection checkout, and one connection keeps
the requests in the order they were made (a release lands before the next
grant of the resource). `held_locks()` lists the live locks for a
restarting shard to adopt. This module holds the store side only; which
store a deployment uses is the factory's choice, and nothing here knows
about rooms or clients.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection

from rounds.backends.redis import _lua, _ping
from rounds.clock import iso_ms, now_ms
from rounds.ids import ConnId, ResourceId, UserId
from rounds.shard.lock_events import (
    GrantFailed,
    GrantRefused,
    GrantStored,
    LockLost,
    StoreGrant,
    StoreRelease,
    StoreRenew,
    StoreRequest,
)
from rounds.protocol.messages import LockId

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


_META_PREFIX, _META_SUFFIX = "lock:", ":metadata"


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


# --- redis ------------------------------------------------------------------------


class RedisLockStore:
    """The seed's keys on a real Redis.

    Lock requests go over one connection of its own (`_Pipe`), made from the
    address of `client`; `client` (redis-py) serves the rare calls: listing
    live locks for adoption, health. `clock` turns a holder's PTTL into the
    `expires_at_ms` of a refusal."""

    name = "redis"

    def __init__(self, client: aioredis.Redis, clock: Callable[[], int] = now_ms, *,
                 fence_ttl_ms: int = FENCE_TTL_MS, scan_count: int = ADOPT_SCAN_COUNT,
                 timeout_s: float = STORE_TIMEOUT_S, max_waiting: int = MAX_WAITING) -> None:
        self.client = client
        self._clock = clock
        self.fence_ttl_ms = fence_ttl_ms
        self._scan_count = scan_count
        scripts = {name: _lua(name) for name in ("lock_grant", "lock_renew", "lock_release")}
        self._sha = {name: hashlib.sha1(body.encode()).hexdigest() for name, body in scripts.items()}
        self._pipe = _Pipe(client, list(scripts.values()), timeout_s, max_waiting)
        self._read = client.register_script(_lua("lock_read"))

    def submit(self, request: StoreRequest, done: Done) -> None:
        match request:
            case StoreGrant(resource_id=rid):
                command: tuple[Any, ...] = (
                    "EVALSHA", self._sha["lock_grant"], 3, lock_key(rid), lock_meta_key(rid), lock_fence_key(rid),
                    request.user_id, request.lock_id, request.ttl_ms, request.lock_type,
                    iso_ms(request.acquired_at_ms), iso_ms(request.expires_at_ms), request.room_id, request.conn,
                    self.fence_ttl_ms)
            case StoreRenew(resource_id=rid):
                command = ("EVALSHA", self._sha["lock_renew"], 3, lock_key(rid), lock_meta_key(rid),
                           lock_fence_key(rid), request.lock_id, request.user_id, request.ttl_ms,
                           iso_ms(request.expires_at_ms), self.fence_ttl_ms)
            case StoreRelease(resource_id=rid):
                command = ("EVALSHA", self._sha["lock_release"], 2, lock_key(rid), lock_meta_key(rid),
                           request.lock_id, request.user_id)
                if request.expires_at_ms is not None:
                    command += (iso_ms(request.expires_at_ms),)
            case _:
                raise TypeError(f"not a store request: {request!r}")
        self._pipe.send(hiredis.pack_command(command), lambda reply: done(self._answer(request, reply)))

    def _answer(self, request: StoreRequest, reply: Any) -> StoreAnswer | None:
        """The machine's command for a script's reply (or the failure in its place)."""
        rid, lock_id = request.resource_id, request.lock_id
        if isinstance(reply, Exception):
            if isinstance(request, StoreGrant):
                log.error("lock store grant of %s failed: %r", rid, reply)
                return GrantFailed(rid, lock_id, f"{type(reply).__name__}: {reply}")
            log.error("lock store %s of %s failed (%r); its TTL will end it there",
                      "renew" if isinstance(request, StoreRenew) else "release", rid, reply)
            return None
        if isinstance(request, StoreGrant):
            if reply[0] == 1:
                return GrantStored(rid, lock_id, int(reply[1]))
            return GrantRefused(rid, lock_id, UserId(_text(reply[1])), self._clock() + max(int(reply[2]), 0))
        if isinstance(request, StoreRenew) and reply != 1:
            return LockLost(rid, lock_id)
        return None

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

    @property
    def connection_name(self) -> str:
        """The lock connection's `CLIENT SETNAME`, to find it in `CLIENT LIST`."""
        return self._pipe.name

    async def health(self) -> dict[str, Any]:
        return {**await _ping(self.client, self.name), "lockConnection": self._pipe.status()}

    async def aclose(self) -> None:
        await self._pipe.aclose()
        await self.client.aclose()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


OnReply = Callable[[Any], None]  # a reply, or the exception that stands for it
_PIPES = itertools.count(1)


class _Pipe:
    """Lock requests over one Redis connection at a time (`_Conn`): each
    command is written at once and its reply handed to its callback.

    It connects on first use and after a loss, loading the scripts first;
    commands made meanwhile wait, in order (at most `max_waiting`)."""

    def __init__(self, client: aioredis.Redis, scripts: list[str], timeout_s: float, max_waiting: int) -> None:
        pool = client.connection_pool
        if pool.connection_class not in (Connection, UnixDomainSocketConnection):
            raise ValueError(f"the Redis lock store speaks TCP or a unix socket, not {pool.connection_class.__name__}")
        self._kwargs = pool.connection_kwargs
        self.scripts = scripts
        self.timeout_s = timeout_s
        self._max_waiting = max_waiting
        self._conn: _Conn | None = None
        self._waiting: deque[tuple[bytes, OnReply]] = deque()  # until connected
        self._connecting: asyncio.Task[None] | None = None
        self.name = f"rounds-locks-{os.getpid()}-{next(_PIPES)}"

    def status(self) -> dict[str, Any]:
        conn = self._conn
        return {"connected": conn is not None and conn.open, "inFlight": 0 if conn is None else conn.in_flight,
                "waiting": len(self._waiting)}

    def send(self, payload: bytes, on_reply: OnReply) -> None:
        if self._conn is not None and self._conn.open:
            self._conn.write(payload, on_reply)
        elif len(self._waiting) >= self._max_waiting:
            asyncio.get_running_loop().call_soon(
                on_reply, ConnectionError(f"{len(self._waiting)} lock store requests wait for a connection"))
        else:
            self._waiting.append((payload, on_reply))
            if self._connecting is None:
                self._connecting = asyncio.create_task(self._connect(), name="lock-store-connect")

    async def _connect(self) -> None:
        loop, kw = asyncio.get_running_loop(), self._kwargs
        try:
            async with asyncio.timeout(self.timeout_s):
                if "path" in kw:
                    _, conn = await loop.create_unix_connection(lambda: _Conn(self), kw["path"])
                else:
                    _, conn = await loop.create_connection(lambda: _Conn(self), kw.get("host", "localhost"),
                                                           kw.get("port", 6379))
            self._conn = conn
            setup: list[tuple[Any, ...]] = []
            if kw.get("password") is not None:
                setup.append(("AUTH", *((kw["username"],) if kw.get("username") else ()), kw["password"]))
            if kw.get("db"):
                setup.append(("SELECT", kw["db"]))
            setup.append(("CLIENT", "SETNAME", self.name))
            for command in setup:
                conn.write(hiredis.pack_command(command), conn.setup_reply)
            conn.load_scripts()
        except Exception as exc:  # every waiting request fails with it (and is logged there)
            if not isinstance(exc, OSError | TimeoutError):
                log.exception("lock store: connecting failed")
            if self._conn is not None:
                self._conn.drop(exc)
            failed, self._waiting = self._waiting, deque()
            for _, on_reply in failed:
                _call(on_reply, exc)
            return
        finally:
            self._connecting = None
        waiting, self._waiting = self._waiting, deque()
        for payload, on_reply in waiting:
            conn.write(payload, on_reply)

    def lost(self, conn: _Conn) -> None:
        if self._conn is conn:
            self._conn = None
        if self._waiting and self._connecting is None:  # asked for while the loss was pending
            self._connecting = asyncio.create_task(self._connect(), name="lock-store-connect")

    async def aclose(self) -> None:
        """Let what is in flight or waiting finish (at most `timeout_s`), then close."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.timeout_s
        while loop.time() < give_up and (self._waiting or self._connecting
                                          or (self._conn is not None and self._conn.in_flight)):
            await asyncio.sleep(0.01)
        if self._conn is not None:
            self._conn.close()


class _Conn(asyncio.Protocol):
    """One connection of a `_Pipe`. Redis answers a connection's commands in
    the order sent, so replies (parsed by hiredis) go to the callbacks in that
    order. A command unanswered for `timeout_s` fails, and so does every other
    one in flight: the connection is dropped, as a late reply could no longer
    be matched to its command."""

    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(encoding="utf-8")
        self._in_flight: deque[tuple[float, OnReply]] = deque()  # (deadline, callback), in send order
        self._timer: asyncio.TimerHandle | None = None
        self._drop_reason: Exception | None = None
        self.open = False

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def write(self, payload: bytes, on_reply: OnReply) -> None:
        if self._transport is None:  # not open: fail it, never raise into the caller
            self._loop.call_soon(_call, on_reply, ConnectionError("the lock store connection is closed"))
            return
        self._transport.write(payload)
        self._in_flight.append((self._loop.time() + self._pipe.timeout_s, on_reply))
        if self._timer is None:
            self._timer = self._loop.call_at(self._in_flight[0][0], self._check_deadline)

    def load_scripts(self) -> None:
        """SCRIPT LOAD each script, ahead of any EVALSHA sent after it."""
        for body in self._pipe.scripts:
            self.write(hiredis.pack_command(("SCRIPT", "LOAD", body)), self.setup_reply)

    def setup_reply(self, reply: Any) -> None:
        if isinstance(reply, Exception):
            log.error("lock store connection setup failed: %r", reply)
            self.drop(reply)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.open = True

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while self.open:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                log.error("lock store connection: %r", exc)
                self.drop(exc)
                return
            if reply is False:
                return
            if not self._in_flight:
                log.error("lock store connection: a reply nobody asked for: %r", reply)
                self.drop(ConnectionError("a reply nobody asked for"))
                return
            _, on_reply = self._in_flight.popleft()
            if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
                self.load_scripts()  # flushed meanwhile: loaded again for the requests that follow
            _call(on_reply, reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        reason = self._drop_reason or exc or ConnectionError("the lock store closed the connection")
        failed, self._in_flight = self._in_flight, deque()
        for _, on_reply in failed:
            _call(on_reply, reason)
        self._pipe.lost(self)

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._in_flight:
            return
        deadline = self._in_flight[0][0]
        if deadline <= self._loop.time():
            self.drop(TimeoutError(f"no answer from the lock store within {self._pipe.timeout_s} s"))
        else:
            self._timer = self._loop.call_at(deadline, self._check_deadline)

    def drop(self, reason: Exception) -> None:
        """Give up on this connection: what is in flight fails with `reason`
        (in `connection_lost`), and new requests go to a new connection."""
        self.open = False
        self._drop_reason = reason
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        self.open = False
        if self._transport is not None:
            self._transport.close()


def _call(on_reply: OnReply, reply: Any) -> None:
    """Run one reply's callback; a bug there is logged and hurts no other reply."""
    try:
        on_reply(reply)
    except Exception:
        log.exception("lock store reply handler failed")
