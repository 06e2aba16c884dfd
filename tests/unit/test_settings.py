"""Settings from the environment: the garbage collector's young threshold."""

from __future__ import annotations

import pytest

from rounds.config import load_settings


def test_the_young_threshold_defaults_to_pythons_and_comes_from_the_environment() -> None:
    assert load_settings(env={}).gc_young_threshold == 700
    assert load_settings(env={"ROUNDS_GC_YOUNG_THRESHOLD": "10000"}).gc_young_threshold == 10_000


def test_a_young_threshold_under_one_is_refused() -> None:
    with pytest.raises(ValueError, match="gc_young_threshold must be at least 1"):
        load_settings(env={"ROUNDS_GC_YOUNG_THRESHOLD": "0"})
