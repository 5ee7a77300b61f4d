"""Re-framing FIFOs with odd block sizes: nothing lost, nothing reordered, drops counted."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duplex.streamer.fifo import BlockFifo, FrameFifo, _Ring


def _signal(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.float32) % 1000) / 1000.0


@pytest.mark.parametrize("block", [1, 7, 319, 320, 321, 999, 4096])
def test_frame_fifo_reframes_any_block_size(block: int) -> None:
    frame = 320
    x = _signal(frame * 37 + 5)
    fifo = FrameFifo(frame, max_frames=10_000)
    frames = []
    for i in range(0, x.size, block):
        fifo.push(x[i : i + block])
        while (f := fifo.pop()) is not None:
            frames.append(f)
    assert len(frames) == 37
    np.testing.assert_array_equal(np.concatenate(frames), x[: 37 * frame])
    assert len(fifo) == 5 and fifo.dropped_frames == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=900), min_size=1, max_size=40))
def test_frame_fifo_property(blocks: list[int]) -> None:
    frame = 160
    total = sum(blocks)
    x = _signal(total)
    fifo = FrameFifo(frame, max_frames=1000)
    out, pos = [], 0
    for b in blocks:
        fifo.push(x[pos : pos + b])
        pos += b
        while (f := fifo.pop()) is not None:
            out.append(f)
    got = np.concatenate(out) if out else np.zeros(0, np.float32)
    np.testing.assert_array_equal(got, x[: (total // frame) * frame])


def test_frame_fifo_drops_oldest_whole_frames_when_full() -> None:
    frame = 4
    fifo = FrameFifo(frame, max_frames=3)
    x = np.arange(30, dtype=np.float32)
    fifo.push(x[:7])
    fifo.push(x[7:30])
    # 30 samples, room for 3 frames + 3 samples: the oldest 4 whole frames are dropped.
    assert fifo.dropped_frames == 4
    np.testing.assert_array_equal(fifo.pop(), x[16:20])
    assert len(fifo) == 10 and fifo.frames_ready == 2


def test_int16_and_channel_checks() -> None:
    fifo = FrameFifo(2)
    fifo.push(np.array([[16384], [-32768]], dtype=np.int16))
    np.testing.assert_allclose(fifo.pop(), [0.5, -1.0])
    with pytest.raises(ValueError, match="mono"):
        fifo.push(np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="float or int16"):
        fifo.push(np.zeros(4, np.int64))


@pytest.mark.parametrize("block", [1, 100, 320, 333, 1024])
def test_block_fifo_any_pull_size_and_underruns(block: int) -> None:
    frame = 320
    fifo = BlockFifo(frame, max_frames=1000)
    x = _signal(frame * 10)
    for i in range(10):
        fifo.push(x[i * frame : (i + 1) * frame])
    got = []
    while sum(g.size for g in got) < x.size:
        got.append(fifo.pull(block))
    y = np.concatenate(got)
    np.testing.assert_array_equal(y[: x.size], x)
    assert not np.any(y[x.size :])
    assert fifo.underruns == (1 if y.size > x.size else 0)
    tail = fifo.pull(50)
    assert not np.any(tail) and fifo.underrun_samples >= 50


def test_block_fifo_prefill_and_overflow() -> None:
    fifo = BlockFifo(4, max_frames=2, prefill=1)
    assert len(fifo) == 4
    fifo.push(np.ones(4, np.float32))
    fifo.push(np.full(4, 2.0, np.float32))
    assert fifo.dropped_frames == 1
    np.testing.assert_array_equal(fifo.pull(8), [1, 1, 1, 1, 2, 2, 2, 2])


class _SwitchingRing(_Ring):
    """The ring, handing the CPU to the other thread half-way through a read or drop: after
    its start moves and before its size shrinks, as an audio callback can interrupt it in a
    real process. A fifo without its lock then loses or garbles samples."""

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name == "start":
            time.sleep(0.0005)


def _interrupting(fifo: FrameFifo | BlockFifo) -> None:
    fifo._ring.__class__ = _SwitchingRing


def test_threads_lose_nothing() -> None:
    frame = 320
    x = _signal(frame * 300)
    fifo = FrameFifo(frame, max_frames=1000)
    _interrupting(fifo)
    out = []

    def producer() -> None:
        for i in range(0, x.size, 77):
            fifo.push(x[i : i + 77])

    t = threading.Thread(target=producer)
    t.start()
    while t.is_alive() or fifo.frames_ready:
        f = fifo.pop()
        if f is not None:
            out.append(f)
    t.join()
    while (f := fifo.pop()) is not None:
        out.append(f)
    assert fifo.dropped_frames == 0 and len(fifo) == 0
    np.testing.assert_array_equal(np.concatenate(out), x)


def test_block_fifo_threads_lose_nothing() -> None:
    frame = 320
    x = 0.5 + _signal(frame * 300)  # never zero: the only zeros pulled are underruns
    fifo = BlockFifo(frame, max_frames=1000)
    _interrupting(fifo)
    out = []

    def producer() -> None:
        # Small blocks: the producer is still at work while the consumer pulls.
        for i in range(0, x.size, 41):
            fifo.push(x[i : i + 41])

    t = threading.Thread(target=producer)
    t.start()
    while t.is_alive() or len(fifo):
        out.append(fifo.pull(77))
    t.join()
    y = np.concatenate(out)
    assert fifo.dropped_frames == 0 and len(fifo) == 0
    # Every sample came out once, in order, and every zero was counted as an underrun.
    assert np.count_nonzero(y == 0) == fifo.underrun_samples
    np.testing.assert_array_equal(y[y != 0], x)
