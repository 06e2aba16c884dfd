"""The audit benchmark: what the audit trail sustains and what it costs a lock.

Belongs here: the parent's side of `rounds bench audit` (issue 5):
1. sink throughput: events/s that `FileAuditSink.emit` sustains into a day
   file, from one process and from N processes appending to the same file,
   per fsync policy; then events/s that `rounds.audit.pg.load_files` loads
   from those files into PostgreSQL (a schema of its own, dropped after);
2. the added latency on a lock round trip: two gateways up at the same time,
   one whose audit goes to files and one whose audit is off
   (`NullAuditSink`), and the locks benchmark (`locks.py`) run against them
   in interleaved rounds, ABBA-wise (round 1: first, second; round 2:
   second, first; ...), so that drift of the shared machine falls on both;
   the raw samples of all of a gateway's segments are pooled before the
   percentiles are taken, and the ratio of the pooled p99s is the figure;
the report (JSON-ready), its table and its chart. Must not be here:
argparse, the environment, starting a gateway (`cli.py`), the lock and
presence load (`locks.py`, `lockgen.py`, `presence.py`), percentile math
(`stats.py`).

Why rounds: on a shared 2-core machine two identical locks runs one after
the other differ by up to a factor of 2 in p99 and by 30 % in CPU, so one
pair of runs cannot resolve a 10 % effect. Each round's own ratio is kept
too: their spread says how far a single pair can be trusted.

Targets: the sink keeps up with 20,000 events/s (each case, including N
processes on one file with the default fsync policy); auditing adds under
10 % to the pooled p99 of a lock round trip at 500 presence users.

The report (`rounds.bench.audit/2`): `settings`, `targets`, `environment`,
`sink` (one entry per case: processes, fsync, events, seconds, events/s,
per-process events/s, lines found in the file, chain check), `postgres`
(events loaded, seconds, events/s, or `skipped` with the reason), `locks`:
`order` ([round, mode] in the order run), `segments` (one per locks run:
round, mode, latency summaries by `phase.operation`, gateway CPU and pids,
CPU of the other processes, failures), `pooled` (per mode: summaries of the pooled samples, segment
CPUs and their median, failures), `ratio_p99` and `target_met` (pooled
files / off by operation), `ratio_p99_interval` (a 90 % bootstrap
interval of each pooled ratio, `stats.ratio_interval`: whether the samples
resolve its distance from the target), `rounds` (each round's own `ratio_p99`),
`ratio_p99_median_of_rounds`, `audit_events_written` (lines in each
gateway's audit folder at the end), `lock_settings`, `error` (a gateway
that did not start); and `ok`.
"""

from __future__ import annotations

import asyncio
import importlib
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rounds.audit.events import AuditEvent
from rounds.audit.files import FileAuditSink
from rounds.audit.verify import verify_file
from rounds.bench import stats
from rounds.bench.lockgen import CONTENDED, UNCONTENDED
from rounds.bench.locks import METRICS, GatewayUnavailable, LocksRun
from rounds.bench.presence import environment
from rounds.bench.runner import gc_text

SCHEMA = "rounds.bench.audit/2"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
TARGET_EVENTS_PER_S = 20_000.0
TARGET_P99_ADDED = 0.10  # auditing adds under 10 % to a lock round trip's p99
AUDIT_MODES = ("files", "off")  # the two gateways of the lock part
LOCK_OPS = ((UNCONTENDED, "acquire"), (UNCONTENDED, "release"), (CONTENDED, "acquire"), (CONTENDED, "release"))
CHECK_EVERY = 256  # events between two looks at the clock in a sink worker


@dataclass(frozen=True, slots=True)
class SinkCase:
    processes: int
    fsync: str

    @property
    def name(self) -> str:
        return f"{self.processes}p-{self.fsync}"


@dataclass(frozen=True, slots=True)
class AuditOptions:
    sink_seconds: float = 3.0  # each sink case stops after this long ...
    sink_max_events: int = 200_000  # ... or this many events per process, whichever first
    processes: int = 4  # writers of the multi-process cases
    fsync_policies: tuple[str, ...] = ("interval", "always")
    dsn: str | None = DEFAULT_DSN  # None: no PostgreSQL part
    locks: bool = True  # False: the sink part only
    first: str = "files"  # the gateway that starts round 1 (ABBA: the other starts round 2)
    rounds: int = 3  # rounds of one locks segment against each gateway

    def check(self) -> None:
        """Raise ValueError naming the first option out of range."""
        for name, low, high in (("sink_seconds", 0.1, 600), ("sink_max_events", 1, 10_000_000),
                                ("processes", 2, 64), ("rounds", 1, 50)):
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name} must be within [{low}, {high}], not {value}")
        for policy in self.fsync_policies:
            if policy not in ("interval", "always", "never"):
                raise ValueError(f"unknown fsync policy {policy!r}")
        if self.first not in AUDIT_MODES:
            raise ValueError(f"first must be one of {', '.join(AUDIT_MODES)}, not {self.first!r}")
        if self.dsn is not None:
            require_loopback_dsn(self.dsn)

    def cases(self) -> list[SinkCase]:
        return [SinkCase(n, policy) for policy in self.fsync_policies for n in (1, self.processes)]


def require_loopback_dsn(dsn: str) -> str:
    """Return `dsn` if its host is this machine (or a unix socket), else raise ValueError:
    the bench creates and drops a schema there."""
    from urllib.parse import urlsplit

    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {dsn!r}")
    host = parts.hostname or ""
    if host not in ("", "localhost") and not host.startswith("127.") and host != "::1":
        raise ValueError(f"PostgreSQL must be on loopback for the bench, not {host!r}")
    return dsn


# --- part 1: the sink -----------------------------------------------------------------


def bench_event(worker: int, i: int) -> AuditEvent:
    """An event shaped like a lock step's, the most frequent in a busy gateway."""
    return AuditEvent(
        "LOCK_ACQUIRED", f"shard-{worker}", user_id=f"bench-user-{i % 500}", session_id=f"bench-session-{i % 500}",
        resource_id=f"document:bench-room-{i % 50}", details={"field": f"field-{i % 20}", "fence": i, "ttlMs": 30_000},
    )


def sink_worker(directory: str, fsync: str, worker: int, max_events: int, seconds: float,
                start_at: float) -> tuple[int, float, float]:
    """Emit events into `directory` until `seconds` or `max_events`; return (events,
    start, end) on the wall clock (several processes: their common window)."""
    sink = FileAuditSink(directory, fsync=fsync)
    while time.time() < start_at:  # all writers start together
        time.sleep(0.001)
    started = time.time()
    deadline = time.monotonic() + seconds
    emitted = 0
    try:
        for i in range(max_events):
            sink.emit(bench_event(worker, i))
            emitted += 1
            if i % CHECK_EVERY == 0 and time.monotonic() >= deadline:
                break
        ended = time.time()
    finally:
        sink.close()
    return emitted, started, ended


def run_sink_case(case: SinkCase, directory: Path, options: AuditOptions) -> dict[str, Any]:
    """One case: `case.processes` writers into `directory`, then the lines found and their chains."""
    directory.mkdir(parents=True, exist_ok=True)
    if case.processes == 1:
        results = [sink_worker(str(directory), case.fsync, 0, options.sink_max_events, options.sink_seconds,
                               time.time())]
    else:
        context = multiprocessing.get_context("spawn")
        start_at = time.time() + 1.0 + 0.2 * case.processes  # after the interpreters started
        with context.Pool(case.processes) as pool:
            results = pool.starmap(sink_worker, [
                (str(directory), case.fsync, w, options.sink_max_events, options.sink_seconds, start_at)
                for w in range(case.processes)])
    events = sum(r[0] for r in results)
    seconds = max(r[2] for r in results) - min(r[1] for r in results)
    files = sorted(directory.glob("audit-*.ndjson"))
    lines = intact = 0
    broken: list[str] = []
    for path in files:
        report = verify_file(path)
        lines += sum(chain.events for chain in report.writers.values()) + len(report.corrupt)
        intact += report.intact
        broken.extend(str(c) for c in report.corrupt[:3])
        broken.extend(str(w.broken) for w in report.writers.values() if w.broken is not None)
    rate = events / seconds if seconds > 0 else None
    return {
        "case": case.name, "processes": case.processes, "fsync": case.fsync,
        "events": events, "seconds": round(seconds, 3),
        "events_per_s": None if rate is None else round(rate),
        "events_per_s_per_process": [round(r[0] / (r[2] - r[1])) if r[2] > r[1] else None for r in results],
        "files": [p.name for p in files], "lines_in_files": lines,
        "chains_intact": intact == len(files) and lines == events and not broken,
        "chain_problems": broken[:5],
        "target_met": rate is not None and rate >= TARGET_EVENTS_PER_S,
    }


def load_postgres(dsn: str, paths: Sequence[Path], log: Callable[[str], None]) -> dict[str, Any]:
    """Load `paths` into a schema of their own (created, migrated, dropped after) and time it.
    `skipped` says why when PostgreSQL cannot be reached."""
    try:
        importlib.import_module("asyncpg")  # audit_pg imports it only when connecting

        from rounds.audit import pg as audit_pg
    except ImportError as error:
        return {"skipped": f"asyncpg not available: {error}"}
    schema = f"rounds_bench_audit_{os.getpid()}_{int(time.time())}"

    async def run() -> dict[str, Any]:
        try:
            admin = await audit_pg.connect(dsn)
        except (TimeoutError, OSError, Exception) as error:  # unreachable, refused, auth: not run
            return {"skipped": f"PostgreSQL at {dsn} unreachable: {type(error).__name__}: {error}"}
        try:
            await admin.execute(f"CREATE SCHEMA {schema}")
            conn = await audit_pg.connect(dsn, schema)
            try:
                await audit_pg.migrate(conn)
                log(f"bench audit: loading {len(paths)} file(s) into PostgreSQL (schema {schema})")
                started = time.perf_counter()
                report = await audit_pg.load_files(conn, paths)
                seconds = time.perf_counter() - started
                again_started = time.perf_counter()
                again = await audit_pg.load_files(conn, paths)  # idempotent: inserts nothing
                again_seconds = time.perf_counter() - again_started
                in_table = await conn.fetchval("SELECT count(*) FROM audit_events")
            finally:
                await conn.close()
        finally:
            await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            await admin.close()
        return {
            "schema": schema, "files": report.files, "events_read": report.read, "inserted": report.inserted,
            "corrupt": len(report.corrupt), "seconds": round(seconds, 3),
            "events_per_s": round(report.inserted / seconds) if seconds > 0 else None,
            "reload": {"inserted": again.inserted, "already": again.already, "seconds": round(again_seconds, 3),
                       "events_per_s": round(again.read / again_seconds) if again_seconds > 0 else None},
            "rows_in_table": in_table, "schema_dropped": True,
            "target_met": seconds > 0 and report.inserted / seconds >= TARGET_EVENTS_PER_S,
        }

    return asyncio.run(run())


# --- part 2: a lock round trip, audit on and off ---------------------------------------


SegmentRunner = Callable[[str], LocksRun]  # audit mode -> one locks run against that mode's gateway
# Given each mode's var_dir, starts both gateways (raising GatewayUnavailable if
# one cannot start), yields the segment runner and stops them on exit.
LockGateways = Callable[[Mapping[str, Path]], AbstractContextManager[SegmentRunner]]


def round_order(first: str, rounds: int) -> list[tuple[int, str]]:
    """(round, mode) in the order run: ABBA-wise, `first` opens the odd rounds and
    the other mode the even ones, so a drift of the machine falls on both."""
    second = next(m for m in AUDIT_MODES if m != first)
    order: list[tuple[int, str]] = []
    for number in range(1, rounds + 1):
        pair = (first, second) if number % 2 == 1 else (second, first)
        order.extend((number, mode) for mode in pair)
    return order


def lock_summary(locks_report: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of one locks run (`rounds.bench.locks/1`, one backend) this bench reports."""
    runs = locks_report.get("runs") or [{}]
    entry = runs[0]
    if entry.get("error"):
        return {"ok": False, "error": entry["error"]}
    latency = {f"{phase}.{op}": entry["latency_ms"][phase][op] for phase, op in LOCK_OPS}
    return {
        "ok": bool(locks_report.get("ok")),
        "backend": entry["backend"],
        "latency_ms": latency,
        "failures": entry["failures"]["total"],
        "gateway_cpu_percent": entry["gateway"]["cpu_percent_measured"],
        "gateway_pids": entry["gateway"].get("pids"),
        # CPU % of a core that neither this gateway nor the load generator used: the
        # idle gateway, Ray's daemons and whatever else shared the machine
        "other_cpu_percent": (entry.get("machine") or {}).get("other_cpu_percent_measured"),
        "presence_users": entry["presence"]["users"]["connected"],
        "aborted": entry["aborted"],
        # how late the lock client's own loop ran (p99 by phase): what the load
        # generator, sharing the machine, adds to the round trips it times
        "client_loop_lag_p99_ms": {phase: (lag or {}).get("p99")
                                   for phase, lag in (entry.get("lock_client_loop_lag_ms") or {}).items()},
        "loadgen_cpu_percent": (entry.get("loadgen") or {}).get("cpu_percent_measured"),
        # the gateway's garbage collections during the segment (our own gateway only)
        "gateway_gc": locks_report.get("gateway_gc"),
    }


def pooled_latency(segment_samples: Sequence[Mapping[str, Mapping[str, Sequence[float]]]]) -> dict[str, Any]:
    """Summaries by `phase.operation` of the raw samples of all segments pooled
    (each segment's samples: phase -> lockgen metric -> values in ms)."""
    return _summaries(_pooled_ops(segment_samples))


def _summaries(values: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    return {key: stats.summarize(v).as_dict() for key, v in values.items()}


def _pooled_ops(segment_samples: Sequence[Mapping[str, Mapping[str, Sequence[float]]]]) -> dict[str, list[float]]:
    """Each lock operation's raw samples of all segments, by `phase.operation`, in ms."""
    return {f"{phase}.{op}": pooled(segment_samples, phase, dict(METRICS[phase])[op]) for phase, op in LOCK_OPS}


def pooled(segment_samples: Sequence[Mapping[str, Mapping[str, Sequence[float]]]], phase: str,
           metric: str) -> list[float]:
    """One lockgen metric's raw samples in a phase, all segments pooled."""
    return [v for samples in segment_samples for v in samples.get(phase, {}).get(metric, ())]


def p99_ratios(on: Mapping[str, Any], off: Mapping[str, Any]) -> dict[str, float | None]:
    """p99 with audit files / p99 with audit off, by `phase.operation`."""
    out: dict[str, float | None] = {}
    for key in (f"{phase}.{op}" for phase, op in LOCK_OPS):
        a = on.get("latency_ms", {}).get(key, {}).get("p99")
        b = off.get("latency_ms", {}).get(key, {}).get("p99")
        out[key] = round(a / b, 3) if a is not None and b else None
    return out


def _sum_gc(parts: Sequence[Mapping[str, float] | None]) -> dict[str, float] | None:
    known = [p for p in parts if p]
    return {key: round(sum(p[key] for p in known), 1) for key in known[0]} if known else None


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


def compare_segments(segments: Sequence[Mapping[str, Any]],
                     samples: Mapping[str, Sequence[Mapping[str, Mapping[str, Sequence[float]]]]]) -> dict[str, Any]:
    """The comparison of the segments run: per mode the pooled summaries (from
    `samples`, mode -> one mapping per segment) and CPU; the pooled p99 ratios
    and their verdict; each complete round's own ratios and their median."""
    per_mode: dict[str, Any] = {}
    values = {mode: _pooled_ops(samples.get(mode, ())) for mode in AUDIT_MODES}
    for mode in AUDIT_MODES:
        mine = [s for s in segments if s["mode"] == mode and not s.get("error")]
        cpu = [s["gateway_cpu_percent"] for s in mine]
        lag = {phase: stats.summarize(pooled(samples.get(mode, ()), phase, "loop_lag_ms")).p99
               for phase in ("uncontended", "contended")}
        per_mode[mode] = {
            "segments": len(mine), "latency_ms": _summaries(values[mode]),
            "gateway_cpu_percent": cpu, "gateway_cpu_percent_median": _median(cpu),
            "other_cpu_percent": [s.get("other_cpu_percent") for s in mine],
            "failures": sum(s["failures"] for s in mine),
            "gateway_gc": _sum_gc([s.get("gateway_gc") for s in mine]),
            "client_loop_lag_p99_ms": {phase: None if p99 is None else round(p99, 3) for phase, p99 in lag.items()},
            "presence_users": min((s["presence_users"] for s in mine), default=None),
        }
    out: dict[str, Any] = {"pooled": per_mode}
    if all(per_mode[mode]["segments"] for mode in AUDIT_MODES):
        ratios = p99_ratios(per_mode["files"], per_mode["off"])
        out["ratio_p99"] = ratios
        out["target_met"] = {k: v is not None and v < 1 + TARGET_P99_ADDED for k, v in ratios.items()}
        out["ratio_p99_interval"] = {}  # 90 % bootstrap interval of each pooled ratio (stats.ratio_interval)
        for key in ratios:
            interval = stats.ratio_interval(values["files"][key], values["off"][key])
            out["ratio_p99_interval"][key] = None if interval is None else [
                round(interval[0], 3), round(interval[1], 3)]
    rounds = []
    for number in sorted({s["round"] for s in segments}):
        run = [s for s in segments if s["round"] == number and not s.get("error")]
        by_mode = {s["mode"]: s for s in run}
        if set(by_mode) == set(AUDIT_MODES):
            rounds.append({"round": number, "order": [s["mode"] for s in run],
                           "ratio_p99": p99_ratios(by_mode["files"], by_mode["off"])})
    out["rounds"] = rounds
    out["ratio_p99_median_of_rounds"] = {
        key: _median([r["ratio_p99"][key] for r in rounds]) for key in (f"{p}.{o}" for p, o in LOCK_OPS)}
    return out


def run_lock_rounds(options: AuditOptions, var_dirs: Mapping[str, Path], gateways: LockGateways,
                    log: Callable[[str], None]) -> dict[str, Any]:
    """Start both gateways once, run the rounds against them, and compare. A gateway
    that does not start, a segment that did not run or one stopped early ends the rounds."""
    order = round_order(options.first, options.rounds)
    segments: list[dict[str, Any]] = []
    samples: dict[str, list[Mapping[str, Mapping[str, Sequence[float]]]]] = {m: [] for m in AUDIT_MODES}
    part: dict[str, Any] = {"order": [list(step) for step in order], "segments": segments, "error": None}
    try:
        with gateways(var_dirs) as run_segment:
            for index, (number, mode) in enumerate(order, 1):
                log(f"bench audit: segment {index}/{len(order)} (round {number}/{options.rounds}): "
                    f"locks against the gateway with audit {mode}")
                run = run_segment(mode)
                part.setdefault("lock_settings", run.report.get("settings"))
                segment = {"round": number, "mode": mode, **lock_summary(run.report)}
                segments.append(segment)
                if segment.get("error"):
                    part["error"] = segment["error"]
                    break
                samples[mode].append(run.samples.get(segment["backend"], {}))
                log(f"bench audit: segment {index}/{len(order)} audit {mode}: {segment_line(segment)}")
                if segment["aborted"]:
                    break
    except GatewayUnavailable as error:
        part["error"] = str(error)
        log(f"bench audit: lock part not run: {error}")
    part["audit_events_written"] = {mode: count_lines(var_dirs[mode] / "audit") for mode in AUDIT_MODES}
    part.update(compare_segments(segments, samples))
    part["complete"] = part["error"] is None and len(segments) == len(order)
    return part


def segment_line(segment: Mapping[str, Any]) -> str:
    """One segment in a line: p99 by operation, gateway CPU, failures."""
    p99 = ", ".join(f"{key} {_fmt(figures['p99'])}" for key, figures in segment["latency_ms"].items())
    return (f"p99 ms {p99}; gateway CPU {_fmt(segment['gateway_cpu_percent'], '.0f')}%, "
            f"other processes {_fmt(segment.get('other_cpu_percent'), '.0f')}%, "
            f"client loop lag p99 contended {_fmt((segment.get('client_loop_lag_p99_ms') or {}).get('contended'))} ms, "
            f"{gc_text(segment.get('gateway_gc'))}"
            f"failures {segment['failures']}" + (f", ABORTED: {segment['aborted']}" if segment["aborted"] else ""))


def count_lines(directory: Path) -> int:
    total = 0
    for path in directory.glob("audit-*.ndjson"):
        with open(path, "rb") as f:
            total += sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    return total


# --- the whole run ------------------------------------------------------------------


@contextmanager
def scratch(parent: Path) -> Iterator[Path]:
    """A temporary folder under `parent` (the audit files' own file system), removed on exit."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="bench-audit-", dir=parent)).resolve()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_audit(options: AuditOptions, scratch_parent: Path, log: Callable[[str], None],
              lock_gateways: LockGateways | None = None) -> dict[str, Any]:
    """Run both parts and return the report. `lock_gateways(var_dirs)` starts the
    two gateways of the lock part (see `LockGateways`); None: no lock part."""
    options.check()
    report: dict[str, Any] = {
        "schema": SCHEMA, "benchmark": "audit",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {**asdict(options), "fsync_policies": list(options.fsync_policies)},
        "targets": {"sink_events_per_s": TARGET_EVENTS_PER_S, "p99_added_max": TARGET_P99_ADDED},
        "environment": environment(),
        "sink": [], "postgres": None, "locks": None,
    }
    with scratch(scratch_parent) as root:
        report["scratch_dir"] = str(root)
        for case in options.cases():
            log(f"bench audit: sink {case.processes} process(es), fsync {case.fsync}, "
                f"{options.sink_seconds:g} s or {options.sink_max_events} events each")
            result = run_sink_case(case, root / case.name, options)
            log(f"bench audit: sink {case.name}: {result['events']} events in {result['seconds']:.2f} s = "
                f"{result['events_per_s']} events/s; chains intact: {result['chains_intact']}")
            report["sink"].append(result)
        if options.dsn is None:
            report["postgres"] = {"skipped": "no DSN"}
        else:
            paths = sorted(p for d in root.iterdir() if d.is_dir() for p in d.glob("audit-*.ndjson"))
            report["postgres"] = load_postgres(options.dsn, paths, log)
            if "skipped" in report["postgres"]:
                log(f"bench audit: PostgreSQL part skipped: {report['postgres']['skipped']}")
            else:
                pg = report["postgres"]
                log(f"bench audit: PostgreSQL: {pg['inserted']} events in {pg['seconds']:.2f} s = "
                    f"{pg['events_per_s']} events/s (reload of the same files: {pg['reload']['inserted']} inserted)")
        if options.locks and lock_gateways is not None:
            var_dirs = {mode: root / f"gateway-{mode}" for mode in AUDIT_MODES}
            report["locks"] = run_lock_rounds(options, var_dirs, lock_gateways, log)
    report["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    locks_part = report["locks"]
    report["ok"] = (all(c["chains_intact"] for c in report["sink"])
                    and not (report["postgres"] or {}).get("corrupt")
                    and (locks_part is None or (locks_part["complete"]
                                                and all(s.get("ok") for s in locks_part["segments"]))))
    return report


# --- the table and the chart ------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(report: Mapping[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"audit bench: sink cases of {s['sink_seconds']:g} s or {s['sink_max_events']} events per process; "
        f"target {TARGET_EVENTS_PER_S:,.0f} events/s, auditing adds < {TARGET_P99_ADDED:.0%} to lock p99",
        "",
        f"{'sink case':<16}{'processes':>10}{'fsync':>10}{'events':>10}{'seconds':>9}{'events/s':>11}  "
        "target  chains",
    ]
    for c in report["sink"]:
        lines.append(f"{'FileAuditSink':<16}{c['processes']:>10}{c['fsync']:>10}{c['events']:>10}"
                     f"{c['seconds']:>9.2f}{_fmt(c['events_per_s'], ',.0f'):>11}  "
                     f"{'met' if c['target_met'] else 'MISS':<6}  {'intact' if c['chains_intact'] else 'BROKEN'}")
    pg = report.get("postgres") or {}
    if "skipped" in pg:
        lines.append(f"{'PostgreSQL load':<16}skipped: {pg['skipped']}")
    elif pg:
        lines.append(f"{'PostgreSQL load':<16}{pg['files']:>10}{'files':>10}{pg['inserted']:>10}{pg['seconds']:>9.2f}"
                     f"{_fmt(pg['events_per_s'], ',.0f'):>11}  {'met' if pg['target_met'] else 'MISS':<6}  "
                     f"reload inserted {pg['reload']['inserted']}")
    if report.get("locks"):
        lines += ["", *_lock_lines(report["locks"], s)]
    if not report["ok"]:
        lines.append("NOT OK: see chains, failures and errors in the JSON")
    return "\n".join(lines)


def _lock_lines(part: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    rounds_run = " | ".join(", ".join(r["order"]) for r in part["rounds"]) or "none complete"
    duration = (part.get("lock_settings") or {}).get("duration_s")
    lines = [f"lock round trips: both gateways up at once, {settings['rounds']} round(s) of one "
             f"{_fmt(duration, 'g')} s segment each, {settings['first']} first; order {rounds_run}",
             "pooled = percentiles of all of a gateway's segments' samples, [90 % bootstrap interval of the "
             "ratio]; rounds = each round's own p99 ratio",
             f"{'lock round trip (ms)':<24}{'audit':>6}{'count':>8}{'p50':>8}{'p95':>8}{'p99':>8}"
             f"{'pooled p99 files/off':>32}  {'rounds p99 files/off':<24}{'median':>7}"]
    if part.get("error"):
        lines.insert(1, f"NOT COMPLETE: {part['error']}")
    for phase, op in LOCK_OPS:
        key = f"{phase}.{op}"
        for mode in AUDIT_MODES:
            f = part["pooled"][mode]["latency_ms"][key]
            tail = ""
            if mode == "off":
                ratio = (part.get("ratio_p99") or {}).get(key)
                met = (part.get("target_met") or {}).get(key)
                per_round = " ".join(_fmt(r["ratio_p99"][key], ".3f") for r in part["rounds"])
                interval = (part.get("ratio_p99_interval") or {}).get(key)
                cell = "" if ratio is None else f"{ratio:.3f} {'met' if met else 'MISS'}"
                if interval:
                    cell += f" [{interval[0]:.2f}-{interval[1]:.2f}]"
                tail = f"{cell:>32}  {per_round:<24}{_fmt(part['ratio_p99_median_of_rounds'][key], '.3f'):>7}"
            lines.append(f"{key:<24}{mode:>6}{f['count']:>8}{_fmt(f['p50']):>8}{_fmt(f['p95']):>8}"
                         f"{_fmt(f['p99']):>8}{tail}")
    for mode in AUDIT_MODES:
        m = part["pooled"][mode]
        cpu = ", ".join(_fmt(c, ".0f") for c in m["gateway_cpu_percent"]) or "n/a"
        other = ", ".join(_fmt(c, ".0f") for c in m.get("other_cpu_percent", ())) or "n/a"
        lines.append(f"[audit {mode}] {m['segments']} segment(s), {m['presence_users']} presence users, gateway CPU "
                     f"{cpu} % of a core (median {_fmt(m['gateway_cpu_percent_median'], '.0f')} %), other "
                     f"processes {other} %, client loop lag p99 uncontended / contended "
                     f"{_fmt(m['client_loop_lag_p99_ms']['uncontended'])} / "
                     f"{_fmt(m['client_loop_lag_p99_ms']['contended'])} ms, {gc_text(m.get('gateway_gc'))}"
                     f"{part['audit_events_written'][mode]} audit events written, "
                     f"failures {m['failures']}")
    return lines


def plot_audit(report: Mapping[str, Any], path: Path) -> Path:
    """Sink and load throughput against the 20,000/s target; lock p50/p95/p99 with
    audit files and off (pooled), each round's p99 as a dot; the pooled p99
    ratios with their 90 % intervals and each round's ratio, against the target."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(18, 5), layout="constrained")
    FigureCanvasAgg(figure)
    left, right, ratios = figure.subplots(1, 3, width_ratios=(1, 1.3, 0.9))
    labels = [c["case"] for c in report["sink"]]
    values = [c["events_per_s"] or 0 for c in report["sink"]]
    pg = report.get("postgres") or {}
    if pg.get("events_per_s"):
        labels.append("PostgreSQL load")
        values.append(pg["events_per_s"])
    left.bar(labels, values, color=["C0" if "PostgreSQL" not in x else "C2" for x in labels])
    left.axhline(TARGET_EVENTS_PER_S, color="tab:red", linestyle="--", linewidth=1)
    left.text(0, TARGET_EVENTS_PER_S * 1.05, "target 20,000/s", color="tab:red", fontsize=8)
    left.set_yscale("log")
    left.set_ylabel("events/s (log scale)")
    left.set_title("audit sink (processes-fsync) and PostgreSQL load")
    left.tick_params(axis="x", labelrotation=30, labelsize=8)
    part = report.get("locks") or {}
    _lock_bars(right, part)
    _ratio_panel(ratios, part)
    figure.savefig(path, dpi=110)
    return path


def _ratio_panel(axes: Any, part: Mapping[str, Any]) -> None:
    keys = [f"{phase}.{op}" for phase, op in LOCK_OPS]
    pooled, intervals = part.get("ratio_p99") or {}, part.get("ratio_p99_interval") or {}
    for i, key in enumerate(keys):
        rounds = [r["ratio_p99"][key] for r in part.get("rounds") or () if r["ratio_p99"].get(key) is not None]
        axes.scatter([i + 0.15] * len(rounds), rounds, s=10, color="grey", zorder=2,
                     label="one round's ratio" if i == 0 else None)
        if pooled.get(key) is None:
            continue
        low, high = intervals.get(key) or (pooled[key], pooled[key])
        # the point is a ratio of rounded p99s: it may sit a hair outside its interval
        axes.errorbar([i], [pooled[key]], yerr=[[max(0.0, pooled[key] - low)], [max(0.0, high - pooled[key])]],
                      fmt="o", color="C0",
                      capsize=4, zorder=3, label="pooled, 90 % interval" if i == 0 else None)
    axes.axhline(1 + TARGET_P99_ADDED, color="tab:red", linestyle="--", linewidth=1,
                 label=f"target < {1 + TARGET_P99_ADDED:.2f}")
    axes.axhline(1.0, color="black", linewidth=0.5)
    axes.set_xticks(range(len(keys)), keys, fontsize=8, rotation=15)
    axes.set_ylabel("p99 with audit files / p99 off")
    axes.set_title("what the audit trail adds to a lock round trip's p99", fontsize=10)
    axes.legend(fontsize=7, loc="upper left")


def _lock_bars(axes: Any, part: Mapping[str, Any]) -> None:
    pooled = part.get("pooled") or {}
    keys = [f"{phase}.{op}" for phase, op in LOCK_OPS]
    width = 0.13
    for m, mode in enumerate(AUDIT_MODES):
        latency = (pooled.get(mode) or {}).get("latency_ms") or {}
        for q, quantile in enumerate(("p50", "p95", "p99")):
            ys = [(latency.get(k) or {}).get(quantile) or 0 for k in keys]
            xs = [i + (m * 3 + q - 2.5) * width for i in range(len(keys))]
            axes.bar(xs, ys, width, color=f"C{m}", alpha=0.35 + 0.3 * q, label=f"audit {mode} {quantile} (pooled)")
        # each round's own p99, on its mode's p99 bar
        dots = [(i + (m * 3 + 2 - 2.5) * width, s["latency_ms"][k]["p99"])
                for s in part.get("segments") or () if s["mode"] == mode and not s.get("error")
                for i, k in enumerate(keys) if s["latency_ms"][k]["p99"] is not None]
        if dots:
            axes.scatter([x for x, _ in dots], [y for _, y in dots], s=12, color="black", marker="o", zorder=3,
                         label="p99 of one segment" if m == 0 else None)
    ratios = part.get("ratio_p99") or {}
    for i, key in enumerate(keys):
        if ratios.get(key) is not None:
            axes.annotate(f"×{ratios[key]:.2f}", (i, 0), xytext=(0, -24), textcoords="offset points",
                          ha="center", fontsize=7)
    axes.set_xticks(range(len(keys)), keys, fontsize=8)
    axes.set_ylabel("round trip (ms)")
    segments = len(part.get("segments") or ())
    axes.set_title(f"lock round trip at 500 presence users, audit files vs off\n"
                   f"pooled over {segments} interleaved segments; ×: pooled p99 files/off", fontsize=10)
    axes.set_ylim(top=axes.get_ylim()[1] * 1.35)  # room for the legend above the bars
    axes.legend(fontsize=7, ncols=3, loc="upper left")
