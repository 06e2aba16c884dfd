"""Recovery, provably convergent: every fault × every endpoint × clients that
stay connected or reconnect (issue 11, section 1b).

One gateway on the session's Ray (2 shards, 2 front doors) keeps its state
in a Redis of its own, run here with an append-only file fsynced on every
write (what production Redis needs for no acknowledged write to be lost),
so that the Redis fault is a real SIGKILL and restart. In one document room:
a `/ws` JSON client, a `/ws` msgpack client (both `tests.peers.WsPeer`), a
stock y-websocket client from npm (`tests.peers.YPeer`) and pycrdt's own
`Provider` (`tests.peers.CrdtPeer`). Each edits before
the fault, during it and after; the `/ws` one holds a field lock; two show
their cursors.

Faults: the room's shard process killed (SIGKILL; Ray restarts it), a front
door process killed (SIGKILL), the links between the front doors and the
room's shard cut again and again for a while (`ss -K`: a reset, as a
middlebox or a crashing host gives), Redis killed and started again. Modes:
the clients stay connected (as far as the fault lets them), or drop their
own connections when the fault starts and come back after it.

Afterwards, for every combination: every client, a newcomer and the stored
document (read from Redis) hold the same text with every edit in it, every
`/ws` edit acknowledged; the `/ws` clients list the same users as the
newcomer, and the same locks; the newcomer sees every client's cursor.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from pycrdt import Doc, Text

from rounds import redisconn
from rounds.ids import ResourceId
from rounds.routing import HashRing
from rounds.shard.documents.machine import Documents
from rounds.shard.documents.store_redis import RedisDocStore
from tests.client import eventually
from tests.conftest import GatewayHandle, gateway_settings
from tests.peers import CrdtPeer, WsPeer, YPeer
from tests.redis_server import RedisServer

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed"),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
]

RECOVERY_S = 30.0
FAULTS = ["shard-killed", "frontdoor-killed", "link-dropped", "redis-restarted"]
MODES = ["stay", "reconnect"]


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix="rounds-faults-redis-") as directory:
        server = RedisServer(Path(directory), durable=True)
        server.start()
        try:
            yield server
        finally:
            server.kill()


@pytest.fixture(scope="module")
def gateway(ray_session: None, own_redis: RedisServer, var_root: Path) -> Iterator[GatewayHandle]:
    handle = GatewayHandle(gateway_settings(var_root, "faults", shards=2, frontdoors=2, redis_url=own_redis.url,
                                            doc_snapshot_delay_ms=500))
    yield handle
    handle.stop()


# --- the faults ---------------------------------------------------------------------------


def healthy(handle: GatewayHandle) -> bool:
    """Every shard up, every front door linked to every shard."""
    status = handle.gateway.status()
    shards, doors = status["shards"], status["frontdoors"]
    return (all(s is not None for s in shards) and all(d is not None for d in doors)
            and all(all(d["shards"].get(i) for i in range(len(shards))) for d in doors))


async def until_healthy(handle: GatewayHandle) -> None:
    await eventually(lambda: asyncio.to_thread(healthy, handle), RECOVERY_S, "the gateway whole again", 0.2)


def pid_of(actor: Any) -> int:
    return int(ray.get(actor.pid.remote(), timeout=10))


async def kill_process(actor: Any) -> None:
    """SIGKILL the actor's process; its sockets close at once, so the edits
    that follow are made while it is gone (Ray brings it back a second or so later)."""
    pid = await asyncio.to_thread(pid_of, actor)
    os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(0.1)


def cut_links(port: int) -> None:
    """Reset every TCP connection to or from the shard's link port."""
    subprocess.run(["ss", "-K", f"( sport = :{port} or dport = :{port} )"], capture_output=True, timeout=10)


async def flap_links(handle: GatewayHandle, room: str, seconds: float) -> None:
    owner = HashRing(range(2)).shard_for(ResourceId(room))
    status = await asyncio.to_thread(handle.gateway.status)
    port = int(status["shards"][owner]["address"].rsplit(":", 1)[1])
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        await asyncio.to_thread(cut_links, port)
        await asyncio.sleep(0.1)


def ss_can_kill() -> bool:
    done = subprocess.run(["ss", "-K", "dport = :1"], capture_output=True, text=True, timeout=10)
    return done.returncode == 0 and os.geteuid() == 0


class Fault:
    """Starts a fault (`begin`) and ends it (`end`); the gateway recovers by itself after."""

    def __init__(self, name: str, handle: GatewayHandle, redis_server: RedisServer, room: str) -> None:
        self.name, self.handle, self.redis, self.room = name, handle, redis_server, room
        self._task: asyncio.Task[None] | None = None

    async def begin(self) -> None:
        match self.name:
            case "shard-killed":
                owner = HashRing(range(2)).shard_for(ResourceId(self.room))
                await kill_process(self.handle.gateway.shards[owner])
            case "frontdoor-killed":
                await kill_process(self.handle.gateway.frontdoors[0])
            case "link-dropped":
                self._task = asyncio.create_task(flap_links(self.handle, self.room, 2.0))
                await asyncio.sleep(0.3)
            case "redis-restarted":
                await asyncio.to_thread(self.redis.kill)

    async def end(self) -> None:
        match self.name:
            case "link-dropped":
                assert self._task is not None
                await self._task
            case "redis-restarted":
                await asyncio.sleep(1.0)  # a while without it
                await asyncio.to_thread(self.redis.start)
        await until_healthy(self.handle)


# --- the clients -------------------------------------------------------------------------


class Room:
    def __init__(self, handle: GatewayHandle, name: str, uid: str) -> None:
        self.handle, self.name, self.uid = handle, name, uid
        self.ws_json: WsPeer
        self.ws_pack: WsPeer
        self.yjs: YPeer
        self.crdt: CrdtPeer
        self.edits: list[str] = []

    @property
    def yjs_url(self) -> str:
        return self.handle.url.removesuffix("/ws") + "/yjs"

    async def open(self) -> None:
        self.ws_json = await WsPeer(self.handle.url, self.handle.token(f"json-{self.uid}"), self.name,
                                    f"json-{self.uid}").start()
        self.ws_pack = await WsPeer(self.handle.url, self.handle.token(f"pack-{self.uid}"), self.name,
                                    f"pack-{self.uid}", binary=True).start()
        self.yjs = await YPeer.start(self.yjs_url, self.name, self.handle.token(f"yjs-{self.uid}"))
        self.crdt = await CrdtPeer(self.yjs_url, self.name, self.handle.token(f"crdt-{self.uid}")).start()
        await self.ws_json.joined()
        await self.ws_pack.joined()
        await eventually(lambda: self._yjs_synced(), 10, "the y-websocket client synced")

    async def _yjs_synced(self) -> bool:
        return bool((await self.yjs.state())["synced"])

    async def edit_all(self, stage: str) -> None:
        for who, peer in (("json", self.ws_json), ("pack", self.ws_pack)):
            text = f"[{who}-{stage}]"
            self.edits.append(text)
            await peer.append(text)
        text = f"[yjs-{stage}]"
        self.edits.append(text)
        await self.yjs.append(text)
        text = f"[crdt-{stage}]"
        self.edits.append(text)
        self.crdt.append(text)

    async def everyone_has(self, edits: list[str]) -> bool:
        texts = [self.ws_json.text, self.ws_pack.text, (await self.yjs.state())["text"]["t"], self.crdt.text]
        return (not self.ws_json.unacked and not self.ws_pack.unacked
                and all(edit in text for edit in edits for text in texts))

    async def drop_all(self) -> None:
        await self.ws_json.drop()
        await self.ws_pack.drop()
        await self.yjs.command("disconnect")
        await self.crdt.drop()

    async def come_back_all(self) -> None:
        await self.ws_json.come_back()
        await self.ws_pack.come_back()
        await self.yjs.command("connect")
        await self.crdt.come_back()

    async def close(self) -> None:
        for peer in (self.ws_json, self.ws_pack):
            await peer.close()
        await self.yjs.close()
        await self.crdt.close()


async def stored_text(redis_url: str, room: str) -> str:
    store = RedisDocStore(redisconn.connect_binary(redis_url))
    try:
        stored = await store.load(ResourceId(room))
    finally:
        await store.aclose()
    docs = Documents()
    docs.load(ResourceId(room), stored.snapshot, stored.revision, stored.log)
    replica = Doc()
    replica.apply_update(docs.encode(ResourceId(room))[0])
    return str(replica.get("t", type=Text))


@pytest.fixture
async def room(gateway: GatewayHandle, uid: str, request: pytest.FixtureRequest) -> AsyncIterator[Room]:
    made = Room(gateway, f"document:fault-{request.node.callspec.id}-{uid}", uid)
    await made.open()
    try:
        yield made
    finally:
        await made.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", FAULTS)
async def test_after_the_fault_every_client_and_the_store_hold_every_edit_and_see_the_same_room(
        gateway: GatewayHandle, own_redis: RedisServer, room: Room, fault: str, mode: str, uid: str) -> None:
    if fault == "link-dropped" and not ss_can_kill():
        pytest.skip("`ss -K` cannot reset sockets here (needs root and a kernel with SOCK_DESTROY)")
    json_peer, pack_peer, yjs = room.ws_json, room.ws_pack, room.yjs
    # before: edits (acknowledged, and seen by everyone), a lock, cursors
    await room.edit_all("before")
    await eventually(lambda: room.everyone_has(room.edits), 10, "the edits before the fault everywhere")
    lock = await json_peer.request("LOCK_ACQUIRE", {"resourceId": f"field:dose-{uid}", "roomId": room.name,
                                                    "ttlMs": 120_000})
    assert lock["type"] == "LOCK_ACQUIRED", lock
    await json_peer.set_awareness({"user": "json", "cursor": 1})
    await yjs.command("awareness", state={"user": "yjs", "cursor": 2})
    await eventually(lambda: len(pack_peer.awareness) == 2, 10, "both cursors seen")

    fault_ = Fault(fault, gateway, own_redis, room.name)
    if mode == "reconnect":
        await room.drop_all()
    await fault_.begin()
    told_before = {id(p): p.frames.count(("RESOURCE_STATE", None)) for p in (json_peer, pack_peer)}
    await room.edit_all("during")
    await asyncio.sleep(0.3)  # far longer than an acknowledgement takes
    held = json_peer.unacked + pack_peer.unacked
    await fault_.end()
    if mode == "reconnect":
        await room.come_back_all()
    await room.edit_all("after")

    # every client converges on a text holding every edit, each /ws edit acknowledged
    async def converged() -> bool:
        texts = {json_peer.text, pack_peer.text, (await yjs.state())["text"]["t"], room.crdt.text}
        return (len(texts) == 1 and all(edit in json_peer.text for edit in room.edits)
                and not json_peer.unacked and not pack_peer.unacked)

    # The edits made during the fault crossed it: held while offline, while the shard was away or
    # while Redis was; and a member that stayed through a shard restart or a link drop was told its
    # room again, unasked.
    if mode == "reconnect" or fault in ("shard-killed", "redis-restarted"):
        assert sorted(held) == sorted(e for e in room.edits if e.endswith("-during]") and e[1:3] in ("js", "pa"))
    await eventually(converged, RECOVERY_S, f"convergence (json {json_peer.text!r}, pack {pack_peer.text!r}, "
                     f"unacked {json_peer.unacked + pack_peer.unacked})", 0.2)
    assert sorted(json_peer.acked + pack_peer.acked) == sorted(e for e in room.edits if e[1:3] in ("js", "pa"))
    if mode == "stay" and fault in ("shard-killed", "link-dropped"):
        assert all(p.frames.count(("RESOURCE_STATE", None)) > told_before[id(p)] for p in (json_peer, pack_peer))
    # ... and so does the store
    await eventually(lambda: _stored_equals(own_redis.url, room.name, json_peer.text), RECOVERY_S,
                     "the stored document", 0.3)

    # a newcomer sees the same room the clients see
    newcomer = await WsPeer(gateway.url, gateway.token(f"late-{uid}"), room.name, f"late-{uid}").start()
    try:
        await newcomer.joined()
        assert newcomer.text == json_peer.text
        members = {f"json-{uid}", f"pack-{uid}", f"yjs-{uid}", f"crdt-{uid}", f"late-{uid}"}
        await eventually(lambda: set(newcomer.users) == members and all(
            set(p.users) == members for p in (json_peer, pack_peer)), 10,
            f"presence right again: {set(json_peer.users)}, {set(pack_peer.users)}, {set(newcomer.users)}")
        assert json_peer.locks == pack_peer.locks == newcomer.locks
        if json_peer.locks:  # the holder's connection lived through the fault: its lock too
            assert json_peer.locks[f"field:dose-{uid}"]["lockedBy"] == f"json-{uid}"
        # the newcomer sees both cursors, from the shard's own copy of the room's awareness
        cursors = [{"user": "json", "cursor": 1}, {"user": "yjs", "cursor": 2}]
        await eventually(lambda: _states(newcomer) == _states_of(cursors), 10,
                         f"awareness right again: {newcomer.awareness}")
    finally:
        await newcomer.close()


async def _stored_equals(redis_url: str, room: str, text: str) -> bool:
    return await stored_text(redis_url, room) == text


def _states_of(states: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(state, sort_keys=True) for state in states)


def _states(peer: WsPeer) -> list[str]:
    return _states_of([json.loads(state) for state in peer.awareness.values()])
