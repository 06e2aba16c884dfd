"""A front door's side of the cross-node relay (story BE-001.5, `rounds.relay.stream`).

Batches from shards on other nodes arrive through RabbitMQ (this front
door's queue) or over the direct link (`RelayBatch`: what the shard could
not publish, or sent again). Per shard, `RelayIn` puts them in order and
drops duplicates; their frames then go where the link's would. Every
`ACK_S` the front door tells each shard how far it got and what it misses
(`RelayAck`, over the link).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from rounds.ids import FrontDoorId, ShardId
from rounds.protocol.link import LinkMessage, RelayAck, RelayBatch, RelayReset, decode_frames
from rounds.relay.stream import RelayIn
from rounds.relay.transport import RelayTransport

log = logging.getLogger(__name__)

ACK_S = 0.05


class FrontDoorRelay:
    def __init__(self, index: FrontDoorId, epoch: str, transport: RelayTransport,
                 deliver: Callable[[LinkMessage], None], send_to_shard: Callable[[ShardId, LinkMessage], bool],
                 on_reset: Callable[[ShardId], None]) -> None:
        self.index = index
        self.epoch = epoch
        self._deliver = deliver
        self._send_to_shard = send_to_shard
        self._on_reset = on_reset
        self.consumer = transport.consumer(index, f"frontdoor-{index}", self.batch)
        self._streams: dict[ShardId, RelayIn] = {}
        self._acked: dict[ShardId, tuple[str | None, int, bool]] = {}
        self._task: asyncio.Task[None] | None = None
        self.batches = self.over_link = self.resets = self.bad = self.stale = 0

    def start(self) -> None:
        self.consumer.start()
        self._task = asyncio.create_task(self._ack_loop(), name=f"frontdoor-{self.index}-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.consumer.close()

    def on_link(self, msg: RelayBatch | RelayReset) -> None:
        if isinstance(msg, RelayBatch):
            self.over_link += 1
            self.batch(msg.shard, msg.epoch, msg.to, msg.seq, msg.body)
        else:
            self.reset(msg)

    def batch(self, shard: int, epoch: str, to: str, seq: int, body: bytes) -> None:
        """A batch from either path: deliver what is now in order. One meant
        for this front door's previous process (left in its queue) is dropped."""
        if to != self.epoch:
            self.stale += 1
            return
        self.batches += 1
        stream = self._streams.get(ShardId(shard))
        if stream is None:
            stream = self._streams[ShardId(shard)] = RelayIn()
        self._deliver_bodies(stream.receive(epoch, seq, body, time.monotonic()))

    def reset(self, msg: RelayReset) -> None:
        stream = self._streams.get(ShardId(msg.shard))
        if stream is None or stream.epoch != msg.epoch:
            return
        self.resets += 1
        log.error("frontdoor-%d: shard-%d dropped batches up to %d before they arrived; its clients start over",
                  self.index, msg.shard, msg.through)
        self._deliver_bodies(stream.skip_to(msg.through))
        self._on_reset(ShardId(msg.shard))

    def _deliver_bodies(self, bodies: list[bytes]) -> None:
        for body in bodies:
            try:
                messages = decode_frames(body)
            except ValueError:  # a broken batch from the broker: counted, the gap is asked for again
                self.bad += 1
                log.exception("frontdoor-%d: relay batch not decodable", self.index)
                continue
            for msg in messages:
                try:
                    self._deliver(msg)
                except Exception:  # a bug in one handler must not stop the stream
                    log.exception("frontdoor-%d: relayed %s failed", self.index, type(msg).__name__)

    async def _ack_loop(self) -> None:
        while True:
            await asyncio.sleep(ACK_S)
            now = time.monotonic()
            consuming = self.consumer.up
            for shard, stream in self._streams.items():
                missing = stream.missing(now) or 0
                state = (stream.epoch, stream.delivered, consuming)
                if missing or self._acked.get(shard) != state:
                    if self._send_to_shard(shard, RelayAck(self.index, stream.epoch or "", stream.delivered,
                                                           missing, consuming)):
                        self._acked[shard] = state

    def stats(self) -> dict[str, Any]:
        return {
            "rabbitmq": "up" if self.consumer.up else "down", "error": self.consumer.last_error,
            "batches": self.batches, "from_rabbitmq": self.consumer.received, "over_link": self.over_link,
            "duplicates": sum(s.duplicates for s in self._streams.values()),
            "waiting": sum(len(s.early) for s in self._streams.values()), "resets": self.resets,
            "stale": self.stale,
        }
