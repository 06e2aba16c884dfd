"""The shard's asyncio shell: a link server around the pure machines.

Front doors connect to `start()`'s address (learned through Ray) and speak
`rounds.protocol.link`. Each command goes to the presence machine with the current
time; its events go back out: replies to the asking front door, deliveries
once per front door (the front door fans out), mirror writes to the presence
backend in batches. Nothing here knows about Ray.

Bounds: mirror writes wait in a queue of at most `MIRROR_QUEUE_MAX` events;
past it the oldest are dropped with an error log (the mirror is a copy; the
shard's memory stays the truth) and `/health` shows the drop count.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from typing import Any

from rounds.audit.events import AuditEvent, AuditSink
from rounds.shard.presence.mirror import MirrorEvent, PresenceMirror
from rounds.clock import now_ms
from rounds.ids import ConnId, FrontDoorId, ShardId, UserId, frontdoor_of
from rounds.protocol.link import Hello, LinkMessage, RelayAck
from rounds.protocol.stream import LinkProtocol
from rounds.protocol.messages import Awareness, Deliver, Disconnect, DocSync, DocUpdate, Join, Leave, Reply, Sync
from rounds.shard.events import MemberGone, MirrorJoin, MirrorLeave
from rounds.shard.documents.store import DocStore
from rounds.shard.documents.history import DocHistory
from rounds.shard.locks.store import LockStore
from rounds.config import EDITOR, Settings
from rounds.routing import HashRing
from rounds.shard.documents.shell import DocShell
from rounds.shard.locks.events import AuditLock
from rounds.protocol.messages import LockAcquire, LockRelease, LockRenew
from rounds.shard.events import RoomBroadcast
from rounds.shard.locks.shell import LockShell
from rounds.shard.presence.machine import Presence
from rounds.relay.shard_side import RelayShell
from rounds.relay.transport import RelayTransport
from rounds.protocol.ws import ErrorCode, MessageType, error_data

log = logging.getLogger(__name__)

MIRROR_QUEUE_MAX = 100_000


class ShardService:
    def __init__(self, index: ShardId, mirror: PresenceMirror, audit: AuditSink, lock_store: LockStore,
                 doc_store: DocStore, settings: Settings, history: DocHistory | None = None,
                 relay: RelayTransport | None = None) -> None:
        """`relay`: the cross-node relay's transport, when front doors on other
        nodes are reached through it (`rounds.relay`); None: every front door
        over its direct link."""
        self.index = index
        self.presence = Presence()
        ring = HashRing(range(settings.shards))
        self.lock_shell = LockShell(f"shard-{index}", lock_store, self.dispatch,
                                    settings.lock_ttl_ms, settings.lock_max_ttl_ms,
                                    owns=lambda room: ring.shard_for(room) == index)
        self.docs = DocShell(f"shard-{index}", doc_store, self.dispatch, self._handle,
                             lambda room: bool(self.presence.members(room)), settings, history, audit)
        self.mirror = mirror
        self.audit = audit
        self._links: dict[FrontDoorId, LinkProtocol] = {}
        self._server: asyncio.Server | None = None
        self._mirror_queue: deque[MirrorEvent] = deque()
        self._mirror_wakeup = asyncio.Event()
        self._mirror_lock = asyncio.Lock()
        self._mirror_task: asyncio.Task[None] | None = None
        self.mirror_dropped = 0
        self.mirror_failures = 0
        self.address: tuple[str, int] | None = None
        self.epoch = os.urandom(6).hex()
        self.relay = (RelayShell(index, self.epoch, settings.node_id or "local", relay, settings.relay == "always",
                                 self._send_link) if relay is not None else None)

    @property
    def name(self) -> str:
        return f"shard-{self.index}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen for front doors; returns the (host, port) they should dial."""
        loop = asyncio.get_running_loop()
        try:
            cleared = await self.mirror.reset()
            if cleared:
                log.info("%s: cleared %d rooms mirrored before this start", self.name, cleared)
        except Exception:  # Redis down: serve anyway; stale mirror keys are named in the runbook
            log.exception("%s: could not reset the presence mirror", self.name)
        await self.lock_shell.start()
        await self.docs.start()
        self._server = await loop.create_server(self._new_link, host, port)
        if self.relay is not None:
            self.relay.start()
        self._mirror_task = asyncio.create_task(self._mirror_writer(), name=f"{self.name}-mirror")
        sock_host, sock_port = self._server.sockets[0].getsockname()[:2]
        self.address = (host if host not in ("0.0.0.0", "::") else sock_host, sock_port)
        log.info("%s listening on %s:%d", self.name, *self.address)
        return self.address

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links.values()):
            link.close()
        await self.lock_shell.stop()
        await self.docs.stop()
        if self._mirror_task is not None:
            await self._drain_mirror()
            self._mirror_task.cancel()
        await self.mirror.aclose()
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
            "locks": [lock.wire() for lock in self.lock_shell.locks.locks()],
            "documents": self.docs.stats(),
            "mirror": {"backend": self.mirror.name, "queued": len(self._mirror_queue),
                       "dropped": self.mirror_dropped, "failures": self.mirror_failures},
            "relay": self.relay.stats() if self.relay is not None else None,
        }

    async def health(self) -> dict[str, Any]:
        return {"shard": self.index, "ok": True, "mirror": await self.mirror.health(),
                "documents": await self.docs.store.health(),
                "history": await self.docs.history.health() if self.docs.history is not None else None,
                "relay": self.relay.health() if self.relay is not None else None}

    # --- links ------------------------------------------------------------------

    def _new_link(self) -> LinkProtocol:
        holder: dict[str, Any] = {}

        def on_message(msg: LinkMessage) -> None:
            self._on_message(holder["link"], msg)

        def on_lost(exc: Exception | None) -> None:
            link = holder["link"]
            for fd, known in list(self._links.items()):
                if known is link:
                    del self._links[fd]
                    log.info("%s: link from frontdoor-%d closed (%s)", self.name, fd, exc or "eof")

        holder["link"] = LinkProtocol(on_message, on_lost)
        return holder["link"]

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

    def _handle(self, msg: Any) -> None:
        """One command from a front door, in order per room: commands of a room
        whose document is being loaded wait for it (`DocShell.gate`)."""
        match msg:
            case Join(restore=False) | DocUpdate() | DocSync():
                if self.docs.gate(msg.resource_id, msg, needs_document=True):
                    return
            case Leave() | Awareness():
                if self.docs.gate(msg.resource_id, msg, needs_document=False):
                    return
            case LockAcquire():
                if self.docs.gate(msg.room_id, msg, needs_document=False):
                    return
            case Disconnect():
                self.docs.hold_for_gated(msg)
        match msg:
            case Join(restore=False):
                events = self.presence.handle(msg, now_ms())
                for event in events:
                    if isinstance(event, Reply) and event.type == MessageType.RESOURCE_STATE and event.conn == msg.conn:
                        self.docs.fill_state(event.data, msg.state_vector, msg.kind)
                        self.audit.emit(AuditEvent(
                            "RESOURCE_JOINED", self.name, user_id=msg.user_id, session_id=msg.session_id,
                            resource_id=msg.resource_id, details={"mode": msg.mode, "conn": msg.conn,
                                                                  "endpoint": msg.kind,
                                                                  "revision": event.data["revision"]}))
                self.dispatch(events)
            case Join() | Leave() | Disconnect() | Sync():
                self.dispatch(self.presence.handle(msg, now_ms()))
            case DocUpdate():
                self._update(msg)
            case DocSync():
                if self.presence.member(msg.resource_id, msg.conn) is not None:
                    self.docs.sync(msg)
            case Awareness():
                if self.presence.member(msg.resource_id, msg.conn) is not None:
                    self.docs.relay_awareness(msg)
            case LockAcquire() | LockRenew() | LockRelease():
                self.lock_shell.handle(msg)
            case _:
                log.error("%s: unexpected link message %s", self.name, type(msg).__name__)

    def _update(self, msg: DocUpdate) -> None:
        member = self.presence.member(msg.resource_id, msg.conn)
        if member is None:
            self._send(frontdoor_of(msg.conn), Reply(msg.conn, msg.ref, MessageType.ERROR, error_data(
                ErrorCode.NOT_JOINED, f"not joined to {msg.resource_id}", resourceId=msg.resource_id)))
            return
        if member.mode != EDITOR:  # the front door refuses these first; never trust one hop
            self._send(frontdoor_of(msg.conn), Reply(msg.conn, msg.ref, MessageType.PERMISSION_DENIED, error_data(
                ErrorCode.PERMISSION_DENIED, "viewers may not update the document", resourceId=msg.resource_id,
                mode=member.mode)))
            return
        stale = self.lock_shell.stale_fence(msg)  # issue 3: a paused holder cannot write
        if stale is not None:
            self._send(frontdoor_of(msg.conn), stale)
            return
        self.docs.update(msg, member)

    # --- events -----------------------------------------------------------------

    def dispatch(self, events: list[Any]) -> None:
        """Carry out the machines' events (presence and locks alike)."""
        for event in events:
            match event:
                case Reply(conn=conn, type=MessageType.RESOURCE_STATE, data=data):
                    data["locks"] = self.lock_shell.locks.room_state(data["resourceId"])
                    self._send(frontdoor_of(conn), event)
                case Reply(conn=conn):
                    self._send(frontdoor_of(conn), event)
                case Deliver(conns=conns, type=type_, data=data):
                    self._deliver(conns, type_, data)
                case RoomBroadcast(room_id=room, except_conn=skip, type=type_, data=data):
                    conns = tuple(m.conn for m in self.presence.members(room) if m.conn != skip)
                    if conns:
                        self._deliver(conns, type_, data)
                case MirrorJoin() | MirrorLeave():
                    self._queue_mirror(event)
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
            for member in self.presence.members(room):
                if member.conn == conn:
                    return member.user_id
        return None

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

    # --- mirror -----------------------------------------------------------------

    def _queue_mirror(self, event: MirrorEvent) -> None:
        if len(self._mirror_queue) >= MIRROR_QUEUE_MAX:
            self._mirror_queue.popleft()
            self.mirror_dropped += 1
            if self.mirror_dropped % 1000 == 1:
                log.error("%s: mirror queue full, %d events dropped so far", self.name, self.mirror_dropped)
        self._mirror_queue.append(event)
        self._mirror_wakeup.set()

    async def _mirror_writer(self) -> None:
        while True:
            await self._mirror_wakeup.wait()
            self._mirror_wakeup.clear()
            await self._drain_mirror()

    async def _drain_mirror(self) -> None:
        # One drain at a time: `stop` drains while the writer may be mid-batch,
        # and two batches in flight could reach Redis out of order.
        async with self._mirror_lock:
            await self._drain_mirror_locked()

    async def _drain_mirror_locked(self) -> None:
        while self._mirror_queue:
            batch = list(self._mirror_queue)
            self._mirror_queue.clear()
            try:
                await self.mirror.apply(batch)
            except Exception:
                self.mirror_failures += 1
                log.exception("%s: presence mirror write failed (%d events)", self.name, len(batch))
                await asyncio.sleep(0.5)
                # retry later: put them back in front of what came meanwhile,
                # then keep the bound by dropping the oldest
                self._mirror_queue.extendleft(reversed(batch))
                while len(self._mirror_queue) > MIRROR_QUEUE_MAX:
                    self._mirror_queue.popleft()
                    self.mirror_dropped += 1
                self._mirror_wakeup.set()
                return
