"""The `/ws` wire protocol, v1: message names, error codes, close codes, codecs.

Names here are fixed by DESIGN.md ("Wire protocol v1"); outside checks depend
on them. Frames are `{"type": T, "ref": R, "data": {...}}`: JSON text by
default, msgpack binary with subprotocol `rounds.v1.msgpack`. Binary values
(Y.js updates, state vectors) are base64 strings in JSON and raw bytes in
msgpack. `parse_request` turns a client frame into a typed request or raises
`ProtocolError`, which the caller answers with `ERROR` to that client only.
No I/O in this module.
"""

from __future__ import annotations

import base64
import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from rounds.config import MODES
from rounds.ids import ResourceId

SUBPROTOCOL_JSON = "rounds.v1.json"
SUBPROTOCOL_MSGPACK = "rounds.v1.msgpack"
SUBPROTOCOLS = (SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK)
MAX_RESOURCE_ID_CHARS = 512


class MessageType(enum.StrEnum):
    # client -> server
    HEARTBEAT = "HEARTBEAT"
    JOIN_RESOURCE = "JOIN_RESOURCE"
    LEAVE_RESOURCE = "LEAVE_RESOURCE"
    RESOURCE_UPDATE = "RESOURCE_UPDATE"  # also server -> client (relayed)
    LOCK_ACQUIRE = "LOCK_ACQUIRE"
    LOCK_RENEW = "LOCK_RENEW"
    LOCK_RELEASE = "LOCK_RELEASE"
    AWARENESS_UPDATE = "AWARENESS_UPDATE"  # also server -> client (relayed)
    # server -> client
    CONNECTED = "CONNECTED"
    HEARTBEAT_ACK = "HEARTBEAT_ACK"
    RESOURCE_STATE = "RESOURCE_STATE"
    RESOURCE_LEFT = "RESOURCE_LEFT"
    UPDATE_ACK = "UPDATE_ACK"
    USER_JOINED = "USER_JOINED"
    USER_LEFT = "USER_LEFT"
    ALL_USERS = "resource:all_users"  # the seed's exact name
    PERMISSION_DENIED = "PERMISSION_DENIED"
    LOCK_ACQUIRED = "LOCK_ACQUIRED"
    LOCK_DENIED = "LOCK_DENIED"
    LOCK_RENEWED = "LOCK_RENEWED"
    LOCK_RELEASED = "LOCK_RELEASED"
    RESOURCE_LOCKED = "RESOURCE_LOCKED"
    RESOURCE_UNLOCKED = "RESOURCE_UNLOCKED"
    ERROR = "ERROR"
    UNAUTHORIZED = "UNAUTHORIZED"  # HTTP 401 body, before the upgrade


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "BAD_REQUEST"  # not a JSON/msgpack object, or a field is wrong
    UNKNOWN_TYPE = "UNKNOWN_TYPE"
    TOO_LARGE = "TOO_LARGE"  # a frame, an update or the document it would grow
    BAD_UPDATE = "BAD_UPDATE"  # not a Y.js (v1) update; the document is unchanged
    NOT_JOINED = "NOT_JOINED"
    ALREADY_JOINED = "ALREADY_JOINED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    TOO_MANY_ROOMS = "TOO_MANY_ROOMS"
    NOT_LOCK_HOLDER = "NOT_LOCK_HOLDER"  # renew/release of a lock someone else holds
    UNKNOWN_LOCK = "UNKNOWN_LOCK"  # renew/release of a lock that expired or never was
    STALE_LOCK = "STALE_LOCK"  # an update fenced with a token older than the lock's
    UNSUPPORTED = "UNSUPPORTED"  # known request the gateway does not serve yet
    UNAVAILABLE = "UNAVAILABLE"  # the shard owning the resource is not reachable right now
    INTERNAL = "INTERNAL"  # our bug; details are in the server log, never sent


class CloseCode(enum.IntEnum):
    """Close codes, on `/ws` and `/yjs` alike, each telling the client whether
    to reconnect (docs/protocol.md, "Close codes"). Stock y-websocket clients
    reconnect and resync on any code outside 4400-4499."""

    GOING_AWAY = 1001  # server draining: reconnect (to another front door)
    SERVICE_RESTART = 1012  # what was relayed to you was lost (a relay reset): reconnect and resync now
    TRY_AGAIN_LATER = 1013  # your room's shard or store is unavailable: reconnect later, then resync
    IDLE_TIMEOUT = 4008  # no frame within idle timeout: reconnect when active again
    SESSION_REPLACED = 4009
    OVERLOADED = 4013  # per-connection queue overflow: reconnect later
    DOCUMENT_TOO_LARGE = 4413  # y-websocket: the document refused your edit as too large; reconnecting cannot help


# --- requests ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Heartbeat:
    ref: Any


@dataclass(frozen=True, slots=True)
class JoinResource:
    ref: Any
    resource_id: ResourceId
    resource_type: str
    mode: str
    state_vector: bytes | None


@dataclass(frozen=True, slots=True)
class LeaveResource:
    ref: Any
    resource_id: ResourceId


@dataclass(frozen=True, slots=True)
class ResourceUpdate:
    ref: Any
    resource_id: ResourceId
    update: bytes
    # Fencing (issue 3): the lock the writer holds and its token; a stale
    # token is refused with STALE_LOCK.
    lock_resource_id: ResourceId | None = None
    fencing_token: int | None = None


@dataclass(frozen=True, slots=True)
class AwarenessUpdate:
    ref: Any
    resource_id: ResourceId
    update: bytes  # a y-protocols awareness update


@dataclass(frozen=True, slots=True)
class LockAcquireRequest:
    ref: Any
    resource_id: ResourceId
    room_id: ResourceId  # the room told about the lock: `roomId`, else the resource itself
    ttl_ms: int | None


@dataclass(frozen=True, slots=True)
class LockRenewRequest:
    ref: Any
    resource_id: ResourceId
    lock_id: str


@dataclass(frozen=True, slots=True)
class LockReleaseRequest:
    ref: Any
    resource_id: ResourceId
    lock_id: str


Request = (Heartbeat | JoinResource | LeaveResource | ResourceUpdate | AwarenessUpdate | LockAcquireRequest
           | LockRenewRequest | LockReleaseRequest)


class ProtocolError(Exception):
    """The peer sent something wrong: answer with `ERROR {code, message}`."""

    def __init__(self, code: ErrorCode, message: str, ref: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


# --- codecs -----------------------------------------------------------------


class Codec(Protocol):
    """A connection's frame format; `encode` gives None for what it cannot carry
    (the y-websocket codec has no form for presence or lock events)."""

    name: str
    binary_as_base64: bool

    def encode(self, type_: str, data: dict[str, Any], ref: Any = None) -> str | bytes | None: ...

    def decode(self, frame: str | bytes) -> Any: ...


def _frame(type_: str, data: dict[str, Any], ref: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": type_, "data": data}
    if ref is not None:
        frame["ref"] = ref
    return frame


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class JsonCodec:
    name = SUBPROTOCOL_JSON
    binary_as_base64 = True

    def encode(self, type_: str, data: dict[str, Any], ref: Any = None) -> str:
        return json.dumps(_frame(type_, data, ref), separators=(",", ":"), default=_json_default)

    def decode(self, frame: str | bytes) -> Any:
        if isinstance(frame, bytes):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "binary frame on a JSON connection")
        try:
            return json.loads(frame)
        except (ValueError, RecursionError):  # RecursionError: absurdly nested input
            raise ProtocolError(ErrorCode.BAD_REQUEST, "frame is not valid JSON") from None


class MsgpackCodec:
    name = SUBPROTOCOL_MSGPACK
    binary_as_base64 = False

    def encode(self, type_: str, data: dict[str, Any], ref: Any = None) -> bytes:
        packed: bytes = msgpack.packb(_frame(type_, data, ref), use_bin_type=True)
        return packed

    def decode(self, frame: str | bytes) -> Any:
        if isinstance(frame, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "text frame on a msgpack connection")
        try:
            return msgpack.unpackb(frame, raw=False)
        except Exception:  # msgpack raises several unrelated types for bad input
            raise ProtocolError(ErrorCode.BAD_REQUEST, "frame is not valid msgpack") from None


JSON = JsonCodec()
MSGPACK = MsgpackCodec()


def codec_for(subprotocol: str | None) -> Codec:
    return MSGPACK if subprotocol == SUBPROTOCOL_MSGPACK else JSON


# --- request parsing ----------------------------------------------------------


def parse_request(codec: Codec, frame: str | bytes) -> Request:
    """Decode and validate one client frame; raises ProtocolError on any fault."""
    obj = codec.decode(frame)
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame must be an object with a 'type'")
    ref = obj.get("ref")
    if ref is not None and (not isinstance(ref, (str, int)) or isinstance(ref, bool)):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'ref' must be a string or an integer")
    type_ = obj.get("type")
    if not isinstance(type_, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'type' must be a string", ref)
    data = obj.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'data' must be an object", ref)
    parser = _PARSERS.get(type_)
    if parser is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {type_[:64]!r}", ref)
    return parser(codec, ref, data)


def _resource_id(data: dict[str, Any], ref: Any) -> ResourceId:
    value = data.get("resourceId")
    if not isinstance(value, str) or not value:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'resourceId' is required (non-empty string)", ref)
    if len(value) > MAX_RESOURCE_ID_CHARS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'resourceId' is longer than {MAX_RESOURCE_ID_CHARS}", ref)
    return ResourceId(value)


def _binary(codec: Codec, data: dict[str, Any], key: str, ref: Any) -> bytes | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bytes) and not codec.binary_as_base64:
        return value
    if isinstance(value, str) and codec.binary_as_base64:
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{key}' is not valid base64", ref) from None
    kind = "a base64 string" if codec.binary_as_base64 else "binary"
    raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{key}' must be {kind}", ref)


def _heartbeat(codec: Codec, ref: Any, data: dict[str, Any]) -> Heartbeat:
    return Heartbeat(ref)


def _join(codec: Codec, ref: Any, data: dict[str, Any]) -> JoinResource:
    resource_id = _resource_id(data, ref)
    resource_type = data.get("resourceType", "")
    if not isinstance(resource_type, str) or len(resource_type) > 128:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'resourceType' must be a short string", ref)
    mode = data.get("mode", "editor")
    if mode not in MODES:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'mode' must be 'editor' or 'viewer'", ref)
    state_vector = _binary(codec, data, "stateVector", ref)
    return JoinResource(ref, resource_id, resource_type, mode, state_vector)


def _leave(codec: Codec, ref: Any, data: dict[str, Any]) -> LeaveResource:
    return LeaveResource(ref, _resource_id(data, ref))


def _update(codec: Codec, ref: Any, data: dict[str, Any]) -> ResourceUpdate:
    resource_id = _resource_id(data, ref)
    update = _binary(codec, data, "update", ref)
    if not update:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'update' is required (a Y.js update)", ref)
    lock = data.get("lockResourceId")
    token = data.get("fencingToken")
    if (lock is None) != (token is None):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'lockResourceId' and 'fencingToken' go together", ref)
    if lock is not None:
        lock = _resource_id({"resourceId": lock}, ref)
        if not isinstance(token, int) or isinstance(token, bool) or token <= 0:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'fencingToken' must be a positive integer", ref)
    return ResourceUpdate(ref, resource_id, update, lock, token)


def _awareness(codec: Codec, ref: Any, data: dict[str, Any]) -> AwarenessUpdate:
    resource_id = _resource_id(data, ref)
    update = _binary(codec, data, "update", ref)
    if not update:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'update' is required (a y-protocols awareness update)", ref)
    return AwarenessUpdate(ref, resource_id, update)


def _lock_acquire(codec: Codec, ref: Any, data: dict[str, Any]) -> LockAcquireRequest:
    resource_id = _resource_id(data, ref)
    room = data.get("roomId")
    if room is not None:
        room = _resource_id({"resourceId": room}, ref)
    ttl = data.get("ttlMs")
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'ttlMs' must be a positive integer", ref)
    return LockAcquireRequest(ref, resource_id, room or resource_id, ttl)


def _lock_id(data: dict[str, Any], ref: Any) -> str:
    value = data.get("lockId")
    if not isinstance(value, str) or not value or len(value) > 128:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'lockId' is required (the id from LOCK_ACQUIRED)", ref)
    return value


def _lock_renew(codec: Codec, ref: Any, data: dict[str, Any]) -> LockRenewRequest:
    return LockRenewRequest(ref, _resource_id(data, ref), _lock_id(data, ref))


def _lock_release(codec: Codec, ref: Any, data: dict[str, Any]) -> LockReleaseRequest:
    return LockReleaseRequest(ref, _resource_id(data, ref), _lock_id(data, ref))


_PARSERS: dict[str, Callable[[Codec, Any, dict[str, Any]], Request]] = {
    MessageType.HEARTBEAT: _heartbeat,
    MessageType.JOIN_RESOURCE: _join,
    MessageType.LEAVE_RESOURCE: _leave,
    MessageType.RESOURCE_UPDATE: _update,
    MessageType.LOCK_ACQUIRE: _lock_acquire,
    MessageType.LOCK_RENEW: _lock_renew,
    MessageType.LOCK_RELEASE: _lock_release,
    MessageType.AWARENESS_UPDATE: _awareness,
}


def error_data(code: ErrorCode, message: str, **extra: Any) -> dict[str, Any]:
    return {"code": code.value, "message": message, **extra}
