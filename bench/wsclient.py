"""A lean WebSocket client for the document load generator (RFC 6455, client side only).

Why not `websockets`' asyncio client, as the presence bench uses: a document
run receives nine frames per update sent (27,000 a second at 3,000 users),
on the two cores the server under test also needs. Measured on this machine
with 200 connections and 10,000 small frames a second, its recv loop costs
~21 µs of CPU per frame (json.loads included) against ~11 µs for a protocol
that parses frames in `data_received` and hands them on synchronously, with
no future, queue or task per message. The saving is the server's share.

Belongs here: the opening handshake, framing, ping/pong and the closing
handshake, as a pure core (`handshake_request`, `check_handshake`,
`FrameParser`, `encode_frame`) and a thin asyncio shell (`connect`,
`LeanConnection`). Must not be here: anything about the bench (`crdtgen.py`).
Not supported, since the bench does not need them: extensions (compression),
TLS, redirects, proxies. Server frames are expected unmasked, client frames
are masked (with `random`, not a CSPRNG: the mask protects proxies' caches,
and these connections go to loopback only).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

try:
    from websockets.speedups import apply_mask
except ImportError:  # the pure Python fallback of the same library
    from websockets.utils import apply_mask

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_HEAD_BYTES = 16_384  # of the handshake response
CLOSE_NORMAL = 1000
NO_STATUS = 1005  # the close frame had no code
ABNORMAL = 1006  # the connection went without a close frame


class HandshakeError(Exception):
    """The server refused the upgrade (`status` is its HTTP status) or answered nonsense (`status` 0)."""

    def __init__(self, status: int, reason: str, body: bytes = b"") -> None:
        super().__init__(f"HTTP {status}: {reason}" if status else reason)
        self.status = status
        self.body = body


class ProtocolViolation(Exception):
    """The server broke RFC 6455 (a masked frame, a bad length, ...)."""


# --- the pure core ------------------------------------------------------------------


def handshake_request(url: str, key: str, subprotocols: tuple[str, ...] = ()) -> bytes:
    """The HTTP upgrade request for `url` (ws:// only) with `key` (base64 of 16 random bytes)."""
    parts = urlsplit(url)
    if parts.scheme != "ws" or not parts.hostname:
        raise ValueError(f"not a ws:// URL: {url!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {parts.netloc.rpartition('@')[2]}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocols:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(subprotocols)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def accept_value(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode("ascii")).digest()).decode("ascii")


def check_handshake(head: bytes, key: str) -> dict[str, str]:
    """The response headers (lower-case names) if `head` (status line and headers,
    without the blank line) accepts the upgrade for `key`; else HandshakeError."""
    status_line, _, rest = head.partition(b"\r\n")
    fields = status_line.split(b" ", 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/1.") or not fields[1].isdigit():
        raise HandshakeError(0, f"not an HTTP response: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in rest.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if colon:
            headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    status = int(fields[1])
    if status != 101:
        raise HandshakeError(status, fields[2].decode("latin-1", "replace") if len(fields) > 2 else "")
    if headers.get("upgrade", "").lower() != "websocket" or headers.get("sec-websocket-accept") != accept_value(key):
        raise HandshakeError(0, "the server's 101 does not accept this WebSocket key")
    return headers


def encode_frame(opcode: int, payload: bytes, mask: bytes) -> bytes:
    """One final, masked client frame."""
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65_536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    return head + mask + apply_mask(payload, mask)


class FrameParser:
    """Bytes in, whole messages out: `feed(data)` returns (opcode, payload) for
    each complete message (continuations joined; control frames as they come)."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buffer = b""
        self._fragments: list[bytes] = []
        self._fragment_opcode = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buffer = self._buffer + data if self._buffer else data
        out: list[tuple[int, bytes]] = []
        pos, end = 0, len(buffer)
        while end - pos >= 2:
            first, second = buffer[pos], buffer[pos + 1]
            if second & 0x80:
                raise ProtocolViolation("the server masked a frame")
            if first & 0x70:
                raise ProtocolViolation("reserved bits set (no extension was negotiated)")
            length, head = second & 0x7F, 2
            if length == 126:
                if end - pos < 4:
                    break
                length, head = int.from_bytes(buffer[pos + 2:pos + 4], "big"), 4
            elif length == 127:
                if end - pos < 10:
                    break
                length, head = int.from_bytes(buffer[pos + 2:pos + 10], "big"), 10
            if length > self.max_size:
                raise ProtocolViolation(f"a frame of {length} bytes is over the {self.max_size} limit")
            if end - pos < head + length:
                break
            payload = buffer[pos + head:pos + head + length]
            pos += head + length
            opcode, final = first & 0x0F, first & 0x80
            if opcode >= OP_CLOSE:
                out.append((opcode, payload))
            elif opcode == OP_CONT or not final:
                if opcode != OP_CONT:
                    self._fragment_opcode = opcode
                self._fragments.append(payload)
                if final:
                    out.append((self._fragment_opcode, b"".join(self._fragments)))
                    self._fragments = []
            else:
                out.append((opcode, payload))
        self._buffer = buffer[pos:]
        return out


def close_code(payload: bytes) -> int:
    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else NO_STATUS


# --- the asyncio shell ----------------------------------------------------------------------

OnMessage = Callable[[bool, bytes], None]  # (is_text, payload); called synchronously, in order
OnClose = Callable[[int], None]  # the close code (ABNORMAL without a closing handshake)


@dataclass(slots=True)
class Handlers:
    on_message: OnMessage
    on_close: OnClose


class LeanConnection(asyncio.Protocol):
    """One client connection; `connect` makes it. `send_text`/`send_binary` write
    at once (no backpressure: the bench sends a few small frames a second)."""

    def __init__(self, request: bytes, key: str, max_size: int) -> None:
        self._request = request
        self._key = key
        self._parser = FrameParser(max_size)
        self._head = b""
        self._transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.opened: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.handlers: Handlers | None = None  # set before the first frame is read
        self.close_code: int | None = None
        self._close_sent = False
        self._pending: list[tuple[int, bytes]] = []  # frames that came with the handshake response

    @property
    def subprotocol(self) -> str | None:
        return self.opened.result().get("sec-websocket-protocol") if self.opened.done() else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if not self.opened.done():
            data = self._handshake(data)
            if not data:
                return
        try:
            messages = self._parser.feed(data)
        except ProtocolViolation:
            self._abort()
            return
        for opcode, payload in messages:
            self._dispatch(opcode, payload)

    def _handshake(self, data: bytes) -> bytes:
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD_BYTES:
                self.opened.set_exception(HandshakeError(0, "handshake response too long"))
                self._abort()
            return b""
        head, rest = self._head[:end], self._head[end + 4:]
        self._head = b""
        try:
            headers = check_handshake(head, self._key)
        except HandshakeError as error:
            error.body = rest
            self.opened.set_exception(error)
            self._abort()
            return b""
        self.opened.set_result(headers)
        return rest

    def _dispatch(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_TEXT or opcode == OP_BINARY:
            if self.handlers is None:
                self._pending.append((opcode, payload))
            else:
                self.handlers.on_message(opcode == OP_TEXT, payload)
        elif opcode == OP_PING:
            self._write(OP_PONG, payload)
        elif opcode == OP_CLOSE:
            self.close_code = close_code(payload)
            if not self._close_sent:
                self._write(OP_CLOSE, payload[:2])
                self._close_sent = True
            if self._transport is not None:
                self._transport.close()

    def start(self, handlers: Handlers) -> None:
        """Deliver messages (those that came with the handshake first) to `handlers`."""
        self.handlers = handlers
        pending, self._pending = self._pending, []
        for opcode, payload in pending:
            handlers.on_message(opcode == OP_TEXT, payload)
        if self.closed.done() and self.close_code is not None:
            handlers.on_close(self.close_code)

    def send_text(self, text: str) -> bool:
        return self._write(OP_TEXT, text.encode("utf-8"))

    def send_binary(self, data: bytes) -> bool:
        return self._write(OP_BINARY, data)

    def _write(self, opcode: int, payload: bytes) -> bool:
        """Write one frame; False if the connection is closing or gone."""
        if self._transport is None or self._transport.is_closing() or self._close_sent and opcode != OP_CLOSE:
            return False
        self._transport.write(encode_frame(opcode, payload, random.randbytes(4)))
        return True

    async def close(self, timeout_s: float = 2.0) -> None:
        """The closing handshake (1000), then the TCP close; at most `timeout_s`."""
        if not self.closed.done() and not self._close_sent:
            self._write(OP_CLOSE, CLOSE_NORMAL.to_bytes(2, "big"))
            self._close_sent = True
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self.closed)
        except TimeoutError:
            self._abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed during the handshake"))
        code = self.close_code if self.close_code is not None else ABNORMAL
        self.close_code = code
        if not self.closed.done():
            self.closed.set_result(code)
        if self.handlers is not None:
            self.handlers.on_close(code)

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


async def connect(url: str, subprotocols: tuple[str, ...] = (), max_size: int = 2**22) -> LeanConnection:
    """Open a connection to `url` (ws://) and complete the opening handshake;
    raises HandshakeError (refused, e.g. HTTP 401), OSError or ConnectionError.
    The caller bounds the time (asyncio.timeout) and calls `start` next."""
    parts = urlsplit(url)
    if parts.hostname is None:
        raise ValueError(f"no host in {url!r}")
    host = parts.hostname
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    request = handshake_request(url, key, subprotocols)
    loop = asyncio.get_running_loop()
    _, connection = await loop.create_connection(
        lambda: LeanConnection(request, key, max_size), host, parts.port or 80)
    try:
        await connection.opened
    except BaseException:
        connection._abort()
        raise
    return connection
