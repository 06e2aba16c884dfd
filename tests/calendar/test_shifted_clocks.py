"""The suite does not depend on today's date: it passes with the wall clock
moved to a month end, a year end and a leap day.

Each case runs pytest again in a subprocess under Debian's `faketime`,
started 15 s before midnight so that the day, the month or the year turns
while the tests run (an audit day file, a month partition, a retention
cutoff or a document's history crossing it). The date-sensitive tests
(audit days, partitions, retention, shipping, erase, document history) run
at all three; everything that runs without Ray runs at the leap day too.
Ray cannot start under libfaketime, so tests that need it are left out
(`-m "not ray"`); PostgreSQL and Redis keep their own clocks, which is why
the tests that compare with them ask them for their time.

The dates are in the past, so they never come within a year of the
database's clock, past which the audit schema refuses a month partition.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

DATE_SENSITIVE = [
    "tests/unit/test_audit.py",
    "tests/unit/test_audit_erase.py",
    "tests/integration/test_audit_erase.py",
    "tests/integration/test_audit_pg.py",
    "tests/integration/test_audit_positions.py",
    "tests/integration/test_audit_shipping.py",
    "tests/integration/test_doc_history.py",
]
EVERYTHING_WITHOUT_RAY = ["tests"]

CASES = [
    pytest.param("2026-04-30 23:59:45", DATE_SENSITIVE, id="month-end"),
    pytest.param("2025-12-31 23:59:45", DATE_SENSITIVE, id="year-end"),
    pytest.param("2024-02-29 23:59:45", EVERYTHING_WITHOUT_RAY, id="leap-day"),
]


@pytest.mark.timeout(900)  # a whole suite runs inside
@pytest.mark.skipif(shutil.which("faketime") is None, reason="Debian's faketime is not installed "
                    "(`make test` installs it: scripts/ensure-system-deps.sh)")
@pytest.mark.parametrize(("moment", "paths"), CASES)
def test_the_suite_passes_with_the_clock_moved_to(moment: str, paths: list[str]) -> None:
    env = {
        # not measured again: the outer run's coverage already covers these paths, and slows them
        **{k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")},
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # timeouts and intervals stay real (see sitecustomize.py)
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests" / "calendar"), os.environ.get("PYTHONPATH")])),
        # the inner session flushes its Redis database: not the one this session uses
        "ROUNDS_TEST_REDIS_URL": os.environ.get("ROUNDS_TEST_CALENDAR_REDIS_URL", "redis://127.0.0.1:6379/14"),
    }
    command = ["faketime", moment, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "-m", "not ray", "--ignore", "tests/calendar", *paths]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    summary = done.stdout.strip().splitlines()[-1:] or ["(no output)"]
    assert done.returncode == 0, (f"under a clock at {moment}: {summary[0]}\n"
                                  f"{done.stdout[-6000:]}\n{done.stderr[-2000:]}")
    assert " passed" in summary[0] and "failed" not in summary[0], summary[0]
