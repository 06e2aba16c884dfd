"""The relay's stream machines (`rounds.relay`): order, exactly once, resend,
the circuit. Pure: no broker, no clock but the numbers given."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rounds.protocol.link import Hello, RelayAck, RelayBatch, RelayReset, decode, decode_frames, encode
from rounds.relay.stream import GAP_S, MAX_UNACKED, RESEND_AFTER_S, Circuit, RelayIn, RelayOut


def test_batches_are_delivered_in_order_once_whatever_the_arrival_order():
    stream = RelayIn()
    assert stream.receive("e1", 2, b"b", 0.0) == []
    assert stream.receive("e1", 1, b"a", 0.0) == [b"a", b"b"]
    assert stream.receive("e1", 1, b"a", 0.0) == [] and stream.duplicates == 1
    assert stream.receive("e1", 3, b"c", 0.0) == [b"c"]


def test_a_gap_is_asked_for_after_gap_s_and_again_if_it_does_not_come():
    stream = RelayIn()
    stream.receive("e1", 1, b"a", 0.0)
    stream.receive("e1", 3, b"c", 1.0)
    assert stream.missing(1.0 + GAP_S / 2) is None
    assert stream.missing(1.0 + GAP_S) == 2
    assert stream.missing(1.0 + GAP_S + 0.01) is None
    assert stream.missing(1.0 + 2 * GAP_S + 0.01) == 2
    assert stream.receive("e1", 2, b"b", 2.0) == [b"b", b"c"] and stream.missing(9.0) is None


def test_a_restarted_shard_starts_a_new_stream():
    stream = RelayIn()
    stream.receive("old", 1, b"a", 0.0)
    stream.receive("old", 3, b"c", 0.0)
    assert stream.receive("new", 1, b"x", 0.0) == [b"x"] and stream.early == {}


def test_the_shard_keeps_batches_until_acknowledged_and_resends_from_the_missing_one():
    out = RelayOut("e1")
    for body in (b"a", b"b", b"c"):
        out.add(body, 0.0)
    out.ack(1)
    assert [b.seq for b in out.resend(2)] == [2, 3] and out.backlog == 2
    assert [b.seq for b in out.overdue(RESEND_AFTER_S)] == [2, 3]
    assert out.overdue(RESEND_AFTER_S + 0.1) == []  # re-stamped: not again at once


def test_a_full_buffer_drops_the_oldest_and_a_request_for_them_is_a_reset():
    out = RelayOut("e1")
    for n in range(MAX_UNACKED + 2):
        out.add(b"%d" % n, 0.0)
    assert out.backlog == MAX_UNACKED and out.dropped_through == 2
    assert out.resend(2) is None and out.resend(3)[0].seq == 3
    stream = RelayIn()
    stream.receive("e1", 4, b"d", 0.0)
    assert stream.skip_to(2) == [] and stream.receive("e1", 3, b"c", 0.0) == [b"c", b"d"]


def test_the_circuit_opens_after_failures_cools_down_and_closes_on_a_success():
    circuit = Circuit(failures_to_open=2, cooldown_s=1.0, max_cooldown_s=4.0)
    circuit.failure(0.0)
    assert circuit.allow(0.0)
    circuit.failure(0.0)
    assert circuit.state == "open" and not circuit.allow(0.5)
    assert circuit.allow(1.0) and circuit.state == "half_open"
    circuit.failure(1.0)  # the trial failed: open again, twice as long
    assert not circuit.allow(2.5) and circuit.allow(3.0)
    circuit.success()
    assert circuit.state == "closed" and circuit.opened == 2


def test_relay_messages_and_batches_of_frames_cross_the_link_codec():
    for msg in (Hello(1, "ep", "node-b"), RelayBatch(0, "ep", "fd-ep", 7, b"\x00\x01"), RelayAck(1, "ep", 6, 7),
                RelayReset(0, "ep", 5)):
        assert decode(encode(msg)[4:]) == msg
    body = encode(RelayAck(1, "a", 1, 0)) + encode(RelayReset(0, "b", 2))
    assert decode_frames(body) == [RelayAck(1, "a", 1, 0), RelayReset(0, "b", 2)]


# -- two lossy paths, acknowledgements and resends: exactly once, in order --------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["rabbitmq", "link", "lost"]), st.booleans(), st.integers(0, 3)),
                min_size=1, max_size=60))
def test_whatever_the_paths_lose_double_or_reorder_the_front_door_gets_each_batch_once_in_order(fates):
    """Each batch goes one way (RabbitMQ, the link, or lost), maybe twice,
    and is held back a few steps; the front door acknowledges, asks for
    gaps, the shard resends overdue batches over the link (which delivers)."""
    out, stream = RelayOut("e1"), RelayIn()
    in_flight: list[tuple[int, int, bytes]] = []  # (due step, seq, body)
    delivered: list[bytes] = []
    now = 0.0
    for step, (path, doubled, delay) in enumerate(fates):
        now += 0.1
        batch = out.add(b"%d" % step, now)
        if path != "lost":
            in_flight += [(step + delay, batch.seq, batch.body)] * (2 if doubled else 1)
        for item in sorted(i for i in in_flight if i[0] <= step):
            in_flight.remove(item)
            delivered += stream.receive("e1", item[1], item[2], now)
        out.ack(stream.delivered)
    for _ in range(100):  # afterwards: acknowledgements, gap requests, resends over the link
        now += GAP_S
        for item in sorted(in_flight):
            delivered += stream.receive("e1", item[1], item[2], now)
        in_flight = []
        missing = stream.missing(now)
        out.ack(stream.delivered)
        resend = (out.resend(missing) or []) if missing else []
        for batch in resend + out.overdue(now + RESEND_AFTER_S):
            delivered += stream.receive("e1", batch.seq, batch.body, now)
        if stream.delivered == len(fates):
            break
    assert delivered == [b"%d" % n for n in range(len(fates))]
