"""`rounds audit ...`: the audit trail's commands.

`verify` checks the hash chains of a day's NDJSON file (rounds.audit.verify). The
PostgreSQL commands (migrate, load, search) join here, each a subparser
added in `add_audit_parser` with its own `_name(args) -> int` function.
Exit codes: 0 all well, 1 the trail is not intact, 2 usage, 3 (erase) something left to erase.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from rounds.audit.verify import VerifyReport, verify_day, verify_file
from rounds.config import Settings


def add_audit_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="the audit trail: verify its files").add_subparsers(
        dest="audit_command", required=True)
    verify = audit.add_parser("verify", help="check a day's file: every writer's hash chain, the first break")
    which = verify.add_mutually_exclusive_group()
    which.add_argument("--file", help="an audit-YYYY-MM-DD.ndjson[.gz] file")
    which.add_argument("--day", type=_day, help="a UTC day, YYYY-MM-DD (default: today)")
    which.add_argument("--since", type=_time,
                       help="check PostgreSQL instead: the events from this ISO time (inclusive) ...")
    verify.add_argument("--until", type=_time, help="... to this one (exclusive; default: now)")
    verify.add_argument("--dir", help="the audit directory (default: {var_dir}/audit)")
    verify.add_argument("--dsn", help="with --since: PostgreSQL DSN (default: postgres_dsn of the settings)")
    verify.set_defaults(func=_verify)
    _add_pg_parsers(audit)


def audit_dir(settings: Settings, given: str | None) -> Path:
    return Path(given) if given else Path(settings.var_dir) / "audit"


def _day(text: str) -> str:
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a day YYYY-MM-DD: {text!r}") from None


def _verify(args: argparse.Namespace) -> int:
    if args.since is not None:
        return _verify_db(args)
    if args.until is not None:
        print("rounds audit verify: --until goes with --since (a time range in PostgreSQL)", file=sys.stderr)
        return 2
    try:
        if args.file:
            report = verify_file(Path(args.file))
        else:
            day = args.day or datetime.now(UTC).date().isoformat()
            report = verify_day(audit_dir(args.settings, args.dir), day)
    except OSError as exc:  # a missing or unreadable file (a damaged gzip is in the report)
        print(f"rounds audit verify: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    return 0 if report.intact else 1


def _verify_db(args: argparse.Namespace) -> int:
    """The chains of the events stored in [since, until) (audit_pg.verify_db)."""
    from rounds.audit.pg import verify_db

    until = args.until or datetime.now(UTC)

    async def work(conn: Any) -> int:
        report, unchained = await verify_db(conn, args.since, until)
        print_report(report)
        if unchained:
            print(f"({unchained} rows without a chain, from files written before it, not checked)")
        return 0 if report.intact else 1

    return _with_db(args, "verify", work)


def print_report(report: VerifyReport) -> None:
    events = sum(w.events for w in report.writers.values())
    print(f"{report.path}: {len(report.writers)} writers, {events} events checked")
    for bad in report.corrupt:
        print(f"  {bad.path}:{bad.line}: corrupt line skipped: {bad.problem}")
    for chain in sorted(report.writers.values(), key=lambda c: c.writer):
        if chain.broken is not None:
            print(f"  {chain.writer}: BREAK at line {chain.broken.line}, seq {chain.broken.seq}: "
                  f"{chain.broken.problem}")
            continue
        anchor = "" if chain.linked else " (continues a chain from a file not checked)"
        print(f"  {chain.writer}: OK, seq {chain.first_seq}-{chain.last_seq}{anchor}")
    print("intact" if report.intact else "NOT INTACT")


# -- PostgreSQL: migrate, load, search, retention (rounds.audit.pg) -----------


def _add_pg_parsers(audit: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dsn_help = "PostgreSQL DSN (default: postgres_dsn of the settings)"
    migrate = audit.add_parser("migrate", help="create or update the audit tables in PostgreSQL")
    migrate.add_argument("--dsn", help=dsn_help)
    migrate.set_defaults(func=_migrate)

    load = audit.add_parser("load", help="load the NDJSON day files into PostgreSQL (idempotent by event id)")
    load.add_argument("--dir", help="the audit directory (default: {var_dir}/audit)")
    load.add_argument("--dsn", help=dsn_help)
    load.add_argument("--batch", type=_positive, default=5_000, help="events per transaction")
    load.add_argument("--follow", action="store_true",
                      help="then keep loading what the files gain (until Ctrl-C), waiting while PostgreSQL is down")
    load.add_argument("--interval-s", type=float, default=1.0, help="with --follow: how often to look")
    load.set_defaults(func=_load)

    search = audit.add_parser("search", help="events by user, resource, type and time, oldest first "
                                             "(PostgreSQL, or the files when no DSN is configured)")
    search.add_argument("--user")
    search.add_argument("--resource")
    search.add_argument("--type", dest="event_type")
    search.add_argument("--since", type=_time, help="ISO time, inclusive (no zone: UTC)")
    search.add_argument("--until", type=_time, help="ISO time, exclusive (no zone: UTC)")
    search.add_argument("--format", choices=("ndjson", "table"), default="ndjson")
    search.add_argument("--limit", type=_positive, default=1_000)
    search.add_argument("--dsn", help=dsn_help)
    search.add_argument("--dir", help="the audit directory when searching files (default: {var_dir}/audit)")
    search.set_defaults(func=_search)

    retention = audit.add_parser("retention", help="delete the day files and drop the PostgreSQL month "
                                                   "partitions older than the period")
    retention.add_argument("--keep-days", type=_positive, default=3653, help="default: ten years")
    retention.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    retention.add_argument("--dir", help="the audit directory (default: {var_dir}/audit)")
    retention.add_argument("--dsn", help=dsn_help + "; without one, only the files")
    retention.set_defaults(func=_retention)

    erase = audit.add_parser("erase", help="pseudonymise a person's identifiers (keyed hash) in the day files "
                                           "and PostgreSQL; the chains still verify")
    erase.add_argument("--user", required=True, help="the user id to erase")
    erase.add_argument("--key-file", default=os.environ.get("ROUNDS_AUDIT_ERASE_KEY_FILE"),
                       help="the secret key of the pseudonyms, at least 16 bytes "
                            "(default: $ROUNDS_AUDIT_ERASE_KEY_FILE)")
    erase.add_argument("--dry-run", action="store_true", help="count what would change, change nothing")
    erase.add_argument("--dir", help="the audit directory (default: {var_dir}/audit)")
    erase.add_argument("--dsn", help=dsn_help + " (a role that may UPDATE); without one, only the files")
    erase.set_defaults(func=_erase)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return value


def _time(text: str) -> datetime:
    from rounds.audit.rows import parse_time

    try:
        return parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO time: {text!r}") from None


def _dsn(args: argparse.Namespace) -> str | None:
    dsn: str | None = args.dsn or args.settings.postgres_dsn
    return dsn


def _with_db(args: argparse.Namespace, name: str, work: Callable[[Any], Awaitable[int]]) -> int:
    """Run `work(connection)` on the DSN; an unreachable or failing database
    is a message and exit code 2, not a traceback."""
    import asyncio

    import asyncpg

    from rounds.audit.pg import connect

    dsn = _dsn(args)
    if not dsn:
        print(f"rounds audit {name}: no PostgreSQL DSN (--dsn or postgres_dsn)", file=sys.stderr)
        return 2

    async def run() -> int:
        conn = await connect(dsn)
        try:
            return await work(conn)
        finally:
            await conn.close()

    try:
        return asyncio.run(run())
    except (TimeoutError, OSError, asyncpg.PostgresError, RuntimeError) as exc:
        print(f"rounds audit {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def _migrate(args: argparse.Namespace) -> int:
    from rounds.audit.pg import MIGRATIONS, migrate

    async def work(conn: Any) -> int:
        applied = await migrate(conn)
        names = dict((v, n) for v, n, _ in MIGRATIONS)
        for version in applied:
            print(f"applied {version}: {names[version]}")
        print(f"schema at version {MIGRATIONS[-1][0]}" + ("" if applied else ", nothing to do"))
        return 0

    return _with_db(args, "migrate", work)


def _load(args: argparse.Namespace) -> int:
    from rounds.audit.pg import load_dir, migrate

    directory = audit_dir(args.settings, args.dir)
    if args.follow:
        return _follow(args, directory)

    async def work(conn: Any) -> int:
        await migrate(conn)
        report = await load_dir(conn, directory, args.batch,
                                progress=lambda line: print(line, file=sys.stderr, flush=True))
        print(f"{directory}: {report.summary()}")
        for bad in report.corrupt:
            print(f"  corrupt: {bad}")
        return 1 if report.corrupt else 0

    return _with_db(args, "load", work)


def _follow(args: argparse.Namespace, directory: Path) -> int:
    import asyncio
    import logging

    from rounds.audit.tail import follow

    dsn = _dsn(args)
    if not dsn:
        print("rounds audit load: no PostgreSQL DSN (--dsn or postgres_dsn)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        asyncio.run(follow(dsn, directory, args.interval_s))
    except KeyboardInterrupt:
        pass
    return 0


def _search(args: argparse.Namespace) -> int:
    from rounds.audit.pg import AuditQuery, search_db, search_files

    query = AuditQuery(user_id=args.user, resource_id=args.resource, event_type=args.event_type,
                       since=args.since, until=args.until, limit=args.limit)
    if _dsn(args):
        found: list[Any] = []

        async def work(conn: Any) -> int:
            found.extend(await search_db(conn, query))
            return 0

        code = _with_db(args, "search", work)
        if code:
            return code
    else:
        found = search_files(audit_dir(args.settings, args.dir), query,
                             corrupt=lambda bad: print(f"corrupt line skipped: {bad}", file=sys.stderr))
    if args.format == "ndjson":
        for row in found:
            print(row.to_json())
    else:
        print_table(found)
    return 0


def print_table(rows: list[Any]) -> None:
    print(f"{'time':<28}{'type':<22}{'user':<16}{'resource':<28}{'outcome':<9}source")
    for r in rows:
        print(f"{r.time.isoformat(timespec='microseconds'):<28}{r.event_type:<22}{r.user_id or '-':<16}"
              f"{r.resource_id or '-':<28}{r.outcome:<9}{r.source}")
    print(f"({len(rows)} events)")


def _retention(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from rounds.audit.pg import day_files_before, delete_day_files_before, drop_partitions_before, partitions_before

    cutoff = datetime.now(UTC) - timedelta(days=args.keep_days)
    directory = audit_dir(args.settings, args.dir)
    verb = "would delete" if args.dry_run else "deleted"
    files = day_files_before(directory, cutoff) if args.dry_run else delete_day_files_before(directory, cutoff)
    for path in files:
        print(f"{verb} {path}")
    print(f"kept every day file from {cutoff:%Y-%m-%d} on ({len(files)} files {verb})")
    if not _dsn(args):
        return 0

    async def work(conn: Any) -> int:
        if args.dry_run:
            dropped = await partitions_before(conn, cutoff)
        else:
            dropped = await drop_partitions_before(conn, cutoff)
        verb = "would drop" if args.dry_run else "dropped"
        for name in dropped:
            print(f"{verb} {name}")
        print(f"kept every month from {cutoff:%Y-%m} on ({len(dropped)} partitions {verb})")
        return 0

    return _with_db(args, "retention", work)


def _erase(args: argparse.Namespace) -> int:
    """Exit 0 when every trace is erased, 3 when some is left (a file in use,
    lines written before identifiers were salted), 2 usage or database."""
    from rounds.audit.erase import MIN_KEY_BYTES, Erasure, erase_db, erase_files, pseudonym
    from rounds.audit.events import AuditEvent
    from rounds.audit.files import FileAuditSink

    if not args.key_file:
        print("rounds audit erase: no key (--key-file or ROUNDS_AUDIT_ERASE_KEY_FILE); make one with "
              "`head -c 32 /dev/urandom > KEYFILE` and keep it secret and safe", file=sys.stderr)
        return 2
    try:
        key = Path(args.key_file).read_bytes().rstrip(b"\n")
    except OSError as exc:
        print(f"rounds audit erase: the key file: {exc}", file=sys.stderr)
        return 2
    if len(key) < MIN_KEY_BYTES:
        print(f"rounds audit erase: the key must hold at least {MIN_KEY_BYTES} bytes", file=sys.stderr)
        return 2
    directory = audit_dir(args.settings, args.dir)
    erasure = Erasure(pseudonym(key, "user", args.user))
    verb = "would rewrite" if args.dry_run else "rewrote"
    print(f"user {args.user} -> {erasure.user_pseudonym}")
    if directory.is_dir():
        erase_files(directory, args.user, key, erasure, args.dry_run)
    for found in erasure.files:
        if found.in_use:
            print(f"  {found.path}: in use by a running gateway, not rewritten (run again once the day is closed)")
        elif found.lines or found.unsalted:
            unsalted = f", {found.unsalted} lines written before salting left as they are" if found.unsalted else ""
            print(f"  {found.path}: {verb} {found.lines} lines{unsalted}")
    print(f"files: {erasure.lines} lines in {sum(1 for f in erasure.files if f.lines)} files")
    if _dsn(args):
        async def work(conn: Any) -> int:
            await erase_db(conn, args.user, key, erasure, args.dry_run)
            print(f"postgresql: {erasure.rows} rows" + (" would be" if args.dry_run else "") + " updated"
                  + (f", {erasure.unsalted_rows} written before salting left" if erasure.unsalted_rows else ""))
            return 0

        if _with_db(args, "erase", work):
            return 2
    else:
        print("postgresql: no DSN, files only")
    if not args.dry_run:
        sink = FileAuditSink(directory, fsync="always", housekeeping=False)
        sink.emit(AuditEvent("AUDIT_ERASED", "audit-cli", user_id=erasure.user_pseudonym, details={
            "lines": erasure.lines, "rows": erasure.rows, "filesInUse": len(erasure.in_use),
            "unsalted": erasure.unsalted}))
        sink.close()
    if erasure.complete:
        print("complete")
        return 0
    print("INCOMPLETE: " + "; ".join(
        part for part in (f"{len(erasure.in_use)} files in use" if erasure.in_use else "",
                          f"{erasure.unsalted} events written before salting" if erasure.unsalted else "") if part))
    return 3
