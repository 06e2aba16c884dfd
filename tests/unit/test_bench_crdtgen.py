"""The document worker's client logic, without sockets: what it sends and how it
reads `/ws` and y-websocket frames (a recording connection stands in for the socket)."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import msgpack
from pycrdt import Doc, Text

from rounds.bench.crdtgen import CrdtWorker
from rounds.bench.crdtplan import JSON, MSGPACK, WS, YJS, CrdtPlan, find_markers
from rounds.bench.plan import MEASURED, RAMP, RoomPlan
from rounds.protocol.ws import JSON as JSON_CODEC
from rounds.protocol.ws import MessageType
from rounds.protocol.yjs import SyncStep2, decode_message, sync_step1, sync_step2, sync_update

ROOM = "document:test-r0"


class RecordingConnection:
    """Keeps what the worker sends (the `wsclient.LeanConnection` methods it uses)."""

    def __init__(self) -> None:
        self.sent: list[str | bytes] = []

    def send_text(self, text: str) -> bool:
        self.sent.append(text)
        return True

    def send_binary(self, data: bytes) -> bool:
        self.sent.append(data)
        return True


def make_worker(mode: str = WS, codec: str = JSON, members: int = 3) -> CrdtWorker:
    now = time.monotonic()
    plan = CrdtPlan(
        index=0, mode=mode, url="ws://127.0.0.1:1/ws", codec=codec, private_key_pem=b"", role="nurse",
        rooms=(RoomPlan(ROOM, tuple(range(members))),), interval_s=1.0, connect_concurrency=1, seed=1,
        ramp_deadline=now + 10, hard_deadline=now + 60,
    )
    worker = CrdtWorker(plan, lambda message: None)
    for client in worker.clients:
        client.ws = RecordingConnection()
        client.synced = True
    worker.phase = MEASURED
    return worker


def relayed(update: bytes, sender: int, revision: int) -> str:
    """The RESOURCE_UPDATE our gateway sends the other members, in JSON."""
    data = {"resourceId": ROOM, "update": update, "userId": f"bench-u{sender}", "revision": revision}
    return JSON_CODEC.encode(MessageType.RESOURCE_UPDATE, data)


async def test_a_ws_client_sends_a_marked_incremental_update_and_awaits_its_ack() -> None:
    worker = make_worker()
    sender = worker.clients[0]
    worker._send_update(sender)
    [frame] = sender.ws.sent
    message = JSON_CODEC.decode(frame)
    assert message["type"] == MessageType.RESOURCE_UPDATE
    assert message["data"]["resourceId"] == ROOM
    ref = message["ref"]
    assert ref in sender.acks
    update = base64.b64decode(message["data"]["update"])
    [(who, sent_ns)] = find_markers(update)
    assert who == 0 and sent_ns == sender.acks[ref]
    replica = Doc()
    replica.apply_update(update)
    assert str(replica.get("t", type=Text)) == f"<0@{sent_ns}>"
    assert len(worker.ledger.pending) == 1  # owed to members 1 and 2


async def test_the_others_receipts_are_timed_and_the_ack_is_the_durability_round_trip() -> None:
    worker = make_worker()
    sender = worker.clients[0]
    worker._send_update(sender)
    message = JSON_CODEC.decode(sender.ws.sent[0])
    sent_ns = sender.acks[message["ref"]]
    frame = relayed(base64.b64decode(message["data"]["update"]), 0, revision=1)
    worker._on_ws_frame(worker.clients[1], frame, sent_ns + 2_000_000)
    worker._on_ws_frame(worker.clients[2], frame, sent_ns + 3_000_000)
    ack = JSON_CODEC.encode(MessageType.UPDATE_ACK, {"resourceId": ROOM, "revision": 1}, message["ref"])
    worker._on_ws_frame(sender, ack, sent_ns + 4_000_000)
    assert worker.rec.samples[MEASURED]["propagation_ms"] == [2.0, 3.0]
    assert worker.rec.samples[MEASURED]["ack_ms"] == [4.0]
    assert "deliveries_over_5ms_by_second" not in worker.rec.counts_dict()
    assert worker.ledger.settled() and worker.ledger.delivered == 2
    assert not sender.acks


async def test_msgpack_frames_carry_the_update_as_bytes() -> None:
    worker = make_worker(codec=MSGPACK)
    sender = worker.clients[0]
    worker._send_update(sender)
    message = msgpack.unpackb(sender.ws.sent[0], raw=False)
    assert isinstance(message["data"]["update"], bytes)
    frame = msgpack.packb({"type": "RESOURCE_UPDATE", "data": {"resourceId": ROOM, "update": message["data"]["update"],
                                                               "userId": "bench-u0", "revision": 1}})
    worker._on_ws_frame(worker.clients[1], frame, time.monotonic_ns())
    assert worker.rec.counts_dict()["frames_received_by_type"] == {"RESOURCE_UPDATE": 1}
    assert len(worker.rec.samples[MEASURED]["propagation_ms"]) == 1


async def test_a_refused_update_is_counted_and_no_longer_awaits_its_ack() -> None:
    worker = make_worker()
    sender = worker.clients[0]
    worker._send_update(sender)
    ref = next(iter(sender.acks))
    error = JSON_CODEC.encode(MessageType.ERROR, {"code": "BAD_UPDATE", "message": "no"}, ref)
    worker._on_ws_frame(sender, error, time.monotonic_ns())
    counts = worker.rec.counts_dict()
    assert counts["updates_refused"] == 1 and counts["error_frames"] == {"BAD_UPDATE": 1}
    assert not sender.acks


async def test_a_revision_going_backwards_is_counted() -> None:
    worker = make_worker()
    receiver = worker.clients[1]
    doc = Doc()
    text = doc.get("t", type=Text)
    text.insert(0, "<0@5>")
    worker._on_ws_frame(receiver, relayed(doc.get_update(), 0, revision=7), 10)
    worker._on_ws_frame(receiver, relayed(doc.get_update(), 0, revision=6), 10)
    counts = worker.rec.counts_dict()
    assert counts["revision_regressions"] == 1
    assert counts["unmatched_deliveries"] == 2  # never sent by this worker


async def test_an_update_without_a_marker_is_counted_by_its_size() -> None:
    worker = make_worker(mode=YJS)
    worker._on_y_frame(worker.clients[1], sync_update(b"\x00\x00"), 10)
    counts = worker.rec.counts_dict()
    assert counts["updates_without_marker"] == 1
    assert counts["updates_without_marker_by_bytes"] == {"5": 1}


async def test_a_yjs_client_sends_sync_updates_and_times_them_at_the_others() -> None:
    worker = make_worker(mode=YJS)
    sender = worker.clients[0]
    worker._send_update(sender)
    [frame] = sender.ws.sent
    assert frame[:2] == b"\x00\x02" and not sender.acks
    [(_, sent_ns)] = find_markers(frame)
    worker._on_y_frame(worker.clients[1], frame, sent_ns + 1_500_000)  # relayed as is
    worker._on_y_frame(sender, frame, sent_ns + 1_000_000)  # the stock server echoes it too
    assert worker.rec.samples[MEASURED]["propagation_ms"] == [1.5]
    assert worker.rec.counts_dict()["echoes"] == 1


async def test_a_yjs_client_answers_the_servers_step_1_with_what_the_server_lacks() -> None:
    worker = make_worker(mode=YJS)
    client = worker.clients[0]
    client.text.insert(0, "<0@1>")
    client.length = 5
    reply = worker._on_y_frame(client, sync_step1(b"\x00"), 10)  # an empty server
    assert isinstance(reply, bytes)
    message = decode_message(reply)
    assert isinstance(message, SyncStep2) and find_markers(message.update) == [(0, 1)]


async def test_a_yjs_client_is_synced_by_the_servers_step_2() -> None:
    worker = make_worker(mode=YJS)
    client = worker.clients[0]
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    client.futures["sync"] = future
    assert worker._on_y_frame(client, sync_step2(b"\x00\x00"), 42) is None
    assert future.done() and future.result()[0] == 42
    assert "updates_without_marker" not in worker.rec.counts_dict()  # a state, not a relayed update
    assert RAMP in worker.rec.samples


async def test_a_slow_delivery_is_counted_in_the_second_it_was_sent() -> None:
    worker = make_worker(mode=YJS)
    worker.measured_from_ns = 1_000_000_000
    sender = worker.clients[0]
    worker._send_update(sender)
    [(_, sent_ns)] = find_markers(sender.ws.sent[0])
    second = str((sent_ns - worker.measured_from_ns) // 1_000_000_000)
    worker._on_y_frame(worker.clients[1], sender.ws.sent[0], sent_ns + 60_000_000)
    worker._on_y_frame(worker.clients[2], sender.ws.sent[0], sent_ns + 6_000_000)
    counts = worker.rec.counts_dict()
    assert counts["deliveries_over_5ms_by_second"] == {second: 2}
    assert counts["deliveries_over_50ms_by_second"] == {second: 1}
