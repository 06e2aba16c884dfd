"""The benchmark's pure parts: percentiles, summaries, counters, the loopback
rule, how rooms are dealt to workers, and how fan-out receipts are matched."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest

from rounds.bench import stats
from rounds.bench.loadgen import Room
from rounds.bench.plan import bench_user_id, require_loopback_url, url_with_token
from rounds.bench.presence import PresenceOptions, assign_rooms, plan_rooms

# --- percentiles ----------------------------------------------------------------


def test_percentile_interpolates_linearly_between_closest_ranks() -> None:
    data = [1.0, 2.0, 3.0, 4.0]
    assert stats.percentile(data, 0.5) == 2.5
    assert stats.percentile(data, 0.25) == pytest.approx(1.75)
    assert stats.percentile(data, 0.95) == pytest.approx(3.85)


def test_percentile_ends_are_the_minimum_and_the_maximum() -> None:
    data = [3.0, 7.0, 11.0]
    assert stats.percentile(data, 0.0) == 3.0
    assert stats.percentile(data, 1.0) == 11.0


def test_percentile_of_one_value_is_that_value() -> None:
    assert stats.percentile([42.0], 0.99) == 42.0


def test_percentiles_of_one_to_a_hundred_are_known() -> None:
    data = [float(v) for v in range(1, 101)]
    assert stats.percentile(data, 0.5) == pytest.approx(50.5)
    assert stats.percentile(data, 0.95) == pytest.approx(95.05)
    assert stats.percentile(data, 0.99) == pytest.approx(99.01)


def test_percentile_agrees_with_numpys_linear_method() -> None:
    numpy = pytest.importorskip("numpy")
    rng = random.Random(7)
    data = sorted(rng.lognormvariate(0, 1) for _ in range(1_001))
    for q in (0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0):
        assert stats.percentile(data, q) == pytest.approx(float(numpy.percentile(data, q * 100, method="linear")))


def test_percentile_refuses_no_data_and_quantiles_outside_zero_to_one() -> None:
    with pytest.raises(ValueError):
        stats.percentile([], 0.5)
    for q in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError):
            stats.percentile([1.0], q)


# --- summaries ------------------------------------------------------------------


def test_summary_sorts_its_input_and_reports_every_figure() -> None:
    summary = stats.summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert summary == stats.Summary(count=5, min=1.0, mean=3.0, p50=3.0, p95=pytest.approx(4.8),
                                    p99=pytest.approx(4.96), max=5.0)


def test_summary_of_no_samples_has_a_zero_count_and_no_figures() -> None:
    assert stats.summarize([]).as_dict() == {
        "count": 0, "min": None, "mean": None, "p50": None, "p95": None, "p99": None, "max": None,
    }


def test_summary_as_dict_rounds_to_the_given_digits() -> None:
    assert stats.summarize([1 / 3]).as_dict(digits=2)["p99"] == 0.33


def test_summary_refuses_nan_samples() -> None:
    with pytest.raises(ValueError):
        stats.summarize([1.0, math.nan])


# --- merging and CPU --------------------------------------------------------------


def test_samples_from_workers_are_concatenated_by_metric() -> None:
    merged = stats.merge_samples([{"a": [1.0], "b": [2.0]}, {"a": [3.0]}])
    assert merged == {"a": [1.0, 3.0], "b": [2.0]}


def test_counts_from_workers_add_up_including_counts_by_code() -> None:
    merged = stats.merge_counts([
        {"frames": 3, "error_frames": {"BAD_REQUEST": 1}},
        {"frames": 4, "error_frames": {"BAD_REQUEST": 2, "UNAVAILABLE": 1}},
    ])
    assert merged == {"frames": 7, "error_frames": {"BAD_REQUEST": 3, "UNAVAILABLE": 1}}


def test_cpu_percent_is_relative_to_one_core() -> None:
    assert stats.cpu_percent(1.5, 1.0) == 150.0
    assert stats.cpu_percent(1.0, 0.0) is None



# --- the loopback rule --------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ws://127.0.0.1:8765/ws",
        "ws://127.3.2.1/ws",
        "wss://localhost:8443/ws",
        "ws://LOCALHOST:8765/ws",
        "ws://[::1]:8765/ws",
        "ws://[::ffff:127.0.0.1]:8765/ws",
    ],
)
def test_loopback_urls_are_accepted(url: str) -> None:
    assert require_loopback_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "ws://10.0.0.5:8765/ws",
        "ws://0.0.0.0:8765/ws",
        "ws://[::]:8765/ws",
        "ws://example.com/ws",
        "ws://localhost.example.com/ws",
        "ws://127.0.0.1.nip.io/ws",
        "http://127.0.0.1:8765/ws",
        "ws:///ws",
        "ws://127.0.0.1:notaport/ws",
    ],
)
def test_urls_beyond_this_machine_or_malformed_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        require_loopback_url(url)


def test_the_token_joins_an_existing_query_with_an_ampersand() -> None:
    assert url_with_token("ws://127.0.0.1/ws", "a.b.c") == "ws://127.0.0.1/ws?token=a.b.c"
    assert url_with_token("ws://127.0.0.1/ws?x=1", "a.b.c") == "ws://127.0.0.1/ws?x=1&token=a.b.c"


# --- planning ---------------------------------------------------------------------


def test_users_fill_rooms_in_order_and_the_last_room_takes_the_rest() -> None:
    rooms = plan_rooms(PresenceOptions(users=25, room_size=10))
    assert [r.resource_id for r in rooms] == ["page:/bench/room-0", "page:/bench/room-1", "page:/bench/room-2"]
    assert [len(r.members) for r in rooms] == [10, 10, 5]
    assert bench_user_id(rooms[2].members[-1]) == "bench-u24"


def test_each_room_goes_whole_to_exactly_one_worker() -> None:
    rooms = plan_rooms(PresenceOptions(users=500, room_size=10))
    workers = assign_rooms(rooms, 3)
    assert len(workers) == 3
    assert sorted(r.resource_id for w in workers for r in w) == sorted(r.resource_id for r in rooms)
    assert max(len(w) for w in workers) - min(len(w) for w in workers) <= 1


def test_there_are_never_more_workers_than_rooms() -> None:
    assert len(assign_rooms(plan_rooms(PresenceOptions(users=15, room_size=10)), 8)) == 2


def test_options_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="users"):
        PresenceOptions(users=0).check()
    with pytest.raises(ValueError, match="duration_s"):
        PresenceOptions(duration_s=0).check()


# --- matching USER_JOINED to the join it announces ------------------------------------


@dataclass
class _Member:
    user_id: str
    joined: bool = True


def _room(*members: _Member) -> Room:
    room = Room("page:/bench/room-0")
    room.users.extend(members)  # only user_id and joined are read
    return room


def test_a_join_is_owed_a_user_joined_by_every_member_already_joined() -> None:
    a, b, c = _Member("a"), _Member("b"), _Member("c", joined=False)
    room = _room(a, b, c)
    record = room.expect_join(a, sent_at=1.0, phase="measured")
    assert record.expected == {"b"}
    assert room.match("a", "b") is record


def test_a_confirmed_join_whose_user_joined_never_came_counts_as_missing() -> None:
    a, b = _Member("a"), _Member("b")
    room = _room(a, b)
    record = room.expect_join(a, sent_at=1.0, phase="measured")
    record.confirmed = True
    assert room.expire(before=0.5) == 0  # not yet late
    assert room.expire(before=7.0) == 1
    assert room.pending == {}


def test_a_member_that_leaves_while_the_join_is_in_flight_is_not_owed_it() -> None:
    a, b = _Member("a"), _Member("b")
    room = _room(a, b)
    record = room.expect_join(a, sent_at=1.0, phase="measured")
    record.confirmed = True
    room.release("b")
    assert room.expire(before=7.0) == 0


def test_a_join_still_awaiting_its_resource_state_is_kept_not_counted() -> None:
    a, b = _Member("a"), _Member("b")
    room = _room(a, b)
    room.expect_join(a, sent_at=1.0, phase="measured")
    assert room.expire(before=7.0) == 0
    assert len(room.pending["a"]) == 1


def test_a_user_joined_matches_the_join_its_receiver_was_expected_for() -> None:
    a, b = _Member("a"), _Member("b", joined=False)
    room = _room(a, b)
    first = room.expect_join(a, sent_at=1.0, phase="measured")
    b.joined = True
    second = room.expect_join(a, sent_at=2.0, phase="measured")
    assert first.expected == set()
    assert room.match("a", "b") is second


def test_ratio_interval_brackets_the_ratio_and_narrows_with_more_samples() -> None:
    rng = random.Random(7)
    base = [rng.lognormvariate(0, 0.5) for _ in range(20_000)]
    slower = [v * 1.2 for v in base[:10_000]]
    low, high = stats.ratio_interval(slower, base[10_000:])
    assert low < 1.2 < high and low > 1.0  # a 20 % slower p99 is resolved by 10,000 samples each
    few_low, few_high = stats.ratio_interval(slower[:900], base[10_000:10_900])
    assert few_high - few_low > high - low  # 900 samples: a p99 is their 9th largest
    assert stats.ratio_interval(slower, base[10_000:]) == (low, high)  # seeded: reproducible


def test_ratio_interval_of_no_samples_is_none() -> None:
    assert stats.ratio_interval([], [1.0]) is None
    assert stats.ratio_interval([1.0], []) is None
    assert stats.ratio_interval([1.0], [0.0, 0.0]) is None
