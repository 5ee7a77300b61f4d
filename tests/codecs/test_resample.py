"""The resampling helper for inputs at other rates."""

from __future__ import annotations

import pytest
import torch

from duplex.codecs import resample


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
