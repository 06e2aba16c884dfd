"""When a shard writes its documents (`rounds.shard.documents.persistence`):
the acknowledged-update queue, snapshot debounce, compaction and unloading,
driven with plain numbers for time, no store and no loop."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rounds.ids import ConnId, ResourceId, SessionId, UserId
from rounds.shard.documents.persistence import MAX_RETRY_MS, SNAPSHOT_RETRY_MS, Persistence, Snapshot, Write

A, B = ResourceId("document:a"), ResourceId("document:b")
DELAY, LOG_MAX, IDLE, MAX_UNWRITTEN = 2_000, 5, 60_000, 100


def machine() -> Persistence:
    p = Persistence(DELAY, LOG_MAX, IDLE, MAX_UNWRITTEN)
    p.loaded(A, 0, 0)
    p.loaded(B, 0, 0)
    return p


def write(revision: int) -> Write:
    return Write(revision, b"u%d" % revision, ConnId(1), f"r{revision}", True, UserId("u"), SessionId("s"))


def test_one_append_takes_what_waits_in_every_room_in_order_and_acks_only_after_it() -> None:
    p = machine()
    p.applied(A, write(1), 10)
    p.applied(A, write(2), 11)
    p.applied(B, write(1), 12)
    batch = p.take_append()
    assert {room: [w.revision for w in ws] for room, ws in batch.items()} == {A: [1, 2], B: [1]}
    p.applied(A, write(3), 13)  # arrives while the append is in flight
    assert p.backlog(A) == 3 and not p.settled()
    p.appended(batch)
    assert p.backlog(A) == 1 and p.backlog(B) == 0
    assert [w.revision for w in p.take_append()[A]] == [3]


def test_a_failing_append_is_retried_with_a_back_off_that_doubles_to_a_bound_and_resets() -> None:
    p = machine()
    delays = [p.append_failed() for _ in range(8)]
    assert delays[:4] == [100, 200, 400, 800] and max(delays) == MAX_RETRY_MS
    p.appended({})
    assert p.append_failed() == 100


def test_a_room_is_snapshotted_once_quiet_for_the_delay() -> None:
    p = machine()
    p.applied(A, write(1), 1_000)
    p.applied(A, write(2), 2_500)  # the quiet starts again
    p.appended(p.take_append())
    assert p.next_deadline() == 2_500 + DELAY
    p.expire(4_000)
    assert p.take_snapshots(4_000) == []
    p.expire(4_500)
    assert p.take_snapshots(4_500) == [Snapshot(A, 2)]
    p.snapshotted(Snapshot(A, 2))
    assert p.settled() and p.next_deadline() is None


def test_a_long_log_is_snapshotted_at_once_and_appends_wait_for_it() -> None:
    p = machine()
    for revision in range(1, LOG_MAX + 1):
        p.applied(A, write(revision), revision)
    p.appended(p.take_append())
    [snapshot] = p.take_snapshots(10)
    assert snapshot == Snapshot(A, LOG_MAX)
    p.applied(A, write(6), 11)
    assert A not in p.take_append()  # the room's writes stay in order: after its snapshot
    p.snapshotted(snapshot)
    assert [w.revision for w in p.take_append()[A]] == [6]


def test_a_failed_snapshot_is_tried_again_a_second_later() -> None:
    p = machine()
    for revision in range(1, LOG_MAX + 1):
        p.applied(A, write(revision), 0)
    p.appended(p.take_append())
    [snapshot] = p.take_snapshots(100)
    p.snapshot_failed(snapshot, 100)
    assert p.take_snapshots(100 + SNAPSHOT_RETRY_MS - 1) == []
    assert p.next_deadline() == 100 + SNAPSHOT_RETRY_MS
    assert p.take_snapshots(100 + SNAPSHOT_RETRY_MS) == [snapshot]


def test_an_idle_room_is_saved_first_then_unloaded_and_a_room_in_use_never() -> None:
    p = machine()
    p.applied(A, write(1), 0)
    p.appended(p.take_append())
    assert p.idle(IDLE - 1, set()) == []  # not idle long enough yet
    assert p.idle(IDLE, {A}) == [B]  # B was never changed: it goes; A is in use
    assert p.idle(IDLE, set()) == []  # A's log holds an entry: saved first
    [snapshot] = p.take_snapshots(IDLE)
    p.snapshotted(snapshot)
    assert p.idle(IDLE, set()) == [A]
    assert p.backlog(A) == 0 and p.take_append() == {}


def test_a_room_used_before_it_is_loaded_is_not_tracked() -> None:
    p = machine()
    never = ResourceId("document:never-loaded")
    p.used(never, 5)  # a read that raced the room's unload, or its failed load
    assert p.backlog(never) == 0 and p.settled()
    assert p.idle(IDLE, set()) == [A, B]  # and it is nothing to unload


def test_save_all_makes_every_room_with_anything_unsaved_due() -> None:
    p = machine()
    p.applied(A, write(1), 0)
    p.save_all()
    assert p.take_snapshots(0) == [Snapshot(A, 0)]
    assert p.unsaved() == 1


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from(["apply", "append", "fail", "snapshot", "snap-fail", "tick"]), max_size=60))
def test_every_applied_update_is_appended_once_in_order_and_acked_after(script: list[str]) -> None:
    """Whatever the interleaving of applies, appends (some failing),
    snapshots and time, each room's writes reach the store exactly once and
    in revision order, and none is acknowledged (`appended`) before it."""
    p = Persistence(50, 3, 10_000, 1_000)
    p.loaded(A, 0, 0)
    stored: list[int] = []
    in_flight: list[Snapshot] = []
    revision = now = 0
    for step in script:
        now += 10
        if step == "apply":
            revision += 1
            p.applied(A, write(revision), now)
        elif step in ("append", "fail"):
            batch = p.take_append()
            if batch and step == "append":
                stored += [w.revision for w in batch[A]]
                p.appended(batch)
            elif batch:
                p.append_failed()
        elif step == "snapshot":
            in_flight += p.take_snapshots(now)
        elif step == "snap-fail" and in_flight:
            p.snapshot_failed(in_flight.pop(), now)
        elif step == "tick":
            p.expire(now)
            for snapshot in in_flight:
                p.snapshotted(snapshot)
            in_flight.clear()
    for snapshot in in_flight:
        p.snapshotted(snapshot)
    while batch := p.take_append():
        stored += [w.revision for w in batch[A]]
        p.appended(batch)
    assert stored == list(range(1, revision + 1))
