"""Identifier types and the one rule about resource ids: hierarchy.

A resource id is hierarchical when its last `/`-separated segment is itself
`type:id` (seed story BE-001.2, "Multi-tab presence tracking"):
`document:999/tab:diagnosis` has the parent `document:999`, while
`page:/patient/12345` is a plain id (its last segment `12345` has no type).
Nothing in this module does I/O.
"""

from __future__ import annotations

import re
from typing import NewType

UserId = NewType("UserId", str)
SessionId = NewType("SessionId", str)
ResourceId = NewType("ResourceId", str)
# A connection id is unique across the gateway: the front door's index sits in
# the high bits, a per-front-door counter in the low 40 (see `conn_id`).
ConnId = NewType("ConnId", int)
FrontDoorId = NewType("FrontDoorId", int)
ShardId = NewType("ShardId", int)

_CONN_BITS = 40
# fullmatch, not `^...$`: `$` would also accept a trailing newline.
_TYPED_SEGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*:.+")


def conn_id(frontdoor: FrontDoorId, counter: int) -> ConnId:
    """Compose a gateway-wide connection id from a front door and its counter."""
    return ConnId((frontdoor << _CONN_BITS) | (counter & ((1 << _CONN_BITS) - 1)))


def frontdoor_of(conn: ConnId) -> FrontDoorId:
    """The front door that owns a connection id."""
    return FrontDoorId(conn >> _CONN_BITS)


def parent_of(resource: ResourceId) -> ResourceId | None:
    """The parent of a hierarchical resource id, or None for a plain id."""
    head, sep, last = resource.rpartition("/")
    if not sep or not head or not _TYPED_SEGMENT.fullmatch(last):
        return None
    return ResourceId(head)


def routing_key(resource: ResourceId) -> str:
    """What the hash ring places: the parent, so a family shares one shard."""
    return parent_of(resource) or resource
