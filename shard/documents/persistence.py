"""When a shard writes its documents, as a machine without I/O (issue 4).

The documents' shell (`rounds.shard.documents.shell`) tells it what happened
(a document loaded, an update applied, an append or a snapshot stored or
failed, the time) and does what it asks: append these updates in one store
call, snapshot that room, unload this one, acknowledge those updates. Times
are `now_ms` from the shell; nothing here reads a clock.

Rules (docs/architecture.md, "Documents"):

- An applied update waits in its room's queue until the store has it; only
  then is it acknowledged, so an acknowledged update survives a crash. One
  append at a time takes what waits in every room (one store round trip),
  each room's updates in order; a failed append is tried again after a
  back-off that doubles to `MAX_RETRY_MS`, its acks waiting.
- A room whose queue holds `max_unwritten` updates is *behind*: new updates
  are refused (`backlog`, read by the shard's admission) rather than
  applied without a place in the store.
- A room is snapshotted once it has been quiet for `snapshot_delay_ms`, or
  as soon as `log_max_entries` updates are in (or on their way to) its log:
  a room edited without pause is snapshotted every that many updates, not
  every few seconds, since a snapshot encodes the whole document. While its
  snapshot is written the room's appends pause, so the store sees its
  writes in order; a failed snapshot is tried again `SNAPSHOT_RETRY_MS` later.
- A room nobody is in and nobody used for `idle_ms` is snapshotted if its
  log holds anything, then leaves memory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from rounds.ids import ConnId, ResourceId, SessionId, UserId

MAX_RETRY_MS = 2_000  # a failing store is tried at least this often
FIRST_RETRY_MS = 100
SNAPSHOT_RETRY_MS = 1_000


@dataclass(frozen=True, slots=True)
class Write:
    """An applied update on its way to the store, and who to acknowledge."""

    revision: int
    update: bytes
    conn: ConnId
    ref: Any
    ack: bool
    user_id: UserId
    session_id: SessionId


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Store the room's whole state as its snapshot and drop the first
    `covered` entries of its log (those the snapshot holds)."""

    room: ResourceId
    covered: int


@dataclass(slots=True)
class _Room:
    unwritten: deque[Write] = field(default_factory=deque)
    logged: int = 0  # entries in the store's log since its snapshot
    quiet_at: int | None = None  # when the room will have been quiet long enough for a snapshot
    due: bool = False  # a snapshot is to be written
    compacting: bool = False  # a snapshot is being written: appends wait
    retry_at: int = 0  # a failed snapshot is not tried again before this
    used_at: int = 0


class Persistence:
    def __init__(self, snapshot_delay_ms: int, log_max_entries: int, idle_ms: int, max_unwritten: int) -> None:
        self.snapshot_delay_ms = snapshot_delay_ms
        self.log_max_entries = log_max_entries
        self.idle_ms = idle_ms
        self.max_unwritten = max_unwritten
        self._rooms: dict[ResourceId, _Room] = {}
        self._retry_ms = FIRST_RETRY_MS

    # --- what happened ---------------------------------------------------------------

    def loaded(self, room: ResourceId, logged: int, now_ms: int) -> None:
        """The room's document came from the store, its log holding `logged` entries."""
        self._rooms[room] = _Room(logged=logged, used_at=now_ms)

    def used(self, room: ResourceId, now_ms: int) -> None:
        """Someone read or joined the room: it is not idle."""
        state = self._rooms.get(room)
        if state is not None:
            state.used_at = now_ms

    def applied(self, room: ResourceId, write: Write, now_ms: int) -> None:
        """An update is in memory: queue its write and schedule the snapshot."""
        state = self._rooms[room]
        state.unwritten.append(write)
        state.used_at = now_ms
        if state.logged + len(state.unwritten) >= self.log_max_entries:
            state.due, state.quiet_at = True, None
        elif not state.due:
            state.quiet_at = now_ms + self.snapshot_delay_ms

    def appended(self, batch: dict[ResourceId, list[Write]]) -> None:
        """The store has `batch` (from `take_append`): those writes leave the
        queues, in order; they may be acknowledged now."""
        self._retry_ms = FIRST_RETRY_MS
        for room, writes in batch.items():
            state = self._rooms[room]
            for _ in writes:
                state.unwritten.popleft()
            state.logged += len(writes)

    def append_failed(self) -> int:
        """The append did not go through: how long to wait before the next try (ms)."""
        delay, self._retry_ms = self._retry_ms, min(self._retry_ms * 2, MAX_RETRY_MS)
        return delay

    def snapshotted(self, snapshot: Snapshot) -> None:
        state = self._rooms[snapshot.room]
        state.logged -= snapshot.covered
        state.compacting = state.due = False

    def snapshot_failed(self, snapshot: Snapshot, now_ms: int) -> None:
        state = self._rooms[snapshot.room]
        state.compacting = False
        state.retry_at = now_ms + SNAPSHOT_RETRY_MS

    # --- the time ---------------------------------------------------------------------

    def expire(self, now_ms: int) -> None:
        """Rooms quiet long enough become due for their snapshot."""
        for state in self._rooms.values():
            if state.quiet_at is not None and state.quiet_at <= now_ms:
                state.due, state.quiet_at = True, None

    def next_deadline(self) -> int | None:
        """When `expire` or `take_snapshots` will have something new to do."""
        times = [s.quiet_at for s in self._rooms.values() if s.quiet_at is not None]
        times += [s.retry_at for s in self._rooms.values() if s.due and not s.compacting and s.retry_at]
        return min(times, default=None)

    def idle(self, now_ms: int, in_use: set[ResourceId]) -> list[ResourceId]:
        """The rooms to unload now: nobody in them (`in_use` lists those with
        members or commands waiting), unused for `idle_ms`, nothing left to
        write. One whose log holds entries is made due first, and unloaded
        on a later call, once saved."""
        gone = []
        cutoff = now_ms - self.idle_ms
        for room, state in self._rooms.items():
            if room in in_use or state.used_at > cutoff or state.due or state.compacting or state.unwritten:
                continue
            if state.logged:
                state.due, state.quiet_at = True, None
            else:
                gone.append(room)
        for room in gone:
            del self._rooms[room]
        return gone

    # --- what to do -------------------------------------------------------------------

    def take_append(self) -> dict[ResourceId, list[Write]]:
        """What to append now: every room's waiting writes, in order, except
        rooms whose snapshot is being written. Empty: nothing to append."""
        return {room: list(state.unwritten) for room, state in self._rooms.items()
                if state.unwritten and not state.compacting}

    def take_snapshots(self, now_ms: int) -> list[Snapshot]:
        """The snapshots to write now; their rooms' appends wait until each is done."""
        taken = []
        for room, state in self._rooms.items():
            if state.due and not state.compacting and state.retry_at <= now_ms:
                state.compacting = True
                taken.append(Snapshot(room, state.logged))
        return taken

    def save_all(self) -> None:
        """Shutting down: every room whose log holds anything, or that has
        writes waiting, is due for its snapshot now."""
        for state in self._rooms.values():
            if state.logged or state.unwritten:
                state.due, state.quiet_at, state.retry_at = True, None, 0

    # --- queries ------------------------------------------------------------------------

    def backlog(self, room: ResourceId) -> int:
        """Updates of the room applied and not yet in the store."""
        state = self._rooms.get(room)
        return len(state.unwritten) if state is not None else 0

    def unwritten(self) -> int:
        return sum(len(s.unwritten) for s in self._rooms.values())

    def settled(self) -> bool:
        """Nothing waits to be written and no snapshot is due or being written."""
        return not any(s.unwritten or s.due or s.compacting for s in self._rooms.values())

    def unsaved(self) -> int:
        return sum(1 for s in self._rooms.values() if s.unwritten or s.due or s.compacting)
