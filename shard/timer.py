"""One asyncio timer for a machine's next deadline.

The shard's machines (presence's recovery, locks' expiries, documents'
snapshots) say when they next have something to do (`next_deadline()`, ms
since the epoch, or None); their shells keep one `DeadlineTimer` each and
re-arm it after every step, so a deadline is met even if nobody asks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from rounds.clock import now_ms


class DeadlineTimer:
    def __init__(self, fire: Callable[[], None]) -> None:
        self._fire = fire
        self._handle: asyncio.TimerHandle | None = None
        self._at: int | None = None

    def arm(self, deadline_ms: int | None) -> None:
        """Fire at `deadline_ms` (None: not at all); re-arming for the same time is free."""
        if deadline_ms == self._at:
            return
        self.cancel()
        self._at = deadline_ms
        if deadline_ms is not None:
            delay_s = max(0.0, (deadline_ms - now_ms()) / 1000)
            self._handle = asyncio.get_running_loop().call_later(delay_s, self._run)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._at = None

    def _run(self) -> None:
        self._handle = self._at = None
        self._fire()
