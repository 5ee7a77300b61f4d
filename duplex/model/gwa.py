"""Guided window attention (GWA): read a few windows of the whole history at constant cost.

Three nouns, three files (the method, with equations, is in docs/gwa.md):

- `gwa_history`: `History` keeps one stream's ids as a `TokenLog` plus an `NgramIndex`;
  `read_histories` finds, for every position t, k candidate places to read (the local window
  and, per indexed n-gram order, the most recent earlier places where the n-gram ending at t
  occurred), each with its window of W ids (never past t), matched suffix length and anchor
  position digits. Work per position: O(k·(W + max_walk·m)), independent of the history length.
- `gwa_reader`: `WindowReader`, the streaming module that owns every stream's history, in a
  parallel form (whole sequences) and a streaming form (chunks appended to each stream).
- here, `GuidedWindowAttention`, the layer (one per GWA read in the backbone): re-embeds the
  window ids with the model's token embedding plus window-relative position and candidate
  features, and attends from the current hidden state over all k·W window slots plus a "read
  nothing" slot, with an output gate. Candidate features enter the keys, so the softmax mixes
  windows by learned scores and the loss trains the choice of window.

Training runs the reader over a whole sequence at once (its lookups only ever see earlier
positions), so all T reads are one batched tensor: no recurrence. Streaming appends each chunk to
the log and reads exactly the same windows, so both forms give the same outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from duplex.kernels.gwa import gather_window_proj, window_attend_factored
from duplex.model.gwa_history import GWAReadConfig, History, WindowRead, read_histories
from duplex.model.gwa_reader import WindowReader, WindowReaderState

__all__ = [
    "GWAConfig",
    "GWAReadConfig",
    "GuidedWindowAttention",
    "History",
    "WindowRead",
    "WindowReader",
    "WindowReaderState",
    "read_histories",
]


@dataclass
class GWAConfig:
    """Sizes of one GWA layer."""

    d_model: int
    n_heads: int = 2
    head_dim: int = 32


class GuidedWindowAttention(nn.Module):
    """One GWA read: x [B, T, d] and the reader's windows -> y [B, T, d].

    Stateless: everything it needs across steps is in the reader's history, so its streaming form
    is its parallel form applied to the new positions' windows.
    """

    def __init__(self, cfg: GWAConfig, read: GWAReadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.read_cfg = read
        d, H, D = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, H * D, bias=False)
        self.k_proj = nn.Linear(d, H * D, bias=False)
        self.v_proj = nn.Linear(d, H * D, bias=False)
        self.gate_proj = nn.Linear(d, H * D)
        self.o_proj = nn.Linear(H * D, d, bias=False)
        # Window features: window-relative offset, candidate slot, matched length, anchor digits.
        self.rel = nn.Parameter(torch.randn(read.window, d) * 0.02)
        self.slot = nn.Parameter(torch.randn(read.n_candidates, d) * 0.02)
        self.match = nn.Parameter(torch.randn(read.max_match + 1, d) * 0.02)
        self.digits = nn.Parameter(torch.randn(read.pos_digits, read.pos_base, d) * 0.02)
        self.null_k = nn.Parameter(torch.zeros(H, D))
        self.null_v = nn.Parameter(torch.zeros(H, D))

    def forward(self, x: torch.Tensor, read: WindowRead, embedding: torch.Tensor) -> torch.Tensor:
        """x [B, T, d]; read from the WindowReader; embedding [V, d] the model's token table."""
        B, T, _ = x.shape
        H, D = self.cfg.n_heads, self.cfg.head_dim
        k_n, W = read.ids.shape[2], read.ids.shape[3]
        P = self.read_cfg.pos_digits
        # meta: [B, T, k, d] per-candidate features
        place = torch.arange(P, device=x.device)
        # meta: [B, T, k, d] per-candidate features (slot, matched length)
        meta = self.slot[None, None] + self.match[read.match]
        # The anchor's position digits are extra slots of its window ("where I looked" as
        # readable items): dig: [B, T, k, P, d], one embedding per (place, digit value).
        dig = self.digits[place, read.digits]
        # keys and values are linear in (token + offset + candidate): project each part once.
        # tok_k: [B, T, k, W + P, H, D]
        tok_k = gather_window_proj(embedding, self.k_proj.weight, read.ids)
        tok_v = gather_window_proj(embedding, self.v_proj.weight, read.ids)
        tok_k = torch.cat([tok_k, self.k_proj(dig)], dim=3).reshape(B, T, k_n, W + P, H, D)
        tok_v = torch.cat([tok_v, self.v_proj(dig)], dim=3).reshape(B, T, k_n, W + P, H, D)
        rel_k = F.pad(self.k_proj(self.rel), (0, 0, 0, P)).reshape(W + P, H, D)
        rel_v = F.pad(self.v_proj(self.rel), (0, 0, 0, P)).reshape(W + P, H, D)
        meta_k = self.k_proj(meta).reshape(B, T, k_n, H, D)
        meta_v = self.v_proj(meta).reshape(B, T, k_n, H, D)
        # mask: [B, T, k, W + P]; digit slots are readable wherever the candidate is valid
        mask = torch.cat([read.mask, read.valid[..., None].expand(B, T, k_n, P)], dim=-1)
        mask = mask & read.valid[..., None]
        q = self.q_proj(x).reshape(B, T, H, D)
        o = window_attend_factored(
            q, tok_k, tok_v, rel_k, rel_v, meta_k, meta_v, mask, self.null_k, self.null_v
        )
        o = o.reshape(B, T, H * D) * torch.sigmoid(self.gate_proj(x))
        return self.o_proj(o)
