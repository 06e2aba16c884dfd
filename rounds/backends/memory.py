"""Embedded defaults: the same behaviour as the Redis backends, in memory.

TTLs are kept as absolute deadlines so tests can check them; nothing expires
by itself here (the front door's idle reaper does the cleaning)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rounds.clock import iso_ms
from rounds.ids import SessionId, UserId
from rounds.backends.base import MirrorEvent
from rounds.shard.events import MirrorJoin, MirrorLeave


class MemorySessions:
    name = "memory"

    def __init__(self, session_ttl_ms: int, activity_ttl_ms: int) -> None:
        self.session_ttl_ms = session_ttl_ms
        self.activity_ttl_ms = activity_ttl_ms
        self.sessions: dict[UserId, dict[SessionId, dict[str, Any]]] = {}
        self.session_deadline_ms: dict[UserId, int] = {}
        self.activity_ms: dict[UserId, int] = {}

    async def open(self, user: UserId, session: SessionId, info: dict[str, Any], now_ms: int) -> None:
        self.sessions.setdefault(user, {})[session] = dict(info)
        await self.touch(user, session, now_ms)

    async def touch(self, user: UserId, session: SessionId, now_ms: int) -> None:
        if user in self.sessions:
            self.session_deadline_ms[user] = now_ms + self.session_ttl_ms
        self.activity_ms[user] = now_ms

    async def close(self, user: UserId, session: SessionId) -> None:
        sessions = self.sessions.get(user, {})
        sessions.pop(session, None)
        if not sessions:
            self.sessions.pop(user, None)
            self.session_deadline_ms.pop(user, None)
            self.activity_ms.pop(user, None)

    async def health(self) -> dict[str, Any]:
        return {"backend": self.name, "ok": True}

    async def aclose(self) -> None:
        return None


class MemoryPresence:
    name = "memory"

    def __init__(self) -> None:
        self.users: dict[str, set[str]] = {}
        self.members: dict[tuple[str, str], dict[str, str]] = {}

    async def reset(self) -> int:
        cleared = len(self.users)
        self.users.clear()
        self.members.clear()
        return cleared

    async def apply(self, events: Sequence[MirrorEvent]) -> None:
        for event in events:
            match event:
                case MirrorJoin(resource_id=room, user_id=user, mode=mode, joined_at_ms=at):
                    self.users.setdefault(room, set()).add(user)
                    self.members[(room, user)] = {"mode": mode, "joinedAt": iso_ms(at)}
                case MirrorLeave(resource_id=room, user_id=user):
                    users = self.users.get(room, set())
                    users.discard(user)
                    if not users:
                        self.users.pop(room, None)
                    self.members.pop((room, user), None)

    async def health(self) -> dict[str, Any]:
        return {"backend": self.name, "ok": True}

    async def aclose(self) -> None:
        return None
