"""The document benchmark: Y.js updates relayed in rooms, on one server or several in a row.

Belongs here: the parent's side of `rounds bench crdt`: for each server (our
gateway over `/ws` or `/yjs`, any y-websocket server, the stock reference
server) the document workers of `crdtgen.py` through `runner.py`'s phases,
then the report (JSON-ready) with the targets and the ratios between
servers, and its text table. Must not be here: argparse, the environment,
starting a gateway (`cli.py`) or the reference server (`refserver.py`), what
a client does (`crdtgen.py`), percentile math (`stats.py`), drawing
(`plot.py`).

Issue 4's targets: update propagation (sender -> every other member of the
room) p99 under 50 ms at 500 users (the seed's bar); our goal p99 under 5 ms
at 500 users and under 50 ms at 3,000; every update delivered.

The report (`rounds.bench.crdt/1`): `settings`, `targets_ms`, `environment`,
`command`, `ok`, `runs` (one per server, in order, each with `latency_ms`
{propagation, ack (ws mode), connect, sync}, `delivery`, `throughput_per_s`,
`targets`, `server` (CPU % of one core, CPU seconds per 1,000 updates, RSS,
timeline), `loadgen`, `machine`, `failures`, `counts`) and `comparison`
(the first run's figures over each other run's).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

from rounds.bench import stats
from rounds.bench.crdtgen import SLOW_MS, crdt_worker_main
from rounds.bench.crdtplan import CODECS, JSON, MODES, WS, CrdtPlan
from rounds.bench.plan import MEASURED, RAMP, RoomPlan, assign_rooms, plan_rooms, require_loopback_url
from rounds.bench.runner import (
    Conductor,
    Target,
    WorkerSpec,
    environment,
    other_cpu_percent,
    shared_machine_warning,
    wait_until_quiet,
)

SCHEMA = "rounds.bench.crdt/1"
SEED_P99_MS = 50.0  # the seed's bar, at 500 users
GOAL_P99_MS = ((500, 5.0), (3_000, 50.0))  # our goal: p99 under this up to that many users
QUIET_PERCENT, QUIET_WAIT_S = 30.0, 30.0  # before each run: the machine under 30 % of a core, waiting 30 s at most
# (name in the report, phase, metric of crdtgen), in the order of the table.
LATENCIES = (
    ("propagation", MEASURED, "propagation_ms"),
    ("ack", MEASURED, "ack_ms"),
    ("connect", RAMP, "connect_ms"),
    ("sync", RAMP, "sync_ms"),
)
# Worker counters that are faults of the server or of the run.
FAILURE_COUNTS = (
    "connect_errors", "not_synced_after_ramp", "unexpected_closes", "ack_timeouts", "updates_refused",
    "deliveries_missing", "duplicate_deliveries", "revision_regressions", "loadgen_errors",
)
FAILURE_COUNTS_BY_KEY = ("reply_timeouts", "error_frames", "protocol_errors")


@dataclass(frozen=True, slots=True)
class CrdtOptions:
    users: int = 500
    room_size: int = 10
    processes: int = 2
    duration_s: float = 20.0
    interval_s: float = 1.0  # between two updates of one client
    mode: str = WS
    codec: str = JSON  # on /ws
    compare_ref: bool = False  # then measure the stock reference y-websocket server too
    connect_concurrency: int = 100  # across all workers
    seed: int = 1
    role: str = "nurse"

    def check(self) -> None:
        """Raise ValueError naming the first option out of range."""
        limits = (
            ("users", 2, 50_000), ("room_size", 2, 1_000), ("processes", 1, 64), ("duration_s", 1, 3_600),
            ("interval_s", 0.01, 60), ("connect_concurrency", 1, 10_000),
        )
        for name, low, high in limits:
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name} must be within [{low}, {high}], not {value}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, not {self.codec!r}")

    @property
    def rooms(self) -> int:
        return -(-self.users // self.room_size)


def goal_p99_ms(users: int) -> float:
    """Our goal for the propagation p99 at `users`: 5 ms up to 500, 50 ms up to
    3,000 (and, for want of a stated one, beyond)."""
    for limit, goal in GOAL_P99_MS:
        if users <= limit:
            return goal
    return GOAL_P99_MS[-1][1]


def verdict(p99_ms: float | None, users: int) -> str:
    """`goal` under our goal, `seed` under the seed's 50 ms bar only, `miss`, or `n/a`."""
    if p99_ms is None:
        return "n/a"
    return "goal" if p99_ms < goal_p99_ms(users) else "seed" if p99_ms < SEED_P99_MS else "miss"


def ratio(value: float | None, other: float | None) -> float | None:
    """`value / other`, rounded; None when either is missing or `other` is 0."""
    if value is None or other is None or other <= 0:
        return None
    return round(value / other, 2)


def cpu_s_per_1000(cpu_percent: float | None, seconds: float | None, updates: int) -> float | None:
    """CPU seconds a server spent per 1,000 updates sent (= ms of CPU per update)."""
    if cpu_percent is None or not seconds or updates <= 0:
        return None
    return round(cpu_percent / 100.0 * seconds / updates * 1000.0, 4)


# --- the run ------------------------------------------------------------------------


class ServerUnavailable(Exception):
    """The opener could not start its server: that run is reported as not run."""


@dataclass(frozen=True, slots=True)
class Server:
    """One run of the series: `name` in the report, the protocol its clients
    speak (`mode`, and `codec` on /ws), and `open()`, a context manager that
    starts the server (or not, for one given by URL) and yields its `Target`."""

    name: str
    mode: str
    codec: str | None
    open: Callable[[], AbstractContextManager[Target]]

    @property
    def label(self) -> str:
        return f"{self.name} {self.mode}" + (f"/{self.codec}" if self.mode == WS and self.codec else "")


@dataclass(slots=True)
class CrdtRun:
    """The report (JSON-ready) and the raw samples by run label and metric (for the plot)."""

    report: dict[str, Any]
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def run_crdt(
    options: CrdtOptions,
    servers: Sequence[Server],
    private_key_pem: bytes,
    log: Callable[[str], None],
) -> CrdtRun:
    """Run the benchmark against each server in turn and return the report.

    A server that does not start (`ServerUnavailable`) is reported as not
    run and the series goes on; a run stopped early (Ctrl-C, deadline) ends
    the series: the report holds what ran.
    """
    options.check()
    started_at = datetime.now(UTC)
    tag = f"crdt-{started_at.strftime('%H%M%S')}-{os.getpid()}"  # fresh documents each run
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "benchmark": "crdt",
        "started_at": started_at.isoformat(timespec="seconds"),
        "settings": {**asdict(options), "rooms": options.rooms, "servers": [s.label for s in servers]},
        "targets_ms": {"seed_p99": SEED_P99_MS, "goal_p99": goal_p99_ms(options.users),
                       "goals_p99_by_users": [list(g) for g in GOAL_P99_MS], "delivery_ratio": 1.0},
        "environment": {**environment(), "pycrdt": version("pycrdt"), "git": _git_state()},
        "runs": [],
    }
    run = CrdtRun(report)
    for number, server in enumerate(servers):
        log(f"bench crdt: {server.label}")
        try:
            with server.open() as target:
                require_loopback_url(target.url)
                # A server stopped just before (the previous run's gateway, Ray) may still be winding down.
                busy = wait_until_quiet(QUIET_PERCENT, QUIET_WAIT_S, log, "bench crdt")
                conductor = _run_one(options, server, target, private_key_pem, f"document:{tag}-{number}-r", log)
        except ServerUnavailable as error:
            report["runs"].append({"name": server.name, "label": server.label, "mode": server.mode,
                                   "codec": server.codec, "ok": False, "error": str(error)})
            continue
        entry, samples = run_report(server, options, conductor, target.info | {"url": target.url})
        entry["machine"]["busy_percent_before"] = None if busy is None else round(busy, 1)
        report["runs"].append(entry)
        run.samples[server.label] = samples
        if entry["aborted"]:
            break
    report["comparison"] = comparison(report["runs"])
    report["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    report["ok"] = len(report["runs"]) == len(servers) and all(r["ok"] for r in report["runs"])
    return run


def _run_one(options: CrdtOptions, server: Server, target: Target, key_pem: bytes, prefix: str,
             log: Callable[[str], None]) -> Conductor:
    assigned = assign_rooms(plan_rooms(options.users, options.room_size, prefix), options.processes)
    concurrency = max(1, options.connect_concurrency // len(assigned))
    workers = [
        WorkerSpec(f"crdt-{index}", crdt_worker_main,
                   partial(_worker_plan, options, server, target.url, key_pem, rooms, concurrency))
        for index, rooms in enumerate(assigned)
    ]
    conductor = Conductor("crdt", options.duration_s, options.users, workers, target.pids, log)
    conductor.run()
    return conductor


def _worker_plan(options: CrdtOptions, server: Server, url: str, key_pem: bytes, rooms: tuple[RoomPlan, ...],
                 connect_concurrency: int, index: int, ramp_deadline: float, hard_deadline: float) -> CrdtPlan:
    return CrdtPlan(
        index=index, mode=server.mode, url=url, codec=server.codec or JSON, private_key_pem=key_pem,
        role=options.role, rooms=rooms, interval_s=options.interval_s, connect_concurrency=connect_concurrency,
        seed=options.seed, ramp_deadline=ramp_deadline, hard_deadline=hard_deadline,
    )


# --- the report ---------------------------------------------------------------------


def run_report(
    server: Server, options: CrdtOptions, conductor: Conductor, target: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """One run's entry of `runs` and its raw samples (propagation_ms, ack_ms)."""
    results = conductor.results_of(0, len(conductor.targets))
    samples = {phase: stats.merge_samples(r.samples.get(phase, {}) for r in results) for phase in (RAMP, MEASURED)}
    counts = stats.merge_counts(r.counts for r in results)
    latency = {name: stats.summarize(samples[phase].get(metric, [])).as_dict() for name, phase, metric in LATENCIES}
    if server.mode != WS:
        del latency["ack"]  # y-websocket has no acknowledgement
    failures = {name: int(counts.get(name, 0)) for name in FAILURE_COUNTS}
    for name in FAILURE_COUNTS_BY_KEY:
        failures[name] = sum(counts.get(name, {}).values())
    failures["missing_workers"] = len(conductor.targets) - len(results)
    failures["total"] = sum(failures.values())
    deadline_hit = conductor.deadline_hit or any(r.deadline_hit for r in results)
    phases = conductor.phases_s()
    measured_s = phases["measured"] or None
    updates = int(counts.get("updates_sent", 0))
    expected, delivered = int(counts.get("deliveries_expected", 0)), int(counts.get("deliveries", 0))
    server_figures = conductor.gateway_figures()
    server_figures["cpu_s_per_1000_updates"] = cpu_s_per_1000(
        server_figures["cpu_percent_measured"], measured_s, updates)
    delivery_ratio = round(delivered / expected, 6) if expected else None
    p99 = latency["propagation"]["p99"]
    entry: dict[str, Any] = {
        "name": server.name,
        "label": server.label,
        "mode": server.mode,
        "codec": server.codec if server.mode == WS else None,
        "ok": failures["total"] == 0 and conductor.aborted is None and not deadline_hit,
        "aborted": conductor.aborted,
        "deadline_hit": deadline_hit,
        "error": None,
        "target": target,
        "phases_s": phases,
        "users": {
            "planned": options.users,
            "connected": len(samples[RAMP].get("connect_ms", [])),
            "synced": len(samples[RAMP].get("sync_ms", [])),
            "connected_at_end": sum(r.connected_at_end for r in results),
        },
        "latency_ms": latency,
        "delivery": {
            "expected": expected,
            "delivered": delivered,
            "missing": int(counts.get("deliveries_missing", 0)),
            "ratio": delivery_ratio,
            "echoes": int(counts.get("echoes", 0)),
            "duplicates": int(counts.get("duplicate_deliveries", 0)),
            "unmatched": int(counts.get("unmatched_deliveries", 0)),
            "extra": int(counts.get("extra_deliveries", 0)),
            "updates_without_marker": int(counts.get("updates_without_marker", 0)),
        },
        "throughput_per_s": {
            "updates": round(updates / measured_s, 1) if measured_s else None,
            "deliveries": round(delivered / measured_s, 1) if measured_s else None,
        },
        "targets": {
            "propagation_p99": verdict(p99, options.users),
            "delivery": "n/a" if delivery_ratio is None else "ok" if delivered == expected else "miss",
        },
        "slow_deliveries_by_second": slow_by_second(counts, options.duration_s),
        "server": server_figures,
        "loadgen": conductor.loadgen_figures(),
        "machine": {**conductor.machine_figures()},
        "failures": failures,
        "counts": counts,
        "worker_errors": [text for r in results for text in r.errors],
    }
    entry["machine"]["other_cpu_percent_measured"] = other_cpu_percent(
        entry["machine"]["cpu_percent_measured"], entry["server"]["cpu_percent_measured"],
        entry["loadgen"]["cpu_percent_measured"])
    return entry, {metric: samples[MEASURED].get(metric, []) for metric in ("propagation_ms", "ack_ms")}


def slow_by_second(counts: Mapping[str, Any], duration_s: float) -> dict[str, list[int]]:
    """Deliveries over 5 ms and over 50 ms by second of their send in the measured
    phase (index 0 = its first second): a tail spread evenly is load, one in a
    few seconds is a stall."""
    seconds = max(1, int(-(-duration_s // 1)))
    out: dict[str, list[int]] = {}
    for limit in SLOW_MS:
        name = f"over_{limit:g}ms"
        by_second = counts.get(f"deliveries_{name}_by_second", {})
        out[name] = [int(by_second.get(str(second), 0)) for second in range(seconds)]
    return out


def comparison(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The first run's propagation percentiles and CPU over each later run's
    (below 1: the first run is faster or cheaper)."""
    done = [r for r in runs if not r.get("error")]
    if len(done) < 2:
        return []
    first = done[0]
    out = []
    for other in done[1:]:
        a, b = first["latency_ms"]["propagation"], other["latency_ms"]["propagation"]
        out.append({
            "run": first["label"],
            "over": other["label"],
            "propagation": {k: ratio(a[k], b[k]) for k in ("p50", "p95", "p99", "max")},
            "cpu_percent": ratio(first["server"]["cpu_percent_measured"], other["server"]["cpu_percent_measured"]),
            "cpu_s_per_1000_updates": ratio(first["server"]["cpu_s_per_1000_updates"],
                                            other["server"]["cpu_s_per_1000_updates"]),
        })
    return out


# --- the table ----------------------------------------------------------------------


def format_table(report: Mapping[str, Any]) -> str:
    """The human summary printed to stdout: one row per run and latency, then each
    run's delivery, rates and CPU, then the ratios."""
    s = report["settings"]
    t = report["targets_ms"]
    lines = [
        f"crdt bench: {s['users']} users in {s['rooms']} rooms of {s['room_size']}, one update every "
        f"{s['interval_s']:g} s each, {s['duration_s']:g} s measured, {s['processes']} worker process(es)",
        f"targets: propagation p99 < {t['seed_p99']:g} ms (seed bar, 500 users); our goal p99 < "
        f"{t['goal_p99']:g} ms at {s['users']} users; delivery 100 %",
        "",
        f"{'run':<30}{'latency (ms)':<13}{'count':>8}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}  target",
    ]
    for entry in report["runs"]:
        if entry.get("error"):
            lines.append(f"{entry['label']:<30}not run: {entry['error']}")
            continue
        for name, figures in entry["latency_ms"].items():
            cells = "".join(f"{_fmt(figures[k]):>9}" for k in ("p50", "p95", "p99", "max"))
            target = entry["targets"]["propagation_p99"] if name == "propagation" else ""
            lines.append(f"{entry['label']:<30}{name:<13}{figures['count']:>8}{cells}  {target}")
    lines.append("")
    for entry in report["runs"]:
        if not entry.get("error"):
            lines.extend(_run_lines(entry))
    for c in report.get("comparison", []):
        p = c["propagation"]
        lines.append(
            f"{c['run']} ÷ {c['over']}: propagation p50 {_fmt(p['p50'], 'x')}, p95 {_fmt(p['p95'], 'x')}, "
            f"p99 {_fmt(p['p99'], 'x')}; server CPU {_fmt(c['cpu_percent'], 'x')}, per update "
            f"{_fmt(c['cpu_s_per_1000_updates'], 'x')}")
    if not report["ok"]:
        lines.append("NOT OK: see failures above and worker_errors in the JSON")
    return "\n".join(lines)


def _run_lines(entry: Mapping[str, Any]) -> list[str]:
    label, d, srv = entry["label"], entry["delivery"], entry["server"]
    ratio_text = "n/a" if d["ratio"] is None else f"{100 * d['ratio']:.3f} %"
    rates = entry["throughput_per_s"]
    failures = entry["failures"]
    details = ", ".join(f"{k} {v}" for k, v in failures.items() if k != "total" and v)
    notes = ", ".join(f"{k} {d[k]}" for k in ("echoes", "extra", "unmatched", "updates_without_marker") if d[k])
    lines = [
        f"[{label}] delivery {ratio_text} ({d['delivered']} of {d['expected']}, missing {d['missing']})"
        + (f"; {notes}" if notes else ""),
        f"[{label}] {_fmt(rates['updates'])} updates/s, {_fmt(rates['deliveries'])} deliveries/s; "
        f"{entry['users']['synced']} of {entry['users']['planned']} users synced",
        f"[{label}] server CPU {_fmt(srv['cpu_percent_measured'], '%')} of one core, "
        f"{_fmt(srv['cpu_s_per_1000_updates'], ' CPU-s')} per 1,000 updates, peak RSS "
        f"{_fmt(srv['peak_rss_mib'], ' MiB')} ({len(srv['pids'])} process(es)); load generator "
        f"{_fmt(entry['loadgen']['cpu_percent_measured'], '%')}; machine "
        f"{_fmt(entry['machine']['cpu_percent_measured'], '%')} of {entry['machine']['cpu_count']} cores",
        f"[{label}] failures: {failures['total']}" + (f" ({details})" if details else ""),
    ]
    processes = srv.get("processes", [])
    if len(processes) > 1:
        lines.append(f"[{label}] server CPU by process: " + ", ".join(
            f"{_title(p['title'])} {p['cpu_percent_measured']:.0f}%" for p in processes))
    slow = entry.get("slow_deliveries_by_second", {})
    for name, by_second in slow.items():
        if any(by_second):
            lines.append(f"[{label}] deliveries {name.replace('_', ' ')} by second of the run: "
                         + " ".join(str(n) for n in by_second))
    warning = shared_machine_warning(label, entry["machine"]["other_cpu_percent_measured"], "the server")
    if warning:
        lines.append(warning)
    if entry["aborted"]:
        lines.append(f"[{label}] ABORTED: {entry['aborted']}")
    return lines


def _title(title: str) -> str:
    """A short name for a process: `ray::ShardActor` from a Ray worker's title, else its program."""
    first = title.split(" ", 1)[0]
    return first.split(".", 1)[0] if first.startswith("ray::") else first.rsplit("/", 1)[-1] or "?"


def _fmt(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.2f}{unit}"


def _git_state() -> dict[str, Any] | None:
    """The commit the bench ran from, and whether the working tree differed from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def report_stem(options: CrdtOptions, when: float | None = None) -> str:
    """File name stem of a report: benchmark, mode(s), users, UTC time."""
    modes = options.mode + (f"-{options.codec}" if options.mode == WS else "")
    modes += "-vs-ref" if options.compare_ref else ""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    return f"crdt-{modes}-{options.users}u-{stamp}"

