"""A shard actor killed under a document loses no acknowledged edit (issue 4).

Real Ray, a dedicated gateway (2 shards, 1 front door, Redis on) whose
documents are snapshotted every 5 updates, so at the kill the document lives
partly in its Redis snapshot and partly in the update log. Ray restarts the
actor; the restarted shard reloads the document on first use; every edit
that was acknowledged is there, the revision goes on from where it was, and
the clients that stayed connected carry on editing.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
import ray
from pycrdt import Doc, Text

from rounds.routing import HashRing
from tests.client import Client, eventually
from tests.conftest import GatewayHandle, gateway_settings

pytestmark = pytest.mark.ray

RECOVERY_S = 20.0


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def send_edit(client: Client, room: str, doc: Doc, text: str, ref: str) -> dict:
    before = doc.get_state()
    doc.get("t", type=Text).insert(len(doc.get("t", type=Text)), text)
    reply = await client.request("RESOURCE_UPDATE", {"resourceId": room, "update": b64(doc.get_update(before))},
                                 ref=ref)
    return {"type": reply.type, **reply.data}


async def test_acknowledged_edits_survive_a_killed_shard_and_editing_goes_on(
        ray_session: None, redis_url: str, var_root: Path, uid: str) -> None:
    handle = await asyncio.to_thread(GatewayHandle, gateway_settings(
        var_root, f"docrestart-{uid}", shards=2, frontdoors=1, redis_url=redis_url,
        doc_log_max_entries=5, doc_snapshot_delay_ms=60_000))
    clients: list[Client] = []
    try:
        room = f"document:crash-{uid}"
        owner = HashRing(range(2)).shard_for(room)
        a = await Client.connect(handle.url, handle.token(f"a-{uid}"))
        b = await Client.connect(handle.url, handle.token(f"b-{uid}"))
        clients += [a, b]
        for client in (a, b):
            assert (await client.join(room)).type == "RESOURCE_STATE"
        mine = Doc()
        acked = []
        for i in range(12):
            reply = await send_edit(a, room, mine, f"[{i}]", f"u{i}")
            assert reply["type"] == "UPDATE_ACK", reply
            acked.append(reply["revision"])
        assert acked == list(range(1, 13))
        old = (await asyncio.to_thread(handle.gateway.status))["shards"][owner]

        ray.kill(handle.gateway.shards[owner], no_restart=False)

        async def back() -> bool:
            status = await asyncio.to_thread(handle.gateway.status)
            shard = status["shards"][owner]
            return bool(shard and shard["address"] != old["address"] and shard["members"] == 2
                        and status["frontdoors"][0]["shards"].get(owner))

        await eventually(back, RECOVERY_S, "shard back with its members")

        # a newcomer gets every acknowledged edit, and the revision goes on
        c = await Client.connect(handle.url, handle.token(f"c-{uid}"))
        clients.append(c)
        state = await c.join(room)
        assert state.type == "RESOURCE_STATE", state
        fresh = Doc()
        fresh.apply_update(base64.b64decode(state.data["state"]))
        assert str(fresh.get("t", type=Text)) == "".join(f"[{i}]" for i in range(12))
        assert state.data["revision"] == 12

        # the client that stayed connected carries on; the others hear it
        reply = await send_edit(a, room, mine, "[after]", "after")
        assert (reply["type"], reply["revision"]) == ("UPDATE_ACK", 13)
        for other in (b, c):
            relayed = await other.expect("RESOURCE_UPDATE", resourceId=room, revision=13)
            assert relayed.data["userId"] == f"a-{uid}"
    finally:
        for client in clients:
            await client.close()
        await asyncio.to_thread(handle.stop)
