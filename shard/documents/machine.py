"""Y.js documents of one shard (story BE-001.4): the in-memory part, no I/O.

Each room has at most one `pycrdt.Doc`. The shell (`shell`) loads it from the
document store before the first use, feeds it updates the shard's admission
(`rounds.shard.admission`) let through, and has what `apply` accepted
written to the store's log before it acknowledges (`persistence`). This
module only keeps the documents: apply an update, say what a joiner with a
given state vector lacks, encode the whole state.

Rules:
- An update must decode as a Y.js v1 update; otherwise `DocumentError
  BAD_UPDATE` and the document is unchanged (yrs decodes the whole update
  before integrating any of it).
- Every applied update gets the next `revision` (1, 2, ...): the number a
  sender's `UPDATE_ACK` names and the others' `RESOURCE_UPDATE` carries.
  Revisions survive restarts through the store.
- `size` is an upper bound of the encoded state, kept cheaply: the last
  snapshot's size plus every update applied since; `encode` re-measures it.
- An update whose structs wait for others the document lacks (a client's
  earlier update was lost, e.g. while a link was down) is applied all the
  same: yrs holds it *pending* and integrates it once what it needs arrives.
  yrs leaves pending structs out of what it encodes, so the document keeps
  such updates (`pending`) and everything it hands out (a snapshot, what a
  joiner lacks, the whole state) carries them too: an acknowledged update
  is never dropped from the store by a snapshot, and nobody is left without
  it. `Applied.integrated` says whether the update went in whole, so the
  shell can ask a y-websocket sender for what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pycrdt import Doc, get_update, merge_updates

from rounds.ids import ResourceId
from rounds.protocol.ws import ErrorCode

MAX_PENDING = 64  # pending updates kept apart; past it they are merged into one
EMPTY_UPDATE = b"\x00\x00"  # a Y.js v1 update with no structs and no deletions


class DocumentError(Exception):
    """A client's update or state vector was refused; the document is unchanged."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True, eq=False)
class Document:
    doc: Doc
    revision: int = 0
    size: int = 0  # upper bound of the encoded state, bytes
    pending: list[bytes] = field(default_factory=list)  # updates not (yet) integrated whole

    def integrated(self, update: bytes) -> bool:
        """Whether every struct of `update` is in the document: nothing of it
        lies beyond the document's state vector (its delete set aside)."""
        return get_update(update, self.doc.get_state())[0] == 0

    def hold_back(self, update: bytes) -> None:
        """Keep `update` until it is integrated; re-check the ones kept."""
        self.pending = [p for p in self.pending if not self.integrated(p)]
        self.pending.append(update)
        if len(self.pending) > MAX_PENDING:
            self.pending = [merge_updates(*self.pending)]

    def settle(self) -> None:
        """Forget the kept updates that are integrated now."""
        if self.pending:
            self.pending = [p for p in self.pending if not self.integrated(p)]

    def with_pending(self, update: bytes) -> bytes:
        """`update` together with the kept updates, for whoever must hold them too."""
        return merge_updates(update, *self.pending) if self.pending else update


@dataclass(frozen=True, slots=True)
class Applied:
    revision: int
    integrated: bool = True  # False: part of the update waits for structs the document lacks


class Documents:
    def __init__(self) -> None:
        self._docs: dict[ResourceId, Document] = {}

    def __contains__(self, room: object) -> bool:
        return room in self._docs

    def __len__(self) -> int:
        return len(self._docs)

    def get(self, room: ResourceId) -> Document | None:
        return self._docs.get(room)

    def size(self, room: ResourceId) -> int:
        """The room's document size bound (0 when it is not in memory)."""
        document = self._docs.get(room)
        return document.size if document is not None else 0

    # --- loading and unloading --------------------------------------------------------

    def load(self, room: ResourceId, snapshot: bytes | None, revision: int, log: list[tuple[int, bytes]]) -> Document:
        """Rebuild a document from its store: the snapshot, then the log.

        Log entries the snapshot already holds are applied again harmlessly
        (Y.js updates are idempotent), so a crash between writing a snapshot
        and trimming the log loses nothing and doubles nothing. Whatever of
        them is still pending is kept as pending again."""
        document = Document(Doc(), revision)
        updates = ([snapshot] if snapshot else []) + [update for _, update in log]
        for update in updates:
            document.doc.apply_update(update)
            document.size += len(update)
        document.revision = max([revision, *(entry_revision for entry_revision, _ in log)])
        for update in updates:
            if not document.integrated(update):
                document.hold_back(update)
        self._docs[room] = document
        return document

    def unload(self, room: ResourceId) -> None:
        self._docs.pop(room, None)

    # --- the client's operations ------------------------------------------------------

    def apply(self, room: ResourceId, update: bytes) -> Applied:
        document = self._docs[room]
        try:
            document.doc.apply_update(update)
        except ValueError as exc:  # pycrdt: "Cannot decode update: ..."
            raise DocumentError(ErrorCode.BAD_UPDATE, f"not a Y.js update: {exc}") from None
        document.revision += 1
        document.size += len(update)
        integrated = document.integrated(update)
        if integrated:
            document.settle()  # it may have been what a kept update waited for
        else:
            document.hold_back(update)
        return Applied(document.revision, integrated)

    def state(self, room: ResourceId, state_vector: bytes | None) -> tuple[bytes, bytes, int]:
        """What a joiner lacks given its state vector (everything without one),
        the document's own state vector, and its revision. The kept pending
        updates go along: the joiner must hold them too."""
        document = self._docs[room]
        try:
            missing = document.doc.get_update(state_vector) if state_vector else document.doc.get_update()
        except ValueError as exc:
            raise DocumentError(ErrorCode.BAD_REQUEST, f"'stateVector' is not a Y.js state vector: {exc}") from None
        return document.with_pending(missing), document.doc.get_state(), document.revision

    def encode(self, room: ResourceId) -> tuple[bytes, int]:
        """The whole state as one update, pending updates included, and its
        revision (for a snapshot). Re-measures the document's size."""
        document = self._docs[room]
        state = document.with_pending(document.doc.get_update())
        document.size = len(state)
        return state, document.revision
