"""The lock load generator: one worker process timing LOCK_ACQUIRE and LOCK_RELEASE.

Belongs here: what the lock clients of `rounds bench locks` do (mint their
tokens, connect, join their rooms, then the floor, uncontended and contended
phases) and the bare Redis `SET NX`/`DEL` floor client. Must not be here:
percentiles, the gateway, the report (`locks.py`). Reads no environment: its
whole input is a `LockPlan`.

It runs as a `presence.Companion`: Ready after its ramp, one `Go(until)`
from the parent, then the measured window `[Go, until]` is cut into phases
by `phase_windows` (the parent cuts it the same way to read the gateway's
CPU per phase). All timing is `time.perf_counter()` in this one process, so
the lock round trips and the floor are measured by the same client loop
under the same presence load.

- *floor*: `lockers` coroutines, each `SET key val PX 30000 NX`, pause,
  `DEL key`, pause, on one `redis.asyncio` client: the same concurrency and
  pacing as the uncontended lockers, minus the gateway.
- *uncontended*: locker i alone in room i locks its own field:
  acquire → LOCK_ACQUIRED, pause, release → LOCK_RELEASED, pause.
- *contended*: all contenders, in one room, send LOCK_ACQUIRE for one field
  at once; each reply (ACQUIRED or DENIED) is timed; the winner releases;
  exactly one grant per round is the rule (issue 3).

Only requests sent inside their phase are timed: a lock still held at the
end is released untimed (`requests_after_window`), since the presence load
stops at the end of the window and its 500 disconnects are not the load
being measured. Each phase also samples this process's own event-loop lag
(`loop_lag_ms`: how late a 5 ms sleep wakes up), the delay the client side
can add to any reply it times.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from rounds.auth import mint_token
from rounds.bench.plan import RAMP, Recorder, WorkerResult, url_with_token
from rounds.bench.worker import PROGRESS_EVERY_S, BenchWorker, close_clients, data_of, decode_json, serve_worker
from rounds.protocol.ws import MessageType

SETTLE, FLOOR, UNCONTENDED, CONTENDED = "settle", "floor", "uncontended", "contended"
# The window opens with a short settle: the ramp's last joins and their
# fan-out die down, and one untimed round of every operation warms what a
# first request pays for (new pooled Redis connections here and in the shards,
# Lua scripts loaded): 20 fresh connections put 20-40 ms on 5 % of a short
# floor's samples. The rest is shared out; without Redis there is no floor
# and the two lock phases split it.
SETTLE_S, SETTLE_SHARE_MAX = 1.0, 0.1
PHASE_SHARES = ((FLOOR, 0.2), (UNCONTENDED, 0.4), (CONTENDED, 0.4))
LAG_PROBE_S = 0.005
FLOOR_VALUE = "bench"


def phase_windows(start: float, end: float, with_floor: bool) -> list[tuple[str, float, float]]:
    """Cut `[start, end]` into (phase, from, to): the settle, then `PHASE_SHARES` in order."""
    settled = start + min(SETTLE_S, SETTLE_SHARE_MAX * (end - start))
    shares = [(name, share) for name, share in PHASE_SHARES if with_floor or name != FLOOR]
    total = sum(share for _, share in shares)
    windows, at = [(SETTLE, start, settled)], settled
    for i, (name, share) in enumerate(shares):
        to = end if i == len(shares) - 1 else at + (end - settled) * share / total
        windows.append((name, at, to))
        at = to
    return windows


@dataclass(frozen=True, slots=True)
class LockPlan:
    """Everything the lock worker needs; deadlines are `time.monotonic()` readings."""

    index: int
    url: str  # ws://HOST:PORT/ws, without the token
    private_key_pem: bytes
    role: str
    prefix: str  # unique per run and backend: resource ids, user ids, floor keys
    lockers: int
    contenders: int
    pause_ms: float  # think time after each reply, drawn from [0.5, 1.5] x this
    redis_url: str | None  # the floor's Redis; None: no floor phase
    seed: int
    ramp_deadline: float
    hard_deadline: float
    reply_timeout_s: float = 3.0  # the shard's store calls give up after 2 s
    max_samples: int = 200_000  # per phase and metric; beyond, counted as dropped
    max_rounds: int = 100_000  # contended rounds


def locker_room(prefix: str, index: int) -> str:
    return f"document:{prefix}-u{index}"


def contended_room(prefix: str) -> str:
    return f"document:{prefix}-contended"


def field_of(room: str) -> str:
    """The locked field: a child of the room, so it routes to the room's shard."""
    return f"{room}/field:f"


def floor_key(prefix: str, index: int) -> str:
    return f"{prefix}:floor:{index}"


class _Client:
    __slots__ = ("user_id", "room", "resource", "token", "ws", "futures", "ref", "closing", "joined")

    def __init__(self, user_id: str, room: str) -> None:
        self.user_id = user_id
        self.room = room
        self.resource = field_of(room)
        self.token = ""
        self.ws: ClientConnection | None = None
        self.futures: dict[int, asyncio.Future[tuple[float, dict[str, Any]]]] = {}
        self.ref = 0
        self.closing = False
        self.joined = False


class LockWorker(BenchWorker):
    """Runs one `LockPlan` on the running event loop (`run`, no drain phase); see `lock_worker_main`."""

    CLOSE_TIMEOUT_S = 3.0
    DEADLINE_ERROR = "lock worker hit its hard deadline"
    clients: list[_Client]

    def __init__(self, plan: LockPlan, send: Callable[[Any], None]) -> None:
        lockers = [_Client(f"{plan.prefix}-u{i}", locker_room(plan.prefix, i)) for i in range(plan.lockers)]
        room = contended_room(plan.prefix)
        contenders = [_Client(f"{plan.prefix}-c{i}", room) for i in range(plan.contenders)]
        super().__init__(plan, send, Recorder(plan.max_samples), [*lockers, *contenders])
        self.lockers, self.contenders = lockers, contenders
        self.pause_s = plan.pause_ms / 1000.0
        self.redis: aioredis.Redis | None = None
        self.fences: dict[str, int] = {}  # last fencing token seen per resource
        self._readers: set[asyncio.Task[None]] = set()

    def _background(self) -> list[Coroutine[Any, Any, None]]:
        return [self._log_progress()]

    def _result(self, deadline_hit: bool) -> WorkerResult:
        self.connected_at_end = sum(1 for c in self.clients if c.ws is not None)
        return super()._result(deadline_hit)

    # --- the phases ----------------------------------------------------------

    async def _ramp(self) -> None:
        # `mint_token` parses the PEM once per process (cached), then ~1.5 ms a token.
        for client in self.clients:
            client.token = mint_token(self.plan.private_key_pem, user_id=client.user_id, role=self.plan.role,
                                      username=client.user_id)
        if self.plan.redis_url is not None:
            self.redis = aioredis.Redis.from_url(
                self.plan.redis_url, socket_connect_timeout=2, socket_timeout=self.plan.reply_timeout_s,
                max_connections=self.plan.lockers + 2,
            )
            try:
                await self.redis.ping()
            except (RedisError, OSError) as error:
                self.rec.count("redis_errors")
                self.rec.error(f"floor: Redis at {self.plan.redis_url} not reachable: {error}")
        remaining = max(0.1, self.plan.ramp_deadline - time.monotonic())
        joins = asyncio.gather(*(self._connect_and_join(c) for c in self.clients), return_exceptions=True)
        await self._wait_or_stop(joins, timeout=remaining)
        joins.cancel()
        for outcome in await asyncio.gather(joins, return_exceptions=True):
            if isinstance(outcome, list):
                self._bugs(outcome)
        self.rec.count("not_joined_after_ramp", n=sum(1 for c in self.clients if not c.joined))

    async def _measure(self, until: float) -> None:
        rng = random.Random(self.plan.seed)
        for name, _, end in phase_windows(time.monotonic(), until, self.redis is not None):
            if self.stopping.is_set():
                return
            self.phase = name
            _log(f"bench locks [{name}] for {max(0.0, end - time.monotonic()):.1f} s")
            if name == SETTLE:
                await self._run_drivers([self._warm_up()], end)
                await self._wait_or_stop(timeout=max(0.0, end - time.monotonic()))
                continue
            if name == FLOOR:
                drivers = [self._floor_client(i, end, random.Random(rng.random())) for i in range(self.plan.lockers)]
            elif name == UNCONTENDED:
                drivers = [self._locker(c, end, random.Random(rng.random())) for c in self.lockers if c.joined]
            else:
                drivers = [self._contend(end, random.Random(rng.random()))]
            await self._run_drivers([*drivers, self._lag_probe(name, end)], end)
        self.phase = "drain"

    async def _run_drivers(self, drivers: list[Coroutine[Any, Any, None]], end: float) -> None:
        """Run a phase's drivers until they stop by themselves after `end` (a lock held
        then is still released), or until Stop; stragglers are cancelled."""
        tasks = [asyncio.create_task(d) for d in drivers]
        if not tasks:
            return
        everyone = asyncio.gather(*tasks, return_exceptions=True)
        grace = 2 * self.plan.reply_timeout_s + 3 * 1.5 * self.pause_s + 1.0
        await self._wait_or_stop(everyone, timeout=max(0.0, end - time.monotonic()) + grace)
        for task in tasks:
            task.cancel()
        self._bugs(await asyncio.gather(*tasks, return_exceptions=True))

    async def _warm_up(self) -> None:
        """One untimed round of each operation (samples filed under `settle`)."""
        async def lock_once(clients: list[_Client]) -> None:
            outcomes = await asyncio.gather(*(self._acquire(c, SETTLE) for c in clients))
            for client, (_, lock_id) in zip(clients, outcomes, strict=False):
                if lock_id is not None:
                    await self._release(client, lock_id, SETTLE)

        rounds = [lock_once([c]) for c in self.lockers if c.joined]
        rounds.append(lock_once([c for c in self.contenders if c.joined]))
        if self.redis is not None:
            rounds.append(self._warm_redis(self.redis))
        await asyncio.gather(*rounds)

    async def _warm_redis(self, client: aioredis.Redis) -> None:
        """Open as many pooled connections as the floor has clients, at once."""
        keys = [floor_key(self.plan.prefix, i) for i in range(self.plan.lockers)]
        try:
            await asyncio.gather(*(client.set(key, FLOOR_VALUE, px=30_000) for key in keys))
            await client.delete(*keys)
        except (RedisError, OSError) as error:
            self.rec.count("redis_errors")
            self.rec.error(f"floor warm-up: {type(error).__name__}: {error}")

    def _running(self, end: float) -> bool:
        return time.monotonic() < end and not self.stopping.is_set()

    def _timed(self, end: float) -> bool:
        """Whether a request sent now is inside its phase (and timed)."""
        if time.monotonic() < end:
            return True
        self.rec.count("requests_after_window")
        return False

    async def _lag_probe(self, phase: str, end: float) -> None:
        while self._running(end):
            due = time.perf_counter() + LAG_PROBE_S
            await asyncio.sleep(LAG_PROBE_S)
            self.rec.sample(phase, "loop_lag_ms", due, time.perf_counter())

    async def _pause(self, rng: random.Random) -> None:
        await asyncio.sleep(rng.uniform(0.5, 1.5) * self.pause_s if self.pause_s > 0 else 0)

    # --- the three kinds of client --------------------------------------------

    async def _floor_client(self, index: int, end: float, rng: random.Random) -> None:
        assert self.redis is not None
        key = floor_key(self.plan.prefix, index)
        while self._running(end):
            try:
                started = time.perf_counter()
                stored = await self.redis.set(key, FLOOR_VALUE, px=30_000, nx=True)
                self.rec.sample(FLOOR, "set_nx_ms", started, time.perf_counter())
                if not stored:
                    self.rec.count("floor_set_nx_refused")
                await self._pause(rng)
                timed, started = self._timed(end), time.perf_counter()
                await self.redis.delete(key)
                if timed:
                    self.rec.sample(FLOOR, "del_ms", started, time.perf_counter())
            except (RedisError, OSError) as error:
                self.rec.count("redis_errors")
                self.rec.error(f"floor: {type(error).__name__}: {error}")
                await asyncio.sleep(0.1)
            await self._pause(rng)

    async def _locker(self, client: _Client, end: float, rng: random.Random) -> None:
        while self._running(end):
            outcome, lock_id = await self._acquire(client, UNCONTENDED)
            if outcome == "denied":
                self.rec.count("uncontended_denials")  # its own field in its own room
            await self._pause(rng)
            if lock_id is not None:
                await self._release(client, lock_id, UNCONTENDED, timed=self._timed(end))
                await self._pause(rng)

    async def _contend(self, end: float, rng: random.Random) -> None:
        clients = [c for c in self.contenders if c.joined]
        rounds = 0
        while clients and self._running(end) and rounds < self.plan.max_rounds:
            outcomes = await asyncio.gather(*(self._acquire(c, CONTENDED) for c in clients))
            rounds += 1
            winners = [(c, lock_id) for c, (outcome, lock_id) in zip(clients, outcomes, strict=True)
                       if lock_id is not None]
            self.rec.count("contended_rounds")
            self.rec.count("contended_attempts", n=len(clients))
            self.rec.count("contended_grants", n=len(winners))
            self.rec.count("contended_replies", n=sum(1 for outcome, _ in outcomes if outcome != "failed"))
            if not winners:
                self.rec.count("contended_rounds_without_grant")
            elif len(winners) > 1:
                self.rec.count("contended_double_grants")  # two holders at once: a safety bug
            await self._pause(rng)
            for client, lock_id in winners:
                await self._release(client, lock_id, CONTENDED, timed=self._timed(end))
            await self._pause(rng)
            clients = [c for c in clients if c.ws is not None]

    async def _acquire(self, client: _Client, phase: str) -> tuple[str, str | None]:
        """("granted", lockId), ("denied", None) or ("failed", None); timed by outcome."""
        data = {"resourceId": client.resource, "roomId": client.room}
        answer = await self._request(client, MessageType.LOCK_ACQUIRE, data)
        if answer is None:
            return "failed", None
        sent_at, received_at, message = answer
        kind, reply = message.get("type"), data_of(message)
        if kind == MessageType.LOCK_ACQUIRED:
            self.rec.sample(phase, "acquire_ms", sent_at, received_at)
            self.rec.sample(phase, "acquire_granted_ms", sent_at, received_at)
            self._check_fence(client.resource, reply.get("fencingToken"))
            lock_id = reply.get("lockId")
            if isinstance(lock_id, str) and lock_id:
                return "granted", lock_id
            self.rec.count("protocol_errors", "LOCK_ACQUIRED_without_lockId")
            return "failed", None
        if kind == MessageType.LOCK_DENIED:
            if phase == CONTENDED:  # uncontended, a denial is a fault, not a latency
                self.rec.sample(phase, "acquire_ms", sent_at, received_at)
            self.rec.sample(phase, "acquire_denied_ms", sent_at, received_at)
            return "denied", None
        return "failed", None  # ERROR / PERMISSION_DENIED: counted by the reader

    async def _release(self, client: _Client, lock_id: str, phase: str, timed: bool = True) -> None:
        data = {"resourceId": client.resource, "lockId": lock_id}
        answer = await self._request(client, MessageType.LOCK_RELEASE, data)
        if timed and answer is not None and answer[2].get("type") == MessageType.LOCK_RELEASED:
            self.rec.sample(phase, "release_ms", answer[0], answer[1])

    def _check_fence(self, resource: str, token: Any) -> None:
        """Tokens must strictly increase per resource (issue 3); the bench checks too."""
        if not isinstance(token, int) or isinstance(token, bool):
            self.rec.count("protocol_errors", "LOCK_ACQUIRED_without_fencingToken")
            return
        last = self.fences.get(resource)
        if last is not None and token <= last:
            self.rec.count("fence_regressions")
        self.fences[resource] = token

    # --- one connection ---------------------------------------------------------

    async def _connect_and_join(self, client: _Client) -> None:
        try:
            async with asyncio.timeout(max(0.1, min(10.0, self.plan.ramp_deadline - time.monotonic()))):
                ws = await connect(
                    url_with_token(self.plan.url, client.token), proxy=None, open_timeout=None,
                    ping_interval=None, close_timeout=2, max_size=2**22, max_queue=None,
                )
                first = decode_json(await ws.recv())
        except InvalidStatus as error:
            self._connect_failed(client, f"http_{error.response.status_code}")
            return
        except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as error:
            self._connect_failed(client, type(error).__name__)
            return
        if first is None or first.get("type") != MessageType.CONNECTED:
            self._connect_failed(client, "first_frame_not_CONNECTED")
            await ws.close()
            return
        client.ws = ws
        reader = asyncio.create_task(self._read(client, ws))
        self._readers.add(reader)  # a reference, so the task is not collected
        reader.add_done_callback(self._readers.discard)
        data = {"resourceId": client.room, "resourceType": "document", "mode": "editor"}
        answer = await self._request(client, MessageType.JOIN_RESOURCE, data)
        if answer is not None and answer[2].get("type") == MessageType.RESOURCE_STATE:
            client.joined = True
            self.rec.sample(RAMP, "join_state_ms", answer[0], answer[1])

    async def _request(
        self, client: _Client, kind: MessageType, data: dict[str, Any]
    ) -> tuple[float, float, dict[str, Any]] | None:
        """Send one request; (sent at, reply received at, reply) or None (timeout, closed)."""
        if client.ws is None:
            return None
        client.ref += 1
        ref = client.ref
        reply: asyncio.Future[tuple[float, dict[str, Any]]] = asyncio.get_running_loop().create_future()
        client.futures[ref] = reply
        try:
            sent_at = time.perf_counter()
            try:
                await client.ws.send(json.dumps({"type": kind, "ref": ref, "data": data}, separators=(",", ":")))
            except ConnectionClosed:
                return None
            self.rec.count("frames_sent")
            try:
                # not `wait_for`: on 3.11 it swallows a cancellation that races with the reply
                async with asyncio.timeout(self.plan.reply_timeout_s):
                    received_at, message = await reply
            except TimeoutError:
                self.rec.count("reply_timeouts", str(kind))
                return None
            except ConnectionClosed:
                return None  # counted by the reader
            return sent_at, received_at, message
        finally:
            client.futures.pop(ref, None)

    async def _read(self, client: _Client, ws: ClientConnection) -> None:
        try:
            await self._read_json(ws, partial(self._on_message, client))
        except ConnectionClosed:
            pass
        finally:
            client.ws = None
            client.joined = False
            self._closed(client, lambda: ConnectionClosed(ws.protocol.close_rcvd, ws.protocol.close_sent),
                         ws.close_code)

    def _on_message(self, client: _Client, message: dict[str, Any], now: float) -> None:
        kind = message.get("type")
        if kind in (MessageType.ERROR, MessageType.PERMISSION_DENIED):
            self._error_frame(kind, data_of(message))
        self._resolve(client, message.get("ref"), now, message)

    async def _close_all(self) -> None:
        also = []
        if self.redis is not None:
            keys = [floor_key(self.plan.prefix, i) for i in range(self.plan.lockers)]
            also.append(self._close_redis(self.redis, keys))
        await close_clients(self.clients, self.CLOSE_TIMEOUT_S, *also)

    async def _close_redis(self, client: aioredis.Redis, keys: list[str]) -> None:
        try:
            await client.delete(*keys)  # a floor key left by a Stop mid-cycle
        except (RedisError, OSError):
            pass  # it expires by itself within 30 s
        finally:
            await client.aclose()

    async def _log_progress(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            if self.phase in (FLOOR, UNCONTENDED, CONTENDED):
                counts = self.rec.counts
                _log(f"bench locks [{self.phase}] requests {counts['frames_sent']} | "
                     f"rounds {counts['contended_rounds']} | timeouts "
                     f"{sum(self.rec.by_key.get('reply_timeouts', {}).values())}")


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- process entry ----------------------------------------------------------------


def lock_worker_main(plan: LockPlan, control: Any, results: Any) -> None:
    """Entry of the spawned lock worker; see `worker.serve_worker`."""
    serve_worker(lambda send: LockWorker(plan, send), control, results)
