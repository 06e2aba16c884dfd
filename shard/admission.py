"""May this update be applied? The one place a shard decides it.

A pure function of what the shard knows at that moment: the sender's
membership, the fenced lock's current token, the room's unwritten backlog,
the document's size and the limits from the settings. The shard service
asks it before every `DocUpdate`, from `/ws` and `/yjs` alike, and only an
update it lets through reaches the document (which can still refuse bytes
that do not decode: `BAD_UPDATE`). The front door refuses viewers and
strangers first; the shard never trusts one hop and decides again here.

Order of the rules, first refusal wins:
1. the sender is in the room (`NOT_JOINED`);
2. as an editor (`PERMISSION_DENIED`, seed BE-001.4: viewers read only);
3. a fenced update carries the lock's live token (`STALE_LOCK`, issue 3: a
   holder that was paused past its lock's expiry cannot write);
   an update with nothing in it (a y-websocket client answering our sync
   step 1 when it has nothing we lack) goes no further: nothing to store;
4. the room's store is keeping up (`UNAVAILABLE` past `max_unwritten`);
5. the update fits `max_update_bytes`, and the document stays within
   `max_document_bytes` (`TOO_LARGE`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rounds.config import EDITOR
from rounds.protocol.messages import DocUpdate
from rounds.protocol.ws import ErrorCode, MessageType
from rounds.shard.documents.machine import EMPTY_UPDATE
from rounds.shard.presence.machine import Member


@dataclass(frozen=True, slots=True)
class Limits:
    max_update_bytes: int
    max_document_bytes: int
    max_unwritten: int  # updates of one room applied and not yet in the store


@dataclass(frozen=True, slots=True)
class Refusal:
    """The answer to the sender (`ERROR`, or `PERMISSION_DENIED` for a
    viewer), and what the audit trail records of it."""

    code: ErrorCode
    message: str
    extra: dict[str, Any] = field(default_factory=dict)  # more fields of the answer's data
    audit: str | None = None  # "fence": a lock step refused; "document": DOCUMENT_UPDATE_REFUSED

    @property
    def type(self) -> str:
        return MessageType.PERMISSION_DENIED if self.code == ErrorCode.PERMISSION_DENIED else MessageType.ERROR


def refuse_update(msg: DocUpdate, member: Member | None, lock_token: int | None, backlog: int, doc_size: int,
                  limits: Limits) -> Refusal | None:
    """Why `msg` may not be applied, or None when it may. `lock_token`: the
    fencing token of the live lock on `msg.lock_resource_id` (None: no live
    lock); read only for a fenced update."""
    if member is None:
        return Refusal(ErrorCode.NOT_JOINED, f"not joined to {msg.resource_id}")
    if member.mode != EDITOR:
        return Refusal(ErrorCode.PERMISSION_DENIED, "viewers may not update the document", {"mode": member.mode})
    if msg.fencing_token is not None and msg.lock_resource_id is not None and lock_token != msg.fencing_token:
        return Refusal(ErrorCode.STALE_LOCK, "the lock this update is fenced with is no longer held with that token",
                       {"lockResourceId": msg.lock_resource_id, "fencingToken": msg.fencing_token,
                        "currentToken": lock_token}, audit="fence")
    if msg.update == EMPTY_UPDATE:
        return None
    if backlog >= limits.max_unwritten:
        return Refusal(ErrorCode.UNAVAILABLE, "the document store is behind; retry later")
    size = len(msg.update)
    if size > limits.max_update_bytes:
        return Refusal(ErrorCode.TOO_LARGE, f"update of {size} bytes exceeds {limits.max_update_bytes}",
                       audit="document")
    if doc_size + size > limits.max_document_bytes:
        return Refusal(ErrorCode.TOO_LARGE,
                       f"the document would exceed {limits.max_document_bytes} bytes; it is read-only now",
                       audit="document")
    return None
