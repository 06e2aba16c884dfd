"""The pure parts of `rounds bench locks`: phase windows, URLs, ratios, the report."""

from __future__ import annotations

from typing import Any

import pytest

from rounds.bench import locks
from rounds.bench.lockgen import (
    CONTENDED,
    FLOOR,
    SETTLE,
    UNCONTENDED,
    contended_room,
    field_of,
    locker_room,
    phase_windows,
)
from rounds.bench.plan import WorkerResult
from rounds.bench.presence import PresenceRun
from rounds.ids import routing_key

# --- phase windows ---------------------------------------------------------------


def test_the_window_opens_with_a_settle_then_floor_uncontended_contended_in_order() -> None:
    windows = phase_windows(100.0, 116.0, with_floor=True)
    assert [name for name, _, _ in windows] == [SETTLE, FLOOR, UNCONTENDED, CONTENDED]
    assert windows[0] == (SETTLE, 100.0, 101.0)
    spans = {name: to - start for name, start, to in windows}
    assert spans[FLOOR] == pytest.approx(3.0)
    assert spans[UNCONTENDED] == pytest.approx(6.0)
    assert spans[CONTENDED] == pytest.approx(6.0)


def test_the_windows_are_contiguous_and_end_exactly_at_the_end() -> None:
    windows = phase_windows(5.0, 17.3, with_floor=True)
    for (_, _, end), (_, start, _) in zip(windows, windows[1:], strict=False):
        assert start == end
    assert windows[-1][2] == 17.3


def test_without_a_floor_the_two_lock_phases_share_the_window_equally() -> None:
    windows = phase_windows(0.0, 11.0, with_floor=False)
    assert [name for name, _, _ in windows] == [SETTLE, UNCONTENDED, CONTENDED]
    assert windows[1][2] - windows[1][1] == pytest.approx(5.0)
    assert windows[2][2] - windows[2][1] == pytest.approx(5.0)


def test_a_short_window_settles_for_a_tenth_of_it_only() -> None:
    assert phase_windows(0.0, 2.0, with_floor=True)[0] == (SETTLE, 0.0, 0.2)


# --- resources ------------------------------------------------------------------


def test_each_locked_field_routes_with_its_room() -> None:
    # The front door sends a lock to its room's shard; the field must live there too.
    for room in (locker_room("p", 3), contended_room("p")):
        assert routing_key(field_of(room)) == routing_key(room) == room


def test_lockers_have_rooms_of_their_own() -> None:
    assert len({locker_room("p", i) for i in range(20)} | {contended_room("p")}) == 21


# --- options and URLs ------------------------------------------------------------


def test_redis_defaults_to_database_15_when_a_run_uses_redis() -> None:
    assert locks.resolve_redis_url("both", None) == "redis://127.0.0.1:6379/15"
    assert locks.resolve_redis_url("redis", None) == "redis://127.0.0.1:6379/15"


def test_a_memory_only_run_measures_a_floor_only_when_given_a_redis() -> None:
    assert locks.resolve_redis_url("memory", None) is None
    assert locks.resolve_redis_url("memory", "redis://localhost:6380/2") == "redis://localhost:6380/2"


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/15", "redis://localhost/0", "redis://:pw@[::1]:6379", "unix:///tmp/redis.sock"]
)
def test_loopback_redis_urls_are_accepted(url: str) -> None:
    assert locks.require_loopback_redis_url(url) == url


@pytest.mark.parametrize("url", ["redis://10.0.0.5:6379/0", "redis://cache.example.com/0", "http://127.0.0.1:6379"])
def test_redis_urls_beyond_this_machine_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        locks.require_loopback_redis_url(url)


@pytest.mark.parametrize(
    "changes",
    [{"lockers": 0}, {"contenders": 1}, {"duration_s": 0.5}, {"backends": "postgres"}, {"pause_ms": -1},
     {"backends": "redis", "redis_url": None}, {"redis_url": "redis://192.0.2.1/0"}],
)
def test_options_out_of_range_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        locks.LocksOptions(**changes).check()


def test_both_backends_run_redis_first_then_memory() -> None:
    assert locks.LocksOptions().backend_list == ("redis", "memory")


# --- figures -----------------------------------------------------------------------


def test_a_ratio_is_the_p99_over_the_floor_p99_and_missing_without_a_floor() -> None:
    assert locks.ratio(3.0, 1.5) == 2.0
    assert locks.ratio(3.0, None) is None
    assert locks.ratio(None, 1.0) is None
    assert locks.ratio(3.0, 0.0) is None


def test_a_p99_is_judged_against_the_goal_then_the_seed_bar() -> None:
    assert locks.verdict(1.99) == "goal"
    assert locks.verdict(2.0) == "seed"
    assert locks.verdict(4.99) == "seed"
    assert locks.verdict(5.0) == "miss"
    assert locks.verdict(None) == "n/a"


def test_cpu_in_a_window_weighs_each_point_by_its_overlap() -> None:
    timeline = [{"t_s": 0.0, "cpu_percent": 0.0}, {"t_s": 1.0, "cpu_percent": 10.0},
                {"t_s": 2.0, "cpu_percent": 30.0}, {"t_s": 3.0, "cpu_percent": None}]
    assert locks.cpu_in_window(timeline, 0.0, 2.0) == 20.0
    assert locks.cpu_in_window(timeline, 0.5, 1.5) == 20.0  # half of each of two points
    assert locks.cpu_in_window(timeline, 2.0, 3.0) is None  # its only point has no figure
    assert locks.cpu_in_window(timeline, 5.0, 6.0) is None


# --- the report ----------------------------------------------------------------------


def _presence_report(aborted: str | None = None) -> dict[str, Any]:
    summary = {"count": 1, "min": 1.0, "mean": 1.0, "p50": 1.0, "p95": 1.0, "p99": 1.0, "max": 1.0}
    return {
        "aborted": aborted,
        "deadline_hit": False,
        "phases_s": {"measured_from": 2.0, "measured_to": 13.0},
        "gateway": {"pids": [1], "cpu_percent_measured": 40.0, "peak_rss_mib": 400.0,
                    "timeline": [{"t_s": 2.0, "cpu_percent": 10.0}, {"t_s": 13.0, "cpu_percent": 40.0}]},
        "loadgen": {"cpu_percent_measured": 30.0},
        "machine": {"cpu_percent_measured": 100.0, "cpu_count": 2, "loadavg_1m_at_start": 0.5},
        "users": {"planned": 5, "connected": 5, "connected_at_end": 5},
        "latency_ms": {"heartbeat_rtt": summary, "join_state": summary, "fanout": summary},
        "failures": {"total": 0},
        "worker_errors": [],
    }


def _lock_result(counts: dict[str, Any]) -> WorkerResult:
    samples = {
        FLOOR: {"set_nx_ms": [0.5] * 99 + [1.0], "del_ms": [0.4] * 100},
        UNCONTENDED: {"acquire_ms": [1.0] * 99 + [3.0], "release_ms": [1.0] * 100},
        CONTENDED: {"acquire_ms": [2.0] * 100, "acquire_granted_ms": [2.0] * 10, "acquire_denied_ms": [2.0] * 90,
                    "release_ms": [1.5] * 10},
    }
    return WorkerResult(worker=2, users=30, connected_at_end=30, samples=samples, counts=counts, errors=[],
                        deadline_hit=False)


def _entry(counts: dict[str, Any], aborted: str | None = None) -> dict[str, Any]:
    options = locks.LocksOptions(duration_s=11.0)
    run = PresenceRun(_presence_report(aborted), {}, {"locks": _lock_result(counts)})
    entry, _ = locks.backend_report("redis", options.redis_url, options, run, {"url": "ws://127.0.0.1:1/ws"})
    return entry


def test_a_clean_run_reports_ratios_to_the_set_nx_p99_and_one_grant_per_round() -> None:
    entry = _entry({"contended_rounds": 10, "contended_attempts": 100, "contended_grants": 10,
                    "contended_replies": 100})
    assert entry["ok"]
    set_nx_p99 = entry["floor_ms"]["set_nx"]["p99"]
    assert entry["ratio_p99_to_set_nx_p99"]["uncontended.acquire"] == round(
        entry["latency_ms"]["uncontended"]["acquire"]["p99"] / set_nx_p99, 2)
    assert entry["contention"]["grants_per_round"] == 1.0
    assert entry["contention"]["grant_rate"] == 0.1
    assert entry["targets"]["contended.acquire"] == "seed"
    assert entry["machine"]["other_cpu_percent_measured"] == 30.0


def test_a_double_grant_or_a_timeout_makes_the_run_not_ok() -> None:
    assert not _entry({"contended_double_grants": 1})["ok"]
    timed_out = _entry({"reply_timeouts": {"LOCK_ACQUIRE": 2}})
    assert timed_out["failures"]["reply_timeouts"] == 2
    assert not timed_out["ok"]


def test_a_missing_lock_worker_is_a_failure_and_leaves_the_figures_empty() -> None:
    options = locks.LocksOptions(duration_s=11.0)
    run = PresenceRun(_presence_report(), {}, {"locks": None})
    entry, samples = locks.backend_report("memory", None, options, run, {})
    assert entry["failures"]["missing_lock_worker"] == 1
    assert not entry["ok"]
    assert samples == {}
    assert entry["latency_ms"]["uncontended"]["acquire"]["count"] == 0


def test_the_table_has_a_row_per_backend_phase_and_operation() -> None:
    entry = _entry({"contended_rounds": 10, "contended_attempts": 100, "contended_grants": 10})
    report = {
        "settings": {"lockers": 20, "contenders": 10, "presence_users": 500, "duration_s": 11.0,
                     "pause_ms": 20.0, "shards": 2, "frontdoors": 2},
        "runs": [entry, {"backend": "memory", "ok": False, "error": "the gateway did not start"}],
        "ok": False,
    }
    table = locks.format_table(report)
    assert "redis   floor        SET NX" in table
    assert "redis   contended    acquire_denied" in table
    assert "memory  not run: the gateway did not start" in table
