"""The shard service without sockets or Ray: commands in order per room while
a document loads, refusals decided by the admission, `RESOURCE_STATE`
assembled in one place, rooms told again after a front door's `Sync`.

The stores are the real memory ones (the document store wrapped to be slow
or to fail); what the service sends is recorded instead of written to a link."""

from __future__ import annotations

import asyncio
from typing import Any

from pycrdt import Doc, Text

from rounds.audit.events import MemoryAuditSink
from rounds.config import Settings
from rounds.ids import ConnId, FrontDoorId, ResourceId, SessionId, ShardId, UserId, conn_id
from rounds.protocol.link import LinkMessage
from rounds.protocol.messages import Deliver, Disconnect, DocUpdate, Join, Leave, Reply, Sync
from rounds.protocol.ws import MessageType
from rounds.shard.documents.shell import MAX_UNWRITTEN
from rounds.shard.locks.store import MemoryLockStore
from rounds.shard.presence.mirror import MemoryPresence
from rounds.shard.service import ShardService
from tests.unit.test_doc_shell import Wrapped, until

ROOM = ResourceId("document:7")
FD0, FD1 = FrontDoorId(0), FrontDoorId(1)
A, B, C = conn_id(FD0, 1), conn_id(FD0, 2), conn_id(FD1, 1)


class RecordingShard(ShardService):
    """The real service; what it would write to its links is kept in `sent`."""

    def __init__(self, store: Any, **settings: Any) -> None:
        super().__init__(ShardId(0), MemoryPresence(), MemoryAuditSink(), MemoryLockStore(), store,
                         Settings(shards=1).replace(**settings))
        self.sent: list[tuple[FrontDoorId, LinkMessage]] = []

    def _send(self, fd: FrontDoorId, msg: LinkMessage) -> None:
        self.sent.append((fd, msg))

    def replies(self, type_: str | None = None, conn: ConnId | None = None) -> list[Reply]:
        return [m for _, m in self.sent if isinstance(m, Reply) and (type_ is None or m.type == type_)
                and (conn is None or m.conn == conn)]

    def delivered(self, type_: str) -> list[Deliver]:
        return [m for _, m in self.sent if isinstance(m, Deliver) and m.type == type_]


def join(conn: ConnId, user: str, kind: str = "ws", restore: bool = False) -> Join:
    return Join(conn, f"j{conn}", UserId(user), user, SessionId(f"s-{user}"), ROOM, "document", "editor",
                restore=restore, joined_at_ms=1, kind=kind)


def edit(author: Doc, text: str, conn: ConnId = A, ref: str = "u") -> DocUpdate:
    before = author.get_state()
    author.get("t", type=Text).insert(len(author.get("t", type=Text)), text)
    return DocUpdate(conn, ref, ROOM, author.get_update(before))


async def test_a_rooms_commands_wait_for_its_document_and_run_in_arrival_order() -> None:
    store = Wrapped()
    store.opened.clear()
    shard = RecordingShard(store, frontdoors=0)
    author = Doc()
    shard._handle(join(A, "a"))
    shard._handle(edit(author, "x"))
    shard._handle(Leave(A, "l", ROOM))  # waits too: it must not overtake the join
    shard._handle(Disconnect(B, "disconnected"))
    await asyncio.sleep(0.05)
    assert shard.sent == []
    store.opened.set()
    await until(lambda: shard.replies(MessageType.UPDATE_ACK))
    # the join first, the update relayed and queued, the leave: the ack once the update is stored
    assert [r.type for r in shard.replies()] == [MessageType.RESOURCE_STATE, MessageType.RESOURCE_LEFT,
                                                 MessageType.UPDATE_ACK]


async def test_a_document_that_cannot_be_loaded_answers_joins_and_updates_unavailable_and_is_retried() -> None:
    store = Wrapped()
    store.load_fails = True
    shard = RecordingShard(store, frontdoors=0)
    shard._handle(join(A, "a"))
    shard._handle(edit(Doc(), "x"))
    shard._handle(Leave(B, "l", ROOM))
    await until(lambda: len(shard.replies(MessageType.ERROR)) == 3)
    assert [r.data["code"] for r in shard.replies(MessageType.ERROR)] == ["UNAVAILABLE", "UNAVAILABLE", "NOT_JOINED"]
    assert ROOM not in shard.docs.documents
    store.load_fails = False
    shard._handle(join(A, "a"))
    await until(lambda: shard.replies(MessageType.RESOURCE_STATE))


async def test_updates_waiting_for_the_store_are_bounded_by_the_admission() -> None:
    store = Wrapped()
    shard = RecordingShard(store, frontdoors=0)
    shard._handle(join(A, "a"))
    await until(lambda: shard.replies(MessageType.RESOURCE_STATE))
    store.failing = 10**6
    author = Doc()
    shard.limits = shard.limits.__class__(shard.limits.max_update_bytes, shard.limits.max_document_bytes, 3)
    for i in range(5):
        shard._handle(edit(author, f"{i}", ref=f"r{i}"))
    assert [r.data["code"] for r in shard.replies(MessageType.ERROR)] == ["UNAVAILABLE", "UNAVAILABLE"]
    assert shard.stats()["documents"]["refusedUnwritten"] == 2 and MAX_UNWRITTEN > 3
    store.failing = 0
    await until(lambda: len(shard.replies(MessageType.UPDATE_ACK)) == 3, timeout=5)


async def test_resource_state_carries_users_document_revision_locks_and_awareness() -> None:
    shard = RecordingShard(Wrapped(), frontdoors=0)
    author = Doc()
    shard._handle(join(A, "a"))
    await until(lambda: shard.replies(MessageType.RESOURCE_STATE))
    shard._handle(edit(author, "vitals"))
    await until(lambda: shard.replies(MessageType.UPDATE_ACK))
    shard._handle(join(B, "b"))
    (state,) = shard.replies(MessageType.RESOURCE_STATE, B)
    assert state.ref == f"j{B}"
    assert set(state.data) == {"resourceId", "users", "state", "revision", "locks", "stateVector", "awareness"}
    assert [u["userId"] for u in state.data["users"]] == ["a", "b"] and state.data["revision"] == 1
    replica = Doc()
    replica.apply_update(state.data["state"])
    assert str(replica.get("t", type=Text)) == "vitals"


async def test_a_sync_after_a_link_drop_tells_each_listed_member_its_room_whole_and_the_others_nothing() -> None:
    shard = RecordingShard(Wrapped(), frontdoors=0)
    author = Doc()
    for conn, user, kind in ((A, "a", "ws"), (B, "b", "yjs"), (C, "c", "ws")):
        shard._handle(join(conn, user, kind))
    await until(lambda: len(shard.replies(MessageType.RESOURCE_STATE)) == 3)
    shard._handle(edit(author, "while the link of front door 0 was down", conn=C))
    await until(lambda: shard.replies(MessageType.UPDATE_ACK))
    shard.sent.clear()
    shard._handle(Sync(FD0, (join(A, "a", restore=True), join(B, "b", "yjs", restore=True))))
    refreshed = shard.replies(MessageType.RESOURCE_STATE)
    assert {(r.conn, r.ref) for r in refreshed} == {(A, None), (B, None)}
    for reply in refreshed:  # the whole document, for the /ws member and the y-websocket one alike
        replica = Doc()
        replica.apply_update(reply.data["state"])
        assert str(replica.get("t", type=Text)) == "while the link of front door 0 was down"
    assert not [m for fd, m in shard.sent if fd == FD1]  # nothing changed for front door 1's member
    assert not shard.delivered(MessageType.USER_JOINED)


async def test_a_restarted_shard_tells_restored_rooms_only_once_every_front_door_has_synced() -> None:
    shard = RecordingShard(Wrapped(), frontdoors=2)
    shard._handle(Sync(FD0, (join(A, "a", restore=True),)))
    await asyncio.sleep(0.05)
    assert shard.replies(MessageType.RESOURCE_STATE) == []  # front door 1's members may still come
    shard._handle(Sync(FD1, (join(C, "c", restore=True),)))
    await until(lambda: len(shard.replies(MessageType.RESOURCE_STATE)) == 2)
    for reply in shard.replies(MessageType.RESOURCE_STATE):
        assert [u["userId"] for u in reply.data["users"]] == ["a", "c"]
    assert not shard.delivered(MessageType.USER_JOINED)  # no flicker: nobody left, nobody arrived


async def test_a_front_door_that_never_syncs_holds_recovery_up_only_for_the_grace() -> None:
    shard = RecordingShard(Wrapped(), frontdoors=2)
    shard._handle(Sync(FD0, (join(A, "a", restore=True),)))
    assert shard.presence.recovering
    await until(lambda: shard.replies(MessageType.RESOURCE_STATE), timeout=3)
    assert not shard.presence.recovering
    shard.sent.clear()
    shard._handle(Sync(FD1, (join(C, "c", restore=True),)))  # late: now a user arriving, announced
    (arrived,) = shard.delivered(MessageType.USER_JOINED)
    assert arrived.conns == (A,) and arrived.data["user"]["userId"] == "c"
    await until(lambda: shard.replies(MessageType.RESOURCE_STATE, C))
