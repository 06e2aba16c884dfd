"""The presence benchmark: plan the rooms, run the workers, sample the gateway, report.

Belongs here: the parent's side of `rounds bench presence` (splitting whole
rooms over worker processes, the phase barrier, the hard deadline, psutil
sampling of the gateway's and the workers' processes, the JSON report and its
text table). Must not be here: argparse, the environment, starting the
gateway (`cli.py`), what a simulated user does (`loadgen.py`), percentile
math (`stats.py`), drawing (`plot.py`).

Phases: *ramp* (workers mint tokens, connect in bounded waves, join their
room; limited to `RAMP_LIMIT_S`), then *measured* (`duration_s` of
heartbeats and churn, started for all workers at once), then *drain* (late
replies get their timeout, connections close). The whole run stops by
itself at `duration_s + DEADLINE_MARGIN_S`.
Benchmarks that need presence traffic as background load (`locks.py`) add
`Companion` workers, which go through the same phases.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import psutil
import websockets

from rounds.bench import stats
from rounds.bench.loadgen import worker_main
from rounds.bench.plan import (
    DRAIN,
    MEASURED,
    RAMP,
    Go,
    Progress,
    Ready,
    RoomPlan,
    Stop,
    WorkerPlan,
    WorkerResult,
    require_loopback_url,
)

SCHEMA = "rounds.bench.presence/1"
RAMP_LIMIT_S = 35.0  # connects and first joins not done by then count as failures
DEADLINE_MARGIN_S = 60.0  # hard deadline = duration + this, from the first worker's start
SAMPLE_EVERY_S = 0.5
MIN_WINDOW_S = 0.25  # shortest window a CPU % of the timeline is computed over
PROGRESS_EVERY_S = 1.0
STOP_GRACE_S = 5.0  # after Stop, how long workers get to send their result
REAP_S = 3.0  # then at most this long to end worker processes (join, SIGTERM, SIGKILL)
MIB = 1024 * 1024

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


@dataclass(frozen=True, slots=True)
class Companion:
    """A worker process beside the presence workers: `target(plan, control, results)`
    is its entry, with `loadgen.worker_main`'s pipe and queue, and `plan(index,
    ramp_deadline, hard_deadline)` its picklable plan. It sends `Ready(index)`
    after its ramp and a `WorkerResult` before `hard_deadline`."""

    name: str
    target: Callable[[Any, Any, Any], None]
    plan: Callable[[int, float, float], Any]


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
    return [
        RoomPlan(f"{options.room_prefix}{r}", tuple(range(start, min(start + options.room_size, options.users))))
        for r, start in enumerate(range(0, options.users, options.room_size))
    ]


def assign_rooms(rooms: Sequence[RoomPlan], processes: int) -> list[tuple[RoomPlan, ...]]:
    """Deal whole rooms round-robin over at most `processes` workers (none left empty)."""
    workers = max(1, min(processes, len(rooms)))
    return [tuple(rooms[w::workers]) for w in range(workers)]


# --- sampling processes -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reading:
    at: float  # time.monotonic()
    cpu_s: dict[int, float]  # user + system seconds by pid
    rss_bytes: dict[int, int]
    machine_busy_s: float  # all CPUs, all processes: non-idle seconds since boot


class ProcessSampler:
    """CPU time and RSS of a fixed set of processes; a vanished pid is noted, not fatal."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.processes: dict[int, psutil.Process] = {}
        self.lost: set[int] = set()
        for pid in dict.fromkeys(pids):
            try:
                self.processes[pid] = psutil.Process(pid)
            except psutil.Error:
                self.lost.add(pid)

    def read(self) -> Reading:
        cpu: dict[int, float] = {}
        rss: dict[int, int] = {}
        for pid, process in list(self.processes.items()):
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    cpu[pid] = times.user + times.system
                    rss[pid] = process.memory_info().rss
            except psutil.Error:
                self.lost.add(pid)
                del self.processes[pid]
        return Reading(time.monotonic(), cpu, rss, _machine_busy_s())


def _machine_busy_s() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def cpu_between(a: Reading, b: Reading) -> float | None:
    """% of one core used between two readings, summed over pids present in both
    (None if there are none: every process sampled at `a` was gone at `b`)."""
    both = a.cpu_s.keys() & b.cpu_s.keys()
    if not both:
        return None
    return stats.cpu_percent(sum(b.cpu_s[pid] - a.cpu_s[pid] for pid in both), b.at - a.at)


def machine_cpu_between(a: Reading, b: Reading) -> float | None:
    """% of one core the whole machine was busy between two readings: what else ran."""
    return stats.cpu_percent(b.machine_busy_s - a.machine_busy_s, b.at - a.at)


# --- the run ------------------------------------------------------------------------


@dataclass(slots=True)
class _Timeline:
    """Readings of one sampler, with the phase each was taken in."""

    sampler: ProcessSampler
    readings: list[tuple[str, Reading]] = field(default_factory=list)
    marks: dict[str, Reading] = field(default_factory=dict)

    def take(self, phase: str, mark: str | None = None) -> None:
        reading = self.sampler.read()
        self.readings.append((phase, reading))
        if mark is not None:
            self.marks[mark] = reading

    def series(self, origin: float) -> list[dict[str, Any]]:
        """Points of CPU % and RSS over windows of at least `MIN_WINDOW_S`.

        A mark taken just after a regular reading would otherwise divide one
        clock tick of CPU time by a few microseconds of wall time."""
        out = []
        if not self.readings:
            return out
        _, a = self.readings[0]
        for phase, b in self.readings[1:]:
            if b.at - a.at < MIN_WINDOW_S:
                continue
            cpu, machine = cpu_between(a, b), machine_cpu_between(a, b)
            out.append(
                {
                    "t_s": round(b.at - origin, 3),
                    "phase": phase,
                    "cpu_percent": None if cpu is None else round(cpu, 1),
                    "rss_mib": round(sum(b.rss_bytes.values()) / MIB, 1),
                    "machine_cpu_percent": None if machine is None else round(machine, 1),
                }
            )
            a = b
        return out

    def cpu_between_marks(self, start: str, end: str, machine: bool = False) -> float | None:
        if start not in self.marks or end not in self.marks:
            return None
        between = machine_cpu_between if machine else cpu_between
        return between(self.marks[start], self.marks[end])

    def peak_rss_mib(self) -> float | None:
        peaks = [sum(r.rss_bytes.values()) for _, r in self.readings if r.rss_bytes]
        return round(max(peaks) / MIB, 1) if peaks else None


class _Conductor:
    """Starts the workers and walks them through the phases; see `run_presence`."""

    def __init__(
        self,
        options: PresenceOptions,
        url: str,
        private_key_pem: bytes,
        gateway_pids: Sequence[int] | None,
        log: Callable[[str], None],
        companions: Sequence[Companion] = (),
    ) -> None:
        self.options = options
        self.url = url
        self.log = log
        self.started = time.monotonic()
        self.load_at_start = psutil.getloadavg()[0]
        # Everything, reaping included, is over by `hard_deadline`; stopping starts
        # early enough for that, and each worker gives up before it is asked to.
        self.hard_deadline = self.started + options.duration_s + DEADLINE_MARGIN_S
        self.stop_at = self.hard_deadline - STOP_GRACE_S - REAP_S
        self.ramp_deadline = self.started + RAMP_LIMIT_S
        self.context = multiprocessing.get_context("spawn")
        assigned = assign_rooms(plan_rooms(options), options.processes)
        self.results: queue.Queue[Any] = self.context.Queue()
        self.plans = [
            WorkerPlan(
                index=index,
                url=url,
                private_key_pem=private_key_pem,
                role=options.role,
                rooms=rooms,
                heartbeat_s=options.heartbeat_s,
                churn_s=options.churn_s,
                connect_concurrency=max(1, options.connect_concurrency // len(assigned)),
                deflate=options.deflate,
                seed=options.seed,
                ramp_deadline=self.ramp_deadline,
                hard_deadline=self.stop_at,
            )
            for index, rooms in enumerate(assigned)
        ]
        # Companions are workers numbered after the presence workers.
        self.companions = list(companions)
        self.targets: list[tuple[Callable[[Any, Any, Any], None], Any, str]] = [
            (worker_main, plan, f"bench-worker-{plan.index}") for plan in self.plans
        ] + [
            (c.target, c.plan(len(self.plans) + j, self.ramp_deadline, self.stop_at), f"bench-{c.name}")
            for j, c in enumerate(self.companions)
        ]
        self.gateway = _Timeline(ProcessSampler(gateway_pids)) if gateway_pids is not None else None
        self.loadgen: _Timeline | None = None
        self.processes: list[Any] = []
        self.controls: list[Any] = []
        self.progress: dict[int, Progress] = {}
        self.ready: set[int] = set()
        self.finished: dict[int, WorkerResult] = {}
        self.phase = RAMP
        self.measure_started: float | None = None
        self.measure_until: float | None = None
        self.measure_ended: float | None = None
        self.deadline_hit = False
        self.aborted: str | None = None  # why the run was stopped early, if it was

    def run(self) -> None:
        for target, plan, name in self.targets:
            receive, send = self.context.Pipe(duplex=False)
            process = self.context.Process(target=target, args=(plan, receive, self.results), name=name)
            process.start()
            receive.close()
            self.processes.append(process)
            self.controls.append(send)
        self.loadgen = _Timeline(ProcessSampler([p.pid for p in self.processes]))
        self._sample(mark="start")
        try:
            self._loop()
        except KeyboardInterrupt:
            self._stop_all("interrupted")  # a second Ctrl-C ends the wait for results
        finally:
            self._reap()
        if self.measure_started is not None and self.measure_ended is None:
            self.measure_ended = time.monotonic()  # stopped early: figures cover what ran
            self._sample(mark="measure_end")

    def _loop(self) -> None:
        next_sample = time.monotonic() + SAMPLE_EVERY_S
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        while len(self.finished) < len(self.targets) and self.aborted is None:
            now = time.monotonic()
            if now >= self.stop_at:
                self.deadline_hit = True
                limit = self.options.duration_s + DEADLINE_MARGIN_S
                self._stop_all(f"still running {now - self.started:.0f} s after the start (hard limit {limit:.0f} s)")
                continue
            if now >= next_sample:
                self._sample()
                next_sample = max(next_sample + SAMPLE_EVERY_S, now)  # no burst after a long wait
            if now >= next_progress:
                self.log(self._progress_line(now))
                next_progress = max(next_progress + PROGRESS_EVERY_S, now)
            if self._dead_without_result():
                self._stop_all("a worker process died without a result")
                continue
            self._advance(now)
            self._receive(timeout=max(0.0, min(next_sample, next_progress) - time.monotonic()))

    def _advance(self, now: float) -> None:
        if self.phase == RAMP and len(self.ready) == len(self.targets):
            self.measure_started = now
            self.measure_until = now + self.options.duration_s
            self._sample(mark="measure_start")
            for control in self.controls:
                control.send(Go(self.measure_until))
            self.phase = MEASURED
            self.log(f"bench presence [measured] started for {self.options.duration_s:g} s")
        elif self.phase == RAMP and now > self.ramp_deadline + STOP_GRACE_S:
            self._stop_all("workers did not finish the ramp in time")
        elif self.phase == MEASURED and self.measure_until is not None and now >= self.measure_until:
            self.measure_ended = now
            self._sample(mark="measure_end")
            self.phase = DRAIN

    def _receive(self, timeout: float) -> None:
        try:
            message = self.results.get(timeout=min(timeout, 0.1))
        except queue.Empty:
            return
        match message:
            case Progress():
                self.progress[message.worker] = message
            case Ready():
                self.ready.add(message.worker)
            case WorkerResult():
                self.finished[message.worker] = message

    def _sample(self, mark: str | None = None) -> None:
        for timeline in (self.gateway, self.loadgen):
            if timeline is not None:
                timeline.take(self.phase, mark)

    def _dead_without_result(self) -> bool:
        if not self._missing_dead():
            return False
        grace = time.monotonic() + 1.0  # its result may still be in the pipe
        while time.monotonic() < grace and self._missing_dead():
            self._receive(timeout=0.1)
        return self._missing_dead()

    def _missing_dead(self) -> bool:
        return any(p.exitcode is not None and i not in self.finished for i, p in enumerate(self.processes))

    def _stop_all(self, reason: str) -> None:
        self.aborted = reason
        self.log(f"bench presence: stopping: {reason}")
        for control in self.controls:
            try:
                control.send(Stop())
            except OSError:
                pass  # that worker is gone already; it is reported as missing
        grace = time.monotonic() + STOP_GRACE_S
        while len(self.finished) < len(self.targets) and time.monotonic() < grace:
            self._receive(timeout=0.1)

    def _reap(self) -> None:
        step = REAP_S / 3
        for process in self.processes:
            process.join(timeout=step)
            if process.is_alive():
                self.log(f"bench presence: terminating {process.name} (pid {process.pid})")
                process.terminate()
                process.join(timeout=step / 2)
            if process.is_alive():  # SIGTERM waits while a process is stopped; SIGKILL does not
                process.kill()
                process.join(timeout=step / 2)
        for control in self.controls:
            control.close()

    def _progress_line(self, now: float) -> str:
        users = self.options.users
        connected = sum(p.connected for p in self.progress.values())
        failed = sum(p.connect_failures for p in self.progress.values())
        joined = sum(p.joined for p in self.progress.values())
        frames = sum(p.frames_received for p in self.progress.values())
        head = f"bench presence [{self.phase}] connected {connected}/{users} failed {failed} joined {joined}"
        if self.phase == RAMP:
            tail = f"ramp limit in {self.ramp_deadline - now:.0f} s"
        elif self.phase == MEASURED and self.measure_until is not None:
            tail = f"frames {frames} | {max(0.0, self.measure_until - now):.0f} s left"
        else:
            tail = f"waiting for {len(self.targets) - len(self.finished)} worker result(s)"
        return f"{head} | {tail}"


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
    conductor = _Conductor(options, url, private_key_pem, gateway_pids, log, companions)
    conductor.run()
    return _build(conductor, started_at, target or {"url": url})


# --- the report ---------------------------------------------------------------------


def _build(run: _Conductor, started_at: datetime, target: dict[str, Any]) -> PresenceRun:
    results = [run.finished[i] for i in range(len(run.plans)) if i in run.finished]
    samples = {phase: stats.merge_samples(r.samples.get(phase, {}) for r in results) for phase in (RAMP, MEASURED)}
    counts = stats.merge_counts(r.counts for r in results)
    failures = {name: int(counts.get(name, 0)) for name in FAILURE_COUNTS}
    failures["error_frames"] = sum(counts.get("error_frames", {}).values())
    failures["protocol_errors"] = sum(counts.get("protocol_errors", {}).values())
    failures["missing_workers"] = len(run.plans) - len(results)
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
        "settings": {**asdict(run.options), "rooms": run.options.rooms, "workers": len(run.plans)},
        "environment": environment(),
        "phases_s": {
            "ramp": round((run.measure_started or time.monotonic()) - run.started, 3),
            "measured": _since(run.measure_started, run.measure_ended) if run.measure_started is not None else 0.0,
            # seconds since the start, the time axis of the timelines; None if not reached
            "measured_from": _since(run.started, run.measure_started),
            "measured_to": _since(run.started, run.measure_ended),
        },
        "users": {
            "planned": run.options.users,
            "connected": len(samples[RAMP].get("connect_ms", [])),
            "connected_at_end": sum(r.connected_at_end for r in results),
        },
        "latency_ms": latency,
        "ramp_latency_ms": ramp_latency,
        "failures": failures,
        "counts": counts,
        "gateway": _process_figures(run.gateway, run.started),
        "loadgen": _process_figures(run.loadgen, run.started),
        "machine": _machine_figures(run.loadgen, run.load_at_start),
        "worker_errors": [text for r in results for text in r.errors],
    }
    companions = {c.name: run.finished.get(len(run.plans) + j) for j, c in enumerate(run.companions)}
    return PresenceRun(report, samples, companions)


def _since(origin: float | None, at: float | None) -> float | None:
    return None if at is None or origin is None else round(at - origin, 3)


def _process_figures(timeline: _Timeline | None, origin: float) -> dict[str, Any]:
    if timeline is None:
        return {"pids": [], "cpu_percent_measured": None, "cpu_percent_ramp": None, "peak_rss_mib": None,
                "pids_lost": [], "timeline": []}
    measured = timeline.cpu_between_marks("measure_start", "measure_end")
    ramp = timeline.cpu_between_marks("start", "measure_start")
    return {
        "pids": sorted(timeline.sampler.processes.keys() | timeline.sampler.lost),
        "cpu_percent_measured": None if measured is None else round(measured, 1),
        "cpu_percent_ramp": None if ramp is None else round(ramp, 1),
        "peak_rss_mib": timeline.peak_rss_mib(),
        "pids_lost": sorted(timeline.sampler.lost),
        "timeline": timeline.series(origin),
    }


def _machine_figures(timeline: _Timeline | None, load_at_start: float) -> dict[str, Any]:
    """How busy the whole machine was: a benchmark shares its cores with all else."""
    measured = timeline.cpu_between_marks("measure_start", "measure_end", machine=True) if timeline else None
    return {
        "cpu_percent_measured": None if measured is None else round(measured, 1),
        "cpu_count": os.cpu_count(),
        "loadavg_1m_at_start": round(load_at_start, 2),
    }


def environment() -> dict[str, Any]:
    """The machine and library versions a report was measured with."""
    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "websockets": websockets.__version__,
        "psutil": psutil.__version__,
    }


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
