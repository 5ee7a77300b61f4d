"""The codec stage: a step's encode and decode on the codec thread, the model on the engine thread.

Each test states one rule of `duplex.streamer.codec_stage` and the scheduler's pipeline: what a
pipelined session gets is what the serial engine gives it, and what the codec gives offline; the
phases run on their own threads and overlap (the model steps batch n + 1 while batch n decodes),
yet every session's frames come back in order; a codec that fails on one session's audio fails
that session alone.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from duplex.codecs.small import SmallCodec, SmallCodecConfig
from duplex.model.duplex_lm import load
from duplex.streamer.codec_stage import CodecStage
from duplex.streamer.engine import Engine, SamplingConfig, quantize16
from duplex.streamer.scheduler import FrameIn, Lane, Scheduler

# A frame of this value breaks `Flaky`'s encoder.
POISON = 0.25


class Flaky(SmallCodec):
    """The small codec, except that its encoder fails on a row of POISON and its decoder on
    row `bad_row` (when that row decodes); both fail before any state moves. It also notes the
    thread of every encode and decode, and its first decode can wait at `meet` for another
    thread (`met` says whether it came).
    """

    def __init__(self) -> None:
        super().__init__(SmallCodecConfig())
        self.bad_row: int | None = None
        self.threads: set[str] = set()
        self.meet: threading.Barrier | None = None
        self.met = False
        self.decodes = 0

    def _encode(self, wav: torch.Tensor) -> torch.Tensor:
        self.threads.add(threading.current_thread().name)
        mask = self._stream_state.exec_mask if self.is_streaming else None
        if mask is not None and bool(
            ((wav[:, 0] == float(quantize16(np.float32(POISON)))).all(-1) & mask).any()
        ):
            raise RuntimeError("poisoned frame")
        return super()._encode(wav)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        self.threads.add(threading.current_thread().name)
        if self.is_streaming:
            mask = self._stream_state.exec_mask
            if self.bad_row is not None and bool(mask[self.bad_row]):
                raise RuntimeError("decoder broke")
            self.decodes += 1
            if self.meet is not None and self.decodes == 1:
                self.met = _meet(self.meet)
        return super()._decode(codes)


def _meet(barrier: threading.Barrier) -> bool:
    """Wait for the other thread at `barrier`; False if it did not come in time."""
    try:
        barrier.wait()
        return True
    except threading.BrokenBarrierError:
        return False


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return load("tiny")


@pytest.fixture
def codec():
    torch.manual_seed(0)
    return Flaky().eval()


def _frames(seed: int, n: int, fs: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.3 * rng.standard_normal(fs)).astype(np.float32) for _ in range(n)]


def _alone(model, codec, seed: int, frames: list) -> list:
    """The serial engine, one session: (tokens_out, pcm) per frame; a frame is PCM or codes."""
    with Engine(model, codec, slots=1) as engine:
        s = engine.join(SamplingConfig(seed=seed))
        out = []
        for x in frames:
            r = engine.step({s: x})[s] if isinstance(x, np.ndarray) else engine.step({}, {s: x})[s]
            out.append((r.tokens_out, r.pcm))
        return out


def _serial(model, codec, inputs: dict[int, list]) -> dict[int, list]:
    """The serial engine, every session stepped together frame by frame (the batches the
    scheduler forms when every frame is queued): (tokens_out, pcm) per seed and frame."""
    with Engine(model, codec, slots=len(inputs)) as engine:
        ss = {seed: engine.join(SamplingConfig(seed=seed)) for seed in inputs}
        out = {seed: [] for seed in inputs}
        for i in range(len(next(iter(inputs.values())))):
            frames = {ss[k]: x[i] for k, x in inputs.items() if isinstance(x[i], np.ndarray)}
            codes = {ss[k]: x[i] for k, x in inputs.items() if not isinstance(x[i], np.ndarray)}
            res = engine.step(frames, codes)
            for k in inputs:
                out[k].append((res[ss[k]].tokens_out, res[ss[k]].pcm))
        return out


class Collector:
    """A lane's callbacks: (seq, tokens_out, pcm, tokens_in) and failures, in order."""

    def __init__(self) -> None:
        self.results: list[tuple] = []
        self.failures: list[str] = []

    def lane(self) -> Lane:
        def failed(message: str) -> None:
            # As the server does: a failed session is closed.
            self.failures.append(message)
            lane.closed = True

        lane = Lane(
            on_frame=lambda f, r: self.results.append((f.seq, r.tokens_out, r.pcm, r.tokens_in)),
            on_failure=failed,
            queue_frames=100,
        )
        return lane


async def until(condition, timeout: float = 120.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def _serve(engine: Engine, inputs: dict[int, list], frame_rate: float | None = None):
    """Join one lane per seed, queue every frame at once (a backlog: the pipeline fills), wait
    for every lane to get all its frames or fail; the scheduler and collectors."""
    sched = Scheduler(engine, frame_rate=frame_rate)
    await sched.start()
    got = {seed: Collector() for seed in inputs}
    lanes = {}
    for seed in inputs:
        lane = lanes[seed] = got[seed].lane()
        lane.session = await sched.op(lambda seed=seed: engine.join(SamplingConfig(seed=seed)))
        sched.add(lane)
    for seed, frames in inputs.items():
        for i, x in enumerate(frames):
            pcm = x if isinstance(x, np.ndarray) else None
            lanes[seed].push(FrameIn(i, pcm=pcm, codes=None if pcm is not None else x))
    sched.wake()
    try:
        await until(
            lambda: all(c.failures or len(c.results) == len(inputs[s]) for s, c in got.items())
        )
    finally:
        await sched.stop()
    return sched, got, lanes


async def test_pipelined_equals_serial_engine_and_offline_codec(model, codec) -> None:
    """Three PCM sessions and one that sends codes, every frame queued at once: each gets, in
    order, the serial engine's tokens and audio for the same batches, bit for bit, and the
    tokens it would get alone. The codes it heard are the codec's offline encoding of its audio,
    and the audio it got is the offline decoding of its codes."""
    fs, K, n = codec.frame_size, codec.num_codebooks, 8
    rng = np.random.default_rng(9)
    inputs = {seed: _frames(seed, n, fs) for seed in (1, 2, 3)}
    inputs[4] = [[int(c) for c in rng.integers(0, codec.cardinality, K)] for _ in range(n)]
    with Engine(model, codec, slots=4) as engine:
        sched, got, _ = await _serve(engine, inputs)
    assert max(sched.batch_sizes) == 4, sched.batch_sizes
    serial = _serial(model, codec, inputs)
    for seed, frames in inputs.items():
        assert not got[seed].failures
        assert [r[0] for r in got[seed].results] == list(range(n))
        assert [r[1] for r in got[seed].results] == [w[0] for w in serial[seed]]
        for r, w in zip(got[seed].results, serial[seed], strict=True):
            np.testing.assert_array_equal(r[2], w[1])
        assert [r[1] for r in got[seed].results] == [
            w[0] for w in _alone(model, codec, seed, frames)
        ]
    # Offline, for session 1: encode of the whole input, decode of the whole output.
    res = got[1].results
    wav = torch.from_numpy(quantize16(np.concatenate(inputs[1])))[None, None]
    offline_in = codec.encode(wav)[0].T.tolist()
    assert [r[3] for r in res] == offline_in
    D = model.cfg.acoustic_delay
    spoken = [r[1][:K] for r in res]
    codes = torch.tensor([[spoken[t - D][0], *spoken[t][1:]] for t in range(D, n)]).T[None]
    offline_out = codec.decode(codes)[0, 0].numpy()
    streamed = np.concatenate([r[2] for r in res])
    assert not streamed[: D * fs].any()
    np.testing.assert_allclose(streamed[D * fs :], offline_out, atol=1e-5)


async def test_phases_overlap_on_their_threads_and_order_holds(model, codec) -> None:
    """The first decode and the second model step meet at a barrier: they can only if the model
    steps while a batch decodes (on one thread, the barrier times out). Codec work runs only on
    the codec thread, the model only on the engine thread, and every session still gets its
    frames in order, as alone."""
    fs, n = codec.frame_size, 6
    inputs = {seed: _frames(seed, n, fs) for seed in (5, 6)}
    codec.meet = threading.Barrier(2, timeout=30)
    with Engine(model, codec, slots=2) as engine:
        model_threads = set()
        thinks = []
        think = engine.think

        def watched(*args, **kw):
            model_threads.add(threading.current_thread().name)
            if len(thinks) == 1:
                thinks.append(_meet(codec.meet))
            out = think(*args, **kw)
            thinks.append(len(out.said))
            return out

        engine.think = watched
        _, got, _ = await _serve(engine, inputs)
    assert codec.met and thinks[1] is True, "the model did not step while a batch decoded"
    assert {t.split("_")[0] for t in codec.threads} == {"codec"}, codec.threads
    assert {t.split("_")[0] for t in model_threads} == {"engine"}, model_threads
    codec.meet = None
    for seed, frames in inputs.items():
        assert [r[0] for r in got[seed].results] == list(range(n))
        want = _alone(model, codec, seed, frames)
        assert [r[1] for r in got[seed].results] == [w[0] for w in want]


async def test_a_failing_codec_fails_its_session_alone(model, codec) -> None:
    """One session's audio breaks the encoder, another session's row breaks the decoder: those
    two are told and get nothing more, the two others (PCM and codes) get every frame as if
    alone, and the scheduler keeps stepping."""
    fs, K, n = codec.frame_size, codec.num_codebooks, 6
    inputs = {seed: _frames(seed, n, fs) for seed in (1, 2, 3)}
    inputs[1][2] = np.full(fs, POISON, np.float32)
    inputs[4] = [[7] * K for _ in range(n)]
    want = {s: _alone(model, codec, s, inputs[s]) for s in (3, 4)}
    with Engine(model, codec, slots=4) as engine:
        codec.bad_row = 1  # the second session to join (seed 2)
        sched, got, lanes = await _serve(engine, inputs)
    assert lanes[2].session.slot == 1
    assert got[1].failures and [r[0] for r in got[1].results] == [0, 1]
    # The second fails at its first frame to speak (the first D frames are silence).
    D = model.cfg.acoustic_delay
    assert got[2].failures and [r[0] for r in got[2].results] == list(range(D))
    for seed in (3, 4):
        assert not got[seed].failures
        assert [r[1] for r in got[seed].results] == [w[0] for w in want[seed]]
    assert sched.failed_steps >= 2


async def test_the_stage_alone_equals_the_step(model, codec) -> None:
    """The stage used directly (encode, then the engine's model phase, then decode) gives what
    `Engine.step` gives; a poisoned frame fails only its own session in the encode."""
    fs, n = codec.frame_size, 4
    xs = {seed: _frames(seed, n, fs) for seed in (1, 2)}
    with Engine(model, codec, slots=2) as engine:
        stage = CodecStage(engine)
        a, b = engine.join(SamplingConfig(seed=1)), engine.join(SamplingConfig(seed=2))
        got = []
        for i in range(n):
            heard = await stage.encode({a: xs[1][i], b: xs[2][i]})
            assert heard.batch_error is None and not heard.failed
            said = await stage.decode(engine.think(heard.result))
            got.append(said.result[a].tokens_out)
        bad = await stage.encode({a: xs[1][0], b: np.full(fs, POISON, np.float32)})
        stage.close()
    assert list(bad.failed) == [b] and bad.batch_error is not None
    assert bad.result.sessions == [a]
    assert got == [w[0] for w in _alone(model, codec, 1, xs[1])]
