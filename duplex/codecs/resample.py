"""Every resampler of the project: offline for whole signals, streaming for audio devices.

Codecs take audio only at their own rate. Files, synthesised speech and transcription inputs are
resampled whole (`resample`, torchaudio's band-limited sinc). An audio device that cannot run at
the codec's rate is resampled block by block as its callbacks deliver a few milliseconds at a
time (`StreamResampler`, libsoxr through `soxr.ResampleStream`): a well-kept C library that keeps
its own filter history, so blocks of any size give exactly the output of the whole signal.

The streaming quality is soxr's "LQ" on purpose: its filter holds back at most ~6 ms of audio
(the "HQ" filter holds 9-32 ms, more than a whole codec frame), while what it folds back when
downsampling is still more than 100 dB down. Its passband is flat within 0.3 dB up to 0.7 of the
lower Nyquist frequency (0.6 dB at 0.75), ample for speech at the codec's rate.
"""

from __future__ import annotations

import numpy as np
import soxr
import torch
import torchaudio.functional as AF


def resample(wav: torch.Tensor, from_rate: int, to_rate: int) -> torch.Tensor:
    """Band-limited (windowed sinc) resampling along the last axis: [..., T] -> [..., T'].

    T' = ceil(T * to_rate / from_rate). Rates must be positive integers; equal rates return the
    input unchanged.
    """
    _check_rates(from_rate, to_rate)
    if not torch.is_floating_point(wav):
        raise ValueError(f"resample needs a floating point tensor, got {wav.dtype}")
    if from_rate == to_rate:
        return wav
    return AF.resample(wav, int(from_rate), int(to_rate))


class StreamResampler:
    """Resample a mono float32 stream by from_rate -> to_rate, block by block.

    `process(block)` returns every output sample the filter can already compute; `flush()`
    returns the rest at the end of the stream. Output is aligned with the input (the filter's
    delay is compensated), so the concatenated outputs equal `process(whole)` + `flush()`.
    """

    def __init__(self, from_rate: int, to_rate: int, quality: str = "LQ") -> None:
        _check_rates(from_rate, to_rate)
        self.from_rate, self.to_rate = int(from_rate), int(to_rate)
        self._stream = soxr.ResampleStream(
            self.from_rate, self.to_rate, 1, dtype="float32", quality=quality
        )

    def process(self, block: np.ndarray) -> np.ndarray:
        """Feed input samples [n]; get every output sample they complete."""
        x = np.ascontiguousarray(np.asarray(block, dtype=np.float32).reshape(-1))
        return self._stream.resample_chunk(x)

    def flush(self) -> np.ndarray:
        """The output still held in the filter (call once, at the end of the stream)."""
        return self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)


def _check_rates(from_rate: int, to_rate: int) -> None:
    if int(from_rate) != from_rate or int(to_rate) != to_rate or from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive integers, got {from_rate} -> {to_rate}")
