"""Where Y.js documents are kept between shard lives (issue 4).

A document is a snapshot (its whole state as one Y.js update, with the
revision it reached) plus a log of the updates applied since, in order.
The shard appends an update to the log *before* it sends `UPDATE_ACK`, and
now and then folds the log into a new snapshot (`compact`). Loading replays
the log over the snapshot; entries the snapshot already holds are harmless
(Y.js updates are idempotent), so a crash anywhere between the two writes of
a compaction loses and doubles nothing.

`DocStore` is the Protocol; `MemoryDocStore` and `FileDocStore` (the
embedded default) are here, `RedisDocStore` in `store_redis`.

What is durable when is in docs/architecture.md ("Documents").
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgpack

from rounds.ids import ResourceId


@dataclass(frozen=True, slots=True)
class StoredDoc:
    snapshot: bytes | None = None
    revision: int = 0  # of the snapshot
    log: list[tuple[int, bytes]] = field(default_factory=list)  # (revision, update), oldest first


class DocStore(Protocol):
    name: str

    async def load(self, room: ResourceId) -> StoredDoc: ...

    async def append(self, logs: Mapping[ResourceId, Sequence[tuple[int, bytes]]]) -> None:
        """Add updates to the logs of several documents (each in order) at
        once; when this returns they are as durable as the store is."""
        ...

    async def compact(self, room: ResourceId, state: bytes, revision: int, covered: int) -> None:
        """Make `state` (at `revision`) the snapshot and drop the log's first
        `covered` entries (those the snapshot holds)."""
        ...

    async def health(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


class MemoryDocStore:
    """Documents outlive an unload, not the process: for tests and benchmarks."""

    name = "memory"

    def __init__(self) -> None:
        self.docs: dict[ResourceId, StoredDoc] = {}

    async def load(self, room: ResourceId) -> StoredDoc:
        stored = self.docs.get(room)
        return StoredDoc() if stored is None else StoredDoc(stored.snapshot, stored.revision, list(stored.log))

    async def append(self, logs: Mapping[ResourceId, Sequence[tuple[int, bytes]]]) -> None:
        for room, entries in logs.items():
            self.docs.setdefault(room, StoredDoc()).log.extend(entries)

    async def compact(self, room: ResourceId, state: bytes, revision: int, covered: int) -> None:
        old = self.docs.get(room, StoredDoc())
        self.docs[room] = StoredDoc(state, revision, old.log[covered:])

    async def health(self) -> dict[str, Any]:
        return {"backend": self.name, "ok": True, "documents": len(self.docs)}

    async def aclose(self) -> None:
        return None


class FileDocStore:
    """The embedded default: one directory per document under `var/docs/`.

    `log` holds records `[4-byte length][msgpack [revision, update]]`,
    appended with one `write` each (in the OS's page cache when `append`
    returns: an acknowledged update survives the crash of any process; with
    `fsync` set, also a power cut, at the cost of a disk flush per batch).
    `snapshot` is replaced atomically (write, fsync, rename); compacting
    rewrites the log without the entries the snapshot covers the same way.
    A torn last record (a crash mid-write) is cut off on load. The logs of
    the last `OPEN_LOGS` documents written stay open.
    """

    name = "file"
    OPEN_LOGS = 256

    def __init__(self, directory: str | Path, fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self._fds: OrderedDict[ResourceId, int] = OrderedDict()

    def _dir(self, room: ResourceId) -> Path:
        digest = hashlib.sha256(room.encode()).hexdigest()
        return self.directory / digest[:2] / digest

    async def load(self, room: ResourceId) -> StoredDoc:
        return await asyncio.to_thread(self._load, room)

    def _load(self, room: ResourceId) -> StoredDoc:
        folder = self._dir(room)
        snapshot, revision = None, 0
        try:
            revision_text, _, snapshot = (folder / "snapshot").read_bytes().partition(b"\n")
            revision = int(revision_text)
        except FileNotFoundError:
            pass
        try:
            raw = (folder / "log").read_bytes()
        except FileNotFoundError:
            raw = b""
        records, good = _records(raw)
        if good < len(raw):
            # A torn last record (never acknowledged): cut it off, or the
            # records appended after it would be unreadable.
            os.truncate(folder / "log", good)
        return StoredDoc(snapshot or None, revision, records)

    async def append(self, logs: Mapping[ResourceId, Sequence[tuple[int, bytes]]]) -> None:
        written = []
        for room, entries in logs.items():
            fd = self._fds.get(room)
            if fd is None:
                fd = self._open_log(room)
            else:
                self._fds.move_to_end(room)
            os.write(fd, b"".join(_record(rev, update) for rev, update in entries))
            written.append(fd)
        if self.fsync:
            await asyncio.to_thread(_fsync_all, written)

    def _open_log(self, room: ResourceId) -> int:
        folder = self._dir(room)
        try:
            fd = os.open(folder / "log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except FileNotFoundError:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "room").write_text(room)  # which document this directory holds
            fd = os.open(folder / "log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._fds[room] = fd
        while len(self._fds) > self.OPEN_LOGS:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _close_log(self, room: ResourceId) -> None:
        fd = self._fds.pop(room, None)
        if fd is not None:
            os.close(fd)

    async def compact(self, room: ResourceId, state: bytes, revision: int, covered: int) -> None:
        self._close_log(room)  # the log file is replaced: appends must open the new one
        await asyncio.to_thread(self._compact, room, state, revision, covered)

    def _compact(self, room: ResourceId, state: bytes, revision: int, covered: int) -> None:
        folder = self._dir(room)
        folder.mkdir(parents=True, exist_ok=True)
        _replace(folder / "snapshot", str(revision).encode() + b"\n" + state)
        try:
            rest = _records((folder / "log").read_bytes())[0][covered:]
        except FileNotFoundError:
            return
        _replace(folder / "log", b"".join(_record(rev, update) for rev, update in rest))

    async def health(self) -> dict[str, Any]:
        ok = os.access(self.directory if self.directory.exists() else self.directory.parent, os.W_OK)
        return {"backend": self.name, "ok": ok, "directory": str(self.directory)}

    async def aclose(self) -> None:
        for room in list(self._fds):
            self._close_log(room)


def _fsync_all(fds: list[int]) -> None:
    for fd in fds:
        os.fsync(fd)


def _record(revision: int, update: bytes) -> bytes:
    body: bytes = msgpack.packb([revision, update])
    return len(body).to_bytes(4, "big") + body


def _records(raw: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """The whole records of a log, and how many bytes they take."""
    out, at = [], 0
    while at + 4 <= len(raw):
        size = int.from_bytes(raw[at:at + 4], "big")
        if at + 4 + size > len(raw):
            break  # a torn last record: the crash came mid-write, before its ack
        revision, update = msgpack.unpackb(raw[at + 4:at + 4 + size])
        out.append((int(revision), bytes(update)))
        at += 4 + size
    return out, at


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
