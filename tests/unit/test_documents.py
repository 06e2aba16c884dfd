"""The in-memory document machine (issue 4): validation, revisions, state
vectors, size limits, reload from snapshot + log; and the property that
replicas editing concurrently through the shard converge."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from rounds.ids import ResourceId
from rounds.shard.documents.machine import Documents, DocumentError
from rounds.protocol.ws import ErrorCode

ROOM = ResourceId("document:999")


def loaded(**limits: int) -> Documents:
    docs = Documents(**limits)
    docs.load(ROOM, None, 0, [], now_ms=0)
    return docs


def edit(doc: Doc, fn) -> bytes:  # type: ignore[no-untyped-def]
    """Run `fn` on `doc` and return the update it produced."""
    before = doc.get_state()
    fn(doc)
    return doc.get_update(before)


def text_of(update: bytes, name: str = "t") -> str:
    doc = Doc()
    doc.apply_update(update)
    return str(doc.get(name, type=Text))


def test_updates_get_increasing_revisions_and_change_the_document() -> None:
    docs = loaded()
    client = Doc()
    first = edit(client, lambda d: d.get("t", type=Text).insert(0, "BP 120/80"))
    second = edit(client, lambda d: d.get("t", type=Text).insert(0, "Vitals: "))
    assert docs.apply(ROOM, first, 1).revision == 1
    assert docs.apply(ROOM, second, 2).revision == 2
    state, vector, revision = docs.state(ROOM, None, 3)
    assert text_of(state) == "Vitals: BP 120/80"
    assert revision == 2 and vector == client.get_state()


@pytest.mark.parametrize("garbage", [b"", b"\x00", b"\xff" * 32, b"\x01\x01\x05\x00\x04", "ä".encode() * 9])
def test_an_update_that_does_not_decode_is_refused_and_changes_nothing(garbage: bytes) -> None:
    docs = loaded()
    client = Doc()
    docs.apply(ROOM, edit(client, lambda d: d.get("t", type=Text).insert(0, "kept")), 1)
    before = docs.state(ROOM, None, 2)
    with pytest.raises(DocumentError) as refused:
        docs.apply(ROOM, garbage, 3)
    assert refused.value.code == ErrorCode.BAD_UPDATE
    assert docs.state(ROOM, None, 4) == before


def test_a_joiner_with_a_state_vector_gets_only_what_it_lacks() -> None:
    docs = loaded()
    author = Doc()
    docs.apply(ROOM, edit(author, lambda d: d.get("t", type=Text).insert(0, "x" * 5000)), 1)
    late = Doc()
    late.apply_update(docs.state(ROOM, None, 2)[0])
    docs.apply(ROOM, edit(author, lambda d: d.get("t", type=Text).insert(0, "new ")), 3)
    missing, _, revision = docs.state(ROOM, late.get_state(), 4)
    assert len(missing) < 100 < len(docs.state(ROOM, None, 5)[0])
    late.apply_update(missing)
    assert str(late.get("t", type=Text)) == "new " + "x" * 5000 and revision == 2


def test_a_bad_state_vector_is_a_client_error() -> None:
    docs = loaded()
    with pytest.raises(DocumentError) as refused:
        docs.state(ROOM, b"\xff\xff", 1)
    assert refused.value.code == ErrorCode.BAD_REQUEST


def test_size_limits_refuse_an_oversized_update_and_a_document_that_would_outgrow_its_bound() -> None:
    docs = loaded(max_update_bytes=1000, max_document_bytes=3000)
    client = Doc()
    with pytest.raises(DocumentError) as too_big:
        docs.apply(ROOM, edit(client, lambda d: d.get("t", type=Text).insert(0, "a" * 2000)), 1)
    assert too_big.value.code == ErrorCode.TOO_LARGE
    other = Doc()
    for i in range(3):
        docs.apply(ROOM, edit(other, lambda d: d.get("t", type=Text).insert(0, "b" * 800)), 2 + i)
    with pytest.raises(DocumentError) as full:
        docs.apply(ROOM, edit(other, lambda d: d.get("t", type=Text).insert(0, "c" * 800)), 9)
    assert full.value.code == ErrorCode.TOO_LARGE
    assert docs.get(ROOM).revision == 3  # type: ignore[union-attr]


def test_reload_from_snapshot_and_log_restores_content_and_revision_even_with_overlap() -> None:
    docs = loaded()
    client = Doc()
    updates = [edit(client, lambda d, i=i: d.get("t", type=Text).insert(0, f"{i};")) for i in range(6)]
    for i, update in enumerate(updates):
        docs.apply(ROOM, update, i)
    snapshot, revision = docs.encode(ROOM)
    # the log still holds entries 3..6 (a crash before it was trimmed): applied twice, harmlessly
    log = [(i + 1, u) for i, u in enumerate(updates)][2:]
    again = Documents()
    document = again.load(ROOM, snapshot, revision, log, now_ms=0)
    assert document.revision == 6
    assert text_of(again.state(ROOM, None, 1)[0]) == "5;4;3;2;1;0;"


def test_text_map_array_and_nesting_all_round_trip() -> None:
    docs = loaded()
    client = Doc()

    def build(d: Doc) -> None:
        d.get("t", type=Text).insert(0, "note")
        chart = d.get("chart", type=Map)
        chart["bp"] = "120/80"
        chart["meds"] = Array(["aspirin"])
        chart["vitals"] = Map({"hr": 72})
        d.get("list", type=Array).extend([1, "two", {"three": 3}])

    docs.apply(ROOM, edit(client, build), 1)
    replica = Doc()
    replica.apply_update(docs.state(ROOM, None, 2)[0])
    assert str(replica.get("t", type=Text)) == "note"
    assert replica.get("chart", type=Map).to_py() == {"bp": "120/80", "meds": ["aspirin"], "vitals": {"hr": 72.0}}
    assert replica.get("list", type=Array).to_py() == [1.0, "two", {"three": 3.0}]


def test_idle_lists_documents_unused_for_the_given_time() -> None:
    docs = loaded()
    docs.load(ResourceId("document:1"), None, 0, [], now_ms=500)
    assert docs.idle(1_000, 600) == [ROOM]
    docs.touch(ROOM, 900)
    assert docs.idle(1_000, 600) == []


# --- convergence through the shard ---------------------------------------------------------

ops = st.lists(st.tuples(
    st.integers(0, 2),  # which replica
    st.sampled_from(["insert", "delete", "map", "array", "deliver"]),
    st.integers(0, 50),
    st.text(alphabet="abcxyz", min_size=1, max_size=4),
), max_size=40)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_concurrent_edits_from_replicas_through_the_shard_converge(script) -> None:  # type: ignore[no-untyped-def]
    """Three replicas edit Text, Map and Array at once; each sends its updates
    to the shard, which relays them; replicas receive others' updates late
    and in batches ("deliver"). At the end everyone has the shard's content."""
    docs = loaded()
    replicas = [Doc() for _ in range(3)]
    inbox: list[list[bytes]] = [[], [], []]
    for who, op, n, s in script:
        doc = replicas[who]
        if op == "deliver":
            for update in inbox[who]:
                doc.apply_update(update)
            inbox[who].clear()
            continue

        def change(d: Doc, op: str = op, n: int = n, s: str = s) -> None:
            text = d.get("t", type=Text)
            if op == "insert":
                text.insert(min(n, len(text)), s)
            elif op == "delete" and len(text):
                i = min(n, len(text) - 1)
                del text[i:i + 1]
            elif op == "map":
                d.get("m", type=Map)[s] = n
            elif op == "array":
                d.get("a", type=Array).append(s)

        update = edit(doc, change)
        docs.apply(ROOM, update, 0)
        for other in range(3):
            if other != who:
                inbox[other].append(update)
    for who, doc in enumerate(replicas):
        for update in inbox[who]:
            doc.apply_update(update)
    shard = Doc()
    shard.apply_update(docs.state(ROOM, None, 0)[0])

    def content(d: Doc) -> tuple[str, dict, list]:  # type: ignore[type-arg]
        return str(d.get("t", type=Text)), d.get("m", type=Map).to_py(), d.get("a", type=Array).to_py()

    assert all(content(r) == content(shard) for r in replicas)
