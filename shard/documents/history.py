"""Document history in PostgreSQL (issue 4, optional): every stored update as
a row, so a document can be read as it was at any past time.

With `postgres_dsn` set, each shard hands the updates it has stored (after
`UPDATE_ACK`'s append, so only acknowledged updates) to `DocHistory.submit`;
a background task inserts them in batches with `COPY`. History is a record
beside the document store, not its source: if PostgreSQL is unreachable the
rows wait (at most `MAX_WAITING`, then the oldest are dropped with an error
log and counted in `stats()`), and editing is never slowed or refused.

Table (created on start; `rounds doc show` reads it):

    rounds_doc_updates(resource_id text, revision bigint, stored_at timestamptz,
                       user_id text, update bytea, PRIMARY KEY (resource_id, revision))

A shard that restarted re-sends nothing twice: the primary key makes a
repeated (resource, revision) a no-op.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

MAX_WAITING = 200_000
BATCH = 5_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds_doc_updates (
    resource_id text NOT NULL,
    revision bigint NOT NULL,
    stored_at timestamptz NOT NULL,
    user_id text,
    update bytea NOT NULL,
    PRIMARY KEY (resource_id, revision)
);
CREATE INDEX IF NOT EXISTS rounds_doc_updates_time ON rounds_doc_updates (resource_id, stored_at);
"""


@dataclass(frozen=True, slots=True)
class HistoryRow:
    resource_id: str
    revision: int
    stored_at: datetime
    user_id: str | None
    update: bytes


class DocHistory:
    name = "postgres"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._pool: asyncpg.Pool | None = None
        self._waiting: deque[HistoryRow] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.written = 0
        self.dropped = 0
        self.failures = 0

    async def start(self) -> None:
        """Start the writer; the schema is made on first contact (PostgreSQL
        may be down now and come up later)."""
        self._task = asyncio.create_task(self._run(), name="doc-history")

    def submit(self, resource_id: str, entries: Sequence[tuple[int, bytes, str | None]]) -> None:
        now = datetime.now(UTC)
        for revision, update, user in entries:
            self._waiting.append(HistoryRow(resource_id, revision, now, user, update))
        while len(self._waiting) > MAX_WAITING:
            self._waiting.popleft()
            self.dropped += 1
            if self.dropped % 10_000 == 1:
                log.error("document history: PostgreSQL is behind, %d rows dropped so far", self.dropped)
        self._wakeup.set()

    def stats(self) -> dict[str, Any]:
        return {"backend": self.name, "waiting": len(self._waiting), "written": self.written,
                "dropped": self.dropped, "failures": self.failures}

    async def _connect(self) -> asyncpg.Pool:
        if self._pool is None:
            pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=2, command_timeout=10)
            async with pool.acquire() as conn:
                await conn.execute(SCHEMA)
            self._pool = pool
        return self._pool

    async def _run(self) -> None:
        delay = 0.2
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._waiting:
                batch = [self._waiting[i] for i in range(min(BATCH, len(self._waiting)))]
                try:
                    await self._write(batch)
                except Exception as exc:
                    self.failures += 1
                    log.warning("document history: write of %d rows failed (%s: %s); retrying in %.1fs",
                                len(batch), type(exc).__name__, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                delay = 0.2
                for _ in batch:
                    self._waiting.popleft()
                self.written += len(batch)

    async def _write(self, batch: list[HistoryRow]) -> None:
        pool = await self._connect()
        async with pool.acquire() as conn, conn.transaction():
            # COPY into a temporary table, then insert what is new: repeated
            # rows (a retry after a timeout that did commit) are no-ops.
            await conn.execute("CREATE TEMPORARY TABLE IF NOT EXISTS doc_updates_in "
                               "(LIKE rounds_doc_updates) ON COMMIT DELETE ROWS")
            await conn.copy_records_to_table(
                "doc_updates_in", records=[(r.resource_id, r.revision, r.stored_at, r.user_id, r.update)
                                           for r in batch])
            await conn.execute("INSERT INTO rounds_doc_updates SELECT * FROM doc_updates_in "
                               "ON CONFLICT (resource_id, revision) DO NOTHING")

    async def health(self) -> dict[str, Any]:
        try:
            pool = await self._connect()
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
        except Exception as exc:
            return {**self.stats(), "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {**self.stats(), "ok": True}

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Write what waits (for up to `timeout_s`), then disconnect."""
        if self._task is not None:
            deadline = asyncio.get_running_loop().time() + timeout_s
            while self._waiting and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            self._task.cancel()
        if self._waiting:
            log.error("document history: %d rows not written at shutdown", len(self._waiting))
        if self._pool is not None:
            await self._pool.close()


async def read_history(dsn: str, resource_id: str, until: datetime | None = None) -> list[HistoryRow]:
    """The stored updates of a document, oldest first, up to `until`."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT resource_id, revision, stored_at, user_id, update FROM rounds_doc_updates "
            "WHERE resource_id = $1 AND ($2::timestamptz IS NULL OR stored_at <= $2) ORDER BY revision",
            resource_id, until)
    except asyncpg.UndefinedTableError:
        return []
    finally:
        await conn.close()
    return [HistoryRow(r["resource_id"], r["revision"], r["stored_at"], r["user_id"], bytes(r["update"]))
            for r in rows]
