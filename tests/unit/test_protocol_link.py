"""The front door <-> shard link: 4-byte length + msgpack frames.

Frames must survive any split of the byte stream (TCP gives no message
boundaries), in order; the protocol is fed by hand through a small recording
transport, no sockets and no event loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rounds.ids import ConnId, FrontDoorId, ResourceId, SessionId, UserId, conn_id
from rounds.protocol.link import MAX_FRAME_BYTES, Hello, LinkMessage, decode, encode
from rounds.protocol.messages import Deliver, Disconnect, Join, Leave, Reply, Sync
from rounds.protocol.stream import LinkProtocol
from rounds.protocol.ws import MessageType

A, B, C = conn_id(FrontDoorId(0), 1), conn_id(FrontDoorId(0), 2), conn_id(FrontDoorId(3), (1 << 40) - 1)


def join(conn: ConnId, room: str, mode: str = "editor", restore: bool = False, ref: Any = "r1") -> Join:
    return Join(conn, ref, UserId("usr_001"), "Dr. Émile Ünal", SessionId("sess-1"), ResourceId(room),
                "patient_record", mode, restore)


MESSAGES: dict[str, LinkMessage] = {
    "hello": Hello(FrontDoorId(2), "epoch-5f2c"),
    "join": join(A, "page:/patient/12345"),
    "join with int ref": join(B, "document:999/tab:diagnosis", "viewer", ref=17),
    "join restore": join(C, "document:999/tab:procedure", restore=True, ref=None),
    "leave": Leave(A, 3, ResourceId("page:/patient/12345")),
    "disconnect": Disconnect(C, "timeout"),
    "sync with joins": Sync(FrontDoorId(0), (join(A, "page:/a"), join(B, "document:1/tab:x", "viewer", True))),
    "empty sync": Sync(FrontDoorId(1), ()),
    "reply with bytes": Reply(A, "j1", MessageType.RESOURCE_STATE, {
        "resourceId": "page:/a", "users": [{"userId": "u", "mode": "editor"}], "state": b"\x00\x01\xff" * 100,
        "revision": 0, "locks": [],
    }),
    "reply without ref": Reply(B, None, MessageType.ERROR, {"code": "NOT_JOINED", "message": "not joined"}),
    "deliver with bytes": Deliver((A, B, C), "RESOURCE_UPDATE", {
        "resourceId": "document:1/tab:x", "update": bytes(range(256)), "userId": "u", "revision": 7,
    }),
}
@pytest.mark.parametrize("msg", [pytest.param(m, id=name) for name, m in MESSAGES.items()])
def test_every_link_message_survives_a_round_trip(msg: LinkMessage) -> None:
    frame = encode(msg)
    back = decode(frame[4:])
    assert back == msg
    assert type(back) is type(msg)


def test_a_delivers_connections_and_payload_survive_a_round_trip() -> None:
    msg = MESSAGES["deliver with bytes"]
    assert isinstance(msg, Deliver)
    back = decode(encode(msg)[4:])
    assert isinstance(back, Deliver)
    assert list(back.conns) == list(msg.conns)
    assert (back.type, back.data) == (msg.type, msg.data)


def test_a_syncs_joins_come_back_as_joins_in_a_tuple() -> None:
    back = decode(encode(MESSAGES["sync with joins"])[4:])
    assert isinstance(back, Sync)
    assert isinstance(back.joins, tuple)
    assert all(isinstance(j, Join) for j in back.joins)


def test_a_frame_is_its_length_in_four_big_endian_bytes_then_a_msgpack_array() -> None:
    frame = encode(Leave(A, None, ResourceId("page:/a")))
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert msgpack.unpackb(frame[4:]) == [4, A, None, "page:/a"]


def test_decode_accepts_a_memoryview() -> None:
    frame = encode(MESSAGES["join"])
    assert decode(memoryview(frame)[4:]) == MESSAGES["join"]


# --- framing over a byte stream -----------------------------------------------------


class RecordingTransport(asyncio.Transport):
    """Just enough of a transport: records writes and closes."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0


def link() -> tuple[LinkProtocol, RecordingTransport, list[LinkMessage], list[Exception | None]]:
    received: list[LinkMessage] = []
    lost: list[Exception | None] = []
    protocol = LinkProtocol(received.append, lost.append)
    transport = RecordingTransport()
    protocol.connection_made(transport)
    return protocol, transport, received, lost


@given(
    messages=st.lists(st.sampled_from(list(MESSAGES.values())), min_size=1, max_size=12),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
@settings(max_examples=200, deadline=None)
def test_messages_split_at_any_points_arrive_whole_and_in_order(
        messages: list[LinkMessage], cuts: list[int]) -> None:
    stream = b"".join(encode(m) for m in messages)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    protocol, transport, received, _ = link()
    for start, end in zip(points, points[1:], strict=False):
        protocol.data_received(stream[start:end])
    assert [encode(m) for m in received] == [encode(m) for m in messages]
    assert not transport.closed


def test_one_byte_at_a_time_works_too() -> None:
    protocol, _, received, _ = link()
    for byte in encode(MESSAGES["sync with joins"]):
        protocol.data_received(bytes([byte]))
    assert received == [MESSAGES["sync with joins"]]


def test_a_frame_larger_than_the_limit_closes_the_link(caplog: pytest.LogCaptureFixture) -> None:
    protocol, transport, received, _ = link()
    with caplog.at_level(logging.ERROR, logger="rounds.protocol.link"):
        protocol.data_received((MAX_FRAME_BYTES + 1).to_bytes(4, "big") + b"\x00" * 16)
    assert transport.closed
    assert protocol.closed
    assert received == []
    assert "exceeds the limit" in caplog.text


def test_a_failing_handler_is_logged_and_the_next_message_still_arrives(caplog: pytest.LogCaptureFixture) -> None:
    got: list[LinkMessage] = []

    def handler(msg: LinkMessage) -> None:
        if isinstance(msg, Leave):
            raise RuntimeError("bug in a handler")
        got.append(msg)

    protocol = LinkProtocol(handler, lambda exc: None)
    transport = RecordingTransport()
    protocol.connection_made(transport)
    with caplog.at_level(logging.ERROR, logger="rounds.protocol.link"):
        protocol.data_received(encode(MESSAGES["leave"]) + encode(MESSAGES["hello"]))
    assert got == [MESSAGES["hello"]]
    assert "link message handler failed for Leave" in caplog.text
    assert not transport.closed


def test_connection_lost_tells_the_owner_and_refuses_further_sends() -> None:
    protocol, _, _, lost = link()
    error = ConnectionResetError()
    protocol.connection_lost(error)
    assert lost == [error]
    assert protocol.send(MESSAGES["hello"]) is False


async def test_sends_in_one_tick_go_out_in_one_write() -> None:
    protocol, transport, _, _ = link()
    assert protocol.send(MESSAGES["hello"])
    assert protocol.send(MESSAGES["leave"])
    assert transport.written == []
    await asyncio.sleep(0)
    assert transport.written == [encode(MESSAGES["hello"]) + encode(MESSAGES["leave"])]
