"""The echo canceller's processing chains: libspeexdsp through ctypes, WebRTC AEC3 through
`livekit`, and the streaming high-pass in front of both.

Kept apart from `duplex.streamer.echo` (alignment, delay measurement, status) because these are
the thin wrappers over outside libraries: each takes one 10 ms chunk of int16 near-end audio
(and the aligned far end) and returns the cleaned chunk, with no knowledge of devices or delays.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from duplex.streamer.echo import EchoSettings


class EchoUnavailableError(RuntimeError):
    """The echo-cancellation library cannot be loaded: the message says what to do instead."""


class SpeexChain:
    """libspeexdsp: the MDF echo canceller, then the preprocessor (residual echo and noise)."""

    # speex_echo.h / speex_preprocess.h request codes.
    ECHO_SET_SAMPLING_RATE = 24
    PREPROCESS_SET_DENOISE = 0
    PREPROCESS_SET_NOISE_SUPPRESS = 18
    PREPROCESS_SET_ECHO_STATE = 24

    def __init__(self, sample_rate: int, chunk: int, settings: EchoSettings, tail_s: float) -> None:
        lib = speex_library()
        self.lib = lib
        self.echo = None
        self.pre = None
        if settings.aec:
            self.echo = lib.speex_echo_state_init(chunk, round(tail_s * sample_rate))
            rate = ctypes.c_int(sample_rate)
            lib.speex_echo_ctl(self.echo, self.ECHO_SET_SAMPLING_RATE, ctypes.byref(rate))
        if settings.aec or settings.noise_suppression:
            self.pre = lib.speex_preprocess_state_init(chunk, sample_rate)
            # The residual-echo suppressor runs inside the denoiser's gain stage, so the
            # denoiser stays on with the echo canceller; "no noise suppression" sets its
            # noise attenuation to 0 dB instead.
            self._ctl(self.PREPROCESS_SET_DENOISE, 1)
            if not settings.noise_suppression:
                self._ctl(self.PREPROCESS_SET_NOISE_SUPPRESS, 0)
            if self.echo is not None:
                lib.speex_preprocess_ctl(
                    self.pre, self.PREPROCESS_SET_ECHO_STATE, ctypes.c_void_p(self.echo)
                )
        self.out = np.zeros(chunk, dtype=np.int16)

    def _ctl(self, request: int, value: int) -> None:
        v = ctypes.c_int(value)
        self.lib.speex_preprocess_ctl(self.pre, request, ctypes.byref(v))

    def __call__(self, near: np.ndarray, far: np.ndarray | None) -> np.ndarray:
        x = np.ascontiguousarray(near)
        if self.echo is not None:
            f = np.ascontiguousarray(far)
            self.lib.speex_echo_cancellation(
                self.echo, x.ctypes.data, f.ctypes.data, self.out.ctypes.data
            )
            x = self.out.copy()
        if self.pre is not None:
            self.lib.speex_preprocess_run(self.pre, x.ctypes.data)
        return x

    def close(self) -> None:
        if self.pre is not None:
            self.lib.speex_preprocess_state_destroy(self.pre)
            self.pre = None
        if self.echo is not None:
            self.lib.speex_echo_state_destroy(self.echo)
            self.echo = None


class WebRTCChain:
    """livekit's WebRTC AudioProcessingModule: AEC3, noise suppression (no high-pass here:
    the chain's own high-pass runs first, the same for both backends)."""

    def __init__(self, sample_rate: int, chunk: int, settings: EchoSettings) -> None:
        from livekit import rtc

        self.rtc = rtc
        self.rate, self.chunk = sample_rate, chunk
        self.aec = settings.aec
        self.apm = rtc.AudioProcessingModule(
            echo_cancellation=settings.aec, noise_suppression=settings.noise_suppression
        )

    def __call__(
        self, near: np.ndarray, far: np.ndarray | None, residual_ms: int = 0
    ) -> np.ndarray:
        rtc = self.rtc
        if self.aec:
            self.apm.process_reverse_stream(rtc.AudioFrame(far.tobytes(), self.rate, 1, self.chunk))
            self.apm.set_stream_delay_ms(residual_ms)
        frame = rtc.AudioFrame(near.tobytes(), self.rate, 1, self.chunk)
        self.apm.process_stream(frame)
        return np.frombuffer(frame.data, dtype=np.int16).copy()

    def close(self) -> None:
        pass


class HighPass:
    """A streaming 2nd-order Butterworth high-pass at 80 Hz (scipy's sosfilt, state carried):
    removes hum and DC before the canceller, as WebRTC's own high-pass does."""

    def __init__(self, sample_rate: int, cutoff_hz: float = 80.0) -> None:
        from scipy.signal import butter, sosfilt_zi

        self.sos = butter(2, cutoff_hz, "highpass", fs=sample_rate, output="sos")
        self.zi = sosfilt_zi(self.sos) * 0.0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        from scipy.signal import sosfilt

        y, self.zi = sosfilt(self.sos, x.astype(np.float64), zi=self.zi)
        return y.astype(np.float32)


_SPEEX = None


def speex_library() -> ctypes.CDLL:
    """libspeexdsp, loaded once, with the prototypes this module calls."""
    global _SPEEX
    if _SPEEX is not None:
        return _SPEEX
    name = ctypes.util.find_library("speexdsp") or "libspeexdsp.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:
        raise EchoUnavailableError(
            f"libspeexdsp cannot be loaded ({e}): install the system package libspeexdsp1 "
            "(scripts/sysdeps.sh), or use --aec-backend webrtc, or --no-aec with headphones"
        ) from None
    vp, i = ctypes.c_void_p, ctypes.c_int
    lib.speex_echo_state_init.restype = vp
    lib.speex_echo_state_init.argtypes = [i, i]
    lib.speex_echo_state_destroy.argtypes = [vp]
    lib.speex_echo_state_reset.argtypes = [vp]
    lib.speex_echo_cancellation.argtypes = [vp, vp, vp, vp]
    lib.speex_echo_ctl.argtypes = [vp, i, vp]
    lib.speex_preprocess_state_init.restype = vp
    lib.speex_preprocess_state_init.argtypes = [i, i]
    lib.speex_preprocess_state_destroy.argtypes = [vp]
    lib.speex_preprocess_ctl.argtypes = [vp, i, vp]
    lib.speex_preprocess_run.argtypes = [vp, vp]
    _SPEEX = lib
    return lib


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)
