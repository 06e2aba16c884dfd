"""Per-room ordering while a room's document loads (`rounds.shard.ordering`)."""

from __future__ import annotations

from rounds.ids import ResourceId
from rounds.shard.ordering import Admit, RoomGate

A, B = ResourceId("document:a"), ResourceId("document:b")


def test_the_first_command_that_needs_the_document_starts_the_load_and_later_ones_wait_in_order() -> None:
    gate = RoomGate()
    assert gate.admit(A, "join", needs_document=True, loaded=False) is Admit.LOAD
    assert gate.admit(A, "awareness", needs_document=False, loaded=False) is Admit.HELD
    assert gate.admit(A, "leave", needs_document=False, loaded=False) is Admit.HELD
    assert gate.admit(B, "leave", needs_document=False, loaded=False) is Admit.RUN  # another room runs
    assert gate.loading(A) and gate.rooms() == {A}
    assert gate.release(A) == ["join", "awareness", "leave"]
    assert not gate.loading(A) and gate.release(A) == []


def test_a_loaded_room_or_a_command_without_a_document_runs_at_once() -> None:
    gate = RoomGate()
    assert gate.admit(A, "update", needs_document=True, loaded=True) is Admit.RUN
    assert gate.admit(A, "leave", needs_document=False, loaded=False) is Admit.RUN


def test_a_disconnect_waits_behind_every_loading_room() -> None:
    gate = RoomGate()
    gate.admit(A, "join a", needs_document=True, loaded=False)
    gate.admit(B, "join b", needs_document=True, loaded=False)
    gate.hold_everywhere("disconnect")
    assert gate.release(A) == ["join a", "disconnect"] and gate.release(B) == ["join b", "disconnect"]
