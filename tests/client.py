"""A small test client for the `/ws` protocol, over a real WebSocket.

Frames that arrive while a test waits for another type are kept, so tests
can assert on everything a client received (and on what it did not).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgpack
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Response


@dataclass
class Frame:
    type: str
    data: dict[str, Any]
    ref: Any = None


@dataclass
class Client:
    ws: ClientConnection
    binary: bool = False
    inbox: list[Frame] = field(default_factory=list)
    seen: list[Frame] = field(default_factory=list)
    connected: Frame | None = None

    @classmethod
    async def connect(cls, url: str, token: str | None, *, binary: bool = False, **kwargs: Any) -> Client:
        target = f"{url}?token={token}" if token is not None else url
        subprotocols = ["rounds.v1.msgpack"] if binary else None
        ws = await connect(target, subprotocols=subprotocols, open_timeout=10, **kwargs)
        client = cls(ws, binary)
        client.connected = await client.expect("CONNECTED")
        return client

    async def send(self, type_: str, data: dict[str, Any] | None = None, ref: Any = None) -> None:
        frame: dict[str, Any] = {"type": type_, "data": data or {}}
        if ref is not None:
            frame["ref"] = ref
        await self.ws.send(msgpack.packb(frame) if self.binary else json.dumps(frame))

    async def send_raw(self, payload: str | bytes) -> None:
        await self.ws.send(payload)

    async def _next(self, timeout: float) -> Frame:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        obj = msgpack.unpackb(raw) if isinstance(raw, bytes) else json.loads(raw)
        frame = Frame(obj["type"], obj.get("data", {}), obj.get("ref"))
        self.seen.append(frame)
        return frame

    async def expect(self, type_: str, timeout: float = 5.0, **match: Any) -> Frame:
        """The next frame of this type (and data fields), keeping the others."""
        for i, frame in enumerate(self.inbox):
            if frame.type == type_ and all(frame.data.get(k) == v for k, v in match.items()):
                return self.inbox.pop(i)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            frame = await self._next(max(0.0, deadline - loop.time()))
            if frame.type == type_ and all(frame.data.get(k) == v for k, v in match.items()):
                return frame
            self.inbox.append(frame)

    async def request(self, type_: str, data: dict[str, Any] | None = None, ref: Any = "r") -> Frame:
        """Send and return the direct reply (the next frame with our ref)."""
        await self.send(type_, data, ref)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while True:
            frame = await self._next(max(0.0, deadline - loop.time()))
            if frame.ref == ref:
                return frame
            self.inbox.append(frame)

    async def join(self, resource: str, mode: str = "editor", **extra: Any) -> Frame:
        return await self.request("JOIN_RESOURCE", {"resourceId": resource, "resourceType": "patient_record",
                                                    "mode": mode, **extra}, ref=f"join:{resource}")

    async def quiet(self, seconds: float = 0.3) -> list[Frame]:
        """Everything that arrives within `seconds` (plus what was kept)."""
        frames, self.inbox = self.inbox, []
        try:
            while True:
                frames.append(await self._next(seconds))
        except (TimeoutError, ConnectionClosed):
            return frames

    async def closed(self, timeout: float = 5.0) -> int | None:
        """Wait for the server to close us; returns the close code."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self._next(timeout)
        except ConnectionClosed:
            pass
        return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()


async def refused(url: str, token: str | None = None, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """Connect expecting an HTTP refusal; returns (status, JSON body)."""
    response = await refusal(url, token, **kwargs)
    return response.status_code, json.loads(bytes(response.body or b"{}"))


async def refusal(url: str, token: str | None = None, **kwargs: Any) -> Response:
    """Connect expecting an HTTP refusal; returns the whole response (headers too)."""
    target = f"{url}?token={token}" if token is not None else url
    try:
        ws = await connect(target, open_timeout=10, **kwargs)
    except InvalidStatus as exc:
        return exc.response
    await ws.close()
    raise AssertionError("the connection was accepted")


# --- a WebSocket spoken by hand, for what a well-behaved client never does ------


@dataclass
class RawConnection:
    """A TCP connection on which the HTTP upgrade was sent by hand.

    `status` and `headers` are the server's answer; after a 101 the reader
    yields raw WebSocket frames, which nothing answers (no pong, no close).
    """

    status: int
    headers: dict[str, str]
    body: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @property
    def local_address(self) -> str:
        host, port = self.writer.get_extra_info("sockname")[:2]
        return f"{host}:{port}"

    def json(self) -> Any:
        return json.loads(self.body)

    async def frames_until_eof(self, timeout: float) -> list[tuple[int, bytes]]:
        """(opcode, payload) of every server frame until the server closes TCP.

        Raises TimeoutError if the connection is still open after `timeout`.
        """
        frames: list[tuple[int, bytes]] = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    head = await self.reader.readexactly(2)
                except asyncio.IncompleteReadError:
                    return frames
                length = head[1] & 0x7F
                if length == 126:
                    length = struct.unpack("!H", await self.reader.readexactly(2))[0]
                elif length == 127:
                    length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
                frames.append((head[0] & 0x0F, await self.reader.readexactly(length)))

    def close(self) -> None:
        self.writer.close()


async def raw_upgrade(url: str, token: str | None = None, headers: Mapping[str, str] | None = None,
                      path: str | None = None) -> RawConnection:
    """Send `GET /ws?token=...` with upgrade headers over plain TCP; read the answer's head."""
    parts = urlsplit(url)
    target = path or (f"{parts.path}?token={token}" if token is not None else parts.path)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {parts.hostname}:{parts.port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    async with asyncio.timeout(10):
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *header_lines = head.strip().split("\r\n")
        fields = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        body = b""
        if "content-length" in fields:
            body = await reader.readexactly(int(fields["content-length"]))
    return RawConnection(int(status_line.split()[1]), fields, body, reader, writer)


async def eventually(check: Callable[[], Any], timeout: float = 5.0, what: str = "condition",
                     interval: float = 0.05) -> Any:
    """Poll `check` (plain or async) until it returns something truthy: other
    processes (the shards' mirror, Ray's restarts) act on their own time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"{what}: still {result!r} after {timeout}s")
        await asyncio.sleep(interval)
