"""Reading the day files: which files hold which days, their lines, and each
line as an `AuditRow` (the event's fields, its time parsed) or a
`CorruptLine`. What the loader, the search and the shipper read; no I/O but
reading files.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from rounds.audit.events import format_time
from rounds.audit.files import day_path


@dataclass(frozen=True, slots=True)
class CorruptLine:
    """A line of a day file that is not an event (or the unreadable rest of a file)."""

    path: str
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.problem}"


def open_day_file(path: Path) -> Generator[bytes, None, None]:
    """The lines of a plain or gzipped day file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        yield from f


def find_day_file(directory: Path, day: str) -> Path | None:
    """A day's file: the .gz when it exists (it is complete once renamed), else the plain one."""
    plain = day_path(directory, day)
    gz = plain.with_name(plain.name + ".gz")
    return gz if gz.exists() else plain if plain.exists() else None


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One event as stored: the NDJSON line's fields, `time` parsed."""

    event_id: str
    time: datetime
    event_type: str
    user_id: str | None
    session_id: str | None
    resource_id: str | None
    source: str
    outcome: str
    details: dict[str, Any]
    writer: str | None = None
    seq: int | None = None
    prev_hash: str | None = None
    hash: str | None = None
    salt: dict[str, str] | None = None  # the salts of its personal fields (rounds.audit.chain.sealed_body)
    erased: dict[str, str] | None = None  # the commitments of its erased fields (rounds audit erase)

    def record(self) -> tuple[Any, ...]:
        """The row for COPY, in `COLUMNS` order."""
        return (self.event_id, self.time, self.event_type, self.user_id, self.session_id, self.resource_id,
                self.source, self.outcome, jsonb_text(self.details), self.writer,
                self.seq, self.prev_hash, self.hash, jsonb_text(self.salt), jsonb_text(self.erased))

    def fields(self) -> dict[str, Any]:
        """The event in the NDJSON file's field names (`time` in microseconds,
        `Z`); `salt` and `erased` only when the line had them."""
        found = {
            "eventId": self.event_id, "time": format_time(self.time), "eventType": self.event_type,
            "userId": self.user_id, "sessionId": self.session_id, "resourceId": self.resource_id,
            "source": self.source, "outcome": self.outcome, "details": self.details, "writer": self.writer,
            "seq": self.seq, "prevHash": self.prev_hash, "hash": self.hash,
        }
        if self.salt is not None:
            found["salt"] = self.salt
        if self.erased is not None:
            found["erased"] = self.erased
        return found

    def to_json(self) -> str:
        return json.dumps(self.fields(), separators=(",", ":"))


def jsonb_text(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


class BadLine(ValueError):
    """A line that is not an audit event; the message says why."""


def parse_time(text: str) -> datetime:
    """Any ISO 8601 time the writers have used (`...Z`, `+00:00`, with or
    without fractions); a time without zone is UTC."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _text(obj: dict[str, Any], key: str, required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise BadLine(f"{key} is missing")
        return None
    if not isinstance(value, str):
        raise BadLine(f"{key} is not a string")
    if "\x00" in value:
        raise BadLine(f"{key} holds a NUL character")  # PostgreSQL text cannot
    return value


def parse_line(line: str | bytes) -> AuditRow:
    """One NDJSON line as a row; `BadLine` says what is wrong with it."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadLine(f"not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise BadLine("not a JSON object")
    time_text = _text(obj, "time", required=True)
    assert time_text is not None
    try:
        moment = parse_time(time_text)
    except ValueError:
        raise BadLine(f"time {time_text!r} is not an ISO 8601 time") from None
    details = obj.get("details")
    if details is None:
        details = {}
    if not isinstance(details, dict):
        raise BadLine("details is not an object")
    if "\\u0000" in json.dumps(details):
        raise BadLine("details hold a NUL character")  # jsonb cannot
    seq = obj.get("seq")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool)):
        raise BadLine("seq is not an integer")
    salt, erased = _text_map(obj, "salt"), _text_map(obj, "erased")
    return AuditRow(
        event_id=_text(obj, "eventId", required=True) or "",
        time=moment,
        event_type=_text(obj, "eventType", required=True) or "",
        user_id=_text(obj, "userId"),
        session_id=_text(obj, "sessionId"),
        resource_id=_text(obj, "resourceId"),
        source=_text(obj, "source") or "",
        outcome=_text(obj, "outcome") or "ok",
        details=details,
        writer=_text(obj, "writer"),
        seq=seq,
        prev_hash=_text(obj, "prevHash"),
        hash=_text(obj, "hash"),
        salt=salt,
        erased=erased,
    )


def _text_map(obj: dict[str, Any], key: str) -> dict[str, str] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) and "\x00" not in v for v in value.values()):
        raise BadLine(f"{key} is not an object of strings")
    return value


_DAY_FILE = re.compile(r"^audit-(\d{4}-\d{2}-\d{2})\.ndjson(\.gz)?$")


def day_files(directory: Path, since: datetime | None = None, until: datetime | None = None) -> list[Path]:
    """The day files (plain and gzipped) in date order, only the days that
    can hold events in [since, until]."""
    found = []
    for path in directory.iterdir() if directory.is_dir() else ():
        m = _DAY_FILE.match(path.name)
        if not m:
            continue
        day = date.fromisoformat(m[1])
        if since is not None and day < since.astimezone(UTC).date():
            continue
        if until is not None and day > until.astimezone(UTC).date():
            continue
        found.append((day, path.name, path))
    return [p for _, _, p in sorted(found)]


def parse_lines(path: Path, lines: Iterable[bytes], first_line_no: int = 1) -> Iterator[AuditRow | CorruptLine]:
    """The rows of some lines of `path`, and a `CorruptLine` for each line
    that is not an event (blank lines are skipped)."""
    for line_no, line in enumerate(lines, first_line_no):
        if line.strip():
            yield _parse_numbered(path, line_no, line)


def _parse_numbered(path: Path, line_no: int, line: bytes) -> AuditRow | CorruptLine:
    try:
        return parse_line(line)
    except BadLine as exc:
        return CorruptLine(str(path), line_no, str(exc))


def read_file(path: Path) -> Iterator[AuditRow | CorruptLine]:
    """The rows of one day file (as `parse_lines`). A gzip file cut short
    yields what it holds, then a `CorruptLine` for the rest."""
    opener = gzip.open if path.suffix == ".gz" else open
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield _parse_numbered(path, line_no, line)
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        yield CorruptLine(str(path), line_no + 1, f"file unreadable from here ({type(exc).__name__}: {exc})")

