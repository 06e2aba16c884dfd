"""Seed story BE-001.4, "Y.js CRDT Integration", over `/ws` (issue 4).

Against the main gateway (two shards and two front doors as Ray actors,
Redis on). Clients hold real pycrdt documents and send the updates their
edits produce; the document's keys are checked on the real Redis.
"""

from __future__ import annotations

import base64
import os

import pytest
import redis
from pycrdt import Array, Doc, Map, Text

from rounds.shard.documents.store_redis import doc_key, doc_log_key
from tests.client import Client, eventually
from tests.conftest import GatewayHandle
from tests.e2e.conftest import Connect

pytestmark = pytest.mark.ray


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


class Editor:
    """A `/ws` client with its own Y.js document."""

    def __init__(self, client: Client, room: str) -> None:
        self.client = client
        self.room = room
        self.doc = Doc()

    @property
    def text(self) -> Text:
        return self.doc.get("t", type=Text)

    async def join(self, with_vector: bool = False) -> dict:
        extra = {"stateVector": b64(self.doc.get_state())} if with_vector else {}
        state = await self.client.join(self.room, **extra)
        assert state.type == "RESOURCE_STATE", state
        self.doc.apply_update(unb64(state.data["state"]))
        return state.data

    async def change(self, fn, ref: str = "u") -> dict:
        before = self.doc.get_state()
        fn(self.doc)
        update = self.doc.get_update(before)
        reply = await self.client.request("RESOURCE_UPDATE", {"resourceId": self.room, "update": b64(update)},
                                          ref=ref)
        return {"type": reply.type, **reply.data}

    async def receive(self, count: int = 1) -> list[dict]:
        got = []
        for _ in range(count):
            frame = await self.client.expect("RESOURCE_UPDATE", resourceId=self.room)
            self.doc.apply_update(unb64(frame.data["update"]))
            got.append(frame.data)
        return got


async def editors(connect: Connect, room: str, *users: str) -> list[Editor]:
    out = []
    for user in users:
        editor = Editor(await connect(user), room)
        await editor.join()
        out.append(editor)
    return out


async def test_an_update_is_acknowledged_with_a_revision_and_relayed_with_sender_and_revision(
        connect: Connect, uid: str) -> None:
    a, b = await editors(connect, f"document:1-{uid}", f"a-{uid}", f"b-{uid}")
    ack = await a.change(lambda d: d.get("t", type=Text).insert(0, "BP 120/80"))
    assert ack == {"type": "UPDATE_ACK", "resourceId": a.room, "revision": 1}
    (relayed,) = await b.receive()
    assert relayed["userId"] == f"a-{uid}" and relayed["revision"] == 1
    assert str(b.text) == "BP 120/80"
    assert "RESOURCE_UPDATE" not in [f.type for f in await a.client.quiet(0.2)]  # not echoed to the sender


async def test_concurrent_edits_of_text_map_and_array_converge(connect: Connect, uid: str) -> None:
    a, b = await editors(connect, f"document:2-{uid}", f"a-{uid}", f"b-{uid}")

    def edit_a(d: Doc) -> None:
        d.get("t", type=Text).insert(0, "left")  # the same position as b's, at the same time
        d.get("m", type=Map).update({"hr": 72, "list": Array([1])})

    def edit_b(d: Doc) -> None:
        d.get("t", type=Text).insert(0, "right")
        d.get("a", type=Array).extend(["x", Map({"nested": Map({"k": "v"})})])

    ack_a = await a.change(edit_a, ref="a")
    ack_b = await b.change(edit_b, ref="b")
    assert ack_a["type"] == ack_b["type"] == "UPDATE_ACK"
    await a.receive()
    await b.receive()
    for editor in (a, b):
        assert editor.doc.get("m", type=Map).to_py() == {"hr": 72.0, "list": [1.0]}
        assert editor.doc.get("a", type=Array).to_py() == ["x", {"nested": {"k": "v"}}]
    assert str(a.text) == str(b.text) and sorted(str(a.text)) == sorted("leftright")


async def test_a_late_joiner_with_a_state_vector_receives_only_what_it_lacks(connect: Connect, uid: str) -> None:
    room = f"document:3-{uid}"
    (a,) = await editors(connect, room, f"a-{uid}")
    await a.change(lambda d: d.get("t", type=Text).insert(0, "x" * 20_000))
    late = Editor(await connect(f"late-{uid}"), room)
    late.doc.apply_update(a.doc.get_update())  # it had the document up to here (e.g. from an earlier visit)
    await a.change(lambda d: d.get("t", type=Text).insert(0, "new: "), ref="u2")
    state = await late.join(with_vector=True)
    assert state["revision"] == 2
    assert len(unb64(state["state"])) < 200  # only the missing insert, not 20 kB
    assert str(late.text) == "new: " + "x" * 20_000
    full = Editor(await connect(f"fresh-{uid}"), room)
    assert len(unb64((await full.join())["state"])) > 20_000


async def test_viewers_cannot_update(connect: Connect, uid: str) -> None:
    room = f"document:4-{uid}"
    viewer = Editor(await connect(f"v-{uid}"), room)
    assert (await viewer.client.join(room, mode="viewer")).type == "RESOURCE_STATE"
    denied = await viewer.change(lambda d: d.get("t", type=Text).insert(0, "nope"))
    assert denied["type"] == "PERMISSION_DENIED" and denied["code"] == "PERMISSION_DENIED"


@pytest.mark.parametrize("payload", [os.urandom(64), b"\xff" * 16, b"\x01"])
async def test_an_update_that_is_not_y_js_is_refused_and_changes_nothing(connect: Connect, uid: str,
                                                                         payload: bytes) -> None:
    a, b = await editors(connect, f"document:5-{uid}", f"a-{uid}", f"b-{uid}")
    await a.change(lambda d: d.get("t", type=Text).insert(0, "kept"))
    await b.receive()
    reply = await a.client.request("RESOURCE_UPDATE", {"resourceId": a.room, "update": b64(payload)}, ref="bad")
    if reply.type == "UPDATE_ACK":
        # a few random byte strings are valid (empty) Y.js updates: then nothing may change
        assert reply.data["revision"] == 2
    else:
        assert (reply.type, reply.data["code"]) == ("ERROR", "BAD_UPDATE")
    fresh = Editor(await connect(f"c-{uid}"), a.room)
    await fresh.join()
    assert str(fresh.text) == "kept"
    assert (await a.client.request("HEARTBEAT")).type == "HEARTBEAT_ACK"  # the connection stays


async def test_an_oversized_update_is_refused_with_too_large(connect: Connect, gateway: GatewayHandle,
                                                             uid: str) -> None:
    (a,) = await editors(connect, f"document:6-{uid}", f"a-{uid}")
    big = Doc()
    big.get("t", type=Text).insert(0, "z" * gateway.settings.max_update_bytes)
    # the frame limit is met first on /ws; the frame is not read, so its ref cannot be echoed
    await a.client.send("RESOURCE_UPDATE", {"resourceId": a.room, "update": b64(big.get_update())}, ref="big")
    refused = await a.client.expect("ERROR")
    assert refused.data["code"] == "TOO_LARGE"
    assert (await a.change(lambda d: d.get("t", type=Text).insert(0, "ok"), ref="u2"))["type"] == "UPDATE_ACK"


async def test_an_update_for_another_root_type_leaves_the_text_as_it_was(connect: Connect, uid: str) -> None:
    """A valid update whose root `t` is a Map, sent to a document where `t` is
    Text: Y.js keeps both views; the text readers see is unchanged."""
    (a,) = await editors(connect, f"document:7-{uid}", f"a-{uid}")
    await a.change(lambda d: d.get("t", type=Text).insert(0, "note"))
    other = Doc()
    other.get("t", type=Map)["k"] = "v"
    reply = await a.client.request("RESOURCE_UPDATE", {"resourceId": a.room, "update": b64(other.get_update())})
    assert reply.type in ("UPDATE_ACK", "ERROR")
    fresh = Editor(await connect(f"c-{uid}"), a.room)
    await fresh.join()
    assert str(fresh.text) == "note"


async def test_acknowledged_updates_are_in_redis_before_the_ack_and_snapshotted_later(
        connect: Connect, rdb: redis.Redis, uid: str) -> None:
    (a,) = await editors(connect, f"document:8-{uid}", f"a-{uid}")
    for i in range(3):
        ack = await a.change(lambda d, i=i: d.get("t", type=Text).insert(0, f"{i}"), ref=f"u{i}")
        assert ack["revision"] == i + 1
        # acknowledged means logged (or already folded into a snapshot)
        assert rdb.llen(doc_log_key(a.room)) + int(rdb.hget(doc_key(a.room), "revision") or 0) >= i + 1
    await eventually(lambda: rdb.hget(doc_key(a.room), "revision") == "3", timeout=10, what="snapshot")
    assert rdb.llen(doc_log_key(a.room)) == 0


async def test_awareness_is_relayed_and_cleared_when_its_client_goes(connect: Connect, uid: str) -> None:
    from rounds.protocol.yjs import AwarenessEntry, decode_awareness, encode_awareness

    a, b = await editors(connect, f"document:9-{uid}", f"a-{uid}", f"b-{uid}")
    cursor = encode_awareness([AwarenessEntry(4242, 1, '{"cursor":{"index":3}}')])
    await a.client.send("AWARENESS_UPDATE", {"resourceId": a.room, "update": b64(cursor)})
    for member in (b, a):  # the sender hears it too, as y-websocket clients expect
        seen = await member.client.expect("AWARENESS_UPDATE", resourceId=a.room)
        assert decode_awareness(unb64(seen.data["update"])) == [AwarenessEntry(4242, 1, '{"cursor":{"index":3}}')]
    late = Editor(await connect(f"late-{uid}"), a.room)
    state = await late.join()
    assert [e.client_id for e in decode_awareness(unb64(state["awareness"]))] == [4242]
    await a.client.close()
    gone = await b.client.expect("AWARENESS_UPDATE", resourceId=a.room)
    assert decode_awareness(unb64(gone.data["update"])) == [AwarenessEntry(4242, 2, "null")]
