"""Where the echo is: the far end and the microphone addressed by absolute sample index
(`SampleRing`), and the echo path's delay measured between them (`DelayEstimator`, GCC-PHAT).
Used by duplex.streamer.echo, which re-exports both."""

from __future__ import annotations

import threading

import numpy as np


class SampleRing:
    """The last `capacity` samples of a stream, addressed by absolute sample index.

    One writer and one reader on different threads: the device callback appends, the reader
    thread copies out ranges. Samples not written yet, or already overwritten, read as zeros."""

    def __init__(self, capacity: int) -> None:
        self.buf = np.zeros(capacity, dtype=np.float32)
        self.total = 0
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self.buf.size

    def write(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        with self._lock:
            if x.size >= self.capacity:
                self.total += x.size - self.capacity
                x = x[-self.capacity :]
            start = self.total % self.capacity
            first = min(x.size, self.capacity - start)
            self.buf[start : start + first] = x[:first]
            self.buf[: x.size - first] = x[first:]
            self.total += x.size

    def read(self, start: int, n: int) -> np.ndarray:
        """Samples [start, start + n); zeros where the ring does not (or no longer) hold them."""
        out = np.zeros(n, dtype=np.float32)
        with self._lock:
            lo = max(start, self.total - self.capacity, 0)
            hi = min(start + n, self.total)
            if hi <= lo:
                return out
            a = lo % self.capacity
            m = hi - lo
            first = min(m, self.capacity - a)
            out[lo - start : lo - start + first] = self.buf[a : a + first]
            out[lo - start + first : hi - start] = self.buf[: m - first]
        return out


class DelayEstimator:
    """The echo path's delay, from the played and captured audio (GCC-PHAT).

    Both streams are box-decimated to about 8 kHz (speech's echo carries its timing there), the
    last `window_s` of the microphone is cross-correlated with the far end over lags
    [-max_ahead_s, max_delay_s], each bin weighted by its phase only (PHAT: a room's colouring
    and the voice's spectrum drop out, the direct path's sharp peak stays). A peak counts when it
    stands `min_prominence` standard deviations above the correlation's spread, and while the far
    end actually played something.

    Negative lags: the delay is between two sample counters, the far end's (samples handed to
    the speaker) and the microphone's, which start with two separate streams. How far apart they
    start depends on the sound server: on PulseAudio the input's first callback came 20 ms to
    1.3 s after the output's, sometimes with the monitor's backlog and sometimes without, and
    the same 100 ms room then measured 77 to 145 ms, or nothing at all when the microphone's
    counter ran more than the path ahead. Physically the echo always comes after its far
    samples were handed out, so those are in the ring whatever the counters say: a negative
    delay is only bookkeeping, and the canceller reads the far end that much ahead.
    """

    def __init__(
        self,
        sample_rate: int,
        max_delay_s: float = 1.0,
        window_s: float = 1.0,
        min_prominence: float = 10.0,
        max_ahead_s: float = 0.5,
        pattern_s: float = 0.01,
    ) -> None:
        self.decim = max(1, round(sample_rate / 8000))
        self.rate = sample_rate / self.decim
        self.max_lag = int(max_delay_s * self.rate)
        self.ahead = int(max_ahead_s * self.rate)
        self.window = int(window_s * self.rate)
        self.min_prominence = min_prominence
        self.pattern_s = pattern_s
        # The correlation (lag index k: delay (max_lag - k) * decim) of the last estimate found.
        self.curve: np.ndarray | None = None
        n = self.window + self.max_lag + self.ahead
        self.nfft = 1 << (2 * n - 1).bit_length()
        freqs = np.fft.rfftfreq(self.nfft, 1.0 / self.rate)
        # Speech band only: below 100 Hz rooms boom and above 3.6 kHz the box filter aliases.
        self.band = (freqs >= 100.0) & (freqs <= 3600.0)

    def _decimate(self, x: np.ndarray) -> np.ndarray:
        d = self.decim
        return x[: x.size // d * d].reshape(-1, d).mean(axis=1)

    def estimate(self, far: SampleRing, near: SampleRing, end: int) -> tuple[int, float] | None:
        """(delay in device samples, negative when the microphone's counter runs ahead;
        prominence) for the near audio ending at sample `end`, or None when the far end was
        quiet or no peak stands out."""
        d = self.decim
        near_d = self._decimate(near.read(end - self.window * d, self.window * d))
        span = self.window + self.max_lag + self.ahead
        far_d = self._decimate(far.read(end - (self.window + self.max_lag) * d, span * d))
        # The far end must have played something (-50 dBFS) and the microphone heard something.
        if np.sqrt(np.mean(far_d**2)) < 3e-3 or np.sqrt(np.mean(near_d**2)) < 1e-4:
            return None
        spec = np.conj(np.fft.rfft(near_d, self.nfft)) * np.fft.rfft(far_d, self.nfft)
        spec = np.where(self.band, spec / (np.abs(spec) + 1e-12), 0.0)
        # cc[k] = sum_i near[i] far[i + k]; near[i] echoes far[i + max_lag - lag].
        cc = np.fft.irfft(spec, self.nfft)[: self.max_lag + self.ahead + 1]
        k = int(np.argmax(cc))
        spread = float(np.std(cc)) + 1e-12
        prominence = float(cc[k] - np.mean(cc)) / spread
        if prominence < self.min_prominence:
            return None
        self.curve = cc
        return (self.max_lag - k) * d, prominence

    def moved(self, reference: np.ndarray, delay: int, curve: np.ndarray, found: int) -> int:
        """The new delay after a route change: `delay` plus how far the room's whole pattern
        (`reference`, the correlation measured at `delay`) moved in `curve`, searched within
        `pattern_s` of `found` (the new curve's peak).

        A room answers with several peaks of nearly equal height (the direct path and early
        reflections), and which one is highest changes from one estimate to the next: the
        canceller locked at one and, after a 50 ms jump, realigned to the other, 2.7 ms off
        the path it had learnt, and its filter had to start again. The pattern's shift is the
        route change itself, whichever peak leads."""
        d = self.decim
        w = round(self.pattern_s * self.rate)
        k0 = self.max_lag - delay // d
        kf = self.max_lag - found // d
        if k0 - w < 0 or k0 + w >= reference.size:
            return found
        template = reference[k0 - w : k0 + w + 1]
        lo, hi = max(kf - w, w), min(kf + w, curve.size - w - 1)
        if hi < lo:
            return found
        # match[j]: the template centred at lag index lo + j of the new curve.
        match = np.correlate(curve[lo - w : hi + w + 1], template, mode="valid")
        k = lo + int(np.argmax(match))
        return delay - (k - k0) * d
