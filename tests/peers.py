"""Clients that keep a room the way an application would, for tests that run
faults under them.

`WsPeer` speaks `/ws` (JSON or msgpack) with a replica of the room: its
Y.js document, its users, its locks, the others' awareness. It does what
docs/protocol.md asks of a client: it applies every `RESOURCE_STATE`, the
unasked ones too, and then sends again every update not yet acknowledged;
when its connection ends it reconnects and joins again with its state vector.
`YPeer` is the stock y-websocket client (npm), run by `tests/interop/ypeer.mjs`;
`CrdtPeer` is pycrdt's own `Provider`, a Y.js client in Python, over a
websockets connection to `/yjs`, started again when its connection ends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgpack
from pycrdt import Doc, Provider, Text
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from rounds.protocol.yjs import AwarenessEntry, decode_awareness, encode_awareness

INTEROP = Path(__file__).resolve().parent / "interop"


@dataclass
class WsPeer:
    url: str
    token: str
    room: str
    user: str
    binary: bool = False
    doc: Doc = field(default_factory=Doc)
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    locks: dict[str, dict[str, Any]] = field(default_factory=dict)  # resource -> RESOURCE_LOCKED data
    awareness: dict[int, str] = field(default_factory=dict)  # others' client id -> state (JSON text)
    acked: list[str] = field(default_factory=list)  # the texts of the edits the gateway acknowledged
    reconnect: bool = True  # when the connection ends by itself, come back
    frames: list[tuple[str, Any]] = field(default_factory=list)  # (type, ref) of everything received

    def __post_init__(self) -> None:
        self._refs = itertools.count(1)
        self._unacked: dict[str, tuple[bytes, str]] = {}  # ref -> (update, text)
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stopped = False
        self._joined = asyncio.Event()
        self._own_awareness: tuple[int, str] | None = None  # (clock, state)
        self._tasks: set[asyncio.Task[None]] = set()

    # --- the connection --------------------------------------------------------------

    async def start(self) -> WsPeer:
        await self._connect()
        return self

    async def _connect(self) -> None:
        subprotocols = ["rounds.v1.msgpack"] if self.binary else None
        self._ws = await connect(f"{self.url}?token={self.token}", subprotocols=subprotocols, open_timeout=5)
        self._joined.clear()
        self._reader = asyncio.create_task(self._read(self._ws))
        await self._join_again(0)

    async def drop(self) -> None:
        """End the connection (as a network loss would); `come_back` reconnects."""
        self.reconnect = False
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def come_back(self, timeout: float = 30.0) -> None:
        self.reconnect = True
        await self._connect_until(timeout)

    async def _connect_until(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._stopped:
            try:
                await self._connect()
                return
            except (OSError, InvalidHandshake, TimeoutError):
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.3)

    async def close(self) -> None:
        self._stopped = True
        await self.drop()

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                frame = msgpack.unpackb(raw) if isinstance(raw, bytes) else json.loads(raw)
                self._on_frame(frame["type"], frame.get("data") or {}, frame.get("ref"))
        except ConnectionClosed:
            pass
        if self.reconnect and not self._stopped:
            await asyncio.sleep(0.2)
            self._spawn(self._connect_until(30.0))

    async def _send(self, type_: str, data: dict[str, Any], ref: Any = None) -> None:
        assert self._ws is not None
        frame: dict[str, Any] = {"type": type_, "data": data}
        if ref is not None:
            frame["ref"] = ref
        if self.binary:
            await self._ws.send(msgpack.packb(frame))
        else:
            await self._ws.send(json.dumps(frame, default=_b64))

    def _bytes(self, value: Any) -> bytes:
        return bytes(value) if self.binary else base64.b64decode(value)

    # --- what the gateway says ----------------------------------------------------------

    def _on_frame(self, type_: str, data: dict[str, Any], ref: Any) -> None:
        self.frames.append((type_, ref))
        future = self._replies.pop(str(ref), None) if ref is not None else None
        if future is not None and not future.done():
            future.set_result({"type": type_, **data})
        match type_:
            case "RESOURCE_STATE" if data["resourceId"] == self.room:
                if data.get("state"):
                    self.doc.apply_update(self._bytes(data["state"]))
                self.users = {u["userId"]: u for u in data["users"]}
                self.locks = {lock["resourceId"]: lock for lock in data["locks"]}
                if data.get("awareness"):
                    self._take_awareness(self._bytes(data["awareness"]))
                self._joined.set()
                self._spawn(self._after_state())
            case "RESOURCE_UPDATE" if data["resourceId"] == self.room:
                self.doc.apply_update(self._bytes(data["update"]))
            case "UPDATE_ACK":
                sent = self._unacked.pop(str(ref), None)
                if sent is not None:
                    self.acked.append(sent[1])
            case "USER_JOINED":
                self.users[data["user"]["userId"]] = data["user"]
            case "USER_LEFT":
                self.users.pop(data["userId"], None)
            case "RESOURCE_LOCKED":
                self.locks[data["resourceId"]] = data
            case "LOCK_ACQUIRED":  # our own lock: the room's RESOURCE_LOCKED goes to the others
                self.locks[data["resourceId"]] = {"resourceId": data["resourceId"], "lockedBy": self.user,
                                                  "expiresAt": data["expiresAt"]}
            case "LOCK_RELEASED":
                self.locks.pop(data["resourceId"], None)
            case "ERROR" if ref == "join" and data.get("code") == "UNAVAILABLE":
                self._spawn(self._join_again())  # as the protocol says: retry shortly
            case "RESOURCE_UNLOCKED":
                self.locks.pop(data["resourceId"], None)
            case "AWARENESS_UPDATE" if data["resourceId"] == self.room:
                self._take_awareness(self._bytes(data["update"]))

    async def _join_again(self, after_s: float = 0.3) -> None:
        await asyncio.sleep(after_s)
        with contextlib.suppress(ConnectionClosed, AssertionError):
            await self._send("JOIN_RESOURCE", {"resourceId": self.room, "resourceType": "document",
                                               "mode": "editor", "stateVector": self.doc.get_state()}, ref="join")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after_state(self) -> None:
        """What a client owes after being told its room: every update not yet
        acknowledged again (Y.js updates are idempotent), its own awareness."""
        with contextlib.suppress(ConnectionClosed, AssertionError):
            for ref, (update, _) in list(self._unacked.items()):
                await self._send("RESOURCE_UPDATE", {"resourceId": self.room, "update": update}, ref=ref)
            if self._own_awareness is not None:
                await self._send_awareness()

    def _take_awareness(self, update: bytes) -> None:
        for entry in decode_awareness(update):
            if entry.client_id == self.doc.client_id:
                continue
            if entry.removed:
                self.awareness.pop(entry.client_id, None)
            else:
                self.awareness[entry.client_id] = entry.state

    # --- what the user does ----------------------------------------------------------------

    async def joined(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._joined.wait(), timeout)

    async def append(self, text: str) -> None:
        """Type `text` at the end of the room's text and send it; it stays
        unacknowledged (and is sent again) until the gateway acknowledges it."""
        before = self.doc.get_state()
        t = self.doc.get("t", type=Text)
        t.insert(len(t), text)
        update = self.doc.get_update(before)
        ref = f"u{next(self._refs)}"
        self._unacked[ref] = (update, text)
        with contextlib.suppress(ConnectionClosed, AssertionError):
            await self._send("RESOURCE_UPDATE", {"resourceId": self.room, "update": update}, ref=ref)

    async def request(self, type_: str, data: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        ref = f"q{next(self._refs)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[ref] = future
        await self._send(type_, data, ref=ref)
        return await asyncio.wait_for(future, timeout)

    async def set_awareness(self, state: dict[str, Any]) -> None:
        clock = (self._own_awareness[0] if self._own_awareness else 0) + 1
        self._own_awareness = (clock, json.dumps(state, separators=(",", ":")))
        await self._send_awareness()

    async def _send_awareness(self) -> None:
        assert self._own_awareness is not None
        clock, state = self._own_awareness
        update = encode_awareness([AwarenessEntry(self.doc.client_id, clock, state)])
        await self._send("AWARENESS_UPDATE", {"resourceId": self.room, "update": update})

    @property
    def text(self) -> str:
        return str(self.doc.get("t", type=Text))

    @property
    def unacked(self) -> list[str]:
        return [text for _, text in self._unacked.values()]


class YPeer:
    """The stock y-websocket client (npm `y-websocket`'s `WebsocketProvider`),
    kept up by `ypeer.mjs` and driven a command at a time."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self._ids = itertools.count(1)
        self.last: dict[str, Any] = {}

    @classmethod
    async def start(cls, url: str, room: str, token: str) -> YPeer:
        process = await asyncio.create_subprocess_exec(
            "node", str(INTEROP / "ypeer.mjs"), "--url", url, "--room", room, "--token", token, cwd=INTEROP,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        return cls(process)

    async def command(self, op: str, **fields: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        ident = next(self._ids)
        self.process.stdin.write((json.dumps({"id": ident, "op": op, **fields}) + "\n").encode())
        await self.process.stdin.drain()
        while True:
            line = await asyncio.wait_for(self.process.stdout.readline(), 10)
            if not line:
                raise AssertionError("ypeer.mjs ended")
            answer = json.loads(line)
            if answer.get("id") == ident:
                self.last = answer
                return answer

    async def state(self) -> dict[str, Any]:
        return await self.command("state")

    async def append(self, text: str) -> None:
        await self.command("append", name="t", text=text)

    async def close(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 5)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


def _b64(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class _WsChannel:
    """A websockets connection as pycrdt's `Channel`."""

    def __init__(self, ws: ClientConnection, path: str) -> None:
        self._ws = ws
        self._path = path

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> _WsChannel:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.recv()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    async def send(self, message: bytes) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._ws.send(message)

    async def recv(self) -> bytes:
        return bytes(await self._ws.recv())


class CrdtPeer:
    """pycrdt's `Provider` on `/yjs/{room}`; when its connection ends by itself
    it is started again with the same document (the application's job: the
    provider does not reconnect on its own)."""

    def __init__(self, url: str, room: str, token: str) -> None:
        self.url, self.room, self.token = url, room, token
        self.doc = Doc()
        self.reconnect = True
        self._ws: ClientConnection | None = None
        self._provider: Provider | None = None
        self._run: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> CrdtPeer:
        self._ws = await connect(f"{self.url}/{quote(self.room, safe=':/')}?token={self.token}", open_timeout=5)
        self._provider = Provider(self.doc, _WsChannel(self._ws, self.room))
        self._run = asyncio.create_task(self._provider.start())
        await self._provider.started.wait()
        self._watch = asyncio.create_task(self._come_back_when_closed(self._ws))
        return self

    async def _come_back_when_closed(self, ws: ClientConnection) -> None:
        await ws.wait_closed()
        await self._stop_provider()
        while self.reconnect:
            await asyncio.sleep(0.3)
            try:
                await self.start()
                return
            except (OSError, InvalidHandshake, TimeoutError):
                continue

    async def _stop_provider(self) -> None:
        if self._provider is not None:
            with contextlib.suppress(Exception):
                await self._provider.stop()
            self._provider = None
        if self._run is not None:
            with contextlib.suppress(BaseException):
                await self._run
            self._run = None

    async def drop(self) -> None:
        self.reconnect = False
        if self._ws is not None:
            await self._ws.close()
        if self._watch is not None:
            with contextlib.suppress(BaseException):
                await self._watch
        await self._stop_provider()

    async def come_back(self) -> None:
        self.reconnect = True
        await self.start()

    async def close(self) -> None:
        await self.drop()

    def append(self, text: str) -> None:
        t = self.doc.get("t", type=Text)
        t.insert(len(t), text)

    @property
    def text(self) -> str:
        return str(self.doc.get("t", type=Text))
