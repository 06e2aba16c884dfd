"""What the lock machine accepts besides the clients' requests, and what it
returns (issue 3).

The clients' requests (`LockAcquire`, `LockRenew`, `LockRelease`) cross the
link and live in `rounds.protocol.messages`; `MemberGone` (from presence) is
in `rounds.shard.events`. Here: results the shell feeds back from the lock
store (`GrantStored`, `GrantRefused`, `GrantFailed`, `LockLost`), live locks
a restarted shard finds in the store (`LockAdopt`), and what the machine
asks for in return: store requests and audit records.

Nothing in this module does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from rounds.ids import ConnId, ResourceId, UserId
from rounds.protocol.messages import LockAcquire, LockId, LockRelease, LockRenew, Reply
from rounds.shard.events import MemberGone, RoomBroadcast

EXCLUSIVE = "exclusive"  # the seed's only `lockType`


class UnlockReason(enum.StrEnum):
    """`RESOURCE_UNLOCKED.reason` (DESIGN.md): released, expired, disconnected, left."""

    RELEASED = "released"
    EXPIRED = "expired"
    DISCONNECTED = "disconnected"
    LEFT = "left"


# --- store results (shell -> machine) -------------------------------------------
# Every `StoreGrant` gets exactly one of GrantStored / GrantRefused / GrantFailed.


@dataclass(frozen=True, slots=True)
class GrantStored:
    """The store set the lock; `fencing_token` is its counter for the resource."""

    resource_id: ResourceId
    lock_id: LockId
    fencing_token: int


@dataclass(frozen=True, slots=True)
class GrantRefused:
    """The store holds the lock for someone else (another shard's grant, or
    this shard's previous life): the seed's `SET NX` returned nil."""

    resource_id: ResourceId
    lock_id: LockId  # the refused request, so a late answer never hits a newer one
    holder_user_id: UserId
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class GrantFailed:
    """The store did not answer (error or timeout): the grant may or may not
    have landed, so the machine asks for a release of that lock id."""

    resource_id: ResourceId
    lock_id: LockId
    reason: str


@dataclass(frozen=True, slots=True)
class LockLost:
    """A renew found the store no longer holding this lock id (it expired there
    or was taken over): the machine drops it as expired."""

    resource_id: ResourceId
    lock_id: LockId


@dataclass(frozen=True, slots=True)
class LockAdopt:
    """A live lock found in the store when the shard starts: granted by this
    shard's previous life, for a room it owns. Its holder's connection may
    come back (front doors keep their clients across a shard restart), so
    the machine holds it as if it had granted it: the holder can renew and
    release it, and it expires on time with the room told "expired"."""

    resource_id: ResourceId
    lock_id: LockId
    conn: ConnId
    user_id: UserId
    room_id: ResourceId
    ttl_ms: int  # what a renew extends to
    acquired_at_ms: int
    expires_at_ms: int  # now + the store's remaining TTL
    fencing_token: int


LockCommand = (LockAcquire | LockRenew | LockRelease | GrantStored | GrantRefused | GrantFailed | LockLost
               | LockAdopt | MemberGone)

# --- events (machine -> shell) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreGrant:
    """Ask the store for the lock (seed: `SET lock:{id} {userId} PX ttl NX` and
    the metadata hash); answer with GrantStored, GrantRefused or GrantFailed.
    `conn` and `room_id` are stored with it so a restarted shard can adopt it."""

    resource_id: ResourceId
    lock_id: LockId
    user_id: UserId
    ttl_ms: int
    acquired_at_ms: int
    expires_at_ms: int
    conn: ConnId
    room_id: ResourceId
    lock_type: str = EXCLUSIVE


@dataclass(frozen=True, slots=True)
class StoreRenew:
    """Extend both keys' TTL if the store still has this lock id; if it does
    not, answer with LockLost."""

    resource_id: ResourceId
    lock_id: LockId
    user_id: UserId
    ttl_ms: int
    expires_at_ms: int  # the new `expiresAt` of the metadata hash


@dataclass(frozen=True, slots=True)
class StoreRelease:
    """Delete the lock's keys if the store still has this lock id (no answer).

    An expiry sets `expires_at_ms`, the expiry this machine last stored with
    the lock: the keys go only if the store still says so. If it does not,
    the lock was renewed somewhere else (a shard that adopted it wrongly, or
    two gateways on one Redis), and that holder's lock must survive."""

    resource_id: ResourceId
    lock_id: LockId
    user_id: UserId
    expires_at_ms: int | None = None


StoreRequest = StoreGrant | StoreRenew | StoreRelease

# action -> the audit event type when it went through
_AUDIT_DONE = {
    "acquire": "LOCK_ACQUIRED",
    "deny": "LOCK_DENIED",
    "renew": "LOCK_RENEWED",
    "release": "LOCK_RELEASED",
    "expire": "LOCK_EXPIRED",
    "adopt": "LOCK_ADOPTED",
}


@dataclass(frozen=True, slots=True)
class AuditLock:
    """An audit record for a lock step (seed BE-001.3: "an audit log should
    record the lock acquisition / renewal / release")."""

    action: str  # acquire | deny | renew | release | expire | adopt
    resource_id: ResourceId
    user_id: UserId | None
    lock_id: LockId | None
    outcome: str  # "ok" | "denied" | "error"
    details: dict[str, Any] = field(default_factory=dict)
    # The connection concerned: a denied renew or release names no user (the
    # asker is known by its connection), the shell resolves it.
    conn: ConnId | None = None

    @property
    def event_type(self) -> str:
        """The `AuditEvent.event_type` to record it under: `LOCK_RENEWED`, or
        `LOCK_RENEW_DENIED` / `LOCK_ACQUIRE_FAILED` when it did not go through."""
        verb = f"LOCK_{self.action.upper()}"
        if self.outcome == "ok" or self.action in ("deny", "expire"):
            return _AUDIT_DONE.get(self.action, verb)  # an action added later still gets a name
        return f"{verb}_{'DENIED' if self.outcome == 'denied' else 'FAILED'}"


LockEvent = Reply | RoomBroadcast | StoreGrant | StoreRenew | StoreRelease | AuditLock
