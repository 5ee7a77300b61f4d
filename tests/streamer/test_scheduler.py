"""The batched-step scheduler without any network: real engine, real model and codec.

Each test states one rule of `duplex.streamer.scheduler`: results equal the engine stepping each
session alone; a step waits for a full batch but not past the frame clock; a backlog is worked
off without waiting; one failing session fails alone; engine operations run in order between
steps; stopping runs the leaves still queued.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
import torch

from duplex.codecs.small import SmallCodec, SmallCodecConfig
from duplex.model.duplex_lm import load
from duplex.streamer.engine import Engine, SamplingConfig
from duplex.streamer.scheduler import FrameIn, Lane, Scheduler


@pytest.fixture(scope="module")
def parts():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return load("tiny"), SmallCodec(SmallCodecConfig()).eval()


def _frames(seed: int, n: int, fs: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.3 * rng.standard_normal(fs)).astype(np.float32) for _ in range(n)]


class Collector:
    """A lane's callbacks: the results and failures it was given, in order."""

    def __init__(self) -> None:
        self.results: list[tuple[int, list[int]]] = []
        self.failures: list[str] = []

    def lane(self, queue_frames: int = 10) -> Lane:
        return Lane(
            on_frame=lambda f, res: self.results.append((f.seq, res.tokens_out)),
            on_failure=self.failures.append,
            queue_frames=queue_frames,
        )


async def until(condition, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def _alone(parts, seed: int, frames: list[np.ndarray]) -> list[list[int]]:
    """The tokens one session gets from an engine of its own."""
    with Engine(*parts, slots=1) as engine:
        s = engine.join(SamplingConfig(seed=seed))
        return [engine.step({s: x})[s].tokens_out for x in frames]


async def _joined(sched: Scheduler, engine: Engine, lane: Lane, seed: int) -> None:
    lane.session = await sched.op(lambda: engine.join(SamplingConfig(seed=seed)))
    sched.add(lane)


async def test_batched_results_equal_each_session_alone(parts) -> None:
    model, codec = parts
    fs = codec.frame_size
    inputs = {seed: _frames(seed, 6, fs) for seed in (1, 2, 3)}
    with Engine(model, codec, slots=3) as engine:
        sched = Scheduler(engine)
        await sched.start()
        got = {seed: Collector() for seed in inputs}
        lanes = {seed: got[seed].lane() for seed in inputs}
        for seed, lane in lanes.items():
            await _joined(sched, engine, lane, seed)
        for i in range(6):
            for seed, lane in lanes.items():
                lane.push(FrameIn(i, pcm=inputs[seed][i]))
            sched.wake()
            await until(lambda i=i: all(len(c.results) > i for c in got.values()))
        await sched.stop()
    assert sched.batch_sizes[3] >= 1, sched.batch_sizes
    for seed, frames in inputs.items():
        assert [seq for seq, _ in got[seed].results] == list(range(6))
        assert [t for _, t in got[seed].results] == _alone(parts, seed, frames)


async def test_codes_input_equals_engine_alone(parts) -> None:
    """A client that runs the codec sends codes; they step like PCM does, batched with it."""
    model, codec = parts
    fs = codec.frame_size
    pcm = _frames(4, 3, fs)
    with torch.no_grad(), codec.streaming(1):
        codes = [codec.encode_step(torch.from_numpy(x)[None, None])[0, :, 0].tolist() for x in pcm]
    with Engine(model, codec, slots=1) as engine:
        s = engine.join(SamplingConfig(seed=9))
        want = [engine.step({}, codes={s: c})[s].tokens_out for c in codes]
    with Engine(model, codec, slots=2) as engine:
        sched = Scheduler(engine)
        await sched.start()
        c, other = Collector(), Collector()
        lane, bystander = c.lane(), other.lane()
        await _joined(sched, engine, lane, 9)
        await _joined(sched, engine, bystander, 1)
        for i, x in enumerate(codes):
            lane.push(FrameIn(i, codes=x))
            bystander.push(FrameIn(i, pcm=pcm[i]))
            sched.wake()
            await until(lambda i=i: len(c.results) > i)
        await sched.stop()
    assert [t for _, t in c.results] == want


@contextlib.asynccontextmanager
async def _slow_pair(parts):
    """Two joined lanes on a slow frame clock (2 s a frame): (scheduler, a, its lane, b, its
    lane), the collectors beside their lanes."""
    with Engine(*parts, slots=2) as engine:
        sched = Scheduler(engine, frame_rate=0.5)
        await sched.start()
        a, b = Collector(), Collector()
        la, lb = a.lane(), b.lane()
        await _joined(sched, engine, la, 1)
        await _joined(sched, engine, lb, 2)
        try:
            yield sched, a, la, b, lb
        finally:
            await sched.stop()


async def test_a_step_waits_for_the_batch_until_the_frame_clock(parts) -> None:
    """With a slow clock (2 s a frame): a session alone with a frame does not step before the
    clock (its batch-mate may still send), but does step then; a full batch steps at once."""
    fs = parts[1].frame_size
    async with _slow_pair(parts) as (sched, a, la, b, lb):
        loop = asyncio.get_running_loop()
        # Let the clock pass its first deadline with nothing queued.
        await asyncio.sleep(2.2)
        t0 = loop.time()
        la.push(FrameIn(0, pcm=_frames(1, 1, fs)[0]))
        sched.wake()
        await asyncio.sleep(0.5)
        assert a.results == [], "stepped without waiting for the batch"
        await until(lambda: len(a.results) == 1)
        assert loop.time() - t0 > 0.5
        assert sched.batch_sizes == {1: 1}
        t1 = loop.time()
        la.push(FrameIn(1, pcm=_frames(1, 1, fs)[0]))
        lb.push(FrameIn(0, pcm=_frames(2, 1, fs)[0]))
        sched.wake()
        await until(lambda: len(a.results) == 2 and len(b.results) == 1)
        assert loop.time() - t1 < 1.5, "a full batch waited for the clock"
        assert sched.batch_sizes[2] == 1


async def test_a_backlog_is_worked_off_without_waiting(parts) -> None:
    """Three frames queued for one session while its batch-mate has none: the first two step
    at once (a backlog), the last one waits for the clock again."""
    fs = parts[1].frame_size
    async with _slow_pair(parts) as (sched, a, la, _, _):
        await asyncio.sleep(0.1)
        for i, x in enumerate(_frames(1, 3, fs)):
            la.push(FrameIn(i, pcm=x))
        sched.wake()
        await asyncio.sleep(1.2)
        assert [seq for seq, _ in a.results] == [0, 1]
        await until(lambda: len(a.results) == 3)


async def test_a_flood_does_not_run_the_frame_clock_ahead(parts) -> None:
    """Steps taken early for one session's backlog must not push the frame clock ahead: once
    the flood is worked off, a single frame waits one frame of clock at most (2 s here), not one
    frame per early step (it waited about 10 s for this flood of 6, and an honest client beside
    a flooding one saw its answers pause for a second)."""
    fs = parts[1].frame_size
    async with _slow_pair(parts) as (sched, a, la, b, _):
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.1)
        for i, x in enumerate(_frames(1, 6, fs)):
            la.push(FrameIn(i, pcm=x))
        sched.wake()
        await until(lambda: len(a.results) == 5)
        t0 = loop.time()
        # The last frame is alone in the queue (b sends nothing): it waits for the clock.
        await until(lambda: len(a.results) == 6, timeout=30.0)
        assert loop.time() - t0 < 3.0, loop.time() - t0
        assert b.results == []


async def test_a_full_queue_drops_its_oldest_frame() -> None:
    lane = Collector().lane(queue_frames=2)
    for i in range(5):
        lane.push(FrameIn(i, pcm=np.zeros(4, np.float32)))
    assert [f.seq for f in lane.inbox] == [3, 4]
    assert lane.dropped == 3 and lane.frames_in == 5


async def test_one_failing_session_fails_alone(parts) -> None:
    """A session whose state breaks the batched step: it is told, its batch-mates get their
    frames from the retry, and the scheduler goes on."""
    model, codec = parts
    fs = codec.frame_size
    with Engine(model, codec, slots=3) as engine:
        sched = Scheduler(engine)
        await sched.start()
        bad, good, coded = Collector(), Collector(), Collector()
        lb, lg, lc = bad.lane(), good.lane(), coded.lane()
        for lane, seed in ((lb, 1), (lg, 2), (lc, 3)):
            await _joined(sched, engine, lane, seed)

        def corrupt() -> None:
            lb.session.prev_text = 10**6

        await sched.op(corrupt)
        for i, x in enumerate(_frames(5, 3, fs)):
            lb.push(FrameIn(i, pcm=x))
            lg.push(FrameIn(i, pcm=x))
            lc.push(FrameIn(i, codes=[0] * engine.K))
            sched.wake()
            await until(lambda i=i: len(good.results) > i and len(coded.results) > i)
        await sched.stop()
    assert bad.failures and not bad.results
    assert not good.failures and not coded.failures
    assert sched.failed_steps >= 1


async def test_operations_run_in_order_and_stop_runs_queued_leaves(parts) -> None:
    """A leave queued without waiting runs before a join queued after it (one slot: the join
    needs that slot), and leaves queued at the end still run when the scheduler stops."""
    model, codec = parts
    with Engine(model, codec, slots=1) as engine:
        sched = Scheduler(engine)
        await sched.start()
        first = await sched.op(lambda: engine.join(SamplingConfig()))
        sched.op_nowait(lambda: engine.leave(first))
        second = await sched.op(lambda: engine.join(SamplingConfig()))
        assert list(engine.sessions.values()) == [second]
        with pytest.raises(RuntimeError, match="slots are busy"):
            await sched.op(lambda: engine.join(SamplingConfig()))
        sched.op_nowait(lambda: engine.leave(second))
        await sched.stop()
        assert not engine.sessions
