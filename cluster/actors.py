"""Ray actors: thin shells that host a shard or a front door on a uvloop thread.

Only `rounds.cluster` imports Ray. Each actor is its own process, named
(`shard-3`, `frontdoor-1`) so it shows by name in the Ray dashboard, and
restarted by Ray when it dies (`max_restarts=-1`); on restart `__init__` runs
again and the supervisor pushes the address book anew. The actor methods are
the control plane only (address, stats, health, drain); client traffic and
shard traffic never pass through them.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

import ray

from rounds import gcwatch, logs
from rounds.cluster import metrics
from rounds.cluster.compose import make_frontdoor, make_shard
from rounds.cluster.threadloop import ThreadLoop
from rounds.config import Settings

log = logging.getLogger(__name__)

ACTOR_OPTIONS = {"max_restarts": -1, "max_task_retries": 0, "num_cpus": 0, "max_concurrency": 4}


def _bind_host(settings: Settings) -> str:
    """Shards listen where front doors on other nodes can reach them."""
    return ray.util.get_node_ip_address() if settings.ray_address else "127.0.0.1"


def _on_this_node(settings: Settings) -> Settings:
    """The settings with this actor's node: the relay sends to front doors
    of other nodes through RabbitMQ (`rounds.relay`)."""
    return settings if settings.node_id else settings.replace(node_id=ray.get_runtime_context().get_node_id())


def _freeze_heap(settings: Settings) -> None:
    """Move everything alive after start-up (Ray, its imports, ours) out of
    the collector's sight: a full collection then walks only what serving
    allocates, instead of pausing the event loop for tens of ms to re-check
    hundreds of thousands of long-lived objects. Young collections come
    every `gc_young_threshold` allocations (docs/benchmarks.md, "Garbage
    collection", for what a higher one gains and costs)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(settings.gc_young_threshold, older, oldest)
    gcwatch.install()


@ray.remote
class ShardActor:
    def __init__(self, index: int, settings: Settings) -> None:
        logs.configure()
        self.index = index
        self._loop = ThreadLoop(f"shard-{index}")
        self._service = self._loop.call(make_shard, index, _on_this_node(settings))
        self._address = self._loop.run(self._service.start(_bind_host(settings), 0))
        self._metrics = metrics.ShardMetrics(index, self.stats, settings.ray_namespace)
        _freeze_heap(settings)

    def address(self) -> tuple[str, int]:
        return self._address

    def stats(self) -> dict[str, Any]:
        return {**self._loop.call(self._service.stats), "gc": gcwatch.stats()}

    def health(self) -> dict[str, Any]:
        return self._loop.run(self._service.health(), timeout=5)

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        self._metrics.stop()
        self._loop.run(self._service.stop(), timeout=3)


@ray.remote
class FrontDoorActor:
    def __init__(self, index: int, settings: Settings) -> None:
        logs.configure()
        self.index = index
        self._loop = ThreadLoop(f"frontdoor-{index}")
        self._door = self._loop.call(make_frontdoor, index, _on_this_node(settings))
        self._loop.run(self._door.start())
        self._metrics = metrics.FrontDoorMetrics(index, self.stats, settings.ray_namespace)
        _freeze_heap(settings)

    def set_address_book(self, version: int, book: dict[int, tuple[str, int]]) -> int:
        self._loop.call(self._door.set_address_book, version, book)
        return self._door.links.version

    def stats(self) -> dict[str, Any]:
        return {**self._loop.call(self._door.stats), "gc": gcwatch.stats()}

    def health(self) -> dict[str, Any]:
        return self._loop.run(self._door.health(), timeout=5)

    def pid(self) -> int:
        return os.getpid()

    def drain(self, timeout_s: float = 1.5) -> None:
        self._metrics.stop()
        self._loop.run(self._door.drain(timeout_s), timeout=timeout_s + 1)
