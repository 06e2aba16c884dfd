"""What every bench worker process does the same way: its control, its run, its entry.

Belongs here: the skeleton the presence (`loadgen.py`), lock (`lockgen.py`)
and document (`crdtgen.py`) workers share: take `Go`/`Stop` from the parent,
go ramp -> Ready -> Go -> measured -> drain within the hard deadline, close
every connection and hand the parent a `WorkerResult`; the bookkeeping their
WebSocket clients share (failed connects, awaited replies, ERROR frames,
closes, JSON frames read off a `websockets` connection); `Progress` and the
bounded-wave ramp of the workers that own whole rooms (`RoomsWorker`); the
process entry (`serve_worker`). Must not be here: what a worker's clients
send, receive or time (each worker's own file), the parent's side
(`runner.py`).

A worker's clients are objects with at least `ws` (None when not open),
`closing` (we are closing it: a close is then expected) and `futures` (the
replies awaited, by ref).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import traceback
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any

import uvloop

from rounds.auth import mint_token
from rounds.bench.plan import RAMP, Go, Progress, Ready, Recorder, Stop, WorkerResult

PROGRESS_EVERY_S = 1.0
SWEEP_EVERY_S = 0.5
SETTLE_POLL_S = 0.05


class BenchWorker:
    """Runs one plan on the running event loop, through `run`; a subclass fills
    in the phases (`_ramp`, `_measure`, and `_drain` if it has one)."""

    CLOSE_TIMEOUT_S = 5.0
    DEADLINE_ERROR = "worker hit its hard deadline"

    def __init__(self, plan: Any, send: Callable[[Any], None], rec: Recorder, clients: Sequence[Any]) -> None:
        self.plan = plan
        self.send = send
        self.rec = rec
        self.clients = clients
        self.phase = RAMP
        self.connected_at_end = 0  # open connections at the end, as the worker counts them
        self.stopping = asyncio.Event()
        self.go: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    # control from the parent

    def on_control(self, message: Go | Stop | None) -> None:
        """A control message arrived (None: the parent went away)."""
        if isinstance(message, Go) and not self.go.done():
            self.go.set_result(message.until)
        elif not isinstance(message, Go):
            self.stopping.set()

    async def _wait_or_stop(self, *aws: asyncio.Future[Any], timeout: float | None = None) -> None:
        """Wait until the first of `aws` is done, `Stop` came, or `timeout` seconds passed."""
        stop = asyncio.create_task(self.stopping.wait())
        await asyncio.wait([*aws, stop], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()

    async def _wait_for_go(self) -> float | None:
        """The end of the measured phase `Go` gave, or None after `Stop`."""
        await self._wait_or_stop(self.go)
        return self.go.result() if self.go.done() and not self.stopping.is_set() else None

    # the phases

    async def run(self) -> WorkerResult:
        loop = asyncio.get_running_loop()
        deadline_hit = False
        background = [asyncio.create_task(job) for job in self._background()]
        try:
            # Give up early enough to close the connections and send the result in time.
            give_up_in = self.plan.hard_deadline - self.CLOSE_TIMEOUT_S - 1 - time.monotonic()
            async with asyncio.timeout_at(loop.time() + give_up_in):
                await self._ramp()
                self._ready()
                until = await self._wait_for_go()
                if until is not None:
                    await self._measure(until)
                await self._drain()
        except TimeoutError:
            deadline_hit = True
            self.rec.error(self.DEADLINE_ERROR)
        except Exception:  # a bug in the load generator: report it with the partial result
            self._bug(traceback.format_exc())
        finally:
            for task in background:
                task.cancel()
            await self._close_all()
        return self._result(deadline_hit)

    def _background(self) -> list[Coroutine[Any, Any, None]]:
        """What runs beside the phases until the end (then cancelled)."""
        return []

    async def _ramp(self) -> None:
        raise NotImplementedError

    def _ready(self) -> None:
        self.send(Ready(self.plan.index))

    async def _measure(self, until: float) -> None:
        raise NotImplementedError

    async def _drain(self) -> None:
        """After the measured phase (or Stop): let what is still due arrive."""

    async def _close_all(self) -> None:
        await close_clients(self.clients, self.CLOSE_TIMEOUT_S)

    def _result(self, deadline_hit: bool) -> WorkerResult:
        return WorkerResult(
            worker=self.plan.index,
            users=len(self.clients),
            connected_at_end=self.connected_at_end,
            samples=self.rec.samples,
            counts=self.rec.counts_dict(),
            errors=self.rec.errors,
            deadline_hit=deadline_hit,
        )

    # what is counted the same way for every client

    async def _read_json(self, ws: Any, on_message: Callable[[dict[str, Any], float], None]) -> None:
        """Count each JSON frame of a `websockets` connection and hand it to
        `on_message` with its arrival (`time.perf_counter()`), until the
        connection closes: `ConnectionClosed` is the caller's."""
        async for frame in ws:
            now = time.perf_counter()
            message = decode_json(frame)
            if message is None:
                self.rec.count("protocol_errors", "undecodable_frame")
                continue
            self._count_received(message)
            on_message(message, now)

    def _count_received(self, message: dict[str, Any]) -> None:
        self.rec.count("frames_received")
        self.rec.count("frames_received_by_type", str(message.get("type")))

    def _bug(self, text: str) -> None:
        """A bug of ours (its traceback in `text`): kept for the report, and
        counted as `loadgen_errors`, since the figures are then suspect."""
        self.rec.count("loadgen_errors")
        self.rec.error(text)

    def _bugs(self, outcomes: Iterable[object]) -> None:
        """The exceptions among the outcomes of gathered tasks, as bugs."""
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                self._bug("".join(traceback.format_exception(outcome)))

    def _connect_failed(self, client: Any, reason: str) -> bool:
        client.closing = True  # a failed client is not retried
        self.rec.count("connect_errors")
        self.rec.count("connect_error_reasons", reason)
        return False

    def _resolve(self, client: Any, ref: Any, at: float, message: Any) -> None:
        """Hand a reply (and when it came) to the request awaiting `ref`, if any."""
        future = client.futures.get(ref) if isinstance(ref, int) else None
        if future is not None and not future.done():
            future.set_result((at, message))

    def _error_frame(self, kind: Any, data: dict[str, Any]) -> None:
        """An ERROR or PERMISSION_DENIED: counted by code, its text kept once a code."""
        code = str(data.get("code", kind))
        self.rec.count("error_frames", code)
        if self.rec.by_key["error_frames"][code] == 1:  # the first of each code, for the report
            self.rec.error(f"{kind} {code}: {str(data.get('message'))[:200]}")

    def _closed(self, client: Any, error: Callable[[], BaseException], code: int | None) -> None:
        """`client`'s connection is gone: its awaited replies fail with `error()`;
        a close we did not start is counted, with its code."""
        for future in client.futures.values():
            if not future.done():
                future.set_exception(error())
        if not client.closing:
            self.rec.count("unexpected_closes")
            self.rec.count("close_codes", str(code))
            client.closing = True


class RoomsWorker(BenchWorker):
    """A worker owning whole rooms of users (presence, documents): it connects
    them in bounded waves, keeps count of the open connections, settles late
    replies now and then (`_sweep_late`) and reports `Progress`.

    Its clients also have `index`, `user_id` and `token`; a subclass tells
    whether one is in its room (`_joined`) and brings one up
    (`_connect_and_join`, holding a slot of the waves while it connects)."""

    NOT_JOINED_AFTER_RAMP = "not_joined_after_ramp"

    def __init__(self, plan: Any, send: Callable[[Any], None], rec: Recorder, clients: Sequence[Any]) -> None:
        super().__init__(plan, send, rec, clients)
        self.connected = 0  # open connections; `connected_at_end` is its value when the measured phase ended

    def _joined(self, client: Any) -> bool:
        raise NotImplementedError

    async def _connect_and_join(self, client: Any, slots: asyncio.Semaphore) -> None:
        raise NotImplementedError

    def _sweep_late(self) -> None:
        """Count what did not come in time, every `SWEEP_EVERY_S`."""

    def _background(self) -> list[Coroutine[Any, Any, None]]:
        return [self._report_progress(), self._sweep()]

    def _ready(self) -> None:
        self.send(self._progress())  # the ramp's last figures
        super()._ready()

    async def _ramp(self) -> None:
        # `mint_token` parses the PEM (~80 ms) once per process and caches the
        # key; each token then costs ~1.5 ms to sign.
        for client in self.clients:
            client.token = mint_token(self.plan.private_key_pem, user_id=client.user_id, role=self.plan.role,
                                      username=f"Bench User {client.index}")
        slots = asyncio.Semaphore(max(1, self.plan.connect_concurrency))
        tasks = [asyncio.create_task(self._connect_and_join(client, slots)) for client in self.clients]
        everyone = asyncio.gather(*tasks, return_exceptions=True)
        await self._wait_or_stop(everyone, timeout=max(0.0, self.plan.ramp_deadline - time.monotonic()))
        everyone.cancel()  # the ramp deadline passed or the parent said stop
        everyone.add_done_callback(lambda f: f.cancelled() or f.exception())  # outcomes are read below
        self._bugs(await asyncio.gather(*tasks, return_exceptions=True))
        for client in self.clients:
            if client.ws is None and not client.closing:
                self.rec.count("connect_errors")
                self.rec.count("connect_error_reasons", "ramp_timeout")
                client.closing = True  # never retried
            elif client.ws is not None and not self._joined(client):
                self.rec.count(self.NOT_JOINED_AFTER_RAMP)

    async def _settle(self, timeout_s: float, settled: Callable[[], bool]) -> None:
        """Give what is still due `timeout_s` to arrive: until `settled()`, or Stop."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.stopping.is_set():
            if settled():
                break
            await asyncio.sleep(SETTLE_POLL_S)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            self._sweep_late()

    async def _report_progress(self) -> None:
        while True:
            self.send(self._progress())
            await asyncio.sleep(PROGRESS_EVERY_S)

    def _progress(self) -> Progress:
        return Progress(
            worker=self.plan.index,
            phase=self.phase,
            connected=self.connected,
            connect_failures=self.rec.counts["connect_errors"],
            joined=sum(1 for client in self.clients if self._joined(client)),
            frames_received=self.rec.counts["frames_received"],
            extra=self._progress_extra(),
        )

    def _progress_extra(self) -> dict[str, int]:
        """More running totals for the progress line."""
        return {}


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


def decode_json(frame: str | bytes) -> dict[str, Any] | None:
    """A JSON frame's object, or None if it is not one."""
    try:
        message = json.loads(frame)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def data_of(message: dict[str, Any]) -> dict[str, Any]:
    """A frame's `data` object ({} if missing or not an object)."""
    data = message.get("data")
    return data if isinstance(data, dict) else {}


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
