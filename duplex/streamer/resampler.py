"""A streaming rational resampler for audio devices that cannot run at the codec's rate.

Offline resampling (duplex.codecs.resample) sees the whole signal; a device callback sees a few
milliseconds at a time. This polyphase windowed-sinc resampler keeps the last taps of input as
history, so feeding a signal in blocks of any size gives exactly the output of feeding it whole.
The filter spans 2 * `taps` periods of the lower of the two rates (so downsampling gets as sharp a
filter as upsampling): flat within 0.1 dB up to 3/4 of the lower Nyquist frequency, and what lies
above it (aliases when downsampling, images when upsampling) is at least 60 dB down.
Latency: half the filter, `taps` samples at the lower rate (1 ms for 16 kHz).
"""

from __future__ import annotations

import math

import numpy as np


class StreamResampler:
    """Resample a mono float32 stream by from_rate -> to_rate, block by block."""

    def __init__(self, from_rate: int, to_rate: int, taps: int = 16) -> None:
        if from_rate <= 0 or to_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
        g = math.gcd(from_rate, to_rate)
        self.up = to_rate // g
        self.down = from_rate // g
        self.from_rate, self.to_rate = from_rate, to_rate
        # Prototype low-pass at the upsampled rate, cut below both Nyquist limits: its
        # transition band runs from 0.75 to 1.0 of the lower Nyquist frequency. `width` is in
        # input samples: 2 * taps periods of the lower rate.
        # One period of the lower rate is max(up, down) samples at the upsampled rate.
        ratio = max(self.up, self.down)
        width = math.ceil(2 * taps * ratio / self.up)
        n = np.arange(width * self.up) - (width * self.up - 1) / 2
        cutoff = 0.87 * 0.5 / ratio
        proto = 2 * cutoff * np.sinc(2 * cutoff * n) * np.kaiser(n.size, 6.0) * self.up
        # bank[phase, j] multiplies x[i - j] for output phase `phase`.
        self.bank = proto.reshape(width, self.up).T[:, :].astype(np.float64)
        self.width = width
        self.history = np.zeros(width - 1, dtype=np.float64)
        # Next output index, counted in upsampled units from the stream start.
        self.t = 0
        self.consumed = 0

    def process(self, block: np.ndarray) -> np.ndarray:
        """Feed input samples [n]; get every output sample they complete."""
        x = np.concatenate([self.history, np.asarray(block, dtype=np.float64).reshape(-1)])
        avail = self.consumed + x.size - self.history.size
        # Output n uses input index floor(n*down/up); it is ready once that sample arrived.
        last = (avail * self.up - 1) // self.down if avail > 0 else -1
        first = self.t
        if last < first:
            self.history = x[-(self.width - 1) :]
            self.consumed = avail
            return np.zeros(0, dtype=np.float32)
        n = np.arange(first, last + 1)
        pos = n * self.down
        idx = pos // self.up
        phase = pos % self.up
        # Local index of input sample idx within x (history occupies the first width-1 slots).
        local = idx - self.consumed + self.history.size
        win = local[:, None] - np.arange(self.width)[None, :]
        y = np.einsum("nj,nj->n", x[win], self.bank[phase])
        self.t = last + 1
        self.history = x[-(self.width - 1) :]
        self.consumed = avail
        return y.astype(np.float32)
