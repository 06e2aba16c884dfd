"""Cross-node fan-out: the sequenced stream from a shard to a front door on
another node (story BE-001.5). Pure state, no I/O: the shard and the front
door drive it; a transport (`rounds.relay.transport`) carries it: RabbitMQ between nodes.

A shard sends a front door on its own node everything over their direct
link. To a front door on another node it sends *batches*: the link frames of
one event-loop pass, numbered 1, 2, 3, ... per (shard epoch, front door).
A batch goes through the RabbitMQ topic exchange while the shard's circuit
to RabbitMQ is closed, over the direct link (`RelayBatch`) while it is open;
either way the front door delivers batches in number order, each once:

- `RelayOut` (the shard's side, one per remote front door) keeps every
  batch until the front door acknowledges it (`RelayAck`, cumulative), so a
  batch RabbitMQ lost is sent again over the link when the front door asks
  (`RelayAck.missing`) or when it went unacknowledged for too long. Bounded:
  past `MAX_UNACKED` batches the oldest are dropped and the front door, when
  it asks for one of those, is told to start over (`reset`).
- `RelayIn` (the front door's side, one per shard) holds batches that came
  early, delivers the next ones in order, drops duplicates, and says which
  number it is missing once a gap has lasted `GAP_S`.

At-least-once on the wire, exactly once and in order at the front door, as
long as the shard lives; a restarted shard (new epoch) starts a new stream.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

MAX_UNACKED = 50_000  # batches a shard keeps for one front door before it drops the oldest
GAP_S = 0.25  # a missing batch is asked for after this long
RESEND_AFTER_S = 2.0  # a batch unacknowledged this long is sent again over the link


@dataclass(frozen=True, slots=True)
class Batch:
    seq: int
    body: bytes  # length-prefixed link frames, as on the link
    sent_at: float


@dataclass(slots=True)
class RelayOut:
    """A shard's stream to one front door on another node."""

    epoch: str  # the shard process's epoch: a new stream when it restarts
    peer: str = ""  # the front door process's epoch: a new stream when it restarts
    next_seq: int = 1
    unacked: deque[Batch] = field(default_factory=deque)
    dropped_through: int = 0  # the highest number dropped unacknowledged (cap reached)

    def add(self, body: bytes, now: float) -> Batch:
        batch = Batch(self.next_seq, body, now)
        self.next_seq += 1
        self.unacked.append(batch)
        if len(self.unacked) > MAX_UNACKED:
            self.dropped_through = self.unacked.popleft().seq
        return batch

    def ack(self, through: int) -> None:
        """The front door has delivered every batch up to `through`."""
        while self.unacked and self.unacked[0].seq <= through:
            self.unacked.popleft()

    def resend(self, missing: int) -> list[Batch] | None:
        """The batches from `missing` on, to send again; None when `missing`
        was dropped (the front door must start over)."""
        if missing <= self.dropped_through:
            return None
        return [b for b in self.unacked if b.seq >= missing]

    def overdue(self, now: float) -> list[Batch]:
        """Batches sent `RESEND_AFTER_S` ago and still unacknowledged (the
        front door may not know it misses them: nothing came after). Each is
        re-stamped, so it is sent again at most every `RESEND_AFTER_S`."""
        due = []
        for i, batch in enumerate(self.unacked):
            if now - batch.sent_at < RESEND_AFTER_S:
                break
            due.append(batch)
            self.unacked[i] = Batch(batch.seq, batch.body, now)
        return due

    @property
    def backlog(self) -> int:
        return len(self.unacked)


@dataclass(slots=True)
class RelayIn:
    """A front door's stream from one shard on another node."""

    epoch: str | None = None
    delivered: int = 0  # every batch up to this number was delivered
    early: dict[int, bytes] = field(default_factory=dict)
    gap_since: float | None = None
    duplicates: int = 0

    def receive(self, epoch: str, seq: int, body: bytes, now: float) -> list[bytes]:
        """The bodies to deliver now, in order (maybe none, maybe several)."""
        if epoch != self.epoch:  # the shard restarted: a new stream from 1
            self.epoch, self.delivered, self.early, self.gap_since = epoch, 0, {}, None
        if seq <= self.delivered or seq in self.early:
            self.duplicates += 1
            return []
        self.early[seq] = body
        ready = []
        while self.delivered + 1 in self.early:
            self.delivered += 1
            ready.append(self.early.pop(self.delivered))
        self.gap_since = (self.gap_since or now) if self.early else None
        return ready

    def missing(self, now: float) -> int | None:
        """The number to ask for, once a gap has lasted `GAP_S`."""
        if self.gap_since is not None and now - self.gap_since >= GAP_S:
            self.gap_since = now  # ask again after another GAP_S if it does not come
            return self.delivered + 1
        return None

    def skip_to(self, through: int) -> list[bytes]:
        """The shard no longer has the batches up to `through` (its buffer was
        full): count them as delivered and return what can go on from there."""
        self.delivered = max(self.delivered, through)
        for seq in [s for s in self.early if s <= self.delivered]:
            del self.early[seq]
        ready = []
        while self.delivered + 1 in self.early:
            self.delivered += 1
            ready.append(self.early.pop(self.delivered))
        self.gap_since = self.gap_since if self.early else None
        return ready


@dataclass(slots=True)
class Circuit:
    """Whether to use RabbitMQ: `closed` (use it), `open` (use the link; try
    again after a cool-down that doubles up to `max_cooldown_s`), `half_open`
    (one trial: its success closes it, its failure opens it again)."""

    failures_to_open: int = 3
    cooldown_s: float = 1.0
    max_cooldown_s: float = 30.0
    state: str = "closed"
    failures: int = 0
    opened_at: float = 0.0
    current_cooldown_s: float = 0.0
    opened: int = 0  # how many times it opened

    def cooling(self, now: float) -> bool:
        """Open, and its cool-down not over: nothing may try RabbitMQ yet."""
        return self.state == "open" and now - self.opened_at < self.current_cooldown_s

    def allow(self, now: float) -> bool:
        if self.state == "open" and not self.cooling(now):
            self.state = "half_open"
        return self.state != "open"

    def success(self) -> None:
        if self.state != "closed":
            self.current_cooldown_s = 0.0
        self.state, self.failures = "closed", 0

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.failures_to_open:
            if self.state != "open":
                self.opened += 1
            self.current_cooldown_s = min(max(self.cooldown_s, 2 * self.current_cooldown_s), self.max_cooldown_s)
            self.state, self.opened_at = "open", now
