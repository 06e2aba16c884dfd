"""What closed connections leave for the garbage collector.

`rounds bench closed --users 1500` runs the whole gateway in this
process on uvloop, as its processes run (`rounds.inprocess`: 1 shard, 1
front door, memory backends, a scratch directory), connects `--users` clients over `/ws` from a child
process, joins them to rooms of 10, holds them `--hold` seconds, then drops
them all at once without a closing handshake (the child exits, as a closed
tab or a lost network would). The cyclic collector is off from the moment
everyone is connected to the end, so only reference counting frees
anything. Printed, as one JSON object: the objects the collector tracks
with no one connected, with everyone connected, and `--settle` seconds
after the last one left; then how many of those a full collection finds
unreachable and how long it paused the process (docs/benchmarks.md,
"Garbage collection").

A bench, not a test: the timings depend on the machine.
"""

from __future__ import annotations

import asyncio
import gc
import json
import multiprocessing
import tempfile
import time
from typing import Any

from rounds.audit.events import MemoryAuditSink
from rounds.auth import mint_token, private_key_for_dev
from rounds.cluster.inprocess import InProcessGateway
from rounds.config import Settings

ROOM_SIZE = 10


def _clients(url: str, key: bytes, users: int, ready: Any, drop: Any) -> None:
    """The child: connect and join everyone, say so, then exit when told."""
    from websockets.asyncio.client import connect

    async def one(index: int) -> Any:
        token = mint_token(key, user_id=f"closed-{index}", role="nurse")
        ws = await connect(f"{url}?token={token}", open_timeout=60, ping_interval=None)
        await ws.recv()  # CONNECTED
        await ws.send(json.dumps({"type": "JOIN_RESOURCE", "ref": 1, "data": {
            "resourceId": f"patient:closed-{index // ROOM_SIZE}", "resourceType": "patient_record",
            "mode": "editor"}}))
        return ws

    async def main() -> None:
        slots = asyncio.Semaphore(50)

        async def bounded(index: int) -> Any:
            async with slots:
                return await one(index)

        connections = await asyncio.gather(*(bounded(i) for i in range(users)))
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, drop.wait)
        for ws in connections:
            ws.transport.close()  # gone, no closing handshake: the front door reads an end of stream
        await asyncio.sleep(1)

    asyncio.run(main())


async def measure(users: int, hold_s: float, settle_s: float, port: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rounds-closed-") as var_dir:
        settings = Settings(host="127.0.0.1", port=port, var_dir=var_dir, shards=1, frontdoors=1,
                            redis_url=None)
        async with InProcessGateway(settings, MemoryAuditSink()) as gateway:
            door = gateway.frontdoors[0]
            gc.collect()
            gc.freeze()  # as the gateway's processes do after start-up
            idle = len(gc.get_objects())
            context = multiprocessing.get_context("spawn")
            ready, drop = context.Event(), context.Event()
            child = context.Process(target=_clients, args=(gateway.url, private_key_for_dev(settings), users,
                                                           ready, drop), daemon=True)
            child.start()
            loop = asyncio.get_running_loop()
            try:
                if not await loop.run_in_executor(None, ready.wait, 120):
                    raise RuntimeError("the clients did not connect within 120 s")
                await _until(lambda: len(door.clients) == users, 30)
                gc.disable()
                connected = len(gc.get_objects())
                await asyncio.sleep(hold_s)
                drop.set()
                await _until(lambda: not door.clients, 30)
                await asyncio.sleep(settle_s)
                left = len(gc.get_objects())
                started = time.perf_counter()
                unreachable = gc.collect()
                paused_ms = (time.perf_counter() - started) * 1000
            finally:
                gc.enable()
                gc.unfreeze()
                drop.set()
                child.join(10)
                if child.is_alive():
                    child.kill()
    return {"users": users, "tracked_idle": idle, "tracked_connected": connected,
            "tracked_per_connection": round((connected - idle) / users, 1),
            "tracked_after_close": left, "unreachable_after_close": unreachable,
            "full_collection_ms": round(paused_ms, 1)}


async def _until(condition: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s} s")
        await asyncio.sleep(0.05)
