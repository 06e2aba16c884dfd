"""The documents' asyncio shell inside a shard (issue 4).

Around the in-memory `Documents` and each room's `RoomAwareness`:

- **Loading.** A room's document is read from the `DocStore` before its first
  use. Until it is in memory, the room's commands wait in arrival order
  (`gate`); a failed load answers the waiting joins and updates with
  `UNAVAILABLE` and lets the rest through, and the next use tries again.
  Nothing is ever served from an empty document that the store might hold.
- **Updates.** Applied in memory at once and relayed to the room at once;
  appended to the store's log by the shard's one writer, which takes what
  waits in every room in one store call (one Redis round trip), each room's
  updates in order; `UPDATE_ACK` goes out only after the append returned. So an
  acknowledged update survives a crash of this process. A store that fails
  is retried with back-off while acks wait; past `MAX_UNWRITTEN` waiting
  updates a room refuses new ones with `UNAVAILABLE` instead of applying them.
- **Snapshots.** Once a room has been quiet for `doc_snapshot_delay_ms`, or
  as soon as `doc_log_max_entries` updates wait in the log, the writer
  stores the whole state as the snapshot and trims the log it covers; again
  at unload and at shutdown.
- **Unloading.** A document no member has and nobody used for
  `doc_idle_unload_ms` is snapshotted and leaves memory (with its awareness).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rounds.shard.documents.store import DocStore
from rounds.shard.documents.history import DocHistory
from rounds.clock import now_ms
from rounds.config import Settings
from rounds.audit.events import AuditEvent, AuditSink
from rounds.ids import ConnId, ResourceId, SessionId, UserId
from rounds.shard.documents.awareness import RoomAwareness
from rounds.shard.documents.machine import Documents, DocumentError
from rounds.protocol.messages import SYNC_STEP2, Awareness, DocSync, DocUpdate, Join, Reply
from rounds.shard.events import RoomBroadcast
from rounds.shard.presence.machine import Member
from rounds.protocol.ws import ErrorCode, MessageType, error_data
from rounds.protocol.yjs import YProtocolError

log = logging.getLogger(__name__)

STORE_TIMEOUT_S = 5.0
MAX_UNWRITTEN = 10_000  # updates of one room applied but not yet in the store
EMPTY_UPDATE = b"\x00\x00"  # a Y.js v1 update with no structs and no deletions


@dataclass(slots=True)
class _Pending:
    revision: int
    update: bytes
    conn: ConnId
    ref: Any
    ack: bool
    user_id: UserId
    session_id: SessionId


class DocShell:
    def __init__(self, name: str, store: DocStore, dispatch: Callable[[list[Any]], None],
                 replay: Callable[[Any], None], has_members: Callable[[ResourceId], bool],
                 settings: Settings, history: DocHistory | None = None, audit: AuditSink | None = None) -> None:
        self.name = name
        self.store = store
        self.history = history
        self.audit = audit
        self.documents = Documents(settings.max_update_bytes, settings.max_document_bytes)
        self.awareness: dict[ResourceId, RoomAwareness] = {}
        self._dispatch = dispatch
        self._replay = replay
        self._has_members = has_members
        self._snapshot_delay_s = settings.doc_snapshot_delay_ms / 1000
        self._log_max_entries = settings.doc_log_max_entries
        self._idle_ms = settings.doc_idle_unload_ms
        self._gated: dict[ResourceId, list[Any]] = {}  # rooms being loaded -> their waiting commands
        self._unwritten: dict[ResourceId, deque[_Pending]] = {}
        self._logged: dict[ResourceId, int] = {}  # log entries since the last snapshot
        self._snapshot_due: set[ResourceId] = set()
        self._snapshot_timers: dict[ResourceId, asyncio.TimerHandle] = {}
        self._last_change: dict[ResourceId, float] = {}  # loop time of the last update, for the debounce
        self._compacting: set[ResourceId] = set()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()  # set whenever the writer has nothing left to do
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.store_failures = 0
        self.refused_unwritten = 0

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name=f"{self.name}-doc-sweeper")
        if self.history is not None:
            await self.history.start()

    async def stop(self) -> None:
        """Write every unwritten update and snapshot every changed document."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for timer in self._snapshot_timers.values():
            timer.cancel()
        self._snapshot_timers.clear()
        for room in self.documents.rooms():
            if self._logged.get(room) or self._unwritten.get(room):
                self._snapshot_due.add(room)
        self._kick()
        try:
            async with asyncio.timeout(2 * STORE_TIMEOUT_S):
                while not self._settled():
                    self._idle.clear()
                    self._kick()
                    await self._idle.wait()
        except TimeoutError:
            log.error("%s: %d documents not saved at shutdown (store unreachable)", self.name,
                      len(set(self._unwritten) | self._snapshot_due))
        if self._writer is not None:
            self._writer.cancel()
        await self.store.aclose()
        if self.history is not None:
            await self.history.aclose()

    def stats(self) -> dict[str, Any]:
        return {
            "backend": self.store.name,
            "loaded": len(self.documents),
            "unwritten": sum(len(q) for q in self._unwritten.values()),
            "storeFailures": self.store_failures,
            "history": self.history.stats() if self.history is not None else None,
        }

    # --- the gate ---------------------------------------------------------------------

    def gate(self, room: ResourceId, msg: Any, needs_document: bool) -> bool:
        """Hold `msg` back while `room`'s document is being loaded (and start
        loading it if `msg` needs it). True if held: it is replayed later."""
        waiting = self._gated.get(room)
        if waiting is not None:
            waiting.append(msg)
            return True
        if not needs_document or room in self.documents:
            return False
        self._gated[room] = [msg]
        task = asyncio.create_task(self._load(room), name=f"{self.name}-load")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def hold_for_gated(self, msg: Any) -> None:
        """A command about every room of a connection (a disconnect): it must
        also run after whatever that connection has waiting."""
        for waiting in self._gated.values():
            waiting.append(msg)

    async def _load(self, room: ResourceId) -> None:
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                stored = await self.store.load(room)
            self.documents.load(room, stored.snapshot, stored.revision, stored.log, now_ms())
            self._logged[room] = len(stored.log)
            loaded = True
        except Exception:
            log.exception("%s: could not load document %s; its joins and updates get UNAVAILABLE", self.name, room)
            self.store_failures += 1
            loaded = False
        for msg in self._gated.pop(room):
            if loaded or not isinstance(msg, (Join, DocUpdate, DocSync)):
                self._replay(msg)
            elif not isinstance(msg, DocSync):  # a y-websocket client resyncs when it reconnects
                self._dispatch([Reply(msg.conn, msg.ref, MessageType.ERROR, error_data(
                    ErrorCode.UNAVAILABLE, "the document store is unavailable; retry", resourceId=room))])

    # --- the client's operations ------------------------------------------------------

    def fill_state(self, data: dict[str, Any], state_vector: bytes | None, kind: str) -> None:
        """Complete a `RESOURCE_STATE`: the document (what the joiner lacks),
        its state vector and revision, and the room's awareness."""
        room = data["resourceId"]
        try:
            missing, server_vector, revision = self.documents.state(room, state_vector, now_ms())
        except DocumentError:  # a bad state vector: send everything instead
            missing, server_vector, revision = self.documents.state(room, None, now_ms())
        data["state"] = missing if kind == "ws" else b""
        data["stateVector"] = server_vector
        data["revision"] = revision
        awareness = self.awareness.get(room)
        data["awareness"] = awareness.snapshot() if awareness is not None else None

    def update(self, msg: DocUpdate, member: Member) -> None:
        """`member`: the sender's membership of the room (its mode checked)."""
        room = msg.resource_id
        if msg.update == EMPTY_UPDATE:
            # Nothing to apply (a y-websocket client answering our sync step 1
            # when it has nothing we lack): no revision, no relay, no write.
            if msg.ack:
                document = self.documents.get(room)
                self._dispatch([Reply(msg.conn, msg.ref, MessageType.UPDATE_ACK, {
                    "resourceId": room, "revision": document.revision if document else 0})])
            return
        if len(self._unwritten.get(room, ())) >= MAX_UNWRITTEN:
            self.refused_unwritten += 1
            self._reply_error(msg, ErrorCode.UNAVAILABLE, "the document store is behind; retry later")
            return
        try:
            applied = self.documents.apply(room, msg.update, now_ms())
        except DocumentError as exc:
            log.info("%s: refused an update to %s from conn %d: %s", self.name, room, msg.conn, exc.message)
            self._audit("DOCUMENT_UPDATE_REFUSED", member.user_id, member.session_id, room, "denied",
                        {"code": exc.code.value, "bytes": len(msg.update), "conn": msg.conn})
            self._reply_error(msg, exc.code, exc.message)
            return
        self._dispatch([RoomBroadcast(room, msg.conn, MessageType.RESOURCE_UPDATE, {
            "resourceId": room, "update": msg.update, "userId": member.user_id, "revision": applied.revision})])
        self._unwritten.setdefault(room, deque()).append(
            _Pending(applied.revision, msg.update, msg.conn, msg.ref, msg.ack, member.user_id, member.session_id))
        self._kick()
        self._schedule_snapshot(room)

    def sync(self, msg: DocSync) -> None:
        """A y-websocket client's sync step 1: reply with what it lacks."""
        try:
            missing, _, revision = self.documents.state(msg.resource_id, msg.state_vector, now_ms())
        except DocumentError as exc:
            log.info("%s: bad sync step 1 from conn %d: %s", self.name, msg.conn, exc.message)
            missing, _, revision = self.documents.state(msg.resource_id, None, now_ms())
        self._dispatch([Reply(msg.conn, None, SYNC_STEP2, {
            "resourceId": msg.resource_id, "update": missing, "revision": revision})])

    def relay_awareness(self, msg: Awareness) -> None:
        room = msg.resource_id
        awareness = self.awareness.setdefault(room, RoomAwareness())
        if not msg.update:  # y-websocket's query: everyone's current states
            snapshot = awareness.snapshot()
            if snapshot:
                self._dispatch([Reply(msg.conn, msg.ref, MessageType.AWARENESS_UPDATE,
                                      {"resourceId": room, "update": snapshot})])
            return
        try:
            accepted = awareness.apply(msg.conn, msg.update)
        except YProtocolError as exc:
            self._reply_error(msg, ErrorCode.BAD_REQUEST, f"not an awareness update: {exc}")
            return
        if accepted:
            # To every member, the sender too, as the stock y-websocket server
            # does: a y-websocket client alone in its room would otherwise hear
            # nothing for 30 s and reconnect.
            self._dispatch([RoomBroadcast(room, None, MessageType.AWARENESS_UPDATE,
                                          {"resourceId": room, "update": accepted})])

    def member_gone(self, conn: ConnId, room: ResourceId) -> None:
        """A connection left the room: its cursors go from everyone's screen."""
        awareness = self.awareness.get(room)
        if awareness is None:
            return
        removed = awareness.remove_conn(conn)
        if removed:
            self._dispatch([RoomBroadcast(room, conn, MessageType.AWARENESS_UPDATE,
                                          {"resourceId": room, "update": removed})])
        if not len(awareness):
            del self.awareness[room]

    def _audit(self, event_type: str, user: UserId, session: SessionId, room: ResourceId, outcome: str,
               details: dict[str, Any]) -> None:
        if self.audit is not None:
            self.audit.emit(AuditEvent(event_type, self.name, outcome, user_id=user, session_id=session,
                                       resource_id=room, details=details))

    def _reply_error(self, msg: DocUpdate | Awareness, code: ErrorCode, message: str) -> None:
        self._dispatch([Reply(msg.conn, msg.ref, MessageType.ERROR,
                              error_data(code, message, resourceId=msg.resource_id))])

    # --- the writer: log, acks, snapshots, unloads --------------------------------------

    def _kick(self) -> None:
        """Wake the shard's one writer (started on first use)."""
        self._wake.set()
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name=f"{self.name}-doc-writer")

    def _settled(self) -> bool:
        return not self._unwritten and not self._snapshot_due and not self._compacting

    def _schedule_snapshot(self, room: ResourceId) -> None:
        """Debounced: the snapshot is taken once the room has been quiet for
        `doc_snapshot_delay_ms`, or as soon as `doc_log_max_entries` updates
        wait in its log (so a room edited without pause is snapshotted every
        that many updates, not every few seconds: each snapshot encodes the
        whole document)."""
        now = asyncio.get_running_loop().time()
        self._last_change[room] = now
        if self._logged.get(room, 0) + len(self._unwritten.get(room, ())) >= self._log_max_entries:
            self._snapshot_due.add(room)
            return
        if room not in self._snapshot_timers:
            self._snapshot_timers[room] = asyncio.get_running_loop().call_at(
                now + self._snapshot_delay_s, self._snapshot_timer, room)

    def _snapshot_timer(self, room: ResourceId) -> None:
        loop = asyncio.get_running_loop()
        quiet_at = self._last_change.get(room, 0.0) + self._snapshot_delay_s
        if quiet_at > loop.time():  # changed since: wait for the quiet
            self._snapshot_timers[room] = loop.call_at(quiet_at, self._snapshot_timer, room)
            return
        self._snapshot_timers.pop(room, None)
        self._last_change.pop(room, None)
        self._snapshot_due.add(room)
        self._kick()

    async def _write(self) -> None:
        """The shard's one writer. Each round appends what waits in every room
        (one store call, one Redis round trip for all of them), then sends
        those acks in one go, then starts the snapshots that are due. A room
        being snapshotted is left out of the appends until its snapshot is
        stored, so the store sees each room's writes in order."""
        delay = 0.1
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                batches = {room: list(queue) for room, queue in self._unwritten.items()
                           if queue and room not in self._compacting}
                if batches:
                    try:
                        async with asyncio.timeout(STORE_TIMEOUT_S):
                            await self.store.append({room: [(p.revision, p.update) for p in batch]
                                                     for room, batch in batches.items()})
                    except Exception:
                        self.store_failures += 1
                        log.exception("%s: could not append %d updates of %d documents; retrying in %.1fs "
                                      "(acks wait)", self.name, sum(map(len, batches.values())), len(batches), delay)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 2.0)
                        continue
                    delay = 0.1
                    self._stored(batches)
                for room in [r for r in self._snapshot_due if r not in self._compacting]:
                    if room in self.documents:
                        self._compacting.add(room)
                        task = asyncio.create_task(self._compact(room), name=f"{self.name}-doc-snapshot")
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                    else:
                        self._snapshot_due.discard(room)
                if not batches:
                    break
            if self._settled():
                self._idle.set()

    def _stored(self, batches: dict[ResourceId, list[_Pending]]) -> None:
        """These updates are in the store: count them, log their history, ack."""
        acks: list[Reply] = []
        for room, batch in batches.items():
            queue = self._unwritten[room]
            for _ in batch:
                queue.popleft()
            if not queue:
                del self._unwritten[room]
            self._logged[room] = self._logged.get(room, 0) + len(batch)
            if self.history is not None:
                self.history.submit(room, [(p.revision, p.update, p.user_id) for p in batch])
            for p in batch:  # who changed which document to which revision; never the content
                self._audit("DOCUMENT_UPDATED", p.user_id, p.session_id, room, "ok",
                            {"revision": p.revision, "bytes": len(p.update), "conn": p.conn})
            acks.extend(Reply(p.conn, p.ref, MessageType.UPDATE_ACK, {"resourceId": room, "revision": p.revision})
                        for p in batch if p.ack)
        if acks:
            self._dispatch(acks)

    async def _compact(self, room: ResourceId) -> None:
        try:
            saved = await self._snapshot(room)
        finally:
            self._compacting.discard(room)
        if not saved:
            await asyncio.sleep(1.0)  # still due: the writer tries again
        self._kick()

    async def _snapshot(self, room: ResourceId) -> bool:
        state, revision = self.documents.encode(room)
        covered = self._logged.get(room, 0)
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                await self.store.compact(room, state, revision, covered)
        except Exception:
            self.store_failures += 1
            log.exception("%s: could not snapshot %s (revision %d); retrying", self.name, room, revision)
            return False
        self._logged[room] = self._logged.get(room, 0) - covered
        self._snapshot_due.discard(room)
        return True

    async def _sweep(self) -> None:
        period = max(0.05, min(self._idle_ms / 4000, 30.0))
        while True:
            await asyncio.sleep(period)
            for room in self.documents.idle(now_ms(), self._idle_ms):
                if (self._has_members(room) or room in self._gated or room in self._compacting
                        or room in self._snapshot_due):
                    continue
                if self._logged.get(room) or self._unwritten.get(room):
                    self._snapshot_due.add(room)
                    self._kick()  # unloaded on a later sweep, once saved
                    continue
                self.documents.unload(room)
                self._logged.pop(room, None)
                self.awareness.pop(room, None)
                self._last_change.pop(room, None)
                timer = self._snapshot_timers.pop(room, None)
                if timer is not None:
                    timer.cancel()

