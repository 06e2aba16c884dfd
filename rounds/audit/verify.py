"""Checking the chains of the day files (`rounds audit verify`).

Each writer's lines must follow one another (seq, prevHash) and each line
must hash to what it says (`rounds.audit.chain`); a writer that continues
from the previous day's file is linked across midnight. PostgreSQL's rows
are checked by the same rule (`rounds.audit.pg.verify_db`).
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from rounds.audit.chain import chain_hash, sealed_body
from rounds.audit.rows import CorruptLine, find_day_file, open_day_file


@dataclass(frozen=True, slots=True)
class ChainBreak:
    path: str
    line: int
    writer: str
    seq: int | None
    problem: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: writer {self.writer} seq {self.seq}: {self.problem}"


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
            check_line(report, carry or {}, number, record)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # a damaged gzip: what it held up to the damage
        report.corrupt.append(CorruptLine(str(path), number + 1, f"gzip damaged, the rest unreadable ({exc})"))
    return report


def check_line(report: VerifyReport, carry: dict[str, WriterChain], number: int, record: dict[str, Any]) -> None:
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
