"""Document history in PostgreSQL (issue 4, optional part): every
acknowledged update becomes a row, and `rounds doc show --at` reads the
document as it was at that time. Real PostgreSQL (database `test`), the
gateway in-process (no Ray) with its documents on the real Redis.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
from pycrdt import Doc, Text

from rounds.audit.events import MemoryAuditSink
from rounds.auth import mint_token, private_key_for_dev
from rounds.cluster.inprocess import InProcessGateway
from tests.client import Client
from tests.conftest import POSTGRES_DSN, gateway_settings, require_postgres


@pytest.fixture
async def pg_gateway(var_root: Path, redis_url: str, uid: str) -> AsyncIterator[InProcessGateway]:
    await require_postgres()
    settings = gateway_settings(var_root, f"history-{uid}", shards=2, frontdoors=1, redis_url=redis_url,
                                postgres_dsn=POSTGRES_DSN)
    gateway = await InProcessGateway(settings, MemoryAuditSink()).start()
    try:
        yield gateway
    finally:
        await gateway.stop()


async def rows_of(room: str) -> int:
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM rounds_doc_updates WHERE resource_id = $1", room))
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


def doc_show(settings_dir: Path, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "rounds.cluster.cli", "doc", "show", *args],
                          env={**os.environ, "ROUNDS_POSTGRES_DSN": POSTGRES_DSN,
                               "ROUNDS_VAR_DIR": str(settings_dir)},
                          capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


async def test_a_document_can_be_read_as_of_any_time_from_its_postgres_history(
        pg_gateway: InProcessGateway, uid: str) -> None:
    room = f"document:history-{uid}"
    token = mint_token(private_key_for_dev(pg_gateway.settings), user_id=f"dr-{uid}", role="surgeon")
    client = await Client.connect(pg_gateway.url, token)
    try:
        assert (await client.join(room)).type == "RESOURCE_STATE"
        doc = Doc()
        marks = []
        for i, words in enumerate(["BP 120/80", "; HR 72", "; SpO2 98%"]):
            before = doc.get_state()
            doc.get("notes", type=Text).insert(len(doc.get("notes", type=Text)), words)
            ack = await client.request("RESOURCE_UPDATE", {
                "resourceId": room, "update": base64.b64encode(doc.get_update(before)).decode()}, ref=f"u{i}")
            assert ack.type == "UPDATE_ACK"
            await _until_rows(room, i + 1)  # written soon after the ack
            await asyncio.sleep(0.05)
            marks.append(datetime.now(UTC))
            await asyncio.sleep(0.05)
    finally:
        await client.close()

    var_dir = Path(pg_gateway.settings.var_dir)
    as_of_first = await asyncio.to_thread(doc_show, var_dir, "--resource", room, "--at", marks[0].isoformat(),
                                          "--text", "notes")
    assert as_of_first["text"] == {"notes": "BP 120/80"} and as_of_first["revision"] == 1
    as_of_second = await asyncio.to_thread(doc_show, var_dir, "--resource", room, "--at",
                                           marks[1].isoformat().replace("+00:00", "Z"), "--text", "notes")
    assert as_of_second["text"] == {"notes": "BP 120/80; HR 72"}
    now = await asyncio.to_thread(doc_show, var_dir, "--resource", room, "--text", "notes")
    assert now["text"] == {"notes": "BP 120/80; HR 72; SpO2 98%"} and now["revision"] == 3
    assert now["source"] == "postgres" and "notes" in now["roots"]
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        users = await conn.fetch("SELECT DISTINCT user_id FROM rounds_doc_updates WHERE resource_id = $1", room)
    finally:
        await conn.close()
    assert [r["user_id"] for r in users] == [f"dr-{uid}"]


async def _until_rows(room: str, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while await rows_of(room) < count:
        assert time.monotonic() < deadline, f"history rows of {room} did not reach {count}"
        await asyncio.sleep(0.05)


def test_at_without_postgres_is_a_clear_usage_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ROUNDS_POSTGRES_DSN"}
    done = subprocess.run([sys.executable, "-m", "rounds.cluster.cli", "doc", "show", "--resource", "document:x",
                           "--at", "2026-11-26T10:00:00Z"], env={**env, "ROUNDS_VAR_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "needs the PostgreSQL history" in done.stderr


async def test_rows_wait_while_postgres_is_unreachable_and_are_written_once_when_it_returns(uid: str) -> None:
    from rounds.shard.documents.history import DocHistory

    await require_postgres()
    room = f"document:outage-{uid}"
    history = DocHistory("postgresql://postgres@127.0.0.1:1/test")  # nothing listens there
    await history.start()
    try:
        history.submit(room, [(1, b"u1", "a"), (2, b"u2", "a")])
        deadline = time.monotonic() + 5
        while history.failures == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert history.stats()["waiting"] == 2 and (await history.health())["ok"] is False
        history.dsn = POSTGRES_DSN  # PostgreSQL is back
        history.submit(room, [(2, b"u2", "a"), (3, b"u3", "b")])  # a repeat is harmless
        await _until_rows(room, 3)
        await asyncio.sleep(0.3)
        assert await rows_of(room) == 3 and history.stats()["waiting"] == 0
    finally:
        await history.aclose()
