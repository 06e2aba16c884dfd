"""The y-websocket wire format: lib0 encoding and the y-protocols messages.

What stock `y-websocket` (`WebsocketProvider`) and `y-protocols` put in one
binary WebSocket frame, as bytes in and typed messages out (DESIGN.md,
"`/yjs/{resourceId}`"). A frame is a varuint message type and its body:

    MSG_SYNC            varuint sync type (0 step 1, 1 step 2, 2 update), varUint8Array
    MSG_AWARENESS       varUint8Array: an awareness update (see `decode_awareness`)
    MSG_AUTH            the auth sub-message, kept raw (0 = permission denied + varString reason)
    MSG_QUERY_AWARENESS nothing

lib0 encodings: a varuint is little-endian base 128, high bit = "more";
a varUint8Array is a varuint length and that many bytes; a varString is a
varUint8Array of UTF-8.

Decoding is strict, so that a frame we accept means one thing and can be
relayed as it is: a truncated field, an unknown type, a varuint above
`MAX_VARUINT` (JavaScript's `Number.MAX_SAFE_INTEGER`, beyond which lib0
loses precision) or longer than 8 bytes, invalid UTF-8, awareness state that is not JSON, and
bytes left over after the message (stock clients never send any; lib0
would silently ignore them) all raise `YProtocolError`. Lengths are checked
against the bytes that remain before anything is sliced. The Y.js update
inside a sync message is not looked at here: checking it is the document's
job. Exceptions other than `YProtocolError` mean a bug in this module.

No I/O in this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

MSG_SYNC = 0
MSG_AWARENESS = 1
MSG_AUTH = 2
MSG_QUERY_AWARENESS = 3

SYNC_STEP1 = 0
SYNC_STEP2 = 1
SYNC_UPDATE = 2

AUTH_PERMISSION_DENIED = 0

MAX_VARUINT = 2**53 - 1  # Number.MAX_SAFE_INTEGER: what a JavaScript peer reads exactly
_MAX_VARUINT_BYTES = 8

NULL_STATE = "null"  # the state text of a removed awareness client
# What the gateway keeps of awareness: client ids one connection may own (a
# y-websocket connection carries one), and the UTF-8 size of one state.
MAX_AWARENESS_CLIENTS_PER_CONN = 16
MAX_AWARENESS_STATE_BYTES = 16 * 1024


class YProtocolError(ValueError):
    """The peer sent bytes that are not a y-websocket message. Answer the
    sender (or close its connection); never a bug on our side."""


# --- messages ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyncStep1:
    """The peer's state vector: answer with `sync_step2` of what it lacks."""

    state_vector: bytes


@dataclass(frozen=True, slots=True)
class SyncStep2:
    """What the peer has and we lacked (its answer to our step 1): apply it."""

    update: bytes


@dataclass(frozen=True, slots=True)
class SyncUpdate:
    """A Y.js update the peer made: apply it and relay it."""

    update: bytes


@dataclass(frozen=True, slots=True)
class AwarenessMessage:
    """An awareness update, raw; `decode_awareness` reads it."""

    update: bytes


@dataclass(frozen=True, slots=True)
class QueryAwareness:
    """The peer asks for every current awareness state."""


@dataclass(frozen=True, slots=True)
class AuthMessage:
    """The auth sub-message after the type byte, raw (servers send it; a
    client sending one is unusual but well-formed)."""

    payload: bytes


YMessage = SyncStep1 | SyncStep2 | SyncUpdate | AwarenessMessage | QueryAwareness | AuthMessage


@dataclass(frozen=True, slots=True)
class AwarenessEntry:
    """One client's awareness: its clock and its state as JSON text
    (`NULL_STATE`, "null", when the client is gone)."""

    client_id: int
    clock: int
    state: str

    @property
    def removed(self) -> bool:
        return self.state == NULL_STATE


# --- lib0 primitives --------------------------------------------------------


def write_varuint(out: bytearray, value: int) -> None:
    """Append `value` as a lib0 varuint. A value out of range is our bug."""
    if value < 0 or value > MAX_VARUINT:
        raise ValueError(f"varuint out of range: {value}")
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)


def write_var_bytes(out: bytearray, data: bytes) -> None:
    """Append a lib0 varUint8Array: the length, then the bytes."""
    write_varuint(out, len(data))
    out += data


def write_var_string(out: bytearray, text: str) -> None:
    """Append a lib0 varString: the UTF-8 length, then the UTF-8."""
    write_var_bytes(out, text.encode("utf-8"))


class Reader:
    """A cursor over untrusted bytes; every read raises `YProtocolError`
    rather than reading past the end."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def varuint(self) -> int:
        data, pos = self._data, self._pos
        # 8 bytes carry 56 bits: enough for MAX_VARUINT, and it bounds the
        # work on a run of continuation bytes.
        end = min(len(data), pos + _MAX_VARUINT_BYTES)
        value = 0
        shift = 0
        while pos < end:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                if value > MAX_VARUINT:
                    raise YProtocolError("varuint exceeds 2**53 - 1")
                self._pos = pos
                return value
            shift += 7
        if pos - self._pos == _MAX_VARUINT_BYTES:
            raise YProtocolError(f"varuint longer than {_MAX_VARUINT_BYTES} bytes")
        raise YProtocolError("truncated varuint")

    def raw(self, size: int) -> bytes:
        if size > self.remaining:
            raise YProtocolError(f"length {size} exceeds the {self.remaining} bytes left")
        start = self._pos
        self._pos += size
        return self._data[start : self._pos]

    def var_bytes(self) -> bytes:
        return self.raw(self.varuint())

    def var_string(self) -> str:
        try:
            return self.var_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise YProtocolError("string is not valid UTF-8") from exc

    def rest(self) -> bytes:
        return self.raw(self.remaining)

    def end(self, what: str) -> None:
        if self.remaining:
            raise YProtocolError(f"{self.remaining} bytes after the {what}")


# --- frames -----------------------------------------------------------------


def decode_message(frame: bytes) -> YMessage:
    """One binary frame -> its message; `YProtocolError` if malformed."""
    reader = Reader(bytes(frame))
    kind = reader.varuint()
    message: YMessage
    if kind == MSG_SYNC:
        sync_kind = reader.varuint()
        if sync_kind not in _SYNC_MESSAGES:
            raise YProtocolError(f"unknown sync message type {sync_kind}")
        message = _SYNC_MESSAGES[sync_kind](reader.var_bytes())
    elif kind == MSG_AWARENESS:
        message = AwarenessMessage(reader.var_bytes())
    elif kind == MSG_AUTH:
        message = AuthMessage(reader.rest())
    elif kind == MSG_QUERY_AWARENESS:
        message = QueryAwareness()
    else:
        raise YProtocolError(f"unknown message type {kind}")
    reader.end("message")
    return message


_SYNC_MESSAGES: dict[int, type[SyncStep1] | type[SyncStep2] | type[SyncUpdate]] = {
    SYNC_STEP1: SyncStep1, SYNC_STEP2: SyncStep2, SYNC_UPDATE: SyncUpdate,
}


def _sync(kind: int, payload: bytes) -> bytes:
    out = bytearray((MSG_SYNC, kind))
    write_var_bytes(out, payload)
    return bytes(out)


def sync_step1(state_vector: bytes) -> bytes:
    """Frame: our state vector, asking the peer for what we lack."""
    return _sync(SYNC_STEP1, state_vector)


def sync_step2(update: bytes) -> bytes:
    """Frame: the answer to a step 1 (stock clients count as synced on it)."""
    return _sync(SYNC_STEP2, update)


def sync_update(update: bytes) -> bytes:
    """Frame: a Y.js (v1) update to apply."""
    return _sync(SYNC_UPDATE, update)


def awareness_message(update: bytes) -> bytes:
    """Frame: an awareness update (as made by `encode_awareness`)."""
    out = bytearray((MSG_AWARENESS,))
    write_var_bytes(out, update)
    return bytes(out)


def query_awareness() -> bytes:
    """Frame: ask the peer for every awareness state it knows."""
    return bytes((MSG_QUERY_AWARENESS,))


def permission_denied(reason: str) -> bytes:
    """Frame: stock clients log `reason` (y-protocols' auth message); they
    do not disconnect by themselves, so close the connection after it."""
    out = bytearray((MSG_AUTH, AUTH_PERMISSION_DENIED))
    write_var_string(out, reason)
    return bytes(out)


# --- awareness updates ------------------------------------------------------


def _reject_constant(name: str) -> None:
    # Python's json reads NaN and Infinity; JSON.parse in the clients does not.
    raise ValueError(f"{name} is not JSON")


def _check_json(text: str) -> str:
    """The state text itself, or "null" for any spelling of null; raises
    `YProtocolError` unless `JSON.parse` would read it."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested arrays
        raise YProtocolError("awareness state is not JSON") from exc
    return NULL_STATE if value is None else text


def decode_awareness(update: bytes) -> list[AwarenessEntry]:
    """An awareness update -> its entries, in order; `YProtocolError` if
    malformed or if a state is not JSON text."""
    reader = Reader(bytes(update))
    count = reader.varuint()
    # Each entry takes at least 3 bytes: never trust a count to size anything.
    if count * 3 > reader.remaining:
        raise YProtocolError(f"{count} awareness entries cannot fit in {reader.remaining} bytes")
    entries = []
    for _ in range(count):
        client_id = reader.varuint()
        clock = reader.varuint()
        entries.append(AwarenessEntry(client_id, clock, _check_json(reader.var_string())))
    reader.end("awareness update")
    return entries


def encode_awareness(entries: Iterable[AwarenessEntry]) -> bytes:
    """Entries -> an awareness update, as `encodeAwarenessUpdate` writes it."""
    entries = list(entries)
    out = bytearray()
    write_varuint(out, len(entries))
    for entry in entries:
        write_varuint(out, entry.client_id)
        write_varuint(out, entry.clock)
        write_var_string(out, entry.state)
    return bytes(out)
