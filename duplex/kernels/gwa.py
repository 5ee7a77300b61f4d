"""Guided window attention ops: gather window embeddings, attend over k candidate windows.

Plain PyTorch (CPU and CUDA). The windows are small (k·W ids per query position), so the op is a
batched gather plus a softmax over k·W + 1 slots; nothing here depends on the history length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def window_attend_tables(
    q: torch.Tensor,
    ids: torch.Tensor,
    tok_k: torch.Tensor,
    tok_v: torch.Tensor,
    rel_k: torch.Tensor,
    rel_v: torch.Tensor,
    mask: torch.Tensor,
    valid: torch.Tensor,
    slot_k: torch.Tensor,
    slot_v: torch.Tensor,
    match_k: torch.Tensor,
    match_v: torch.Tensor,
    match: torch.Tensor,
    dig_k: torch.Tensor,
    dig_v: torch.Tensor,
    digits: torch.Tensor,
    null_k: torch.Tensor,
    null_v: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The GWA read with every key and value part given as a table, picked by index.

    Each candidate j has W window slots (key tok_k[ids_jo] + rel_k[o] + slot_k[j] +
    match_k[match_j]) and P digit slots (key dig_k[p, digits_jp] + slot_k[j] + match_k[match_j]);
    values alike. One softmax over all of them plus the null slot: `window_attend` over the
    summed keys, without ever summing them.

    q: [B, T, H, D]; ids: [B, T, k, W] rows of tok_k, tok_v: [H, N, D] (head-major);
    rel_k, rel_v: [W, H, D]; mask: [B, T, k, W] (window id readable); valid: [B, T, k] (digit
    slots readable); slot_k, slot_v: [k, H, D]; match_k, match_v: [M, H, D] with match
    [B, T, k] in [0, M); dig_k, dig_v: [P, base, H, D] with digits [B, T, k, P] in [0, base);
    null_k, null_v: [H, D]; bias: [B, T, k] added to every logit of a candidate.
    Returns [B, T, H, D].

    Cost per position: the k·W window keys are gathered once (head-major, so the dot products
    are one batched matmul with no transpose), the values are summed by `embedding_bag` (never
    gathered), and the table terms are q·table products picked by index, their values
    probabilities summed into bins per table row. Nothing of size [B, T, k, P, d] exists.
    """
    B, T, k, W = ids.shape
    H, N, D = tok_k.shape
    P, base = dig_k.shape[0], dig_k.shape[1]
    M = match_k.shape[0]
    scale = D**-0.5
    # rows: [B·T·H, k·W] row of each (head, window id) in the head-major tables
    rows = ids.reshape(B * T, 1, k * W) + torch.arange(H, device=ids.device)[:, None] * N
    rows = rows.reshape(B * T * H, k * W)
    keys = tok_k.reshape(H * N, D).index_select(0, rows.reshape(-1)).reshape(B * T * H, k * W, D)
    lw = torch.bmm(keys, q.reshape(B * T * H, D, 1)).reshape(B, T, H, k, W)
    lw = lw + torch.einsum("bthd,whd->bthw", q, rel_k)[:, :, :, None, :]
    # digit slots: q against every (place, digit), picked by the candidates' digits
    qd = torch.einsum("bthd,pnhd->bthpn", q, dig_k).reshape(B, T, H, P * base)
    place = torch.arange(P, device=digits.device) * base
    dig_idx = (digits + place).reshape(B, T, 1, k * P).expand(B, T, H, k * P)
    ld = torch.gather(qd, -1, dig_idx).reshape(B, T, H, k, P)
    # per-candidate terms: slot and matched length, [B, T, H, k]
    m_idx = match[:, :, None, :].expand(B, T, H, k)
    qm = torch.einsum("bthd,mhd->bthm", q, match_k)
    cand = torch.einsum("bthd,khd->bthk", q, slot_k) + torch.gather(qm, -1, m_idx)
    logits = (torch.cat([lw, ld], dim=-1) + cand[..., None]) * scale
    if bias is not None:
        logits = logits + bias[:, :, None, :, None]
    readable = torch.cat([mask, valid[..., None].expand(B, T, k, P)], dim=-1) & valid[..., None]
    logits = logits.masked_fill(~readable[:, :, None], float("-inf"))
    null = torch.einsum("bthd,hd->bth", q, null_k)[..., None] * scale
    p = torch.softmax(torch.cat([null, logits.reshape(B, T, H, k * (W + P))], dim=-1), dim=-1)
    pw = p[..., 1:].reshape(B, T, H, k, W + P)
    pt = pw[..., :W]
    weights = pt.reshape(B * T * H, k * W)
    out = F.embedding_bag(rows, tok_v.reshape(H * N, D), per_sample_weights=weights, mode="sum")
    out = out.reshape(B, T, H, D)
    out = out + torch.einsum("bthw,whd->bthd", pt.sum(dim=3), rel_v)
    pk = pw.sum(dim=-1)
    out = out + torch.einsum("bthk,khd->bthd", pk, slot_v)
    bins = torch.zeros(B, T, H, M, dtype=p.dtype, device=p.device).scatter_add(-1, m_idx, pk)
    out = out + torch.einsum("bthm,mhd->bthd", bins, match_v)
    pd = pw[..., W:].reshape(B, T, H, k * P)
    bins = torch.zeros(B, T, H, P * base, dtype=p.dtype, device=p.device)
    bins = bins.scatter_add(-1, dig_idx, pd)
    out = out + torch.einsum("bthn,nhd->bthd", bins, dig_v.reshape(P * base, H, D))
    return out + p[..., :1] * null_v
