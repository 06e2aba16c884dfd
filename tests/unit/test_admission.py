"""May this update be applied? `rounds.shard.admission`, every rule and its
order, without a shard."""

from __future__ import annotations

from typing import Any

import pytest

from rounds.ids import ConnId, ResourceId, SessionId, UserId
from rounds.protocol.messages import DocUpdate
from rounds.protocol.ws import ErrorCode, MessageType
from rounds.shard.admission import Limits, refuse_update
from rounds.shard.documents.machine import EMPTY_UPDATE
from rounds.shard.presence.machine import Member

ROOM = ResourceId("document:7")
FIELD = ResourceId("document:7/field:dose")
A = ConnId(11)
EDITOR = Member(A, UserId("a"), "a", SessionId("s"), "editor", 0)
VIEWER = Member(A, UserId("a"), "a", SessionId("s"), "viewer", 0)
LIMITS = Limits(max_update_bytes=100, max_document_bytes=1000, max_unwritten=5)


def update(size: int = 10, fenced: int | None = None) -> DocUpdate:
    return DocUpdate(A, "r", ROOM, b"\x01" * size, True, FIELD if fenced is not None else None, fenced)


def refusal(msg: DocUpdate | None = None, member: Member | None = EDITOR, lock: int | None = None,
            backlog: int = 0, size: int = 0) -> Any:
    return refuse_update(msg or update(), member, lock, backlog, size, LIMITS)


def test_an_editors_update_within_every_limit_goes_through() -> None:
    assert refusal() is None
    assert refusal(update(fenced=7), lock=7) is None


@pytest.mark.parametrize(("case", "code", "kind", "audit"), [
    ({"member": None}, ErrorCode.NOT_JOINED, MessageType.ERROR, None),
    ({"member": VIEWER}, ErrorCode.PERMISSION_DENIED, MessageType.PERMISSION_DENIED, None),
    ({"msg": update(fenced=7), "lock": 8}, ErrorCode.STALE_LOCK, MessageType.ERROR, "fence"),
    ({"msg": update(fenced=7), "lock": None}, ErrorCode.STALE_LOCK, MessageType.ERROR, "fence"),
    ({"backlog": 5}, ErrorCode.UNAVAILABLE, MessageType.ERROR, None),
    ({"msg": update(101)}, ErrorCode.TOO_LARGE, MessageType.ERROR, "document"),
    ({"size": 991}, ErrorCode.TOO_LARGE, MessageType.ERROR, "document"),
], ids=["stranger", "viewer", "stale-token", "lock-gone", "store-behind", "update-too-large", "document-full"])
def test_each_rule_refuses_with_its_code(case: dict[str, Any], code: ErrorCode, kind: str, audit: str | None) -> None:
    found = refusal(**case)
    assert (found.code, found.type, found.audit) == (code, kind, audit)


def test_a_stale_token_names_the_lock_the_token_and_the_current_one() -> None:
    found = refusal(update(fenced=7), lock=9)
    assert found.extra == {"lockResourceId": FIELD, "fencingToken": 7, "currentToken": 9}


def test_the_first_broken_rule_is_the_one_answered() -> None:
    # a viewer sending a stale, oversized update while the store is behind: the viewer rule wins
    assert refusal(update(500, fenced=1), VIEWER, lock=2, backlog=99).code == ErrorCode.PERMISSION_DENIED
    # an editor with a stale token while the store is behind: the fence wins
    assert refusal(update(fenced=1), lock=2, backlog=99).code == ErrorCode.STALE_LOCK


def test_an_empty_update_is_let_through_even_when_the_store_is_behind() -> None:
    empty = DocUpdate(A, None, ROOM, EMPTY_UPDATE, ack=False)
    assert refusal(empty, backlog=99, size=10_000) is None
