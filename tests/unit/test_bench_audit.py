"""`rounds bench audit`: the sink cases, the lock comparison, the report, and the
gateway's audit switch (no Ray, no PostgreSQL: an unreachable DSN is skipped)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rounds.audit import AuditEvent, FileAuditSink, NullAuditSink
from rounds.bench import audit
from rounds.config import Settings, load_settings
from rounds.services import audit_sink


def _locks_report(p99: float, ok: bool = True) -> dict[str, Any]:
    figures = {"count": 100, "min": 0.1, "mean": 0.5, "p50": p99 / 4, "p95": p99 / 2, "p99": p99, "max": p99 * 2}
    phases = {"uncontended": {"acquire": figures, "release": figures},
              "contended": {"acquire": figures, "release": figures}}
    return {"ok": ok, "runs": [{
        "backend": "memory", "latency_ms": phases, "failures": {"total": 0}, "aborted": None,
        "gateway": {"cpu_percent_measured": 50.0}, "presence": {"users": {"connected": 500}},
    }]}


def test_sink_case_one_and_several_processes_write_intact_chains(tmp_path: Path) -> None:
    options = audit.AuditOptions(sink_seconds=5, sink_max_events=300, processes=2, dsn=None)
    one = audit.run_sink_case(audit.SinkCase(1, "interval"), tmp_path / "one", options)
    two = audit.run_sink_case(audit.SinkCase(2, "never"), tmp_path / "two", options)
    assert (one["events"], one["lines_in_files"], one["chains_intact"]) == (300, 300, True)
    assert (two["events"], two["lines_in_files"], two["chains_intact"]) == (600, 600, True)
    assert len(two["files"]) == 1 and len(two["events_per_s_per_process"]) == 2
    assert one["events_per_s"] > 0


def test_run_audit_compares_files_with_off_and_cleans_its_scratch(tmp_path: Path) -> None:
    seen: list[tuple[str, Path]] = []

    def runner(mode: str, var_dir: Path) -> dict[str, Any]:
        seen.append((mode, var_dir))
        if mode == "files":  # what the gateway would have written
            sink = FileAuditSink(var_dir / "audit", housekeeping=False)
            for i in range(7):
                sink.emit(AuditEvent("LOCK_ACQUIRED", "shard-0", resource_id=f"r{i}"))
            sink.close()
        return _locks_report(4.2 if mode == "files" else 4.0)

    options = audit.AuditOptions(sink_seconds=5, sink_max_events=50, processes=2, fsync_policies=("never",),
                                 dsn="postgresql://postgres@127.0.0.1:1/none")
    report = audit.run_audit(options, tmp_path, lambda line: None, runner)
    assert [m for m, _ in seen] == ["files", "off"]
    assert not Path(report["scratch_dir"]).exists()
    assert list(tmp_path.iterdir()) == []
    assert [c["case"] for c in report["sink"]] == ["1p-never", "2p-never"]
    assert "unreachable" in report["postgres"]["skipped"]
    locks = report["locks"]
    assert locks["runs"]["files"]["audit_events_written"] == 7
    assert locks["runs"]["off"]["audit_events_written"] == 0
    assert locks["ratio_p99"]["uncontended.acquire"] == pytest.approx(1.05)
    assert all(locks["target_met"].values())
    assert report["ok"]
    json.dumps(report)
    table = audit.format_table(report)
    assert "skipped" in table and "1.050 met" in table and "never" in table


def test_the_gateway_off_can_go_first(tmp_path: Path) -> None:
    order: list[str] = []
    options = audit.AuditOptions(sink_seconds=1, sink_max_events=10, processes=2, fsync_policies=("never",),
                                 dsn=None, first="off")
    report = audit.run_audit(options, tmp_path, lambda line: None,
                             lambda mode, var_dir: order.append(mode) or _locks_report(3.0))
    assert order == ["off", "files"] and list(report["locks"]["runs"]) == ["off", "files"]
    assert "off then files" in audit.format_table(report)
    with pytest.raises(ValueError, match="first"):
        audit.AuditOptions(first="none").check()


def test_p99_ratio_over_ten_percent_misses() -> None:
    ratios = audit.p99_ratios(audit.lock_summary(_locks_report(5.5)), audit.lock_summary(_locks_report(5.0)))
    assert ratios["contended.release"] == pytest.approx(1.1)
    assert not (ratios["contended.release"] < 1 + audit.TARGET_P99_ADDED)


def test_lock_summary_of_a_run_that_did_not_start() -> None:
    summary = audit.lock_summary({"ok": False, "runs": [{"backend": "memory", "ok": False, "error": "no Ray"}]})
    assert summary == {"ok": False, "error": "no Ray"}
    assert audit.p99_ratios(summary, summary)["uncontended.acquire"] is None


@pytest.mark.parametrize("dsn", ["postgresql://postgres@db.example.com/test", "mysql://127.0.0.1/x"])
def test_only_a_loopback_postgres(dsn: str) -> None:
    with pytest.raises(ValueError):
        audit.AuditOptions(dsn=dsn).check()


def test_the_plot_is_written(tmp_path: Path) -> None:
    report = {"sink": [{"case": "1p-interval", "events_per_s": 80_000}], "postgres": {"events_per_s": 25_000},
              "locks": {"runs": {m: audit.lock_summary(_locks_report(4.0)) for m in audit.AUDIT_MODES}}}
    path = audit.plot_audit(report, tmp_path / "a.png")
    assert path.stat().st_size > 1000


def test_gateway_audit_setting_files_or_off(tmp_path: Path) -> None:
    assert Settings().audit == "files"
    assert isinstance(audit_sink(Settings(var_dir=str(tmp_path))), FileAuditSink)
    off = load_settings(env={"ROUNDS_AUDIT": "off", "ROUNDS_VAR_DIR": str(tmp_path / "v")})
    sink = audit_sink(off)
    assert isinstance(sink, NullAuditSink)
    sink.emit(AuditEvent("USER_CONNECTED", "frontdoor-0"))
    assert not (tmp_path / "v" / "audit").exists()
    with pytest.raises(ValueError, match="audit must be one of"):
        audit_sink(Settings(audit="none"))
