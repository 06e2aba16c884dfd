"""The lock store on a real Redis: the seed's keys (`rounds.shard.locks.store`
says which), written by one Lua script per step over a connection of the
store's own, answered from its `data_received` in send order."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection

from rounds.clock import iso_ms, now_ms
from rounds.ids import UserId
from rounds.redisconn import lua, ping
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
from rounds.shard.locks.store import (
    ADOPT_SCAN_COUNT,
    FENCE_TTL_MS,
    MAX_WAITING,
    META_PREFIX,
    META_SUFFIX,
    STORE_TIMEOUT_S,
    Done,
    HeldLock,
    StoreAnswer,
    held_lock,
    lock_fence_key,
    lock_key,
    lock_meta_key,
)

log = logging.getLogger("rounds.locks")

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
        scripts = {name: lua("rounds.shard.locks", name) for name in ("lock_grant", "lock_renew", "lock_release")}
        self._sha = {name: hashlib.sha1(body.encode()).hexdigest() for name, body in scripts.items()}
        self._pipe = _Pipe(client, list(scripts.values()), timeout_s, max_waiting)
        self._read = client.register_script(lua("rounds.shard.locks", "lock_read"))

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
            cursor, keys = await self.client.scan(cursor, match=f"{META_PREFIX}*{META_SUFFIX}",
                                                  count=self._scan_count, _type="hash")
            resources = [_text(key)[len(META_PREFIX):-len(META_SUFFIX)] for key in keys]
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
        return {**await ping(self.client, self.name), "lockConnection": self._pipe.status()}

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
            # answered from the loop once this attempt is over, so that a request their callbacks
            # make (the machine's release of a failed grant) starts an attempt of its own
            failed, self._waiting = self._waiting, deque()
            for _, on_reply in failed:
                loop.call_soon(_call, on_reply, exc)
            return
        finally:
            self._connecting = None
        waiting, self._waiting = self._waiting, deque()
        for payload, on_reply in waiting:
            conn.write(payload, on_reply)

    def lost(self, conn: _Conn) -> None:
        if self._conn is conn:
            self._conn = None

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
            command: tuple[Any, ...] = ("SCRIPT", "LOAD", body)
            self.write(hiredis.pack_command(command), self.setup_reply)

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
