"""The lock machine's asyncio shell inside a shard (issue 3).

Feeds lock commands and presence's `MemberGone` to `Locks` with the time,
hands what it asks of the store (`StoreGrant`, `StoreRenew`, `StoreRelease`)
to the store with a callback that feeds the answer back, and keeps one timer
armed for the next expiry, so a lock nobody asks about still expires on time
and its room hears `RESOURCE_UNLOCKED "expired"`. Replies, room broadcasts
and audit records go to the shard's `dispatch`.

On `start()` the shell adopts the live locks the store holds for rooms this
shard owns (a restart: Ray brought the actor back with empty memory, the
front doors kept the holders' connections), so they can still be renewed
and released and are announced "expired" when their time comes.

The store carries out requests in the order they are submitted (a release
reaches it before the next grant of the resource) and answers each exactly
once; one unanswered for `rounds.shard.locks.store.STORE_TIMEOUT_S` fails (`GrantFailed`:
the machine refuses the grant and asks for a release).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

from rounds.clock import now_ms
from rounds.ids import ResourceId
from rounds.shard.locks.events import (
    LockAdopt,
    LockCommand,
    LockEvent,
    StoreGrant,
    StoreRelease,
    StoreRenew,
)
from rounds.shard.locks.machine import Locks
from rounds.shard.locks.store import LockStore, StoreAnswer
from rounds.shard.timer import DeadlineTimer

log = logging.getLogger(__name__)

ADOPT_TIMEOUT_S = 10.0  # listing live locks at start; past it, the rest end at their store TTL


def _owns_everything(room: ResourceId) -> bool:
    return True


class LockShell:
    def __init__(self, name: str, store: LockStore, dispatch: Callable[[list[Any]], None],
                 default_ttl_ms: int, max_ttl_ms: int,
                 owns: Callable[[ResourceId], bool] = _owns_everything) -> None:
        """`owns(room)`: whether this shard owns the room (the hash ring's
        answer); only those rooms' locks are adopted on `start()`. The default
        suits a gateway of one shard."""
        self.name = name
        self._owns = owns
        self.store = store
        self.locks = Locks(lambda: uuid.uuid4().hex, default_ttl_ms=default_ttl_ms, max_ttl_ms=max_ttl_ms)
        self._dispatch = dispatch
        self._timer = DeadlineTimer(self._expire)
        self._stopped = False

    def handle(self, command: LockCommand) -> None:
        self._emit(self.locks.handle(command, now_ms()))

    def _emit(self, events: list[LockEvent]) -> None:
        rest: list[Any] = []
        for event in events:
            match event:
                case StoreGrant() | StoreRenew() | StoreRelease():
                    self.store.submit(event, self._answered)  # written to the store first, before the rest
                case _:
                    rest.append(event)
        self._dispatch(rest)
        self._arm()

    def _answered(self, answer: StoreAnswer | None) -> None:
        if answer is not None and not self._stopped:
            self.handle(answer)

    # --- expiry -------------------------------------------------------------------

    def _arm(self) -> None:
        self._timer.arm(self.locks.next_deadline())

    def _expire(self) -> None:
        self._emit(self.locks.expire(now_ms()))

    async def start(self) -> None:
        """Adopt the store's live locks of rooms this shard owns. Called once
        when the shard starts, before front doors link. A store that fails or
        is slow only costs adoption: the locks left out end at their store TTL,
        and others are refused until then, as before the restart."""
        offered = skipped = 0
        try:
            async with asyncio.timeout(ADOPT_TIMEOUT_S):
                async for held in self.store.held_locks():
                    if not self._owns(held.room_id):
                        skipped += 1
                        continue
                    self.handle(LockAdopt(held.resource_id, held.lock_id, held.conn, held.user_id, held.room_id,
                                          held.ttl_ms, held.acquired_at_ms, held.expires_at_ms,
                                          held.fencing_token))
                    offered += 1
        except Exception:  # logged with its stack; the shard serves without the rest
            log.exception("%s: listing live locks failed after %d", self.name, offered)
        if offered or skipped:
            log.info("%s: adopted %d live locks (%d in other shards' rooms left alone)",
                     self.name, len(self.locks.locks()), skipped)

    async def stop(self) -> None:
        """Stop expiring; requests in flight finish in the store, their answers
        are dropped (the shard is going away)."""
        self._timer.cancel()
        self._stopped = True
        await self.store.aclose()
