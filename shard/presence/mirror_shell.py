"""The presence mirror's writer inside a shard: `MirrorJoin` / `MirrorLeave`
events queued and written to the `PresenceMirror` in batches, in order.

Bounds: at most `MIRROR_QUEUE_MAX` events wait; past it the oldest are
dropped with an error log (the mirror is a copy, the shard's memory stays
the truth) and `/health` shows the drop count. A failed write is tried again
half a second later, its events put back in front of what came meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from rounds.shard.presence.mirror import MirrorEvent, PresenceMirror

log = logging.getLogger(__name__)

MIRROR_QUEUE_MAX = 100_000
RETRY_S = 0.5


class MirrorWriter:
    def __init__(self, name: str, mirror: PresenceMirror) -> None:
        self.name = name
        self.mirror = mirror
        self._queue: deque[MirrorEvent] = deque()
        self._wakeup = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.failures = 0

    async def start(self) -> None:
        """Forget what this owner mirrored before it started (a restarted shard
        rebuilds its rooms from the front doors), then start writing."""
        try:
            cleared = await self.mirror.reset()
            if cleared:
                log.info("%s: cleared %d rooms mirrored before this start", self.name, cleared)
        except Exception:  # Redis down: serve anyway; stale mirror keys are named in the runbook
            log.exception("%s: could not reset the presence mirror", self.name)
        self._task = asyncio.create_task(self._writer(), name=f"{self.name}-mirror")

    async def stop(self) -> None:
        if self._task is not None:
            await self._drain()
            self._task.cancel()
        await self.mirror.aclose()

    def queue(self, event: MirrorEvent) -> None:
        if len(self._queue) >= MIRROR_QUEUE_MAX:
            self._drop_oldest()
        self._queue.append(event)
        self._wakeup.set()

    def stats(self) -> dict[str, Any]:
        return {"backend": self.mirror.name, "queued": len(self._queue), "dropped": self.dropped,
                "failures": self.failures}

    def _drop_oldest(self) -> None:
        self._queue.popleft()
        self.dropped += 1
        if self.dropped % 1000 == 1:
            log.error("%s: mirror queue full, %d events dropped so far", self.name, self.dropped)

    async def _writer(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self._drain()

    async def _drain(self) -> None:
        # One drain at a time: `stop` drains while the writer may be mid-batch,
        # and two batches in flight could reach Redis out of order.
        async with self._lock:
            while self._queue:
                batch = list(self._queue)
                self._queue.clear()
                try:
                    await self.mirror.apply(batch)
                except Exception:
                    self.failures += 1
                    log.exception("%s: presence mirror write failed (%d events)", self.name, len(batch))
                    await asyncio.sleep(RETRY_S)
                    # put them back in front of what came meanwhile, keeping the bound
                    self._queue.extendleft(reversed(batch))
                    while len(self._queue) > MIRROR_QUEUE_MAX:
                        self._drop_oldest()
                    self._wakeup.set()
                    return
