"""Where a user's sessions are visible to others (seed BE-001.1).

`SessionStore` is the Protocol the front door writes through; `MemorySessions`
is the embedded default, `RedisSessions` (`sessions_redis`) the seed's keys.
Both pass tests/backends/test_sessions.py. TTLs are kept as absolute
deadlines in memory so tests can check them; nothing expires there by
itself (the front door's idle reaper does the cleaning).
"""

from __future__ import annotations

from typing import Any, Protocol

from rounds.ids import SessionId, UserId


class SessionStore(Protocol):
    """Where a user's sessions are visible to others (seed BE-001.1):
    `user:{userId}:session` (TTL `session_ttl_ms`) and an activity key
    (TTL `idle_timeout_ms`), both reset by `touch`."""

    name: str

    async def open(self, user: UserId, session: SessionId, info: dict[str, Any], now_ms: int) -> None: ...

    async def touch(self, user: UserId, session: SessionId, now_ms: int) -> None: ...

    async def close(self, user: UserId, session: SessionId) -> None: ...

    async def health(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


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
