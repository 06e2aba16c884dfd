"""The audit shipper keeps its positions in PostgreSQL (`audit_ship_positions`):
a restarted tail reads nothing already loaded, a crash between batches
leaves rows and positions in agreement, a new inode, a file made again
with the old inode (its head tells) or a gzipped day is handled as before,
and each origin sees only its own positions. Real
PostgreSQL (database `test`, a schema of its own per test, dropped after).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from rounds.audit.events import AuditEvent
from rounds.audit.files import FileAuditSink
from rounds.audit.pg import GATEWAY_ROLE, month_start, partition_name, partitions
from rounds.audit.tail import AuditTail, Shipper, ShipperStats, follow
from tests.conftest import POSTGRES_DSN

ORIGIN = "host-a:/var/rounds/audit"
DAY = "2026-11-26"
T = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)


def line(n: int) -> str:
    return json.dumps({"eventId": f"{n:032x}", "time": (T + timedelta(seconds=n)).isoformat()[:-6] + "Z",
                       "eventType": "LOCK_ACQUIRED", "userId": "dr-a", "resourceId": "patient:1/vitals",
                       "source": "shard-0", "outcome": "ok", "details": {"n": n}}) + "\n"


def append(path: Path, numbers: range, tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(line(n) for n in numbers) + tail)


def day(directory: Path, gz: bool = False) -> Path:
    return directory / f"audit-{DAY}.ndjson{'.gz' if gz else ''}"


async def positions(conn: asyncpg.Connection, origin: str = ORIGIN) -> dict[str, tuple[int, int, int]]:
    """file: (inode, byte_offset, lines) of one origin."""
    found = await conn.fetch("SELECT file, inode, byte_offset, lines FROM audit_ship_positions WHERE origin = $1",
                             origin)
    return {r["file"]: (r["inode"], r["byte_offset"], r["lines"]) for r in found}


async def heads(conn: asyncpg.Connection, origin: str = ORIGIN) -> dict[str, str | None]:
    found = await conn.fetch("SELECT file, head FROM audit_ship_positions WHERE origin = $1", origin)
    return {r["file"]: r["head"] for r in found}


def sha256(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


async def event_ids(conn: asyncpg.Connection) -> list[str]:
    return [r["event_id"] for r in await conn.fetch("SELECT event_id FROM audit_events ORDER BY event_id")]


def counts(report: object) -> tuple[int, int, int]:
    return report.read, report.inserted, report.already


async def test_a_restarted_tail_reads_nothing_already_loaded_then_only_what_was_appended(
        db: asyncpg.Connection, tmp_path: Path) -> None:
    path = day(tmp_path)
    append(path, range(7))
    first = AuditTail(tmp_path, batch=3, origin=ORIGIN)
    assert counts(await first.step(db)) == (7, 7, 0)
    assert await positions(db) == {path.name: (path.stat().st_ino, path.stat().st_size, 7)}

    restarted = AuditTail(tmp_path, batch=3, origin=ORIGIN)
    assert restarted.lag_bytes() == path.stat().st_size  # before it has read the positions back
    again = await restarted.step(db)
    assert (again.files, *counts(again)) == (0, 0, 0, 0)
    assert restarted.lag_bytes() == 0

    append(path, range(7, 11), tail=line(11)[:15])  # a writer is mid-line
    complete = path.stat().st_size - 15
    assert counts(await restarted.step(db)) == (4, 4, 0)
    assert await positions(db) == {path.name: (path.stat().st_ino, complete, 11)}
    assert await event_ids(db) == [f"{n:032x}" for n in range(11)]
    assert AuditTail(tmp_path).origin == f"{socket.gethostname()}:{tmp_path.resolve()}"


async def test_a_batch_that_fails_leaves_the_rows_and_the_position_of_the_batches_before_it(
        db: asyncpg.Connection, tmp_path: Path) -> None:
    """The table refuses one event of the second batch: the first batch and
    its position are committed, nothing of the second. A new tail (and the
    failed one) go on from there, none of their rows already there."""
    path = day(tmp_path)
    append(path, range(10))
    await db.execute(f"ALTER TABLE audit_events ADD CONSTRAINT refuse_five CHECK (event_id <> '{5:032x}')")
    failed = AuditTail(tmp_path, batch=3, origin=ORIGIN)
    with pytest.raises(asyncpg.CheckViolationError):
        await failed.step(db)
    first_batch = len("".join(line(n) for n in range(3)))
    assert await positions(db) == {path.name: (path.stat().st_ino, first_batch, 3)}
    assert await event_ids(db) == [f"{n:032x}" for n in range(3)]

    await db.execute("ALTER TABLE audit_events DROP CONSTRAINT refuse_five")
    after = await AuditTail(tmp_path, batch=3, origin=ORIGIN).step(db)
    assert counts(after) == (7, 7, 0)
    assert await event_ids(db) == [f"{n:032x}" for n in range(10)]
    assert await positions(db) == {path.name: (path.stat().st_ino, path.stat().st_size, 10)}
    assert counts(await failed.step(db)) == (0, 0, 0)  # it read the positions back after its failure


async def test_follow_whose_connection_dies_mid_load_reconnects_and_loads_each_line_once(
        db: asyncpg.Connection, schema: str, tmp_path: Path) -> None:
    """A first batch is committed; then the server ends `follow`'s
    connection inside the transaction of the next one (a trigger on the
    positions table terminates its own backend, once): `follow` reconnects,
    reads the positions back and loads the rest, none of it already there."""
    await db.execute("""
        CREATE SEQUENCE kill_once;
        CREATE FUNCTION kill_mid_batch() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.lines = 12 AND nextval('kill_once') = 1 THEN  -- a sequence is not rolled back
                PERFORM pg_terminate_backend(pg_backend_pid());
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER kill_mid_batch BEFORE INSERT OR UPDATE ON audit_ship_positions
            FOR EACH ROW EXECUTE FUNCTION kill_mid_batch();""")
    path = day(tmp_path)
    append(path, range(4))
    first = await AuditTail(tmp_path, batch=4, origin=ORIGIN).step(db)  # the first batch, committed
    assert counts(first) == (4, 4, 0)
    append(path, range(4, 12))

    stop, stats = asyncio.Event(), ShipperStats()
    task = asyncio.create_task(follow(POSTGRES_DSN, tmp_path, 0.05, stop, schema=schema, stats=stats,
                                      origin=ORIGIN))
    try:
        for _ in range(200):
            await asyncio.sleep(0.05)
            if stats.postgresUp and stats.lagBytes == 0:
                break
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert stats.lastError is not None  # the connection did die
    assert await db.fetchval("SELECT last_value FROM kill_once") >= 2
    assert (stats.rowsLoaded, stats.rowsAlready, stats.lagBytes) == (8, 0, 0)
    assert await event_ids(db) == [f"{n:032x}" for n in range(12)]
    assert await positions(db) == {path.name: (path.stat().st_ino, path.stat().st_size, 12)}


async def test_a_file_replaced_under_the_same_name_is_read_from_the_start_after_a_restart(
        db: asyncpg.Connection, tmp_path: Path) -> None:
    path = day(tmp_path)
    append(path, range(3))
    assert counts(await AuditTail(tmp_path, origin=ORIGIN).step(db)) == (3, 3, 0)
    fresh = tmp_path / "fresh"
    append(fresh, range(100, 106))  # longer than the old file: only its inode tells it is new
    old_inode = path.stat().st_ino
    fresh.replace(path)
    assert path.stat().st_ino != old_inode

    assert counts(await AuditTail(tmp_path, origin=ORIGIN).step(db)) == (6, 6, 0)
    assert await positions(db) == {path.name: (path.stat().st_ino, path.stat().st_size, 6)}


async def test_a_file_made_again_with_the_same_inode_and_size_is_told_apart_by_its_first_line(
        db: asyncpg.Connection, tmp_path: Path) -> None:
    """A plain file removed and made again can get the old inode number back
    (file systems reuse them); writing a file again in place keeps its inode
    for sure. Only its first line then tells it is not the file loaded."""
    path = day(tmp_path)
    append(path, range(10, 15))
    running = AuditTail(tmp_path, origin=ORIGIN)
    assert counts(await running.step(db)) == (5, 5, 0)
    assert await heads(db) == {path.name: sha256(line(10))}
    inode, size = path.stat().st_ino, path.stat().st_size

    path.write_text("".join(line(n) for n in range(20, 25)))  # truncated and written: the same inode
    assert (path.stat().st_ino, path.stat().st_size) == (inode, size)
    assert counts(await AuditTail(tmp_path, origin=ORIGIN).step(db)) == (5, 5, 0)  # restarted
    assert await positions(db) == {path.name: (inode, size, 5)}
    assert await heads(db) == {path.name: sha256(line(20))}

    path.write_text("".join(line(n) for n in range(30, 38)))  # longer: the running tail tells it too
    assert counts(await running.step(db)) == (8, 8, 0)
    append(path, range(38, 40))  # a file that grows keeps its head
    assert counts(await running.step(db)) == (2, 2, 0)
    assert await heads(db) == {path.name: sha256(line(30))}
    assert len(await event_ids(db)) == 20


async def test_a_first_line_longer_than_the_head_bytes_is_fingerprinted_by_its_start(
        db: asyncpg.Connection, tmp_path: Path) -> None:
    path = day(tmp_path)
    long = json.loads(line(0))
    long["details"]["note"] = "x" * 5000
    path.write_text(json.dumps(long) + "\n")
    tail = AuditTail(tmp_path, origin=ORIGIN)
    assert counts(await tail.step(db)) == (1, 1, 0)
    assert await heads(db) == {path.name: sha256(path.read_bytes()[:4096])}
    append(path, range(1, 3))
    assert counts(await tail.step(db)) == (2, 2, 0)


async def test_a_gzip_rewritten_whole_is_read_again_from_the_start_not_from_its_old_end(
        db: asyncpg.Connection, tmp_path: Path) -> None:
    """`rounds audit erase` writes a day's .gz again, one member: its old
    end is in the middle of the new one's compressed stream. The hash of
    the bytes read so far (its head) tells; rows already there are no-ops."""
    packed = day(tmp_path, gz=True)
    packed.write_bytes(gzip.compress("".join(line(n) for n in range(20)).encode(), mtime=0))
    assert counts(await AuditTail(tmp_path, origin=ORIGIN).step(db)) == (20, 20, 0)
    assert await heads(db) == {packed.name: sha256(packed.read_bytes())}
    loaded = packed.stat().st_size

    rewritten = tmp_path / "erase.tmp"  # a line changed, lines added, the same gzip header
    rewritten.write_bytes(gzip.compress("".join(line(n) for n in (*range(19), *range(40, 45))).encode(), mtime=0))
    rewritten.replace(packed)
    assert packed.stat().st_size > loaded
    assert counts(await AuditTail(tmp_path, origin=ORIGIN).step(db)) == (24, 5, 19)
    assert await positions(db) == {packed.name: (packed.stat().st_ino, packed.stat().st_size, 24)}
    assert await heads(db) == {packed.name: sha256(packed.read_bytes())}


async def test_positions_stored_before_the_head_was_kept_get_one_and_a_changed_gzip_of_then_is_read_again(
        db: asyncpg.Connection, tmp_path: Path) -> None:
    """A plain file whose position has no head (stored before migration 6)
    is the same file by the rules of then (inode, size) and gets its head;
    a gzip's bytes cannot be checked without one, so when it has grown it
    is read from the start."""
    plain, packed = day(tmp_path), tmp_path / "audit-2026-11-25.ndjson.gz"
    append(plain, range(5))
    packed.write_bytes(gzip.compress("".join(line(n) for n in range(10, 13)).encode()))
    assert counts(await AuditTail(tmp_path, origin=ORIGIN).step(db)) == (8, 8, 0)
    await db.execute("UPDATE audit_ship_positions SET head = NULL")

    append(plain, range(5, 7))
    late = tmp_path / "late.gz"
    late.write_bytes(packed.read_bytes() + gzip.compress(line(13).encode()))
    late.replace(packed)
    assert counts(await AuditTail(tmp_path, origin=ORIGIN).step(db)) == (2 + 4, 2 + 1, 3)
    assert await heads(db) == {plain.name: sha256(line(0)), packed.name: sha256(packed.read_bytes())}

    await db.execute("UPDATE audit_ship_positions SET head = NULL")
    assert counts(await AuditTail(tmp_path, origin=ORIGIN).step(db)) == (0, 0, 0)  # nothing grew
    assert await heads(db) == {plain.name: sha256(line(0)), packed.name: None}


async def test_a_gzipped_day_is_loaded_whole_once_and_the_plain_files_row_is_removed(
        db: asyncpg.Connection, tmp_path: Path) -> None:
    plain, packed = day(tmp_path), day(tmp_path, gz=True)
    append(plain, range(5))
    assert counts(await AuditTail(tmp_path, batch=2, origin=ORIGIN).step(db)) == (5, 5, 0)
    append(plain, range(5, 7))  # written after the last read, then the day is gzipped while stopped
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()

    restarted = AuditTail(tmp_path, batch=2, origin=ORIGIN)
    assert counts(await restarted.step(db)) == (7, 2, 5)
    assert await positions(db) == {packed.name: (packed.stat().st_ino, packed.stat().st_size, 7)}
    assert counts(await AuditTail(tmp_path, batch=2, origin=ORIGIN).step(db)) == (0, 0, 0)

    late = tmp_path / "late.gz"  # a late writer's lines: a member appended, the .gz renamed over
    late.write_bytes(packed.read_bytes() + gzip.compress(line(7).encode()))
    late.replace(packed)
    assert counts(await AuditTail(tmp_path, batch=2, origin=ORIGIN).step(db)) == (1, 1, 0)
    assert await positions(db) == {packed.name: (packed.stat().st_ino, packed.stat().st_size, 8)}

    packed.unlink()  # retention
    assert counts(await restarted.step(db)) == (0, 0, 0)
    assert await positions(db) == {}
    assert len(await event_ids(db)) == 8


async def test_two_origins_in_one_schema_do_not_see_each_others_positions(
        db: asyncpg.Connection, tmp_path: Path) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    append(day(a_dir), range(5))
    append(day(b_dir), range(10, 13))  # the same day, so the same file name
    a = AuditTail(a_dir, origin="host-a:/audit")
    b = AuditTail(b_dir, origin="host-b:/audit")
    assert counts(await a.step(db)) == (5, 5, 0)
    assert counts(await b.step(db)) == (3, 3, 0)
    name = day(a_dir).name
    assert await positions(db, "host-a:/audit") == {name: (day(a_dir).stat().st_ino, day(a_dir).stat().st_size, 5)}
    assert await positions(db, "host-b:/audit") == {name: (day(b_dir).stat().st_ino, day(b_dir).stat().st_size, 3)}

    again = AuditTail(a_dir, origin="host-c:/audit")  # a directory loaded under another origin is new to it
    assert counts(await again.step(db)) == (5, 0, 5)

    day(a_dir).unlink()
    await a.step(db)
    assert await positions(db, "host-a:/audit") == {}
    assert name in await positions(db, "host-b:/audit") and name in await positions(db, "host-c:/audit")


async def test_the_gateway_role_may_keep_its_positions(db: asyncpg.Connection, tmp_path: Path) -> None:
    """As `rounds_gateway` (migrations 2, 4 and 5 grant it what the shipper
    needs), from a schema with no partition yet: the month's is made through
    `audit_ensure_month`."""
    assert await partitions(db) == []
    path = day(tmp_path)
    append(path, range(4))
    await db.execute(f"SET ROLE {GATEWAY_ROLE}")
    assert counts(await AuditTail(tmp_path, batch=3, origin=ORIGIN).step(db)) == (4, 4, 0)
    append(path, range(4, 6))
    assert counts(await AuditTail(tmp_path, batch=3, origin=ORIGIN).step(db)) == (2, 2, 0)
    path.unlink()
    await AuditTail(tmp_path, origin=ORIGIN).step(db)
    assert await positions(db) == {}
    assert [name for name, _ in await partitions(db)] == [partition_name(month_start(T))]
    await db.execute("RESET ROLE")


async def test_a_restarted_shipper_loads_only_the_events_written_since(
        db: asyncpg.Connection, schema: str, tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    sink = FileAuditSink(directory, fsync="never")
    dsn = f"{POSTGRES_DSN}{'&' if '?' in POSTGRES_DSN else '?'}search_path={schema}"

    def emit(numbers: range) -> None:
        for i in numbers:
            sink.emit(AuditEvent(event_type="LOCK_ACQUIRED", source="shard-0", user_id=f"u{i % 3}",
                                 resource_id=f"patient:{i}/vitals", details={"i": i}))

    async def shipped(shipper: Shipper, rows: int) -> dict[str, object]:
        for _ in range(200):
            stats = shipper.stats()
            if stats["postgresUp"] and stats["lagBytes"] == 0 and len(await event_ids(db)) == rows:
                return stats
            await asyncio.sleep(0.05)
        raise AssertionError(f"{rows} rows not shipped: {shipper.stats()}")

    try:
        emit(range(20))
        first = Shipper(dsn, directory, interval_s=0.05).start()
        try:
            await shipped(first, 20)
        finally:
            first.stop()
        emit(range(20, 25))
        restarted = Shipper(dsn, directory, interval_s=0.05).start()
        try:
            stats = await shipped(restarted, 25)
        finally:
            restarted.stop()
    finally:
        sink.close()
    assert (stats["rowsLoaded"], stats["rowsAlready"]) == (5, 0)
    stored = await positions(db, f"{socket.gethostname()}:{directory.resolve()}")
    assert {name: offset for name, (_, offset, _) in stored.items()} \
        == {p.name: p.stat().st_size for p in directory.glob("audit-*.ndjson")}
