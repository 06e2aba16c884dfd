"""What every bench worker process does the same way: its entry and its closing.

Belongs here: what the presence (`loadgen.py`), lock (`lockgen.py`) and
document (`crdtgen.py`) workers share: the process entry (`serve_worker`)
and closing all of a worker's connections at the end (`close_clients`).
Must not be here: what a worker's clients send, receive or time (each
worker's own file), the parent's side (`runner.py`).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import uvloop


async def close_clients(clients: Iterable[Any], timeout_s: float, *also: Coroutine[Any, Any, None]) -> None:
    """Close every open client's WebSocket (and run `also`) at once, waiting
    at most `timeout_s`. Each is marked `closing` first, so its reader does
    not count our own close as an unexpected one."""
    open_clients = [c for c in clients if c.ws is not None]
    for client in open_clients:
        client.closing = True
    closes = [asyncio.create_task(c.ws.close()) for c in open_clients]
    closes += [asyncio.create_task(coro) for coro in also]
    if closes:
        await asyncio.wait(closes, timeout=timeout_s)
        for task in closes:
            task.cancel()


# --- process entry ----------------------------------------------------------------


def serve_worker(make: Callable[[Callable[[Any], None]], Any], control: Any, results: Any) -> None:
    """Run one bench worker in this process: `control` is the receiving end of a
    Pipe carrying `Go`/`Stop`, `results` a multiprocessing Queue for its
    messages; `make(send)` builds the worker (`on_control`, async `run`)."""
    # Ctrl-C reaches the whole process group: the parent turns it into `Stop`,
    # so that the worker still closes its connections and sends its result.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    uvloop.run(_serve_async(make, control, results))


async def _serve_async(make: Callable[[Callable[[Any], None]], Any], control: Any, results: Any) -> None:
    loop = asyncio.get_running_loop()
    worker = make(results.put)

    def on_readable() -> None:
        try:
            message = control.recv()
        except (EOFError, OSError):
            loop.remove_reader(control.fileno())
            message = None  # the parent is gone: stop
        worker.on_control(message)

    loop.add_reader(control.fileno(), on_readable)
    try:
        results.put(await worker.run())
    finally:
        try:
            loop.remove_reader(control.fileno())
        except (ValueError, OSError):
            pass  # already removed after EOF
