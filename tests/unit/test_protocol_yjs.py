"""The y-websocket wire format (rounds.protocol.yjs) against bytes made by the real
yjs 13.6 / y-protocols 1.0 / lib0 (`node tests/interop/vectors.mjs` prints
them), round trips, and random bytes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rounds.protocol.yjs import (
    MAX_VARUINT,
    AuthMessage,
    AwarenessEntry,
    AwarenessMessage,
    QueryAwareness,
    Reader,
    SyncStep1,
    SyncStep2,
    SyncUpdate,
    YProtocolError,
    awareness_message,
    decode_awareness,
    decode_message,
    encode_awareness,
    permission_denied,
    query_awareness,
    sync_step1,
    sync_step2,
    sync_update,
    write_var_bytes,
    write_var_string,
    write_varuint,
)

# --- fixtures from Node (yjs 13.6.33, y-protocols 1.0.7, lib0 0.2.120) -------
# A doc with client id 1234567, Text "t" = "héllo" and Map "m" = {k: 1}.
STATE_VECTOR = bytes.fromhex("0187ad4b06")
UPDATE_V1 = bytes.fromhex("010287ad4b00040101740668c3a96c6c6f2801016d016b017d0100")
SYNC_STEP1_FRAME = bytes.fromhex("0000050187ad4b06")
SYNC_STEP2_FRAME = bytes.fromhex("00011b010287ad4b00040101740668c3a96c6c6f2801016d016b017d0100")
SYNC_UPDATE_FRAME = bytes.fromhex("00021b010287ad4b00040101740668c3a96c6c6f2801016d016b017d0100")
# encodeAwarenessUpdate after setLocalState({user: {...}, cursor: {index: 3}}), then after setLocalState(null)
AWARENESS_STATE = '{"user":{"name":"Dr. Ada","color":"#30bced"},"cursor":{"index":3}}'
AWARENESS_LIVE = bytes.fromhex(
    "0187ad4b01427b2275736572223a7b226e616d65223a2244722e20416461222c22636f6c6f72223a2223333062"
    "636564227d2c22637572736f72223a7b22696e646578223a337d7d"
)
AWARENESS_REMOVED = bytes.fromhex("0187ad4b02046e756c6c")
AWARENESS_BIG_CLIENT = bytes.fromhex("01858080801000027b7d")  # client id 2**32 + 5, state {}
AWARENESS_FRAME = bytes.fromhex("0148") + AWARENESS_LIVE
QUERY_AWARENESS_FRAME = bytes.fromhex("03")
PERMISSION_DENIED_FRAME = bytes.fromhex("0200096e6f20616363657373")  # reason "no access"
VARUINTS = [(0, "00"), (127, "7f"), (128, "8001"), (300, "ac02"), (2**32, "8080808010"),
            (2**53 - 1, "ffffffffffffff0f")]
VAR_STRING = ("Zoë 🩺", "095a6fc3ab20f09fa9ba")


# --- lib0 primitives ----------------------------------------------------------


@pytest.mark.parametrize(("value", "hex_"), VARUINTS)
def test_varuints_are_written_and_read_as_lib0_does(value: int, hex_: str) -> None:
    out = bytearray()
    write_varuint(out, value)
    assert out.hex() == hex_
    assert Reader(bytes.fromhex(hex_)).varuint() == value


def test_var_strings_are_utf8_with_a_byte_length_as_lib0_writes_them() -> None:
    text, hex_ = VAR_STRING
    out = bytearray()
    write_var_string(out, text)
    assert out.hex() == hex_
    assert Reader(out).var_string() == text


def test_a_varuint_above_the_javascript_safe_integer_is_refused() -> None:
    with pytest.raises(YProtocolError):
        Reader(bytes.fromhex("8080808080808010")).varuint()  # 2**53


def test_a_varuint_of_more_than_eight_bytes_is_refused_even_when_small() -> None:
    with pytest.raises(YProtocolError):
        Reader(bytes.fromhex("808080808080808000")).varuint()


def test_a_varuint_cut_short_is_refused() -> None:
    with pytest.raises(YProtocolError):
        Reader(bytes.fromhex("8080")).varuint()


def test_writing_a_varuint_out_of_range_is_a_bug_not_a_protocol_error() -> None:
    for value in (-1, MAX_VARUINT + 1):
        with pytest.raises(ValueError) as info:
            write_varuint(bytearray(), value)
        assert not isinstance(info.value, YProtocolError)


# --- frames ---------------------------------------------------------------------


def test_frames_made_by_y_protocols_decode_to_their_messages() -> None:
    assert decode_message(SYNC_STEP1_FRAME) == SyncStep1(STATE_VECTOR)
    assert decode_message(SYNC_STEP2_FRAME) == SyncStep2(UPDATE_V1)
    assert decode_message(SYNC_UPDATE_FRAME) == SyncUpdate(UPDATE_V1)
    assert decode_message(AWARENESS_FRAME) == AwarenessMessage(AWARENESS_LIVE)
    assert decode_message(QUERY_AWARENESS_FRAME) == QueryAwareness()
    assert decode_message(PERMISSION_DENIED_FRAME) == AuthMessage(bytes.fromhex("00096e6f20616363657373"))


def test_our_frames_are_byte_for_byte_those_of_y_protocols() -> None:
    assert sync_step1(STATE_VECTOR) == SYNC_STEP1_FRAME
    assert sync_step2(UPDATE_V1) == SYNC_STEP2_FRAME
    assert sync_update(UPDATE_V1) == SYNC_UPDATE_FRAME
    assert awareness_message(AWARENESS_LIVE) == AWARENESS_FRAME
    assert query_awareness() == QUERY_AWARENESS_FRAME
    assert permission_denied("no access") == PERMISSION_DENIED_FRAME


def test_a_frame_accepts_a_memoryview() -> None:
    assert decode_message(memoryview(SYNC_UPDATE_FRAME)) == SyncUpdate(UPDATE_V1)


@pytest.mark.parametrize(("frame", "why"), [
    (b"", "empty"),
    (b"\x04", "unknown message type"),
    (b"\x00\x03\x00", "unknown sync type"),
    (b"\x00", "sync type missing"),
    (b"\x00\x02", "update length missing"),
    (SYNC_UPDATE_FRAME[:-1], "update cut short"),
    (b"\x00\x02\xff\xff\xff\x7f", "length far beyond the frame"),
    (b"\x01", "awareness length missing"),
    (AWARENESS_FRAME[:-1], "awareness cut short"),
    (SYNC_STEP1_FRAME + b"\x00", "a byte after the message"),
    (QUERY_AWARENESS_FRAME + b"\x00", "a byte after a query"),
])
def test_a_malformed_frame_raises_a_protocol_error(frame: bytes, why: str) -> None:
    with pytest.raises(YProtocolError):
        decode_message(frame)


def test_a_y_js_v2_update_passes_the_frame_codec_unread() -> None:
    # Whether an update is V1 is the document's question, not the frame's.
    v2ish = bytes.fromhex("000000010203")
    assert decode_message(sync_update(v2ish)) == SyncUpdate(v2ish)


# --- awareness updates -------------------------------------------------------------


def test_awareness_updates_from_y_protocols_decode_to_entries() -> None:
    assert decode_awareness(AWARENESS_LIVE) == [AwarenessEntry(1234567, 1, AWARENESS_STATE)]
    assert decode_awareness(AWARENESS_REMOVED) == [AwarenessEntry(1234567, 2, "null")]
    assert decode_awareness(AWARENESS_BIG_CLIENT) == [AwarenessEntry(2**32 + 5, 0, "{}")]
    assert decode_awareness(AWARENESS_REMOVED)[0].removed
    assert not decode_awareness(AWARENESS_LIVE)[0].removed


def test_our_awareness_updates_are_byte_for_byte_those_of_y_protocols() -> None:
    assert encode_awareness([AwarenessEntry(1234567, 1, AWARENESS_STATE)]) == AWARENESS_LIVE
    assert encode_awareness([AwarenessEntry(1234567, 2, "null")]) == AWARENESS_REMOVED
    assert encode_awareness([AwarenessEntry(2**32 + 5, 0, "{}")]) == AWARENESS_BIG_CLIENT


def test_an_empty_awareness_update_has_no_entries() -> None:
    assert decode_awareness(b"\x00") == []
    assert encode_awareness([]) == b"\x00"


def test_null_written_with_spaces_still_means_removed() -> None:
    entry = decode_awareness(encode_awareness([AwarenessEntry(1, 1, " null ")]))[0]
    assert entry.state == "null"
    assert entry.removed


def _update_with_state(state: bytes) -> bytes:
    return b"\x01\x01\x01" + bytes([len(state)]) + state


@pytest.mark.parametrize(("update", "why"), [
    (b"", "count missing"),
    (b"\x01", "entry missing"),
    (b"\x02\x01\x01\x02{}", "second entry missing"),
    (b"\xff\xff\xff\x0f\x01\x01\x00", "count far beyond the bytes"),
    (_update_with_state(b"{"), "not JSON"),
    (_update_with_state(b""), "empty state"),
    (_update_with_state(b"NaN"), "NaN is not JSON for JSON.parse"),
    (_update_with_state(b"-Infinity"), "Infinity is not JSON for JSON.parse"),
    (_update_with_state(b'"\xff"'), "not UTF-8"),
    (_update_with_state(b"{}") + b"\x00", "a byte after the entries"),
    (b"\x01\x01\x01\x82\x01" + b"[" * 130, "unclosed arrays"),
])
def test_a_malformed_awareness_update_raises_a_protocol_error(update: bytes, why: str) -> None:
    with pytest.raises(YProtocolError):
        decode_awareness(update)


def test_state_nested_too_deep_for_the_parser_is_a_protocol_error_not_a_recursion_error() -> None:
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    update = bytearray(b"\x01\x01\x01")
    write_var_bytes(update, deep)
    with pytest.raises(YProtocolError):
        decode_awareness(bytes(update))


# --- properties ------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
varuints = st.integers(0, MAX_VARUINT)
entries = st.builds(
    AwarenessEntry, varuints, varuints,
    json_values.map(lambda v: json.dumps(v, separators=(",", ":"), ensure_ascii=False)),
)


@given(st.binary(max_size=64))
def test_random_bytes_never_raise_anything_but_a_protocol_error_as_a_frame(data: bytes) -> None:
    try:
        decode_message(data)
    except YProtocolError:
        pass


@given(st.binary(max_size=64))
def test_random_bytes_never_raise_anything_but_a_protocol_error_as_awareness(data: bytes) -> None:
    try:
        decode_awareness(data)
    except YProtocolError:
        pass


@given(st.lists(st.integers(0, 3) | st.sampled_from([0x7F, 0x80, 0xFF]), max_size=40))
def test_bytes_near_valid_awareness_never_raise_anything_but_a_protocol_error(data: list[int]) -> None:
    # Random bytes are rarely more than a count; these often reach the states.
    for prefix in (b"\x01\x01\x01", b"\x02"):
        try:
            decode_awareness(prefix + bytes(data))
        except YProtocolError:
            pass


@given(varuints)
def test_every_varuint_in_range_reads_back(value: int) -> None:
    out = bytearray()
    write_varuint(out, value)
    reader = Reader(bytes(out))
    assert reader.varuint() == value
    assert reader.remaining == 0


@given(st.binary(max_size=300))
def test_sync_and_awareness_frames_decode_to_what_was_encoded(payload: bytes) -> None:
    assert decode_message(sync_step1(payload)) == SyncStep1(payload)
    assert decode_message(sync_step2(payload)) == SyncStep2(payload)
    assert decode_message(sync_update(payload)) == SyncUpdate(payload)
    assert decode_message(awareness_message(payload)) == AwarenessMessage(payload)


@given(st.lists(entries, max_size=5))
def test_awareness_entries_decode_to_what_was_encoded(items: list[AwarenessEntry]) -> None:
    assert decode_awareness(encode_awareness(items)) == items
