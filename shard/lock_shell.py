"""The lock machine's asyncio shell inside a shard (issue 3).

Feeds lock commands and presence's `MemberGone` to `Locks` with the time,
carries out what it asks of the store (`StoreGrant`, `StoreRenew`,
`StoreRelease`) in tasks and feeds the answers back, and keeps one timer
armed for the next expiry, so a lock nobody asks about still expires on time
and its room hears `RESOURCE_UNLOCKED "expired"`. Replies, room broadcasts
and audit records go to the shard's `dispatch`.

Bounds: a store call that takes longer than `STORE_TIMEOUT_S` counts as
failed (`GrantFailed`: the machine refuses the grant and asks for a release).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from rounds.backends.locks import Granted, LockStore
from rounds.clock import now_ms
from rounds.shard.lock_events import (
    GrantFailed,
    GrantRefused,
    GrantStored,
    LockCommand,
    LockEvent,
    LockLost,
    StoreGrant,
    StoreRelease,
    StoreRenew,
)
from rounds.shard.events import CheckFence, Reply
from rounds.shard.lock_events import AuditLock
from rounds.shard.locks import Locks
from rounds.wire import ErrorCode, MessageType, error_data

log = logging.getLogger(__name__)

STORE_TIMEOUT_S = 2.0


class LockShell:
    def __init__(self, name: str, store: LockStore, dispatch: Callable[[list[Any]], None],
                 default_ttl_ms: int, max_ttl_ms: int) -> None:
        self.name = name
        self.store = store
        self.locks = Locks(lambda: uuid.uuid4().hex, default_ttl_ms=default_ttl_ms, max_ttl_ms=max_ttl_ms)
        self._dispatch = dispatch
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def handle(self, command: LockCommand) -> None:
        self._emit(self.locks.handle(command, now_ms()))

    def _emit(self, events: list[LockEvent]) -> None:
        rest: list[Any] = []
        for event in events:
            match event:
                case StoreGrant():
                    self._spawn(self._grant(event))
                case StoreRenew():
                    self._spawn(self._renew(event))
                case StoreRelease():
                    self._spawn(self._release(event))
                case _:
                    rest.append(event)
        self._dispatch(rest)
        self._arm()

    def check_fence(self, check: CheckFence) -> Reply:
        """The answer to a fenced update: STALE_LOCK unless the token is the live
        lock's. Until documents land (issue 4) a valid one gets UNSUPPORTED."""
        lock = self.locks.holder(check.lock_resource_id)
        if lock is None or lock.fencing_token != check.fencing_token:
            self._dispatch([AuditLock("fence", check.lock_resource_id, None, None, "denied",
                                      {"fencingToken": check.fencing_token, "conn": check.conn})])
            return Reply(check.conn, check.ref, MessageType.ERROR, error_data(
                ErrorCode.STALE_LOCK, "the lock this update is fenced with is no longer held with that token",
                resourceId=check.resource_id, lockResourceId=check.lock_resource_id,
                fencingToken=check.fencing_token,
                currentToken=None if lock is None else lock.fencing_token))
        # TODO(#4): apply the update; the fence is valid.
        return Reply(check.conn, check.ref, MessageType.ERROR, error_data(
            ErrorCode.UNSUPPORTED, "document updates are not served yet", resourceId=check.resource_id))

    # --- the store ----------------------------------------------------------------

    async def _grant(self, ev: StoreGrant) -> None:
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                result = await self.store.grant(ev.resource_id, ev.lock_id, ev.user_id, ev.ttl_ms,
                                                ev.acquired_at_ms, ev.expires_at_ms, ev.lock_type)
        except Exception as exc:  # down, slow or broken: the grant is refused, never assumed
            log.error("%s: lock store grant failed for %s: %r", self.name, ev.resource_id, exc)
            self.handle(GrantFailed(ev.resource_id, ev.lock_id, type(exc).__name__))
            return
        if isinstance(result, Granted):
            self.handle(GrantStored(ev.resource_id, ev.lock_id, result.fencing_token))
        else:
            self.handle(GrantRefused(ev.resource_id, ev.lock_id, result.holder_user_id, result.expires_at_ms))

    async def _renew(self, ev: StoreRenew) -> None:
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                kept = await self.store.renew(ev.resource_id, ev.lock_id, ev.user_id, ev.ttl_ms, ev.expires_at_ms)
        except Exception as exc:  # the lock stays live here until its old deadline
            log.error("%s: lock store renew failed for %s: %r", self.name, ev.resource_id, exc)
            return
        if not kept:
            self.handle(LockLost(ev.resource_id, ev.lock_id))

    async def _release(self, ev: StoreRelease) -> None:
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                await self.store.release(ev.resource_id, ev.lock_id, ev.user_id)
        except Exception as exc:  # the store's own TTL removes it
            log.error("%s: lock store release failed for %s: %r", self.name, ev.resource_id, exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- expiry -------------------------------------------------------------------

    def _arm(self) -> None:
        deadline = self.locks.next_deadline()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            delay_s = max(0.0, (deadline - now_ms()) / 1000)
            self._timer = asyncio.get_running_loop().call_later(delay_s, self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._timer_at = None
        self._emit(self.locks.expire(now_ms()))

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=STORE_TIMEOUT_S)
        await self.store.aclose()
