"""Stock Y.js clients on `/yjs` (issue 4): npm's `yjs` + `y-websocket`
`WebsocketProvider`, unchanged, run by `tests/interop/yclient.mjs` against
the main gateway (Ray, two shards, two front doors, Redis), sharing their
documents with `/ws` clients of the same room.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Doc, Map, Text

from rounds.protocol.yjs import decode_awareness
from tests.client import Client
from tests.conftest import GatewayHandle
from tests.e2e.conftest import Connect

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed"),
]

INTEROP = Path(__file__).resolve().parents[1] / "interop"


def yjs_url(gateway: GatewayHandle) -> str:
    return gateway.url.removesuffix("/ws") + "/yjs"


async def yclient(gateway: GatewayHandle, room: str, user: str, *, role: str = "surgeon",
                  token: str | None = None, timeout_ms: int = 15_000, **flags: Any) -> dict[str, Any]:
    """Run one stock client to the end; its JSON line, with its exit code."""
    args = ["node", str(INTEROP / "yclient.mjs"), "--url", yjs_url(gateway), "--room", room,
            "--token", token if token is not None else gateway.token(user, role),
            "--timeout-ms", str(timeout_ms), "--quiet"]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args += [flag] if value else []
        else:
            args += [flag, value if isinstance(value, str) else json.dumps(value)]
    proc = await asyncio.create_subprocess_exec(*args, cwd=INTEROP, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout_ms / 1000 + 10)
    lines = out.decode().strip().splitlines()
    assert lines, f"yclient printed nothing (exit {proc.returncode}): {err.decode()[-2000:]}"
    return {**json.loads(lines[-1]), "exit": proc.returncode}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def ws_editor(connect: Connect, room: str, user: str) -> tuple[Client, Doc]:
    client = await connect(user)
    state = await client.join(room)
    doc = Doc()
    doc.apply_update(base64.b64decode(state.data["state"]))
    return client, doc


async def ws_edit(client: Client, room: str, doc: Doc, fn) -> None:
    before = doc.get_state()
    fn(doc)
    reply = await client.request("RESOURCE_UPDATE", {"resourceId": room, "update": b64(doc.get_update(before))})
    assert reply.type == "UPDATE_ACK", reply


async def test_two_ws_clients_and_two_stock_yjs_clients_edit_one_document_and_converge(
        connect: Connect, gateway: GatewayHandle, uid: str) -> None:
    room = f"document:interop-{uid}"
    (w1, d1), (w2, d2) = [await ws_editor(connect, room, f"{n}-{uid}") for n in ("w1", "w2")]
    expected = {"text": {"t": "ABCD"}, "map": {"m": {"w1": 1, "w2": 2, "y1": 3, "y2": 4}}}
    # the Y.js clients insert at the ends, so the merged text is deterministic
    y1 = asyncio.create_task(yclient(gateway, room, f"y1-{uid}", expect=expected, ops=[
        {"op": "wait_for", "expect": {"text": {"t": "BC"}}},
        {"op": "text_insert", "name": "t", "index": 0, "text": "A"},
        {"op": "map_set", "name": "m", "key": "y1", "value": 3}]))
    y2 = asyncio.create_task(yclient(gateway, room, f"y2-{uid}", expect=expected, ops=[
        {"op": "wait_for", "expect": {"text": {"t": "BC"}}},
        {"op": "wait_for", "expect": {"text": {"t": "ABC"}}},
        {"op": "text_insert", "name": "t", "index": 3, "text": "D"},
        {"op": "map_set", "name": "m", "key": "y2", "value": 4}]))
    await asyncio.sleep(1.0)  # both providers connected and synced

    await ws_edit(w1, room, d1, lambda d: (d.get("t", type=Text).insert(0, "B"),
                                           d.get("m", type=Map).__setitem__("w1", 1)))
    frame = await w2.expect("RESOURCE_UPDATE", resourceId=room, userId=f"w1-{uid}")
    d2.apply_update(base64.b64decode(frame.data["update"]))
    await ws_edit(w2, room, d2, lambda d: (d.get("t", type=Text).insert(1, "C"),
                                           d.get("m", type=Map).__setitem__("w2", 2)))
    one, two = await asyncio.gather(y1, y2)
    for result in (one, two):
        assert result["exit"] == 0, json.dumps(result)
        assert result["text"]["t"] == "ABCD"
        assert result["map"]["m"] == {"w1": 1, "w2": 2, "y1": 3, "y2": 4}
    # and a /ws newcomer reads the same document
    _, fresh = await ws_editor(connect, room, f"late-{uid}")
    assert str(fresh.get("t", type=Text)) == "ABCD"
    assert fresh.get("m", type=Map).to_py() == {"w1": 1.0, "w2": 2.0, "y1": 3.0, "y2": 4.0}


async def test_awareness_crosses_between_yjs_and_ws_and_is_cleared_when_the_yjs_client_goes(
        connect: Connect, gateway: GatewayHandle, uid: str) -> None:
    room = f"document:aware-{uid}"
    watcher, _ = await ws_editor(connect, room, f"w-{uid}")
    result = await yclient(gateway, room, f"y-{uid}", linger_ms=300, ops=[
        {"op": "awareness", "state": {"user": {"name": "Dr. Y"}, "cursor": 7}}])
    assert result["exit"] == 0, result
    states = []
    while True:
        frame = await watcher.expect("AWARENESS_UPDATE", resourceId=room)
        entries = decode_awareness(base64.b64decode(frame.data["update"]))
        states += [e.state for e in entries if e.client_id == result["clientId"]]
        if states and states[-1] == "null":
            break
    assert {"user": {"name": "Dr. Y"}, "cursor": 7} in [json.loads(s) for s in states]


async def test_a_late_stock_client_receives_the_document(connect: Connect, gateway: GatewayHandle,
                                                         uid: str) -> None:
    room = f"document:late-{uid}"
    writer, doc = await ws_editor(connect, room, f"w-{uid}")
    await ws_edit(writer, room, doc, lambda d: d.get("t", type=Text).insert(0, "history " * 100))
    result = await yclient(gateway, room, f"y-{uid}", expect={"text": {"t": "history " * 100}})
    assert result["exit"] == 0 and result["synced"], result


async def test_a_viewers_updates_are_dropped_and_the_document_is_unchanged(
        connect: Connect, gateway: GatewayHandle, uid: str) -> None:
    room = f"document:viewer-{uid}"
    watcher, doc = await ws_editor(connect, room, f"w-{uid}")
    await ws_edit(watcher, room, doc, lambda d: d.get("t", type=Text).insert(0, "signed"))
    result = await yclient(gateway, room, f"obs-{uid}", role="observer", linger_ms=500, ops=[
        {"op": "text_insert", "name": "t", "index": 0, "text": "tampered "}])
    assert result["exit"] == 0, result
    assert "RESOURCE_UPDATE" not in [f.type for f in await watcher.quiet(0.3)]
    _, fresh = await ws_editor(connect, room, f"late-{uid}")
    assert str(fresh.get("t", type=Text)) == "signed"
    record = await gateway.wait_audit("PERMISSION_DENIED", userId=f"obs-{uid}", resourceId=room)
    assert record["details"]["endpoint"] == "yjs"


@pytest.mark.parametrize("bad", [
    {"op": "raw_hex", "hex": os.urandom(48).hex()},  # random bytes
    {"op": "raw_hex", "hex": "0002ff"},  # a sync update whose length runs past the frame
    {"op": "raw_hex", "hex": "0402"},  # an unknown message type
    {"op": "v2_update"},  # a valid update, but in Y.js V2 encoding
], ids=["random", "truncated", "unknown-type", "v2-update"])
async def test_bad_frames_from_a_yjs_client_change_nothing_and_the_connection_stays(
        connect: Connect, gateway: GatewayHandle, uid: str, bad: dict[str, Any]) -> None:
    room = f"document:bad-{uid}"
    watcher, doc = await ws_editor(connect, room, f"w-{uid}")
    await ws_edit(watcher, room, doc, lambda d: d.get("t", type=Text).insert(0, "intact"))
    # the bad frame, then a good edit on the same connection
    result = await yclient(gateway, room, f"y-{uid}", expect={"text": {"t": "intact!"}}, ops=[
        {"op": "wait_for", "expect": {"text": {"t": "intact"}}},
        bad,
        {"op": "text_insert", "name": "t", "index": 6, "text": "!"}])
    assert result["exit"] == 0 and result["closes"] == [], result
    relayed = await watcher.expect("RESOURCE_UPDATE", resourceId=room)
    assert relayed.data["userId"] == f"y-{uid}"
    _, fresh = await ws_editor(connect, room, f"late-{uid}")
    assert str(fresh.get("t", type=Text)) == "intact!"
    assert str(fresh.get("v2", type=Text)) == ""  # the V2 update's text never landed


async def test_a_bad_token_is_refused_before_the_upgrade(gateway: GatewayHandle, uid: str) -> None:
    result = await yclient(gateway, f"document:auth-{uid}", f"y-{uid}", token="not-a-jwt", timeout_ms=5_000)
    assert result["exit"] == 3 and not result["synced"], result
    assert any("401" in e for e in result["connectionErrors"]), result
