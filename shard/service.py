"""The shard process: a link server around the capabilities of a shard.

Front doors connect to `start()`'s address (learned through Ray) and speak
`rounds.protocol.link`. Each command is put in order for its room
(`ordering.RoomGate`: a room whose document is loading holds its commands),
then goes to the capability that owns it: presence (`presence.Presence`),
locks (`locks.LockShell`), documents (`documents.DocShell`), with the
current time. What they return is carried out here (`dispatch`): replies to
the asking front door, deliveries once per front door (the front door fans
out), mirror writes, audit records. Two decisions are made here and
nowhere else: what a member is told of its room (`room_state`), and whether
an update may be applied (`admission`). Nothing here knows about Ray.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import Any

from rounds.audit.events import AuditEvent, AuditSink
from rounds.clock import now_ms
from rounds.config import Settings
from rounds.ids import ConnId, FrontDoorId, ResourceId, ShardId, UserId, frontdoor_of
from rounds.protocol.link import Hello, LinkMessage, RelayAck
from rounds.protocol.messages import (
    Awareness,
    Deliver,
    Disconnect,
    DocSync,
    DocUpdate,
    Join,
    Leave,
    LockAcquire,
    LockRelease,
    LockRenew,
    Reply,
    Sync,
)
from rounds.protocol.stream import LinkProtocol
from rounds.protocol.ws import ErrorCode, MessageType, error_data
from rounds.relay.shard_side import RelayShell
from rounds.relay.transport import RelayTransport
from rounds.routing import HashRing
from rounds.shard.admission import Limits, refuse_update
from rounds.shard.documents.history import DocHistory
from rounds.shard.documents.shell import MAX_UNWRITTEN, DocShell
from rounds.shard.documents.store import DocStore
from rounds.shard.events import MemberGone, MirrorJoin, MirrorLeave, RoomBroadcast, TellState
from rounds.shard.locks.events import AuditLock
from rounds.shard.locks.shell import LockShell
from rounds.shard.locks.store import LockStore
from rounds.shard.ordering import Admit, RoomGate
from rounds.shard.presence.machine import Presence
from rounds.shard.presence.mirror import PresenceMirror
from rounds.shard.presence.mirror_shell import MirrorWriter
from rounds.shard.room_state import resource_state
from rounds.shard.timer import DeadlineTimer

log = logging.getLogger(__name__)

REFRESH_RETRY_S = 2.0  # a member whose room could not be loaded after a restart is told it again this much later


class ShardService:
    def __init__(self, index: ShardId, mirror: PresenceMirror, audit: AuditSink, lock_store: LockStore,
                 doc_store: DocStore, settings: Settings, history: DocHistory | None = None,
                 relay: RelayTransport | None = None) -> None:
        """`relay`: the cross-node relay's transport, when front doors on other
        nodes are reached through it (`rounds.relay`); None: every front door
        over its direct link."""
        self.index = index
        # a shard that starts waits for every front door's Sync before it re-tells restored rooms
        self.presence = Presence(expected_frontdoors=settings.frontdoors)
        self.gate = RoomGate()
        ring = HashRing([ShardId(i) for i in range(settings.shards)])
        self.lock_shell = LockShell(self.name, lock_store, self.dispatch, settings.lock_ttl_ms,
                                    settings.lock_max_ttl_ms, owns=lambda room: ring.shard_for(room) == index)
        self.docs = DocShell(self.name, doc_store, self.dispatch, self._rooms_in_use, settings, history, audit)
        self.mirror = MirrorWriter(self.name, mirror)
        self.limits = Limits(settings.max_update_bytes, settings.max_document_bytes, MAX_UNWRITTEN)
        self.audit = audit
        self._presence_timer = DeadlineTimer(self._expire_presence)
        self._links: dict[FrontDoorId, LinkProtocol] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.address: tuple[str, int] | None = None
        self.epoch = os.urandom(6).hex()
        self.relay = (RelayShell(index, self.epoch, settings.node_id or "local", relay, settings.relay == "always",
                                 self._send_link) if relay is not None else None)
        self.refused_unwritten = 0

    @property
    def name(self) -> str:
        return f"shard-{self.index}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen for front doors; returns the (host, port) they should dial."""
        await self.mirror.start()
        await self.lock_shell.start()
        await self.docs.start()
        self._server = await asyncio.get_running_loop().create_server(self._new_link, host, port)
        if self.relay is not None:
            self.relay.start()
        sock_host, sock_port = self._server.sockets[0].getsockname()[:2]
        self.address = (host if host not in ("0.0.0.0", "::") else sock_host, sock_port)
        log.info("%s listening on %s:%d", self.name, *self.address)
        return self.address

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links.values()):
            link.close()
        self._presence_timer.cancel()
        await self.lock_shell.stop()
        await self.docs.stop()
        await self.mirror.stop()
        if self.relay is not None:
            await self.relay.stop()
        self.audit.flush()

    def stats(self) -> dict[str, Any]:
        rooms = self.presence.rooms()
        return {
            "shard": self.index,
            "address": f"{self.address[0]}:{self.address[1]}" if self.address else None,
            "frontdoors": sorted(self._links),
            "connections": self.presence.connections(),
            "rooms": len(rooms),
            "members": sum(rooms.values()),
            "recovering": self.presence.recovering,
            "locks": [lock.wire() for lock in self.lock_shell.locks.locks()],
            "documents": {**self.docs.stats(), "refusedUnwritten": self.refused_unwritten},
            "mirror": self.mirror.stats(),
            "relay": self.relay.stats() if self.relay is not None else None,
        }

    async def health(self) -> dict[str, Any]:
        return {"shard": self.index, "ok": True, "mirror": await self.mirror.mirror.health(),
                "documents": await self.docs.store.health(),
                "history": await self.docs.history.health() if self.docs.history is not None else None,
                "relay": self.relay.health() if self.relay is not None else None}

    # --- links ------------------------------------------------------------------

    def _new_link(self) -> LinkProtocol:
        def on_message(msg: LinkMessage) -> None:
            self._on_message(link, msg)

        def on_lost(exc: Exception | None) -> None:
            for fd, known in list(self._links.items()):
                if known is link:
                    del self._links[fd]
                    log.info("%s: link from frontdoor-%d closed (%s)", self.name, fd, exc or "eof")

        link = LinkProtocol(on_message, on_lost)
        return link

    def _on_message(self, link: LinkProtocol, msg: LinkMessage) -> None:
        match msg:
            case Hello(frontdoor=fd):
                old = self._links.get(fd)
                if old is not None and old is not link:
                    old.close()
                self._links[fd] = link
                if self.relay is not None:
                    self.relay.linked(fd, msg.epoch, msg.node)
                log.info("%s: frontdoor-%d linked (epoch %s, node %s)", self.name, fd, msg.epoch, msg.node)
            case RelayAck():
                if self.relay is not None:
                    self.relay.ack(msg)
            case _:
                self._handle(msg)

    # --- commands, in order per room ------------------------------------------------

    def _handle(self, msg: Any) -> None:
        """A command from a front door (or a `TellState` from presence): run
        it now, or after what its room holds while its document loads."""
        if isinstance(msg, Disconnect):
            self.gate.hold_everywhere(msg)  # after what its connection has waiting, too
        room, needs_document = _room_of(msg)
        if room is not None:
            admit = self.gate.admit(room, msg, needs_document, room in self.docs.documents)
            if admit is Admit.HELD:
                return
            if admit is Admit.LOAD:
                self._spawn(self._load(room))
                return
        self._run(msg)

    async def _load(self, room: ResourceId) -> None:
        loaded = await self.docs.load(room)
        for msg in self.gate.release(room):
            if loaded or not _room_of(msg)[1]:
                self._run(msg)
            else:
                self._unavailable(msg, room)

    def _unavailable(self, msg: Any, room: ResourceId) -> None:
        """A command that needs the room's document, which could not be loaded."""
        match msg:
            case Join() | DocUpdate():
                self._reply(msg.conn, msg.ref, MessageType.ERROR, error_data(
                    ErrorCode.UNAVAILABLE, "the document store is unavailable; retry", resourceId=room))
            case TellState():
                # The member stays; it is told UNAVAILABLE now (a y-websocket client is closed
                # by its front door and resyncs when it reconnects) and its room again later.
                self._reply(msg.conn, None, MessageType.ERROR, error_data(
                    ErrorCode.UNAVAILABLE, "the document store is unavailable; the room will be sent again",
                    resourceId=room))
                if msg.kind == "ws":
                    asyncio.get_running_loop().call_later(REFRESH_RETRY_S, self._handle, msg)
            case DocSync():
                pass  # a y-websocket client resyncs when it reconnects

    def _run(self, msg: Any) -> None:
        match msg:
            case Join() | Leave() | Disconnect() | Sync():
                self._presence(msg)
            case TellState():
                self._tell_state(msg)
            case DocUpdate():
                self._update(msg)
            case DocSync():
                if self.presence.member(msg.resource_id, msg.conn) is not None:
                    self.docs.sync(msg)
            case Awareness():
                member = self.presence.member(msg.resource_id, msg.conn)
                if member is not None:
                    self.docs.relay_awareness(msg, member.user_id)
            case LockAcquire() | LockRenew() | LockRelease():
                self.lock_shell.handle(msg)
            case _:
                log.error("%s: unexpected link message %s", self.name, type(msg).__name__)

    def _presence(self, cmd: Join | Leave | Disconnect | Sync) -> None:
        self.dispatch(self.presence.handle(cmd, now_ms()))
        self._presence_timer.arm(self.presence.next_deadline())

    def _expire_presence(self) -> None:
        self.dispatch(self.presence.expire(now_ms()))
        self._presence_timer.arm(self.presence.next_deadline())

    def _tell_state(self, msg: TellState) -> None:
        """The room's `RESOURCE_STATE` for one member (see `room_state`)."""
        room = msg.resource_id
        member = self.presence.member(room, msg.conn)
        if member is None:  # it left while the room was loading
            return
        if member.kind == "yjs" and not msg.refresh:  # it asks for what it lacks with its own sync step 1
            document = (b"", *self.docs.vector(room))
        else:
            document = self.docs.state(room, None if msg.refresh else msg.state_vector)
        data = resource_state(room, self.presence.users_wire(room), document, self.lock_shell.locks.room_state(room),
                              self.docs.awareness_of(room), member.kind, msg.refresh)
        self._reply(msg.conn, msg.ref, MessageType.RESOURCE_STATE, data)
        if not msg.refresh:
            self.audit.emit(AuditEvent(
                "RESOURCE_JOINED", self.name, user_id=member.user_id, session_id=member.session_id,
                resource_id=room, details={"mode": member.mode, "conn": msg.conn, "endpoint": member.kind,
                                           "revision": data["revision"]}))

    def _update(self, msg: DocUpdate) -> None:
        room = msg.resource_id
        member = self.presence.member(room, msg.conn)
        lock = self.lock_shell.locks.holder(msg.lock_resource_id) if msg.lock_resource_id is not None else None
        refusal = refuse_update(msg, member, lock.fencing_token if lock is not None else None,
                                self.docs.persistence.backlog(room), self.docs.documents.size(room), self.limits)
        if refusal is None:
            assert member is not None
            self.docs.apply(msg, member)
            return
        self._reply(msg.conn, msg.ref, refusal.type, error_data(refusal.code, refusal.message, resourceId=room,
                                                                **refusal.extra))
        if refusal.code == ErrorCode.UNAVAILABLE:
            self.refused_unwritten += 1
        if refusal.audit == "fence":  # issue 3: a paused holder cannot write
            assert msg.lock_resource_id is not None
            self.dispatch([AuditLock("fence", msg.lock_resource_id, None, None, "denied",
                                     {"fencingToken": msg.fencing_token}, msg.conn)])
        elif refusal.audit == "document" and member is not None:
            self.docs.audit_refused(msg, member, refusal.code)

    # --- events -----------------------------------------------------------------

    def dispatch(self, events: list[Any]) -> None:
        """Carry out the capabilities' events."""
        for event in events:
            match event:
                case Reply(conn=conn):
                    self._send(frontdoor_of(conn), event)
                case Deliver(conns=conns, type=type_, data=data):
                    self._deliver(conns, type_, data)
                case RoomBroadcast(room_id=room, except_conn=skip, type=type_, data=data):
                    conns = tuple(m.conn for m in self.presence.members(room) if m.conn != skip)
                    if conns:
                        self._deliver(conns, type_, data)
                case TellState():
                    self._handle(event)  # after its room's document is in memory
                case MirrorJoin() | MirrorLeave():
                    self.mirror.queue(event)
                case MemberGone(conn=conn, resource_id=room):
                    self.lock_shell.handle(event)  # the holder's locks in that room go (issue 3)
                    self.docs.member_gone(conn, room)  # and its cursors (issue 4)
                    self.audit.emit(AuditEvent("RESOURCE_LEFT", self.name, user_id=event.user_id,
                                               session_id=event.session_id, resource_id=room,
                                               details={"reason": event.reason, "conn": conn}))
                case AuditLock():
                    user = event.user_id if event.user_id is not None else self._user_of(event.conn)
                    self.audit.emit(AuditEvent(
                        event.event_type, self.name, event.outcome, user_id=user,
                        resource_id=event.resource_id,
                        details={"lockId": event.lock_id, "conn": event.conn, **event.details}))

    def _user_of(self, conn: ConnId | None) -> UserId | None:
        """Who a connection is, for an audit record that names only the
        connection (a refused renew, release or fenced update)."""
        if conn is None:
            return None
        for room in self.presence.rooms_of(conn):
            member = self.presence.member(room, conn)
            if member is not None:
                return member.user_id
        return None

    def _rooms_in_use(self) -> set[ResourceId]:
        """Rooms whose document must stay in memory: members, or commands waiting."""
        return set(self.presence.rooms()) | self.gate.rooms()

    def _reply(self, conn: ConnId, ref: Any, type_: str, data: dict[str, Any]) -> None:
        self._send(frontdoor_of(conn), Reply(conn, ref, type_, data))

    def _send(self, fd: FrontDoorId, msg: LinkMessage) -> None:
        if self.relay is not None and self.relay.wants(fd):
            self.relay.send(fd, msg)  # a front door on another node (rounds.relay.shard_side)
            return
        self._send_link(fd, msg)

    def _send_link(self, fd: FrontDoorId, msg: LinkMessage) -> bool:
        link = self._links.get(fd)
        if link is None or not link.send(msg):
            # The front door is gone or relinking; its Sync will repair state.
            log.debug("%s: no link to frontdoor-%d, dropped %s", self.name, fd, type(msg).__name__)
            return False
        return True

    def _deliver(self, conns: tuple[ConnId, ...], type_: str, data: dict[str, Any]) -> None:
        by_fd: dict[FrontDoorId, list[ConnId]] = {}
        for conn in conns:
            by_fd.setdefault(frontdoor_of(conn), []).append(conn)
        for fd, group in by_fd.items():
            self._send(fd, Deliver(tuple(group), type_, data))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=f"{self.name}-load")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _room_of(msg: Any) -> tuple[ResourceId | None, bool]:
    """The room a command is ordered in, and whether it needs the room's document."""
    match msg:
        case Join(restore=False) | DocUpdate() | DocSync() | TellState():
            return msg.resource_id, True
        case Leave() | Awareness():
            return msg.resource_id, False
        case LockAcquire():
            return msg.room_id, False
    return None, False
