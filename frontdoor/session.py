"""One connection's session at the front door, as a machine without sockets.

What a connection is in (rooms, joins in flight), where its locks live, what
it may do (the front door's admission rules), what it last showed of itself
(awareness, announced again when a shard comes back), and when a
y-websocket client must be closed because its room cannot be kept in step
with it. The server (`frontdoor.server`) parses frames, feeds them here with
the time and which shards are reachable, and carries out what comes back:

- `ToShard(room, message)`: send to the shard that owns `room`;
- `Answer(type, data, ref)`: a frame to this client;
- `Audit(event_type, outcome, resource, details)`: a record for the trail;
- `Close(code, reason, why)`: close this connection.

A client's mistake is an `Answer` with an `ERROR` (never an exception).
Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from rounds.auth import Identity
from rounds.config import EDITOR
from rounds.ids import ConnId, ResourceId, SessionId, UserId
from rounds.protocol.messages import (
    AWARENESS_CLAIMED,
    Awareness,
    DocSync,
    DocUpdate,
    Join,
    Leave,
    LockAcquire,
    LockId,
    LockRelease,
    LockRenew,
    Reply,
)
from rounds.protocol.ws import (
    AwarenessUpdate,
    CloseCode,
    ErrorCode,
    JoinResource,
    LeaveResource,
    LockAcquireRequest,
    LockReleaseRequest,
    LockRenewRequest,
    MessageType,
    ResourceUpdate,
    error_data,
)
from rounds.protocol.yjs import (
    MAX_AWARENESS_CLIENTS_PER_CONN,
    MAX_AWARENESS_STATE_BYTES,
    AwarenessEntry,
    AwarenessMessage,
    QueryAwareness,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    YMessage,
    YProtocolError,
    decode_awareness,
    encode_awareness,
)

MAX_LOCK_ROOMS = 256  # lock routes a session remembers (a routing hint for renew and release)

WS = "ws"
YJS = "yjs"


@dataclass(frozen=True, slots=True)
class ToShard:
    room: ResourceId  # the shard that owns this room gets it
    message: Any


@dataclass(frozen=True, slots=True)
class Answer:
    type: str
    data: dict[str, Any]
    ref: Any = None


@dataclass(frozen=True, slots=True)
class Audit:
    event_type: str
    outcome: str
    resource: ResourceId | None
    details: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str  # sent to the client
    why: str  # recorded as the connection's close reason


Action = ToShard | Answer | Audit | Close

Reachable = Callable[[ResourceId], bool]  # whether the shard owning a room can be sent to now


@dataclass(frozen=True, slots=True)
class Rules:
    """The settings a session's admission reads."""

    allowed_modes: Callable[[str], tuple[str, ...]]  # role -> the modes it may join in
    max_rooms: int


def _error(code: ErrorCode, message: str, ref: Any = None, **extra: Any) -> Answer:
    return Answer(MessageType.ERROR, error_data(code, message, **extra), ref)


def _unreachable(ref: Any, what: str = "resource") -> Answer:
    return _error(ErrorCode.UNAVAILABLE, f"the shard for this {what} is unavailable; retry", ref)


@dataclass(slots=True, eq=False)
class Session:
    conn: ConnId
    identity: Identity
    session_id: SessionId
    rules: Rules
    kind: str = WS  # "ws", or "yjs": a y-websocket client of one room
    yjs_room: ResourceId | None = None
    rooms: dict[ResourceId, Join] = field(default_factory=dict)
    joining: set[ResourceId] = field(default_factory=set)  # joins sent, their RESOURCE_STATE not yet back
    lock_rooms: dict[ResourceId, ResourceId] = field(default_factory=dict)  # lock resource -> its room
    # the latest awareness entry this connection sent per room and client id, and the ids the
    # room's shard says it owns: those are announced again when the shard comes back
    awareness: dict[ResourceId, dict[int, AwarenessEntry]] = field(default_factory=dict)
    owned: dict[ResourceId, set[int]] = field(default_factory=dict)
    close_reason: str = "disconnected"

    @property
    def user_id(self) -> UserId:
        return UserId(self.identity.user_id)

    # --- /ws requests -------------------------------------------------------------------

    def join(self, req: JoinResource, now_ms: int, reachable: Reachable) -> list[Action]:
        rid = req.resource_id
        role = self.identity.role
        if req.mode not in self.rules.allowed_modes(role):
            return [Audit("PERMISSION_DENIED", "denied", rid, {"action": "join", "mode": req.mode, "role": role}),
                    Answer(MessageType.PERMISSION_DENIED, error_data(
                        ErrorCode.PERMISSION_DENIED, f"role {role!r} may not join as {req.mode}",
                        resourceId=rid, mode=req.mode), req.ref)]
        if rid in self.rooms:
            return [_error(ErrorCode.ALREADY_JOINED, f"already joined {rid}", req.ref)]
        if len(self.rooms) >= self.rules.max_rooms:
            return [_error(ErrorCode.TOO_MANY_ROOMS, f"at most {self.rules.max_rooms} rooms per connection", req.ref)]
        if not reachable(rid):
            return [_unreachable(req.ref)]
        join = Join(self.conn, req.ref, self.user_id, self.identity.username, self.session_id, rid,
                    req.resource_type, req.mode, joined_at_ms=now_ms, state_vector=req.state_vector, kind=self.kind)
        self.rooms[rid] = join
        self.joining.add(rid)
        return [ToShard(rid, join)]

    def leave(self, req: LeaveResource, reachable: Reachable) -> list[Action]:
        rid = req.resource_id
        if rid not in self.rooms:
            return [_error(ErrorCode.NOT_JOINED, f"not joined to {rid}", req.ref)]
        del self.rooms[rid]
        self.joining.discard(rid)
        self.awareness.pop(rid, None)
        self.owned.pop(rid, None)
        if not reachable(rid):
            # The shard is away: its Sync on relink drops this membership.
            return [Answer(MessageType.RESOURCE_LEFT, {"resourceId": rid}, req.ref)]
        return [ToShard(rid, Leave(self.conn, req.ref, rid))]

    def update(self, req: ResourceUpdate, reachable: Reachable, same_shard: Callable[[ResourceId, ResourceId], bool],
               ) -> list[Action]:
        rid = req.resource_id
        join = self.rooms.get(rid)
        if join is None:
            return [_error(ErrorCode.NOT_JOINED, f"not joined to {rid}", req.ref)]
        if join.mode != EDITOR:  # seed BE-001.2 "Join resource as viewer": updates are refused
            return [Audit("PERMISSION_DENIED", "denied", rid, {"action": "update", "mode": join.mode}),
                    Answer(MessageType.PERMISSION_DENIED, error_data(
                        ErrorCode.PERMISSION_DENIED, "viewers may not update the document",
                        resourceId=rid, mode=join.mode), req.ref)]
        if req.lock_resource_id is not None:
            # Fenced (issue 3): the document's shard checks the token, so the
            # lock must live there too (its room is this document's family).
            room = self.lock_rooms.get(req.lock_resource_id, rid)
            if not same_shard(room, rid):
                return [_error(ErrorCode.BAD_REQUEST, "a fenced update must name a lock taken in this "
                               "document's room (or its family)", req.ref)]
        if not reachable(rid):
            return [_unreachable(req.ref)]
        return [ToShard(rid, DocUpdate(self.conn, req.ref, rid, req.update, True, req.lock_resource_id,
                                       req.fencing_token))]

    def awareness_update(self, req: AwarenessUpdate, reachable: Reachable) -> list[Action]:
        rid = req.resource_id
        if rid not in self.rooms:
            return [_error(ErrorCode.NOT_JOINED, f"not joined to {rid}", req.ref)]
        if not reachable(rid):
            return [_unreachable(req.ref)]
        self._remember_awareness(rid, req.update)
        return [ToShard(rid, Awareness(self.conn, req.ref, rid, req.update))]

    def lock_acquire(self, req: LockAcquireRequest, reachable: Reachable) -> list[Action]:
        # A lock lives on the shard of its room, with the room's members: its
        # broadcasts and its release when the holder leaves stay local there.
        join = self.rooms.get(req.room_id)
        if join is None:
            return [_error(ErrorCode.NOT_JOINED, f"join {req.room_id} before locking in it", req.ref)]
        if not reachable(req.room_id):
            return [_unreachable(req.ref, "room")]
        self.lock_rooms.pop(req.resource_id, None)
        self.lock_rooms[req.resource_id] = req.room_id
        if len(self.lock_rooms) > MAX_LOCK_ROOMS:  # only a routing hint: forget the oldest
            del self.lock_rooms[next(iter(self.lock_rooms))]
        return [ToShard(req.room_id, LockAcquire(self.conn, req.ref, self.user_id, req.resource_id, join.mode,
                                                 req.room_id, req.ttl_ms))]

    def lock_step(self, req: LockRenewRequest | LockReleaseRequest, reachable: Reachable) -> list[Action]:
        room = self.lock_rooms.get(req.resource_id, req.resource_id)
        if not reachable(room):
            return [_unreachable(req.ref, "lock")]
        command = LockRenew if isinstance(req, LockRenewRequest) else LockRelease
        return [ToShard(room, command(self.conn, req.ref, req.resource_id, LockId(req.lock_id)))]

    # --- y-websocket --------------------------------------------------------------------

    def yjs_open(self, room: ResourceId, now_ms: int, reachable: Reachable) -> list[Action]:
        """A y-websocket client is a member of its one room from the start: as
        an editor if its role may edit, else as a viewer."""
        allowed = self.rules.allowed_modes(self.identity.role)
        mode = EDITOR if EDITOR in allowed else allowed[0]
        self.kind, self.yjs_room = YJS, room
        if not reachable(room):
            return [Close(CloseCode.TRY_AGAIN_LATER, "shard unavailable; retry", "unavailable")]
        join = Join(self.conn, None, self.user_id, self.identity.username, self.session_id, room, "document", mode,
                    joined_at_ms=now_ms, kind=YJS)
        self.rooms[room] = join
        self.joining.add(room)
        return [ToShard(room, join)]

    def yjs_message(self, message: YMessage) -> list[Action]:
        """One decoded y-websocket message of this client. While its room's
        shard is away the message cannot go: that is fine, the shard tells the
        client its room again when it comes back (`TellState.refresh`) and the
        client answers with everything the shard lacks."""
        room = self.yjs_room
        assert room is not None
        join = self.rooms.get(room)
        if join is None:
            return []
        match message:
            case SyncStep1(state_vector=vector):
                return [ToShard(room, DocSync(self.conn, room, vector))]
            case SyncStep2(update=update) | SyncUpdate(update=update):
                if join.mode != EDITOR:
                    # The y-websocket way: dropped (the client keeps its local edit); the trail says who tried.
                    return [Audit("PERMISSION_DENIED", "denied", room,
                                  {"action": "update", "mode": join.mode, "endpoint": YJS})]
                return [ToShard(room, DocUpdate(self.conn, None, room, update, ack=False))]
            case AwarenessMessage(update=update):
                self._remember_awareness(room, update)
                return [ToShard(room, Awareness(self.conn, None, room, update))]
            case QueryAwareness():
                return [ToShard(room, Awareness(self.conn, None, room, b""))]
        return []  # auth messages: the token was checked before the upgrade

    def _remember_awareness(self, room: ResourceId, update: bytes) -> None:
        """Keep the newest entry per client id (bounded as the shard bounds
        them); a malformed update is the shard's to refuse."""
        try:
            entries = decode_awareness(update)
        except YProtocolError:
            return
        kept = self.awareness.setdefault(room, {})
        for entry in entries:
            if len(entry.state) > MAX_AWARENESS_STATE_BYTES:
                continue
            known = kept.get(entry.client_id)
            if known is None or entry.clock >= known.clock:
                kept.pop(entry.client_id, None)
                kept[entry.client_id] = entry
        while len(kept) > 2 * MAX_AWARENESS_CLIENTS_PER_CONN:  # echoes of others' states: the oldest go
            del kept[next(iter(kept))]

    # --- from the shards ------------------------------------------------------------------

    def on_reply(self, reply: Reply) -> list[Action]:
        """A shard's answer for this connection: joins in flight settle; to a
        y-websocket client, a refusal that leaves it out of step closes it."""
        rid = reply.data.get("resourceId")
        if reply.type == AWARENESS_CLAIMED:
            self.owned.setdefault(ResourceId(reply.data["resourceId"]), set()).update(reply.data["clientIds"])
            return []
        if rid in self.joining:
            self.joining.discard(rid)
            if reply.type == MessageType.ERROR:  # the join failed (its document could not load)
                self.rooms.pop(rid, None)
        if self.kind == YJS and reply.type == MessageType.ERROR:
            code = reply.data.get("code")
            if code == ErrorCode.UNAVAILABLE:
                return [Close(CloseCode.TRY_AGAIN_LATER, "document unavailable; retry", "unavailable")]
            if code == ErrorCode.TOO_LARGE:
                return [Close(CloseCode.DOCUMENT_TOO_LARGE, "the document refused an edit as too large",
                              "too large")]
            return []  # e.g. BAD_UPDATE: bytes the client's own document never held
        return [Answer(reply.type, reply.data, reply.ref)]

    def shard_down(self, on_that_shard: Callable[[ResourceId], bool]) -> list[Action]:
        """Joins sent to a shard whose link dropped may never be answered: fail
        them now, so the client retries, and leave them out of the next Sync."""
        actions: list[Action] = []
        for rid in [r for r in self.joining if on_that_shard(r)]:
            self.joining.discard(rid)
            join = self.rooms.pop(rid)
            if self.kind == YJS:
                actions.append(Close(CloseCode.TRY_AGAIN_LATER, "shard unavailable; retry", "unavailable"))
            else:
                actions.append(_error(ErrorCode.UNAVAILABLE, "the shard for this resource went away; retry the join",
                                      join.ref, resourceId=rid))
        return actions

    def restore(self, on_that_shard: Callable[[ResourceId], bool]) -> tuple[list[Join], list[Awareness]]:
        """What a shard is told of this connection when its link (re)opens:
        the memberships it owns (for its `Sync`), then this connection's
        last awareness in each, so the room's cursors come back with it."""
        joins = [replace(j, ref=None, restore=True) for j in self.rooms.values() if on_that_shard(j.resource_id)]
        shown = []
        for join in joins:
            mine = [entry for client_id, entry in self.awareness.get(join.resource_id, {}).items()
                    if client_id in self.owned.get(join.resource_id, ())]
            if mine:
                shown.append(Awareness(self.conn, None, join.resource_id, encode_awareness(mine)))
        return joins, shown

    def shards_of(self, route: Callable[[ResourceId], Any]) -> set[Any]:
        """The shards this connection's rooms live on (to tell them it is gone)."""
        return {route(rid) for rid in self.rooms}
