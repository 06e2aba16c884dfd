"""The presence benchmark: plan the rooms, run the workers, sample the gateway, report.

Belongs here: the parent's side of `rounds bench presence` (splitting whole
rooms over worker processes, the JSON report and its text table). Must not
be here: argparse, the environment, starting the gateway (`cli.py`), running
worker processes and sampling CPU (`runner.py`), what a simulated user does
(`loadgen.py`), percentile math (`stats.py`), drawing (`plot.py`).

Phases (`runner.py` walks the worker processes through them): *ramp*
(workers mint tokens, connect in bounded waves, join their room), then
*measured* (`duration_s` of heartbeats and churn, started for all workers at
once), then *drain* (late replies get their timeout, connections close).
Benchmarks that need presence traffic as background load (`locks.py`) add
`Companion` workers, which go through the same phases.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from rounds.bench import plan, stats
from rounds.bench.loadgen import worker_main
from rounds.bench.plan import (
    MEASURED,
    RAMP,
    RoomPlan,
    WorkerPlan,
    WorkerResult,
    assign_rooms,
    require_loopback_url,
)
from rounds.bench.runner import Conductor, WorkerSpec, environment, gc_text

SCHEMA = "rounds.bench.presence/1"
# A worker beside the presence workers, in the same phases (`locks.py`).
Companion = WorkerSpec
__all__ = [
    "Companion", "PresenceOptions", "PresenceRun", "assign_rooms", "environment", "format_table", "plan_rooms",
    "run_presence",
]

# Failure counters: each one is a user-visible fault of the gateway or the run.
FAILURE_COUNTS = (
    "connect_errors",
    "unexpected_closes",
    "missing_user_joined",
    "join_timeouts",
    "leave_timeouts",
    "heartbeat_timeouts",
    "loadgen_errors",  # our own bug hit a connection: the figures are suspect
)
# The latencies of the report, in the order of the table: (name, phase, metric).
LATENCIES = (
    ("connect", RAMP, "connect_ms"),
    ("join_state", MEASURED, "join_state_ms"),
    ("fanout", MEASURED, "fanout_ms"),
    ("heartbeat_rtt", MEASURED, "heartbeat_rtt_ms"),
    ("leave", MEASURED, "leave_ms"),
)


@dataclass(frozen=True, slots=True)
class PresenceOptions:
    users: int = 500
    room_size: int = 10
    processes: int = 2
    duration_s: float = 20.0
    churn_s: float = 10.0  # mean seconds between two churns of one user; 0: no churn
    heartbeat_s: float = 5.0
    connect_concurrency: int = 100  # across all workers
    deflate: bool = False  # offer permessage-deflate like a browser would
    seed: int = 1
    role: str = "nurse"
    room_prefix: str = "page:/bench/room-"

    def check(self) -> None:
        """Raise ValueError naming the first option out of range."""
        limits = (
            ("users", 1, 50_000),
            ("room_size", 1, 1_000),
            ("processes", 1, 64),
            ("duration_s", 0.1, 3_600),
            ("churn_s", 0, 3_600),
            ("heartbeat_s", 0.05, 600),
            ("connect_concurrency", 1, 10_000),
        )
        for name, low, high in limits:
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name} must be within [{low}, {high}], not {value}")

    @property
    def rooms(self) -> int:
        return -(-self.users // self.room_size)


@dataclass(slots=True)
class PresenceRun:
    """The report (JSON-ready) and the merged raw samples (for the plot); each
    companion's result by name (None if none came), kept out of the figures."""

    report: dict[str, Any]
    samples: dict[str, dict[str, list[float]]]
    companions: dict[str, WorkerResult | None] = field(default_factory=dict)


# --- planning -------------------------------------------------------------------


def plan_rooms(options: PresenceOptions) -> list[RoomPlan]:
    """Users 0..n-1 in rooms of `room_size`, in order; the last room may be smaller."""
    return plan.plan_rooms(options.users, options.room_size, options.room_prefix)


def run_presence(
    options: PresenceOptions,
    url: str,
    private_key_pem: bytes,
    gateway_pids: Sequence[int] | None,
    log: Callable[[str], None],
    target: dict[str, Any] | None = None,
    companions: Sequence[Companion] = (),
) -> PresenceRun:
    """Run the benchmark against `url` (loopback only) and return its report.

    `gateway_pids` are sampled for CPU and RSS (None: not reported); `log`
    receives progress lines; `target` is copied into the report as is;
    `companions` run beside the presence workers (their processes count as
    load generator in the report's CPU figures).
    """
    options.check()
    require_loopback_url(url)
    started_at = datetime.now(UTC)
    assigned = assign_rooms(plan_rooms(options), options.processes)
    concurrency = max(1, options.connect_concurrency // len(assigned))
    workers = [
        WorkerSpec(f"worker-{index}", worker_main, partial(_worker_plan, options, url, private_key_pem, rooms,
                                                            concurrency))
        for index, rooms in enumerate(assigned)
    ]
    # Companions are workers numbered after the presence workers.
    conductor = Conductor("presence", options.duration_s, options.users, [*workers, *companions], gateway_pids, log)
    conductor.run()
    return _build(conductor, options, len(workers), companions, started_at, target or {"url": url})


def _worker_plan(options: PresenceOptions, url: str, private_key_pem: bytes, rooms: tuple[RoomPlan, ...],
                 connect_concurrency: int, index: int, ramp_deadline: float, hard_deadline: float) -> WorkerPlan:
    return WorkerPlan(
        index=index,
        url=url,
        private_key_pem=private_key_pem,
        role=options.role,
        rooms=rooms,
        heartbeat_s=options.heartbeat_s,
        churn_s=options.churn_s,
        connect_concurrency=connect_concurrency,
        deflate=options.deflate,
        seed=options.seed,
        ramp_deadline=ramp_deadline,
        hard_deadline=hard_deadline,
    )


# --- the report ---------------------------------------------------------------------


def _build(run: Conductor, options: PresenceOptions, workers: int, companions: Sequence[Companion],
           started_at: datetime, target: dict[str, Any]) -> PresenceRun:
    results = run.results_of(0, workers)
    samples = {phase: stats.merge_samples(r.samples.get(phase, {}) for r in results) for phase in (RAMP, MEASURED)}
    counts = stats.merge_counts(r.counts for r in results)
    failures = {name: int(counts.get(name, 0)) for name in FAILURE_COUNTS}
    failures["error_frames"] = sum(counts.get("error_frames", {}).values())
    failures["protocol_errors"] = sum(counts.get("protocol_errors", {}).values())
    failures["missing_workers"] = workers - len(results)
    failures["total"] = sum(failures.values())
    deadline_hit = run.deadline_hit or any(r.deadline_hit for r in results)
    latency = {name: stats.summarize(samples[phase].get(metric, [])).as_dict() for name, phase, metric in LATENCIES}
    ramp_latency = {
        name: stats.summarize(samples[RAMP].get(metric, [])).as_dict()
        for name, metric in (("join_state", "join_state_ms"), ("fanout", "fanout_ms"))
    }
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "benchmark": "presence",
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "ok": failures["total"] == 0 and run.aborted is None and not deadline_hit,
        "aborted": run.aborted,
        "deadline_hit": deadline_hit,
        "target": target,
        "settings": {**asdict(options), "rooms": options.rooms, "workers": workers},
        "environment": environment(),
        "phases_s": run.phases_s(),
        "users": {
            "planned": options.users,
            "connected": len(samples[RAMP].get("connect_ms", [])),
            "connected_at_end": sum(r.connected_at_end for r in results),
        },
        "latency_ms": latency,
        "ramp_latency_ms": ramp_latency,
        "failures": failures,
        "counts": counts,
        "gateway": run.gateway_figures(),
        "loadgen": run.loadgen_figures(),
        "machine": run.machine_figures(),
        "worker_errors": [text for r in results for text in r.errors],
    }
    by_name = {c.name: run.finished.get(workers + j) for j, c in enumerate(companions)}
    return PresenceRun(report, samples, by_name)


def format_table(report: dict[str, Any]) -> str:
    """The human summary printed to stdout: latencies, failures, gateway figures."""
    settings = report["settings"]
    lines = [
        f"presence bench: {settings['users']} users in {settings['rooms']} rooms of {settings['room_size']}, "
        f"{settings['duration_s']:g} s measured, churn every {settings['churn_s']:g} s, "
        f"{settings['workers']} worker(s) -> {report['target'].get('url')}",
        "",
        f"{'latency (ms)':<16}{'count':>8}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}",
    ]
    for name, figures in report["latency_ms"].items():
        cells = "".join(f"{_fmt(figures[k]):>10}" for k in ("p50", "p95", "p99", "max"))
        lines.append(f"{name:<16}{figures['count']:>8}{cells}")
    failures = report["failures"]
    details = ", ".join(f"{k} {v}" for k, v in failures.items() if k != "total" and v)
    lines += ["", f"failures: {failures['total']}" + (f" ({details})" if details else "")]
    lines.append(f"frames received: {report['counts'].get('frames_received', 0)}, "
                 f"sent: {report['counts'].get('frames_sent', 0)}")
    gateway = report["gateway"]
    lines.append(
        f"gateway: CPU {_fmt(gateway['cpu_percent_measured'], '%')} of one core (measured phase), "
        f"peak RSS {_fmt(gateway['peak_rss_mib'], ' MiB')}, {len(gateway['pids'])} process(es)"
    )
    gc = gc_text(report.get("gateway_gc"), end=" over the whole run (ramp included), summed over its processes")
    if gc:
        lines.append(f"gateway {gc}")
    lines.append(f"load generator: CPU {_fmt(report['loadgen']['cpu_percent_measured'], '%')} of one core")
    machine = report["machine"]
    lines.append(
        f"whole machine: CPU {_fmt(machine['cpu_percent_measured'], '%')} of one core "
        f"({machine['cpu_count']} cores; 1-min load {machine['loadavg_1m_at_start']} at start)"
    )
    if report["aborted"]:
        lines.append(f"ABORTED: {report['aborted']}")
    return "\n".join(lines)


def _fmt(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.2f}{unit}"
