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


def window_attend_factored(
    q: torch.Tensor,
    tok_k: torch.Tensor,
    tok_v: torch.Tensor,
    rel_k: torch.Tensor,
    rel_v: torch.Tensor,
    meta_k: torch.Tensor,
    meta_v: torch.Tensor,
    mask: torch.Tensor,
    null_k: torch.Tensor,
    null_v: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`window_attend` with keys and values given as sums tok + rel(offset) + meta(candidate).

    q: [B, T, H, D]; tok_k, tok_v: [B, T, k, W, H, D]; rel_k, rel_v: [W, H, D];
    meta_k, meta_v: [B, T, k, H, D]; mask: [B, T, k, W]; null_k, null_v: [H, D] -> [B, T, H, D].
    Never materialises the summed keys: the offset and candidate terms enter the logits and the
    output through their own small products (3x less memory traffic than summing first).
    bias: [B, T, k] added to every logit of a candidate's window, all heads (a predicted
    lookup's key log-probability: the softmax then weighs a window by p(key) · exp(score), so
    the loss that trains the choice of window trains the choice of key too).
    """
    B, T, k, W, H, D = tok_k.shape
    scale = D**-0.5
    # logits: [B, T, H, k, W]
    logits = torch.einsum("bthd,btkwhd->bthkw", q, tok_k)
    logits = logits + torch.einsum("bthd,whd->bthw", q, rel_k)[:, :, :, None, :]
    logits = logits + torch.einsum("bthd,btkhd->bthk", q, meta_k)[..., None]
    logits = logits * scale
    if bias is not None:
        logits = logits + bias[:, :, None, :, None]
    logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
    null = torch.einsum("bthd,hd->bth", q, null_k)[..., None] * scale
    p = torch.softmax(torch.cat([null, logits.reshape(B, T, H, k * W)], dim=-1), dim=-1)
    pw = p[..., 1:].reshape(B, T, H, k, W)
    out = torch.einsum("bthkw,btkwhd->bthd", pw, tok_v)
    out = out + torch.einsum("bthw,whd->bthd", pw.sum(dim=3), rel_v)
    out = out + torch.einsum("bthk,btkhd->bthd", pw.sum(dim=4), meta_v)
    return out + p[..., :1] * null_v
