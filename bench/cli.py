"""`rounds bench ...`: the benchmark commands.

Belongs here: the argparse tree under `bench`, reading the environment (once,
in the handler, through `load_settings`), starting and stopping the gateway a
run targets, writing the report files. Must not be here: the benchmarks
themselves (`presence.py`, `locks.py`, `crdt.py`).

The main CLI calls `add_parser(subparsers)` and then `args.func(args)`, which
returns the exit code: 0 the run completed without failures; 1 it completed
with failures or was stopped early (the report is written either way);
2 bad arguments (such as a target that is not on loopback); 3 the gateway
could not be started; 130 interrupted.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from rounds.auth import private_key_for_dev
from rounds.bench import audit, crdt, locks
from rounds.bench.crdtplan import CODECS, MODES, WS, YJS, yjs_base_url
from rounds.bench.plan import require_loopback_url
from rounds.bench.presence import PresenceOptions, format_table, run_presence
from rounds.config import Settings, load_settings

# matplotlib (`rounds.bench.plot`), Ray (`rounds.cluster.launch`) and the
# synchronous Redis client are imported where used: every `rounds` command
# builds this parser, and they cost seconds to import.

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_GATEWAY, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"  # `bench crdt --compare-relay`
AUDIT_SEGMENT_S = 20.0  # `bench audit`: measured seconds of one locks segment


def add_parser(subparsers: Any) -> None:
    """Add `bench` and its benchmarks to the main CLI's subparsers."""
    bench = subparsers.add_parser("bench", help="load benchmarks against a local gateway")
    kinds = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    _add_presence(kinds)
    _add_locks(kinds)
    _add_crdt(kinds)
    _add_audit(kinds)
    _add_closed(kinds)


def _add_presence(kinds: Any) -> None:
    defaults = PresenceOptions()
    parser = kinds.add_parser(
        "presence",
        help="users join rooms, heartbeat and churn; measures latencies and gateway CPU/RSS",
        description=(
            "N simulated users connect over WebSocket, join rooms (page:/bench/room-K), send "
            "HEARTBEAT and leave/rejoin their room at random. Reports p50/p95/p99/max of connect, "
            "join->RESOURCE_STATE, join->USER_JOINED fan-out and heartbeat RTT, failures, and the "
            "gateway's CPU and peak RSS, as JSON and PNG in --out."
        ),
    )
    parser.add_argument("--users", type=int, default=defaults.users, help="simulated users (default %(default)s)")
    parser.add_argument("--room-size", type=int, default=defaults.room_size,
                        help="users per room (default %(default)s)")
    parser.add_argument(
        "--duration", type=float, default=defaults.duration_s, metavar="S",
        help="measured seconds after all users are connected (default %(default)s)",
    )
    parser.add_argument(
        "--churn-s", type=float, default=defaults.churn_s, metavar="S",
        help="mean seconds between two leave+rejoin of one user, 0 for none (default %(default)s)",
    )
    parser.add_argument(
        "--heartbeat-s", type=float, default=defaults.heartbeat_s, metavar="S",
        help="seconds between two HEARTBEATs of one user (default %(default)s)",
    )
    parser.add_argument(
        "--processes", type=int, default=defaults.processes,
        help="load generator worker processes, each owning whole rooms (default %(default)s)",
    )
    parser.add_argument(
        "--connect-concurrency", type=int, default=defaults.connect_concurrency, metavar="N",
        help="connection attempts in flight at once, over all workers (default %(default)s)",
    )
    parser.add_argument("--deflate", action="store_true", help="offer permessage-deflate, as browsers do")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the churn and heartbeat timing")
    _add_target_options(parser)
    parser.set_defaults(func=run_presence_command)


def _add_locks(kinds: Any) -> None:
    defaults = locks.LocksOptions()
    parser = kinds.add_parser(
        "locks",
        help="lock acquire/release round trips, uncontended and contended, under presence load",
        description=(
            "Per lock backend (Redis, then the embedded memory store; one gateway each, one after the other): "
            "a floor phase (bare SET NX + DEL against the same Redis, from the same client process), an "
            "uncontended phase (each locker locks its own field in its own room, acquire/release in a loop) "
            "and a contended phase (all contenders race for one field each round), while presence users "
            "heartbeat and churn. Reports p50/p95/p99/max, each p99 against the targets (5 ms seed bar, "
            "2 ms goal) and as a ratio to the SET NX p99, the grant rate and the gateway's CPU, as JSON "
            "and PNG in --out."
        ),
    )
    parser.add_argument(
        "--duration", type=float, default=defaults.duration_s, metavar="S",
        help="measured seconds per backend: 20%% floor, 40%% uncontended, 40%% contended (default %(default)s)",
    )
    parser.add_argument("--lockers", type=int, default=defaults.lockers,
                        help="uncontended lockers, one room and field each (default %(default)s)")
    parser.add_argument("--contenders", type=int, default=defaults.contenders,
                        help="clients in one room racing for one field each round (default %(default)s)")
    parser.add_argument("--presence-users", type=int, default=defaults.presence_users,
                        help="background users doing presence traffic (default %(default)s)")
    parser.add_argument("--presence-processes", type=int, default=defaults.presence_processes,
                        help="worker processes of the presence load (default %(default)s)")
    parser.add_argument(
        "--pause-ms", type=float, default=defaults.pause_ms, metavar="MS",
        help="think time of a lock client after each reply, drawn from [0.5, 1.5] x this; 0 for a closed "
             "loop at full speed (default %(default)s)",
    )
    parser.add_argument("--backends", choices=tuple(locks.BACKENDS), default=defaults.backends,
                        help="lock stores to bench, one gateway each (default %(default)s)")
    parser.add_argument(
        "--redis-url", metavar="URL",
        help=f"loopback Redis of the redis run and of the floor (default {locks.DEFAULT_REDIS_URL} with "
             "--backends both or redis; with memory, no floor unless given)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the pauses and presence timing")
    _add_gateway_options(parser.add_argument_group("gateway (one started per backend)"))
    _add_output_options(parser)
    parser.set_defaults(func=run_locks_command)


def _add_crdt(kinds: Any) -> None:
    defaults = crdt.CrdtOptions()
    parser = kinds.add_parser(
        "crdt",
        help="Y.js clients in rooms send text inserts; measures update propagation, delivery and server CPU",
        description=(
            "N pycrdt clients in rooms of 10 each insert a small marked string into the room's Text every "
            "--interval seconds and send the update, over /ws (--mode ws, JSON or msgpack) or y-websocket "
            "(--mode yjs, on our /yjs or any y-websocket server given by --url). Reports propagation "
            "(sender -> each other member) p50/p95/p99/max against the targets (seed bar p99 < 50 ms at 500 "
            "users; goal < 5 ms at 500, < 50 ms at 3,000), the UPDATE_ACK round trip (ws), delivery ratio, "
            "updates/s and the server's CPU per 1,000 updates, as JSON and PNG in --out. --compare-ref then "
            "measures the stock Node.js y-websocket server (tests/interop) the same way, side by side."
        ),
    )
    parser.add_argument("--users", type=int, default=defaults.users, help="clients (default %(default)s)")
    parser.add_argument("--room-size", type=int, default=defaults.room_size,
                        help="clients per room (default %(default)s)")
    parser.add_argument("--duration", type=float, default=defaults.duration_s, metavar="S",
                        help="measured seconds per server, after all clients synced (default %(default)s)")
    parser.add_argument("--interval", type=float, default=defaults.interval_s, metavar="S",
                        help="seconds between two updates of one client (default %(default)s)")
    parser.add_argument("--mode", choices=MODES, default=defaults.mode,
                        help="ws: our /ws protocol; yjs: the y-websocket protocol (default %(default)s)")
    parser.add_argument("--codec", choices=CODECS, default=defaults.codec,
                        help="frames on /ws: JSON text (base64 updates) or msgpack (default %(default)s)")
    parser.add_argument("--compare-ref", action="store_true",
                        help="after the first server, measure the reference Node.js y-websocket server "
                             "(tests/interop/refserver.mjs, always in yjs mode) and report ratios")
    parser.add_argument("--compare-relay", action="store_true",
                        help="after our gateway, measure it again with every shard-to-front-door message through "
                             "the cross-node relay (RabbitMQ, relay = always) and report ratios")
    parser.add_argument("--amqp-url", default=None,
                        help=f"with --compare-relay: loopback RabbitMQ (default amqp_url, else {DEFAULT_AMQP_URL})")
    parser.add_argument("--processes", type=int, default=defaults.processes,
                        help="load generator worker processes, each owning whole rooms (default %(default)s)")
    parser.add_argument("--connect-concurrency", type=int, default=defaults.connect_concurrency, metavar="N",
                        help="connection attempts in flight at once, over all workers (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the send timing")
    target = parser.add_argument_group("target")
    target.add_argument("--url", help="bench this running server instead of starting our gateway: its /ws URL "
                                      "(ws mode) or the y-websocket base URL rooms are appended to (yjs mode)")
    target.add_argument("--pid", type=int, action="append", default=None,
                        help="with --url: a server process to sample for CPU/RSS (repeatable; none: not reported)")
    _add_gateway_options(target)
    _add_output_options(parser)
    parser.set_defaults(func=run_crdt_command)


def _add_audit(kinds: Any) -> None:
    defaults, lock_defaults = audit.AuditOptions(), locks.LocksOptions()
    parser = kinds.add_parser(
        "audit",
        help="audit sink throughput (files, PostgreSQL) and its added latency on a lock round trip",
        description=(
            "1. events/s FileAuditSink.emit sustains into a day file, from one process and from N processes "
            "appending to the same file, per fsync policy (chains verified after), then events/s loaded from "
            "those files into PostgreSQL by rounds.audit.pg (a schema of its own, dropped after; skipped if "
            "unreachable); 2. two gateways up at once, audit 'files' and audit 'off', and the locks bench "
            "against them in --rounds interleaved rounds (ABBA: round 1 --first then the other, round 2 the "
            "other first, ...); each gateway's samples are pooled and the pooled p99s compared, each round's "
            "own ratio reported too. Targets: 20,000 events/s; auditing adds < 10%% to p99. JSON and PNG "
            "in --out."
        ),
    )
    sink = parser.add_argument_group("sink throughput")
    sink.add_argument("--sink-seconds", type=float, default=defaults.sink_seconds, metavar="S",
                      help="each sink case runs this long... (default %(default)s)")
    sink.add_argument("--sink-events", type=int, default=defaults.sink_max_events, metavar="N",
                      help="...or this many events per process, whichever first (default %(default)s)")
    sink.add_argument("--processes", type=int, default=defaults.processes,
                      help="writer processes of the multi-process cases (default %(default)s)")
    sink.add_argument("--fsync", action="append", choices=("interval", "always", "never"), default=None,
                      help="fsync policies to bench, repeatable (default: interval and always)")
    sink.add_argument("--dsn",
                      help=f"loopback PostgreSQL for the load (default postgres_dsn, else {audit.DEFAULT_DSN})")
    sink.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL load")
    sink.add_argument("--scratch", type=Path, help="parent of the temporary folder (default var_dir: the audit "
                                                    "files' own file system); removed after")
    lock = parser.add_argument_group("lock round trips (the locks bench, gateway audit files and off)")
    lock.add_argument("--no-locks", action="store_true", help="the sink part only")
    lock.add_argument("--rounds", type=int, default=defaults.rounds,
                      help="rounds of one segment against each gateway (default %(default)s)")
    lock.add_argument("--first", choices=audit.AUDIT_MODES, default=defaults.first,
                      help="the gateway that opens round 1 (and 3, 5, ...; the other opens the even rounds) "
                           "(default %(default)s)")
    lock.add_argument("--duration", type=float, default=AUDIT_SEGMENT_S, metavar="S",
                      help="measured seconds of one segment (default %(default)s)")
    lock.add_argument("--lockers", type=int, default=lock_defaults.lockers, help="(default %(default)s)")
    lock.add_argument("--contenders", type=int, default=lock_defaults.contenders, help="(default %(default)s)")
    lock.add_argument("--presence-users", type=int, default=lock_defaults.presence_users,
                      help="(default %(default)s)")
    lock.add_argument("--presence-processes", type=int, default=lock_defaults.presence_processes,
                      help="(default %(default)s)")
    lock.add_argument("--pause-ms", type=float, default=lock_defaults.pause_ms, metavar="MS",
                      help="(default %(default)s)")
    lock.add_argument("--backend", choices=("memory", "redis"), default="memory",
                      help="lock store of both gateways (default %(default)s)")
    lock.add_argument("--redis-url", metavar="URL", help=f"with --backend redis (default {locks.DEFAULT_REDIS_URL})")
    lock.add_argument("--seed", type=int, default=lock_defaults.seed, help="(default %(default)s)")
    _add_gateway_options(lock)  # --port: the first gateway's; the second takes a free loopback port
    _add_output_options(parser)
    parser.set_defaults(func=run_audit_command)


def _add_closed(kinds: Any) -> None:
    parser = kinds.add_parser(
        "closed",
        help="what dropped connections leave for the garbage collector (the gateway in one process)",
        description=(
            "The whole gateway in this process (1 shard, 1 front door, memory backends); N clients "
            "connect over /ws from a child process, join rooms of 10 and are dropped at once without a "
            "closing handshake, the cyclic collector off meanwhile. Prints, as JSON, the objects it "
            "tracks idle, connected and after they left, what a full collection then finds "
            "unreachable and how long it paused."
        ),
    )
    parser.add_argument("--users", type=int, default=1500, help="clients (default %(default)s)")
    parser.add_argument("--hold", type=float, default=5.0, metavar="S",
                        help="seconds all stay connected (default %(default)s)")
    parser.add_argument("--settle", type=float, default=3.0, metavar="S",
                        help="seconds after the last one left before counting (default %(default)s)")
    parser.set_defaults(func=run_closed_command)


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--url", help="bench this running gateway (ws://127.0.0.1:PORT/ws) instead of starting one")
    target.add_argument(
        "--pid", type=int, action="append", default=None,
        help="with --url: a gateway process to sample for CPU/RSS (repeatable; none: not reported)",
    )
    _add_gateway_options(target)
    _add_output_options(parser)


def _add_gateway_options(parser: Any) -> None:
    parser.add_argument("--shards", type=int, help="shards of the gateway the bench starts")
    parser.add_argument("--frontdoors", type=int, help="front doors of the gateway the bench starts")
    parser.add_argument("--port", type=int, help="port of the gateway the bench starts")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for the JSON and PNG (default bench/results)")
    output.add_argument("--no-plot", action="store_true", help="write the JSON report only")


# --- the handler -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Target:
    url: str
    pids: list[int] | None
    info: dict[str, Any]
    # our own gateway's garbage-collector totals, summed over its processes (`gcwatch.stats`)
    gc: Callable[[], dict[str, float] | None] | None = None


class _Reported(Protocol):
    report: dict[str, Any]


_Run = TypeVar("_Run", bound=_Reported)


class _UsageError(Exception):
    pass


def run_presence_command(args: argparse.Namespace) -> int:
    """Run `rounds bench presence`; see the module docstring for exit codes."""
    try:
        options = PresenceOptions(
            users=args.users,
            room_size=args.room_size,
            processes=args.processes,
            duration_s=args.duration,
            churn_s=args.churn_s,
            heartbeat_s=args.heartbeat_s,
            connect_concurrency=args.connect_concurrency,
            deflate=args.deflate,
            seed=args.seed,
        )
        options.check()
        _check_target_options(args)
    except (ValueError, _UsageError) as error:
        return _fail(EXIT_USAGE, str(error))
    # The main CLI loads the settings once and hands them over as `args.settings`;
    # when called without them this is the one read of the environment (STYLE.md 10).
    settings = getattr(args, "settings", None) or load_settings(getattr(args, "config", None), env=os.environ)
    try:
        with _target(args, settings) as target:
            return _run_and_write(options, settings, target, args.out, plot=not args.no_plot)
    except _UsageError as error:
        return _fail(EXIT_USAGE, str(error))
    except _GatewayError as error:
        return _fail(EXIT_GATEWAY, str(error))
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted")


def _check_target_options(args: argparse.Namespace) -> None:
    if args.url is None:
        if args.pid:
            raise _UsageError("--pid goes with --url (the bench samples the gateway it starts by itself)")
        return
    require_loopback_url(args.url)
    given = [f"--{name}" for name in ("shards", "frontdoors", "port") if getattr(args, name) is not None]
    if given:
        raise _UsageError(f"{', '.join(given)}: only for the gateway the bench starts, not with --url")


class _GatewayError(locks.GatewayUnavailable, crdt.ServerUnavailable):
    pass


@contextmanager
def _target(args: argparse.Namespace, settings: Settings) -> Iterator[_Target]:
    """The gateway to bench: the one at --url, else one started here and stopped after."""
    if args.url is not None:
        yield _Target(args.url, args.pid, {"url": args.url, "own_gateway": False, "pids": args.pid})
        return
    with _own_gateway(_gateway_settings(args, settings)) as target:
        yield target


def _gateway_settings(args: argparse.Namespace, settings: Settings) -> Settings:
    """`settings` with the gateway options given, on loopback whatever the configuration says."""
    changes = {name: getattr(args, name) for name in ("shards", "frontdoors", "port")
               if getattr(args, name) is not None}
    if not _is_loopback_host(settings.host):
        changes["host"] = "127.0.0.1"  # the bench's own gateway never listens beyond this machine
    return settings.replace(**changes)


@contextmanager
def _own_gateway(gateway_settings: Settings) -> Iterator[_Target]:
    """A gateway started here with `gateway_settings`, stopped on exit."""
    try:
        from rounds.cluster.launch import Gateway
    except ImportError as error:
        raise _GatewayError(f"cannot start a gateway (rounds.cluster.launch): {error}") from error
    _log(f"bench: starting a gateway ({gateway_settings.shards} shards, {gateway_settings.frontdoors} front doors)")
    started = time.monotonic()
    try:
        gateway = Gateway.start(gateway_settings)
    except Exception as error:  # whatever went wrong, the bench cannot run: say what and stop
        raise _GatewayError(f"the gateway did not start: {type(error).__name__}: {error}") from error
    try:
        pids = list(gateway.pids())
        _log(f"bench: gateway up at {gateway.url} in {time.monotonic() - started:.1f} s, pids {pids}")
        yield _Target(
            gateway.url,
            pids,
            {
                "url": gateway.url,
                "own_gateway": True,
                "pids": pids,
                "shards": gateway_settings.shards,
                "frontdoors": gateway_settings.frontdoors,
                "port": gateway_settings.port,
                "redis_url": gateway_settings.redis_url,
            },
            partial(_gc_totals, gateway),
        )
    finally:
        _log("bench: stopping the gateway")
        gateway.stop()


def _run_and_write(options: PresenceOptions, settings: Settings, target: _Target, out: Path, plot: bool) -> int:
    try:
        require_loopback_url(target.url)
    except ValueError as error:
        raise _UsageError(str(error)) from None
    run = _with_gateway_gc(target, lambda: run_presence(options, target.url, private_key_for_dev(settings),
                                                        target.pids, _log, target.info))
    out.mkdir(parents=True, exist_ok=True)
    stem = f"presence-{options.users}u-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
    # Names only: the two files sit side by side, wherever the folder is moved.
    run.report["files"] = {"json": json_path.name, "png": png_path.name if plot else None}
    if plot:
        from rounds.bench.plot import plot_presence

        plot_presence(run.report, run.samples, png_path)
    _write_json(json_path, run.report)
    print(format_table(run.report))
    print(f"\nreport: {json_path}" + (f"\nchart:  {png_path}" if plot else ""))
    return EXIT_OK if run.report["ok"] else EXIT_FAILURES


def run_closed_command(args: argparse.Namespace) -> int:
    """Run `rounds bench closed`: 0 done, 2 bad arguments, 3 the clients did not connect."""
    if not 1 <= args.users <= 20_000:
        return _fail(EXIT_USAGE, "--users must be between 1 and 20000")
    import uvloop

    from rounds.bench.closed import measure

    try:
        report = uvloop.run(measure(args.users, args.hold, args.settle, _free_loopback_port("127.0.0.1")))
    except RuntimeError as error:
        return _fail(EXIT_GATEWAY, str(error))
    print(json.dumps(report))
    return EXIT_OK


def run_locks_command(args: argparse.Namespace) -> int:
    """Run `rounds bench locks`; see the module docstring for exit codes."""
    try:
        options = locks.LocksOptions(
            duration_s=args.duration,
            lockers=args.lockers,
            contenders=args.contenders,
            presence_users=args.presence_users,
            presence_processes=args.presence_processes,
            pause_ms=args.pause_ms,
            backends=args.backends,
            redis_url=locks.resolve_redis_url(args.backends, args.redis_url),
            seed=args.seed,
        )
        options.check()
    except ValueError as error:
        return _fail(EXIT_USAGE, str(error))
    settings = getattr(args, "settings", None) or load_settings(getattr(args, "config", None), env=os.environ)
    settings = _gateway_settings(args, settings)
    if options.redis_url is not None:
        problem = _redis_problem(options.redis_url)
        if problem is not None:
            return _fail(EXIT_GATEWAY, f"Redis at {options.redis_url} is not usable: {problem}")
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    try:
        run = locks.run_locks(options, settings, _own_gateway, private_key_for_dev(settings), _log, _delete_keys)
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted")
    from rounds.bench.plot import plot_locks

    return _finish(args, run.report, f"locks-{options.backends}-{started}",
                   lambda path: plot_locks(run.report, run.samples, path), locks.format_table)


def run_crdt_command(args: argparse.Namespace) -> int:
    """Run `rounds bench crdt`; see the module docstring for exit codes."""
    try:
        options = crdt.CrdtOptions(
            users=args.users, room_size=args.room_size, processes=args.processes, duration_s=args.duration,
            interval_s=args.interval, mode=args.mode, codec=args.codec, compare_ref=args.compare_ref,
            connect_concurrency=args.connect_concurrency, seed=args.seed,
        )
        options.check()
        _check_target_options(args)
    except (ValueError, _UsageError) as error:
        return _fail(EXIT_USAGE, str(error))
    settings = getattr(args, "settings", None) or load_settings(getattr(args, "config", None), env=os.environ)
    gateway_settings = _gateway_settings(args, settings)
    servers = [_crdt_server(args, options, gateway_settings)]
    if args.compare_relay:
        if args.url is not None:
            return _fail(EXIT_USAGE, "--compare-relay measures our own gateway twice: not with --url")
        amqp_url = args.amqp_url or settings.amqp_url or DEFAULT_AMQP_URL
        if not _is_loopback_host(urlsplit(amqp_url).hostname or ""):
            return _fail(EXIT_USAGE, f"--amqp-url must be on this machine (loopback): {amqp_url}")
        servers.append(_crdt_server(args, options, gateway_settings.replace(amqp_url=amqp_url, relay="always"),
                                    name="rounds+relay"))
    if options.compare_ref:
        from rounds.bench.refserver import NAME, reference_server

        servers.append(crdt.Server(NAME, YJS, None, reference_server))
    started = time.time()
    try:
        run = crdt.run_crdt(options, servers, private_key_for_dev(settings), _log)
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted")
    from rounds.bench.plot import plot_crdt

    return _finish(args, run.report, crdt.report_stem(options, started),
                   lambda path: plot_crdt(run.report, run.samples, path), crdt.format_table)


def run_audit_command(args: argparse.Namespace) -> int:
    """Run `rounds bench audit`; see the module docstring for exit codes."""
    settings = getattr(args, "settings", None) or load_settings(getattr(args, "config", None), env=os.environ)
    try:
        options = audit.AuditOptions(
            sink_seconds=args.sink_seconds, sink_max_events=args.sink_events, processes=args.processes,
            fsync_policies=tuple(args.fsync or audit.AuditOptions().fsync_policies),
            dsn=None if args.no_postgres else (args.dsn or settings.postgres_dsn or audit.DEFAULT_DSN),
            locks=not args.no_locks, first=args.first, rounds=args.rounds,
        )
        options.check()
        lock_options = locks.LocksOptions(
            duration_s=args.duration, lockers=args.lockers, contenders=args.contenders,
            presence_users=args.presence_users, presence_processes=args.presence_processes,
            pause_ms=args.pause_ms, backends=args.backend,
            redis_url=locks.resolve_redis_url(args.backend, args.redis_url), seed=args.seed,
        )
        lock_options.check()
    except ValueError as error:
        return _fail(EXIT_USAGE, str(error))
    gateway_settings = _gateway_settings(args, settings)
    if options.locks and lock_options.redis_url is not None:
        problem = _redis_problem(lock_options.redis_url)
        if problem is not None:
            return _fail(EXIT_GATEWAY, f"Redis at {lock_options.redis_url} is not usable: {problem}")
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    try:
        report = audit.run_audit(options, (args.scratch or Path(settings.var_dir)).resolve(), _log,
                                 partial(_audit_gateways, gateway_settings, lock_options))
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted")
    report["command"] = shlex.join(["rounds", *sys.argv[1:]])
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"audit-{started}.json", out / f"audit-{started}.png"
    report["files"] = {"json": json_path.name, "png": None if args.no_plot else png_path.name}
    if not args.no_plot:
        try:
            audit.plot_audit(report, png_path)
        except Exception as error:  # the measurements matter more than their chart: keep the JSON
            _log(f"bench audit: the chart failed: {type(error).__name__}: {error}")
            report["files"]["png"] = None
    _write_json(json_path, report)
    print(audit.format_table(report))
    print(f"\nreport: {json_path}" + (f"\nchart:  {png_path}" if report["files"]["png"] else ""))
    if (report["locks"] or {}).get("error"):
        return EXIT_GATEWAY
    return EXIT_OK if report["ok"] else EXIT_FAILURES


@contextmanager
def _audit_gateways(settings: Settings, lock_options: locks.LocksOptions,
                    var_dirs: Mapping[str, Path]) -> Iterator[audit.SegmentRunner]:
    """Both gateways of `bench audit`'s lock part, up at the same time; yields the
    function that runs one locks segment against the gateway of a mode.

    They share this process's Ray (the first starts it, the second joins it and
    must stop first: the first shuts Ray down), so each has a namespace of its
    own (actor names would collide), a port (the first keeps --port, the second
    a free loopback port, chosen once the first listens), a var_dir (dev keys,
    audit files) in the scratch folder, the lock store of `--backend` (as
    `run_locks` would have given it) and no `postgres_dsn`: a shipper would
    load the bench's events into the real audit table and add to the CPU.
    """
    targets: dict[str, tuple[Settings, _Target]] = {}
    with ExitStack() as stack:  # stops them in reverse order of start
        for index, mode in enumerate(audit.AUDIT_MODES):
            mode_settings = settings.replace(
                audit=mode, var_dir=str(var_dirs[mode]), postgres_dsn=None,
                redis_url=lock_options.redis_url if lock_options.backends == "redis" else None,
                ray_namespace=f"{settings.ray_namespace}-audit-{mode}",
                port=settings.port if index == 0 else _free_loopback_port(settings.host))
            _log(f"bench audit: gateway with audit {mode}: namespace {mode_settings.ray_namespace}, "
                 f"port {mode_settings.port}")
            targets[mode] = (mode_settings, stack.enter_context(_own_gateway(mode_settings)))

        def segment(mode: str) -> locks.LocksRun:
            mode_settings, target = targets[mode]
            return _with_gateway_gc(target, lambda: locks.run_locks(
                lock_options, mode_settings, lambda _settings: nullcontext(target),
                private_key_for_dev(mode_settings), _log, _delete_keys))

        yield segment


def _with_gateway_gc(target: _Target, run: Callable[[], _Run]) -> _Run:
    """`run()`, its report given `gateway_gc`: what the gateway's garbage
    collector did meanwhile, when the bench started that gateway and every
    process of it answered before and after."""
    before = target.gc() if target.gc else None
    result = run()
    after = target.gc() if before is not None and target.gc else None
    if before is not None and after is not None:
        delta = {key: round(after[key] - before[key], 1) for key in after}
        if min(delta.values()) >= 0:  # a restarted process starts its counts again
            result.report["gateway_gc"] = delta
    return result


def _gc_totals(gateway: Any) -> dict[str, float] | None:
    """Collections, ms paused, pauses over 10 ms and full collections, summed
    over the gateway's processes; None when one of them did not answer."""
    status = gateway.status()
    totals = {"collections": 0.0, "pausedMs": 0.0, "over10ms": 0.0, "full": 0.0, "fullPausedMs": 0.0}
    for stats in [*status["shards"], *status["frontdoors"]]:
        gc = (stats or {}).get("gc")
        if not gc:
            return None
        for key in totals:
            totals[key] += gc.get(key, 0)
    return totals


def _free_loopback_port(host: str) -> int:
    """A port nothing listens on at `host` now (the OS's choice)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _finish(args: argparse.Namespace, report: dict[str, Any], stem: str, plot: Callable[[Path], object],
            table: Callable[[dict[str, Any]], str]) -> int:
    """Write a multi-run report (JSON, and PNG unless --no-plot or every run
    failed), print its table, and choose the exit code."""
    report["command"] = shlex.join(["rounds", *sys.argv[1:]])
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
    plotted = not args.no_plot and any(not r.get("error") for r in report["runs"])
    report["files"] = {"json": json_path.name, "png": png_path.name if plotted else None}
    if plotted:
        plot(png_path)
    _write_json(json_path, report)
    print(table(report))
    print(f"\nreport: {json_path}" + (f"\nchart:  {png_path}" if plotted else ""))
    if any(r.get("error") for r in report["runs"]):
        return EXIT_GATEWAY
    return EXIT_OK if report["ok"] else EXIT_FAILURES


def _crdt_server(args: argparse.Namespace, options: crdt.CrdtOptions, gateway_settings: Settings,
                 name: str = "rounds") -> crdt.Server:
    """A server of a crdt run: the one at --url, else our gateway, started here."""
    codec = options.codec if options.mode == WS else None
    if args.url is not None:
        given = _Target(args.url, args.pid, {"url": args.url, "own_gateway": False, "pids": args.pid})
        return crdt.Server(args.url, options.mode, codec, lambda: nullcontext(given))

    @contextmanager
    def own() -> Iterator[_Target]:
        with _own_gateway(gateway_settings) as target:
            if options.mode == YJS:
                target = _Target(yjs_base_url(target.url), target.pids, target.info)
            yield target

    return crdt.Server(name, options.mode, codec, own)


def _redis_problem(url: str) -> str | None:
    """Why the bench cannot use the Redis at `url`, or None if it answers PING."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except (redis.RedisError, OSError) as error:
        return f"{type(error).__name__}: {error}"
    finally:
        client.close()
    return None


def _delete_keys(url: str, prefix: str) -> int:
    """Delete the keys of a Redis run's rooms, users and locks (fencing counters
    never expire) and of its floor, at most 100,000 a pattern."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    deleted = 0
    try:
        patterns = (f"lock:document:{prefix}-*", f"resource:document:{prefix}-*", f"user:{prefix}-*", f"{prefix}:*")
        for pattern in patterns:
            batch = list(client.scan_iter(match=pattern, count=1000))[:100_000]
            for start in range(0, len(batch), 1000):
                deleted += client.delete(*batch[start:start + 1000])
    except (redis.RedisError, OSError) as error:
        _log(f"rounds bench: could not delete the keys of {prefix}: {error}")
    finally:
        client.close()
    return deleted


def _write_json(path: Path, report: dict[str, Any]) -> None:
    temp = path.with_suffix(".json.tmp")
    temp.write_text(json.dumps(report, indent=2) + "\n")
    temp.replace(path)


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _fail(code: int, message: str) -> int:
    _log(f"rounds bench: {message}")
    return code
