"""The NDJSON day files: `FileAuditSink` and the housekeeping of the days.

The embedded sink appends one line per event to
`{var_dir}/audit/audit-YYYY-MM-DD.ndjson` (the UTC day of the write, by the
sink's clock), one `write` per line on an `O_APPEND` descriptor, so several
processes can share a day's file without interleaving. Each writer's lines
form a chain (`rounds.audit.chain`). Closed days are gzipped by a background
thread; a rewrite (erasure) takes the directory's lock first.
"""

from __future__ import annotations

import fcntl
import gzip
import logging
import os
import re
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

from rounds.audit.chain import LineWriter
from rounds.audit.events import AuditEvent

log = logging.getLogger("rounds.audit")

FsyncPolicy = Literal["interval", "always", "never"]
FSYNC_POLICIES: tuple[str, ...] = ("interval", "always", "never")
FSYNC_INTERVAL_S = 1.0  # "interval": a power cut loses at most about this much
GZIP_GRACE_S = 300.0  # a day is gzipped this long after its midnight: late writers of other processes finish first
_DAY_FILE = re.compile(r"^audit-(\d{4}-\d{2}-\d{2})\.ndjson$")


def day_path(directory: Path, day: date | str) -> Path:
    return Path(directory) / f"audit-{day if isinstance(day, str) else day.isoformat()}.ndjson"


class FileAuditSink:
    """NDJSON lines in one file per UTC day, hash-chained per writer.

    `clock` (epoch seconds) decides the day file and which days are closed;
    tests pass a fake one. `fsync` is the durability policy (docs/audit.md):
    "interval" syncs at most once a second from the housekeeping thread,
    "always" after each line, "never" leaves it to the kernel. The same line
    goes to the log at DEBUG only (built only when DEBUG is on): at INFO every
    lock step would also pay for a log record, and Ray would ship it.
    """

    def __init__(self, directory: str | Path, fsync: str = "interval",
                 clock: Callable[[], float] = time.time, housekeeping: bool = True) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"audit_fsync must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._clock = clock
        self._fd: int | None = None
        self._day_end = float("-inf")  # epoch second at which the open file's day ends
        self._dirty = False
        self._housekeeping = housekeeping
        self._thread: threading.Thread | None = None
        self._reseed()
        _SINKS.add(self)

    def _reseed(self) -> None:
        # A forked child is a new writer: its own epoch, its own chains, no thread yet,
        # and a fresh lock (another thread of the parent may have held it at the fork).
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._epoch = os.urandom(6).hex()
        self._writers: dict[str, LineWriter] = {}
        self._thread = None

    def writer_name(self, source: str) -> str:
        return f"{source}#{self._epoch}"

    def path_for(self, day: str) -> Path:
        return day_path(self.directory, day)

    def emit(self, event: AuditEvent) -> None:
        self.emit_many((event,))

    def flush(self) -> None:
        """Nothing is queued: each emit is written at once."""

    def emit_many(self, events: Sequence[AuditEvent]) -> None:
        """Record events in order with one `write` (one line each). An event
        that cannot be serialised is logged and skipped, the others written."""
        if log.isEnabledFor(logging.DEBUG):
            for event in events:
                log.debug("%s", event.to_json())
        now = self._clock()
        try:
            with self._lock:
                if now >= self._day_end or self._fd is None:
                    self._reopen(now)
                lines = []
                for event in events:
                    writer = self._writers.get(event.source)
                    if writer is None:
                        writer = self._writers[event.source] = LineWriter(self.writer_name(event.source))
                    try:
                        lines.append(writer.line(event))
                    except (TypeError, ValueError, RecursionError):
                        log.exception("audit event not serialisable, skipped: %s", event)
                assert self._fd is not None
                os.write(self._fd, lines[0] if len(lines) == 1 else b"".join(lines))
                if self.fsync == "always":
                    os.fsync(self._fd)
                else:
                    self._dirty = True
            if self._housekeeping and self._thread is None:
                self._start_housekeeping()
        except OSError:
            log.exception("audit write failed; the events: %s", events)

    def _reopen(self, now: float) -> None:
        """Open today's file (UTC, by the sink's clock); the old day's is synced and closed.

        The open file is held with a shared `flock`: a rewrite (`rounds audit
        erase`, the gzip of a closed day) takes it exclusively, so it never
        replaces a file a writer appends to. A rewrite that renamed a new file
        over the name while this one waited for the lock is seen by its inode,
        and the new file is opened instead."""
        self._close_fd()
        day = datetime.fromtimestamp(now, UTC).date()
        path = self.path_for(day.isoformat())
        while True:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._fd = fd
        self._day_end = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() + 86_400

    def close_past_day(self) -> None:
        """Close the open file once its day is over, so that a writer with
        nothing to say after midnight does not hold yesterday's file (the
        housekeeping thread, every second)."""
        with self._lock:
            if self._fd is not None and self._clock() >= self._day_end:
                self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            if self.fsync != "never" and self._dirty:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            self._dirty = False
            self._day_end = float("-inf")

    def sync(self) -> None:
        """fsync the open file if lines were written since the last sync (the "interval" tick).
        The descriptor is duplicated under the lock so a day switch cannot close it mid-sync,
        and the slow fsync itself runs outside the lock, off emit's path."""
        with self._lock:
            if self._fd is None or not self._dirty:
                return
            fd = os.dup(self._fd)
            self._dirty = False
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def compress_closed_days(self) -> list[Path]:
        """Gzip every plain day file whose day ended GZIP_GRACE_S ago or more; returns the new .gz files.
        This sink's own file of a past day is closed first (a file held open is not gzipped)."""
        self.close_past_day()
        return compress_closed_days(self.directory, self._clock())

    def _start_housekeeping(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._housekeep, name="audit-housekeeping", daemon=True)
        self._thread.start()

    def _housekeep(self) -> None:
        next_gzip = 0.0
        while not self._stop.wait(FSYNC_INTERVAL_S):
            try:
                if self.fsync == "interval":
                    self.sync()
                self.close_past_day()
                if time.monotonic() >= next_gzip:
                    next_gzip = time.monotonic() + 60
                    self.compress_closed_days()
            except OSError:
                log.exception("audit housekeeping failed; retrying in %.0f s", FSYNC_INTERVAL_S)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            self._close_fd()



_SINKS: weakref.WeakSet[FileAuditSink] = weakref.WeakSet()
def _reseed_all() -> None:
    """In a forked child, every sink is a writer of its own."""
    for sink in list(_SINKS):
        sink._reseed()


os.register_at_fork(after_in_child=_reseed_all)


def lock_exclusive(file: Any, wait: bool = False) -> bool:
    """Take an exclusive `flock` on an open file: a rewriter's side of the
    handshake with the writers, who hold their open day file shared. False,
    holding nothing, when `wait` is False and someone else holds it."""
    try:
        fcntl.flock(file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


@contextmanager
def rewrite_lock(directory: Path, wait: bool = True) -> Iterator[bool]:
    """Hold the directory's rewrite lock (`flock` on `.rewrite.lock`): one
    rewriter of its files at a time, gzip or erase. Yields False, holding
    nothing, when `wait` is False and another process holds it."""
    with open(Path(directory) / ".rewrite.lock", "a") as lock:
        yield lock_exclusive(lock, wait)


def compress_closed_days(directory: Path, now: float, grace_s: float = GZIP_GRACE_S) -> list[Path]:
    """Gzip closed day files: `audit-D.ndjson` becomes `audit-D.ndjson.gz`, never today's.

    Only under the directory's rewrite lock, and only a file no writer holds
    open (`FileAuditSink` holds its open file with a shared `flock`); what
    is skipped is tried again at the next call (a minute later).

    The gzip is written to a temporary name, synced, and renamed over the final
    name before the plain file is removed, so a reader always finds one complete
    copy (when both exist, the .gz is complete). Several processes may race on
    the same day: each writes its own temporary file and the rename is atomic.
    Lines appended after the gzip (a process whose clock is late) are added to
    it as a second gzip member, never written over it.
    """
    with rewrite_lock(directory, wait=False) as held:
        if not held:
            return []
        done = []
        for path in sorted(Path(directory).iterdir()):
            match = _DAY_FILE.match(path.name)
            if not match:
                continue
            day = date.fromisoformat(match.group(1))
            day_end = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() + 86_400
            if now >= day_end + grace_s and _compress_day(path):
                done.append(path.with_name(path.name + ".gz"))
        return done


def _compress_day(path: Path) -> bool:
    """Gzip one closed day file unless a writer holds it; whether it was done."""
    try:
        held = open(path, "rb")
    except FileNotFoundError:
        return False
    with held:
        if not lock_exclusive(held):
            return False
        target = path.with_name(path.name + ".gz")
        tmp = path.with_name(f".{path.name}.gz.{os.getpid()}.tmp")
        try:
            if target.exists() and _already_in(target, path):  # a crash between rename and unlink
                path.unlink(missing_ok=True)
                return False
            with open(path, "rb") as src, open(tmp, "wb") as raw:
                if target.exists():  # a writer with a late clock appended after the gzip: keep both
                    with open(target, "rb") as old:
                        shutil.copyfileobj(old, raw, 1 << 20)
                with gzip.GzipFile(filename=path.name, mode="wb", fileobj=raw, mtime=0) as gz:
                    shutil.copyfileobj(src, gz, 1 << 20)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, target)
            path.unlink(missing_ok=True)
        except FileNotFoundError:  # removed meanwhile (retention)
            tmp.unlink(missing_ok=True)
            return False
    fsync_dir(path.parent)
    return True


def _already_in(gz: Path, plain: Path) -> bool:
    """Whether the plain file's lines are the end of the gzip's (so it was compressed already)."""
    with gzip.open(gz, "rb") as f:
        return f.read().endswith(plain.read_bytes())


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

