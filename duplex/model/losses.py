"""Losses shared by the models' training forms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def frame_weight(weight: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor | None:
    """A weight per row [B] or per frame [B, T] as one per frame [B, T] (None stays None)."""
    if weight is None:
        return None
    return weight[:, None].expand(target.shape[:2]) if weight.dim() == 1 else weight


def weighted_ce(
    logits: torch.Tensor, target: torch.Tensor, w: torch.Tensor, weight: torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy of logits [B, T, V] against target [B, T], each frame weighted by its
    class's weight w [V] and, where given, by `weight` per row [B] or per frame [B, T] (0
    teaches nothing); the weighted mean, as F.cross_entropy with weights computes it."""
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
    wt = w[target.flatten()]
    fw = frame_weight(weight, target)
    if fw is not None:
        wt = wt * fw.reshape(-1).to(wt.dtype)
    return (loss * wt).sum() / wt.sum().clamp(min=1e-12)
