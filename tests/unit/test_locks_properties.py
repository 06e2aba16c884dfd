"""Random interleavings of lock requests, store answers, time and departures.

The test plays the shell around the lock machine: store requests wait in one
FIFO queue (the order the shell must keep) and a model store answers them
when a rule says so, with its own clock and TTLs, a fencing counter per
resource, and now and then a foreign holder (another shard, a previous life)
or a failure. Now and then the shard restarts: requests in flight die (some
after landing), a new machine adopts the store's live locks of its rooms,
and the holders' connections carry on. What the clients see is tracked from
the machine's events alone, and must never show two holders at once, a token
going back (across restarts too), a lock outliving its deadline, a request
answered twice or never.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rounds.clock import iso_ms
from rounds.ids import ConnId, FrontDoorId, ResourceId, UserId, conn_id
from rounds.protocol.messages import LockAcquire, LockId, LockRelease, LockRenew, Reply
from rounds.shard.events import MemberGone, RoomBroadcast
from rounds.shard.locks.events import (
    AuditLock,
    GrantFailed,
    GrantRefused,
    GrantStored,
    LockAdopt,
    LockCommand,
    LockEvent,
    LockLost,
    StoreGrant,
    StoreRelease,
    StoreRenew,
    StoreRequest,
)
from rounds.shard.locks.machine import Locks

T0 = int(datetime(2025, 11, 17, 10, 30, tzinfo=UTC).timestamp() * 1000)
OWNER: dict[ConnId, UserId] = {
    conn_id(FrontDoorId(0), 1): UserId("alice"),
    conn_id(FrontDoorId(0), 2): UserId("alice"),  # her second tab
    conn_id(FrontDoorId(1), 1): UserId("bob"),
    conn_id(FrontDoorId(1), 2): UserId("carol"),
}
CONNS = sorted(OWNER)
RESOURCES = [ResourceId("input-field-1"), ResourceId("input-field-2")]
PAGE = ResourceId("page:/patient/12345")
ROOMS = [PAGE, *RESOURCES]  # a lock's room is the page, or the field itself
FOREIGN = UserId("zed")  # holds locks this machine never granted
UNLOCK_REASON = {"left": "left", "disconnected": "disconnected", "timeout": "disconnected"}

conns = st.sampled_from(CONNS)
resources = st.sampled_from(RESOURCES)
steps = st.one_of(st.just(0), st.integers(0, 2_000))  # mostly inside a TTL


@dataclass
class Held:
    """A lock as the clients know it, from LOCK_ACQUIRED on."""

    lock_id: LockId
    conn: ConnId
    room: ResourceId
    token: int
    expires_at_ms: int


@dataclass
class Pending:
    lock_id: LockId
    conn: ConnId
    room: ResourceId
    ref: Any
    expires_at_ms: int
    gone: bool = False  # the asker left the room: settled silently


@dataclass
class Entry:
    """One lock in the model store: its key, TTL and metadata."""

    lock_id: LockId
    user_id: UserId
    deadline: int  # the store's own TTL runs out then
    expires_at_ms: int  # the metadata's `expiresAt`, as the machine stored it
    conn: ConnId | None = None  # None: a foreign holder
    room: ResourceId | None = None
    ttl_ms: int = 0
    acquired_at_ms: int = 0
    token: int = 0


class ModelStore:
    """Redis as the Lua scripts use it: one holder per resource with a TTL on
    the store's clock, the metadata adoption reads, and a fencing counter that
    only goes up."""

    def __init__(self) -> None:
        self.held: dict[ResourceId, Entry] = {}
        self.fence: dict[ResourceId, int] = {}

    def live(self, rid: ResourceId, now: int) -> Entry | None:
        entry = self.held.get(rid)
        if entry is not None and entry.deadline <= now:
            del self.held[rid]
            return None
        return entry

    def grant(self, g: StoreGrant, now: int) -> GrantStored | GrantRefused:
        entry = self.live(g.resource_id, now)
        if entry is not None:
            return GrantRefused(g.resource_id, g.lock_id, entry.user_id, entry.deadline)
        self.fence[g.resource_id] = self.fence.get(g.resource_id, 0) + 1
        token = self.fence[g.resource_id]
        self.held[g.resource_id] = Entry(g.lock_id, g.user_id, now + g.ttl_ms, g.expires_at_ms, g.conn, g.room_id,
                                         g.ttl_ms, g.acquired_at_ms, token)
        return GrantStored(g.resource_id, g.lock_id, token)

    def renew(self, r: StoreRenew, now: int) -> bool:
        entry = self.live(r.resource_id, now)
        if entry is None or (entry.lock_id, entry.user_id) != (r.lock_id, r.user_id):
            return False
        entry.deadline, entry.expires_at_ms = now + r.ttl_ms, r.expires_at_ms
        return True

    def release(self, r: StoreRelease, now: int) -> None:
        entry = self.live(r.resource_id, now)
        if (entry is not None and (entry.lock_id, entry.user_id) == (r.lock_id, r.user_id)
                and r.expires_at_ms in (None, entry.expires_at_ms)):
            del self.held[r.resource_id]

    def adoptable(self, now: int) -> list[LockAdopt]:
        """What `held_locks()` lists: the live locks granted by this shard."""
        return [LockAdopt(rid, e.lock_id, e.conn, e.user_id, e.room, e.ttl_ms, e.acquired_at_ms, e.expires_at_ms,
                          e.token)
                for rid in RESOURCES if (e := self.live(rid, now)) is not None
                and e.conn is not None and e.room is not None]


class LockMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.counter = itertools.count(1)
        self.locks = self.new_machine()
        self.store = ModelStore()
        self.queue: deque[StoreRequest] = deque()
        self.now = T0
        self.refs = itertools.count(1)
        self.held: dict[ResourceId, Held] = {}  # what the clients were told
        self.pending: dict[ResourceId, Pending] = {}
        self.announced: dict[ResourceId, ResourceId] = {}  # RESOURCE_LOCKED not yet UNLOCKED: rid -> room
        self.last_token: dict[ResourceId, int] = {}
        self.waiting: dict[Any, ConnId] = {}  # acquire refs not answered yet
        self.seen_ids: list[LockId] = [LockId("lock-unknown")]

    def new_machine(self) -> Locks:
        return Locks(lambda: f"lock-{next(self.counter)}", default_ttl_ms=10_000, max_ttl_ms=40_000)

    # --- the shell --------------------------------------------------------------------

    def tick(self, dt: int) -> None:
        self.now += dt
        self.observe(self.locks.expire(self.now), None)

    def run(self, command: LockCommand) -> list[LockEvent]:
        events = self.locks.handle(command, self.now)
        self.observe(events, command)
        if isinstance(command, GrantStored | GrantRefused | GrantFailed):
            # a grant whose asker left is settled without a word to anyone
            left = self.pending.get(command.resource_id)
            if left is not None and left.lock_id == command.lock_id:
                assert left.gone and not any(isinstance(e, Reply | RoomBroadcast) for e in events)
                del self.pending[command.resource_id]
                if isinstance(command, GrantStored):
                    assert command.fencing_token > self.last_token.get(command.resource_id, 0)
                    self.last_token[command.resource_id] = command.fencing_token
                    assert [e.lock_id for e in events if isinstance(e, StoreRelease)] == [command.lock_id]
        return events

    def observe(self, events: list[LockEvent], command: LockCommand | None) -> None:
        for e in events:
            match e:
                case StoreGrant() | StoreRenew() | StoreRelease():
                    self.queue.append(e)
                    if isinstance(e, StoreGrant):
                        assert isinstance(command, LockAcquire)
                        assert e.resource_id not in self.held and e.resource_id not in self.pending
                        self.pending[e.resource_id] = Pending(e.lock_id, command.conn, command.room_id
                                                              or e.resource_id, command.ref, e.expires_at_ms)
                        self.waiting[command.ref] = command.conn
                        self.seen_ids.append(e.lock_id)
                case Reply(ref=ref) if ref in self.waiting:
                    event(f"acquire answered {e.type} {e.data.get('code', '')}".strip())
                    assert self.waiting.pop(ref) == e.conn, "an acquire answered to another connection"
                    self.acquire_answered(e, command)
                case RoomBroadcast(type="RESOURCE_LOCKED", room_id=room):
                    rid = e.data["resourceId"]
                    if rid in self.announced:  # a renewal: the room learns the new expiry
                        assert isinstance(command, LockRenew) and command.resource_id == rid, "RESOURCE_LOCKED twice"
                        assert self.announced[rid] == room
                        assert e.data["expiresAt"] == iso_ms(self.now + self.locks.holder(rid).ttl_ms)
                    assert self.held[rid].conn == e.except_conn
                    self.announced[rid] = room
                case RoomBroadcast(type="RESOURCE_UNLOCKED", room_id=room):
                    rid = e.data["resourceId"]
                    assert self.announced.pop(rid) == room, "RESOURCE_UNLOCKED for a lock never announced"
                    gone = self.held.pop(rid)
                    lost = " (store lost it)" if isinstance(command, LockLost) else ""
                    event(f"unlocked {e.data['reason']}{lost}")
                    if e.data["reason"] == "expired" and not isinstance(command, LockLost):
                        assert gone.expires_at_ms <= self.now, "expired before its deadline"
                case Reply() | AuditLock():
                    pass  # replies to renew/release are checked by their rules
                case _:
                    raise AssertionError(f"unexpected event {e!r}")

    def acquire_answered(self, reply: Reply, command: LockCommand | None) -> None:
        rid = reply.data["resourceId"]
        if reply.type == "LOCK_ACQUIRED":
            # never two holders, tokens never go back
            assert rid not in self.held, "a second holder"
            token = reply.data["fencingToken"]
            assert token > self.last_token.get(rid, 0), "fencing token went back"
            self.last_token[rid] = token
            p = self.pending.pop(rid)
            assert isinstance(command, GrantStored) and not p.gone
            assert reply.data["expiresAt"] == iso_ms(p.expires_at_ms)
            self.held[rid] = Held(p.lock_id, p.conn, p.room, token, p.expires_at_ms)
        elif reply.type == "LOCK_DENIED":
            if isinstance(command, GrantRefused):
                assert self.pending.pop(rid).lock_id == command.lock_id
        elif reply.type == "ERROR":
            code = reply.data["code"]
            if code == "UNAVAILABLE":
                assert isinstance(command, GrantFailed) and self.pending.pop(rid).lock_id == command.lock_id
            else:
                assert code == "NOT_JOINED" and isinstance(command, MemberGone)
                self.pending[rid].gone = True
        else:
            assert reply.type == "PERMISSION_DENIED"

    # --- client rules -------------------------------------------------------------------

    @rule(conn=conns, rid=resources, in_page=st.booleans(), dt=steps,
          ttl=st.sampled_from([None, None, 500, 1_000, 5_000, 45_000]),
          mode=st.sampled_from(["editor", "editor", "editor", "viewer"]))
    def acquire(self, conn: ConnId, rid: ResourceId, in_page: bool, dt: int, ttl: int | None, mode: str) -> None:
        self.tick(dt)
        taken = rid in self.held or rid in self.pending
        ref = next(self.refs)
        events = self.run(LockAcquire(conn, ref, OWNER[conn], rid, mode, PAGE if in_page else None, ttl))
        asked = [e for e in events if isinstance(e, StoreGrant)]
        if mode == "viewer" or taken:
            assert not asked and ref not in self.waiting  # answered at once
        else:
            assert len(asked) == 1 and ref in self.waiting
            assert asked[0].ttl_ms == (10_000 if ttl is None else min(max(ttl, 1_000), 40_000))

    def pick(self, data: st.DataObject, rid: ResourceId) -> tuple[ConnId, LockId]:
        """Mostly the holder with its lock id; else anyone with any id seen."""
        held = self.held.get(rid)
        if held is not None and data.draw(st.integers(0, 3), label="as holder") > 0:
            return held.conn, held.lock_id
        return data.draw(conns, label="conn"), data.draw(st.sampled_from(self.seen_ids), label="lock id")

    @rule(rid=resources, data=st.data(), dt=steps)
    def renew(self, rid: ResourceId, data: st.DataObject, dt: int) -> None:
        self.tick(dt)
        conn, lock_id = self.pick(data, rid)
        expected = self.expected_answer(conn, rid, lock_id, "LOCK_RENEWED")
        events = self.run(LockRenew(conn, "renew", rid, lock_id))
        [reply] = [e for e in events if isinstance(e, Reply)]
        assert (reply.type, reply.data.get("code")) == expected
        event(f"renew answered {reply.type} {reply.data.get('code', '')}".strip())
        if reply.type == "LOCK_RENEWED":
            lock = self.locks.holder(rid)
            assert lock is not None and lock.expires_at_ms == self.now + lock.ttl_ms
            self.held[rid].expires_at_ms = lock.expires_at_ms

    @rule(rid=resources, data=st.data(), dt=steps)
    def release(self, rid: ResourceId, data: st.DataObject, dt: int) -> None:
        self.tick(dt)
        conn, lock_id = self.pick(data, rid)
        expected = self.expected_answer(conn, rid, lock_id, "LOCK_RELEASED")
        events = self.run(LockRelease(conn, "release", rid, lock_id))
        [reply] = [e for e in events if isinstance(e, Reply)]
        assert (reply.type, reply.data.get("code")) == expected
        event(f"release answered {reply.type} {reply.data.get('code', '')}".strip())
        if reply.type == "LOCK_RELEASED":
            assert rid not in self.held and self.locks.get(rid) is None

    def expected_answer(self, conn: ConnId, rid: ResourceId, lock_id: LockId, ok: str) -> tuple[str, str | None]:
        held = self.held.get(rid)
        if held is not None and (held.conn, held.lock_id) == (conn, lock_id):
            return ok, None
        if held is not None or rid in self.pending:
            return "ERROR", "NOT_LOCK_HOLDER"
        return "ERROR", "UNKNOWN_LOCK"

    @rule(data=st.data(), reason=st.sampled_from(sorted(UNLOCK_REASON)), dt=steps)
    def member_gone(self, data: st.DataObject, reason: str, dt: int) -> None:
        self.tick(dt)
        holders = sorted({(h.conn, h.room) for h in self.held.values()})
        pending = sorted({(p.conn, p.room) for p in self.pending.values()})
        if bool(pending) and data.draw(st.integers(0, 4), label="a pending asker") == 0:
            conn, room = data.draw(st.sampled_from(pending), label="asker and room")
        elif bool(holders) and data.draw(st.booleans(), label="a holder"):
            conn, room = data.draw(st.sampled_from(holders), label="holder and room")
        else:
            conn, room = data.draw(conns, label="conn"), data.draw(st.sampled_from(ROOMS), label="room")
        losing = {rid for rid, h in self.held.items() if (h.conn, h.room) == (conn, room)}
        events = self.run(MemberGone(conn, room, reason))
        unlocked = {e.data["resourceId"]: e.data["reason"] for e in events if isinstance(e, RoomBroadcast)}
        assert unlocked == {rid: UNLOCK_REASON[reason] for rid in losing}
        assert not any(p.conn == conn and p.room == room and not p.gone for p in self.pending.values())

    # --- store and time rules --------------------------------------------------------------

    @precondition(lambda self: bool(self.queue))
    @rule(dt=st.integers(0, 500), outcome=st.sampled_from(["answer"] * 6 + ["failed", "failed after landing"]))
    def store_answers(self, dt: int, outcome: str) -> None:
        self.tick(dt)
        request = self.queue.popleft()
        match request:
            case StoreGrant() if outcome != "answer":
                if outcome == "failed after landing":  # it timed out after the script ran
                    self.store.grant(request, self.now)
                self.run(GrantFailed(request.resource_id, request.lock_id, "TimeoutError"))
            case StoreGrant():
                self.run(self.store.grant(request, self.now))
            case StoreRenew():
                if not self.store.renew(request, self.now):
                    self.run(LockLost(request.resource_id, request.lock_id))
            case StoreRelease():
                self.store.release(request, self.now)

    @rule(rid=resources, ttl=st.integers(1, 20_000))
    def someone_else_takes_it_in_the_store(self, rid: ResourceId, ttl: int) -> None:
        if self.store.live(rid, self.now) is None:
            self.store.fence[rid] = self.store.fence.get(rid, 0) + 1
            self.store.held[rid] = Entry(LockId(f"foreign-{next(self.refs)}"), FOREIGN, self.now + ttl, self.now + ttl)

    @rule(dt=st.sampled_from([1, 999, 1_000, 5_000, 10_000, 45_000]))
    def time_passes(self, dt: int) -> None:
        self.tick(dt)

    @rule(data=st.data(), dt=st.integers(0, 3_000), again=st.booleans())
    def the_shard_restarts_and_adopts_its_live_locks(self, data: st.DataObject, dt: int, again: bool) -> None:
        """Ray restarts the shard: the store requests in flight die, some after
        landing; pending acquires get UNAVAILABLE from the front door; a new
        machine adopts the store's live locks (`LockShell.start`) and the
        holders' connections, kept by the front doors, carry on."""
        for request in self.queue:
            if data.draw(st.booleans(), label=f"{type(request).__name__} landed before the crash"):
                match request:
                    case StoreGrant():
                        self.store.grant(request, self.now)
                    case StoreRenew():
                        self.store.renew(request, self.now)
                    case StoreRelease():
                        self.store.release(request, self.now)
        self.queue.clear()
        self.pending.clear()
        self.waiting.clear()
        self.now += dt
        self.locks = self.new_machine()
        live = self.store.adoptable(self.now)
        for adopt in live:
            events = self.run(adopt)
            due = adopt.expires_at_ms <= self.now  # ended while away: its keys go
            assert [type(e) for e in events] == ([StoreRelease, AuditLock] if due else [AuditLock])
        if again:  # a second listing (a SCAN repeats keys) changes nothing
            for adopt in live:
                assert self.locks.handle(adopt, self.now) == []
        # The clients' view: what the store still has is held, by whoever holds it
        # there (a grant that landed in the crash included); the rest ended silently.
        self.held, self.announced = {}, {}
        for adopt in live:
            if adopt.expires_at_ms <= self.now:
                continue
            rid = adopt.resource_id
            assert adopt.fencing_token >= self.last_token.get(rid, 0), "an adopted token went back"
            self.last_token[rid] = adopt.fencing_token
            self.held[rid] = Held(adopt.lock_id, adopt.conn, adopt.room_id, adopt.fencing_token, adopt.expires_at_ms)
            self.announced[rid] = adopt.room_id
        event(f"restart adopted {len(self.held)}")

    # --- invariants -----------------------------------------------------------------------------

    @invariant()
    def the_machine_holds_what_the_clients_were_told(self) -> None:
        assert {rid: lock.lock_id for rid, lock in ((lock.resource_id, lock) for lock in self.locks.locks())} == {
            rid: h.lock_id for rid, h in self.held.items()}
        assert set(self.announced) == set(self.held)

    @invariant()
    def no_lock_outlives_its_deadline(self) -> None:
        assert all(h.expires_at_ms > self.now for h in self.held.values())
        deadlines = [h.expires_at_ms for h in self.held.values()]
        assert self.locks.next_deadline() == (min(deadlines) if deadlines else None)

    @invariant()
    def with_the_queue_drained_store_and_machine_agree(self) -> None:
        if self.queue:
            return
        assert not self.pending and not self.waiting, "a grant left unanswered"
        in_store = {rid: entry.lock_id for rid in RESOURCES
                    if (entry := self.store.live(rid, self.now)) is not None and entry.user_id != FOREIGN}
        assert in_store == {rid: h.lock_id for rid, h in self.held.items()}

    @invariant()
    def tokens_are_the_stores(self) -> None:
        for rid, h in self.held.items():
            assert h.token <= self.store.fence[rid]
        for rid, token in self.last_token.items():
            # a restarted machine knows only the tokens it adopted or granted since,
            # and may know one no client saw (a grant that landed as the shard died)
            known = self.locks.last_token(rid)
            assert known is None or known >= token


LockMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLocksKeepTheirPromises = LockMachine.TestCase
