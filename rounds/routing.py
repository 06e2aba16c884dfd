"""Consistent hashing of resources onto shards.

Each shard owns `vnodes` points on a 64-bit ring; a resource belongs to the
first point at or after the hash of its routing key (its parent for
hierarchical ids, see `rounds.ids.routing_key`). Adding a shard to N moves
about 1/(N+1) of the resources, and only onto the new shard. Pure: no I/O.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

from rounds.ids import ResourceId, ShardId, routing_key

DEFAULT_VNODES = 160


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class HashRing:
    """An immutable ring; build a new one when the set of shards changes."""

    __slots__ = ("shards", "_points", "_owners")

    def __init__(self, shards: Iterable[ShardId], vnodes: int = DEFAULT_VNODES) -> None:
        self.shards: tuple[ShardId, ...] = tuple(sorted(set(shards)))
        if not self.shards:
            raise ValueError("a hash ring needs at least one shard")
        points = sorted(
            (_hash(f"shard-{shard}#{v}"), shard) for shard in self.shards for v in range(vnodes)
        )
        self._points = [p for p, _ in points]
        self._owners = [s for _, s in points]

    def shard_for_key(self, key: str) -> ShardId:
        i = bisect.bisect_left(self._points, _hash(key))
        return self._owners[i % len(self._owners)]

    def shard_for(self, resource: ResourceId) -> ShardId:
        """The shard that owns `resource` (and its whole family)."""
        return self.shard_for_key(routing_key(resource))
