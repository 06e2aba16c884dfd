"""A copy of the shard's rooms for others to read (seed BE-001.2).

`PresenceMirror` is the Protocol the shard writes its `MirrorJoin` /
`MirrorLeave` events through; `MemoryPresence` is the embedded default,
`RedisPresence` (`mirror_redis`) the seed's keys. Both pass
tests/backends/test_presence_mirror.py. The shard's memory is the truth; the
mirror is a copy, so a failed write never fails a client's request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from rounds.clock import iso_ms
from rounds.shard.events import MirrorJoin, MirrorLeave

MirrorEvent = MirrorJoin | MirrorLeave


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
