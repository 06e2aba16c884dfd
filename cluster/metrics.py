"""Gateway gauges exported through Ray's metrics (`ray.util.metrics`), so they
appear in the Ray dashboard and its Prometheus endpoint next to Ray's own.

A small thread samples the service's `stats()` every few seconds; the hot
path updates nothing here.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

from ray.util.metrics import Gauge

log = logging.getLogger(__name__)
PERIOD_S = 5.0


@functools.cache
def _gauge(name: str, description: str, tag: str) -> Gauge:
    # Created on first use, inside the actor process, after Ray is up. Every
    # gauge also carries `gateway` (the Ray namespace): two gateways in one
    # Ray cluster (staging beside production, the audit bench's pair) report
    # separate series instead of overwriting each other's.
    return Gauge(name, description, tag_keys=(tag, "gateway"))



class _Sampler:
    def __init__(self, name: str, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(PERIOD_S):
            try:
                self.record(self._stats())
            except Exception:
                log.exception("metrics sampling failed")

    def record(self, stats: dict[str, Any]) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stop.set()


class FrontDoorMetrics(_Sampler):
    def __init__(self, index: int, stats: Callable[[], dict[str, Any]], gateway: str) -> None:
        self._tags = {"frontdoor": str(index), "gateway": gateway}
        super().__init__(f"frontdoor-{index}", stats)

    def record(self, stats: dict[str, Any]) -> None:
        tag = "frontdoor"
        _gauge("rounds_frontdoor_connections", "Open client connections", tag).set(stats["connections"], self._tags)
        _gauge("rounds_frontdoor_rejected", "Handshakes refused (auth, capacity)", tag).set(
            stats["rejected"], self._tags)
        _gauge("rounds_frontdoor_shards_linked", "Shards linked", tag).set(sum(stats["shards"].values()), self._tags)


class ShardMetrics(_Sampler):
    def __init__(self, index: int, stats: Callable[[], dict[str, Any]], gateway: str) -> None:
        self._tags = {"shard": str(index), "gateway": gateway}
        super().__init__(f"shard-{index}", stats)

    def record(self, stats: dict[str, Any]) -> None:
        tag = "shard"
        _gauge("rounds_shard_rooms", "Rooms with at least one member", tag).set(stats["rooms"], self._tags)
        _gauge("rounds_shard_members", "Connection memberships in rooms", tag).set(stats["members"], self._tags)
        _gauge("rounds_shard_mirror_queued", "Presence mirror writes waiting", tag).set(
            stats["mirror"]["queued"], self._tags)
        docs = stats["documents"]
        _gauge("rounds_shard_documents_loaded", "Y.js documents in memory", tag).set(docs["loaded"], self._tags)
        _gauge("rounds_shard_documents_unwritten", "Document updates applied, not yet stored (acks waiting)",
               tag).set(docs["unwritten"], self._tags)
        _gauge("rounds_shard_locks", "Locks held", tag).set(len(stats["locks"]), self._tags)
        relay = stats.get("relay")
        if relay:
            _gauge("rounds_shard_relay_circuit_open", "Cross-node relay: 1 while RabbitMQ is bypassed", tag).set(
                0 if relay["circuit"] == "closed" else 1, self._tags)
            _gauge("rounds_shard_relay_unacked", "Cross-node relay: batches not yet acknowledged by front doors",
                   tag).set(sum(relay["unacked"].values()), self._tags)
            _gauge("rounds_shard_relay_over_link", "Cross-node relay: batches sent over the links (total)",
                   tag).set(relay["over_link"], self._tags)
