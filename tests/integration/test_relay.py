"""Cross-node fan-out through the real RabbitMQ (story BE-001.5, `rounds.relay`).

One process stands in for two nodes: the shards and frontdoor-0 on node
"a", frontdoor-1 on node "b" (`InProcessGateway(node_of=...)`). A shard
sends frontdoor-1 everything through the topic exchange, frontdoor-0 over
the direct link. RabbitMQ is reached through a loopback proxy
(`tests.proxy`), so a test can make it fail and come back without touching
the broker itself.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from pycrdt import Doc, Text

from rounds.audit.events import MemoryAuditSink
from rounds.auth import mint_token, private_key_for_dev
from rounds.cluster.inprocess import InProcessGateway
from tests.client import Client, eventually
from tests.conftest import free_port, gateway_settings
from tests.integration.test_inprocess_gateway import clients_of
from tests.proxy import TcpProxy

AMQP_HOST, AMQP_PORT = "127.0.0.1", 5672

Connect = Callable[[str, int], Awaitable[Client]]


async def require_rabbitmq() -> None:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(AMQP_HOST, AMQP_PORT), 3)
        writer.close()
    except OSError as exc:
        pytest.skip(f"RabbitMQ not reachable at {AMQP_HOST}:{AMQP_PORT}: {exc}")


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    await require_rabbitmq()
    proxy = await TcpProxy(AMQP_HOST, AMQP_PORT).start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def two_nodes(var_root: Path, uid: str, proxy: TcpProxy) -> AsyncIterator[InProcessGateway]:
    settings = gateway_settings(var_root, f"relay-{uid}", shards=2, frontdoors=2,
                                amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
    gateway = InProcessGateway(settings, MemoryAuditSink(),
                               node_of=lambda kind, i: "b" if (kind, i) == ("frontdoor", 1) else "a")
    await gateway.start()
    # frontdoor-1's queue is bound once its consumer is up: only then can a shard publish to it
    await eventually(lambda: gateway.frontdoors[1].relay.consumer.up and all(
        s.relay.publisher.ready for s in gateway.shards), timeout=15, what="relay connected to RabbitMQ")
    try:
        yield gateway
    finally:
        await gateway.stop()


@pytest.fixture
async def connect(two_nodes: InProcessGateway) -> AsyncIterator[Connect]:
    async with clients_of(two_nodes) as open_client:
        yield open_client


def relay_totals(gateway: InProcessGateway) -> dict[str, int]:
    stats = [s.relay.stats() for s in gateway.shards]
    return {key: sum(s[key] for s in stats)
            for key in ("published", "confirmed", "unconfirmed", "over_link", "resent", "circuit_opened")}


def edit(doc: Doc, n: int) -> str:
    before = doc.get_state()
    doc.get("t", type=Text).insert(len(str(doc.get("t", type=Text))), f"{n},")
    return base64.b64encode(doc.get_update(before)).decode()


async def test_a_front_door_on_another_node_gets_its_room_through_rabbitmq(two_nodes, connect, uid):
    room = f"page:/ward/relay-{uid}"
    near, far = await connect("dr-near", 0), await connect("dr-far", 1)
    assert (await near.join(room)).type == "RESOURCE_STATE"
    state = await far.join(room)  # the reply itself goes through RabbitMQ
    assert state.type == "RESOURCE_STATE" and {u["userId"] for u in state.data["users"]} == {"dr-near", "dr-far"}
    await near.expect("USER_JOINED", resourceId=room)

    granted = await near.request("LOCK_ACQUIRE", {"resourceId": room})
    assert granted.type == "LOCK_ACQUIRED", granted
    locked = await far.expect("RESOURCE_LOCKED", resourceId=room)
    assert locked.data["lockedBy"] == "dr-near" and locked.data["expiresAt"] == granted.data["expiresAt"]
    denied = await far.request("LOCK_ACQUIRE", {"resourceId": room})
    assert denied.type == "LOCK_DENIED" and denied.data["lockedBy"] == "dr-near"

    doc = Doc()
    ack = await far.request("RESOURCE_UPDATE", {"resourceId": room, "update": edit(doc, 1)})
    assert ack.type == "UPDATE_ACK"
    relayed = await near.expect("RESOURCE_UPDATE", resourceId=room)
    assert relayed.data["userId"] == "dr-far" and relayed.data["revision"] == ack.data["revision"]

    # four batches to the far front door (its join's state, the lock's broadcast, the denial, the ack)
    try:
        await eventually(lambda: relay_totals(two_nodes)["confirmed"] >= 4, timeout=10, what="publishes confirmed")
    except AssertionError as exc:  # say where the batches went instead
        raise AssertionError(f"{exc}; shards {relay_totals(two_nodes)}, far door "
                             f"{two_nodes.frontdoors[1].relay.stats()}") from None
    totals = relay_totals(two_nodes)
    assert totals["published"] == totals["confirmed"] >= 4
    assert totals["over_link"] == 0 and totals["circuit_opened"] == 0
    far_door, near_door = two_nodes.frontdoors[1].relay.stats(), two_nodes.frontdoors[0].relay.stats()
    assert far_door["from_rabbitmq"] >= 4 and far_door["over_link"] == 0 and far_door["duplicates"] == 0
    assert near_door["batches"] == 0  # same node: the direct link only


async def test_rabbitmq_failing_and_coming_back_loses_and_doubles_nothing(two_nodes, connect, proxy, uid):
    """The broker goes away mid-stream: the relay leaves it (the shards'
    circuits open, or, when the far front door's consumer notices first, it
    says it is not consuming), unconfirmed batches and what follows go over
    the links, and when the broker is back the relay returns to it. The far
    client sees every revision once, in order."""
    room = f"page:/ward/outage-{uid}"
    near, far = await connect("dr-near", 0), await connect("dr-far", 1)
    await near.join(room)
    await far.join(room)
    doc, revisions = Doc(), []

    async def send(n: int) -> None:
        ack = await near.request("RESOURCE_UPDATE", {"resourceId": room, "update": edit(doc, n)}, ref=n)
        assert ack.type == "UPDATE_ACK", ack
        revisions.append(ack.data["revision"])

    for n in range(20):
        await send(n)
    await proxy.cut()
    for n in range(20, 60):
        await send(n)
        await asyncio.sleep(0.01)
    await eventually(lambda: any(st["circuit_opened"] or st["not_consuming"]
                                 for st in (shard.relay.stats() for shard in two_nodes.shards)),
                     what="the relay off RabbitMQ: a circuit open or the front door not consuming")
    await proxy.restore()
    await eventually(lambda: two_nodes.frontdoors[1].relay.consumer.up
                     and all(s.relay.publisher.ready for s in two_nodes.shards), timeout=20, what="reconnected")
    published_before = relay_totals(two_nodes)["published"]

    def back_on_rabbitmq() -> bool:
        """Each shard would publish its next batch: no front door said it is
        not consuming, and an opened circuit's cool-down is over (it doubles
        with each trial that failed during the outage: 1, 2, 4 s...)."""
        now = time.monotonic()
        return all(not shard.relay.stats()["not_consuming"] and not shard.relay.circuit.cooling(now)
                   for shard in two_nodes.shards)

    await eventually(back_on_rabbitmq, timeout=35, what="the shards ready to publish again")
    for n in range(60, 80):
        await send(n)
        await asyncio.sleep(0.02)

    got = []
    while len(got) < len(revisions):
        got.append((await far.expect("RESOURCE_UPDATE", resourceId=room, timeout=10)).data["revision"])
    assert got == revisions  # every one, once, in order
    assert "RESOURCE_UPDATE" not in [f.type for f in await far.quiet(0.5)]
    totals = relay_totals(two_nodes)
    assert totals["over_link"] > 0  # carried over the links meanwhile
    assert totals["published"] > published_before  # and back on RabbitMQ
    assert all(s.relay.circuit.state == "closed" for s in two_nodes.shards)


async def test_without_rabbitmq_at_start_the_gateway_serves_over_the_links(var_root, uid):
    settings = gateway_settings(var_root, f"relay-none-{uid}", shards=1, frontdoors=1, relay="always",
                                amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/")  # nothing listens there
    async with InProcessGateway(settings, MemoryAuditSink()) as gateway:
        key = private_key_for_dev(settings)
        a = await Client.connect(gateway.url, mint_token(key, user_id="a", role="surgeon"))
        b = await Client.connect(gateway.url, mint_token(key, user_id="b", role="surgeon"))
        try:
            room = f"page:/ward/none-{uid}"
            await a.join(room)
            await b.join(room)
            await a.expect("USER_JOINED", resourceId=room)
            stats = gateway.shards[0].relay.stats()
            assert stats["rabbitmq"] == "down" and stats["published"] == 0 and stats["over_link"] >= 2
            health = await gateway.frontdoors[0].health()
            assert health["backends"]["relay"]["ok"] is False and health["backends"]["relay"]["error"]
            shard_health = await gateway.shards[0].health()
            assert shard_health["relay"]["rabbitmq"] == "down"
            assert shard_health["relay"]["circuit"] in ("open", "half_open", "closed")
        finally:
            await a.close()
            await b.close()




def close_broker_connection(connection_name: str) -> None:
    """The broker drops one client's connection (as on a network blip for that process only)."""
    import subprocess

    listing = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    pids = [line.split("\t", 1)[0] for line in listing.splitlines() if f'"{connection_name}"' in line]
    assert pids, f"no broker connection named {connection_name}: {listing}"
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "closed by the relay test"],
                       capture_output=True, text=True, timeout=30, check=True)


async def test_a_front_door_that_stops_reading_rabbitmq_gets_its_batches_over_the_link(two_nodes, connect, uid):
    """Only the far front door's connection to the broker drops: the shards'
    publishes still succeed (its queue outlives the connection), so they
    learn it from its acknowledgements and send over the link meanwhile; when
    it reads again the queued copies are dropped as duplicates."""
    room = f"page:/ward/consumer-{uid}"
    near, far = await connect("dr-near", 0), await connect("dr-far", 1)
    await near.join(room)
    await far.join(room)
    doc, revisions = Doc(), []
    await asyncio.to_thread(close_broker_connection, f"{two_nodes.settings.ray_namespace}/frontdoor-1")
    for n in range(30):
        ack = await near.request("RESOURCE_UPDATE", {"resourceId": room, "update": edit(doc, n)}, ref=n)
        revisions.append(ack.data["revision"])
        await asyncio.sleep(0.02)
    got = [(await far.expect("RESOURCE_UPDATE", resourceId=room, timeout=10)).data["revision"] for _ in revisions]
    assert got == revisions
    await eventually(lambda: two_nodes.frontdoors[1].relay.consumer.up, timeout=15, what="consumer back")
    assert "RESOURCE_UPDATE" not in [f.type for f in await far.quiet(1.0)]
