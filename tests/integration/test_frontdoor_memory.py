"""A front door's connection is freed as soon as it closes, by reference counting.

Nothing of it is left for the cyclic collector, whose passes over the oldest
generation pause the event loop for tens of ms once thousands are connected
(docs/architecture.md, runbook). Checked with that collector
off, for each way a connection ends: a `/ws` session closed or dropped without
a closing handshake, a `/yjs` session, an upgrade refused (with 401 by
the front door, with 400 by `websockets`), and a `/health` or 404 answer.
"""

from __future__ import annotations

import asyncio
import gc
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvloop
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.server import ServerProtocol

from rounds.audit.events import MemoryAuditSink
from rounds.auth import mint_token, private_key_for_dev
from rounds.cluster.inprocess import InProcessGateway
from tests.client import Client, eventually, refused
from tests.conftest import free_port, gateway_settings


@pytest.fixture
async def gateway(var_root: Path, uid: str) -> AsyncIterator[InProcessGateway]:
    settings = gateway_settings(var_root, f"memory-{uid}", shards=1, frontdoors=1)
    async with InProcessGateway(settings, MemoryAuditSink()) as gateway:
        yield gateway


@pytest.fixture
def cyclic_collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def server_connections() -> int:
    """Front-door connections, or their protocols, still in memory (the collector tracks every one)."""
    return sum(1 for o in gc.get_objects() if type(o) is ServerConnection or type(o) is ServerProtocol)


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


async def test_a_closed_connection_is_freed_without_the_cyclic_collector(
        gateway: InProcessGateway, cyclic_collector_off: None, uid: str) -> None:
    assert server_connections() == 0
    key = private_key_for_dev(gateway.settings)
    base = f"http://{gateway.settings.host}:{gateway.settings.port}"

    client = await Client.connect(gateway.url, mint_token(key, user_id=f"ws-{uid}", role="surgeon"))
    await client.join(f"patient:freed-{uid}")
    assert server_connections() == 2  # the connection and its protocol
    await client.close()
    await eventually(lambda: server_connections() == 0, what="the /ws connection freed")

    # Gone without a closing handshake (a tab closed, a network lost): the
    # front door reads an unexpected end of stream.
    client = await Client.connect(gateway.url, mint_token(key, user_id=f"gone-{uid}", role="surgeon"))
    await client.join(f"patient:freed-{uid}")
    client.ws.transport.close()
    await eventually(lambda: server_connections() == 0, what="the abruptly closed connection freed")

    room = f"patient:yjs-{uid}"
    token = mint_token(key, user_id=f"yjs-{uid}", role="surgeon")
    async with connect(f"ws://{gateway.settings.host}:{gateway.settings.port}/yjs/{room}?token={token}") as ws:
        await asyncio.wait_for(ws.recv(), 5)  # the server's sync step 1: the session is up
        assert server_connections() == 2  # the connection and its protocol
    await eventually(lambda: server_connections() == 0, what="the /yjs connection freed")

    status, body = await refused(gateway.url, "not-a-token")
    assert status == 401 and body["type"] == "UNAUTHORIZED"
    assert await asyncio.to_thread(_http_status, f"{base}/health") == 200
    assert await asyncio.to_thread(_http_status, f"{base}/nowhere") == 404
    # A good token, but no Sec-WebSocket-Key: `websockets` itself refuses the upgrade.
    reader, writer = await asyncio.open_connection(gateway.settings.host, gateway.settings.port)
    writer.write(f"GET /ws?token={token} HTTP/1.1\r\nHost: rounds\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 400")
    writer.close()
    await eventually(lambda: server_connections() == 0, what="refused and answered connections freed")


async def test_the_closed_connections_bench_finds_nothing_left_for_the_collector() -> None:
    """`rounds bench closed`, small: its clients come and go, and
    nothing of them is left unreachable. On uvloop, as the gateway runs:
    asyncio's own socket transport holds a cycle of its own."""
    from rounds.bench.closed import measure

    report = await asyncio.to_thread(uvloop.run, measure(users=30, hold_s=0.2, settle_s=0.5, port=free_port()))
    assert report["users"] == 30
    assert report["tracked_connected"] - report["tracked_idle"] > 30 * 20  # every connection was counted
    assert report["unreachable_after_close"] == 0

