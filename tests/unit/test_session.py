"""A connection's session at the front door (`rounds.frontdoor.session`),
without sockets: what it may do, what it sends where, what a shard's answer
or a shard going away does to it, what a shard coming back is told."""

from __future__ import annotations

from typing import Any

from rounds.auth import Identity
from rounds.config import Settings
from rounds.frontdoor.session import MAX_LOCK_ROOMS, Answer, Audit, Close, Rules, Session, ToShard
from rounds.ids import ResourceId, SessionId, conn_id
from rounds.protocol.messages import (
    AWARENESS_CLAIMED,
    Awareness,
    DocSync,
    DocUpdate,
    Join,
    Leave,
    LockAcquire,
    LockRelease,
    LockRenew,
    Reply,
)
from rounds.protocol.ws import (
    AwarenessUpdate,
    CloseCode,
    ErrorCode,
    JoinResource,
    LeaveResource,
    LockAcquireRequest,
    LockReleaseRequest,
    LockRenewRequest,
    MessageType,
    ResourceUpdate,
)
from rounds.protocol.yjs import (
    MAX_AWARENESS_CLIENTS_PER_CONN,
    AuthMessage,
    AwarenessEntry,
    AwarenessMessage,
    QueryAwareness,
    SyncStep1,
    SyncUpdate,
    decode_awareness,
    encode_awareness,
)

PAGE = ResourceId("page:/patient/12345")
DOC = ResourceId("document:999/tab:diagnosis")
RULES = Rules(Settings().allowed_modes, max_rooms=2)


def session(role: str = "surgeon") -> Session:
    return Session(conn_id(0, 1), Identity("dr-a", role, "Dr A", 0.0), SessionId("s1"), RULES)


def up(room: ResourceId) -> bool:
    return True


def down(room: ResourceId) -> bool:
    return False


def codes(actions: list[Any]) -> list[str]:
    return [a.data["code"] for a in actions if isinstance(a, Answer) and a.type == MessageType.ERROR]


def join(s: Session, room: ResourceId = PAGE, mode: str = "editor", ref: Any = "j") -> list[Any]:
    return s.join(JoinResource(ref, room, "patient_record", mode, None), 100, up)


def test_a_join_goes_to_the_rooms_shard_and_waits_for_its_answer() -> None:
    s = session()
    [sent] = join(s)
    assert isinstance(sent, ToShard) and sent.room == PAGE
    assert isinstance(sent.message, Join) and (sent.message.ref, sent.message.kind) == ("j", "ws")
    assert PAGE in s.rooms and PAGE in s.joining
    assert s.on_reply(Reply(s.conn, "j", MessageType.RESOURCE_STATE, {"resourceId": PAGE})) == [
        Answer(MessageType.RESOURCE_STATE, {"resourceId": PAGE}, "j")]
    assert PAGE not in s.joining and PAGE in s.rooms


def test_a_join_refused_by_the_shard_is_forgotten() -> None:
    s = session()
    join(s)
    s.on_reply(Reply(s.conn, "j", MessageType.ERROR, {"code": "UNAVAILABLE", "resourceId": PAGE}))
    assert PAGE not in s.rooms


def test_the_front_doors_admission_rules() -> None:
    observer = session("observer")
    denied = join(observer)
    assert isinstance(denied[0], Audit) and denied[1].type == MessageType.PERMISSION_DENIED
    s = session()
    join(s)
    assert codes(join(s)) == [ErrorCode.ALREADY_JOINED]
    join(s, DOC)
    assert codes(join(s, ResourceId("page:/three"))) == [ErrorCode.TOO_MANY_ROOMS]
    assert codes(s.leave(LeaveResource("l", ResourceId("page:/never")), up)) == [ErrorCode.NOT_JOINED]
    assert codes(s.update(ResourceUpdate("u", ResourceId("page:/never"), b"\x00\x00"), up, lambda a, b: True)) == [
        ErrorCode.NOT_JOINED]
    assert codes(s.awareness_update(AwarenessUpdate("w", ResourceId("page:/never"), b"\x00"), up)) == [
        ErrorCode.NOT_JOINED]
    assert codes(s.lock_acquire(LockAcquireRequest("k", PAGE, ResourceId("page:/never"), None), up)) == [
        ErrorCode.NOT_JOINED]


def test_a_viewers_update_is_refused_and_audited_without_reaching_the_shard() -> None:
    s = session()
    join(s, mode="viewer")
    actions = s.update(ResourceUpdate("u", PAGE, b"\x01"), up, lambda a, b: True)
    assert [type(a) for a in actions] == [Audit, Answer] and actions[1].type == MessageType.PERMISSION_DENIED


def test_a_fenced_update_must_name_a_lock_of_its_own_shard() -> None:
    s = session()
    join(s, DOC)
    fenced = ResourceUpdate("u", DOC, b"\x01", ResourceId("document:999/field:x"), 7)
    assert codes(s.update(fenced, up, lambda a, b: False)) == [ErrorCode.BAD_REQUEST]
    [sent] = s.update(fenced, up, lambda a, b: True)
    assert isinstance(sent.message, DocUpdate) and sent.message.fencing_token == 7


def test_what_cannot_reach_its_shard_is_answered_unavailable_and_not_remembered() -> None:
    s = session()
    assert codes(s.join(JoinResource("j", PAGE, "", "editor", None), 100, down)) == [ErrorCode.UNAVAILABLE]
    assert PAGE not in s.rooms
    join(s)
    assert codes(s.awareness_update(AwarenessUpdate("w", PAGE, b"\x01"), down)) == [ErrorCode.UNAVAILABLE]
    assert s.awareness == {}
    assert codes(s.update(ResourceUpdate("u", PAGE, b"\x01"), down, lambda a, b: True)) == [ErrorCode.UNAVAILABLE]
    field = ResourceId("field:dose")
    assert codes(s.lock_acquire(LockAcquireRequest("k", field, PAGE, None), down)) == [ErrorCode.UNAVAILABLE]
    assert s.lock_rooms == {}  # no route kept for a lock the shard never saw
    assert codes(s.lock_step(LockRenewRequest("r", field, "L1"), down)) == [ErrorCode.UNAVAILABLE]
    assert codes(s.lock_step(LockReleaseRequest("x", field, "L1"), down)) == [ErrorCode.UNAVAILABLE]
    # a leave while the shard is away is answered here; the shard's Sync drops the membership
    assert s.leave(LeaveResource("l", PAGE), down) == [Answer(MessageType.RESOURCE_LEFT, {"resourceId": PAGE}, "l")]
    assert PAGE not in s.rooms


def test_locks_are_routed_to_the_room_they_were_taken_in() -> None:
    s = session()
    join(s, DOC)
    field = ResourceId("field:dose")
    [sent] = s.lock_acquire(LockAcquireRequest("k", field, DOC, None), up)
    assert sent.room == DOC and isinstance(sent.message, LockAcquire) and sent.message.mode == "editor"
    [renew] = s.lock_step(LockRenewRequest("r", field, "L1"), up)
    assert renew.room == DOC and isinstance(renew.message, LockRenew)
    [release] = s.lock_step(LockReleaseRequest("x", field, "L1"), up)
    assert release.room == DOC and isinstance(release.message, LockRelease)


def test_a_session_remembers_the_rooms_of_its_latest_locks_only_and_sends_older_ones_by_their_own_id() -> None:
    s = session()
    join(s, DOC)
    fields = [ResourceId(f"field:{n}") for n in range(MAX_LOCK_ROOMS + 1)]
    s.lock_acquire(LockAcquireRequest("k", fields[1], DOC, None), up)
    s.lock_acquire(LockAcquireRequest("k", fields[0], DOC, None), up)
    for field in fields[2:]:
        s.lock_acquire(LockAcquireRequest("k", field, DOC, None), up)
    s.lock_acquire(LockAcquireRequest("k", fields[0], DOC, None), up)  # taken again: the newest once more
    assert len(s.lock_rooms) == MAX_LOCK_ROOMS and fields[1] not in s.lock_rooms
    [forgotten] = s.lock_step(LockRenewRequest("r", fields[1], "L1"), up)
    assert forgotten.room == fields[1]  # routed by the lock's own id, as if taken outside a room
    assert [s.lock_step(LockRenewRequest("r", f, "L1"), up)[0].room for f in (fields[0], fields[2])] == [DOC, DOC]


def test_joins_in_flight_to_a_shard_that_went_away_fail_so_the_client_retries() -> None:
    s = session()
    join(s, PAGE, ref="j1")
    join(s, DOC, ref="j2")
    s.on_reply(Reply(s.conn, "j2", MessageType.RESOURCE_STATE, {"resourceId": DOC}))
    [failed] = s.shard_down(lambda room: True)
    assert failed.ref == "j1" and failed.data["code"] == ErrorCode.UNAVAILABLE
    assert set(s.rooms) == {DOC}  # the settled membership stays, for the Sync


def cursor(client_id: int, clock: int, state: str = '{"x":1}') -> bytes:
    return encode_awareness([AwarenessEntry(client_id, clock, state)])


def test_a_shard_coming_back_is_told_the_memberships_it_owns_and_each_ones_own_cursors() -> None:
    s = session()
    join(s, PAGE)
    join(s, DOC)
    s.awareness_update(AwarenessUpdate("w", DOC, cursor(7, 1)), up)
    s.awareness_update(AwarenessUpdate("w", DOC, cursor(7, 2, '{"x":2}')), up)
    s.awareness_update(AwarenessUpdate("w", DOC, cursor(9, 5)), up)  # another client's state, echoed
    assert s.on_reply(Reply(s.conn, None, AWARENESS_CLAIMED, {"resourceId": DOC, "clientIds": [7]})) == []
    joins, shown = s.restore(lambda room: True)
    assert {(j.resource_id, j.restore, j.ref) for j in joins} == {(PAGE, True, None), (DOC, True, None)}
    [again] = shown
    assert again.resource_id == DOC and decode_awareness(again.update) == [AwarenessEntry(7, 2, '{"x":2}')]
    assert s.restore(lambda room: room == PAGE)[1] == []
    s.leave(LeaveResource("l", DOC), up)
    assert s.restore(lambda room: True)[1] == []  # a room left takes its cursors with it


def test_a_yjs_client_joins_its_room_and_speaks_sync_and_awareness() -> None:
    s = session()
    [sent] = s.yjs_open(DOC, 100, up)
    assert isinstance(sent.message, Join) and sent.message.kind == "yjs" and sent.message.mode == "editor"
    [sync] = s.yjs_message(SyncStep1(b"\x00"))
    assert isinstance(sync.message, DocSync)
    [update] = s.yjs_message(SyncUpdate(b"\x01"))
    assert isinstance(update.message, DocUpdate) and not update.message.ack
    s.yjs_message(AwarenessMessage(cursor(3, 1)))
    assert list(s.awareness[DOC]) == [3]
    [query] = s.yjs_message(QueryAwareness())
    assert query.message == Awareness(s.conn, None, DOC, b"")


def test_a_yjs_client_whose_join_failed_sends_nothing_until_its_room_is_back() -> None:
    s = session()
    s.yjs_open(DOC, 100, up)
    s.shard_down(lambda room: True)  # its join was in flight
    for message in (SyncStep1(b"\x00"), SyncUpdate(b"\x01"), AwarenessMessage(cursor(3, 1)), QueryAwareness()):
        assert s.yjs_message(message) == []
    assert s.awareness == {}


def test_a_yjs_clients_auth_message_is_ignored() -> None:
    s = session()
    s.yjs_open(DOC, 100, up)
    assert s.yjs_message(AuthMessage(b"\x00\x03abc")) == []


def test_a_yjs_viewers_edit_is_dropped_and_audited() -> None:
    s = session("observer")
    s.yjs_open(DOC, 100, up)
    [audit] = s.yjs_message(SyncUpdate(b"\x01"))
    assert isinstance(audit, Audit) and audit.details["endpoint"] == "yjs"


def test_a_yjs_client_that_cannot_be_kept_in_step_is_closed_with_a_code_that_says_whether_to_reconnect() -> None:
    s = session()
    assert s.yjs_open(DOC, 100, down) == [Close(CloseCode.TRY_AGAIN_LATER, "shard unavailable; retry",
                                                "unavailable")]
    s = session()
    s.yjs_open(DOC, 100, up)
    [close] = s.on_reply(Reply(s.conn, None, MessageType.ERROR, {"code": "UNAVAILABLE", "resourceId": DOC}))
    assert close.code == CloseCode.TRY_AGAIN_LATER  # stock clients reconnect and resync
    [close] = s.on_reply(Reply(s.conn, None, MessageType.ERROR, {"code": "TOO_LARGE", "resourceId": DOC}))
    assert close.code == CloseCode.DOCUMENT_TOO_LARGE  # 4400-4499: stock clients do not come back with it
    assert s.on_reply(Reply(s.conn, None, MessageType.ERROR, {"code": "BAD_UPDATE", "resourceId": DOC})) == []
    s = session()
    s.yjs_open(DOC, 100, up)
    [close] = s.shard_down(lambda room: True)  # its join was in flight
    assert isinstance(close, Close) and close.code == CloseCode.TRY_AGAIN_LATER


def test_an_awareness_state_too_big_or_malformed_is_sent_but_not_kept() -> None:
    s = session()
    join(s)
    [sent] = s.awareness_update(AwarenessUpdate("w", PAGE, cursor(3, 1, '"' + "x" * 20_000 + '"')), up)
    assert isinstance(sent.message, Awareness) and s.awareness[PAGE] == {}
    [sent] = s.awareness_update(AwarenessUpdate("w", PAGE, b"\xff\x00"), up)
    assert isinstance(sent.message, Awareness) and s.awareness[PAGE] == {}


def test_a_left_room_is_told_to_its_shard() -> None:
    s = session()
    join(s)
    [sent] = s.leave(LeaveResource("l", PAGE), up)
    assert sent.message == Leave(s.conn, "l", PAGE)


def test_an_awareness_entry_older_than_the_one_kept_does_not_replace_it() -> None:
    s = session()
    join(s)
    s.awareness_update(AwarenessUpdate("w", PAGE, cursor(7, 2, '{"x":2}')), up)
    [sent] = s.awareness_update(AwarenessUpdate("w", PAGE, cursor(7, 1, '{"x":1}')), up)
    assert isinstance(sent.message, Awareness)  # still relayed: the shard decides what others see
    assert s.awareness[PAGE] == {7: AwarenessEntry(7, 2, '{"x":2}')}


def test_a_session_keeps_a_bounded_number_of_awareness_entries_per_room_dropping_the_oldest() -> None:
    s = session()
    join(s)
    bound = 2 * MAX_AWARENESS_CLIENTS_PER_CONN
    for client_id in range(bound + 3):
        s.awareness_update(AwarenessUpdate("w", PAGE, cursor(client_id, 1)), up)
    s.awareness_update(AwarenessUpdate("w", PAGE, cursor(3, 2)), up)  # a refresh makes an entry the newest
    assert list(s.awareness[PAGE]) == [*range(4, bound + 3), 3]


def test_a_session_lists_the_shards_its_rooms_live_on_once_each() -> None:
    s = session()
    join(s, PAGE)
    join(s, DOC)
    assert s.shards_of(lambda room: "shard-a") == {"shard-a"}
    assert s.shards_of(lambda room: room) == {PAGE, DOC}
