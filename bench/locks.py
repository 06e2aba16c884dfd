"""The locks benchmark: lock round trips under presence load, per lock backend.

Belongs here: the parent's side of `rounds bench locks`: for each backend
(Redis, then the embedded memory store) a gateway from the caller's factory,
the presence load generator of `presence.py` with the lock worker
(`lockgen.py`) as its companion, the report (JSON-ready) with the floor
ratios and the targets, and its text table. Must not be here: argparse, the
environment, starting a gateway (`cli.py`), what the lock clients do
(`lockgen.py`), percentile math (`stats.py`), drawing (`plot.py`).

Issue 3's targets: p99 under 5 ms (the seed's bar) under this load, our goal
under 2 ms. The floor is a bare `SET NX` (then `DEL`) against the same Redis,
timed by the same client process in the same run: a lock round trip cannot
beat it by much when the store is Redis, and its ratio shows what the
gateway's hops cost on top.

The report (`rounds.bench.locks/1`): `settings`, `targets_ms`, `environment`,
`command`, `ok`, and `runs`, one per backend in order, each with
`latency_ms.{uncontended,contended}.{acquire,release,...}` and `floor_ms.{set_nx,del}`
(summaries in ms: count, min, mean, p50, p95, p99, max), `ratio_p99_to_set_nx_p99`
and `targets` (goal / seed / miss) keyed `phase.operation`, `contention`
(rounds, grants, grant rate), `throughput_per_s`, `failures`, `counts`,
`gateway` (CPU % of one core overall and by phase, peak RSS, timeline),
`loadgen`, `lock_client_loop_lag_ms` (by phase), `machine`, `presence`
(its users, latencies and failures) and
`phases_s` (the phase windows on the timeline's axis).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from rounds.bench import stats
from rounds.bench.lockgen import CONTENDED, FLOOR, UNCONTENDED, LockPlan, lock_worker_main, phase_windows
from rounds.bench.plan import require_loopback_url
from rounds.bench.presence import Companion, PresenceOptions, PresenceRun, environment, run_presence
from rounds.bench.runner import Target, other_cpu_percent, shared_machine_warning
from rounds.config import Settings

SCHEMA = "rounds.bench.locks/1"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
SEED_P99_MS, GOAL_P99_MS = 5.0, 2.0  # issue 3: the seed's bar, our goal
BACKENDS = {"both": ("redis", "memory"), "redis": ("redis",), "memory": ("memory",)}
LOCK_ROLE = "surgeon"
# (name in the report, metric of lockgen) per phase, in the order of the table.
METRICS = {
    FLOOR: (("set_nx", "set_nx_ms"), ("del", "del_ms")),
    UNCONTENDED: (("acquire", "acquire_ms"), ("release", "release_ms")),
    CONTENDED: (
        ("acquire", "acquire_ms"),  # ACQUIRED or DENIED: what a racing client waits for
        ("acquire_granted", "acquire_granted_ms"),
        ("acquire_denied", "acquire_denied_ms"),
        ("release", "release_ms"),
    ),
}
# Lock worker counters that are faults of the gateway or of the run.
FAILURE_COUNTS = (
    "connect_errors", "not_joined_after_ramp", "unexpected_closes", "uncontended_denials",
    "contended_rounds_without_grant", "contended_double_grants", "fence_regressions",
    "redis_errors", "floor_set_nx_refused", "loadgen_errors",
)
FAILURE_COUNTS_BY_KEY = ("reply_timeouts", "error_frames", "protocol_errors")


@dataclass(frozen=True, slots=True)
class LocksOptions:
    duration_s: float = 15.0  # measured seconds per backend, cut into floor/uncontended/contended
    lockers: int = 20
    contenders: int = 10
    presence_users: int = 500
    presence_processes: int = 2
    pause_ms: float = 50.0  # think time: keeps the lock load near the presence load, not a saturation test
    backends: str = "both"
    redis_url: str | None = DEFAULT_REDIS_URL  # the Redis run's store and the floor; None: neither
    seed: int = 1

    def check(self) -> None:
        """Raise ValueError naming the first option out of range."""
        limits = (
            ("duration_s", 1, 3_600), ("lockers", 1, 1_000), ("contenders", 2, 1_000),
            ("presence_users", 1, 50_000), ("presence_processes", 1, 64), ("pause_ms", 0, 10_000),
        )
        for name, low, high in limits:
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name} must be within [{low}, {high}], not {value}")
        if self.backends not in BACKENDS:
            raise ValueError(f"backends must be one of {', '.join(BACKENDS)}, not {self.backends!r}")
        if "redis" in self.backend_list and self.redis_url is None:
            raise ValueError("the redis backend needs a Redis URL")
        if self.redis_url is not None:
            require_loopback_redis_url(self.redis_url)

    @property
    def backend_list(self) -> tuple[str, ...]:
        return BACKENDS[self.backends]


def resolve_redis_url(backends: str, given: str | None) -> str | None:
    """The Redis of the Redis run and of the floor: `--redis-url`, else the default
    when a run uses Redis; a memory-only run measures a floor only if given one."""
    if given is not None:
        return given
    return DEFAULT_REDIS_URL if "redis" in BACKENDS.get(backends, ()) else None


def require_loopback_redis_url(url: str) -> str:
    """Return `url` if it is a Redis URL on this machine, else raise ValueError.

    The bench hammers its Redis (and the Redis run writes lock keys there),
    so, like the WebSocket target, it must be on loopback or a unix socket."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return url
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a Redis URL (redis://, rediss:// or unix://): {url!r}")
    try:
        require_loopback_url(f"ws://{parts.netloc.rpartition('@')[2]}/")
    except ValueError as error:
        raise ValueError(f"Redis {error}") from None
    return url


def ratio(value: float | None, floor: float | None) -> float | None:
    """`value / floor`, rounded; None when either is missing or the floor is 0."""
    if value is None or floor is None or floor <= 0:
        return None
    return round(value / floor, 2)


def verdict(p99_ms: float | None) -> str:
    """`goal` under 2 ms, `seed` under 5 ms, `miss` above, `n/a` without samples."""
    if p99_ms is None:
        return "n/a"
    return "goal" if p99_ms < GOAL_P99_MS else "seed" if p99_ms < SEED_P99_MS else "miss"


def cpu_in_window(timeline: Sequence[Mapping[str, Any]], start: float, end: float) -> float | None:
    """Mean CPU % over `[start, end]` (seconds on the timeline's axis), each point
    weighted by how much of its window (since the previous point) lies inside."""
    total = weight = 0.0
    previous: float | None = None
    for point in timeline:
        at, cpu = point["t_s"], point.get("cpu_percent")
        if previous is not None and cpu is not None:
            overlap = min(at, end) - max(previous, start)
            if overlap > 0:
                total += cpu * overlap
                weight += overlap
        previous = at
    return round(total / weight, 1) if weight > 0 else None


# --- the run ------------------------------------------------------------------------


class GatewayUnavailable(Exception):
    """The factory could not start a gateway: this backend is reported as not run."""


GatewayFactory = Callable[[Settings], AbstractContextManager[Target]]


@dataclass(slots=True)
class LocksRun:
    """The report (JSON-ready) and raw samples by backend, phase and metric (for the plot)."""

    report: dict[str, Any]
    samples: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)


def run_locks(
    options: LocksOptions,
    settings: Settings,
    gateway: GatewayFactory,
    private_key_pem: bytes,
    log: Callable[[str], None],
    cleanup: Callable[[str, str], int] | None = None,
) -> LocksRun:
    """Run every backend of `options` one after the other and return the report.

    `gateway(settings)` starts a gateway and stops it on exit (raising
    `GatewayUnavailable` if it cannot); `cleanup(redis_url, prefix)` deletes
    the Redis run's keys afterwards and returns how many. A run that was
    stopped early (Ctrl-C, deadline) or whose gateway did not start ends the
    series: the report holds what ran.
    """
    options.check()
    started_at = datetime.now(UTC)
    tag = f"benchlock-{started_at.strftime('%H%M%S')}-{os.getpid()}"  # fresh fencing counters each run
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "benchmark": "locks",
        "started_at": started_at.isoformat(timespec="seconds"),
        "settings": {**asdict(options), "backend_list": list(options.backend_list),
                     "shards": settings.shards, "frontdoors": settings.frontdoors},
        "targets_ms": {"seed_p99": SEED_P99_MS, "goal_p99": GOAL_P99_MS},
        "environment": _environment(),
        "runs": [],
    }
    run = LocksRun(report)
    for backend in options.backend_list:
        prefix = f"{tag}-{backend}"
        backend_settings = settings.replace(redis_url=options.redis_url if backend == "redis" else None)
        log(f"bench locks: backend {backend} ({backend_settings.redis_url or 'embedded memory store'})")
        try:
            with gateway(backend_settings) as target:
                presence = _run_one(options, target, private_key_pem, prefix, log)
        except GatewayUnavailable as error:
            report["runs"].append({"backend": backend, "ok": False, "error": str(error)})
            break
        finally:
            if backend == "redis" and cleanup is not None and options.redis_url is not None:
                deleted = cleanup(options.redis_url, prefix)
                log(f"bench locks: deleted {deleted} Redis key(s) of {prefix}")
        entry, samples = backend_report(backend, backend_settings.redis_url, options, presence, target.info)
        report["runs"].append(entry)
        run.samples[backend] = samples
        if entry["aborted"]:
            break
    report["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    report["ok"] = bool(report["runs"]) and all(r["ok"] for r in report["runs"]) and (
        len(report["runs"]) == len(options.backend_list)
    )
    return run


def _run_one(options: LocksOptions, target: Target, key_pem: bytes, prefix: str,
             log: Callable[[str], None]) -> PresenceRun:
    presence = PresenceOptions(users=options.presence_users, processes=options.presence_processes,
                               duration_s=options.duration_s, seed=options.seed)
    plan = partial(_lock_plan, options, target.url, key_pem, prefix)
    companion = Companion("locks", lock_worker_main, plan)
    return run_presence(presence, target.url, key_pem, target.pids, log, target.info, companions=[companion])


def _lock_plan(options: LocksOptions, url: str, key_pem: bytes, prefix: str,
               index: int, ramp_deadline: float, hard_deadline: float) -> LockPlan:
    return LockPlan(
        index=index, url=url, private_key_pem=key_pem, role=LOCK_ROLE, prefix=prefix,
        lockers=options.lockers, contenders=options.contenders, pause_ms=options.pause_ms,
        redis_url=options.redis_url, seed=options.seed,
        ramp_deadline=ramp_deadline, hard_deadline=hard_deadline,
    )


# --- the report ---------------------------------------------------------------------


def backend_report(
    backend: str, gateway_redis_url: str | None, options: LocksOptions, presence: PresenceRun,
    target: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, dict[str, list[float]]]]:
    """One run's entry of `runs` and its raw lock samples."""
    result = presence.companions.get("locks")
    samples = result.samples if result is not None else {}
    counts: dict[str, Any] = result.counts if result is not None else {}
    with_floor = options.redis_url is not None
    latency = {phase: _summaries(samples, phase) for phase in (UNCONTENDED, CONTENDED)}
    floor = _summaries(samples, FLOOR) if with_floor else None
    set_nx_p99 = floor["set_nx"]["p99"] if floor else None
    rows = [(f"{phase}.{name}", figures) for phase, names in latency.items() for name, figures in names.items()]
    p = presence.report
    origin = p["phases_s"]["measured_from"]
    windows = {name: (round(a, 3), round(b, 3)) for name, a, b in phase_windows(
        origin or 0.0, (origin or 0.0) + options.duration_s, with_floor)}
    gateway_timeline = p["gateway"]["timeline"]
    failures = {name: int(counts.get(name, 0)) for name in FAILURE_COUNTS}
    for name in FAILURE_COUNTS_BY_KEY:
        failures[name] = sum(counts.get(name, {}).values())
    failures["missing_lock_worker"] = int(result is None)
    failures["presence"] = p["failures"]["total"]
    # The background load must be there: users that never connected, or a load
    # generator bug the presence counters do not see, make the run invalid.
    failures["presence_users_missing"] = max(0, p["users"]["planned"] - p["users"]["connected"])
    failures["presence_worker_errors"] = len(p["worker_errors"])
    failures["total"] = sum(failures.values())
    deadline_hit = p["deadline_hit"] or (result is not None and result.deadline_hit)
    rounds = int(counts.get("contended_rounds", 0))
    entry = {
        "backend": backend,
        "gateway_redis_url": gateway_redis_url,
        "ok": failures["total"] == 0 and not p["aborted"] and not deadline_hit,
        "aborted": p["aborted"],
        "deadline_hit": deadline_hit,
        "error": None,
        "target": target,
        "phases_s": {"measured_from": origin, "measured_to": p["phases_s"]["measured_to"],
                     "windows": windows},
        "latency_ms": latency,
        "floor_ms": floor,
        "ratio_p99_to_set_nx_p99": {name: ratio(f["p99"], set_nx_p99) for name, f in rows},
        "targets": {name: verdict(f["p99"]) for name, f in rows},
        "throughput_per_s": {
            "uncontended_acquires": _rate(latency[UNCONTENDED]["acquire"]["count"], windows.get(UNCONTENDED)),
            "contended_rounds": _rate(rounds, windows.get(CONTENDED)),
            "floor_set_nx": _rate(floor["set_nx"]["count"], windows.get(FLOOR)) if floor else None,
        },
        "contention": {
            "rounds": rounds,
            "attempts": int(counts.get("contended_attempts", 0)),
            "replies": int(counts.get("contended_replies", 0)),
            "grants": int(counts.get("contended_grants", 0)),
            "rounds_without_grant": int(counts.get("contended_rounds_without_grant", 0)),
            "double_grants": int(counts.get("contended_double_grants", 0)),
            # 1.0 when each round has exactly one winner (the rule); of all attempts 1/contenders
            "grants_per_round": round(counts.get("contended_grants", 0) / rounds, 3) if rounds else None,
            "grant_rate": _share(counts.get("contended_grants", 0), counts.get("contended_attempts", 0)),
        },
        "failures": failures,
        "counts": counts,
        "gateway": {
            "pids": p["gateway"]["pids"],
            "cpu_percent_measured": p["gateway"]["cpu_percent_measured"],
            "cpu_percent_by_phase": {name: cpu_in_window(gateway_timeline, a, b) for name, (a, b) in windows.items()},
            "peak_rss_mib": p["gateway"]["peak_rss_mib"],
            "timeline": gateway_timeline,
        },
        "loadgen": {"cpu_percent_measured": p["loadgen"]["cpu_percent_measured"]},
        # how late the lock client's own event loop ran, by phase: what the
        # client side may add to any round trip it times
        "lock_client_loop_lag_ms": {phase: stats.summarize(samples.get(phase, {}).get("loop_lag_ms", [])).as_dict()
                                    for phase in (FLOOR, UNCONTENDED, CONTENDED)},
        "machine": {**p["machine"], "other_cpu_percent_measured": other_cpu_percent(
            p["machine"]["cpu_percent_measured"], p["gateway"]["cpu_percent_measured"],
            p["loadgen"]["cpu_percent_measured"])},
        "presence": {
            "users": p["users"],
            "latency_ms": {k: p["latency_ms"][k] for k in ("heartbeat_rtt", "join_state", "fanout")},
            "failures": p["failures"],
        },
        "worker_errors": [*(result.errors if result is not None else []), *p["worker_errors"]],
    }
    return entry, samples


def _summaries(samples: Mapping[str, Mapping[str, Sequence[float]]], phase: str) -> dict[str, dict[str, Any]]:
    return {name: stats.summarize(samples.get(phase, {}).get(metric, [])).as_dict() for name, metric in METRICS[phase]}


def _rate(count: int, window: tuple[float, float] | None) -> float | None:
    if window is None or window[1] <= window[0]:
        return None
    return round(count / (window[1] - window[0]), 1)


def _share(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def _environment() -> dict[str, Any]:
    import redis

    return {**environment(), "redis_py": redis.__version__}


# --- the table ----------------------------------------------------------------------


def format_table(report: Mapping[str, Any]) -> str:
    """The human summary printed to stdout: one row per backend, phase and operation."""
    s = report["settings"]
    lines = [
        f"locks bench: {s['lockers']} lockers, {s['contenders']} contenders, {s['presence_users']} presence users, "
        f"{s['duration_s']:g} s per backend, pause {s['pause_ms']:g} ms, {s['shards']} shards, "
        f"{s['frontdoors']} front doors",
        f"targets: p99 < {SEED_P99_MS:g} ms (seed bar), goal p99 < {GOAL_P99_MS:g} ms; "
        "ratio = p99 / SET NX p99 of the same run",
        "",
        f"{'backend':<8}{'phase':<13}{'operation':<17}{'count':>7}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}"
        f"{'ratio':>8}  target",
    ]
    for entry in report["runs"]:
        if entry.get("error"):
            lines.append(f"{entry['backend']:<8}not run: {entry['error']}")
            continue
        for phase, op, figures in _rows(entry):
            key = f"{phase}.{op}"
            cells = "".join(f"{_fmt(figures[k]):>8}" for k in ("p50", "p95", "p99", "max"))
            ratio_cell = _fmt(entry["ratio_p99_to_set_nx_p99"].get(key), "x")
            target = entry["targets"].get(key, "")
            lines.append(f"{entry['backend']:<8}{phase:<13}{op:<17}{figures['count']:>7}{cells}"
                         f"{ratio_cell if phase != FLOOR else '':>8}  {target}")
    lines.append("")
    for entry in report["runs"]:
        if entry.get("error"):
            continue
        lines.extend(_run_lines(entry))
    if not report["ok"]:
        lines.append("NOT OK: see failures above and worker_errors in the JSON")
    return "\n".join(lines)


def _rows(entry: Mapping[str, Any]) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    if entry["floor_ms"]:
        for name, figures in entry["floor_ms"].items():
            yield FLOOR, name.replace("set_nx", "SET NX").replace("del", "DEL"), figures
    for phase in (UNCONTENDED, CONTENDED):
        for name, figures in entry["latency_ms"][phase].items():
            yield phase, name, figures


def _run_lines(entry: Mapping[str, Any]) -> list[str]:
    backend, c, g = entry["backend"], entry["contention"], entry["gateway"]
    by_phase = ", ".join(f"{k} {_fmt(v, '%')}" for k, v in g["cpu_percent_by_phase"].items())
    failures = entry["failures"]
    details = ", ".join(f"{k} {v}" for k, v in failures.items() if k != "total" and v)
    heartbeat = entry["presence"]["latency_ms"]["heartbeat_rtt"]
    lines = [
        f"[{backend}] contended: {c['rounds']} rounds, {c['grants']} grants ({_fmt(c['grants_per_round'])} per round, "
        f"{c['rounds_without_grant']} without, {c['double_grants']} double), grant rate "
        f"{_fmt(None if c['grant_rate'] is None else 100 * c['grant_rate'], '%')} of {c['attempts']} attempts",
        f"[{backend}] rates: {_fmt(entry['throughput_per_s']['uncontended_acquires'])} uncontended acquires/s, "
        f"{_fmt(entry['throughput_per_s']['contended_rounds'])} contended rounds/s",
        f"[{backend}] gateway CPU {_fmt(g['cpu_percent_measured'], '%')} of one core over the whole window "
        f"({by_phase}), peak RSS {_fmt(g['peak_rss_mib'], ' MiB')}; load generator "
        f"{_fmt(entry['loadgen']['cpu_percent_measured'], '%')}; machine "
        f"{_fmt(entry['machine']['cpu_percent_measured'], '%')} of {entry['machine']['cpu_count']} cores",
        f"[{backend}] lock client's own event-loop lag p99 (what it adds to a round trip it times): "
        + ", ".join(f"{phase} {_fmt(lag['p99'], ' ms')}" for phase, lag in entry["lock_client_loop_lag_ms"].items()
                    if lag["count"]),
        f"[{backend}] presence: {entry['presence']['users']['connected']} users, heartbeat p99 "
        f"{_fmt(heartbeat['p99'], ' ms')} (n={heartbeat['count']})",
        f"[{backend}] failures: {failures['total']}" + (f" ({details})" if details else ""),
    ]
    warning = shared_machine_warning(backend, entry["machine"]["other_cpu_percent_measured"], "the gateway")
    if warning:
        lines.append(warning)
    if entry["aborted"]:
        lines.append(f"[{backend}] ABORTED: {entry['aborted']}")
    return lines


def _fmt(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.2f}{unit}"
