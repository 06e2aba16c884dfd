"""The backend Protocols. Each has a memory implementation and a Redis one,
and every implementation passes the same suite in tests/backends."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from rounds.ids import SessionId, UserId
from rounds.shard.events import MirrorJoin, MirrorLeave

MirrorEvent = MirrorJoin | MirrorLeave


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


class PresenceMirror(Protocol):
    """A copy of the shard's rooms for others to read (seed BE-001.2):
    `resource:{id}:users` (set) and `resource:{id}:user:{userId}` (hash)."""

    name: str

    async def apply(self, events: Sequence[MirrorEvent]) -> None: ...

    async def reset(self) -> int:
        """Forget every room this owner (a shard) mirrored before it started:
        a restarted shard rebuilds its rooms from the front doors' `Sync`,
        and users who left while it was down must not stay listed. Returns
        the number of rooms cleared."""
        ...

    async def health(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...
