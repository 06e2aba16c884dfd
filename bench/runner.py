"""Running bench worker processes through their phases, and sampling processes meanwhile.

Belongs here: what every benchmark's parent does the same way: start its
worker processes (spawned; each gets a plan, the receiving end of a Pipe for
`Go`/`Stop` and the shared results Queue), walk them through the phases,
print progress lines, stop everything by a hard deadline, and sample the
CPU and RSS of the gateway's processes, of the workers and of the whole
machine. Must not be here: what a worker does (`loadgen.py`, `lockgen.py`,
`crdtgen.py`), a benchmark's report or table (`presence.py`, `crdt.py`, ...),
percentile math (`stats.py`).

Phases: *ramp* (workers connect and get ready; limited to `RAMP_LIMIT_S`),
then *measured* (`duration_s`, started for all workers at once by `Go`), then
*drain* (late replies get their timeout, connections close). The whole run
stops by itself at `duration_s + DEADLINE_MARGIN_S` after the start.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.queues
import os
import platform
import queue
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import psutil
import websockets

from rounds.bench import stats
from rounds.bench.plan import DRAIN, MEASURED, RAMP, Go, Progress, Ready, Stop, WorkerResult

RAMP_LIMIT_S = 35.0  # connects and first joins not done by then count as failures
DEADLINE_MARGIN_S = 60.0  # hard deadline = duration + this, from the first worker's start
SAMPLE_EVERY_S = 0.5
MIN_WINDOW_S = 0.25  # shortest window a CPU % of the timeline is computed over
PROGRESS_EVERY_S = 1.0
STOP_GRACE_S = 5.0  # after Stop, how long workers get to send their result
REAP_S = 3.0  # then at most this long to end worker processes (join, SIGTERM, SIGKILL)
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One worker process: `target(plan, control, results)` is its entry, with
    `worker.serve_worker`'s pipe and queue, and `plan(index, ramp_deadline,
    hard_deadline)` its picklable plan. It sends `Ready(index)` after its ramp
    and a `WorkerResult` before `hard_deadline`; `Progress` now and then if it
    wants a share of the progress line."""

    name: str
    target: Callable[[Any, Any, Any], None]
    plan: Callable[[int, float, float], Any]


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
        self.titles: dict[int, str] = {}  # what each process calls itself (Ray actors: "ray::ShardActor...")
        self.lost: set[int] = set()
        for pid in dict.fromkeys(pids):
            try:
                self.processes[pid] = psutil.Process(pid)
                self.titles[pid] = " ".join(self.processes[pid].cmdline())[:80]
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
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


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


@dataclass(slots=True)
class Timeline:
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
        out: list[dict[str, Any]] = []
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

    def cpu_by_pid_between_marks(self, start: str, end: str) -> dict[int, float]:
        """% of one core of each process between two marks (those sampled at both)."""
        if start not in self.marks or end not in self.marks:
            return {}
        a, b = self.marks[start], self.marks[end]
        return {pid: stats.cpu_percent(b.cpu_s[pid] - a.cpu_s[pid], b.at - a.at) or 0.0
                for pid in a.cpu_s.keys() & b.cpu_s.keys()}

    def cpu_between_marks(self, start: str, end: str, machine: bool = False) -> float | None:
        if start not in self.marks or end not in self.marks:
            return None
        between = machine_cpu_between if machine else cpu_between
        return between(self.marks[start], self.marks[end])

    def peak_rss_mib(self) -> float | None:
        peaks = [sum(r.rss_bytes.values()) for _, r in self.readings if r.rss_bytes]
        return round(max(peaks) / MIB, 1) if peaks else None


# --- the run ------------------------------------------------------------------------


class Conductor:
    """Starts the workers and walks them through the phases; `run()` returns when
    every worker sent its result, or the run was stopped (Ctrl-C, a dead worker,
    the ramp limit, the hard deadline; `aborted` says why)."""

    def __init__(
        self,
        label: str,
        duration_s: float,
        users: int,
        workers: Sequence[WorkerSpec],
        gateway_pids: Sequence[int] | None,
        log: Callable[[str], None],
    ) -> None:
        self.label = label  # "presence": progress lines read "bench presence [...]"
        self.duration_s = duration_s
        self.users = users  # planned, for the progress line
        self.log = log
        self.started = time.monotonic()
        self.load_at_start = psutil.getloadavg()[0]
        # Everything, reaping included, is over by `hard_deadline`; stopping starts
        # early enough for that, and each worker gives up before it is asked to.
        self.hard_deadline = self.started + duration_s + DEADLINE_MARGIN_S
        self.stop_at = self.hard_deadline - STOP_GRACE_S - REAP_S
        self.ramp_deadline = self.started + RAMP_LIMIT_S
        self.context = multiprocessing.get_context("spawn")
        self.results: multiprocessing.queues.Queue[Any] = self.context.Queue()
        self.targets: list[tuple[Callable[[Any, Any, Any], None], Any, str]] = [
            (w.target, w.plan(index, self.ramp_deadline, self.stop_at), f"bench-{w.name}")
            for index, w in enumerate(workers)
        ]
        self.gateway = Timeline(ProcessSampler(gateway_pids)) if gateway_pids is not None else None
        self.loadgen: Timeline | None = None
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
        self.loadgen = Timeline(ProcessSampler([p.pid for p in self.processes]))
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
                limit = self.duration_s + DEADLINE_MARGIN_S
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
            self.measure_until = now + self.duration_s
            self._sample(mark="measure_start")
            for control in self.controls:
                control.send(Go(self.measure_until))
            self.phase = MEASURED
            self.log(f"bench {self.label} [measured] started for {self.duration_s:g} s")
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
        self.log(f"bench {self.label}: stopping: {reason}")
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
                self.log(f"bench {self.label}: terminating {process.name} (pid {process.pid})")
                process.terminate()
                process.join(timeout=step / 2)
            if process.is_alive():  # SIGTERM waits while a process is stopped; SIGKILL does not
                process.kill()
                process.join(timeout=step / 2)
        for control in self.controls:
            control.close()

    def _progress_line(self, now: float) -> str:
        reports = self.progress.values()
        connected = sum(p.connected for p in reports)
        failed = sum(p.connect_failures for p in reports)
        joined = sum(p.joined for p in reports)
        frames = sum(p.frames_received for p in reports)
        head = f"bench {self.label} [{self.phase}] connected {connected}/{self.users} failed {failed} joined {joined}"
        if self.phase == RAMP:
            tail = f"ramp limit in {self.ramp_deadline - now:.0f} s"
        elif self.phase == MEASURED and self.measure_until is not None:
            extra = stats.merge_counts(p.extra for p in reports)
            details = "".join(f" | {name} {value}" for name, value in extra.items())
            tail = f"frames {frames}{details} | {max(0.0, self.measure_until - now):.0f} s left"
        else:
            tail = f"waiting for {len(self.targets) - len(self.finished)} worker result(s)"
        return f"{head} | {tail}"

    # --- figures for the reports ----------------------------------------------------

    def results_of(self, first: int, count: int) -> list[WorkerResult]:
        """The results that came from workers `first .. first + count - 1`, in order."""
        return [self.finished[i] for i in range(first, first + count) if i in self.finished]

    def phases_s(self) -> dict[str, float | None]:
        return {
            "ramp": round((self.measure_started or time.monotonic()) - self.started, 3),
            "measured": since(self.measure_started, self.measure_ended) if self.measure_started is not None else 0.0,
            # seconds since the start, the time axis of the timelines; None if not reached
            "measured_from": since(self.started, self.measure_started),
            "measured_to": since(self.started, self.measure_ended),
        }

    def gateway_figures(self) -> dict[str, Any]:
        return process_figures(self.gateway, self.started)

    def loadgen_figures(self) -> dict[str, Any]:
        return process_figures(self.loadgen, self.started)

    def machine_figures(self) -> dict[str, Any]:
        return machine_figures(self.loadgen, self.load_at_start)


def wait_until_quiet(below_percent: float, max_wait_s: float, log: Callable[[str], None],
                     label: str = "bench") -> float | None:
    """Wait until the whole machine is busy under `below_percent` of one core
    over one second (a gateway stopped just before may still be winding
    down), at most `max_wait_s`; return the last reading."""
    deadline = time.monotonic() + max_wait_s
    busy = None
    while True:
        before = _machine_busy_s()
        started = time.monotonic()
        time.sleep(1.0)
        busy = stats.cpu_percent(_machine_busy_s() - before, time.monotonic() - started)
        if busy is None or busy < below_percent:
            return busy
        if time.monotonic() >= deadline:
            log(f"{label}: the machine is still {busy:.0f}% busy after {max_wait_s:g} s; going on")
            return busy
        log(f"{label}: waiting for the machine to settle ({busy:.0f}% of a core busy)")


def since(origin: float | None, at: float | None) -> float | None:
    return None if at is None or origin is None else round(at - origin, 3)


def process_figures(timeline: Timeline | None, origin: float) -> dict[str, Any]:
    """CPU % of one core (ramp, measured), peak RSS and the timeline of sampled processes."""
    if timeline is None:
        return {"pids": [], "cpu_percent_measured": None, "cpu_percent_ramp": None, "peak_rss_mib": None,
                "pids_lost": [], "timeline": [], "processes": []}
    measured = timeline.cpu_between_marks("measure_start", "measure_end")
    ramp = timeline.cpu_between_marks("start", "measure_start")
    by_pid = timeline.cpu_by_pid_between_marks("measure_start", "measure_end")
    return {
        "pids": sorted(timeline.sampler.processes.keys() | timeline.sampler.lost),
        "cpu_percent_measured": None if measured is None else round(measured, 1),
        # each process's share in the measured phase, busiest first
        "processes": [{"pid": pid, "title": timeline.sampler.titles.get(pid, ""), "cpu_percent_measured": round(cpu, 1)}
                      for pid, cpu in sorted(by_pid.items(), key=lambda item: -item[1])],
        "cpu_percent_ramp": None if ramp is None else round(ramp, 1),
        "peak_rss_mib": timeline.peak_rss_mib(),
        "pids_lost": sorted(timeline.sampler.lost),
        "timeline": timeline.series(origin),
    }


def machine_figures(timeline: Timeline | None, load_at_start: float) -> dict[str, Any]:
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


def gc_text(gc: Mapping[str, float] | None, end: str = ", ") -> str:
    """A gateway's garbage-collector totals (`gateway_gc` of a report) for a
    summary line, followed by `end`; empty when there are none."""
    if not gc:
        return ""
    return (f"GC {gc['collections']:.0f} collections paused {gc['pausedMs']:.0f} ms "
            f"({gc['over10ms']:.0f} over 10 ms; {gc.get('full', 0):.0f} full, {gc.get('fullPausedMs', 0):.0f} ms){end}")


OTHER_CPU_WARN_PERCENT = 50.0  # Ray's own daemons (raylet, GCS, dashboard) take some even when idle


class Target(Protocol):
    """A server a run targets, as the caller's opener yields it."""

    @property
    def url(self) -> str:
        """/ws runs: ws://HOST:PORT/ws; /yjs runs: the base URL rooms are appended to."""
        ...

    @property
    def pids(self) -> list[int] | None:
        """Sampled for CPU and RSS (None: not reported)."""
        ...

    @property
    def info(self) -> dict[str, Any]: ...


def other_cpu_percent(machine: float | None, *ours: float | None) -> float | None:
    """CPU % of one core that neither the server nor the load generator used in
    the measured phase: Ray's own daemons, and whatever else shared the machine."""
    if machine is None or any(v is None for v in ours):
        return None
    return round(max(0.0, machine - sum(v for v in ours if v is not None)), 1)


def shared_machine_warning(label: str, other: float | None, server: str) -> str | None:
    """The report's warning when the machine was busy with others, else None."""
    if other is None or other <= OTHER_CPU_WARN_PERCENT:
        return None
    return (f"[{label}] WARNING: {other:.0f}% of a core went to processes other than {server} and "
            "the load generator: the machine was shared, the figures are pessimistic")
