"""Audit events and where they go.

One event shape for every critical step (connections now; joins, locks and
document updates as their issues land). The embedded sink appends NDJSON to
`{var_dir}/audit/audit-YYYY-MM-DD.ndjson` (UTC day), one `write` per line on
an `O_APPEND` descriptor so several processes can share a day's file without
interleaving. The PostgreSQL sink, hash chaining, fsync policy and rotation
come with the Audit trail issue (#5). Tokens are never recorded.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("rounds.audit")


@dataclass(frozen=True, slots=True)
class AuditEvent:
    event_type: str  # USER_CONNECTED, CONNECTION_REJECTED, USER_DISCONNECTED, SESSION_TIMEOUT, ...
    source: str  # "frontdoor-0", "shard-3"
    outcome: str = "ok"  # "ok" | "denied" | "error"
    user_id: str | None = None
    session_id: str | None = None
    resource_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    time: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_json(self) -> str:
        return json.dumps({
            "eventId": self.event_id,
            "time": self.time.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
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
        self._day: str | None = None
        self._fd: int | None = None

    def path_for(self, day: str) -> Path:
        return self.directory / f"audit-{day}.ndjson"

    def emit(self, event: AuditEvent) -> None:
        line = event.to_json()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", line)
        day = event.time.strftime("%Y-%m-%d")
        try:
            if day != self._day:
                self._reopen(day)
            assert self._fd is not None
            os.write(self._fd, (line + "\n").encode())
        except OSError:
            log.exception("audit write failed; the event: %s", line)

    def _reopen(self, day: str) -> None:
        self.close()
        self._fd = os.open(self.path_for(day), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._day = day

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._day = None


class MemoryAuditSink:
    """Keeps events in a list: the recording double for tests."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)

    def of_type(self, event_type: str) -> list[AuditEvent]:
        return [e for e in self.events if e.event_type == event_type]
