"""The torch/torchaudio/encodec install is consistent: the real EnCodec 24 kHz architecture
(random weights, nothing downloaded) round-trips one second of audio."""

from __future__ import annotations

import torch


def test_encodec_24khz_random_weights_round_trip() -> None:
    from encodec import EncodecModel

    torch.manual_seed(0)
    model = EncodecModel.encodec_model_24khz(pretrained=False)
    model.set_target_bandwidth(6.0)
    model.eval()
    assert model.sample_rate == 24000
    wav = 0.1 * torch.randn(1, 1, 24000)
    with torch.no_grad():
        frames = model.encode(wav)
        codes = torch.cat([c for c, _ in frames], dim=-1)
        out = model.decode(frames)
    # 6 kbps = 8 codebooks of 1024 entries at 75 Hz.
    assert codes.shape == (1, 8, 75)
    assert codes.min() >= 0 and codes.max() < 1024
    assert out.shape == wav.shape
    assert torch.isfinite(out).all()
    assert out.abs().max() > 0
