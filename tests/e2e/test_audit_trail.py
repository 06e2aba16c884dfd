"""Issue 5: after one end-to-end session every critical event is in the
audit files exactly once, with the right fields, and the day's file
verifies (hash chains intact). The main gateway (Ray, 2 shards, 2 front
doors, Redis), real WebSockets; the files are read as an auditor would.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from pycrdt import Doc, Text

from rounds.routing import HashRing
from tests.client import refused
from tests.conftest import GatewayHandle
from tests.e2e.conftest import Connect

pytestmark = pytest.mark.ray



async def test_every_critical_event_of_a_session_is_recorded_once_with_its_fields(
        connect: Connect, gateway: GatewayHandle, uid: str) -> None:
    user, viewer_user, room = f"dr-{uid}", f"obs-{uid}", f"document:audit-{uid}"
    field = f"{room}/field:dose"
    status, _ = await refused(gateway.url, "not-a-token")
    assert status == 401

    client = await connect(user)
    assert (await client.join(room)).type == "RESOURCE_STATE"
    grant = await client.request("LOCK_ACQUIRE", {"resourceId": field, "roomId": room}, ref="lock")
    doc = Doc()
    doc.get("t", type=Text).insert(0, "5 mg")
    ack = await client.request("RESOURCE_UPDATE", {"resourceId": room,
                                                   "update": base64.b64encode(doc.get_update()).decode()}, ref="u")
    assert ack.type == "UPDATE_ACK"
    await client.request("LOCK_RELEASE", {"resourceId": field, "lockId": grant.data["lockId"]}, ref="rel")
    viewer = await connect(viewer_user, role="observer")
    denied = await viewer.join(room, mode="editor")
    assert denied.type == "PERMISSION_DENIED"
    await client.request("LEAVE_RESOURCE", {"resourceId": room}, ref="bye")
    await client.close()

    session = (await gateway.wait_audit("USER_CONNECTED", userId=user))["sessionId"]
    expected = {
        "USER_CONNECTED": {"userId": user, "sessionId": session},
        "RESOURCE_JOINED": {"userId": user, "sessionId": session, "resourceId": room},
        "LOCK_ACQUIRED": {"userId": user, "resourceId": field},
        "DOCUMENT_UPDATED": {"userId": user, "sessionId": session, "resourceId": room},
        "LOCK_RELEASED": {"userId": user, "resourceId": field},
        "RESOURCE_LEFT": {"userId": user, "sessionId": session, "resourceId": room},
        "USER_DISCONNECTED": {"userId": user, "sessionId": session},
        "PERMISSION_DENIED": {"userId": viewer_user, "resourceId": room},
    }
    for event_type, fields in expected.items():
        await gateway.wait_audit(event_type, **fields)
    await asyncio.sleep(0.3)  # nothing doubled arrives late
    for event_type, fields in expected.items():
        found = gateway.audit_events(event_type, **fields)
        assert len(found) == 1, (event_type, found)
        record = found[0]
        assert record["outcome"] == ("denied" if event_type == "PERMISSION_DENIED" else "ok")
        assert record["source"].startswith(("frontdoor-", "shard-"))
        assert {"eventId", "time", "writer", "seq", "hash"} <= set(record)
    updated = gateway.audit_events("DOCUMENT_UPDATED", userId=user)[0]
    assert updated["details"]["revision"] == 1 and updated["details"]["bytes"] > 0
    assert "5 mg" not in gateway.audit_text()  # who, which document, which revision; never the content
    left = gateway.audit_events("RESOURCE_LEFT", userId=user)[0]
    assert left["details"]["reason"] == "left"
    shard = HashRing(range(gateway.settings.shards)).shard_for(room)
    assert gateway.audit_events("RESOURCE_JOINED", userId=user)[0]["source"] == f"shard-{shard}"
    rejected = [r for r in gateway.audit_events("CONNECTION_REJECTED") if "not-a-token" not in str(r)]
    assert rejected and all("token" not in r["details"] for r in rejected)

    day = datetime.now(UTC).strftime("%Y-%m-%d")
    done = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "rounds.cluster.cli", "audit", "verify", "--day", day, "--dir", str(gateway.audit_dir)],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
