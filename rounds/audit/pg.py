"""The audit trail in PostgreSQL (issue 5): schema and migrations, loading
the NDJSON day files, searching, retention by month partition.

The NDJSON files (`rounds.audit.files`) are the write-ahead record; PostgreSQL is
the searchable copy, filled from them. Loading is idempotent by event id, so
the files can be loaded as often as wanted (after PostgreSQL was down, after
a crash mid-load) and the table ends up holding each event once.

Table (created by `migrate`, `rounds audit migrate`):

    audit_events(event_id text, time timestamptz, event_type, user_id,
                 session_id, resource_id, source, outcome text, details jsonb,
                 writer text, seq bigint, prev_hash text, hash text,
                 PRIMARY KEY (event_id, time)) PARTITION BY RANGE (time)

One partition per UTC month (`audit_events_y2026m11`), made on demand before
rows of that month are inserted; retention drops whole partitions. The key
includes `time` because PostgreSQL requires the partition key in a unique
key on a partitioned table: an event's time never changes, so (event_id,
time) is as unique as event_id. `event_id` is text, not uuid, so the id
reads back exactly as the writer hashed it.

The role `rounds_gateway` (made if missing, NOLOGIN; grant it to the login
the gateway uses) may INSERT and SELECT, never UPDATE or DELETE. It makes
a new month's partition through `audit_ensure_month` (SECURITY DEFINER,
migration 5): that is the only DDL it can run.

What must not be here: the file format itself (`rounds.audit.files`), argument
parsing (`rounds.audit.cli`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from rounds.audit.events import format_time
from rounds.audit.rows import AuditRow, CorruptLine, day_files, read_file
from rounds.audit.verify import VerifyReport, check_line

BATCH = 5_000
GATEWAY_ROLE = "rounds_gateway"

COLUMNS = ("event_id", "time", "event_type", "user_id", "session_id", "resource_id", "source", "outcome",
           "details", "writer", "seq", "prev_hash", "hash", "salt", "erased")

# (version, name, SQL). Append only: a released step is never edited, a
# change is a new step. Each runs in its own transaction.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "audit_events partitioned by month", """
CREATE TABLE audit_events (
    event_id text NOT NULL,
    time timestamptz NOT NULL,
    event_type text NOT NULL,
    user_id text,
    session_id text,
    resource_id text,
    source text NOT NULL,
    outcome text NOT NULL,
    details jsonb NOT NULL DEFAULT '{}',
    writer text,
    seq bigint,
    prev_hash text,
    hash text,
    PRIMARY KEY (event_id, time)
) PARTITION BY RANGE (time);
-- (x, time): a search by x within a period, newest or oldest first, reads only its rows.
CREATE INDEX audit_events_user_time ON audit_events (user_id, time);
CREATE INDEX audit_events_resource_time ON audit_events (resource_id, time);
CREATE INDEX audit_events_type_time ON audit_events (event_type, time);
CREATE INDEX audit_events_time ON audit_events (time);
"""),
    (2, "rounds_gateway may insert and read, not update or delete", f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{GATEWAY_ROLE}') THEN
        CREATE ROLE {GATEWAY_ROLE} NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object THEN
    NULL;  -- another schema's migration made it at the same moment
END $$;
DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO {GATEWAY_ROLE}', current_schema());
END $$;
REVOKE ALL ON audit_events FROM {GATEWAY_ROLE};
GRANT SELECT, INSERT ON audit_events TO {GATEWAY_ROLE};
"""),
    (3, "identifier salt and erasure commitments (rounds audit erase)", """
ALTER TABLE audit_events ADD COLUMN salt jsonb, ADD COLUMN erased jsonb;
"""),
    (4, "audit_ship_positions: how far each gateway has loaded its day files", f"""
CREATE TABLE audit_ship_positions (
    origin text NOT NULL,
    file text NOT NULL,
    inode bigint NOT NULL,
    byte_offset bigint NOT NULL,
    lines bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (origin, file)
);
GRANT SELECT, INSERT, UPDATE, DELETE ON audit_ship_positions TO {GATEWAY_ROLE};
"""),
    # rounds_gateway may not CREATE a partition (that needs the table's
    # ownership, which would also let it drop partitions: tamper evidence).
    # It calls this instead, which runs as the migrating role and can only
    # make the partition of one month. The search_path is fixed to the
    # schema the function lives in: a caller's search_path cannot put its
    # own `audit_events` or functions in front.
    (5, "audit_ensure_month: rounds_gateway may create a month partition, nothing else", f"""
CREATE FUNCTION audit_ensure_month(month date) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER AS $fn$
DECLARE
    part text;
BEGIN
    -- Months from 2000-01 to a year ahead: a caller cannot fill the
    -- schema with partitions of any month it likes.
    IF month IS NULL OR extract(day FROM month) <> 1 OR month < DATE '2000-01-01'
            OR month > date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 year' THEN
        RAISE EXCEPTION 'audit_ensure_month: % is not the first day of a month from 2000-01 to a year ahead',
            coalesce(month::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    part := 'audit_events_y' || to_char(month, 'YYYY') || 'm' || to_char(month, 'MM');
    IF EXISTS (SELECT FROM pg_class WHERE relname = part AND relnamespace = current_schema()::regnamespace) THEN
        RETURN NULL;
    END IF;
    EXECUTE format('CREATE TABLE %I.%I PARTITION OF %I.audit_events FOR VALUES FROM (%L) TO (%L)',
                   current_schema(), part, current_schema(),
                   to_char(month, 'YYYY-MM-DD') || ' 00:00:00+00',
                   to_char(month + interval '1 month', 'YYYY-MM-DD') || ' 00:00:00+00');
    RETURN part;
EXCEPTION WHEN duplicate_table OR unique_violation THEN
    RETURN NULL;  -- a concurrent caller made it between our look and our create
END $fn$;
DO $$
BEGIN
    -- Bound to the schema it was made in (current_schema() inside it is that schema).
    EXECUTE format('ALTER FUNCTION %I.audit_ensure_month(date) SET search_path = %I, pg_temp',
                   current_schema(), current_schema());
    EXECUTE format('REVOKE ALL ON FUNCTION %I.audit_ensure_month(date) FROM PUBLIC', current_schema());
    EXECUTE format('GRANT EXECUTE ON FUNCTION %I.audit_ensure_month(date) TO {GATEWAY_ROLE}', current_schema());
END $$;
"""),
    (6, "audit_ship_positions.head: a fingerprint that tells a file from another under the same name", """
ALTER TABLE audit_ship_positions ADD COLUMN head text;
"""),
)

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS rounds_schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


async def connect(dsn: str, schema: str | None = None) -> asyncpg.Connection:
    """A connection whose unqualified names resolve in `schema` (default: the
    server's `search_path`). Tests give each run its own schema."""
    settings = {"search_path": schema} if schema else {}
    return await asyncpg.connect(dsn, server_settings=settings, timeout=10)


# -- schema ---------------------------------------------------------------


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply the migrations this schema lacks, oldest first; return the
    versions applied (empty when up to date). Safe to run concurrently: an
    advisory lock per schema makes the second runner wait, then find nothing
    to do."""
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('rounds_schema_migrations:' || current_schema()))")
        await conn.execute(MIGRATIONS_TABLE)
        done = {r["version"] for r in await conn.fetch("SELECT version FROM rounds_schema_migrations")}
        for version, name, sql in MIGRATIONS:
            if version in done:
                continue
            async with conn.transaction():  # a savepoint: a failing step names itself
                try:
                    await conn.execute(sql)
                except asyncpg.PostgresError as exc:
                    raise RuntimeError(f"audit migration {version} ({name}) failed: {exc}") from exc
                await conn.execute("INSERT INTO rounds_schema_migrations (version, name) VALUES ($1, $2)",
                                   version, name)
            applied.append(version)
    return applied


async def schema_version(conn: asyncpg.Connection) -> int:
    """The highest applied migration, 0 for an empty schema."""
    try:
        return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM rounds_schema_migrations"))
    except asyncpg.UndefinedTableError:
        return 0


def month_start(moment: datetime) -> date:
    moment = moment.astimezone(UTC)
    return date(moment.year, moment.month, 1)


def next_month(month: date) -> date:
    return date(month.year + (month.month == 12), month.month % 12 + 1, 1)


def partition_name(month: date) -> str:
    return f"audit_events_y{month.year:04d}m{month.month:02d}"


_PARTITION = re.compile(r"^audit_events_y(\d{4})m(\d{2})$")


async def ensure_partitions(conn: asyncpg.Connection, months: Iterable[date]) -> list[str]:
    """Create the month partitions that are missing; return their names.
    The partitioned indexes of `audit_events` apply to them. Each is made
    by `audit_ensure_month` (migration 5), so `rounds_gateway` can call
    this too; a month before 2000 or more than a year ahead is refused
    (`asyncpg.InvalidParameterValueError`): the owner can still create
    such a partition by hand, after which it is found here."""
    existing = {name for name, _ in await partitions(conn)}
    made = []
    for month in sorted(set(months)):
        if partition_name(month) in existing:
            continue
        name = await conn.fetchval("SELECT audit_ensure_month($1)", month)
        if name is not None:  # None: it was there (a concurrent loader made it since our look)
            made.append(name)
    return made


async def partitions(conn: asyncpg.Connection) -> list[tuple[str, date]]:
    """The month partitions of `audit_events`, oldest first."""
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'audit_events'::regclass")
    found = []
    for r in rows:
        m = _PARTITION.match(r["relname"])
        if m:
            found.append((r["relname"], date(int(m[1]), int(m[2]), 1)))
    return sorted(found, key=lambda p: p[1])



# -- loading ---------------------------------------------------------------


@dataclass(slots=True)
class LoadReport:
    files: int = 0
    read: int = 0
    inserted: int = 0
    already: int = 0
    corrupt: list[CorruptLine] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.files} files, {self.read} events read, {self.inserted} inserted, "
                f"{self.already} already there, {len(self.corrupt)} corrupt lines")


async def insert_rows(conn: asyncpg.Connection, rows: Sequence[AuditRow]) -> int:
    """Insert the rows that are not there yet (by event id and time) in one
    transaction; return how many were new. COPY into a temporary table, then
    INSERT ... ON CONFLICT DO NOTHING: a row loaded before, or twice in
    `rows`, is a no-op."""
    if not rows:
        return 0
    async with conn.transaction():
        await ensure_partitions(conn, (month_start(r.time) for r in rows))
        await conn.execute("CREATE TEMPORARY TABLE IF NOT EXISTS audit_events_in "
                           "(LIKE audit_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
        await conn.copy_records_to_table("audit_events_in", records=[r.record() for r in rows],
                                         columns=list(COLUMNS))
        status = await conn.execute(f"INSERT INTO audit_events ({', '.join(COLUMNS)}) "
                                    f"SELECT {', '.join(COLUMNS)} FROM audit_events_in "
                                    "ON CONFLICT (event_id, time) DO NOTHING")
    return int(status.rsplit(" ", 1)[1])


async def load_items(conn: asyncpg.Connection, label: str, items: Iterable[AuditRow | CorruptLine],
                     report: LoadReport, batch: int = BATCH,
                     progress: Callable[[str], None] | None = None) -> None:
    """Insert the rows of `items` (one file's, or part of one) in
    transactions of `batch` rows, counting into `report`; corrupt lines are
    counted and skipped."""
    pending: list[AuditRow] = []

    async def flush() -> None:
        inserted = await insert_rows(conn, pending)
        report.inserted += inserted
        report.already += len(pending) - inserted
        pending.clear()

    for item in items:
        if isinstance(item, CorruptLine):
            report.corrupt.append(item)
            if progress:
                progress(f"corrupt line skipped: {item}")
            continue
        report.read += 1
        pending.append(item)
        if len(pending) >= batch:
            await flush()
            if progress:
                progress(f"{label}: {report.read} events read, {report.inserted} inserted")
    await flush()


async def load_files(conn: asyncpg.Connection, paths: Iterable[Path], batch: int = BATCH,
                     progress: Callable[[str], None] | None = None) -> LoadReport:
    """Load day files into `audit_events`, `batch` rows per transaction.
    Corrupt lines are reported (file and line number) and skipped; the rest
    is loaded. Loading the same files again inserts nothing."""
    report = LoadReport()
    for path in paths:
        report.files += 1
        await load_items(conn, path.name, read_file(path), report, batch, progress)
        if progress:
            progress(f"{path.name} done: {report.summary()}")
    return report


async def load_dir(conn: asyncpg.Connection, directory: Path, batch: int = BATCH,
                   progress: Callable[[str], None] | None = None) -> LoadReport:
    """Load every day file of `directory` (`{var_dir}/audit`)."""
    return await load_files(conn, day_files(directory), batch, progress)


# -- search ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditQuery:
    user_id: str | None = None
    resource_id: str | None = None
    event_type: str | None = None
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive
    limit: int = 1_000

    def matches(self, row: AuditRow) -> bool:
        return ((self.user_id is None or row.user_id == self.user_id)
                and (self.resource_id is None or row.resource_id == self.resource_id)
                and (self.event_type is None or row.event_type == self.event_type)
                and (self.since is None or row.time >= self.since)
                and (self.until is None or row.time < self.until))


def search_sql(query: AuditQuery) -> tuple[str, list[Any]]:
    """The SELECT for a query, oldest first. Only the given filters appear
    in the WHERE clause (no `$1 IS NULL OR ...`), so the planner sees plain
    equalities and picks the (x, time) index."""
    where: list[str] = []
    args: list[Any] = []
    for column, value in (("user_id", query.user_id), ("resource_id", query.resource_id),
                          ("event_type", query.event_type)):
        if value is not None:
            args.append(value)
            where.append(f"{column} = ${len(args)}")
    if query.since is not None:
        args.append(query.since)
        where.append(f"time >= ${len(args)}")
    if query.until is not None:
        args.append(query.until)
        where.append(f"time < ${len(args)}")
    args.append(query.limit)
    sql = (f"SELECT {', '.join(COLUMNS)} FROM audit_events"
           f"{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY time, event_id LIMIT ${len(args)}")
    return sql, args


def row_from_record(record: asyncpg.Record) -> AuditRow:
    values = dict(record)
    for column in ("details", "salt", "erased"):
        if isinstance(values[column], str):
            values[column] = json.loads(values[column])
    return AuditRow(**values)


async def search_db(conn: asyncpg.Connection, query: AuditQuery) -> list[AuditRow]:
    sql, args = search_sql(query)
    return [row_from_record(r) for r in await conn.fetch(sql, *args)]


def search_files(directory: Path, query: AuditQuery,
                 corrupt: Callable[[CorruptLine], None] | None = None) -> list[AuditRow]:
    """The same search over the day files, for a gateway without PostgreSQL.
    Reads only the days in [since, until]; an event in both a day's plain
    and gzipped file (during rotation) is returned once."""
    found: dict[tuple[str, datetime], AuditRow] = {}
    until_day = query.until - timedelta(microseconds=1) if query.until else None
    for path in day_files(directory, query.since, until_day):
        for item in read_file(path):
            if isinstance(item, CorruptLine):
                if corrupt:
                    corrupt(item)
            elif query.matches(item):
                found.setdefault((item.event_id, item.time), item)
    return sorted(found.values(), key=lambda r: (r.time, r.event_id))[:query.limit]


# -- verification ------------------------------------------------------------------


async def verify_db(conn: asyncpg.Connection, since: datetime, until: datetime) -> tuple[VerifyReport, int]:
    """Check the hash chains of the events in [since, until) as stored, with
    the same rules as `rounds.audit.verify_file` (docs/audit.md): each row is
    re-serialised in the file's field names, so a changed column fails its
    own hash and a deleted row is a `seq` gap. A chain that starts before
    `since` is anchored on its first row in the range. `line` in a break is
    the row's position in (writer, seq) order; the problem names its event id.
    Returns the report and the number of unchained rows (loaded from files
    written before the chain, no `writer`), which are not checked.

    Exact only while `details` holds what jsonb returns unchanged: a float
    written with an exponent and an integral value (`1e+100`) reads back as
    an integer and fails its hash."""
    rows = await conn.fetch(f"SELECT {', '.join(COLUMNS)} FROM audit_events WHERE time >= $1 AND time < $2 "
                            "AND writer IS NOT NULL ORDER BY writer, seq, time", since, until)
    unchained = int(await conn.fetchval("SELECT count(*) FROM audit_events WHERE time >= $1 AND time < $2 "
                                        "AND writer IS NULL", since, until))
    report = VerifyReport(f"audit_events [{format_time(since)}, {format_time(until)})")
    event_ids = [""]
    for number, record in enumerate(rows, start=1):
        row = row_from_record(record)
        event_ids.append(row.event_id)
        check_line(report, {}, number, row.fields())
    for chain in report.writers.values():
        if chain.broken is not None:
            chain.broken = dataclasses.replace(
                chain.broken, problem=f"event {event_ids[chain.broken.line]}: {chain.broken.problem}")
    return report, unchained


# -- retention -----------------------------------------------------------------


async def partitions_before(conn: asyncpg.Connection, cutoff: datetime) -> list[str]:
    """The month partitions whose whole month is before `cutoff`, oldest first."""
    keep_from = month_start(cutoff)
    return [name for name, month in await partitions(conn) if next_month(month) <= keep_from]


async def drop_partitions_before(conn: asyncpg.Connection, cutoff: datetime) -> list[str]:
    """Drop every month partition whose whole month is before `cutoff`; the
    month holding `cutoff` is kept whole (events a little older than the
    retention period stay until their month has passed)."""
    dropped = []
    async with conn.transaction():
        for name in await partitions_before(conn, cutoff):
            await conn.execute(f"DROP TABLE {name}")
            dropped.append(name)
    return dropped


def day_files_before(directory: Path, cutoff: datetime) -> list[Path]:
    """The day files (plain and gzipped) whose whole UTC day is before
    `cutoff`, oldest first; the day holding `cutoff` is kept."""
    keep_from = cutoff.astimezone(UTC).date()
    return [p for p in day_files(directory) if date.fromisoformat(p.name[6:16]) < keep_from]


def delete_day_files_before(directory: Path, cutoff: datetime) -> list[Path]:
    """Delete the day files of `day_files_before`; return those deleted (a
    file gone meanwhile, e.g. gzipped, is not listed)."""
    deleted = []
    for path in day_files_before(directory, cutoff):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        deleted.append(path)
    return deleted
