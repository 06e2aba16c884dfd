"""Every `SessionStore` passes this one suite (STYLE habit 5): memory and Redis.

The seed's keys (story BE-001.1): `user:{id}:session` holds one field per
open session and lives `session_ttl_ms`; `user:{id}:activity` holds the last
activity and lives `idle_timeout_ms`; both are reset by `touch`. A small
reader per implementation turns its storage back into the same observable
state: Redis through HGETALL/GET/PTTL on the real test database, memory
through its dicts and recorded deadlines.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import pytest
import redis.asyncio as aioredis

from rounds import redisconn
from rounds.clock import now_ms
from rounds.frontdoor.sessions import MemorySessions, SessionStore
from rounds.frontdoor.sessions_redis import RedisSessions, activity_key, session_key
from rounds.ids import SessionId, UserId

SESSION_TTL_MS = 3_600_000
ACTIVITY_TTL_MS = 300_000
# Redis counts TTLs down in real time while a test runs; this is the slack.
TTL_SLACK_MS = 5_000


@dataclass(frozen=True)
class Stored:
    """What another reader sees of one user: sessions, activity and TTLs."""

    sessions: dict[str, dict[str, Any]]
    activity_ms: int | None
    session_ttl_ms: int | None  # remaining time to live, None if no key
    activity_ttl_ms: int | None


class Reader(Protocol):
    async def read(self, user: UserId) -> Stored: ...

    async def age(self, user: UserId, ms: int) -> None:
        """Make the user's keys look `ms` older (their TTLs shorter)."""


class MemoryReader:
    def __init__(self, store: MemorySessions) -> None:
        self.store = store

    async def read(self, user: UserId) -> Stored:
        now = now_ms()
        deadline = self.store.session_deadline_ms.get(user)
        activity = self.store.activity_ms.get(user)
        return Stored(
            sessions={s: dict(info) for s, info in self.store.sessions.get(user, {}).items()},
            activity_ms=activity,
            session_ttl_ms=None if deadline is None else deadline - now,
            activity_ttl_ms=None if activity is None else activity + self.store.activity_ttl_ms - now,
        )

    async def age(self, user: UserId, ms: int) -> None:
        self.store.session_deadline_ms[user] -= ms
        self.store.activity_ms[user] -= ms


class RedisReader:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def read(self, user: UserId) -> Stored:
        skey, akey = session_key(user), activity_key(user)
        raw = await self.client.hgetall(skey)
        activity = await self.client.get(akey)
        return Stored(
            sessions={s: json.loads(info) for s, info in raw.items()},
            activity_ms=None if activity is None else int(activity),
            session_ttl_ms=_ttl(await self.client.pttl(skey)),
            activity_ttl_ms=_ttl(await self.client.pttl(akey)),
        )

    async def age(self, user: UserId, ms: int) -> None:
        for key in (session_key(user), activity_key(user)):
            await self.client.pexpire(key, await self.client.pttl(key) - ms)


def _ttl(pttl: int) -> int | None:
    assert pttl != -1, "a session key without a TTL would live forever"
    return None if pttl == -2 else pttl


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[tuple[SessionStore, Reader]]:
    if request.param == "memory":
        memory = MemorySessions(SESSION_TTL_MS, ACTIVITY_TTL_MS)
        yield memory, MemoryReader(memory)
        return
    sessions = RedisSessions(redisconn.connect(redis_url), SESSION_TTL_MS, ACTIVITY_TTL_MS)
    reader_client = redisconn.connect(redis_url)
    try:
        yield sessions, RedisReader(reader_client)
    finally:
        for key in [k async for k in reader_client.scan_iter(match="user:bk-*")]:
            await reader_client.delete(key)
        await reader_client.aclose()
        await sessions.aclose()


@pytest.fixture
def user() -> UserId:
    return UserId(f"bk-{uuid.uuid4().hex[:8]}")


def near(remaining: int | None, ttl_ms: int) -> bool:
    return remaining is not None and ttl_ms - TTL_SLACK_MS <= remaining <= ttl_ms


async def test_opening_a_session_stores_its_info_and_the_users_activity(store, user) -> None:
    sessions, reader = store
    now = now_ms()
    await sessions.open(user, SessionId("s1"), {"frontdoor": 0, "role": "surgeon", "connectedAt": now}, now)
    seen = await reader.read(user)
    assert seen.sessions == {"s1": {"frontdoor": 0, "role": "surgeon", "connectedAt": now}}
    assert seen.activity_ms == now


async def test_an_open_session_lives_the_session_ttl_and_activity_the_idle_timeout(store, user) -> None:
    sessions, reader = store
    await sessions.open(user, SessionId("s1"), {}, now_ms())
    seen = await reader.read(user)
    assert near(seen.session_ttl_ms, SESSION_TTL_MS), seen
    assert near(seen.activity_ttl_ms, ACTIVITY_TTL_MS), seen


async def test_touching_a_session_records_the_activity_and_resets_both_ttls(store, user) -> None:
    sessions, reader = store
    await sessions.open(user, SessionId("s1"), {"role": "nurse"}, now_ms())
    await reader.age(user, 60_000)
    before = await reader.read(user)
    assert not near(before.session_ttl_ms, SESSION_TTL_MS)
    assert not near(before.activity_ttl_ms, ACTIVITY_TTL_MS)

    touched = now_ms()
    await sessions.touch(user, SessionId("s1"), touched)
    after = await reader.read(user)
    assert after.activity_ms == touched
    assert near(after.session_ttl_ms, SESSION_TTL_MS), after
    assert near(after.activity_ttl_ms, ACTIVITY_TTL_MS), after
    assert after.sessions == {"s1": {"role": "nurse"}}


async def test_closing_the_only_session_removes_the_session_and_the_activity(store, user) -> None:
    sessions, reader = store
    await sessions.open(user, SessionId("s1"), {"role": "nurse"}, now_ms())
    await sessions.close(user, SessionId("s1"))
    assert await reader.read(user) == Stored({}, None, None, None)


async def test_two_sessions_of_one_user_are_both_listed(store, user) -> None:
    sessions, reader = store
    now = now_ms()
    await sessions.open(user, SessionId("tab-1"), {"frontdoor": 0}, now)
    await sessions.open(user, SessionId("tab-2"), {"frontdoor": 1}, now + 1)
    seen = await reader.read(user)
    assert seen.sessions == {"tab-1": {"frontdoor": 0}, "tab-2": {"frontdoor": 1}}
    assert seen.activity_ms == now + 1


async def test_closing_one_of_two_sessions_keeps_the_other_and_the_activity(store, user) -> None:
    sessions, reader = store
    now = now_ms()
    await sessions.open(user, SessionId("tab-1"), {"frontdoor": 0}, now)
    await sessions.open(user, SessionId("tab-2"), {"frontdoor": 1}, now)
    await sessions.close(user, SessionId("tab-1"))
    seen = await reader.read(user)
    assert seen.sessions == {"tab-2": {"frontdoor": 1}}
    assert seen.activity_ms == now
    assert near(seen.session_ttl_ms, SESSION_TTL_MS)
    assert near(seen.activity_ttl_ms, ACTIVITY_TTL_MS)


async def test_closing_the_last_of_two_sessions_removes_both_keys(store, user) -> None:
    sessions, reader = store
    now = now_ms()
    await sessions.open(user, SessionId("tab-1"), {}, now)
    await sessions.open(user, SessionId("tab-2"), {}, now)
    await sessions.close(user, SessionId("tab-2"))
    await sessions.close(user, SessionId("tab-1"))
    assert await reader.read(user) == Stored({}, None, None, None)


async def test_closing_a_session_twice_or_an_unknown_one_is_harmless(store, user) -> None:
    sessions, reader = store
    now = now_ms()
    await sessions.open(user, SessionId("tab-1"), {}, now)
    await sessions.close(user, SessionId("never-opened"))
    assert set((await reader.read(user)).sessions) == {"tab-1"}
    await sessions.close(user, SessionId("tab-1"))
    await sessions.close(user, SessionId("tab-1"))
    assert await reader.read(user) == Stored({}, None, None, None)


async def test_sessions_of_different_users_are_kept_apart(store, user) -> None:
    sessions, reader = store
    other = UserId(f"{user}-other")
    now = now_ms()
    await sessions.open(user, SessionId("s1"), {"who": "me"}, now)
    await sessions.open(other, SessionId("s1"), {"who": "other"}, now)
    await sessions.close(user, SessionId("s1"))
    assert await reader.read(user) == Stored({}, None, None, None)
    assert (await reader.read(other)).sessions == {"s1": {"who": "other"}}


async def test_a_healthy_store_reports_ok_with_its_name(store) -> None:
    sessions, _ = store
    health = await sessions.health()
    assert health["ok"] is True
    assert health["backend"] == sessions.name


async def test_an_unreachable_redis_reports_not_ok_with_the_reason() -> None:
    # Port 1 refuses at once: nothing listens there.
    sessions = RedisSessions(redisconn.connect("redis://127.0.0.1:1/0"), SESSION_TTL_MS, ACTIVITY_TTL_MS)
    started = time.monotonic()
    try:
        health = await sessions.health()
    finally:
        await sessions.aclose()
    assert health["ok"] is False
    assert health["backend"] == "redis"
    assert "Connection" in health["error"]
    assert time.monotonic() - started < 5
