"""The whole gateway in one process and one event loop, without Ray.

The same shard and front-door classes the Ray actors host, wired directly:
for integration tests that need a gateway in milliseconds and for profiling.
`rounds up` (`rounds.cluster.launch`) is what users run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from rounds.audit.events import AuditSink
from rounds.cluster.compose import make_frontdoor, make_shard
from rounds.config import Settings
from rounds.frontdoor.server import FrontDoor
from rounds.ids import ShardId
from rounds.relay.transport import RelayTransport
from rounds.shard.service import ShardService


class InProcessGateway:
    def __init__(self, settings: Settings, audit: AuditSink | None = None,
                 node_of: Callable[[str, int], str] | None = None, relay: RelayTransport | None = None) -> None:
        """`node_of(kind, index)` ("shard" or "frontdoor") puts services on
        pretend nodes, for the cross-node relay; default: all on one.
        `relay`: the relay's transport for all of them (e.g. a `MemoryRelay`)
        instead of the one the settings name."""
        self.settings = settings
        self.audit = audit
        self._node_of = node_of
        self._relay = relay
        self.shards: list[ShardService] = []
        self.frontdoors: list[FrontDoor] = []

    @property
    def url(self) -> str:
        return f"ws://{self.settings.host}:{self.settings.port}/ws"

    async def start(self, timeout_s: float = 10) -> InProcessGateway:
        self.shards = [make_shard(i, self._on("shard", i), self.audit, self._relay)
                       for i in range(self.settings.shards)]
        book = {ShardId(i): await s.start() for i, s in enumerate(self.shards)}
        self.frontdoors = [make_frontdoor(i, self._on("frontdoor", i), self.audit, self._relay)
                           for i in range(self.settings.frontdoors)]
        for fd in self.frontdoors:
            await fd.start()
            fd.set_address_book(1, book)
        async with asyncio.timeout(timeout_s):
            while not all(all(fd.links.status().values()) for fd in self.frontdoors):
                await asyncio.sleep(0.01)
        return self

    def _on(self, kind: str, index: int) -> Settings:
        return self.settings if self._node_of is None else self.settings.replace(node_id=self._node_of(kind, index))

    async def stop(self) -> None:
        for fd in self.frontdoors:
            await fd.drain(timeout_s=1)
        for shard in self.shards:
            await shard.stop()

    def stats(self) -> dict[str, Any]:
        return {"shards": [s.stats() for s in self.shards], "frontdoors": [f.stats() for f in self.frontdoors]}

    async def __aenter__(self) -> InProcessGateway:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
