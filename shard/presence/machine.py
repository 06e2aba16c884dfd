"""Rooms and presence: who is in which resource, in which mode, since when.

A pure state machine (no I/O, no clock): `handle(command, now_ms)` returns the
events to send. Implements seed story BE-001.2: join/leave with
`RESOURCE_STATE`, `USER_JOINED`, `USER_LEFT`, duplicate-join and
leave-without-join errors, several rooms per connection, several connections
(tabs) per user, and `resource:all_users` for hierarchical ids.

Presence is per user, membership per connection: a user with two tabs in one
room is listed once (mode `editor` if any tab edits, `joinedAt` of the first
tab); `USER_JOINED` goes out when the user's first tab joins and `USER_LEFT`
when the last one leaves. Mode permission (role -> modes) is checked by the
front door before a join reaches the shard.

A join is answered with `TellState`: the shard service assembles the room's
`RESOURCE_STATE` (users, document, locks, awareness) in one place. The same
event, with `refresh`, re-tells a member what it may have missed:

- A front door's `Sync` (its link reopened, or the shard restarted) lists
  its members; each is restored if missing and refreshed, since deliveries
  to it may have been lost while the link was down. A user new to a room
  is announced to the members that are not being refreshed by that Sync.
- A shard that starts is *recovering* until every front door it expects has
  synced, or `restore_grace_ms` after the first did: meanwhile restores are
  silent and refreshes wait, so no member is told a room that lacks the
  members of a front door about to sync (no flicker of users leaving and
  coming back). Joins meanwhile are answered at once and refreshed again
  when recovery ends. The shell arms a timer for `next_deadline()` and
  calls `expire(now)` (the lock machine's pattern).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rounds.clock import iso_ms
from rounds.config import EDITOR
from rounds.ids import ConnId, FrontDoorId, ResourceId, SessionId, UserId, frontdoor_of, parent_of
from rounds.protocol.messages import Command, Deliver, Disconnect, Join, Leave, Reply, Sync
from rounds.protocol.ws import ErrorCode, MessageType, error_data
from rounds.shard.events import Event, MemberGone, MirrorJoin, MirrorLeave, TellState

RESTORE_GRACE_MS = 1_000  # a starting shard waits this long at most for the front doors' Syncs


@dataclass(frozen=True, slots=True)
class Member:
    conn: ConnId
    user_id: UserId
    username: str
    session_id: SessionId
    mode: str
    # When the user arrived in the room, not this tab: a later tab inherits it,
    # so `joinedAt` (and its Redis mirror) stays put when the first tab leaves.
    joined_at_ms: int
    kind: str = "ws"  # the endpoint it came by: "ws" or "yjs" (how it is told the room's state)


@dataclass(frozen=True, slots=True)
class UserView:
    """A user as others see it in a room: one entry however many tabs."""

    user_id: UserId
    username: str
    mode: str
    joined_at_ms: int

    def wire(self) -> dict[str, Any]:
        return {
            "userId": self.user_id,
            "username": self.username,
            "mode": self.mode,
            "joinedAt": iso_ms(self.joined_at_ms),
        }


class Presence:
    """All rooms of one shard. Drive it with `handle`; read it with the queries."""

    def __init__(self, expected_frontdoors: int = 0, restore_grace_ms: int = RESTORE_GRACE_MS) -> None:
        """`expected_frontdoors`: how many front doors a starting shard waits
        for before it tells restored members their rooms (0: none, no recovery)."""
        self._rooms: dict[ResourceId, dict[ConnId, Member]] = {}
        self._conn_rooms: dict[ConnId, set[ResourceId]] = {}
        # parent -> its sub-resources that have members, in order of first join
        self._families: dict[ResourceId, dict[ResourceId, None]] = {}
        self._expected = expected_frontdoors
        self._grace_ms = restore_grace_ms
        self._recovering = expected_frontdoors > 0
        self._synced: set[FrontDoorId] = set()
        self._grace_until: int | None = None
        self._to_refresh: dict[tuple[ConnId, ResourceId], None] = {}  # memberships told when recovery ends

    # --- queries --------------------------------------------------------------

    def rooms(self) -> dict[ResourceId, int]:
        """Room -> number of connections in it."""
        return {room: len(members) for room, members in self._rooms.items()}

    def connections(self) -> int:
        return len(self._conn_rooms)

    def rooms_of(self, conn: ConnId) -> frozenset[ResourceId]:
        return frozenset(self._conn_rooms.get(conn, ()))

    def members(self, room: ResourceId) -> tuple[Member, ...]:
        return tuple(self._rooms.get(room, {}).values())

    def member(self, room: ResourceId, conn: ConnId) -> Member | None:
        """The connection's membership of the room, if it is in it."""
        members = self._rooms.get(room)
        return None if members is None else members.get(conn)

    def users(self, room: ResourceId) -> list[UserView]:
        """The room's users, one per user id, in order of arrival."""
        views: dict[UserId, UserView] = {}
        for m in self._rooms.get(room, {}).values():
            seen = views.get(m.user_id)
            if seen is None:
                views[m.user_id] = UserView(m.user_id, m.username, m.mode, m.joined_at_ms)
            elif m.mode == EDITOR and seen.mode != EDITOR:
                views[m.user_id] = UserView(seen.user_id, seen.username, EDITOR, seen.joined_at_ms)
        return list(views.values())

    def user_view(self, room: ResourceId, user: UserId) -> UserView | None:
        return next((v for v in self.users(room) if v.user_id == user), None)

    def users_wire(self, room: ResourceId) -> list[dict[str, Any]]:
        """The room's users as `RESOURCE_STATE.users` lists them."""
        return [u.wire() for u in self.users(room)]

    @property
    def recovering(self) -> bool:
        return self._recovering

    def next_deadline(self) -> int | None:
        """When `expire` has something to do: the end of the recovery's grace."""
        return self._grace_until if self._recovering else None

    def expire(self, now_ms: int) -> list[Event]:
        """End the recovery once its grace is over, telling every member restored meanwhile."""
        if self._recovering and self._grace_until is not None and now_ms >= self._grace_until:
            return self._end_recovery()
        return []

    # --- commands -------------------------------------------------------------

    def handle(self, command: Command, now_ms: int) -> list[Event]:
        match command:
            case Join():
                return self._join(command, now_ms)
            case Leave():
                return self._leave(command)
            case Disconnect(conn=conn, reason=reason):
                return self._disconnect(conn, reason)
            case Sync():
                return self._sync(command, now_ms)
        raise TypeError(f"not a presence command: {command!r}")

    def _join(self, cmd: Join, now_ms: int) -> list[Event]:
        room = self._rooms.get(cmd.resource_id)
        if room is not None and cmd.conn in room:
            if cmd.restore:
                return []
            return [_error(cmd.conn, cmd.ref, ErrorCode.ALREADY_JOINED,
                           f"already joined {cmd.resource_id}", cmd.resource_id)]
        before = self.user_view(cmd.resource_id, cmd.user_id)
        if room is None:
            room = self._rooms[cmd.resource_id] = {}
            parent = parent_of(cmd.resource_id)
            if parent is not None:
                self._families.setdefault(parent, {})[cmd.resource_id] = None
        if before is not None:  # another tab of this user: it keeps the first arrival
            joined_at_ms = before.joined_at_ms
        elif cmd.restore and cmd.joined_at_ms:  # rebuilt after a shard restart
            joined_at_ms = cmd.joined_at_ms
        else:
            joined_at_ms = now_ms
        room[cmd.conn] = Member(cmd.conn, cmd.user_id, cmd.username, cmd.session_id, cmd.mode, joined_at_ms,
                                cmd.kind)
        self._conn_rooms.setdefault(cmd.conn, set()).add(cmd.resource_id)
        if self._recovering:
            self._to_refresh[(cmd.conn, cmd.resource_id)] = None
        after = self.user_view(cmd.resource_id, cmd.user_id)
        assert after is not None
        events: list[Event] = []
        if before != after:
            events.append(MirrorJoin(cmd.resource_id, cmd.user_id, after.mode, after.joined_at_ms))
        if cmd.restore:
            return events
        events.append(TellState(cmd.conn, cmd.ref, cmd.resource_id, cmd.kind, cmd.state_vector))
        if before is None:
            others = tuple(c for c in room if c != cmd.conn)
            if others:
                events.append(_user_joined(cmd.resource_id, others, after))
        events.extend(self._family_update(parent_of(cmd.resource_id)))
        return events

    def _leave(self, cmd: Leave) -> list[Event]:
        room = self._rooms.get(cmd.resource_id)
        if room is None or cmd.conn not in room:
            return [_error(cmd.conn, cmd.ref, ErrorCode.NOT_JOINED,
                           f"not joined to {cmd.resource_id}", cmd.resource_id)]
        events: list[Event] = [Reply(cmd.conn, cmd.ref, MessageType.RESOURCE_LEFT, {"resourceId": cmd.resource_id})]
        events.extend(self._remove(cmd.conn, cmd.resource_id, "left"))
        events.extend(self._family_update(parent_of(cmd.resource_id)))
        return events

    def _disconnect(self, conn: ConnId, reason: str) -> list[Event]:
        # One `resource:all_users` per family once every room is left: per
        # room, it would go out several times, the first ones to this very
        # connection (still in its other tabs) and with counts already stale.
        events: list[Event] = []
        rooms = sorted(self._conn_rooms.get(conn, ()))
        for room in rooms:
            events.extend(self._remove(conn, room, reason))
        events.extend(self._families_update(self._parents(rooms)))
        return events

    def _sync(self, cmd: Sync, now_ms: int) -> list[Event]:
        listed = {(j.conn, j.resource_id) for j in cmd.joins}
        events: list[Event] = []
        dropped: list[ResourceId] = []
        for conn in [c for c in self._conn_rooms if frontdoor_of(c) == cmd.frontdoor]:
            for room in sorted(self._conn_rooms[conn]):
                if (conn, room) not in listed:
                    events.extend(self._remove(conn, room, "disconnected"))
                    dropped.append(room)
        arrived: list[tuple[ResourceId, UserId]] = []  # users new to a room
        for join in cmd.joins:
            restore = join if join.restore else _as_restore(join)
            if self.user_view(restore.resource_id, restore.user_id) is None:
                arrived.append((restore.resource_id, restore.user_id))
            events.extend(self._join(restore, now_ms))
        if self._recovering:
            self._synced.add(cmd.frontdoor)
            if self._grace_until is None:
                self._grace_until = now_ms + self._grace_ms
            events.extend(self._families_update(self._parents(dropped)))
            if len(self._synced) >= self._expected:
                events.extend(self._end_recovery())
            return events
        # announced to the members this Sync does not refresh (they are told the whole room)
        for room, user_id in arrived:
            view = self.user_view(room, user_id)
            others = tuple(c for c in self._rooms[room] if (c, room) not in listed)
            if view is not None and others:
                events.append(_user_joined(room, others, view))
        for join in cmd.joins:
            member = self.member(join.resource_id, join.conn)
            assert member is not None  # a restore is never refused and nothing above removes anyone
            events.append(TellState(join.conn, None, join.resource_id, member.kind, None, refresh=True))
        # after the restores too, so the update shows the final state
        events.extend(self._families_update(self._parents(dropped + [j.resource_id for j in cmd.joins])))
        return events

    def _end_recovery(self) -> list[Event]:
        """Every membership made while recovering is told its room, whole."""
        self._recovering = False
        told, self._to_refresh = list(self._to_refresh), {}
        events: list[Event] = []
        for conn, room in told:
            member = self.member(room, conn)
            assert member is not None  # a member that leaves is taken out of `_to_refresh`
            events.append(TellState(conn, None, room, member.kind, None, refresh=True))
        events.extend(self._families_update(self._parents([room for _, room in told])))
        return events

    @staticmethod
    def _parents(rooms: list[ResourceId]) -> list[ResourceId]:
        """The families of `rooms`, each once, in order."""
        return list(dict.fromkeys(p for p in map(parent_of, rooms) if p is not None))

    def _families_update(self, parents: list[ResourceId]) -> list[Event]:
        return [e for parent in parents for e in self._family_update(parent)]

    def _remove(self, conn: ConnId, room_id: ResourceId, reason: str) -> list[Event]:
        """Take `conn` out of one room; the caller sends the family update."""
        room = self._rooms[room_id]
        before = self.user_view(room_id, room[conn].user_id)
        member = room.pop(conn)
        self._to_refresh.pop((conn, room_id), None)
        rooms_of_conn = self._conn_rooms[conn]
        rooms_of_conn.discard(room_id)
        if not rooms_of_conn:
            del self._conn_rooms[conn]
        events: list[Event] = [MemberGone(conn, room_id, reason, member.user_id, member.session_id)]
        after = self.user_view(room_id, member.user_id)
        if after is None:
            events.append(MirrorLeave(room_id, member.user_id, room_empty=not room))
            if room:
                events.append(Deliver(tuple(room), MessageType.USER_LEFT,
                                      {"resourceId": room_id, "userId": member.user_id}))
        elif after != before:  # the tab that left was the user's only editing one
            events.append(MirrorJoin(room_id, member.user_id, after.mode, after.joined_at_ms))
        if not room:
            del self._rooms[room_id]
            parent = parent_of(room_id)
            if parent is not None:
                family = self._families[parent]
                family.pop(room_id, None)
                if not family:
                    del self._families[parent]
        return events

    def _family_update(self, parent: ResourceId | None) -> list[Event]:
        """`resource:all_users` to every member of the family, one event per
        sub-resource (its `currentSubResourceId` differs), seed BE-001.2.
        Nothing for a plain id (no parent) or a family with nobody left."""
        if parent is None or parent not in self._families:
            return []
        subs = list(self._families[parent])
        sub_users = [(sub, self.users(sub)) for sub in subs]
        total = len({u.user_id for _, users in sub_users for u in users})
        listing = [{"subResourceId": sub, "users": [u.wire() for u in users]} for sub, users in sub_users]
        return [
            Deliver(tuple(self._rooms[sub]), MessageType.ALL_USERS, {
                "parentResourceId": parent,
                "currentSubResourceId": sub,
                "totalCount": total,
                "subResources": listing,
            })
            for sub in subs
        ]


def _user_joined(room: ResourceId, conns: tuple[ConnId, ...], view: UserView) -> Deliver:
    return Deliver(conns, MessageType.USER_JOINED, {"resourceId": room, "user": view.wire()})


def _as_restore(join: Join) -> Join:
    return dataclasses.replace(join, restore=True)


def _error(conn: ConnId, ref: Any, code: ErrorCode, message: str, resource: ResourceId) -> Reply:
    return Reply(conn, ref, MessageType.ERROR, error_data(code, message, resourceId=resource))
