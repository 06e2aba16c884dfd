"""A shard's side of the cross-node relay (story BE-001.5, `rounds.relay.stream`).

What a shard sends a front door on another node (all of it: replies and
deliveries alike, so their order holds) is gathered per event-loop pass into
a numbered batch, published to RabbitMQ while the circuit is closed, and
sent over the direct link instead while it is open or when the broker did
not confirm it. Batches stay in `RelayOut` until the front door acknowledges
them; one that goes missing is sent again over the link. With
`relay = "always"` every front door is treated as remote (one machine
standing in for several nodes: tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from rounds.ids import FrontDoorId
from rounds.protocol.link import LinkMessage, RelayAck, RelayBatch, RelayReset, encode
from rounds.relay.stream import Batch, Circuit, RelayOut
from rounds.relay.transport import RelayTransport

log = logging.getLogger(__name__)

TICK_S = 0.25  # how often unacknowledged batches are looked at


class RelayShell:
    def __init__(self, shard: int, epoch: str, node: str, transport: RelayTransport, always: bool,
                 send_link: Callable[[FrontDoorId, LinkMessage], bool]) -> None:
        """`always`: treat every front door as on another node (`relay = "always"`)."""
        self.shard = shard
        self.epoch = epoch
        self.node = node
        self.always = always
        self.publisher = transport.publisher(f"shard-{shard}")
        self.circuit = Circuit()
        self._send_link = send_link
        self._nodes: dict[FrontDoorId, str] = {}
        self._not_consuming: set[FrontDoorId] = set()  # front doors whose RabbitMQ queue nobody reads
        self._frontdoor_epochs: dict[FrontDoorId, str] = {}
        self._out: dict[FrontDoorId, RelayOut] = {}
        self._pending: dict[FrontDoorId, list[bytes]] = {}
        self._flush_scheduled = False
        self._task: asyncio.Task[None] | None = None
        self.published = self.confirmed = self.unconfirmed = self.over_link = self.resent = self.resets = 0

    def start(self) -> None:
        self.publisher.start()
        self._task = asyncio.create_task(self._tick(), name=f"shard-{self.shard}-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.publisher.close()

    # --- which front doors --------------------------------------------------------

    def linked(self, frontdoor: FrontDoorId, epoch: str, node: str) -> None:
        """A front door said Hello; a new process (epoch) starts a new stream."""
        self._nodes[frontdoor] = node
        if self._frontdoor_epochs.get(frontdoor) != epoch:
            self._frontdoor_epochs[frontdoor] = epoch
            self._out.pop(frontdoor, None)
            self._pending.pop(frontdoor, None)

    def wants(self, frontdoor: FrontDoorId) -> bool:
        node = self._nodes.get(frontdoor)
        return node is not None and (self.always or node != self.node)

    # --- sending ------------------------------------------------------------------

    def send(self, frontdoor: FrontDoorId, msg: LinkMessage) -> None:
        self._pending.setdefault(frontdoor, []).append(encode(msg))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        now = time.monotonic()
        for frontdoor, frames in pending.items():
            out = self._out.get(frontdoor)
            if out is None:
                out = self._out[frontdoor] = RelayOut(self.epoch, self._frontdoor_epochs.get(frontdoor, ""))
            batch = out.add(frames[0] if len(frames) == 1 else b"".join(frames), now)
            if frontdoor not in self._not_consuming and self.circuit.allow(now):
                if self.publisher.ready:
                    self.published += 1
                    self.publisher.publish(
                        frontdoor, {"shard": self.shard, "epoch": self.epoch, "to": out.peer, "seq": batch.seq},
                        batch.body, partial(self._confirmed, frontdoor, out, batch))
                    continue
                self._failed(now)  # not connected (yet, or any more)
            self._over_link(frontdoor, out, batch)

    def _confirmed(self, frontdoor: FrontDoorId, out: RelayOut, batch: Batch, ok: bool) -> None:
        if ok:
            self.confirmed += 1
            self.circuit.success()
            return
        self.unconfirmed += 1
        self._failed(time.monotonic())
        if self._out.get(frontdoor) is out:  # not a stream the front door has restarted since
            self._over_link(frontdoor, out, batch)

    def _failed(self, now: float) -> None:
        was = self.circuit.state
        self.circuit.failure(now)
        if self.circuit.state == "open" and was != "open":
            log.warning("shard-%d: relay circuit open (%s); batches go over the links for %.0f s",
                        self.shard, self.publisher.last_error or "not connected", self.circuit.current_cooldown_s)

    def _over_link(self, frontdoor: FrontDoorId, out: RelayOut, batch: Batch) -> None:
        self.over_link += 1
        self._send_link(frontdoor, RelayBatch(self.shard, self.epoch, out.peer, batch.seq, batch.body))

    # --- the front door's answers ----------------------------------------------------

    def ack(self, msg: RelayAck) -> None:
        out = self._out.get(msg.frontdoor)
        if out is None or msg.epoch != self.epoch:
            return
        out.ack(msg.through)
        if msg.consuming:
            self._not_consuming.discard(msg.frontdoor)
        elif msg.frontdoor not in self._not_consuming:
            self._not_consuming.add(msg.frontdoor)
            log.warning("shard-%d: frontdoor-%d is not reading its RabbitMQ queue; its batches go over the link",
                        self.shard, msg.frontdoor)
        if not msg.missing:
            return
        batches = out.resend(msg.missing)
        if batches is None:
            self.resets += 1
            log.error("shard-%d: frontdoor-%d misses batch %d, dropped from a full buffer; it starts over",
                      self.shard, msg.frontdoor, msg.missing)
            self._send_link(msg.frontdoor, RelayReset(self.shard, self.epoch, out.dropped_through))
            return
        for batch in batches:
            self.resent += 1
            self._over_link(msg.frontdoor, out, batch)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            if self.circuit.state == "open" and self.circuit.allow(now):
                log.info("shard-%d: relay circuit half-open: trying RabbitMQ again", self.shard)
            for frontdoor, out in self._out.items():
                for batch in out.overdue(now):
                    self.resent += 1
                    self._over_link(frontdoor, out, batch)

    def health(self) -> dict[str, Any]:
        """For the shard's `/health`: is RabbitMQ there, and does the relay use it."""
        return {"rabbitmq": "up" if self.publisher.ready else "down", "circuit": self.circuit.state}

    def stats(self) -> dict[str, Any]:
        return {
            **self.health(),
            "circuit_opened": self.circuit.opened, "error": self.publisher.last_error,
            "published": self.published, "confirmed": self.confirmed, "unconfirmed": self.unconfirmed,
            "over_link": self.over_link, "resent": self.resent, "resets": self.resets,
            "unacked": {int(fd): out.backlog for fd, out in self._out.items()},
            "not_consuming": sorted(int(fd) for fd in self._not_consuming),
        }
