"""Charts of a benchmark run (presence, locks, crdt), drawn to a PNG next to its JSON report.

Belongs here: turning a report and its raw samples into a figure. Must not
be here: running anything or computing the report's figures. Uses
matplotlib's object API with the Agg canvas directly, so it never touches
pyplot's global state or needs a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rounds.bench.plan import MEASURED, RAMP

# (label, phase, metric) of the CDF curves, connect first as it happens first.
CURVES = (
    ("connect", RAMP, "connect_ms"),
    ("join → RESOURCE_STATE", MEASURED, "join_state_ms"),
    ("join → USER_JOINED (fan-out)", MEASURED, "fanout_ms"),
    ("heartbeat RTT", MEASURED, "heartbeat_rtt_ms"),
)


def plot_presence(report: Mapping[str, Any], samples: Mapping[str, Mapping[str, Sequence[float]]], path: Path) -> Path:
    """Draw latency CDFs and the gateway's CPU and RSS over time to `path` (PNG)."""
    figure = Figure(figsize=(11, 8.5), layout="constrained")
    FigureCanvasAgg(figure)
    latency_axes, cpu_axes = figure.subplots(2, 1, height_ratios=(3, 2))
    _latency_cdf(latency_axes, samples)
    _cpu_over_time(cpu_axes, report)
    settings = report["settings"]
    figure.suptitle(
        f"rounds presence bench: {settings['users']} users, rooms of {settings['room_size']}, "
        f"churn {settings['churn_s']:g} s, {report['started_at']}"
    )
    figure.savefig(path, dpi=110)
    return path


def _latency_cdf(axes: Any, samples: Mapping[str, Mapping[str, Sequence[float]]]) -> None:
    drawn = False
    for label, phase, metric in CURVES:
        values = sorted(samples.get(phase, {}).get(metric, ()))
        if not values:
            continue
        n = len(values)
        fractions = [(i + 1) / n for i in range(n)]
        axes.step([max(v, 1e-3) for v in values], fractions, where="post", label=f"{label} (n={n})")
        drawn = True
    for q in (0.5, 0.95, 0.99):
        axes.axhline(q, color="grey", linewidth=0.6, linestyle=":")
    axes.set_xscale("log")
    axes.set_xlabel("latency (ms, log scale)")
    axes.set_ylabel("fraction of samples ≤ x")
    axes.set_ylim(0, 1.01)
    axes.set_title("latency CDF (dotted: p50, p95, p99)")
    axes.grid(True, which="both", linewidth=0.3)
    if drawn:
        axes.legend(loc="lower right")


def _cpu_over_time(axes: Any, report: Mapping[str, Any]) -> None:
    gateway = report["gateway"]["timeline"]
    loadgen = report["loadgen"]["timeline"]
    for name, timeline, key, style in (
        ("gateway", gateway, "cpu_percent", "-"),
        ("load generator", loadgen, "cpu_percent", "--"),
        ("whole machine", loadgen, "machine_cpu_percent", ":"),
    ):
        points = [(p["t_s"], p[key]) for p in timeline if p.get(key) is not None]
        if points:
            axes.plot(*zip(*points, strict=True), style, label=f"{name} CPU",
                      color="grey" if key.startswith("machine") else None)
    phases = report["phases_s"]
    if phases["measured_from"] is not None and phases["measured_to"] is not None:
        axes.axvspan(phases["measured_from"], phases["measured_to"], color="tab:green", alpha=0.08,
                     label="measured phase")
    axes.set_xlabel("time since start (s)")
    axes.set_ylabel("CPU (% of one core)")
    axes.grid(True, linewidth=0.3)
    rss = [(p["t_s"], p["rss_mib"]) for p in gateway]
    if rss:
        twin = axes.twinx()
        twin.plot(*zip(*rss, strict=False), ":", color="tab:red", label="gateway RSS")
        twin.set_ylabel("gateway RSS (MiB)")
        twin.legend(loc="upper right")
        axes.set_title("gateway CPU and RSS, summed over its processes")
    else:
        axes.set_title("CPU (gateway processes not sampled)")
    axes.legend(loc="upper left")


# --- the locks benchmark --------------------------------------------------------------

# (label, metric, line style) of the lock curves in each phase's panel.
LOCK_CURVES = (
    ("acquire", "acquire_ms", "-"),
    ("release", "release_ms", "--"),
)
FLOOR_CURVE = ("SET NX floor", "floor", "set_nx_ms", ":")


def plot_locks(
    report: Mapping[str, Any], samples: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]], path: Path
) -> Path:
    """Draw lock latency CDFs per phase (a curve per backend and operation, plus each
    run's SET NX floor and the 2 ms / 5 ms targets) and the gateway's CPU to `path`."""
    figure = Figure(figsize=(12, 9.5), layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = cast(Any, figure.subfigures(2, 1, height_ratios=(3, 2)))  # two subfigures (typed as one or many)
    panels = top.subplots(1, 2, sharey=True)
    colours = {run["backend"]: f"C{i}" for i, run in enumerate(report["runs"])}
    for axes, phase in zip(panels, ("uncontended", "contended"), strict=False):
        for backend, by_phase in samples.items():
            for label, metric, style in LOCK_CURVES:
                _cdf(axes, by_phase.get(phase, {}).get(metric, ()), f"{backend} {label}", style, colours.get(backend))
            name, floor_phase, metric, style = FLOOR_CURVE
            _cdf(axes, by_phase.get(floor_phase, {}).get(metric, ()), f"{name} ({backend} run)", style,
                 colours.get(backend))
        targets = report["targets_ms"]
        for value, label in ((targets["goal_p99"], "goal"), (targets["seed_p99"], "seed bar")):
            axes.axvline(value, color="tab:red", linewidth=0.8, linestyle="-." if label == "goal" else "-")
            axes.text(value * 1.04, 0.03, f"p99 {label} {value:g} ms", color="tab:red", fontsize=8, rotation=90)
        for q in (0.5, 0.95, 0.99):
            axes.axhline(q, color="grey", linewidth=0.6, linestyle=":")
        axes.set_xscale("log")
        axes.set_xlabel("round trip at the client (ms, log scale)")
        axes.set_ylim(0, 1.01)
        axes.set_title(f"{phase}" + (" (acquire: ACQUIRED or DENIED)" if phase == "contended" else ""))
        axes.grid(True, which="both", linewidth=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="lower right", fontsize=8)
    panels[0].set_ylabel("fraction of samples ≤ x")
    _lock_cpu(bottom.subplots(), report, colours)
    s = report["settings"]
    figure.suptitle(
        f"rounds locks bench: {s['lockers']} lockers, {s['contenders']} contenders, "
        f"{s['presence_users']} presence users, {s['duration_s']:g} s per backend, {report['started_at']}"
    )
    figure.savefig(path, dpi=110)
    return path


def _cdf(axes: Any, values: Sequence[float], label: str, style: str, colour: str | None,
         count: int | None = None) -> None:
    """A step CDF of `values`; `count` is the number of samples they stand for (thinned data)."""
    data = sorted(values)
    if not data:
        return
    n = len(data)
    axes.step([max(v, 1e-3) for v in data], [(i + 1) / n for i in range(n)], style, where="post",
              label=f"{label} (n={count if count is not None else n})", color=colour)


def _lock_cpu(axes: Any, report: Mapping[str, Any], colours: Mapping[str, str]) -> None:
    """Gateway CPU per run against seconds since its measured phase began, phases shaded."""
    shaded = False
    for run in report["runs"]:
        if run.get("error"):
            continue
        origin = run["phases_s"]["measured_from"] or 0.0
        points = [(p["t_s"] - origin, p["cpu_percent"]) for p in run["gateway"]["timeline"]
                  if p.get("cpu_percent") is not None]
        if points:
            axes.plot(*zip(*points, strict=True), color=colours.get(run["backend"]),
                      label=f"gateway CPU, {run['backend']} run")
        if not shaded:
            for i, (name, (start, end)) in enumerate(run["phases_s"]["windows"].items()):
                axes.axvspan(start - origin, end - origin, color=f"C{i + 4}", alpha=0.08)
                axes.text((start + end) / 2 - origin, 0.98, name, transform=axes.get_xaxis_transform(),
                          ha="center", va="top", fontsize=8)
            shaded = True
    axes.set_xlabel("seconds since the measured phase began (negative: ramp)")
    axes.set_ylabel("CPU (% of one core)")
    axes.set_title("gateway CPU, summed over its processes (presence load throughout)")
    axes.grid(True, linewidth=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="upper left", fontsize=8)


# --- the documents benchmark -------------------------------------------------------------

CDF_MAX_POINTS = 20_000  # a CDF drawn from more samples looks the same and takes seconds


def plot_crdt(report: Mapping[str, Any], samples: Mapping[str, Mapping[str, Sequence[float]]], path: Path) -> Path:
    """Draw, per run (server and mode): the propagation CDF (and the UPDATE_ACK
    round trip's, dashed), the p50/p95/p99/max bars against the targets, and
    the server's CPU over the run, to `path` (PNG)."""
    figure = Figure(figsize=(13, 9.5), layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = cast(Any, figure.subfigures(2, 1, height_ratios=(3, 2)))  # two subfigures (typed as one or many)
    cdf_axes, bar_axes = top.subplots(1, 2, width_ratios=(3, 2))
    runs = [run for run in report["runs"] if not run.get("error")]
    colours = {run["label"]: f"C{i}" for i, run in enumerate(runs)}
    targets = report["targets_ms"]
    for run in runs:
        by_metric = samples.get(run["label"], {})
        for metric, name, style in (("propagation_ms", "propagation", "-"), ("ack_ms", "UPDATE_ACK", "--")):
            values = by_metric.get(metric, ())
            _cdf(cdf_axes, _thin(values), f"{run['label']} {name}", style, colours[run["label"]], len(values))
    for value, label, style in _target_lines(targets):
        cdf_axes.axvline(value, color="tab:red", linewidth=0.8, linestyle=style)
        cdf_axes.text(value * 1.04, 0.03, f"p99 {label} {value:g} ms", color="tab:red", fontsize=8, rotation=90)
    for q in (0.5, 0.95, 0.99):
        cdf_axes.axhline(q, color="grey", linewidth=0.6, linestyle=":")
    cdf_axes.set_xscale("log")
    cdf_axes.set_xlabel("sender → other member (ms, log scale)")
    cdf_axes.set_ylabel("fraction of deliveries ≤ x")
    cdf_axes.set_ylim(0, 1.01)
    cdf_axes.set_title("update propagation CDF (dotted: p50, p95, p99)")
    cdf_axes.grid(True, which="both", linewidth=0.3)
    if cdf_axes.get_legend_handles_labels()[0]:
        cdf_axes.legend(loc="lower right", fontsize=8)
    _crdt_bars(bar_axes, runs, colours, targets)
    _crdt_cpu(bottom.subplots(), runs, colours)
    s = report["settings"]
    figure.suptitle(
        f"rounds crdt bench: {s['users']} users, rooms of {s['room_size']}, one update every {s['interval_s']:g} s "
        f"each, {s['duration_s']:g} s per server, {report['started_at']}"
    )
    figure.savefig(path, dpi=110)
    return path


def _target_lines(targets: Mapping[str, Any]) -> list[tuple[float, str, str]]:
    """(value, label, line style) of the goal and the seed's bar; one line when they coincide."""
    goal, seed = targets["goal_p99"], targets["seed_p99"]
    if goal == seed:
        return [(goal, "goal = seed bar", "-")]
    return [(goal, "goal", "-."), (seed, "seed bar", "-")]


def _thin(values: Sequence[float]) -> list[float]:
    """At most `CDF_MAX_POINTS` values, evenly spaced through the sorted data
    (its minimum and maximum included)."""
    data = sorted(values)
    if len(data) <= CDF_MAX_POINTS:
        return data
    step = (len(data) - 1) / (CDF_MAX_POINTS - 1)
    return [data[round(i * step)] for i in range(CDF_MAX_POINTS)]


def _crdt_bars(axes: Any, runs: Sequence[Mapping[str, Any]], colours: Mapping[str, str],
               targets: Mapping[str, Any]) -> None:
    names = ("p50", "p95", "p99", "max")
    width = 0.8 / max(1, len(runs))
    for i, run in enumerate(runs):
        figures = run["latency_ms"]["propagation"]
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(names))]
        heights = [figures[name] or 0.0 for name in names]
        bars = axes.bar(xs, heights, width, label=run["label"], color=colours[run["label"]])
        axes.bar_label(bars, labels=[f"{h:.3g}" for h in heights], fontsize=7)
    for value, label, style in _target_lines(targets):
        axes.axhline(value, color="tab:red", linewidth=0.8, linestyle=style, label=f"p99 {label} {value:g} ms")
    axes.set_xticks(range(len(names)), names)
    axes.set_yscale("log")
    axes.set_ylabel("propagation (ms, log scale)")
    axes.set_title("propagation percentiles per run")
    axes.grid(True, axis="y", which="both", linewidth=0.3)
    if runs:
        axes.legend(loc="upper left", fontsize=8)


def _crdt_cpu(axes: Any, runs: Sequence[Mapping[str, Any]], colours: Mapping[str, str]) -> None:
    """Server CPU per run against seconds since its measured phase began."""
    for run in runs:
        origin = run["phases_s"]["measured_from"] or 0.0
        points = [(p["t_s"] - origin, p["cpu_percent"]) for p in run["server"]["timeline"]
                  if p.get("cpu_percent") is not None]
        if points:
            per_update = run["server"]["cpu_s_per_1000_updates"]
            note = "" if per_update is None else f", {per_update:.3f} CPU-s per 1,000 updates"
            axes.plot(*zip(*points, strict=False), color=colours[run["label"]], label=f"{run['label']}{note}")
    axes.axvline(0, color="grey", linewidth=0.6)
    axes.set_xlabel("seconds since the measured phase began (negative: connecting and syncing)")
    axes.set_ylabel("CPU (% of one core)")
    axes.set_title("server CPU, summed over its processes; dotted: deliveries over 5 ms by second of their send")
    axes.grid(True, linewidth=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="upper left", fontsize=8)
    slow = [(run, run.get("slow_deliveries_by_second", {}).get("over_5ms", [])) for run in runs]
    if any(any(by_second) for _, by_second in slow):
        twin = axes.twinx()
        for run, by_second in slow:
            if by_second:
                twin.step([s + 1 for s in range(len(by_second))], by_second, ":", where="pre",
                          color=colours[run["label"]])
        twin.set_ylabel("deliveries over 5 ms")
        twin.set_ylim(bottom=0)
