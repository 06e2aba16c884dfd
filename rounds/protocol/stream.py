"""The link's byte stream: length-prefixed frames over a TCP connection.

Writes are coalesced: every `send` in one event loop tick goes out in a
single `transport.write`. Reading hands each complete frame, decoded by
`rounds.protocol.link`, to the owner's callback.

Bounds: a frame larger than `MAX_FRAME_BYTES` is a bug on the other side and
closes the link; a peer that stops reading for more than
`MAX_BUFFERED_BYTES` is cut off, and the front door resynchronises on
reconnect (`Sync`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import cast

from rounds.protocol.link import MAX_FRAME_BYTES, LinkMessage, decode, encode

log = logging.getLogger(__name__)

MAX_BUFFERED_BYTES = 64 * 1024 * 1024


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
        self._transport = cast(asyncio.Transport, transport)
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
