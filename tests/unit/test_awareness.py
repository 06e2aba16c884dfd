"""RoomAwareness: y-protocols' acceptance rule, ownership by connection, bounds,
and random apply/remove sequences against a model."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from rounds.protocol.yjs import MAX_VARUINT, AwarenessEntry, YProtocolError, decode_awareness, encode_awareness
from rounds.shard.documents.awareness import RoomAwareness

ALICE, BOB = 1, 2  # connections
CURSOR = '{"cursor":{"index":3}}'


def update(*entries: tuple[int, int, str]) -> bytes:
    return encode_awareness(AwarenessEntry(*e) for e in entries)


def entries(data: bytes | None) -> list[tuple[int, int, str]]:
    assert data is not None
    return [(e.client_id, e.clock, e.state) for e in decode_awareness(data)]


def test_a_new_state_is_relayed_and_kept_for_joiners() -> None:
    room = RoomAwareness()
    relayed = room.apply(ALICE, update((10, 1, CURSOR)))
    assert entries(relayed) == [(10, 1, CURSOR)]
    assert entries(room.snapshot()) == [(10, 1, CURSOR)]
    assert len(room) == 1
    assert room.owner(10) == ALICE


def test_an_empty_room_has_no_snapshot() -> None:
    room = RoomAwareness()
    assert room.snapshot() is None
    assert len(room) == 0


def test_a_stale_or_repeated_clock_is_ignored_as_y_protocols_does() -> None:
    room = RoomAwareness()
    room.apply(ALICE, update((10, 5, CURSOR)))
    assert room.apply(ALICE, update((10, 4, '{"x":1}'))) is None
    assert room.apply(ALICE, update((10, 5, '{"x":1}'))) is None
    assert entries(room.snapshot()) == [(10, 5, CURSOR)]


def test_a_renewal_with_the_same_state_is_relayed_so_the_others_keep_it_alive() -> None:
    room = RoomAwareness()
    room.apply(ALICE, update((10, 1, CURSOR)))
    assert entries(room.apply(ALICE, update((10, 2, CURSOR)))) == [(10, 2, CURSOR)]


def test_a_fresh_clients_clock_zero_state_is_not_shown_as_y_protocols_does() -> None:
    room = RoomAwareness()
    assert room.apply(ALICE, update((10, 0, "{}"))) is None
    assert room.owner(10) is None
    assert entries(room.apply(ALICE, update((10, 1, "{}")))) == [(10, 1, "{}")]


def test_null_at_the_same_clock_removes_a_live_state() -> None:
    room = RoomAwareness()
    room.apply(ALICE, update((10, 3, CURSOR)))
    assert entries(room.apply(ALICE, update((10, 3, "null")))) == [(10, 3, "null")]
    assert room.snapshot() is None
    assert len(room) == 0
    # once removed, the same null again changes nothing
    assert room.apply(ALICE, update((10, 3, "null"))) is None


def test_a_removed_client_comes_back_with_a_newer_clock() -> None:
    room = RoomAwareness()
    room.apply(ALICE, update((10, 1, CURSOR)))
    room.apply(ALICE, update((10, 2, "null")))
    assert room.apply(ALICE, update((10, 2, CURSOR))) is None
    assert entries(room.apply(ALICE, update((10, 3, CURSOR)))) == [(10, 3, CURSOR)]
    assert len(room) == 1


def test_removing_a_client_nobody_has_announces_nothing() -> None:
    room = RoomAwareness()
    assert room.apply(ALICE, update((10, 7, "null"))) is None
    assert room.owner(10) is None


def test_another_connection_cannot_move_or_remove_a_clients_cursor() -> None:
    room = RoomAwareness()
    room.apply(ALICE, update((10, 1, CURSOR)))
    assert room.apply(BOB, update((10, 9, '{"cursor":{"index":0}}'))) is None
    assert room.apply(BOB, update((10, 9, "null"))) is None
    assert entries(room.snapshot()) == [(10, 1, CURSOR)]


def test_a_reconnect_of_the_same_user_takes_its_client_id_over_even_at_the_same_clock() -> None:
    room = RoomAwareness()
    room.apply(1, update((7, 3, '{"c":1}')), "alice")
    # alice's new connection (her old one not known gone yet) announces the same client again
    assert entries(room.apply(2, update((7, 3, '{"c":1}')), "alice")) == [(7, 3, '{"c":1}')]
    assert room.owner(7) == 2 and room.owned(1) == frozenset() and room.owned(2) == {7}
    assert room.remove_conn(1) is None  # the old connection goes: the cursor stays
    assert entries(room.snapshot()) == [(7, 3, '{"c":1}')]
    assert room.apply(3, update((7, 9, '{"c":2}')), "mallory") is None  # another user still cannot
    assert room.apply(2, update((7, 2, '{"c":0}')), "alice") is None  # nor an older clock


def test_only_the_accepted_entries_of_a_mixed_update_are_relayed() -> None:
    room = RoomAwareness()
    room.apply(ALICE, update((10, 5, CURSOR)))
    room.apply(BOB, update((20, 1, CURSOR)))
    relayed = room.apply(BOB, update((10, 6, "{}"), (20, 2, '{"a":1}'), (21, 1, "{}")))
    assert entries(relayed) == [(20, 2, '{"a":1}'), (21, 1, "{}")]


def test_a_client_id_repeated_in_one_update_is_relayed_once_with_its_last_entry() -> None:
    room = RoomAwareness()
    relayed = room.apply(ALICE, update((10, 1, '{"a":1}'), (10, 2, '{"a":2}'), (10, 1, '{"a":0}')))
    assert entries(relayed) == [(10, 2, '{"a":2}')]


def test_a_malformed_update_raises_and_changes_nothing() -> None:
    room = RoomAwareness()
    room.apply(ALICE, update((10, 1, CURSOR)))
    with pytest.raises(YProtocolError):
        room.apply(ALICE, update((10, 2, "{}")) + b"\x00")
    with pytest.raises(YProtocolError):
        room.apply(ALICE, update((10, 2, "{}"), (11, 1, "not json")))
    assert entries(room.snapshot()) == [(10, 1, CURSOR)]


def test_a_connection_owns_at_most_so_many_client_ids() -> None:
    room = RoomAwareness(max_clients_per_conn=2)
    relayed = room.apply(ALICE, update((1, 1, "{}"), (2, 1, "{}"), (3, 1, "{}")))
    assert [e[0] for e in entries(relayed)] == [1, 2]
    # a removed id still counts: cycling ids cannot grow the table
    room.apply(ALICE, update((1, 2, "null")))
    assert room.apply(ALICE, update((4, 1, "{}"))) is None
    # the others are not limited by alice's ids
    assert room.apply(BOB, update((5, 1, "{}"))) is not None


def test_a_state_larger_than_the_limit_is_ignored_but_its_removal_is_not() -> None:
    room = RoomAwareness(max_state_bytes=10)
    assert room.apply(ALICE, update((1, 1, '"' + "é" * 5 + '"'))) is None  # 12 bytes of UTF-8
    room.apply(ALICE, update((1, 1, '"small"')))
    assert room.apply(ALICE, update((1, 2, '"' + "x" * 20 + '"'))) is None
    assert entries(room.apply(ALICE, update((1, 2, "null")))) == [(1, 2, "null")]


def test_a_clock_that_could_not_be_bumped_on_removal_is_ignored() -> None:
    room = RoomAwareness()
    assert room.apply(ALICE, update((1, MAX_VARUINT, "{}"))) is None
    room.apply(ALICE, update((1, MAX_VARUINT - 1, "{}")))
    assert entries(room.remove_conn(ALICE)) == [(1, MAX_VARUINT, "null")]


def test_a_leaving_connections_live_states_become_null_one_clock_later() -> None:
    room = RoomAwareness()
    room.apply(ALICE, update((10, 4, CURSOR), (11, 2, "{}")))
    room.apply(ALICE, update((11, 3, "null")))
    room.apply(BOB, update((20, 1, CURSOR)))
    assert entries(room.remove_conn(ALICE)) == [(10, 5, "null")]
    assert entries(room.snapshot()) == [(20, 1, CURSOR)]
    assert room.owner(10) is None and room.owner(11) is None
    assert len(room) == 1


def test_a_leaving_connection_without_live_states_announces_nothing() -> None:
    room = RoomAwareness()
    assert room.remove_conn(ALICE) is None
    room.apply(ALICE, update((10, 1, CURSOR)))
    room.apply(ALICE, update((10, 2, "null")))
    assert room.remove_conn(ALICE) is None


def test_a_forgotten_client_id_may_be_claimed_again() -> None:
    # y-websocket reconnects with the same client id on a new connection
    room = RoomAwareness()
    room.apply(ALICE, update((10, 4, CURSOR)))
    room.remove_conn(ALICE)
    assert entries(room.apply(BOB, update((10, 6, CURSOR)))) == [(10, 6, CURSOR)]
    assert room.owner(10) == BOB


# --- random sequences against a model -------------------------------------------

CONNS = [1, 2, 3]
CLIENTS = [100, 101, 102, 200, 201, 300]
STATES = ["null", "{}", '{"c":1}', '{"c":2}']


class AwarenessMachine(RuleBasedStateMachine):
    """The model: client id -> (owner, clock, state), applying y-protocols' rule
    with ownership and the per-connection bound."""

    def __init__(self) -> None:
        super().__init__()
        self.room = RoomAwareness(max_clients_per_conn=2)
        self.model: dict[int, tuple[int, int, str]] = {}
        self.removed_conns: dict[int, set[int]] = {}  # conn -> ids it owned when it left, not reclaimed since
        self.last_clock: dict[int, int] = {}  # client id -> highest clock seen while owned

    def _accepts(self, conn: int, client: int, clock: int, state: str) -> bool:
        current = self.model.get(client)
        if current is None:
            owned = sum(1 for owner, _, _ in self.model.values() if owner == conn)
            return state != "null" and clock > 0 and owned < 2
        owner, ours, our_state = current
        if owner != conn:
            return False
        return clock > ours or (clock == ours and state == "null" and our_state != "null")

    @rule(conn=st.sampled_from(CONNS),
          batch=st.lists(st.tuples(st.sampled_from(CLIENTS), st.integers(0, 6), st.sampled_from(STATES)),
                         min_size=1, max_size=4))
    def apply(self, conn: int, batch: list[tuple[int, int, str]]) -> None:
        expected: dict[int, tuple[int, int, str]] = {}
        for client, clock, state in batch:
            if self._accepts(conn, client, clock, state):
                self.model[client] = (conn, clock, state)
                expected.pop(client, None)
                expected[client] = (client, clock, state)
                for ids in self.removed_conns.values():
                    ids.discard(client)
        relayed = self.room.apply(conn, update(*batch))
        assert (entries(relayed) if relayed else []) == list(expected.values())

    @rule(conn=st.sampled_from(CONNS))
    def remove(self, conn: int) -> None:
        owned = sorted(c for c, (owner, _, _) in self.model.items() if owner == conn)
        expected = [(c, self.model[c][1] + 1, "null") for c in owned if self.model[c][2] != "null"]
        relayed = self.room.remove_conn(conn)
        assert (entries(relayed) if relayed else []) == expected
        for c in owned:
            del self.model[c]
            self.last_clock.pop(c, None)
        self.removed_conns[conn] = set(owned)

    @invariant()
    def snapshot_matches_the_model_and_holds_no_departed_connections_ids(self) -> None:
        snapshot = self.room.snapshot()
        got = sorted(entries(snapshot)) if snapshot else []
        live = sorted((c, clock, state) for c, (_, clock, state) in self.model.items() if state != "null")
        assert got == live
        departed = set().union(*self.removed_conns.values()) if self.removed_conns else set()
        assert not departed & {c for c, _, _ in got}
        assert len(self.room) == len(live)

    @invariant()
    def clocks_never_go_back_while_an_id_is_owned(self) -> None:
        for client, (owner, clock, _) in self.model.items():
            assert clock >= self.last_clock.get(client, 0)
            self.last_clock[client] = clock
            assert self.room.owner(client) == owner


TestAwarenessMachine = AwarenessMachine.TestCase
TestAwarenessMachine.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


def test_the_machine_and_its_codec_load_no_io_library() -> None:
    # STYLE.md, habit 1; tests/unit/test_purity.py checks the other machines
    code = ("import sys, rounds.shard.documents.awareness, rounds.protocol.yjs\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'asyncio', 'ray', 'redis', 'aio_pika', 'asyncpg', 'websockets', 'uvloop'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "[]"
