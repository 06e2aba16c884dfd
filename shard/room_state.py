"""`RESOURCE_STATE`, assembled in one place (DESIGN.md, wire protocol v1).

What a member is told of its room: on joining (the answer to its
`JOIN_RESOURCE`, carrying its `ref`) and again, unasked, whenever it may
have missed deliveries (`TellState.refresh`: its front door's link reopened,
the shard restarted). The shard service gathers the parts (presence's
users, the document, the room's locks and awareness) and calls this; the
front door turns it into a `/ws` frame, or into sync steps for a y-websocket
client. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from rounds.ids import ResourceId


def resource_state(room: ResourceId, users: list[dict[str, Any]], document: tuple[bytes, bytes, int],
                   locks: list[dict[str, Any]], awareness: bytes | None, kind: str,
                   refresh: bool) -> dict[str, Any]:
    """`document`: what the member lacks (all of it for a refresh), the
    document's state vector and its revision.

    A y-websocket member joining gets no state here: it sends its own sync
    step 1 and is answered with what it lacks. On a refresh it gets the whole
    document (its front door sends it as a sync step 2, after our sync step 1,
    which the client answers with what the shard lacks)."""
    state, state_vector, revision = document
    return {
        "resourceId": room,
        "users": users,
        "state": state if kind == "ws" or refresh else b"",
        "revision": revision,
        "locks": locks,
        "stateVector": state_vector,
        "awareness": awareness,
    }
