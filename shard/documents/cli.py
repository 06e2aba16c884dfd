"""`rounds doc show`: read a document as it is, or as it was at a time.

From PostgreSQL history (`postgres_dsn`) when set: the updates stored up to
`--at`, replayed in revision order. Otherwise from the document store
(Redis or `var/docs/`), current state only. Y.js does not record what type
a root is, so the roots to print are named: `--text notes --map vitals`.
"""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import datetime
from typing import Any

from pycrdt import Array, Doc, Map, Text

from rounds.config import Settings
from rounds.ids import ResourceId
from rounds.shard.documents.store import DocStore


def parse_time(text: str) -> datetime:
    """ISO 8601 with a zone (`2026-11-26T10:30:00Z`)."""
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError(f"{text!r}: give a time zone (e.g. a trailing Z for UTC)")
    return when


async def read(settings: Settings, store: DocStore, resource: str, at: datetime | None) -> dict[str, Any]:
    """`store`: the document store the settings name (read when there is no
    history); closed before this returns."""
    try:
        if settings.postgres_dsn:
            return await _from_history(settings.postgres_dsn, resource, at)
        if at is not None:
            raise ValueError("--at needs the PostgreSQL history (set postgres_dsn / ROUNDS_POSTGRES_DSN)")
        stored = await store.load(ResourceId(resource))
    finally:
        await store.aclose()
    doc: Doc = Doc()
    if stored.snapshot:
        doc.apply_update(stored.snapshot)
    for _, update in stored.log:
        doc.apply_update(update)
    revision = max([stored.revision, *(rev for rev, _ in stored.log)])
    return {"source": store.name, "doc": doc, "revision": revision, "storedAt": None,
            "updates": len(stored.log)}


async def _from_history(dsn: str, resource: str, at: datetime | None) -> dict[str, Any]:
    from rounds.shard.documents.history import read_history

    doc: Doc = Doc()
    rows = await read_history(dsn, resource, at)
    for row in rows:
        doc.apply_update(row.update)
    last = rows[-1] if rows else None
    return {"source": "postgres", "doc": doc, "revision": last.revision if last else 0,
            "storedAt": last.stored_at.isoformat() if last else None, "updates": len(rows)}


def render(found: dict[str, Any], texts: list[str], maps: list[str], arrays: list[str]) -> dict[str, Any]:
    doc: Doc = found["doc"]
    out: dict[str, Any] = {k: v for k, v in found.items() if k != "doc"}
    out["roots"] = sorted(doc.keys())
    out["text"] = {name: str(doc.get(name, type=Text)) for name in texts}
    out["map"] = {name: doc.get(name, type=Map).to_py() for name in maps}
    out["array"] = {name: doc.get(name, type=Array).to_py() for name in arrays}
    out["update"] = base64.b64encode(doc.get_update()).decode()
    return out


def show(settings: Settings, store: DocStore, resource: str, at: str | None, texts: list[str], maps: list[str],
         arrays: list[str]) -> str:
    found = asyncio.run(read(settings, store, resource, parse_time(at) if at else None))
    return json.dumps(render(found, texts, maps, arrays), indent=2, default=str)
