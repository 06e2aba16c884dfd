"""The internal link between front doors and shards.

Frames are a 4-byte big-endian length and a msgpack array `[tag, *fields]`
(DESIGN.md, "Data plane"). Writes are coalesced: every `send` in one event
loop tick goes out in a single `transport.write`. The link carries the shard
vocabulary of `shard.events` plus `Hello`, the link's first frame.

Bounds: a frame larger than `MAX_FRAME_BYTES` is a bug on the other side and
closes the link; a peer that stops reading for more than
`MAX_BUFFERED_BYTES` is cut off, and the front door resynchronises on
reconnect (`Sync`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from rounds.ids import FrontDoorId
from rounds.shard.events import Awareness, Deliver, Disconnect, DocSync, DocUpdate, Join, Leave, Reply, Sync
from rounds.shard.lock_events import LockAcquire, LockRelease, LockRenew

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 16 * 1024 * 1024
MAX_BUFFERED_BYTES = 64 * 1024 * 1024


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
        return Sync(items[1], tuple(_from_wire(j) for j in items[2]))  # type: ignore[misc]
    if cls is Deliver:
        return Deliver(tuple(items[1]), items[2], items[3])
    return cls(*items[1:])


def encode(msg: LinkMessage) -> bytes:
    body = msgpack.packb(_to_wire(msg), use_bin_type=True)
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


class LinkProtocol(asyncio.Protocol):
    """Framing and coalesced writes; the owner gives the two callbacks."""

    def __init__(self, on_message: Callable[[LinkMessage], None], on_lost: Callable[[Exception | None], None]) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self._buf = bytearray()
        self._pending: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._flush_scheduled = False
        self.closed = False

    # --- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport: no isinstance.
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self.closed

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        offset = 0
        end = len(buf)
        view = memoryview(buf)
        try:
            while end - offset >= 4:
                size = int.from_bytes(view[offset : offset + 4], "big")
                if size > MAX_FRAME_BYTES:
                    log.error("link frame of %d bytes exceeds the limit; closing the link", size)
                    self.close()
                    return
                if end - offset - 4 < size:
                    break
                msg = decode(view[offset + 4 : offset + 4 + size])
                offset += 4 + size
                try:
                    self._on_message(msg)
                except Exception:  # a bug in a handler must not kill the link
                    log.exception("link message handler failed for %s", type(msg).__name__)
        finally:
            view.release()
        if offset:
            del buf[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._transport = None
        self._pending.clear()
        self._on_lost(exc)

    # --- sending --------------------------------------------------------------

    def send(self, msg: LinkMessage) -> bool:
        """Queue a message for this tick's write; False if the link is closed."""
        if self.closed or self._transport is None:
            return False
        self._pending.append(encode(msg))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return True

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self._transport
        if transport is None or not self._pending:
            return
        data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending.clear()
        transport.write(data)
        if transport.get_write_buffer_size() > MAX_BUFFERED_BYTES:
            log.error("link peer is not reading (%d bytes buffered); closing the link",
                      transport.get_write_buffer_size())
            self.close()

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self.closed = True
            self._transport.close()
