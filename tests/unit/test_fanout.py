"""`frontdoor.fanout.frame` makes the frames websockets itself would send."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode

from rounds.frontdoor.fanout import frame


@pytest.mark.parametrize("message", ["", "x", "é" * 70, "a" * 125, "b" * 126, "c" * 65_535, "d" * 65_536,
                                     b"", b"\x00\x01", bytes(range(256)) * 300])
def test_frames_are_byte_for_byte_what_websockets_would_write(message: str | bytes) -> None:
    opcode = Opcode.TEXT if isinstance(message, str) else Opcode.BINARY
    data = message.encode() if isinstance(message, str) else message
    expected = Frame(opcode, data).serialize(mask=False)
    assert frame(message) == expected
