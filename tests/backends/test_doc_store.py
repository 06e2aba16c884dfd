"""Every `DocStore` passes this one suite: memory, file (with and without
fsync) and Redis (real, test db).

A document is a snapshot plus a log; loading gives both back in order,
`compact` replaces the snapshot and drops exactly the log entries it covers,
and a crash between writes (modelled by replaying an untrimmed log) loses
and doubles nothing once the shard rebuilds the document.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from rounds.ids import ResourceId
from rounds.redisconn import connect_binary
from rounds.shard.documents.machine import Documents
from rounds.shard.documents.store import DocStore, FileDocStore, MemoryDocStore
from rounds.shard.documents.store_redis import RedisDocStore, doc_key, doc_log_key


@pytest.fixture(params=["memory", "file", "file-fsync", "redis"])
async def store(request: pytest.FixtureRequest, redis_url: str, tmp_path: Path) -> AsyncIterator[DocStore]:
    backend: DocStore
    if request.param == "memory":
        backend = MemoryDocStore()
    elif request.param.startswith("file"):
        backend = FileDocStore(tmp_path / "docs", fsync=request.param == "file-fsync")
    else:
        backend = RedisDocStore(connect_binary(redis_url))
    yield backend
    await backend.aclose()  # the file store's open logs, the Redis connection


@pytest.fixture
def room() -> ResourceId:
    return ResourceId(f"document:{uuid.uuid4().hex[:10]}")


async def test_a_document_never_stored_loads_empty(store: DocStore, room: ResourceId) -> None:
    stored = await store.load(room)
    assert (stored.snapshot, stored.revision, stored.log) == (None, 0, [])


async def test_appends_come_back_in_order_and_compaction_drops_what_it_covers(store: DocStore,
                                                                              room: ResourceId) -> None:
    await store.append({room: [(1, b"\x01a"), (2, b"\x02b")]})
    await store.append({room: [(3, b"\x03c")]})
    assert (await store.load(room)).log == [(1, b"\x01a"), (2, b"\x02b"), (3, b"\x03c")]
    await store.compact(room, b"STATE@2", 2, covered=2)
    await store.append({room: [(4, b"\x04d")]})
    stored = await store.load(room)
    assert (stored.snapshot, stored.revision, stored.log) == (b"STATE@2", 2, [(3, b"\x03c"), (4, b"\x04d")])


async def test_one_append_writes_the_logs_of_several_documents(store: DocStore, room: ResourceId) -> None:
    other = ResourceId(room + "-b")
    await store.append({room: [(1, b"a1"), (2, b"a2")], other: [(1, b"b1")]})
    assert (await store.load(room)).log == [(1, b"a1"), (2, b"a2")]
    assert (await store.load(other)).log == [(1, b"b1")]


async def test_a_document_rebuilt_from_the_store_has_every_appended_update(store: DocStore,
                                                                           room: ResourceId) -> None:
    from pycrdt import Doc, Text

    docs = Documents()
    docs.load(room, None, 0, [])
    author = Doc()
    text = author.get("t", type=Text)
    for i in range(5):
        before = author.get_state()
        text.insert(0, f"{i}|")
        update = author.get_update(before)
        revision = docs.apply(room, update).revision
        await store.append({room: [(revision, update)]})
        if i == 2:
            state, at = docs.encode(room)
            await store.compact(room, state, at, covered=2)  # leaves entry 3 in the log: overlap
    stored = await store.load(room)
    rebuilt = Documents()
    document = rebuilt.load(room, stored.snapshot, stored.revision, stored.log)
    replica = Doc()
    replica.apply_update(rebuilt.state(room, None)[0])
    assert str(replica.get("t", type=Text)) == "4|3|2|1|0|" and document.revision == 5


async def test_a_snapshot_of_a_document_with_no_log_is_stored(store: DocStore, room: ResourceId) -> None:
    await store.compact(room, b"STATE@3", 3, covered=0)
    stored = await store.load(room)
    assert (stored.snapshot, stored.revision, stored.log) == (b"STATE@3", 3, [])


async def test_health_reports_the_backend(store: DocStore) -> None:
    health = await store.health()
    assert health["ok"] is True and health["backend"] == store.name


async def test_redis_keys_are_the_documented_ones(redis_url: str, room: ResourceId) -> None:
    client = connect_binary(redis_url)
    store = RedisDocStore(client)
    await store.append({room: [(1, b"u1")]})
    await store.compact(room, b"S", 1, covered=1)
    await client.aclose()
    rdb = redis.Redis.from_url(redis_url)
    try:
        assert rdb.hget(doc_key(room), "state") == b"S"
        assert rdb.hget(doc_key(room), "revision") == b"1"
        assert rdb.llen(doc_log_key(room)) == 0
        assert doc_key(room) == f"doc:{{{room}}}"
    finally:
        rdb.delete(doc_key(room), doc_log_key(room))
        rdb.close()


async def test_the_file_store_ignores_a_torn_last_record_and_keeps_the_rest(tmp_path: Path) -> None:
    store = FileDocStore(tmp_path)
    room = ResourceId("document:torn")
    await store.append({room: [(1, b"one"), (2, b"two")]})
    log = next(tmp_path.rglob("log"))
    with open(log, "ab") as f:
        f.write(b"\x00\x00\x01\x00partial")  # a crash in the middle of the third write
    assert (await store.load(room)).log == [(1, b"one"), (2, b"two")]
    await store.append({room: [(3, b"three")]})  # what comes after the cut is readable
    assert (await store.load(room)).log == [(1, b"one"), (2, b"two"), (3, b"three")]
    assert next(tmp_path.rglob("room")).read_text() == room


def files_open_under(directory: Path) -> int:
    """How many descriptors of this process are open on files under `directory` (Linux)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, gone by now
            continue
        if target.startswith(f"{directory}/"):
            count += 1
    return count


async def test_the_file_store_keeps_only_the_latest_logs_open_and_closes_them_all_on_aclose(tmp_path: Path) -> None:
    class FewOpenLogs(FileDocStore):
        OPEN_LOGS = 2

    store = FewOpenLogs(tmp_path)
    rooms = [ResourceId(f"document:open-{i}") for i in range(4)]
    for room in rooms:
        await store.append({room: [(1, b"first")]})
    assert files_open_under(tmp_path) == 2  # the two written last; the older were closed
    await store.append({rooms[0]: [(2, b"second")]})  # its log was closed: opened again
    assert files_open_under(tmp_path) == 2
    await store.aclose()
    assert files_open_under(tmp_path) == 0
    assert (await store.load(rooms[0])).log == [(1, b"first"), (2, b"second")]
    assert [(await store.load(room)).log for room in rooms[1:]] == [[(1, b"first")]] * 3
