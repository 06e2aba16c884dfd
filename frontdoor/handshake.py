"""The front door's HTTP side of a WebSocket: what is read from the upgrade
request (token, subprotocol), the JSON answers given instead of an upgrade,
and the freeing of a connection's objects when it ends. No state of its own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from typing import Any
from urllib.parse import parse_qs

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Response
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from rounds.protocol.ws import SUBPROTOCOLS


def frame_bytes(frame: str | bytes, limit: int) -> int:
    """The frame's size on the wire, encoding a text frame only when that can matter.

    websockets hands text frames over decoded, and `len` of a `str` counts
    characters: up to four times fewer than its UTF-8 bytes, which would let
    a frame of non-ASCII text through at four times `max_frame_bytes`.
    """
    size = len(frame)
    if isinstance(frame, bytes) or size > limit or 4 * size <= limit:
        return size
    return len(frame.encode())


def select_subprotocol(connection: ServerConnection, subprotocols: Sequence[Subprotocol]) -> Subprotocol | None:
    """Our two subprotocols if offered; JSON for clients that offer none or others."""
    for offered in subprotocols:
        if offered in SUBPROTOCOLS:
            return offered
    return None


def token_from(query: str, authorization: str | None) -> str | None:
    values = parse_qs(query).get("token")
    if values:
        return values[0]
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def remote_of(connection: ServerConnection) -> str | None:
    address = connection.remote_address
    return f"{address[0]}:{address[1]}" if address else None


def json_response(connection: ServerConnection, status: int, body: dict[str, Any]) -> Response:
    response = connection.respond(status, json.dumps(body, separators=(",", ":")) + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


def free_by_refcount(ws: ServerConnection) -> None:
    """Let a connection be freed by its reference count when it ends, not by
    a collection of the oldest generation, which walks every other one as
    well (50 ms with 1,500 connected).

    `websockets` leaves cycles through a connection's protocol; once the
    connection is lost, whatever ended it (a close, a tab closed or a network
    lost, a refused upgrade, an HTTP answer), they serve nothing and are
    undone (tests/integration/test_frontdoor_memory.py keeps it so):
    - `serve(select_subprotocol=...)` binds to the protocol a closure over
      the connection: dropped, the protocol's own method is back;
    - the protocol's parser, a generator of its own, is left suspended when
      the connection ends without a closing handshake: closed;
    - the parser's exception then keeps a traceback, which holds the
      parser's first frame, and so does the exception of a handshake that
      failed: their tracebacks (and their causes') are dropped, the
      exceptions stay (the cause of a later `ConnectionClosed`).
    """
    ws.connection_lost_waiter.add_done_callback(partial(_release_protocol, ws.protocol))


def _release_protocol(protocol: ServerProtocol, _lost: object) -> None:
    vars(protocol).pop("select_subprotocol", None)
    protocol.parser.close()
    chains: tuple[BaseException | None, ...] = (protocol.parser_exc, protocol.handshake_exc)
    for exc in chains:
        for _ in range(8):  # a chain of causes is short; never loop on one that cycles
            if exc is None:
                break
            exc.__traceback__ = None
            exc = exc.__cause__ or exc.__context__
