"""The internal link between front doors and shards: its frames.

A frame is a 4-byte big-endian length and a msgpack array `[tag, *fields]`
(DESIGN.md, "Data plane"). The link carries the vocabulary of
`rounds.protocol.messages`, plus `Hello` (a front door's first frame) and the
cross-node relay's own frames. No I/O here: `rounds.protocol.stream` reads
and writes these frames on a socket.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import msgpack

from rounds.ids import FrontDoorId
from rounds.protocol.messages import (
    Awareness,
    Deliver,
    Disconnect,
    DocSync,
    DocUpdate,
    Join,
    Leave,
    LockAcquire,
    LockRelease,
    LockRenew,
    Reply,
    Sync,
)

MAX_FRAME_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame of a front door on a new link."""

    frontdoor: FrontDoorId
    epoch: str  # new each time the front door process starts
    node: str = ""  # the node it runs on: the shard relays to other nodes' front doors (rounds.relay)


@dataclass(frozen=True, slots=True)
class RelayBatch:
    """Shard → front door on another node, over the link: a numbered batch
    of frames the relay could not carry, or that the front door asked for."""

    shard: int
    epoch: str  # the shard's epoch
    to: str  # the front door's epoch the stream is for: a restarted front door ignores the old one's
    seq: int
    body: bytes  # length-prefixed frames (`decode_frames`)


@dataclass(frozen=True, slots=True)
class RelayAck:
    """Front door → shard: every batch up to `through` is delivered;
    `missing` (0: none) is the number it waits for; `consuming`: whether it
    is reading its RabbitMQ queue (if not, the shard sends over the link)."""

    frontdoor: FrontDoorId
    epoch: str  # the shard epoch it acknowledges
    through: int
    missing: int
    consuming: bool = True


@dataclass(frozen=True, slots=True)
class RelayReset:
    """Shard → front door: the batches up to `through` are gone (the shard's
    buffer was full); go on from there."""

    shard: int
    epoch: str
    through: int


LinkMessage = (Hello | Sync | Join | Leave | Disconnect | LockAcquire | LockRenew | LockRelease
               | DocUpdate | DocSync | Awareness | Reply | Deliver | RelayBatch | RelayAck | RelayReset)

_TAGS: dict[type, int] = {
    Hello: 1, Sync: 2, Join: 3, Leave: 4, Disconnect: 5,
    LockAcquire: 6, LockRenew: 7, LockRelease: 8,
    Reply: 10, Deliver: 11, DocUpdate: 12, DocSync: 13, Awareness: 14,
    RelayBatch: 15, RelayAck: 16, RelayReset: 17,
}
_CLASSES = {tag: cls for cls, tag in _TAGS.items()}
_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in _TAGS}


def _to_wire(msg: Any) -> list[Any]:
    if isinstance(msg, Sync):
        return [_TAGS[Sync], msg.frontdoor, [_to_wire(j) for j in msg.joins]]
    return [_TAGS[type(msg)], *(getattr(msg, name) for name in _FIELDS[type(msg)])]


def _from_wire(items: list[Any]) -> LinkMessage:
    cls = _CLASSES[items[0]]
    if cls is Sync:
        return Sync(items[1], tuple(Join(*j[1:]) for j in items[2]))
    if cls is Deliver:
        return Deliver(tuple(items[1]), items[2], items[3])
    message: LinkMessage = cls(*items[1:])
    return message


def encode(msg: LinkMessage) -> bytes:
    body: bytes = msgpack.packb(_to_wire(msg), use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def decode(body: bytes | memoryview) -> LinkMessage:
    return _from_wire(msgpack.unpackb(body, raw=False, use_list=True))


def decode_frames(data: bytes) -> list[LinkMessage]:
    """The messages of complete length-prefixed frames (a relay batch's body).
    Raises ValueError on a truncated frame."""
    messages, offset, view = [], 0, memoryview(data)
    while offset < len(data):
        if len(data) - offset < 4:
            raise ValueError("truncated frame header")
        size = int.from_bytes(view[offset:offset + 4], "big")
        if len(data) - offset - 4 < size:
            raise ValueError("truncated frame")
        messages.append(decode(view[offset + 4:offset + 4 + size]))
        offset += 4 + size
    return messages
