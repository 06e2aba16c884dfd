"""The document load generator: one worker process of Y.js clients editing in rooms.

Belongs here: what one worker of `rounds bench crdt` does (mint its users'
tokens, connect and sync them in bounded waves, then make every client insert
one marked string into its room's Text every `interval_s`, and time each
update at every other member of the room) and the messages it exchanges with
the parent. Must not be here: percentiles, the gateway, the report
(`crdt.py`); markers and the delivery ledger are pure (`crdtplan.py`).
Reads no environment: its whole input is a `CrdtPlan`.

Each client keeps its own pycrdt `Doc` of the room, inserts at the end of its
Text and sends the incremental update. Receivers do not decode or apply what
they get: they look for markers in the bytes (`crdtplan.find_markers`). That,
the lean WebSocket client (`wsclient.py`: frames handed over synchronously)
and one timer per client instead of a task keep the load generator's cost per
delivery small, since it shares the machine's cores with the server it
measures.

- `ws` mode, the `/ws` protocol v1 (DESIGN.md): JOIN_RESOURCE (document,
  editor) -> RESOURCE_STATE; RESOURCE_UPDATE -> UPDATE_ACK to the sender (its
  send -> ack time is `ack_ms`: the durability round trip), RESOURCE_UPDATE
  with the update to the others. JSON (base64 updates) or msgpack (bytes).
- `yjs` mode, y-websocket (`rounds.protocol.yjs` frames) at `{url}/{room}`: on open
  the client sends sync step 1 with its state vector, answers the server's
  step 1 with step 2, is synced once the server's step 2 came, then sends
  its updates as sync-update messages. Any y-websocket server works.
"""

from __future__ import annotations

import asyncio
import binascii
import random
import time
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any

from pycrdt import Doc, Text

from rounds.bench import wsclient
from rounds.bench.crdtplan import (
    DELIVERED,
    DUPLICATE,
    ECHO,
    EXTRA,
    MSGPACK,
    TEXT_NAME,
    WS,
    CrdtPlan,
    Ledger,
    find_markers,
    marker,
    room_url,
)
from rounds.bench.plan import DRAIN, MEASURED, RAMP, Recorder, WorkerResult, bench_user_id, url_with_token
from rounds.bench.worker import RoomsWorker, data_of, serve_worker
from rounds.protocol.ws import JSON, SUBPROTOCOL_MSGPACK, MessageType, ProtocolError
from rounds.protocol.ws import MSGPACK as MSGPACK_CODEC
from rounds.protocol.yjs import (
    AwarenessMessage,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    YProtocolError,
    decode_message,
    sync_step1,
    sync_step2,
    sync_update,
)

_SYNC_UPDATE_HEAD = b"\x00\x02"  # y-websocket: message sync, sub-type update
SLOW_MS = (5.0, 50.0)  # the goal and the seed's bar at 500 users: slow deliveries are counted by second


class _Client:
    __slots__ = ("index", "user_id", "room", "token", "ws", "synced", "closing", "doc", "text", "length",
                 "futures", "acks", "ref", "revision", "next_at", "timer")

    def __init__(self, index: int, room: _Room) -> None:
        self.index = index
        self.user_id = bench_user_id(index)
        self.room = room
        self.token = ""
        self.ws: wsclient.LeanConnection | None = None
        self.synced = False  # joined (ws) or got the server's sync step 2 (yjs); receives updates
        self.closing = False  # we are closing it: a close is then expected
        self.doc: Doc = Doc()
        self.text = self.doc.get(TEXT_NAME, type=Text)
        self.length = 0  # characters this client inserted (ASCII markers only)
        # replies awaited in the ramp: "connected" (CONNECTED), a ref (RESOURCE_STATE), "sync" (step 2)
        self.futures: dict[Any, asyncio.Future[tuple[int, Any]]] = {}
        self.acks: dict[int, int] = {}  # ref -> sent_ns of an update awaiting UPDATE_ACK
        self.ref = 0
        self.revision = -1  # the last revision this client saw in a RESOURCE_UPDATE
        self.next_at = 0.0  # monotonic time of its next update
        self.timer: asyncio.TimerHandle | None = None

    def next_ref(self) -> int:
        self.ref += 1
        return self.ref


class _Room:
    __slots__ = ("resource_id", "members")

    def __init__(self, resource_id: str) -> None:
        self.resource_id = resource_id
        self.members: list[_Client] = []


class CrdtWorker(RoomsWorker):
    """Runs one `CrdtPlan` on the running event loop (`run`); see `crdt_worker_main`."""

    NOT_JOINED_AFTER_RAMP = "not_synced_after_ramp"
    clients: list[_Client]

    def __init__(self, plan: CrdtPlan, send: Callable[[Any], None]) -> None:
        clients: list[_Client] = []
        for room_plan in plan.rooms:
            room = _Room(room_plan.resource_id)
            for index in room_plan.members:
                client = _Client(index, room)
                room.members.append(client)
                clients.append(client)
        super().__init__(plan, send, Recorder(plan.max_samples, phases=(RAMP, MEASURED)), clients)
        self.ws_mode = plan.mode == WS
        self.codec = MSGPACK_CODEC if plan.codec == MSGPACK else JSON
        self.ledger = Ledger()
        self.updates_sent = 0
        self.until = 0.0  # end of the measured phase (monotonic)
        self.measured_from_ns = 0  # its start, as this worker saw Go
        self.loop = asyncio.get_running_loop()

    def _joined(self, client: _Client) -> bool:
        return client.synced

    # --- the phases (ramp: `RoomsWorker._ramp`) ----------------------------------------

    async def _measure(self, until: float) -> None:
        """Each synced client sends every `interval_s` from a random offset on, by
        a timer of its own; sends are synchronous, so stopping the timers at
        `until` leaves no update half sent."""
        self.phase = MEASURED
        self.until = until
        self.measured_from_ns = time.monotonic_ns()
        rng = random.Random(f"{self.plan.seed}:{self.plan.index}")
        now = time.monotonic()
        for client in self.clients:
            if client.synced:
                offset = rng.uniform(0, self.plan.interval_s)
                client.next_at = now + offset
                client.timer = self.loop.call_later(offset, self._tick, client)
        await self._wait_or_stop(timeout=max(0.0, until - time.monotonic()))
        self._stop_timers()
        self.connected_at_end = self.connected
        self.phase = DRAIN  # deliveries still due are timed all the same

    def _stop_timers(self) -> None:
        for client in self.clients:
            if client.timer is not None:
                client.timer.cancel()
                client.timer = None

    async def _drain(self) -> None:
        """Give the last updates' deliveries and acks their timeout to arrive."""
        await self._settle(max(self.plan.delivery_timeout_s, self.plan.reply_timeout_s), self._settled)
        self.ledger.expire(None)
        for client in self.clients:
            self.rec.count("ack_timeouts", n=len(client.acks))
            client.acks.clear()

    def _settled(self) -> bool:
        return self.ledger.settled() and not any(c.acks for c in self.clients)

    async def _close_all(self) -> None:
        self._stop_timers()
        await super()._close_all()

    def _result(self, deadline_hit: bool) -> WorkerResult:
        self.rec.count("deliveries_expected", n=self.ledger.expected)
        self.rec.count("deliveries", n=self.ledger.delivered)
        self.rec.count("deliveries_missing", n=self.ledger.missing)
        self.rec.count("deliveries_in_flight_at_end", n=len(self.ledger.pending))
        return super()._result(deadline_hit)

    # --- one client: connect and sync -------------------------------------------------

    async def _connect_and_join(self, client: _Client, slots: asyncio.Semaphore) -> None:
        """Connect, then join the room (ws) or sync with the server (yjs)."""
        async with slots:
            if await self._connect(client):
                await (self._join(client) if self.ws_mode else self._sync(client))

    async def _connect(self, client: _Client) -> bool:
        url = url_with_token(room_url(self.plan.mode, self.plan.url, client.room.resource_id), client.token)
        subprotocols = (SUBPROTOCOL_MSGPACK,) if self.ws_mode and self.codec is MSGPACK_CODEC else ()
        started = time.perf_counter()
        timeout = max(0.1, min(10.0, self.plan.ramp_deadline - time.monotonic()))
        connected = self.loop.create_future() if self.ws_mode else None
        if connected is not None:
            client.futures["connected"] = connected
        ws: wsclient.LeanConnection | None = None
        try:
            async with asyncio.timeout(timeout):
                ws = await wsclient.connect(url, subprotocols)
                client.ws = ws
                self.connected += 1
                ws.start(wsclient.Handlers(partial(self._on_message, client, ws), partial(self._on_closed, client, ws)))
                if connected is not None:
                    await connected  # the first frame must be CONNECTED
        except wsclient.HandshakeError as error:
            return self._connect_failed(client, f"http_{error.status}" if error.status else "bad_handshake")
        except (OSError, TimeoutError, ConnectionError) as error:
            if ws is not None:
                client.closing = True
                await ws.close()
            return self._connect_failed(client, type(error).__name__)
        except ValueError:  # the first frame was not CONNECTED (set by `_on_ws_frame`)
            client.closing = True
            if ws is not None:
                await ws.close()
            return self._connect_failed(client, "first_frame_not_CONNECTED")
        finally:
            client.futures.pop("connected", None)
        self.rec.sample(RAMP, "connect_ms", started, time.perf_counter())
        return True

    async def _join(self, client: _Client) -> None:
        ref = client.next_ref()
        data = {"resourceId": client.room.resource_id, "resourceType": "document", "mode": "editor"}
        answer = await self._exchange(client, ref, self.codec.encode(MessageType.JOIN_RESOURCE, data, ref), "join")
        if answer is None:
            return
        sent_ns, received_ns, message = answer
        if message.get("type") == MessageType.RESOURCE_STATE:
            client.synced = True
            self.rec.add(RAMP, "sync_ms", (received_ns - sent_ns) / 1e6)

    async def _sync(self, client: _Client) -> None:
        answer = await self._exchange(client, "sync", sync_step1(client.doc.get_state()), "sync")
        if answer is not None:
            sent_ns, received_ns, _ = answer
            client.synced = True
            self.rec.add(RAMP, "sync_ms", (received_ns - sent_ns) / 1e6)

    async def _exchange(
        self, client: _Client, key: Any, frame: str | bytes, what: str
    ) -> tuple[int, int, Any] | None:
        """Send `frame` and wait for the reply filed under `key`: (sent_ns,
        received_ns, reply), or None on timeout or close."""
        future: asyncio.Future[tuple[int, Any]] = self.loop.create_future()
        client.futures[key] = future
        try:
            sent_ns = time.monotonic_ns()
            if not self._send(client, frame):
                return None
            # not `wait_for`: on 3.11 it swallows a cancellation that races with the reply
            async with asyncio.timeout(self.plan.reply_timeout_s):
                received_ns, reply = await future
            return sent_ns, received_ns, reply
        except TimeoutError:
            self.rec.count("reply_timeouts", what)
            return None
        except ConnectionError:
            return None  # counted by `_on_closed`
        finally:
            client.futures.pop(key, None)

    def _send(self, client: _Client, frame: str | bytes) -> bool:
        """Send one frame; False if the connection is gone (`_on_closed` counts the close)."""
        ws = client.ws
        if ws is None or not (ws.send_text(frame) if isinstance(frame, str) else ws.send_binary(frame)):
            return False
        self.rec.count("frames_sent")
        return True

    # --- one client: updates -------------------------------------------------------------

    def _tick(self, client: _Client) -> None:
        """A client's timer: send one update, then set the timer for the next; a
        late client skips the slots it missed rather than send a burst."""
        client.timer = None
        now = time.monotonic()
        if now >= self.until or client.ws is None or client.closing or self.stopping.is_set():
            return
        try:
            self._send_update(client)
        except Exception:  # our bug: keep the text, stop this client, keep the others going
            self._bug(traceback.format_exc())
            return
        client.next_at = max(client.next_at + self.plan.interval_s, now)
        client.timer = self.loop.call_later(client.next_at - now, self._tick, client)

    def _send_update(self, client: _Client) -> None:
        sent_ns = time.monotonic_ns()
        before = client.doc.get_state()
        text = marker(client.index, sent_ns)
        client.text.insert(client.length, text)
        client.length += len(text)
        update = client.doc.get_update(before)
        room = client.room
        ref = None
        if self.ws_mode:
            ref = client.next_ref()
            frame: str | bytes = self.codec.encode(
                MessageType.RESOURCE_UPDATE, {"resourceId": room.resource_id, "update": update}, ref)
            client.acks[ref] = sent_ns
        else:
            frame = sync_update(update)
        self.ledger.sent(client.index, sent_ns, [m.index for m in room.members if m.synced])
        if not self._send(client, frame):
            self.ledger.cancel(client.index, sent_ns)
            if ref is not None:
                client.acks.pop(ref, None)
            return
        self.updates_sent += 1
        self.rec.count("updates_sent")
        self.rec.count("update_bytes", n=len(update))

    # --- receiving ---------------------------------------------------------------------

    def _on_message(self, client: _Client, ws: wsclient.LeanConnection, is_text: bool, payload: bytes) -> None:
        now_ns = time.monotonic_ns()
        self.rec.count("frames_received")
        try:
            if self.ws_mode:
                self._on_ws_frame(client, payload.decode("utf-8") if is_text else payload, now_ns)
            else:
                reply = self._on_y_frame(client, payload.decode("utf-8") if is_text else payload, now_ns)
                if reply is not None:
                    self._send(client, reply)
        except Exception:  # our bug: keep the text, drop this client, keep the others going
            self._bug(traceback.format_exc())
            client.closing = True
            self.loop.create_task(ws.close())

    def _on_y_frame(self, client: _Client, frame: str | bytes, now_ns: int) -> bytes | None:
        if isinstance(frame, str):
            self.rec.count("protocol_errors", "text_frame")
            return None
        if frame[:2] == _SYNC_UPDATE_HEAD:  # the hot path: markers straight from the frame
            self.rec.count("frames_received_by_type", "sync_update")
            self._deliveries(client, frame, now_ns)
            return None
        try:
            message = decode_message(frame)
        except YProtocolError as error:
            self.rec.count("protocol_errors", "bad_y_frame")
            self.rec.error(f"undecodable y-websocket frame: {error}")
            return None
        self.rec.count("frames_received_by_type", type(message).__name__)
        match message:
            case SyncStep1(state_vector=state_vector):
                return sync_step2(client.doc.get_update(state_vector))
            case SyncStep2(update=update):
                self._deliveries(client, update, now_ns, expect_marker=False)
                future = client.futures.get("sync")
                if future is not None and not future.done():
                    future.set_result((now_ns, message))
            case SyncUpdate(update=update):
                self._deliveries(client, update, now_ns)
            case AwarenessMessage():
                pass  # counted above; the bench sends none
        return None

    def _on_ws_frame(self, client: _Client, frame: str | bytes, now_ns: int) -> None:
        message = self._decode(frame)
        if message is None:
            self.rec.count("protocol_errors", "undecodable_frame")
            return None
        kind, ref = message.get("type"), message.get("ref")
        data = data_of(message)
        self.rec.count("frames_received_by_type", str(kind))
        connected = client.futures.get("connected")
        if connected is not None and not connected.done():  # the first frame
            if kind == MessageType.CONNECTED:
                connected.set_result((now_ns, message))
            else:
                connected.set_exception(ValueError(f"first frame {kind}, not CONNECTED"))
            return None
        if kind == MessageType.RESOURCE_UPDATE:
            update = data.get("update")
            if isinstance(update, str):
                try:
                    update = binascii.a2b_base64(update)
                except binascii.Error:
                    update = None
            if not isinstance(update, bytes):
                self.rec.count("protocol_errors", "RESOURCE_UPDATE_without_update")
                return None
            revision = data.get("revision")
            if isinstance(revision, int):
                if revision <= client.revision:
                    self.rec.count("revision_regressions")
                client.revision = revision
            self._deliveries(client, update, now_ns)
        elif kind == MessageType.UPDATE_ACK:
            sent_ns = client.acks.pop(ref, None) if isinstance(ref, int) else None
            if sent_ns is None:
                self.rec.count("unmatched_acks")
            else:
                self.rec.add(MEASURED, "ack_ms", (now_ns - sent_ns) / 1e6)
        elif kind in (MessageType.ERROR, MessageType.PERMISSION_DENIED):
            self._error_frame(kind, data)
            if isinstance(ref, int) and client.acks.pop(ref, None) is not None:
                self.rec.count("updates_refused")
            self._resolve(client, ref, now_ns, message)
        elif kind == MessageType.RESOURCE_STATE:
            self._resolve(client, ref, now_ns, message)
        return None

    def _deliveries(self, client: _Client, data: bytes, now_ns: int, expect_marker: bool = True) -> None:
        """Time every marked update in `data` at `client`."""
        found = find_markers(data)
        if not found:
            if expect_marker:  # e.g. an empty update relayed; its size says what it was
                self.rec.count("updates_without_marker")
                self.rec.count("updates_without_marker_by_bytes", str(len(data)))
            return
        for sender, sent_ns in found:
            outcome = self.ledger.receipt(client.index, sender, sent_ns)
            if outcome == DELIVERED or outcome == EXTRA:
                ms = (now_ns - sent_ns) / 1e6
                self.rec.add(MEASURED, "propagation_ms", ms)
                if ms > SLOW_MS[0]:  # when in the run the tail happened, by second of the send
                    second = str(int((sent_ns - self.measured_from_ns) // 1_000_000_000))
                    for limit in SLOW_MS:
                        if ms > limit:
                            self.rec.count(f"deliveries_over_{limit:g}ms_by_second", second)
            elif outcome == ECHO:
                self.rec.count("echoes")  # the stock server sends an update back to its sender too
            elif outcome == DUPLICATE:
                self.rec.count("duplicate_deliveries")
            else:
                self.rec.count("unmatched_deliveries")  # after its timeout, or a duplicate of a settled one
            if outcome == EXTRA:
                self.rec.count("extra_deliveries")

    def _decode(self, frame: str | bytes) -> dict[str, Any] | None:
        try:
            message = self.codec.decode(frame)
        except ProtocolError:
            return None
        return message if isinstance(message, dict) else None

    def _on_closed(self, client: _Client, ws: wsclient.LeanConnection, code: int) -> None:
        if client.ws is not ws:
            return  # closed before it was ever counted as connected
        self.connected -= 1
        client.synced = False
        client.ws = None
        if client.timer is not None:
            client.timer.cancel()
            client.timer = None
        self.ledger.release(client.index)
        self._closed(client, lambda: ConnectionError(f"closed with {code}"), code)

    # --- background ------------------------------------------------------------------------

    def _sweep_late(self) -> None:
        """Settle updates past their delivery timeout; count acks that did not come."""
        now_ns = time.monotonic_ns()
        self.ledger.expire(now_ns - int(self.plan.delivery_timeout_s * 1e9))
        limit = now_ns - int(self.plan.reply_timeout_s * 1e9)
        for client in self.clients:
            late = [ref for ref, sent in client.acks.items() if sent < limit]
            for ref in late:
                del client.acks[ref]
            self.rec.count("ack_timeouts", n=len(late))

    def _progress_extra(self) -> dict[str, int]:
        return {"updates": self.updates_sent, "delivered": self.ledger.delivered, "missing": self.ledger.missing}


# --- process entry ----------------------------------------------------------------


def crdt_worker_main(plan: CrdtPlan, control: Any, results: Any) -> None:
    """Entry of a spawned document worker; see `worker.serve_worker`."""
    serve_worker(lambda send: CrdtWorker(plan, send), control, results)
