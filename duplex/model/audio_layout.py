"""The model's audio stream in the delayed layout (docs/streams.md): codebook 0 of frame t
with the acoustic codebooks of frame t - D, so one step predicts a frame's acoustic codes
knowing its semantic one."""

from __future__ import annotations

import torch


def delay_audio(a: torch.Tensor, delay: int, pad: int) -> torch.Tensor:
    """a [B, T, K] -> delayed layout: codebooks k >= 1 shifted `delay` frames later."""
    if delay == 0:
        return a
    out = a.clone()
    out[:, :, 1:] = pad
    out[:, delay:, 1:] = a[:, :-delay, 1:]
    return out


def undelay_audio(ad: torch.Tensor, delay: int) -> torch.Tensor:
    """Delayed layout [B, T, K] -> frames [B, T - delay, K] whose codebooks are all known."""
    if delay == 0:
        return ad
    return torch.cat([ad[:, :-delay, :1], ad[:, delay:, 1:]], dim=-1)
