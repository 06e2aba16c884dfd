"""The gateway ships its audit trail to PostgreSQL by itself (issue 5):
with `postgres_dsn` set, the process that runs the supervisor migrates the
schema and follows the day files (rounds.audit.tail.Shipper). Real
PostgreSQL (database `test`, a schema of its own per test, dropped after)
and, for the end-to-end test, the real gateway on the session's Ray.
Also: file retention of `rounds audit retention`.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from rounds.audit.events import AuditEvent
from rounds.audit.files import FileAuditSink
from rounds.audit.pg import connect, verify_db
from rounds.audit.tail import Shipper
from rounds.cluster.cli import format_shipper
from tests.client import Client
from tests.conftest import POSTGRES_DSN, GatewayHandle, gateway_settings

CLOSED = "postgresql://postgres@127.0.0.1:1/test"  # nothing listens on port 1: PostgreSQL "down"


def schema_dsn(schema: str) -> str:
    return f"{POSTGRES_DSN}{'&' if '?' in POSTGRES_DSN else '?'}search_path={schema}"


async def rows(conn: asyncpg.Connection, event_type: str | None = None, user: str | None = None) -> list[str]:
    """Event ids in the table (none before the shipper's migration made it)."""
    try:
        found = await conn.fetch("SELECT event_id FROM audit_events WHERE ($1::text IS NULL OR event_type = $1) "
                                 "AND ($2::text IS NULL OR user_id = $2)", event_type, user)
    except asyncpg.UndefinedTableError:
        return []
    return [r["event_id"] for r in found]


def file_event_ids(directory: Path) -> list[str]:
    ids = []
    for path in sorted(directory.glob("audit-*.ndjson")):
        ids += [json.loads(line)["eventId"] for line in path.read_text().splitlines() if line.strip()]
    return ids


def shipper_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "rounds-audit-shipper"]


async def until(check, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached after {timeout}s")
        await asyncio.sleep(0.1)


async def test_the_gateway_ships_a_session_to_postgres_once_and_intact(
        ray_session: None, redis_url: str, var_root: Path, schema: str, uid: str) -> None:
    settings = gateway_settings(var_root, f"ship-{uid}", shards=1, frontdoors=1, redis_url=redis_url,
                                postgres_dsn=schema_dsn(schema))
    started = time.monotonic()
    handle = await asyncio.to_thread(GatewayHandle, settings)
    conn = await connect(POSTGRES_DSN, schema)
    try:
        user, room = f"ship-{uid}", f"patient:ship-{uid}/chart"
        client = await Client.connect(handle.url, handle.token(user))
        assert (await client.join(room)).type == "RESOURCE_STATE"
        await client.request("LEAVE_RESOURCE", {"resourceId": room}, ref="bye")
        await client.close()
        closed = time.monotonic()

        async def both() -> bool:
            return bool(await rows(conn, "USER_CONNECTED", user) and await rows(conn, "USER_DISCONNECTED", user))

        await until(both, 10, "USER_CONNECTED and USER_DISCONNECTED in PostgreSQL")
        shipped_s = time.monotonic() - closed
        await asyncio.sleep(1.5)  # a step or more later: nothing doubled
        for event_type in ("USER_CONNECTED", "RESOURCE_JOINED", "RESOURCE_LEFT", "USER_DISCONNECTED"):
            assert len(await rows(conn, event_type, user)) == 1, event_type
        session = await conn.fetchval("SELECT session_id FROM audit_events WHERE event_type = 'USER_CONNECTED' "
                                      "AND user_id = $1", user)
        assert await conn.fetchval("SELECT session_id FROM audit_events WHERE event_type = 'USER_DISCONNECTED' "
                                   "AND user_id = $1", user) == session

        now = datetime.now(UTC)
        report, unchained = await verify_db(conn, now - timedelta(days=1), now + timedelta(days=1))
        assert report.intact and unchained == 0 and report.writers, report
        assert all(chain.linked for chain in report.writers.values())  # every chain from its first event

        async def caught_up() -> dict | None:
            shipper = (await asyncio.to_thread(handle.gateway.status))["auditShipper"]
            return shipper if shipper["lagBytes"] == 0 and shipper["postgresUp"] else None

        shipper = await until(caught_up, 5, "no lag")
        assert shipper["rowsLoaded"] == len(await rows(conn)) and shipper["lastError"] is None
        on_file = json.loads((Path(settings.var_dir) / "audit-shipper.json").read_text())
        assert on_file["postgresUp"] and on_file["rowsLoaded"] > 0
        assert sorted(await rows(conn)) == sorted(set(file_event_ids(handle.audit_dir)))
        print(f"\nshipped: gateway up in {closed - started:.1f}s, session in PostgreSQL "
              f"{shipped_s:.2f}s after the close, {shipper['rowsLoaded']} rows")
    finally:
        await asyncio.to_thread(handle.stop)
        await conn.close()
    assert not shipper_threads()
    assert not (Path(settings.var_dir) / "audit-shipper.json").exists()


async def test_a_gateway_whose_postgres_was_down_catches_up_without_loss_or_duplicates(
        ray_session: None, redis_url: str, var_root: Path, schema: str, uid: str) -> None:
    """The gateway's shipper first points at a closed port (PostgreSQL down:
    the session's events wait in the files, the status says so), then at the
    server: every event of the files arrives once."""
    settings = gateway_settings(var_root, f"ship-down-{uid}", shards=1, frontdoors=1, redis_url=redis_url,
                                postgres_dsn=schema_dsn(schema))
    handle = await asyncio.to_thread(GatewayHandle, settings)
    gateway = handle.gateway
    conn = await connect(POSTGRES_DSN, schema)
    try:
        await asyncio.to_thread(gateway.shipper.stop)
        gateway.shipper = Shipper(CLOSED, handle.audit_dir, interval_s=0.1).start()
        users = [f"down-{uid}-{i}" for i in range(3)]
        for user in users:
            client = await Client.connect(handle.url, handle.token(user))
            await client.join(f"patient:{user}/chart")
            await client.close()
        for user in users:
            await handle.wait_audit("USER_DISCONNECTED", userId=user)

        async def lagging() -> dict | None:
            shipper = (await asyncio.to_thread(gateway.status))["auditShipper"]
            return shipper if shipper["lagBytes"] > 0 else None

        down = await until(lagging, 5, "a lag reported")  # reported each interval_s, also while backing off
        assert not down["postgresUp"] and down["lastError"] and down["rowsLoaded"] == 0, down
        assert not await rows(conn, "USER_CONNECTED", users[0])

        await asyncio.to_thread(gateway.shipper.stop)
        gateway.shipper = None
        gateway.start_shipper()  # the settings' POSTGRES_DSN: PostgreSQL is back

        async def caught_up() -> bool:
            return all([await rows(conn, "USER_DISCONNECTED", u) for u in users])

        await until(caught_up, 10, "every disconnection in PostgreSQL")
        await asyncio.sleep(1.2)
        in_files = file_event_ids(handle.audit_dir)
        ids = await rows(conn)
        assert len(ids) == len(set(ids)) and sorted(ids) == sorted(set(in_files))
        for user in users:
            for event_type in ("USER_CONNECTED", "RESOURCE_JOINED", "USER_DISCONNECTED"):
                assert len(await rows(conn, event_type, user)) == 1, (event_type, user)
        now = datetime.now(UTC)
        report, _ = await verify_db(conn, now - timedelta(days=1), now + timedelta(days=1))
        assert report.intact, report
    finally:
        await asyncio.to_thread(handle.stop)
        await conn.close()
    assert not shipper_threads()


async def test_the_shipper_waits_while_postgres_is_down_then_loads_each_event_once(
        schema: str, tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    sink = FileAuditSink(directory, fsync="never")

    def emit(n: int, start: int = 0) -> None:
        for i in range(start, start + n):
            sink.emit(AuditEvent(event_type="LOCK_ACQUIRED", source="shard-0", user_id=f"u{i % 3}",
                                 resource_id=f"patient:{i}/vitals", details={"i": i}))

    conn = await connect(POSTGRES_DSN, schema)
    down = Shipper(CLOSED, directory, interval_s=0.05, status_file=tmp_path / "shipper.json").start()
    try:
        emit(40)
        await asyncio.sleep(0.5)
        stats = down.stats()
        assert not stats["postgresUp"] and stats["rowsLoaded"] == 0
        assert stats["lagBytes"] > 0 and "ConnectionRefusedError" in str(stats["lastError"])
        assert format_shipper(stats).startswith("audit shipper: PostgreSQL DOWN, 0 rows loaded, lag ")
        assert json.loads((tmp_path / "shipper.json").read_text())["lagBytes"] == stats["lagBytes"]
    finally:
        down.stop()
    assert not shipper_threads() and not (tmp_path / "shipper.json").exists()

    up = Shipper(schema_dsn(schema), directory, interval_s=0.05).start()
    try:
        emit(25, start=40)  # while it catches up, more arrive

        async def all_in() -> bool:
            return len(await rows(conn)) == 65

        await until(all_in, 10, "65 rows")
        emit(5, start=65)
    finally:
        up.stop()  # its last step loads what came meanwhile
        sink.close()
    try:
        ids = await rows(conn)
        assert len(ids) == len(set(ids)) == 70
        assert sorted(ids) == sorted(file_event_ids(directory))
        stats = up.stats()
        assert stats["postgresUp"] and stats["rowsLoaded"] == 70 and stats["lagBytes"] == 0
        now = datetime.now(UTC)
        report, _ = await verify_db(conn, now - timedelta(days=1), now + timedelta(days=1))
        assert report.intact, report
    finally:
        await conn.close()
    assert not shipper_threads()


def test_the_shipper_stops_promptly_even_when_postgres_does_not_answer(tmp_path: Path) -> None:
    """A server that accepts the connection and then says nothing: the
    connection attempt would take asyncpg's 10 s timeout; `stop` cancels it."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        shipper = Shipper(f"postgresql://postgres@127.0.0.1:{port}/test", tmp_path, interval_s=0.05).start()
        time.sleep(0.3)
        began = time.monotonic()
        shipper.stop()
        took = time.monotonic() - began
    assert took < 3.0 and not shipper_threads(), took
    assert not shipper.stats()["postgresUp"]


@pytest.mark.ray  # `rounds up` starts a Ray of its own
async def test_rounds_up_ships_and_rounds_status_shows_the_shipper(schema: str, tmp_path: Path) -> None:
    """`rounds up` with ROUNDS_POSTGRES_DSN: `rounds status` shows the shipper
    (text and --json), and SIGTERM still stops within the 3 s budget."""
    from tests.conftest import free_port
    from tests.e2e.test_cli import (
        ROUNDS,
        SHUTDOWN_BUDGET_S,
        RunningGateway,
        _read_banner,
        _stop_leftover,
        cli_env,
        run_cli,
    )

    port = free_port()
    env = cli_env(tmp_path, ROUNDS_DASHBOARD_PORT=str(free_port()), ROUNDS_POSTGRES_DSN=schema_dsn(schema))
    stderr_path = tmp_path / "rounds-up.stderr"
    with stderr_path.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            str(ROUNDS), "up", "--port", str(port), "--shards", "1", "--frontdoors", "1",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=stderr, start_new_session=True)
    gw = RunningGateway(process, port, 0, env, "", stderr_path)
    conn = await connect(POSTGRES_DSN, schema)
    try:
        gw.banner = await _read_banner(gw)
        assert "-> PostgreSQL" in gw.banner
        minted = await asyncio.to_thread(run_cli, "token", "--user", "usr_ship", "--role", "surgeon", env=env)
        client = await Client.connect(gw.url, minted.stdout.strip())
        await client.close()

        async def shipped() -> dict | None:
            if not await rows(conn, "USER_DISCONNECTED", "usr_ship"):
                return None
            done = await asyncio.to_thread(run_cli, "status", "--json", env=env, timeout=90)
            assert done.returncode == 0, done.stderr
            shipper = json.loads(done.stdout)["auditShipper"]
            return shipper if shipper["rowsLoaded"] >= 2 and shipper["lagBytes"] == 0 else None

        shipper = await until(shipped, 30, "the session shipped and shown")
        assert shipper["postgresUp"] and shipper["lastError"] is None
        text = await asyncio.to_thread(run_cli, "status", env=env, timeout=90)
        assert "audit shipper: PostgreSQL up, " in text.stdout and "lag 0 bytes" in text.stdout, text.stdout

        signalled = time.monotonic()
        os.kill(process.pid, 15)
        assert await asyncio.wait_for(process.wait(), SHUTDOWN_BUDGET_S + 5) == 0
        stopped_s = time.monotonic() - signalled
        assert stopped_s < SHUTDOWN_BUDGET_S, stopped_s
        assert not (tmp_path / "audit-shipper.json").exists()
    finally:
        await _stop_leftover(process)
        await conn.close()


def test_status_line_of_the_shipper() -> None:
    assert format_shipper(None).startswith("audit shipper: off")
    line = format_shipper({"postgresUp": True, "rowsLoaded": 12, "lagBytes": 0, "lastError": "OSError: x"})
    assert line == "audit shipper: PostgreSQL up, 12 rows loaded, lag 0 bytes, last error: OSError: x"


# -- file retention ------------------------------------------------------------------


def rounds_audit(var_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ROUNDS_POSTGRES_DSN"}
    env["ROUNDS_VAR_DIR"] = str(var_dir)
    return subprocess.run([sys.executable, "-m", "rounds.cluster.cli", "audit", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_retention_deletes_day_files_older_than_the_cutoff_and_dry_run_only_lists_them(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    directory.mkdir()
    today = datetime.now(UTC).date()
    names = {}
    for age in (0, 29, 30, 31, 400, 4000):
        day = (today - timedelta(days=age)).isoformat()
        plain, gz = directory / f"audit-{day}.ndjson", directory / f"audit-{day}.ndjson.gz"
        plain.write_text('{"eventId": "x"}\n')
        if age >= 30:
            gz.write_bytes(gzip.compress(b'{"eventId": "y"}\n'))
        names[age] = (plain, gz)
    (directory / "notes.txt").write_text("not a day file")
    (directory / "audit-1999-01-01.ndjson.tmp").write_text("not a day file either")
    old = [p for age in (31, 400, 4000) for p in names[age]]  # whole days before now - 30 days

    dry = rounds_audit(tmp_path, "retention", "--keep-days", "30", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert sorted(line.split(" ", 2)[2] for line in dry.stdout.splitlines() if line.startswith("would delete")) \
        == sorted(str(p) for p in old)
    assert all(p.exists() for p in old)  # only listed

    done = rounds_audit(tmp_path, "retention", "--keep-days", "30")
    assert done.returncode == 0, done.stderr
    assert f"({len(old)} files deleted)" in done.stdout
    assert not any(p.exists() for p in old)
    kept = sorted(p.name for p in directory.iterdir())
    assert kept == sorted([*(p.name for age in (0, 29) for p in names[age][:1]),
                           *(p.name for p in names[30]), "notes.txt", "audit-1999-01-01.ndjson.tmp"])
    again = rounds_audit(tmp_path, "retention", "--keep-days", "30")
    assert "(0 files deleted)" in again.stdout


# -- rounds audit verify --since/--until: the chains as stored in PostgreSQL -----------


async def test_verify_a_time_range_in_postgres_until_a_row_is_changed(schema: str, tmp_path: Path) -> None:
    from rounds.audit.pg import load_dir, migrate

    directory = tmp_path / "audit"
    sink = FileAuditSink(directory, fsync="never")
    for i in range(12):
        sink.emit(AuditEvent(event_type="LOCK_ACQUIRED", source="shard-0", user_id=f"u{i % 2}",
                             resource_id=f"patient:{i}/vitals", details={"i": i}))
    sink.close()
    conn = await connect(POSTGRES_DSN, schema)
    try:
        await migrate(conn)
        assert (await load_dir(conn, directory)).inserted == 12
        since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        good = rounds_audit(tmp_path, "verify", "--since", since, "--dsn", schema_dsn(schema))
        assert good.returncode == 0, good.stdout + good.stderr
        assert "12 events checked" in good.stdout and good.stdout.rstrip().endswith("intact")

        changed = await conn.fetchval("UPDATE audit_events SET user_id = 'someone-else' WHERE seq = 5 "
                                      "RETURNING event_id")
        bad = rounds_audit(tmp_path, "verify", "--since", since, "--dsn", schema_dsn(schema))
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert f"BREAK at line 5, seq 5: event {changed}" in bad.stdout and "NOT INTACT" in bad.stdout

        alone = rounds_audit(tmp_path, "verify", "--until", since)
        assert alone.returncode == 2 and "--until goes with --since" in alone.stderr
        no_db = rounds_audit(tmp_path, "verify", "--since", since, "--dsn", CLOSED)
        assert no_db.returncode == 2 and "Traceback" not in no_db.stderr
    finally:
        await conn.close()
