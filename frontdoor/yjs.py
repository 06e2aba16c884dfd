"""`/yjs/{resourceId}`: the y-websocket protocol for stock Y.js clients (issue 4).

A y-websocket connection is one member of one room. The front door joins it
on connect (as an editor if the role may edit, else as a viewer), its
session (`frontdoor.session`) turns its messages into the same shard
commands as `/ws` (`DocSync`, `DocUpdate` without an ack, `Awareness`), and
`YjsCodec` turns what the shard sends into y-websocket frames, beside the
JSON and msgpack codecs of `/ws`: shards know nothing of it. Presence and lock events have no y-websocket
form; such a client sees the others through awareness.

The stock server's habits are kept where clients rely on them: on connect
the server sends its sync step 1 (the client answers with step 2, i.e. what
the server lacks) and the room's awareness; awareness is echoed to its
sender too (y-websocket clients reconnect after 30 s without a message).
When the shard re-tells the room (a link reopened, a shard restarted), the
client gets our sync step 1 and the whole document as a sync step 2, so both
sides end up with everything either had; and our sync step 1 alone when an
update of its own waits for something only it has.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from rounds.ids import ResourceId
from rounds.protocol.messages import SYNC_STEP1, SYNC_STEP2
from rounds.protocol.ws import MAX_RESOURCE_ID_CHARS, MessageType
from rounds.protocol.yjs import (
    YMessage,
    awareness_message,
    decode_message,
    sync_step1,
    sync_step2,
    sync_update,
)

PATH_PREFIX = "/yjs/"
SUBPROTOCOL_YJS = "y-websocket"  # our name for it in audit records; the client offers none


def resource_from_path(path: str) -> ResourceId | None:
    """`/yjs/document:999/tab:notes` -> `document:999/tab:notes` (percent-decoded)."""
    if not path.startswith(PATH_PREFIX):
        return None
    resource = unquote(path[len(PATH_PREFIX):])
    if not resource or len(resource) > MAX_RESOURCE_ID_CHARS:
        return None
    return ResourceId(resource)


class YjsCodec:
    """Shard events -> y-websocket frames; None for what it cannot carry."""

    name = SUBPROTOCOL_YJS
    binary_as_base64 = False

    def encode(self, type_: str, data: dict[str, Any], ref: Any = None) -> bytes | None:
        if type_ == SYNC_STEP1:
            return sync_step1(data["stateVector"])
        frame = _FRAMES.get(type_)
        return None if frame is None else frame(data["update"])

    def greeting(self, data: dict[str, Any]) -> list[bytes]:
        """A `RESOURCE_STATE` as y-websocket frames: our sync step 1, the
        document when it is sent (a refresh), the room's awareness."""
        frames = [sync_step1(data["stateVector"])]
        if data.get("state"):
            frames.append(sync_step2(data["state"]))
        if data.get("awareness"):
            frames.append(awareness_message(data["awareness"]))
        return frames

    def decode(self, frame: str | bytes) -> YMessage:
        if isinstance(frame, str):
            raise ValueError("text frame on a y-websocket connection")
        return decode_message(frame)


_FRAMES = {
    MessageType.RESOURCE_UPDATE: sync_update,
    MessageType.AWARENESS_UPDATE: awareness_message,
    SYNC_STEP2: sync_step2,
}

YJS = YjsCodec()
