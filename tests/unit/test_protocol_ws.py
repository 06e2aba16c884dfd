"""The `/ws` protocol v1 codecs and request parsing (DESIGN.md, wire protocol).

Every client mistake must come out as `ProtocolError` with a stable code and
the request's `ref` when it had a usable one; nothing else may escape.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rounds.protocol.ws import (
    JSON,
    MAX_RESOURCE_ID_CHARS,
    MSGPACK,
    SUBPROTOCOL_JSON,
    SUBPROTOCOL_MSGPACK,
    Codec,
    ErrorCode,
    Heartbeat,
    JoinResource,
    LeaveResource,
    LockAcquireRequest,
    LockReleaseRequest,
    LockRenewRequest,
    ProtocolError,
    ResourceUpdate,
    codec_for,
    error_data,
    parse_request,
)

PAGE = "page:/patient/12345"
CODECS = pytest.mark.parametrize("codec", [JSON, MSGPACK], ids=["json", "msgpack"])


def frame(codec: Codec, obj: Any) -> str | bytes:
    """A client frame as the client would send it on this codec."""
    if codec is JSON:
        return json.dumps(obj)
    return msgpack.packb(obj, use_bin_type=True)


def binary(codec: Codec, raw: bytes) -> str | bytes:
    return base64.b64encode(raw).decode() if codec is JSON else raw


def refused(codec: Codec, raw: str | bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_request(codec, raw)
    return info.value


# --- well-formed requests -----------------------------------------------------------


@CODECS
def test_a_heartbeat_parses_with_its_ref(codec: Codec) -> None:
    assert parse_request(codec, frame(codec, {"type": "HEARTBEAT", "ref": 1})) == Heartbeat(1)


@CODECS
def test_a_heartbeat_needs_no_data_and_no_ref(codec: Codec) -> None:
    assert parse_request(codec, frame(codec, {"type": "HEARTBEAT"})) == Heartbeat(None)
    assert parse_request(codec, frame(codec, {"type": "HEARTBEAT", "data": None})) == Heartbeat(None)


@CODECS
def test_a_join_parses_every_field(codec: Codec) -> None:
    request = parse_request(codec, frame(codec, {"type": "JOIN_RESOURCE", "ref": "j1", "data": {
        "resourceId": PAGE, "resourceType": "patient_record", "mode": "viewer",
        "stateVector": binary(codec, b"\x00\x01\xff"),
    }}))
    assert request == JoinResource("j1", PAGE, "patient_record", "viewer", b"\x00\x01\xff")


@CODECS
def test_a_join_defaults_to_editor_without_a_state_vector(codec: Codec) -> None:
    request = parse_request(codec, frame(codec, {"type": "JOIN_RESOURCE", "data": {"resourceId": PAGE}}))
    assert request == JoinResource(None, PAGE, "", "editor", None)


@CODECS
def test_a_leave_parses(codec: Codec) -> None:
    request = parse_request(codec, frame(codec, {"type": "LEAVE_RESOURCE", "ref": 3, "data": {"resourceId": PAGE}}))
    assert request == LeaveResource(3, PAGE)


@CODECS
def test_a_resource_id_of_exactly_the_limit_is_accepted(codec: Codec) -> None:
    rid = "r" * MAX_RESOURCE_ID_CHARS
    assert parse_request(codec, frame(codec, {"type": "LEAVE_RESOURCE", "data": {"resourceId": rid}})) == \
        LeaveResource(None, rid)


# --- malformed requests ---------------------------------------------------------------

JOIN = "JOIN_RESOURCE"
MALFORMED: list[tuple[str, dict[str, Any], ErrorCode]] = [
    ("missing type", {"ref": "r1", "data": {}}, ErrorCode.BAD_REQUEST),
    ("non-string type", {"type": 5, "ref": "r1"}, ErrorCode.BAD_REQUEST),
    ("unknown type", {"type": "NOPE", "ref": "r1"}, ErrorCode.UNKNOWN_TYPE),
    ("a server-to-client type", {"type": "RESOURCE_STATE", "ref": "r1"}, ErrorCode.UNKNOWN_TYPE),
    ("data not an object", {"type": "HEARTBEAT", "ref": "r1", "data": [1]}, ErrorCode.BAD_REQUEST),
    ("data a string", {"type": JOIN, "ref": "r1", "data": PAGE}, ErrorCode.BAD_REQUEST),
    ("missing resourceId", {"type": JOIN, "ref": "r1", "data": {}}, ErrorCode.BAD_REQUEST),
    ("empty resourceId", {"type": JOIN, "ref": "r1", "data": {"resourceId": ""}}, ErrorCode.BAD_REQUEST),
    ("non-string resourceId", {"type": JOIN, "ref": "r1", "data": {"resourceId": 12345}}, ErrorCode.BAD_REQUEST),
    ("too long resourceId", {"type": JOIN, "ref": "r1",
                             "data": {"resourceId": "r" * (MAX_RESOURCE_ID_CHARS + 1)}}, ErrorCode.BAD_REQUEST),
    ("leave without resourceId", {"type": "LEAVE_RESOURCE", "ref": "r1", "data": {}}, ErrorCode.BAD_REQUEST),
    ("bad mode", {"type": JOIN, "ref": "r1", "data": {"resourceId": PAGE, "mode": "owner"}}, ErrorCode.BAD_REQUEST),
    ("non-string mode", {"type": JOIN, "ref": "r1", "data": {"resourceId": PAGE, "mode": ["editor"]}},
     ErrorCode.BAD_REQUEST),
    ("long resourceType", {"type": JOIN, "ref": "r1", "data": {"resourceId": PAGE, "resourceType": "t" * 129}},
     ErrorCode.BAD_REQUEST),
    ("non-string resourceType", {"type": JOIN, "ref": "r1", "data": {"resourceId": PAGE, "resourceType": 1}},
     ErrorCode.BAD_REQUEST),
    ("state vector of the wrong kind", {"type": JOIN, "ref": "r1", "data": {"resourceId": PAGE, "stateVector": 7}},
     ErrorCode.BAD_REQUEST),
]


@CODECS
@pytest.mark.parametrize(("case", "obj", "code"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_request_is_refused_with_its_code_and_ref(
        codec: Codec, case: str, obj: dict[str, Any], code: ErrorCode) -> None:
    error = refused(codec, frame(codec, obj))
    assert error.code == code
    assert error.ref == "r1"
    assert error.message


@CODECS
def test_an_integer_ref_is_echoed_too(codec: Codec) -> None:
    assert refused(codec, frame(codec, {"type": "NOPE", "ref": 42})).ref == 42


@CODECS
def test_a_frame_that_is_not_an_object_is_a_bad_request(codec: Codec) -> None:
    for obj in ([1, 2], "HEARTBEAT", 5, None):
        error = refused(codec, frame(codec, obj))
        assert (error.code, error.ref) == (ErrorCode.BAD_REQUEST, None)


@CODECS
def test_a_ref_that_is_neither_string_nor_integer_is_a_bad_request_without_echo(codec: Codec) -> None:
    error = refused(codec, frame(codec, {"type": "HEARTBEAT", "ref": {"x": 1}}))
    assert (error.code, error.ref) == (ErrorCode.BAD_REQUEST, None)


def test_a_frame_that_is_not_json_is_a_bad_request() -> None:
    error = refused(JSON, '{"type": "HEARTBEAT"')
    assert (error.code, error.ref) == (ErrorCode.BAD_REQUEST, None)


def test_a_binary_frame_on_a_json_connection_is_a_bad_request() -> None:
    error = refused(JSON, msgpack.packb({"type": "HEARTBEAT"}))
    assert error.code == ErrorCode.BAD_REQUEST


def test_a_text_frame_on_a_msgpack_connection_is_a_bad_request() -> None:
    assert refused(MSGPACK, '{"type": "HEARTBEAT"}').code == ErrorCode.BAD_REQUEST


def test_a_frame_that_is_not_msgpack_is_a_bad_request() -> None:
    for raw in (b"\xc1", b"", b"\x92\x01", msgpack.packb({"type": "HEARTBEAT"}) + b"\x00"):
        assert refused(MSGPACK, raw).code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("state_vector", ["!!!not base64!!!", "AAE", "élan"])
def test_a_state_vector_that_is_not_base64_is_a_bad_request(state_vector: str) -> None:
    error = refused(JSON, json.dumps({"type": JOIN, "ref": "r1",
                                      "data": {"resourceId": PAGE, "stateVector": state_vector}}))
    assert (error.code, error.ref) == (ErrorCode.BAD_REQUEST, "r1")


def test_a_state_vector_sent_as_text_over_msgpack_is_a_bad_request() -> None:
    error = refused(MSGPACK, msgpack.packb({"type": JOIN, "ref": "r1",
                                            "data": {"resourceId": PAGE, "stateVector": "AAE="}}))
    assert (error.code, error.ref) == (ErrorCode.BAD_REQUEST, "r1")


def test_deeply_nested_json_is_a_bad_request_not_a_crash() -> None:
    assert refused(JSON, "[" * 100_000).code == ErrorCode.BAD_REQUEST


def test_an_integer_too_long_to_parse_is_a_bad_request() -> None:
    assert refused(JSON, '{"type": "HEARTBEAT", "ref": ' + "1" * 5_000 + "}").code == ErrorCode.BAD_REQUEST


def test_deeply_nested_msgpack_is_a_bad_request_not_a_crash() -> None:
    assert refused(MSGPACK, b"\x91" * 100_000).code == ErrorCode.BAD_REQUEST


# --- encoding ---------------------------------------------------------------------


def test_json_encodes_bytes_as_base64_and_echoes_the_ref() -> None:
    text = JSON.encode("RESOURCE_STATE", {"state": b"\x00\x01\xff", "revision": 0}, ref="j1")
    assert isinstance(text, str)
    assert json.loads(text) == {"type": "RESOURCE_STATE", "ref": "j1", "data": {"state": "AAH/", "revision": 0}}


def test_json_leaves_out_a_missing_ref() -> None:
    assert "ref" not in json.loads(JSON.encode("USER_LEFT", {"resourceId": PAGE, "userId": "u"}))


def test_msgpack_encodes_bytes_raw() -> None:
    raw = MSGPACK.encode("RESOURCE_STATE", {"state": b"\x00\x01\xff"}, ref=4)
    assert isinstance(raw, bytes)
    assert msgpack.unpackb(raw, raw=False) == {"type": "RESOURCE_STATE", "ref": 4, "data": {"state": b"\x00\x01\xff"}}


def test_json_refuses_values_it_cannot_encode() -> None:
    with pytest.raises(TypeError):
        JSON.encode("X", {"bad": object()})


@CODECS
def test_what_the_server_encodes_its_own_parser_reads_back(codec: Codec) -> None:
    encoded = codec.encode("JOIN_RESOURCE", {"resourceId": PAGE, "mode": "viewer", "stateVector": b"\x01\x02"}, 9)
    assert parse_request(codec, encoded) == JoinResource(9, PAGE, "", "viewer", b"\x01\x02")


def test_the_subprotocol_picks_the_codec_json_by_default() -> None:
    assert codec_for(SUBPROTOCOL_MSGPACK) is MSGPACK
    assert codec_for(SUBPROTOCOL_JSON) is JSON
    assert codec_for(None) is JSON
    assert codec_for("something-else") is JSON


def test_error_data_has_a_stable_code_and_a_message() -> None:
    assert error_data(ErrorCode.NOT_JOINED, "not joined", resourceId=PAGE) == {
        "code": "NOT_JOINED", "message": "not joined", "resourceId": PAGE,
    }


# --- nothing but ProtocolError escapes -------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["HEARTBEAT", "JOIN_RESOURCE", "LEAVE_RESOURCE", "NOPE"]) | json_values,
        "ref": json_values,
        "data": st.fixed_dictionaries({}, optional={
            "resourceId": st.text(max_size=20) | json_values,
            "resourceType": json_values,
            "mode": st.sampled_from(["editor", "viewer"]) | json_values,
            "stateVector": st.binary(max_size=8) | st.text(max_size=8) | json_values,
        }) | json_values,
    },
)


def only_protocol_errors(codec: Codec, raw: str | bytes) -> None:
    try:
        parse_request(codec, raw)
    except ProtocolError as error:
        assert isinstance(error.code, ErrorCode)


@CODECS
@given(raw=st.binary(max_size=200) | st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_random_bytes_or_text_raise_nothing_but_protocol_error(codec: Codec, raw: str | bytes) -> None:
    only_protocol_errors(codec, raw)


@given(obj=request_like)
@settings(max_examples=300, deadline=None)
def test_random_request_shaped_json_raises_nothing_but_protocol_error(obj: dict[str, Any]) -> None:
    only_protocol_errors(JSON, json.dumps(obj, default=lambda b: base64.b64encode(b).decode()))


@given(obj=request_like)
@settings(max_examples=300, deadline=None)
def test_random_request_shaped_msgpack_raises_nothing_but_protocol_error(obj: dict[str, Any]) -> None:
    only_protocol_errors(MSGPACK, msgpack.packb(obj, use_bin_type=True))


# --- lock requests and fenced updates (issue 3) ------------------------------------------

FIELD = "document:7/field:dose"


@CODECS
def test_a_lock_acquire_without_room_is_announced_to_the_resource_itself(codec: Codec) -> None:
    request = parse_request(codec, frame(codec, {"type": "LOCK_ACQUIRE", "ref": "a1",
                                                 "data": {"resourceId": PAGE}}))
    assert request == LockAcquireRequest("a1", PAGE, PAGE, None)


@CODECS
def test_a_lock_acquire_parses_its_room_and_ttl(codec: Codec) -> None:
    request = parse_request(codec, frame(codec, {"type": "LOCK_ACQUIRE", "ref": 7, "data": {
        "resourceId": FIELD, "roomId": "document:7", "ttlMs": 5_000}}))
    assert request == LockAcquireRequest(7, FIELD, "document:7", 5_000)


@CODECS
def test_a_lock_acquire_leaves_capping_a_huge_ttl_to_the_lock_machine(codec: Codec) -> None:
    request = parse_request(codec, frame(codec, {"type": "LOCK_ACQUIRE", "data": {
        "resourceId": PAGE, "ttlMs": 10**12}}))
    assert isinstance(request, LockAcquireRequest) and request.ttl_ms == 10**12


@CODECS
def test_a_lock_renew_and_release_parse_their_lock_id(codec: Codec) -> None:
    renew = parse_request(codec, frame(codec, {"type": "LOCK_RENEW", "ref": "n",
                                               "data": {"resourceId": PAGE, "lockId": "abc"}}))
    release = parse_request(codec, frame(codec, {"type": "LOCK_RELEASE", "ref": "l",
                                                 "data": {"resourceId": PAGE, "lockId": "abc"}}))
    assert renew == LockRenewRequest("n", PAGE, "abc")
    assert release == LockReleaseRequest("l", PAGE, "abc")


@CODECS
def test_an_update_without_fencing_fields_is_unfenced(codec: Codec) -> None:
    request = parse_request(codec, frame(codec, {"type": "RESOURCE_UPDATE", "ref": "u", "data": {
        "resourceId": PAGE, "update": binary(codec, b"\x01\x02")}}))
    assert request == ResourceUpdate("u", PAGE, b"\x01\x02", None, None)


@CODECS
def test_an_update_parses_the_lock_and_token_it_is_fenced_with(codec: Codec) -> None:
    request = parse_request(codec, frame(codec, {"type": "RESOURCE_UPDATE", "ref": "u", "data": {
        "resourceId": "document:7", "update": binary(codec, b"\x01"), "lockResourceId": FIELD,
        "fencingToken": 42}}))
    assert request == ResourceUpdate("u", "document:7", b"\x01", FIELD, 42)


ACQ, RENEW, RELEASE, UPDATE = "LOCK_ACQUIRE", "LOCK_RENEW", "LOCK_RELEASE", "RESOURCE_UPDATE"
UPD = base64.b64encode(b"\x01").decode()  # JSON form; the msgpack cases get raw bytes below
LOCK_MALFORMED: list[tuple[str, str, dict[str, Any]]] = [
    ("acquire without resourceId", ACQ, {}),
    ("acquire with empty resourceId", ACQ, {"resourceId": ""}),
    ("acquire with empty roomId", ACQ, {"resourceId": PAGE, "roomId": ""}),
    ("acquire with non-string roomId", ACQ, {"resourceId": PAGE, "roomId": 7}),
    ("acquire with too long roomId", ACQ, {"resourceId": PAGE, "roomId": "r" * (MAX_RESOURCE_ID_CHARS + 1)}),
    ("acquire with zero ttl", ACQ, {"resourceId": PAGE, "ttlMs": 0}),
    ("acquire with negative ttl", ACQ, {"resourceId": PAGE, "ttlMs": -1}),
    ("acquire with fractional ttl", ACQ, {"resourceId": PAGE, "ttlMs": 1500.5}),
    ("acquire with string ttl", ACQ, {"resourceId": PAGE, "ttlMs": "30000"}),
    ("acquire with boolean ttl", ACQ, {"resourceId": PAGE, "ttlMs": True}),
    ("renew without lockId", RENEW, {"resourceId": PAGE}),
    ("renew with empty lockId", RENEW, {"resourceId": PAGE, "lockId": ""}),
    ("renew with non-string lockId", RENEW, {"resourceId": PAGE, "lockId": 12}),
    ("renew with too long lockId", RENEW, {"resourceId": PAGE, "lockId": "x" * 129}),
    ("renew without resourceId", RENEW, {"lockId": "abc"}),
    ("release without lockId", RELEASE, {"resourceId": PAGE}),
    ("release with null lockId", RELEASE, {"resourceId": PAGE, "lockId": None}),
    ("release without resourceId", RELEASE, {"lockId": "abc"}),
    ("fenced update without token", UPDATE, {"resourceId": PAGE, "update": UPD, "lockResourceId": FIELD}),
    ("fenced update without lock", UPDATE, {"resourceId": PAGE, "update": UPD, "fencingToken": 3}),
    ("fenced update with zero token", UPDATE, {"resourceId": PAGE, "update": UPD, "lockResourceId": FIELD,
                                               "fencingToken": 0}),
    ("fenced update with negative token", UPDATE, {"resourceId": PAGE, "update": UPD, "lockResourceId": FIELD,
                                                   "fencingToken": -4}),
    ("fenced update with string token", UPDATE, {"resourceId": PAGE, "update": UPD, "lockResourceId": FIELD,
                                                 "fencingToken": "4"}),
    ("fenced update with fractional token", UPDATE, {"resourceId": PAGE, "update": UPD, "lockResourceId": FIELD,
                                                     "fencingToken": 4.5}),
    ("fenced update with boolean token", UPDATE, {"resourceId": PAGE, "update": UPD, "lockResourceId": FIELD,
                                                  "fencingToken": True}),
    ("fenced update with empty lock", UPDATE, {"resourceId": PAGE, "update": UPD, "lockResourceId": "",
                                               "fencingToken": 4}),
    ("fenced update with non-string lock", UPDATE, {"resourceId": PAGE, "update": UPD, "lockResourceId": 9,
                                                    "fencingToken": 4}),
]


@CODECS
@pytest.mark.parametrize(("case", "type_", "data"), LOCK_MALFORMED, ids=[m[0] for m in LOCK_MALFORMED])
def test_a_malformed_lock_request_or_fence_is_a_bad_request_with_its_ref(
        codec: Codec, case: str, type_: str, data: dict[str, Any]) -> None:
    if codec is MSGPACK and "update" in data:
        data = {**data, "update": b"\x01"}
    error = refused(codec, frame(codec, {"type": type_, "ref": "bad", "data": data}))
    assert (error.code, error.ref) == (ErrorCode.BAD_REQUEST, "bad")


lock_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["LOCK_ACQUIRE", "LOCK_RENEW", "LOCK_RELEASE", "RESOURCE_UPDATE"])},
    optional={
        "ref": json_values,
        "data": st.fixed_dictionaries({}, optional={
            "resourceId": st.text(max_size=20) | json_values,
            "roomId": st.text(max_size=20) | json_values,
            "ttlMs": st.integers(-(2**63), 2**64 - 1) | json_values,
            "lockId": st.text(max_size=20) | json_values,
            "update": st.binary(max_size=8) | json_values,
            "lockResourceId": st.text(max_size=20) | json_values,
            "fencingToken": st.integers(-(2**63), 2**64 - 1) | json_values,
        }) | json_values,
    },
)


@CODECS
@given(obj=lock_like)
@settings(max_examples=300, deadline=None)
def test_random_lock_shaped_requests_raise_nothing_but_protocol_error(codec: Codec, obj: dict[str, Any]) -> None:
    raw = (json.dumps(obj, default=lambda b: base64.b64encode(b).decode()) if codec is JSON
           else msgpack.packb(obj, use_bin_type=True))
    only_protocol_errors(codec, raw)
