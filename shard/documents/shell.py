"""The documents' asyncio shell inside a shard (issue 4).

Around the in-memory `Documents`, each room's `RoomAwareness`, and the
`Persistence` machine that decides when to write:

- **Loading** (`load`): a room's document is read from the `DocStore` before
  its first use; the shard service holds the room's commands meanwhile
  (`rounds.shard.ordering`). A failed load is reported and tried again on
  the next use: nothing is ever served from an empty document the store
  might hold.
- **Updates** (`apply`, once the shard's admission let them through):
  applied in memory and relayed to the room at once; appended to the
  store's log by the shard's one writer, which takes what waits in every
  room in one store call; `UPDATE_ACK` goes out only after the append
  returned, so an acknowledged update survives a crash of this process.
- **Snapshots and unloading**: when the machine says so (a quiet room, a long
  log, an idle document), again at shutdown.

The writer and the timers run what `Persistence` returns; its clock is
`now_ms`, like every machine's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from rounds.audit.events import AuditEvent, AuditSink
from rounds.clock import now_ms
from rounds.config import Settings
from rounds.ids import ConnId, ResourceId
from rounds.protocol.messages import AWARENESS_CLAIMED, SYNC_STEP1, SYNC_STEP2, Awareness, DocSync, DocUpdate, Reply
from rounds.protocol.ws import ErrorCode, MessageType, error_data
from rounds.protocol.yjs import YProtocolError
from rounds.shard.documents.awareness import RoomAwareness
from rounds.shard.documents.history import DocHistory
from rounds.shard.documents.machine import EMPTY_UPDATE, DocumentError, Documents
from rounds.shard.documents.persistence import Persistence, Snapshot, Write
from rounds.shard.documents.store import DocStore
from rounds.shard.events import RoomBroadcast
from rounds.shard.presence.machine import Member
from rounds.shard.timer import DeadlineTimer

log = logging.getLogger(__name__)

STORE_TIMEOUT_S = 5.0
MAX_UNWRITTEN = 10_000  # updates of one room applied but not yet in the store (the shard's admission refuses more)


class DocShell:
    def __init__(self, name: str, store: DocStore, dispatch: Callable[[list[Any]], None],
                 in_use: Callable[[], set[ResourceId]], settings: Settings, history: DocHistory | None = None,
                 audit: AuditSink | None = None, store_timeout_s: float = STORE_TIMEOUT_S) -> None:
        """`in_use()`: the rooms that must stay in memory (members, or commands waiting);
        `store_timeout_s`: how long one store call may take (shutdown waits twice that)."""
        self.name = name
        self.store_timeout_s = store_timeout_s
        self.store = store
        self.history = history
        self.audit = audit
        self.documents = Documents()
        self.awareness: dict[ResourceId, RoomAwareness] = {}
        self.persistence = Persistence(settings.doc_snapshot_delay_ms, settings.doc_log_max_entries,
                                       settings.doc_idle_unload_ms, MAX_UNWRITTEN)
        self._dispatch = dispatch
        self._in_use = in_use
        self._sweep_s = max(0.05, min(settings.doc_idle_unload_ms / 4000, 30.0))
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()  # set whenever the writer has nothing left to do
        self._settled.set()
        self._timer = DeadlineTimer(self._expire)
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.store_failures = 0

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name=f"{self.name}-doc-sweeper")
        if self.history is not None:
            await self.history.start()

    async def stop(self) -> None:
        """Write every unwritten update and snapshot every changed document."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._timer.cancel()
        self.persistence.save_all()
        try:
            async with asyncio.timeout(2 * self.store_timeout_s):
                while not self.persistence.settled():
                    self._settled.clear()
                    self._kick()
                    await self._settled.wait()
        except TimeoutError:
            log.error("%s: %d documents not saved at shutdown (store unreachable)", self.name,
                      self.persistence.unsaved())
        if self._writer is not None:
            self._writer.cancel()
        await self.store.aclose()
        if self.history is not None:
            await self.history.aclose()

    def stats(self) -> dict[str, Any]:
        return {
            "backend": self.store.name,
            "loaded": len(self.documents),
            "unwritten": self.persistence.unwritten(),
            "storeFailures": self.store_failures,
            "history": self.history.stats() if self.history is not None else None,
        }

    # --- loading ----------------------------------------------------------------------

    async def load(self, room: ResourceId) -> bool:
        """Bring the room's document into memory; False if the store failed."""
        try:
            async with asyncio.timeout(self.store_timeout_s):
                stored = await self.store.load(room)
        except Exception:
            log.exception("%s: could not load document %s; its joins and updates get UNAVAILABLE", self.name, room)
            self.store_failures += 1
            return False
        self.documents.load(room, stored.snapshot, stored.revision, stored.log)
        self.persistence.loaded(room, len(stored.log), now_ms())
        return True

    # --- the client's operations ------------------------------------------------------

    def state(self, room: ResourceId, state_vector: bytes | None) -> tuple[bytes, bytes, int]:
        """What a member with `state_vector` lacks (all of it without one, or
        with one that does not decode), the document's state vector, revision."""
        self.persistence.used(room, now_ms())
        try:
            return self.documents.state(room, state_vector)
        except DocumentError:
            return self.documents.state(room, None)

    def vector(self, room: ResourceId) -> tuple[bytes, int]:
        """The document's state vector and revision."""
        self.persistence.used(room, now_ms())
        document = self.documents.get(room)
        assert document is not None
        return document.doc.get_state(), document.revision

    def apply(self, msg: DocUpdate, member: Member) -> None:
        """An update the shard's admission let through (`member`: its sender's membership)."""
        room = msg.resource_id
        if msg.update == EMPTY_UPDATE:  # nothing to apply, relay or store
            if msg.ack:
                document = self.documents.get(room)
                self._dispatch([Reply(msg.conn, msg.ref, MessageType.UPDATE_ACK, {
                    "resourceId": room, "revision": document.revision if document else 0})])
            return
        try:
            applied = self.documents.apply(room, msg.update)
        except DocumentError as exc:
            log.info("%s: refused an update to %s from conn %d: %s", self.name, room, msg.conn, exc.message)
            self.audit_refused(msg, member, exc.code)
            self._reply_error(msg, exc.code, exc.message)
            return
        events: list[Any] = [RoomBroadcast(room, msg.conn, MessageType.RESOURCE_UPDATE, {
            "resourceId": room, "update": msg.update, "userId": member.user_id, "revision": applied.revision})]
        if not applied.integrated and member.kind == "yjs":
            # It waits for structs we lack, which that client has: our sync step 1
            # makes it send them (its sync step 2), and the update goes in whole.
            vector, _ = self.vector(room)
            events.append(Reply(msg.conn, None, SYNC_STEP1, {"resourceId": room, "stateVector": vector}))
        self._dispatch(events)
        self.persistence.applied(room, Write(applied.revision, msg.update, msg.conn, msg.ref, msg.ack,
                                             member.user_id, member.session_id), now_ms())
        self._kick()

    def audit_refused(self, msg: DocUpdate, member: Member, code: ErrorCode) -> None:
        """Record an update the document would not take (never its content)."""
        self._audit("DOCUMENT_UPDATE_REFUSED", member, msg.resource_id, "denied",
                    {"code": code.value, "bytes": len(msg.update), "conn": msg.conn})

    def sync(self, msg: DocSync) -> None:
        """A y-websocket client's sync step 1: reply with what it lacks."""
        missing, _, revision = self.state(msg.resource_id, msg.state_vector)
        self._dispatch([Reply(msg.conn, None, SYNC_STEP2, {
            "resourceId": msg.resource_id, "update": missing, "revision": revision})])

    def relay_awareness(self, msg: Awareness, user: str | None = None) -> None:
        """`user`: who the sender is (a reconnect of the same user keeps its client ids)."""
        room = msg.resource_id
        awareness = self.awareness.setdefault(room, RoomAwareness())
        if not msg.update:  # y-websocket's query: everyone's current states
            snapshot = awareness.snapshot()
            if snapshot:
                self._dispatch([Reply(msg.conn, msg.ref, MessageType.AWARENESS_UPDATE,
                                      {"resourceId": room, "update": snapshot})])
            return
        owned = awareness.owned(msg.conn)
        try:
            accepted = awareness.apply(msg.conn, msg.update, user)
        except YProtocolError as exc:
            self._reply_error(msg, ErrorCode.BAD_REQUEST, f"not an awareness update: {exc}")
            return
        claimed = awareness.owned(msg.conn) - owned
        if claimed:  # its front door announces these again if this shard restarts
            self._dispatch([Reply(msg.conn, None, AWARENESS_CLAIMED,
                                  {"resourceId": room, "clientIds": sorted(claimed)})])
        if accepted:
            # To every member, the sender too, as the stock y-websocket server
            # does: a y-websocket client alone in its room would otherwise hear
            # nothing for 30 s and reconnect.
            self._dispatch([RoomBroadcast(room, None, MessageType.AWARENESS_UPDATE,
                                          {"resourceId": room, "update": accepted})])

    def awareness_of(self, room: ResourceId) -> bytes | None:
        awareness = self.awareness.get(room)
        return awareness.snapshot() if awareness is not None else None

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

    def _audit(self, event_type: str, member: Member, room: ResourceId, outcome: str,
               details: dict[str, Any]) -> None:
        if self.audit is not None:
            self.audit.emit(AuditEvent(event_type, self.name, outcome, user_id=member.user_id,
                                       session_id=member.session_id, resource_id=room, details=details))

    def _reply_error(self, msg: DocUpdate | Awareness, code: ErrorCode, message: str) -> None:
        self._dispatch([Reply(msg.conn, msg.ref, MessageType.ERROR,
                              error_data(code, message, resourceId=msg.resource_id))])

    # --- the writer: appends, acks, snapshots -------------------------------------------

    def _kick(self) -> None:
        """Wake the shard's one writer (started on first use)."""
        self._wake.set()
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name=f"{self.name}-doc-writer")

    async def _write(self) -> None:
        """The shard's one writer. Each round appends what waits in every room
        (one store call, one Redis round trip for all of them), then sends
        those acks in one go, then starts the snapshots that are due."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                batch = self.persistence.take_append()
                if batch:
                    try:
                        async with asyncio.timeout(self.store_timeout_s):
                            await self.store.append({room: [(w.revision, w.update) for w in writes]
                                                     for room, writes in batch.items()})
                    except Exception:
                        self.store_failures += 1
                        delay_ms = self.persistence.append_failed()
                        log.exception("%s: could not append %d updates of %d documents; retrying in %.1fs "
                                      "(acks wait)", self.name, sum(map(len, batch.values())), len(batch),
                                      delay_ms / 1000)
                        await asyncio.sleep(delay_ms / 1000)
                        continue
                    self._stored(batch)
                for snapshot in self.persistence.take_snapshots(now_ms()):
                    self._spawn(self._snapshot(snapshot), "doc-snapshot")
                if not batch:
                    break
            self._arm()
            if self.persistence.settled():
                self._settled.set()

    def _stored(self, batch: dict[ResourceId, list[Write]]) -> None:
        """These updates are in the store: log their history, audit, ack."""
        self.persistence.appended(batch)
        acks: list[Reply] = []
        for room, writes in batch.items():
            if self.history is not None:
                self.history.submit(room, [(w.revision, w.update, w.user_id) for w in writes])
            for w in writes:
                if self.audit is not None:  # who changed which document to which revision; never the content
                    self.audit.emit(AuditEvent("DOCUMENT_UPDATED", self.name, "ok", user_id=w.user_id,
                                               session_id=w.session_id, resource_id=room,
                                               details={"revision": w.revision, "bytes": len(w.update),
                                                        "conn": w.conn}))
                if w.ack:
                    acks.append(Reply(w.conn, w.ref, MessageType.UPDATE_ACK,
                                      {"resourceId": room, "revision": w.revision}))
        if acks:
            self._dispatch(acks)

    async def _snapshot(self, snapshot: Snapshot) -> None:
        room = snapshot.room
        if room not in self.documents:  # unloaded meanwhile: nothing to save
            self.persistence.snapshotted(snapshot)
            return
        state, revision = self.documents.encode(room)
        try:
            async with asyncio.timeout(self.store_timeout_s):
                await self.store.compact(room, state, revision, snapshot.covered)
        except Exception:
            self.store_failures += 1
            log.exception("%s: could not snapshot %s (revision %d); retrying", self.name, room, revision)
            self.persistence.snapshot_failed(snapshot, now_ms())
        else:
            self.persistence.snapshotted(snapshot)
        self._kick()

    # --- the time ---------------------------------------------------------------------

    def _arm(self) -> None:
        """One timer for the machine's next deadline (a quiet room, a retry)."""
        self._timer.arm(self.persistence.next_deadline())

    def _expire(self) -> None:
        self.persistence.expire(now_ms())
        self._kick()

    async def _sweep(self) -> None:
        """Idle documents leave memory (snapshotted first when their log holds anything)."""
        while True:
            await asyncio.sleep(self._sweep_s)
            for room in self.persistence.idle(now_ms(), self._in_use()):
                self.documents.unload(room)
                self.awareness.pop(room, None)
            self._kick()

    def _spawn(self, coro: Any, what: str) -> None:
        task = asyncio.create_task(coro, name=f"{self.name}-{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

