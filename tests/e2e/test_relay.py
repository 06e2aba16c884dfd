"""Story BE-001.5 on Ray: with `amqp_url` set and `relay = "always"` (this
one machine standing in for several nodes), every message a shard actor
sends a front-door actor goes through the real RabbitMQ topic exchange.
The users see nothing of it; `rounds status` shows it."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pycrdt import Doc, Text

from rounds.cluster.cli import _print_status
from tests.conftest import GatewayHandle, gateway_settings
from tests.e2e.conftest import Connect

pytestmark = pytest.mark.ray

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture(scope="module")
def relay_gateway(ray_session: None, var_root: Path) -> Iterator[GatewayHandle]:
    handle = GatewayHandle(gateway_settings(var_root, f"relay-{uuid.uuid4().hex[:8]}", shards=2, frontdoors=2,
                                            amqp_url=AMQP_URL, relay="always"))
    yield handle
    handle.stop()


def relay_totals(handle: GatewayHandle) -> dict[str, int]:
    shards = [s["relay"] for s in handle.gateway.status()["shards"]]
    return {k: sum(r[k] for r in shards) for k in ("published", "confirmed", "over_link", "circuit_opened")}


async def test_users_on_front_door_actors_get_each_other_through_rabbitmq(relay_gateway, connect: Connect,
                                                                         capsys) -> None:
    async def wait_connected() -> None:
        for _ in range(100):  # the actors connect to RabbitMQ in the background
            status = relay_gateway.gateway.status()
            if all(s["relay"]["rabbitmq"] == "up" for s in status["shards"]) and all(
                    f["relay"]["rabbitmq"] == "up" for f in status["frontdoors"]):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"relay not connected: {status}")

    await wait_connected()
    room = f"document:{uuid.uuid4().hex[:8]}/tab:vitals"
    a, b = await connect("dr-a", on=relay_gateway), await connect("dr-b", on=relay_gateway)
    assert (await a.join(room)).type == "RESOURCE_STATE"
    assert (await b.join(room)).type == "RESOURCE_STATE"
    joined = await a.expect("USER_JOINED", resourceId=room)
    assert joined.data["user"]["userId"] == "dr-b"

    lock = await a.request("LOCK_ACQUIRE", {"resourceId": room})
    assert lock.type == "LOCK_ACQUIRED"
    assert (await b.expect("RESOURCE_LOCKED", resourceId=room)).data["lockedBy"] == "dr-a"

    doc = Doc()
    before = doc.get_state()
    doc.get("t", type=Text).insert(0, "BP 120/80")
    ack = await a.request("RESOURCE_UPDATE", {"resourceId": room,
                                              "update": base64.b64encode(doc.get_update(before)).decode()})
    assert ack.type == "UPDATE_ACK"
    relayed = await b.expect("RESOURCE_UPDATE", resourceId=room)
    mirror = Doc()
    mirror.apply_update(base64.b64decode(relayed.data["update"]))
    assert str(mirror.get("t", type=Text)) == "BP 120/80"

    await a.close()
    assert (await b.expect("USER_LEFT", resourceId=room)).data["userId"] == "dr-a"

    totals = relay_totals(relay_gateway)
    assert totals["published"] >= 6 and totals["over_link"] == 0 and totals["circuit_opened"] == 0
    status = relay_gateway.gateway.status()
    _print_status({"url": relay_gateway.url}, status)
    printed = capsys.readouterr().out
    assert "relay (RabbitMQ)" in printed and "closed" in printed
