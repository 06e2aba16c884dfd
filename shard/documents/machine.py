"""Y.js documents of one shard (story BE-001.4): the in-memory part, no I/O.

Each room has at most one `pycrdt.Doc`. The shell (`doc_shell`) loads it from
the document store before the first use, feeds it updates, and writes what
`apply` accepted to the store's log before it acknowledges. This module only
decides: is an update acceptable, what revision does it get, what does a
joiner with a given state vector lack.

Rules:
- An update must decode as a Y.js v1 update; otherwise `DocumentError
  BAD_UPDATE` and the document is unchanged (yrs decodes the whole update
  before integrating any of it).
- An update larger than `max_update_bytes`, or one that would take the
  document past `max_document_bytes`, is refused with `TOO_LARGE`. The size
  is an upper bound kept cheaply: the last snapshot's size plus every update
  applied since; a snapshot (`encode`) re-measures it.
- Every applied update gets the next `revision` (1, 2, ...): the number a
  sender's `UPDATE_ACK` names and the others' `RESOURCE_UPDATE` carries.
  Revisions survive restarts through the store.
"""

from __future__ import annotations

from dataclasses import dataclass

from pycrdt import Doc

from rounds.ids import ResourceId
from rounds.protocol.ws import ErrorCode


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
    last_used_ms: int = 0


@dataclass(frozen=True, slots=True)
class Applied:
    revision: int
    size: int


class Documents:
    def __init__(self, max_update_bytes: int = 262_144, max_document_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_update_bytes = max_update_bytes
        self.max_document_bytes = max_document_bytes
        self._docs: dict[ResourceId, Document] = {}

    def __contains__(self, room: object) -> bool:
        return room in self._docs

    def __len__(self) -> int:
        return len(self._docs)

    def rooms(self) -> list[ResourceId]:
        return list(self._docs)

    def get(self, room: ResourceId) -> Document | None:
        return self._docs.get(room)

    # --- loading and unloading --------------------------------------------------------

    def load(self, room: ResourceId, snapshot: bytes | None, revision: int, log: list[tuple[int, bytes]],
             now_ms: int) -> Document:
        """Rebuild a document from its store: the snapshot, then the log.

        Log entries the snapshot already holds are applied again harmlessly
        (Y.js updates are idempotent), so a crash between writing a snapshot
        and trimming the log loses nothing and doubles nothing."""
        doc = Doc()
        size = 0
        if snapshot:
            doc.apply_update(snapshot)
            size = len(snapshot)
        for entry_revision, update in log:
            doc.apply_update(update)
            size += len(update)
            revision = max(revision, entry_revision)
        document = Document(doc, revision, size, now_ms)
        self._docs[room] = document
        return document

    def unload(self, room: ResourceId) -> None:
        self._docs.pop(room, None)

    def idle(self, now_ms: int, idle_ms: int) -> list[ResourceId]:
        """Rooms whose document has not been used for `idle_ms`."""
        cutoff = now_ms - idle_ms
        return [room for room, d in self._docs.items() if d.last_used_ms <= cutoff]

    # --- the client's operations ------------------------------------------------------

    def apply(self, room: ResourceId, update: bytes, now_ms: int) -> Applied:
        document = self._docs[room]
        if len(update) > self.max_update_bytes:
            raise DocumentError(ErrorCode.TOO_LARGE, f"update of {len(update)} bytes exceeds {self.max_update_bytes}")
        if document.size + len(update) > self.max_document_bytes:
            raise DocumentError(ErrorCode.TOO_LARGE,
                                f"the document would exceed {self.max_document_bytes} bytes; it is read-only now")
        try:
            document.doc.apply_update(update)
        except ValueError as exc:  # pycrdt: "Cannot decode update: ..."
            raise DocumentError(ErrorCode.BAD_UPDATE, f"not a Y.js update: {exc}") from None
        document.revision += 1
        document.size += len(update)
        document.last_used_ms = now_ms
        return Applied(document.revision, document.size)

    def state(self, room: ResourceId, state_vector: bytes | None, now_ms: int) -> tuple[bytes, bytes, int]:
        """What a joiner lacks given its state vector (everything without one),
        the document's own state vector, and its revision."""
        document = self._docs[room]
        document.last_used_ms = now_ms
        try:
            missing = document.doc.get_update(state_vector) if state_vector else document.doc.get_update()
        except ValueError as exc:
            raise DocumentError(ErrorCode.BAD_REQUEST, f"'stateVector' is not a Y.js state vector: {exc}") from None
        return missing, document.doc.get_state(), document.revision

    def touch(self, room: ResourceId, now_ms: int) -> None:
        document = self._docs.get(room)
        if document is not None:
            document.last_used_ms = now_ms

    def encode(self, room: ResourceId) -> tuple[bytes, int]:
        """The whole state as one update, and its revision (for a snapshot).
        Re-measures the document's size."""
        document = self._docs[room]
        state = document.doc.get_update()
        document.size = len(state)
        return state, document.revision
