"""Commands a shard accepts and events its machines return.

These frozen dataclasses are the vocabulary between the pure machines
(`presence`, later locks and documents) and their shells (`service`, the
front-door link). They carry ids and plain values only; encoding to the wire
happens in `rounds.link` (shard <-> front door) and `rounds.wire` (client).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rounds.ids import ConnId, FrontDoorId, ResourceId, SessionId, UserId

# --- commands (front door -> shard) -----------------------------------------


@dataclass(frozen=True, slots=True)
class Join:
    conn: ConnId
    ref: Any
    user_id: UserId
    username: str
    session_id: SessionId
    resource_id: ResourceId
    resource_type: str
    mode: str
    # A front door re-announcing its members after a shard restart: the room is
    # rebuilt silently (no reply, no broadcast), see DESIGN.md "Data plane".
    restore: bool = False
    # When the front door first forwarded this join (ms since the epoch): a
    # restored member keeps its original `joinedAt`. Ignored unless `restore`.
    joined_at_ms: int | None = None
    # Documents (issue 4): what the joiner has, so `RESOURCE_STATE.state` is
    # only what it lacks; and which endpoint it came in by ("ws" or "yjs": a
    # y-websocket client gets the document through its own sync steps).
    state_vector: bytes | None = None
    kind: str = "ws"


@dataclass(frozen=True, slots=True)
class Leave:
    conn: ConnId
    ref: Any
    resource_id: ResourceId


@dataclass(frozen=True, slots=True)
class Disconnect:
    conn: ConnId
    reason: str  # "disconnected" | "timeout"


@dataclass(frozen=True, slots=True)
class Sync:
    """A front door's full membership on this shard, sent when its link opens.

    The shard drops that front door's memberships not listed (they ended
    while the link was down, or the front door restarted: then `joins` is
    empty) and silently restores those it lacks (the shard restarted).
    """

    frontdoor: FrontDoorId
    joins: tuple[Join, ...]


@dataclass(frozen=True, slots=True)
class DocUpdate:
    """A Y.js update from a room member (`/ws` RESOURCE_UPDATE or a
    y-websocket sync step 2 / update). `ack`: answer UPDATE_ACK once durable;
    a fenced update names its lock and token (issue 3)."""

    conn: ConnId
    ref: Any
    resource_id: ResourceId
    update: bytes
    ack: bool = True
    lock_resource_id: ResourceId | None = None
    fencing_token: int | None = None


@dataclass(frozen=True, slots=True)
class DocSync:
    """A y-websocket client's sync step 1: answer with what it lacks."""

    conn: ConnId
    resource_id: ResourceId
    state_vector: bytes


@dataclass(frozen=True, slots=True)
class Awareness:
    """A y-protocols awareness update from a room member, to relay; with an
    empty update, a request for everyone's current states."""

    conn: ConnId
    ref: Any
    resource_id: ResourceId
    update: bytes


Command = Join | Leave | Disconnect | Sync

# --- events (shard -> front doors and mirrors) ----------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """A direct answer to one connection's request (`ref` echoed)."""

    conn: ConnId
    ref: Any
    type: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Deliver:
    """One event for several connections: encoded once per front door and codec."""

    conns: tuple[ConnId, ...]
    type: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class MirrorJoin:
    """The user is now in the room (or its mode changed): mirror to Redis."""

    resource_id: ResourceId
    user_id: UserId
    mode: str
    joined_at_ms: int


@dataclass(frozen=True, slots=True)
class MirrorLeave:
    """The user's last connection left the room."""

    resource_id: ResourceId
    user_id: UserId
    room_empty: bool = False  # nobody is left: the mirror may forget the room


@dataclass(frozen=True, slots=True)
class MemberGone:
    """A connection left a room (leave, disconnect, timeout): locks hook here."""

    conn: ConnId
    resource_id: ResourceId
    reason: str  # "left" | "disconnected" | "timeout"
    user_id: UserId | None = None  # who it was, for the audit trail
    session_id: SessionId | None = None


Event = Reply | Deliver | MirrorJoin | MirrorLeave | MemberGone
