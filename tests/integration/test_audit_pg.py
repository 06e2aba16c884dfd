"""The audit trail in PostgreSQL (issue 5): migrations, loading the NDJSON
day files idempotently, search by each index, retention by month partition.
Real PostgreSQL (database `test`); each test works in a schema of its own,
dropped afterwards, so no other table is touched.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from rounds.audit.events import AuditEvent
from rounds.audit.files import FileAuditSink, compress_closed_days
from rounds.audit.pg import (
    AuditQuery,
    connect,
    drop_partitions_before,
    ensure_partitions,
    insert_rows,
    load_dir,
    migrate,
    month_start,
    next_month,
    partition_name,
    partitions,
    schema_version,
    search_db,
    search_files,
    search_sql,
    verify_db,
)
from rounds.audit.rows import AuditRow, CorruptLine, read_file
from rounds.audit.tail import AuditTail, follow
from tests.conftest import POSTGRES_DSN


def event(n: int, time: datetime, user: str = "dr-a", resource: str = "patient:1/vitals",
          event_type: str = "LOCK_ACQUIRED", **extra: object) -> dict[str, object]:
    return {"eventId": f"{n:032x}", "time": time.isoformat(timespec="microseconds")[:-6] + "Z",
            "eventType": event_type, "userId": user, "sessionId": f"s-{user}", "resourceId": resource,
            "source": "shard-0", "outcome": "ok", "details": {"n": n}, "writer": "shard-0", "seq": n,
            "prevHash": None, "hash": f"h{n}", **extra}


def write_day(directory: Path, day: str, lines: list[str], gz: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"audit-{day}.ndjson{'.gz' if gz else ''}"
    data = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


async def count(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM audit_events"))


# -- migrations --------------------------------------------------------------


async def test_migrate_creates_the_partitioned_table_and_is_idempotent(schema: str) -> None:
    conn = await connect(POSTGRES_DSN, schema)
    try:
        assert await schema_version(conn) == 0
        assert await migrate(conn) == [1, 2, 3, 4, 5, 6]
        assert await migrate(conn) == []
        assert await schema_version(conn) == 6
        kind = await conn.fetchval("SELECT relkind FROM pg_class WHERE oid = 'audit_events'::regclass")
        assert kind == b"p" or kind == "p"
        indexes = {r["indexname"] for r in await conn.fetch(
            "SELECT indexname FROM pg_indexes WHERE schemaname = $1 AND tablename = 'audit_events'", schema)}
        assert {"audit_events_user_time", "audit_events_resource_time", "audit_events_type_time",
                "audit_events_time"} <= indexes
    finally:
        await conn.close()


async def test_two_migrations_at_once_apply_each_step_once(schema: str) -> None:
    a, b = await connect(POSTGRES_DSN, schema), await connect(POSTGRES_DSN, schema)
    try:
        results = await asyncio.gather(migrate(a), migrate(b))
        assert sorted(results) == [[], [1, 2, 3, 4, 5, 6]]
        assert await a.fetchval("SELECT count(*) FROM rounds_schema_migrations") == 6
    finally:
        await a.close()
        await b.close()


async def test_partitions_are_made_per_month_on_demand_and_get_the_indexes(db: asyncpg.Connection,
                                                                          schema: str) -> None:
    t = datetime(2026, 11, 30, 23, 59, 59, 999999, tzinfo=UTC)
    rows = [AuditRow(f"{i:032x}", t + timedelta(microseconds=i), "X", "u", None, None, "shard-0", "ok", {})
            for i in range(2)]  # the second is 2026-12-01 00:00:00 exactly
    assert await insert_rows(db, rows) == 2
    assert [name for name, _ in await partitions(db)] == ["audit_events_y2026m11", "audit_events_y2026m12"]
    assert await ensure_partitions(db, [month_start(t)]) == []
    user_index = await db.fetchval(
        "SELECT count(*) FROM pg_indexes WHERE schemaname = $1 AND tablename = 'audit_events_y2026m12' "
        "AND indexdef LIKE '%(user_id, \"time\")%'", schema)
    assert user_index == 1


async def test_the_gateway_role_can_insert_and_read_but_not_update_or_delete(db: asyncpg.Connection) -> None:
    t = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
    await insert_rows(db, [AuditRow("a" * 32, t, "X", "u", None, None, "shard-0", "ok", {})])
    async with db.transaction():
        await db.execute("SET LOCAL ROLE rounds_gateway")
        await db.execute("INSERT INTO audit_events (event_id, time, event_type, source, outcome) "
                         "VALUES ($1, $2, 'X', 'shard-0', 'ok')", "b" * 32, t)
        assert await count(db) == 2
        for statement in ("UPDATE audit_events SET outcome = 'denied'", "DELETE FROM audit_events",
                          "UPDATE audit_events_y2026m11 SET outcome = 'denied'",
                          "DELETE FROM audit_events_y2026m11", "TRUNCATE audit_events"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with db.transaction():
                    await db.execute(statement)
    assert await count(db) == 2


async def test_the_gateway_role_makes_the_partition_of_a_new_month_and_can_still_not_change_or_drop_rows(
        db: asyncpg.Connection) -> None:
    t = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)
    async with db.transaction():
        await db.execute("SET LOCAL ROLE rounds_gateway")
        assert await partitions(db) == []
        assert await insert_rows(db, [AuditRow("c" * 32, t, "X", "u", None, None, "shard-0", "ok", {})]) == 1
        assert [name for name, _ in await partitions(db)] == ["audit_events_y2026m12"]
        for statement in ("UPDATE audit_events SET outcome = 'denied'", "DELETE FROM audit_events",
                          "UPDATE audit_events_y2026m12 SET outcome = 'denied'",
                          "DELETE FROM audit_events_y2026m12", "TRUNCATE audit_events_y2026m12",
                          "DROP TABLE audit_events_y2026m12",
                          "ALTER TABLE audit_events DETACH PARTITION audit_events_y2026m12",
                          "CREATE TABLE audit_events_y2027m01 PARTITION OF audit_events "
                          "FOR VALUES FROM ('2027-01-01 00:00:00+00') TO ('2027-02-01 00:00:00+00')"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with db.transaction():
                    await db.execute(statement)
    assert await count(db) == 1
    owner = await db.fetchval("SELECT tableowner FROM pg_tables WHERE tablename = 'audit_events_y2026m12' "
                              "AND schemaname = current_schema()")
    assert owner == await db.fetchval("SELECT current_user")  # the migrating role's, not rounds_gateway's


async def test_the_partition_function_refuses_a_day_that_is_not_a_month_or_out_of_range(
        db: asyncpg.Connection) -> None:
    async with db.transaction():
        # "A year ahead" is by the database's clock, and now() is the same all through one transaction.
        this_month = month_start(await db.fetchval("SELECT now()"))
        next_year = this_month.replace(year=this_month.year + 1)  # the last month it makes
        await db.execute("SET LOCAL ROLE rounds_gateway")
        for day in (date(2026, 12, 2), date(1999, 12, 1), next_month(next_year), None):
            with pytest.raises(asyncpg.InvalidParameterValueError, match="first day of a month"):
                async with db.transaction():
                    await db.execute("SELECT audit_ensure_month($1)", day)
        assert await db.fetchval("SELECT audit_ensure_month($1)", date(2000, 1, 1)) == "audit_events_y2000m01"
        assert await db.fetchval("SELECT audit_ensure_month($1)", next_year) == partition_name(next_year)
        assert await db.fetchval("SELECT audit_ensure_month($1)", date(2000, 1, 1)) is None  # there already
    assert [name for name, _ in await partitions(db)] == ["audit_events_y2000m01", partition_name(next_year)]


async def test_the_partition_function_runs_as_its_owner_bound_to_its_schema_for_rounds_gateway_only(
        db: asyncpg.Connection, schema: str) -> None:
    found = await db.fetchrow(
        "SELECT p.prosecdef, p.proconfig, p.pronamespace::regnamespace::text AS namespace, "
        "has_function_privilege('public', p.oid, 'EXECUTE') AS public_may, "
        "has_function_privilege('rounds_gateway', p.oid, 'EXECUTE') AS gateway_may "
        "FROM pg_proc p WHERE p.proname = 'audit_ensure_month' AND p.pronamespace = $1::regnamespace", schema)
    assert found is not None and found["namespace"] == schema
    assert found["prosecdef"] and found["proconfig"] == [f"search_path={schema}, pg_temp"]
    assert (found["public_may"], found["gateway_may"]) == (False, True)


async def test_two_loaders_making_the_same_month_at_once_both_succeed_and_one_names_it(
        db: asyncpg.Connection, schema: str) -> None:
    """The first one's partition is not committed yet when the second looks:
    the second's CREATE waits for it, fails as a duplicate and says none made."""
    other = await connect(POSTGRES_DSN, schema)
    try:
        month = date(2026, 12, 1)
        async with db.transaction():
            assert await ensure_partitions(db, [month]) == ["audit_events_y2026m12"]
            second = asyncio.create_task(ensure_partitions(other, [month]))
            await asyncio.sleep(0.3)
            assert not second.done()  # waiting for the first's transaction
        assert await asyncio.wait_for(second, 5) == []
        assert [name for name, _ in await partitions(other)] == ["audit_events_y2026m12"]
    finally:
        await other.close()


# -- loading -------------------------------------------------------------------


async def test_loading_twice_leaves_exactly_the_same_rows(db: asyncpg.Connection, tmp_path: Path) -> None:
    t = datetime(2026, 10, 31, 23, 0, tzinfo=UTC)
    events = [event(i, t + timedelta(minutes=i)) for i in range(150)]  # across two months
    write_day(tmp_path, "2026-10-31", [json.dumps(e) for e in events[:60]], gz=True)
    write_day(tmp_path, "2026-11-01", [json.dumps(e) for e in events[60:]])
    lines: list[str] = []

    first = await load_dir(db, tmp_path, batch=40, progress=lines.append)
    assert (first.files, first.read, first.inserted, first.already, first.corrupt) == (2, 150, 150, 0, [])
    assert any("inserted" in line for line in lines)
    before = await db.fetch("SELECT * FROM audit_events ORDER BY event_id")

    second = await load_dir(db, tmp_path, batch=40)
    assert (second.read, second.inserted, second.already) == (150, 0, 150)
    assert await db.fetch("SELECT * FROM audit_events ORDER BY event_id") == before

    row = await db.fetchrow("SELECT * FROM audit_events WHERE event_id = $1", f"{7:032x}")
    assert row["time"] == t + timedelta(minutes=7)
    assert (row["user_id"], row["writer"], row["seq"], row["hash"]) == ("dr-a", "shard-0", 7, "h7")
    assert json.loads(row["details"]) == {"n": 7}


async def test_a_day_in_both_plain_and_gzipped_form_is_loaded_once(db: asyncpg.Connection,
                                                                   tmp_path: Path) -> None:
    t = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    lines = [json.dumps(event(i, t + timedelta(seconds=i))) for i in range(10)]
    write_day(tmp_path, "2026-11-25", lines)
    write_day(tmp_path, "2026-11-25", lines, gz=True)  # rotation compressed it, the plain file not yet removed
    report = await load_dir(db, tmp_path)
    assert (report.read, report.inserted, report.already) == (20, 10, 10)
    assert await count(db) == 10


async def test_a_corrupt_line_is_reported_with_file_and_line_and_the_rest_loaded(
        db: asyncpg.Connection, tmp_path: Path) -> None:
    t = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
    good = [json.dumps(event(i, t + timedelta(seconds=i))) for i in range(6)]
    lines = [good[0], '{"eventId": "trunc', good[1], "[1, 2]", good[2],
             json.dumps({**event(99, t), "time": "yesterday"}), good[3],
             json.dumps({**event(98, t), "details": "text"}), good[4], "", good[5]]
    path = write_day(tmp_path, "2026-11-26", lines)
    report = await load_dir(db, tmp_path)
    assert (report.read, report.inserted) == (6, 6)
    assert [(c.path, c.line) for c in report.corrupt] == [(str(path), n) for n in (2, 4, 6, 8)]
    assert "time" in report.corrupt[2].problem and "details" in report.corrupt[3].problem
    assert str(report.corrupt[0]).startswith(f"{path}:2: not JSON")
    assert await count(db) == 6


async def test_older_time_formats_load_as_utc(db: asyncpg.Connection, tmp_path: Path) -> None:
    t = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
    formats = ["2026-11-26T08:00:00Z", "2026-11-26T08:00:00.123Z", "2026-11-26T09:00:00+01:00",
               "2026-11-26T08:00:00.000001+00:00", "2026-11-26T08:00:00"]
    write_day(tmp_path, "2026-11-26", [json.dumps({**event(i, t), "time": f}) for i, f in enumerate(formats)])
    report = await load_dir(db, tmp_path)
    assert (report.inserted, report.corrupt) == (5, [])
    times = [r["time"] for r in await db.fetch("SELECT time FROM audit_events ORDER BY event_id")]
    assert times == [t, t + timedelta(milliseconds=123), t, t + timedelta(microseconds=1), t]


async def test_a_load_cut_off_by_the_server_then_rerun_leaves_exactly_the_events_of_the_files(
        db: asyncpg.Connection, schema: str, tmp_path: Path) -> None:
    # The server ends the loader's connection after its first batch (as a
    # PostgreSQL restart would); the second run loads the rest, nothing twice.
    if shutil.which("psql") is None:
        pytest.skip("psql is needed to end the loader's connection from outside")
    t = datetime(2026, 11, 20, tzinfo=UTC)
    write_day(tmp_path, "2026-11-20", [json.dumps(event(i, t + timedelta(seconds=i))) for i in range(500)])
    loader = await connect(POSTGRES_DSN, schema)
    pid = loader.get_server_pid()

    def cut(line: str) -> None:
        if "inserted" in line:
            subprocess.run(["psql", POSTGRES_DSN, "-qAtc", f"SELECT pg_terminate_backend({pid})"], check=True,
                           capture_output=True, timeout=10)

    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
        await load_dir(loader, tmp_path, batch=100, progress=cut)
    assert await count(db) == 100
    loader = await connect(POSTGRES_DSN, schema)
    try:
        report = await load_dir(loader, tmp_path, batch=100)
    finally:
        await loader.close()
    assert (report.inserted, report.already) == (400, 100)
    ids = [r[0] for r in await db.fetch("SELECT event_id FROM audit_events ORDER BY event_id")]
    assert ids == [f"{i:032x}" for i in range(500)]


async def test_the_tail_loads_only_complete_new_lines_and_a_gzipped_day_once(db: asyncpg.Connection,
                                                                            tmp_path: Path) -> None:
    t = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
    lines = [json.dumps(event(i, t + timedelta(seconds=i))) + "\n" for i in range(10)]
    path = tmp_path / "audit-2026-11-26.ndjson"
    path.write_text("".join(lines[:3]) + lines[3][:20])  # a writer is mid-line
    tail = AuditTail(tmp_path, batch=2)
    first = await tail.step(db)
    assert (first.read, first.inserted) == (3, 3)
    with open(path, "a") as f:
        f.write(lines[3][20:] + lines[4] + "garbage\n" + lines[5])
    second = await tail.step(db)
    assert (second.read, second.inserted) == (3, 3)
    assert [(c.path, c.line) for c in second.corrupt] == [(str(path), 6)]
    assert (await tail.step(db)).read == 0

    with open(path, "a") as f:
        f.write("".join(lines[6:]))
    path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()  # rotation gzipped the day before the tail read its last lines
    third = await tail.step(db)
    assert (third.read, third.inserted, third.already) == (10, 4, 6)
    assert (await tail.step(db)).read == 0

    late = [json.dumps(event(i, t + timedelta(seconds=i))) + "\n" for i in range(10, 13)]
    path.write_text(late[0])  # a writer with a late clock reopens the gzipped day
    assert (await tail.step(db)).inserted == 1
    with open(path, "a") as f:
        f.write("".join(late[1:]))
    compress_closed_days(tmp_path, datetime(2026, 11, 28, tzinfo=UTC).timestamp())  # appends a member
    assert not path.exists()
    fourth = await tail.step(db)
    assert (fourth.read, fourth.inserted, fourth.already) == (3, 2, 1)
    assert (await tail.step(db)).read == 0
    assert await count(db) == 13

    replaced = tmp_path / "audit-2026-11-27.ndjson"
    replaced.write_text("".join(late))
    assert (await tail.step(db)).read == 3
    fresh = tmp_path / "fresh"
    fresh.write_text("".join(late) + json.dumps(event(13, t)) + "\n")
    fresh.replace(replaced)  # a new file under a name already followed, longer than the old one
    assert (await tail.step(db)).read == 4
    assert await count(db) == 14


async def test_follow_catches_up_when_postgres_returns(schema: str, tmp_path: Path) -> None:
    t = datetime(2026, 11, 26, 11, 0, tzinfo=UTC)
    path = tmp_path / "audit-2026-11-26.ndjson"
    path.write_text("".join(json.dumps(event(i, t + timedelta(seconds=i))) + "\n" for i in range(5)))
    dsn = f"{POSTGRES_DSN}{'&' if '?' in POSTGRES_DSN else '?'}search_path={schema}"
    stop = asyncio.Event()
    task = asyncio.create_task(follow("postgresql://postgres@127.0.0.1:1/test", tmp_path, 0.05, stop))
    await asyncio.sleep(0.3)  # PostgreSQL "down": the events stay in the file
    stop.set()
    await asyncio.wait_for(task, 5)

    stop = asyncio.Event()
    task = asyncio.create_task(follow(dsn, tmp_path, 0.05, stop))
    conn = await connect(POSTGRES_DSN, schema)
    try:
        for _ in range(100):
            await asyncio.sleep(0.05)
            if await schema_version(conn) and await count(conn) == 5:
                break
        with open(path, "a") as f:
            f.write("".join(json.dumps(event(i, t + timedelta(seconds=i))) + "\n" for i in range(5, 8)))
        for _ in range(100):
            await asyncio.sleep(0.05)
            if await count(conn) == 8:
                break
        assert await count(conn) == 8
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await conn.close()


def test_a_gzip_file_cut_short_yields_its_lines_then_a_corrupt_line(tmp_path: Path) -> None:
    t = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    data = gzip.compress("".join(json.dumps(event(i, t)) + "\n" for i in range(200)).encode())
    path = tmp_path / "audit-2026-11-26.ndjson.gz"
    path.write_bytes(data[:len(data) // 2])
    items = list(read_file(path))
    assert isinstance(items[-1], CorruptLine) and "unreadable" in items[-1].problem
    assert all(isinstance(i, AuditRow) for i in items[:-1])


# -- search ---------------------------------------------------------------------


async def synthetic(db: asyncpg.Connection, n: int = 6_000) -> datetime:
    start = datetime(2026, 9, 1, tzinfo=UTC)
    types = ["USER_CONNECTED", "LOCK_ACQUIRED", "LOCK_RELEASED", "DOCUMENT_UPDATED", "USER_DISCONNECTED"]
    rows = [AuditRow(f"{i:032x}", start + timedelta(minutes=17 * i), types[i % 5], f"user-{i % 200}",
                     f"s-{i}", f"patient:{i % 300}/notes", "shard-0", "ok", {"i": i}) for i in range(n)]
    await insert_rows(db, rows)
    await db.execute("ANALYZE audit_events")
    return start


async def test_a_user_search_uses_the_user_index(db: asyncpg.Connection) -> None:
    await synthetic(db)
    sql, args = search_sql(AuditQuery(user_id="user-7"))
    plan = "\n".join(r[0] for r in await db.fetch(f"EXPLAIN {sql}", *args))
    assert "Seq Scan" not in plan, plan
    assert "Index Scan" in plan and "user_id_time_idx" in plan, plan


async def test_resource_and_period_searches_use_their_indexes_and_only_the_months_asked(
        db: asyncpg.Connection) -> None:
    start = await synthetic(db)
    for query, index in ((AuditQuery(resource_id="patient:5/notes"), "resource_id_time_idx"),
                         (AuditQuery(since=start + timedelta(days=3), until=start + timedelta(days=4)), "time_idx")):
        sql, args = search_sql(query)
        plan = "\n".join(r[0] for r in await db.fetch(f"EXPLAIN {sql}", *args))
        assert "Seq Scan" not in plan and "Index Scan" in plan and index in plan, plan
    assert "y2026m10" not in plan and "y2026m09" in plan, plan  # the period's month only


async def test_search_by_each_index_finds_the_same_rows_as_the_files(db: asyncpg.Connection,
                                                                     tmp_path: Path) -> None:
    start = await synthetic(db, 2_000)
    rows = await search_db(db, AuditQuery(limit=10_000))
    by_day: dict[str, list[str]] = {}
    for r in rows:
        by_day.setdefault(r.time.date().isoformat(), []).append(r.to_json())
    for day, lines in by_day.items():
        write_day(tmp_path, day, lines, gz=day < "2026-10-01")
    queries = [AuditQuery(user_id="user-7"), AuditQuery(resource_id="patient:5/notes"),
               AuditQuery(event_type="LOCK_RELEASED", limit=50),
               AuditQuery(since=start + timedelta(days=3), until=start + timedelta(days=4)),
               AuditQuery(user_id="user-7", event_type="LOCK_RELEASED", since=start + timedelta(days=5))]
    for query in queries:
        found = await search_db(db, query)
        assert found, query
        assert found == search_files(tmp_path, query), query
        assert all(query.matches(r) for r in found)
        assert [r.time for r in found] == sorted(r.time for r in found)
    assert len(await search_db(db, AuditQuery(event_type="LOCK_RELEASED", limit=50))) == 50
    user_rows = await search_db(db, AuditQuery(user_id="user-7"))
    assert len(user_rows) == 10 and {r.details["i"] % 200 for r in user_rows} == {7}


# -- the chains, as stored ------------------------------------------------------------


async def test_files_of_the_sink_load_and_their_chains_verify_in_postgres_until_a_row_is_changed(
        db: asyncpg.Connection, tmp_path: Path) -> None:
    start = datetime(2026, 11, 26, 23, 59, 50, tzinfo=UTC)
    now = [start.timestamp()]
    sink = FileAuditSink(tmp_path, fsync="never", clock=lambda: now[0], housekeeping=False)
    for i in range(40):  # across midnight: two day files, chains continuing
        now[0] = start.timestamp() + i / 2
        sink.emit(AuditEvent("LOCK_ACQUIRED", source=f"shard-{i % 2}", user_id=f"dr-{i % 3}",
                             resource_id="patient:9/vitals", details={"field": "bp", "ü": [1, 0.5, None]},
                             time=datetime.fromtimestamp(now[0], UTC)))
    sink.close()
    report = await load_dir(db, tmp_path)
    assert (report.files, report.inserted, report.corrupt) == (2, 40, [])
    since, until = start - timedelta(hours=1), start + timedelta(hours=1)

    verified, unchained = await verify_db(db, since, until)
    assert verified.intact and unchained == 0
    assert sorted(c.events for c in verified.writers.values()) == [20, 20]
    part, _ = await verify_db(db, start + timedelta(seconds=5), until)  # chains anchored inside the range
    assert part.intact

    victim = await db.fetchrow("SELECT event_id, writer, seq FROM audit_events ORDER BY time OFFSET 13 LIMIT 1")
    await db.execute("UPDATE audit_events SET outcome = 'denied' WHERE event_id = $1", victim["event_id"])
    changed, _ = await verify_db(db, since, until)
    broken = changed.writers[victim["writer"]].broken
    assert not changed.intact and broken is not None and broken.seq == victim["seq"]
    assert victim["event_id"] in broken.problem and "hash" in broken.problem

    await db.execute("UPDATE audit_events SET outcome = 'ok' WHERE event_id = $1", victim["event_id"])
    await db.execute("DELETE FROM audit_events WHERE event_id = $1", victim["event_id"])
    deleted, _ = await verify_db(db, since, until)
    broken = deleted.writers[victim["writer"]].broken
    assert broken is not None and f"where {victim['seq']} was expected" in broken.problem


# -- retention ---------------------------------------------------------------------


async def test_retention_drops_whole_months_before_the_cutoff_only(db: asyncpg.Connection) -> None:
    rows = [AuditRow(f"{y:04d}{m:02d}".ljust(32, "0"), datetime(y, m, 15, tzinfo=UTC), "X", "u", None, None,
                     "shard-0", "ok", {}) for y in (2014, 2015, 2016) for m in (1, 6, 12)]
    await insert_rows(db, rows)
    dropped = await drop_partitions_before(db, datetime(2015, 6, 10, tzinfo=UTC))
    assert dropped == ["audit_events_y2014m01", "audit_events_y2014m06", "audit_events_y2014m12",
                       "audit_events_y2015m01"]
    assert [p for p, _ in await partitions(db)][0] == "audit_events_y2015m06"  # holds the cutoff: kept
    assert await count(db) == 5
    assert await drop_partitions_before(db, datetime(2015, 6, 10, tzinfo=UTC)) == []


# -- the commands ------------------------------------------------------------------


def rounds_audit(var_dir: Path, *args: str, dsn: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ROUNDS_POSTGRES_DSN"}
    env["ROUNDS_VAR_DIR"] = str(var_dir)
    if dsn:
        env["ROUNDS_POSTGRES_DSN"] = dsn
    return subprocess.run([sys.executable, "-m", "rounds.cluster.cli", "audit", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def schema_dsn(schema: str) -> str:
    return f"{POSTGRES_DSN}{'&' if '?' in POSTGRES_DSN else '?'}search_path={schema}"


async def test_the_commands_migrate_load_search_and_drop_old_months(schema: str, tmp_path: Path) -> None:
    dsn = schema_dsn(schema)
    first = rounds_audit(tmp_path, "migrate", "--dsn", dsn)
    assert first.returncode == 0, first.stderr
    assert "applied 1" in first.stdout and "applied 2" in first.stdout
    again = rounds_audit(tmp_path, "migrate", dsn=dsn)
    assert again.returncode == 0 and "nothing to do" in again.stdout

    t = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
    old = datetime(2010, 3, 4, 5, 6, tzinfo=UTC)
    lines = [json.dumps(event(i, t + timedelta(seconds=i), user=f"u{i % 3}")) for i in range(30)]
    path = write_day(tmp_path / "audit", "2026-11-26", [*lines[:10], "not json", *lines[10:]])
    write_day(tmp_path / "audit", "2010-03-04", [json.dumps(event(1000, old, user="u1"))], gz=True)
    load = rounds_audit(tmp_path, "load", "--batch", "7", dsn=dsn)
    assert load.returncode == 1, load.stderr  # a corrupt line: reported, the rest loaded
    assert "31 events read, 31 inserted, 0 already there, 1 corrupt lines" in load.stdout
    assert f"{path}:11: not JSON" in load.stdout and "inserted" in load.stderr
    reload = rounds_audit(tmp_path, "load", dsn=dsn)
    assert "31 events read, 0 inserted, 31 already there" in reload.stdout

    from_db = rounds_audit(tmp_path, "search", "--user", "u1", "--since", "2026-11-26T09:00:05Z", dsn=dsn)
    from_files = rounds_audit(tmp_path, "search", "--user", "u1", "--since", "2026-11-26T09:00:05Z")
    assert from_db.returncode == 0 and from_files.returncode == 0, from_db.stderr + from_files.stderr
    found = [json.loads(line) for line in from_db.stdout.splitlines()]
    assert [e["seq"] for e in found] == [7, 10, 13, 16, 19, 22, 25, 28]
    assert from_files.stdout == from_db.stdout
    table = rounds_audit(tmp_path, "search", "--resource", "patient:1/vitals", "--format", "table",
                         "--limit", "5", dsn=dsn)
    assert table.stdout.splitlines()[-1] == "(5 events)" and "2010-03-04T05:06:00" in table.stdout

    retention = rounds_audit(tmp_path, "retention", "--keep-days", "3653", dsn=dsn)
    assert retention.returncode == 0, retention.stderr
    assert "dropped audit_events_y2010m03" in retention.stdout
    after = rounds_audit(tmp_path, "search", "--user", "u1", dsn=dsn)
    assert len(after.stdout.splitlines()) == 10


def test_the_commands_say_so_when_postgres_is_unreachable(tmp_path: Path) -> None:
    done = rounds_audit(tmp_path, "load", dsn="postgresql://postgres@127.0.0.1:1/test")
    assert done.returncode == 2 and "rounds audit load:" in done.stderr and "Traceback" not in done.stderr


async def test_load_follow_keeps_loading_until_interrupted(schema: str, tmp_path: Path) -> None:
    t = datetime(2026, 11, 26, 13, 0, tzinfo=UTC)
    path = write_day(tmp_path / "audit", "2026-11-26", [json.dumps(event(i, t)) for i in range(3)])
    env = {k: v for k, v in os.environ.items() if k != "ROUNDS_POSTGRES_DSN"}
    proc = subprocess.Popen([sys.executable, "-m", "rounds.cluster.cli", "audit", "load", "--follow", "--interval-s",
                             "0.05", "--dir", str(tmp_path / "audit"), "--dsn", schema_dsn(schema)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    conn = await connect(POSTGRES_DSN, schema)
    try:
        with open(path, "a") as f:
            f.write(json.dumps(event(3, t)) + "\n")
        for _ in range(200):
            await asyncio.sleep(0.05)
            if await schema_version(conn) and await count(conn) == 4:
                break
        assert await count(conn) == 4
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        await conn.close()
    assert proc.returncode == 0, err
    assert "events loaded into PostgreSQL" in err
