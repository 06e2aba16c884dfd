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
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rounds.clock import iso_ms
from rounds.config import EDITOR
from rounds.ids import ConnId, ResourceId, SessionId, UserId, frontdoor_of, parent_of
from rounds.protocol.ws import ErrorCode, MessageType, error_data
from rounds.protocol.messages import Command, Deliver, Disconnect, Join, Leave, Reply, Sync
from rounds.shard.events import Event, MemberGone, MirrorJoin, MirrorLeave


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

    def __init__(self) -> None:
        self._rooms: dict[ResourceId, dict[ConnId, Member]] = {}
        self._conn_rooms: dict[ConnId, set[ResourceId]] = {}
        # parent -> its sub-resources that have members, in order of first join
        self._families: dict[ResourceId, dict[ResourceId, None]] = {}

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
        room[cmd.conn] = Member(cmd.conn, cmd.user_id, cmd.username, cmd.session_id, cmd.mode, joined_at_ms)
        self._conn_rooms.setdefault(cmd.conn, set()).add(cmd.resource_id)
        after = self.user_view(cmd.resource_id, cmd.user_id)
        assert after is not None
        events: list[Event] = []
        if before != after:
            events.append(MirrorJoin(cmd.resource_id, cmd.user_id, after.mode, after.joined_at_ms))
        if cmd.restore:
            return events
        events.append(Reply(cmd.conn, cmd.ref, MessageType.RESOURCE_STATE, self.resource_state(cmd.resource_id)))
        if before is None:
            others = tuple(c for c in room if c != cmd.conn)
            if others:
                events.append(Deliver(others, MessageType.USER_JOINED,
                                      {"resourceId": cmd.resource_id, "user": after.wire()}))
        events.extend(self._family_update(parent_of(cmd.resource_id)))
        return events

    def resource_state(self, room: ResourceId) -> dict[str, Any]:
        """`RESOURCE_STATE` data. `state`/`revision`/`locks` are filled by the
        document and lock machines once they exist (issues 3 and 4)."""
        return {
            "resourceId": room,
            "users": [u.wire() for u in self.users(room)],
            "state": b"",
            "revision": 0,
            "locks": [],
        }

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
        for join in cmd.joins:
            events.extend(self._join(join if join.restore else _as_restore(join), now_ms))
        # after the (silent) restores too, so the update shows the final state
        events.extend(self._families_update(self._parents(dropped)))
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


def _as_restore(join: Join) -> Join:
    return dataclasses.replace(join, restore=True)


def _error(conn: ConnId, ref: Any, code: ErrorCode, message: str, resource: ResourceId) -> Reply:
    return Reply(conn, ref, MessageType.ERROR, error_data(code, message, resourceId=resource))
