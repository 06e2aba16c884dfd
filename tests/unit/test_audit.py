"""The audit files: hash chains per writer, day files, gzip, fsync policies, `rounds audit verify`."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from rounds.audit.chain import chain_hash, sealed_body
from rounds.audit.events import AuditEvent
from rounds.audit.files import GZIP_GRACE_S, FileAuditSink
from rounds.audit.verify import verify_day, verify_file

DAY = "2026-11-26"


class FakeClock:
    def __init__(self, iso: str) -> None:
        self.now = datetime.fromisoformat(iso).timestamp()

    def __call__(self) -> float:
        return self.now

    def set(self, iso: str) -> None:
        self.now = datetime.fromisoformat(iso).timestamp()


def make_sink(directory: Path, clock: FakeClock, fsync: str = "never") -> FileAuditSink:
    return FileAuditSink(directory, fsync=fsync, clock=clock, housekeeping=False)


def event(n: int, source: str = "shard-0") -> AuditEvent:
    return AuditEvent("LOCK_ACQUIRED", source, user_id=f"usr_{n}", resource_id="doc:1", details={"n": n})


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def write_lines(path: Path, rows: list[str]) -> None:
    path.write_text("".join(row + "\n" for row in rows))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(f"{DAY}T10:00:00+00:00")


@pytest.fixture
def day_file(tmp_path: Path, clock: FakeClock) -> Path:
    """Six events of two writers (two processes with the same source), interleaved."""
    a, b = make_sink(tmp_path, clock), make_sink(tmp_path, clock)
    for n in range(3):
        a.emit(event(n))
        b.emit(event(n))
    a.close()
    b.close()
    return tmp_path / f"audit-{DAY}.ndjson"


def test_each_line_carries_the_schema_and_is_chained_to_its_writers_previous_line(tmp_path, clock):
    sink = make_sink(tmp_path, clock)
    for n in range(3):
        sink.emit(event(n))
    sink.close()
    records = [json.loads(row) for row in lines(tmp_path / f"audit-{DAY}.ndjson")]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["prevHash"] is None
    assert [r["prevHash"] for r in records[1:]] == [r["hash"] for r in records[:-1]]
    assert {r["writer"] for r in records} == {records[0]["writer"]}
    assert records[0]["writer"].startswith("shard-0#")
    assert set(records[0]) == {"eventId", "time", "eventType", "userId", "sessionId", "resourceId", "source",
                               "outcome", "details", "writer", "seq", "prevHash", "salt", "hash"}
    assert set(records[0]["salt"]) == {"userId"}  # one salt per personal field present (no session here)
    assert all(len(salt) == 32 for salt in records[0]["salt"].values())
    assert records[0]["salt"]["userId"] != records[1]["salt"]["userId"]
    assert len(records[0]["time"]) == len("2026-11-26T10:00:00.000000Z") and records[0]["time"].endswith("Z")


def test_a_third_party_can_check_a_hash_with_hashlib_and_json_alone(tmp_path, clock):
    """The rule of docs/audit.md, written out here without our helpers: drop
    `hash`, `salt` and `erased`, put the salted commitment in place of each
    personal field, serialise canonically, sha256 after the previous hash."""
    sink = make_sink(tmp_path, clock)
    sink.emit(AuditEvent("LOCK_DENIED", "shard-1", "denied", user_id="Zoë 🩺", session_id="s1",
                         details={"lockedBy": "usr_2", "size": 12}))
    sink.emit(AuditEvent("DOC_UPDATED", "shard-1", details={"size": 3}))  # no personal field: no salt
    sink.close()
    first, second = (json.loads(row) for row in lines(tmp_path / f"audit-{DAY}.ndjson"))

    def expected(record: dict, prev: str | None) -> str:
        body = {k: v for k, v in record.items() if k not in ("hash", "salt", "erased")}
        body["details"] = dict(body["details"])
        for name, salt in record.get("salt", {}).items():
            where, key = (body["details"], name[8:]) if name.startswith("details.") else (body, name)
            where[key] = "sha256:" + hashlib.sha256(f"{salt}:{where[key]}".encode()).hexdigest()
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256((prev or "").encode() + text.encode()).hexdigest()

    assert set(first["salt"]) == {"userId", "sessionId", "details.lockedBy"}
    assert expected(first, None) == first["hash"]
    assert "salt" not in second
    assert expected(second, first["hash"]) == second["hash"]
    raw = lines(tmp_path / f"audit-{DAY}.ndjson")[1].encode()
    body = raw[: -len(b',"hash":"' + second["hash"].encode() + b'"}')] + b"}"
    assert chain_hash(first["hash"], body) == second["hash"]  # no personal field: the raw bytes are the body


def test_two_writers_interleaved_in_one_file_verify_ok(day_file):
    report = verify_file(day_file)
    assert report.intact
    assert len(report.writers) == 2
    assert all((w.first_seq, w.last_seq, w.linked) == (1, 3, True) for w in report.writers.values())


def test_a_modified_field_is_reported_at_its_line(day_file):
    rows = lines(day_file)
    rows[2] = rows[2].replace('"usr_1"', '"usr_9"')
    write_lines(day_file, rows)
    report = verify_file(day_file)
    assert not report.intact
    (broken,) = [w.broken for w in report.writers.values() if w.broken]
    assert (broken.line, broken.seq) == (3, 2)
    assert "hash" in broken.problem


def test_a_deleted_line_is_reported_at_the_writers_next_line(day_file):
    rows = lines(day_file)
    del rows[2]  # writer A's seq 2; its seq 3 is now line 4
    write_lines(day_file, rows)
    (broken,) = [w.broken for w in verify_file(day_file).writers.values() if w.broken]
    assert (broken.line, broken.seq) == (4, 3)
    assert "seq 3 where 2 was expected" in broken.problem


def test_reordered_lines_are_reported_at_the_first_line_out_of_place(day_file):
    rows = lines(day_file)
    rows[2], rows[4] = rows[4], rows[2]  # writer A: seq 1, 3, 2
    write_lines(day_file, rows)
    report = verify_file(day_file)
    (broken,) = [w.broken for w in report.writers.values() if w.broken]
    assert (broken.line, broken.seq) == (3, 3)
    assert sum(1 for w in report.writers.values() if w.broken is None) == 1


def test_a_line_whose_hash_was_recomputed_still_breaks_the_link_to_the_next(day_file):
    rows = lines(day_file)
    record = json.loads(rows[2])
    record["userId"] = "usr_9"
    body = {k: v for k, v in record.items() if k != "hash"}
    record["hash"] = chain_hash(record["prevHash"], sealed_body(body))
    rows[2] = json.dumps(record)
    write_lines(day_file, rows)
    (broken,) = [w.broken for w in verify_file(day_file).writers.values() if w.broken]
    assert (broken.line, broken.seq) == (5, 3)
    assert "prevHash" in broken.problem


def test_a_corrupt_line_is_reported_with_file_and_line_and_skipped(day_file):
    rows = lines(day_file)
    rows.insert(1, '{"eventId": "torn')
    write_lines(day_file, rows)
    report = verify_file(day_file)
    (bad,) = report.corrupt
    assert (bad.path, bad.line) == (str(day_file), 2)
    assert bad.problem.startswith("not JSON") and str(bad).startswith(f"{day_file}:2: not JSON")
    assert all(w.broken is None and w.last_seq == 3 for w in report.writers.values())
    assert not report.intact


def test_the_file_switches_at_utc_midnight_and_the_chain_continues_across_it(tmp_path):
    clock = FakeClock(f"{DAY}T23:59:59.900000+00:00")
    sink = make_sink(tmp_path, clock)
    sink.emit(event(1))
    sink.emit(event(2))
    clock.set("2026-11-27T00:00:00.000001+00:00")
    sink.emit(event(3))
    sink.close()
    first, second = tmp_path / f"audit-{DAY}.ndjson", tmp_path / "audit-2026-11-27.ndjson"
    assert [json.loads(r)["seq"] for r in lines(first)] == [1, 2]
    assert [json.loads(r)["seq"] for r in lines(second)] == [3]
    linked = verify_day(tmp_path, "2026-11-27")
    assert linked.intact and all(w.linked for w in linked.writers.values())
    alone = verify_file(second)
    assert alone.intact and not any(w.linked for w in alone.writers.values())
    write_lines(first, lines(first)[:1])  # the previous day's last line deleted
    (broken,) = [w.broken for w in verify_day(tmp_path, "2026-11-27").writers.values() if w.broken]
    assert (broken.path, broken.line, broken.seq) == (str(second), 1, 3)


def test_closed_days_are_gzipped_after_the_grace_and_today_never(tmp_path):
    clock = FakeClock(f"{DAY}T23:59:59+00:00")
    sink = make_sink(tmp_path, clock)
    sink.emit(event(1))
    clock.set("2026-11-27T00:00:01+00:00")
    sink.emit(event(2))
    plain = tmp_path / f"audit-{DAY}.ndjson"
    content = plain.read_bytes()
    assert sink.compress_closed_days() == []  # within the grace: late writers may still append
    clock.now += GZIP_GRACE_S
    assert sink.compress_closed_days() == [tmp_path / f"audit-{DAY}.ndjson.gz"]
    assert not plain.exists()
    assert gzip.decompress((tmp_path / f"audit-{DAY}.ndjson.gz").read_bytes()) == content
    assert (tmp_path / "audit-2026-11-27.ndjson").exists()
    assert not list(tmp_path.glob(".*tmp"))
    sink.emit(event(3))
    sink.close()
    report = verify_day(tmp_path, "2026-11-27")
    assert report.intact and all(w.linked and w.last_seq == 3 for w in report.writers.values())
    assert verify_day(tmp_path, DAY).path.endswith(".gz")


@pytest.mark.parametrize("policy", ["interval", "always", "never"])
def test_every_fsync_policy_writes_every_line(tmp_path, clock, policy):
    sink = make_sink(tmp_path, clock, fsync=policy)
    for n in range(20):
        sink.emit(event(n))
    sink.sync()
    sink.emit(event(20))
    sink.close()
    report = verify_file(tmp_path / f"audit-{DAY}.ndjson")
    assert report.intact and [w.last_seq for w in report.writers.values()] == [21]


def test_the_interval_policy_syncs_from_the_housekeeping_thread(tmp_path):
    sink = FileAuditSink(tmp_path, fsync="interval")
    sink.emit(event(1))
    assert sink._dirty
    deadline = time.monotonic() + 5
    while sink._dirty and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sink._dirty
    sink.close()


def test_an_unknown_fsync_policy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="audit_fsync"):
        FileAuditSink(tmp_path, fsync="sometimes")


def run_verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rounds.cluster.cli", "audit", "verify", *args],
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})


def test_rounds_audit_verify_exits_0_when_intact_1_on_a_break_and_2_on_misuse(day_file, tmp_path):
    ok = run_verify("--day", DAY, "--dir", str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    assert "intact" in ok.stdout and ok.stdout.count(": OK, seq 1-3") == 2
    rows = lines(day_file)
    rows[3] = rows[3].replace('"usr_1"', '"usr_2"')
    rows.insert(0, "not json")
    write_lines(day_file, rows)
    broken = run_verify("--file", str(day_file))
    assert broken.returncode == 1
    assert f"{day_file}:1: corrupt line skipped" in broken.stdout
    assert "BREAK at line 5, seq 2" in broken.stdout
    assert run_verify("--day", "26/11/2026").returncode == 2
    assert run_verify("--day", "2020-01-01", "--dir", str(tmp_path)).returncode == 2


def test_a_forked_child_is_a_new_writer_with_its_own_chain(tmp_path, clock):
    sink = make_sink(tmp_path, clock)
    sink.emit(event(1))
    pid = os.fork()
    if pid == 0:  # the child: two events of its own, then leave without pytest's teardown
        sink.emit(event(2))
        sink.emit(event(3))
        sink.close()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    sink.emit(event(4))
    sink.close()
    report = verify_file(tmp_path / f"audit-{DAY}.ndjson")
    assert report.intact
    assert sorted(w.last_seq for w in report.writers.values()) == [2, 2]


@pytest.mark.parametrize("policy", ["interval", "always"])  # "always" syncs each line itself, not in housekeeping
def test_the_housekeeping_thread_gzips_a_closed_day_by_itself(tmp_path, policy):
    clock = FakeClock(f"{DAY}T23:59:59+00:00")
    sink = FileAuditSink(tmp_path, fsync=policy, clock=clock)
    sink.emit(event(1))
    clock.set("2026-11-27T01:00:00+00:00")
    sink.emit(event(2))
    gz = tmp_path / f"audit-{DAY}.ndjson.gz"
    deadline = time.monotonic() + 10
    while not gz.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    sink.close()
    assert gz.exists() and not (tmp_path / f"audit-{DAY}.ndjson").exists()
    assert verify_day(tmp_path, "2026-11-27").intact


def test_lines_appended_to_a_day_after_its_gzip_are_added_to_it_not_written_over_it(tmp_path):
    clock, late_clock = FakeClock(f"{DAY}T12:00:00+00:00"), FakeClock(f"{DAY}T12:00:00+00:00")
    early, late = make_sink(tmp_path, clock), make_sink(tmp_path, late_clock)
    early.emit(event(1))
    late.emit(event(1, "shard-1"))
    late.close()
    clock.set("2026-11-27T01:00:00+00:00")
    assert early.compress_closed_days() == [tmp_path / f"audit-{DAY}.ndjson.gz"]
    late.emit(event(2, "shard-1"))  # its clock still says the 26th: a plain file of that day again
    late.close()
    assert (tmp_path / f"audit-{DAY}.ndjson").exists()
    early.compress_closed_days()
    assert not (tmp_path / f"audit-{DAY}.ndjson").exists()
    report = verify_file(tmp_path / f"audit-{DAY}.ndjson.gz")
    assert report.intact and sorted(w.last_seq for w in report.writers.values()) == [1, 2]


def test_a_plain_file_left_beside_its_complete_gzip_is_removed_not_added_twice(tmp_path, clock):
    sink = make_sink(tmp_path, clock)
    sink.emit(event(1))
    sink.close()
    plain = tmp_path / f"audit-{DAY}.ndjson"
    content = plain.read_bytes()
    clock.set("2026-11-28T00:00:00+00:00")
    sink.compress_closed_days()
    plain.write_bytes(content)  # as if the process died between the rename and the unlink
    sink.compress_closed_days()
    assert not plain.exists()
    assert gzip.decompress((tmp_path / f"audit-{DAY}.ndjson.gz").read_bytes()) == content


def test_a_damaged_gzip_is_reported_after_the_lines_it_still_holds(tmp_path, clock):
    sink = make_sink(tmp_path, clock)
    for n in range(200):
        sink.emit(event(n))
    sink.close()
    clock.set("2026-11-28T00:00:00+00:00")
    (gz,) = sink.compress_closed_days()
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    report = verify_file(gz)
    bad = report.corrupt[-1]
    assert "gzip damaged" in bad.problem
    (chain,) = report.writers.values()
    assert chain.broken is None and 0 < chain.last_seq < 200 and bad.line > chain.last_seq
    assert not report.intact
    assert run_verify("--file", str(gz)).returncode == 1


# -- a service's loop: replies first, then the audit ---------------------------------


async def test_a_loops_audit_is_written_after_the_callbacks_already_queued_in_one_write(tmp_path, clock):
    import asyncio

    from rounds.audit.loop import LoopAuditSink

    sink = make_sink(tmp_path, clock)
    order: list[str] = []
    real_emit_many = sink.emit_many

    def emit_many(events):  # one write per pass, after the replies
        order.append(f"audit written ({len(events)} events)")
        real_emit_many(events)

    sink.emit_many = emit_many
    audit = LoopAuditSink(sink)
    loop = asyncio.get_running_loop()

    def handle_burst() -> None:
        for n in range(3):
            audit.emit(event(n))  # the audit first, as a lock denial's events come
            if n == 0:
                loop.call_soon(order.append, "replies flushed")  # the link schedules its flush like this

    loop.call_soon(handle_burst)
    for _ in range(4):
        await asyncio.sleep(0)
    assert order == ["replies flushed", "audit written (3 events)"]
    assert [json.loads(line)["seq"] for line in lines(tmp_path / f"audit-{DAY}.ndjson")] == [1, 2, 3]
    audit.emit(event(3))
    audit.flush()  # a service that stops writes what is queued at once
    assert len(lines(tmp_path / f"audit-{DAY}.ndjson")) == 4
    sink.close()


def test_outside_a_loop_and_with_fsync_always_the_audit_is_written_at_once(tmp_path, clock):
    from rounds.audit.loop import LoopAuditSink, loop_audit

    sink = make_sink(tmp_path, clock)
    LoopAuditSink(sink).emit(event(1))
    assert len(lines(tmp_path / f"audit-{DAY}.ndjson")) == 1
    always = make_sink(tmp_path, clock, fsync="always")
    assert loop_audit(always) is always
    assert isinstance(loop_audit(sink), LoopAuditSink)
    sink.close()
    always.close()


async def test_with_a_gather_window_the_events_of_many_passes_share_one_write(tmp_path, clock):
    import asyncio

    from rounds.audit.loop import LoopAuditSink

    sink = make_sink(tmp_path, clock)
    writes: list[int] = []
    real_emit_many = sink.emit_many
    sink.emit_many = lambda events: (writes.append(len(events)), real_emit_many(events))
    audit = LoopAuditSink(sink, gather_s=0.05)
    for n in range(3):  # three loop passes
        audit.emit(event(n))
        await asyncio.sleep(0)
    assert writes == []  # still gathering
    await asyncio.sleep(0.1)
    assert writes == [3]
    assert [json.loads(line)["seq"] for line in lines(tmp_path / f"audit-{DAY}.ndjson")] == [1, 2, 3]
    sink.close()


async def test_a_large_gather_is_written_a_slice_per_loop_pass_so_requests_wait_for_one_slice(tmp_path, clock):
    import asyncio

    from rounds.audit.loop import LoopAuditSink

    sink = make_sink(tmp_path, clock)
    order: list[str] = []
    real_emit_many = sink.emit_many
    loop = asyncio.get_running_loop()

    def emit_many(events):
        if not order:  # a request comes in while the first slice is written
            loop.call_soon(order.append, "request served")
        order.append(f"write {len(events)}")
        real_emit_many(events)

    sink.emit_many = emit_many
    audit = LoopAuditSink(sink, gather_s=0.01, slice_events=8)
    for n in range(20):
        audit.emit(event(n))
    await asyncio.sleep(0.05)
    assert order == ["write 8", "request served", "write 8", "write 4"]
    assert [json.loads(line)["seq"] for line in lines(tmp_path / f"audit-{DAY}.ndjson")] == list(range(1, 21))
    audit.emit(event(20))  # the queue was empty: a new gather starts
    audit.flush()  # a service that stops writes it at once
    assert order[-1] == "write 1"
    sink.close()


def test_any_event_is_written_as_its_canonical_object_and_verifies(tmp_path_factory):
    """The writer composes a line member by member; whatever the values (any
    text, missing, not text), the line reads back as the event and its hash is
    the verifier's rule over it."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    text = st.text(max_size=12)
    maybe = st.one_of(st.none(), text, st.integers())
    keys = st.one_of(st.sampled_from(["lockedBy", "remote", "size", "reason", "ü", "10", "2"]),
                     st.integers(-20, 20), st.booleans(), st.none())
    scalar = st.one_of(st.none(), text, st.integers())
    details = st.dictionaries(keys, st.one_of(scalar, st.lists(text, max_size=2),
                                              st.dictionaries(keys, scalar, max_size=3)), max_size=4)

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.tuples(text, maybe, maybe, maybe, details), min_size=1, max_size=4))
    def check(events):
        directory = tmp_path_factory.mktemp("audit")
        sink = make_sink(directory, FakeClock(f"{DAY}T10:00:00+00:00"))
        for kind, user, session, resource, extra in events:
            sink.emit(AuditEvent(kind, "shard-0", user_id=user, session_id=session, resource_id=resource,
                                 details=extra))
        sink.close()
        prev = None
        for (kind, user, session, resource, extra), row in zip(events, lines(directory / f"audit-{DAY}.ndjson"),
                                                               strict=True):
            record = json.loads(row)
            assert (record["eventType"], record["userId"], record["sessionId"], record["resourceId"],
                    record["details"]) == (kind, user, session, resource, json.loads(json.dumps(extra)))
            digest = record.pop("hash")
            assert chain_hash(prev, sealed_body(record)) == digest
            prev = digest
        assert verify_file(directory / f"audit-{DAY}.ndjson").intact

    check()


def test_details_with_keys_that_are_not_text_are_written_as_they_will_be_read_and_verify(tmp_path, clock):
    """JSON writes every key as text: {2: .., 10: ..} sorted as numbers is not
    sorted once read back, and mixed int and str keys cannot be sorted at all.
    Such an event is written with the keys a reader sees, never skipped."""
    sink = make_sink(tmp_path, clock)
    sink.emit(AuditEvent("DOCUMENT_UPDATED", "shard-0", details={2: "b", 10: "a", "lockedBy": "u1"}))
    sink.emit(AuditEvent("DOCUMENT_UPDATED", "shard-0", details={"size": 3, 1: {None: True, 7: [1]}}))
    sink.close()
    rows = [json.loads(row) for row in lines(tmp_path / f"audit-{DAY}.ndjson")]
    assert [row["details"] for row in rows] == [{"10": "a", "2": "b", "lockedBy": "u1"},
                                                {"1": {"null": True, "7": [1]}, "size": 3}]
    assert verify_file(tmp_path / f"audit-{DAY}.ndjson").intact


def test_a_loops_audit_keeps_up_with_a_busy_loop_and_survives_a_stopped_loop(tmp_path, clock):
    import asyncio

    from rounds.audit.loop import LoopAuditSink

    sink = make_sink(tmp_path, clock)
    audit = LoopAuditSink(sink, gather_s=0.001, slice_events=8)

    async def busy() -> None:  # 20 events a pass for 200 passes: more than 8 a slice
        for n in range(200):
            for k in range(20):
                audit.emit(event(n * 20 + k))
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)

    asyncio.run(busy())
    assert len(lines(tmp_path / f"audit-{DAY}.ndjson")) == 4000  # caught up, nothing left queued

    async def one(n: int) -> None:
        audit.emit(event(n))  # its write is scheduled, and the loop ends first

    asyncio.run(one(4000))
    audit.flush()  # the service stops: written at once
    audit.emit(event(4001))  # outside a loop: written at once
    assert len(lines(tmp_path / f"audit-{DAY}.ndjson")) == 4002
    asyncio.run(one(4002))
    audit.flush()
    seqs = [json.loads(row)["seq"] for row in lines(tmp_path / f"audit-{DAY}.ndjson")]
    assert seqs == list(range(1, 4004))
    sink.close()
