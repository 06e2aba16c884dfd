"""Random interleavings of join, leave, disconnect and sync against a model.

The model is the set of memberships `(conn, room) -> mode` plus a model Redis
fed only by the machine's mirror events; after every step the machine, the
model and the mirror must agree, and every broadcast must target members only.
"""

from __future__ import annotations

from collections import defaultdict

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rounds.ids import ConnId, FrontDoorId, ResourceId, SessionId, UserId, conn_id, frontdoor_of, parent_of
from rounds.protocol.messages import Command, Deliver, Disconnect, Join, Leave, Reply, Sync
from rounds.protocol.ws import ErrorCode, MessageType
from rounds.shard.events import Event, MemberGone, MirrorJoin, MirrorLeave, TellState
from rounds.shard.presence.machine import Presence

# Connections belong to one user each; alice has two tabs on front door 0 and
# bob one tab on each front door, so tabs and front doors interleave.
OWNER: dict[ConnId, UserId] = {
    conn_id(FrontDoorId(0), 1): UserId("alice"),
    conn_id(FrontDoorId(0), 2): UserId("alice"),
    conn_id(FrontDoorId(0), 3): UserId("bob"),
    conn_id(FrontDoorId(1), 1): UserId("bob"),
    conn_id(FrontDoorId(1), 2): UserId("carol"),
}
CONNS = sorted(OWNER)
ROOMS = [ResourceId(r) for r in (
    "page:/patient/12345", "document:999/tab:a", "document:999/tab:b", "document:7/tab:a",
)]
MODES = ["editor", "viewer"]
FRONTDOORS = [FrontDoorId(0), FrontDoorId(1)]

conns = st.sampled_from(CONNS)
rooms = st.sampled_from(ROOMS)
modes = st.sampled_from(MODES)


def make_join(conn: ConnId, room: ResourceId, mode: str, ref: int | None = None) -> Join:
    user = OWNER[conn]
    return Join(conn, ref, user, f"{user}@example.com", SessionId(f"s{conn}"), room, "t", mode)


class PresenceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.presence = Presence()
        self.model: dict[tuple[ConnId, ResourceId], str] = {}
        self.redis: dict[ResourceId, dict[UserId, tuple[str, int]]] = defaultdict(dict)
        self.now = 1_763_375_400_000
        self.ref = 0

    # --- model helpers ----------------------------------------------------------

    def members(self, room: ResourceId, model: dict[tuple[ConnId, ResourceId], str] | None = None) -> set[ConnId]:
        return {c for (c, r) in (self.model if model is None else model) if r == room}

    def run(self, command: Command, before: dict[tuple[ConnId, ResourceId], str], dt: int) -> list[Event]:
        self.now += dt
        events = self.presence.handle(command, self.now)
        for e in events:
            match e:
                case MirrorJoin(resource_id=room, user_id=user, mode=mode, joined_at_ms=at):
                    self.redis[room][user] = (mode, at)
                case MirrorLeave(resource_id=room, user_id=user):
                    assert user in self.redis[room], "MirrorLeave of a user never mirrored"
                    del self.redis[room][user]
                    if not self.redis[room]:
                        del self.redis[room]
        self.check_events(command, before, events)
        return events

    def check_events(self, command: Command, before: dict[tuple[ConnId, ResourceId], str],
                     events: list[Event]) -> None:
        removed = set(before) - set(self.model)
        assert {(g.conn, g.resource_id) for g in events if isinstance(g, MemberGone)} == removed
        for e in events:
            if not isinstance(e, Deliver):
                continue
            assert e.conns, "a Deliver to nobody"
            assert len(set(e.conns)) == len(e.conns), "a Deliver names a connection twice"
            room = e.data.get("resourceId")
            if e.type == MessageType.USER_JOINED:
                assert set(e.conns) <= self.members(room)
                assert all(OWNER[c] != e.data["user"]["userId"] for c in e.conns)
                if isinstance(command, Sync):  # a user restored into a room, told to those not refreshed
                    listed = {(j.conn, j.resource_id) for j in command.joins}
                    assert not {(c, room) for c in e.conns} & listed
                    assert e.data["user"]["userId"] in {OWNER[c] for c in self.members(room)}
            elif e.type == MessageType.USER_LEFT:
                assert set(e.conns) <= self.members(room, before)
                assert all(OWNER[c] != e.data["userId"] for c in e.conns)
                if not isinstance(command, Sync):  # a sync may drop several members in turn
                    assert set(e.conns) <= self.members(room)
            elif e.type == MessageType.ALL_USERS:
                assert parent_of(ResourceId(e.data["currentSubResourceId"])) is not None
                assert set(e.conns) <= self.members(e.data["currentSubResourceId"], before) | self.members(
                    e.data["currentSubResourceId"])
            else:
                raise AssertionError(f"unexpected broadcast {e.type}")
        if not isinstance(command, Sync):
            # the last family update per tab still in use describes the final
            # state (a tab emptied later in the same command gets none)
            last: dict[str, Deliver] = {}
            for e in events:
                if isinstance(e, Deliver) and e.type == MessageType.ALL_USERS:
                    last[e.data["currentSubResourceId"]] = e
            for sub, e in last.items():
                if not self.members(ResourceId(sub)):
                    continue
                parent = e.data["parentResourceId"]
                family = [r for r in ROOMS if parent_of(r) == parent]
                users = {OWNER[c] for r in family for c in self.members(r)}
                assert e.data["totalCount"] == len(users)
                assert set(e.conns) == self.members(ResourceId(sub))

    # --- rules --------------------------------------------------------------------

    @rule(conn=conns, room=rooms, mode=modes, dt=st.integers(0, 5_000))
    def join(self, conn: ConnId, room: ResourceId, mode: str, dt: int) -> None:
        self.ref += 1
        before = dict(self.model)
        already = (conn, room) in self.model
        self.model.setdefault((conn, room), mode)
        events = self.run(make_join(conn, room, mode, self.ref), before, dt)
        if already:
            [reply] = [e for e in events if isinstance(e, Reply)]
            assert (reply.conn, reply.ref) == (conn, self.ref)
            assert reply.type == MessageType.ERROR and reply.data["code"] == ErrorCode.ALREADY_JOINED
            assert events == [reply]
        else:
            [tell] = [e for e in events if isinstance(e, TellState)]
            assert (tell.conn, tell.ref, tell.resource_id) == (conn, self.ref, room)
            assert {u["userId"] for u in self.presence.users_wire(room)} == {OWNER[c] for c in self.members(room)}

    @rule(conn=conns, room=rooms, dt=st.integers(0, 5_000))
    def leave(self, conn: ConnId, room: ResourceId, dt: int) -> None:
        self.ref += 1
        before = dict(self.model)
        joined = self.model.pop((conn, room), None) is not None
        events = self.run(Leave(conn, self.ref, room), before, dt)
        [reply] = [e for e in events if isinstance(e, Reply)]
        assert (reply.conn, reply.ref) == (conn, self.ref)
        if joined:
            assert reply.type == MessageType.RESOURCE_LEFT
            assert [g.reason for g in events if isinstance(g, MemberGone)] == ["left"]
        else:
            assert reply.data["code"] == ErrorCode.NOT_JOINED
            assert events == [reply]

    @rule(conn=conns, reason=st.sampled_from(["disconnected", "timeout"]), dt=st.integers(0, 5_000))
    def disconnect(self, conn: ConnId, reason: str, dt: int) -> None:
        before = dict(self.model)
        self.model = {k: v for k, v in self.model.items() if k[0] != conn}
        events = self.run(Disconnect(conn, reason), before, dt)
        assert not any(isinstance(e, Reply) for e in events)
        assert {g.reason for g in events if isinstance(g, MemberGone)} <= {reason}

    @rule(
        fd=st.sampled_from(FRONTDOORS),
        entries=st.lists(st.tuples(conns, rooms, modes), max_size=6),
        dt=st.integers(0, 5_000),
    )
    def sync(self, fd: FrontDoorId, entries: list[tuple[ConnId, ResourceId, str]], dt: int) -> None:
        joins = tuple(make_join(c, r, m) for c, r, m in entries if frontdoor_of(c) == fd)
        listed = {(j.conn, j.resource_id) for j in joins}
        before = dict(self.model)
        self.model = {k: v for k, v in self.model.items() if frontdoor_of(k[0]) != fd or k in listed}
        for j in joins:
            self.model.setdefault((j.conn, j.resource_id), j.mode)
        events = self.run(Sync(fd, joins), before, dt)
        assert not any(isinstance(e, Reply) for e in events)
        assert {g.reason for g in events if isinstance(g, MemberGone)} <= {"disconnected"}
        # every member the front door listed is told its room again, whole: it may have missed deliveries
        assert {(t.conn, t.resource_id) for t in events if isinstance(t, TellState) and t.refresh} == listed

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def sync_exactly_what_the_shard_has(self, data: st.DataObject) -> None:
        """A link flap with nothing lost in between changes no membership and
        announces nobody; it tells that front door's members their rooms again."""
        fd = data.draw(st.sampled_from(FRONTDOORS))
        joins = tuple(make_join(c, r, m) for (c, r), m in self.model.items() if frontdoor_of(c) == fd)
        events = self.run(Sync(fd, joins), dict(self.model), 1)
        assert [e for e in events if not isinstance(e, (TellState, Deliver))] == []
        assert {e.type for e in events if isinstance(e, Deliver)} <= {MessageType.ALL_USERS}
        assert sorted((t.conn, t.resource_id) for t in events if isinstance(t, TellState)) == sorted(
            (j.conn, j.resource_id) for j in joins)

    # --- invariants -------------------------------------------------------------------

    @invariant()
    def rooms_equal_the_model(self) -> None:
        counts: dict[ResourceId, int] = defaultdict(int)
        for _, room in self.model:
            counts[room] += 1
        assert self.presence.rooms() == dict(counts)  # no empty room is kept
        for conn in CONNS:
            assert self.presence.rooms_of(conn) == {r for (c, r) in self.model if c == conn}
        assert self.presence.connections() == len({c for c, _ in self.model})

    @invariant()
    def users_are_listed_once_with_the_strongest_mode(self) -> None:
        for room in ROOMS:
            views = self.presence.users(room)
            ids = [v.user_id for v in views]
            assert len(ids) == len(set(ids))
            expected: dict[UserId, set[str]] = defaultdict(set)
            for (c, r), mode in self.model.items():
                if r == room:
                    expected[OWNER[c]].add(mode)
            assert {v.user_id: v.mode for v in views} == {
                u: ("editor" if "editor" in ms else "viewer") for u, ms in expected.items()
            }

    @invariant()
    def the_mirror_equals_the_users_present(self) -> None:
        present = {
            room: {v.user_id: (v.mode, v.joined_at_ms) for v in self.presence.users(room)}
            for room in ROOMS if self.presence.users(room)
        }
        assert dict(self.redis) == present


PresenceMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPresenceMatchesItsModel = PresenceMachine.TestCase
