"""Guided window attention ops: gather window embeddings, attend over k candidate windows.

Plain PyTorch (CPU and CUDA). The windows are small (k·W ids per query position), so the op is a
batched gather plus a softmax over k·W + 1 slots; nothing here depends on the history length.
"""

from __future__ import annotations

import torch


def gather_window_proj(
    table: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Project the embeddings of `ids` by `weight`: (table[ids]) @ weight.T.

    table: [V, D] embedding; weight: [E, D]; ids: [...] long -> [..., E].
    Chooses the cheaper order: project the whole table once when the ids outnumber the vocabulary
    (training), gather first when they are few (a decode step). Both give the same result up to
    rounding.
    """
    if ids.numel() >= table.shape[0]:
        return (table @ weight.T)[ids]
    return table[ids] @ weight.T


def window_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    null_k: torch.Tensor,
    null_v: torch.Tensor,
) -> torch.Tensor:
    """Attend each query over its own k·W window slots plus one learned "read nothing" slot.

    q: [B, T, H, D]; k, v: [B, T, S, H, D] (S = k·W slots); mask: [B, T, S] (True = readable);
    null_k, null_v: [H, D]. Returns [B, T, H, D]. Scores are scaled by D ** -0.5.
    """
    scale = q.shape[-1] ** -0.5
    # logits: [B, T, H, S]
    logits = torch.einsum("bthd,btshd->bths", q, k) * scale
    logits = logits.masked_fill(~mask[:, :, None, :], float("-inf"))
    # null: [B, T, H, 1]
    null = torch.einsum("bthd,hd->bth", q, null_k)[..., None] * scale
    p = torch.softmax(torch.cat([null, logits], dim=-1), dim=-1)
    out = torch.einsum("bths,btshd->bthd", p[..., 1:], v)
    return out + p[..., :1] * null_v
