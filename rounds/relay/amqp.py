"""The relay's RabbitMQ transport (`rounds.relay.transport`, story BE-001.5).

One topic exchange, `rounds.relay` (durable). A front door consumes its own
queue, `rounds.{namespace}.frontdoor.{index}`, bound with the routing key
`{namespace}.frontdoor.{index}`; a shard publishes a front door's batches with
that key, the stream's numbers in the headers (`shard`, `epoch`, `seq`). The
queue outlives a consumer's reconnect (a named queue, deleted by the broker
60 s after its last consumer left, `x-expires`), so a front door whose
connection to the broker blinked finds what was published meanwhile; a
message waits there at most 30 s (`x-message-ttl`): by then the shard has
sent it again over the link.

Both sides connect in the background with `aio_pika.connect_robust`, which
reconnects and re-declares by itself; the first connection is retried here
with backoff, so a gateway starts while RabbitMQ is down. Nothing here
decides what goes where: the shard's circuit (`rounds.relay.stream.Circuit`) does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.connection import make_url
from yarl import URL

from rounds.relay.transport import Done, OnBatch

log = logging.getLogger(__name__)

EXCHANGE = "rounds.relay.stream"
QUEUE_EXPIRES_MS = 60_000
MESSAGE_TTL_MS = 30_000
PUBLISH_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 5.0
RETRY_MIN_S, RETRY_MAX_S = 0.5, 10.0  # the first connection
RECONNECT_S = 1.0  # after a connection was lost (aio_pika's own loop; its default is 5 s)


def routing_key(namespace: str, frontdoor: int) -> str:
    return f"{namespace}.frontdoor.{frontdoor}"


def _safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else url


class _Connection:
    """A robust connection opened in the background; `setup(channel)` runs
    on the first connect (robust channels replay it on reconnects)."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self.connection: aio_pika.abc.AbstractRobustConnection | None = None
        self.channel: aio_pika.abc.AbstractRobustChannel | None = None
        self._task: asyncio.Task[None] | None = None
        self.last_error: str | None = None

    def start(self, setup: Callable[[Any], Any]) -> None:
        self._task = asyncio.create_task(self._connect(setup), name=f"{self.name}-amqp")

    async def _connect(self, setup: Callable[[Any], Any]) -> None:
        delay = RETRY_MIN_S
        while True:
            try:
                # Made here rather than by `aio_pika.connect_robust`, so that a first
                # connection that fails is closed by us, not left to the collector.
                self.connection = aio_pika.RobustConnection(
                    make_url(self.url, reconnect_interval=RECONNECT_S), reconnect_interval=RECONNECT_S,
                    client_properties={"connection_name": self.name})
                await self.connection.connect(timeout=CONNECT_TIMEOUT_S)
                self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
                await setup(self.channel)
                self.last_error = None
                log.info("%s: connected to RabbitMQ at %s", self.name, _safe_url(self.url))
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # refused, timed out, auth: retry, the gateway runs without
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("%s: RabbitMQ at %s unreachable (%s); retrying in %.1fs",
                            self.name, _safe_url(self.url), self.last_error, delay)
                if self.connection is not None:
                    await _close_quietly(self.connection)
                    self.connection = self.channel = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    @property
    def up(self) -> bool:
        return (self.connection is not None and not self.connection.is_closed
                and self.channel is not None and not self.channel.is_closed)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.connection is not None:
            await _close_quietly(self.connection)


async def _close_quietly(connection: Any) -> None:
    try:
        await asyncio.wait_for(connection.close(), 2)
    except Exception:  # closing a broken connection: nothing left to do
        pass


async def _declare_exchange(channel: Any) -> Any:
    return await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)


class RelayPublisher:
    """A shard's side: publish a batch for a front door, then call back with
    whether the broker confirmed it."""

    def __init__(self, url: str, namespace: str, name: str) -> None:
        self.namespace = namespace
        self._conn = _Connection(url, f"{namespace}/{name}")
        self._exchange: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        async def setup(channel: Any) -> None:
            self._exchange = await _declare_exchange(channel)

        self._conn.start(setup)

    @property
    def ready(self) -> bool:
        return self._exchange is not None and self._conn.up

    @property
    def last_error(self) -> str | None:
        return self._conn.last_error

    def publish(self, frontdoor: int, headers: dict[str, Any], body: bytes, done: Done) -> None:
        """Publish in the background; `done(True)` once confirmed, `done(False)`
        if refused, unroutable, timed out or the connection went."""
        task = asyncio.create_task(self._publish(frontdoor, headers, body, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, frontdoor: int, headers: dict[str, Any], body: bytes, done: Done) -> None:
        try:
            await self._exchange.publish(
                aio_pika.Message(body, headers=headers, delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT),
                routing_key(self.namespace, frontdoor), mandatory=True, timeout=PUBLISH_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # unroutable (no queue yet), nack, timeout, connection gone
            self._conn.last_error = f"{type(exc).__name__}: {exc}"
            done(False)
            return
        done(True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self._conn.close()


class RelayConsumer:
    """A front door's side: `on_batch(shard, epoch, to, seq, body)` for each
    batch that arrives through RabbitMQ."""

    def __init__(self, url: str, namespace: str, frontdoor: int, name: str, on_batch: OnBatch) -> None:
        self.namespace = namespace
        self.frontdoor = frontdoor
        self.on_batch = on_batch
        self._conn = _Connection(url, f"{namespace}/{name}")
        self.received = 0
        self.bad = 0

    def start(self) -> None:
        async def setup(channel: Any) -> None:
            await channel.set_qos(prefetch_count=10_000)
            exchange = await _declare_exchange(channel)
            queue = await channel.declare_queue(
                f"rounds.{self.namespace}.frontdoor.{self.frontdoor}", durable=False,
                arguments={"x-expires": QUEUE_EXPIRES_MS, "x-message-ttl": MESSAGE_TTL_MS})
            await queue.bind(exchange, routing_key(self.namespace, self.frontdoor))
            await queue.consume(self._on_message, no_ack=True)

        self._conn.start(setup)

    @property
    def up(self) -> bool:
        return self._conn.up

    @property
    def last_error(self) -> str | None:
        return self._conn.last_error

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        headers = message.headers or {}
        try:
            shard, epoch, seq = _int(headers["shard"]), str(headers["epoch"]), _int(headers["seq"])
            to = str(headers["to"])
        except (KeyError, TypeError, ValueError):
            self.bad += 1
            log.error("relay message without shard/epoch/to/seq headers dropped: %r", headers)
            return
        self.received += 1
        self.on_batch(shard, epoch, to, seq, message.body)

    async def close(self) -> None:
        await self._conn.close()


def _int(value: object) -> int:
    """A header holding a number (as the publisher writes it), else ValueError."""
    if isinstance(value, (int, str, bytes)) and not isinstance(value, bool):
        return int(value)
    raise ValueError(f"not a number: {value!r}")


class AmqpRelay:
    """The relay's transport over one RabbitMQ (`amqp_url`), for the gateway
    of one Ray namespace: its exchange is shared, its queues are its own."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace

    def publisher(self, name: str) -> RelayPublisher:
        return RelayPublisher(self.url, self.namespace, name)

    def consumer(self, frontdoor: int, name: str, on_batch: OnBatch) -> RelayConsumer:
        return RelayConsumer(self.url, self.namespace, frontdoor, name, on_batch)
