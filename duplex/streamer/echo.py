"""Acoustic echo cancellation on the device path: the model hears the user, not itself.

A full-duplex model listens while it speaks. Through a laptop's speaker and microphone its own
voice comes back, and without cancellation it transcribes its own words as the user's, answers
them, or stops as if interrupted. This module removes that echo with a maintained library, never
a home-made filter, through one of two backends:

- `speex` (the default): libspeexdsp's MDF adaptive filter (Debian's libspeexdsp1, through
  ctypes) followed by its preprocessor's residual-echo and noise suppression. Its linear filter
  subtracts the echo and leaves the user's voice as it was, so during double talk the model
  still hears the user.
- `webrtc`: WebRTC's AEC3 through the `livekit` package's `AudioProcessingModule`. It removes
  more echo (40 dB and more) but its suppressor also takes most of the user's voice away while
  both speak (about a third of the user's energy kept, spectral correlation 0.7 with the clean
  voice), and `livekit` exposes no setting to change that. Use it when the user waits for the
  model to finish.

Noise suppression and an 80 Hz high-pass run in the same chain, each switchable.

The echo canceller needs two signals that line up:

- the far end: exactly what was handed to the speaker (`EchoCanceller.play`, called by the
  device's output callback with the samples it gave PortAudio, silence of an underrun included);
- the near end: the microphone (`EchoCanceller.process`, 10 ms at a time, on the reader thread).

Both are counted in device samples from the start of the streams. The echo of far sample `i`
arrives at near sample `i + D`; `D` starts from PortAudio's reported latencies and is then
measured by cross-correlation (GCC-PHAT) of the played and captured audio, re-measured every
quarter second, so a changed route (a Bluetooth headset, a stalled sound server) is followed.
The far end is fed to the canceller `D - margin` samples late, which leaves it a short, positive
residual to model: a speex filter only spans its tail, and AEC3's own delay search loses an
800 ms path.

The canceller reports what a user needs to trust it: on or off, the delay in use and where it
came from, and the echo attenuation it achieves (microphone power over output power while the
far end plays, smoothed over about a second).

Until it has converged (delay measured, echo shown to be attenuated) the canceller holds the
microphone down while the far end plays (duplex.streamer.echo_hold: half duplex for the first
seconds of a session, at most 5 s), so the model does not hear its own first reply; the
measured delay is kept across stream restarts (PortAudio's figure plus the excess measured
before) and the filter with it.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from duplex.streamer.echo_chain import (
    EchoUnavailableError,
    HighPass,
    SpeexChain,
    WebRTCChain,
    speex_library,
    to_int16,
)
from duplex.streamer.echo_delay import DelayEstimator, SampleRing
from duplex.streamer.echo_hold import ConvergenceHold

__all__ = ["DelayEstimator", "EchoUnavailableError", "SampleRing"]

BACKENDS = ("speex", "webrtc")


@dataclass(frozen=True)
class EchoSettings:
    """Which stages of the audio processing module run on the microphone."""

    aec: bool = True
    noise_suppression: bool = True
    high_pass: bool = True
    backend: str = "speex"
    hold_until_converged: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(
                f"echo backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}"
            )

    @property
    def active(self) -> bool:
        """Whether any stage runs (with none, the microphone goes to the model untouched)."""
        return self.aec or self.noise_suppression or self.high_pass

    def as_dict(self) -> dict[str, bool | str]:
        return asdict(self)

    def describe(self) -> str:
        parts = [
            f"AEC {'on (' + self.backend + ')' if self.aec else 'off'}",
            f"noise suppression {'on' if self.noise_suppression else 'off'}",
            f"high-pass {'on' if self.high_pass else 'off'}",
        ]
        if self.aec and not self.hold_until_converged:
            parts.append("no hold while converging")
        return ", ".join(parts)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EchoSettings:
        return cls(
            aec=not getattr(args, "no_aec", False),
            noise_suppression=not getattr(args, "no_noise_suppression", False),
            high_pass=not getattr(args, "no_high_pass", False),
            backend=getattr(args, "aec_backend", None) or "speex",
            hold_until_converged=not getattr(args, "no_aec_hold", False),
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The microphone-processing flags shared by `duplex talk` and `duplex connect`."""
    p.add_argument(
        "--no-aec",
        action="store_true",
        help="do not cancel the speaker's echo in the microphone (on by default with an audio "
        "device; turn it off with headphones, or to hear what the raw microphone gives)",
    )
    p.add_argument(
        "--no-noise-suppression",
        action="store_true",
        help="do not suppress steady background noise in the microphone (on by default)",
    )
    p.add_argument(
        "--no-high-pass",
        action="store_true",
        help="do not high-pass filter the microphone (removes hum and DC; on by default)",
    )
    p.add_argument(
        "--aec-backend",
        choices=BACKENDS,
        default="speex",
        help="echo canceller: speex (libspeexdsp; keeps your voice while both speak; default) "
        "or webrtc (WebRTC AEC3 via livekit; removes more echo, but also much of your voice "
        "while the model speaks)",
    )
    p.add_argument(
        "--no-aec-hold",
        action="store_true",
        help="do not hold the microphone down while the echo canceller is still converging "
        "(by default, until it has measured the delay and attenuates the echo, the microphone "
        "is muted while the model speaks: at most 5 s, at the start of a session)",
    )


def library_version(backend: str = "speex") -> str:
    """The backend's library and its version, or EchoUnavailableError saying why not."""
    if backend == "speex":
        lib = speex_library()
        return f"libspeexdsp ({lib._name}: MDF echo canceller, preprocessor)"
    try:
        from livekit import rtc
    except Exception as e:
        raise EchoUnavailableError(
            f"the webrtc echo canceller's library cannot be loaded ({type(e).__name__}: {e}); "
            "install it with `pip install livekit`, or use --aec-backend speex"
        ) from None
    return f"livekit {rtc.__version__} (WebRTC AudioProcessingModule: AEC3, noise suppression)"


def echo_line(audio: object) -> str:
    """The microphone processing of an audio backend as the TUI's session panel shows it: AEC
    on/off, the delay in use and the echo attenuation measured (files have no echo)."""
    echo = getattr(audio, "echo", None)
    if echo is not None:
        return echo.status().line()
    return "AEC off" if hasattr(audio, "echo") else "AEC n/a (no audio device)"


@dataclass
class EchoStatus:
    """What the TUI and the stats report about the microphone processing."""

    settings: EchoSettings
    delay_ms: float | None
    delay_source: str
    attenuation_db: float | None
    delay_changes: int
    process_ms_p50: float | None
    converged: bool | None = None
    held_s: float = 0.0
    hold: str = "off"

    def line(self) -> str:
        """One line for the TUI's session panel."""
        if not self.settings.aec:
            extra = []
            if self.settings.noise_suppression:
                extra.append("NS")
            if self.settings.high_pass:
                extra.append("HPF")
            return "AEC off" + (f" ({'+'.join(extra)} on)" if extra else "")
        delay = "?" if self.delay_ms is None else f"{self.delay_ms:.0f} ms ({self.delay_source})"
        att = "–" if self.attenuation_db is None else f"{self.attenuation_db:.0f} dB"
        line = f"AEC on ({self.settings.backend}) · delay {delay} · echo −{att}"
        if self.hold == "holding":
            line += " · converging (mic held)"
        elif self.hold == "gave up":
            line += " · not converged"
        elif self.hold == "no echo":
            line += " · no echo heard"
        return line

    def as_dict(self) -> dict:
        d = asdict(self)
        d["settings"] = self.settings.as_dict()
        return d


class EchoCanceller:
    """Echo cancellation, noise suppression and a high-pass on a microphone, with the far end
    aligned by a measured delay.

    `play(far)` may be called from the output device's callback (it only copies into a ring);
    `process(near)` from one reader thread, with whole 10 ms chunks (`chunk` samples); it
    returns the processed chunks, same length. Both run at the device's sample rate. The
    output lags the input by the chain's own latency (echo_rig.chain_delay): speex's
    preprocessor returns the previous 10 ms chunk (10 ms), WebRTC's module about 15 ms with
    AEC and noise suppression; the high-pass alone adds none.
    """

    def __init__(
        self,
        sample_rate: int,
        settings: EchoSettings | None = None,
        initial_delay_s: float = 0.05,
        margin_s: float = 0.015,
        max_delay_s: float = 1.0,
        max_ahead_s: float = 0.5,
        estimate_every_s: float = 0.25,
        tail_s: float = 0.08,
        hold: ConvergenceHold | None = None,
    ) -> None:
        self.settings = settings or EchoSettings()
        if not self.settings.active:
            raise ValueError("EchoCanceller needs at least one stage on (aec, NS or high-pass)")
        if sample_rate % 100:
            raise ValueError(f"echo cancellation needs 10 ms frames; {sample_rate} Hz has none")
        self.library = library_version(self.settings.backend)
        self.sample_rate = sample_rate
        self.chunk = sample_rate // 100
        self.margin = round(margin_s * sample_rate)
        self.max_delay = round(max_delay_s * sample_rate)
        self.max_ahead = round(max_ahead_s * sample_rate)
        self._hpf = HighPass(sample_rate) if self.settings.high_pass else None
        self._chain: SpeexChain | WebRTCChain | None = None
        if self.settings.aec or self.settings.noise_suppression:
            if self.settings.backend == "webrtc":
                self._chain = WebRTCChain(sample_rate, self.chunk, self.settings)
            else:
                self._chain = SpeexChain(sample_rate, self.chunk, self.settings, tail_s)
        self.estimator = DelayEstimator(
            sample_rate, max_delay_s=max_delay_s, max_ahead_s=max_ahead_s
        )
        self.far = SampleRing(self.max_delay + 2 * sample_rate + self.chunk)
        self.near = SampleRing(2 * sample_rate)
        self.estimate_every = max(1, round(estimate_every_s * 100))
        self._en = self._eo = 0.0
        self._proc_ms: list[float] = []
        # The hold while converging (echo_hold); None when off.
        self.hold: ConvergenceHold | None = None
        if self.settings.aec and self.settings.hold_until_converged:
            self.hold = hold or ConvergenceHold(
                sample_rate, self.chunk, tail_s=tail_s, ahead_s=max_ahead_s
            )
        # Measured delay minus PortAudio's figure of the same streams: kept across restarts.
        self._excess: int | None = None
        self.restart(initial_delay_s)

    def restart(self, initial_delay_s: float) -> None:
        """New streams: both sample counts start again at 0, the delay from PortAudio's figure,
        plus what the measurement found beyond that figure before (the sound server's own
        buffering; same devices, same excess). The filter keeps what it learnt (the room did not
        change); the hold, if on, waits until the filter shows it still fits."""
        self.far = SampleRing(self.far.capacity)
        self.near = SampleRing(self.near.capacity)
        self._seed = int(min(max(initial_delay_s, 0.0) * self.sample_rate, self.max_delay))
        self.delay = self._seed
        self.delay_source = "portaudio"
        if self._excess is not None:
            self.delay = min(max(self._seed + self._excess, -self.max_ahead), self.max_delay)
            self.delay_source = "remembered"
        if self.hold is not None:
            self.hold.reset()
        self._candidate: int | None = None
        # The correlation measured at the delay in use (echo_delay.DelayEstimator.moved).
        self._pattern: np.ndarray | None = None
        self.delay_changes = 0
        self.chunks = 0

    @property
    def delay_ms(self) -> float:
        return 1000.0 * self.delay / self.sample_rate

    def play(self, far: np.ndarray) -> None:
        """The samples just handed to the speaker (any length)."""
        if self.settings.aec:
            self.far.write(far)

    def skip(self, n: int) -> None:
        """`n` microphone samples were lost before processing (a full FIFO): keep the near
        count in step with the device's clock."""
        self.near.write(np.zeros(n, dtype=np.float32))

    def process(self, near: np.ndarray) -> np.ndarray:
        """Process whole 10 ms chunks of microphone audio; returns what the model should hear."""
        x = np.asarray(near, dtype=np.float32).reshape(-1)
        if x.size % self.chunk:
            raise ValueError(f"process() takes whole 10 ms chunks of {self.chunk} samples")
        out = np.empty_like(x)
        for k in range(0, x.size, self.chunk):
            out[k : k + self.chunk] = self._one(x[k : k + self.chunk])
        return out

    def _one(self, near: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        start = self.near.total
        self.near.write(near)
        x = near if self._hpf is None else self._hpf(near)
        far = None
        lead = 0
        if self.settings.aec:
            self.chunks += 1
            if self.chunks % self.estimate_every == 0:
                self._update_delay(start + self.chunk)
            # Negative when the microphone's counter runs ahead (echo_delay.DelayEstimator):
            # the far end is then read ahead of the chunk's index; it was handed out already.
            lead = self.delay - self.margin
            far = self.far.read(start - lead, self.chunk)
        if self._chain is None:
            out = x
        else:
            far_i = None if far is None else to_int16(far)
            if isinstance(self._chain, WebRTCChain):
                residual = round(1000.0 * (self.delay - lead) / self.sample_rate)
                y = self._chain(to_int16(x), far_i, residual)
            else:
                y = self._chain(to_int16(x), far_i)
            out = y.astype(np.float32) / 32768.0
        if far is not None:
            self._measure(near, out, far)
            if self.hold is not None and (self.hold.active or self.hold.gain != 1.0):
                out = self._hold(near, out, far, start)
        self._proc_ms.append(1000.0 * (time.perf_counter() - t0))
        if len(self._proc_ms) > 1000:
            del self._proc_ms[:500]
        return out

    def _update_delay(self, end: int) -> None:
        found = self.estimator.estimate(self.far, self.near, end)
        if found is None:
            return
        delay, _ = found
        tolerance = round(0.002 * self.sample_rate)
        # Two estimates in a row must agree before the alignment moves: one double-talk burst
        # or one periodic sound must not throw away a converged filter.
        curve = self.estimator.curve
        agreed = self._candidate is not None and abs(delay - self._candidate) <= tolerance
        self._candidate = delay
        if not agreed:
            return
        if self.delay_source != "measured" or abs(delay - self.delay) > 2 * tolerance:
            if self.delay_source == "measured":
                self.delay_changes += 1
                if self._pattern is not None:
                    delay = self.estimator.moved(self._pattern, self.delay, curve, delay)
            # The filter is kept: realignment restores the residual path it learnt (the margin
            # plus the room). Measured offline, restarting speex's filter on each move cost about
            # a second of re-convergence after a 50 ms jump and 15-20 dB of final attenuation,
            # and on the first measurement it gained nothing.
            self.delay = delay
            self._pattern = None if curve is None else curve.copy()
            if self.hold is not None:
                self.hold.realigned()
        elif self._pattern is not None and curve is not None:
            # The same path measured again: averaged, so no single estimate's noise decides
            # the next move.
            self._pattern = 0.5 * (self._pattern + curve)
        self.delay_source = "measured"
        self._excess = self.delay - self._seed

    def _hold(self, near: np.ndarray, out: np.ndarray, far: np.ndarray, start: int) -> np.ndarray:
        """Before convergence: the chain's output, held down while the far end's echo may be
        arriving (echo_hold.ConvergenceHold)."""
        hold = self.hold
        known = self.delay_source != "portaudio"
        hold.observe(near, out, far, known, start)
        playing = hold.active and hold.far_active(self.far, start, self.delay, known)
        return hold.apply(out, playing)

    @property
    def hold_state(self) -> str:
        """off (no hold configured), holding (not converged yet), converged, no echo (nothing
        came back while the far end played) or gave up."""
        if self.hold is None:
            return "off"
        if self.hold.converged:
            return "converged"
        if self.hold.no_echo:
            return "no echo"
        return "gave up" if self.hold.gave_up else "holding"

    def _measure(self, near: np.ndarray, out: np.ndarray, far: np.ndarray) -> None:
        # Attenuation is only meaningful while the far end plays (-50 dBFS) and echo arrives.
        if float(np.mean(far.astype(np.float64) ** 2)) < 1e-5:
            return
        # About half a second of far-end activity (100 chunks a second).
        a = 0.02
        self._en += a * (float(np.mean(near.astype(np.float64) ** 2)) - self._en)
        self._eo += a * (float(np.mean(out.astype(np.float64) ** 2)) - self._eo)

    @property
    def attenuation_db(self) -> float | None:
        """Echo return loss enhancement as measured (None until the far end has played)."""
        if self._en < 1e-9:
            return None
        return 10.0 * math.log10(self._en / max(self._eo, 1e-12))

    def status(self) -> EchoStatus:
        p50 = float(np.median(self._proc_ms)) if self._proc_ms else None
        return EchoStatus(
            self.settings,
            self.delay_ms if self.settings.aec else None,
            self.delay_source,
            self.attenuation_db if self.settings.aec else None,
            self.delay_changes,
            p50,
            None if self.hold is None else self.hold.converged,
            0.0 if self.hold is None else self.hold.held_s,
            self.hold_state if self.settings.aec else "off",
        )

    def close(self) -> None:
        chain = getattr(self, "_chain", None)
        if chain is not None:
            chain.close()
            self._chain = None

    def __del__(self) -> None:
        self.close()
