"""The front door: WebSocket clients in, shard links out.

Per connection: authenticate before the upgrade (`process_request`), send
`CONNECTED`, then read frames. Requests that need room state go to the shard
that owns the resource; `HEARTBEAT` is answered here. Everything a shard
sends back arrives as `Reply` (one connection) or `Deliver` (several, one
frame per front door), is encoded once per codec and written with
`fanout.send_frame`: framed once, no task and no await per recipient.

Bounds: frames above `max_frame_bytes` get `ERROR TOO_LARGE` (above four
times that, websockets closes with 1009); a client whose unsent output
exceeds `MAX_CLIENT_BUFFER_BYTES` is closed with 4013 (reconnect later);
more than `max_connections_per_frontdoor` clients are refused with HTTP 503.
Nothing here knows about Ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import time
import uuid
import weakref
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from rounds.frontdoor.fanout import frame as ws_frame, send_frame
from rounds.frontdoor.links import Address, ShardLinks
from rounds.relay.frontdoor_side import FrontDoorRelay
from rounds.relay.transport import RelayTransport
from rounds.audit.events import AuditEvent, AuditSink
from rounds.auth import AuthError, Identity, TokenVerifier
from rounds.frontdoor.sessions import SessionStore
from rounds.clock import now_ms
from rounds.config import EDITOR, Settings
from rounds.ids import ConnId, FrontDoorId, ResourceId, SessionId, ShardId, UserId, conn_id
from rounds.protocol.link import LinkMessage, RelayBatch, RelayReset
from rounds.frontdoor.yjs import YJS, command_for, resource_from_path
from rounds.protocol.ws import (
    SUBPROTOCOLS,
    AwarenessUpdate,
    Codec,
    CloseCode,
    ErrorCode,
    Heartbeat,
    JoinResource,
    LeaveResource,
    MessageType,
    LockAcquireRequest,
    LockReleaseRequest,
    LockRenewRequest,
    ProtocolError,
    ResourceUpdate,
    codec_for,
    error_data,
    parse_request,
)
from rounds.protocol.messages import Awareness, Deliver, Disconnect, DocUpdate, Join, Leave, Reply
from rounds.protocol.messages import LockAcquire, LockId, LockRelease, LockRenew

log = logging.getLogger(__name__)

MAX_CLIENT_BUFFER_BYTES = 4 * 1024 * 1024
MAX_LOCK_ROOMS_PER_CLIENT = 256


@dataclass(slots=True, eq=False)
class Client:
    conn: ConnId
    ws: ServerConnection
    identity: Identity
    session_id: SessionId
    codec: Codec  # JSON, msgpack, or YJS for a y-websocket client of one room
    last_seen: float  # monotonic seconds of the last frame from the client
    rooms: dict[ResourceId, Join] = field(default_factory=dict)
    joining: set[ResourceId] = field(default_factory=set)  # joins sent, RESOURCE_STATE not yet back
    lock_rooms: dict[ResourceId, ResourceId] = field(default_factory=dict)  # lock resource -> its room
    close_reason: str = "disconnected"
    yjs_resource: ResourceId | None = None  # the room of a y-websocket client


class FrontDoor:
    def __init__(self, index: FrontDoorId, settings: Settings, verifier: TokenVerifier,
                 sessions: SessionStore, audit: AuditSink, relay: RelayTransport | None = None) -> None:
        """`relay`: the cross-node relay's transport, when shards on other
        nodes reach this front door through it; None: only the direct links."""
        self.index = index
        self.settings = settings
        self.verifier = verifier
        self.sessions = sessions
        self.audit = audit
        self.epoch = uuid.uuid4().hex[:12]
        self.node = settings.node_id or "local"
        self.links = ShardLinks(index, self.epoch, self._on_link_message, self._members_of, self._on_shard_down,
                                node=self.node)
        self.relay = (FrontDoorRelay(index, self.epoch, relay, self._on_link_message, self.links.send,
                                     self._on_relay_reset) if relay is not None else None)
        self.clients: dict[ConnId, Client] = {}
        self._counter = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        # Upgrades accepted but not yet serving count against the cap too, so a
        # burst of handshakes cannot overshoot it. Weak: a failed handshake's
        # connection object just disappears from here.
        self._accepting: weakref.WeakSet[ServerConnection] = weakref.WeakSet()
        self._server: Server | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.draining = False
        self.rejected = 0
        self.overloaded = 0

    @property
    def name(self) -> str:
        return f"frontdoor-{self.index}"

    # --- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self._server = await serve(
            self._handle, s.host, s.port,
            process_request=self._process_request,
            subprotocols=list(SUBPROTOCOLS),
            select_subprotocol=_select_subprotocol,
            ping_interval=s.heartbeat_interval_ms / 1000,
            ping_timeout=s.ping_timeout_ms / 1000,
            max_size=max(4 * s.max_frame_bytes, 1024 * 1024),
            compression=None,  # per-message deflate costs CPU per recipient
            close_timeout=2,
            reuse_port=True,
        )
        self._reaper = asyncio.create_task(self._reap_idle(), name=f"{self.name}-reaper")
        if self.relay is not None:
            self.relay.start()
        log.info("%s serving ws://%s:%d/ws", self.name, s.host, s.port)

    def set_address_book(self, version: int, book: dict[ShardId, Address]) -> None:
        self.links.update(version, book)

    async def drain(self, timeout_s: float = 2.0) -> None:
        """Stop accepting, send every client a 1001 close frame, wait a little."""
        self.draining = True
        if self._reaper is not None:
            self._reaper.cancel()
        if self._server is not None:
            self._server.close(close_connections=True)
            try:
                await asyncio.wait_for(self._server.wait_closed(), timeout_s)
            except TimeoutError:
                log.warning("%s: %d connections still closing after %.1fs", self.name, len(self.clients), timeout_s)
        self.links.close()
        if self.relay is not None:
            await self.relay.stop()
        await self.sessions.aclose()
        self.audit.flush()

    def stats(self) -> dict[str, Any]:
        rooms = {r for c in self.clients.values() for r in c.rooms}
        return {
            "frontdoor": self.index,
            "connections": len(self.clients),
            "users": len({c.identity.user_id for c in self.clients.values()}),
            "rooms": len(rooms),
            "shards": self.links.status(),
            "bookVersion": self.links.version,
            "rejected": self.rejected,
            "overloaded": self.overloaded,
            "draining": self.draining,
            "relay": self.relay.stats() if self.relay is not None else None,
        }

    async def health(self) -> dict[str, Any]:
        shards = self.links.status()
        sessions = await self.sessions.health()
        shards_up = bool(shards) and all(shards.values())
        status = "ok" if shards_up and sessions.get("ok") else ("degraded" if any(shards.values()) else "down")
        return {
            "status": status,
            "frontdoor": self.index,
            "connections": len(self.clients),
            "shards": {str(k): ("up" if v else "down") for k, v in shards.items()},
            "backends": {"sessions": sessions, **({"relay": {
                "ok": self.relay.consumer.up, "error": self.relay.consumer.last_error}} if self.relay else {})},
        }

    # --- handshake ----------------------------------------------------------------

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        _free_by_refcount(connection)
        url = urlsplit(request.path)
        if url.path == "/health":
            body = await self.health()
            return _json_response(connection, 503 if body["status"] == "down" else 200, body)
        if url.path != "/ws" and resource_from_path(url.path) is None:
            return _json_response(connection, 404, {"type": "NOT_FOUND", "data": {"path": url.path}})
        remote = _remote(connection)
        if self.draining or len(self.clients) + len(self._accepting) >= self.settings.max_connections_per_frontdoor:
            self.rejected += 1
            reason = "draining" if self.draining else "max_connections"
            self._audit("CONNECTION_REJECTED", outcome="denied", details={"reason": reason, "remote": remote})
            response = _json_response(connection, 503, {"type": "UNAVAILABLE", "data": {"reason": reason}})
            response.headers["Retry-After"] = "5"
            return response
        token = _token_from(url.query, request.headers.get("Authorization"))
        try:
            identity = self.verifier.verify(token)
        except AuthError as exc:
            self.rejected += 1
            self._audit("CONNECTION_REJECTED", outcome="denied", details={"reason": exc.reason, "remote": remote})
            return _json_response(connection, 401, {"type": MessageType.UNAUTHORIZED, "data": {"reason": exc.reason}})
        connection.rounds_identity = identity  # type: ignore[attr-defined]
        self._accepting.add(connection)
        return None

    # --- a connection's life ------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        identity: Identity = ws.rounds_identity  # type: ignore[attr-defined]
        yjs_resource = resource_from_path(urlsplit(ws.request.path).path) if ws.request is not None else None
        client = Client(conn_id(self.index, next(self._counter)), ws, identity,
                        SessionId(uuid.uuid4().hex), YJS if yjs_resource else codec_for(ws.subprotocol),
                        time.monotonic(), yjs_resource=yjs_resource)
        self.clients[client.conn] = client
        self._accepting.discard(ws)
        user = UserId(identity.user_id)
        try:
            await self.sessions.open(user, client.session_id, {
                "frontdoor": self.index, "role": identity.role, "connectedAt": now_ms()}, now_ms())
        except Exception:
            log.exception("%s: session store failed on open; continuing without it", self.name)
        self._audit("USER_CONNECTED", client, details={"role": identity.role, "remote": _remote(ws),
                                                        "subprotocol": client.codec.name})
        if yjs_resource is not None:
            self._yjs_join(client, yjs_resource)
        else:
            self._send(client, MessageType.CONNECTED, {
                "sessionId": client.session_id,
                "userId": identity.user_id,
                "username": identity.username,
                "role": identity.role,
                "heartbeatIntervalMs": self.settings.heartbeat_interval_ms,
                "idleTimeoutMs": self.settings.idle_timeout_ms,
            })
        on_frame = self._on_yjs_frame if yjs_resource is not None else self._on_frame
        try:
            async for frame in ws:
                client.last_seen = time.monotonic()
                await on_frame(client, frame)
        except ConnectionClosed:
            pass
        finally:
            await self._cleanup(client, ws)

    async def _on_frame(self, client: Client, frame: str | bytes) -> None:
        try:
            limit = self.settings.max_frame_bytes
            if _frame_bytes(frame, limit) > limit:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"frame exceeds {limit} bytes")
            request = parse_request(client.codec, frame)
            match request:
                case Heartbeat(ref=ref):
                    await self._heartbeat(client, ref)
                case JoinResource():
                    self._join(client, request)
                case LeaveResource():
                    self._leave(client, request)
                case ResourceUpdate():
                    self._update(client, request)
                case AwarenessUpdate():
                    self._awareness(client, request)
                case LockAcquireRequest():
                    self._lock_acquire(client, request)
                case LockRenewRequest() | LockReleaseRequest():
                    self._lock_forward(client, request)
        except ProtocolError as exc:
            self._send(client, MessageType.ERROR, error_data(exc.code, exc.message), exc.ref)
        except Exception:  # our bug: log it, tell the client without internals, keep going
            log.exception("%s: failed on a frame from conn %d", self.name, client.conn)
            self._send(client, MessageType.ERROR, error_data(ErrorCode.INTERNAL, "internal error"))

    async def _heartbeat(self, client: Client, ref: Any) -> None:
        try:
            await self.sessions.touch(UserId(client.identity.user_id), client.session_id, now_ms())
        except Exception:
            log.exception("%s: session store failed on touch", self.name)
        self._send(client, MessageType.HEARTBEAT_ACK, {"serverTime": now_ms()}, ref)

    def _join(self, client: Client, req: JoinResource) -> None:
        rid = req.resource_id
        if req.mode not in self.settings.allowed_modes(client.identity.role):
            self._audit("PERMISSION_DENIED", client, outcome="denied", resource=rid,
                        details={"action": "join", "mode": req.mode, "role": client.identity.role})
            self._send(client, MessageType.PERMISSION_DENIED, error_data(
                ErrorCode.PERMISSION_DENIED, f"role {client.identity.role!r} may not join as {req.mode}",
                resourceId=rid, mode=req.mode), req.ref)
            return
        if rid in client.rooms:
            raise ProtocolError(ErrorCode.ALREADY_JOINED, f"already joined {rid}", req.ref)
        if len(client.rooms) >= self.settings.max_rooms_per_connection:
            raise ProtocolError(ErrorCode.TOO_MANY_ROOMS,
                                f"at most {self.settings.max_rooms_per_connection} rooms per connection", req.ref)
        identity = client.identity
        join = Join(client.conn, req.ref, UserId(identity.user_id), identity.username, client.session_id,
                    rid, req.resource_type, req.mode, joined_at_ms=now_ms(), state_vector=req.state_vector)
        if not self._to_shard(rid, join):
            raise ProtocolError(ErrorCode.UNAVAILABLE, "the shard for this resource is unavailable; retry", req.ref)
        client.rooms[rid] = join
        client.joining.add(rid)

    def _leave(self, client: Client, req: LeaveResource) -> None:
        rid = req.resource_id
        if rid not in client.rooms:
            raise ProtocolError(ErrorCode.NOT_JOINED, f"not joined to {rid}", req.ref)
        del client.rooms[rid]
        if not self._to_shard(rid, Leave(client.conn, req.ref, rid)):
            # The shard is away: its Sync on relink drops this membership.
            self._send(client, MessageType.RESOURCE_LEFT, {"resourceId": rid}, req.ref)

    def _update(self, client: Client, req: ResourceUpdate) -> None:
        join = client.rooms.get(req.resource_id)
        if join is None:
            raise ProtocolError(ErrorCode.NOT_JOINED, f"not joined to {req.resource_id}", req.ref)
        if join.mode != EDITOR:
            # seed BE-001.2 "Join resource as viewer": updates are refused.
            self._audit("PERMISSION_DENIED", client, outcome="denied", resource=req.resource_id,
                        details={"action": "update", "mode": join.mode})
            self._send(client, MessageType.PERMISSION_DENIED, error_data(
                ErrorCode.PERMISSION_DENIED, "viewers may not update the document",
                resourceId=req.resource_id, mode=join.mode), req.ref)
            return
        if req.lock_resource_id is not None:
            # Fenced (issue 3): the document's shard checks the token, so the
            # lock must live there too (its room is this document's family).
            room = client.lock_rooms.get(req.lock_resource_id, req.resource_id)
            if self.links.route(room) != self.links.route(req.resource_id):
                raise ProtocolError(ErrorCode.BAD_REQUEST, "a fenced update must name a lock taken in this "
                                    "document's room (or its family)", req.ref)
        update = DocUpdate(client.conn, req.ref, req.resource_id, req.update, True,
                           req.lock_resource_id, req.fencing_token)
        if not self._to_shard(req.resource_id, update):
            raise ProtocolError(ErrorCode.UNAVAILABLE, "the shard for this resource is unavailable; retry", req.ref)

    def _awareness(self, client: Client, req: AwarenessUpdate) -> None:
        if req.resource_id not in client.rooms:
            raise ProtocolError(ErrorCode.NOT_JOINED, f"not joined to {req.resource_id}", req.ref)
        if not self._to_shard(req.resource_id, Awareness(client.conn, req.ref, req.resource_id, req.update)):
            raise ProtocolError(ErrorCode.UNAVAILABLE, "the shard for this resource is unavailable; retry", req.ref)

    # --- y-websocket clients (issue 4) -------------------------------------------------

    def _yjs_join(self, client: Client, rid: ResourceId) -> None:
        allowed = self.settings.allowed_modes(client.identity.role)
        mode = EDITOR if EDITOR in allowed else allowed[0]
        identity = client.identity
        join = Join(client.conn, None, UserId(identity.user_id), identity.username, client.session_id,
                    rid, "document", mode, joined_at_ms=now_ms(), kind="yjs")
        client.rooms[rid] = join
        if self._to_shard(rid, join):
            client.joining.add(rid)
        else:
            log.warning("%s: shard for %s unavailable; closing y-websocket conn %d", self.name, rid, client.conn)
            self._spawn(client.ws.close(1013, "shard unavailable; retry"))

    async def _on_yjs_frame(self, client: Client, frame: str | bytes) -> None:
        rid = client.yjs_resource
        assert rid is not None
        try:
            if isinstance(frame, bytes) and len(frame) > self.settings.max_update_bytes + 64:
                raise ValueError(f"frame of {len(frame)} bytes exceeds the update limit")
            command = command_for(client.conn, rid, YJS.decode(frame))
        except ValueError as exc:  # YProtocolError included: y-websocket has no error message
            log.info("%s: dropped a bad y-websocket frame from conn %d (%s): %s",
                     self.name, client.conn, client.identity.user_id, exc)
            return
        if command is None or rid not in client.rooms:
            return
        if isinstance(command, DocUpdate) and client.rooms[rid].mode != EDITOR:
            # The y-websocket way: drop it (the client keeps its local edit);
            # the audit trail and the log say who tried.
            log.info("%s: dropped an update to %s from viewer %s (y-websocket)",
                     self.name, rid, client.identity.user_id)
            self._audit("PERMISSION_DENIED", client, outcome="denied", resource=rid,
                        details={"action": "update", "mode": client.rooms[rid].mode, "endpoint": "yjs"})
            return
        self._to_shard(rid, command)

    def _lock_acquire(self, client: Client, req: LockAcquireRequest) -> None:
        # A lock lives on the shard of its room, with the room's members: its
        # broadcasts and its release when the holder leaves stay local there.
        join = client.rooms.get(req.room_id)
        if join is None:
            raise ProtocolError(ErrorCode.NOT_JOINED, f"join {req.room_id} before locking in it", req.ref)
        command = LockAcquire(client.conn, req.ref, UserId(client.identity.user_id), req.resource_id,
                              join.mode, req.room_id, req.ttl_ms)
        if not self._to_shard(req.room_id, command):
            raise ProtocolError(ErrorCode.UNAVAILABLE, "the shard for this room is unavailable; retry", req.ref)
        client.lock_rooms.pop(req.resource_id, None)
        client.lock_rooms[req.resource_id] = req.room_id
        if len(client.lock_rooms) > MAX_LOCK_ROOMS_PER_CLIENT:
            # Only a routing hint for renew/release; forget the oldest.
            del client.lock_rooms[next(iter(client.lock_rooms))]

    def _lock_forward(self, client: Client, req: LockRenewRequest | LockReleaseRequest) -> None:
        room = client.lock_rooms.get(req.resource_id, req.resource_id)
        command: LockRenew | LockRelease = (
            LockRenew(client.conn, req.ref, req.resource_id, LockId(req.lock_id))
            if isinstance(req, LockRenewRequest)
            else LockRelease(client.conn, req.ref, req.resource_id, LockId(req.lock_id)))
        if not self._to_shard(room, command):
            raise ProtocolError(ErrorCode.UNAVAILABLE, "the shard for this lock is unavailable; retry", req.ref)

    def _to_shard(self, rid: ResourceId, msg: LinkMessage) -> bool:
        shard = self.links.route(rid)
        return shard is not None and self.links.send(shard, msg)

    async def _cleanup(self, client: Client, ws: ServerConnection) -> None:
        self.clients.pop(client.conn, None)
        reason = client.close_reason
        shards = {self.links.route(rid) for rid in client.rooms}
        for shard in shards:
            if shard is not None:
                self.links.send(shard, Disconnect(client.conn, reason))
        try:
            await self.sessions.close(UserId(client.identity.user_id), client.session_id)
        except Exception:
            log.exception("%s: session store failed on close", self.name)
        if reason == "timeout":
            self._audit("SESSION_TIMEOUT", client, details={"idleTimeoutMs": self.settings.idle_timeout_ms})
        self._audit("USER_DISCONNECTED", client, details={
            "reason": reason, "code": ws.close_code, "rooms": sorted(client.rooms)})

    def _on_shard_down(self, shard: ShardId) -> None:
        """Joins sent to a shard whose link dropped may never be answered: fail
        them now, so the client retries, and leave them out of the next Sync."""
        route = self.links.route
        for client in self.clients.values():
            for rid in [r for r in client.joining if route(r) == shard]:
                client.joining.discard(rid)
                join = client.rooms.pop(rid)
                self._send(client, MessageType.ERROR, error_data(
                    ErrorCode.UNAVAILABLE, "the shard for this resource went away; retry the join",
                    resourceId=rid), join.ref)

    def _members_of(self, shard: ShardId) -> list[Join]:
        route = self.links.route
        return [dataclasses.replace(j, ref=None, restore=True)
                for c in self.clients.values() for j in c.rooms.values() if route(j.resource_id) == shard]

    async def _reap_idle(self) -> None:
        """Close clients silent for longer than the idle timeout (seed BE-001.1)."""
        idle_s = self.settings.idle_timeout_ms / 1000
        period = max(0.05, min(idle_s / 4, 5.0))
        while True:
            await asyncio.sleep(period)
            deadline = time.monotonic() - idle_s
            for client in [c for c in self.clients.values() if c.last_seen < deadline]:
                if client.close_reason != "timeout":
                    client.close_reason = "timeout"
                    self._spawn(client.ws.close(CloseCode.IDLE_TIMEOUT, "idle timeout"))

    # --- sending --------------------------------------------------------------------

    def _send(self, client: Client, type_: str, data: dict[str, Any], ref: Any = None) -> None:
        frame = client.codec.encode(type_, data, ref)
        if frame is not None:
            send_frame((client.ws,), ws_frame(frame))

    def _send_yjs(self, client: Client, type_: str, data: dict[str, Any]) -> None:
        if type_ == MessageType.RESOURCE_STATE:
            for frame in YJS.greeting(data):
                send_frame((client.ws,), ws_frame(frame))
        elif type_ == MessageType.ERROR:
            log.info("%s: y-websocket conn %d: %s %s", self.name, client.conn, data.get("code"), data.get("message"))
            if data.get("code") == ErrorCode.UNAVAILABLE and client.yjs_resource not in client.rooms:
                self._spawn(client.ws.close(1013, "document unavailable; retry"))
        else:
            self._send(client, type_, data)

    def _on_link_message(self, msg: LinkMessage) -> None:
        match msg:
            case Deliver(conns=conns, type=type_, data=data):
                self._deliver(conns, type_, data)
            case Reply(conn=conn, ref=ref, type=type_, data=data):
                client = self.clients.get(conn)
                if client is None:
                    return
                if client.joining:
                    rid = data.get("resourceId")
                    if rid in client.joining:
                        client.joining.discard(rid)
                        if type_ == MessageType.ERROR:  # the join failed (its document could not load)
                            client.rooms.pop(rid, None)
                if client.codec is YJS:
                    self._send_yjs(client, type_, data)
                else:
                    self._send(client, type_, data, ref)
            case RelayBatch() | RelayReset():
                if self.relay is not None:
                    self.relay.on_link(msg)
            case _:
                log.error("%s: unexpected link message %s", self.name, type(msg).__name__)

    def _on_relay_reset(self, shard: ShardId) -> None:
        """Relayed messages of that shard were lost for good: its clients here
        reconnect (1012, service restart) and so start from its state again."""
        route = self.links.route
        for client in list(self.clients.values()):
            if any(route(rid) == shard for rid in client.rooms):
                client.close_reason = "relay reset"
                self._spawn(client.ws.close(1012, "relayed messages lost; reconnect"))

    def _deliver(self, conns: Iterable[ConnId], type_: str, data: dict[str, Any]) -> None:
        by_codec: dict[Any, list[ServerConnection]] = {}
        clients = self.clients
        for conn in conns:
            client = clients.get(conn)
            if client is None:
                continue
            ws = client.ws
            transport = ws.transport
            if transport is not None and transport.get_write_buffer_size() > MAX_CLIENT_BUFFER_BYTES:
                self._overloaded(client)
                continue
            group = by_codec.get(client.codec)
            if group is None:
                by_codec[client.codec] = [ws]
            else:
                group.append(ws)
        for codec, group in by_codec.items():
            frame = codec.encode(type_, data)  # once per codec, whatever the number of recipients
            if frame is not None:
                send_frame(group, ws_frame(frame))

    def _overloaded(self, client: Client) -> None:
        if client.close_reason != "overloaded":
            client.close_reason = "overloaded"
            self.overloaded += 1
            log.warning("%s: conn %d is not reading; closing with %d", self.name, client.conn, CloseCode.OVERLOADED)
            self._spawn(client.ws.close(CloseCode.OVERLOADED, "not reading fast enough"))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a close in the background, holding a reference until it ends."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _audit(self, event_type: str, client: Client | None = None, *, outcome: str = "ok",
               resource: str | None = None, details: dict[str, Any] | None = None) -> None:
        self.audit.emit(AuditEvent(
            event_type, self.name, outcome,
            user_id=client.identity.user_id if client else None,
            session_id=client.session_id if client else None,
            resource_id=resource, details=details or {}))


def _frame_bytes(frame: str | bytes, limit: int) -> int:
    """The frame's size on the wire, encoding a text frame only when that can matter.

    websockets hands text frames over decoded, and `len` of a `str` counts
    characters: up to four times fewer than its UTF-8 bytes, which would let
    a frame of non-ASCII text through at four times `max_frame_bytes`.
    """
    size = len(frame)
    if isinstance(frame, bytes) or size > limit or 4 * size <= limit:
        return size
    return len(frame.encode())


def _select_subprotocol(connection: ServerConnection, subprotocols: list[str]) -> str | None:
    """Our two subprotocols if offered; JSON for clients that offer none or others."""
    for offered in subprotocols:
        if offered in SUBPROTOCOLS:
            return offered
    return None


def _token_from(query: str, authorization: str | None) -> str | None:
    values = parse_qs(query).get("token")
    if values:
        return values[0]
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def _remote(connection: ServerConnection) -> str | None:
    address = connection.remote_address
    return f"{address[0]}:{address[1]}" if address else None


def _json_response(connection: ServerConnection, status: int, body: dict[str, Any]) -> Response:
    response = connection.respond(status, json.dumps(body, separators=(",", ":")) + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


def _free_by_refcount(ws: ServerConnection) -> None:
    """Let a connection be freed by its reference count when it ends, not by
    a collection of the oldest generation, which walks every other one as
    well (50 ms with 1,500 connected).

    `websockets` leaves cycles through a connection's protocol; once the
    connection is lost, whatever ended it (a close, a tab closed or a network
    lost, a refused upgrade, an HTTP answer), they serve nothing and are
    undone (tests/integration/test_frontdoor_memory.py keeps it so):
    - `serve(select_subprotocol=...)` binds to the protocol a closure over
      the connection: dropped, the protocol's own method is back;
    - the protocol's parser, a generator of its own, is left suspended when
      the connection ends without a closing handshake: closed;
    - the parser's exception then keeps a traceback, which holds the
      parser's first frame, and so does the exception of a handshake that
      failed: their tracebacks (and their causes') are dropped, the
      exceptions stay (the cause of a later `ConnectionClosed`).
    """
    ws.connection_lost_waiter.add_done_callback(partial(_release_protocol, ws.protocol))


def _release_protocol(protocol: ServerProtocol, _lost: object) -> None:
    vars(protocol).pop("select_subprotocol", None)
    protocol.parser.close()
    for exc in (protocol.parser_exc, protocol.handshake_exc):
        for _ in range(8):  # a chain of causes is short; never loop on one that cycles
            if exc is None:
                break
            exc.__traceback__ = None
            exc = exc.__cause__ or exc.__context__
