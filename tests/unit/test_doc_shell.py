"""The documents' shell without Ray or sockets (issue 4): loading, acks that
wait for the store, snapshots that trim the log, idle documents that leave
memory and come back whole, shutdown that saves everything. The stores are
the real memory/file ones, wrapped to be slow or to fail. (The order of a
room's commands while it loads, and refusals, are the shard service's:
tests/unit/test_shard_service.py.)"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from pycrdt import Doc, Text

from rounds.audit.events import MemoryAuditSink
from rounds.config import Settings
from rounds.ids import ConnId, ResourceId, SessionId, UserId
from rounds.protocol.messages import SYNC_STEP1, SYNC_STEP2, Awareness, DocSync, DocUpdate, Reply
from rounds.protocol.ws import MessageType
from rounds.protocol.yjs import AwarenessEntry, decode_awareness, encode_awareness
from rounds.shard.documents.shell import STORE_TIMEOUT_S, DocShell
from rounds.shard.documents.store import FileDocStore, MemoryDocStore, StoredDoc
from rounds.shard.events import RoomBroadcast
from rounds.shard.presence.machine import Member

ROOM = ResourceId("document:1")
A, B = ConnId(1_000_001), ConnId(1_000_002)
MEMBER = Member(A, UserId("a"), "a", SessionId("s-a"), "editor", 0)


class Wrapped(MemoryDocStore):
    """The memory store, with loads that wait for `opened` and appends that
    fail while `failing` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = asyncio.Event()
        self.opened.set()
        self.failing = 0  # appends (or loads) that fail before one succeeds
        self.load_fails = False
        self.appends = 0

    async def load(self, room: ResourceId) -> StoredDoc:
        await self.opened.wait()
        if self.load_fails:
            raise ConnectionError("store down")
        return await super().load(room)

    async def append(self, logs: Mapping[ResourceId, Sequence[tuple[int, bytes]]]) -> None:
        if self.failing:
            self.failing -= 1
            raise ConnectionError("store down")
        self.appends += 1
        await super().append(logs)


class Harness:
    def __init__(self, store: Any, audited: bool = True, store_timeout_s: float = STORE_TIMEOUT_S,
                 **settings: Any) -> None:
        self.events: list[Any] = []
        self.members: set[ResourceId] = set()
        self.audit = MemoryAuditSink()
        self.shell = DocShell("shard-0", store, self.events.extend, lambda: self.members,
                              Settings().replace(**settings), audit=self.audit if audited else None,
                              store_timeout_s=store_timeout_s)
        self.store = store
        self.author = Doc()

    def edit(self, text: str, conn: ConnId = A, ref: str = "u") -> DocUpdate:
        before = self.author.get_state()
        self.author.get("t", type=Text).insert(len(self.author.get("t", type=Text)), text)
        return DocUpdate(conn, ref, ROOM, self.author.get_update(before))

    def of(self, type_: str) -> list[Any]:
        return [e for e in self.events if getattr(e, "type", None) == type_]

    async def loaded(self) -> None:
        assert await self.shell.load(ROOM)


async def until(check: Any, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.005)


async def test_a_document_the_store_cannot_read_is_not_loaded_until_it_can() -> None:
    store = Wrapped()
    store.load_fails = True
    h = Harness(store)
    assert not await h.shell.load(ROOM)
    assert ROOM not in h.shell.documents and h.shell.store_failures == 1  # never served from an empty stand-in
    store.load_fails = False
    await h.loaded()
    assert ROOM in h.shell.documents


async def test_updates_are_relayed_at_once_and_acknowledged_only_once_stored() -> None:
    store = Wrapped()
    h = Harness(store)
    await h.loaded()
    store.failing = 2
    h.shell.apply(h.edit("BP 120/80", ref="r1"), MEMBER)
    relayed = [e for e in h.events if isinstance(e, RoomBroadcast)]
    assert [(r.type, r.data["revision"], r.except_conn) for r in relayed] == [("RESOURCE_UPDATE", 1, A)]
    assert h.of(MessageType.UPDATE_ACK) == []
    await until(lambda: h.of(MessageType.UPDATE_ACK), timeout=5)
    (ack,) = h.of(MessageType.UPDATE_ACK)
    assert (ack.conn, ack.ref, ack.data) == (A, "r1", {"resourceId": ROOM, "revision": 1})
    assert h.shell.store_failures == 2
    assert (await store.load(ROOM)).log[0][0] == 1


async def test_updates_waiting_for_the_store_count_as_the_rooms_backlog() -> None:
    store = Wrapped()
    h = Harness(store)
    await h.loaded()
    store.failing = 10**6
    for i in range(3):
        h.shell.apply(h.edit(f"{i}", ref=f"r{i}"), MEMBER)
    await asyncio.sleep(0.05)
    assert h.shell.persistence.backlog(ROOM) == 3 and h.of(MessageType.UPDATE_ACK) == []
    store.failing = 0
    await until(lambda: len(h.of(MessageType.UPDATE_ACK)) == 3, timeout=5)
    assert h.shell.persistence.backlog(ROOM) == 0


async def test_the_log_is_folded_into_a_snapshot_after_enough_updates() -> None:
    store = Wrapped()
    h = Harness(store, doc_log_max_entries=4, doc_snapshot_delay_ms=60_000)
    await h.loaded()
    for i in range(6):
        h.shell.apply(h.edit(f"[{i}]", ref=f"r{i}"), MEMBER)
        await until(lambda i=i: len(h.of(MessageType.UPDATE_ACK)) == i + 1)
    stored = await store.load(ROOM)
    assert stored.snapshot is not None and stored.revision >= 4
    assert len(stored.log) <= 2
    again = Doc()
    again.apply_update(stored.snapshot)
    for _, update in stored.log:
        again.apply_update(update)
    assert str(again.get("t", type=Text)) == "".join(f"[{i}]" for i in range(6))


async def test_an_idle_document_leaves_memory_saved_and_comes_back_whole(tmp_path: Any) -> None:
    store = FileDocStore(tmp_path)
    h = Harness(store, doc_idle_unload_ms=200, doc_snapshot_delay_ms=60_000)
    await h.shell.start()
    try:
        await h.loaded()
        h.members.add(ROOM)
        for i in range(3):
            h.shell.apply(h.edit(f"{i}", ref=f"r{i}"), MEMBER)
        await until(lambda: len(h.of(MessageType.UPDATE_ACK)) == 3)
        await asyncio.sleep(0.4)
        assert ROOM in h.shell.documents  # a member is still there
        h.members.clear()
        await until(lambda: ROOM not in h.shell.documents, timeout=3)
        stored = await store.load(ROOM)
        assert (stored.revision, stored.log) == (3, [])
        await h.loaded()
        state, _, revision = h.shell.documents.state(ROOM, None)
        replica = Doc()
        replica.apply_update(state)
        assert (str(replica.get("t", type=Text)), revision) == ("012", 3)
    finally:
        await h.shell.stop()


async def test_stop_writes_and_snapshots_every_changed_document(tmp_path: Any) -> None:
    store = FileDocStore(tmp_path)
    h = Harness(store, doc_snapshot_delay_ms=60_000)
    await h.loaded()
    h.shell.apply(h.edit("last words"), MEMBER)
    await h.shell.stop()
    stored = await FileDocStore(tmp_path).load(ROOM)
    assert (stored.revision, stored.log) == (1, [])
    replica = Doc()
    replica.apply_update(stored.snapshot)
    assert str(replica.get("t", type=Text)) == "last words"
    assert [e.type for e in h.events if isinstance(e, Reply)] == [MessageType.UPDATE_ACK]


async def test_an_empty_update_changes_no_revision_and_is_not_relayed() -> None:
    h = Harness(Wrapped())
    await h.loaded()
    h.shell.apply(DocUpdate(A, "e", ROOM, b"\x00\x00"), MEMBER)
    (ack,) = h.of(MessageType.UPDATE_ACK)
    assert ack.data["revision"] == 0
    assert not [e for e in h.events if isinstance(e, RoomBroadcast)]


async def test_updates_arriving_while_a_snapshot_is_written_are_stored_and_acknowledged() -> None:
    class SlowCompact(Wrapped):
        async def compact(self, room: ResourceId, state: bytes, revision: int, covered: int) -> None:
            await asyncio.sleep(0.1)
            await super().compact(room, state, revision, covered)

    h = Harness(SlowCompact(), doc_log_max_entries=2, doc_snapshot_delay_ms=60_000)
    await h.loaded()
    for i in range(2):  # the second makes a snapshot due
        h.shell.apply(h.edit(f"{i}", ref=f"r{i}"), MEMBER)
    await until(lambda: len(h.of(MessageType.UPDATE_ACK)) == 2)
    await asyncio.sleep(0.03)  # the snapshot is being written ...
    h.shell.apply(h.edit("last", ref="last"), MEMBER)  # ... when the last update comes
    await until(lambda: len(h.of(MessageType.UPDATE_ACK)) == 3, timeout=3)


async def test_snapshots_wait_for_the_room_to_be_quiet() -> None:
    store = Wrapped()
    h = Harness(store, doc_snapshot_delay_ms=150, doc_log_max_entries=1_000)
    await h.loaded()
    for i in range(6):  # an edit every 50 ms: never 150 ms of quiet
        h.shell.apply(h.edit(f"{i}", ref=f"r{i}"), MEMBER)
        await asyncio.sleep(0.05)
    assert (await store.load(ROOM)).snapshot is None
    await until(lambda: store.docs[ROOM].snapshot is not None, timeout=2)
    assert store.docs[ROOM].revision == 6 and store.docs[ROOM].log == []


async def test_stored_and_refused_updates_are_audited_without_their_content() -> None:
    h = Harness(Wrapped())
    await h.loaded()
    h.shell.apply(h.edit("secret diagnosis", ref="r1"), MEMBER)
    h.shell.apply(DocUpdate(A, "bad", ROOM, b"\xff\xff\xff"), MEMBER)
    await until(lambda: h.audit.of_type("DOCUMENT_UPDATED"))
    (stored,) = h.audit.of_type("DOCUMENT_UPDATED")
    assert (stored.user_id, stored.session_id, stored.resource_id) == ("a", "s-a", ROOM)
    assert stored.details["revision"] == 1 and stored.details["bytes"] > 0
    (refused,) = h.audit.of_type("DOCUMENT_UPDATE_REFUSED")
    assert (refused.outcome, refused.details["code"]) == ("denied", "BAD_UPDATE")
    assert "secret" not in repr(stored) + repr(refused)


async def test_a_yjs_members_update_that_waits_for_what_only_it_has_gets_our_sync_step_1() -> None:
    h = Harness(Wrapped())
    await h.loaded()
    yjs_member = Member(A, UserId("a"), "a", SessionId("s-a"), "editor", 0, kind="yjs")
    h.edit("lost on the way")
    late = h.edit(" and after")
    h.shell.apply(late, yjs_member)
    (ask,) = [e for e in h.events if isinstance(e, Reply) and e.type == SYNC_STEP1]
    assert ask.conn == A and ask.data["stateVector"] == h.shell.documents.get(ROOM).doc.get_state()
    h.events.clear()
    h.shell.apply(h.edit(" and a /ws edit, later still"), MEMBER)  # a /ws sender resends what was not acked
    assert not [e for e in h.events if isinstance(e, Reply) and e.type == SYNC_STEP1]


async def test_a_shutdown_with_the_store_unreachable_gives_up_in_time_and_says_what_is_unsaved(caplog: Any) -> None:
    store = Wrapped()
    h = Harness(store, store_timeout_s=0.05, doc_snapshot_delay_ms=60_000)
    await h.loaded()
    store.failing = 10**6
    h.shell.apply(h.edit("never stored"), MEMBER)
    started = time.monotonic()
    with caplog.at_level(logging.ERROR):
        await h.shell.stop()  # waits twice the store timeout, not forever
    assert time.monotonic() - started < 1.0
    assert "shard-0: 1 documents not saved at shutdown (store unreachable)" in caplog.messages
    assert h.of(MessageType.UPDATE_ACK) == [] and ROOM not in store.docs  # nothing acknowledged that is not stored


async def test_a_member_whose_state_vector_does_not_decode_is_sent_the_whole_document() -> None:
    h = Harness(Wrapped())
    await h.loaded()
    h.shell.apply(h.edit("BP 120/80"), MEMBER)
    assert h.shell.state(ROOM, b"\xff\xff") == h.shell.state(ROOM, None)
    h.shell.sync(DocSync(B, ROOM, b"\xff\xff"))  # a y-websocket client's sync step 1
    (answer,) = [e for e in h.events if isinstance(e, Reply) and e.type == SYNC_STEP2]
    replica = Doc()
    replica.apply_update(answer.data["update"])
    assert (answer.conn, str(replica.get("t", type=Text)), answer.data["revision"]) == (B, "BP 120/80", 1)


CURSOR = '{"cursor":{"index":3}}'


async def test_an_awareness_query_is_answered_with_everyones_states_and_in_an_empty_room_not_at_all() -> None:
    h = Harness(Wrapped())
    h.shell.relay_awareness(Awareness(B, "q1", ROOM, b""))  # y-websocket's query
    assert h.events == []  # nobody's cursor to tell
    h.shell.relay_awareness(Awareness(A, None, ROOM, encode_awareness([AwarenessEntry(10, 1, CURSOR)])), "a")
    h.events.clear()
    h.shell.relay_awareness(Awareness(B, "q2", ROOM, b""))
    (answer,) = h.events
    assert isinstance(answer, Reply) and (answer.conn, answer.ref, answer.type) == (B, "q2",
                                                                                   MessageType.AWARENESS_UPDATE)
    assert [(e.client_id, e.clock, e.state) for e in decode_awareness(answer.data["update"])] == [(10, 1, CURSOR)]


async def test_a_malformed_awareness_update_gets_bad_request_to_its_sender_and_changes_nothing() -> None:
    h = Harness(Wrapped())
    h.shell.relay_awareness(Awareness(A, "bad", ROOM, b"\xff\xff\xff"))
    (error,) = h.events
    assert isinstance(error, Reply) and (error.conn, error.ref, error.type) == (A, "bad", MessageType.ERROR)
    assert (error.data["code"], error.data["resourceId"]) == ("BAD_REQUEST", ROOM)
    assert h.shell.awareness_of(ROOM) is None


async def test_without_an_audit_sink_updates_are_still_stored_acknowledged_and_refused() -> None:
    store = Wrapped()
    h = Harness(store, audited=False)
    await h.loaded()
    h.shell.apply(h.edit("chart", ref="r1"), MEMBER)
    h.shell.apply(DocUpdate(A, "bad", ROOM, b"\xff\xff\xff"), MEMBER)
    await until(lambda: h.of(MessageType.UPDATE_ACK))
    assert [(e.ref, e.data["code"]) for e in h.of(MessageType.ERROR)] == [("bad", "BAD_UPDATE")]
    assert [revision for revision, _ in store.docs[ROOM].log] == [1]
    assert h.audit.events == []


async def test_a_document_dropped_from_memory_before_its_snapshot_is_not_snapshotted_and_nothing_hangs() -> None:
    """Only `Persistence.idle` unloads a document, and never one whose snapshot
    is due; should anything else drop it, the snapshot must not be written
    from nothing: the store keeps its log, and the writer settles."""
    class GatedAppend(Wrapped):
        def __init__(self) -> None:
            super().__init__()
            self.gate = asyncio.Event()

        async def append(self, logs: Mapping[ResourceId, Sequence[tuple[int, bytes]]]) -> None:
            await self.gate.wait()
            await super().append(logs)

    store = GatedAppend()
    h = Harness(store, doc_log_max_entries=1, doc_snapshot_delay_ms=60_000)
    await h.loaded()
    update = h.edit("in the log")
    h.shell.apply(update, MEMBER)  # its snapshot is due at once, taken once the append returns
    await asyncio.sleep(0.01)
    h.shell.documents.unload(ROOM)  # ... while the append is in flight
    store.gate.set()
    await until(h.shell.persistence.settled)
    stored = await store.load(ROOM)
    assert (stored.snapshot, stored.log) == (None, [(1, update.update)])
    assert len(h.of(MessageType.UPDATE_ACK)) == 1
    await h.shell.stop()
