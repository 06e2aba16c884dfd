"""Micro-benchmarks of the gateway's hot path (pytest-benchmark).

What every update or presence change costs in our own code, measured one
step at a time, no sockets: the link's frame encode and decode (shard <->
front door), a `/ws` frame encoded once per codec (JSON, msgpack), a
y-websocket frame decoded, a fan-out frame built, a join through the
presence machine, a lock granted by the lock machine, and an update applied
and admitted by the shard. `make bench-micro` runs them with timing (figures
in docs/benchmarks.md, "Hot path"); `make test` runs each once as a smoke
(`--benchmark-disable`), so they cannot rot.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from pycrdt import Doc, Text

from rounds.frontdoor.fanout import frame
from rounds.ids import ConnId, FrontDoorId, ResourceId, SessionId, UserId, conn_id
from rounds.protocol.link import decode, encode
from rounds.protocol.messages import Deliver, DocUpdate, Join, LockAcquire
from rounds.protocol.ws import JSON, MSGPACK, MessageType
from rounds.protocol.yjs import SyncUpdate, decode_message, sync_update
from rounds.shard.admission import Limits, refuse_update
from rounds.shard.documents.machine import Documents
from rounds.shard.locks.events import GrantStored, StoreGrant
from rounds.shard.locks.machine import Locks
from rounds.shard.presence.machine import Member, Presence

ROOM = ResourceId("document:999/tab:diagnosis")
UPDATE = os.urandom(60)  # the size of one typed character's Y.js update, about
CONNS = tuple(conn_id(FrontDoorId(0), i) for i in range(10))  # a room of ten on one front door
EDITOR = Member(CONNS[0], UserId("u0"), "u0", SessionId("s0"), "editor", 0)
DELIVER = Deliver(CONNS, MessageType.RESOURCE_UPDATE, {"resourceId": ROOM, "update": UPDATE,
                                                       "userId": "usr_001", "revision": 1234})


def test_link_encode_a_delivery(benchmark: Any) -> None:
    assert len(benchmark(encode, DELIVER)) > len(UPDATE)


def test_link_decode_a_delivery(benchmark: Any) -> None:
    body = encode(DELIVER)[4:]
    assert benchmark(decode, body) == DELIVER


def test_ws_encode_json(benchmark: Any) -> None:
    assert benchmark(JSON.encode, DELIVER.type, DELIVER.data).startswith('{"type"')


def test_ws_encode_msgpack(benchmark: Any) -> None:
    assert isinstance(benchmark(MSGPACK.encode, DELIVER.type, DELIVER.data), bytes)


def test_yjs_decode_an_update(benchmark: Any) -> None:
    message = sync_update(UPDATE)
    decoded = benchmark(decode_message, message)
    assert isinstance(decoded, SyncUpdate) and decoded.update == UPDATE


def test_fanout_frame(benchmark: Any) -> None:
    message = JSON.encode(DELIVER.type, DELIVER.data)
    assert benchmark(frame, message)[0] == 0x81


def test_presence_join_into_a_room_of_ten(benchmark: Any) -> None:
    counter = itertools.count(100)

    def setup() -> tuple[tuple[Presence, Join], dict[str, Any]]:
        presence = Presence()
        for i, conn in enumerate(CONNS):
            presence.handle(Join(conn, None, UserId(f"u{i}"), f"u{i}", SessionId(f"s{i}"), ROOM, "doc", "editor"), 0)
        n = next(counter)
        return (presence, Join(conn_id(FrontDoorId(1), n), "j", UserId(f"new{n}"), "new", SessionId("s"), ROOM, "doc",
                               "editor")), {}

    events = benchmark.pedantic(lambda p, j: p.handle(j, 1), setup=setup, rounds=2_000)
    assert any(e.__class__.__name__ == "TellState" for e in events)


def test_lock_grant(benchmark: Any) -> None:
    ids = (f"L{i}" for i in itertools.count())
    locks = Locks(lambda: next(ids))
    resources = (ResourceId(f"field:{i}") for i in itertools.count())

    def grant() -> Any:
        resource = next(resources)
        asked = locks.handle(LockAcquire(ConnId(1), "r", UserId("u"), resource, "editor", ROOM), 0)
        store = next(e for e in asked if isinstance(e, StoreGrant))
        return locks.handle(GrantStored(resource, store.lock_id, 1), 0)

    assert any(getattr(e, "type", None) == MessageType.LOCK_ACQUIRED for e in benchmark(grant))


def test_an_update_admitted_and_applied(benchmark: Any) -> None:
    """One typed character: the shard's admission, then the document's apply
    (the client's own edit is made in the untimed setup)."""
    docs = Documents()
    docs.load(ROOM, None, 0, [])
    author: Doc = Doc()
    text = author.get("t", type=Text)
    limits = Limits(262_144, 16 * 1024 * 1024, 10_000)

    def setup() -> tuple[tuple[DocUpdate], dict[str, Any]]:
        before = author.get_state()
        text.insert(len(text), "x")
        return (DocUpdate(CONNS[0], "u", ROOM, author.get_update(before)),), {}

    def admit_and_apply(msg: DocUpdate) -> Any:
        assert refuse_update(msg, EDITOR, None, 0, docs.size(ROOM), limits) is None
        return docs.apply(ROOM, msg.update)

    assert benchmark.pedantic(admit_and_apply, setup=setup, rounds=2_000).integrated
