"""The run every bench worker shares: control from the parent, the phases, the
hard deadline, a bug of ours, and what is counted for every client."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from rounds.bench.plan import MEASURED, RAMP, Go, Progress, Ready, Recorder, Stop, WorkerResult
from rounds.bench.worker import BenchWorker, RoomsWorker


class Client:
    def __init__(self) -> None:
        self.ws: Any = None
        self.closing = False
        self.futures: dict[Any, asyncio.Future[Any]] = {}
        self.joined = False


class Phases(BenchWorker):
    """Notes each phase; `fail` raises in the measured phase, `hang` never ends the ramp."""

    def __init__(self, hard_in_s: float = 60.0, fail: bool = False, hang: bool = False) -> None:
        plan = SimpleNamespace(index=3, hard_deadline=time.monotonic() + hard_in_s)
        self.sent: list[Any] = []
        super().__init__(plan, self.sent.append, Recorder(), [Client(), Client()])
        self.fail, self.hang = fail, hang
        self.seen: list[str] = []

    async def _ramp(self) -> None:
        self.seen.append(RAMP)
        if self.hang:
            await asyncio.Event().wait()

    async def _measure(self, until: float) -> None:
        self.seen.append(MEASURED)
        if self.fail:
            raise RuntimeError("a bug")

    async def _drain(self) -> None:
        self.seen.append("drain")

    async def _close_all(self) -> None:
        self.seen.append("closed")


async def test_ready_after_the_ramp_then_go_measures_and_drains() -> None:
    worker = Phases()
    run = asyncio.create_task(worker.run())
    await asyncio.sleep(0.01)
    assert worker.sent == [Ready(3)]
    worker.on_control(Go(until=time.monotonic() + 1))
    worker.on_control(Go(until=0.0))  # a second Go changes nothing
    result = await run
    assert worker.seen == [RAMP, MEASURED, "drain", "closed"]
    assert worker.go.result() > 0
    assert isinstance(result, WorkerResult)
    assert (result.worker, result.users, result.deadline_hit, result.errors) == (3, 2, False, [])


async def test_stop_or_a_lost_parent_before_go_skips_the_measured_phase() -> None:
    for message in (Stop(), None):
        worker = Phases()
        run = asyncio.create_task(worker.run())
        await asyncio.sleep(0.01)
        worker.on_control(message)
        await run
        assert worker.seen == [RAMP, "drain", "closed"]


async def test_a_bug_is_counted_and_the_partial_result_still_sent() -> None:
    worker = Phases(fail=True)
    run = asyncio.create_task(worker.run())
    await asyncio.sleep(0.01)
    worker.on_control(Go(until=time.monotonic()))
    result = await run
    assert worker.seen == [RAMP, MEASURED, "closed"]
    assert result.counts["loadgen_errors"] == 1
    assert "RuntimeError: a bug" in result.errors[0]


async def test_the_worker_gives_up_in_time_to_close_before_the_hard_deadline() -> None:
    worker = Phases(hard_in_s=BenchWorker.CLOSE_TIMEOUT_S + 1 + 0.05, hang=True)
    result = await asyncio.wait_for(worker.run(), 5)
    assert result.deadline_hit and result.errors == [BenchWorker.DEADLINE_ERROR]
    assert worker.seen == [RAMP, "closed"]


async def test_a_close_fails_the_awaited_replies_and_counts_only_a_close_we_did_not_start() -> None:
    worker = Phases()
    ours, theirs = worker.clients
    ours.closing = True
    for client in (ours, theirs):
        client.futures[1] = asyncio.get_running_loop().create_future()
        worker._closed(client, lambda: ConnectionError("gone"), 1006)
        assert isinstance(client.futures[1].exception(), ConnectionError)
    counts = worker.rec.counts_dict()
    assert counts["unexpected_closes"] == 1 and counts["close_codes"] == {"1006": 1}
    assert theirs.closing  # a second close of it is not counted again
    worker._closed(theirs, lambda: ConnectionError("gone"), 1006)
    assert worker.rec.counts_dict()["unexpected_closes"] == 1


async def test_an_error_frame_is_counted_by_code_and_its_text_kept_once() -> None:
    worker = Phases()
    for _ in range(2):
        worker._error_frame("ERROR", {"code": "RATE_LIMITED", "message": "slow down"})
    worker._error_frame("PERMISSION_DENIED", {})
    assert worker.rec.counts_dict()["error_frames"] == {"RATE_LIMITED": 2, "PERMISSION_DENIED": 1}
    assert worker.rec.errors == ["ERROR RATE_LIMITED: slow down", "PERMISSION_DENIED PERMISSION_DENIED: None"]


async def test_a_rooms_worker_reports_its_ramp_in_a_progress_before_ready() -> None:
    class Rooms(RoomsWorker):
        def _joined(self, client: Any) -> bool:
            return bool(client.joined)

    sent: list[Any] = []
    worker = Rooms(SimpleNamespace(index=1), sent.append, Recorder(), [Client(), Client(), Client()])
    worker.clients[0].joined = True
    worker.connected = 2
    worker._ready()
    assert sent == [Progress(worker=1, phase=RAMP, connected=2, connect_failures=0, joined=1, frames_received=0),
                    Ready(1)]
