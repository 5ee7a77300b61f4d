"""Re-framing FIFOs between audio blocks of any size and fixed codec frames.

Devices, files and networks deliver audio in blocks whose size has nothing to do with the codec's
frame; the engine consumes and produces exactly one frame per step. `FrameFifo` collects input
blocks and hands out whole frames; `BlockFifo` collects output frames and hands out blocks of
whatever size the device asks for, filling with silence (and counting an underrun) when empty.
Both are bounded: old input is dropped (counted) rather than buffered without limit, so a slow
consumer catches up instead of drifting further behind. Both are safe to use from one audio
callback thread and one engine thread; critical sections are short copies.
"""

from __future__ import annotations

import threading

import numpy as np


class _Ring:
    """A fixed-capacity ring of float32 samples (mono)."""

    def __init__(self, capacity: int) -> None:
        self.buf = np.zeros(capacity, dtype=np.float32)
        self.start = 0
        self.size = 0

    @property
    def capacity(self) -> int:
        return self.buf.size

    def write(self, x: np.ndarray) -> None:
        # Caller guarantees room: size + len(x) <= capacity.
        n = x.size
        end = (self.start + self.size) % self.capacity
        first = min(n, self.capacity - end)
        self.buf[end : end + first] = x[:first]
        self.buf[: n - first] = x[first:]
        self.size += n

    def read(self, n: int) -> np.ndarray:
        # Caller guarantees n <= size.
        first = min(n, self.capacity - self.start)
        out = np.empty(n, dtype=np.float32)
        out[:first] = self.buf[self.start : self.start + first]
        out[first:] = self.buf[: n - first]
        self.start = (self.start + n) % self.capacity
        self.size -= n
        return out

    def drop(self, n: int) -> None:
        self.start = (self.start + n) % self.capacity
        self.size -= n


def _mono_float(block: np.ndarray) -> np.ndarray:
    """Accept [n] or [n, 1] float or int16 blocks; return a flat float32 copy in [-1, 1]."""
    a = np.asarray(block)
    if a.ndim == 2:
        if a.shape[1] != 1:
            raise ValueError(f"expected mono audio, got {a.shape[1]} channels")
        a = a[:, 0]
    elif a.ndim != 1:
        raise ValueError(f"expected an audio block of shape [n] or [n, 1], got {a.shape}")
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768.0
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"audio must be float or int16, got {a.dtype}")
    return a.astype(np.float32, copy=True)


class FrameFifo:
    """Blocks of any size in, frames of `frame_size` samples out.

    At most `max_frames` whole frames wait; pushing more drops the oldest whole frames and counts
    them in `dropped_frames` (stale audio is worth less than keeping up).
    """

    def __init__(self, frame_size: int, max_frames: int = 64) -> None:
        if frame_size < 1 or max_frames < 1:
            raise ValueError("frame_size and max_frames must be >= 1")
        self.frame_size = frame_size
        self.max_frames = max_frames
        self._ring = _Ring(frame_size * (max_frames + 1))
        self._lock = threading.Lock()
        self.dropped_frames = 0

    def push(self, block: np.ndarray) -> None:
        x = _mono_float(block)
        limit = self._ring.capacity - 1
        with self._lock:
            excess = self._ring.size + x.size - limit
            if excess > 0:
                # Drop whole frames from the front of (buffered + new), keeping frame alignment.
                frames = -(-excess // self.frame_size)
                drop = frames * self.frame_size
                from_ring = min(drop, self._ring.size)
                self._ring.drop(from_ring)
                x = x[drop - from_ring :]
                self.dropped_frames += frames
            self._ring.write(x)

    def pop(self) -> np.ndarray | None:
        """One frame [frame_size] float32, or None when less than a frame is buffered."""
        with self._lock:
            if self._ring.size < self.frame_size:
                return None
            return self._ring.read(self.frame_size)

    @property
    def frames_ready(self) -> int:
        with self._lock:
            return self._ring.size // self.frame_size

    def __len__(self) -> int:
        with self._lock:
            return self._ring.size


class BlockFifo:
    """Frames in, blocks of any size out; silence and an underrun count when it runs dry.

    `prefill` frames of silence are queued at start so playback has a little slack (jitter).
    At most `max_frames` frames wait; pushing more drops the oldest (counted in `dropped_frames`).
    """

    def __init__(self, frame_size: int, max_frames: int = 64, prefill: int = 0) -> None:
        if frame_size < 1 or max_frames < 1:
            raise ValueError("frame_size and max_frames must be >= 1")
        self.frame_size = frame_size
        self.max_frames = max_frames
        self._ring = _Ring(frame_size * max_frames)
        self._lock = threading.Lock()
        self.underruns = 0
        self.underrun_samples = 0
        self.dropped_frames = 0
        if prefill:
            self._ring.write(np.zeros(frame_size * min(prefill, max_frames), dtype=np.float32))

    def push(self, frame: np.ndarray) -> None:
        x = _mono_float(frame)
        with self._lock:
            if x.size > self._ring.capacity:
                x = x[-self._ring.capacity :]
            over = self._ring.size + x.size - self._ring.capacity
            if over > 0:
                self._ring.drop(over)
                self.dropped_frames += -(-over // self.frame_size)
            self._ring.write(x)

    def pull(self, n: int) -> np.ndarray:
        """Exactly `n` samples: buffered audio first, then silence (counted as an underrun)."""
        with self._lock:
            take = min(n, self._ring.size)
            got = self._ring.read(take)
            if take < n:
                self.underruns += 1
                self.underrun_samples += n - take
                got = np.concatenate([got, np.zeros(n - take, dtype=np.float32)])
            return got

    def __len__(self) -> int:
        with self._lock:
            return self._ring.size
