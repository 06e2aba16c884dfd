"""Time as data: the shells read the clock, machines receive `now` in ms."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def now_ms() -> int:
    """Wall-clock time in integer milliseconds since the epoch (UTC)."""
    return time.time_ns() // 1_000_000


def iso_ms(ms: int) -> str:
    """`2025-11-17T10:30:00.000Z`, the seed's timestamp shape."""
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
