"""The in-memory document machine (issue 4): validation, revisions, state
vectors, reload from snapshot + log, updates that wait for what the document
lacks; and the properties that replicas editing concurrently through the
shard converge, and that nothing applied ever falls out of what the document
hands out. (Size limits are the shard's admission: tests/unit/test_admission.py.)"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from rounds.ids import ResourceId
from rounds.protocol.ws import ErrorCode
from rounds.shard.documents.machine import MAX_PENDING, DocumentError, Documents

ROOM = ResourceId("document:999")


def loaded() -> Documents:
    docs = Documents()
    docs.load(ROOM, None, 0, [])
    return docs


def edit(doc: Doc, fn) -> bytes:
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
    assert docs.apply(ROOM, first).revision == 1
    assert docs.apply(ROOM, second).revision == 2
    state, vector, revision = docs.state(ROOM, None)
    assert text_of(state) == "Vitals: BP 120/80"
    assert revision == 2 and vector == client.get_state()


@pytest.mark.parametrize("garbage", [b"", b"\x00", b"\xff" * 32, b"\x01\x01\x05\x00\x04", "ä".encode() * 9])
def test_an_update_that_does_not_decode_is_refused_and_changes_nothing(garbage: bytes) -> None:
    docs = loaded()
    client = Doc()
    docs.apply(ROOM, edit(client, lambda d: d.get("t", type=Text).insert(0, "kept")))
    before = docs.state(ROOM, None)
    with pytest.raises(DocumentError) as refused:
        docs.apply(ROOM, garbage)
    assert refused.value.code == ErrorCode.BAD_UPDATE
    assert docs.state(ROOM, None) == before


def test_a_joiner_with_a_state_vector_gets_only_what_it_lacks() -> None:
    docs = loaded()
    author = Doc()
    docs.apply(ROOM, edit(author, lambda d: d.get("t", type=Text).insert(0, "x" * 5000)))
    late = Doc()
    late.apply_update(docs.state(ROOM, None)[0])
    docs.apply(ROOM, edit(author, lambda d: d.get("t", type=Text).insert(0, "new ")))
    missing, _, revision = docs.state(ROOM, late.get_state())
    assert len(missing) < 100 < len(docs.state(ROOM, None)[0])
    late.apply_update(missing)
    assert str(late.get("t", type=Text)) == "new " + "x" * 5000 and revision == 2


def test_a_bad_state_vector_is_a_client_error() -> None:
    docs = loaded()
    with pytest.raises(DocumentError) as refused:
        docs.state(ROOM, b"\xff\xff")
    assert refused.value.code == ErrorCode.BAD_REQUEST


def test_the_documents_say_which_rooms_are_in_memory_and_how_big_each_is() -> None:
    docs = loaded()
    other = ResourceId("document:1000")
    docs.load(other, None, 0, [])
    update = edit(Doc(), lambda d: d.get("t", type=Text).insert(0, "BP 120/80"))
    docs.apply(ROOM, update)
    assert ROOM in docs and other in docs and len(docs) == 2
    assert (docs.size(ROOM), docs.size(other)) == (len(update), 0)
    docs.unload(other)
    assert len(docs) == 1 and other not in docs and docs.get(other) is None
    assert docs.size(other) == 0  # not in memory: nothing


def test_reload_from_snapshot_and_log_restores_content_and_revision_even_with_overlap() -> None:
    docs = loaded()
    client = Doc()
    updates = [edit(client, lambda d, i=i: d.get("t", type=Text).insert(0, f"{i};")) for i in range(6)]
    for update in updates:
        docs.apply(ROOM, update)
    snapshot, revision = docs.encode(ROOM)
    # the log still holds entries 3..6 (a crash before it was trimmed): applied twice, harmlessly
    log = [(i + 1, u) for i, u in enumerate(updates)][2:]
    again = Documents()
    document = again.load(ROOM, snapshot, revision, log)
    assert document.revision == 6
    assert text_of(again.state(ROOM, None)[0]) == "5;4;3;2;1;0;"


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

    docs.apply(ROOM, edit(client, build))
    replica = Doc()
    replica.apply_update(docs.state(ROOM, None)[0])
    assert str(replica.get("t", type=Text)) == "note"
    assert replica.get("chart", type=Map).to_py() == {"bp": "120/80", "meds": ["aspirin"], "vitals": {"hr": 72.0}}
    assert replica.get("list", type=Array).to_py() == [1.0, "two", {"three": 3.0}]


# --- updates that wait for what the document lacks ------------------------------------------


def three_edits() -> tuple[bytes, bytes, bytes]:
    """A base text, then two edits of one client, each depending on the one before."""
    client = Doc()
    base = edit(client, lambda d: d.get("t", type=Text).insert(0, "0"))
    first = edit(client, lambda d: d.get("t", type=Text).insert(1, "hello"))
    second = edit(client, lambda d: d.get("t", type=Text).insert(6, " world"))
    return base, first, second


def test_an_update_that_waits_for_an_earlier_one_is_kept_and_handed_out_until_it_goes_in() -> None:
    docs = loaded()
    base, first, second = three_edits()
    docs.apply(ROOM, base)
    applied = docs.apply(ROOM, second)  # `first` was lost on the way
    assert not applied.integrated and applied.revision == 2
    assert docs.get(ROOM).pending == [second]
    # a snapshot, and a joiner, hold it too, though the text does not show it yet
    snapshot, _ = docs.encode(ROOM)
    joiner = Doc()
    joiner.apply_update(docs.state(ROOM, None)[0])
    assert text_of(snapshot) == str(joiner.get("t", type=Text)) == "0"
    # once `first` arrives, everyone who held `second` has both
    assert docs.apply(ROOM, first).integrated
    assert docs.get(ROOM).pending == []
    joiner.apply_update(first)
    reloaded = Documents()
    reloaded.load(ROOM, snapshot, 2, [(3, first)])
    for view in (text_of(docs.state(ROOM, None)[0]), str(joiner.get("t", type=Text)),
                 text_of(reloaded.state(ROOM, None)[0])):
        assert view == "0hello world"


def test_a_document_reloaded_with_a_waiting_update_in_its_log_keeps_waiting_for_it() -> None:
    base, first, second = three_edits()
    docs = Documents()
    document = docs.load(ROOM, base, 1, [(2, second)])
    assert document.pending == [second] and document.revision == 2
    assert text_of(docs.encode(ROOM)[0]) == "0"
    assert docs.apply(ROOM, first).integrated and text_of(docs.encode(ROOM)[0]) == "0hello world"


def test_more_waiting_updates_than_max_pending_are_kept_merged_and_none_is_lost() -> None:
    """A client whose one early update was lost keeps editing: every later
    update waits for it. Past MAX_PENDING they are kept as one merged update,
    so the document does not check ever more of them on each apply; what it
    hands out still carries them all, and they go in once the lost one comes."""
    docs = loaded()
    client = Doc()
    base = edit(client, lambda d: d.get("t", type=Text).insert(0, "0"))
    lost = edit(client, lambda d: d.get("t", type=Text).insert(1, "a"))
    later = [edit(client, lambda d, i=i: d.get("t", type=Text).insert(2 + i, "b")) for i in range(MAX_PENDING + 1)]
    docs.apply(ROOM, base)
    for update in later:
        assert not docs.apply(ROOM, update).integrated
        assert len(docs.get(ROOM).pending) <= MAX_PENDING
    assert len(docs.get(ROOM).pending) == 1  # the last one tipped them over: merged
    joiner = Doc()
    joiner.apply_update(docs.state(ROOM, None)[0])
    snapshot, revision = docs.encode(ROOM)
    assert docs.apply(ROOM, lost).integrated and docs.get(ROOM).pending == []
    joiner.apply_update(lost)
    reloaded = Documents()
    reloaded.load(ROOM, snapshot, revision, [(revision + 1, lost)])
    whole = "0a" + "b" * (MAX_PENDING + 1)
    for view in (text_of(docs.state(ROOM, None)[0]), str(joiner.get("t", type=Text)),
                 text_of(reloaded.state(ROOM, None)[0])):
        assert view == whole


def test_a_joiner_asking_with_its_state_vector_also_gets_what_waits() -> None:
    docs = loaded()
    base, first, second = three_edits()
    docs.apply(ROOM, base)
    late = Doc()
    late.apply_update(docs.state(ROOM, None)[0])
    docs.apply(ROOM, second)
    missing, _, _ = docs.state(ROOM, late.get_state())
    late.apply_update(missing)
    late.apply_update(first)
    assert str(late.get("t", type=Text)) == "0hello world"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.booleans(), st.text(alphabet="ab", min_size=1, max_size=3)),
                min_size=1, max_size=25))
def test_whatever_was_lost_on_the_way_a_resync_brings_everyone_to_the_same_document(script) -> None:
    """Two replicas edit; each update reaches the shard or is lost (a link
    down), and what reaches it may wait for what was lost. Then each replica
    answers the shard's state vector with what the shard lacks (y-websocket's
    sync step 2) and takes what it lacks: all three end up equal, and the
    shard's snapshot holds it all."""
    docs = loaded()
    replicas = [Doc(), Doc()]
    for who, arrives, text in script:
        update = edit(replicas[who], lambda d, text=text: d.get("t", type=Text).insert(0, text))
        if arrives:
            docs.apply(ROOM, update)
            replicas[1 - who].apply_update(update)
    for replica in replicas:  # the resync
        _, vector, _ = docs.state(ROOM, None)
        docs.apply(ROOM, replica.get_update(vector))
    for replica in replicas:
        replica.apply_update(docs.state(ROOM, replica.get_state())[0])
    assert docs.get(ROOM).pending == []
    shard = text_of(docs.encode(ROOM)[0])
    assert str(replicas[0].get("t", type=Text)) == str(replicas[1].get("t", type=Text)) == shard


# --- convergence through the shard ---------------------------------------------------------

ops = st.lists(st.tuples(
    st.integers(0, 2),  # which replica
    st.sampled_from(["insert", "delete", "map", "array", "deliver"]),
    st.integers(0, 50),
    st.text(alphabet="abcxyz", min_size=1, max_size=4),
), max_size=40)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_concurrent_edits_from_replicas_through_the_shard_converge(script) -> None:
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
        docs.apply(ROOM, update)
        for other in range(3):
            if other != who:
                inbox[other].append(update)
    for who, doc in enumerate(replicas):
        for update in inbox[who]:
            doc.apply_update(update)
    shard = Doc()
    shard.apply_update(docs.state(ROOM, None)[0])

    def content(d: Doc) -> tuple[str, dict, list]:
        return str(d.get("t", type=Text)), d.get("m", type=Map).to_py(), d.get("a", type=Array).to_py()

    assert all(content(r) == content(shard) for r in replicas)
