"""The gateway's gauges carry their gateway (the Ray namespace) beside the
shard or front door index, so two gateways in one Ray cluster keep separate
series. Only the tags are checked here; the gauges themselves are Ray's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from rounds.cluster import metrics


class Recorder:
    """Stands in for `ray.util.metrics.Gauge`: keeps what each gauge was
    declared with and every value set, with its tags."""

    def __init__(self) -> None:
        self.sets: list[tuple[str, tuple[str, ...], Any, dict[str, str]]] = []

    def gauge_class(self) -> type:
        recorder = self

        class _Gauge:
            def __init__(self, name: str, description: str, tag_keys: tuple[str, ...]) -> None:
                self.name, self.tag_keys = name, tag_keys

            def set(self, value: Any, tags: dict[str, str]) -> None:
                recorder.sets.append((self.name, self.tag_keys, value, tags))

        return _Gauge


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    recorder = Recorder()
    metrics._gauge.cache_clear()
    monkeypatch.setattr(metrics, "Gauge", recorder.gauge_class())
    yield recorder
    metrics._gauge.cache_clear()


def test_shard_and_front_door_gauges_are_tagged_with_their_gateway(recorder: Recorder) -> None:
    shard = metrics.ShardMetrics(1, dict, "rounds-staging")
    shard.stop()
    shard.record({"rooms": 2, "members": 5, "mirror": {"queued": 0}, "documents": {"loaded": 1, "unwritten": 0},
                  "locks": [], "relay": {"circuit": "open", "unacked": {"0": 3}, "over_link": 7}})
    door = metrics.FrontDoorMetrics(0, dict, "rounds-staging")
    door.stop()
    door.record({"connections": 10, "rejected": 1, "shards": {"0": True, "1": True}})
    assert {name for name, *_ in recorder.sets} >= {"rounds_shard_rooms", "rounds_shard_relay_circuit_open",
                                                     "rounds_frontdoor_connections"}
    for name, keys, _value, tags in recorder.sets:
        assert set(tags) == set(keys) and tags["gateway"] == "rounds-staging", name
    assert ("rounds_shard_relay_circuit_open", ("shard", "gateway"), 1, {"shard": "1", "gateway": "rounds-staging"}) \
        in recorder.sets
