"""What the bench parent and its worker processes agree on: the loopback-only
URL rule, user ids, the phases, and the messages between them.

Belongs here: plain data and pure helpers shared by `presence.py` (the
parent) and `loadgen.py` (a worker). Must not be here: sockets, timing.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

RAMP, MEASURED, DRAIN = "ramp", "measured", "drain"
MAX_ERROR_TEXTS = 10  # first error texts kept per worker


# --- the URL rule -------------------------------------------------------------


def require_loopback_url(url: str) -> str:
    """Return `url` if it is `ws://` or `wss://` to a loopback host, else raise ValueError.

    The load generator opens thousands of connections: it may only aim at
    this machine (127.0.0.0/8, ::1 or the name `localhost`), never elsewhere.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket URL (ws:// or wss://): {url!r}")
    try:
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as error:
        raise ValueError(f"malformed URL {url!r}: {error}") from None
    if not host:
        raise ValueError(f"URL has no host: {url!r}")
    if host.lower() == "localhost":
        return url
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"only loopback targets are allowed, not the name {host!r}") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if not address.is_loopback:
        raise ValueError(f"only loopback targets are allowed, not {host!r}")
    return url


def bench_user_id(index: int) -> str:
    """The id of simulated user `index`; its token's `sub` and `userId`."""
    return f"bench-u{index}"


def url_with_token(url: str, token: str) -> str:
    """Append `token=JWT` to the query (JWTs are URL-safe base64 with dots)."""
    return f"{url}{'&' if '?' in url else '?'}token={token}"


def plan_rooms(users: int, room_size: int, prefix: str) -> list[RoomPlan]:
    """Users 0..users-1 in rooms `{prefix}0, {prefix}1, ...` of `room_size`, in
    order; the last room may be smaller."""
    return [
        RoomPlan(f"{prefix}{r}", tuple(range(start, min(start + room_size, users))))
        for r, start in enumerate(range(0, users, room_size))
    ]


def assign_rooms(rooms: Sequence[RoomPlan], processes: int) -> list[tuple[RoomPlan, ...]]:
    """Deal whole rooms round-robin over at most `processes` workers (none left empty),
    so that a room's members, and so the sender and receivers of its messages,
    share one worker's clocks and bookkeeping."""
    workers = max(1, min(processes, len(rooms)))
    return [tuple(rooms[w::workers]) for w in range(workers)]


# --- messages between parent and workers ----------------------------------------


@dataclass(frozen=True, slots=True)
class RoomPlan:
    resource_id: str
    members: tuple[int, ...]  # user indexes, see `bench_user_id`


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """Everything a worker needs. Deadlines are `time.monotonic()` readings,
    a clock shared by all processes of the machine."""

    index: int
    url: str  # ws://HOST:PORT/ws, without the token
    private_key_pem: bytes
    role: str
    rooms: tuple[RoomPlan, ...]
    heartbeat_s: float
    churn_s: float  # mean time between two churns of one user; 0 disables churn
    connect_concurrency: int
    deflate: bool
    seed: int
    ramp_deadline: float  # connects and first joins not done by then count as failed
    hard_deadline: float  # the worker must have sent its result by then
    reply_timeout_s: float = 5.0  # RESOURCE_STATE, RESOURCE_LEFT, HEARTBEAT_ACK
    fanout_timeout_s: float = 5.0  # USER_JOINED missing after this counts as a failure


@dataclass(frozen=True, slots=True)
class Go:
    """Parent to worker: start the measured phase, end it at `until` (monotonic)."""

    until: float


@dataclass(frozen=True, slots=True)
class Stop:
    """Parent to worker: wind down now and send the result."""


@dataclass(frozen=True, slots=True)
class Progress:
    worker: int
    phase: str
    connected: int
    connect_failures: int
    joined: int
    frames_received: int
    extra: dict[str, int] = field(default_factory=dict)  # more running totals for the progress line


@dataclass(frozen=True, slots=True)
class Ready:
    worker: int


@dataclass(frozen=True, slots=True)
class WorkerResult:
    """Raw samples in ms by phase (of the request's send) and metric, and counters."""

    worker: int
    users: int
    connected_at_end: int
    samples: dict[str, dict[str, list[float]]]
    counts: dict[str, Any]
    errors: list[str]
    deadline_hit: bool


WorkerMessage = Progress | Ready | WorkerResult


class Recorder:
    """Raw samples in ms by phase and metric (at most `max_samples` each when
    given; the rest are counted as dropped), counters, first error texts."""

    def __init__(self, max_samples: int | None = None, phases: tuple[str, ...] = ()) -> None:
        self.max_samples = max_samples
        self.samples: dict[str, dict[str, list[float]]] = {phase: {} for phase in phases}
        self.counts: Counter[str] = Counter()
        self.by_key: dict[str, Counter[str]] = {}
        self.errors: list[str] = []

    def sample(self, phase: str, metric: str, start: float, end: float) -> None:
        """Record `end - start` (seconds, from one clock) in ms."""
        self.add(phase, metric, (end - start) * 1000.0)

    def add(self, phase: str, metric: str, ms: float) -> None:
        values = self.samples.setdefault(phase, {}).setdefault(metric, [])
        if self.max_samples is None or len(values) < self.max_samples:
            values.append(ms)
        else:
            self.counts["samples_dropped"] += 1

    def count(self, name: str, key: str | None = None, n: int = 1) -> None:
        if key is None:
            self.counts[name] += n
        else:
            self.by_key.setdefault(name, Counter())[key] += n

    def error(self, text: str) -> None:
        if len(self.errors) < MAX_ERROR_TEXTS:
            self.errors.append(text)

    def counts_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counts)
        out.update({name: dict(counter) for name, counter in self.by_key.items()})
        return out
