"""Per-session wire-codec work in `duplex serve` stays off the stepping path.

A session's Opus encoding and decoding run on its own ordered worker (`server_wire.OrderedWork`),
not on the event loop that runs the scheduler nor on the engine thread: a session whose codec is
slow, or stuck, falls behind on its own audio, and every other session keeps its frame rate.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import numpy as np
import pytest

from duplex.apps import protocol as P
from duplex.apps import server as S
from duplex.apps.server_wire import OrderedWork
from duplex.apps.wire_opus import OpusEncoder
from tests.apps.test_serve import (
    _frames,
    client,
    parts,  # noqa: F401  (the module's fixture)
    running,
)


@pytest.fixture
def pool():
    with concurrent.futures.ThreadPoolExecutor(4) as p:
        yield p


async def _drain(work: OrderedWork, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while work.busy:
        assert time.monotonic() < deadline, "the worker never finished"
        await asyncio.sleep(0.005)


async def test_results_come_back_in_order_whatever_each_job_takes(pool) -> None:
    work = OrderedWork(pool, on_error=pytest.fail, limit=100)
    got: list[int] = []
    for i in range(20):
        # Later jobs are quicker: a pool alone would finish them first.
        work.put(lambda i=i: (time.sleep(0.002 * (20 - i)), i)[1], got.append)
        if i % 5 == 0:
            work.put(None, lambda _, i=i: got.append(-i))
    await _drain(work)
    assert got == [x for i in range(20) for x in ((i, -i) if i % 5 == 0 else (i,))]


async def test_a_worker_behind_skips_its_oldest_jobs(pool) -> None:
    gate = threading.Event()
    work = OrderedWork(pool, on_error=pytest.fail, limit=3)
    got: list[object] = []
    work.put(lambda: gate.wait(10) and "first", got.append)
    for i in range(6):
        work.put(lambda i=i: i, got.append)
    gate.set()
    await _drain(work)
    # The running job finishes; of the six waiting, the three oldest lose their work.
    assert got == ["first", None, None, None, 3, 4, 5] and work.skipped == 3


async def test_a_producer_that_waits_for_room_loses_nothing(pool) -> None:
    """The reader of a connection awaits `room()` before queueing a decode: a slow decoder
    holds the reader back (the socket pushes back on the client) instead of skipping input."""
    gate = threading.Event()
    work = OrderedWork(pool, on_error=pytest.fail, limit=3)
    got: list[object] = []

    async def produce() -> None:
        for i in range(10):
            await work.room()
            work.put(lambda i=i: (gate.wait(10), i)[1], got.append)

    task = asyncio.create_task(produce())
    await asyncio.sleep(0.2)
    # One job on a thread, three waiting: the producer is held at the fifth.
    assert not task.done() and len(work._waiting()) == 3
    gate.set()
    await asyncio.wait_for(task, 10)
    await _drain(work)
    assert got == list(range(10)) and work.skipped == 0


async def test_a_failing_job_stops_the_worker_and_says_why(pool) -> None:
    errors: list[Exception] = []
    work = OrderedWork(pool, on_error=errors.append)
    got: list[int] = []
    work.put(lambda: 1, got.append)
    work.put(lambda: 1 / 0, got.append)
    work.put(lambda: 3, got.append)
    await asyncio.sleep(0.2)
    await _drain(work)
    assert got == [1] and len(errors) == 1 and isinstance(errors[0], ZeroDivisionError)
    work.put(lambda: 4, got.append)
    await asyncio.sleep(0.05)
    assert got == [1]


class _StuckEncoder(OpusEncoder):
    """The first Opus encoder the server makes is stuck: each frame takes `STUCK_S` until the
    test opens the gate. Later ones (other sessions) are the real encoder."""

    gate = threading.Event()
    made = 0
    STUCK_S = 5.0

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        type(self).made += 1
        self.stuck = type(self).made == 1

    def encode(self, pcm: np.ndarray) -> bytes:
        if self.stuck:
            self.gate.wait(self.STUCK_S)
        return super().encode(pcm)


async def test_a_stuck_codec_on_one_session_does_not_delay_another(parts, monkeypatch) -> None:  # noqa: F811
    """Session A's encoder takes 5 s a frame; session B still gets its frames as fast as the
    engine steps, while A gets a frame per 5 s. With A's encoding back on the scheduler's loop
    (or the engine thread), every step would wait 5 s for it: B would get a frame per 5 s
    (timing out here), and A as many frames as B."""
    _StuckEncoder.gate.clear()
    _StuckEncoder.made = 0
    monkeypatch.setattr(S, "OpusEncoder", _StuckEncoder)
    n = 30
    async with (
        running(parts, max_sessions=2, queue_frames=64) as server,
        client(server, audio="opus") as a,
        client(server, audio="opus") as b,
    ):
        for i, f in enumerate(_frames(1, n)):
            await a.ws.send(P.encode(P.Audio(i, f), "client"))
        t0 = time.monotonic()
        for i, f in enumerate(_frames(2, n)):
            await b.ws.send(P.encode(P.Audio(i, f), "client"))
        got: list[int] = []
        async with asyncio.timeout(120.0):
            while len(got) < n:
                msg = await b.recv()
                if isinstance(msg, P.Opus):
                    got.append(msg.frame)
        b_seconds = time.monotonic() - t0
        # A's frames were stepped with B's, but A got only what its own encoder managed.
        a_conn = next(c for c in server.conns if c.opus_out.stuck)
        assert a_conn.lane.frames_in == n and server.scheduler.ticks >= n
        assert a_conn.frames_out <= min(n // 2, 2 + b_seconds / _StuckEncoder.STUCK_S), (
            a_conn.frames_out,
            b_seconds,
        )
        _StuckEncoder.gate.set()
        # A gets its frames too, in order, once its encoder moves again.
        seen: list[int] = []
        async with asyncio.timeout(20.0):
            while len(seen) < n:
                msg = await a.recv()
                if isinstance(msg, P.Opus):
                    seen.append(msg.frame)
    assert got == list(range(n)), got
    assert seen == list(range(n)), seen
