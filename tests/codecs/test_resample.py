"""The resamplers: offline for whole signals, streaming (blocks of any size = the whole signal)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duplex.codecs import resample
from duplex.codecs.resample import StreamResampler


@pytest.mark.parametrize(
    "src,dst", [(44100, 16000), (16000, 24000), (48000, 24000), (22050, 16000)]
)
def test_resample_keeps_frequency_and_duration(src: int, dst: int) -> None:
    t = torch.arange(src) / src
    x = torch.sin(2 * torch.pi * 1000 * t)[None, None]
    y = resample(x, src, dst)
    assert y.shape[-1] == dst
    spec = torch.fft.rfft(y[0, 0, dst // 10 : -dst // 10])
    peak_hz = spec.abs().argmax().item() * dst / (len(y[0, 0]) - 2 * (dst // 10))
    assert abs(peak_hz - 1000) < 10
    assert y[..., dst // 10 : -dst // 10].abs().max() == pytest.approx(1.0, abs=0.02)


def test_resample_identity_and_errors() -> None:
    x = torch.randn(2, 1, 100)
    assert resample(x, 16000, 16000) is x
    with pytest.raises(ValueError, match="positive"):
        resample(x, 0, 16000)
    with pytest.raises(ValueError, match="floating"):
        resample(torch.zeros(10, dtype=torch.int16), 8000, 16000)


def test_codec_points_to_resampling() -> None:
    from duplex.codecs.small import SmallCodec

    codec = SmallCodec()
    x = torch.randn(1, 1, 48000)
    with pytest.raises(ValueError, match="resample"):
        codec.encode(x, sample_rate=48000)
    codes = codec.encode(resample(x, 48000, codec.sample_rate), sample_rate=codec.sample_rate)
    assert codes.shape == (1, codec.num_codebooks, 50)


RATES = [(48000, 24000), (48000, 16000), (16000, 48000), (44100, 24000)]


def _stream(r: StreamResampler, x: np.ndarray, block: int) -> np.ndarray:
    outs = [r.process(x[i : i + block]) for i in range(0, x.size, block)]
    return np.concatenate([*outs, r.flush()])


@pytest.mark.parametrize("rates", RATES)
def test_streamed_equals_whole(rates) -> None:
    a, b = rates
    x = np.random.default_rng(0).standard_normal(a // 5).astype(np.float32)
    whole = _stream(StreamResampler(a, b), x, x.size)
    for block in (1, 7, 480, 1000):
        np.testing.assert_array_equal(_stream(StreamResampler(a, b), x, block), whole)
    assert abs(whole.size - x.size * b / a) <= 1


def test_prefix_in_prefix_out() -> None:
    x = np.random.default_rng(1).standard_normal(4800).astype(np.float32)
    full = StreamResampler(48000, 16000).process(x)
    part = StreamResampler(48000, 16000).process(x[:2000])
    assert 0 < part.size < full.size
    np.testing.assert_array_equal(part, full[: part.size])


@pytest.mark.parametrize("rates", RATES)
def test_low_latency_and_aligned(rates) -> None:
    """A device stream holds back at most 7 ms, and what comes out is not delayed: a tone
    resampled lines up with the same tone generated at the output rate."""
    a, b = rates
    t = np.arange(a) / a
    r = StreamResampler(a, b)
    y = r.process((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    assert b - y.size <= 0.007 * b
    ref = 0.5 * np.sin(2 * np.pi * 440 * np.arange(y.size) / b)
    mid = slice(b // 10, y.size - b // 10)
    np.testing.assert_allclose(y[mid], ref[mid], atol=5e-3)


DOWN = [(48000, 16000), (48000, 24000), (44100, 24000), (44100, 16000), (24000, 16000)]
UP = [(16000, 48000), (24000, 48000), (16000, 24000), (16000, 44100)]


def _tone(rate: int, f: float) -> np.ndarray:
    return np.sin(2 * np.pi * f * np.arange(rate // 4) / rate)


def _db(y: np.ndarray, ref: float) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(y**2)) / ref + 1e-12))


def _steady(a: int, b: int, x: np.ndarray) -> np.ndarray:
    """The streamed output without its first and last 20 ms (start-up and tail)."""
    r = StreamResampler(a, b)
    y = np.concatenate([r.process(x), r.flush()])
    edge = b // 50
    return y[edge:-edge]


@pytest.mark.parametrize("rates", DOWN + UP)
def test_passband_is_flat(rates) -> None:
    """Tones up to 0.7 of the lower Nyquist frequency keep their level within 0.3 dB, and up
    to 0.75 within 0.6 dB."""
    a, b = rates
    for f in np.linspace(50, 0.75 * min(a, b) / 2, 16):
        level = _db(_steady(a, b, _tone(a, f)), np.sqrt(0.5))
        limit = 0.3 if f <= 0.7 * min(a, b) / 2 else 0.6
        assert abs(level) < limit, (f, level)


@pytest.mark.parametrize("rates", DOWN)
def test_downsampling_removes_what_cannot_be_represented(rates) -> None:
    """Every tone between the output's Nyquist frequency and the input's would alias: all of
    them come out at least 90 dB down."""
    a, b = rates
    for f in np.linspace(b / 2, 0.98 * a / 2, 40):
        level = _db(_steady(a, b, _tone(a, f)), np.sqrt(0.5))
        assert level < -90, f"{f:.0f} Hz aliases through at {level:.1f} dB"


@pytest.mark.parametrize("rates", UP)
def test_upsampling_leaves_no_images(rates) -> None:
    """A tone upsampled is that tone alone: nothing above the input's Nyquist frequency."""
    a, b = rates
    for f in np.linspace(50, 0.75 * a / 2, 12):
        y = _steady(a, b, _tone(a, f))
        spec = np.abs(np.fft.rfft(y * np.kaiser(y.size, 14)))
        freqs = np.fft.rfftfreq(y.size, 1 / b)
        image = 20 * np.log10(spec[freqs >= a / 2].max() / spec.max())
        assert image < -50, f"{f:.0f} Hz leaves an image at {image:.1f} dB"


def test_stream_rates_are_checked() -> None:
    with pytest.raises(ValueError, match="positive"):
        StreamResampler(0, 16000)
