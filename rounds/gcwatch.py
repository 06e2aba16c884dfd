"""How long the garbage collector stops this process: a pause of the event
loop no profile of our code shows. `install()` in every gateway process;
`stats()` is reported by `rounds status`, and a pause over `WARN_MS` is
logged with its generation."""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

WARN_MS = 50.0

_started = 0.0
# full collections (generation 2) walk every object not frozen: the long pauses
_totals = {"collections": 0, "pausedMs": 0.0, "maxPauseMs": 0.0, "over10ms": 0, "full": 0, "fullPausedMs": 0.0}


def _callback(phase: str, info: dict[str, Any]) -> None:
    global _started
    if phase == "start":
        _started = time.perf_counter()
        return
    paused_ms = (time.perf_counter() - _started) * 1000
    _totals["collections"] += 1
    _totals["pausedMs"] += paused_ms
    if info.get("generation") == 2:
        _totals["full"] += 1
        _totals["fullPausedMs"] += paused_ms
    if paused_ms > _totals["maxPauseMs"]:
        _totals["maxPauseMs"] = paused_ms
    if paused_ms > 10:
        _totals["over10ms"] += 1
        if paused_ms > WARN_MS:
            log.warning("garbage collection of generation %d paused the process %.0f ms (%d objects collected)",
                        info.get("generation", -1), paused_ms, info.get("collected", 0))


def install() -> None:
    if _callback not in gc.callbacks:
        gc.callbacks.append(_callback)


def stats() -> dict[str, Any]:
    return {**_totals, "pausedMs": round(_totals["pausedMs"], 1), "maxPauseMs": round(_totals["maxPauseMs"], 2),
            "fullPausedMs": round(_totals["fullPausedMs"], 1), "youngThreshold": gc.get_threshold()[0]}
