"""The audit day files when something goes wrong: an event that cannot be
written, a full disk, a directory gone, a rewriter (gzip, `rounds audit
erase`) or a late writer holding a lock, a day file removed or replaced under
a writer waiting for it, housekeeping that fails. The other process of each
race is a second open file description of the same file, which `flock`
treats as another process's."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rounds.audit.events import AuditEvent
from rounds.audit.files import GZIP_GRACE_S, FileAuditSink, _compress_day, lock_exclusive
from rounds.audit.verify import verify_file
from tests.unit.test_audit import DAY, FakeClock, event, lines, make_sink

CHAIN_MEMBERS = ("writer", "seq", "prevHash", "salt", "hash")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(f"{DAY}T10:00:00+00:00")


def records(path: Path) -> list[dict]:
    return [json.loads(row) for row in lines(path)]


def eventually(check: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.005)


def someone_waits_for_the_lock_of(path: Path) -> bool:
    """Whether a `flock` on `path` is waited for (Linux lists waiters in /proc/locks with `->`)."""
    inode = f":{path.stat().st_ino}"
    return any(row.split()[1] == "->" and row.split()[-3].endswith(inode)
               for row in Path("/proc/locks").read_text().splitlines())


def test_with_debug_logging_on_each_event_is_also_logged_as_the_line_says_it(tmp_path, clock, caplog):
    caplog.set_level(logging.DEBUG, logger="rounds.audit")
    sink = make_sink(tmp_path, clock)
    sink.emit(AuditEvent("LOCK_DENIED", "shard-0", "denied", user_id="usr_1", details={"lockedBy": "usr_2"}))
    sink.close()
    (logged,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "rounds.audit"]
    (written,) = records(tmp_path / f"audit-{DAY}.ndjson")
    assert logged == {k: v for k, v in written.items() if k not in CHAIN_MEMBERS}


def test_an_event_that_cannot_be_serialised_is_logged_and_skipped_and_the_others_are_written(tmp_path, clock,
                                                                                             caplog):
    cyclic: dict = {"n": 1}
    cyclic["self"] = cyclic
    sink = make_sink(tmp_path, clock)
    sink.emit_many([event(1), AuditEvent("LOCK_ACQUIRED", "shard-0", user_id="usr_x", details=cyclic), event(2)])
    sink.emit(event(3))
    sink.close()
    assert "audit event not serialisable, skipped" in caplog.text
    rows = records(tmp_path / f"audit-{DAY}.ndjson")
    assert [(r["userId"], r["seq"]) for r in rows] == [("usr_1", 1), ("usr_2", 2), ("usr_3", 3)]
    assert verify_file(tmp_path / f"audit-{DAY}.ndjson").intact  # no gap in the chain where it was skipped


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_disk_is_logged_with_the_events_and_never_raised_to_the_service(tmp_path, clock, caplog):
    (tmp_path / f"audit-{DAY}.ndjson").symlink_to("/dev/full")  # every write: ENOSPC
    sink = make_sink(tmp_path, clock)
    sink.emit(event(1))
    sink.emit_many([event(2), event(3)])
    sink.close()
    failures = [r for r in caplog.records if r.getMessage().startswith("audit write failed")]
    assert len(failures) == 2 and all(r.exc_info and isinstance(r.exc_info[1], OSError) for r in failures)
    assert "usr_1" in failures[0].getMessage() and "usr_3" in failures[1].getMessage()


def test_events_while_the_audit_directory_is_gone_are_logged_and_the_next_ones_written_once_it_is_back(
        tmp_path, clock, caplog):
    directory = tmp_path / "audit"
    sink = make_sink(directory, clock)
    shutil.rmtree(directory)
    sink.emit(event(1))
    assert "audit write failed" in caplog.text and "usr_1" in caplog.text
    directory.mkdir()
    sink.emit(event(2))
    sink.close()
    assert [(r["userId"], r["seq"]) for r in records(directory / f"audit-{DAY}.ndjson")] == [("usr_2", 1)]


@pytest.mark.parametrize("rewrite", ["removed", "replaced"])
def test_a_writer_that_waited_for_a_rewriter_appends_to_the_file_now_at_the_name(tmp_path, clock, rewrite):
    """A rewriter holds the day file exclusively; a writer opening it waits.
    The gzip removes the plain file once its .gz is in place, an erasure
    renames its rewrite over it: the writer must not append to the old file."""
    path = tmp_path / f"audit-{DAY}.ndjson"
    first = make_sink(tmp_path, clock)
    first.emit(event(0))
    first.close()
    late = make_sink(tmp_path, clock)
    with open(path, "rb") as held:
        assert lock_exclusive(held)
        writer = threading.Thread(target=late.emit, args=(event(1),))
        writer.start()
        eventually(lambda: someone_waits_for_the_lock_of(path))
        if rewrite == "removed":
            path.unlink()
        else:
            rewritten = tmp_path / ".rewrite.tmp"
            rewritten.write_bytes(path.read_bytes())
            os.replace(rewritten, path)
    writer.join(timeout=5)
    assert not writer.is_alive()
    late.close()
    expected = ["usr_1"] if rewrite == "removed" else ["usr_0", "usr_1"]
    assert [r["userId"] for r in records(path)] == expected


def test_a_second_start_of_the_housekeeping_keeps_the_one_thread(tmp_path, clock):
    """Two threads' first events may both find no housekeeping thread yet;
    the second to start it finds the first's."""
    sink = FileAuditSink(tmp_path, fsync="never", clock=clock)
    sink.emit(event(1))
    thread = sink._thread
    assert thread is not None and thread.is_alive()
    sink._start_housekeeping()  # the other thread's start
    assert sink._thread is thread  # no second thread started in its place
    sink.close()
    assert not thread.is_alive()


def test_a_failing_housekeeping_round_is_logged_and_the_thread_carries_on(tmp_path, clock, caplog):
    caplog.set_level(logging.ERROR, logger="rounds.audit")
    directory = tmp_path / "audit"
    sink = FileAuditSink(directory, fsync="interval", clock=clock)
    sink.emit(event(1))
    shutil.rmtree(directory)  # its gzip round cannot take the directory's rewrite lock
    eventually(lambda: "audit housekeeping failed" in caplog.text)
    assert sink._thread is not None and sink._thread.is_alive()
    sink.close()


def closed_day(tmp_path: Path) -> tuple[FileAuditSink, Path, Path]:
    """A sink whose day file of DAY is closed and past its grace: the plain file, and its .gz to be."""
    clock = FakeClock(f"{DAY}T23:59:59+00:00")
    sink = make_sink(tmp_path, clock)
    sink.emit(event(1))
    clock.set("2026-11-28T00:00:00+00:00")
    assert clock.now >= FakeClock("2026-11-27T00:00:00+00:00").now + GZIP_GRACE_S
    return sink, tmp_path / f"audit-{DAY}.ndjson", tmp_path / f"audit-{DAY}.ndjson.gz"


def test_closed_days_are_not_gzipped_while_another_process_rewrites_the_directory(tmp_path):
    sink, plain, gz = closed_day(tmp_path)
    with open(tmp_path / ".rewrite.lock", "a") as other:
        assert lock_exclusive(other)  # `rounds audit erase` at work
        assert sink.compress_closed_days() == []
        assert plain.exists() and not gz.exists()
    assert sink.compress_closed_days() == [gz]  # the next round does it
    sink.close()


def test_a_closed_day_that_a_late_writer_still_holds_is_gzipped_only_once_it_lets_go(tmp_path):
    sink, plain, gz = closed_day(tmp_path)
    late = make_sink(tmp_path, FakeClock(f"{DAY}T23:59:59.5+00:00"))  # a process whose clock is behind
    late.emit(event(2, "shard-1"))
    assert sink.compress_closed_days() == []
    assert plain.exists() and not gz.exists()
    late.close()
    assert sink.compress_closed_days() == [gz]
    assert [json.loads(row)["userId"] for row in gzip.decompress(gz.read_bytes()).splitlines()] == ["usr_1", "usr_2"]
    sink.close()


def test_a_day_file_removed_after_it_was_listed_is_skipped_and_leaves_nothing_behind(tmp_path):
    """`rounds audit retention` (another process, no lock) may delete a day
    file between the gzip's listing of the directory and its opening it."""
    assert _compress_day(tmp_path / f"audit-{DAY}.ndjson") is False
    assert list(tmp_path.iterdir()) == []
