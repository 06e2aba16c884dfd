"""Events that stay inside a shard: what its machines return besides the
replies and deliveries of `rounds.protocol.messages`.

Mirror writes for the presence backend, a member gone (locks and awareness
hook there), a member to be told its room's state, and a broadcast to a room
before the shell resolves it into connections. No I/O in this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rounds.ids import ConnId, ResourceId, SessionId, UserId
from rounds.protocol.messages import Deliver, Reply


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


@dataclass(frozen=True, slots=True)
class RoomBroadcast:
    """One event for every member of a room but `except_conn`; the shell turns
    it into a `Deliver` with presence's membership."""

    room_id: ResourceId
    except_conn: ConnId | None
    type: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TellState:
    """Tell a member the room's state: the answer to its join (with its `ref`
    and the state vector it joined with), or, with `refresh`, the whole room
    again after it may have missed deliveries (a front door's link reopened,
    the shard restarted). The shard service assembles the `RESOURCE_STATE`
    (a y-websocket member gets sync steps instead) once the room's document
    is in memory."""

    conn: ConnId
    ref: Any
    resource_id: ResourceId
    kind: str  # "ws" | "yjs"
    state_vector: bytes | None = None
    refresh: bool = False


Event = Reply | Deliver | MirrorJoin | MirrorLeave | MemberGone | TellState
