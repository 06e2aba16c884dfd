"""Following the audit day files into PostgreSQL (issue 5): "when PostgreSQL
is down, events keep going to the files and are loaded when it returns".

The files are the record; `AuditTail` remembers how far it has loaded each
day file (bytes and lines) and, on each `step`, loads only what was
appended since: complete lines of a plain file (a writer may be mid-line),
new members of a gzip (a late writer's lines are added to a gzipped day as
a member, rounds.audit). When a day is gzipped its .gz is new to the tail
and loaded whole: what was appended after the last read of the plain file
is in it, the rest are no-ops. The offset moves only after its rows are
committed, so a step that fails (the server went away) is simply repeated
by the next, nothing lost or doubled.

`follow` is the asyncio shell: connect, migrate, step every `interval_s`,
reconnect with backoff while PostgreSQL is down.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from rounds.audit_pg import BATCH, LoadReport, connect, day_files, load_items, migrate, parse_lines

log = logging.getLogger(__name__)

MAX_READ_BYTES = 64 * 1024 * 1024  # one step reads at most this much of a file; the next goes on


@dataclass(slots=True)
class _Position:
    offset: int = 0  # bytes of the file loaded
    lines: int = 0  # lines of the file loaded (for line numbers of corrupt lines)
    inode: int = 0  # a new inode under the same name is a new file


class AuditTail:
    def __init__(self, directory: Path, batch: int = BATCH) -> None:
        self.directory = Path(directory)
        self.batch = batch
        self._loaded: dict[str, _Position] = {}

    async def step(self, conn: asyncpg.Connection,
                   progress: Callable[[str], None] | None = None) -> LoadReport:
        """Load what the files gained since the last step. Raises what the
        connection raises; the next step retries from the same place."""
        report = LoadReport()
        present = day_files(self.directory)
        names = {p.name for p in present}
        for name in [n for n in self._loaded if n not in names]:
            del self._loaded[name]  # gzipped (its .gz holds the lines) or removed by retention
        for path in present:
            pos = self._loaded.setdefault(path.name, _Position())
            try:
                lines, size = _read_new(path, pos)
            except FileNotFoundError:
                continue  # gzipped between the listing and the open: the next step loads the .gz
            if lines:
                report.files += 1
                await load_items(conn, path.name, parse_lines(path, lines, pos.lines + 1), report,
                                 self.batch, progress)
                pos.lines += len(lines)
            pos.offset = size
        return report


def _read_new(path: Path, pos: _Position) -> tuple[list[bytes], int]:
    """The complete lines `path` gained past `pos`, and the offset they end at.

    A plain file grows by lines; a gzip by members (a late writer's lines are
    appended to a gzipped day as a new member, rounds.audit), so its new
    lines are the members from the old compressed size on. A plain file
    replaced (a new inode), or any file smaller than the position, is read
    from the start (rows already there are no-ops)."""
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        size = stat.st_size
        gz = path.name.endswith(".gz")
        # A gzip is replaced (renamed over) when a member is added, its old bytes kept as they were.
        if size < pos.offset or (stat.st_ino != pos.inode and not gz):
            pos.offset = pos.lines = 0
            pos.inode = stat.st_ino
        if size == pos.offset:
            return [], size
        f.seek(pos.offset)
        if gz:
            with gzip.GzipFile(fileobj=f, mode="rb") as members:
                data = members.read()
            return data.splitlines(keepends=True), size
        data = f.read(MAX_READ_BYTES)
    complete = data[:data.rfind(b"\n") + 1]  # a writer may be mid-line
    return complete.splitlines(keepends=True), pos.offset + len(complete)


async def follow(dsn: str, directory: Path, interval_s: float = 1.0, stop: asyncio.Event | None = None,
                 schema: str | None = None) -> None:
    """Keep PostgreSQL up to date with the day files until `stop` is set.
    While PostgreSQL is down the files keep the events; this catches up
    when it returns."""
    stop = stop or asyncio.Event()
    tail = AuditTail(directory)
    conn: asyncpg.Connection | None = None
    delay = interval_s
    while not stop.is_set():
        try:
            if conn is None or conn.is_closed():
                conn = await connect(dsn, schema)
                await migrate(conn)
            report = await tail.step(conn)
            for bad in report.corrupt:
                log.error("audit: corrupt line skipped: %s", bad)
            if report.inserted:
                log.info("audit: %d events loaded into PostgreSQL", report.inserted)
            delay = interval_s
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("audit: loading into PostgreSQL failed (%s: %s); the files keep the events, "
                        "retrying in %.1fs", type(exc).__name__, exc, delay)
            if conn is not None:
                conn.terminate()
                conn = None
            delay = min(delay * 2, 30.0)
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except asyncio.TimeoutError:
            pass
    if conn is not None:
        await conn.close()
