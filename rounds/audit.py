"""Audit events and where they go.

One event shape for every critical step (connections now; joins, locks and
document updates as their issues land). The embedded sink appends NDJSON to
`{var_dir}/audit/audit-YYYY-MM-DD.ndjson` (UTC day), one `write` per line on
an `O_APPEND` descriptor so several processes can share a day's file without
interleaving. The PostgreSQL sink, hash chaining, fsync policy and rotation
come with the Audit trail issue (#5). Tokens are never recorded.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("rounds.audit")


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


@dataclass(frozen=True, slots=True)
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

    def to_json(self) -> str:
        return json.dumps({
            "eventId": self.event_id,
            # `2025-11-17T10:30:00.123456Z`; isoformat is the C fast path of strftime's result
            "time": self.time.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z",
            "eventType": self.event_type,
            "userId": self.user_id,
            "sessionId": self.session_id,
            "resourceId": self.resource_id,
            "source": self.source,
            "outcome": self.outcome,
            "details": self.details,
        }, separators=(",", ":"), sort_keys=False)


class AuditSink(Protocol):
    def emit(self, event: AuditEvent) -> None:
        """Record the event; must not block the event loop for long or raise."""


class FileAuditSink:
    """NDJSON lines in one file per UTC day. The file is the record; the same
    line goes to the log at DEBUG only (built only when DEBUG is on): at INFO
    every lock step would also pay for a log record, and Ray would ship it."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._date: date | None = None
        self._fd: int | None = None

    def path_for(self, day: str) -> Path:
        return self.directory / f"audit-{day}.ndjson"

    def emit(self, event: AuditEvent) -> None:
        line = event.to_json()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", line)
        moment = event.time.astimezone(UTC)
        try:
            if moment.date() != self._date:
                self._reopen(moment.date())
            assert self._fd is not None
            os.write(self._fd, (line + "\n").encode())
        except OSError:
            log.exception("audit write failed; the event: %s", line)

    def _reopen(self, day: date) -> None:
        self.close()
        self._fd = os.open(self.path_for(day.isoformat()), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._date = day

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._date = None


class MemoryAuditSink:
    """Keeps events in a list: the recording double for tests."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)

    def of_type(self, event_type: str) -> list[AuditEvent]:
        return [e for e in self.events if e.event_type == event_type]
