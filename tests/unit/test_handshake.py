"""The front door's HTTP side of a WebSocket (`rounds.frontdoor.handshake`):
which subprotocol a client is given, over loopback against `websockets`, and
what is let go when a connection ends, on a connection that needs no socket.
How much memory that frees is tests/integration/test_frontdoor_memory.py's.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from rounds.frontdoor.handshake import frame_bytes, free_by_refcount, select_subprotocol, token_from
from rounds.protocol.ws import SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK


def test_a_text_frame_is_measured_in_utf8_bytes_when_its_characters_alone_could_pass_the_limit() -> None:
    assert frame_bytes("é" * 30, limit=40) == 60  # 30 characters, but 60 bytes: over a 40-byte limit
    assert frame_bytes("a" * 30, limit=40) == 30
    assert frame_bytes("é" * 10, limit=40) == 10  # at most 40 bytes whatever the characters: not encoded
    assert frame_bytes("é" * 50, limit=40) == 50  # over the limit already
    assert frame_bytes(b"\xc3\xa9" * 30, limit=40) == 60


@pytest.mark.parametrize(("query", "authorization", "token"), [
    ("token=abc&x=1", "Bearer other", "abc"),  # the query string wins
    ("", "Bearer abc ", "abc"),
    ("", "bearer abc", "abc"),
    ("", "Basic dXNlcjpwYXNz", None),
    ("token=", None, None),
    ("", None, None),
])
def test_the_token_comes_from_the_query_string_else_from_a_bearer_authorization(
        query: str, authorization: str | None, token: str | None) -> None:
    assert token_from(query, authorization) == token


@pytest.mark.parametrize(("offered", "given"), [
    (["chat", SUBPROTOCOL_MSGPACK], SUBPROTOCOL_MSGPACK),
    (["chat", SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK], SUBPROTOCOL_JSON),
    (["chat", "superchat"], None),  # JSON without a subprotocol header
])
async def test_a_client_offering_other_subprotocols_first_is_given_the_first_of_ours(
        offered: Sequence[str], given: str | None) -> None:
    async with serve(lambda ws: ws.wait_closed(), "127.0.0.1", 0, select_subprotocol=select_subprotocol) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/ws",
                           subprotocols=[Subprotocol(name) for name in offered]) as client:
            assert client.subprotocol == given


def _raised(error: Exception) -> Exception:
    try:
        raise error
    except Exception as caught:
        return caught


async def test_an_ended_connection_drops_the_tracebacks_of_a_cause_chain_that_cycles() -> None:
    first, second = _raised(ValueError("first")), _raised(ValueError("second"))
    first.__cause__, second.__cause__ = second, first  # no chain websockets makes, but one must not hang us
    ws = ServerConnection(ServerProtocol(), server=None)  # type: ignore[arg-type]  # the server is never read
    ws.protocol.parser_exc = first
    free_by_refcount(ws)

    ws.connection_lost_waiter.set_result(None)  # what `connection_lost` does when the socket goes
    await asyncio.sleep(0)  # the waiter's callbacks run

    assert first.__traceback__ is None and second.__traceback__ is None
    assert (first.__cause__, second.__cause__) == (second, first)  # the exceptions stay, as causes
    assert inspect.getgeneratorstate(ws.protocol.parser) == inspect.GEN_CLOSED
