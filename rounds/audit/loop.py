"""The audit of one event loop: events gathered and written between the
loop's other work, so a reply is never kept waiting for its audit line."""

from __future__ import annotations

import asyncio

from rounds.audit.events import AuditEvent, AuditSink
from rounds.audit.files import FileAuditSink


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

