"""Field locks: one holder per resource, expiry, fencing tokens (story BE-001.3).

A pure state machine (sans-I/O, like h11): `handle(command, now_ms)` and
`expire(now_ms)` return events; nothing here reads a clock, makes an id or
talks to Redis. The machine asks for I/O with events and the shell feeds the
outcome back:

    LockAcquire ──▶ StoreGrant ──(shell: LockStore.grant)──▶ GrantStored
                                                             GrantRefused
                                                             GrantFailed
    GrantStored ──▶ LOCK_ACQUIRED to the asker, RESOURCE_LOCKED to the room

Rules (issue 3): one lock per resource, held by one connection; while its
grant is being stored it is *pending* and still denies everyone else. Renew
and release need the holding connection and its `lockId`. Fencing tokens come
only from the store and must strictly increase per resource; anything else is
a bug and raises `LockStateError` (h11's split: a client's mistake gets an
answer, ours an exception). A pending grant has no deadline of its own: the
shell answers every `StoreGrant` exactly once (a timeout is a `GrantFailed`).

A restarted shard adopts the live locks of its rooms that the store still
holds (`LockAdopt`): they are held as if granted here, so the holder can
renew and release them and they expire on time. Renewals are announced too:
the room hears `RESOURCE_LOCKED` again with the new `expiresAt`.

Presence stays out: the shell checks membership, fills `mode` from the
member, turns `RoomBroadcast` into `Deliver`, and passes presence's
`MemberGone` events on so a holder's locks go when it leaves the room.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from rounds.clock import iso_ms
from rounds.config import EDITOR
from rounds.ids import ConnId, ResourceId, UserId
from rounds.protocol.messages import LockAcquire, LockId, LockRelease, LockRenew, Reply
from rounds.protocol.ws import ErrorCode, MessageType
from rounds.shard.events import MemberGone, RoomBroadcast
from rounds.shard.locks.events import (
    AuditLock,
    GrantFailed,
    GrantRefused,
    GrantStored,
    LockAdopt,
    LockCommand,
    LockEvent,
    LockLost,
    StoreGrant,
    StoreRelease,
    StoreRenew,
    UnlockReason,
)

K = TypeVar("K")

DEFAULT_TTL_MS = 30_000  # seed BE-001.3: "Lock TTL of 30 seconds (configurable)"
MAX_TTL_MS = 300_000
MIN_TTL_MS = 1_000


class LockStateError(RuntimeError):
    """The shell or the store broke the machine's contract: a bug to log with
    its stack, never a client's mistake."""


@dataclass(frozen=True, slots=True)
class Lock:
    resource_id: ResourceId
    lock_id: LockId
    conn: ConnId
    user_id: UserId
    room_id: ResourceId  # who hears RESOURCE_LOCKED / RESOURCE_UNLOCKED
    ttl_ms: int  # what a renew extends to
    acquired_at_ms: int
    expires_at_ms: int
    ref: Any = None  # the acquire's ref until the store has answered
    fencing_token: int | None = None  # None while the grant is being stored
    gone: str | None = None  # the asker left the room while pending

    @property
    def held(self) -> bool:
        return self.fencing_token is not None

    def wire(self) -> dict[str, Any]:
        """How others see it: the data of `RESOURCE_LOCKED`, an entry of
        `RESOURCE_STATE.locks`."""
        return {"resourceId": self.resource_id, "lockedBy": self.user_id, "expiresAt": iso_ms(self.expires_at_ms)}


class Locks:
    """All locks of one shard. Drive it with `handle` and `expire`; call
    `expire` again at `next_deadline()`."""

    def __init__(self, id_factory: Callable[[], str], *, default_ttl_ms: int = DEFAULT_TTL_MS,
                 max_ttl_ms: int = MAX_TTL_MS, min_ttl_ms: int = MIN_TTL_MS,
                 remembered_tokens: int = 100_000) -> None:
        if not 0 < min_ttl_ms <= default_ttl_ms <= max_ttl_ms:
            raise ValueError(f"need 0 < min_ttl_ms <= default_ttl_ms <= max_ttl_ms, got "
                             f"{min_ttl_ms}, {default_ttl_ms}, {max_ttl_ms}")
        self._new_id = id_factory
        self.default_ttl_ms = default_ttl_ms
        self.max_ttl_ms = max_ttl_ms
        self.min_ttl_ms = min_ttl_ms
        self._locks: dict[ResourceId, Lock] = {}  # held and pending
        self._by_conn: dict[ConnId, set[ResourceId]] = {}
        self._by_room: dict[ResourceId, set[ResourceId]] = {}
        self._ids: set[LockId] = set()
        # (expires_at_ms, resource, lock id); entries of renewed or dropped
        # locks stay until they surface (checked against `_locks`).
        self._deadlines: list[tuple[int, ResourceId, LockId]] = []
        # Last token seen per resource, to catch a store going back. Bounded
        # (habit 9): forgetting an old resource only weakens that bug check;
        # the store's counter is what keeps tokens increasing.
        self._tokens: OrderedDict[ResourceId, int] = OrderedDict()
        self._remembered_tokens = remembered_tokens

    # --- queries --------------------------------------------------------------

    def get(self, resource: ResourceId) -> Lock | None:
        """The lock on `resource`, held or pending."""
        return self._locks.get(resource)

    def holder(self, resource: ResourceId) -> Lock | None:
        """The held lock on `resource` (its grant is stored), if any."""
        lock = self._locks.get(resource)
        return lock if lock is not None and lock.held else None

    def locks(self) -> list[Lock]:
        """Every held lock, by resource (for `rounds status`)."""
        return sorted((lock for lock in self._locks.values() if lock.held), key=lambda lock: lock.resource_id)

    def locks_in(self, room: ResourceId) -> list[Lock]:
        """The held locks announced to `room`, by resource."""
        found = (self._locks[r] for r in sorted(self._by_room.get(room, ())))
        return [lock for lock in found if lock.held]

    def room_state(self, room: ResourceId) -> list[dict[str, Any]]:
        """`RESOURCE_STATE.locks` for a member joining `room`."""
        return [lock.wire() for lock in self.locks_in(room)]

    def locks_of(self, conn: ConnId) -> list[Lock]:
        """Every lock of one connection, held or pending, by resource."""
        return [self._locks[r] for r in sorted(self._by_conn.get(conn, ()))]

    def last_token(self, resource: ResourceId) -> int | None:
        """The highest fencing token granted on `resource` in this machine's life."""
        return self._tokens.get(resource)

    def next_deadline(self) -> int | None:
        """When the next held lock expires (ms): call `expire` then. Pending
        grants have none: the store's answer settles them."""
        while self._deadlines and not self._due_entry_is_current(self._deadlines[0]):
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    # --- driving --------------------------------------------------------------

    def handle(self, command: LockCommand, now_ms: int) -> list[LockEvent]:
        """Apply one command at `now_ms`. Locks due by then expire first, so the
        outcome never depends on how late the shell's timer fires (seed: "they
        should be able to acquire the lock" once 30 seconds have passed)."""
        events = self.expire(now_ms)
        match command:
            case LockAcquire():
                events.extend(self._acquire(command, now_ms))
            case GrantStored():
                events.extend(self._stored(command, now_ms))
            case GrantRefused():
                events.extend(self._refused(command))
            case GrantFailed():
                events.extend(self._failed(command))
            case LockRenew():
                events.extend(self._renew(command, now_ms))
            case LockRelease():
                events.extend(self._release(command))
            case MemberGone():
                events.extend(self._member_gone(command))
            case LockLost():
                events.extend(self._lost(command))
            case LockAdopt():
                events.extend(self._adopt(command, now_ms))
            case _:
                raise TypeError(f"not a lock command: {command!r}")
        return events

    def expire(self, now_ms: int) -> list[LockEvent]:
        """Drop every held lock whose `expires_at_ms <= now_ms` (seed: "Lock
        expires automatically"): the room hears RESOURCE_UNLOCKED "expired"
        and the store is told to delete the keys, so the next acquire is not
        refused by a Redis key a few ms from its own expiry."""
        events: list[LockEvent] = []
        while self._deadlines and self._deadlines[0][0] <= now_ms:
            entry = heapq.heappop(self._deadlines)
            if self._due_entry_is_current(entry):
                lock = self._locks[entry[1]]
                events.extend(self._drop(lock, UnlockReason.EXPIRED, "expire",
                                         {"expiresAt": iso_ms(lock.expires_at_ms)},
                                         if_expires_at_ms=lock.expires_at_ms))
        return events

    # --- acquire and the store's answers ----------------------------------------

    def _acquire(self, cmd: LockAcquire, now_ms: int) -> list[LockEvent]:
        rid = cmd.resource_id
        if cmd.mode != EDITOR:  # issue 3: "Viewers cannot lock"
            return [
                Reply(cmd.conn, cmd.ref, MessageType.PERMISSION_DENIED, _error_data(
                    ErrorCode.PERMISSION_DENIED, f"{cmd.mode}s may not lock", rid)),
                AuditLock("deny", rid, cmd.user_id, None, "denied", {"reason": "mode", "mode": cmd.mode}, cmd.conn),
            ]
        current = self._locks.get(rid)
        if current is not None:  # seed: "Lock denied when resource already locked"
            return self._deny(cmd.conn, cmd.ref, cmd.user_id, rid, current.user_id, current.expires_at_ms,
                              {"pending": not current.held})
        ttl_ms = self._ttl(cmd.ttl_ms)
        lock_id = LockId(self._new_id())
        if lock_id in self._ids:
            raise LockStateError(f"id_factory returned {lock_id!r}, already in use")
        lock = Lock(rid, lock_id, cmd.conn, cmd.user_id, cmd.room_id or rid, ttl_ms, now_ms, now_ms + ttl_ms,
                    ref=cmd.ref)
        self._add(lock)
        return [StoreGrant(rid, lock_id, cmd.user_id, ttl_ms, now_ms, lock.expires_at_ms, cmd.conn, lock.room_id)]

    def _stored(self, cmd: GrantStored, now_ms: int) -> list[LockEvent]:
        lock = self._pending(cmd.resource_id, cmd.lock_id)
        last = self._tokens.get(cmd.resource_id)
        if last is not None and cmd.fencing_token <= last:
            raise LockStateError(f"fencing token for {cmd.resource_id} went from {last} to {cmd.fencing_token}")
        self._remember_token(cmd.resource_id, cmd.fencing_token)
        if lock.gone is not None:  # nobody announced it: just give it back
            self._remove(lock)
            return [StoreRelease(lock.resource_id, lock.lock_id, lock.user_id),
                    AuditLock("release", lock.resource_id, lock.user_id, lock.lock_id, "ok",
                              {"reason": lock.gone, "fencingToken": cmd.fencing_token, "beforeGrant": True},
                              lock.conn)]
        held = dataclasses.replace(lock, fencing_token=cmd.fencing_token, ref=None)
        self._locks[held.resource_id] = held
        self._push_deadline(held)
        expires_at = iso_ms(held.expires_at_ms)
        # seed: "I should receive LOCK_ACQUIRED", "other users should receive
        # RESOURCE_LOCKED", "an audit log should record the lock acquisition"
        events: list[LockEvent] = [
            Reply(held.conn, lock.ref, MessageType.LOCK_ACQUIRED, {
                "resourceId": held.resource_id, "lockId": held.lock_id,
                "fencingToken": cmd.fencing_token, "expiresAt": expires_at}),
            RoomBroadcast(held.room_id, held.conn, MessageType.RESOURCE_LOCKED, held.wire()),
            AuditLock("acquire", held.resource_id, held.user_id, held.lock_id, "ok", {
                "fencingToken": cmd.fencing_token, "ttlMs": held.ttl_ms, "expiresAt": expires_at,
                "roomId": held.room_id}, held.conn),
        ]
        if held.expires_at_ms <= now_ms:  # the store took longer than the TTL
            events.extend(self.expire(now_ms))
        return events

    def _refused(self, cmd: GrantRefused) -> list[LockEvent]:
        lock = self._pending(cmd.resource_id, cmd.lock_id)
        self._remove(lock)
        details = {"source": "store"}
        if lock.gone is not None:
            return [AuditLock("deny", lock.resource_id, lock.user_id, lock.lock_id, "denied",
                              {**details, "lockedBy": cmd.holder_user_id}, lock.conn)]
        return self._deny(lock.conn, lock.ref, lock.user_id, lock.resource_id, cmd.holder_user_id,
                          cmd.expires_at_ms, details)

    def _failed(self, cmd: GrantFailed) -> list[LockEvent]:
        lock = self._pending(cmd.resource_id, cmd.lock_id)
        self._remove(lock)
        events: list[LockEvent] = []
        if lock.gone is None:
            events.append(Reply(lock.conn, lock.ref, MessageType.ERROR, _error_data(
                ErrorCode.UNAVAILABLE, "the lock store did not answer; try again", lock.resource_id)))
        # the grant may have landed before the failure: take it back by lock id
        events.append(StoreRelease(lock.resource_id, lock.lock_id, lock.user_id))
        events.append(AuditLock("acquire", lock.resource_id, lock.user_id, lock.lock_id, "error",
                                {"reason": cmd.reason}, lock.conn))
        return events

    def _deny(self, conn: ConnId, ref: Any, user: UserId, rid: ResourceId, holder: UserId, expires_at_ms: int,
              details: dict[str, Any]) -> list[LockEvent]:
        expires_at = iso_ms(expires_at_ms)
        return [
            Reply(conn, ref, MessageType.LOCK_DENIED, {
                "resourceId": rid, "reason": "already_locked", "lockedBy": holder, "expiresAt": expires_at}),
            AuditLock("deny", rid, user, None, "denied",
                      {"reason": "already_locked", "lockedBy": holder, "expiresAt": expires_at, **details}, conn),
        ]

    # --- renew, release, leaving ---------------------------------------------------

    def _renew(self, cmd: LockRenew, now_ms: int) -> list[LockEvent]:
        lock, refusal = self._holders_lock(cmd.conn, cmd.ref, cmd.resource_id, cmd.lock_id, "renew")
        if lock is None:
            return refusal
        # seed: "the TTL should be extended to 30 seconds" (the TTL it was granted with)
        renewed = dataclasses.replace(lock, expires_at_ms=now_ms + lock.ttl_ms)
        self._locks[renewed.resource_id] = renewed
        self._push_deadline(renewed)
        expires_at = iso_ms(renewed.expires_at_ms)
        return [
            Reply(cmd.conn, cmd.ref, MessageType.LOCK_RENEWED, {
                "resourceId": renewed.resource_id, "lockId": renewed.lock_id, "expiresAt": expires_at}),
            # the others' views show when it now ends (RESOURCE_LOCKED again, same shape)
            RoomBroadcast(renewed.room_id, cmd.conn, MessageType.RESOURCE_LOCKED, renewed.wire()),
            StoreRenew(renewed.resource_id, renewed.lock_id, renewed.user_id, renewed.ttl_ms, renewed.expires_at_ms),
            AuditLock("renew", renewed.resource_id, renewed.user_id, renewed.lock_id, "ok",
                      {"expiresAt": expires_at, "ttlMs": renewed.ttl_ms}, cmd.conn),
        ]

    def _release(self, cmd: LockRelease) -> list[LockEvent]:
        lock, refusal = self._holders_lock(cmd.conn, cmd.ref, cmd.resource_id, cmd.lock_id, "release")
        if lock is None:
            return refusal
        # seed: "Explicit lock release": confirmation, broadcast to the others, audit
        reply = Reply(cmd.conn, cmd.ref, MessageType.LOCK_RELEASED, {"resourceId": lock.resource_id})
        return [reply, *self._drop(lock, UnlockReason.RELEASED, "release", {}, except_conn=cmd.conn)]

    def _holders_lock(self, conn: ConnId, ref: Any, rid: ResourceId, lock_id: LockId,
                      action: str) -> tuple[Lock | None, list[LockEvent]]:
        """The held lock if `conn` holds it under `lock_id`, else the refusal."""
        lock = self._locks.get(rid)
        if lock is not None and lock.held and lock.conn == conn and lock.lock_id == lock_id:
            return lock, []
        if lock is None:
            code, message = ErrorCode.UNKNOWN_LOCK, f"{rid} is not locked (expired or released)"
        else:
            code, message = ErrorCode.NOT_LOCK_HOLDER, f"this connection does not hold lock {lock_id} on {rid}"
        return None, [
            Reply(conn, ref, MessageType.ERROR, _error_data(code, message, rid)),
            AuditLock(action, rid, None, lock_id, "denied", {"code": code.value}, conn),
        ]

    def _member_gone(self, gone: MemberGone) -> list[LockEvent]:
        """The connection left the room, disconnected or timed out (issue 3):
        its locks announced to that room go."""
        # DESIGN.md lists released, expired, disconnected, left: a timeout is a disconnect
        reason = UnlockReason.LEFT if gone.reason == "left" else UnlockReason.DISCONNECTED
        events: list[LockEvent] = []
        for lock in self.locks_of(gone.conn):
            if lock.room_id != gone.resource_id or lock.gone is not None:
                continue
            if lock.held:
                events.extend(self._drop(lock, reason, "release", {"reason": gone.reason}))
            else:  # its grant is in flight: released when the store answers
                self._locks[lock.resource_id] = dataclasses.replace(lock, gone=gone.reason, ref=None)
                events.append(Reply(lock.conn, lock.ref, MessageType.ERROR, _error_data(
                    ErrorCode.NOT_JOINED, f"left {gone.resource_id} before the lock was granted", lock.resource_id)))
        return events

    def _lost(self, cmd: LockLost) -> list[LockEvent]:
        lock = self._locks.get(cmd.resource_id)
        if lock is None or not lock.held or lock.lock_id != cmd.lock_id:
            return []  # already gone here too (released or expired meanwhile)
        return self._drop(lock, UnlockReason.EXPIRED, "expire", {"cause": "store"})

    # --- adoption ----------------------------------------------------------------------

    def _adopt(self, cmd: LockAdopt, now_ms: int) -> list[LockEvent]:
        """Hold a live lock found in the store as if granted here. Nothing is
        announced: the room heard RESOURCE_LOCKED when it was granted, and a
        member joining now finds it in RESOURCE_STATE. One already due (it
        ended while the shard was away) has its keys deleted, as its expiry
        here would have.

        Meant for a machine that has just started. A lock already here, or one
        whose token is not above every token this machine has seen for the
        resource (it let that lock go and its store release has not landed yet,
        or the store listed it twice), is left alone."""
        rid = cmd.resource_id
        last = self._tokens.get(rid)
        if rid in self._locks or (last is not None and cmd.fencing_token <= last):
            return []
        if cmd.lock_id in self._ids:
            raise LockStateError(f"adopting {rid} lock {cmd.lock_id}, an id already in use")
        if cmd.ttl_ms <= 0:
            raise LockStateError(f"adopting {rid} lock {cmd.lock_id} with ttl_ms {cmd.ttl_ms}")
        self._remember_token(rid, cmd.fencing_token)
        details = {"fencingToken": cmd.fencing_token, "ttlMs": cmd.ttl_ms, "expiresAt": iso_ms(cmd.expires_at_ms),
                   "roomId": cmd.room_id}
        if cmd.expires_at_ms <= now_ms:
            return [StoreRelease(rid, cmd.lock_id, cmd.user_id, cmd.expires_at_ms),
                    AuditLock("expire", rid, cmd.user_id, cmd.lock_id, "ok",
                              {"unlockReason": UnlockReason.EXPIRED.value, "adopted": True, **details}, cmd.conn)]
        lock = Lock(rid, cmd.lock_id, cmd.conn, cmd.user_id, cmd.room_id, cmd.ttl_ms, cmd.acquired_at_ms,
                    cmd.expires_at_ms, fencing_token=cmd.fencing_token)
        self._add(lock)
        self._push_deadline(lock)
        return [AuditLock("adopt", rid, cmd.user_id, cmd.lock_id, "ok", details, cmd.conn)]

    # --- bookkeeping -----------------------------------------------------------------

    def _drop(self, lock: Lock, reason: UnlockReason, action: str, details: dict[str, Any],
              except_conn: ConnId | None = None, if_expires_at_ms: int | None = None) -> list[LockEvent]:
        """Remove a held lock: the room hears it, the store deletes it, audit records it."""
        self._remove(lock)
        return [
            RoomBroadcast(lock.room_id, except_conn, MessageType.RESOURCE_UNLOCKED,
                          {"resourceId": lock.resource_id, "reason": reason.value}),
            StoreRelease(lock.resource_id, lock.lock_id, lock.user_id, if_expires_at_ms),
            AuditLock(action, lock.resource_id, lock.user_id, lock.lock_id, "ok",
                      {"unlockReason": reason.value, "fencingToken": lock.fencing_token, **details}, lock.conn),
        ]

    def _pending(self, rid: ResourceId, lock_id: LockId) -> Lock:
        lock = self._locks.get(rid)
        if lock is None or lock.held or lock.lock_id != lock_id:
            raise LockStateError(f"a store answer for {rid} lock {lock_id}, which is not pending")
        return lock

    def _ttl(self, requested: int | None) -> int:
        if requested is None:
            return self.default_ttl_ms
        return min(max(requested, self.min_ttl_ms), self.max_ttl_ms)

    def _add(self, lock: Lock) -> None:
        self._locks[lock.resource_id] = lock
        self._ids.add(lock.lock_id)
        self._by_conn.setdefault(lock.conn, set()).add(lock.resource_id)
        self._by_room.setdefault(lock.room_id, set()).add(lock.resource_id)

    def _remove(self, lock: Lock) -> None:
        del self._locks[lock.resource_id]
        self._ids.discard(lock.lock_id)
        _discard(self._by_conn, lock.conn, lock.resource_id)
        _discard(self._by_room, lock.room_id, lock.resource_id)

    def _push_deadline(self, lock: Lock) -> None:
        heapq.heappush(self._deadlines, (lock.expires_at_ms, lock.resource_id, lock.lock_id))
        if len(self._deadlines) > 2 * len(self._locks) + 64:  # renewals leave stale entries
            self._deadlines = [(x.expires_at_ms, x.resource_id, x.lock_id) for x in self._locks.values() if x.held]
            heapq.heapify(self._deadlines)

    def _due_entry_is_current(self, entry: tuple[int, ResourceId, LockId]) -> bool:
        lock = self._locks.get(entry[1])
        return lock is not None and lock.held and lock.lock_id == entry[2] and lock.expires_at_ms == entry[0]

    def _remember_token(self, rid: ResourceId, token: int) -> None:
        self._tokens[rid] = token
        self._tokens.move_to_end(rid)
        if len(self._tokens) > self._remembered_tokens:
            self._tokens.popitem(last=False)


def _discard(index: dict[K, set[ResourceId]], key: K, resource: ResourceId) -> None:
    members = index[key]
    members.discard(resource)
    if not members:
        del index[key]


def _error_data(code: ErrorCode, message: str, resource: ResourceId) -> dict[str, Any]:
    return {"code": code.value, "message": message, "resourceId": resource}
