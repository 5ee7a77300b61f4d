"""Losses shared by the models' training forms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_ce(
    logits: torch.Tensor, target: torch.Tensor, w: torch.Tensor, rows: torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy of logits [B, T, V] against target [B, T], each frame weighted by its
    class's weight w [V] and, where given, its row's weight rows [B] (a row at 0 teaches
    nothing); the weighted mean, as F.cross_entropy with weights computes it."""
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
    wt = w[target.flatten()]
    if rows is not None:
        wt = wt * rows.to(wt.dtype).repeat_interleave(target.shape[1])
    return (loss * wt).sum() / wt.sum().clamp(min=1e-12)
