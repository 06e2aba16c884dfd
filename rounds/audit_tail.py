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
reconnect with backoff while PostgreSQL is down. `Shipper` runs `follow` on
a thread of its own (its own event loop) beside the gateway's supervisor,
and reports what it has done (`ShipperStats`).
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
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

    def lag_bytes(self) -> int:
        """Bytes of the day files not loaded yet (a gzip counts its
        compressed bytes; a file not yet read counts whole)."""
        lag = 0
        for path in day_files(self.directory):
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            pos = self._loaded.get(path.name)
            lag += size - pos.offset if pos is not None and size >= pos.offset else size
        return lag


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
                 on_step: Callable[[ShipperStats], None] | None = None, final_step_s: float = 0.0) -> None:
    """Keep PostgreSQL up to date with the day files until `stop` is set.
    While PostgreSQL is down the files keep the events; this catches up
    when it returns. `stats` is updated after each attempt and handed to
    `on_step`. With `final_step_s`, once `stop` is set and while connected,
    one last step (bounded by that many seconds) loads what came meanwhile."""
    stop = stop or asyncio.Event()
    stats = stats if stats is not None else ShipperStats()
    tail = AuditTail(directory)
    conn: asyncpg.Connection | None = None
    delay = interval_s

    async def step() -> None:
        nonlocal conn
        if conn is None or conn.is_closed():
            conn = await connect(dsn, schema)
            await migrate(conn)
        report = await tail.step(conn)
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
            except asyncio.TimeoutError:
                if deadline - time.monotonic() > 0:
                    report_step()

    try:
        while not stop.is_set():
            try:
                await step()
                delay = interval_s
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    RuntimeError) as exc:
                log.warning("audit: loading into PostgreSQL failed (%s: %s); the files keep the events, "
                            "retrying in %.1fs", type(exc).__name__, exc, delay)
                failed(exc)
                delay = min(delay * 2, 30.0)
            report_step()
            await wait(delay)
        if final_step_s > 0 and conn is not None:
            try:
                await asyncio.wait_for(step(), final_step_s)
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    RuntimeError) as exc:
                failed(exc)
            report_step()
        if conn is not None:
            await asyncio.wait_for(conn.close(), 0.5)
    except (OSError, asyncio.TimeoutError, asyncpg.InterfaceError):
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
                 status_file: Path | None = None, final_step_s: float = 1.0) -> None:
        self.dsn = dsn
        self.directory = Path(directory)
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
                                                 final_step_s=self.final_step_s))
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
