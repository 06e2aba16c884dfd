"""Writing one message to many WebSockets: frame it once, write the bytes.

`websockets.broadcast` builds the frame again for every recipient (in Python:
a `Frame`, its serialisation, the protocol's output queue) before the one
`write` each needs. A server's frames are not masked and we negotiate no
extension (`compression=None`), so the bytes on the wire are the same for
every recipient: `frame` builds them once (RFC 6455 §5.2) and `send_frame`
hands them to each open connection's transport. Like `broadcast`, it skips
connections that are not open (their closing handshake has begun) and never
blocks; we never send fragmented messages, so nothing can be interleaved.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

_OPEN = State.OPEN
_TEXT, _BINARY = 0x81, 0x82  # FIN + opcode


def frame(message: str | bytes) -> bytes:
    """One complete, unmasked WebSocket frame carrying `message` (text for
    `str`, binary for `bytes`)."""
    if isinstance(message, str):
        payload, first = message.encode(), _TEXT
    else:
        payload, first = bytes(message), _BINARY
    size = len(payload)
    if size < 126:
        header = bytes((first, size))
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, 126, size)
    else:
        header = struct.pack("!BBQ", first, 127, size)
    return header + payload


def send_frame(connections: Iterable[ServerConnection], data: bytes) -> None:
    """Write a frame made by `frame` to every open connection."""
    for ws in connections:
        if ws.protocol.state is _OPEN:
            transport = ws.transport
            if transport is not None and not transport.is_closing():
                transport.write(data)
