"""`rounds audit erase` on the day files: pseudonyms in, chains still intact.

PostgreSQL's side is in tests/integration/test_audit_erase.py.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import pytest

from rounds.audit.chain import canonical, chain_hash
from rounds.audit.erase import Erasure, erase_file, erase_files, erase_record, pseudonym
from rounds.audit.events import AuditEvent
from rounds.audit.files import FileAuditSink, compress_closed_days
from rounds.audit.verify import verify_day, verify_file

DAY = "2026-11-26"
KEY = b"k" * 32
ALICE, BOB = "alice@ward-7", "bob"


def clock_at(iso: str):
    return lambda: datetime.fromisoformat(iso).timestamp()


def write_day(directory: Path, day: str = DAY) -> Path:
    """A day of two writers: Alice's and Bob's events, a lock Bob was denied because Alice held it."""
    at = datetime.fromisoformat(f"{day}T10:00:00+00:00")  # the events' own time too, never today's
    sinks = [FileAuditSink(directory, fsync="never", clock=at.timestamp, housekeeping=False) for _ in range(2)]
    a, b = sinks
    a.emit(AuditEvent("USER_CONNECTED", "frontdoor-0", user_id=ALICE, session_id="s-alice",
                      details={"role": "editor", "remote": "10.1.2.3:5000"}, time=at))
    b.emit(AuditEvent("USER_CONNECTED", "frontdoor-0", user_id=BOB, session_id="s-bob",
                      details={"role": "editor", "remote": "10.9.9.9:6000"}, time=at))
    a.emit(AuditEvent("LOCK_ACQUIRED", "shard-0", user_id=ALICE, resource_id="doc:1", details={"lockId": "l1"},
                      time=at))
    b.emit(AuditEvent("LOCK_DENIED", "shard-0", "denied", user_id=BOB, resource_id="doc:1",
                      details={"lockedBy": ALICE, "reason": "already_locked"}, time=at))
    a.emit(AuditEvent("USER_DISCONNECTED", "frontdoor-0", user_id=ALICE, session_id="s-alice", time=at))
    for sink in sinks:
        sink.close()
    return directory / f"audit-{day}.ndjson"


def records(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f]


def test_erasing_a_user_pseudonymises_their_identifiers_and_every_chain_still_verifies(tmp_path):
    path = write_day(tmp_path)
    before = records(path)
    result = erase_file(path, ALICE, KEY)
    assert (result.lines, result.unsalted, result.in_use) == (4, 0, False)
    after = records(path)
    assert ALICE.encode() not in path.read_bytes()
    assert b"s-alice" not in path.read_bytes() and b"10.1.2.3" not in path.read_bytes()
    anon = pseudonym(KEY, "user", ALICE)
    assert [r["userId"] for r in after] == [anon, BOB, anon, BOB, anon]
    assert after[3]["details"]["lockedBy"] == anon  # the same person, the same pseudonym, in any field
    assert after[0]["sessionId"] == pseudonym(KEY, "session", "s-alice") == after[4]["sessionId"]
    assert after[0]["details"]["remote"] == pseudonym(KEY, "address", "10.1.2.3:5000")
    assert set(after[0]["erased"]) == {"userId", "sessionId", "details.remote"} and "salt" not in after[0]
    assert set(after[3]["erased"]) == {"details.lockedBy"} and set(after[3]["salt"]) == {"userId"}
    assert after[1] == before[1]  # Bob's own connection: untouched
    assert [r["hash"] for r in after] == [r["hash"] for r in before]
    report = verify_file(path)
    assert report.intact and sum(w.events for w in report.writers.values()) == 5


def test_a_changed_pseudonymised_line_still_breaks_its_chain(tmp_path):
    path = write_day(tmp_path)
    erase_file(path, ALICE, KEY)
    rows = records(path)
    rows[2]["resourceId"] = "doc:2"  # a field outside the erasure
    rows[4]["erased"]["userId"] = "sha256:" + "0" * 64  # a commitment swapped
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    broken = sorted((w.broken.line, w.broken.problem) for w in verify_file(path).writers.values() if w.broken)
    assert [line for line, _ in broken] == [3, 5]  # two writers, each broken at its changed line
    assert all("hash does not match" in problem for _, problem in broken)


def test_erase_is_idempotent_and_a_dry_run_changes_nothing(tmp_path):
    path = write_day(tmp_path)
    content = path.read_bytes()
    dry = erase_file(path, ALICE, KEY, dry_run=True)
    assert dry.lines == 4 and path.read_bytes() == content
    erase_file(path, ALICE, KEY)
    erased = path.read_bytes()
    again = erase_file(path, ALICE, KEY)
    assert again.lines == 0 and path.read_bytes() == erased


def test_gzipped_days_are_erased_and_verify_with_the_day_before(tmp_path):
    write_day(tmp_path, "2026-11-25")
    write_day(tmp_path, DAY)
    compress_closed_days(tmp_path, clock_at("2026-11-28T00:00:00+00:00")())
    erasure = Erasure(pseudonym(KEY, "user", ALICE))
    erase_files(tmp_path, ALICE, KEY, erasure)
    assert erasure.lines == 8 and erasure.complete
    for day in ("2026-11-25", DAY):
        gz = tmp_path / f"audit-{day}.ndjson.gz"
        assert ALICE.encode() not in gzip.decompress(gz.read_bytes())
        assert verify_day(tmp_path, day).intact


def test_a_file_a_gateway_holds_open_is_left_for_a_later_run(tmp_path):
    path = write_day(tmp_path)
    live = FileAuditSink(tmp_path, fsync="never", clock=clock_at(f"{DAY}T11:00:00+00:00"), housekeeping=False)
    live.emit(AuditEvent("LOCK_RELEASED", "shard-0", user_id=ALICE))  # holds today's file
    content = path.read_bytes()
    erasure = Erasure("")
    erase_files(tmp_path, ALICE, KEY, erasure)
    assert erasure.in_use == [path] and not erasure.complete and path.read_bytes() == content
    live.close()
    erasure = Erasure("")
    erase_files(tmp_path, ALICE, KEY, erasure)
    assert erasure.lines == 5 and erasure.complete and verify_file(path).intact


def test_a_writer_waiting_while_its_file_was_rewritten_appends_to_the_new_file(tmp_path):
    """The rewrite holds the file exclusively; a writer opening it meanwhile
    waits, then finds a new file under the name and writes there, not into
    the replaced one."""
    path = write_day(tmp_path)
    with open(path, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        sink = FileAuditSink(tmp_path, fsync="never", clock=clock_at(f"{DAY}T12:00:00+00:00"), housekeeping=False)
        writer = threading.Thread(target=sink.emit, args=(AuditEvent("LOCK_ACQUIRED", "shard-1", user_id=BOB),))
        writer.start()
        writer.join(0.3)
        assert writer.is_alive()  # waiting for the lock
        replacement = path.with_name("replacement")
        replacement.write_bytes(path.read_bytes())
        os.replace(replacement, path)
    writer.join(5)
    sink.close()
    assert [r["eventType"] for r in records(path)][-1] == "LOCK_ACQUIRED"
    assert verify_file(path).intact


def test_lines_written_before_salting_are_counted_and_left(tmp_path):
    legacy = {"eventId": "e1", "time": f"{DAY}T10:00:00.000000Z", "eventType": "LOCK_ACQUIRED", "userId": ALICE,
              "sessionId": None, "resourceId": "doc:1", "source": "shard-0", "outcome": "ok", "details": {},
              "writer": "shard-0#old", "seq": 1, "prevHash": None}
    digest = chain_hash(None, canonical(legacy))
    path = tmp_path / f"audit-{DAY}.ndjson"
    path.write_text(json.dumps({**legacy, "hash": digest}) + "\n")
    result = erase_file(path, ALICE, KEY)
    assert (result.lines, result.unsalted) == (0, 1)
    assert verify_file(path).intact and ALICE in path.read_text()


def test_erase_record_leaves_a_record_that_does_not_name_the_user():
    record = {"userId": BOB, "details": {"lockedBy": "carol"}, "salt": {"userId": "ab" * 16}}
    assert erase_record(record, ALICE, KEY) is None


# -- the command ----------------------------------------------------------------


def run_erase(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rounds.cluster.cli", "audit", "erase", *args],
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "erase.key"
    path.write_bytes(os.urandom(32))
    return path


def test_rounds_audit_erase_reports_the_pseudonym_and_what_it_rewrote(tmp_path, key_file):
    directory = tmp_path / "audit"
    directory.mkdir()
    path = write_day(directory)
    done = run_erase("--user", ALICE, "--key-file", str(key_file), "--dir", str(directory))
    assert done.returncode == 0, done.stdout + done.stderr
    anon = pseudonym(key_file.read_bytes(), "user", ALICE)
    assert f"user {ALICE} -> {anon}" in done.stdout
    assert "rewrote 4 lines" in done.stdout and "complete" in done.stdout
    assert ALICE not in path.read_text()
    today = [r for p in directory.glob("audit-*.ndjson") for r in records(p) if r["eventType"] == "AUDIT_ERASED"]
    assert [(r["userId"], r["details"]["lines"]) for r in today] == [(anon, 4)]  # the erasure is on the record
    assert all(verify_file(p).intact for p in directory.glob("audit-*.ndjson"))


def test_rounds_audit_erase_without_a_usable_key_is_a_usage_error(tmp_path):
    short = tmp_path / "short.key"
    short.write_bytes(b"too short")
    for args in ((), ("--key-file", str(short)), ("--key-file", str(tmp_path / "missing"))):
        done = run_erase("--user", ALICE, "--dir", str(tmp_path), *args)
        assert done.returncode == 2 and "key" in done.stderr + done.stdout


def test_rounds_audit_erase_exits_3_while_a_file_is_in_use(tmp_path, key_file):
    write_day(tmp_path)
    live = FileAuditSink(tmp_path, fsync="never", clock=clock_at(f"{DAY}T11:00:00+00:00"), housekeeping=False)
    live.emit(AuditEvent("LOCK_RELEASED", "shard-0", user_id=ALICE))
    try:
        done = run_erase("--user", ALICE, "--key-file", str(key_file), "--dir", str(tmp_path))
    finally:
        live.close()
    assert done.returncode == 3, done.stdout + done.stderr
    assert "in use" in done.stdout and "INCOMPLETE" in done.stdout
