"""The gateway's garbage-collector totals in a bench report (`gateway_gc`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rounds.bench.cli import _Target, _with_gateway_gc
from rounds.bench.runner import gc_text


@dataclass
class _Run:
    report: dict[str, Any] = field(default_factory=dict)


def _totals(collections: float, paused: float, full: float = 0) -> dict[str, float]:
    return {"collections": collections, "pausedMs": paused, "over10ms": 0.0, "full": full, "fullPausedMs": 4.0 * full}


def test_the_report_gets_what_the_collector_did_during_the_run() -> None:
    readings = iter([_totals(10, 5.0), _totals(25, 12.5, full=1)])
    target = _Target("ws://127.0.0.1:1/ws", [1], {}, lambda: next(readings))
    run = _with_gateway_gc(target, _Run)
    assert run.report["gateway_gc"] == {"collections": 15, "pausedMs": 7.5, "over10ms": 0, "full": 1,
                                        "fullPausedMs": 4.0}
    assert gc_text(run.report["gateway_gc"]) == "GC 15 collections paused 8 ms (0 over 10 ms; 1 full, 4 ms), "


def test_no_totals_when_a_process_did_not_answer_restarted_or_the_gateway_is_not_ours() -> None:
    silent = iter([_totals(10, 5.0), None])
    assert "gateway_gc" not in _with_gateway_gc(_Target("ws://x", [1], {}, lambda: next(silent)), _Run).report
    restarted = iter([_totals(10, 5.0), _totals(3, 1.0)])  # its counts began again
    assert "gateway_gc" not in _with_gateway_gc(_Target("ws://x", [1], {}, lambda: next(restarted)), _Run).report
    assert "gateway_gc" not in _with_gateway_gc(_Target("ws://x", None, {}), _Run).report
    assert gc_text(None) == ""
