"""Awareness (cursors, selections, who is typing) of one room.

A pure machine (no I/O, no clock) that keeps, per Y.js client id, the latest
y-protocols awareness entry and the connection that owns it, so that the shard
can relay what is new, hand a joiner everyone's current state, and clear a
connection's cursors when it goes.

The acceptance rule is y-protocols' `applyAwarenessUpdate`: an entry wins with
a newer clock (an unknown id counts as clock 0), or with the same clock when
it removes (state null) a live state. Beyond that, what a relay needs and a peer-to-peer client does not:

- A client id belongs to the first connection that sends a live state for it;
  entries for it from any other connection are ignored, so one tab cannot
  move or delete another's cursor; except a live state from another
  connection of the same user, which takes the id over: a client that
  reconnects keeps its Y.js client id, and its old connection may not be
  known gone yet (its front door died and has not come back).
- Bounds (a bad client hurts only itself): at most `max_clients_per_conn` ids
  per connection (a y-websocket connection carries one) and
  `max_state_bytes` of UTF-8 per state; entries beyond are ignored. An owned
  id counts until its connection goes, removed or not, so that a connection
  cannot grow the table by cycling ids.
- Entries at clock `MAX_VARUINT` are ignored: their removal (clock + 1) could
  not be written.

Clients drop a state they have not heard of for 30 s (y-protocols'
`outdatedTimeout`) and renew theirs every 15 s, so accepted renewals are
relayed even when the state did not change. Time-outs are left to the
clients: without a clock, this machine forgets only on `remove_conn`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rounds.protocol.yjs import (
    MAX_AWARENESS_CLIENTS_PER_CONN,
    MAX_AWARENESS_STATE_BYTES,
    MAX_VARUINT,
    NULL_STATE,
    AwarenessEntry,
    decode_awareness,
    encode_awareness,
)

DEFAULT_MAX_CLIENTS_PER_CONN = MAX_AWARENESS_CLIENTS_PER_CONN
DEFAULT_MAX_STATE_BYTES = MAX_AWARENESS_STATE_BYTES


@dataclass(frozen=True, slots=True)
class _Owned:
    conn: int
    entry: AwarenessEntry
    user: str | None = None


class RoomAwareness:
    """Awareness (cursors, selections) of one room, by client id, remembering
    which connection owns each client id."""

    def __init__(self, max_clients_per_conn: int = DEFAULT_MAX_CLIENTS_PER_CONN,
                 max_state_bytes: int = DEFAULT_MAX_STATE_BYTES) -> None:
        self._max_clients_per_conn = max_clients_per_conn
        self._max_state_bytes = max_state_bytes
        self._clients: dict[int, _Owned] = {}  # client id -> owner and latest entry (live or removed)
        self._by_conn: dict[int, set[int]] = {}  # conn -> the client ids it owns
        self._live = 0

    def __len__(self) -> int:
        """Live (non-null) states."""
        return self._live

    def apply(self, conn: int, update: bytes, user: str | None = None) -> bytes | None:
        """Take `conn`'s awareness update (`user`: who the connection is);
        return the update to relay to the others (the accepted entries, in
        order) or None when nothing changed. Raises `YProtocolError` for a
        malformed update, changing nothing."""
        accepted: dict[int, AwarenessEntry] = {}
        for entry in decode_awareness(update):
            if self._accept(conn, entry, user):
                accepted.pop(entry.client_id, None)  # a repeated id: relay its last entry, once
                accepted[entry.client_id] = entry
        return encode_awareness(accepted.values()) if accepted else None

    def remove_conn(self, conn: int) -> bytes | None:
        """`conn` left: its live states become null one clock later. Returns
        that update for the others, or None; forgets its client ids."""
        gone = []
        for client_id in sorted(self._by_conn.pop(conn, ())):
            entry = self._clients.pop(client_id).entry
            if not entry.removed:
                self._live -= 1
                gone.append(AwarenessEntry(client_id, entry.clock + 1, NULL_STATE))
        return encode_awareness(gone) if gone else None

    def snapshot(self) -> bytes | None:
        """Every live state as one update (for a joiner), or None."""
        live = [owned.entry for owned in self._clients.values() if not owned.entry.removed]
        return encode_awareness(live) if live else None

    def owned(self, conn: int) -> frozenset[int]:
        """The client ids `conn` owns here."""
        return frozenset(self._by_conn.get(conn, ()))

    def owner(self, client_id: int) -> int | None:
        """The connection that owns `client_id`, if any."""
        owned = self._clients.get(client_id)
        return None if owned is None else owned.conn

    def _accept(self, conn: int, entry: AwarenessEntry, user: str | None) -> bool:
        if entry.clock >= MAX_VARUINT:
            return False
        if not entry.removed and len(entry.state.encode("utf-8")) > self._max_state_bytes:
            return False
        current = self._clients.get(entry.client_id)
        if current is None:
            return self._claim(conn, entry, user)
        if current.conn != conn:
            if entry.removed or user is None or current.user != user:
                return False
            return self._take_over(conn, current, entry, user)
        ours = current.entry
        newer = entry.clock > ours.clock or (entry.clock == ours.clock and entry.removed and not ours.removed)
        if not newer:
            return False
        self._live += (not entry.removed) - (not ours.removed)
        self._clients[entry.client_id] = _Owned(conn, entry, current.user)
        return True

    def _take_over(self, conn: int, current: _Owned, entry: AwarenessEntry, user: str) -> bool:
        """The same user's other connection now holds the id (a reconnect)."""
        if entry.clock < current.entry.clock or len(self._by_conn.get(conn, ())) >= self._max_clients_per_conn:
            return False
        left = self._by_conn[current.conn]
        left.discard(entry.client_id)
        if not left:
            del self._by_conn[current.conn]
        self._by_conn.setdefault(conn, set()).add(entry.client_id)
        self._live += 1 - (not current.entry.removed)
        self._clients[entry.client_id] = _Owned(conn, entry, user)
        return True

    def _claim(self, conn: int, entry: AwarenessEntry, user: str | None) -> bool:
        # y-protocols starts an unknown id at clock 0, so it takes a live state
        # from clock 1 on (the `{}` a fresh client holds at clock 0 is never
        # shown); removing an id nobody has announces nothing. Neither may use
        # up one of the connection's ids.
        if entry.removed or entry.clock == 0:
            return False
        if len(self._by_conn.get(conn, ())) >= self._max_clients_per_conn:
            return False
        self._by_conn.setdefault(conn, set()).add(entry.client_id)
        self._clients[entry.client_id] = _Owned(conn, entry, user)
        self._live += 1
        return True
