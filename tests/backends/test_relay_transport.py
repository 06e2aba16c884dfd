"""Every relay transport passes one suite: the memory twin
(`rounds.relay.transport.MemoryRelay`) and RabbitMQ (`rounds.relay.amqp`,
the real broker behind a loopback proxy that a test can cut).

What the relay's shells rely on: a batch published for a front door whose
queue exists reaches its consumer with its headers and body, in order; one
for a front door nobody declared a queue for is refused; a queue keeps what
was published while its consumer was away; a broker that is gone refuses
publishes and says so."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from rounds.relay.amqp import AmqpRelay
from rounds.relay.transport import MemoryRelay, RelayConsumer, RelayPublisher, RelayTransport
from tests.client import eventually
from tests.integration.test_relay import AMQP_HOST, AMQP_PORT, require_rabbitmq
from tests.proxy import TcpProxy


@dataclass
class Harness:
    transport: RelayTransport
    proxy: TcpProxy | None = None
    broker: MemoryRelay | None = None
    opened: list[Any] = field(default_factory=list)

    async def cut(self) -> None:
        if self.proxy is not None:
            await self.proxy.cut()
        else:
            assert self.broker is not None
            self.broker.down = True

    async def restore(self) -> None:
        if self.proxy is not None:
            await self.proxy.restore()
        else:
            assert self.broker is not None
            self.broker.down = False

    async def publisher(self) -> RelayPublisher:
        publisher = self.transport.publisher("shard-0")
        publisher.start()
        self.opened.append(publisher)
        await eventually(lambda: publisher.ready, timeout=15, what="publisher connected")
        return publisher

    async def consumer(self, frontdoor: int, into: list[tuple[Any, ...]]) -> RelayConsumer:
        consumer = self.transport.consumer(frontdoor, f"frontdoor-{frontdoor}", lambda *batch: into.append(batch))
        consumer.start()
        self.opened.append(consumer)
        await eventually(lambda: consumer.up, timeout=15, what="consumer connected")
        return consumer


@pytest.fixture(params=["memory", "rabbitmq"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        broker = MemoryRelay()
        made = Harness(broker, broker=broker)
    else:
        await require_rabbitmq()
        proxy = await TcpProxy(AMQP_HOST, AMQP_PORT).start()
        # a namespace of its own: its queues are nobody else's
        made = Harness(AmqpRelay(f"amqp://guest:guest@127.0.0.1:{proxy.port}/", f"t-{uuid.uuid4().hex[:8]}"),
                       proxy=proxy)
    try:
        yield made
    finally:
        for end in reversed(made.opened):
            await end.close()
        if made.proxy is not None:
            await made.proxy.close()


async def publish(publisher: RelayPublisher, frontdoor: int, seq: int, body: bytes) -> bool:
    outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    publisher.publish(frontdoor, {"shard": 3, "epoch": "e1", "to": "fd-e1", "seq": seq}, body,
                      lambda ok: outcome.done() or outcome.set_result(ok))
    return await asyncio.wait_for(outcome, 10)


async def test_a_batch_reaches_its_front_doors_consumer_with_its_headers_in_order(harness: Harness) -> None:
    got: list[tuple[Any, ...]] = []
    await harness.consumer(1, got)
    publisher = await harness.publisher()
    for seq in range(1, 6):
        assert await publish(publisher, 1, seq, f"batch {seq}".encode())
    await eventually(lambda: len(got) == 5, what="five batches")
    assert got == [(3, "e1", "fd-e1", seq, f"batch {seq}".encode()) for seq in range(1, 6)]


async def test_a_batch_for_a_front_door_without_a_queue_is_refused(harness: Harness) -> None:
    publisher = await harness.publisher()
    assert not await publish(publisher, 99, 1, b"nobody")


async def test_a_queue_keeps_what_was_published_while_its_consumer_was_away(harness: Harness) -> None:
    got: list[tuple[Any, ...]] = []
    first = await harness.consumer(2, got)
    publisher = await harness.publisher()
    await first.close()
    assert await publish(publisher, 2, 1, b"while away")
    await harness.consumer(2, got)
    await eventually(lambda: len(got) == 1, what="the queued batch")
    assert got[0][3:] == (1, b"while away")


async def test_a_broker_that_is_gone_refuses_publishes_and_says_so_then_comes_back(harness: Harness) -> None:
    got: list[tuple[Any, ...]] = []
    consumer = await harness.consumer(4, got)
    publisher = await harness.publisher()
    await harness.cut()
    await eventually(lambda: not publisher.ready or not consumer.up, timeout=15, what="the outage noticed")
    assert not await publish(publisher, 4, 1, b"lost")
    assert publisher.last_error or consumer.last_error
    await harness.restore()
    await eventually(lambda: publisher.ready and consumer.up, timeout=20, what="reconnected")
    assert await publish(publisher, 4, 2, b"after")
    await eventually(lambda: any(batch[4] == b"after" for batch in got), what="the batch after the outage")
