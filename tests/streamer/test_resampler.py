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
    r = StreamResampler(a, b)
    y = r.process(x)[200:]
    ref = 0.5 * np.sin(2 * np.pi * 440 * (np.arange(y.size) + 200) / b)
    lag = int(np.argmax(np.correlate(y[:2000], ref[:2000], mode="full"))) - 1999
    # The filter delays by half its width (in input samples), in output samples here.
    period = b / 440
    expected = (r.width - 1) / 2 * b / a
    assert min(abs(lag - expected) % period, period - abs(lag - expected) % period) < 3
    assert np.isclose(np.sqrt(np.mean(y**2)), 0.5 / np.sqrt(2), rtol=0.05)
    spec = np.abs(np.fft.rfft(y[: b // 2] * np.hanning(b // 2)))
    # Bins are 2 Hz apart for a half-second window.
    assert abs(np.argmax(spec) * 2 - 440) <= 4


DOWN = [(48000, 16000), (48000, 24000), (44100, 24000), (44100, 16000), (24000, 16000)]
UP = [(16000, 48000), (24000, 48000), (16000, 24000), (16000, 44100)]


def _tone(rate: int, f: float) -> np.ndarray:
    return np.sin(2 * np.pi * f * np.arange(rate // 4) / rate)


def _db(y: np.ndarray, ref: float) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(y**2)) / ref + 1e-12))


def _steady(r: StreamResampler, x: np.ndarray) -> np.ndarray:
    """The output without the filter's start-up and tail (a filter width at each end)."""
    y = r.process(x)
    edge = 2 * r.width * max(r.up, r.down) // r.down
    return y[edge:-edge]


@pytest.mark.parametrize("rates", DOWN + UP)
def test_passband_is_flat(rates) -> None:
    """Tones up to 3/4 of the lower Nyquist frequency keep their level within 0.2 dB."""
    a, b = rates
    for f in np.linspace(50, 0.75 * min(a, b) / 2, 16):
        level = _db(_steady(StreamResampler(a, b), _tone(a, f)), np.sqrt(0.5))
        assert abs(level) < 0.2, (f, level)


@pytest.mark.parametrize("rates", DOWN)
def test_downsampling_removes_what_cannot_be_represented(rates) -> None:
    """Every tone between the output's Nyquist frequency and the input's would alias: all of
    them come out at least 50 dB down."""
    a, b = rates
    for f in np.linspace(b / 2, 0.98 * a / 2, 40):
        level = _db(_steady(StreamResampler(a, b), _tone(a, f)), np.sqrt(0.5))
        assert level < -50, f"{f:.0f} Hz aliases through at {level:.1f} dB"


@pytest.mark.parametrize("rates", UP)
def test_upsampling_leaves_no_images(rates) -> None:
    """A tone upsampled is that tone alone: nothing above the input's Nyquist frequency."""
    a, b = rates
    for f in np.linspace(50, 0.75 * a / 2, 12):
        y = _steady(StreamResampler(a, b), _tone(a, f))
        spec = np.abs(np.fft.rfft(y * np.kaiser(y.size, 14)))
        freqs = np.fft.rfftfreq(y.size, 1 / b)
        image = 20 * np.log10(spec[freqs >= a / 2].max() / spec.max())
        assert image < -50, f"{f:.0f} Hz leaves an image at {image:.1f} dB"
