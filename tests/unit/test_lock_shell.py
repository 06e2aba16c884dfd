"""The lock shell's start (issue 3) over the memory store: which live locks a
restarted shard adopts when it is told nothing about ownership, and what a
listing that fails halfway costs. The restart over real Redis, with an
ownership check, is tests/integration/test_lock_shell_restart.py."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from rounds.clock import now_ms
from rounds.ids import ConnId, FrontDoorId, ResourceId, UserId, conn_id
from rounds.protocol.messages import LockAcquire, LockId, Reply
from rounds.shard.locks.events import AuditLock, StoreGrant
from rounds.shard.locks.shell import LockShell
from rounds.shard.locks.store import HeldLock, MemoryLockStore
from tests.client import eventually

HOLDER = conn_id(FrontDoorId(0), 7)
TTL_MS = 30_000


class BrokenListing(MemoryLockStore):
    """The memory store, whose listing fails after `listed` locks (a store
    connection lost while a restarted shard reads it)."""

    def __init__(self, listed: int) -> None:
        super().__init__()
        self.listed = listed

    async def held_locks(self) -> AsyncIterator[HeldLock]:
        count = 0
        async for held in super().held_locks():
            if count == self.listed:
                raise ConnectionError("the store went away while listing")
            count += 1
            yield held


def held_before(store: MemoryLockStore, resource: str, room: str) -> None:
    """A lock granted by the shard's previous life, still live in the store."""
    now = now_ms()
    store.answer(StoreGrant(ResourceId(resource), LockId(f"old-{resource}"), UserId("usr_001"), TTL_MS, now,
                            now + TTL_MS, ConnId(HOLDER), ResourceId(room)))


def adopted(events: list[Any]) -> list[str]:
    return sorted(e.resource_id for e in events if isinstance(e, AuditLock) and e.action == "adopt")


async def test_a_shell_told_nothing_about_ownership_adopts_the_live_locks_of_every_room() -> None:
    store = MemoryLockStore()
    events: list[Any] = []
    held_before(store, "input-a", "page:/one")
    held_before(store, "input-b", "page:/two")
    shell = LockShell("shard-0", store, events.extend, TTL_MS, 60_000)  # a gateway of one shard
    try:
        await shell.start()
        assert adopted(events) == ["input-a", "input-b"]
        assert [lock.resource_id for lock in shell.locks.locks()] == ["input-a", "input-b"]
    finally:
        await shell.stop()


async def test_a_listing_that_fails_halfway_keeps_what_it_adopted_and_the_shard_serves(
        caplog: pytest.LogCaptureFixture) -> None:
    store = BrokenListing(listed=1)
    events: list[Any] = []
    held_before(store, "input-a", "page:/one")
    held_before(store, "input-b", "page:/one")
    shell = LockShell("shard-0", store, events.extend, TTL_MS, 60_000)
    try:
        with caplog.at_level(logging.ERROR, logger="rounds.shard.locks.shell"):
            await shell.start()  # does not raise: the locks left out end at their store TTL
        assert len(adopted(events)) == 1
        [record] = [r for r in caplog.records if r.name == "rounds.shard.locks.shell"]
        assert "listing live locks failed after 1" in record.getMessage() and record.exc_info is not None
        # and it serves: a new lock is granted through the same store
        shell.handle(LockAcquire(ConnId(HOLDER), "acq", UserId("usr_002"), ResourceId("input-c"), "editor",
                                 ResourceId("page:/one")))
        [reply] = await eventually(lambda: [e for e in events if isinstance(e, Reply) and e.ref == "acq"], 2.0,
                                   "answered")
        assert reply.type == "LOCK_ACQUIRED"
    finally:
        await shell.stop()
