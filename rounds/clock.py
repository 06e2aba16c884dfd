"""Time as data: the shells read the clock, machines receive `now` in ms."""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime


def now_ms() -> int:
    """Wall-clock time in integer milliseconds since the epoch (UTC)."""
    return time.time_ns() // 1_000_000


@functools.lru_cache(maxsize=65_536)
def iso_ms(ms: int) -> str:
    """`2025-11-17T10:30:00.000Z`, the seed's timestamp shape.

    Cached: every `RESOURCE_STATE` and `resource:all_users` formats the join
    times of a whole room, and those few values repeat."""
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
