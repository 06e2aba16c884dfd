"""The front door: WebSocket clients in, shard links out; the socket side.

Per connection: authenticate before the upgrade (`process_request`, with
`handshake`), send `CONNECTED`, then read frames: each parsed request goes
to the connection's `Session` (`session`: rooms, admission, routing), and
what it returns is carried out here (sent to a shard, answered, audited,
closed). `HEARTBEAT` is answered here. Everything a shard
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
import itertools
import logging
import time
import uuid
import weakref
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from rounds.audit.events import AuditEvent, AuditSink
from rounds.auth import AuthError, Identity, TokenVerifier
from rounds.clock import now_ms
from rounds.config import Settings
from rounds.frontdoor.fanout import frame as ws_frame
from rounds.frontdoor.fanout import send_frame
from rounds.frontdoor.handshake import (
    frame_bytes,
    free_by_refcount,
    json_response,
    remote_of,
    select_subprotocol,
    token_from,
)
from rounds.frontdoor.links import Address, ShardLinks
from rounds.frontdoor.session import Action, Answer, Audit, Close, Rules, Session, ToShard
from rounds.frontdoor.sessions import SessionStore
from rounds.frontdoor.yjs import YJS, resource_from_path
from rounds.ids import ConnId, FrontDoorId, ResourceId, SessionId, ShardId, conn_id
from rounds.protocol.link import LinkMessage, RelayBatch, RelayReset
from rounds.protocol.messages import Deliver, Disconnect, Join, Reply
from rounds.protocol.ws import (
    SUBPROTOCOLS,
    AwarenessUpdate,
    CloseCode,
    Codec,
    ErrorCode,
    Heartbeat,
    JoinResource,
    LeaveResource,
    LockAcquireRequest,
    LockReleaseRequest,
    LockRenewRequest,
    MessageType,
    ProtocolError,
    ResourceUpdate,
    codec_for,
    error_data,
    parse_request,
)
from rounds.relay.frontdoor_side import FrontDoorRelay
from rounds.relay.transport import RelayTransport

log = logging.getLogger(__name__)

MAX_CLIENT_BUFFER_BYTES = 4 * 1024 * 1024


@dataclass(slots=True, eq=False)
class Client:
    """A connection's socket side; what it may do and is in is its `session`."""

    session: Session
    ws: ServerConnection
    codec: Codec  # JSON, msgpack, or YJS for a y-websocket client of one room
    last_seen: float  # monotonic seconds of the last frame from the client

    @property
    def conn(self) -> ConnId:
        return self.session.conn


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
        self.links = ShardLinks(index, self.epoch, self._on_link_message, self._restore, self._on_shard_down,
                                node=self.node)
        self.rules = Rules(settings.allowed_modes, settings.max_rooms_per_connection)
        self.relay = (FrontDoorRelay(index, self.epoch, relay, self._on_link_message, self.links.send,
                                     self._on_relay_reset) if relay is not None else None)
        self.clients: dict[ConnId, Client] = {}
        self._counter = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        # Upgrades accepted but not yet serving, with the identity their token
        # proved. They count against the cap too, so a burst of handshakes cannot
        # overshoot it. Weak: a failed handshake's connection just disappears.
        self._accepting: weakref.WeakKeyDictionary[ServerConnection, Identity] = weakref.WeakKeyDictionary()
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
            subprotocols=[Subprotocol(name) for name in SUBPROTOCOLS],
            select_subprotocol=select_subprotocol,
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
        rooms = {r for c in self.clients.values() for r in c.session.rooms}
        return {
            "frontdoor": self.index,
            "connections": len(self.clients),
            "users": len({c.session.user_id for c in self.clients.values()}),
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
        free_by_refcount(connection)
        url = urlsplit(request.path)
        if url.path == "/health":
            body = await self.health()
            return json_response(connection, 503 if body["status"] == "down" else 200, body)
        if url.path != "/ws" and resource_from_path(url.path) is None:
            return json_response(connection, 404, {"type": "NOT_FOUND", "data": {"path": url.path}})
        remote = remote_of(connection)
        if self.draining or len(self.clients) + len(self._accepting) >= self.settings.max_connections_per_frontdoor:
            self.rejected += 1
            reason = "draining" if self.draining else "max_connections"
            self._audit("CONNECTION_REJECTED", outcome="denied", details={"reason": reason, "remote": remote})
            response = json_response(connection, 503, {"type": "UNAVAILABLE", "data": {"reason": reason}})
            response.headers["Retry-After"] = "5"
            return response
        token = token_from(url.query, request.headers.get("Authorization"))
        try:
            identity = self.verifier.verify(token)
        except AuthError as exc:
            self.rejected += 1
            self._audit("CONNECTION_REJECTED", outcome="denied", details={"reason": exc.reason, "remote": remote})
            return json_response(connection, 401, {"type": MessageType.UNAUTHORIZED, "data": {"reason": exc.reason}})
        self._accepting[connection] = identity
        return None

    # --- a connection's life ------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        identity = self._accepting.pop(ws)
        yjs_room = resource_from_path(urlsplit(ws.request.path).path) if ws.request is not None else None
        session = Session(conn_id(self.index, next(self._counter)), identity, SessionId(uuid.uuid4().hex),
                          self.rules)
        client = Client(session, ws, YJS if yjs_room else codec_for(ws.subprotocol), time.monotonic())
        self.clients[client.conn] = client
        try:
            await self.sessions.open(session.user_id, session.session_id, {
                "frontdoor": self.index, "role": identity.role, "connectedAt": now_ms()}, now_ms())
        except Exception:
            log.exception("%s: session store failed on open; continuing without it", self.name)
        self._audit("USER_CONNECTED", client, details={"role": identity.role, "remote": remote_of(ws),
                                                        "subprotocol": client.codec.name})
        if yjs_room is not None:
            self._act(client, session.yjs_open(yjs_room, now_ms(), self._reachable))
        else:
            self._send(client, MessageType.CONNECTED, {
                "sessionId": session.session_id,
                "userId": identity.user_id,
                "username": identity.username,
                "role": identity.role,
                "heartbeatIntervalMs": self.settings.heartbeat_interval_ms,
                "idleTimeoutMs": self.settings.idle_timeout_ms,
            })
        on_frame = self._on_yjs_frame if yjs_room is not None else self._on_frame
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
            if frame_bytes(frame, limit) > limit:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"frame exceeds {limit} bytes")
            request = parse_request(client.codec, frame)
            session, reachable = client.session, self._reachable
            match request:
                case Heartbeat(ref=ref):
                    await self._heartbeat(client, ref)
                    return
                case JoinResource():
                    actions = session.join(request, now_ms(), reachable)
                case LeaveResource():
                    actions = session.leave(request, reachable)
                case ResourceUpdate():
                    actions = session.update(request, reachable, self._same_shard)
                case AwarenessUpdate():
                    actions = session.awareness_update(request, reachable)
                case LockAcquireRequest():
                    actions = session.lock_acquire(request, reachable)
                case LockRenewRequest() | LockReleaseRequest():
                    actions = session.lock_step(request, reachable)
            self._act(client, actions)
        except ProtocolError as exc:
            self._send(client, MessageType.ERROR, error_data(exc.code, exc.message), exc.ref)
        except Exception:  # our bug: log it, tell the client without internals, keep going
            log.exception("%s: failed on a frame from conn %d", self.name, client.conn)
            self._send(client, MessageType.ERROR, error_data(ErrorCode.INTERNAL, "internal error"))

    async def _heartbeat(self, client: Client, ref: Any) -> None:
        try:
            await self.sessions.touch(client.session.user_id, client.session.session_id, now_ms())
        except Exception:
            log.exception("%s: session store failed on touch", self.name)
        self._send(client, MessageType.HEARTBEAT_ACK, {"serverTime": now_ms()}, ref)

    async def _on_yjs_frame(self, client: Client, frame: str | bytes) -> None:
        try:
            if isinstance(frame, bytes) and len(frame) > self.settings.max_update_bytes + 64:
                raise ValueError(f"frame of {len(frame)} bytes exceeds the update limit")
            message = YJS.decode(frame)
        except ValueError as exc:  # YProtocolError included: y-websocket has no error message
            log.info("%s: dropped a bad y-websocket frame from conn %d (%s): %s",
                     self.name, client.conn, client.session.user_id, exc)
            return
        self._act(client, client.session.yjs_message(message))

    def _act(self, client: Client, actions: list[Action]) -> None:
        """Carry out what a session returned."""
        for action in actions:
            match action:
                case ToShard(room=room, message=message):
                    if not self._to_shard(room, message):
                        log.debug("%s: no link for %s; %s not sent", self.name, room, type(message).__name__)
                case Answer(type=type_, data=data, ref=ref):
                    if client.codec is YJS:
                        self._send_yjs(client, type_, data)
                    else:
                        self._send(client, type_, data, ref)
                case Audit(event_type=event_type, outcome=outcome, resource=resource, details=details):
                    if event_type == "PERMISSION_DENIED" and client.codec is YJS:
                        log.info("%s: dropped an update to %s from viewer %s (y-websocket)",
                                 self.name, resource, client.session.user_id)
                    self._audit(event_type, client, outcome=outcome, resource=resource, details=details)
                case Close(code=code, reason=reason, why=why):
                    log.info("%s: closing conn %d (%s): %d %s", self.name, client.conn, client.session.user_id,
                             code, reason)
                    client.session.close_reason = why
                    self._spawn(client.ws.close(code, reason))

    def _reachable(self, room: ResourceId) -> bool:
        shard = self.links.route(room)
        return shard is not None and self.links.up(shard)

    def _same_shard(self, a: ResourceId, b: ResourceId) -> bool:
        return self.links.route(a) == self.links.route(b)

    def _to_shard(self, rid: ResourceId, msg: LinkMessage) -> bool:
        shard = self.links.route(rid)
        return shard is not None and self.links.send(shard, msg)

    async def _cleanup(self, client: Client, ws: ServerConnection) -> None:
        self.clients.pop(client.conn, None)
        session = client.session
        reason = session.close_reason
        for shard in session.shards_of(self.links.route):
            if shard is not None:
                self.links.send(shard, Disconnect(client.conn, reason))
        try:
            await self.sessions.close(session.user_id, session.session_id)
        except Exception:
            log.exception("%s: session store failed on close", self.name)
        if reason == "timeout":
            self._audit("SESSION_TIMEOUT", client, details={"idleTimeoutMs": self.settings.idle_timeout_ms})
        self._audit("USER_DISCONNECTED", client, details={
            "reason": reason, "code": ws.close_code, "rooms": sorted(session.rooms)})

    def _on_shard_down(self, shard: ShardId) -> None:
        route = self.links.route
        for client in list(self.clients.values()):
            self._act(client, client.session.shard_down(lambda room: route(room) == shard))

    def _restore(self, shard: ShardId) -> tuple[list[Join], list[LinkMessage]]:
        """What the shard is told when its link (re)opens: every membership it
        owns here (its `Sync`), then each member's last awareness."""
        route = self.links.route
        joins: list[Join] = []
        shown: list[LinkMessage] = []
        for client in self.clients.values():
            mine, seen = client.session.restore(lambda room: route(room) == shard)
            joins += mine
            shown += seen
        return joins, shown

    async def _reap_idle(self) -> None:
        """Close clients silent for longer than the idle timeout (seed BE-001.1)."""
        idle_s = self.settings.idle_timeout_ms / 1000
        period = max(0.05, min(idle_s / 4, 5.0))
        while True:
            await asyncio.sleep(period)
            deadline = time.monotonic() - idle_s
            for client in [c for c in self.clients.values() if c.last_seen < deadline]:
                if client.session.close_reason != "timeout":
                    client.session.close_reason = "timeout"
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
        else:
            self._send(client, type_, data)

    def _on_link_message(self, msg: LinkMessage) -> None:
        match msg:
            case Deliver(conns=conns, type=type_, data=data):
                self._deliver(conns, type_, data)
            case Reply(conn=conn):
                client = self.clients.get(conn)
                if client is not None:
                    self._act(client, client.session.on_reply(msg))
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
            if shard in client.session.shards_of(route):
                client.session.close_reason = "relay reset"
                self._spawn(client.ws.close(CloseCode.SERVICE_RESTART, "relayed messages lost; reconnect"))

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
        if client.session.close_reason != "overloaded":
            client.session.close_reason = "overloaded"
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
            user_id=client.session.user_id if client else None,
            session_id=client.session.session_id if client else None,
            resource_id=resource, details=details or {}))
