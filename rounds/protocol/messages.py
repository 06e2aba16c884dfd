"""The vocabulary that crosses the link between front doors and shards.

Frozen dataclasses of ids and plain values: what a front door asks of a
shard (commands: a member joins, leaves, disconnects, edits, syncs, moves
its cursor, takes a lock) and what a shard answers (a `Reply` to one
connection, a `Deliver` to several). `rounds.protocol.link` puts them on
the wire; the shard's machines and the front door's session consume and
produce them. Events that stay inside a shard (mirror writes, a member
gone, a room broadcast before it is resolved to connections) live in
`rounds.shard.events`. No I/O in this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NewType

from rounds.ids import ConnId, FrontDoorId, ResourceId, SessionId, UserId

LockId = NewType("LockId", str)

# Reply types that exist only on the link, for a y-websocket client alone:
# the shard's sync step 1 (its state vector: "send me what I lack") and
# sync step 2 (what the client lacks), which its front door frames as such.
SYNC_STEP1 = "SYNC_STEP1"
SYNC_STEP2 = "SYNC_STEP2"
# A reply type that exists only on the link, for the front door itself: the
# awareness client ids a connection now owns in a room (`clientIds`), so that
# the front door announces only those again when the shard comes back, not
# the others' states a y-websocket client echoes.
AWARENESS_CLAIMED = "AWARENESS_CLAIMED"

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


@dataclass(frozen=True, slots=True)
class LockAcquire:
    conn: ConnId
    ref: Any
    user_id: UserId
    resource_id: ResourceId
    mode: str  # the connection's mode in the room: viewers cannot lock (issue 3)
    room_id: ResourceId | None = None  # who hears about the lock; None: the resource itself
    ttl_ms: int | None = None  # None: the machine's default; capped to [min, max]


@dataclass(frozen=True, slots=True)
class LockRenew:
    conn: ConnId
    ref: Any
    resource_id: ResourceId
    lock_id: LockId


@dataclass(frozen=True, slots=True)
class LockRelease:
    conn: ConnId
    ref: Any
    resource_id: ResourceId
    lock_id: LockId


Command = Join | Leave | Disconnect | Sync
DocCommand = DocUpdate | DocSync | Awareness
LockRequest = LockAcquire | LockRenew | LockRelease

# --- events (shard -> front doors) ---------------------------------------------


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
