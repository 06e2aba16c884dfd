"""The lock machine (story BE-001.3) driven directly: no store, no clock, no I/O.

Each seed scenario is one or more tests here; the test plays the shell,
answering the machine's `StoreGrant` with `GrantStored` / `GrantRefused` /
`GrantFailed` itself. Time is a plain int, lock ids come from a counter.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import pytest

from rounds.ids import ConnId, FrontDoorId, ResourceId, UserId, conn_id
from rounds.protocol.messages import LockAcquire, LockId, LockRelease, LockRenew, Reply
from rounds.shard.events import MemberGone, RoomBroadcast
from rounds.shard.locks.events import (
    AuditLock,
    GrantFailed,
    GrantRefused,
    GrantStored,
    LockAdopt,
    LockEvent,
    LockLost,
    StoreGrant,
    StoreRelease,
    StoreRenew,
)
from rounds.shard.locks.machine import Lock, Locks, LockStateError
from tests.unit.test_purity import FORBIDDEN, closure

T0 = int(datetime(2025, 11, 17, 10, 30, tzinfo=UTC).timestamp() * 1000)
SECOND = 1_000
FIELD = ResourceId("input-field-123")  # the seed's resource
OTHER_FIELD = ResourceId("input-field-456")
PAGE = ResourceId("page:/patient/12345")
A = conn_id(FrontDoorId(0), 1)  # usr_001
B = conn_id(FrontDoorId(1), 1)  # usr_002
C = conn_id(FrontDoorId(0), 2)  # usr_003


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def machine(**kwargs: Any) -> Locks:
    counter = itertools.count(1)
    return Locks(lambda: f"lock-{next(counter)}", **kwargs)


def acquire(conn: ConnId, user: str, resource: ResourceId = FIELD, *, room: ResourceId | None = PAGE,
            ttl_ms: int | None = None, mode: str = "editor", ref: Any = "acq") -> LockAcquire:
    return LockAcquire(conn, ref, UserId(user), resource, mode, room, ttl_ms)


def of(events: list[LockEvent], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def take(locks: Locks, conn: ConnId, user: str, now: int, resource: ResourceId = FIELD, token: int = 1,
         **kwargs: Any) -> tuple[Lock, list[LockEvent]]:
    """Acquire and store in one go, as a shell with a willing store would."""
    [grant] = of(locks.handle(acquire(conn, user, resource, **kwargs), now), StoreGrant)
    events = locks.handle(GrantStored(resource, grant.lock_id, token), now)
    lock = locks.holder(resource)
    assert lock is not None
    return lock, events


# --- Scenario: Acquire lock on available resource ---------------------------------


def test_acquiring_a_free_resource_asks_the_store_for_a_30_second_exclusive_grant() -> None:
    locks = machine()
    assert locks.handle(acquire(A, "usr_001"), T0) == [
        StoreGrant(FIELD, LockId("lock-1"), UserId("usr_001"), 30 * SECOND, T0, T0 + 30 * SECOND, A, PAGE,
                   "exclusive")]
    assert locks.holder(FIELD) is None  # pending until the store answers
    assert locks.get(FIELD) is not None


def test_the_stored_grant_answers_lock_acquired_with_lock_id_token_and_expiry() -> None:
    locks = machine()
    _, events = take(locks, A, "usr_001", T0, token=41)
    [reply] = of(events, Reply)
    assert (reply.conn, reply.ref, reply.type) == (A, "acq", "LOCK_ACQUIRED")
    assert reply.data == {"resourceId": FIELD, "lockId": "lock-1", "fencingToken": 41,
                          "expiresAt": "2025-11-17T10:30:30.000Z"}


def test_the_room_but_the_holder_hears_resource_locked() -> None:
    locks = machine()
    _, events = take(locks, A, "usr_001", T0)
    assert of(events, RoomBroadcast) == [RoomBroadcast(PAGE, A, "RESOURCE_LOCKED", {
        "resourceId": FIELD, "lockedBy": "usr_001", "expiresAt": iso(T0 + 30 * SECOND)})]


def test_without_a_room_the_resource_itself_is_the_room() -> None:
    locks = machine()
    _, events = take(locks, A, "usr_001", T0, room=None)
    assert of(events, RoomBroadcast)[0].room_id == FIELD


def test_an_audit_record_notes_the_acquisition() -> None:
    locks = machine()
    _, events = take(locks, A, "usr_001", T0, token=7)
    [audit] = of(events, AuditLock)
    assert (audit.action, audit.event_type, audit.user_id, audit.lock_id, audit.outcome, audit.conn) == (
        "acquire", "LOCK_ACQUIRED", "usr_001", "lock-1", "ok", A)
    assert audit.details["fencingToken"] == 7


def test_every_lock_gets_a_new_id_from_the_factory() -> None:
    locks = machine()
    first, _ = take(locks, A, "usr_001", T0, FIELD)
    second, _ = take(locks, A, "usr_001", T0, OTHER_FIELD)
    assert (first.lock_id, second.lock_id) == ("lock-1", "lock-2")


def test_an_id_factory_repeating_a_live_id_is_a_bug() -> None:
    locks = Locks(lambda: "same")
    take(locks, A, "usr_001", T0, FIELD)
    with pytest.raises(LockStateError):
        locks.handle(acquire(B, "usr_002", OTHER_FIELD), T0)


# --- Scenario: Lock denied when resource already locked ------------------------------


def test_a_held_lock_denies_others_with_holder_and_expiry() -> None:
    locks = machine()
    take(locks, B, "usr_002", T0)
    events = locks.handle(acquire(A, "usr_001", ref=9), T0 + SECOND)
    assert not of(events, StoreGrant)  # denied here, no store round trip
    [reply] = of(events, Reply)
    assert (reply.conn, reply.ref, reply.type) == (A, 9, "LOCK_DENIED")
    assert reply.data == {"resourceId": FIELD, "reason": "already_locked", "lockedBy": "usr_002",
                          "expiresAt": iso(T0 + 30 * SECOND)}
    [audit] = of(events, AuditLock)
    assert (audit.action, audit.outcome, audit.user_id) == ("deny", "denied", "usr_001")
    assert locks.holder(FIELD).user_id == "usr_002"


def test_a_grant_being_stored_already_denies_others() -> None:
    locks = machine()
    locks.handle(acquire(B, "usr_002"), T0)
    [reply] = of(locks.handle(acquire(A, "usr_001"), T0 + 1), Reply)
    assert reply.type == "LOCK_DENIED" and reply.data["lockedBy"] == "usr_002"


def test_the_holder_asking_again_is_denied_like_anyone() -> None:
    locks = machine()
    take(locks, A, "usr_001", T0)
    [reply] = of(locks.handle(acquire(A, "usr_001"), T0 + 1), Reply)
    assert reply.type == "LOCK_DENIED" and reply.data["lockedBy"] == "usr_001"


def test_a_store_refusal_denies_with_the_stores_holder_and_frees_the_resource_here() -> None:
    # Redis SET NX returned nil: another shard's grant, or this shard's previous life
    locks = machine()
    [grant] = locks.handle(acquire(A, "usr_001"), T0)
    events = locks.handle(GrantRefused(FIELD, grant.lock_id, UserId("usr_002"), T0 + 12 * SECOND), T0 + 2)
    [reply] = of(events, Reply)
    assert reply.type == "LOCK_DENIED"
    assert reply.data == {"resourceId": FIELD, "reason": "already_locked", "lockedBy": "usr_002",
                          "expiresAt": iso(T0 + 12 * SECOND)}
    assert of(events, AuditLock)[0].details["source"] == "store"
    assert locks.get(FIELD) is None
    assert of(locks.handle(acquire(C, "usr_003"), T0 + 3), StoreGrant)


def test_a_store_failure_answers_unavailable_and_takes_back_a_grant_that_may_have_landed() -> None:
    locks = machine()
    [grant] = locks.handle(acquire(A, "usr_001"), T0)
    events = locks.handle(GrantFailed(FIELD, grant.lock_id, "TimeoutError"), T0 + 2_000)
    [reply] = of(events, Reply)
    assert reply.type == "ERROR" and reply.data["code"] == "UNAVAILABLE"
    assert of(events, StoreRelease) == [StoreRelease(FIELD, grant.lock_id, UserId("usr_001"))]
    assert of(events, AuditLock)[0].outcome == "error"
    assert locks.get(FIELD) is None


def test_a_store_answer_for_a_grant_not_pending_is_a_bug() -> None:
    locks = machine()
    with pytest.raises(LockStateError):
        locks.handle(GrantStored(FIELD, LockId("lock-9"), 1), T0)
    take(locks, A, "usr_001", T0)
    with pytest.raises(LockStateError):  # answered twice
        locks.handle(GrantStored(FIELD, LockId("lock-1"), 2), T0)


# --- Scenario: Lock renewal before expiration -----------------------------------------


def test_renewing_extends_the_lock_to_its_full_ttl_from_now() -> None:
    locks = machine()
    lock, _ = take(locks, A, "usr_001", T0)
    now = T0 + 25 * SECOND  # "expiring in 5 seconds"
    events = locks.handle(LockRenew(A, "ren", FIELD, lock.lock_id), now)
    [reply] = of(events, Reply)
    assert (reply.ref, reply.type) == ("ren", "LOCK_RENEWED")
    assert reply.data == {"resourceId": FIELD, "lockId": lock.lock_id, "expiresAt": iso(now + 30 * SECOND)}
    assert of(events, StoreRenew) == [StoreRenew(FIELD, lock.lock_id, UserId("usr_001"), 30 * SECOND,
                                                 now + 30 * SECOND)]
    [audit] = of(events, AuditLock)
    assert (audit.action, audit.event_type, audit.outcome) == ("renew", "LOCK_RENEWED", "ok")
    assert locks.holder(FIELD).expires_at_ms == now + 30 * SECOND
    assert locks.next_deadline() == now + 30 * SECOND


def test_a_renewal_tells_the_others_in_the_room_the_new_expiry() -> None:
    locks = machine()
    lock, _ = take(locks, A, "usr_001", T0)
    now = T0 + 25 * SECOND
    events = locks.handle(LockRenew(A, "ren", FIELD, lock.lock_id), now)
    assert of(events, RoomBroadcast) == [RoomBroadcast(PAGE, A, "RESOURCE_LOCKED", {
        "resourceId": FIELD, "lockedBy": "usr_001", "expiresAt": iso(now + 30 * SECOND)})]


def test_a_refused_renewal_tells_the_room_nothing() -> None:
    locks = machine()
    lock, _ = take(locks, A, "usr_001", T0)
    assert not of(locks.handle(LockRenew(B, None, FIELD, lock.lock_id), T0 + SECOND), RoomBroadcast)


def test_a_renewed_lock_survives_its_first_deadline() -> None:
    locks = machine()
    lock, _ = take(locks, A, "usr_001", T0)
    locks.handle(LockRenew(A, None, FIELD, lock.lock_id), T0 + 20 * SECOND)
    assert locks.expire(T0 + 30 * SECOND) == []
    assert locks.holder(FIELD) is not None
    assert of(locks.expire(T0 + 50 * SECOND), RoomBroadcast)


def test_a_renewal_keeps_the_ttl_the_lock_was_granted_with() -> None:
    locks = machine()
    lock, _ = take(locks, A, "usr_001", T0, ttl_ms=5 * SECOND)
    [renew] = of(locks.handle(LockRenew(A, None, FIELD, lock.lock_id), T0 + SECOND), StoreRenew)
    assert (renew.ttl_ms, renew.expires_at_ms) == (5 * SECOND, T0 + 6 * SECOND)


@pytest.mark.parametrize("conn, lock_id", [(B, "lock-1"), (A, "lock-99")], ids=["other-conn", "wrong-lock-id"])
def test_only_the_holding_connection_with_its_lock_id_can_renew(conn: ConnId, lock_id: str) -> None:
    locks = machine()
    take(locks, A, "usr_001", T0)
    events = locks.handle(LockRenew(conn, "r", FIELD, LockId(lock_id)), T0 + SECOND)
    [reply] = of(events, Reply)
    assert reply.type == "ERROR" and reply.data["code"] == "NOT_LOCK_HOLDER"
    assert not of(events, StoreRenew)
    [audit] = of(events, AuditLock)
    assert (audit.event_type, audit.outcome, audit.conn) == ("LOCK_RENEW_DENIED", "denied", conn)
    assert locks.holder(FIELD).expires_at_ms == T0 + 30 * SECOND


def test_renewing_an_expired_or_unknown_lock_is_unknown_lock() -> None:
    locks = machine()
    lock, _ = take(locks, A, "usr_001", T0)
    [reply] = of(locks.handle(LockRenew(A, None, FIELD, lock.lock_id), T0 + 30 * SECOND), Reply)
    assert reply.data["code"] == "UNKNOWN_LOCK"
    [reply] = of(locks.handle(LockRenew(A, None, OTHER_FIELD, LockId("lock-7")), T0), Reply)
    assert reply.data["code"] == "UNKNOWN_LOCK"


def test_a_stale_holder_cannot_renew_the_next_holders_lock() -> None:
    locks = machine()
    old, _ = take(locks, A, "usr_001", T0, token=1)
    take(locks, B, "usr_002", T0 + 31 * SECOND, token=2)
    [reply] = of(locks.handle(LockRenew(A, None, FIELD, old.lock_id), T0 + 32 * SECOND), Reply)
    assert reply.data["code"] == "NOT_LOCK_HOLDER"


def test_renewing_a_grant_still_being_stored_is_refused() -> None:
    locks = machine()
    [grant] = locks.handle(acquire(A, "usr_001"), T0)
    [reply] = of(locks.handle(LockRenew(A, None, FIELD, grant.lock_id), T0 + 1), Reply)
    assert reply.data["code"] == "NOT_LOCK_HOLDER"


# --- Scenario: Explicit lock release --------------------------------------------------


def test_releasing_confirms_tells_the_others_and_deletes_the_keys() -> None:
    locks = machine()
    lock, _ = take(locks, A, "usr_001", T0, token=3)
    events = locks.handle(LockRelease(A, "rel", FIELD, lock.lock_id), T0 + SECOND)
    assert events[0] == Reply(A, "rel", "LOCK_RELEASED", {"resourceId": FIELD})
    assert of(events, RoomBroadcast) == [
        RoomBroadcast(PAGE, A, "RESOURCE_UNLOCKED", {"resourceId": FIELD, "reason": "released"})]
    assert of(events, StoreRelease) == [StoreRelease(FIELD, lock.lock_id, UserId("usr_001"))]
    [audit] = of(events, AuditLock)
    assert (audit.event_type, audit.user_id, audit.details["fencingToken"]) == ("LOCK_RELEASED", "usr_001", 3)
    assert locks.get(FIELD) is None and locks.next_deadline() is None


def test_a_released_resource_can_be_acquired_by_someone_else() -> None:
    locks = machine()
    lock, _ = take(locks, A, "usr_001", T0, token=1)
    locks.handle(LockRelease(A, None, FIELD, lock.lock_id), T0 + 1)
    second, _ = take(locks, B, "usr_002", T0 + 2, token=2)
    assert second.user_id == "usr_002"


@pytest.mark.parametrize("conn, lock_id", [(B, "lock-1"), (A, "lock-99")], ids=["other-conn", "wrong-lock-id"])
def test_only_the_holder_can_release(conn: ConnId, lock_id: str) -> None:
    locks = machine()
    take(locks, A, "usr_001", T0)
    events = locks.handle(LockRelease(conn, None, FIELD, LockId(lock_id)), T0 + 1)
    [reply] = of(events, Reply)
    assert reply.data["code"] == "NOT_LOCK_HOLDER"
    assert not of(events, StoreRelease) and not of(events, RoomBroadcast)
    assert of(events, AuditLock)[0].event_type == "LOCK_RELEASE_DENIED"
    assert locks.holder(FIELD) is not None


def test_releasing_twice_is_unknown_lock_the_second_time() -> None:
    locks = machine()
    lock, _ = take(locks, A, "usr_001", T0)
    locks.handle(LockRelease(A, None, FIELD, lock.lock_id), T0 + 1)
    [reply] = of(locks.handle(LockRelease(A, None, FIELD, lock.lock_id), T0 + 2), Reply)
    assert reply.data["code"] == "UNKNOWN_LOCK"


# --- Scenario: Lock expires automatically ---------------------------------------------


def test_a_lock_is_live_one_ms_before_its_expiry_and_gone_at_it() -> None:
    locks = machine()
    take(locks, A, "usr_001", T0, token=5)
    deadline = T0 + 30 * SECOND
    assert locks.next_deadline() == deadline
    assert locks.expire(deadline - 1) == []
    events = locks.expire(deadline)
    # the holder is still in the room and hears it too
    assert of(events, RoomBroadcast) == [
        RoomBroadcast(PAGE, None, "RESOURCE_UNLOCKED", {"resourceId": FIELD, "reason": "expired"})]
    # the keys go now rather than at Redis's own TTL, so the next grant is not refused,
    # unless the store's copy no longer ends then (renewed by someone else)
    assert of(events, StoreRelease) == [StoreRelease(FIELD, LockId("lock-1"), UserId("usr_001"), deadline)]
    [audit] = of(events, AuditLock)
    assert (audit.event_type, audit.details["fencingToken"]) == ("LOCK_EXPIRED", 5)
    assert locks.get(FIELD) is None and locks.next_deadline() is None


def test_once_expired_others_can_acquire_with_a_higher_token() -> None:
    locks = machine()
    take(locks, A, "usr_001", T0, token=5)
    locks.expire(T0 + 30 * SECOND)
    lock, events = take(locks, B, "usr_002", T0 + 30 * SECOND, token=6)
    assert of(events, Reply)[0].data["fencingToken"] == 6 and lock.user_id == "usr_002"


def test_a_grant_stored_after_its_deadline_is_granted_and_expires_at_once() -> None:
    # the store took longer than the TTL: the asker learns both, nobody is left holding
    locks = machine()
    [grant] = locks.handle(acquire(A, "usr_001", ttl_ms=SECOND), T0)
    events = locks.handle(GrantStored(FIELD, grant.lock_id, 1), T0 + 1_500)
    assert [e.type for e in events if isinstance(e, (Reply, RoomBroadcast))] == [
        "LOCK_ACQUIRED", "RESOURCE_LOCKED", "RESOURCE_UNLOCKED"]
    assert locks.get(FIELD) is None and locks.next_deadline() is None


def test_a_due_lock_expires_before_the_next_command_even_if_the_timer_is_late() -> None:
    locks = machine()
    take(locks, A, "usr_001", T0, token=1)
    events = locks.handle(acquire(B, "usr_002"), T0 + 30 * SECOND)  # nobody called expire
    assert [e.data["reason"] for e in of(events, RoomBroadcast)] == ["expired"]
    assert of(events, StoreGrant)


def test_next_deadline_is_the_earliest_held_lock_and_ignores_pending_grants() -> None:
    locks = machine()
    assert locks.next_deadline() is None
    take(locks, A, "usr_001", T0, FIELD, ttl_ms=20 * SECOND)
    take(locks, B, "usr_002", T0, OTHER_FIELD, ttl_ms=10 * SECOND)
    locks.handle(acquire(C, "usr_003", ResourceId("input-field-789"), ttl_ms=2 * SECOND), T0)
    assert locks.next_deadline() == T0 + 10 * SECOND
    [first] = of(locks.expire(T0 + 10 * SECOND), RoomBroadcast)
    assert first.data["resourceId"] == OTHER_FIELD
    assert locks.next_deadline() == T0 + 20 * SECOND


def test_many_renewals_keep_the_deadline_queue_small() -> None:
    locks = machine()
    lock, _ = take(locks, A, "usr_001", T0)
    for i in range(1, 1_000):
        locks.handle(LockRenew(A, None, FIELD, lock.lock_id), T0 + i)
    assert len(locks._deadlines) < 100
    assert locks.next_deadline() == T0 + 999 + 30 * SECOND


def test_the_store_losing_a_lock_on_renewal_expires_it_here() -> None:
    locks = machine()
    lock, _ = take(locks, A, "usr_001", T0)
    events = locks.handle(LockLost(FIELD, lock.lock_id), T0 + SECOND)
    assert [e.data["reason"] for e in of(events, RoomBroadcast)] == ["expired"]
    assert locks.get(FIELD) is None
    assert locks.handle(LockLost(FIELD, lock.lock_id), T0 + 2) == []  # late duplicate: nothing


# --- adoption: a restarted shard takes over the live locks of its rooms ------------------------


def adopt(conn: ConnId = A, user: str = "usr_001", resource: ResourceId = FIELD, *, room: ResourceId = PAGE,
          lock_id: str = "old-1", ttl_ms: int = 30 * SECOND, acquired_at_ms: int = T0 - 10 * SECOND,
          expires_at_ms: int = T0 + 20 * SECOND, token: int = 9) -> LockAdopt:
    return LockAdopt(resource, LockId(lock_id), conn, UserId(user), room, ttl_ms, acquired_at_ms, expires_at_ms, token)


def test_an_adopted_lock_is_held_quietly_and_audited() -> None:
    locks = machine()
    events = locks.handle(adopt(), T0)
    [audit] = of(events, AuditLock)
    assert (audit.action, audit.event_type, audit.lock_id, audit.conn) == ("adopt", "LOCK_ADOPTED", "old-1", A)
    assert audit.details["fencingToken"] == 9
    assert not of(events, Reply) and not of(events, RoomBroadcast)  # the room heard it when it was granted
    lock = locks.holder(FIELD)
    assert lock is not None and (lock.conn, lock.lock_id, lock.fencing_token, lock.ttl_ms) == (A, "old-1", 9, 30_000)
    assert locks.room_state(PAGE) == [{"resourceId": FIELD, "lockedBy": "usr_001", "expiresAt": iso(T0 + 20_000)}]
    assert [x.resource_id for x in locks.locks()] == [FIELD] and locks.last_token(FIELD) == 9


def test_the_holder_renews_an_adopted_lock_to_its_full_ttl() -> None:
    locks = machine()
    locks.handle(adopt(ttl_ms=8 * SECOND, expires_at_ms=T0 + 5 * SECOND), T0)
    events = locks.handle(LockRenew(A, "ren", FIELD, LockId("old-1")), T0 + SECOND)
    assert of(events, Reply)[0].type == "LOCK_RENEWED"
    assert of(events, StoreRenew) == [StoreRenew(FIELD, LockId("old-1"), UserId("usr_001"), 8 * SECOND,
                                                 T0 + 9 * SECOND)]


def test_the_holder_releases_an_adopted_lock() -> None:
    locks = machine()
    locks.handle(adopt(), T0)
    events = locks.handle(LockRelease(A, "rel", FIELD, LockId("old-1")), T0 + SECOND)
    assert of(events, Reply)[0].type == "LOCK_RELEASED"
    assert [e.data["reason"] for e in of(events, RoomBroadcast)] == ["released"]
    assert locks.get(FIELD) is None


def test_an_adopted_lock_denies_others_and_expires_on_time() -> None:
    locks = machine()
    locks.handle(adopt(expires_at_ms=T0 + 20 * SECOND), T0)
    [denied] = of(locks.handle(acquire(B, "usr_002"), T0 + SECOND), Reply)
    assert (denied.type, denied.data["lockedBy"]) == ("LOCK_DENIED", "usr_001")
    assert locks.next_deadline() == T0 + 20 * SECOND
    events = locks.expire(T0 + 20 * SECOND)
    assert of(events, RoomBroadcast) == [
        RoomBroadcast(PAGE, None, "RESOURCE_UNLOCKED", {"resourceId": FIELD, "reason": "expired"})]


def test_a_grant_after_an_adopted_lock_must_carry_a_higher_token() -> None:
    locks = machine()
    locks.handle(adopt(token=9), T0)
    locks.expire(T0 + 20 * SECOND)
    [grant] = locks.handle(acquire(B, "usr_002"), T0 + 20 * SECOND)
    with pytest.raises(LockStateError):
        locks.handle(GrantStored(FIELD, grant.lock_id, 9), T0 + 20 * SECOND)


def test_the_holder_leaving_releases_an_adopted_lock() -> None:
    locks = machine()
    locks.handle(adopt(), T0)
    events = locks.handle(MemberGone(A, PAGE, "disconnected"), T0 + SECOND)
    assert [e.data["reason"] for e in of(events, RoomBroadcast)] == ["disconnected"]


def test_a_lock_found_past_its_expiry_is_not_adopted_and_its_keys_go() -> None:
    locks = machine()
    events = locks.handle(adopt(expires_at_ms=T0), T0)
    assert of(events, StoreRelease) == [StoreRelease(FIELD, LockId("old-1"), UserId("usr_001"), T0)]
    assert [a.event_type for a in of(events, AuditLock)] == ["LOCK_EXPIRED"]
    assert not of(events, RoomBroadcast) and locks.get(FIELD) is None
    assert locks.handle(adopt(expires_at_ms=T0), T0) == []  # listed twice: once is enough


@pytest.mark.parametrize("case", ["taken here", "same lock again", "token not newer"])
def test_a_lock_already_known_or_let_go_here_is_not_adopted(case: str) -> None:
    locks = machine()
    if case == "taken here":
        take(locks, B, "usr_002", T0, token=20)
    elif case == "same lock again":
        locks.handle(adopt(), T0)
    else:  # released here, its store release not landed yet: the store still lists it
        lock, _ = take(locks, B, "usr_002", T0, token=9)
        locks.handle(LockRelease(B, None, FIELD, lock.lock_id), T0)
    before = locks.get(FIELD)
    assert locks.handle(adopt(token=9), T0 + 1) == []
    assert locks.get(FIELD) == before


def test_adopting_a_lock_id_in_use_elsewhere_is_a_bug() -> None:
    locks = machine()
    locks.handle(adopt(resource=FIELD, lock_id="same"), T0)
    with pytest.raises(LockStateError):
        locks.handle(adopt(resource=OTHER_FIELD, lock_id="same"), T0)


@pytest.mark.parametrize("ttl_ms", [0, -1])
def test_adopting_a_lock_without_a_ttl_to_renew_to_is_a_bug(ttl_ms: int) -> None:
    # a renewal extends by the TTL: a store listing none broke its contract
    locks = machine()
    with pytest.raises(LockStateError):
        locks.handle(adopt(ttl_ms=ttl_ms), T0)
    assert locks.get(FIELD) is None and locks.last_token(FIELD) is None


# --- leaving the room (presence's MemberGone) --------------------------------------------


@pytest.mark.parametrize("reason, unlock", [("left", "left"), ("disconnected", "disconnected"),
                                            ("timeout", "disconnected")])
def test_a_holder_gone_from_the_room_releases_its_locks_there(reason: str, unlock: str) -> None:
    locks = machine()
    take(locks, A, "usr_001", T0, FIELD)
    take(locks, A, "usr_001", T0, OTHER_FIELD)
    events = locks.handle(MemberGone(A, PAGE, reason), T0 + SECOND)
    assert sorted((e.data["resourceId"], e.data["reason"]) for e in of(events, RoomBroadcast)) == [
        (FIELD, unlock), (OTHER_FIELD, unlock)]
    assert {e.resource_id for e in of(events, StoreRelease)} == {FIELD, OTHER_FIELD}
    assert {a.details["reason"] for a in of(events, AuditLock)} == {reason}
    assert not of(events, Reply) and locks.locks() == []


def test_leaving_one_room_keeps_the_locks_of_other_rooms_and_other_connections() -> None:
    locks = machine()
    take(locks, A, "usr_001", T0, FIELD, room=PAGE)
    take(locks, A, "usr_001", T0, OTHER_FIELD, room=ResourceId("page:/patient/999"))
    take(locks, B, "usr_002", T0, ResourceId("input-field-789"), room=PAGE)
    events = locks.handle(MemberGone(A, PAGE, "left"), T0 + 1)
    assert [e.data["resourceId"] for e in of(events, RoomBroadcast)] == [FIELD]
    assert [lock.resource_id for lock in locks.locks()] == ["input-field-456", "input-field-789"]


def test_leaving_while_the_grant_is_stored_answers_the_asker_and_returns_the_grant() -> None:
    locks = machine()
    [grant] = locks.handle(acquire(A, "usr_001"), T0)
    events = locks.handle(MemberGone(A, PAGE, "left"), T0 + 1)
    [reply] = of(events, Reply)
    assert (reply.ref, reply.data["code"]) == ("acq", "NOT_JOINED")
    # still blocks others until the store answers, then is handed back silently
    assert of(locks.handle(acquire(B, "usr_002"), T0 + 2), Reply)[0].type == "LOCK_DENIED"
    events = locks.handle(GrantStored(FIELD, grant.lock_id, 4), T0 + 3)
    assert of(events, StoreRelease) == [StoreRelease(FIELD, grant.lock_id, UserId("usr_001"))]
    assert not of(events, Reply) and not of(events, RoomBroadcast)
    assert locks.get(FIELD) is None and locks.last_token(FIELD) == 4


def test_a_refused_grant_of_a_connection_gone_is_just_forgotten() -> None:
    locks = machine()
    [grant] = locks.handle(acquire(A, "usr_001"), T0)
    locks.handle(MemberGone(A, PAGE, "disconnected"), T0 + 1)
    events = locks.handle(GrantRefused(FIELD, grant.lock_id, UserId("usr_002"), T0 + SECOND), T0 + 2)
    assert not of(events, Reply) and locks.get(FIELD) is None


# --- viewers, TTL bounds, fencing ---------------------------------------------------------


def test_a_viewer_cannot_lock() -> None:
    locks = machine()
    events = locks.handle(acquire(A, "usr_001", mode="viewer", ref=3), T0)
    [reply] = of(events, Reply)
    assert (reply.ref, reply.type, reply.data["code"]) == (3, "PERMISSION_DENIED", "PERMISSION_DENIED")
    assert not of(events, StoreGrant)
    assert of(events, AuditLock)[0].event_type == "LOCK_DENIED"
    assert locks.get(FIELD) is None


@pytest.mark.parametrize("requested, granted", [
    (None, 30 * SECOND), (10 * SECOND, 10 * SECOND), (3_600_000, 300 * SECOND), (999, SECOND), (0, SECOND),
    (-5, SECOND)])
def test_a_requested_ttl_is_held_between_one_second_and_the_cap(requested: int | None, granted: int) -> None:
    locks = machine()
    [grant] = locks.handle(acquire(A, "usr_001", ttl_ms=requested), T0)
    assert (grant.ttl_ms, grant.expires_at_ms) == (granted, T0 + granted)


def test_the_default_ttl_and_the_cap_are_the_deployments_choice() -> None:
    locks = machine(default_ttl_ms=10 * SECOND, max_ttl_ms=60 * SECOND)
    assert locks.handle(acquire(A, "usr_001"), T0)[0].ttl_ms == 10 * SECOND
    assert locks.handle(acquire(A, "usr_001", OTHER_FIELD, ttl_ms=90 * SECOND), T0)[0].ttl_ms == 60 * SECOND
    with pytest.raises(ValueError):
        machine(default_ttl_ms=10 * SECOND, max_ttl_ms=5 * SECOND)


def test_tokens_come_from_the_store_and_a_token_going_back_is_a_bug() -> None:
    locks = machine()
    lock, _ = take(locks, A, "usr_001", T0, token=10)
    locks.handle(LockRelease(A, None, FIELD, lock.lock_id), T0 + 1)
    [grant] = locks.handle(acquire(B, "usr_002"), T0 + 2)
    with pytest.raises(LockStateError):
        locks.handle(GrantStored(FIELD, grant.lock_id, 10), T0 + 3)
    assert locks.holder(FIELD) is None  # nothing granted on a bad token
    locks.handle(GrantStored(FIELD, grant.lock_id, 11), T0 + 4)
    assert locks.last_token(FIELD) == 11


def test_tokens_are_tracked_per_resource() -> None:
    locks = machine()
    take(locks, A, "usr_001", T0, FIELD, token=50)
    take(locks, A, "usr_001", T0, OTHER_FIELD, token=1)  # another resource's counter
    assert (locks.last_token(FIELD), locks.last_token(OTHER_FIELD)) == (50, 1)


def test_the_last_tokens_of_a_bounded_number_of_resources_are_remembered_the_least_recent_forgotten() -> None:
    # habit 9: forgetting only weakens the check on that resource; the store keeps tokens increasing
    locks = machine(remembered_tokens=2)
    third = ResourceId("input-field-789")
    first, _ = take(locks, A, "usr_001", T0, FIELD, token=10)
    take(locks, A, "usr_001", T0, OTHER_FIELD, token=20)
    lock, _ = take(locks, B, "usr_002", T0, third, token=30)
    assert (locks.last_token(FIELD), locks.last_token(OTHER_FIELD), locks.last_token(third)) == (None, 20, 30)
    locks.handle(LockRelease(B, None, third, lock.lock_id), T0 + 1)
    take(locks, B, "usr_002", T0 + 2, third, token=31)  # granted again: now the most recent
    locks.handle(LockRelease(A, None, FIELD, first.lock_id), T0 + 3)
    take(locks, C, "usr_003", T0 + 4, FIELD, token=5)  # below the forgotten 10: no longer caught here
    assert (locks.last_token(FIELD), locks.last_token(OTHER_FIELD), locks.last_token(third)) == (5, None, 31)


# --- queries and purity ---------------------------------------------------------------


def test_a_joining_member_sees_the_rooms_held_locks() -> None:
    locks = machine()
    take(locks, A, "usr_001", T0, FIELD)
    take(locks, B, "usr_002", T0, OTHER_FIELD, room=ResourceId("page:/elsewhere"))
    locks.handle(acquire(C, "usr_003", ResourceId("input-field-789")), T0)  # pending: not shown
    assert locks.room_state(PAGE) == [{"resourceId": FIELD, "lockedBy": "usr_001", "expiresAt": iso(T0 + 30_000)}]
    assert [lock.resource_id for lock in locks.locks_of(A)] == [FIELD]


@pytest.mark.parametrize("action, outcome, event_type", [
    ("acquire", "ok", "LOCK_ACQUIRED"), ("acquire", "error", "LOCK_ACQUIRE_FAILED"), ("deny", "denied", "LOCK_DENIED"),
    ("renew", "ok", "LOCK_RENEWED"), ("renew", "denied", "LOCK_RENEW_DENIED"), ("release", "ok", "LOCK_RELEASED"),
    ("release", "denied", "LOCK_RELEASE_DENIED"), ("expire", "ok", "LOCK_EXPIRED"), ("adopt", "ok", "LOCK_ADOPTED"),
    ("fence", "denied", "LOCK_FENCE_DENIED"), ("fence", "ok", "LOCK_FENCE")])
def test_each_audit_record_has_a_stable_event_type(action: str, outcome: str, event_type: str) -> None:
    assert AuditLock(action, FIELD, None, None, outcome).event_type == event_type


def test_an_unknown_command_is_a_bug() -> None:
    with pytest.raises(TypeError):
        machine().handle("LOCK_ACQUIRE", T0)


@pytest.mark.parametrize("module", ["rounds.shard.locks.machine", "rounds.shard.locks.events"])
def test_the_lock_machine_imports_no_io_library_even_indirectly(module: str) -> None:
    graph = closure(module)
    assert module in graph
    assert not {f"{m} imports {n}" for m, names in graph.items() for n in names if n.split(".")[0] in FORBIDDEN}

