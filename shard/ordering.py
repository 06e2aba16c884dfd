"""Per-room ordering while a room's document is loaded (issue 4).

The first command of a room that needs its document starts the load; until
the document is in memory, that command and every later one of the same room
wait here in arrival order, whether they need the document or not, so a
leave never overtakes its join, nor an awareness update the join it follows.
A disconnect concerns every room of its connection: it runs at once for the
rooms that are in memory and waits, too, behind what each loading room
holds. Pure: the shard service starts the loads and runs what is released.
"""

from __future__ import annotations

import enum
from typing import Any

from rounds.ids import ResourceId


class Admit(enum.Enum):
    RUN = "run"  # run the command now
    HELD = "held"  # it waits behind the room's load
    LOAD = "load"  # it waits, and the room's document must be loaded now


class RoomGate:
    def __init__(self) -> None:
        self._waiting: dict[ResourceId, list[Any]] = {}

    def admit(self, room: ResourceId, msg: Any, needs_document: bool, loaded: bool) -> Admit:
        waiting = self._waiting.get(room)
        if waiting is not None:
            waiting.append(msg)
            return Admit.HELD
        if not needs_document or loaded:
            return Admit.RUN
        self._waiting[room] = [msg]
        return Admit.LOAD

    def hold_everywhere(self, msg: Any) -> None:
        """`msg` (a disconnect) also runs after what every loading room holds."""
        for waiting in self._waiting.values():
            waiting.append(msg)

    def release(self, room: ResourceId) -> list[Any]:
        """The room's load ended: what waited, in arrival order."""
        return self._waiting.pop(room, [])

    def loading(self, room: ResourceId) -> bool:
        return room in self._waiting

    def rooms(self) -> set[ResourceId]:
        return set(self._waiting)
