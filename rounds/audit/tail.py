"""Following the audit day files into PostgreSQL (issue 5): "when PostgreSQL
is down, events keep going to the files and are loaded when it returns".

The files are the record; `AuditTail` remembers how far it has loaded each
day file (bytes, lines, inode, head) and, on each `step`, loads only what was
appended since: complete lines of a plain file (a writer may be mid-line),
new members of a gzip (a late writer's lines are added to a gzipped day as
a member, rounds.audit). When a day is gzipped its .gz is new to the tail
and loaded whole: what was appended after the last read of the plain file
is in it, the rest are no-ops.

The positions are kept in PostgreSQL (`audit_ship_positions`, one row per
origin and file; the origin is the host and the directory shipped), so a
restarted gateway goes on where it stopped instead of reading ten years of
files again. A position moves in the same transaction as the rows it
covers: after a crash at any point the rows and the positions agree, and
the next start neither re-reads a committed batch nor skips a line. The
first step (and the first after a failure, whose commit may or may not
have happened) reads the origin's positions back; a plain file whose inode
or first line is not the stored one is new and read from 0 (a file removed
and made again can get the old inode number back), and so is a gzip whose
bytes up to its position changed (rewritten whole by `rounds audit erase`);
the row of a file that is gone (gzipped, removed by retention) is deleted.

`follow` is the asyncio shell: connect, migrate, step every `interval_s`,
reconnect with backoff while PostgreSQL is down. `Shipper` runs `follow` on
a thread of its own (its own event loop) beside the gateway's supervisor,
and reports what it has done (`ShipperStats`).

What must not be here: the schema (rounds.audit.pg, migration 4 makes the
positions table, migration 6 its `head`) and the file format (rounds.audit.files).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import BinaryIO

import asyncpg

from rounds.audit.pg import BATCH, LoadReport, connect, load_items, migrate
from rounds.audit.rows import day_files, parse_lines

log = logging.getLogger(__name__)

MAX_READ_BYTES = 64 * 1024 * 1024  # one step reads at most this much of a file; the next goes on
HEAD_BYTES = 4096  # a plain file's head is its first line, or this many bytes of a longer one


# audit_ship_positions is made by migration 4 (rounds.audit.pg), `head` added by migration 6.
FETCH_POSITIONS = "SELECT file, inode, byte_offset, lines, head FROM audit_ship_positions WHERE origin = $1"
STORE_POSITION = ("INSERT INTO audit_ship_positions (origin, file, inode, byte_offset, lines, head) "
                  "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (origin, file) DO UPDATE SET inode = EXCLUDED.inode, "
                  "byte_offset = EXCLUDED.byte_offset, lines = EXCLUDED.lines, head = EXCLUDED.head, "
                  "updated_at = now()")
FORGET_POSITIONS = "DELETE FROM audit_ship_positions WHERE origin = $1 AND file = ANY($2::text[])"


@dataclass(frozen=True, slots=True)
class _Position:
    offset: int = 0  # bytes of the file loaded; always the end of a line (plain) or of a member (gzip)
    lines: int = 0  # lines of the file loaded (for line numbers of corrupt lines)
    inode: int = 0  # a new inode under the same name is a new plain file
    # sha256 hex of a plain file's first line (`_line_head`) or of a gzip's first `offset` bytes;
    # None: not known yet (nothing complete read, or stored before migration 6)
    head: str | None = None


def default_origin(directory: Path) -> str:
    """The name under which a directory's positions are kept: several
    gateways on several hosts ship their own directories into one database."""
    return f"{socket.gethostname()}:{Path(directory).resolve()}"


class AuditTail:
    def __init__(self, directory: Path, batch: int = BATCH, origin: str | None = None) -> None:
        self.directory = Path(directory)
        self.batch = batch
        self.origin = origin if origin is not None else default_origin(self.directory)
        self._loaded: dict[str, _Position] = {}  # as committed in audit_ship_positions
        self._stale = True  # read the positions from PostgreSQL before the next load

    async def step(self, conn: asyncpg.Connection, progress: Callable[[str], None] | None = None,
                   report: LoadReport | None = None) -> LoadReport:
        """Load what the files gained since the last committed position,
        counting into `report` (also what was committed before a failure).
        Raises what the connection raises; the next step reads the
        positions back and goes on from the last committed batch."""
        report = report if report is not None else LoadReport()
        try:
            if self._stale:
                self._loaded = {r["file"]: _Position(r["byte_offset"], r["lines"], r["inode"], r["head"])
                                for r in await conn.fetch(FETCH_POSITIONS, self.origin)}
                self._stale = False
            if not self.directory.is_dir():
                return report  # not made yet (the sink makes it), or unmounted: the positions stay
            present = day_files(self.directory)
            names = {p.name for p in present}
            gone = [n for n in self._loaded if n not in names]  # gzipped (its .gz holds the lines) or removed
            if gone:
                await conn.execute(FORGET_POSITIONS, self.origin, gone)
                for name in gone:
                    del self._loaded[name]
            for path in present:
                await self._load_file(conn, path, report, progress)
        except BaseException:
            self._stale = True  # a commit whose answer was lost may have moved a position
            raise
        return report

    async def _load_file(self, conn: asyncpg.Connection, path: Path, report: LoadReport,
                         progress: Callable[[str], None] | None) -> None:
        stored = self._loaded.get(path.name)
        try:
            start, lines, end = _read_new(path, stored or _Position())
        except FileNotFoundError:
            return  # gzipped between the listing and the open: the next step loads the .gz
        if not lines:
            # a new file with no complete line yet, a new inode or head, a gzip's empty member,
            # a head filled in for a position stored before migration 6
            if end != stored:
                await _store(conn, self.origin, path.name, end)
                self._loaded[path.name] = end
            return
        gz = path.name.endswith(".gz")
        for i, (chunk, pos) in enumerate(_batches(start, lines, end, self.batch, gz)):
            part = LoadReport(files=int(i == 0))
            async with conn.transaction():  # the rows and the position that covers them, or neither
                await load_items(conn, path.name, parse_lines(path, chunk, start.lines + i * self.batch + 1),
                                 part, self.batch, progress)
                if pos is not None:
                    await _store(conn, self.origin, path.name, pos)
            if pos is not None:
                self._loaded[path.name] = pos
            _add(report, part)

    def lag_bytes(self) -> int:
        """Bytes of the day files not loaded yet (a gzip counts its
        compressed bytes; a file not yet read counts whole, and so does
        every file before the positions were first read from PostgreSQL)."""
        lag = 0
        for path in day_files(self.directory):
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            pos = self._loaded.get(path.name)
            lag += size - pos.offset if pos is not None and size >= pos.offset else size
        return lag


async def _store(conn: asyncpg.Connection, origin: str, name: str, pos: _Position) -> None:
    await conn.execute(STORE_POSITION, origin, name, pos.inode, pos.offset, pos.lines, pos.head)


def _read_new(path: Path, pos: _Position) -> tuple[_Position, list[bytes], _Position]:
    """Where reading `path` starts, the complete lines it gained past `pos`
    (each with its newline), and the position after them.

    A plain file grows by lines, and is the file of `pos` only if its inode
    and its first line are the stored ones: a file removed and made again
    may get the same inode number (file systems reuse them), and an
    append-only file's first line never changes. Otherwise, or when it is
    smaller than the position, it is read from the start (rows already
    there are no-ops). A gzip: see `_read_new_gzip`."""
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        size, inode = stat.st_size, _signed(stat.st_ino)
        if path.name.endswith(".gz"):
            return _read_new_gzip(f, size, inode, pos)
        head = _line_head(os.pread(f.fileno(), HEAD_BYTES, 0))
        if size < pos.offset or inode != pos.inode or (pos.head is not None and head != pos.head):
            pos = _Position(inode=inode)
        # A position stored before migration 6 has no head: the same file by the rules of then, it gets one.
        pos = replace(pos, head=head)
        if size == pos.offset:
            return pos, [], pos
        f.seek(pos.offset)
        data = f.read(MAX_READ_BYTES)
        if head is None:  # the first line was completed since we looked
            head = _line_head(os.pread(f.fileno(), HEAD_BYTES, 0))
    complete = data[:data.rfind(b"\n") + 1]  # a writer may be mid-line
    lines = io.BytesIO(complete).readlines()  # split at b"\n" only, as `read_file` numbers them
    return pos, lines, _Position(pos.offset + len(complete), pos.lines + len(lines), inode, head)


def _read_new_gzip(f: BinaryIO, size: int, inode: int, pos: _Position) -> tuple[_Position, list[bytes], _Position]:
    """`_read_new` of a gzip, which grows by members: a late writer's lines
    are appended to a gzipped day as a new member, the old bytes kept and
    the file renamed over (so its inode says nothing), rounds.audit. Its new
    lines are the members from the old size on, if the bytes up to there are
    the ones read (their hash is the position's head); a gzip rewritten
    whole (`rounds audit erase`) is read from the start. One that has not
    changed size is not read at all."""
    if size == pos.offset:
        pos = replace(pos, inode=inode)
        return pos, [], pos
    digest = hashlib.sha256()
    left = pos.offset if size > pos.offset else 0
    while left and (chunk := f.read(min(left, 1 << 20))):
        digest.update(chunk)
        left -= len(chunk)
    if size < pos.offset or digest.hexdigest() != pos.head:  # also a head not known (before migration 6)
        pos, digest = _Position(), hashlib.sha256()
        f.seek(0)
    new = f.read()
    digest.update(new)
    with gzip.GzipFile(fileobj=io.BytesIO(new), mode="rb") as members:
        lines = io.BytesIO(members.read()).readlines()
    start = replace(pos, inode=inode)
    return start, lines, _Position(pos.offset + len(new), pos.lines + len(lines), inode, digest.hexdigest())


def _line_head(first: bytes) -> str | None:
    """A plain file's head from its first `HEAD_BYTES`: the hash of its
    first line (with the newline), or of all of them when the line is longer;
    None while neither is there."""
    end = first.find(b"\n") + 1 or (HEAD_BYTES if len(first) >= HEAD_BYTES else 0)
    return hashlib.sha256(first[:end]).hexdigest() if end else None


def _batches(start: _Position, lines: list[bytes], end: _Position, batch: int,
             gz: bool) -> Iterator[tuple[list[bytes], _Position | None]]:
    """`lines` in batches, each with the position after it. A plain file's
    position is the end of the batch's last line; a gzip's can only be the
    end of a member, so it moves with the last batch only (None before: a
    crash in between re-reads the new members, their first rows no-ops)."""
    offset = start.offset
    for first in range(0, len(lines), batch):
        chunk = lines[first:first + batch]
        offset += sum(map(len, chunk))
        if first + batch >= len(lines):
            assert gz or offset == end.offset, (offset, end)
            yield chunk, end
        else:
            yield chunk, None if gz else _Position(offset, start.lines + first + len(chunk), start.inode, end.head)


def _signed(inode: int) -> int:
    """An inode as PostgreSQL's bigint holds it (some file systems use all 64 bits)."""
    return inode - (1 << 64) if inode >= 1 << 63 else inode


def _add(into: LoadReport, part: LoadReport) -> None:
    into.files += part.files
    into.read += part.read
    into.inserted += part.inserted
    into.already += part.already
    into.corrupt += part.corrupt


@dataclass(slots=True)
class ShipperStats:
    """What the follower has done, for `rounds status` (JSON field names)."""

    postgresUp: bool = False  # camelCase: the status dict's names
    rowsLoaded: int = 0
    rowsAlready: int = 0
    corruptLines: int = 0
    lagBytes: int = 0
    lastError: str | None = None
    lastErrorAt: float | None = None
    lastLoadAt: float | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


async def follow(dsn: str, directory: Path, interval_s: float = 1.0, stop: asyncio.Event | None = None,
                 schema: str | None = None, stats: ShipperStats | None = None,
                 on_step: Callable[[ShipperStats], None] | None = None, final_step_s: float = 0.0,
                 origin: str | None = None) -> None:
    """Keep PostgreSQL up to date with the day files until `stop` is set.
    While PostgreSQL is down the files keep the events; this catches up
    when it returns, from the positions stored under `origin` (default:
    this host and `directory`). `stats` is updated after each attempt and
    handed to `on_step`. With `final_step_s`, once `stop` is set and while
    connected, one last step (bounded by that many seconds) loads what came
    meanwhile."""
    stop = stop or asyncio.Event()
    stats = stats if stats is not None else ShipperStats()
    tail = AuditTail(directory, origin=origin)
    conn: asyncpg.Connection | None = None
    delay = interval_s

    async def step() -> None:
        nonlocal conn
        if conn is None or conn.is_closed():
            conn = await connect(dsn, schema)
            await migrate(conn)
        report = LoadReport()
        try:
            await tail.step(conn, report=report)
        finally:  # the batches committed before a failure count: they are not read again
            for bad in report.corrupt:
                log.error("audit: corrupt line skipped: %s", bad)
            if report.inserted:
                log.info("audit: %d events loaded into PostgreSQL", report.inserted)
                stats.lastLoadAt = time.time()
            stats.rowsLoaded += report.inserted
            stats.rowsAlready += report.already
            stats.corruptLines += len(report.corrupt)
        stats.postgresUp = True

    def failed(exc: BaseException) -> None:
        nonlocal conn
        stats.postgresUp = False
        stats.lastError = f"{type(exc).__name__}: {exc}"
        stats.lastErrorAt = time.time()
        if conn is not None:
            conn.terminate()
            conn = None

    def report_step() -> None:
        stats.lagBytes = tail.lag_bytes()
        if on_step is not None:
            try:
                on_step(stats)
            except Exception:  # a status file that cannot be written must not stop the loading
                log.exception("audit: shipper status not recorded")

    async def wait(delay: float) -> None:
        """Until `stop` or `delay` s; while backing off, the lag is still
        reported every `interval_s` (the files grow meanwhile)."""
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(stop.wait(), min(left, interval_s))
                return
            except TimeoutError:
                if deadline - time.monotonic() > 0:
                    report_step()

    try:
        while not stop.is_set():
            try:
                await step()
                delay = interval_s
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, RuntimeError) as exc:
                log.warning("audit: loading into PostgreSQL failed (%s: %s); the files keep the events, "
                            "retrying in %.1fs", type(exc).__name__, exc, delay)
                failed(exc)
                delay = min(delay * 2, 30.0)
            report_step()
            await wait(delay)
        if final_step_s > 0 and conn is not None:
            try:
                await asyncio.wait_for(step(), final_step_s)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, RuntimeError) as exc:
                failed(exc)
            report_step()
        if conn is not None:
            await asyncio.wait_for(conn.close(), 0.5)
    except (TimeoutError, OSError, asyncpg.InterfaceError):
        pass  # closing politely failed: terminated below
    finally:  # also when cancelled (a stop that did not come back in time)
        if conn is not None and not conn.is_closed():
            conn.terminate()


class Shipper:
    """`follow` on a thread with its own event loop: the gateway's process
    ships its audit files to PostgreSQL by itself. `start` returns at once
    (PostgreSQL may be down: the follower retries); `stop` sets the loop's
    stop event, lets it load what is left (bounded) and joins the thread.
    `stats()` is a copy of the follower's counters; each step also writes
    them to `status_file` (for `rounds status`, another process)."""

    def __init__(self, dsn: str, directory: Path, interval_s: float = 1.0,
                 status_file: Path | None = None, final_step_s: float = 1.0, origin: str | None = None) -> None:
        self.dsn = dsn
        self.directory = Path(directory)
        self.origin = origin
        self.interval_s = interval_s
        self.status_file = status_file
        self.final_step_s = final_step_s
        self._stats = ShipperStats()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = threading.Event()

    def start(self) -> Shipper:
        self._thread = threading.Thread(target=self._run, name="rounds-audit-shipper", daemon=True)
        self._thread.start()
        self._ready.wait(5)
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._stop = asyncio.Event()
            self._task = loop.create_task(follow(self.dsn, self.directory, self.interval_s, self._stop,
                                                 stats=self._stats, on_step=self._record,
                                                 final_step_s=self.final_step_s, origin=self.origin))
            self._ready.set()
            loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            log.warning("audit: shipper cancelled (a step did not finish in time)")
        except Exception:
            log.exception("audit: shipper stopped")
        finally:
            self._ready.set()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def _record(self, stats: ShipperStats) -> None:
        with self._lock:
            snapshot = stats.as_dict()
        if self.status_file is not None:
            tmp = self.status_file.with_name(self.status_file.name + ".tmp")
            tmp.write_text(json.dumps({**snapshot, "at": time.time()}))
            tmp.replace(self.status_file)

    @staticmethod
    def _call(loop: asyncio.AbstractEventLoop | None, fn: Callable[[], object]) -> None:
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn)
            except RuntimeError:  # the loop has just closed
                pass

    def stats(self) -> dict[str, object]:
        with self._lock:
            return self._stats.as_dict()

    def stop(self) -> None:
        """Stop within about `final_step_s` + 0.5 s: a step still running
        then (a connection attempt to a host that does not answer) is
        cancelled; what it had not loaded stays in the files."""
        loop, thread = self._loop, self._thread
        if thread is None:
            return
        self._call(loop, lambda: self._stop.set() if self._stop is not None else None)
        thread.join(self.final_step_s + 0.6)
        if thread.is_alive():
            self._call(loop, lambda: self._task.cancel() if self._task is not None else None)
            thread.join(2.0)
        if thread.is_alive():
            log.warning("audit: shipper thread did not stop")
        self._thread = None
        if self.status_file is not None:
            self.status_file.unlink(missing_ok=True)
