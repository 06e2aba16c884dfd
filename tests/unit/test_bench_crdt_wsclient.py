"""The load generator's lean WebSocket client: the pure core on known bytes, then
once over loopback against the `websockets` server."""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from rounds.bench import wsclient
from rounds.bench.wsclient import (
    OP_BINARY,
    OP_PING,
    OP_TEXT,
    FrameParser,
    HandshakeError,
    ProtocolViolation,
    accept_value,
    check_handshake,
    encode_frame,
    handshake_request,
)


def server_frame(opcode: Opcode, payload: bytes, fin: bool = True) -> bytes:
    """A frame as a server sends it (unmasked), serialised by `websockets`."""
    return Frame(opcode, payload, fin).serialize(mask=False)


def test_the_accept_value_is_the_one_of_rfc_6455() -> None:
    assert accept_value("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_the_request_names_path_query_host_and_subprotocols() -> None:
    request = handshake_request("ws://127.0.0.1:8765/yjs/document:1?token=abc", "k", ("rounds.v1.msgpack",))
    assert request.startswith(b"GET /yjs/document:1?token=abc HTTP/1.1\r\nHost: 127.0.0.1:8765\r\n")
    assert b"Sec-WebSocket-Key: k\r\n" in request
    assert b"Sec-WebSocket-Protocol: rounds.v1.msgpack\r\n" in request
    assert request.endswith(b"\r\n\r\n")
    with pytest.raises(ValueError):
        handshake_request("wss://127.0.0.1/ws", "k")


def test_a_101_with_the_right_accept_opens_and_anything_else_is_refused() -> None:
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    ok = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: rounds.v1.msgpack")
    assert check_handshake(ok, key)["sec-websocket-protocol"] == "rounds.v1.msgpack"
    with pytest.raises(HandshakeError) as refused:
        check_handshake(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2", key)
    assert refused.value.status == 401
    with pytest.raises(HandshakeError) as wrong:
        check_handshake(ok.replace(b"xOo=", b"xOx="), key)
    assert wrong.value.status == 0


def test_frames_split_anywhere_come_out_whole_and_in_order() -> None:
    data = (server_frame(Opcode.TEXT, b"hello") + server_frame(Opcode.BINARY, b"\x00" * 300)
            + server_frame(Opcode.BINARY, b"x" * 70_000) + server_frame(Opcode.PING, b"p"))
    for cut in (1, 2, 3, 7, 150, 400, len(data) - 1):
        parser = FrameParser(max_size=2**20)
        messages = parser.feed(data[:cut]) + parser.feed(data[cut:])
        assert messages == [(OP_TEXT, b"hello"), (OP_BINARY, b"\x00" * 300), (OP_BINARY, b"x" * 70_000),
                            (OP_PING, b"p")]


def test_a_fragmented_message_is_joined_and_a_control_frame_may_come_between() -> None:
    data = (server_frame(Opcode.TEXT, b"ab", fin=False) + server_frame(Opcode.PING, b"")
            + server_frame(Opcode.CONT, b"cd", fin=False) + server_frame(Opcode.CONT, b"e"))
    assert FrameParser(1024).feed(data) == [(OP_PING, b""), (OP_TEXT, b"abcde")]


def test_a_masked_server_frame_or_one_over_the_limit_is_a_violation() -> None:
    with pytest.raises(ProtocolViolation):
        FrameParser(1024).feed(Frame(Opcode.TEXT, b"x").serialize(mask=True))
    with pytest.raises(ProtocolViolation):
        FrameParser(10).feed(server_frame(Opcode.BINARY, b"y" * 11))


def test_client_frames_are_masked_and_read_back_by_websockets() -> None:
    for payload in (b"", b"abc", b"z" * 200, b"q" * 70_000):
        encoded = encode_frame(OP_BINARY, payload, b"\x01\x02\x03\x04")
        assert encoded[1] & 0x80  # the mask bit
        reader = StreamReader()
        reader.feed_data(encoded)
        reader.feed_eof()
        parsing = Frame.parse(reader.read_exact, mask=True)
        with pytest.raises(StopIteration) as parsed:
            next(parsing)
        assert parsed.value.value.data == payload


async def test_a_connection_exchanges_text_and_binary_answers_pings_and_closes_cleanly() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send("hello")
        await ws.send(await ws.recv())  # echo the client's binary frame
        await ws.ping(b"are you there")
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        got: list[tuple[bool, bytes]] = []
        closed: list[int] = []
        connection = await wsclient.connect(f"ws://127.0.0.1:{port}/x?token=t")
        connection.start(wsclient.Handlers(lambda text, payload: got.append((text, payload)), closed.append))
        assert connection.send_binary(b"\x00\x02abc")
        async with asyncio.timeout(5):
            while len(got) < 2:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # the pong goes out with the ping's arrival
            await connection.close()
    assert got == [(True, b"hello"), (False, b"\x00\x02abc")]
    assert closed == [1000]
    assert not connection.send_text("too late")


async def test_a_refused_upgrade_reports_the_http_status() -> None:
    async def refuse(connection: ServerConnection, request: object) -> object:
        return connection.respond(401, '{"type":"UNAUTHORIZED"}')

    async with serve(lambda ws: ws.wait_closed(), "127.0.0.1", 0, process_request=refuse) as server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(HandshakeError) as refused:
            async with asyncio.timeout(5):
                await wsclient.connect(f"ws://127.0.0.1:{port}/ws")
    assert refused.value.status == 401
