"""Summary statistics for benchmark samples: percentiles, summaries, merged counters, CPU %.

Belongs here: pure functions over lists of numbers that the parent process
applies to the raw samples its workers send back. Must not be here: I/O,
clocks, psutil or asyncio, so that everything here is tested on known data.

Percentiles use linear interpolation between closest ranks, the method numpy
calls "linear" (Hyndman & Fan type 7): for `n` sorted values and a quantile
`q` in [0, 1], the rank is `h = (n - 1) * q` and the result is
`x[floor(h)] + (h - floor(h)) * (x[floor(h) + 1] - x[floor(h)])`. So p0 is
the minimum, p100 the maximum, and p50 of an even count is the mean of the
two middle values. With few samples a p99 is then an interpolation between
the two largest values, never a value beyond the maximum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SUMMARY_QUANTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The `q`-quantile (0 <= q <= 1) of already sorted values, interpolated linearly.

    Raises ValueError for an empty sequence or a `q` outside [0, 1]: callers
    with possibly empty data should use `summarize`, which reports None.
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 1.0 or math.isnan(q):
        raise ValueError(f"quantile must be within [0, 1], not {q!r}")
    rank = (len(sorted_values) - 1) * q
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    fraction = rank - low
    return sorted_values[low] + fraction * (sorted_values[high] - sorted_values[low])


@dataclass(frozen=True, slots=True)
class Summary:
    """Count and distribution of one latency; every figure is None without samples."""

    count: int
    min: float | None
    mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None

    def as_dict(self, digits: int = 3) -> dict[str, Any]:
        """A JSON-ready mapping with floats rounded to `digits` decimals."""
        out: dict[str, Any] = {"count": self.count}
        for name in ("min", "mean", "p50", "p95", "p99", "max"):
            value = getattr(self, name)
            out[name] = None if value is None else round(value, digits)
        return out


def summarize(values: Iterable[float]) -> Summary:
    """Summarise samples (in any order); NaN values are a caller bug and raise."""
    data = sorted(values)
    if not data:
        return Summary(0, None, None, None, None, None, None)
    if any(math.isnan(v) for v in data):
        raise ValueError("samples contain NaN")
    p50, p95, p99 = (percentile(data, q) for _, q in SUMMARY_QUANTILES)
    return Summary(
        count=len(data),
        min=data[0],
        mean=math.fsum(data) / len(data),
        p50=p50,
        p95=p95,
        p99=p99,
        max=data[-1],
    )


def merge_samples(parts: Iterable[Mapping[str, Sequence[float]]]) -> dict[str, list[float]]:
    """Concatenate per-worker sample lists by metric name."""
    merged: dict[str, list[float]] = {}
    for part in parts:
        for name, values in part.items():
            merged.setdefault(name, []).extend(values)
    return merged


def merge_counts(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Add per-worker counters by name; nested mappings (counts by code) add too."""
    total: dict[str, Any] = {}
    for part in parts:
        for name, value in part.items():
            if isinstance(value, Mapping):
                total[name] = merge_counts([total.get(name, {}), value])
            else:
                total[name] = total.get(name, 0) + value
    return total


def cpu_percent(cpu_seconds: float, wall_seconds: float) -> float | None:
    """CPU time as a percentage of one core over a wall-clock window (None if empty)."""
    if wall_seconds <= 0:
        return None
    return 100.0 * cpu_seconds / wall_seconds


def ratio_interval(on: Sequence[float], off: Sequence[float], q: float = 0.99, level: float = 0.90,
                   resamples: int = 2000, seed: int = 1) -> tuple[float, float] | None:
    """A bootstrap interval for `percentile(on, q) / percentile(off, q)`.

    Both sets are resampled with replacement `resamples` times, independently,
    and the `level` interval is read off the resampled ratios (the percentile
    method, `level` 0.90: their 5th and 95th percentiles). It tells whether a
    ratio's distance from a target is resolved by the samples: a p99 of 900
    samples is their 9th largest, and a second run of the same load moves it
    by tens of per cent. Resampling the samples alone leaves out what varies
    between runs (the machine's other load), so the interval is a lower bound
    on the uncertainty. Seeded: the same samples give the same interval. None
    when either set is empty or a resampled `off` quantile is 0.
    """
    import numpy as np  # a bootstrap of 20,000 samples 2,000 times is 40 M draws

    if not on or not off or resamples < 1 or not 0.0 < level < 1.0:
        return None
    rng = np.random.default_rng(seed)
    a, b = np.asarray(on, dtype=float), np.asarray(off, dtype=float)
    ratios = []
    chunk = max(1, 4_000_000 // max(len(a), len(b)))  # resamples per step, ~32 MB of indices
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        qa = np.quantile(a[rng.integers(0, len(a), (n, len(a)))], q, axis=1)
        qb = np.quantile(b[rng.integers(0, len(b), (n, len(b)))], q, axis=1)
        if not qb.all():
            return None
        ratios.append(qa / qb)
    spread = np.concatenate(ratios)
    low, high = np.quantile(spread, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
