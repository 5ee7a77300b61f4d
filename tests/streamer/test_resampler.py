"""The streaming resampler: blocks of any size give the whole-signal output; tones survive."""

from __future__ import annotations

import numpy as np
import pytest

from duplex.streamer.resampler import StreamResampler


@pytest.mark.parametrize("rates", [(48000, 24000), (48000, 16000), (16000, 48000), (44100, 24000)])
def test_streamed_equals_whole(rates) -> None:
    a, b = rates
    x = np.random.default_rng(0).standard_normal(a // 5).astype(np.float32)
    whole = StreamResampler(a, b).process(x)
    for block in (1, 7, 480, 1000):
        r = StreamResampler(a, b)
        got = np.concatenate([r.process(x[i : i + block]) for i in range(0, x.size, block)])
        np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-6)
    assert abs(whole.size - x.size * b / a) <= 1


def test_prefix_in_prefix_out() -> None:
    x = np.random.default_rng(1).standard_normal(4800).astype(np.float32)
    full = StreamResampler(48000, 16000).process(x)
    part = StreamResampler(48000, 16000).process(x[:2000])
    np.testing.assert_allclose(part, full[: part.size], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rates", [(48000, 24000), (16000, 48000)])
def test_tone_keeps_frequency_and_level(rates) -> None:
    a, b = rates
    t = np.arange(a) / a
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    y = StreamResampler(a, b).process(x)[200:]
    ref = 0.5 * np.sin(2 * np.pi * 440 * (np.arange(y.size) + 200) / b)
    lag = int(np.argmax(np.correlate(y[:2000], ref[:2000], mode="full"))) - 1999
    # The filter delays by half its width: 15.5 input samples, in output samples here.
    period = b / 440
    expected = 15.5 * b / a
    assert min(abs(lag - expected) % period, period - abs(lag - expected) % period) < 3
    assert np.isclose(np.sqrt(np.mean(y**2)), 0.5 / np.sqrt(2), rtol=0.05)
    spec = np.abs(np.fft.rfft(y[: b // 2] * np.hanning(b // 2)))
    # Bins are 2 Hz apart for a half-second window.
    assert abs(np.argmax(spec) * 2 - 440) <= 4


def test_downsampling_removes_what_cannot_be_represented() -> None:
    a, b = 48000, 16000
    t = np.arange(a) / a
    x = np.sin(2 * np.pi * 12000 * t).astype(np.float32)
    y = StreamResampler(a, b).process(x)[100:]
    assert np.sqrt(np.mean(y**2)) < 0.02
