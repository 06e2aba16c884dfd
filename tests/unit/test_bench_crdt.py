"""The pure parts of `rounds bench crdt`: markers, URLs, the delivery ledger, options, the report."""

from __future__ import annotations

from typing import Any

import pytest
from pycrdt import Doc, Text

from rounds.bench import crdt
from rounds.bench.crdtplan import (
    DELIVERED,
    DUPLICATE,
    ECHO,
    EXTRA,
    UNMATCHED,
    WS,
    YJS,
    Ledger,
    find_markers,
    marker,
    room_url,
    yjs_base_url,
)
from rounds.bench.plan import MEASURED, RAMP, WorkerResult, assign_rooms, plan_rooms
from rounds.protocol.yjs import sync_update

# --- markers ------------------------------------------------------------------------


def test_a_marker_is_found_again_with_its_sender_and_send_time() -> None:
    assert find_markers(marker(42, 1_234_567_890_123).encode()) == [(42, 1_234_567_890_123)]


def test_markers_are_found_in_order_among_other_bytes() -> None:
    data = b"\x01\x02" + marker(1, 10).encode() + b"\xff<x@1><3@>" + marker(2, 20).encode() + b"\x00"
    assert find_markers(data) == [(1, 10), (2, 20)]


def test_negative_markers_are_refused() -> None:
    with pytest.raises(ValueError):
        marker(-1, 5)


def test_a_pycrdt_update_carries_the_inserted_marker_verbatim() -> None:
    doc = Doc()
    text = doc.get("t", type=Text)
    text.insert(0, marker(3, 1))
    before = doc.get_state()
    text.insert(len(text), marker(3, 999_999_999_999))
    update = doc.get_update(before)  # the incremental update a client sends
    assert find_markers(update) == [(3, 999_999_999_999)]
    assert find_markers(sync_update(update)) == [(3, 999_999_999_999)]  # and the y-websocket frame holding it


# Made by yjs 13.6.33 (tests/interop/node_modules) in Node.js:
#   a = new Y.Doc(); a.clientID = 1001; a.getText('t').insert(0, '<7@123456789>'); u1 = encodeStateAsUpdate(a)
#   sv = encodeStateVector(a); a.getText('t').insert(13, '<7@123456999>'); u2 = encodeStateAsUpdate(a, sv)
#   b = new Y.Doc(); b.clientID = 2002; b.getText('t').insert(0, '<12@5>'); u3 = encodeStateAsUpdate(b)
#   mergeUpdates([u2, u3])
YJS_UPDATE = bytes.fromhex("0101e90700040101740d3c37403132333435363738393e00")
YJS_MERGED = bytes.fromhex("0201d20f0004010174063c313240353e01e9070d84e9070c0d3c37403132333435363939393e00")


def test_updates_encoded_by_yjs_carry_the_marker_verbatim_even_merged() -> None:
    assert find_markers(YJS_UPDATE) == [(7, 123456789)]
    assert sorted(find_markers(YJS_MERGED)) == [(7, 123456999), (12, 5)]


def test_pycrdt_reads_the_yjs_update_as_the_marker_text() -> None:
    doc = Doc()
    doc.apply_update(YJS_UPDATE)
    assert str(doc.get("t", type=Text)) == "<7@123456789>"


# --- URLs ---------------------------------------------------------------------------


def test_the_yjs_endpoint_sits_beside_the_gateways_ws_endpoint() -> None:
    assert yjs_base_url("ws://127.0.0.1:8765/ws") == "ws://127.0.0.1:8765/yjs"


def test_a_ws_client_connects_to_the_ws_url_and_a_yjs_client_to_its_room() -> None:
    assert room_url(WS, "ws://127.0.0.1:8765/ws", "document:a-r1") == "ws://127.0.0.1:8765/ws"
    assert room_url(YJS, "ws://127.0.0.1:1234/yjs/", "document:a-r1") == "ws://127.0.0.1:1234/yjs/document:a-r1"
    assert room_url(YJS, "ws://h:1/yjs", "document:a b/tab:x") == "ws://h:1/yjs/document:a%20b%2Ftab:x"


# --- the ledger ---------------------------------------------------------------------


def test_an_update_is_owed_to_every_other_synced_member_and_settles_with_the_last() -> None:
    ledger = Ledger()
    ledger.sent(1, 100, [1, 2, 3])
    assert ledger.receipt(2, 1, 100) == DELIVERED
    assert not ledger.settled()
    assert ledger.receipt(3, 1, 100) == DELIVERED
    assert ledger.settled()
    assert (ledger.expected, ledger.delivered, ledger.missing) == (2, 2, 0)


def test_the_sender_getting_its_own_update_is_an_echo_not_a_delivery() -> None:
    ledger = Ledger()
    ledger.sent(1, 100, [1, 2])
    assert ledger.receipt(1, 1, 100) == ECHO
    assert ledger.delivered == 0


def test_a_second_receipt_in_flight_is_a_duplicate_and_after_settling_unmatched() -> None:
    ledger = Ledger()
    ledger.sent(1, 100, [1, 2, 3])
    assert ledger.receipt(2, 1, 100) == DELIVERED
    assert ledger.receipt(2, 1, 100) == DUPLICATE
    ledger.receipt(3, 1, 100)
    assert ledger.receipt(2, 1, 100) == UNMATCHED
    assert ledger.receipt(2, 9, 999) == UNMATCHED  # never sent here


def test_a_receipt_at_a_member_that_was_not_synced_is_extra() -> None:
    ledger = Ledger()
    ledger.sent(1, 100, [1, 2])
    assert ledger.receipt(4, 1, 100) == EXTRA
    assert ledger.receipt(2, 1, 100) == DELIVERED
    assert (ledger.expected, ledger.delivered) == (1, 1)


def test_updates_past_their_timeout_count_what_they_missed() -> None:
    ledger = Ledger()
    ledger.sent(1, 100, [1, 2, 3])
    ledger.sent(2, 500, [1, 2, 3])
    ledger.receipt(2, 1, 100)
    assert ledger.expire(before_ns=200) == 1  # member 3 never got the first
    assert len(ledger.pending) == 1
    assert ledger.expire(None) == 2
    assert (ledger.expected, ledger.delivered, ledger.missing) == (4, 1, 3)


def test_a_member_that_went_away_is_owed_nothing_in_flight() -> None:
    ledger = Ledger()
    ledger.sent(1, 100, [1, 2, 3])
    ledger.receipt(2, 1, 100)
    ledger.release(3)
    assert ledger.settled()
    assert (ledger.expected, ledger.missing) == (1, 0)


def test_an_update_nobody_is_owed_settles_at_once_and_a_failed_send_is_forgotten() -> None:
    ledger = Ledger()
    ledger.sent(1, 100, [1])
    assert ledger.settled() and ledger.expected == 0
    ledger.sent(1, 200, [1, 2])
    ledger.cancel(1, 200)
    assert ledger.settled() and ledger.expire(None) == 0


# --- options and targets --------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [{"users": 1}, {"room_size": 1}, {"processes": 0}, {"duration_s": 0.5}, {"interval_s": 0},
     {"mode": "sse"}, {"codec": "cbor"}, {"connect_concurrency": 0}],
)
def test_options_out_of_range_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        crdt.CrdtOptions(**changes).check()


def test_rooms_are_dealt_whole_to_workers() -> None:
    rooms = plan_rooms(35, 10, "document:x-r")
    assert [len(r.members) for r in rooms] == [10, 10, 10, 5]
    assert [[r.resource_id for r in w] for w in assign_rooms(rooms, 2)] == [
        ["document:x-r0", "document:x-r2"], ["document:x-r1", "document:x-r3"]]


def test_the_goal_is_5_ms_up_to_500_users_and_50_ms_up_to_3000() -> None:
    assert crdt.goal_p99_ms(500) == 5.0
    assert crdt.goal_p99_ms(501) == crdt.goal_p99_ms(3_000) == 50.0
    assert crdt.goal_p99_ms(10_000) == 50.0


def test_a_p99_is_judged_against_the_goal_then_the_seed_bar() -> None:
    assert crdt.verdict(4.9, 500) == "goal"
    assert crdt.verdict(5.0, 500) == "seed"
    assert crdt.verdict(50.0, 500) == "miss"
    assert crdt.verdict(49.0, 3_000) == "goal"
    assert crdt.verdict(None, 500) == "n/a"


def test_cpu_per_thousand_updates_is_cpu_seconds_over_updates() -> None:
    # 50 % of a core for 20 s = 10 CPU-s over 10,000 updates = 1 CPU-s per 1,000
    assert crdt.cpu_s_per_1000(50.0, 20.0, 10_000) == 1.0
    assert crdt.cpu_s_per_1000(None, 20.0, 10_000) is None
    assert crdt.cpu_s_per_1000(50.0, 20.0, 0) is None


def test_report_files_are_named_by_mode_codec_and_users() -> None:
    options = crdt.CrdtOptions(mode=WS, codec="msgpack", compare_ref=True, users=3000)
    assert crdt.report_stem(options, 0).startswith("crdt-ws-msgpack-vs-ref-3000u-19700101T")
    assert crdt.report_stem(crdt.CrdtOptions(mode=YJS), 0).startswith("crdt-yjs-500u-")


# --- the report -----------------------------------------------------------------------


class FakeConductor:
    """What `run_report` reads of a finished `runner.Conductor`."""

    def __init__(self, results: list[WorkerResult], cpu: float | None = 40.0, aborted: str | None = None) -> None:
        self.targets = [None] * 2
        self.results = results
        self.deadline_hit = False
        self.aborted = aborted
        self.cpu = cpu

    def results_of(self, first: int, count: int) -> list[WorkerResult]:
        return self.results[first:first + count]

    def phases_s(self) -> dict[str, float | None]:
        return {"ramp": 2.0, "measured": 10.0, "measured_from": 2.0, "measured_to": 12.0}

    def gateway_figures(self) -> dict[str, Any]:
        return {"pids": [1, 2], "cpu_percent_measured": self.cpu, "cpu_percent_ramp": 10.0, "peak_rss_mib": 400.0,
                "pids_lost": [], "timeline": [{"t_s": 3.0, "cpu_percent": self.cpu}]}

    def loadgen_figures(self) -> dict[str, Any]:
        return {"pids": [3], "cpu_percent_measured": 30.0, "timeline": []}

    def machine_figures(self) -> dict[str, Any]:
        return {"cpu_percent_measured": 120.0, "cpu_count": 2, "loadavg_1m_at_start": 0.5}


def _result(worker: int, propagation: list[float], ack: list[float], **counts: Any) -> WorkerResult:
    base = {"updates_sent": 1_000, "deliveries_expected": 9_000, "deliveries": 9_000, "deliveries_missing": 0}
    return WorkerResult(
        worker=worker, users=10, connected_at_end=10,
        samples={RAMP: {"connect_ms": [5.0] * 10, "sync_ms": [1.0] * 10},
                 MEASURED: {"propagation_ms": propagation, "ack_ms": ack}},
        counts={**base, **counts}, errors=[], deadline_hit=False,
    )


def _server(mode: str = WS, name: str = "rounds") -> crdt.Server:
    return crdt.Server(name, mode, "json" if mode == WS else None, lambda: None)


def test_a_clean_run_reports_full_delivery_rates_and_cpu_per_update() -> None:
    conductor = FakeConductor([_result(0, [1.0, 2.0, 3.0], [2.0]), _result(1, [4.0], [3.0])])
    entry, samples = crdt.run_report(_server(), crdt.CrdtOptions(users=20), conductor, {"url": "ws://x"})
    assert entry["ok"] and entry["failures"]["total"] == 0
    assert entry["delivery"]["ratio"] == 1.0 and entry["targets"]["delivery"] == "ok"
    assert entry["latency_ms"]["propagation"]["count"] == 4
    assert entry["latency_ms"]["ack"]["count"] == 2
    assert entry["throughput_per_s"] == {"updates": 200.0, "deliveries": 1800.0}
    # 40 % of a core for 10 s = 4 CPU-s over 2,000 updates
    assert entry["server"]["cpu_s_per_1000_updates"] == 2.0
    assert entry["machine"]["other_cpu_percent_measured"] == 50.0
    assert entry["label"] == "rounds ws/json"
    assert samples["propagation_ms"] == [1.0, 2.0, 3.0, 4.0]


def test_a_missing_delivery_fails_the_run_and_the_delivery_target() -> None:
    conductor = FakeConductor([_result(0, [1.0], [], deliveries=8_999, deliveries_missing=1), _result(1, [1.0], [])])
    entry, _ = crdt.run_report(_server(), crdt.CrdtOptions(), conductor, {})
    assert not entry["ok"]
    assert entry["failures"]["deliveries_missing"] == 1
    assert entry["targets"]["delivery"] == "miss"
    assert entry["delivery"]["ratio"] == pytest.approx(17_999 / 18_000, abs=1e-6)


def test_a_yjs_run_has_no_ack_latency_and_counts_echoes_without_failing() -> None:
    conductor = FakeConductor([_result(0, [1.0], [], echoes=1_000), _result(1, [1.0], [])])
    entry, _ = crdt.run_report(_server(YJS, "ref"), crdt.CrdtOptions(mode=YJS), conductor, {})
    assert "ack" not in entry["latency_ms"]
    assert entry["ok"] and entry["delivery"]["echoes"] == 1_000
    assert entry["codec"] is None and entry["label"] == "ref yjs"


def test_a_missing_worker_fails_the_run() -> None:
    entry, _ = crdt.run_report(_server(), crdt.CrdtOptions(), FakeConductor([_result(0, [1.0], [])]), {})
    assert entry["failures"]["missing_workers"] == 1 and not entry["ok"]


def test_the_first_run_is_compared_with_each_later_run() -> None:
    ours, _ = crdt.run_report(_server(), crdt.CrdtOptions(), FakeConductor(
        [_result(0, [2.0] * 10, []), _result(1, [6.0], [])], cpu=80.0), {})
    ref, _ = crdt.run_report(_server(YJS, "ref"), crdt.CrdtOptions(), FakeConductor(
        [_result(0, [1.0] * 10, []), _result(1, [2.0], [])], cpu=40.0), {})
    [row] = crdt.comparison([ours, {"error": "did not start"}, ref])
    assert row["run"] == "rounds ws/json" and row["over"] == "ref yjs"
    assert row["propagation"]["p50"] == 2.0 and row["propagation"]["max"] == 3.0
    assert row["cpu_percent"] == 2.0 and row["cpu_s_per_1000_updates"] == 2.0
    assert crdt.comparison([ours]) == []


def test_the_table_has_a_row_per_run_and_latency_and_names_runs_not_run() -> None:
    entry, _ = crdt.run_report(_server(), crdt.CrdtOptions(), FakeConductor(
        [_result(0, [1.0], [2.0]), _result(1, [1.0], [2.0])]), {})
    report = {
        "settings": {"users": 500, "rooms": 50, "room_size": 10, "interval_s": 1.0, "duration_s": 20.0,
                     "processes": 2},
        "targets_ms": {"seed_p99": 50.0, "goal_p99": 5.0},
        "runs": [entry, {"label": "y-websocket-ref yjs", "error": "node is not on PATH"}],
        "comparison": [], "ok": False,
    }
    table = crdt.format_table(report)
    assert "rounds ws/json                propagation" in table
    assert "rounds ws/json                ack" in table
    assert "y-websocket-ref yjs           not run: node is not on PATH" in table
    assert "delivery 100.000 %" in table


def test_slow_deliveries_are_listed_by_second_of_the_measured_phase() -> None:
    counts = {"deliveries_over_5ms_by_second": {"0": 4, "2": 1}, "deliveries_over_50ms_by_second": {"2": 1}}
    assert crdt.slow_by_second(counts, 3.5) == {"over_5ms": [4, 0, 1, 0], "over_50ms": [0, 0, 1, 0]}
    assert crdt.slow_by_second({}, 2) == {"over_5ms": [0, 0], "over_50ms": [0, 0]}


def test_server_processes_are_named_by_their_ray_actor_or_program() -> None:
    assert crdt._title("ray::ShardActor.serve") == "ray::ShardActor"
    assert crdt._title("ray::FrontDoorActor") == "ray::FrontDoorActor"
    assert crdt._title("/usr/bin/node /work/tests/interop/refserver.mjs --port 0") == "node"


def test_compare_relay_is_refused_with_a_given_url_or_a_broker_beyond_this_machine(tmp_path):
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "rounds.cluster.cli", "bench", "crdt", "--compare-relay", *args,
                               "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)

    given = run("--url", "ws://127.0.0.1:1/ws")
    assert given.returncode == 2 and "not with --url" in given.stderr
    remote = run("--amqp-url", "amqp://guest:guest@10.1.2.3:5672/")
    assert remote.returncode == 2 and "loopback" in remote.stderr
