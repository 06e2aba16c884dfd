"""`rounds bench audit`: the sink cases, the interleaved lock rounds (two fake
gateways), pooling and ratios, the report, table and chart, and the gateway's
audit switch (no Ray, no PostgreSQL: an unreachable DSN is skipped)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from rounds.audit.events import AuditEvent, NullAuditSink
from rounds.audit.files import FileAuditSink
from rounds.bench import audit, stats
from rounds.bench.locks import METRICS, GatewayUnavailable, LocksRun
from rounds.cluster.compose import audit_sink
from rounds.config import Settings, load_settings


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


def _samples(scale: float, n: int = 200, offset: float = 0.0) -> dict[str, dict[str, list[float]]]:
    """Lock samples in ms: 1..n scaled (and shifted), the same for every operation."""
    values = [scale * (i + offset) / 100 for i in range(1, n + 1)]
    return {phase: {"acquire_ms": list(values), "release_ms": list(values)} for phase in ("uncontended", "contended")}


def _locks_run(samples: dict[str, dict[str, list[float]]], cpu: float = 50.0) -> LocksRun:
    """A locks run as `run_locks` returns it, its summaries made from `samples`."""
    latency = {phase: {op: stats.summarize(samples[phase].get(metric, [])).as_dict()
                       for op, metric in METRICS[phase]} for phase in ("uncontended", "contended")}
    report = {"ok": True, "settings": {"duration_s": 20.0}, "runs": [{
        "backend": "memory", "latency_ms": latency, "failures": {"total": 0}, "aborted": None,
        "gateway": {"cpu_percent_measured": cpu, "pids": [1, 2]}, "presence": {"users": {"connected": 500}},
        "machine": {"other_cpu_percent_measured": 12.0},
    }]}
    return LocksRun(report, {"memory": samples})


class FakeGateways:
    """Two gateways that are never started: each segment returns the next run
    of its mode; the files gateway writes `events` audit lines per segment."""

    def __init__(self, runs: dict[str, list[LocksRun]], events: int = 7) -> None:
        self.runs = {mode: list(r) for mode, r in runs.items()}
        self.events = events
        self.calls: list[str] = []
        self.started = self.stopped = 0

    @contextmanager
    def __call__(self, var_dirs: Mapping[str, Path]) -> Iterator[audit.SegmentRunner]:
        self.started += 1

        def segment(mode: str) -> LocksRun:
            self.calls.append(mode)
            if mode == "files":
                sink = FileAuditSink(var_dirs[mode] / "audit", housekeeping=False)
                for i in range(self.events):
                    sink.emit(AuditEvent("LOCK_ACQUIRED", "shard-0", resource_id=f"r{i}"))
                sink.close()
            return self.runs[mode].pop(0)

        try:
            yield segment
        finally:
            self.stopped += 1


def _options(**changes: Any) -> audit.AuditOptions:
    return audit.AuditOptions(sink_seconds=1, sink_max_events=10, processes=2, fsync_policies=("never",),
                              dsn=None, **changes)


def test_rounds_alternate_abba_wise() -> None:
    assert audit.round_order("files", 3) == [(1, "files"), (1, "off"), (2, "off"), (2, "files"),
                                             (3, "files"), (3, "off")]
    assert audit.round_order("off", 2) == [(1, "off"), (1, "files"), (2, "files"), (2, "off")]
    with pytest.raises(ValueError, match="rounds"):
        audit.AuditOptions(rounds=0).check()


def test_pooled_percentiles_are_of_all_samples_not_a_mean_of_segments() -> None:
    low, high = _samples(1.0), _samples(1.0, offset=200)  # 0.01..2.00 and 2.01..4.00 ms
    pooled = audit.pooled_latency([low, high])
    everything = [v / 100 for v in range(1, 401)]
    assert pooled["uncontended.acquire"]["count"] == 400
    assert pooled["contended.release"]["p99"] == pytest.approx(stats.summarize(everything).p99, abs=1e-3)
    assert pooled["uncontended.acquire"]["p50"] == pytest.approx(2.005, abs=1e-3)
    assert audit.pooled_latency([])["uncontended.acquire"]["p99"] is None


def test_run_audit_runs_interleaved_rounds_against_two_gateways_started_once(tmp_path: Path) -> None:
    runs = {"files": [_locks_run(_samples(s), cpu=c) for s, c in ((1.2, 40.0), (1.0, 60.0), (1.1, 50.0))],
            "off": [_locks_run(_samples(s), cpu=c) for s, c in ((1.0, 30.0), (1.0, 50.0), (1.0, 35.0))]}
    gateways = FakeGateways(runs)
    log: list[str] = []
    report = audit.run_audit(_options(rounds=3), tmp_path, log.append, gateways)
    assert gateways.calls == ["files", "off", "off", "files", "files", "off"]
    assert (gateways.started, gateways.stopped) == (1, 1)
    assert list(tmp_path.iterdir()) == []  # the scratch folder, audit files included, is gone
    locks = report["locks"]
    assert report["schema"] == "rounds.bench.audit/2" and report["ok"] and locks["complete"]
    assert [s["mode"] for s in locks["segments"]] == gateways.calls
    assert locks["audit_events_written"] == {"files": 21, "off": 0}
    files, off = locks["pooled"]["files"], locks["pooled"]["off"]
    assert files["latency_ms"]["uncontended.acquire"]["count"] == 600 and files["segments"] == 3
    pooled_files = stats.summarize([v for s in (1.2, 1.0, 1.1) for v in _samples(s)["contended"]["acquire_ms"]])
    assert files["latency_ms"]["contended.acquire"]["p99"] == pytest.approx(pooled_files.p99, abs=1e-3)
    pooled_off = stats.summarize(_samples(1.0)["contended"]["acquire_ms"] * 3)
    assert off["latency_ms"]["contended.acquire"]["p99"] == pytest.approx(pooled_off.p99, abs=1e-3)
    assert locks["ratio_p99"]["contended.acquire"] == pytest.approx(pooled_files.p99 / pooled_off.p99, abs=1e-3)
    assert not locks["target_met"]["uncontended.acquire"]  # the 1.2 round pulls the pooled p99 over 10 %
    assert [r["round"] for r in locks["rounds"]] == [1, 2, 3]
    assert [r["order"] for r in locks["rounds"]] == [["files", "off"], ["off", "files"], ["files", "off"]]
    assert [r["ratio_p99"]["uncontended.release"] for r in locks["rounds"]] == [1.2, 1.0, 1.1]
    assert locks["ratio_p99_median_of_rounds"]["uncontended.release"] == 1.1
    assert files["gateway_cpu_percent"] == [40.0, 60.0, 50.0] and files["gateway_cpu_percent_median"] == 50.0
    assert off["gateway_cpu_percent_median"] == 35.0
    assert sum("segment 6/6" in line for line in log) == 2  # its start and its one-line result
    json.dumps(report)
    table = audit.format_table(report)
    assert "files, off | off, files | files, off" in table
    assert "1.200 1.000 1.100" in table and "MISS" in table
    assert "40, 60, 50 % of a core (median 50 %), other processes 12, 12, 12 %" in table
    assert "21 audit events written" in table


def test_the_gateway_off_can_open_the_rounds_and_a_small_effect_meets_the_target(tmp_path: Path) -> None:
    gateways = FakeGateways({"files": [_locks_run(_samples(1.05))] * 2, "off": [_locks_run(_samples(1.0))] * 2})
    report = audit.run_audit(_options(rounds=2, first="off"), tmp_path, lambda line: None, gateways)
    assert gateways.calls == ["off", "files", "files", "off"]
    assert all(report["locks"]["target_met"].values())
    assert "1.050 met" in audit.format_table(report)
    with pytest.raises(ValueError, match="first"):
        audit.AuditOptions(first="none").check()


def test_a_gateway_that_does_not_start_ends_the_lock_part(tmp_path: Path) -> None:
    @contextmanager
    def broken(var_dirs: Mapping[str, Path]) -> Iterator[audit.SegmentRunner]:
        raise GatewayUnavailable("no Ray")
        yield

    report = audit.run_audit(_options(), tmp_path, lambda line: None, broken)
    locks = report["locks"]
    assert locks["error"] == "no Ray" and not locks["complete"] and not report["ok"]
    assert "ratio_p99" not in locks and locks["rounds"] == []
    assert "NOT COMPLETE: no Ray" in audit.format_table(report)


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
    segments = [{"round": 1, "mode": m, **audit.lock_summary(_locks_run(_samples(1.0)).report)}
                for m in audit.AUDIT_MODES]
    part = audit.compare_segments(segments, {m: [_samples(1.0)] for m in audit.AUDIT_MODES})
    report = {"sink": [{"case": "1p-interval", "events_per_s": 80_000}], "postgres": {"events_per_s": 25_000},
              "locks": {**part, "segments": segments}}
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


def test_the_report_gives_each_ratio_an_interval_and_the_gateways_collections() -> None:
    files, off = _locks_run(_samples(1.3, n=2000)), _locks_run(_samples(1.0, n=2000))
    files.report["gateway_gc"] = {"collections": 40.0, "pausedMs": 12.5, "over10ms": 0.0}
    segments = [{"round": 1, "mode": "files", **audit.lock_summary(files.report)},
                {"round": 1, "mode": "off", **audit.lock_summary(off.report)}]
    part = audit.compare_segments(segments, {"files": [files.samples["memory"]], "off": [off.samples["memory"]]})
    low, high = part["ratio_p99_interval"]["uncontended.acquire"]
    assert low < 1.3 < high and low > 1.1  # a 30 % slower p99 over 2,000 samples: resolved
    assert part["pooled"]["files"]["gateway_gc"] == {"collections": 40.0, "pausedMs": 12.5, "over10ms": 0.0}
    assert part["pooled"]["off"]["gateway_gc"] is None
    line = audit.segment_line(segments[0])
    assert "GC 40 collections paused 12 ms (0 over 10 ms; 0 full, 0 ms)" in line
    table = audit.format_table({"settings": {"sink_seconds": 1, "sink_max_events": 1, "rounds": 1, "first": "files"},
                                "sink": [], "ok": True,
                                "locks": {**part, "segments": segments,
                                          "audit_events_written": {"files": 1, "off": 0}}})
    assert f"1.300 MISS [{low:.2f}-{high:.2f}]" in table


def test_the_chart_draws_a_ratio_that_rounding_put_just_outside_its_interval(tmp_path: Path) -> None:
    segments = [{"round": 1, "mode": m, **audit.lock_summary(_locks_run(_samples(1.0)).report)}
                for m in audit.AUDIT_MODES]
    part = audit.compare_segments(segments, {m: [_samples(1.0)] for m in audit.AUDIT_MODES})
    part["ratio_p99_interval"] = {key: [0.9, 0.9995] for key in part["ratio_p99"]}  # the point, 1.0, above it
    report = {"sink": [], "postgres": {}, "locks": {**part, "segments": segments}}
    assert audit.plot_audit(report, tmp_path / "a.png").stat().st_size > 1000
    assert stats.ratio_interval([1.0], [1.0], resamples=0) is None
