"""The front door's links to the shards, and the routing of resources to them.

`update(version, book)` takes the address book pushed by the supervisor (a
versioned snapshot, never fetched per message). Each shard gets one
`LinkProtocol` connection that reconnects with backoff when it drops (a shard
actor restarted by Ray comes back on a new port, announced in a new book).
On every (re)connect the front door sends `Hello`, then `Sync` with its full
membership on that shard, then each member's last awareness: a restarted
shard rebuilds its rooms (cursors included), a shard that missed disconnects
while the link was down forgets them, and both tell every member its room
again (`TellState.refresh`), since deliveries to it may have been lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial

from rounds.ids import FrontDoorId, ResourceId, ShardId
from rounds.protocol.link import Hello, LinkMessage
from rounds.protocol.messages import Join, Sync
from rounds.protocol.stream import LinkProtocol
from rounds.routing import HashRing

log = logging.getLogger(__name__)

# What a shard is told when its link (re)opens: the memberships it owns (its
# Sync), then messages that follow them (the members' last awareness).
Restore = Callable[[ShardId], tuple[list[Join], list[LinkMessage]]]

Address = tuple[str, int]
RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 1.0
CONNECT_TIMEOUT_S = 3.0


class _ShardLink:
    def __init__(self, owner: ShardLinks, shard: ShardId, address: Address) -> None:
        self.owner = owner
        self.shard = shard
        self.address = address
        self.protocol: LinkProtocol | None = None
        self.stopped = False
        self.task = asyncio.create_task(self._run(), name=f"link-shard-{shard}")

    @property
    def up(self) -> bool:
        return self.protocol is not None and self.protocol.connected

    async def _run(self) -> None:
        delay = RECONNECT_MIN_S
        loop = asyncio.get_running_loop()
        while not self.stopped:
            lost: asyncio.Future[None] = loop.create_future()
            try:
                # Bounded: a shard on a vanished node would otherwise hold this
                # loop for the kernel's SYN timeout (minutes), not our backoff.
                _, protocol = await asyncio.wait_for(loop.create_connection(
                    partial(self._protocol, lost), *self.address), CONNECT_TIMEOUT_S)
            except OSError as exc:  # TimeoutError included
                log.warning("shard-%d at %s:%d unreachable (%s); retrying in %.2fs",
                            self.shard, *self.address, str(exc) or type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            delay = RECONNECT_MIN_S
            self.protocol = protocol
            protocol.send(Hello(self.owner.frontdoor, self.owner.epoch, self.owner.node))
            self.resync()
            log.info("linked to shard-%d at %s:%d", self.shard, *self.address)
            await lost
            self.protocol = None
            self.owner.on_down(self.shard)
            if not self.stopped:
                log.warning("link to shard-%d lost; reconnecting", self.shard)

    def _protocol(self, lost: asyncio.Future[None]) -> LinkProtocol:
        """A link whose end resolves `lost`."""
        def on_lost(exc: Exception | None) -> None:
            if not lost.done():
                lost.set_result(None)

        return LinkProtocol(self.owner.on_message, on_lost)

    def resync(self) -> None:
        if self.protocol is not None:
            joins, after = self.owner.restore(self.shard)
            self.protocol.send(Sync(self.owner.frontdoor, tuple(joins)))
            for msg in after:
                self.protocol.send(msg)

    def send(self, msg: LinkMessage) -> bool:
        return self.protocol is not None and self.protocol.send(msg)

    def stop(self) -> None:
        self.stopped = True
        if self.protocol is not None:
            self.protocol.close()
        self.task.cancel()


class ShardLinks:
    """Routes resources to shards and carries messages to them."""

    def __init__(self, frontdoor: FrontDoorId, epoch: str,
                 on_message: Callable[[LinkMessage], None],
                 restore: Restore, on_down: Callable[[ShardId], None] = lambda shard: None,
                 node: str = "local") -> None:
        self.frontdoor = frontdoor
        self.epoch = epoch
        self.node = node
        self.on_message = on_message
        self.on_down = on_down
        self.restore = restore
        self.version = -1
        self.ring: HashRing | None = None
        self._links: dict[ShardId, _ShardLink] = {}

    def update(self, version: int, book: dict[ShardId, Address]) -> None:
        """Apply a newer address book; older or equal versions are ignored."""
        if version <= self.version:
            return
        self.version = version
        ring_changed = self.ring is None or set(self.ring.shards) != set(book)
        if book:
            self.ring = HashRing(book)
        for shard in list(self._links):
            if shard not in book or self._links[shard].address != tuple(book[shard]):
                self._links.pop(shard).stop()
        for shard, address in book.items():
            if shard not in self._links:
                self._links[shard] = _ShardLink(self, ShardId(shard), (address[0], int(address[1])))
        if ring_changed:
            # Memberships may now belong to other shards: tell every shard
            # what it owns (a moved room is dropped where it was, rebuilt here).
            for link in self._links.values():
                link.resync()

    def route(self, resource: ResourceId) -> ShardId | None:
        return None if self.ring is None else self.ring.shard_for(resource)

    def send(self, shard: ShardId, msg: LinkMessage) -> bool:
        link = self._links.get(shard)
        return link is not None and link.send(msg)

    def up(self, shard: ShardId) -> bool:
        link = self._links.get(shard)
        return link is not None and link.up

    def status(self) -> dict[int, bool]:
        return {shard: link.up for shard, link in sorted(self._links.items())}

    def close(self) -> None:
        for link in self._links.values():
            link.stop()
        self._links.clear()
