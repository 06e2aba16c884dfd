"""The presence load generator: one worker process driving whole rooms of users.

Belongs here: what one worker process does (mint its users' tokens, connect
them in bounded waves, join, heartbeat, churn, time every reply) and the
messages it exchanges with the parent. Must not be here: percentiles
(`stats.py`), sampling the gateway's processes, the report (`presence.py`).
Reads no environment: its whole input is a `WorkerPlan`.

A room never spans two workers, so the joiner's send time and the other
members' receipt of `USER_JOINED` are read from one `time.perf_counter()`.
A join is owed a `USER_JOINED` by each member that had its own
RESOURCE_STATE when the join was sent and has not left or dropped since; once
the joiner's RESOURCE_STATE came, a receipt still owed `fanout_timeout_s`
after the send counts as `missing_user_joined`. Receipts by members that were
joining or leaving meanwhile are timed too, but never counted as missing.
Frames are the `/ws` protocol v1 in JSON (DESIGN.md, "Wire protocol v1").
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from rounds.bench.plan import (
    DRAIN,
    MEASURED,
    RAMP,
    Recorder,
    WorkerMessage,
    WorkerPlan,
    bench_user_id,
    url_with_token,
)
from rounds.bench.worker import RoomsWorker, data_of, decode_json, serve_worker
from rounds.protocol.ws import MessageType

# --- the worker's state ---------------------------------------------------------


class _User:
    __slots__ = ("user_id", "index", "room", "token", "ws", "joined", "closing", "futures", "heartbeats", "ref")

    def __init__(self, index: int, room: Room) -> None:
        self.user_id = bench_user_id(index)
        self.index = index
        self.room = room
        self.token = ""
        self.ws: ClientConnection | None = None
        self.joined = False  # RESOURCE_STATE received and no LEAVE sent since
        self.closing = False  # we are closing it: a close is then expected
        self.futures: dict[int, asyncio.Future[tuple[float, dict[str, Any]]]] = {}
        self.heartbeats: dict[int, tuple[float, str]] = {}  # ref -> (sent at, phase)
        self.ref = 0

    def next_ref(self) -> int:
        self.ref += 1
        return self.ref


@dataclass(slots=True)
class JoinRecord:
    """One JOIN_RESOURCE sent, and who should and did see its USER_JOINED."""

    sent_at: float
    phase: str
    expected: set[str]  # members joined when it was sent, minus those that left since
    received: set[str] = field(default_factory=set)
    confirmed: bool = False  # RESOURCE_STATE came: the others are owed a USER_JOINED


class Room:
    __slots__ = ("resource_id", "users", "pending")

    def __init__(self, resource_id: str) -> None:
        self.resource_id = resource_id
        self.users: list[_User] = []
        self.pending: dict[str, list[JoinRecord]] = {}  # joiner -> its recent joins

    def expect_join(self, joiner: _User, sent_at: float, phase: str) -> JoinRecord:
        expected = {u.user_id for u in self.users if u.joined and u is not joiner}
        record = JoinRecord(sent_at, phase, expected)
        self.pending.setdefault(joiner.user_id, []).append(record)
        return record

    def release(self, member: str) -> None:
        """`member` left or dropped: it may or may not see joins in flight."""
        for records in self.pending.values():
            for record in records:
                record.expected.discard(member)

    def match(self, joiner: str, receiver: str) -> JoinRecord | None:
        """The join a USER_JOINED at `receiver` answers: the oldest it was expected for,
        else the oldest it has not seen (it joined or left while the join was in flight)."""
        records = self.pending.get(joiner, ())
        fallback = None
        for record in records:
            if receiver in record.received:
                continue
            if receiver in record.expected:
                return record
            fallback = fallback or record
        return fallback

    def expire(self, before: float | None) -> int:
        """Drop joins sent before `before` (all if None); return the receipts missed.

        A join still waiting for its RESOURCE_STATE is kept (unless all are
        dropped): if it fails, nobody was owed a USER_JOINED."""
        missing = 0
        for joiner, records in list(self.pending.items()):
            keep = []
            for record in records:
                if before is not None and record.sent_at >= before:
                    keep.append(record)
                elif record.confirmed:
                    missing += len(record.expected - record.received)
                elif before is not None and record.expected:
                    keep.append(record)  # its reply is still due; `_join` settles it
            if keep:
                self.pending[joiner] = keep
            else:
                del self.pending[joiner]
        return missing

    def settled(self) -> bool:
        return all(r.expected <= r.received or not r.confirmed for rs in self.pending.values() for r in rs)


# --- the worker -----------------------------------------------------------------


class Worker(RoomsWorker):
    """Runs one `WorkerPlan` on the running event loop (`run`); see `worker_main`."""

    clients: list[_User]

    def __init__(self, plan: WorkerPlan, send: Callable[[WorkerMessage], None]) -> None:
        self.rooms: dict[str, Room] = {}
        users: list[_User] = []
        for room_plan in plan.rooms:
            room = self.rooms[room_plan.resource_id] = Room(room_plan.resource_id)
            for index in room_plan.members:
                user = _User(index, room)
                room.users.append(user)
                users.append(user)
        super().__init__(plan, send, Recorder(phases=(RAMP, MEASURED)), users)
        self.readers: set[asyncio.Task[None]] = set()

    def _joined(self, client: _User) -> bool:
        return client.joined

    def _bug(self, text: str) -> None:
        # Only a bug that dropped a connection counts as `loadgen_errors` here (`_read`).
        self.rec.error(text)

    # the phases (ramp: `RoomsWorker._ramp`)

    async def _measure(self, until: float) -> None:
        self.phase = MEASURED
        drivers = [asyncio.create_task(self._drive(user)) for user in self.clients if user.ws is not None]
        await self._wait_or_stop(timeout=max(0.0, until - time.monotonic()))
        self.connected_at_end = self.connected
        self.phase = DRAIN  # replies still due are filed under the phase they were sent in
        for task in drivers:
            task.cancel()
        await asyncio.gather(*drivers, return_exceptions=True)

    async def _drain(self) -> None:
        """Give replies and fan-outs of the last requests their timeout to arrive."""
        await self._settle(self.plan.fanout_timeout_s, self._settled)
        for room in self.rooms.values():
            self.rec.count("missing_user_joined", n=room.expire(None))
        for user in self.clients:
            self.rec.count("heartbeat_timeouts", n=len(user.heartbeats))
            user.heartbeats.clear()

    def _settled(self) -> bool:
        return all(room.settled() for room in self.rooms.values()) and not any(u.heartbeats for u in self.clients)

    # one user

    async def _connect_and_join(self, user: _User, slots: asyncio.Semaphore) -> None:
        async with slots:
            if not await self._connect(user):
                return
        reader = asyncio.create_task(self._read(user))
        self.readers.add(reader)
        reader.add_done_callback(self.readers.discard)
        await self._join(user)

    async def _connect(self, user: _User) -> bool:
        started = time.perf_counter()
        timeout = max(0.1, min(10.0, self.plan.ramp_deadline - time.monotonic()))
        try:
            async with asyncio.timeout(timeout):
                ws = await connect(
                    url_with_token(self.plan.url, user.token),
                    compression="deflate" if self.plan.deflate else None,
                    proxy=None,
                    open_timeout=None,  # the enclosing timeout covers upgrade and CONNECTED
                    ping_interval=None,  # HEARTBEAT frames keep the session alive
                    close_timeout=2,
                    max_size=2**22,
                    max_queue=None,  # read as fast as frames come; we only count them
                )
                first = await ws.recv()
        except InvalidStatus as error:
            return self._connect_failed(user, f"http_{error.response.status_code}{_unauthorized(error)}")
        except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as error:
            return self._connect_failed(user, type(error).__name__)
        ended = time.perf_counter()
        message = decode_json(first)
        if message is None or message.get("type") != MessageType.CONNECTED:
            user.closing = True
            await ws.close()
            return self._connect_failed(user, "first_frame_not_CONNECTED")
        self._count_received(message)
        user.ws = ws
        self.connected += 1
        self.rec.sample(RAMP, "connect_ms", started, ended)
        return True

    async def _join(self, user: _User) -> bool:
        room, phase = user.room, self.phase
        ref = user.next_ref()
        frame = {
            "type": MessageType.JOIN_RESOURCE,
            "ref": ref,
            "data": {"resourceId": room.resource_id, "resourceType": "bench", "mode": "editor"},
        }
        reply = self._expect_reply(user, ref)
        sent_at = time.perf_counter()
        record = room.expect_join(user, sent_at, phase)
        sent = False
        try:
            sent = await self._send(user, frame)
        finally:
            if not sent:  # (also when cancelled) nobody owes us a USER_JOINED
                record.expected.clear()
        answer = await self._await_reply(user, ref, reply, "join_timeouts") if sent else None
        if answer is None or answer[1].get("type") != MessageType.RESOURCE_STATE:
            record.expected.clear()  # refused or lost: the others may never hear of it
            return False
        self.rec.sample(phase, "join_state_ms", sent_at, answer[0])
        record.confirmed = True
        user.joined = True
        return True

    async def _leave(self, user: _User) -> bool:
        room, phase = user.room, self.phase
        user.joined = False
        room.release(user.user_id)
        ref = user.next_ref()
        frame = {"type": MessageType.LEAVE_RESOURCE, "ref": ref, "data": {"resourceId": room.resource_id}}
        reply = self._expect_reply(user, ref)
        sent_at = time.perf_counter()
        answer = await self._await_reply(user, ref, reply, "leave_timeouts") if await self._send(user, frame) else None
        if answer is None or answer[1].get("type") != MessageType.RESOURCE_LEFT:
            return False
        self.rec.sample(phase, "leave_ms", sent_at, answer[0])
        return True

    async def _heartbeat(self, user: _User) -> None:
        ref = user.next_ref()
        user.heartbeats[ref] = (time.perf_counter(), self.phase)
        if not await self._send(user, {"type": MessageType.HEARTBEAT, "ref": ref, "data": {}}):
            user.heartbeats.pop(ref, None)

    def _expect_reply(self, user: _User, ref: int) -> asyncio.Future[tuple[float, dict[str, Any]]]:
        future: asyncio.Future[tuple[float, dict[str, Any]]] = asyncio.get_running_loop().create_future()
        user.futures[ref] = future
        return future

    async def _send(self, user: _User, frame: dict[str, Any]) -> bool:
        """Send one frame; False if the connection is gone (the reader counts the close)."""
        if user.ws is None:
            return False
        try:
            await user.ws.send(json.dumps(frame, separators=(",", ":")))
        except ConnectionClosed:
            return False
        self.rec.count("frames_sent")
        self.rec.count("frames_sent_by_type", str(frame["type"]))
        return True

    async def _await_reply(
        self, user: _User, ref: int, reply: asyncio.Future[tuple[float, dict[str, Any]]], timeout_counter: str
    ) -> tuple[float, dict[str, Any]] | None:
        """The (receipt time, frame) answering `ref`, or None if none came in time."""
        try:
            # not `wait_for`: on 3.11 it swallows a cancellation that races with the reply
            async with asyncio.timeout(self.plan.reply_timeout_s):
                return await reply
        except TimeoutError:
            self.rec.count(timeout_counter)
            return None
        except ConnectionClosed:
            return None  # counted by the reader as an unexpected close
        finally:
            user.futures.pop(ref, None)

    async def _drive(self, user: _User) -> None:
        """Heartbeat every `heartbeat_s` (random phase) and churn at exponential intervals."""
        rng = random.Random(f"{self.plan.seed}:{user.user_id}")
        now = time.perf_counter()
        next_heartbeat = now + rng.uniform(0, self.plan.heartbeat_s)
        churn_rate = 1.0 / self.plan.churn_s if self.plan.churn_s > 0 else 0.0
        next_churn = now + rng.expovariate(churn_rate) if churn_rate else float("inf")
        # The phase check ends the loop even if a cancellation were lost on the way.
        while self.phase == MEASURED and user.ws is not None and not user.closing:
            await asyncio.sleep(max(0.0, min(next_heartbeat, next_churn) - time.perf_counter()))
            now = time.perf_counter()
            if now >= next_heartbeat:
                await self._heartbeat(user)
                # after a slow churn, skip missed beats rather than send a burst
                next_heartbeat = max(next_heartbeat + self.plan.heartbeat_s, now)
            if now >= next_churn:
                if user.joined:
                    await self._leave(user)
                await self._join(user)
                next_churn = time.perf_counter() + rng.expovariate(churn_rate)

    # receiving

    async def _read(self, user: _User) -> None:
        ws = user.ws
        assert ws is not None
        try:
            await self._read_json(ws, partial(self._on_message, user))
        except ConnectionClosed:
            pass
        except Exception:  # our bug: keep the text, drop this user, keep the others going
            self.rec.error(traceback.format_exc())
            self.rec.count("loadgen_errors")
            user.closing = True
            await ws.close()
        finally:
            self._on_closed(user, ws)

    def _on_message(self, user: _User, message: dict[str, Any], now: float) -> None:
        type_, ref = message.get("type"), message.get("ref")
        data = data_of(message)
        match type_:
            case MessageType.RESOURCE_STATE | MessageType.RESOURCE_LEFT:
                self._resolve(user, ref, now, message)
            case MessageType.HEARTBEAT_ACK:
                sent = user.heartbeats.pop(ref, None) if isinstance(ref, int) else None
                if sent is not None:
                    self.rec.sample(sent[1], "heartbeat_rtt_ms", sent[0], now)
            case MessageType.USER_JOINED:
                self._on_user_joined(user, data, now)
            case MessageType.ERROR | MessageType.PERMISSION_DENIED:
                self._error_frame(type_, data)
                if isinstance(ref, int):
                    user.heartbeats.pop(ref, None)
                self._resolve(user, ref, now, message)

    def _on_user_joined(self, user: _User, data: dict[str, Any], now: float) -> None:
        room = self.rooms.get(data.get("resourceId", ""))
        joined = data.get("user")
        joiner = joined.get("userId") if isinstance(joined, dict) else None
        record = room.match(joiner, user.user_id) if room is not None and isinstance(joiner, str) else None
        if record is None:
            self.rec.count("unmatched_user_joined")
            return
        record.received.add(user.user_id)
        self.rec.sample(record.phase, "fanout_ms", record.sent_at, now)

    def _on_closed(self, user: _User, ws: ClientConnection) -> None:
        self.connected -= 1
        user.joined = False
        user.room.release(user.user_id)
        self._closed(user, lambda: ConnectionClosed(ws.protocol.close_rcvd, ws.protocol.close_sent), ws.close_code)
        user.ws = None

    # background

    def _sweep_late(self) -> None:
        """Count fan-outs and heartbeat replies that did not come in time."""
        now = time.perf_counter()
        for room in self.rooms.values():
            self.rec.count("missing_user_joined", n=room.expire(now - self.plan.fanout_timeout_s))
        for user in self.clients:
            late = [ref for ref, (sent, _) in user.heartbeats.items() if now - sent > self.plan.reply_timeout_s]
            for ref in late:
                del user.heartbeats[ref]
            self.rec.count("heartbeat_timeouts", n=len(late))


def _unauthorized(error: InvalidStatus) -> str:
    """`:reason` from a 401 body `{"type":"UNAUTHORIZED","data":{"reason":...}}`, if any."""
    body = decode_json(bytes(error.response.body or b""))
    data = body.get("data") if body else None
    reason = data.get("reason") if isinstance(data, dict) else None
    return f":{reason}" if isinstance(reason, str) else ""


# --- process entry ----------------------------------------------------------------


def worker_main(plan: WorkerPlan, control: Any, results: Any) -> None:
    """Entry of a spawned presence worker; see `worker.serve_worker`."""
    serve_worker(lambda send: Worker(plan, send), control, results)
