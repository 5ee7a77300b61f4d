"""The client's jitter buffer: received audio waits here for its turn to be played.

The network delivers frames unevenly; the speaker takes one per frame period. Playback starts
once `target` frames wait (a little delay buys smoothness), and when a burst piles up more than
`max_frames`, the oldest are dropped down to `target` so the delay does not grow (counted, as are
the underruns when the buffer runs dry).
"""

from __future__ import annotations

import collections

import numpy as np


class JitterBuffer:
    """Received frames waiting to be played: playback waits for `target` frames, and when more
    than `max_frames` wait the oldest are dropped down to `target` (catch up, counted)."""

    def __init__(self, target: int, max_frames: int) -> None:
        if not 1 <= target <= max_frames:
            raise ValueError("need 1 <= jitter target <= jitter max")
        self.target, self.max_frames = target, max_frames
        self.frames: collections.deque[np.ndarray] = collections.deque()
        self.playing = False
        self.dropped = 0
        self.underruns = 0

    def push(self, frame: np.ndarray) -> None:
        self.frames.append(frame)
        if len(self.frames) > self.max_frames:
            while len(self.frames) > self.target:
                self.frames.popleft()
                self.dropped += 1

    def pull(self, frame_size: int) -> np.ndarray | None:
        """The next frame to play; silence (counted) on an underrun; None before playback."""
        if not self.playing:
            if len(self.frames) < self.target:
                return None
            self.playing = True
        if self.frames:
            return self.frames.popleft()
        self.underruns += 1
        # Re-buffer after running dry, so one late burst does not cause a run of underruns.
        self.playing = False
        return np.zeros(frame_size, dtype=np.int16)

    @property
    def depth(self) -> int:
        return len(self.frames)
