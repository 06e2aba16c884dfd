"""Audit events, the NDJSON day files they go to, and the check of their chains.

One event shape for every critical step (issue #5). The embedded sink appends
one NDJSON line per event to `{var_dir}/audit/audit-YYYY-MM-DD.ndjson` (the
UTC day of the write), one `write` per line on an `O_APPEND` descriptor so
several processes can share a day's file without interleaving. Each line is
chained to the previous line of the same *writer* (source + a random
per-process epoch) by a sha256 hash; `verify_file` recomputes the chains. The
exact canonical form is in docs/audit.md: change it only with that document.
Closed days are gzipped by a background thread. Tokens are never recorded.
The PostgreSQL side (loading these files) lives in its own module.
"""

from __future__ import annotations

import asyncio
import fcntl
import gzip
import hashlib
import importlib
import itertools
import json
import json.encoder
import logging
import os
import re
import shutil
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

log = logging.getLogger("rounds.audit")

FsyncPolicy = Literal["interval", "always", "never"]
FSYNC_POLICIES: tuple[str, ...] = ("interval", "always", "never")
FSYNC_INTERVAL_S = 1.0  # "interval": a power cut loses at most about this much
GZIP_GRACE_S = 300.0  # a day is gzipped this long after its midnight: late writers of other processes finish first
_DAY_FILE = re.compile(r"^audit-(\d{4}-\d{2}-\d{2})\.ndjson$")


class _EventIds:
    """Event ids: 32 hex digits, a random half per process and a counter half.
    Unique like a random UUID (two processes share a prefix with odds of
    2^-64), at a fraction of `uuid4`'s cost (a `getrandom` call and a UUID
    object per event), and in issue order within a process. A forked child
    draws a new prefix."""

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


new_event_id = _EventIds()


def format_time(moment: datetime) -> str:
    """`2025-11-17T10:30:00.123456Z` (a quarter faster than slicing `isoformat`)."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (moment.year, moment.month, moment.day, moment.hour,
                                                   moment.minute, moment.second, moment.microsecond)


@dataclass(slots=True)  # not frozen: a frozen init costs twice as much, on the request's path
class AuditEvent:
    event_type: str  # USER_CONNECTED, CONNECTION_REJECTED, USER_DISCONNECTED, SESSION_TIMEOUT, ...
    source: str  # "frontdoor-0", "shard-3"
    outcome: str = "ok"  # "ok" | "denied" | "error"
    user_id: str | None = None
    session_id: str | None = None
    resource_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    event_id: str = field(default_factory=new_event_id)
    time: datetime = field(default_factory=lambda: datetime.now(UTC))

    def fields(self) -> dict[str, Any]:
        """The event's NDJSON fields without the chain (`writer`, `seq`, `prevHash`, `hash`)."""
        return {
            "eventId": self.event_id,
            "time": format_time(self.time),
            "eventType": self.event_type,
            "userId": self.user_id,
            "sessionId": self.session_id,
            "resourceId": self.resource_id,
            "source": self.source,
            "outcome": self.outcome,
            "details": self.details,
        }

    def to_json(self) -> str:
        return json.dumps(self.fields(), separators=(",", ":"), default=str)


# --- the chain ---------------------------------------------------------------

def _canonical_encoder() -> Callable[[Any], str]:
    """`json.dumps(x, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)`.

    `dumps` builds a new C encoder on every call (about 2 of an emit's 12 µs);
    this one is built once. Without a `markers` dict it does not look for cycles
    (1 µs more): a cyclic `details` ends in RecursionError, which emit logs.
    """
    make = json.encoder.c_make_encoder  # type: ignore[attr-defined]
    if make is None:  # no C speedups: the same bytes, slower
        encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
        return encoder.encode
    c_encoder = make(None, str, json.encoder.encode_basestring_ascii, None, ":", ",", True, False, True)
    return lambda o: "".join(c_encoder(o, 0))


_encode = _canonical_encoder()


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes that are hashed: sorted keys, no spaces, ASCII only (docs/audit.md)."""
    return _encode(record).encode()


def _builtin_sha256() -> Callable[[bytes], Any]:
    """CPython's own sha256 (`_sha2` from 3.12, `_sha256` before): the same
    digest as `hashlib.sha256`, without OpenSSL 3's cost of setting up a
    context per call. On the bench host (no SHA instructions) it hashes a
    40-byte commitment in 0.9 µs against 1.5, and a 650-byte line in 3.5
    against 4.8; an audit line takes four."""
    for name in ("_sha2", "_sha256"):
        try:
            return importlib.import_module(name).sha256  # type: ignore[no-any-return]
        except (ImportError, AttributeError):
            continue
    return hashlib.sha256


_sha256 = _builtin_sha256()


def chain_hash(prev_hash: str | None, body: bytes) -> str:
    """sha256 hex of the previous hash (empty for seq 1) followed by the canonical body."""
    return _sha256((prev_hash or "").encode() + body).hexdigest()


# --- identifiers under a commitment (erasable without breaking the chain) ---

# The fields that name a person, as `salt`/`erased` keys: a dotted name is a
# member of `details`. The chain hashes a salted commitment of each in place
# of its value, so `rounds audit erase` can replace the value by a pseudonym
# and keep the commitment (docs/audit.md, "Erasure").
PERSONAL_FIELDS: tuple[str, ...] = ("userId", "sessionId", "details.lockedBy", "details.remote")
SALT_BYTES = 16
_TOP_FIELDS = tuple(name for name in PERSONAL_FIELDS if "." not in name)
_DETAIL_FIELDS = tuple(name[8:] for name in PERSONAL_FIELDS if name.startswith("details."))


def personal_value(record: dict[str, Any], name: str) -> Any:
    if name.startswith("details."):
        details = record.get("details")
        return details.get(name[8:]) if isinstance(details, dict) else None
    return record.get(name)


def set_personal_value(record: dict[str, Any], name: str, value: Any) -> None:
    """Set a field in place; a `details` member in a copy of `details`, so the caller's copy is untouched."""
    if name.startswith("details."):
        details = record.get("details")
        record["details"] = {**(details if isinstance(details, dict) else {}), name[8:]: value}
    else:
        record[name] = value


def commitment(salt: str, value: str) -> str:
    """`sha256:` + hex sha256 of the salt (hex, as ASCII), `:`, and the value in UTF-8."""
    return "sha256:" + _sha256(f"{salt}:{value}".encode("utf-8", "surrogatepass")).hexdigest()


def sealed_body(record: dict[str, Any]) -> bytes:
    """The bytes the chain hashes for a line (its object without `hash`).

    Without `salt` and `erased` members that is the canonical JSON of the
    object. Otherwise those two members are left out, and each personal
    field is replaced by its commitment: `erased[name]` when the field was
    erased, else `commitment(salt[name], value)`; a field with neither is
    hashed as it is (lines written before identifiers were salted).
    """
    salts, erased = record.get("salt"), record.get("erased")
    if salts is None and erased is None:
        return canonical(record)
    body = {k: v for k, v in record.items() if k != "salt" and k != "erased"}
    salts = salts if isinstance(salts, dict) else {}
    erased = erased if isinstance(erased, dict) else {}
    for name in PERSONAL_FIELDS:
        if isinstance(erased.get(name), str):
            set_personal_value(body, name, erased[name])
            continue
        value, salt = personal_value(body, name), salts.get(name)
        if isinstance(value, str) and isinstance(salt, str):
            set_personal_value(body, name, commitment(salt, value))
    return canonical(body)


def hashed_line(record: dict[str, Any], digest: str) -> bytes:
    """A line as the writer writes it: the canonical object with `hash` appended last."""
    return canonical(record)[:-1] + b',"hash":"' + digest.encode() + b'"}\n'


class _Writer:
    """One chain: a source in this process. `seq` and `prev` move only under the sink's lock."""

    __slots__ = ("name", "seq", "prev")

    def __init__(self, name: str) -> None:
        self.name = name
        self.seq = 0
        self.prev: str | None = None

    def line(self, event: AuditEvent) -> bytes:
        """The event's next line of this chain, newline included; each personal
        field present gets a salt of its own.

        The line is the canonical object written out member by member, in the
        sorted order `canonical` gives it, twice where a person is named: with
        commitments in place of the personal values (the bytes hashed) and
        with the values (the bytes written), then `salt` and `hash` appended.
        Composed from the same encoded members, that costs a fifth to a
        quarter less than encoding the whole dict and substituting the values
        back (24.5 against 31 µs for a lock denial on the bench machine); the
        unit tests hold it to `sealed_body`, the verifier's rule."""
        salts: list[str] = []  # '"name":"salt"' members, in PERSONAL_FIELDS order
        user, user_sealed = _personal(event.user_id, "userId", salts)
        session, session_sealed = _personal(event.session_id, "sessionId", salts)
        details = event.details
        if details and not _str_keyed(details):
            details = _with_str_keys(details)
        if details and any(name in details for name in _DETAIL_FIELDS):
            sealed_details = dict(details)
            values = []  # (the commitment as encoded, the value as encoded)
            for name in _DETAIL_FIELDS:
                value = details.get(name)
                if isinstance(value, str):
                    sealed_details[name] = sealed = _sealed(value, "details." + name, salts)
                    values.append(('"' + sealed + '"', _json_string(value)))
            hashed = shown = _encode(sealed_details)
            for sealed, value in values:  # a commitment hashes a fresh salt: it occurs once
                shown = shown.replace(sealed, value, 1)
        else:
            hashed = shown = _encode(details)
        seq = self.seq + 1
        middle = (',"eventId":' + _member(event.event_id) + ',"eventType":' + _member(event.event_type)
                  + ',"outcome":' + _member(event.outcome)
                  + ',"prevHash":' + ("null" if self.prev is None else '"' + self.prev + '"')
                  + ',"resourceId":' + _member(event.resource_id) + ',"seq":' + str(seq) + ',"sessionId":')
        tail = (',"source":' + _member(event.source) + ',"time":"' + format_time(event.time)
                + '","userId":')
        writer = ',"writer":' + _member(self.name)
        body = ('{"details":' + hashed + middle + session_sealed + tail + user_sealed + writer + "}").encode()
        digest = chain_hash(self.prev, body)
        self.seq, self.prev = seq, digest
        if salts:
            body = ('{"details":' + shown + middle + session + tail + user + writer
                    + ',"salt":{' + ",".join(salts) + "}}").encode()
        return body[:-1] + b',"hash":"' + digest.encode() + b'"}\n'


_CONTAINERS = (dict, list, tuple)


def _str_keyed(value: Any) -> bool:
    """Whether every dict in `value`, at any depth, has only str keys (0.3 µs
    for a usual `details`). Only then do the sorted keys written stay sorted
    once read back, where every key is a str: {2: .., 10: ..} sorts 2 before
    10, "10" before "2"; mixed int and str keys do not sort at all."""
    kind = type(value)
    if kind is dict:
        for key, member in value.items():
            if type(key) is not str or (type(member) in _CONTAINERS and not _str_keyed(member)):
                return False
        return True
    return all(_str_keyed(member) for member in value if type(member) in _CONTAINERS)


def _with_str_keys(value: Any) -> Any:
    """A copy of `value` whose dicts have the keys JSON would write for them
    (1 → "1", True → "true", None → "null"; any other key its `str`): the
    object as a reader of the line will see it. Keys that collide keep the
    last member, as JSON's reader does."""
    kind = type(value)
    if kind is dict:
        return {(key if type(key) is str else _json_key(key)): _with_str_keys(member)
                for key, member in value.items()}
    if kind is list or kind is tuple:
        return [_with_str_keys(member) for member in value]
    return value


def _json_key(key: Any) -> str:
    return json.dumps(key) if key is None or isinstance(key, (int, float)) else str(key)


def _member(value: Any) -> str:
    """A value as canonical JSON writes it."""
    return _json_string(value) if type(value) is str else _encode(value)


def _sealed(value: str, name: str, salts: list[str]) -> str:
    """The commitment of a personal value under a fresh salt, its salt recorded in `salts`."""
    salt = _salts.take()
    salts.append(f'"{name}":"{salt}"')
    return commitment(salt, value)


def _personal(value: Any, name: str, salts: list[str]) -> tuple[str, str]:
    """A top-level field's member as written and as hashed (a commitment when it names someone)."""
    shown = _member(value)
    if not isinstance(value, str):
        return shown, shown
    return shown, '"' + _sealed(value, name, salts) + '"'


_json_string = json.encoder.encode_basestring_ascii  # a str as canonical JSON writes it, quotes included


class _SaltPool:
    """Salts of SALT_BYTES random bytes, as hex, cut from one `os.urandom`
    read of 256 at a time (a read per salt would be a system call per field).
    A forked child refills before its first salt, so it never repeats the parent's."""

    def __init__(self) -> None:
        self._refill()
        os.register_at_fork(after_in_child=self._refill)

    def _refill(self) -> None:
        self._lock = threading.Lock()  # sinks of several threads share the pool
        self._hex = os.urandom(256 * SALT_BYTES).hex()
        self._at = 0

    def take(self) -> str:
        with self._lock:
            if self._at >= len(self._hex):
                self._hex, self._at = os.urandom(256 * SALT_BYTES).hex(), 0
            at = self._at
            self._at = at + 2 * SALT_BYTES
            return self._hex[at:at + 2 * SALT_BYTES]


_salts = _SaltPool()


class AuditSink(Protocol):
    def emit(self, event: AuditEvent) -> None:
        """Record the event; must not block the event loop for long or raise."""

    def flush(self) -> None:
        """Write what `emit` queued, now (a service calls it when it stops)."""


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
        self._writers: dict[str, _Writer] = {}
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
                        writer = self._writers[event.source] = _Writer(self.writer_name(event.source))
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


class LoopAuditSink:
    """The audit of one event loop (a shard's, a front door's), written after
    the replies of the moment it was emitted in, a few events per loop pass.

    `emit` queues the event (its time and id are already set) and, at the
    first after the queue was empty, schedules the write: `gather_s` later
    (the gateway's `audit_gather_ms`, 20 ms by default), or with 0 two
    `call_soon` hops later. Either way it runs after every callback already
    queued, which includes the link's flush of the replies those same
    messages produced: a burst of contended lock requests is answered first
    and audited after, and the events of many passes share a warm run of the
    serialiser, which costs far less per event than one event at a time
    (docs/benchmarks.md, "Audit").

    The write goes `slice_events` at a time, one `write` each, with a loop
    pass between: a request that arrives while the audit is being written
    waits for one slice (about 0.1-0.2 ms), not for the whole window's
    events. On a crash of the process the events queued are lost; that is
    within what `interval` already allows (about a second on a power cut),
    so `always` (nothing acknowledged lost) writes at once instead
    (`loop_audit`). Outside a running loop it writes at once. `flush`
    writes everything queued, now (a service that stops).
    """

    def __init__(self, sink: FileAuditSink, gather_s: float = 0.0, slice_events: int = 8) -> None:
        self.sink = sink
        self.gather_s = gather_s
        self.slice_events = max(1, slice_events)
        self._pending: list[AuditEvent] = []
        self._head = 0  # events before it are written
        self._scheduled = False

    def emit(self, event: AuditEvent) -> None:
        self._pending.append(event)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        if self.gather_s > 0:
            loop.call_later(self.gather_s, self._write_slice)
        else:
            loop.call_soon(loop.call_soon, self._write_slice)

    def _write_slice(self) -> None:
        """Write the next slice; schedule the one after, or end the chain.

        A slice is `slice_events` or a quarter of what is queued, whichever
        is more: a loop that queues faster than eight events a pass drains
        its backlog in a few passes instead of falling behind. A callback
        left over from before a `flush` finds the queue empty, or writes
        the head of it in order: either is harmless."""
        pending, head = self._pending, self._head
        left = len(pending) - head
        n = max(self.slice_events, left // 4)
        if left > n:
            self._head = head + n
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, self._write_slice)  # after the next pass's requests
            self.sink.emit_many(pending[head:head + n])
            return
        self.flush()  # the last slice: written, and the chain ends

    def flush(self) -> None:
        """Write everything queued, now; the next `emit` starts a new gather
        (the write scheduled before may never run: the loop may have stopped)."""
        pending, head = self._pending, self._head
        self._pending, self._head, self._scheduled = [], 0, False
        if len(pending) > head:
            self.sink.emit_many(pending[head:] if head else pending)


def loop_audit(sink: AuditSink, gather_s: float = 0.0) -> AuditSink:
    """The sink one event loop's service should use: its own `LoopAuditSink`
    over shared files, unless every line must be on disk before the reply."""
    if isinstance(sink, FileAuditSink) and sink.fsync != "always":
        return LoopAuditSink(sink, gather_s)
    return sink


_SINKS: weakref.WeakSet[FileAuditSink] = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [sink._reseed() for sink in list(_SINKS)])


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


class NullAuditSink:
    """Drops every event: the gateway with `audit = "off"`. Only for measuring
    what the audit trail costs (`rounds bench audit`); a hospital deployment
    keeps the files."""

    def emit(self, event: AuditEvent) -> None:
        pass

    def flush(self) -> None:
        pass


class MemoryAuditSink:
    """Keeps events in a list: the recording double for tests."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)

    def flush(self) -> None:
        pass

    def of_type(self, event_type: str) -> list[AuditEvent]:
        return [e for e in self.events if e.event_type == event_type]


# --- verification ------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ChainBreak:
    path: str
    line: int
    writer: str
    seq: int | None
    problem: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: writer {self.writer} seq {self.seq}: {self.problem}"


@dataclass(frozen=True, slots=True)
class CorruptLine:
    path: str
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: corrupt line skipped: {self.problem}"


@dataclass(slots=True)
class WriterChain:
    """What the verifier knows of one writer: where its chain stands, and its first break."""

    writer: str
    first_seq: int | None = None
    last_seq: int = 0
    last_hash: str | None = None
    events: int = 0
    linked: bool = True  # False: the first line continues a chain from a file not checked
    broken: ChainBreak | None = None


@dataclass(slots=True)
class VerifyReport:
    path: str
    writers: dict[str, WriterChain] = field(default_factory=dict)
    corrupt: list[CorruptLine] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.corrupt and all(w.broken is None for w in self.writers.values())


def open_day_file(path: Path) -> Iterator[bytes]:
    """The lines of a plain or gzipped day file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        yield from f


def find_day_file(directory: Path, day: str) -> Path | None:
    """A day's file: the .gz when it exists (it is complete once renamed), else the plain one."""
    plain = day_path(directory, day)
    gz = plain.with_name(plain.name + ".gz")
    return gz if gz.exists() else plain if plain.exists() else None


def verify_file(path: Path, carry: dict[str, WriterChain] | None = None) -> VerifyReport:
    """Check every writer's chain in one day file.

    `carry` holds the chains as the previous day's file left them (from its own
    `verify_file`), so a writer that continues across midnight is linked; a
    writer whose first line here has seq > 1 and no carry is anchored on that
    line (`linked` False) rather than reported, since its start is elsewhere.
    After a writer's first break its later lines are not checked.
    """
    report = VerifyReport(str(path))
    number = 0
    try:
        for number, raw in enumerate(open_day_file(Path(path)), start=1):
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                report.corrupt.append(CorruptLine(str(path), number, f"not JSON ({exc})"))
                continue
            _check_line(report, carry or {}, number, record)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # a damaged gzip: what it held up to the damage
        report.corrupt.append(CorruptLine(str(path), number + 1, f"gzip damaged, the rest unreadable ({exc})"))
    return report


def _check_line(report: VerifyReport, carry: dict[str, WriterChain], number: int, record: dict[str, Any]) -> None:
    name, seq, digest = record.get("writer"), record.get("seq"), record.get("hash")
    if not isinstance(name, str) or not isinstance(seq, int) or not isinstance(digest, str):
        report.corrupt.append(CorruptLine(report.path, number, "no writer, seq or hash"))
        return
    chain = report.writers.get(name)
    if chain is None:
        before = carry.get(name)
        chain = report.writers[name] = WriterChain(name)
        if before is not None and before.broken is None:
            chain.last_seq, chain.last_hash = before.last_seq, before.last_hash
        elif seq != 1:
            chain.linked = False
            chain.last_seq, chain.last_hash = seq - 1, record.get("prevHash")
    if chain.broken is not None:
        return
    chain.events += 1
    if chain.first_seq is None:
        chain.first_seq = seq
    body = {k: v for k, v in record.items() if k != "hash"}
    problem = None
    if chain_hash(record.get("prevHash"), sealed_body(body)) != digest:
        problem = "hash does not match the line (a field was changed)"
    elif seq != chain.last_seq + 1:
        problem = f"seq {seq} where {chain.last_seq + 1} was expected (a line was deleted or moved)"
    elif record.get("prevHash") != chain.last_hash:
        problem = f"prevHash does not match the hash of seq {chain.last_seq}"
    if problem:
        chain.broken = ChainBreak(report.path, number, name, seq, problem)
        return
    chain.last_seq, chain.last_hash = seq, digest


def verify_day(directory: Path, day: str) -> VerifyReport:
    """Check a day's file, linking writers that continue from the previous day's file when it is there."""
    path = find_day_file(directory, day)
    if path is None:
        raise FileNotFoundError(f"no audit file for {day} in {directory}")
    previous = (date.fromisoformat(day) - timedelta(days=1)).isoformat()
    before = find_day_file(directory, previous)
    carry = verify_file(before).writers if before is not None else None
    return verify_file(path, carry)
