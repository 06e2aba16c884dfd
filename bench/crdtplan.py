"""What the document benchmark's parent and workers agree on, and its pure bookkeeping.

Belongs here: the modes and codecs, the worker's plan, the URL of a room in
each mode, the marker that carries a send time inside a Y.js update, and the
delivery ledger (who is owed which update, who got it). Must not be here:
sockets, clocks, pycrdt (`crdtgen.py` does the I/O and passes times in).

Timing without decoding: a sender inserts `marker(sender, sent_ns)` as its
text and the receivers look for markers in the bytes they get. A Y.js v1
update carries an inserted string verbatim as UTF-8 (a `ContentString`: a
varuint length and the bytes), whichever side encoded it (pycrdt here, Yjs
in the reference server, which re-encodes what it relays); a server that
merges updates keeps each string whole, so every marker of a merged update
is found. `sent_ns` is `time.monotonic_ns()`, one clock for every process
of the machine; a room never spans two workers anyway.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

from rounds.bench.plan import RoomPlan

WS, YJS = "ws", "yjs"  # `/ws` protocol v1, or y-websocket
MODES = (WS, YJS)
JSON, MSGPACK = "json", "msgpack"
CODECS = (JSON, MSGPACK)
TEXT_NAME = "t"  # the shared Text every client inserts into

_MARKER = re.compile(rb"<(\d{1,9})@(\d{1,20})>")


def marker(sender: int, sent_ns: int) -> str:
    """The text a client inserts: its user index and the send time (ASCII, so
    its UTF-8 bytes are the text itself)."""
    if sender < 0 or sent_ns < 0:
        raise ValueError("sender and sent_ns are non-negative")
    return f"<{sender}@{sent_ns}>"


def find_markers(data: bytes) -> list[tuple[int, int]]:
    """Every (sender, sent_ns) marker in `data` (an update, or a whole frame
    holding one), in order."""
    return [(int(sender), int(sent)) for sender, sent in _MARKER.findall(data)]


# --- URLs -------------------------------------------------------------------------


def yjs_base_url(ws_url: str) -> str:
    """The `/yjs` endpoint beside a gateway's `/ws` URL (same host and port)."""
    parts = urlsplit(ws_url)
    return urlunsplit((parts.scheme, parts.netloc, "/yjs", "", ""))


def room_url(mode: str, url: str, resource_id: str) -> str:
    """Where a client of `resource_id` connects, without its token: the `/ws`
    URL itself, or the y-websocket base URL and the room as the last path
    segment (percent-encoded; the reference server names documents by path)."""
    if mode == WS:
        return url
    return f"{url.rstrip('/')}/{quote(resource_id, safe=':')}"


# --- the worker's plan ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CrdtPlan:
    """Everything a document worker needs; deadlines are `time.monotonic()` readings."""

    index: int
    mode: str  # WS or YJS
    url: str  # WS: ws://HOST:PORT/ws; YJS: the base URL rooms are appended to
    codec: str  # JSON or MSGPACK, on /ws
    private_key_pem: bytes
    role: str
    rooms: tuple[RoomPlan, ...]
    interval_s: float  # between two updates of one client
    connect_concurrency: int
    seed: int
    ramp_deadline: float  # connects and syncs not done by then count as failed
    hard_deadline: float  # the worker must have sent its result by then
    reply_timeout_s: float = 5.0  # RESOURCE_STATE, sync step 2, UPDATE_ACK
    delivery_timeout_s: float = 5.0  # an update not at a member by then is missing there
    max_samples: int = 1_000_000  # per metric; beyond, counted as dropped


# --- who is owed which update -------------------------------------------------------

DELIVERED = "delivered"  # the first receipt at a member that was owed it
EXTRA = "extra"  # the first receipt at a member that was not synced when it was sent
ECHO = "echo"  # the sender got its own update back
DUPLICATE = "duplicate"  # a member got it again while it was in flight
UNMATCHED = "unmatched"  # settled or expired already (late or duplicate), or never sent here


@dataclass(slots=True)
class _Sent:
    sent_ns: int
    expected: set[int]  # members that were synced when it was sent, minus those gone since
    received: set[int] = field(default_factory=set)


class Ledger:
    """Updates in flight, keyed by their marker, and the running totals of
    deliveries owed (`expected`), made (`delivered`) and never made
    (`missing`) among updates that are settled: received by every member
    owed them, or expired. An update settles as soon as its last owed
    receipt comes, so the ledger holds about a timeout's worth of updates."""

    def __init__(self) -> None:
        self.pending: dict[tuple[int, int], _Sent] = {}
        self.expected = 0
        self.delivered = 0
        self.missing = 0

    def sent(self, sender: int, sent_ns: int, members: Iterable[int]) -> None:
        """`sender` sends the update marked `sent_ns`; `members` are the room's
        synced members (the sender is left out if among them)."""
        expected = set(members)
        expected.discard(sender)
        record = _Sent(sent_ns, expected)
        self.pending[(sender, sent_ns)] = record
        if not expected:
            self._settle((sender, sent_ns), record)

    def cancel(self, sender: int, sent_ns: int) -> None:
        """The send failed: nobody is owed it."""
        self.pending.pop((sender, sent_ns), None)

    def receipt(self, receiver: int, sender: int, sent_ns: int) -> str:
        """`receiver` got the update marked (`sender`, `sent_ns`); one of the outcomes above."""
        if receiver == sender:
            return ECHO
        key = (sender, sent_ns)
        record = self.pending.get(key)
        if record is None:
            return UNMATCHED
        if receiver in record.received:
            return DUPLICATE
        record.received.add(receiver)
        if receiver not in record.expected:
            return EXTRA
        if record.expected <= record.received:
            self._settle(key, record)
        return DELIVERED

    def release(self, member: int) -> None:
        """`member` is gone (its connection closed): it is owed nothing in flight."""
        for key, record in list(self.pending.items()):
            record.expected.discard(member)
            if record.expected <= record.received:
                self._settle(key, record)

    def expire(self, before_ns: int | None) -> int:
        """Settle the updates sent before `before_ns` (all if None); return how
        many deliveries they missed."""
        missed = 0
        for key, record in list(self.pending.items()):
            if before_ns is None or record.sent_ns < before_ns:
                missed += self._settle(key, record)
        return missed

    def settled(self) -> bool:
        return not self.pending

    def _settle(self, key: tuple[int, int], record: _Sent) -> int:
        del self.pending[key]
        delivered = len(record.expected & record.received)
        missed = len(record.expected) - delivered
        self.expected += len(record.expected)
        self.delivered += delivered
        self.missing += missed
        return missed
