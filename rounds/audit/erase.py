"""Erasing a person from the audit trail (issue 5, GDPR): `rounds audit erase`.

The chain hashes a salted commitment of each personal field, never the
value itself (`rounds.audit.chain.sealed_body`). Erasing a field replaces its
value by a pseudonym, a keyed hash of the value (`pseudonym`), moves the
field's commitment into the line's `erased` member and drops its salt. The
line's hash and every later link are unchanged, so `rounds audit verify`
still passes; without the salt the commitment cannot be tested against
guessed identifiers, and without the key the pseudonym cannot either. The
same person has the same pseudonym everywhere, so their events stay
linked (and the key's holder can answer "is anon:... this person?").

Which fields: in the events of the user (`userId` is theirs) their
`userId`, `sessionId` and `details.remote` (their address); in any event,
`details.lockedBy` when it names them. A line written before identifiers
were salted cannot be erased without breaking its chain: it is counted as
`unsalted` and left as it is.

Files are rewritten whole (a temporary file, fsynced, renamed over the
old), under the directory's rewrite lock (`rounds.audit.rewrite_lock`), and
only when no gateway holds the file open: a writer holds a shared `flock`
on its open day file, so a file in use is reported and left for a later run
(`rounds audit erase` is idempotent). In PostgreSQL the same rows are
updated in one transaction, which needs a role that may UPDATE (the
gateway's may not).

What must not be here: argument parsing (`rounds.audit.cli`), the chain's
definition (`rounds.audit.chain`).
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import os
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from rounds.audit.chain import commitment, hashed_line, personal_value, set_personal_value
from rounds.audit.files import fsync_dir, lock_exclusive, rewrite_lock
from rounds.audit.pg import COLUMNS, row_from_record
from rounds.audit.rows import day_files, jsonb_text, open_day_file

# The kind of identifier of each personal field: one person's user id has
# the same pseudonym as `userId` and as `details.lockedBy`.
KIND = {"userId": "user", "details.lockedBy": "user", "sessionId": "session", "details.remote": "address"}
OWN_FIELDS = ("userId", "sessionId", "details.remote")  # erased in the user's own events
MIN_KEY_BYTES = 16


def pseudonym(key: bytes, kind: str, value: str) -> str:
    """`anon:` + the first 32 hex digits of HMAC-SHA256(key, kind + ":" + value)."""
    mac = hmac.new(key, f"{kind}:{value}".encode("utf-8", "surrogatepass"), hashlib.sha256)
    return "anon:" + mac.hexdigest()[:32]


class UnsaltedLine(ValueError):
    """A line that names the user but was written before identifiers were salted."""


def erase_record(record: dict[str, Any], user_id: str, key: bytes) -> dict[str, Any] | None:
    """The line's object (with its `hash`) with `user_id`'s identifiers
    pseudonymised, or None when it does not name them. Raises UnsaltedLine
    for a line whose chain hashes the identifier itself."""
    names = [name for name in OWN_FIELDS if record.get("userId") == user_id]
    if personal_value(record, "details.lockedBy") == user_id:
        names.append("details.lockedBy")
    salts = dict(record.get("salt") or {})
    erased = dict(record.get("erased") or {})
    erasing = [name for name in names
               if isinstance(personal_value(record, name), str) and name not in erased]
    if not erasing:
        return None
    if any(not isinstance(salts.get(name), str) for name in erasing):
        raise UnsaltedLine(f"event {record.get('eventId')} was written before identifiers were salted")
    new = dict(record)
    for name in erasing:
        value = personal_value(record, name)
        erased[name] = commitment(salts.pop(name), value)
        set_personal_value(new, name, pseudonym(key, KIND[name], value))
    new.pop("salt", None)
    if salts:
        new["salt"] = salts
    new["erased"] = erased
    return new


def _needle(user_id: str) -> bytes:
    """The user id as it appears in a line (JSON string, ASCII escapes): a
    line without it cannot name the user and is copied as it is."""
    return json.dumps(user_id, ensure_ascii=True).encode()


@dataclass(slots=True)
class FileErasure:
    path: Path
    lines: int = 0  # lines rewritten
    unsalted: int = 0  # lines naming the user that could not be erased
    in_use: bool = False  # held open by a writer: nothing rewritten, run again later


def erase_file(path: Path, user_id: str, key: bytes, dry_run: bool = False) -> FileErasure:
    """Rewrite one day file (plain or gzipped) with the user's identifiers
    pseudonymised, streaming. Call under `rewrite_lock` of its directory."""
    result = FileErasure(path)
    needle = _needle(user_id)
    with closing(open_day_file(path)) as lines:
        if not any(needle in line for line in lines):
            return result
    with open(path, "rb") as held:
        if not lock_exclusive(held):
            result.in_use = True
            return result
        with closing(open_day_file(path)) as lines:
            erased = _erased_lines(lines, needle, user_id, key, result)
            if dry_run:
                for _ in erased:
                    pass
            else:
                _replace(path, erased, keep=lambda: result.lines > 0)
    return result


def _erased_lines(lines: Iterator[bytes], needle: bytes, user_id: str, key: bytes,
                  result: FileErasure) -> Iterator[bytes]:
    for line in lines:
        if needle not in line:
            yield line
            continue
        try:
            record = json.loads(line)
            new = erase_record(record, user_id, key) if isinstance(record, dict) else None
        except UnsaltedLine:
            result.unsalted += 1
            new = None
        except ValueError:  # a corrupt line stays as it is; verify reports it
            new = None
        if new is None:
            yield line
            continue
        result.lines += 1
        digest = new.pop("hash")
        yield hashed_line(new, digest)


def _replace(path: Path, lines: Iterator[bytes], keep: Callable[[], bool]) -> None:
    """Write `lines` to a temporary file beside `path` and rename it over
    `path` if `keep()` says so once they are written (else drop it)."""
    tmp = path.with_name(f".{path.name}.erase.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as raw:
            if path.name.endswith(".gz"):
                with gzip.GzipFile(filename=path.name[:-3], mode="wb", fileobj=raw, mtime=0) as gz:
                    gz.writelines(lines)
            else:
                raw.writelines(lines)
            raw.flush()
            os.fsync(raw.fileno())
        if not keep():
            return
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


@dataclass(slots=True)
class Erasure:
    user_pseudonym: str
    files: list[FileErasure] = field(default_factory=list)
    rows: int = 0  # PostgreSQL rows updated
    unsalted_rows: int = 0

    @property
    def lines(self) -> int:
        return sum(f.lines for f in self.files)

    @property
    def in_use(self) -> list[Path]:
        return [f.path for f in self.files if f.in_use]

    @property
    def unsalted(self) -> int:
        return sum(f.unsalted for f in self.files) + self.unsalted_rows

    @property
    def complete(self) -> bool:
        return not self.in_use and not self.unsalted


def erase_files(directory: Path, user_id: str, key: bytes, erasure: Erasure, dry_run: bool = False) -> None:
    with rewrite_lock(directory):
        for path in day_files(directory):
            erasure.files.append(erase_file(path, user_id, key, dry_run))


async def erase_db(conn: asyncpg.Connection, user_id: str, key: bytes, erasure: Erasure,
                   dry_run: bool = False) -> None:
    """Pseudonymise the user's rows of `audit_events` in one transaction.
    `details->>'lockedBy'` has no index: this reads every partition."""
    async with conn.transaction():
        records = await conn.fetch(
            f"SELECT {', '.join(COLUMNS)} FROM audit_events WHERE user_id = $1 OR details->>'lockedBy' = $1 "
            "FOR UPDATE", user_id)
        changed = []
        for record in records:
            try:
                new = erase_record(row_from_record(record).fields(), user_id, key)
            except UnsaltedLine:
                erasure.unsalted_rows += 1
                continue
            if new is not None:
                changed.append((record["event_id"], record["time"], new))
        erasure.rows = len(changed)
        if dry_run or not changed:
            return
        await conn.executemany(
            "UPDATE audit_events SET user_id = $3, session_id = $4, details = $5::jsonb, salt = $6::jsonb, "
            "erased = $7::jsonb WHERE event_id = $1 AND time = $2",
            [(event_id, time, new["userId"], new["sessionId"], jsonb_text(new["details"]), jsonb_text(new.get("salt")),
              jsonb_text(new["erased"])) for event_id, time, new in changed])
