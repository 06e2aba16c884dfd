"""What carries the relay's batches between nodes: a small Protocol, and its
memory twin.

A transport makes the two ends of one gateway's relay: a shard's
`publisher` and a front door's `consumer` (its queue, named by the front
door's index). The RabbitMQ transport (`rounds.relay.amqp`) is what a
multi-node deployment uses; `MemoryRelay` carries the same batches between
services of one process, with the broker's habits that the shells rely on
(an unroutable batch is refused, a queue outlives its consumer's reconnect,
the broker can be down), so the relay's shells run the same in one process.
Both pass one suite (tests/backends/test_relay_transport.py). The
composition root picks the transport (`rounds.cluster.compose`) and hands
it to the shells; nothing else builds one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

# a batch as it arrives: shard index, shard epoch, the front door epoch it is
# for, its number, and its body (length-prefixed link frames)
OnBatch = Callable[[int, str, str, int, bytes], None]
# a publish's outcome: True once the broker confirmed it
Done = Callable[[bool], None]


class RelayPublisher(Protocol):
    """A shard's end: publishes a batch for one front door."""

    @property
    def ready(self) -> bool:
        """Connected: a publish may succeed."""
        ...

    @property
    def last_error(self) -> str | None: ...

    def start(self) -> None:
        """Connect in the background (retrying); the gateway runs meanwhile."""

    def publish(self, frontdoor: int, headers: dict[str, Any], body: bytes, done: Done) -> None:
        """Publish in the background; `done(True)` once confirmed, `done(False)`
        if refused, unroutable (no queue for that front door), timed out or
        the connection went. `done` is never called from inside `publish`."""

    async def close(self) -> None: ...


class RelayConsumer(Protocol):
    """A front door's end: its queue, read into `on_batch`."""

    received: int

    @property
    def up(self) -> bool:
        """Reading its queue."""
        ...

    @property
    def last_error(self) -> str | None: ...

    def start(self) -> None:
        """Connect and bind the queue in the background (retrying)."""

    async def close(self) -> None: ...


class RelayTransport(Protocol):
    def publisher(self, name: str) -> RelayPublisher:
        """The end of the shard called `name` ("shard-3")."""
        ...

    def consumer(self, frontdoor: int, name: str, on_batch: OnBatch) -> RelayConsumer:
        """The end of front door `frontdoor` (its queue), called `name`."""
        ...


# --- in memory ----------------------------------------------------------------------


@dataclass(slots=True)
class _Queue:
    """A front door's queue: batches wait here while nobody consumes it."""

    waiting: deque[tuple[dict[str, Any], bytes]] = field(default_factory=deque)
    consumer: MemoryConsumer | None = None


class MemoryRelay:
    """The relay's broker inside one process: one exchange, a queue per front
    door, made when its consumer first starts and kept when it stops (as the
    RabbitMQ queue outlives a consumer's reconnect). `down` stands for the
    broker being unreachable: publishes fail and consumers are not up."""

    def __init__(self) -> None:
        self.queues: dict[int, _Queue] = {}
        self.down = False

    def publisher(self, name: str) -> MemoryPublisher:
        return MemoryPublisher(self, name)

    def consumer(self, frontdoor: int, name: str, on_batch: OnBatch) -> MemoryConsumer:
        return MemoryConsumer(self, frontdoor, name, on_batch)

    def _route(self, frontdoor: int, headers: dict[str, Any], body: bytes) -> bool:
        queue = self.queues.get(frontdoor)
        if self.down or queue is None:
            return False  # unroutable: nobody has declared that queue yet
        queue.waiting.append((dict(headers), body))
        if queue.consumer is not None and queue.consumer.up:
            asyncio.get_running_loop().call_soon(queue.consumer._drain)
        return True


class _MemoryEnd:
    """What both ends share: started or not, and the broker's state."""

    def __init__(self, broker: MemoryRelay, name: str) -> None:
        self._broker = broker
        self.name = name
        self._started = False

    @property
    def connected(self) -> bool:
        return self._started and not self._broker.down

    @property
    def last_error(self) -> str | None:
        return "memory relay down" if self._broker.down else None


class MemoryPublisher(_MemoryEnd):
    @property
    def ready(self) -> bool:
        return self.connected

    def start(self) -> None:
        self._started = True

    def publish(self, frontdoor: int, headers: dict[str, Any], body: bytes, done: Done) -> None:
        ok = self._started and self._broker._route(frontdoor, headers, body)
        asyncio.get_running_loop().call_soon(done, ok)

    async def close(self) -> None:
        self._started = False


class MemoryConsumer(_MemoryEnd):
    def __init__(self, broker: MemoryRelay, frontdoor: int, name: str, on_batch: OnBatch) -> None:
        super().__init__(broker, name)
        self.frontdoor = frontdoor
        self._on_batch = on_batch
        self.received = 0

    @property
    def up(self) -> bool:
        return self.connected

    def start(self) -> None:
        self._started = True
        queue = self._broker.queues.setdefault(self.frontdoor, _Queue())
        queue.consumer = self
        asyncio.get_running_loop().call_soon(self._drain)

    def _drain(self) -> None:
        queue = self._broker.queues.get(self.frontdoor)
        while self.up and queue is not None and queue.consumer is self and queue.waiting:
            headers, body = queue.waiting.popleft()
            self.received += 1
            self._on_batch(int(headers["shard"]), str(headers["epoch"]), str(headers["to"]),
                           int(headers["seq"]), body)

    async def close(self) -> None:
        self._started = False
        queue = self._broker.queues.get(self.frontdoor)
        if queue is not None and queue.consumer is self:
            queue.consumer = None
