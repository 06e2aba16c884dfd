"""`rounds audit erase` against real PostgreSQL: the rows of a person are
pseudonymised like their lines, `verify --since/--until` still passes, the
indexes find the pseudonym and not the person, and reloading the files
changes nothing. Each test works in a schema of its own."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import asyncpg
import pytest

from rounds.audit.chain import canonical, chain_hash
from rounds.audit.erase import Erasure, erase_db, erase_files, pseudonym
from rounds.audit.pg import AuditQuery, load_dir, search_db, verify_db
from tests.unit.test_audit_erase import ALICE, BOB, DAY, KEY, records, write_day

SINCE, UNTIL = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)


async def test_erase_in_postgresql_keeps_every_chain_intact_and_the_person_unfindable(db, tmp_path):
    write_day(tmp_path)
    await load_dir(db, tmp_path)
    erasure = Erasure(pseudonym(KEY, "user", ALICE))
    erase_files(tmp_path, ALICE, KEY, erasure)
    await erase_db(db, ALICE, KEY, erasure)
    assert (erasure.lines, erasure.rows, erasure.complete) == (4, 4, True)

    report, unchained = await verify_db(db, SINCE, UNTIL)
    assert report.intact and unchained == 0 and sum(w.events for w in report.writers.values()) == 5
    assert await search_db(db, AuditQuery(user_id=ALICE)) == []
    found = await search_db(db, AuditQuery(user_id=erasure.user_pseudonym))
    assert [r.event_type for r in found] == ["USER_CONNECTED", "LOCK_ACQUIRED", "USER_DISCONNECTED"]
    denied = await db.fetchrow("SELECT user_id, details->>'lockedBy' AS holder FROM audit_events "
                               "WHERE event_type = 'LOCK_DENIED'")
    assert (denied["user_id"], denied["holder"]) == (BOB, erasure.user_pseudonym)
    text = await db.fetchval("SELECT string_agg(t::text, '') FROM audit_events t")
    assert ALICE not in text and "s-alice" not in text and "10.1.2.3" not in text

    # the database and the files say the same, and a reload finds every row there already
    rows = await db.fetch("SELECT event_id, user_id, session_id, details, salt, erased FROM audit_events")
    by_id = {r["event_id"]: r for r in rows}
    for line in records(tmp_path / f"audit-{DAY}.ndjson"):
        row = by_id[line["eventId"]]
        assert (row["user_id"], row["session_id"], json.loads(row["details"])) == (
            line["userId"], line["sessionId"], line["details"])
        assert json.loads(row["erased"] or "null") == line.get("erased")
        assert json.loads(row["salt"] or "null") == line.get("salt")
    again = await load_dir(db, tmp_path)
    assert (again.inserted, again.already) == (0, 5)


async def test_a_row_loaded_after_the_files_were_erased_comes_in_erased(db, tmp_path):
    """Erase files first, load later (PostgreSQL was down): the rows are
    erased as the lines are, and the database erase finds nothing left."""
    write_day(tmp_path)
    erasure = Erasure(pseudonym(KEY, "user", ALICE))
    erase_files(tmp_path, ALICE, KEY, erasure)
    await load_dir(db, tmp_path)
    await erase_db(db, ALICE, KEY, erasure)
    assert erasure.rows == 0
    assert (await verify_db(db, SINCE, UNTIL))[0].intact


async def test_rows_written_before_salting_are_counted_not_broken(db, tmp_path):
    legacy = {"eventId": "e1", "time": f"{DAY}T10:00:00.000000Z", "eventType": "LOCK_ACQUIRED", "userId": ALICE,
              "sessionId": None, "resourceId": "doc:1", "source": "shard-0", "outcome": "ok", "details": {},
              "writer": "shard-0#old", "seq": 1, "prevHash": None}
    (tmp_path / f"audit-{DAY}.ndjson").write_text(
        json.dumps({**legacy, "hash": chain_hash(None, canonical(legacy))}) + "\n")
    await load_dir(db, tmp_path)
    erasure = Erasure("")
    await erase_db(db, ALICE, KEY, erasure)
    assert (erasure.rows, erasure.unsalted_rows, erasure.complete) == (0, 1, False)
    assert (await verify_db(db, SINCE, UNTIL))[0].intact


async def test_the_gateways_role_cannot_erase(db, tmp_path):
    write_day(tmp_path)
    await load_dir(db, tmp_path)
    async with db.transaction():
        await db.execute("SET LOCAL ROLE rounds_gateway")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await erase_db(db, ALICE, KEY, Erasure(""))
