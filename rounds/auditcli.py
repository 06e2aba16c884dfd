"""`rounds audit ...`: the audit trail's commands.

`verify` checks the hash chains of a day's NDJSON file (rounds.audit). The
PostgreSQL commands (migrate, load, search) join here, each a subparser
added in `add_audit_parser` with its own `_name(args) -> int` function.
Exit codes: 0 all well, 1 the trail is not intact, 2 usage.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, date, datetime
from pathlib import Path

from rounds.audit import VerifyReport, verify_day, verify_file
from rounds.config import Settings


def add_audit_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    audit = sub.add_parser("audit", help="the audit trail: verify its files").add_subparsers(
        dest="audit_command", required=True)
    verify = audit.add_parser("verify", help="check a day's file: every writer's hash chain, the first break")
    which = verify.add_mutually_exclusive_group()
    which.add_argument("--file", help="an audit-YYYY-MM-DD.ndjson[.gz] file")
    which.add_argument("--day", type=_day, help="a UTC day, YYYY-MM-DD (default: today)")
    verify.add_argument("--dir", help="the audit directory (default: {var_dir}/audit)")
    verify.set_defaults(func=_verify)


def audit_dir(settings: Settings, given: str | None) -> Path:
    return Path(given) if given else Path(settings.var_dir) / "audit"


def _day(text: str) -> str:
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a day YYYY-MM-DD: {text!r}") from None


def _verify(args: argparse.Namespace) -> int:
    try:
        if args.file:
            report = verify_file(Path(args.file))
        else:
            day = args.day or datetime.now(UTC).date().isoformat()
            report = verify_day(audit_dir(args.settings, args.dir), day)
    except (OSError, EOFError) as exc:  # a missing file, a truncated gzip
        print(f"rounds audit verify: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    return 0 if report.intact else 1


def print_report(report: VerifyReport) -> None:
    events = sum(w.events for w in report.writers.values())
    print(f"{report.path}: {len(report.writers)} writers, {events} events checked")
    for bad in report.corrupt:
        print(f"  {bad}")
    for chain in sorted(report.writers.values(), key=lambda c: c.writer):
        if chain.broken is not None:
            print(f"  {chain.writer}: BREAK at line {chain.broken.line}, seq {chain.broken.seq}: "
                  f"{chain.broken.problem}")
            continue
        anchor = "" if chain.linked else " (continues a chain from a file not checked)"
        print(f"  {chain.writer}: OK, seq {chain.first_seq}-{chain.last_seq}{anchor}")
    print("intact" if report.intact else "NOT INTACT")
