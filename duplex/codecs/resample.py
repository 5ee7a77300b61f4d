"""Resampling for inputs at other rates: codecs take audio only at their own sample rate."""

from __future__ import annotations

import torch
import torchaudio.functional as AF


def resample(wav: torch.Tensor, from_rate: int, to_rate: int) -> torch.Tensor:
    """Band-limited (windowed sinc) resampling along the last axis: [..., T] -> [..., T'].

    T' = ceil(T * to_rate / from_rate). Rates must be positive integers; equal rates return the
    input unchanged.
    """
    if int(from_rate) != from_rate or int(to_rate) != to_rate or from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive integers, got {from_rate} -> {to_rate}")
    if not torch.is_floating_point(wav):
        raise ValueError(f"resample needs a floating point tensor, got {wav.dtype}")
    if from_rate == to_rate:
        return wav
    return AF.resample(wav, int(from_rate), int(to_rate))
