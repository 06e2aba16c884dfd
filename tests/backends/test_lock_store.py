"""Every `LockStore` passes this one suite (STYLE habit 5): memory and Redis.

The store is where a grant is decided and others see it (story BE-001.3):
`lock:{resourceId}` (SET NX with a TTL), the `lock:{resourceId}:metadata`
hash with the same TTL, and a fencing counter that never goes back. A small
harness per implementation reads that state back (Redis: GET, HGETALL, PTTL
on the real test database; memory: its dicts) and lets time pass (Redis:
really; memory: a fake clock).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Protocol, cast

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from rounds import redisconn
from rounds.clock import now_ms
from rounds.ids import ConnId, FrontDoorId, ResourceId, UserId, conn_id
from rounds.protocol.messages import LockId
from rounds.shard.locks.events import (
    GrantFailed,
    GrantRefused,
    GrantStored,
    LockLost,
    StoreGrant,
    StoreRelease,
    StoreRenew,
    StoreRequest,
)
from rounds.shard.locks.store import (
    FENCE_TTL_MS,
    HeldLock,
    LockStore,
    MemoryLockStore,
    StoreAnswer,
    lock_fence_key,
    lock_key,
    lock_meta_key,
)
from rounds.shard.locks.store_redis import RedisLockStore
from tests.client import eventually

T0 = int(datetime(2025, 11, 17, 10, 30, tzinfo=UTC).timestamp() * 1000)
TTL = 30_000
USR1, USR2 = UserId("usr_001"), UserId("usr_002")
CONN = conn_id(FrontDoorId(1), 42)
ROOM = ResourceId("page:/patient/12345")


class Harness(Protocol):
    @property
    def store(self) -> LockStore: ...

    async def holder(self, rid: ResourceId) -> str | None:
        """`GET lock:{rid}`."""

    async def metadata(self, rid: ResourceId) -> dict[str, str]:
        """`HGETALL lock:{rid}:metadata`."""

    async def pttls(self, rid: ResourceId) -> tuple[int, int]:
        """PTTL of the lock key and of its metadata (-2: no key)."""

    async def advance(self, ms: int) -> None:
        """Let `ms` pass for the store."""

    def clock(self) -> int:
        """The store's idea of now (ms)."""

    def restarted(self) -> LockStore:
        """A new store over the same data, as a restarted shard would make."""


class MemoryHarness:
    def __init__(self) -> None:
        self.now = T0
        self.store = MemoryLockStore(clock=lambda: self.now)

    async def holder(self, rid: ResourceId) -> str | None:
        lock = self.store.live(rid)
        return None if lock is None else lock.user_id

    async def metadata(self, rid: ResourceId) -> dict[str, str]:
        lock = self.store.live(rid)
        return {} if lock is None else dict(lock.metadata)

    async def pttls(self, rid: ResourceId) -> tuple[int, int]:
        lock = self.store.live(rid)
        left = -2 if lock is None else lock.deadline_ms - self.now
        return left, left

    async def advance(self, ms: int) -> None:
        self.now += ms

    def clock(self) -> int:
        return self.now

    def restarted(self) -> LockStore:
        # A memory store dies with its process; its counters restart above
        # clock * 1000, and a restart takes far more than a millisecond.
        self.now += 1_000
        self.store = MemoryLockStore(clock=lambda: self.now)
        return self.store


class RedisHarness:
    def __init__(self, url: str) -> None:
        self.url = url
        self.reader = redisconn.connect(url)
        self.store = RedisLockStore(redisconn.connect(url))
        self.stores: list[RedisLockStore] = [self.store]

    async def holder(self, rid: ResourceId) -> str | None:
        return cast(str | None, await self.reader.get(lock_key(rid)))  # decode_responses: str

    async def metadata(self, rid: ResourceId) -> dict[str, str]:
        return cast(dict[str, str], await self.reader.hgetall(lock_meta_key(rid)))

    async def pttls(self, rid: ResourceId) -> tuple[int, int]:
        return await self.reader.pttl(lock_key(rid)), await self.reader.pttl(lock_meta_key(rid))

    async def advance(self, ms: int) -> None:
        await asyncio.sleep(ms / 1000)

    def clock(self) -> int:
        return now_ms()

    def restarted(self) -> LockStore:
        self.store = RedisLockStore(redisconn.connect(self.url))
        self.stores.append(self.store)
        return self.store

    async def aclose(self, tag: str) -> None:
        for key in [k async for k in self.reader.scan_iter(match=f"lock:*{tag}*")]:
            await self.reader.delete(key)
        await self.reader.aclose()
        for store in self.stores:
            await store.aclose()


@pytest.fixture
def tag() -> str:
    return f"lk-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def rid(tag: str) -> ResourceId:
    return ResourceId(f"input-field-123-{tag}")  # the seed's field, unique per test


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest, redis_url: str, tag: str) -> AsyncIterator[Harness]:
    if request.param == "memory":
        yield MemoryHarness()
        return
    redis_harness = RedisHarness(redis_url)
    try:
        yield redis_harness
    finally:
        await redis_harness.aclose(tag)


async def ask(store: LockStore, request: StoreRequest) -> StoreAnswer | None:
    """Submit one request and wait for its answer, as the shell's callback gets it."""
    answer: asyncio.Future[StoreAnswer | None] = asyncio.get_running_loop().create_future()
    store.submit(request, answer.set_result)
    return await answer


async def grant(store: LockStore, rid: ResourceId, lock_id: str, user: UserId = USR1, ttl_ms: int = TTL,
                at_ms: int = T0, conn: ConnId = CONN, room: ResourceId = ROOM) -> StoreAnswer | None:
    return await ask(store, StoreGrant(rid, LockId(lock_id), user, ttl_ms, at_ms, at_ms + ttl_ms, conn, room))


async def renew(store: LockStore, rid: ResourceId, lock_id: str, user: UserId, ttl_ms: int,
                expires_at_ms: int) -> bool:
    """Whether the renewal went through (a refused one answers LockLost)."""
    answer = await ask(store, StoreRenew(rid, LockId(lock_id), user, ttl_ms, expires_at_ms))
    assert answer in (None, LockLost(rid, LockId(lock_id)))
    return answer is None


async def release(store: LockStore, rid: ResourceId, lock_id: str, user: UserId = USR1,
                  if_expires_at_ms: int | None = None) -> None:
    assert await ask(store, StoreRelease(rid, LockId(lock_id), user, if_expires_at_ms)) is None


# --- Scenario: Acquire lock on available resource ----------------------------------


async def test_a_free_resource_is_granted_with_a_fencing_token(harness: Harness, rid: ResourceId) -> None:
    result = await grant(harness.store, rid, "L1")
    assert isinstance(result, GrantStored) and result.fencing_token > 0
    assert await harness.holder(rid) == "usr_001"  # SET lock:{id} usr_001 ... NX


async def test_the_metadata_hash_holds_the_seeds_fields_and_what_adoption_needs(harness: Harness,
                                                                                rid: ResourceId) -> None:
    result = await grant(harness.store, rid, "L1")
    assert isinstance(result, GrantStored)
    assert await harness.metadata(rid) == {
        "lockType": "exclusive",
        "acquiredAt": "2025-11-17T10:30:00.000Z",
        "expiresAt": "2025-11-17T10:30:30.000Z",
        "userId": "usr_001",
        "lockId": "L1",
        "fencingToken": str(result.fencing_token),
        "roomId": "page:/patient/12345",
        "connId": str(CONN),
        "ttlMs": "30000",
    }


async def test_both_keys_carry_the_lock_ttl_in_milliseconds(harness: Harness, rid: ResourceId) -> None:
    await grant(harness.store, rid, "L1", ttl_ms=7_500)
    lock_ttl, meta_ttl = await harness.pttls(rid)
    assert 7_000 < lock_ttl <= 7_500 and 7_000 < meta_ttl <= 7_500


# --- Scenario: Lock denied when resource already locked --------------------------------


async def test_a_held_resource_is_refused_with_holder_and_expiry(harness: Harness, rid: ResourceId) -> None:
    await grant(harness.store, rid, "L1", USR2, ttl_ms=TTL)
    result = await grant(harness.store, rid, "L2", USR1)
    assert isinstance(result, GrantRefused) and result.holder_user_id == "usr_002"
    lock_ttl, _ = await harness.pttls(rid)
    assert abs(result.expires_at_ms - (harness.clock() + lock_ttl)) < 1_000  # when the holder's lock ends
    assert (await harness.metadata(rid))["lockId"] == "L1"  # the holder's metadata is untouched


# --- Scenario: Lock renewal before expiration --------------------------------------------


async def test_the_holder_renews_both_ttls_and_the_expiry(harness: Harness, rid: ResourceId) -> None:
    await grant(harness.store, rid, "L1", ttl_ms=2_000)
    await harness.advance(500)
    assert await renew(harness.store, rid, "L1", USR1, 30_000, T0 + 30_500) is True
    lock_ttl, meta_ttl = await harness.pttls(rid)
    assert 29_000 < lock_ttl <= 30_000 and 29_000 < meta_ttl <= 30_000
    assert (await harness.metadata(rid))["expiresAt"] == "2025-11-17T10:30:30.500Z"


@pytest.mark.parametrize("lock_id, user", [("L2", USR1), ("L1", USR2)], ids=["wrong-lock-id", "wrong-user"])
async def test_only_the_holder_can_renew(harness: Harness, rid: ResourceId, lock_id: str, user: UserId) -> None:
    await grant(harness.store, rid, "L1", ttl_ms=5_000)
    assert await renew(harness.store, rid, lock_id, user, 60_000, T0 + 60_000) is False
    lock_ttl, _ = await harness.pttls(rid)
    assert lock_ttl <= 5_000
    assert (await harness.metadata(rid))["expiresAt"] == "2025-11-17T10:30:05.000Z"


async def test_an_expired_lock_cannot_be_renewed(harness: Harness, rid: ResourceId) -> None:
    await grant(harness.store, rid, "L1", ttl_ms=100)
    await harness.advance(150)
    assert await renew(harness.store, rid, "L1", USR1, TTL, T0 + TTL) is False
    assert await harness.holder(rid) is None


# --- Scenario: Lock expires automatically -----------------------------------------------------


async def test_an_expired_lock_is_gone_and_the_next_grant_gets_a_higher_token(harness: Harness,
                                                                             rid: ResourceId) -> None:
    first = await grant(harness.store, rid, "L1", ttl_ms=100)
    await harness.advance(150)
    assert await harness.holder(rid) is None and await harness.metadata(rid) == {}
    second = await grant(harness.store, rid, "L2", USR2)
    assert isinstance(first, GrantStored) and isinstance(second, GrantStored)
    assert second.fencing_token > first.fencing_token


# --- Scenario: Explicit lock release ----------------------------------------------------------


async def test_the_holder_releases_and_both_keys_go(harness: Harness, rid: ResourceId) -> None:
    await grant(harness.store, rid, "L1")
    await release(harness.store, rid, "L1")
    assert await harness.holder(rid) is None and await harness.metadata(rid) == {}
    assert await harness.pttls(rid) == (-2, -2)
    await release(harness.store, rid, "L1")  # already gone: nothing happens


@pytest.mark.parametrize("lock_id, user", [("L2", USR1), ("L1", USR2)], ids=["wrong-lock-id", "wrong-user"])
async def test_only_the_holder_can_release(harness: Harness, rid: ResourceId, lock_id: str, user: UserId) -> None:
    await grant(harness.store, rid, "L1")
    await release(harness.store, rid, lock_id, user)
    assert await harness.holder(rid) == "usr_001" and (await harness.metadata(rid))["lockId"] == "L1"


async def test_a_stale_holder_cannot_release_the_next_holders_lock(harness: Harness, rid: ResourceId) -> None:
    await grant(harness.store, rid, "L1", ttl_ms=100)
    await harness.advance(150)
    await grant(harness.store, rid, "L2", USR1)  # same user, new lock
    await release(harness.store, rid, "L1")
    assert (await harness.metadata(rid))["lockId"] == "L2"


# --- expiry -----------------------------------------------------------------------------------------


async def test_an_expiry_release_deletes_the_lock_it_last_stored(harness: Harness, rid: ResourceId) -> None:
    await grant(harness.store, rid, "L1")
    await release(harness.store, rid, "L1", if_expires_at_ms=T0 + TTL)
    assert await harness.holder(rid) is None


async def test_an_expiry_release_spares_a_lock_renewed_since(harness: Harness, rid: ResourceId) -> None:
    # another shard (wrongly) adopted it and its holder renewed there: not ours to end
    await grant(harness.store, rid, "L1")
    assert await renew(harness.store, rid, "L1", USR1, TTL, T0 + TTL + 5_000)
    await release(harness.store, rid, "L1", if_expires_at_ms=T0 + TTL)
    assert await harness.holder(rid) == "usr_001"


# --- adoption: what a restarted shard finds ------------------------------------------------------


async def mine(store: LockStore, tag: str) -> list[HeldLock]:
    """The live locks `held_locks` lists, of this test only (the Redis test database is shared)."""
    found = [held async for held in store.held_locks() if tag in held.resource_id]
    return sorted(found, key=lambda held: held.resource_id)


async def test_the_live_locks_are_listed_with_what_adoption_needs(harness: Harness, tag: str) -> None:
    a, b, gone = (ResourceId(f"input-{x}-{tag}") for x in ("a", "b", "gone"))
    assert isinstance(await grant(harness.store, a, "La", USR1, ttl_ms=20_000), GrantStored)
    assert await renew(harness.store, a, "La", USR1, 20_000, T0 + 25_000)
    token_b = await grant(harness.store, b, "Lb", USR2, conn=ConnId(7), room=b)
    await grant(harness.store, gone, "Lg")
    await release(harness.store, gone, "Lg")
    found = await mine(harness.store, tag)
    assert [(h.resource_id, h.lock_id, h.user_id, h.conn, h.room_id, h.ttl_ms) for h in found] == [
        (a, "La", USR1, CONN, ROOM, 20_000), (b, "Lb", USR2, 7, b, TTL)]
    # it expires when its room was told it does: the metadata's expiresAt
    assert (found[0].acquired_at_ms, found[0].expires_at_ms) == (T0, T0 + 25_000)
    assert isinstance(token_b, GrantStored) and found[1].fencing_token == token_b.fencing_token


async def test_a_lock_written_without_its_connection_is_not_listed(harness: Harness, tag: str) -> None:
    rid = ResourceId(f"input-old-{tag}")
    await grant(harness.store, rid, "L1")
    if isinstance(harness, RedisHarness):  # as a gateway before adoption wrote it
        await harness.reader.hdel(lock_meta_key(rid), "connId")
    else:
        assert isinstance(harness, MemoryHarness)
        del harness.store.locks[rid].metadata["connId"]
    assert await mine(harness.store, tag) == []


async def test_an_expired_lock_is_not_listed(harness: Harness, tag: str) -> None:
    await grant(harness.store, ResourceId(f"input-old-{tag}"), "L1", ttl_ms=100)
    await harness.advance(150)
    assert await mine(harness.store, tag) == []


async def test_a_lock_whose_metadata_names_another_holder_is_not_listed(harness: Harness, tag: str) -> None:
    # the keys disagree (written by hand, or half by an old gateway): adoption leaves it to its TTL
    rid = ResourceId(f"input-odd-{tag}")
    await grant(harness.store, rid, "L1")
    if isinstance(harness, RedisHarness):
        await harness.reader.hset(lock_meta_key(rid), "userId", "usr_002")
    else:
        assert isinstance(harness, MemoryHarness)
        harness.store.locks[rid].metadata["userId"] = "usr_002"
    assert await mine(harness.store, tag) == []


async def test_a_redis_metadata_hash_left_without_its_lock_key_is_not_listed(redis_url: str, tag: str) -> None:
    harness = RedisHarness(redis_url)
    rid = ResourceId(f"input-orphan-{tag}")
    try:
        await grant(harness.store, rid, "L1")
        await harness.reader.delete(lock_key(rid))
        assert await mine(harness.store, tag) == []
    finally:
        await harness.aclose(tag)


async def test_the_redis_listing_reads_past_one_scan_batch(redis_url: str, tag: str) -> None:
    harness = RedisHarness(redis_url)
    harness.store = RedisLockStore(redisconn.connect(redis_url), scan_count=7)
    harness.stores.append(harness.store)
    try:
        for i in range(30):
            await grant(harness.store, ResourceId(f"input-{i:02d}-{tag}"), f"L{i}")
        found = await mine(harness.store, tag)
        assert [h.lock_id for h in found] == [f"L{i}" for i in range(30)]
    finally:
        await harness.aclose(tag)


async def test_memory_fence_counters_the_clock_overtook_are_forgotten() -> None:
    now = T0
    store = MemoryLockStore(clock=lambda: now)
    last = 0
    for i in range(5_000):
        rid = ResourceId(f"input-{i}")
        result = await grant(store, rid, "L")
        assert isinstance(result, GrantStored) and result.fencing_token > last
        last = result.fencing_token
        await release(store, rid, "L")
        now += 1
    assert len(store.fences) < 2_100  # not one per resource ever locked


# --- fencing tokens -------------------------------------------------------------------------------


async def test_fencing_tokens_strictly_increase_over_many_grants(harness: Harness, rid: ResourceId) -> None:
    tokens = []
    for i in range(20):
        result = await grant(harness.store, rid, f"L{i}", UserId(f"usr_{i % 3}"))
        assert isinstance(result, GrantStored)
        tokens.append(result.fencing_token)
        await release(harness.store, rid, f"L{i}", UserId(f"usr_{i % 3}"))
    assert all(a < b for a, b in zip(tokens, tokens[1:], strict=False))


async def test_fencing_tokens_keep_increasing_across_a_new_store_instance(harness: Harness,
                                                                          rid: ResourceId) -> None:
    first = await grant(harness.store, rid, "L1", ttl_ms=100)
    assert isinstance(first, GrantStored)
    store = harness.restarted()
    await harness.advance(150)  # the old lock expires meanwhile
    second = await grant(store, rid, "L2")
    assert isinstance(second, GrantStored) and second.fencing_token > first.fencing_token


async def test_fencing_counters_are_per_resource(harness: Harness, tag: str) -> None:
    a, b = ResourceId(f"input-a-{tag}"), ResourceId(f"input-b-{tag}")
    tokens_a = []
    for _ in range(4):
        result = await grant(harness.store, a, "La")
        assert isinstance(result, GrantStored)
        tokens_a.append(result.fencing_token)
        await release(harness.store, a, "La")
    first_b = await grant(harness.store, b, "Lb")
    assert isinstance(first_b, GrantStored)
    if isinstance(harness, RedisHarness):
        # a's counter counts on by one from where it started; b's starts on its own
        assert tokens_a == [tokens_a[0] + i for i in range(4)]
        assert await harness.reader.get(lock_fence_key(b)) == str(first_b.fencing_token)


async def test_redis_keeps_the_seeds_key_names_and_a_fence_that_outlives_each_grant_by_30_days(
        redis_url: str, tag: str) -> None:
    rid = ResourceId(f"input-field-123-{tag}")
    harness = RedisHarness(redis_url)
    try:
        result = await grant(harness.store, rid, "L1", ttl_ms=100)
        assert isinstance(result, GrantStored)
        assert lock_key(rid) == f"lock:input-field-123-{tag}"
        assert lock_meta_key(rid) == f"lock:input-field-123-{tag}:metadata"
        assert await harness.reader.type(f"lock:input-field-123-{tag}") == "string"
        assert await harness.reader.type(f"lock:input-field-123-{tag}:metadata") == "hash"
        assert await harness.reader.get(lock_fence_key(rid)) == str(result.fencing_token)
        assert FENCE_TTL_MS - 5_000 < await harness.reader.pttl(lock_fence_key(rid)) <= FENCE_TTL_MS
    finally:
        await harness.aclose(tag)


async def test_a_renewal_pushes_the_fence_ttl_back_too(redis_url: str, tag: str) -> None:
    rid = ResourceId(f"input-field-123-{tag}")
    harness = RedisHarness(redis_url)
    try:
        await grant(harness.store, rid, "L1")
        await harness.reader.pexpire(lock_fence_key(rid), 60_000)  # as if granted long ago
        assert await renew(harness.store, rid, "L1", USR1, TTL, T0 + TTL)
        assert await harness.reader.pttl(lock_fence_key(rid)) > FENCE_TTL_MS - 5_000
    finally:
        await harness.aclose(tag)


async def test_a_fence_that_expired_restarts_above_every_token_it_gave(redis_url: str, tag: str) -> None:
    rid = ResourceId(f"input-field-123-{tag}")
    harness = RedisHarness(redis_url)
    try:
        tokens = []
        for i in range(3):
            result = await grant(harness.store, rid, f"L{i}")
            assert isinstance(result, GrantStored)
            await release(harness.store, rid, f"L{i}")
            tokens.append(result.fencing_token)
            await harness.reader.delete(lock_fence_key(rid))  # its 30 days ran out
        assert tokens[0] < tokens[1] < tokens[2]
        # a new counter starts at Redis's clock in microseconds (Redis's, not ours: they may disagree)
        seconds, micros = await harness.reader.time()
        assert abs(tokens[2] - (seconds * 1_000_000 + micros)) < 60_000_000
    finally:
        await harness.aclose(tag)


# --- contention --------------------------------------------------------------------------------


async def test_fifty_racers_get_exactly_one_grant_per_round_with_increasing_tokens(harness: Harness,
                                                                                 rid: ResourceId) -> None:
    # issue 3's contention test, at the store: 50 clients race for one lock, round after round
    tokens: list[int] = []
    for round_ in range(50):
        results = await asyncio.gather(*(grant(harness.store, rid, f"L{round_}-{racer}", UserId(f"usr_{racer}"))
                                         for racer in range(50)))
        winners = [(racer, r) for racer, r in enumerate(results) if isinstance(r, GrantStored)]
        assert len(winners) == 1, f"round {round_}: {len(winners)} grants"
        racer, won = winners[0]
        assert all(r.holder_user_id == f"usr_{racer}" for r in results if isinstance(r, GrantRefused))
        tokens.append(won.fencing_token)
        await release(harness.store, rid, f"L{round_}-{racer}", UserId(f"usr_{racer}"))
    assert all(a < b for a, b in zip(tokens, tokens[1:], strict=False))


# --- answers, order, failures and health -----------------------------------------------------


async def test_each_request_is_answered_with_the_machines_command(harness: Harness, rid: ResourceId) -> None:
    lid, other = LockId("L1"), LockId("L2")
    stored = await ask(harness.store, StoreGrant(rid, lid, USR1, TTL, T0, T0 + TTL, CONN, ROOM))
    assert isinstance(stored, GrantStored) and (stored.resource_id, stored.lock_id) == (rid, lid)
    refused = await ask(harness.store, StoreGrant(rid, other, USR2, TTL, T0, T0 + TTL, CONN, ROOM))
    assert isinstance(refused, GrantRefused) and (refused.lock_id, refused.holder_user_id) == (other, USR1)
    assert await ask(harness.store, StoreRenew(rid, lid, USR1, TTL, T0 + TTL)) is None
    assert await ask(harness.store, StoreRenew(rid, other, USR2, TTL, T0 + TTL)) == LockLost(rid, other)
    assert await ask(harness.store, StoreRelease(rid, lid, USR1)) is None
    assert await harness.holder(rid) is None


async def test_requests_take_effect_in_the_order_submitted_and_never_answer_inside_submit(
        harness: Harness, rid: ResourceId) -> None:
    # the shell submits a release and the next grant in one go: the grant must see the lock gone
    await grant(harness.store, rid, "L1")
    answers: list[StoreAnswer | None] = []
    harness.store.submit(StoreRelease(rid, LockId("L1"), USR1), answers.append)
    harness.store.submit(StoreGrant(rid, LockId("L2"), USR2, TTL, T0, T0 + TTL, CONN, ROOM), answers.append)
    assert answers == []  # answered later, from the event loop
    await eventually(lambda: len(answers) == 2, 2.0, "both answered")
    assert answers[0] is None and isinstance(answers[1], GrantStored)


async def test_something_that_is_not_a_store_request_is_a_bug_raised_in_the_caller(harness: Harness) -> None:
    answers: list[StoreAnswer | None] = []
    with pytest.raises(TypeError):
        harness.store.submit(cast(StoreRequest, "LOCK_ACQUIRE"), answers.append)
    await asyncio.sleep(0.05)
    assert answers == []  # and never answered


async def test_an_unreachable_redis_fails_grants_and_logs_renewals_and_releases(
        rid: ResourceId, caplog: pytest.LogCaptureFixture) -> None:
    store = RedisLockStore(aioredis.Redis(host="127.0.0.1", port=1), timeout_s=0.5)
    try:
        failed = await ask(store, StoreGrant(rid, LockId("L1"), USR1, TTL, T0, T0 + TTL, CONN, ROOM))
        assert isinstance(failed, GrantFailed) and failed.lock_id == "L1"
        assert failed.reason.startswith("ConnectionRefusedError")
        # a failed renew or release changes nothing in the machine: logged, not raised
        assert await ask(store, StoreRenew(rid, LockId("L1"), USR1, TTL, T0 + TTL)) is None
        assert await ask(store, StoreRelease(rid, LockId("L1"), USR1)) is None
        assert len([r for r in caplog.records if r.name == "rounds.locks"]) == 3
    finally:
        await store.aclose()


async def test_a_redis_that_does_not_answer_fails_what_is_in_flight_after_the_timeout(rid: ResourceId) -> None:
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    store = RedisLockStore(aioredis.Redis(host="127.0.0.1", port=port), timeout_s=0.2)
    try:
        started = asyncio.get_running_loop().time()
        answers = await asyncio.gather(*(ask(store, StoreGrant(rid, LockId(f"L{i}"), USR1, TTL, T0, T0 + TTL,
                                                               CONN, ROOM)) for i in range(3)))
        assert [type(a) for a in answers] == [GrantFailed] * 3
        assert all(a.reason.startswith("TimeoutError") for a in answers)
        assert 0.15 < asyncio.get_running_loop().time() - started < 1.0
    finally:
        silent.close()
        await store.aclose()


async def test_the_redis_store_reconnects_after_losing_its_connection(redis_url: str, tag: str,
                                                                      rid: ResourceId) -> None:
    harness = RedisHarness(redis_url)
    store = harness.store
    assert isinstance(store, RedisLockStore)
    try:
        assert isinstance(await grant(store, rid, "L1"), GrantStored)
        assert (await store.health())["lockConnection"]["connected"] is True
        clients = await harness.reader.client_list()
        [ours] = [c for c in clients if c["name"] == store.connection_name]
        await harness.reader.client_kill_filter(_id=ours["id"])
        await harness.reader.script_flush()  # and the scripts are gone too
        async def lost() -> bool:
            return (await store.health())["lockConnection"]["connected"] is False

        await eventually(lost, 2.0, "loss noticed")
        await release(store, rid, "L1")  # on a new connection, scripts loaded again
        assert isinstance(await grant(store, rid, "L2"), GrantStored)
    finally:
        await harness.aclose(tag)


async def test_the_redis_store_runs_on_uvloop_as_in_the_shards(redis_url: str, rid: ResourceId) -> None:
    # shards run uvloop, whose transports are not asyncio.Transport subclasses
    import uvloop

    async def cycle() -> list[StoreAnswer | None]:
        store = RedisLockStore(redisconn.connect(redis_url))
        try:
            return [await ask(store, StoreGrant(rid, LockId("L1"), USR1, TTL, T0, T0 + TTL, CONN, ROOM)),
                    await ask(store, StoreRenew(rid, LockId("L1"), USR1, TTL, T0 + TTL)),
                    await ask(store, StoreRelease(rid, LockId("L1"), USR1))]
        finally:
            await store.aclose()

    stored, renewed, released = await asyncio.to_thread(uvloop.run, cycle())
    assert isinstance(stored, GrantStored) and renewed is None and released is None


async def test_requests_beyond_the_waiting_bound_fail_at_once(rid: ResourceId) -> None:
    store = RedisLockStore(aioredis.Redis(host="127.0.0.1", port=1), timeout_s=0.5, max_waiting=2)
    try:
        answers = await asyncio.gather(*(ask(store, StoreGrant(rid, LockId(f"L{i}"), USR1, TTL, T0, T0 + TTL,
                                                               CONN, ROOM)) for i in range(4)))
        reasons = sorted(a.reason.split(":")[0] for a in answers)
        assert reasons == ["ConnectionError", "ConnectionError", "ConnectionRefusedError", "ConnectionRefusedError"]
    finally:
        await store.aclose()


async def test_an_unreachable_redis_reports_not_ok() -> None:
    no_retry = Retry(NoBackoff(), 0)  # redis-py would otherwise retry for seconds
    broken = RedisLockStore(aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=no_retry))
    try:
        health = await broken.health()
        assert (health["backend"], health["ok"]) == ("redis", False)
    finally:
        await broken.aclose()


async def test_a_healthy_store_reports_ok_with_its_name(harness: Harness) -> None:
    health = await harness.store.health()
    assert health["ok"] is True and health["backend"] == harness.store.name
