"""The lock shell of a restarted shard adopts its rooms' live locks (issue 3).

In one process, no Ray: a `LockShell` grants locks through a real store
(memory, and the real Redis), then a second shell over the same store plays
the restarted shard. Its `start()` adopts only the locks of the rooms its
`owns` says are its own; the holder renews and releases them, and one left
alone expires on the shell's own timer with the room told "expired".
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from rounds import redisconn
from rounds.ids import ConnId, FrontDoorId, ResourceId, UserId, conn_id
from rounds.protocol.messages import LockAcquire, LockId, LockRelease, LockRenew, Reply
from rounds.shard.events import RoomBroadcast
from rounds.shard.locks.events import AuditLock, StoreRelease
from rounds.shard.locks.shell import LockShell
from rounds.shard.locks.store import LockStore, MemoryLockStore
from rounds.shard.locks.store_redis import RedisLockStore
from tests.client import eventually

HOLDER = conn_id(FrontDoorId(0), 7)
TTL_MS = 1_500


class Recorder:
    """The shard's `dispatch`: keeps what the shell sends out."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def __call__(self, events: list[Any]) -> None:
        self.events.extend(events)

    def replies(self, ref: Any) -> list[Reply]:
        return [e for e in self.events if isinstance(e, Reply) and e.ref == ref]

    def broadcasts(self, type_: str, resource: str) -> list[RoomBroadcast]:
        return [e for e in self.events
                if isinstance(e, RoomBroadcast) and e.type == type_ and e.data["resourceId"] == resource]


StoreFactory = Callable[[], LockStore]


@pytest.fixture(params=["memory", "redis"])
def stores(request: pytest.FixtureRequest, redis_url: str) -> StoreFactory:
    """A new store over the same data each call, as a restarted shard makes
    (a memory store lives in the shard's process: here, one for both)."""
    if request.param == "memory":
        memory = MemoryLockStore()
        return lambda: memory
    return lambda: RedisLockStore(redisconn.connect(redis_url))


def shell(store: LockStore, recorder: Recorder, rooms: set[str] | None = None) -> LockShell:
    owns = (lambda room: room in rooms) if rooms is not None else (lambda room: True)
    return LockShell("shard-0", store, recorder, TTL_MS, 10_000, owns=owns)


async def granted(shell_: LockShell, recorder: Recorder, resource: str, room: str) -> Reply:
    shell_.handle(LockAcquire(ConnId(HOLDER), resource, UserId("usr_001"), ResourceId(resource), "editor",
                              ResourceId(room)))
    [reply] = await eventually(lambda: recorder.replies(resource), 2.0, f"{resource} answered")
    assert reply.type == "LOCK_ACQUIRED", reply
    return reply


async def test_a_restarted_shell_adopts_the_locks_of_its_own_rooms_only(stores: StoreFactory) -> None:
    tag = uuid.uuid4().hex[:8]
    mine, theirs = f"page:/mine-{tag}", f"page:/theirs-{tag}"
    kept, expiring, foreign = (f"input-{x}-{tag}" for x in ("kept", "expiring", "foreign"))
    before = Recorder()
    first = shell(stores(), before)
    lock = {r: await granted(first, before, r, room)
            for r, room in ((kept, mine), (expiring, mine), (foreign, theirs))}
    await first.stop()  # the shard dies: its memory and timer go, the store keeps the locks

    after = Recorder()
    second = shell(stores(), after, rooms={mine})
    await second.start()
    try:
        assert sorted(x.resource_id for x in second.locks.locks()) == [expiring, kept]
        assert [e.action for e in after.events if isinstance(e, AuditLock)] == ["adopt", "adopt"]
        assert second.locks.room_state(ResourceId(mine))[0]["lockedBy"] == "usr_001"

        # the holder's connection renews and releases as before the restart
        kept_id = LockId(lock[kept].data["lockId"])
        second.handle(LockRenew(ConnId(HOLDER), "renew", ResourceId(kept), kept_id))
        assert [r.type for r in after.replies("renew")] == ["LOCK_RENEWED"]
        assert after.broadcasts("RESOURCE_LOCKED", kept)[0].room_id == mine

        # the one left alone expires on the new shell's timer, the room told "expired"
        [unlocked] = await eventually(lambda: after.broadcasts("RESOURCE_UNLOCKED", expiring), 3.0, "expired")
        assert (unlocked.room_id, unlocked.data["reason"]) == (mine, "expired")

        second.handle(LockRelease(ConnId(HOLDER), "release", ResourceId(kept), kept_id))
        assert [r.type for r in after.replies("release")] == ["LOCK_RELEASED"]

        # every next grant carries a higher token than before the restart (the
        # store takes requests in order: the release lands before the grant)
        for resource in (kept, expiring):
            second.handle(LockAcquire(ConnId(HOLDER), f"again-{resource}", UserId("usr_002"),
                                      ResourceId(resource), "editor", ResourceId(mine)))
            [reply] = await eventually(lambda r=resource: after.replies(f"again-{r}"), 2.0, "answered")
            assert reply.type == "LOCK_ACQUIRED", reply
            assert reply.data["fencingToken"] > lock[resource].data["fencingToken"]
    finally:
        cleanup = stores()
        releases = [StoreRelease(held.resource_id, held.lock_id, held.user_id) for held in second.locks.locks()]
        releases.append(StoreRelease(ResourceId(foreign), LockId(lock[foreign].data["lockId"]), UserId("usr_001")))
        for request in releases:
            cleanup.submit(request, lambda answer: None)
        await cleanup.aclose()  # after what it was given is done
        await second.stop()
