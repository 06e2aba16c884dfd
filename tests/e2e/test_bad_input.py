"""Bad input over real WebSockets: refused tokens and frames that hurt only their sender.

Tokens (DESIGN.md, wire protocol v1): anything but a valid RS256 token from a
trusted key is refused before the upgrade with HTTP 401 and
`{"type":"UNAUTHORIZED","data":{"reason":...}}`. Frames (STYLE.md habit 7):
a bad frame gets `ERROR {code, message}` with a stable code, to its sender
only; the others in the room see nothing, and everyone carries on.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
from websockets.exceptions import ConnectionClosed

from tests.client import Client, raw_upgrade, refusal
from tests.conftest import GatewayHandle

pytestmark = pytest.mark.ray


# --- tokens ------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(obj: dict[str, Any]) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def claims(user: str) -> dict[str, Any]:
    return {"sub": user, "userId": user, "role": "surgeon", "exp": int(time.time()) + 3600}


def expired(gw: GatewayHandle, user: str) -> str:
    return gw.token(user, ttl_s=3600, now=time.time() - 7200)


def tampered_payload(gw: GatewayHandle, user: str) -> str:
    header, payload, signature = gw.token(user, role="nurse").split(".")
    forged = json.loads(unb64url(payload)) | {"role": "surgeon", "userId": "usr_admin"}
    return f"{header}.{b64url_json(forged)}.{signature}"


def tampered_signature(gw: GatewayHandle, user: str) -> str:
    header, payload, signature = gw.token(user).split(".")
    raw = bytearray(unb64url(signature))
    raw[len(raw) // 2] ^= 0x01
    return f"{header}.{payload}.{b64url(bytes(raw))}"


def hs256_with_public_key(gw: GatewayHandle, user: str) -> str:
    """The classic key-confusion attack: HMAC keyed with the server's public PEM."""
    public_pem = (gw.settings.keys_dir / "jwt-public.pem").read_bytes()
    signing_input = f"{b64url_json({'alg': 'HS256', 'typ': 'JWT'})}.{b64url_json(claims(user))}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def alg_none(gw: GatewayHandle, user: str) -> str:
    return f"{b64url_json({'alg': 'none', 'typ': 'JWT'})}.{b64url_json(claims(user))}."


def not_a_jwt(gw: GatewayHandle, user: str) -> str:
    return "definitely-not-a-jwt"


REFUSED_ON_MAIN: list[tuple[str, Callable[[GatewayHandle, str], str], str]] = [
    ("expired", expired, "expired"),
    ("tampered_payload", tampered_payload, "bad_signature"),
    ("tampered_signature", tampered_signature, "bad_signature"),
    ("hs256_signed_with_the_public_key", hs256_with_public_key, "bad_algorithm"),
    ("alg_none", alg_none, "bad_algorithm"),
    ("garbage", not_a_jwt, "malformed"),
]


async def assert_unauthorized(gw: GatewayHandle, token: str | None, reason: str) -> None:
    response = await refusal(gw.url, token)
    assert response.status_code == 401  # an HTTP answer: the upgrade never happened
    assert response.headers["Content-Type"] == "application/json"
    assert json.loads(response.body) == {"type": "UNAUTHORIZED", "data": {"reason": reason}}


async def test_missing_token_is_refused_before_the_upgrade(gateway: GatewayHandle) -> None:
    await assert_unauthorized(gateway, None, "missing_token")
    await assert_unauthorized(gateway, "", "missing_token")


@pytest.mark.parametrize(("make", "reason"), [(m, r) for _, m, r in REFUSED_ON_MAIN],
                         ids=[name for name, _, _ in REFUSED_ON_MAIN])
async def test_bad_token_is_refused_before_the_upgrade(gateway: GatewayHandle, uid: str,
                                                       make: Callable[[GatewayHandle, str], str],
                                                       reason: str) -> None:
    token = make(gateway, f"usr_bad-{uid}")
    raw = await raw_upgrade(gateway.url, token)
    raw.close()
    assert raw.status == 401
    assert raw.json() == {"type": "UNAUTHORIZED", "data": {"reason": reason}}
    await assert_unauthorized(gateway, token, reason)
    assert token not in gateway.audit_text()


async def test_wrong_issuer_and_wrong_audience_are_refused(tight_gateway: GatewayHandle, uid: str) -> None:
    gw = tight_gateway
    user = f"usr_iss-{uid}"
    await assert_unauthorized(gw, gw.token(user, issuer="https://evil.test"), "bad_issuer")
    await assert_unauthorized(gw, gw.token(user, audience="someone-else"), "bad_audience")
    await assert_unauthorized(gw, gw.token(user, issuer=None), "missing_claim")
    # The same user with the right claims gets in.
    client = await Client.connect(gw.url, gw.token(user))
    await client.close()


async def test_bearer_header_works_instead_of_the_query_token(gateway: GatewayHandle, uid: str) -> None:
    user = f"usr_bearer-{uid}"
    client = await Client.connect(gateway.url, None,
                                  additional_headers={"Authorization": f"Bearer {gateway.token(user)}"})
    try:
        assert client.connected is not None and client.connected.data["userId"] == user
        assert (await client.request("HEARTBEAT")).type == "HEARTBEAT_ACK"
    finally:
        await client.close()
    response = await refusal(gateway.url, None, additional_headers={"Authorization": "Bearer not.a.token"})
    assert response.status_code == 401


# --- frames ------------------------------------------------------------------------


@asynccontextmanager
async def pair_in_room(gw: GatewayHandle, uid: str, **kwargs: Any) -> AsyncIterator[tuple[Client, Client, str]]:
    """(sender, bystander, room): both joined; the bystander saw the sender arrive."""
    room = f"page:/patient/bad-{uid}"
    opened: list[Client] = []
    try:
        bystander = await Client.connect(gw.url, gw.token(f"usr_by-{uid}"))
        opened.append(bystander)
        sender = await Client.connect(gw.url, gw.token(f"usr_tx-{uid}"), **kwargs)
        opened.append(sender)
        assert (await bystander.join(room)).type == "RESOURCE_STATE"
        assert (await sender.join(room)).type == "RESOURCE_STATE"
        await bystander.expect("USER_JOINED", resourceId=room)
        yield sender, bystander, room
    finally:
        await asyncio.gather(*(c.close() for c in opened), return_exceptions=True)


async def both_still_work(sender: Client, bystander: Client, uid: str) -> None:
    for client in (sender, bystander):
        assert (await client.request("HEARTBEAT", ref="alive")).type == "HEARTBEAT_ACK"
    room = f"page:/patient/after-{uid}"
    assert (await sender.join(room)).type == "RESOURCE_STATE"
    assert (await bystander.join(room)).type == "RESOURCE_STATE"


def join_frame(**data: Any) -> str:
    return json.dumps({"type": "JOIN_RESOURCE", "ref": "j", "data": data})


NESTING = 50_000  # far past Python's recursion limit, well under max_frame_bytes
BAD_FRAMES: list[tuple[str, str | bytes, str]] = [
    ("malformed_json", '{"type": "HEARTBEAT",', "BAD_REQUEST"),
    ("json_array", '["HEARTBEAT", {}]', "BAD_REQUEST"),
    ("json_string", '"HEARTBEAT"', "BAD_REQUEST"),
    ("unknown_type", '{"type": "SELF_DESTRUCT", "ref": "u"}', "UNKNOWN_TYPE"),
    ("missing_type", '{"ref": "m", "data": {}}', "BAD_REQUEST"),
    ("type_not_a_string", '{"type": 7}', "BAD_REQUEST"),
    ("data_not_an_object", '{"type": "HEARTBEAT", "data": [1]}', "BAD_REQUEST"),
    ("ref_is_an_object", '{"type": "HEARTBEAT", "ref": {"a": 1}}', "BAD_REQUEST"),
    ("missing_resource_id", join_frame(resourceType="patient_record", mode="editor"), "BAD_REQUEST"),
    ("empty_resource_id", join_frame(resourceId="", mode="editor"), "BAD_REQUEST"),
    ("bad_mode", join_frame(resourceId="page:/patient/1", mode="admin"), "BAD_REQUEST"),
    ("bad_state_vector", join_frame(resourceId="page:/patient/1", stateVector="***"), "BAD_REQUEST"),
    ("binary_frame_on_json", b'{"type": "HEARTBEAT"}', "BAD_REQUEST"),
    ("deeply_nested_json", '{"type": "HEARTBEAT", "data": {"x": ' + "[" * NESTING + "]" * NESTING + "}}",
     "BAD_REQUEST"),
]


@pytest.mark.parametrize(("payload", "code"), [(p, c) for _, p, c in BAD_FRAMES],
                         ids=[name for name, _, _ in BAD_FRAMES])
async def test_bad_frame_gets_an_error_to_its_sender_only(gateway: GatewayHandle, uid: str,
                                                          payload: str | bytes, code: str) -> None:
    async with pair_in_room(gateway, uid) as (sender, bystander, _):
        await sender.send_raw(payload)
        error = await sender.expect("ERROR")
        assert error.data["code"] == code
        assert isinstance(error.data["message"], str) and error.data["message"]
        assert "Traceback" not in error.data["message"]
        assert await bystander.quiet(0.3) == []
        await both_still_work(sender, bystander, uid)


async def test_error_echoes_the_ref_of_a_readable_request(gateway: GatewayHandle, uid: str) -> None:
    async with pair_in_room(gateway, uid) as (sender, _, _):
        reply = await sender.request("SELF_DESTRUCT", {}, ref="r-17")
        assert (reply.type, reply.data["code"], reply.ref) == ("ERROR", "UNKNOWN_TYPE", "r-17")
        reply = await sender.request("JOIN_RESOURCE", {"mode": "editor"}, ref=18)
        assert (reply.type, reply.data["code"], reply.ref) == ("ERROR", "BAD_REQUEST", 18)


async def test_oversized_frame_gets_too_large_and_the_connection_stays(tight_gateway: GatewayHandle,
                                                                      uid: str) -> None:
    gw = tight_gateway
    limit = gw.settings.max_frame_bytes
    async with pair_in_room(gw, uid) as (sender, bystander, room):
        padding = "x" * (limit + 1)
        await sender.send_raw(json.dumps({"type": "HEARTBEAT", "data": {"pad": padding}}))
        assert (await sender.expect("ERROR")).data["code"] == "TOO_LARGE"
        # The limit is in bytes: fewer characters than the limit, more bytes.
        wide = "é" * (limit // 2 + 10)
        assert len(wide) < limit < len(wide.encode())
        await sender.send_raw(json.dumps({"type": "HEARTBEAT", "data": {"pad": wide}}, ensure_ascii=False))
        assert (await sender.expect("ERROR")).data["code"] == "TOO_LARGE"
        # Just under the limit is fine.
        ok = json.dumps({"type": "HEARTBEAT", "ref": "fits", "data": {"pad": ""}})
        ok = ok.replace('"pad": ""', '"pad": "' + "y" * (limit - len(ok)) + '"')
        assert len(ok.encode()) == limit
        await sender.send_raw(ok)
        assert (await sender.expect("HEARTBEAT_ACK")).ref == "fits"
        assert await bystander.quiet(0.3) == []
        await both_still_work(sender, bystander, uid)


async def test_a_frame_past_the_hard_limit_closes_only_its_sender_with_1009(tight_gateway: GatewayHandle,
                                                                           uid: str) -> None:
    # Above max(4 x max_frame_bytes, 1 MiB) websockets stops reading: the frame is never buffered.
    gw = tight_gateway
    async with pair_in_room(gw, uid) as (sender, bystander, room):
        await sender.send_raw("x" * (max(4 * gw.settings.max_frame_bytes, 1024 * 1024) + 1))
        assert await sender.closed(timeout=5) == 1009
        left = await bystander.expect("USER_LEFT", resourceId=room)
        assert left.data["userId"] == f"usr_tx-{uid}"
        assert (await bystander.request("HEARTBEAT")).type == "HEARTBEAT_ACK"


async def test_a_flood_of_garbage_hurts_only_its_sender(gateway: GatewayHandle, uid: str) -> None:
    pids = await asyncio.to_thread(gateway.gateway.pids)
    async with pair_in_room(gateway, uid) as (sender, bystander, room):
        count = 500
        for i in range(count):
            await sender.send_raw(f"garbage {i} {{")
        errors = 0
        try:
            while errors < count:
                frame = await sender._next(5.0)
                assert frame.type == "ERROR" and frame.data["code"] == "BAD_REQUEST", frame
                errors += 1
        except ConnectionClosed:
            pass  # closing a flooding client is allowed too
        assert errors == count or sender.ws.close_code is not None
        assert await bystander.quiet(0.3) == []
        assert (await bystander.request("HEARTBEAT")).type == "HEARTBEAT_ACK"
        assert (await bystander.join(f"page:/patient/after-{uid}")).type == "RESOURCE_STATE"
        newcomer = await Client.connect(gateway.url, gateway.token(f"usr_new-{uid}"))
        try:
            state = await newcomer.join(room)
            assert state.type == "RESOURCE_STATE"
            assert f"usr_by-{uid}" in {u["userId"] for u in state.data["users"]}
        finally:
            await newcomer.close()
    assert await asyncio.to_thread(gateway.gateway.pids) == pids  # no actor died and came back


async def test_msgpack_connection_joins_and_gets_errors_as_msgpack(gateway: GatewayHandle, uid: str) -> None:
    async with pair_in_room(gateway, uid, binary=True) as (sender, bystander, room):
        assert sender.ws.subprotocol == "rounds.v1.msgpack"
        nested = b"\x91" * 100_000 + b"\xc0"  # [[[...[nil]...]]], past msgpack's stack limit
        for payload in (b"\xc1", "a text frame", msgpack.packb([1, 2, 3]), nested, msgpack.packb({"type": "NOPE"})):
            await sender.send_raw(payload)
            raw = await asyncio.wait_for(sender.ws.recv(), 5)
            assert isinstance(raw, bytes)
            frame = msgpack.unpackb(raw)
            assert frame["type"] == "ERROR"
            assert frame["data"]["code"] == ("UNKNOWN_TYPE" if payload == msgpack.packb({"type": "NOPE"})
                                             else "BAD_REQUEST")
        assert await bystander.quiet(0.3) == []
        await both_still_work(sender, bystander, uid)
        # The JSON bystander sees the msgpack user leave in JSON.
        await sender.request("LEAVE_RESOURCE", {"resourceId": room}, ref="bye")
        left = await bystander.expect("USER_LEFT", resourceId=room)
        assert left.data["userId"] == f"usr_tx-{uid}"
